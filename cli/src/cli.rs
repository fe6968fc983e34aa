//! The command line: one subcommand per verb, each with its own argument
//! struct, so that operator verbs (services, create-service, bind-service,
//! nodes, bench, ...) are added as new variants without touching `up`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// svcbroker: an Open Service Broker API v2.17 broker for custom services.
#[derive(Debug, Parser)]
#[command(
    name = "svcbroker",
    version,
    propagate_version = true,
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs allocator, node and gateway in this process on loopback (they
    /// still talk gRPC to each other) until Ctrl-C or SIGTERM.
    #[command(after_help = UP_ENV_HELP)]
    Up(UpArgs),
    /// Lists the services the broker offers (or, with --instances, the
    /// service instances).
    #[command(after_help = EXIT_CODES_HELP)]
    Services(ServicesArgs),
    /// Creates a service instance named NAME and waits until it is ready.
    #[command(after_help = EXIT_CODES_HELP)]
    CreateService(CreateServiceArgs),
    /// Shows a service instance: credentials of its bindings, meta data and
    /// properties.
    #[command(after_help = EXIT_CODES_HELP)]
    Service(ServiceArgs),
    /// Binds a service instance and prints the binding's credentials.
    #[command(after_help = EXIT_CODES_HELP)]
    BindService(BindServiceArgs),
    /// Deletes a binding of a service instance (by binding name or id).
    #[command(after_help = EXIT_CODES_HELP)]
    UnbindService(UnbindServiceArgs),
    /// Deletes a service instance and waits until it is gone.
    #[command(after_help = EXIT_CODES_HELP)]
    DeleteService(DeleteServiceArgs),
    /// Lists the service nodes the gateway knows, with capacity and liveness.
    #[command(after_help = EXIT_CODES_HELP)]
    Nodes(NodesArgs),
    /// Checks a gRPC server's grpc.health.v1 status (container health
    /// checks use it): exit 0 when SERVING, 1 otherwise, within 3 s.
    Healthcheck(HealthcheckArgs),
    /// Benchmarks a running broker: concurrent full lifecycles (provision,
    /// bind, unbind, deprovision), latency per call, errors, peak RSS of
    /// each component, and this host's physical baselines (durable SQLite
    /// commits/s, redis-server spawn-to-PONG) with the broker's figures as
    /// ratios to them.
    #[command(after_help = BENCH_HELP)]
    Bench(BenchArgs),
}

/// The environment `svcbroker up` reads, for its `--help`.
const UP_ENV_HELP: &str = "Environment:
  SVCBROKER_PASSWORD      OSB basic-auth password; when unset, one is generated on first
                          start, kept in DATA_DIR/osb-password and printed
  SVCBROKER_POSTGRES_URL  PostgreSQL admin URL; lets the node offer PostgreSQL databases
  SVCBROKER_TOKEN         bearer token every internal gRPC call carries; when unset, one
                          is generated for this run and printed
  RUST_LOG                log filter (default: info); logs go to stderr";

/// Flags of `svcbroker up`.
///
/// The OSB password comes from SVCBROKER_PASSWORD (never a flag: command
/// lines are visible to every user of the host); when unset, one is
/// generated on first start, kept in DATA_DIR/osb-password and printed.
/// SVCBROKER_POSTGRES_URL (an admin URL) lets the node offer PostgreSQL
/// databases.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Directory for the databases, instance data and (unless
    /// --services-dir) the service definitions.
    #[arg(long, value_name = "DIR", default_value = ".data")]
    pub data_dir: PathBuf,
    /// Address of the OSB REST API.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// gRPC address of the allocator (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051")]
    pub allocator_grpc: SocketAddr,
    /// gRPC address of the node agent (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50052")]
    pub node_grpc: SocketAddr,
    /// gRPC address of the gateway's node Registry (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50050")]
    pub gateway_grpc: SocketAddr,
    /// Service definitions to use instead of DATA_DIR/services.d (which is
    /// filled with the shipped definitions on first start).
    #[arg(long, value_name = "DIR")]
    pub services_dir: Option<PathBuf>,
    /// OSB basic-auth user name.
    #[arg(long, env = "SVCBROKER_USERNAME", default_value = "admin")]
    pub username: String,
    /// Id of the node.
    #[arg(long, value_name = "ID", default_value = "node-1")]
    pub node_id: String,
    /// How many instances the node accepts.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub capacity: u32,
    /// Ports instances may be given, inclusive.
    #[arg(long, value_name = "START-END", default_value = "10000-10999", value_parser = parse_port_range)]
    pub ports: (u16, u16),
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("expected START-END, got {s:?}"))?;
    let start: u16 = a.trim().parse().map_err(|e| format!("start {a:?}: {e}"))?;
    let end: u16 = b.trim().parse().map_err(|e| format!("end {b:?}: {e}"))?;
    if start == 0 || start > end {
        return Err(format!(
            "start ({start}) must be at least 1 and not above end ({end})"
        ));
    }
    Ok((start, end))
}

/// Shown under the operator commands' `--help`: what scripts can test.
pub const EXIT_CODES_HELP: &str = "\
Exit codes of the operator commands:
  0  success
  1  the operation failed or was refused (the message says why)
  2  usage error (bad flags or arguments)
  3  not found (no such service, plan, instance or binding)
  4  authentication or connection problem (wrong SVCBROKER_USERNAME or
     SVCBROKER_PASSWORD, gateway not reachable)

The gateway is found through --url or SVCBROKER_URL (default
http://127.0.0.1:8080); its basic-auth credentials come from
SVCBROKER_USERNAME (or --username) and SVCBROKER_PASSWORD (never a flag:
command lines are visible to every user of the host). With --json, stdout
carries only the machine-readable result; progress and errors go to stderr.";

/// How operator commands reach the gateway, and how they print.
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Base URL of the gateway's HTTP API.
    #[arg(
        long,
        env = "SVCBROKER_URL",
        value_name = "URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// Basic-auth user name (the password comes from SVCBROKER_PASSWORD).
    #[arg(long, env = "SVCBROKER_USERNAME", default_value = "admin")]
    pub username: String,
    /// Prints machine-readable JSON on stdout instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `svcbroker services`.
#[derive(Debug, Args)]
pub struct ServicesArgs {
    /// Lists the service instances instead of the offered services.
    #[arg(long)]
    pub instances: bool,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// Flags of `svcbroker create-service`.
#[derive(Debug, Args)]
pub struct CreateServiceArgs {
    /// Service to create an instance of (name or id; see `svcbroker services`).
    pub service: String,
    /// Name of the new instance (unique among instances).
    pub name: String,
    /// Plan (name or id); defaults to the service's first plan.
    #[arg(long, value_name = "PLAN")]
    pub plan: Option<String>,
    /// Parameter KEY=VALUE (VALUE is read as JSON when it parses, else as a
    /// string), or @FILE holding a JSON object. Repeatable; later ones win.
    #[arg(short = 'c', long = "config", value_name = "KEY=VALUE|@FILE")]
    pub config: Vec<String>,
    /// Stops waiting after this many seconds (the operation goes on).
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    pub timeout: u64,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// Flags of `svcbroker service`.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// Instance name (or id).
    pub name: String,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// Flags of `svcbroker bind-service`.
#[derive(Debug, Args)]
pub struct BindServiceArgs {
    /// Instance name (or id).
    pub name: String,
    /// Name of the new binding (unique among the instance's bindings).
    #[arg(long, value_name = "B")]
    pub binding_name: Option<String>,
    /// Binding parameter KEY=VALUE or @FILE (as in create-service).
    #[arg(short = 'c', long = "config", value_name = "KEY=VALUE|@FILE")]
    pub config: Vec<String>,
    /// Stops waiting after this many seconds (the operation goes on).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub timeout: u64,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// Flags of `svcbroker unbind-service`.
#[derive(Debug, Args)]
pub struct UnbindServiceArgs {
    /// Instance name (or id).
    pub name: String,
    /// Binding name (or id).
    pub binding: String,
    /// Stops waiting after this many seconds (the operation goes on).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub timeout: u64,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// Flags of `svcbroker delete-service`.
#[derive(Debug, Args)]
pub struct DeleteServiceArgs {
    /// Instance name (or id).
    pub name: String,
    /// Deletes the instance's bindings first (an instance with bindings is
    /// refused otherwise).
    #[arg(long)]
    pub force: bool,
    /// Stops waiting after this many seconds (the operation goes on).
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    pub timeout: u64,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// Flags of `svcbroker nodes`.
#[derive(Debug, Args)]
pub struct NodesArgs {
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// What `svcbroker bench --help` adds below the flags.
const BENCH_HELP: &str = "\
The gateway is found through --url or SVCBROKER_URL, its credentials in
SVCBROKER_USERNAME and SVCBROKER_PASSWORD. Instances and bindings it creates
have ids starting with `bench-` and are deleted again (unless --keep).

Components' memory is read from /proc: the process listening on the
gateway's port (a `gateway`, or a `svcbroker up` holding all three), and the
`allocator` and `node` processes listening on ports the gateway is connected
to. A component in another container or host is reported as not visible.

Targets it checks (the issue's): echo lifecycles/s >= 25% of (durable
SQLite commits/s / 4); redis provision p50 <= spawn-to-PONG + 15 ms; each
component <= 30 MB RSS with --instances 10000; catalog and last_operation
p99 at --instances N no worse than at 100 instances.

Exit codes: 0 the run completed (whether targets were met or not), 1 the
run could not be done, 2 usage, 3 unknown service or plan, 4 credentials or
connection.";

/// Flags of `svcbroker bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// How long clients start new lifecycles (in-flight ones are finished).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub seconds: u64,
    /// Concurrent clients, each running lifecycles one after another.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub concurrency: usize,
    /// Service to run lifecycles of (name or id).
    #[arg(long, value_name = "NAME", default_value = "echo")]
    pub service: String,
    /// Plan (name or id); defaults to the service's first plan.
    #[arg(long, value_name = "PLAN")]
    pub plan: Option<String>,
    /// Sends accepts_incomplete=true and polls last_operation (every 20 ms)
    /// even when the plan does not require it; a call's latency is then
    /// until its operation finished.
    #[arg(long = "async")]
    pub asynchronous: bool,
    /// After the lifecycles: provisions N more instances of the service
    /// (at --concurrency), measuring catalog and last_operation latency
    /// once 100 and once all N are there, and each component's RSS at N.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub instances: usize,
    /// Leaves the instances of --instances in place (for a second run or a
    /// look at the gateway); by default they are deprovisioned.
    #[arg(long)]
    pub keep: bool,
    /// Directory for the SQLite baseline's scratch database; by default the
    /// directory of the gateway's database when visible, else the current
    /// directory. Use the broker's disk: the baseline is that disk's fsync.
    #[arg(long, value_name = "DIR")]
    pub baseline_dir: Option<PathBuf>,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// Flags of `svcbroker healthcheck`.
#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// gRPC URL of the server, e.g. http://127.0.0.1:50051.
    pub url: String,
    /// Service to ask about (e.g. svcbroker.v1.Allocator); by default the
    /// server as a whole.
    #[arg(long, value_name = "NAME", default_value = "")]
    pub service: String,
    /// Prints {"status": ...} as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn up_defaults_and_port_zero() {
        let cli = Cli::try_parse_from([
            "svcbroker",
            "up",
            "--data-dir",
            "/tmp/x",
            "--http",
            "127.0.0.1:0",
            "--node-grpc",
            "127.0.0.1:0",
        ])
        .unwrap();
        let Command::Up(up) = cli.command else {
            panic!("expected up");
        };
        assert_eq!(up.http.port(), 0);
        assert_eq!(up.node_grpc.port(), 0);
        assert_eq!(up.allocator_grpc.to_string(), "127.0.0.1:50051");
        assert_eq!(up.gateway_grpc.to_string(), "127.0.0.1:50050");
        assert_eq!(up.ports, (10000, 10999));
    }

    #[test]
    fn port_range_checked() {
        assert_eq!(parse_port_range("20000-20010"), Ok((20000, 20010)));
        assert!(parse_port_range("20010-20000").is_err());
        assert!(parse_port_range("0-5").is_err());
        assert!(parse_port_range("abc").is_err());
    }
}
