//! `svcbroker bind-service NAME [--binding-name B] [-c ...]`: an OSB bind
//! with a fresh binding id (the name goes in the `context`), waiting for it
//! when the broker works asynchronously, then printing the credentials.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use super::client::{Done, Gateway, PLATFORM, encode, find_service};
use super::progress::Progress;
use super::table::Table;
use super::{CliError, check_name, parse_params, print_json, scalar_text, str_of, write_stdout};
use crate::cli::BindServiceArgs;

/// Runs the command.
pub async fn run(args: BindServiceArgs) -> Result<(), CliError> {
    if let Some(b) = &args.binding_name {
        check_name("binding", b)?;
    }
    let parameters = parse_params(&args.config)?;
    let gw = Gateway::new(&args.gateway)?;
    let instance = gw.instance(&args.name).await?;
    if let Some(b) = &args.binding_name {
        let taken = instance
            .get("bindings")
            .and_then(Value::as_array)
            .is_some_and(|bs| bs.iter().any(|x| str_of(x, "name") == b));
        if taken {
            return Err(CliError::Failed(format!(
                "service instance '{}' already has a binding named '{b}'",
                args.name
            )));
        }
    }
    let instance_id = str_of(&instance, "id").to_owned();
    let service_id = str_of(&instance, "service_id").to_owned();
    let plan_id = str_of(&instance, "plan_id").to_owned();
    let services = gw.services().await?;
    // Asynchronous binding needs a fetchable binding to get the credentials
    // afterwards; otherwise the synchronous answer carries them.
    let retrievable = find_service(&services, &service_id)
        .and_then(|s| s.get("bindings_retrievable"))
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let binding_id = uuid::Uuid::new_v4().to_string();
    let mut context = json!({ "platform": PLATFORM, "instance_name": instance.get("name") });
    if let (Some(b), Value::Object(m)) = (&args.binding_name, &mut context) {
        m.insert("binding_name".into(), json!(b));
    }
    let body = json!({
        "service_id": service_id,
        "plan_id": plan_id,
        "context": context,
        "parameters": parameters,
    });
    let path = format!(
        "/v2/service_instances/{}/service_bindings/{}",
        encode(&instance_id),
        encode(&binding_id)
    );
    let label = match &args.binding_name {
        Some(b) => format!("Binding {b} to {}", args.name),
        None => format!("Binding {}", args.name),
    };
    let mut progress = Progress::start(&label, args.gateway.json);
    let result = async {
        let r = gw
            .send(
                Method::PUT,
                &format!("{path}?accepts_incomplete={retrievable}"),
                Some(&body),
            )
            .await?;
        match r.status {
            200 | 201 => Ok(r.body),
            202 => {
                let mut query = format!(
                    "service_id={}&plan_id={}",
                    encode(&service_id),
                    encode(&plan_id)
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
                        "the binding was deleted while it was being created".into(),
                    ));
                }
                gw.get(&path, "fetching the new binding").await
            }
            _ => Err(match r.error("binding the service instance") {
                CliError::NotFound(m) => CliError::Failed(m),
                e => e,
            }),
        }
    }
    .await;
    let answer = progress.conclude(result)?;
    let credentials = answer.get("credentials").cloned().unwrap_or(json!({}));

    if args.gateway.json {
        let mut out = json!({
            "instance_id": instance_id,
            "instance_name": instance.get("name"),
            "binding_id": binding_id,
            "binding_name": args.binding_name,
            "credentials": credentials,
        });
        if let (Some(v), Value::Object(m)) = (answer.get("volume_mounts"), &mut out) {
            m.insert("volume_mounts".into(), v.clone());
        }
        return print_json(&out);
    }
    write_stdout(&render(
        args.binding_name.as_deref(),
        &binding_id,
        &credentials,
    ))
}

fn render(name: Option<&str>, id: &str, credentials: &Value) -> String {
    let mut t = Table::new(&["What", "Value"]);
    let label = match name {
        Some(n) => format!("binding {n} ({id})"),
        None => format!("binding {id}"),
    };
    t.row(&["credentials", label.as_str()]);
    if let Value::Object(c) = credentials {
        let mut keys: Vec<_> = c.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        for (k, v) in keys {
            t.row(&[format!("- {k}"), scalar_text(v)]);
        }
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sorted_credentials() {
        let out = render(
            Some("app"),
            "b1",
            &json!({"port": 1, "host": "h", "password": "p"}),
        );
        assert!(out.contains("| credentials | binding app (b1) |"), "{out}");
        let h = out.find("- host").unwrap();
        let pw = out.find("- password").unwrap();
        let p = out.find("- port").unwrap();
        assert!(h < pw && pw < p, "{out}");
    }
}
