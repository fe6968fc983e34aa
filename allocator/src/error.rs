//! The allocator's error type and its single mapping onto gRPC statuses.

use std::path::PathBuf;

use tonic::Status;

/// Everything that can go wrong in the allocator.
///
/// Messages never contain a password: the only values they echo are pool
/// names, paths and port numbers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; nothing was stored.
    #[error("{0}")]
    InvalidArgument(String),
    /// Every port of the requested range is leased or excluded.
    #[error("no free port in pool {pool} range {start}-{end}")]
    PoolExhausted {
        /// The pool that was asked.
        pool: String,
        /// First port of the requested range.
        start: u16,
        /// Last port of the requested range (inclusive).
        end: u16,
    },
    /// The database file (or its directory) could not be created or opened.
    #[error("cannot open database {path}: {source}")]
    Open {
        /// The database path.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The database refused WAL mode, which durability and concurrent
    /// readers rely on (e.g. it lives on a file system without shared memory).
    #[error("database {path} does not support WAL journal mode (got {mode})")]
    NoWal {
        /// The database path.
        path: PathBuf,
        /// The journal mode SQLite reported instead.
        mode: String,
    },
    /// The database was written by a newer allocator.
    #[error("database schema version {found} is newer than the supported version {supported}")]
    UnsupportedSchema {
        /// `PRAGMA user_version` of the file.
        found: i32,
        /// The newest version this build knows.
        supported: i32,
    },
    /// The store thread could not be started.
    #[error("cannot start the store thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The WAL could not be synced: what is on disk is unknown.
    #[error("cannot sync the database: {0}")]
    Sync(#[from] std::io::Error),
    /// SQLite failed.
    #[error("storage: {0}")]
    Storage(#[from] rusqlite::Error),
    /// The operating system's random number generator failed.
    #[error("random number generator: {0}")]
    Rng(String),
    /// An invariant the store relies on did not hold.
    #[error("internal: {0}")]
    Internal(&'static str),
    /// The store thread has stopped (shutdown in progress, or it died).
    #[error("allocator store is not running")]
    Unavailable,
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl Error {
    /// True when SQLite gave up waiting for a lock another process holds:
    /// the request can simply be retried.
    fn is_busy(&self) -> bool {
        matches!(
            self,
            Error::Storage(rusqlite::Error::SqliteFailure(e, _))
                if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        )
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument(msg) => Status::invalid_argument(msg),
            Error::PoolExhausted { .. } => Status::resource_exhausted(err.to_string()),
            Error::Unavailable => Status::unavailable(err.to_string()),
            _ if err.is_busy() => {
                tracing::warn!(error = %err, "database busy");
                Status::unavailable("database is busy, retry later")
            }
            // Storage details stay in the log: clients get no internals, and
            // this is where the error is handled, so this is where it is logged.
            _ => {
                tracing::error!(error = %err, "request failed");
                Status::internal("internal allocator error")
            }
        }
    }
}
