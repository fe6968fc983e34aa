//! `svcbroker`: the all-in-one local stack (`up`) and, later, the operator
//! CLI. Parsing and dispatch only; each subcommand lives in its module.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod shipped;
mod up;

/// Exit code for bad flags or configuration (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match args.command {
        cli::Command::Up(up) => up::run(up).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svcbroker: {e:#}");
            ExitCode::from(e.exit_code())
        }
    }
}
