//! A small OSB client for tests: every request carries basic auth and
//! `X-Broker-API-Version: 2.17` unless a test takes them away, and every
//! answer comes back whole (status, headers, body) so tests assert on it.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::poll::eventually;

/// The OSB API version the tests speak.
pub const API_VERSION: &str = "2.17";

/// An OSB API client bound to one broker.
#[derive(Clone)]
pub struct Osb {
    pub base: String,
    pub username: String,
    pub password: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for Osb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Osb")
            .field("base", &self.base)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A broker answer.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body as JSON (`Value::Null` when it is not JSON; see `text`).
    pub body: Value,
    pub text: String,
}

impl Resp {
    /// Returns header `name` as a string, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Panics unless the status is `want`, showing the body.
    #[track_caller]
    pub fn expect(&self, want: u16) -> &Self {
        assert_eq!(
            self.status.as_u16(),
            want,
            "expected {want}, got {} with body {}",
            self.status,
            self.text
        );
        self
    }

    /// Returns the `operation` of a 202 answer (None when the broker gave
    /// none), panicking if it is present but not a non-empty string.
    #[track_caller]
    pub fn operation(&self) -> Option<String> {
        match self.body.get("operation") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 10_000 => Some(s.clone()),
            Some(other) => panic!("operation must be a non-empty string, got {other}"),
        }
    }
}

/// Builds the query string of an OSB call.
fn query(pairs: &[(&str, &str)]) -> String {
    let mut q = String::new();
    for (k, v) in pairs {
        q.push(if q.is_empty() { '?' } else { '&' });
        q.push_str(k);
        q.push('=');
        q.push_str(&percent_encode(v));
    }
    q
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Osb {
    /// Returns a client for the broker at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str, username: &str, password: &str) -> Osb {
        Osb {
            base: base.trim_end_matches('/').to_string(),
            username: username.to_string(),
            password: password.to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("build http client"),
        }
    }

    /// Returns the same client with other credentials.
    pub fn with_auth(&self, username: &str, password: &str) -> Osb {
        Osb {
            username: username.to_string(),
            password: password.to_string(),
            ..self.clone()
        }
    }

    /// Starts a request to `path_and_query` (appended verbatim to the base
    /// URL) with auth and the API version header.
    pub fn request(&self, method: Method, path_and_query: &str) -> reqwest::RequestBuilder {
        self.bare(method, path_and_query)
            .basic_auth(&self.username, Some(&self.password))
            .header("X-Broker-API-Version", API_VERSION)
    }

    /// Starts a request with no auth and no OSB headers.
    pub fn bare(&self, method: Method, path_and_query: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path_and_query}", self.base))
    }

    /// Sends `req` and reads the whole answer.
    pub async fn send(req: reqwest::RequestBuilder) -> Resp {
        let resp = req.send().await.expect("http request failed");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("read response body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
            text,
        }
    }

    /// `GET /v2/catalog`.
    pub async fn catalog(&self) -> Resp {
        Self::send(self.request(Method::GET, "/v2/catalog")).await
    }

    /// `PUT /v2/service_instances/:id` with `body`. `id` is put in the path
    /// verbatim (already percent-encoded where a test wants that).
    pub async fn provision(&self, id: &str, body: &Value, accepts_incomplete: bool) -> Resp {
        let q = async_query(accepts_incomplete);
        Self::send(
            self.request(Method::PUT, &format!("/v2/service_instances/{id}{q}"))
                .json(body),
        )
        .await
    }

    /// `PATCH /v2/service_instances/:id` with `body`.
    pub async fn update(&self, id: &str, body: &Value, accepts_incomplete: bool) -> Resp {
        let q = async_query(accepts_incomplete);
        Self::send(
            self.request(Method::PATCH, &format!("/v2/service_instances/{id}{q}"))
                .json(body),
        )
        .await
    }

    /// `DELETE /v2/service_instances/:id?service_id=..&plan_id=..`.
    pub async fn deprovision(
        &self,
        id: &str,
        service_id: &str,
        plan_id: &str,
        accepts_incomplete: bool,
    ) -> Resp {
        let mut pairs = vec![("service_id", service_id), ("plan_id", plan_id)];
        if accepts_incomplete {
            pairs.push(("accepts_incomplete", "true"));
        }
        let q = query(&pairs);
        Self::send(self.request(Method::DELETE, &format!("/v2/service_instances/{id}{q}"))).await
    }

    /// `GET /v2/service_instances/:id`.
    pub async fn get_instance(&self, id: &str) -> Resp {
        Self::send(self.request(Method::GET, &format!("/v2/service_instances/{id}"))).await
    }

    /// `GET /v2/service_instances/:id/last_operation[?operation=..]`.
    pub async fn last_operation(&self, id: &str, operation: Option<&str>) -> Resp {
        let q = operation.map_or_else(String::new, |op| query(&[("operation", op)]));
        Self::send(self.request(
            Method::GET,
            &format!("/v2/service_instances/{id}/last_operation{q}"),
        ))
        .await
    }

    /// `PUT /v2/service_instances/:id/service_bindings/:bid` with `body`.
    pub async fn bind(&self, id: &str, bid: &str, body: &Value, accepts_incomplete: bool) -> Resp {
        let q = async_query(accepts_incomplete);
        Self::send(
            self.request(
                Method::PUT,
                &format!("/v2/service_instances/{id}/service_bindings/{bid}{q}"),
            )
            .json(body),
        )
        .await
    }

    /// `DELETE /v2/service_instances/:id/service_bindings/:bid?..`.
    pub async fn unbind(
        &self,
        id: &str,
        bid: &str,
        service_id: &str,
        plan_id: &str,
        accepts_incomplete: bool,
    ) -> Resp {
        let mut pairs = vec![("service_id", service_id), ("plan_id", plan_id)];
        if accepts_incomplete {
            pairs.push(("accepts_incomplete", "true"));
        }
        let q = query(&pairs);
        Self::send(self.request(
            Method::DELETE,
            &format!("/v2/service_instances/{id}/service_bindings/{bid}{q}"),
        ))
        .await
    }

    /// `GET /v2/service_instances/:id/service_bindings/:bid`.
    pub async fn get_binding(&self, id: &str, bid: &str) -> Resp {
        Self::send(self.request(
            Method::GET,
            &format!("/v2/service_instances/{id}/service_bindings/{bid}"),
        ))
        .await
    }

    /// `GET /v2/service_instances/:id/service_bindings/:bid/last_operation`.
    pub async fn binding_last_operation(
        &self,
        id: &str,
        bid: &str,
        operation: Option<&str>,
    ) -> Resp {
        let q = operation.map_or_else(String::new, |op| query(&[("operation", op)]));
        Self::send(self.request(
            Method::GET,
            &format!("/v2/service_instances/{id}/service_bindings/{bid}/last_operation{q}"),
        ))
        .await
    }

    /// Polls the instance's `last_operation` until it is no longer
    /// `in progress` (or the instance is gone: 410, returned as state
    /// `"gone"`) and returns the final answer's state and body.
    pub async fn wait_instance(
        &self,
        id: &str,
        operation: Option<&str>,
        timeout: Duration,
    ) -> (String, Value) {
        let what = format!("last_operation of instance {id}");
        eventually(&format!("{what} to finish"), timeout, || async {
            finished(&what, self.last_operation(id, operation).await)
        })
        .await
    }

    /// Polls a binding's `last_operation` the same way.
    pub async fn wait_binding(
        &self,
        id: &str,
        bid: &str,
        operation: Option<&str>,
        timeout: Duration,
    ) -> (String, Value) {
        let what = format!("last_operation of binding {bid}");
        eventually(&format!("{what} to finish"), timeout, || async {
            finished(&what, self.binding_last_operation(id, bid, operation).await)
        })
        .await
    }
}

/// Reads a `last_operation` answer: `None` while in progress, the final
/// state and body once done ("gone" for 410); panics on anything the spec
/// does not allow.
fn finished(what: &str, r: Resp) -> Option<(String, Value)> {
    match r.status.as_u16() {
        410 => Some(("gone".to_string(), r.body)),
        200 => {
            let state = r.body["state"]
                .as_str()
                .unwrap_or_else(|| panic!("{what} without state: {}", r.text))
                .to_string();
            assert!(
                ["in progress", "succeeded", "failed"].contains(&state.as_str()),
                "{what}: invalid state: {}",
                r.text
            );
            (state != "in progress").then_some((state, r.body))
        }
        _ => panic!("{what}: {} {}", r.status, r.text),
    }
}

fn async_query(accepts_incomplete: bool) -> &'static str {
    if accepts_incomplete {
        "?accepts_incomplete=true"
    } else {
        ""
    }
}

/// A provision request body for `service_id`/`plan_id` with `parameters`.
pub fn provision_body(service_id: &str, plan_id: &str, parameters: Value) -> Value {
    json!({
        "service_id": service_id,
        "plan_id": plan_id,
        "organization_guid": "org-test",
        "space_guid": "space-test",
        "context": { "platform": "svcbroker-tests" },
        "parameters": parameters,
    })
}

/// A bind request body.
pub fn bind_body(service_id: &str, plan_id: &str) -> Value {
    json!({
        "service_id": service_id,
        "plan_id": plan_id,
        "bind_resource": { "app_guid": "app-test" },
        "context": { "platform": "svcbroker-tests" },
    })
}

/// Asserts an OSB error answer: status `status`, a JSON object body with a
/// non-empty `description` and, when `code` is set, `"error": code`; any
/// `error` present is a single CamelCase word (spec "Service Broker Errors").
#[track_caller]
pub fn assert_error(r: &Resp, status: u16, code: Option<&str>) {
    assert_eq!(
        r.status.as_u16(),
        status,
        "expected {status} {code:?}, got {} with body {}",
        r.status,
        r.text
    );
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("application/json"),
        "error {status} must be JSON, content-type {ct:?}, body {}",
        r.text
    );
    let obj = r
        .body
        .as_object()
        .unwrap_or_else(|| panic!("error body must be a JSON object: {}", r.text));
    let description = obj.get("description").and_then(Value::as_str).unwrap_or("");
    assert!(
        !description.trim().is_empty(),
        "error {status} needs a non-empty description: {}",
        r.text
    );
    match (code, obj.get("error")) {
        (Some(want), got) => assert_eq!(
            got.and_then(Value::as_str),
            Some(want),
            "error code: {}",
            r.text
        ),
        (None, Some(got)) => {
            let s = got.as_str().unwrap_or("");
            assert!(
                !s.is_empty()
                    && s.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                    && s.chars().all(|c| c.is_ascii_alphanumeric()),
                "error must be one CamelCase word: {}",
                r.text
            );
        }
        (None, None) => {}
    }
    for field in ["instance_usable", "update_repeatable"] {
        if let Some(v) = obj.get(field) {
            assert!(v.is_boolean(), "{field} must be a boolean: {}", r.text);
        }
    }
}
