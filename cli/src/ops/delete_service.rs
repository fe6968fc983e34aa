//! `svcbroker delete-service NAME [--force]`: an OSB deprovision, waited
//! for until `last_operation` says the instance is gone. An instance with
//! bindings is refused (apps may still use it) unless `--force`, which
//! deletes the bindings first.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use super::client::{Gateway, encode};
use super::progress::Progress;
use super::unbind_service::unbind;
use super::{CliError, print_json, str_of, write_stdout};
use crate::cli::DeleteServiceArgs;

/// Runs the command.
pub async fn run(args: DeleteServiceArgs) -> Result<(), CliError> {
    let gw = Gateway::new(&args.gateway)?;
    let instance = gw.instance(&args.name).await?;
    let timeout = Duration::from_secs(args.timeout);
    let bindings: Vec<Value> = instance
        .get("bindings")
        .and_then(Value::as_array)
        .map(|bs| {
            bs.iter()
                .filter(|b| str_of(b, "state") != "failed")
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    if !bindings.is_empty() && !args.force {
        return Err(CliError::Failed(format!(
            "service instance '{}' has {} binding(s); unbind them first, or use --force",
            args.name,
            bindings.len()
        )));
    }
    for b in &bindings {
        unbind(&gw, &instance, b, timeout, args.gateway.json).await?;
    }

    let id = str_of(&instance, "id");
    let path = format!("/v2/service_instances/{}", encode(id));
    let query = format!(
        "service_id={}&plan_id={}",
        encode(str_of(&instance, "service_id")),
        encode(str_of(&instance, "plan_id"))
    );
    let mut progress = Progress::start(
        &format!("Deleting service {}", args.name),
        args.gateway.json,
    );
    let result = async {
        let r = gw
            .send(
                Method::DELETE,
                &format!("{path}?{query}&accepts_incomplete=true"),
                None,
            )
            .await?;
        match r.status {
            200 | 410 => Ok(()),
            202 => {
                let mut q = query.clone();
                if let Some(op) = r.body.get("operation").and_then(Value::as_str) {
                    q.push_str(&format!("&operation={}", encode(op)));
                }
                gw.wait(
                    &format!("{path}/last_operation"),
                    &q,
                    &mut progress,
                    timeout,
                )
                .await
                .map(|_| ())
            }
            _ => Err(match r.error("deleting the service instance") {
                CliError::NotFound(m) => CliError::Failed(m),
                e => e,
            }),
        }
    }
    .await;
    progress.conclude(result)?;
    if args.gateway.json {
        return print_json(&json!({
            "id": id,
            "name": instance.get("name"),
            "deleted": true,
        }));
    }
    write_stdout(&format!("Deleted service instance {}\n", args.name))
}
