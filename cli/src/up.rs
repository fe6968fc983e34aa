//! `svcbroker up`: allocator, node and gateway in one process on loopback,
//! talking gRPC to each other exactly as separate processes would, with
//! everything stored under one data directory.

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use rand::Rng as _;
use svcbroker_proto::v1::DescribeRequest;
use svcbroker_proto::v1::node_agent_client::NodeAgentClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::cli::UpArgs;

/// Environment variable holding the OSB basic-auth password.
pub const ENV_PASSWORD: &str = "SVCBROKER_PASSWORD";
/// Environment variable holding the PostgreSQL admin URL the node creates
/// databases with (the node's own variable; it carries a password, so it is
/// never a flag).
pub const ENV_POSTGRES_URL: &str = "SVCBROKER_POSTGRES_URL";
/// How long each service gets to stop before it is abandoned.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Why `up` failed.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// Flags or files that make no sense (exit code 64).
    #[error("{0}")]
    Usage(String),
    /// Something failed while running (exit code 1).
    #[error("{0}")]
    Runtime(String),
}

impl UpError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            UpError::Usage(_) => crate::EX_USAGE,
            UpError::Runtime(_) => 1,
        }
    }
}

/// Where the OSB password came from.
enum PasswordSource {
    Env,
    /// Generated now or on an earlier start, kept in this file.
    File {
        path: PathBuf,
        created: bool,
    },
}

/// Runs the stack until SIGINT/SIGTERM or until a service fails.
pub async fn run(args: UpArgs) -> Result<(), UpError> {
    if args.username.is_empty() || args.username.contains(':') {
        return Err(UpError::Usage(
            "username must be non-empty and contain no ':'".into(),
        ));
    }
    let data_dir = prepare_data_dir(&args.data_dir)?;
    let services_dir = match &args.services_dir {
        Some(dir) => std::path::absolute(dir)
            .map_err(|e| UpError::Usage(format!("services dir {}: {e}", dir.display())))?,
        None => {
            let dir = data_dir.join("services.d");
            if crate::shipped::install(&dir)
                .map_err(|e| UpError::Runtime(format!("cannot write {}: {e}", dir.display())))?
            {
                tracing::info!(dir = %dir.display(), "wrote the shipped service definitions");
            }
            dir
        }
    };
    // Checked here so that a broken definition is a usage error naming the
    // file and line, before anything listens.
    let catalog = svcbroker_svcdef::Catalog::load_dir(&services_dir)
        .map_err(|e| UpError::Usage(e.to_string()))?;
    let (password, password_source) = password(&data_dir)?;
    let (token, token_generated) = token();

    let http = bind(args.http, "OSB API").await?;
    let gateway_grpc = bind(args.gateway_grpc, "gateway gRPC").await?;
    let allocator_grpc = bind(args.allocator_grpc, "allocator gRPC").await?;
    let node_grpc = bind(args.node_grpc, "node gRPC").await?;
    let http_addr = local(&http)?;
    let gateway_url = format!("http://{}", local(&gateway_grpc)?);
    let allocator_url = format!("http://{}", local(&allocator_grpc)?);
    let node_url = format!("http://{}", local(&node_grpc)?);

    let allocator_config = svcbroker_allocator::Config {
        listen: local(&allocator_grpc)?,
        db_path: data_dir.join("allocator.sqlite"),
        token: Some(token.clone()),
    };
    let node_config = svcbroker_node::Config {
        listen: local(&node_grpc)?,
        node_id: args.node_id.clone(),
        data_dir: data_dir.join("node"),
        services_dir: services_dir.clone(),
        capacity: args.capacity,
        port_range: svcbroker_node::PortRangeConfig {
            start: args.ports.0,
            end: args.ports.1,
        },
        advertise_host: "127.0.0.1".into(),
        grpc_url: Some(node_url.clone()),
        gateway_url: Some(gateway_url.clone()),
        postgres_url: std::env::var(ENV_POSTGRES_URL)
            .ok()
            .filter(|u| !u.is_empty()),
        token: Some(token.clone()),
        ..Default::default()
    };
    let gateway_config = svcbroker_gateway::Config {
        http_listen: http_addr,
        grpc_listen: local(&gateway_grpc)?,
        db_path: data_dir.join("gateway.sqlite"),
        services_dir: services_dir.clone(),
        username: args.username.clone(),
        password: password.clone(),
        allocator_url: allocator_url.clone(),
        token: Some(token.clone()),
        ..Default::default()
    };
    gateway_config
        .validate()
        .map_err(|e| UpError::Usage(e.to_string()))?;

    // Registered before anything is announced (see `shutdown_signal`).
    let signal = svcbroker_proto::server::shutdown_signal();
    // Started in dependency order and stopped in reverse, so that no
    // in-flight operation meets an allocator that is already gone.
    let mut services = Vec::new();
    services.push(Service::spawn("allocator", move |stop| {
        svcbroker_allocator::run(allocator_config, allocator_grpc, stop)
    }));
    services.push(Service::spawn("node", move |stop| {
        svcbroker_node::run(node_config, node_grpc, stop)
    }));
    services.push(Service::spawn("gateway", move |stop| {
        svcbroker_gateway::run(gateway_config, http, gateway_grpc, stop)
    }));

    let offered = describe_node(&node_url, &token).await;
    print_banner(&Banner {
        http: http_addr,
        username: &args.username,
        password: &password,
        password_source: &password_source,
        token: &token,
        token_generated,
        allocator_url: &allocator_url,
        node_url: &node_url,
        node_id: &args.node_id,
        gateway_url: &gateway_url,
        data_dir: &data_dir,
        services_dir: &services_dir,
        all_services: catalog.services().iter().map(|s| s.name.as_str()).collect(),
        offered: offered.as_deref(),
    });

    // Until a signal, or until one of the services ends on its own (which
    // is a failure: they only stop when told to).
    let failed = tokio::select! {
        _ = signal => None,
        (name, result) = first_to_end(&mut services) => Some((name, result)),
    };
    let mut errors = Vec::new();
    if let Some((name, result)) = failed {
        errors.push(match result {
            Ok(()) => format!("{name} stopped unexpectedly"),
            Err(e) => format!("{name}: {e}"),
        });
    }
    while let Some(service) = services.pop() {
        if let Err(e) = service.stop(STOP_GRACE).await {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        tracing::info!("stopped");
        Ok(())
    } else {
        Err(UpError::Runtime(errors.join("; ")))
    }
}

/// Creates the data directory (mode 0700: it holds databases with
/// passwords) and returns its absolute path.
fn prepare_data_dir(dir: &Path) -> Result<PathBuf, UpError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| UpError::Usage(format!("cannot create data dir {}: {e}", dir.display())))?;
    std::fs::canonicalize(dir)
        .map_err(|e| UpError::Usage(format!("data dir {}: {e}", dir.display())))
}

/// Returns the OSB password: SVCBROKER_PASSWORD, or the one kept in
/// `data_dir/osb-password` (generated on the first start without it), so
/// that a restart does not lock out a platform that registered the broker.
fn password(data_dir: &Path) -> Result<(String, PasswordSource), UpError> {
    if let Some(p) = std::env::var(ENV_PASSWORD).ok().filter(|p| !p.is_empty()) {
        return Ok((p, PasswordSource::Env));
    }
    let path = data_dir.join("osb-password");
    match std::fs::read_to_string(&path) {
        Ok(p) if !p.trim().is_empty() => {
            return Ok((
                p.trim().to_string(),
                PasswordSource::File {
                    path,
                    created: false,
                },
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(UpError::Runtime(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    }
    let generated = generate_password();
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        writeln!(f, "{generated}")
    };
    write().map_err(|e| UpError::Runtime(format!("cannot write {}: {e}", path.display())))?;
    Ok((
        generated,
        PasswordSource::File {
            path,
            created: true,
        },
    ))
}

/// Returns the internal gRPC token: SVCBROKER_TOKEN, or a new one (32
/// bytes from the thread CSPRNG, base64url) and true. It need not survive a
/// restart: every component of this process gets it at once.
fn token() -> (String, bool) {
    use base64::Engine as _;
    if let Some(t) = std::env::var(svcbroker_proto::auth::ENV_TOKEN)
        .ok()
        .filter(|t| !t.is_empty())
    {
        return (t, false);
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill(&mut bytes);
    (
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
        true,
    )
}

/// 24 alphanumeric characters from the thread CSPRNG: about 142 bits.
fn generate_password() -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, UpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| UpError::Runtime(format!("cannot listen on {addr} ({what}): {e}")))
}

fn local(l: &TcpListener) -> Result<SocketAddr, UpError> {
    l.local_addr()
        .map_err(|e| UpError::Runtime(format!("cannot read listen address: {e}")))
}

/// Asks the node what it offers (it checks which executables it finds), for
/// the banner; None when it cannot be asked within a few seconds.
async fn describe_node(url: &str, token: &str) -> Option<Vec<String>> {
    let token = svcbroker_proto::auth::BearerToken::new(Some(token)).ok()?;
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    for _ in 0..20 {
        if let Ok(channel) = endpoint.connect().await {
            let info = NodeAgentClient::new(token.wrap(channel))
                .describe(DescribeRequest {})
                .await
                .ok()?
                .into_inner();
            return Some(info.services);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

struct Banner<'a> {
    http: SocketAddr,
    username: &'a str,
    password: &'a str,
    password_source: &'a PasswordSource,
    token: &'a str,
    token_generated: bool,
    allocator_url: &'a str,
    node_url: &'a str,
    node_id: &'a str,
    gateway_url: &'a str,
    data_dir: &'a Path,
    services_dir: &'a Path,
    all_services: Vec<&'a str>,
    offered: Option<&'a [String]>,
}

/// Prints where everything listens and how to log in, on stdout (logs go to
/// stderr), so that scripts can read it.
fn print_banner(b: &Banner<'_>) {
    let mut out = String::new();
    out.push_str("svcbroker is up\n");
    out.push_str(&format!("OSB API listening on http://{}\n", b.http));
    out.push_str(&format!("  username: {}\n", b.username));
    match b.password_source {
        // Never echo a secret the operator supplied: they have it.
        PasswordSource::Env => out.push_str(&format!("  password: (from {ENV_PASSWORD})\n")),
        PasswordSource::File { path, created } => out.push_str(&format!(
            "  password: {}   ({} {}; set {ENV_PASSWORD} to choose one)\n",
            b.password,
            if *created {
                "generated, saved in"
            } else {
                "from"
            },
            path.display()
        )),
    }
    out.push_str(&format!(
        "  gRPC: allocator {}, node {} ({}), gateway registry {}\n",
        b.allocator_url, b.node_url, b.node_id, b.gateway_url
    ));
    let token_env = svcbroker_proto::auth::ENV_TOKEN;
    if b.token_generated {
        out.push_str(&format!(
            "  gRPC token: {}   (generated for this run; set {token_env} to choose one)\n",
            b.token
        ));
    } else {
        out.push_str(&format!("  gRPC token: (from {token_env})\n"));
    }
    out.push_str(&format!(
        "  grpcurl -plaintext -H 'authorization: Bearer TOKEN' {} list\n",
        b.allocator_url.trim_start_matches("http://")
    ));
    out.push_str(&format!("  data: {}\n", b.data_dir.display()));
    out.push_str(&format!("  services: {}\n", b.services_dir.display()));
    match b.offered {
        Some(offered) => {
            let missing: Vec<&str> = b
                .all_services
                .iter()
                .copied()
                .filter(|s| !offered.iter().any(|o| o == s))
                .collect();
            out.push_str(&format!(
                "  offered by {}: {}\n",
                b.node_id,
                offered.join(", ")
            ));
            if !missing.is_empty() {
                out.push_str(&format!(
                    "  not offered here: {} (a program is missing, or for databases \
                     {ENV_POSTGRES_URL} is unset; the log says which)\n",
                    missing.join(", ")
                ));
            }
        }
        None => out.push_str("  offered: unknown (node did not answer)\n"),
    }
    out.push_str(&format!(
        "try: curl -u {}:PASSWORD -H 'X-Broker-API-Version: 2.17' http://{}/v2/catalog\n",
        b.username, b.http
    ));
    out.push_str("Ctrl-C stops everything\n");
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One service task and the trigger that stops it.
struct Service {
    name: &'static str,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), String>>,
    /// Set once `first_to_end` has taken (and reported) the task's result:
    /// a finished `JoinHandle` must not be polled again.
    ended: bool,
}

impl Service {
    fn spawn<F, Fut, E>(name: &'static str, run: F) -> Service
    where
        F: FnOnce(Shutdown) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let fut = run(Box::pin(async move {
            let _ = rx.await;
        }));
        let task = tokio::spawn(async move { fut.await.map_err(|e| e.to_string()) });
        Service {
            name,
            stop: Some(tx),
            task,
            ended: false,
        }
    }

    /// Stops the service and waits up to `grace` for it.
    async fn stop(mut self, grace: Duration) -> Result<(), String> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if self.ended {
            return Ok(());
        }
        match tokio::time::timeout(grace, &mut self.task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(format!("{}: {e}", self.name)),
            Ok(Err(e)) => Err(format!("{}: task failed: {e}", self.name)),
            Err(_) => {
                self.task.abort();
                Err(format!("{} did not stop within {grace:?}", self.name))
            }
        }
    }
}

/// Resolves when any service ends, with its name and result.
async fn first_to_end(services: &mut [Service]) -> (&'static str, Result<(), String>) {
    let (result, index, _) =
        futures::future::select_all(services.iter_mut().map(|s| &mut s.task)).await;
    services[index].ended = true;
    (
        services[index].name,
        result.unwrap_or_else(|e| Err(format!("task failed: {e}"))),
    )
}
