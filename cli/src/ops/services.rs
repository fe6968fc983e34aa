//! `svcbroker services`: the catalog as the seed's "System Services" table
//! (Service | Version | Description | Plans), or with `--instances` the
//! service instances (Name | Service | Plan | Node | State).

use serde_json::{Value, json};

use super::client::Gateway;
use super::table::{Table, banner};
use super::{CliError, print_json, scalar_text, str_of, write_stdout};
use crate::cli::ServicesArgs;

/// Runs the command.
pub async fn run(args: ServicesArgs) -> Result<(), CliError> {
    let gw = Gateway::new(&args.gateway)?;
    if args.instances {
        let body = gw
            .get("/admin/v1/instances", "listing service instances")
            .await?;
        let instances = body
            .get("instances")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if args.gateway.json {
            return print_json(&Value::Array(instances));
        }
        return write_stdout(&instances_table(&instances));
    }
    let services = gw.services().await?;
    if args.gateway.json {
        let out: Vec<Value> = services.iter().map(service_summary).collect();
        return print_json(&Value::Array(out));
    }
    write_stdout(&services_table(&services))
}

/// The catalog entry fields a script wants, plans reduced to theirs.
fn service_summary(s: &Value) -> Value {
    let plans: Vec<Value> = s
        .get("plans")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    json!({
                        "id": p.get("id"),
                        "name": p.get("name"),
                        "description": p.get("description"),
                        "free": p.get("free"),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "id": s.get("id"),
        "name": s.get("name"),
        "version": s.pointer("/metadata/version"),
        "description": s.get("description"),
        "tags": s.get("tags"),
        "bindable": s.get("bindable"),
        "plans": plans,
    })
}

fn services_table(services: &[Value]) -> String {
    let mut t = Table::new(&["Service", "Version", "Description", "Plans"]);
    let mut sorted: Vec<&Value> = services.iter().collect();
    sorted.sort_by_key(|s| str_of(s, "name").to_owned());
    for s in sorted {
        let plans: Vec<&str> = s
            .get("plans")
            .and_then(Value::as_array)
            .map(|ps| ps.iter().map(|p| str_of(p, "name")).collect())
            .unwrap_or_default();
        let version = s
            .pointer("/metadata/version")
            .map(scalar_text)
            .unwrap_or_default();
        t.row(&[
            str_of(s, "name"),
            &version,
            str_of(s, "description"),
            &plans.join(", "),
        ]);
    }
    format!("{}\n{}", banner("System Services"), t.render())
}

fn instances_table(instances: &[Value]) -> String {
    let mut t = Table::new(&["Name", "Service", "Plan", "Node", "State"]);
    for i in instances {
        let name = match str_of(i, "name") {
            "" => format!("({})", str_of(i, "id")),
            n => n.to_owned(),
        };
        let service = or_id(i, "service_name", "service_id");
        let plan = or_id(i, "plan_name", "plan_id");
        t.row(&[
            name.as_str(),
            service,
            plan,
            str_of(i, "node_id"),
            &state_text(i),
        ]);
    }
    format!("{}\n{}", banner("Provisioned Services"), t.render())
}

fn or_id<'a>(v: &'a Value, name: &str, id: &str) -> &'a str {
    match str_of(v, name) {
        "" => str_of(v, id),
        n => n,
    }
}

/// The instance's state, with what its node last reported when that says
/// something else than "running" (e.g. "ready (node: failed)").
pub fn state_text(i: &Value) -> String {
    let state = str_of(i, "state");
    match i.get("observed_state").and_then(Value::as_str) {
        Some(o) if o != "running" && state == "ready" => format!("{state} (node: {o})"),
        _ => state.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_table_lists_version_and_plans() {
        let out = services_table(&[
            json!({"name": "redis", "description": "Redis", "metadata": {"version": "7"},
                   "plans": [{"name": "small"}, {"name": "large"}]}),
            json!({"name": "echo", "description": "Echo", "metadata": {}, "plans": []}),
        ]);
        assert!(out.starts_with("============== System Services =============="));
        let echo = out.find("| echo").unwrap();
        let redis = out.find("| redis").unwrap();
        assert!(echo < redis, "sorted by name:\n{out}");
        assert!(
            out.contains("| redis   | 7       | Redis       | small, large |"),
            "{out}"
        );
    }

    #[test]
    fn instances_table_names_or_ids() {
        let out = instances_table(&[
            json!({"id": "i1", "name": "cache", "service_name": "redis", "plan_name": "small",
                   "node_id": "node-a", "state": "ready", "observed_state": "running"}),
            json!({"id": "i2", "name": null, "service_id": "s9", "plan_id": "p9",
                   "node_id": "node-b", "state": "ready", "observed_state": "failed"}),
        ]);
        assert!(
            out.contains("| cache | redis   | small | node-a | ready                |"),
            "{out}"
        );
        assert!(
            out.contains("| (i2)  | s9      | p9    | node-b | ready (node: failed) |"),
            "{out}"
        );
    }
}
