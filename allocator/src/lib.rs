//! The svcbroker allocator: leases TCP ports per pool (one pool per node)
//! and issues generated credentials per owner, durably in SQLite.
//!
//! Layers, innermost first:
//! - [`Store`]: blocking, one connection, one `BEGIN IMMEDIATE` transaction
//!   per call; usable without gRPC.
//! - [`StoreHandle`]: runs a `Store` on a dedicated thread for async callers.
//! - [`AllocatorService`]: the `svcbroker.v1.Allocator` gRPC adapter.
//! - [`run`]: serves it (with health and reflection) on a listener.

use std::future::Future;

use svcbroker_proto::v1::allocator_server::AllocatorServer;
use tokio::net::TcpListener;
use tonic::service::Routes;

mod config;
mod error;
mod handle;
mod service;
mod store;

pub use config::{Config, ConfigError, ENV_DB, ENV_LISTEN, ENV_TOKEN, load_config};
pub use error::Error;
pub use handle::StoreHandle;
pub use service::AllocatorService;
pub use store::{
    Allocations, Credential, CredentialInfo, IssuedCredential, LeaseInfo, MAX_NAME_LEN,
    PortAllocation, PortRange, PortRequest, Store, validate_name,
};

/// The gRPC service name, as reported by health checks and reflection.
pub const SERVICE_NAME: &str = "svcbroker.v1.Allocator";

/// Opens the database at `config.db_path` and serves `svcbroker.v1.Allocator`
/// (plus health and reflection) on `listener` until `shutdown` resolves.
///
/// `config.listen` is not used: the caller binds, so that tests and
/// `svcbroker up` can pass a listener on port 0. The database is closed
/// before this returns, so the same file can be reopened at once.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let store = StoreHandle::open(&config.db_path).await?;
    tracing::info!(
        addr = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
        db = %config.db_path.display(),
        "allocator serving"
    );
    if let Ok(addr) = listener.local_addr() {
        svcbroker_proto::auth::warn_if_open("allocator", config.token.as_deref(), addr);
    }
    let routes = Routes::new(AllocatorServer::new(AllocatorService::new(store.clone())));
    let served = svcbroker_proto::server::serve_with_token(
        routes,
        &[SERVICE_NAME],
        listener,
        shutdown,
        config.token.as_deref(),
    )
    .await;
    store.close().await;
    tracing::info!("allocator stopped");
    Ok(served?)
}
