//! `node`: the svcbroker node agent binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

/// Exit code for an invalid configuration (EX_CONFIG-style usage error).
const EXIT_CONFIG: u8 = 64;

/// svcbroker node agent: provisions and supervises service instances on this host.
#[derive(Parser, Debug)]
#[command(name = "node", version)]
struct Args {
    /// YAML config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC listen address (overrides `listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Node id (overrides `node_id`); "auto" means the host name.
    #[arg(long)]
    node_id: Option<String>,
    /// Instance data directory (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Service definitions directory (overrides `services_dir`).
    #[arg(long)]
    services_dir: Option<PathBuf>,
    /// gRPC URL of the gateway's Registry (overrides `gateway_url`).
    #[arg(long)]
    gateway_grpc: Option<String>,
    /// Address instance daemons listen on (overrides `bind_host`).
    #[arg(long)]
    bind_host: Option<String>,
}

fn load(args: Args) -> Result<svcbroker_node::Config, svcbroker_node::ConfigError> {
    let mut config = svcbroker_node::load_config(args.config.as_deref())?;
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.node_id {
        config.node_id = v;
    }
    if let Some(v) = args.data_dir {
        config.data_dir = v;
    }
    if let Some(v) = args.services_dir {
        config.services_dir = v;
    }
    if let Some(v) = args.gateway_grpc {
        config.gateway_url = Some(v);
    }
    if let Some(v) = args.bind_host {
        config.bind_host = v;
    }
    config.finish()?;
    Ok(config)
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Caps tokio-postgres's statement logs (role password verifiers).
    svcbroker_proto::logging::init(svcbroker_proto::logging::Output::Stdout);
    let config = match load(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("node: invalid config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn serve(config: svcbroker_node::Config) -> anyhow::Result<()> {
    // Before the port listens: a signal right after is a clean stop.
    let signal = svcbroker_proto::server::shutdown_signal();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    svcbroker_node::run(config, listener, signal).await?;
    Ok(())
}
