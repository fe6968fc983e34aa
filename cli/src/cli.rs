//! The command line: one subcommand per verb, each with its own argument
//! struct, so that operator verbs (services, create-service, bind-service,
//! nodes, bench, ...) are added as new variants without touching `up`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// svcbroker: an Open Service Broker API v2.17 broker for custom services.
#[derive(Debug, Parser)]
#[command(name = "svcbroker", version, propagate_version = true)]
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
}

/// The environment `svcbroker up` reads, for its `--help`.
const UP_ENV_HELP: &str = "Environment:
  SVCBROKER_PASSWORD      OSB basic-auth password; when unset, one is generated on first
                          start, kept in DATA_DIR/osb-password and printed
  SVCBROKER_POSTGRES_URL  PostgreSQL admin URL; lets the node offer PostgreSQL databases
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
        let Command::Up(up) = cli.command;
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
