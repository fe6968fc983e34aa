//! `svcbroker unbind-service NAME BINDING`: an OSB unbind of the binding
//! with that name (or id), waited for when the broker works asynchronously.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use super::client::{Gateway, encode};
use super::progress::Progress;
use super::{CliError, print_json, str_of, write_stdout};
use crate::cli::UnbindServiceArgs;

/// Runs the command.
pub async fn run(args: UnbindServiceArgs) -> Result<(), CliError> {
    let gw = Gateway::new(&args.gateway)?;
    let instance = gw.instance(&args.name).await?;
    let bindings = instance
        .get("bindings")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let binding = bindings
        .iter()
        .find(|b| str_of(b, "id") == args.binding)
        .or_else(|| {
            let named: Vec<&Value> = bindings
                .iter()
                .filter(|b| str_of(b, "name") == args.binding)
                .collect();
            (named.len() == 1).then(|| named[0])
        })
        .ok_or_else(|| {
            let named = bindings
                .iter()
                .filter(|b| str_of(b, "name") == args.binding)
                .count();
            if named > 1 {
                CliError::Failed(format!(
                    "{named} bindings of '{}' are named '{}'; use a binding id",
                    args.name, args.binding
                ))
            } else {
                CliError::NotFound(format!(
                    "service instance '{}' has no binding '{}' (svcbroker service {} lists them)",
                    args.name, args.binding, args.name
                ))
            }
        })?;
    unbind(
        &gw,
        &instance,
        binding,
        Duration::from_secs(args.timeout),
        args.gateway.json,
    )
    .await?;
    if args.gateway.json {
        return print_json(&json!({
            "instance_id": instance.get("id"),
            "instance_name": instance.get("name"),
            "binding_id": binding.get("id"),
            "binding_name": binding.get("name"),
            "deleted": true,
        }));
    }
    write_stdout(&format!(
        "Deleted binding {} of service instance {}\n",
        args.binding, args.name
    ))
}

/// Deletes one binding (an admin API binding object) of `instance` and
/// waits until it is gone.
pub async fn unbind(
    gw: &Gateway,
    instance: &Value,
    binding: &Value,
    timeout: Duration,
    json: bool,
) -> Result<(), CliError> {
    let binding_id = str_of(binding, "id");
    let path = format!(
        "/v2/service_instances/{}/service_bindings/{}",
        encode(str_of(instance, "id")),
        encode(binding_id)
    );
    let query = format!(
        "service_id={}&plan_id={}",
        encode(str_of(instance, "service_id")),
        encode(str_of(instance, "plan_id"))
    );
    let label = match str_of(binding, "name") {
        "" => format!("Unbinding {binding_id}"),
        n => format!("Unbinding {n}"),
    };
    let mut progress = Progress::start(&label, json);
    let result = async {
        let r = gw
            .send(
                Method::DELETE,
                &format!("{path}?{query}&accepts_incomplete=true"),
                None,
            )
            .await?;
        match r.status {
            // 410: it was already gone, which is what was asked for.
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
            _ => Err(match r.error("deleting the binding") {
                CliError::NotFound(m) => CliError::Failed(m),
                e => e,
            }),
        }
    }
    .await;
    progress.conclude(result)
}
