//! A whole svcbroker (allocator, node, gateway) on loopback for one test.
//!
//! The services run in this process on a runtime of their own, so that a
//! test's runtime ending, or a test panicking, still shuts them down
//! gracefully from `Drop` (the node stops its daemons). Each listens on
//! `127.0.0.1:0`. Alternatively the gateway runs as a separate `gateway`
//! process, on fixed ports, that a test can SIGKILL and restart on the same
//! database.

use std::fs::File;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use svcbroker_proto::auth::{AuthChannel, BearerToken};
use svcbroker_proto::v1::allocator_client::AllocatorClient;
use svcbroker_proto::v1::node_agent_client::NodeAgentClient;
use svcbroker_proto::v1::{
    InstanceStatus, ListAllocationsRequest, ListAllocationsResponse, ListInstancesRequest,
};
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tonic::transport::Channel;

use crate::osb::Osb;
use crate::poll::until;
use crate::ports::PortBlock;
use crate::procs;

/// Where the gateway runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayMode {
    /// In this process, like the allocator and the node.
    InProcess,
    /// As a `gateway` child process (`target/<profile>/gateway`), on fixed
    /// ports so that a restart on the same database is reachable again.
    Process,
}

/// How to build a [`Stack`].
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Copy the shipped `services.d/*.yaml` (echo, redis) into the stack.
    pub shipped_services: bool,
    /// More service definitions: (file name, YAML).
    pub extra_services: Vec<(String, String)>,
    /// Instances the node accepts.
    pub capacity: u32,
    /// Where the gateway runs.
    pub gateway: GatewayMode,
    pub username: String,
    pub password: String,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            shipped_services: true,
            extra_services: Vec::new(),
            capacity: 100,
            gateway: GatewayMode::InProcess,
            username: "broker".into(),
            password: format!("test-{}", uuid::Uuid::new_v4().simple()),
        }
    }
}

impl StackOptions {
    /// Adds a service definition file.
    pub fn service(mut self, file: &str, yaml: &str) -> Self {
        self.extra_services.push((file.into(), yaml.into()));
        self
    }
}

/// Name prefix of every stack's temporary directory.
pub const DIR_PREFIX: &str = "svcbroker-test-";

/// The node id of every test stack.
pub const NODE_ID: &str = "test-node";

/// What a stack holds, for "a refused request changed nothing" checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// (pool, owner, port) of every lease.
    pub leases: Vec<(String, String, u32)>,
    /// (owner, kind, username) of every credential.
    pub credentials: Vec<(String, String, String)>,
    /// (instance id, port) of every instance on the node.
    pub instances: Vec<(String, u32)>,
    /// Names in the node's data directory.
    pub dirs: Vec<String>,
    /// Command lines of processes running in the node's data directory.
    pub processes: Vec<String>,
}

/// A running svcbroker. Dropping it stops everything and removes its files.
pub struct Stack {
    /// OSB client with the right credentials.
    pub osb: Osb,
    /// `http://127.0.0.1:<port>` of the OSB API.
    pub http_url: String,
    /// `127.0.0.1:<port>` of the OSB API, for raw requests.
    pub http_addr: SocketAddr,
    pub allocator_url: String,
    pub node_url: String,
    pub gateway_grpc_url: String,
    /// The node's instance directory root (canonical).
    pub node_data_dir: PathBuf,
    pub services_dir: PathBuf,
    /// The node's instance port range (inclusive).
    pub port_range: (u16, u16),
    /// The gateway's config file (written in both modes).
    pub gateway_config_path: PathBuf,
    gateway_log: PathBuf,
    // Field order is drop order: the gateway goes first, then the node
    // (which stops its daemons), then the allocator, then the runtime.
    gateway_process: Option<ChildProcess>,
    components: Vec<Component>,
    _background: Background,
    _ports: PortBlock,
    dir: tempfile::TempDir,
}

impl Stack {
    /// Starts a stack with the shipped services and default options.
    pub async fn start_default() -> Stack {
        Stack::start(StackOptions::default()).await
    }

    /// Starts allocator, node and gateway and waits until the gateway
    /// answers and has heard from the node.
    pub async fn start(opts: StackOptions) -> Stack {
        crate::init_tracing();
        let dir = crate::test_dir();
        let root = dir.path().canonicalize().expect("canonical temp dir");
        let services_dir = root.join("services.d");
        std::fs::create_dir_all(&services_dir).expect("create services.d");
        if opts.shipped_services {
            let shipped = crate::workspace_root().join("services.d");
            for entry in std::fs::read_dir(&shipped).expect("read shipped services.d") {
                let path = entry.expect("services.d entry").path();
                if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                    let name = path.file_name().expect("file name");
                    std::fs::copy(&path, services_dir.join(name)).expect("copy shipped service");
                }
            }
        }
        for (file, yaml) in &opts.extra_services {
            std::fs::write(services_dir.join(file), yaml).expect("write service definition");
        }
        let node_data_dir = root.join("node");
        std::fs::create_dir_all(&node_data_dir).expect("create node data dir");

        let ports = PortBlock::acquire();
        let port_range = ports.instance_range();
        let background = Background::start();

        let allocator_l = bind_any();
        let node_l = bind_any();
        let allocator_url = url_of(&allocator_l);
        let node_url = url_of(&node_l);
        let gateway_ls = match opts.gateway {
            GatewayMode::InProcess => Some((bind_any(), bind_any())),
            GatewayMode::Process => None,
        };
        let (http_addr, grpc_addr) = match &gateway_ls {
            Some((h, g)) => (h.local_addr().unwrap(), g.local_addr().unwrap()),
            None => (
                SocketAddr::from(([127, 0, 0, 1], ports.reserved(0))),
                SocketAddr::from(([127, 0, 0, 1], ports.reserved(1))),
            ),
        };
        let http_url = format!("http://{http_addr}");
        let gateway_grpc_url = format!("http://{grpc_addr}");

        let gateway_config = svcbroker_gateway::Config {
            http_listen: http_addr,
            grpc_listen: grpc_addr,
            db_path: root.join("gateway.sqlite"),
            services_dir: services_dir.clone(),
            username: opts.username.clone(),
            password: opts.password.clone(),
            allocator_url: allocator_url.clone(),
            nodes: Vec::new(),
            node_timeout_ms: 10_000,
            announce_interval_ms: 250,
            token: Some(TEST_TOKEN.into()),
            ..Default::default()
        };
        let gateway_config_path = root.join("gateway.yaml");
        std::fs::write(
            &gateway_config_path,
            serde_yaml::to_string(&gateway_config).expect("serialize gateway config"),
        )
        .expect("write gateway config");

        let mut components = Vec::new();
        let allocator_config = svcbroker_allocator::Config {
            listen: allocator_l.local_addr().unwrap(),
            db_path: root.join("allocator.sqlite"),
            token: Some(TEST_TOKEN.into()),
        };
        components.push(Component::spawn(
            &background.handle,
            "allocator",
            move |stop| async move {
                let l = TcpListener::from_std(allocator_l).map_err(|e| e.to_string())?;
                svcbroker_allocator::run(allocator_config, l, stop)
                    .await
                    .map_err(|e| e.to_string())
            },
        ));
        let node_config = svcbroker_node::Config {
            listen: node_l.local_addr().unwrap(),
            node_id: NODE_ID.into(),
            data_dir: node_data_dir.clone(),
            services_dir: services_dir.clone(),
            capacity: opts.capacity,
            port_range: svcbroker_node::PortRangeConfig {
                start: port_range.0,
                end: port_range.1,
            },
            advertise_host: "127.0.0.1".into(),
            grpc_url: Some(node_url.clone()),
            gateway_url: Some(gateway_grpc_url.clone()),
            announce_interval_ms: 250,
            stop_grace_ms: 2_000,
            keep_instances_on_shutdown: false,
            token: Some(TEST_TOKEN.into()),
            ..Default::default()
        };
        components.push(Component::spawn(
            &background.handle,
            "node",
            move |stop| async move {
                let l = TcpListener::from_std(node_l).map_err(|e| e.to_string())?;
                svcbroker_node::run(node_config, l, stop)
                    .await
                    .map_err(|e| e.to_string())
            },
        ));
        if let Some((http_l, grpc_l)) = gateway_ls {
            components.push(Component::spawn(
                &background.handle,
                "gateway",
                move |stop| async move {
                    let h = TcpListener::from_std(http_l).map_err(|e| e.to_string())?;
                    let g = TcpListener::from_std(grpc_l).map_err(|e| e.to_string())?;
                    svcbroker_gateway::run(gateway_config, h, g, stop)
                        .await
                        .map_err(|e| e.to_string())
                },
            ));
        }

        let mut stack = Stack {
            osb: Osb::new(&http_url, &opts.username, &opts.password),
            http_url,
            http_addr,
            allocator_url,
            node_url,
            gateway_grpc_url,
            node_data_dir: node_data_dir.canonicalize().expect("canonical data dir"),
            services_dir,
            port_range,
            gateway_config_path,
            gateway_log: root.join("gateway.log"),
            gateway_process: None,
            components,
            _background: background,
            _ports: ports,
            dir,
        };
        match opts.gateway {
            GatewayMode::Process => stack.start_gateway_process().await,
            GatewayMode::InProcess => stack.wait_ready().await,
        }
        stack
    }

    /// Returns the root of the stack's temporary files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Panics if a component stopped on its own.
    pub fn assert_running(&mut self) {
        for c in &mut self.components {
            if let Ok(result) = c.done.try_recv() {
                panic!("{} stopped unexpectedly: {result:?}", c.name);
            }
        }
        if let Some(p) = &mut self.gateway_process
            && let Ok(Some(status)) = p.child.try_wait()
        {
            panic!(
                "gateway process exited ({status}); log:\n{}",
                self.gateway_log_text()
            );
        }
    }

    /// Waits until the OSB API answers and the gateway has heard from the
    /// node (the node announces itself to the gateway's Registry).
    pub async fn wait_ready(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            self.assert_running();
            if self.gateway_knows_node().await {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gateway at {} did not become ready with node {NODE_ID}; gateway process log:\n{}",
                self.http_url,
                self.gateway_log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Returns true when the gateway's `/healthz` counts a live node (a
    /// stack has exactly one).
    async fn gateway_knows_node(&self) -> bool {
        let req = self
            .osb
            .bare(reqwest::Method::GET, "/healthz")
            .timeout(Duration::from_secs(2));
        let Ok(resp) = req.send().await else {
            return false;
        };
        if !resp.status().is_success() {
            return false;
        }
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        body["live_nodes"].as_u64().unwrap_or(0) >= 1
    }

    /// Starts (or restarts, after [`Stack::kill_gateway`]) the `gateway`
    /// child process on the stack's config, and waits until it answers and
    /// knows the node again.
    pub async fn start_gateway_process(&mut self) {
        assert!(
            self.gateway_process.is_none(),
            "gateway process already running"
        );
        let bin = crate::binary("gateway");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.gateway_log)
            .expect("open gateway log");
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(&self.gateway_config_path)
            // Only what the config file says: no SVCBROKER_* from the
            // developer's shell.
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        self.gateway_process = Some(ChildProcess { child });
        self.wait_ready().await;
    }

    /// SIGKILLs the gateway child process (and its process group) and
    /// waits for it to die: no graceful shutdown, no chance to save state.
    pub fn kill_gateway(&mut self) {
        let mut p = self
            .gateway_process
            .take()
            .expect("kill_gateway needs GatewayMode::Process and a running gateway");
        p.kill();
    }

    /// Sends SIGTERM to the gateway child process and waits up to `timeout`
    /// for it to exit, returning its exit status (SIGKILLs it and panics
    /// when it does not stop in time).
    pub async fn terminate_gateway(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut p = self
            .gateway_process
            .take()
            .expect("terminate_gateway needs GatewayMode::Process and a running gateway");
        let pid = Pid::from_raw(p.child.id() as i32);
        nix::sys::signal::kill(pid, Signal::SIGTERM).expect("SIGTERM gateway");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = p.child.try_wait().expect("wait for gateway") {
                return status;
            }
            if std::time::Instant::now() >= deadline {
                p.kill();
                panic!(
                    "gateway did not stop within {timeout:?} of SIGTERM; log:\n{}",
                    self.gateway_log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Returns what the gateway child process logged so far.
    pub fn gateway_log_text(&self) -> String {
        std::fs::read_to_string(&self.gateway_log).unwrap_or_default()
    }

    /// Sends a hand-written request (`request_line` like `PUT /v2/... HTTP/1.1`)
    /// with the stack's basic auth, the API version header, a JSON content
    /// type and `extra_headers` (one per line), and returns the answer.
    pub async fn raw(&self, request_line: &str, extra_headers: &str, body: &[u8]) -> crate::Resp {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.osb.username, self.osb.password));
        let mut head = format!(
            "{request_line}\nHost: {}\nAuthorization: Basic {auth}\nX-Broker-API-Version: {}\nContent-Type: application/json",
            self.http_addr,
            crate::osb::API_VERSION
        );
        for h in extra_headers.lines().filter(|l| !l.trim().is_empty()) {
            head.push('\n');
            head.push_str(h.trim());
        }
        crate::raw::request(&self.http_addr.to_string(), &head, body)
            .await
            .into_resp()
    }

    /// Returns a connected allocator client.
    pub async fn allocator(&self) -> AllocatorClient<AuthChannel> {
        AllocatorClient::new(connect(&self.allocator_url).await)
    }

    /// Returns a connected node agent client.
    pub async fn node_agent(&self) -> NodeAgentClient<AuthChannel> {
        NodeAgentClient::new(connect(&self.node_url).await)
    }

    /// Lists the allocator's leases and credentials, optionally for one owner.
    pub async fn allocations(&self, owner: Option<&str>) -> ListAllocationsResponse {
        self.allocator()
            .await
            .list_allocations(ListAllocationsRequest {
                pool: None,
                owner: owner.map(str::to_string),
            })
            .await
            .expect("ListAllocations")
            .into_inner()
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

    /// Returns the node's view of instance `id`, if it has one.
    pub async fn node_instance(&self, id: &str) -> Option<InstanceStatus> {
        self.node_instances()
            .await
            .into_iter()
            .find(|i| i.instance_id == id)
    }

    /// Captures allocator, node, data directory and process state.
    pub async fn snapshot(&self) -> Snapshot {
        let a = self.allocations(None).await;
        let mut leases: Vec<_> = a
            .leases
            .into_iter()
            .map(|l| (l.pool, l.owner, l.port))
            .collect();
        leases.sort();
        let mut credentials: Vec<_> = a
            .credentials
            .into_iter()
            .map(|c| (c.owner, c.kind, c.username))
            .collect();
        credentials.sort();
        let mut instances: Vec<_> = self
            .node_instances()
            .await
            .into_iter()
            .map(|i| (i.instance_id, i.port))
            .collect();
        instances.sort();
        let mut dirs: Vec<String> = std::fs::read_dir(&self.node_data_dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        dirs.sort();
        let mut processes: Vec<String> = procs::processes_under(&self.node_data_dir)
            .into_iter()
            .map(|p| p.cmdline)
            .collect();
        processes.sort();
        Snapshot {
            leases,
            credentials,
            instances,
            dirs,
            processes,
        }
    }

    /// Asserts that nothing of instance `id` is left: no node instance, no
    /// directory, no process in its directory, no port lease and no
    /// credential (of the instance, or of any of `binding_ids`).
    pub async fn assert_instance_gone(&self, id: &str, binding_ids: &[&str]) {
        let dir = self.node_data_dir.join(id);
        // Deprovision answers once the node has stopped the daemon, but a
        // process group may take a moment to be reaped.
        until(
            &format!("processes of {id} to exit"),
            Duration::from_secs(10),
            || async { procs::processes_under(&dir).is_empty() },
        )
        .await;
        assert!(
            self.node_instance(id).await.is_none(),
            "node still holds instance {id}"
        );
        assert!(
            !dir.exists(),
            "instance directory {} left behind",
            dir.display()
        );
        let a = self.allocations(Some(id)).await;
        assert!(
            a.leases.is_empty(),
            "port leases left for {id}: {:?}",
            a.leases
        );
        assert!(
            a.credentials.is_empty(),
            "credentials left for {id}: {:?}",
            a.credentials
        );
        for b in binding_ids {
            let a = self.allocations(Some(b)).await;
            assert!(
                a.leases.is_empty() && a.credentials.is_empty(),
                "allocations left for binding {b}: {a:?}"
            );
        }
    }

    /// Stops everything now (what `Drop` does), reporting components that
    /// failed or did not stop in time.
    pub fn shutdown(mut self) -> Vec<String> {
        self.stop_all()
    }

    fn stop_all(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(mut p) = self.gateway_process.take() {
            p.kill();
        }
        // Gateway first, allocator last: in reverse start order.
        while let Some(mut c) = self.components.pop() {
            match c.stop(Duration::from_secs(20)) {
                Ok(()) => {}
                Err(e) => problems.push(format!("{}: {e}", c.name)),
            }
        }
        // Whatever the node did not stop must not outlive the test.
        let left = procs::processes_under(&self.node_data_dir);
        if !left.is_empty() {
            problems.push(format!("processes left after shutdown: {left:?}"));
            procs::kill_all_under(&self.node_data_dir);
        }
        problems
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let problems = self.stop_all();
        if std::thread::panicking() {
            let log = self.gateway_log_text();
            if !log.is_empty() {
                eprintln!("---- gateway process log ----\n{log}\n---- end of gateway log ----");
            }
        }
        for p in problems {
            eprintln!("stack shutdown: {p}");
        }
    }
}

/// A tokio runtime on a thread of its own, for the in-process services.
struct Background {
    handle: Handle,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    fn start() -> Background {
        let (handle_tx, handle_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("stack-runtime".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(4)
                    .thread_name("stack-worker")
                    .enable_all()
                    .build()
                    .expect("build stack runtime");
                handle_tx.send(rt.handle().clone()).expect("send handle");
                // Until the stack is dropped (the sender goes away).
                let _ = stop_rx.recv();
                rt.shutdown_timeout(Duration::from_secs(5));
            })
            .expect("spawn stack runtime thread");
        Background {
            handle: handle_rx.recv().expect("stack runtime handle"),
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One in-process service: its shutdown trigger and its result.
struct Component {
    name: &'static str,
    stop: Option<oneshot::Sender<()>>,
    done: mpsc::Receiver<Result<(), String>>,
}

impl Component {
    fn spawn<F, Fut>(handle: &Handle, name: &'static str, run: F) -> Component
    where
        F: FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        let shutdown = Box::pin(async move {
            let _ = stop_rx.await;
        });
        let fut = run(shutdown);
        handle.spawn(async move {
            let result = fut.await;
            if let Err(e) = &result {
                tracing::error!(component = name, error = %e, "component failed");
            }
            let _ = done_tx.send(result);
        });
        Component {
            name,
            stop: Some(stop_tx),
            done: done_rx,
        }
    }

    /// Triggers shutdown and waits up to `timeout` for the service to end.
    fn stop(&mut self, timeout: Duration) -> Result<(), String> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.done.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!("did not stop within {timeout:?}")),
            // Already reported by an earlier `assert_running`.
            Err(mpsc::RecvTimeoutError::Disconnected) => Ok(()),
        }
    }
}

/// A child process in a process group of its own, SIGKILLed with its whole
/// group when dropped.
struct ChildProcess {
    child: Child,
}

impl ChildProcess {
    fn kill(&mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn bind_any() -> std::net::TcpListener {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.set_nonblocking(true).expect("non-blocking listener");
    l
}

fn url_of(l: &std::net::TcpListener) -> String {
    format!("http://{}", l.local_addr().expect("local addr"))
}

/// The internal bearer token every harness stack runs with, so that every
/// test goes through the token check.
pub const TEST_TOKEN: &str = "svcbroker-test-token-0123456789abcdef";

/// Connects to a gRPC server, retrying briefly (it may be starting); every
/// call carries [`TEST_TOKEN`].
pub async fn connect(url: &str) -> AuthChannel {
    connect_with_token(url, Some(TEST_TOKEN)).await
}

/// Like [`connect`], sending `token` (or no token at all).
pub async fn connect_with_token(url: &str, token: Option<&str>) -> AuthChannel {
    BearerToken::new(token)
        .expect("token is a valid header value")
        .wrap(connect_plain(url).await)
}

/// Connects without adding anything to the calls.
pub async fn connect_plain(url: &str) -> Channel {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("valid grpc url")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30));
    crate::poll::eventually(
        &format!("gRPC connection to {url}"),
        Duration::from_secs(10),
        || {
            let endpoint = endpoint.clone();
            async move { endpoint.connect().await.ok() }
        },
    )
    .await
}
