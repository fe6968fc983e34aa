//! The operator commands' HTTP client for the gateway: OSB (`/v2`, with
//! `X-Broker-API-Version`) and the admin API (`/admin/v1`), both behind the
//! broker's basic auth; and waiting for asynchronous operations.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;

use super::CliError;
use super::progress::Progress;
use crate::cli::GatewayArgs;

/// The OSB version this client speaks.
pub const API_VERSION: &str = "2.17";
/// Environment variable holding the broker's basic-auth password.
pub const ENV_PASSWORD: &str = "SVCBROKER_PASSWORD";
/// What the CLI tells the broker it is, in every OSB `context`.
pub const PLATFORM: &str = "svcbroker-cli";

/// How long one HTTP request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How often an operation's state is asked for.
const POLL_INTERVAL: Duration = Duration::from_millis(750);

/// An answer: HTTP status and JSON body (`Null` when there was none).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    /// Returns true for 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The OSB error `description`, or the HTTP status when there is none.
    pub fn description(&self) -> String {
        match self.body.get("description").and_then(Value::as_str) {
            Some(d) if !d.is_empty() => d.to_owned(),
            _ => format!("the gateway answered HTTP {}", self.status),
        }
    }

    /// The error this answer means, `what` naming the request ("creating
    /// service instance mysearch1").
    pub fn error(&self, what: &str) -> CliError {
        let d = self.description();
        match self.status {
            401 => CliError::Access(format!(
                "{what}: the gateway refused the credentials (check SVCBROKER_USERNAME and \
                 {ENV_PASSWORD})"
            )),
            404 | 410 => CliError::NotFound(format!("{what}: {d}")),
            _ => CliError::Failed(format!("{what}: {d}")),
        }
    }
}

/// How an operation that was waited for ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// `last_operation` said `succeeded`.
    Succeeded,
    /// `last_operation` answered 410: the instance or binding is gone
    /// (how a finished delete is reported).
    Gone,
}

/// The gateway, as the operator commands talk to it.
pub struct Gateway {
    http: reqwest::Client,
    base: String,
    username: String,
    password: String,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("base", &self.base)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Builds the client from the common flags and `SVCBROKER_PASSWORD`.
    pub fn new(args: &GatewayArgs) -> Result<Gateway, CliError> {
        let password = std::env::var(ENV_PASSWORD)
            .ok()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| {
                CliError::Access(format!(
                    "{ENV_PASSWORD} is not set: export the broker's password (`svcbroker up` \
                     prints it and keeps it in DATA_DIR/osb-password)"
                ))
            })?;
        let base = args.url.trim().trim_end_matches('/').to_owned();
        if !base.starts_with("http://") {
            return Err(CliError::Usage(if base.starts_with("https://") {
                format!("--url {base}: https is not supported by this build of svcbroker")
            } else {
                format!("--url {base:?}: expected an http:// URL")
            }));
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| CliError::Failed(format!("cannot build the HTTP client: {e}")))?;
        Ok(Gateway {
            http,
            base,
            username: args.username.clone(),
            password,
        })
    }

    /// Sends one request; a gateway that cannot be reached is exit code 4.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, CliError> {
        self.try_send(method, path, body).await.map_err(|e| {
            CliError::Access(format!(
                "cannot reach the gateway at {}: {}",
                self.base,
                error_chain(&e)
            ))
        })
    }

    async fn try_send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, reqwest::Error> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .basic_auth(&self.username, Some(&self.password))
            .header("X-Broker-API-Version", API_VERSION)
            .header("X-Broker-API-Originating-Identity", originating_identity());
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Reply { status, body })
    }

    /// GETs `path` and returns its body, mapping any non-2xx to its error.
    pub async fn get(&self, path: &str, what: &str) -> Result<Value, CliError> {
        let r = self.send(Method::GET, path, None).await?;
        if !r.ok() {
            return Err(r.error(what));
        }
        Ok(r.body)
    }

    /// The catalog's services.
    pub async fn services(&self) -> Result<Vec<Value>, CliError> {
        let body = self.get("/v2/catalog", "reading the catalog").await?;
        Ok(body
            .get("services")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default())
    }

    /// An instance from the admin API, by name or id, with its bindings.
    pub async fn instance(&self, key: &str) -> Result<Value, CliError> {
        let r = self
            .send(
                Method::GET,
                &format!("/admin/v1/instances/{}", encode(key)),
                None,
            )
            .await?;
        match r.status {
            200 => Ok(r.body),
            404 => Err(CliError::NotFound(format!(
                "no service instance named '{key}' (svcbroker services --instances lists them)"
            ))),
            _ => Err(r.error(&format!("looking up service instance '{key}'"))),
        }
    }

    /// Polls `last_operation` at `path` (with `query`, e.g.
    /// `operation=...&service_id=...`) until the operation is over or
    /// `timeout` passes, showing its state on `progress`. A gateway that is
    /// briefly unreachable or busy (5xx) is waited for.
    pub async fn wait(
        &self,
        path: &str,
        query: &str,
        progress: &mut Progress,
        timeout: Duration,
    ) -> Result<Done, CliError> {
        let deadline = Instant::now() + timeout;
        let url = format!("{path}?{query}");
        loop {
            tokio::time::sleep(POLL_INTERVAL).await;
            match self.try_send(Method::GET, &url, None).await {
                Ok(r) if r.status == 410 => return Ok(Done::Gone),
                Ok(r) if r.ok() => {
                    let state = r.body.get("state").and_then(Value::as_str).unwrap_or("");
                    let description = r.body.get("description").and_then(Value::as_str);
                    match state {
                        "succeeded" => return Ok(Done::Succeeded),
                        "failed" => {
                            return Err(CliError::Failed(
                                description.unwrap_or("the operation failed").to_owned(),
                            ));
                        }
                        _ => progress.update(description.unwrap_or(state)),
                    }
                }
                Ok(r) if r.status >= 500 => progress.update(&r.description()),
                Ok(r) => return Err(r.error("reading the operation's state")),
                Err(e) => progress.update(&format!("gateway unreachable ({})", error_chain(&e))),
            }
            if Instant::now() >= deadline {
                return Err(CliError::Failed(format!(
                    "still in progress after {} s; it goes on in the background",
                    timeout.as_secs()
                )));
            }
        }
    }
}

/// `X-Broker-API-Originating-Identity`: platform `svcbroker-cli` and the
/// local user, so the broker's logs say who ran the command.
fn originating_identity() -> String {
    use base64::Engine as _;
    let user = std::env::var("USER").unwrap_or_default();
    let value = serde_json::json!({ "user": user }).to_string();
    format!(
        "{PLATFORM} {}",
        base64::engine::general_purpose::STANDARD.encode(value)
    )
}

/// The error with its causes ("error sending request: connection
/// refused"), which reqwest's `Display` alone leaves out.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Percent-encodes a path segment or query value (everything but RFC 3986
/// unreserved characters).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Finds a catalog service by name or id.
pub fn find_service<'a>(services: &'a [Value], key: &str) -> Option<&'a Value> {
    services
        .iter()
        .find(|s| s.get("name").and_then(Value::as_str) == Some(key))
        .or_else(|| {
            services
                .iter()
                .find(|s| s.get("id").and_then(Value::as_str) == Some(key))
        })
}

/// Finds a plan of a catalog service by name or id.
pub fn find_plan<'a>(service: &'a Value, key: &str) -> Option<&'a Value> {
    let plans = service.get("plans").and_then(Value::as_array)?;
    plans
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(key))
        .or_else(|| {
            plans
                .iter()
                .find(|p| p.get("id").and_then(Value::as_str) == Some(key))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn encodes_path_segments() {
        assert_eq!(encode("my-search_1.x~"), "my-search_1.x~");
        assert_eq!(encode("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(encode("é"), "%C3%A9");
    }

    #[test]
    fn finds_by_name_then_id() {
        let services = vec![
            json!({"id": "s1", "name": "redis", "plans": [{"id": "p1", "name": "small"}]}),
            json!({"id": "redis2", "name": "echo", "plans": []}),
        ];
        assert_eq!(find_service(&services, "redis").unwrap()["id"], "s1");
        assert_eq!(find_service(&services, "redis2").unwrap()["name"], "echo");
        assert!(find_service(&services, "nope").is_none());
        assert_eq!(find_plan(&services[0], "p1").unwrap()["name"], "small");
        assert!(find_plan(&services[1], "small").is_none());
    }

    #[test]
    fn reply_errors_map_to_exit_codes() {
        let r = |status, body| Reply { status, body };
        assert_eq!(r(401, Value::Null).error("x").exit_code(), 4);
        assert_eq!(
            r(404, json!({"description": "gone"}))
                .error("x")
                .exit_code(),
            3
        );
        let e = r(
            503,
            json!({"description": "no live node offers service 'redis'"}),
        )
        .error("x");
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().contains("no live node offers"), "{e}");
        assert_eq!(
            r(500, Value::Null).description(),
            "the gateway answered HTTP 500"
        );
    }
}
