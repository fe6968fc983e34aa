//! Helpers shared by the gateway's integration tests: start the gateway on
//! port 0 and talk OSB to it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use svcbroker_gateway::Config;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const USER: &str = "broker";
pub const PASS: &str = "s3cret-test-pass";
pub const REDIS_SERVICE: &str = "9d3e3c4a-1f4b-4a8e-bb8e-5a7a6e2d7c01";
pub const REDIS_SMALL: &str = "9d3e3c4a-1f4b-4a8e-bb8e-5a7a6e2d7c11";
pub const REDIS_LARGE: &str = "9d3e3c4a-1f4b-4a8e-bb8e-5a7a6e2d7c12";
pub const ECHO_SERVICE: &str = "4f6f3b0e-6b1f-4c2a-9a57-0c8f1f3e9a01";
pub const ECHO_FREE: &str = "4f6f3b0e-6b1f-4c2a-9a57-0c8f1f3e9a11";

/// The shipped `services.d` of the repository.
pub fn services_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../services.d")
}

/// A gateway running in this process.
pub struct Gateway {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), svcbroker_gateway::Error>>>,
    pub client: reqwest::Client,
}

impl Gateway {
    /// Starts a gateway with `config` (listen addresses are ignored).
    pub async fn start(config: Config) -> Gateway {
        let http_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (http, grpc) = (http_l.local_addr().unwrap(), grpc_l.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(svcbroker_gateway::run(config, http_l, grpc_l, async move {
            let _ = rx.await;
        }));
        Gateway {
            http,
            grpc,
            stop: Some(tx),
            task: Some(task),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(90))
                .build()
                .unwrap(),
        }
    }

    /// Stops the gateway and returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), svcbroker_gateway::Error> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// An authenticated OSB request with the API version header.
    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .basic_auth(USER, Some(PASS))
            .header("X-Broker-API-Version", "2.17")
    }

    /// Sends `method path` with an optional JSON body; returns status and
    /// body (`Value::Null` when empty or not JSON).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = self.req(method, path);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Polls a last_operation path until its state is final (or 410);
    /// returns the final status and body.
    pub async fn poll(&self, path: &str, timeout: Duration) -> (u16, Value) {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let (status, body) = self.call(reqwest::Method::GET, path, None).await;
            let state = body.get("state").and_then(Value::as_str).unwrap_or("");
            if status != 200 || state != "in progress" {
                return (status, body);
            }
            assert!(
                tokio::time::Instant::now() < end,
                "{path} still in progress: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `/healthz` reports `n` live nodes.
    pub async fn wait_live_nodes(&self, n: u64, timeout: Duration) {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let body: Value = self
                .client
                .get(self.url("/healthz"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if body["live_nodes"].as_u64() == Some(n) {
                return;
            }
            assert!(tokio::time::Instant::now() < end, "live nodes: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A gateway config for tests: loopback, a database in `dir`, the shipped
/// service definitions, quick node liveness.
pub fn config(dir: &Path, allocator_url: &str) -> Config {
    Config {
        db_path: dir.join("gateway.sqlite"),
        services_dir: services_dir(),
        username: USER.into(),
        password: PASS.into(),
        allocator_url: allocator_url.into(),
        node_timeout_ms: 3_000,
        announce_interval_ms: 300,
        sync_timeout_ms: 20_000,
        ..Config::default()
    }
}
