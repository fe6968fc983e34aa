//! Shared helpers: a real node server on 127.0.0.1:0 with a temp data dir,
//! free ports, a tiny Redis client, and a guard that kills every process
//! the test left behind, even when the test panics.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use svcbroker_node::Config;
use svcbroker_proto::v1::node_agent_client::NodeAgentClient;
use svcbroker_proto::v1::{
    FileSpec, InstanceState, InstanceStatus, ListInstancesRequest, ProcessSpec, ProvisionRequest,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tonic::transport::Channel;

/// A node server running inside the test process.
pub struct TestNode {
    pub client: NodeAgentClient<Channel>,
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), svcbroker_node::Error>>>,
}

/// A test's data directory plus the kill-everything-on-drop guard.
pub struct Sandbox {
    pub root: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        Sandbox {
            root: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// The node's data directory (canonical, as the node reports it).
    pub fn data_dir(&self) -> PathBuf {
        let d = self.root.path().join("data");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::canonicalize(d).unwrap()
    }

    /// A config for a node on this sandbox: wide port range, short grace.
    pub fn config(&self) -> Config {
        Config {
            data_dir: self.data_dir(),
            services_dir: self.root.path().join("services.d"),
            port_range: svcbroker_node::PortRangeConfig {
                start: 1024,
                end: 65535,
            },
            stop_grace_ms: 2000,
            ready_timeout_ms: 10_000,
            ..Config::default()
        }
    }

    /// Pids of live processes whose working directory is inside this
    /// sandbox: every daemon a node here started.
    pub fn live_pids(&self) -> Vec<i32> {
        let root = std::fs::canonicalize(self.root.path()).unwrap_or(self.root.path().to_owned());
        pids_where(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd"))
                .map(|cwd| cwd.starts_with(&root))
                .unwrap_or(false)
        })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Directory instances may be loop-mounted inside: a failed test must
        // not leave mounts (the temp dir could not be removed either).
        let root = std::fs::canonicalize(self.root.path()).unwrap_or(self.root.path().to_owned());
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            for line in info.lines().rev() {
                if let Some(point) = line.split(' ').nth(4)
                    && Path::new(point).starts_with(&root)
                {
                    let _ = std::process::Command::new("umount")
                        .arg("-l")
                        .arg(point)
                        .status();
                }
            }
        }
        // Kill the groups of everything running in the sandbox, so that a
        // failed test leaves no daemon behind.
        for pid in self.live_pids() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Pids of live (non-zombie) processes matching `pred`.
pub fn pids_where(pred: impl Fn(i32) -> bool) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid_alive(pid as u32) && pred(pid) {
            out.push(pid);
        }
    }
    out
}

/// Pids of live processes whose command line contains `marker`.
pub fn pids_with_marker(marker: &str) -> Vec<i32> {
    pids_where(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(marker))
            .unwrap_or(false)
    })
}

/// True when `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .next()
        .unwrap_or("X");
    !matches!(state, "Z" | "X")
}

impl TestNode {
    /// Starts a node with `config` on 127.0.0.1:0.
    pub async fn start(config: Config) -> TestNode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(svcbroker_node::run(config, listener, async move {
            let _ = rx.await;
        }));
        let client = NodeAgentClient::connect(format!("http://{addr}"))
            .await
            .expect("connect to node");
        TestNode {
            client,
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the server and waits until `run` returned.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let result = tokio::time::timeout(Duration::from_secs(30), self.task.take().unwrap())
            .await
            .expect("node stops within 30 s")
            .expect("node task");
        result.expect("run returns Ok");
    }

    pub async fn list(&self) -> Vec<InstanceStatus> {
        self.client
            .clone()
            .list_instances(ListInstancesRequest {})
            .await
            .unwrap()
            .into_inner()
            .instances
    }

    pub async fn instance(&self, id: &str) -> Option<InstanceStatus> {
        self.list().await.into_iter().find(|i| i.instance_id == id)
    }

    /// Polls ListInstances until `pred` holds for `id`, or panics after
    /// `timeout`.
    pub async fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        pred: impl Fn(&InstanceStatus) -> bool,
    ) -> InstanceStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let cur = self.instance(id).await;
            if let Some(i) = &cur
                && pred(i)
            {
                return i.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {id}; last: {cur:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `n` distinct ports that were free a moment ago (bound together on
/// 127.0.0.1:0, then released).
pub fn free_ports(n: usize) -> Vec<u32> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| u32::from(l.local_addr().unwrap().port()))
        .collect()
}

/// A Redis process request: the password lives in a 0600 config file, not
/// on the command line, as the gateway renders it.
pub fn redis_request(id: &str, port: u32, password: &str) -> ProvisionRequest {
    let conf = format!(
        "port {port}\nbind 127.0.0.1\ndir ./\nrequirepass {password}\nappendonly yes\nsave \"\"\ndaemonize no\n"
    );
    ProvisionRequest {
        instance_id: id.to_owned(),
        service: "redis".to_owned(),
        plan: "small".to_owned(),
        kind: "process".to_owned(),
        port,
        process: Some(ProcessSpec {
            argv: vec!["redis-server".to_owned(), "redis.conf".to_owned()],
            env: HashMap::new(),
            files: vec![FileSpec {
                path: "redis.conf".to_owned(),
                content: conf,
                mode: 0,
            }],
            ready_timeout_ms: 0,
        }),
        ..Default::default()
    }
}

/// A request running `python3 -c <code> <args...>`.
pub fn python_request(id: &str, port: u32, code: &str, args: &[&str]) -> ProvisionRequest {
    let mut argv = vec!["python3".to_owned(), "-c".to_owned(), code.to_owned()];
    argv.extend(args.iter().map(|a| a.to_string()));
    ProvisionRequest {
        instance_id: id.to_owned(),
        service: "py".to_owned(),
        plan: "default".to_owned(),
        kind: "process".to_owned(),
        port,
        process: Some(ProcessSpec {
            argv,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Python that listens on argv[1] forever (and answers nothing).
pub const PY_LISTEN: &str = "import socket,sys,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1', int(sys.argv[1])))\ns.listen(16)\nwhile True: time.sleep(3600)";

/// Sends one Redis command and returns the first reply line.
pub async fn redis_cmd(port: u32, args: &[&str]) -> String {
    let stream = TcpStream::connect(("127.0.0.1", port as u16))
        .await
        .expect("connect to redis");
    let mut stream = BufReader::new(stream);
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream.get_mut().write_all(req.as_bytes()).await.unwrap();
    let mut line = String::new();
    stream.read_line(&mut line).await.unwrap();
    line.trim_end().to_owned()
}

/// Runs several commands on one connection (for AUTH + command).
pub async fn redis_session(port: u32, cmds: &[&[&str]]) -> Vec<String> {
    let stream = TcpStream::connect(("127.0.0.1", port as u16))
        .await
        .expect("connect to redis");
    let mut stream = BufReader::new(stream);
    let mut out = Vec::new();
    for args in cmds {
        let mut req = format!("*{}\r\n", args.len());
        for a in *args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        stream.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        if line.starts_with('$') && !line.starts_with("$-1") {
            // Bulk string: the value is on the next line.
            line.clear();
            stream.read_line(&mut line).await.unwrap();
        }
        out.push(line.trim_end().to_owned());
    }
    out
}

pub fn state(i: &InstanceStatus) -> InstanceState {
    InstanceState::try_from(i.state).unwrap_or(InstanceState::Unspecified)
}

/// Path of an instance directory.
pub fn instance_dir(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join(id)
}

/// The PostgreSQL admin URL the database tests use.
pub fn pg_url() -> String {
    std::env::var("SVCBROKER_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Connects to `url` (admin URL with another database/user/password
/// swapped in by the caller), returning the error instead of panicking.
pub async fn pg_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// An admin connection to the test server; fails the test (never skips)
/// with the fix when the server is not there.
pub async fn pg_admin() -> tokio_postgres::Client {
    let url = pg_url();
    match pg_connect(&url).await {
        Ok(c) => c,
        Err(e) => panic!(
            "PostgreSQL is not reachable at {url} ({e}): run scripts/ensure-postgres.sh \
             (or set SVCBROKER_TEST_POSTGRES_URL) before these tests"
        ),
    }
}

/// `postgres://user:password@host:port/db` on the test server.
pub fn pg_user_url(user: &str, password: &str, db: &str) -> String {
    let cfg: tokio_postgres::Config = pg_url().parse().unwrap();
    let host = match &cfg.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[allow(unreachable_patterns)]
        _ => "127.0.0.1".to_owned(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!("postgres://{user}:{password}@{host}:{port}/{db}")
}

/// A name no other test (or concurrent test run) uses: `<prefix>_<pid>_<n>`.
pub fn unique_name(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}_{}_{n}_{}", std::process::id(), nanos % 100_000)
}

/// One request an [`HttpRecorder`] received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names lowercased.
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// A tiny HTTP/1.1 server on 127.0.0.1:0 that records every request and
/// answers with what `respond(method, path)` returns (status, body).
pub struct HttpRecorder {
    pub addr: std::net::SocketAddr,
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpRecorder {
    pub async fn start(
        respond: impl Fn(&str, &str) -> (u16, String) + Send + Sync + 'static,
    ) -> HttpRecorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let respond = std::sync::Arc::new(respond);
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (seen, respond) = (s.clone(), respond.clone());
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    // Keep-alive: serve requests until the client closes.
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let mut parts = line.split_whitespace();
                        let method = parts.next().unwrap_or("").to_owned();
                        let path = parts.next().unwrap_or("").to_owned();
                        let mut headers = HashMap::new();
                        loop {
                            let mut h = String::new();
                            if stream.read_line(&mut h).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let h = h.trim_end();
                            if h.is_empty() {
                                break;
                            }
                            if let Some((k, v)) = h.split_once(':') {
                                headers.insert(k.trim().to_lowercase(), v.trim().to_owned());
                            }
                        }
                        let len: usize = headers
                            .get("content-length")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        let mut body = vec![0u8; len];
                        use tokio::io::AsyncReadExt;
                        if stream.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let (status, reply) = respond(&method, &path);
                        seen.lock().unwrap().push(Recorded {
                            method,
                            path,
                            headers,
                            body: String::from_utf8_lossy(&body).into_owned(),
                        });
                        let resp = format!(
                            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{reply}",
                            reply.len()
                        );
                        if stream.get_mut().write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        HttpRecorder { addr, seen, task }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }
}

/// A hook that runs `argv` with `env` and `stdin`.
pub fn command_hook(argv: &[&str], env: &[(&str, &str)], stdin: &str) -> svcbroker_proto::v1::Hook {
    svcbroker_proto::v1::Hook {
        action: Some(svcbroker_proto::v1::hook::Action::Command(
            svcbroker_proto::v1::CommandHook {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                stdin: stdin.to_owned(),
                timeout_ms: 0,
            },
        )),
    }
}

/// An HTTP hook.
pub fn http_hook(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
    accept: &[u32],
) -> svcbroker_proto::v1::Hook {
    svcbroker_proto::v1::Hook {
        action: Some(svcbroker_proto::v1::hook::Action::Http(
            svcbroker_proto::v1::HttpHook {
                method: method.to_owned(),
                url: url.to_owned(),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                body: body.to_owned(),
                timeout_ms: 5000,
                accept_status: accept.to_vec(),
            },
        )),
    }
}
