//! The node registry: which nodes exist, what they offer, whether they are
//! alive, and a gRPC channel to each.
//!
//! It is fed by `svcbroker.v1.Registry/Announce` calls from nodes and by
//! polling `Describe` on the statically configured `nodes`. Nothing here is
//! durable: after a gateway restart nodes re-announce within one interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use svcbroker_proto::auth::{AuthChannel, BearerToken};
use svcbroker_proto::v1::node_agent_client::NodeAgentClient;
use svcbroker_proto::v1::registry_server::Registry;
use svcbroker_proto::v1::{AnnounceRequest, AnnounceResponse, DescribeRequest, NodeInfo};
use tokio::sync::mpsc;
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::store::NodeSlot;
use crate::validate::validate_id;

/// How long a call to a node may take when nothing slower is expected.
pub const NODE_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A node as the registry knows it.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    /// What the node said about itself last.
    pub info: NodeInfo,
    /// When it was last heard from.
    pub last_seen: Instant,
    /// A (lazily connecting) channel to its gRPC URL.
    pub client: NodeAgentClient<AuthChannel>,
}

#[derive(Debug)]
struct Entry {
    handle: NodeHandle,
}

/// Sent when a node (id + boot id) is seen for the first time, so that the
/// reconciler re-provisions its instances.
#[derive(Debug, Clone)]
pub struct NewBoot {
    /// The node.
    pub node_id: String,
}

/// The in-memory node registry; cheap to clone.
#[derive(Clone)]
pub struct NodeRegistry {
    inner: Arc<Mutex<HashMap<String, Entry>>>,
    timeout: Duration,
    interval: Duration,
    new_boot: mpsc::UnboundedSender<NewBoot>,
    /// Sent on every call to a node.
    token: BearerToken,
}

impl std::fmt::Debug for NodeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRegistry")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl NodeRegistry {
    /// Returns an empty registry in which nodes not heard from for
    /// `timeout` are down, and the receiver of new-boot events.
    pub fn new(
        timeout: Duration,
        interval: Duration,
    ) -> (NodeRegistry, mpsc::UnboundedReceiver<NewBoot>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            NodeRegistry {
                inner: Arc::new(Mutex::new(HashMap::new())),
                timeout,
                interval,
                new_boot: tx,
                token: BearerToken::default(),
            },
            rx,
        )
    }

    /// Makes every call to a node carry `token`.
    pub fn with_token(mut self, token: BearerToken) -> Self {
        self.token = token;
        self
    }

    /// Records what a node said about itself. Returns true when this
    /// (node id, boot id) pair is new.
    pub fn record(&self, info: NodeInfo) -> Result<bool, Error> {
        validate_node_info(&info)?;
        let mut map = self.inner.lock().map_err(|_| poisoned())?;
        let node_id = info.node_id.clone();
        let (new_boot, client) = match map.get(&node_id) {
            Some(e) => {
                let client = if e.handle.info.grpc_url == info.grpc_url {
                    e.handle.client.clone()
                } else {
                    connect(&info.grpc_url, &self.token)?
                };
                (e.handle.info.boot_id != info.boot_id, client)
            }
            None => (true, connect(&info.grpc_url, &self.token)?),
        };
        if new_boot {
            tracing::info!(node_id = %node_id, boot_id = %info.boot_id, url = %info.grpc_url,
                services = ?info.services, capacity = info.capacity, "node registered");
        }
        map.insert(
            node_id.clone(),
            Entry {
                handle: NodeHandle {
                    info,
                    last_seen: Instant::now(),
                    client,
                },
            },
        );
        drop(map);
        if new_boot {
            let _ = self.new_boot.send(NewBoot { node_id });
        }
        Ok(new_boot)
    }

    /// Returns the node if it is alive (heard from within the timeout).
    pub fn live(&self, node_id: &str) -> Option<NodeHandle> {
        let map = self.inner.lock().ok()?;
        map.get(node_id)
            .filter(|e| e.handle.last_seen.elapsed() < self.timeout)
            .map(|e| e.handle.clone())
    }

    /// Returns the node whether or not it is alive.
    pub fn any(&self, node_id: &str) -> Option<NodeHandle> {
        let map = self.inner.lock().ok()?;
        map.get(node_id).map(|e| e.handle.clone())
    }

    /// Returns a live node or the transient error operations wait on.
    pub fn require_live(&self, node_id: &str) -> Result<NodeHandle, Error> {
        self.live(node_id).ok_or_else(|| Error::Unavailable {
            message: format!("node '{node_id}' is not live"),
        })
    }

    /// Returns the live nodes offering `service` as placement candidates.
    pub fn candidates(&self, service: &str) -> Vec<NodeSlot> {
        let Ok(map) = self.inner.lock() else {
            return Vec::new();
        };
        let mut out: Vec<NodeSlot> = map
            .values()
            .filter(|e| e.handle.last_seen.elapsed() < self.timeout)
            .filter(|e| e.handle.info.services.iter().any(|s| s == service))
            .map(|e| NodeSlot {
                node_id: e.handle.info.node_id.clone(),
                capacity: e.handle.info.capacity,
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    /// Returns every known node and whether it is alive.
    pub fn snapshot(&self) -> Vec<(NodeInfo, bool)> {
        let Ok(map) = self.inner.lock() else {
            return Vec::new();
        };
        let mut out: Vec<_> = map
            .values()
            .map(|e| {
                (
                    e.handle.info.clone(),
                    e.handle.last_seen.elapsed() < self.timeout,
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.node_id.cmp(&b.0.node_id));
        out
    }

    /// Returns every known node, whether it is alive and how long ago it
    /// was last heard from (the admin API's node list).
    pub fn statuses(&self) -> Vec<(NodeInfo, bool, Duration)> {
        let Ok(map) = self.inner.lock() else {
            return Vec::new();
        };
        let mut out: Vec<_> = map
            .values()
            .map(|e| {
                let ago = e.handle.last_seen.elapsed();
                (e.handle.info.clone(), ago < self.timeout, ago)
            })
            .collect();
        out.sort_by(|a, b| a.0.node_id.cmp(&b.0.node_id));
        out
    }

    /// Returns the interval nodes are asked to announce at.
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

fn poisoned() -> Error {
    Error::Internal("node registry lock poisoned".into())
}

fn connect(url: &str, token: &BearerToken) -> Result<NodeAgentClient<AuthChannel>, Error> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| Error::BadRequest(format!("invalid node grpc_url: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    Ok(NodeAgentClient::new(token.wrap(endpoint.connect_lazy())))
}

/// Checks an announcement at the edge, so the rest of the gateway never sees
/// an unusable node.
fn validate_node_info(info: &NodeInfo) -> Result<(), Error> {
    validate_id("node_id", &info.node_id)?;
    let node = &info.node_id;
    // Every string is logged, listed by the admin API or rendered into
    // credentials and instance files: bounded, and on one line.
    check_text(node, "grpc_url", &info.grpc_url, 1024)?;
    check_text(node, "boot_id", &info.boot_id, 255)?;
    check_text(node, "advertise_host", &info.advertise_host, 255)?;
    check_text(node, "bind_host", &info.bind_host, 255)?;
    check_text(node, "data_dir", &info.data_dir, 4096)?;
    for service in &info.services {
        if service.is_empty() {
            return Err(Error::BadRequest(format!(
                "node {node}: a service name is empty"
            )));
        }
        check_text(node, "a service name", service, 255)?;
    }
    for (key, value) in &info.attributes {
        check_text(node, "an attribute name", key, 255)?;
        check_text(node, "an attribute value", value, 4096)?;
    }
    if !(info.grpc_url.starts_with("http://") || info.grpc_url.starts_with("https://")) {
        return Err(Error::BadRequest(format!(
            "node {}: grpc_url must be an http:// or https:// URL",
            info.node_id
        )));
    }
    if info.boot_id.is_empty() {
        return Err(Error::BadRequest(format!(
            "node {}: boot_id must not be empty",
            info.node_id
        )));
    }
    if let Some(r) = &info.port_range
        && (r.start == 0 || r.start > r.end || r.end > 65535)
    {
        return Err(Error::BadRequest(format!(
            "node {}: invalid port_range {}-{}",
            info.node_id, r.start, r.end
        )));
    }
    Ok(())
}

/// Checks one string of an announcement; the message names the field, never
/// echoes the value.
fn check_text(node: &str, field: &str, value: &str, max: usize) -> Result<(), Error> {
    if value.len() > max {
        return Err(Error::BadRequest(format!(
            "node {node}: {field} is {} bytes long, at most {max} are allowed",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::BadRequest(format!(
            "node {node}: {field} contains a control character"
        )));
    }
    Ok(())
}

/// The `svcbroker.v1.Registry` gRPC service.
#[derive(Debug, Clone)]
pub struct RegistryService {
    registry: NodeRegistry,
}

impl RegistryService {
    /// Serves announcements into `registry`.
    pub fn new(registry: NodeRegistry) -> RegistryService {
        RegistryService { registry }
    }
}

#[tonic::async_trait]
impl Registry for RegistryService {
    #[tracing::instrument(skip_all, fields(node_id))]
    async fn announce(
        &self,
        request: Request<AnnounceRequest>,
    ) -> Result<Response<AnnounceResponse>, Status> {
        let Some(info) = request.into_inner().node else {
            return Err(Status::invalid_argument("node is required"));
        };
        // Only a valid id goes on the span: a raw one could forge log lines.
        if validate_id("node_id", &info.node_id).is_ok() {
            tracing::Span::current().record("node_id", info.node_id.as_str());
        }
        let new_boot = self
            .registry
            .record(info)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(AnnounceResponse {
            interval_ms: u32::try_from(self.registry.interval.as_millis()).unwrap_or(u32::MAX),
            new_boot,
        }))
    }
}

/// Polls `Describe` on each statically configured node URL every interval
/// until `shutdown` fires.
pub async fn poll_static_nodes(
    registry: NodeRegistry,
    urls: Vec<String>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    if urls.is_empty() {
        return;
    }
    let clients: Vec<(String, Option<NodeAgentClient<AuthChannel>>)> = urls
        .into_iter()
        .map(|u| {
            let c = connect(&u, &registry.token).ok();
            (u, c)
        })
        .collect();
    let mut tick = tokio::time::interval(registry.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::signalled(shutdown.clone()) => return,
        }
        for (url, client) in &clients {
            let Some(client) = client else { continue };
            let mut client = client.clone();
            let mut req = Request::new(DescribeRequest {});
            req.set_timeout(Duration::from_secs(5));
            match tokio::time::timeout(Duration::from_secs(6), client.describe(req)).await {
                Ok(Ok(info)) => {
                    let mut info = info.into_inner();
                    // The URL we reach it at is the one we were configured with.
                    if info.grpc_url.is_empty() {
                        info.grpc_url = url.clone();
                    }
                    if let Err(e) = registry.record(info) {
                        tracing::warn!(url = %url, error = %e, "node described itself unusably");
                    }
                }
                Ok(Err(status)) => {
                    tracing::debug!(url = %url, code = ?status.code(), "node describe failed");
                }
                Err(_) => tracing::debug!(url = %url, "node describe timed out"),
            }
        }
    }
}
