//! Uses a redis binding the way an application would: a real Redis client
//! and the binding's credentials, nothing else.

use std::time::Duration;

use serde_json::Value;

/// Host, port, user and password of a redis binding's `credentials`.
#[derive(Clone)]
pub struct RedisCreds {
    pub host: String,
    pub port: u16,
    /// An ACL user of its own per binding; `None` for the `default` user.
    pub username: Option<String>,
    pub password: String,
    pub uri: Option<String>,
}

impl std::fmt::Debug for RedisCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCreds")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl RedisCreds {
    /// Reads them from a binding's `credentials` object (the port may be a
    /// number or a numeric string).
    #[track_caller]
    pub fn from_credentials(c: &Value) -> RedisCreds {
        let host = c["host"].as_str().expect("credentials.host").to_string();
        let port = match &c["port"] {
            Value::Number(n) => n.as_u64().expect("numeric port"),
            Value::String(s) => s.parse().expect("numeric port string"),
            other => panic!("credentials.port missing: {other}"),
        };
        RedisCreds {
            host,
            port: u16::try_from(port).expect("port fits u16"),
            username: c["username"].as_str().map(str::to_string),
            password: c["password"]
                .as_str()
                .expect("credentials.password")
                .to_string(),
            uri: c["uri"].as_str().map(str::to_string),
        }
    }

    fn url(&self) -> String {
        format!("redis://{}:{}/", self.host, self.port)
    }

    /// The `AUTH` command for these credentials.
    fn auth_cmd(&self, password: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("AUTH");
        if let Some(user) = &self.username {
            cmd.arg(user);
        }
        cmd.arg(password);
        cmd
    }

    async fn connect_unauthenticated(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).expect("redis url");
        tokio::time::timeout(
            Duration::from_secs(10),
            client.get_multiplexed_async_connection(),
        )
        .await
        .expect("redis connect timed out")
        .unwrap_or_else(|e| panic!("connect to redis {}:{}: {e}", self.host, self.port))
    }

    /// Proves the credentials work and are needed: without AUTH a command
    /// is refused, a wrong password is refused, the right one lets SET and
    /// GET round-trip a value; the `uri` (when given) works on its own.
    pub async fn check_auth_set_get(&self) {
        let mut con = self.connect_unauthenticated().await;
        let err = redis::cmd("GET")
            .arg("k")
            .query_async::<Option<String>>(&mut con)
            .await
            .expect_err("redis must refuse commands before AUTH");
        assert!(
            err.to_string().contains("NOAUTH") || err.to_string().contains("Authentication"),
            "unexpected error before AUTH: {err}"
        );
        let wrong = self
            .auth_cmd("not-the-password")
            .query_async::<String>(&mut con)
            .await;
        assert!(wrong.is_err(), "a wrong password must be refused");
        let ok: String = self
            .auth_cmd(&self.password)
            .query_async(&mut con)
            .await
            .expect("AUTH with the binding's credentials");
        assert_eq!(ok, "OK");
        let key = format!("k-{}", uuid::Uuid::new_v4().simple());
        let value = format!("v-{}", uuid::Uuid::new_v4().simple());
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .query_async(&mut con)
            .await
            .expect("SET");
        let got: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut con)
            .await
            .expect("GET");
        assert_eq!(got.as_deref(), Some(value.as_str()));

        if let Some(uri) = &self.uri {
            let client = redis::Client::open(uri.as_str()).expect("credentials.uri parses");
            let mut con = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect with credentials.uri");
            let got: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut con)
                .await
                .expect("GET via uri");
            assert_eq!(
                got.as_deref(),
                Some(value.as_str()),
                "uri reaches the same server"
            );
        }
    }

    /// Returns true when these credentials are accepted by `AUTH`.
    pub async fn auth_accepted(&self) -> bool {
        let mut con = self.connect_unauthenticated().await;
        self.auth_cmd(&self.password)
            .query_async::<String>(&mut con)
            .await
            .is_ok()
    }

    /// Returns field `name` of `INFO section`, authenticated (INFO is not an
    /// admin command, so a binding's ACL user may run it).
    pub async fn info_field(&self, section: &str, name: &str) -> String {
        let mut con = self.connect_unauthenticated().await;
        let _: String = self
            .auth_cmd(&self.password)
            .query_async(&mut con)
            .await
            .expect("AUTH");
        let info: String = redis::cmd("INFO")
            .arg(section)
            .query_async(&mut con)
            .await
            .expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("INFO {section} has no {name}"))
            .trim()
            .to_string()
    }

    /// Returns true when something accepts TCP connections on the port.
    pub async fn port_open(&self) -> bool {
        tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .is_ok()
    }
}
