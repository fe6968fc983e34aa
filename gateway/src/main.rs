//! The `gateway` binary: flags, config, tracing, listeners, then
//! [`svcbroker_gateway::run`] until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use svcbroker_gateway::{Config, load_config};

/// Exit code for an unusable configuration (EX_CONFIG-like, per conventions).
const EXIT_CONFIG: u8 = 64;

/// Open Service Broker API gateway of svcbroker.
#[derive(Debug, Parser)]
#[command(name = "gateway", version)]
struct Flags {
    /// YAML config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// OSB REST listen address (overrides http_listen).
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// Registry gRPC listen address (overrides grpc_listen).
    #[arg(long)]
    grpc: Option<std::net::SocketAddr>,
    /// SQLite database file (overrides db_path).
    #[arg(long)]
    db: Option<PathBuf>,
    /// Directory of service definitions (overrides services_dir).
    #[arg(long)]
    services_dir: Option<PathBuf>,
    /// Allocator gRPC URL (overrides allocator_url).
    #[arg(long)]
    allocator: Option<String>,
}

fn config_from(flags: &Flags) -> Result<Config, svcbroker_gateway::ConfigError> {
    let mut config = load_config(flags.config.as_deref())?;
    if let Some(a) = flags.http {
        config.http_listen = a;
    }
    if let Some(a) = flags.grpc {
        config.grpc_listen = a;
    }
    if let Some(d) = &flags.db {
        config.db_path = d.clone();
    }
    if let Some(d) = &flags.services_dir {
        config.services_dir = d.clone();
    }
    if let Some(u) = &flags.allocator {
        config.allocator_url = u.clone();
    }
    config.validate()?;
    config.require_credentials()?;
    Ok(config)
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    svcbroker_proto::logging::init(svcbroker_proto::logging::Output::Stdout);
    let config = match config_from(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Before the port listens: a signal right after is a clean stop.
    let signal = svcbroker_proto::server::shutdown_signal();
    let http = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_listen))?;
    let grpc = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.grpc_listen))?;
    svcbroker_gateway::run(config, http, grpc, signal).await?;
    Ok(())
}
