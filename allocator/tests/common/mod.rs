//! Runs a real allocator (the library's `run`) on 127.0.0.1:0 over a
//! temporary database, for tests that talk to it through a tonic client.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use svcbroker_allocator::{Config, Error, run};
use svcbroker_proto::v1::allocator_client::AllocatorClient;
use svcbroker_proto::v1::{AllocatePortRequest, PortRange};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub struct TestServer {
    pub addr: SocketAddr,
    pub db_path: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), Error>>>,
}

impl TestServer {
    /// Starts a server on `db_path`; returns once it listens.
    pub async fn start(db_path: &Path) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let config = Config {
            db_path: db_path.to_path_buf(),
            ..Config::default()
        };
        let task = tokio::spawn(run(config, listener, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            db_path: db_path.to_path_buf(),
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn client(&self) -> AllocatorClient<Channel> {
        AllocatorClient::new(self.channel().await)
    }

    /// Shuts the server down and waits until `run` returned (database closed).
    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A server on a fresh database in a new temporary directory.
pub async fn fresh() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("allocator.sqlite")).await;
    (dir, server)
}

pub fn port_request(pool: &str, owner: &str, start: u32, end: u32) -> AllocatePortRequest {
    AllocatePortRequest {
        pool: pool.into(),
        owner: owner.into(),
        range: Some(PortRange { start, end }),
        preferred: None,
        exclude: vec![],
    }
}
