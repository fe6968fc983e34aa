//! `svcbroker`: the all-in-one local stack (`up`) and the operator CLI
//! (`services`, `create-service`, `service`, `bind-service`,
//! `unbind-service`, `delete-service`, `nodes`, `healthcheck`, `bench`). Parsing and
//! dispatch only; each subcommand lives in its module.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod ops;
mod shipped;
mod up;

/// Exit code of `up` for bad flags or configuration (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;
/// Exit code of the operator commands for bad flags or arguments (the
/// convention scripts expect from a CLI, and clap's own).
const EXIT_OPERATOR_USAGE: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; bad flags are bad config.
            return if !e.use_stderr() {
                ExitCode::SUCCESS
            } else if invoked_up() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::from(EXIT_OPERATOR_USAGE)
            };
        }
    };
    let cli::Command::Up(up) = args.command else {
        return operator(args.command).await;
    };
    // `up` holds the node in this process: the shared set-up keeps
    // tokio-postgres's statement logs (role password verifiers) out.
    svcbroker_proto::logging::init(svcbroker_proto::logging::Output::Stderr);
    match up::run(up).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svcbroker: {e:#}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs an operator command; its errors go to stderr with the exit code
/// `--help` documents.
async fn operator(command: cli::Command) -> ExitCode {
    let result = match command {
        cli::Command::Up(_) => unreachable!("`up` is dispatched by main"),
        cli::Command::Services(a) => ops::services::run(a).await,
        cli::Command::CreateService(a) => ops::create_service::run(a).await,
        cli::Command::Service(a) => ops::service::run(a).await,
        cli::Command::BindService(a) => ops::bind_service::run(a).await,
        cli::Command::UnbindService(a) => ops::unbind_service::run(a).await,
        cli::Command::DeleteService(a) => ops::delete_service::run(a).await,
        cli::Command::Nodes(a) => ops::nodes::run(a).await,
        cli::Command::Healthcheck(a) => ops::healthcheck::run(a).await,
        cli::Command::Bench(a) => ops::bench::run(a).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svcbroker: {}", ops::progress::sanitize(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}

/// Returns true when the subcommand on the command line is `up` (the first
/// argument that is not a flag), whose bad flags keep their exit code 64.
fn invoked_up() -> bool {
    std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .is_some_and(|a| a == "up")
}
