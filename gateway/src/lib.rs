//! The svcbroker gateway: an Open Service Broker API v2.17 broker.
//!
//! It owns the catalog (service definitions from `services.d`), the desired
//! state (instances, bindings and operations in SQLite) and the node
//! registry; it talks gRPC to the allocator (ports, credentials) and to the
//! nodes (processes), and serves `svcbroker.v1.Registry` for node
//! announcements.
//!
//! Layers:
//! - [`api`]: OSB REST (axum): validation, idempotency, answers.
//! - [`admin`]: the operator's read-only API under `/admin/v1` (the CLI's).
//! - [`engine`]: drives recorded operations with idempotent steps.
//! - [`store`]: SQLite on a dedicated thread.
//! - [`registry`]: live nodes, placement candidates, the Registry service.
//! - [`catalog`]: the catalog behind a swappable pointer, reloaded on SIGHUP.
//! - [`run`]: wires them together on two listeners until shutdown.

use std::future::Future;
use std::sync::Arc;

use svcbroker_proto::v1::registry_server::RegistryServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::service::Routes;

pub mod admin;
pub mod api;
pub mod catalog;
pub mod config;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod registry;
pub mod store;
pub mod validate;

pub use catalog::{Catalogs, ReloadSummary, reload_catalog};
pub use config::{Config, ConfigError, load_config};
pub use engine::{Engine, ReconcileCounts, ReconcileSettings};
pub use error::Error;
pub use registry::{NodeRegistry, RegistryService};
pub use store::Store;

/// The gRPC service name, as reported by health checks and reflection.
pub const SERVICE_NAME: &str = "svcbroker.v1.Registry";

/// Serves the OSB REST API on `http_listener` and `svcbroker.v1.Registry`
/// (with health and reflection) on `grpc_listener`, plus the background
/// workers (static node polling, reconciliation every
/// `reconcile_interval_ms` and at each node's new boot, catalog reload on
/// SIGHUP, and the drivers of every operation, including those left
/// `in progress` by an earlier run), until `shutdown` resolves.
///
/// `config.http_listen` and `config.grpc_listen` are not used: the caller
/// binds, so that tests can pass listeners on port 0. Fails at once when the
/// config is invalid (including missing OSB credentials), the service
/// definitions do not load or the database cannot be opened. The database is
/// closed before this returns.
pub async fn run(
    config: Config,
    http_listener: TcpListener,
    grpc_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    config.validate()?;
    config.require_credentials()?;
    let catalogs = Arc::new(Catalogs::load(&config.services_dir)?);
    let store = Store::open(&config.db_path).await?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_tx = Arc::new(shutdown_tx);
    let forward = {
        let tx = Arc::clone(&shutdown_tx);
        tokio::spawn(async move {
            shutdown.await;
            let _ = tx.send(true);
        })
    };

    let token = match svcbroker_proto::auth::BearerToken::new(config.token.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            forward.abort();
            store.close().await;
            return Err(Error::Config(ConfigError::Invalid {
                key: "token",
                message: e.message().to_owned(),
            }));
        }
    };
    let (registry, boots) = NodeRegistry::new(config.node_timeout(), config.announce_interval());
    let registry = registry.with_token(token.clone());
    let engine = match Engine::new(
        store.clone(),
        Arc::clone(&catalogs),
        registry.clone(),
        &config.allocator_url,
        &token,
        config.reconcile_settings(),
        shutdown_rx.clone(),
    ) {
        Ok(e) => e,
        Err(e) => {
            forward.abort();
            store.close().await;
            return Err(e);
        }
    };

    let mut workers = JoinSet::new();
    workers.spawn(registry::poll_static_nodes(
        registry.clone(),
        config.nodes.clone(),
        shutdown_rx.clone(),
    ));
    workers.spawn(reconciler(
        Arc::clone(&engine),
        boots,
        config.reconcile_settings().interval,
        shutdown_rx.clone(),
    ));
    workers.spawn(reload_on_sighup(Arc::clone(&catalogs), shutdown_rx.clone()));
    match engine.resume_all().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(operations = n, "resumed operations left in progress"),
        Err(e) => tracing::error!(error = %e, "cannot resume operations"),
    }

    tracing::info!(
        http = %http_listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
        grpc = %grpc_listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
        db = %config.db_path.display(),
        services = catalogs.snapshot().catalog().services().len(),
        "gateway serving"
    );

    let app = api::router(Arc::clone(&engine), Arc::new(config.clone()))
        .merge(admin::router(Arc::clone(&engine), Arc::new(config.clone())))
        .merge(
            axum::Router::new()
                .route("/metrics", axum::routing::get(metrics::metrics))
                .with_state(Arc::clone(&engine)),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&engine),
            metrics::count_requests,
        ));
    let http = {
        let tx = Arc::clone(&shutdown_tx);
        let rx = shutdown_rx.clone();
        async move {
            // TCP_NODELAY on every accepted connection: a platform's next
            // request must not wait on a delayed ACK of our last answer.
            use axum::serve::ListenerExt as _;
            let http_listener =
                http_listener.tap_io(|stream| svcbroker_proto::server::set_nodelay(stream));
            let r = axum::serve(http_listener, app)
                .with_graceful_shutdown(signalled(rx))
                .await
                .map_err(Error::Io);
            // One server ending (e.g. failing) stops the other too.
            let _ = tx.send(true);
            r
        }
    };
    if let Ok(addr) = grpc_listener.local_addr() {
        svcbroker_proto::auth::warn_if_open("gateway", config.token.as_deref(), addr);
    }
    let grpc = {
        let token = config.token.clone();
        let tx = Arc::clone(&shutdown_tx);
        let rx = shutdown_rx.clone();
        let routes = Routes::new(RegistryServer::new(RegistryService::new(registry.clone())));
        async move {
            let r = svcbroker_proto::server::serve_with_token(
                routes,
                &[SERVICE_NAME],
                grpc_listener,
                signalled(rx),
                token.as_deref(),
            )
            .await
            .map_err(Error::Serve);
            let _ = tx.send(true);
            r
        }
    };
    // In-flight requests (e.g. synchronous ones waiting for an operation)
    // get a grace period, then are dropped.
    let grace = {
        let rx = shutdown_rx.clone();
        async move {
            signalled(rx).await;
            tokio::time::sleep(api::shutdown_grace()).await;
        }
    };
    let (http_result, grpc_result) = tokio::select! {
        r = async { tokio::join!(http, grpc) } => r,
        _ = grace => {
            tracing::warn!("grace period over; dropping in-flight requests");
            (Ok(()), Ok(()))
        }
    };

    engine.stop().await;
    workers.abort_all();
    while workers.join_next().await.is_some() {}
    forward.abort();
    store.close().await;
    tracing::info!("gateway stopped");
    http_result?;
    grpc_result
}

/// Resolves once the shutdown flag is set. (Owning the receiver keeps the
/// future `Send`: a borrowed `wait_for` guard is not.)
pub(crate) async fn signalled(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Reconciles every live node each `interval`, and a node at once when it
/// announces a new boot (it lost its memory of what it holds).
async fn reconciler(
    engine: Arc<Engine>,
    mut boots: mpsc::UnboundedReceiver<registry::NewBoot>,
    interval: std::time::Duration,
    shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            boot = boots.recv() => match boot {
                Some(b) => engine.reconcile_node(&b.node_id, true).await,
                None => return,
            },
            _ = tick.tick() => engine.reconcile_all().await,
            _ = crate::signalled(shutdown.clone()) => return,
        }
    }
}

/// Reloads the service definitions on every SIGHUP; a bad file keeps the
/// old catalog (logged with file and line). Requests in flight keep the
/// catalog they started with.
async fn reload_on_sighup(catalogs: Arc<Catalogs>, shutdown: watch::Receiver<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: no catalog reloads");
            return;
        }
    };
    loop {
        tokio::select! {
            got = hup.recv() => {
                if got.is_none() {
                    return;
                }
                tracing::info!(services_dir = %catalogs.dir().display(),
                    "SIGHUP: reloading service definitions");
                let c = Arc::clone(&catalogs);
                // Reading files and compiling schemas blocks.
                let _ = tokio::task::spawn_blocking(move || reload_catalog(&c)).await;
            }
            _ = crate::signalled(shutdown.clone()) => return,
        }
    }
}
