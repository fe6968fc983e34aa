//! `allocator`: serves `svcbroker.v1.Allocator` until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;

/// Exit code for bad flags or configuration (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

/// Leases ports and issues credentials for svcbroker.
///
/// Settings come from the config file, then the environment
/// (SVCBROKER_ALLOCATOR_LISTEN, SVCBROKER_ALLOCATOR_DB, SVCBROKER_TOKEN), then these flags.
#[derive(Debug, Parser)]
#[command(name = "allocator", version)]
struct Cli {
    /// YAML config file (keys: listen, db_path, token).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to serve gRPC on, e.g. 127.0.0.1:50051.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// SQLite database file (created with mode 0600).
    #[arg(long, value_name = "PATH")]
    db: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; bad flags are bad config.
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    svcbroker_proto::logging::init(svcbroker_proto::logging::Output::Stdout);

    let config = match load(cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("allocator: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(cli: Cli) -> Result<svcbroker_allocator::Config, svcbroker_allocator::ConfigError> {
    let mut config = svcbroker_allocator::load_config(cli.config.as_deref())?;
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(db) = cli.db {
        config.db_path = db;
    }
    config.validate()?;
    Ok(config)
}

async fn serve(config: svcbroker_allocator::Config) -> anyhow::Result<()> {
    // Before the port listens: a signal right after is a clean stop.
    let signal = svcbroker_proto::server::shutdown_signal();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    svcbroker_allocator::run(config, listener, signal).await?;
    Ok(())
}
