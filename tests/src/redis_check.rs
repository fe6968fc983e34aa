//! Uses a redis binding the way an application would: a real Redis client
//! and the binding's credentials, nothing else.

use std::time::Duration;

use serde_json::Value;

/// Host, port and password of a redis binding's `credentials`.
#[derive(Clone)]
pub struct RedisCreds {
    pub host: String,
    pub port: u16,
    pub password: String,
    pub uri: Option<String>,
}

impl std::fmt::Debug for RedisCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCreds")
            .field("host", &self.host)
            .field("port", &self.port)
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
        let wrong = redis::cmd("AUTH")
            .arg("not-the-password")
            .query_async::<String>(&mut con)
            .await;
        assert!(wrong.is_err(), "a wrong password must be refused");
        let ok: String = redis::cmd("AUTH")
            .arg(&self.password)
            .query_async(&mut con)
            .await
            .expect("AUTH with the binding's password");
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

    /// Returns the value of redis `CONFIG GET name`, authenticated.
    pub async fn config_get(&self, name: &str) -> String {
        let mut con = self.connect_unauthenticated().await;
        let _: String = redis::cmd("AUTH")
            .arg(&self.password)
            .query_async(&mut con)
            .await
            .expect("AUTH");
        let pair: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg(name)
            .query_async(&mut con)
            .await
            .expect("CONFIG GET");
        pair.get(1).cloned().unwrap_or_default()
    }

    /// Returns true when something accepts TCP connections on the port.
    pub async fn port_open(&self) -> bool {
        tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .is_ok()
    }
}
