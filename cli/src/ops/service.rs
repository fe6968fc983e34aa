//! `svcbroker service NAME`: one instance as the seed's `stackato service
//! mysearch1` table (What | Value): the credentials of each binding (OSB
//! fetch), meta data and properties.

use reqwest::Method;
use serde_json::{Map, Value, json};

use super::client::{Gateway, encode, find_plan, find_service};
use super::table::Table;
use super::{CliError, print_json, scalar_text, str_of, write_stdout};
use crate::cli::ServiceArgs;

/// Runs the command.
pub async fn run(args: ServiceArgs) -> Result<(), CliError> {
    let gw = Gateway::new(&args.gateway)?;
    let mut instance = gw.instance(&args.name).await?;
    let services = gw.services().await?;
    let service = find_service(&services, str_of(&instance, "service_id")).cloned();
    let id = str_of(&instance, "id").to_owned();
    let retrievable = |key: &str| {
        service
            .as_ref()
            .and_then(|s| s.get(key))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };

    // Parameters as OSB reports them (only a ready instance answers).
    let mut parameters = Value::Null;
    if retrievable("instances_retrievable") && str_of(&instance, "state") == "ready" {
        let r = gw
            .send(
                Method::GET,
                &format!("/v2/service_instances/{}", encode(&id)),
                None,
            )
            .await?;
        if r.ok() {
            parameters = r.body.get("parameters").cloned().unwrap_or(Value::Null);
        }
    }

    // Each ready binding's credentials, fetched the OSB way.
    if let Some(Value::Array(bindings)) = instance.get_mut("bindings") {
        for b in bindings.iter_mut() {
            if str_of(b, "state") != "ready" || !retrievable("bindings_retrievable") {
                continue;
            }
            let r = gw
                .send(
                    Method::GET,
                    &format!(
                        "/v2/service_instances/{}/service_bindings/{}",
                        encode(&id),
                        encode(str_of(b, "id"))
                    ),
                    None,
                )
                .await?;
            if r.ok()
                && let (Some(c), Value::Object(m)) = (r.body.get("credentials").cloned(), &mut *b)
            {
                m.insert("credentials".into(), c);
            } else if r.status == 401 {
                return Err(r.error("fetching a binding"));
            }
        }
    }

    if args.gateway.json {
        if let Value::Object(m) = &mut instance {
            m.insert("parameters".into(), parameters);
            m.insert(
                "service".into(),
                service.as_ref().map_or(Value::Null, |s| {
                    json!({
                        "name": s.get("name"),
                        "version": s.pointer("/metadata/version"),
                        "description": s.get("description"),
                        "tags": s.get("tags"),
                    })
                }),
            );
        }
        return print_json(&instance);
    }
    write_stdout(&render(&instance, service.as_ref(), &parameters))
}

/// The What | Value table, titled with the instance's name.
fn render(instance: &Value, service: Option<&Value>, parameters: &Value) -> String {
    let mut t = Table::new(&["What", "Value"]);
    let blank = |t: &mut Table| t.row(&["", ""]);

    let bindings = instance
        .get("bindings")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if bindings.is_empty() {
        t.row(&["credentials", "(no bindings: svcbroker bind-service)"]);
        blank(&mut t);
    }
    for b in &bindings {
        let label = match str_of(b, "name") {
            "" => format!("binding {}", str_of(b, "id")),
            n => format!("binding {n} ({})", str_of(b, "id")),
        };
        let label = match str_of(b, "state") {
            "ready" => label,
            s => format!("{label}, {s}"),
        };
        t.row(&["credentials", label.as_str()]);
        if let Some(Value::Object(c)) = b.get("credentials") {
            for (k, v) in sorted(c) {
                t.row(&[format!("- {k}"), scalar_text(v)]);
            }
        }
        blank(&mut t);
    }

    let plan_name = service
        .and_then(|s| find_plan(s, str_of(instance, "plan_id")))
        .map(|p| str_of(p, "name").to_owned())
        .unwrap_or_else(|| str_of(instance, "plan_id").to_owned());
    let tags = service
        .and_then(|s| s.get("tags"))
        .and_then(Value::as_array)
        .map(|ts| ts.iter().map(scalar_text).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    t.row(&["meta", ""]);
    t.row(&["- created", str_of(instance, "created_at")]);
    t.row(&["- updated", str_of(instance, "updated_at")]);
    t.row(&["- node_id", str_of(instance, "node_id")]);
    t.row(&["- plan", plan_name.as_str()]);
    t.row(&["- tags", tags.as_str()]);
    t.row(&["- version", str_of(instance, "maintenance_version")]);
    blank(&mut t);

    t.row(&["properties", ""]);
    t.row(&["id", str_of(instance, "id")]);
    t.row(&["state", super::services::state_text(instance).as_str()]);
    if let Some(o) = instance.get("observed").filter(|o| !o.is_null()) {
        let msg = str_of(o, "message");
        let text = if msg.is_empty() {
            format!("{} at {}", str_of(o, "state"), str_of(o, "at"))
        } else {
            format!("{} at {}: {msg}", str_of(o, "state"), str_of(o, "at"))
        };
        t.row(&["observed", text.as_str()]);
    }
    if let Some(op) = instance.get("last_operation").filter(|o| !o.is_null()) {
        let mut text = format!("{} {}", str_of(op, "action"), str_of(op, "state"));
        if let Some(d) = op.get("description").and_then(Value::as_str) {
            text.push_str(&format!(": {d}"));
        }
        t.row(&["operation", text.as_str()]);
    }
    t.row(&["tier", plan_name.as_str()]);
    t.row(&["type", str_of(instance, "kind")]);
    t.row(&[
        "vendor",
        service.map_or(str_of(instance, "service_id"), |s| str_of(s, "name")),
    ]);
    t.row(&[
        "version",
        service
            .and_then(|s| s.pointer("/metadata/version"))
            .map(scalar_text)
            .unwrap_or_default()
            .as_str(),
    ]);
    if let Value::Object(p) = parameters
        && !p.is_empty()
    {
        t.row(&["parameters", ""]);
        for (k, v) in sorted(p) {
            t.row(&[format!("- {k}"), scalar_text(v)]);
        }
    }
    let name = match str_of(instance, "name") {
        "" => str_of(instance, "id"),
        n => n,
    };
    format!("\n{}\n{}", super::progress::sanitize(name), t.render())
}

fn sorted(m: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_credentials_meta_and_properties() {
        let instance = json!({
            "id": "6652315d", "name": "mysearch1", "service_id": "s1", "plan_id": "p1",
            "node_id": "node-a", "state": "ready", "observed_state": "running",
            "observed": {"state": "running", "message": "", "at": "2025-01-01T00:00:00.000Z"},
            "kind": "process", "maintenance_version": "7.0.0",
            "created_at": "2025-01-01T00:00:00.000Z", "updated_at": "2025-01-01T00:00:01.000Z",
            "bindings": [{"id": "b1", "name": "app", "state": "ready",
                          "credentials": {"port": 10001, "host": "node-a"}}],
        });
        let service = json!({"id": "s1", "name": "redis", "tags": ["redis", "cache"],
            "metadata": {"version": "7"}, "plans": [{"id": "p1", "name": "small"}]});
        let out = render(&instance, Some(&service), &json!({"maxmemory": "64mb"}));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[1], "mysearch1");
        assert!(lines[3].starts_with("| What "), "{out}");
        for want in [
            "| credentials | binding app (b1)",
            "| - host      | node-a",
            "| - port      | 10001",
            "| - node_id   | node-a",
            "| - plan      | small",
            "| - tags      | redis cache",
            "| - version   | 7.0.0",
            "| vendor      | redis",
            "| version     | 7 ",
            "| - maxmemory | 64mb",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
        // host sorts before port.
        assert!(out.find("- host").unwrap() < out.find("- port").unwrap());
    }
}
