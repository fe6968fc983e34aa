//! The svcbroker node agent: provisions and supervises service instances on
//! one host and serves `svcbroker.v1.NodeAgent` over gRPC.
//!
//! The node keeps no database. The gateway renders everything an instance
//! needs (argv, files, port) and sends it in `Provision`; the node runs it,
//! restarts it when it dies, and records only a small metadata file per
//! instance directory so that a restarted node re-adopts its daemons
//! instead of starting duplicates.
//!
//! Kinds of instance: `none` (nothing on the node but its hooks), `process`
//! (a supervised daemon), `database` (a database and roles on the
//! PostgreSQL server of `postgres_url`) and `directory` (a size-capped
//! directory). Every kind runs the lifecycle hooks the gateway sends.

mod announce;
mod config;
mod directory;
mod error;
mod grpc;
mod hooks;
mod meta;
mod node;
mod offer;
mod pg;
mod process;
mod procfs;
mod spec;
mod supervisor;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::os::unix::fs::DirBuilderExt;
use svcbroker_proto::v1::node_agent_server::NodeAgentServer;
use tokio::net::TcpListener;
use tonic::service::Routes;

pub use config::{Config, ConfigError, DirectoryCap, PortRangeConfig, load_config};
pub use error::Error;

/// gRPC service names this server registers with health and reflection.
pub const SERVICE_NAMES: &[&str] = &["svcbroker.v1.NodeAgent"];

/// How often the database server is pinged, so that database services are
/// offered when it comes up and withdrawn when it goes away.
const POSTGRES_CHECK: Duration = Duration::from_secs(10);

/// Runs the node agent on `listener` until `shutdown` resolves: re-adopts
/// daemons left running in `data_dir`, serves NodeAgent (with health and
/// reflection), announces to the gateway if `gateway_url` is set, and on
/// shutdown stops every daemon unless `keep_instances_on_shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let mut config = config;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.data_dir)
        .map_err(Error::io("cannot create data directory", &config.data_dir))?;
    // Canonical, so that "is this inside data_dir" checks compare like
    // with like.
    config.data_dir = std::fs::canonicalize(&config.data_dir)
        .map_err(Error::io("cannot resolve data directory", &config.data_dir))?;
    let local = listener
        .local_addr()
        .map_err(Error::io("cannot read listen address of", "listener"))?;
    let grpc_url = config
        .grpc_url
        .clone()
        .unwrap_or_else(|| default_grpc_url(local, &config.advertise_host));
    let pg = match &config.postgres_url {
        Some(url) => Some(Arc::new(pg::Postgres::new(
            url,
            config.postgres_advertise_host.as_deref(),
        )?)),
        None => None,
    };
    let services_dir = config.services_dir.clone();
    let has_pg = pg.is_some();
    let offer = tokio::task::spawn_blocking(move || offer::offered_services(&services_dir, has_pg))
        .await
        .unwrap_or_default();
    let dir_mode = directory::detect(&config.data_dir, config.directory_cap).await?;
    tracing::info!(
        node_id = %config.node_id,
        %local,
        data_dir = %config.data_dir.display(),
        bind_host = %config.bind_host,
        services = ?offer.plain,
        database_services = ?offer.database,
        directory_cap = dir_mode.as_str(),
        "node agent starting"
    );

    let gateway_url = config.gateway_url.clone();
    let token = config.token.clone();
    let announce_token = svcbroker_proto::auth::BearerToken::new(token.as_deref())
        .map_err(|e| Error::InvalidArgument(format!("config key token: {}", e.message())))?;
    svcbroker_proto::auth::warn_if_open("node", token.as_deref(), local);
    let fallback = Duration::from_millis(config.announce_interval_ms.max(100));
    let node = Arc::new(node::Node::new(config, offer, grpc_url, dir_mode, pg));
    node.check_postgres().await;
    node.readopt().await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let pg_monitor = node.has_postgres().then(|| {
        let node = node.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(POSTGRES_CHECK) => node.check_postgres().await,
                    _ = supervisor::stopped(&mut stop) => return,
                }
            }
        })
    });
    // SIGHUP reloads the offer, like the gateway's catalog; the next
    // announcement tells the gateway.
    let reloader = {
        let node = node.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = match signal(SignalKind::hangup()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP: no offer reloads");
                    return;
                }
            };
            loop {
                tokio::select! {
                    got = hup.recv() => match got {
                        Some(()) => node.reload_offer().await,
                        None => return,
                    },
                    _ = supervisor::stopped(&mut stop) => return,
                }
            }
        })
    };
    let announcer = gateway_url.map(|url| {
        tokio::spawn(announce::announce_loop(
            node.clone(),
            url,
            announce_token,
            fallback,
            stop_rx,
        ))
    });

    let routes = Routes::new(NodeAgentServer::new(grpc::Agent { node: node.clone() }));
    let served = svcbroker_proto::server::serve_with_token(
        routes,
        SERVICE_NAMES,
        listener,
        shutdown,
        token.as_deref(),
    )
    .await;

    stop_tx.send_replace(true);
    let _ = reloader.await;
    if let Some(a) = announcer {
        let _ = a.await;
    }
    if let Some(m) = pg_monitor {
        let _ = m.await;
    }
    node.shutdown().await;
    tracing::info!("node agent stopped");
    served.map_err(Error::from)
}

/// `http://<bound address>`, except that a wildcard bind (0.0.0.0, ::) is
/// unreachable as a destination, so the advertised host is used with the
/// bound port instead.
fn default_grpc_url(local: SocketAddr, advertise_host: &str) -> String {
    if local.ip().is_unspecified() {
        if advertise_host.contains(':') && !advertise_host.starts_with('[') {
            format!("http://[{advertise_host}]:{}", local.port())
        } else {
            format!("http://{advertise_host}:{}", local.port())
        }
    } else {
        format!("http://{local}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_url_defaults() {
        let a: SocketAddr = "127.0.0.1:50052".parse().unwrap();
        assert_eq!(default_grpc_url(a, "h"), "http://127.0.0.1:50052");
        let w: SocketAddr = "0.0.0.0:7".parse().unwrap();
        assert_eq!(default_grpc_url(w, "10.0.0.5"), "http://10.0.0.5:7");
        assert_eq!(default_grpc_url(w, "::1"), "http://[::1]:7");
    }
}
