//! Serving helpers shared by every svcbroker gRPC server, so that each one
//! answers `grpc.health.v1.Health` and server reflection the same way.

use std::future::Future;

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::auth::BearerAuthLayer;

/// Characters of a caller's request id that go on the call's log lines (the
/// gateway passes on at most as many).
const MAX_LOGGED_REQUEST_ID: usize = 128;

/// Serves `routes` on `listener` together with `grpc.health.v1.Health`
/// (SERVING for the overall server and for each of `service_names`) and
/// server reflection in both `grpc.reflection.v1` and `v1alpha` (grpcurl 1.8
/// only speaks v1alpha), until `shutdown` resolves.
pub async fn serve<F>(
    routes: Routes,
    service_names: &[&str],
    listener: TcpListener,
    shutdown: F,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = ()> + Send,
{
    serve_with_token(routes, service_names, listener, shutdown, None).await
}

/// Like [`serve`], and when `token` is set every call except
/// `grpc.health.v1.Health` must carry `authorization: Bearer <token>`.
pub async fn serve_with_token<F>(
    routes: Routes,
    service_names: &[&str],
    listener: TcpListener,
    shutdown: F,
    token: Option<&str>,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = ()> + Send,
{
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in service_names {
        reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Building reflection from descriptors compiled into this binary only
    // fails if the descriptors are corrupt, which is a build bug.
    let reflection_v1 = reflection()
        .build_v1()
        .expect("embedded file descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("embedded file descriptor sets are valid");

    let routes = routes
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let auth = tower::util::option_layer(token.map(BearerAuthLayer::new));
    Server::builder()
        // Every handler's log lines carry the method and the id of the OSB
        // request that caused the call (empty when none).
        .trace_fn(|req| {
            // Both come from the caller: cut so that a 16 KiB header cannot
            // ride on every log line of the call.
            let request_id: String = req
                .headers()
                .get(crate::auth::REQUEST_ID_KEY)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .chars()
                .take(MAX_LOGGED_REQUEST_ID)
                .collect();
            let method: String = req.uri().path().chars().take(256).collect();
            tracing::info_span!("grpc", method = %method, request_id = %request_id)
        })
        .layer(auth)
        .add_routes(routes)
        .serve_with_incoming_shutdown(nodelay(listener), shutdown)
        .await
}

/// The accepted connections of `listener`, each with `TCP_NODELAY`.
///
/// HTTP/2 writes a response as several small frames (HEADERS, DATA,
/// trailers), often in separate writes: with Nagle's algorithm the kernel
/// holds the second until the first is acknowledged, and the client delays
/// that acknowledgement by up to 40 ms. Found by the benchmark: a redis
/// provision took 10 ms or 55 ms depending on how the node's answer was cut.
/// tonic sets the option itself only on listeners it binds.
fn nodelay(listener: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<TcpStream>> {
    use tokio_stream::StreamExt as _;
    TcpListenerStream::new(listener).map(|accepted| accepted.inspect(set_nodelay))
}

/// Sets `TCP_NODELAY` on an accepted connection (see [`nodelay`]); one that
/// refuses is served anyway: a missing option costs latency, not service.
pub fn set_nodelay(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
    }
}

/// Resolves on SIGINT or SIGTERM: the one shutdown signal of every binary.
///
/// The handlers are registered when this is called, not when the future is
/// first polled: a caller creates it before it announces itself ready (a
/// banner, a listening port), so a signal sent right after is a clean stop
/// rather than the default action, death (`svcbroker up` lost that race
/// under load: tests/up.rs saw it killed by a SIGINT sent just after its
/// banner).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let wait = {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            let recv = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
                match s {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = recv(interrupt) => {},
                _ = recv(terminate) => {},
            }
        }
    };
    #[cfg(not(unix))]
    let wait = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    async move {
        wait.await;
        tracing::info!("shutdown signal received");
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt as _;

    use super::*;

    /// What the benchmark found (answers held up to 40 ms by Nagle and a
    /// delayed ACK) stays fixed: every connection the gRPC servers accept
    /// has `TCP_NODELAY` set.
    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = Box::pin(nodelay(listener));
        for _ in 0..3 {
            let _client = TcpStream::connect(addr).await.unwrap();
            let stream = accepted.next().await.unwrap().unwrap();
            assert!(stream.nodelay().unwrap());
        }
    }
}
