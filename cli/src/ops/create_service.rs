//! `svcbroker create-service SERVICE NAME [--plan PLAN] [-c ...]`: an OSB
//! provision with a fresh instance id and the name in the `context`, then
//! waiting for `last_operation` with a progress display.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use super::client::{Done, Gateway, PLATFORM, encode, find_plan, find_service};
use super::progress::Progress;
use super::{CliError, check_name, parse_params, print_json, str_of, write_stdout};
use crate::cli::CreateServiceArgs;

/// Runs the command.
pub async fn run(args: CreateServiceArgs) -> Result<(), CliError> {
    check_name("instance", &args.name)?;
    let parameters = parse_params(&args.config)?;
    let gw = Gateway::new(&args.gateway)?;
    let services = gw.services().await?;
    let service = find_service(&services, &args.service).ok_or_else(|| {
        CliError::NotFound(format!(
            "no service '{}' in the catalog (svcbroker services lists them)",
            args.service
        ))
    })?;
    let plan = match &args.plan {
        Some(p) => find_plan(service, p).ok_or_else(|| {
            CliError::NotFound(format!(
                "service '{}' has no plan '{p}' (plans: {})",
                str_of(service, "name"),
                plan_names(service)
            ))
        })?,
        None => service
            .get("plans")
            .and_then(Value::as_array)
            .and_then(|ps| ps.first())
            .ok_or_else(|| {
                CliError::Failed(format!(
                    "service '{}' has no plans",
                    str_of(service, "name")
                ))
            })?,
    };
    // Names are the CLI's handle on instances, so one name is one
    // instance. (Checked, not enforced: another client could race us.)
    match gw.instance(&args.name).await {
        Err(CliError::NotFound(_)) => {}
        Ok(_) => {
            return Err(CliError::Failed(format!(
                "a service instance named '{}' already exists",
                args.name
            )));
        }
        Err(e) => return Err(e),
    }

    let id = uuid::Uuid::new_v4().to_string();
    let service_id = str_of(service, "id");
    let plan_id = str_of(plan, "id");
    let body = json!({
        "service_id": service_id,
        "plan_id": plan_id,
        "context": { "platform": PLATFORM, "instance_name": args.name },
        // REQUIRED by OSB (deprecated in favour of context); the CLI has no
        // organizations or spaces, so it names itself.
        "organization_guid": PLATFORM,
        "space_guid": PLATFORM,
        "parameters": parameters,
    });
    let mut progress = Progress::start(
        &format!(
            "Creating service {} ({} {})",
            args.name,
            str_of(service, "name"),
            str_of(plan, "name")
        ),
        args.gateway.json,
    );
    let path = format!("/v2/service_instances/{}", encode(&id));
    let result = async {
        let r = gw
            .send(
                Method::PUT,
                &format!("{path}?accepts_incomplete=true"),
                Some(&body),
            )
            .await?;
        match r.status {
            200 | 201 => Ok(()),
            202 => {
                let mut query = format!(
                    "service_id={}&plan_id={}",
                    encode(service_id),
                    encode(plan_id)
                );
                if let Some(op) = r.body.get("operation").and_then(Value::as_str) {
                    query.push_str(&format!("&operation={}", encode(op)));
                }
                let done = gw
                    .wait(
                        &format!("{path}/last_operation"),
                        &query,
                        &mut progress,
                        Duration::from_secs(args.timeout),
                    )
                    .await?;
                if done == Done::Gone {
                    return Err(CliError::Failed(
                        "the instance was deleted while it was being created".into(),
                    ));
                }
                Ok(())
            }
            // A refused request is an operation that failed (the catalog
            // and the name were fine): exit 1, with the broker's reason.
            _ => Err(match r.error("creating the service instance") {
                CliError::NotFound(m) => CliError::Failed(m),
                e => e,
            }),
        }
    }
    .await;
    progress.conclude(result)?;

    if args.gateway.json {
        let instance = gw.instance(&id).await?;
        return print_json(&instance);
    }
    write_stdout(&format!(
        "Created service instance {} (id {id}) of {} plan {}\n",
        args.name,
        str_of(service, "name"),
        str_of(plan, "name")
    ))
}

fn plan_names(service: &Value) -> String {
    service
        .get("plans")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .map(|p| str_of(p, "name"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}
