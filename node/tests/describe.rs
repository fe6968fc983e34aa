//! Describe, the service offer, announcements, and the binary's config
//! handling.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use svcbroker_proto::v1::registry_server::{Registry, RegistryServer};
use svcbroker_proto::v1::{AnnounceRequest, AnnounceResponse, DescribeRequest, NodeInfo};
use tonic::{Request, Response, Status};

const SERVICE: &str = "id: {id}
name: {name}
description: test service
model: process
process:
  command: [\"{program}\", \"--port\", \"{{port}}\"]
credentials:
  port: \"{{port}}\"
plans:
  - id: {id}-plan
    name: small
    description: small
";

fn write_service(dir: &std::path::Path, name: &str, program: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let text = SERVICE
        .replace("{id}", &format!("svc-{name}"))
        .replace("{name}", name)
        .replace("{program}", program);
    std::fs::write(dir.join(format!("{name}.yaml")), text).unwrap();
}

#[tokio::test]
async fn describe_offers_services_whose_executables_exist() {
    let sb = Sandbox::new();
    let mut cfg = sb.config();
    cfg.node_id = "node-describe".into();
    cfg.capacity = 7;
    write_service(&cfg.services_dir, "redis", "redis-server");
    write_service(&cfg.services_dir, "shell", "/bin/sh");
    write_service(&cfg.services_dir, "ghost", "svcbroker-no-such-daemon");
    let node = TestNode::start(cfg).await;
    let info = node
        .client
        .clone()
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-describe");
    assert_eq!(info.services, ["redis", "shell"]);
    assert_eq!(info.capacity, 7);
    assert_eq!(info.used, 0);
    assert_eq!(info.port_range.unwrap().start, 1024);
    assert!(uuid::Uuid::parse_str(&info.boot_id).is_ok());
    assert_eq!(info.grpc_url, format!("http://{}", node.addr));
    assert_eq!(info.data_dir, sb.data_dir().to_string_lossy());
    assert_eq!(info.advertise_host, "127.0.0.1");
    node.stop().await;
}

#[tokio::test]
async fn missing_services_dir_offers_nothing() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let info = node
        .client
        .clone()
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info.services.is_empty());
    node.stop().await;
}

#[derive(Clone, Default)]
struct FakeRegistry {
    seen: Arc<Mutex<Vec<(NodeInfo, Instant)>>>,
}

#[tonic::async_trait]
impl Registry for FakeRegistry {
    async fn announce(
        &self,
        req: Request<AnnounceRequest>,
    ) -> Result<Response<AnnounceResponse>, Status> {
        let node = req.into_inner().node.unwrap();
        let mut seen = self.seen.lock().unwrap();
        let new_boot = seen.iter().all(|(n, _)| n.boot_id != node.boot_id);
        seen.push((node, Instant::now()));
        Ok(Response::new(AnnounceResponse {
            interval_ms: 100,
            new_boot,
        }))
    }
}

#[tokio::test]
async fn announces_to_the_gateway_at_the_interval_it_asks_for() {
    let registry = FakeRegistry::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = listener.local_addr().unwrap();
    let (gw_stop, gw_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistryServer::new(registry.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = gw_rx.await;
                },
            ),
    );

    let sb = Sandbox::new();
    let mut cfg = sb.config();
    cfg.gateway_url = Some(format!("http://{gw}"));
    cfg.announce_interval_ms = 60_000; // the gateway's 100 ms must win
    let node = TestNode::start(cfg).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while registry.seen.lock().unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "fewer than 3 announcements");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let info = node
        .client
        .clone()
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    node.stop().await;
    let count = registry.seen.lock().unwrap().len();
    {
        let seen = registry.seen.lock().unwrap();
        assert!(
            seen.iter()
                .all(|(n, _)| n.boot_id == info.boot_id && n.node_id == info.node_id)
        );
    }
    // Stopped with the node.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        registry.seen.lock().unwrap().len(),
        count,
        "announcing after shutdown"
    );
    let _ = gw_stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn unreachable_gateway_does_not_stop_the_node() {
    let sb = Sandbox::new();
    let mut cfg = sb.config();
    let port = free_ports(1)[0];
    cfg.gateway_url = Some(format!("http://127.0.0.1:{port}"));
    cfg.announce_interval_ms = 100;
    let node = TestNode::start(cfg).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.client
        .clone()
        .describe(DescribeRequest {})
        .await
        .unwrap();
    node.stop().await;
}

#[test]
fn binary_exits_64_on_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.yaml");
    std::fs::write(&path, "node_id: n1\nlisten: 127.0.0.1:0\ncapacity: lots\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_node"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node.yaml:3:"), "{err}");
    assert!(err.contains("capacity"), "{err}");

    std::fs::write(&path, "node_id: n1\nlisten_addr: 127.0.0.1:0\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_node"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_addr"));
}

#[tokio::test]
async fn describe_reports_bind_host() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let info = node
        .client
        .clone()
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.bind_host, "127.0.0.1");
    assert!(info.attributes.is_empty());
    node.stop().await;

    let mut cfg = sb.config();
    cfg.bind_host = "0.0.0.0".into();
    let node = TestNode::start(cfg).await;
    let info = node
        .client
        .clone()
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.bind_host, "0.0.0.0");
    node.stop().await;
}
