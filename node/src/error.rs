//! The node's error type and its one mapping to gRPC status codes.

use std::path::PathBuf;

/// Everything a node operation can fail with.
///
/// Messages never carry file contents or environment values, which may hold
/// passwords; a daemon's stderr tail is included on purpose, since it is the
/// only way the caller learns why a start failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed (bad id, path, port, kind, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The node holds as many instances as it accepts.
    #[error("node is full: it holds {used} of {capacity} instances")]
    CapacityExhausted {
        /// Instances held (including ones being provisioned).
        used: usize,
        /// The configured capacity.
        capacity: u32,
    },
    /// The instance exists in a shape that conflicts with the request.
    #[error("{0}")]
    Conflict(String),
    /// The daemon could not be started or exited before it was ready.
    #[error("instance {instance_id} failed to start: {reason}{}", tail_suffix(.stderr_tail))]
    StartFailed {
        /// The instance.
        instance_id: String,
        /// Spawn error or exit status.
        reason: String,
        /// Last lines of the daemon's stderr.
        stderr_tail: String,
    },
    /// The daemon did not accept connections within the readiness timeout.
    #[error(
        "instance {instance_id} did not accept connections on port {port} within {timeout_ms} ms{}",
        tail_suffix(.stderr_tail)
    )]
    ReadyTimeout {
        /// The instance.
        instance_id: String,
        /// The port that stayed closed.
        port: u32,
        /// The timeout that passed.
        timeout_ms: u64,
        /// Last lines of the daemon's stderr.
        stderr_tail: String,
    },
    /// The instance is not on this node.
    #[error("instance {0} not found on this node")]
    NotFound(String),
    /// A filesystem operation failed.
    #[error("{context} {}: {source}", .path.display())]
    Io {
        /// What was being done.
        context: &'static str,
        /// On which path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A lifecycle hook failed. `detail` (a command's stderr tail, an HTTP
    /// response's first bytes) goes to the caller but never into the log.
    #[error("{phase} hook {index} of {count} ({what}) {reason}{}", detail_suffix(.detail))]
    HookFailed {
        /// "provision", "deprovision", "bind" or "unbind".
        phase: &'static str,
        /// 1-based position of the hook.
        index: usize,
        /// How many hooks the call had.
        count: usize,
        /// Program name, or method and URL without userinfo or query.
        what: String,
        /// Exit status, HTTP status, timeout or transport error.
        reason: String,
        /// Output that explains the failure.
        detail: String,
        /// True when repeating the call may succeed (timeouts, connection
        /// errors), so that the gateway retries instead of failing.
        transient: bool,
    },
    /// The PostgreSQL server refused or failed an operation.
    #[error("postgresql: {message}")]
    Database {
        /// What failed; never the statement (it may carry a password).
        message: String,
        /// True when the server could not be reached.
        transient: bool,
    },
    /// This node cannot serve the request as configured (e.g. no database
    /// server configured).
    #[error("{0}")]
    Unsupported(String),
    /// The instance exists but cannot serve the request right now (its
    /// daemon is restarting).
    #[error("{0}")]
    Unavailable(String),
    /// A system command (mount, mkfs.ext4, ...) failed.
    #[error("{command} failed: {message}")]
    System {
        /// The program and what it was doing.
        command: String,
        /// Exit status and stderr of the command (no secrets involved).
        message: String,
    },
    /// The node is stopping and takes no new work.
    #[error("node is shutting down")]
    ShuttingDown,
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; stderr:\n{tail}")
    }
}

impl Error {
    /// Builds an [`Error::Io`] from an I/O error, the action and the path.
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io {
            context,
            path,
            source,
        }
    }
}

impl Error {
    /// Returns the message without the daemon's stderr, for log lines:
    /// the caller gets the full text, the node's log stays free of whatever
    /// a daemon printed (which could echo its config).
    pub(crate) fn summary(&self) -> String {
        match self {
            Error::StartFailed {
                instance_id,
                reason,
                ..
            } => format!("instance {instance_id} failed to start: {reason}"),
            Error::ReadyTimeout {
                instance_id,
                port,
                timeout_ms,
                ..
            } => format!(
                "instance {instance_id} did not accept connections on port {port} within {timeout_ms} ms"
            ),
            Error::HookFailed {
                phase,
                index,
                count,
                what,
                reason,
                ..
            } => format!("{phase} hook {index} of {count} ({what}) {reason}"),
            other => other.to_string(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let msg = err.to_string();
        match err {
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            Error::CapacityExhausted { .. } => tonic::Status::resource_exhausted(msg),
            Error::Conflict(_) | Error::StartFailed { .. } | Error::Unsupported(_) => {
                tonic::Status::failed_precondition(msg)
            }
            Error::HookFailed { transient, .. } | Error::Database { transient, .. } => {
                if transient {
                    tonic::Status::unavailable(msg)
                } else {
                    tonic::Status::failed_precondition(msg)
                }
            }
            Error::Unavailable(_) => tonic::Status::unavailable(msg),
            Error::System { .. } => tonic::Status::internal(msg),
            Error::ReadyTimeout { .. } => tonic::Status::deadline_exceeded(msg),
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::ShuttingDown => tonic::Status::unavailable(msg),
            Error::Io { .. } | Error::Serve(_) => tonic::Status::internal(msg),
        }
    }
}
