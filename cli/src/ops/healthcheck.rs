//! `svcbroker healthcheck URL [--service NAME]`: one
//! `grpc.health.v1.Health/Check` call (open without the bearer token), for
//! container health checks: exit 0 when SERVING, 1 otherwise, all within
//! 3 seconds.

use std::time::Duration;

use serde_json::json;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::client::error_chain;
use super::{CliError, print_json, write_stdout};
use crate::cli::HealthcheckArgs;

/// The whole check (connect and call) must finish within this.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the command.
pub async fn run(args: HealthcheckArgs) -> Result<(), CliError> {
    let endpoint = Endpoint::from_shared(args.url.clone())
        .map_err(|e| CliError::Usage(format!("invalid URL {:?}: {e}", args.url)))?
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT);
    let status = match tokio::time::timeout(TIMEOUT, check(endpoint, &args.service)).await {
        Ok(Ok(s)) => s,
        Ok(Err((status, message))) => return Err(report(&args, status, &message)),
        Err(_) => {
            return Err(report(
                &args,
                "UNREACHABLE",
                &format!("no answer within {} s", TIMEOUT.as_secs()),
            ));
        }
    };
    if status == ServingStatus::Serving {
        if args.json {
            return print_json(&json!({ "status": status.as_str_name() }));
        }
        return write_stdout(&format!("{}: {}\n", args.url, status.as_str_name()));
    }
    Err(report(&args, status.as_str_name(), "not serving"))
}

/// Asks once; a failure is (status word, message).
async fn check(endpoint: Endpoint, service: &str) -> Result<ServingStatus, (&'static str, String)> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| ("UNREACHABLE", error_chain(&e)))?;
    let mut client = HealthClient::new(channel);
    let resp = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|s| {
            // The health service answers NOT_FOUND for a service it does
            // not know (grpc.health.v1's SERVICE_UNKNOWN).
            let word = if s.code() == tonic::Code::NotFound {
                "SERVICE_UNKNOWN"
            } else {
                "ERROR"
            };
            (word, format!("{:?}: {}", s.code(), s.message()))
        })?;
    Ok(ServingStatus::try_from(resp.into_inner().status).unwrap_or(ServingStatus::Unknown))
}

/// Prints the outcome of a failed check (as JSON with `--json`) and
/// returns the exit-1 error carrying the message.
fn report(args: &HealthcheckArgs, status: &str, message: &str) -> CliError {
    if args.json {
        let _ = print_json(&json!({ "status": status, "message": message }));
    }
    CliError::Failed(format!("{}: {status}: {message}", args.url))
}
