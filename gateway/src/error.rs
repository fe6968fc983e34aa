//! The gateway's error type, its one mapping from gRPC statuses of the
//! allocator and nodes, and its one mapping onto OSB HTTP answers.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::config::ConfigError;

/// Seconds a client is asked to wait (`Retry-After`) when a component is
/// down or the gateway is busy.
pub const RETRY_AFTER_SECS: u64 = 5;

/// Everything that can go wrong in the gateway.
///
/// Messages never contain a secret: they name ids, services, plans, nodes
/// and rules, never parameter values or passwords (messages coming from
/// nodes are scrubbed of the instance's secrets before they are kept).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or names something that does not exist in
    /// the catalog (400).
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong basic-auth credentials (401).
    #[error("missing or invalid basic authentication credentials")]
    Unauthorized,
    /// The resource does not exist, or is not (yet) fetchable (404).
    #[error("{0}")]
    NotFound(String),
    /// The resource exists with different attributes (409).
    #[error("{0}")]
    Conflict(String),
    /// The resource to delete does not exist (410).
    #[error("{0}")]
    Gone(String),
    /// `X-Broker-API-Version` is missing or unsupported (412).
    #[error("{0}")]
    ApiVersion(String),
    /// The body exceeds `max_body_bytes` (413).
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// OSB `AsyncRequired` (422).
    #[error("{0}")]
    AsyncRequired(String),
    /// OSB `ConcurrencyError`: another operation is in progress (422).
    #[error("{0}")]
    Concurrency(String),
    /// OSB `MaintenanceInfoConflict` (422).
    #[error("{0}")]
    MaintenanceInfoConflict(String),
    /// The requested change is not supported (422, no error code).
    #[error("{0}")]
    Unprocessable(String),
    /// A component is down, or no node can take the request now (503 with
    /// `Retry-After`). For operations this is the transient kind of error
    /// that is retried until the operation's deadline.
    #[error("{message}")]
    Unavailable {
        /// What is unavailable.
        message: String,
    },
    /// An operation ran and failed; what failed is in `message` (500).
    #[error("{message}")]
    OperationFailed {
        /// Why it failed (already scrubbed of secrets).
        message: String,
        /// OSB `instance_usable`, for failed updates and deprovisions.
        instance_usable: Option<bool>,
        /// OSB `update_repeatable`, for failed updates.
        update_repeatable: Option<bool>,
    },
    /// The allocator or a node refused a call for good (502).
    #[error("{component}: {message}")]
    Upstream {
        /// "allocator" or "node <id>".
        component: String,
        /// The gRPC code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// SQLite failed.
    #[error("storage: {0}")]
    Storage(#[from] rusqlite::Error),
    /// The database was written by a newer gateway.
    #[error("database schema version {found} is newer than the supported version {supported}")]
    UnsupportedSchema {
        /// `PRAGMA user_version` of the file.
        found: i32,
        /// The newest version this build knows.
        supported: i32,
    },
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The service definitions could not be loaded.
    #[error(transparent)]
    Catalog(#[from] svcbroker_svcdef::LoadError),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// An I/O error (e.g. of the HTTP server or the store thread).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// An invariant did not hold.
    #[error("internal: {0}")]
    Internal(String),
    /// The gateway is stopping; the operation stays in progress and resumes
    /// at the next start.
    #[error("gateway is shutting down")]
    ShuttingDown,
    /// A provision was halted by a deprovision request; the deprovision
    /// undoes what it took.
    #[error("halted by a deprovision request")]
    Halted,
}

impl Error {
    /// Maps a gRPC status from the allocator or a node (`component`) into
    /// the domain error: this is the only place gRPC codes are interpreted.
    ///
    /// UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED and ABORTED mean "not now"
    /// (a component restarting, a transport timeout, a busy database) and
    /// become [`Error::Unavailable`], as does a call whose connection broke
    /// (see [`connection_broke`]); every other code is permanent.
    pub fn from_grpc(component: &str, status: tonic::Status) -> Error {
        use tonic::Code;
        let message = status.message().to_owned();
        if connection_broke(&status) {
            return Error::Unavailable {
                message: format!("{component} is unavailable: {message}"),
            };
        }
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => {
                Error::Unavailable {
                    message: if message.is_empty() {
                        format!("{component} is unavailable")
                    } else {
                        format!("{component} is unavailable: {message}")
                    },
                }
            }
            code => Error::Upstream {
                component: component.to_owned(),
                code,
                message,
            },
        }
    }

    /// True for errors worth retrying until an operation's deadline.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    /// The HTTP status code this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Gone(_) => StatusCode::GONE,
            Error::ApiVersion(_) => StatusCode::PRECONDITION_FAILED,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::AsyncRequired(_)
            | Error::Concurrency(_)
            | Error::MaintenanceInfoConflict(_)
            | Error::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Unavailable { .. } | Error::ShuttingDown | Error::Halted => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Upstream {
                code: tonic::Code::ResourceExhausted,
                ..
            } => StatusCode::SERVICE_UNAVAILABLE,
            Error::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Error::OperationFailed { .. }
            | Error::Storage(_)
            | Error::UnsupportedSchema { .. }
            | Error::Config(_)
            | Error::Catalog(_)
            | Error::Serve(_)
            | Error::Io(_)
            | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OSB `error` code, where the spec defines one.
    pub fn osb_code(&self) -> Option<&'static str> {
        match self {
            Error::AsyncRequired(_) => Some("AsyncRequired"),
            Error::Concurrency(_) => Some("ConcurrencyError"),
            Error::MaintenanceInfoConflict(_) => Some("MaintenanceInfoConflict"),
            _ => None,
        }
    }

    /// The OSB error body: `{"error"?, "description", ...}`.
    pub fn body(&self) -> Value {
        let mut body = Map::new();
        if let Some(code) = self.osb_code() {
            body.insert("error".into(), json!(code));
        }
        let description = match self {
            // Internals stay in the log (where they are handled): clients
            // get no storage details.
            Error::Storage(_)
            | Error::UnsupportedSchema { .. }
            | Error::Config(_)
            | Error::Catalog(_)
            | Error::Serve(_)
            | Error::Io(_)
            | Error::Internal(_) => "internal broker error".to_owned(),
            other => other.to_string(),
        };
        body.insert(
            "description".into(),
            json!(if description.is_empty() {
                "request failed".to_owned()
            } else {
                description
            }),
        );
        if let Error::OperationFailed {
            instance_usable,
            update_repeatable,
            ..
        } = self
        {
            if let Some(u) = instance_usable {
                body.insert("instance_usable".into(), json!(u));
            }
            if let Some(r) = update_repeatable {
                body.insert("update_repeatable".into(), json!(r));
            }
        }
        Value::Object(body)
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        // Only our own failures are errors; a component being down or
        // full (502/503) is a warning, a refused request is routine.
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "request failed");
        } else if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "request not served");
        } else {
            tracing::info!(status = status.as_u16(), error = %self, "request refused");
        }
        let mut response = (status, Json(self.body())).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"svcbroker\""),
            );
        }
        response
    }
}

/// True when `status` was made on this side because the connection broke
/// under the call (the peer was killed mid-call: tonic answers UNKNOWN
/// "transport error"): such a status carries the transport error as its
/// source, one the peer sent never does. The call may or may not have run
/// there; every call the gateway makes is idempotent, so it is retried.
fn connection_broke(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// Removes every occurrence of the given secrets from `message`, so that
/// text coming from a node (e.g. a daemon's stderr quoting its config file)
/// can be kept in an operation's description.
pub fn scrub(message: &str, secrets: &[&str]) -> String {
    let mut out = message.to_owned();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(*s, "<redacted>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_whose_connection_broke_is_transient() {
        // What tonic makes when the peer dies mid-call: UNKNOWN with the
        // transport error as its source.
        let broke = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )));
        assert_eq!(broke.code(), tonic::Code::Unknown);
        assert!(Error::from_grpc("allocator", broke).is_transient());
    }

    #[test]
    fn an_unknown_status_the_peer_sent_is_permanent() {
        let sent = tonic::Status::unknown("the handler failed");
        let e = Error::from_grpc("node 'n1'", sent);
        assert!(!e.is_transient());
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
    }
}
