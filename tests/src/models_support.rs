//! Helpers for the provisioning-model tests (`tests/models.rs`,
//! `tests/reconcile.rs`, `tests/reload.rs`): a stack whose three components
//! run as separate processes (so that a test can SIGKILL the node or SIGHUP
//! the gateway), clients for the services the models provision (Redis ACL
//! users, memcached, PostgreSQL through `psql`) and a recording HTTP server
//! for hooks.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use svcbroker_proto::v1::allocator_client::AllocatorClient;
use svcbroker_proto::v1::node_agent_client::NodeAgentClient;
use svcbroker_proto::v1::{
    InstanceStatus, ListAllocationsRequest, ListAllocationsResponse, ListInstancesRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::osb::Osb;
use crate::poll::until;
use crate::ports::PortBlock;
use crate::procs;

/// Environment variable naming the PostgreSQL admin URL the tests use.
pub const TEST_POSTGRES_ENV: &str = "SVCBROKER_TEST_POSTGRES_URL";
/// The URL `scripts/ensure-postgres.sh` sets up.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Node id of a [`ProcStack`].
pub const PROC_NODE_ID: &str = "proc-node";

/// Catalog ids of the shipped services this module's tests use.
pub mod ids {
    /// `services.d/memcached.yaml`.
    pub mod memcached {
        pub const SERVICE: &str = "2b8f6a1e-8d0c-4f57-9f3e-3c1d2a6b7e01";
        pub const PLAN_SMALL: &str = "2b8f6a1e-8d0c-4f57-9f3e-3c1d2a6b7e11";
    }
    /// `services.d/postgresql.yaml`.
    pub mod postgresql {
        pub const SERVICE: &str = "59feae80-e7aa-419a-93fe-dea780741201";
        pub const PLAN: &str = "59feae80-e7aa-419a-93fe-dea780741211";
    }
    /// `services.d/filesystem.yaml`.
    pub mod filesystem {
        pub const SERVICE: &str = "0dcf23b0-04f0-4bb8-a0d8-0936017a9801";
        pub const PLAN_SMALL: &str = "0dcf23b0-04f0-4bb8-a0d8-0936017a9811";
    }
    /// `examples/services.d/elasticsearch-shared.yaml`.
    pub mod es_shared {
        pub const SERVICE: &str = "802a186a-ce7f-455f-a47d-b664bca4e201";
        pub const PLAN: &str = "802a186a-ce7f-455f-a47d-b664bca4e211";
    }
}

// ---- Redis with per-binding ACL users ------------------------------------------

/// A redis binding's `credentials`: its own ACL user.
#[derive(Clone)]
pub struct RedisUser {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    pub uri: Option<String>,
}

impl std::fmt::Debug for RedisUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisUser")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl RedisUser {
    /// Reads them from a binding's `credentials` (the port may be a number
    /// or a numeric string).
    #[track_caller]
    pub fn from_credentials(c: &Value) -> RedisUser {
        let port = match &c["port"] {
            Value::Number(n) => n.as_u64().expect("numeric port"),
            Value::String(s) => s.parse().expect("numeric port string"),
            other => panic!("credentials.port missing: {other}"),
        };
        let text = |k: &str| {
            c[k].as_str()
                .unwrap_or_else(|| panic!("credentials.{k} missing in {c}"))
                .to_string()
        };
        RedisUser {
            host: text("host"),
            port: u16::try_from(port).expect("port fits u16"),
            username: text("username"),
            password: text("password"),
            uri: c["uri"].as_str().map(str::to_string),
        }
    }

    /// Connects without authenticating.
    pub async fn connect(&self) -> redis::aio::MultiplexedConnection {
        let client =
            redis::Client::open(format!("redis://{}:{}/", self.host, self.port)).expect("url");
        tokio::time::timeout(
            Duration::from_secs(10),
            client.get_multiplexed_async_connection(),
        )
        .await
        .expect("redis connect timed out")
        .unwrap_or_else(|e| panic!("connect to redis {}:{}: {e}", self.host, self.port))
    }

    /// `AUTH username password` on a new connection; the connection when it
    /// was accepted, the error text when not.
    pub async fn auth(&self) -> Result<redis::aio::MultiplexedConnection, String> {
        let mut con = self.connect().await;
        redis::cmd("AUTH")
            .arg(&self.username)
            .arg(&self.password)
            .query_async::<String>(&mut con)
            .await
            .map(|_| con)
            .map_err(|e| e.to_string())
    }

    /// Proves the credentials work and are needed: without AUTH a command
    /// is refused, a wrong password is refused, the binding's user can SET
    /// and GET, and the `uri` (when given) works on its own.
    pub async fn check_auth_set_get(&self) {
        let mut con = self.connect().await;
        let err = redis::cmd("GET")
            .arg("k")
            .query_async::<Option<String>>(&mut con)
            .await
            .expect_err("redis must refuse commands before AUTH");
        assert!(
            err.to_string().contains("NOAUTH") || err.to_string().contains("Authentication"),
            "unexpected error before AUTH: {err}"
        );
        let wrong = redis::cmd("AUTH")
            .arg(&self.username)
            .arg("not-the-password")
            .query_async::<String>(&mut con)
            .await;
        assert!(wrong.is_err(), "a wrong password must be refused");
        let mut con = self.auth().await.expect("AUTH with the binding's user");
        let key = format!("k-{}", uuid::Uuid::new_v4().simple());
        let value = format!("v-{}", uuid::Uuid::new_v4().simple());
        self.set_on(&mut con, &key, &value).await;
        assert_eq!(
            self.get_on(&mut con, &key).await.as_deref(),
            Some(value.as_str())
        );
        if let Some(uri) = &self.uri {
            let client = redis::Client::open(uri.as_str()).expect("credentials.uri parses");
            let mut con = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect with credentials.uri");
            assert_eq!(
                self.get_on(&mut con, &key).await.as_deref(),
                Some(value.as_str()),
                "uri reaches the same server as the same user"
            );
        }
    }

    /// SET on an authenticated connection.
    pub async fn set_on(&self, con: &mut redis::aio::MultiplexedConnection, k: &str, v: &str) {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg(v)
            .query_async(con)
            .await
            .expect("SET");
    }

    /// GET on an authenticated connection.
    pub async fn get_on(
        &self,
        con: &mut redis::aio::MultiplexedConnection,
        k: &str,
    ) -> Option<String> {
        redis::cmd("GET")
            .arg(k)
            .query_async(con)
            .await
            .expect("GET")
    }

    /// Returns field `name` of `INFO` (e.g. `maxmemory`), authenticated as
    /// the binding's user (which may not run admin commands like CONFIG).
    pub async fn info_value(&self, name: &str) -> String {
        let mut con = self.auth().await.expect("AUTH");
        let info: String = redis::cmd("INFO")
            .query_async(&mut con)
            .await
            .expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    }

    /// Returns true when something accepts TCP connections on the port.
    pub async fn port_open(&self) -> bool {
        tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .is_ok()
    }
}

// ---- memcached ------------------------------------------------------------------

/// Sends memcached text-protocol `commands` (ending with `quit`) and returns
/// everything the server answered.
pub async fn memcached(host: &str, port: u16, commands: &str) -> String {
    let mut s = tokio::net::TcpStream::connect((host, port))
        .await
        .unwrap_or_else(|e| panic!("connect to memcached {host}:{port}: {e}"));
    s.write_all(commands.as_bytes()).await.expect("write");
    s.write_all(b"quit\r\n").await.expect("write quit");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("memcached answer timed out")
        .expect("read memcached answer");
    out
}

// ---- PostgreSQL -------------------------------------------------------------------

/// Returns the admin URL of the test PostgreSQL server.
pub fn postgres_url() -> String {
    std::env::var(TEST_POSTGRES_ENV)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_POSTGRES_URL.to_string())
}

/// Returns the admin URL after checking the server answers; panics (the
/// test fails, it is not skipped) telling how to start one.
pub fn require_postgres() -> String {
    let url = postgres_url();
    if let Err(e) = psql(&url, "SELECT 1") {
        panic!(
            "PostgreSQL at {TEST_POSTGRES_ENV} (or the default {DEFAULT_POSTGRES_URL}) does not \
             answer: {e}\nRun scripts/ensure-postgres.sh (it installs and starts a local server), \
             or point {TEST_POSTGRES_ENV} at an admin URL."
        );
    }
    url
}

/// Runs `sql` with `psql` on connection URI `url`; returns the unaligned,
/// tuples-only output, or psql's error text.
pub fn psql(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .arg(url)
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

// ---- a recording HTTP server ----------------------------------------------------------

/// One request an [`HttpRecorder`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub body: String,
}

/// A tiny HTTP/1.1 server on 127.0.0.1 that records every request and
/// answers each method with a configurable status (200 by default) and a
/// JSON body.
pub struct HttpRecorder {
    pub url: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
    statuses: Arc<Mutex<BTreeMap<String, u16>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpRecorder {
    /// Starts listening on a free port.
    pub async fn start() -> HttpRecorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind recorder");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let statuses: Arc<Mutex<BTreeMap<String, u16>>> = Arc::default();
        let (r, st) = (Arc::clone(&requests), Arc::clone(&statuses));
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (r, st) = (Arc::clone(&r), Arc::clone(&st));
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut sock).await else {
                        return;
                    };
                    let status = st.lock().unwrap().get(&req.method).copied().unwrap_or(200);
                    r.lock().unwrap().push(req);
                    let body = if status < 300 {
                        r#"{"acknowledged":true}"#
                    } else {
                        r#"{"error":"recorder says no"}"#
                    };
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        HttpRecorder {
            url,
            requests,
            statuses,
            task,
        }
    }

    /// Answers `method` with `status` from now on.
    pub fn answer(&self, method: &str, status: u16) {
        self.statuses
            .lock()
            .unwrap()
            .insert(method.to_string(), status);
    }

    /// Returns the requests received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for HttpRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Recorded> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let len: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
    Some(Recorded { method, path, body })
}

// ---- a stack of processes -----------------------------------------------------------------

/// How to build a [`ProcStack`].
#[derive(Debug, Clone)]
pub struct ProcStackOptions {
    /// Copy the shipped `services.d/*.yaml`.
    pub shipped_services: bool,
    /// Copy these files of `examples/services.d/`.
    pub examples: Vec<String>,
    /// More definitions: (file name, YAML).
    pub extra_services: Vec<(String, String)>,
    /// PostgreSQL admin URL for the node (database services).
    pub postgres_url: Option<String>,
    /// The gateway's `reconcile_interval_ms`.
    pub reconcile_interval_ms: u64,
    /// The gateway's `orphan_grace_ms`.
    pub orphan_grace_ms: u64,
    /// Instances the node accepts.
    pub capacity: u32,
    /// The gateway's `sync_timeout_ms`.
    pub sync_timeout_ms: u64,
}

impl Default for ProcStackOptions {
    fn default() -> Self {
        ProcStackOptions {
            shipped_services: true,
            examples: Vec::new(),
            extra_services: Vec::new(),
            postgres_url: None,
            reconcile_interval_ms: 500,
            orphan_grace_ms: 1_000,
            capacity: 50,
            sync_timeout_ms: 60_000,
        }
    }
}

/// Allocator, node and gateway as separate processes
/// (`target/<profile>/{allocator,node,gateway}`) on fixed loopback ports,
/// each restartable on the same files. Dropping it stops them and every
/// daemon left in the node's data directory.
pub struct ProcStack {
    pub osb: Osb,
    pub http_url: String,
    pub allocator_url: String,
    pub node_url: String,
    pub services_dir: PathBuf,
    pub node_data_dir: PathBuf,
    pub port_range: (u16, u16),
    root: PathBuf,
    allocator: Option<Child>,
    node: Option<Child>,
    gateway: Option<Child>,
    _ports: PortBlock,
    _dir: tempfile::TempDir,
}

impl ProcStack {
    /// Writes the configs, starts the three processes and waits until the
    /// gateway knows the node.
    pub async fn start(opts: ProcStackOptions) -> ProcStack {
        crate::init_tracing();
        // The shared test prefix: what a test killed by nextest's timeout
        // leaves running here is reaped by the next test that starts.
        let dir = crate::test_dir();
        let root = dir.path().canonicalize().expect("canonical temp dir");
        let services_dir = root.join("services.d");
        std::fs::create_dir_all(&services_dir).expect("services.d");
        let repo = crate::workspace_root();
        let copy = |from: PathBuf| {
            let name = from.file_name().expect("file name").to_owned();
            std::fs::copy(&from, services_dir.join(name))
                .unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        };
        if opts.shipped_services {
            for e in std::fs::read_dir(repo.join("services.d")).expect("shipped services.d") {
                let p = e.expect("entry").path();
                if p.extension().is_some_and(|x| x == "yaml") {
                    copy(p);
                }
            }
        }
        for f in &opts.examples {
            copy(repo.join("examples/services.d").join(f));
        }
        for (file, yaml) in &opts.extra_services {
            std::fs::write(services_dir.join(file), yaml).expect("write service definition");
        }
        let node_data_dir = root.join("node");
        std::fs::create_dir_all(&node_data_dir).expect("node data dir");

        let ports = PortBlock::acquire();
        let port_range = ports.instance_range();
        let local = |i| std::net::SocketAddr::from(([127, 0, 0, 1], ports.reserved(i)));
        let (http, grpc, alloc, node) = (local(0), local(1), local(2), local(3));
        let allocator_url = format!("http://{alloc}");
        let node_url = format!("http://{node}");
        let username = "broker".to_string();
        let password = format!("test-{}", uuid::Uuid::new_v4().simple());

        let gateway_config = svcbroker_gateway::Config {
            http_listen: http,
            grpc_listen: grpc,
            db_path: root.join("gateway.sqlite"),
            services_dir: services_dir.clone(),
            username: username.clone(),
            password: password.clone(),
            allocator_url: allocator_url.clone(),
            node_timeout_ms: 10_000,
            announce_interval_ms: 250,
            reconcile_interval_ms: opts.reconcile_interval_ms,
            orphan_grace_ms: opts.orphan_grace_ms,
            sync_timeout_ms: opts.sync_timeout_ms,
            token: Some(crate::stack::TEST_TOKEN.into()),
            ..Default::default()
        };
        write_yaml(&root.join("gateway.yaml"), &gateway_config);
        let node_config = svcbroker_node::Config {
            listen: node,
            node_id: PROC_NODE_ID.into(),
            data_dir: node_data_dir.clone(),
            services_dir: services_dir.clone(),
            capacity: opts.capacity,
            port_range: svcbroker_node::PortRangeConfig {
                start: port_range.0,
                end: port_range.1,
            },
            advertise_host: "127.0.0.1".into(),
            grpc_url: Some(node_url.clone()),
            gateway_url: Some(format!("http://{grpc}")),
            announce_interval_ms: 250,
            stop_grace_ms: 2_000,
            postgres_url: opts.postgres_url.clone(),
            // Measured, not loop-mounted: tests must not leave mounts behind.
            directory_cap: svcbroker_node::DirectoryCap::Supervised,
            directory_check_interval_ms: 300,
            token: Some(crate::stack::TEST_TOKEN.into()),
            ..Default::default()
        };
        write_yaml(&root.join("node.yaml"), &node_config);

        let mut stack = ProcStack {
            osb: Osb::new(&format!("http://{http}"), &username, &password),
            http_url: format!("http://{http}"),
            allocator_url,
            node_url,
            services_dir,
            node_data_dir: node_data_dir.canonicalize().expect("canonical data dir"),
            port_range,
            root,
            allocator: None,
            node: None,
            gateway: None,
            _ports: ports,
            _dir: dir,
        };
        stack.start_allocator();
        stack.start_node();
        stack.start_gateway();
        stack.wait_ready().await;
        stack
    }

    fn spawn(&self, name: &str, args: &[String]) -> Child {
        let bin = crate::binary(name);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .expect("log file");
        Command::new(&bin)
            .args(args)
            .current_dir(&self.root)
            // Only what the config says: no SVCBROKER_* from the shell.
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            // The allocator has no config file here; the others get it
            // from theirs too.
            .env(svcbroker_proto::auth::ENV_TOKEN, crate::stack::TEST_TOKEN)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()))
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.log"))
    }

    /// Returns what process `name` ("gateway", "node", "allocator") logged.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// Starts the allocator process (again) on its address and database.
    pub fn start_allocator(&mut self) {
        assert!(self.allocator.is_none(), "allocator already running");
        let listen = self.allocator_url.trim_start_matches("http://").to_string();
        let db = self.root.join("allocator.sqlite").display().to_string();
        self.allocator =
            Some(self.spawn("allocator", &["--listen".into(), listen, "--db".into(), db]));
    }

    /// Starts the node process (again) on its config.
    pub fn start_node(&mut self) {
        assert!(self.node.is_none(), "node already running");
        let config = self.root.join("node.yaml").display().to_string();
        self.node = Some(self.spawn("node", &["--config".into(), config]));
    }

    /// Starts the gateway process (again) on its config.
    pub fn start_gateway(&mut self) {
        assert!(self.gateway.is_none(), "gateway already running");
        let config = self.root.join("gateway.yaml").display().to_string();
        self.gateway = Some(self.spawn("gateway", &["--config".into(), config]));
    }

    /// Returns the node process id.
    pub fn node_pid(&self) -> i32 {
        self.node.as_ref().expect("node running").id() as i32
    }

    /// Returns the gateway process id.
    pub fn gateway_pid(&self) -> i32 {
        self.gateway.as_ref().expect("gateway running").id() as i32
    }

    /// SIGKILLs the node process only (not its daemons, which run in
    /// process groups of their own) and reaps it.
    pub fn kill_node(&mut self) {
        let mut child = self.node.take().expect("node running");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
    }

    /// SIGKILLs the gateway (no chance to finish anything) and reaps it.
    pub fn kill_gateway(&mut self) {
        let mut child = self.gateway.take().expect("gateway running");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
    }

    /// SIGKILLs the allocator and reaps it.
    pub fn kill_allocator(&mut self) {
        let mut child = self.allocator.take().expect("allocator running");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
    }

    /// Stops the gateway with SIGTERM (graceful) and reaps it; panics if it
    /// does not exit within 20 s.
    pub fn stop_gateway(&mut self) {
        let mut child = self.gateway.take().expect("gateway running");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                assert!(status.success(), "gateway exit status {status}");
                return;
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                panic!("gateway did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGHUP to the gateway.
    pub fn sighup_gateway(&self) {
        kill(Pid::from_raw(self.gateway_pid()), Signal::SIGHUP).expect("SIGHUP gateway");
    }

    /// Panics (with the logs) if a process exited.
    pub fn assert_running(&mut self) {
        for (name, child) in [
            ("allocator", &mut self.allocator),
            ("node", &mut self.node),
            ("gateway", &mut self.gateway),
        ] {
            if let Some(c) = child
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "{name} exited ({status}); log:\n{}",
                    std::fs::read_to_string(self.root.join(format!("{name}.log")))
                        .unwrap_or_default()
                );
            }
        }
    }

    /// Waits until the gateway answers and counts the node live.
    pub async fn wait_ready(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            self.assert_running();
            if self.healthz().await["live_nodes"].as_u64().unwrap_or(0) >= 1 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gateway did not become ready; gateway log:\n{}\nnode log:\n{}",
                self.log("gateway"),
                self.log("node")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Returns the gateway's `/healthz` body (`Null` when it does not answer).
    pub async fn healthz(&self) -> Value {
        let req = self
            .osb
            .bare(reqwest::Method::GET, "/healthz")
            .timeout(Duration::from_secs(2));
        match req.send().await {
            Ok(r) if r.status().is_success() => r.json().await.unwrap_or_default(),
            _ => Value::Null,
        }
    }

    /// Lists the allocator's leases and credentials, optionally for one owner.
    pub async fn allocations(&self, owner: Option<&str>) -> ListAllocationsResponse {
        AllocatorClient::new(crate::stack::connect(&self.allocator_url).await)
            .list_allocations(ListAllocationsRequest {
                pool: None,
                owner: owner.map(str::to_string),
            })
            .await
            .expect("ListAllocations")
            .into_inner()
    }

    /// Returns a node agent client.
    pub async fn node_agent(&self) -> NodeAgentClient<svcbroker_proto::auth::AuthChannel> {
        NodeAgentClient::new(crate::stack::connect(&self.node_url).await)
    }

    /// Lists the node's instances.
    pub async fn node_instances(&self) -> Vec<InstanceStatus> {
        self.node_agent()
            .await
            .list_instances(ListInstancesRequest {})
            .await
            .expect("ListInstances")
            .into_inner()
            .instances
    }

    /// Returns the node's view of instance `id`.
    pub async fn node_instance(&self, id: &str) -> Option<InstanceStatus> {
        self.node_instances()
            .await
            .into_iter()
            .find(|i| i.instance_id == id)
    }

    /// Returns the command lines of the processes running under the node's
    /// data directory.
    pub fn daemons(&self) -> Vec<procs::Proc> {
        procs::processes_under(&self.node_data_dir)
    }

    /// Asserts that nothing of instance `id` is left on the node or in the
    /// allocator (nor of `binding_ids`).
    pub async fn assert_instance_gone(&self, id: &str, binding_ids: &[&str]) {
        let dir = self.node_data_dir.join(id);
        until(
            &format!("processes of {id} to exit"),
            Duration::from_secs(10),
            || async { procs::processes_under(&dir).is_empty() },
        )
        .await;
        assert!(
            self.node_instance(id).await.is_none(),
            "node still holds {id}"
        );
        assert!(!dir.exists(), "{} left behind", dir.display());
        for owner in std::iter::once(id).chain(binding_ids.iter().copied()) {
            let a = self.allocations(Some(owner)).await;
            assert!(
                a.leases.is_empty() && a.credentials.is_empty(),
                "allocations left for {owner}: {a:?}"
            );
        }
    }

    /// The root of the stack's files.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for ProcStack {
    fn drop(&mut self) {
        // Gateway first (no new work), then the node, which stops its
        // daemons on SIGTERM, then the allocator.
        for child in [&mut self.gateway, &mut self.node, &mut self.allocator] {
            if let Some(mut c) = child.take() {
                let pid = Pid::from_raw(c.id() as i32);
                let _ = kill(pid, Signal::SIGTERM);
                let deadline = std::time::Instant::now() + Duration::from_secs(15);
                while std::time::Instant::now() < deadline {
                    if matches!(c.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = killpg(pid, Signal::SIGKILL);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let left = procs::processes_under(&self.node_data_dir);
        if !left.is_empty() {
            eprintln!("processes left after the stack stopped: {left:?}");
            procs::kill_all_under(&self.node_data_dir);
        }
        if std::thread::panicking() {
            for name in ["gateway", "node"] {
                eprintln!("---- {name} log ----\n{}", self.log(name));
            }
        }
    }
}

fn write_yaml<T: serde::Serialize>(path: &Path, value: &T) {
    std::fs::write(
        path,
        serde_yaml::to_string(value).expect("serialize config"),
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
