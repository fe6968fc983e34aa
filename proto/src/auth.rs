//! The shared bearer token between svcbroker components (the seed's service
//! token): a tower layer that refuses gRPC calls without it, and a client
//! interceptor that adds it.

use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Environment variable holding the shared token, read by every component
/// and by `svcbroker up`.
pub const ENV_TOKEN: &str = "SVCBROKER_TOKEN";

/// gRPC metadata key carrying the id of the OSB request a call stems from.
pub const REQUEST_ID_KEY: &str = "x-request-id";

tokio::task_local! {
    static REQUEST_ID: String;
}

/// Runs `f` with `id` as the current request id: every call made through a
/// [`BearerToken`] channel inside it carries `x-request-id: id`.
pub async fn with_request_id<F: std::future::Future>(id: String, f: F) -> F::Output {
    REQUEST_ID.scope(id, f).await
}

/// The request id set by an enclosing [`with_request_id`], if any.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// A client channel that sends the bearer token with every call.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

/// Logs once, at start, that a server listening beyond loopback accepts
/// calls from anyone because no token is configured.
pub fn warn_if_open(component: &str, token: Option<&str>, addr: std::net::SocketAddr) {
    if token.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            component,
            %addr,
            "no {ENV_TOKEN} configured: gRPC calls are accepted without authentication on a non-loopback address"
        );
    }
}

/// gRPC health stays open so that container and load-balancer probes,
/// which carry no credentials, keep working.
const UNAUTHENTICATED_PREFIX: &str = "/grpc.health.v1.Health/";

/// Compares in time independent of where the inputs differ, so the token
/// cannot be guessed byte by byte from response times.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Server layer: every call but health must carry `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct BearerAuthLayer {
    expected: Arc<[u8]>,
}

impl BearerAuthLayer {
    /// Returns a layer that accepts only `token`.
    pub fn new(token: &str) -> Self {
        BearerAuthLayer {
            expected: format!("Bearer {token}").into_bytes().into(),
        }
    }
}

impl std::fmt::Debug for BearerAuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerAuthLayer(<redacted>)")
    }
}

impl<S> tower::Layer<S> for BearerAuthLayer {
    type Service = BearerAuth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BearerAuth {
            inner,
            expected: self.expected.clone(),
        }
    }
}

/// The service made by [`BearerAuthLayer`].
#[derive(Clone)]
pub struct BearerAuth<S> {
    inner: S,
    expected: Arc<[u8]>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for BearerAuth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let open = req.uri().path().starts_with(UNAUTHENTICATED_PREFIX);
        let authorized = open
            || req
                .headers()
                .get(http::header::AUTHORIZATION)
                .is_some_and(|v| constant_time_eq(v.as_bytes(), &self.expected));
        if authorized {
            Box::pin(self.inner.call(req))
        } else {
            let status = Status::unauthenticated("missing or invalid bearer token");
            let response = status.into_http();
            Box::pin(async move { Ok(response) })
        }
    }
}

/// Client interceptor that adds the bearer token to every call (with no
/// token, nothing), and the current request id (see [`with_request_id`]).
#[derive(Clone, Default)]
pub struct BearerToken {
    header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl BearerToken {
    /// Returns an interceptor sending `token`, or nothing when `None`.
    /// Fails when the token is not a valid header value.
    pub fn new(token: Option<&str>) -> Result<Self, Status> {
        let header = token
            .map(|t| {
                format!("Bearer {t}").parse().map_err(|_| {
                    Status::invalid_argument("token has characters not allowed in a header")
                })
            })
            .transpose()?;
        Ok(BearerToken { header })
    }

    /// Wraps `channel` so that every call on it carries this token.
    pub fn wrap(&self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, self.clone())
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        // An id that is not a valid header value is left out rather than
        // failing the call.
        if let Some(id) = current_request_id()
            .filter(|id| !id.is_empty())
            .and_then(|id| id.parse().ok())
        {
            req.metadata_mut().insert(REQUEST_ID_KEY, id);
        }
        Ok(req)
    }
}
