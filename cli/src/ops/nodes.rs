//! `svcbroker nodes`: the gateway's node registry
//! (Id | Address | State | Services | Capacity used/total | Last seen).

use serde_json::Value;

use super::client::Gateway;
use super::table::{Table, banner};
use super::{CliError, print_json, scalar_text, str_of, write_stdout};
use crate::cli::NodesArgs;

/// Runs the command.
pub async fn run(args: NodesArgs) -> Result<(), CliError> {
    let gw = Gateway::new(&args.gateway)?;
    let body = gw.get("/admin/v1/nodes", "listing nodes").await?;
    let nodes = body
        .get("nodes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if args.gateway.json {
        return print_json(&Value::Array(nodes));
    }
    write_stdout(&render(&nodes))
}

fn render(nodes: &[Value]) -> String {
    let mut t = Table::new(&[
        "Id",
        "Address",
        "State",
        "Services",
        "Capacity used/total",
        "Last seen",
    ]);
    for n in nodes {
        let services = n
            .get("services")
            .and_then(Value::as_array)
            .map(|s| s.iter().map(scalar_text).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        let capacity = match n.get("capacity").filter(|c| !c.is_null()) {
            Some(c) => format!(
                "{}/{}",
                n.get("used").map(scalar_text).unwrap_or_default(),
                scalar_text(c)
            ),
            None => format!("{}/?", n.get("used").map(scalar_text).unwrap_or_default()),
        };
        let seen = n
            .get("last_seen_ms_ago")
            .and_then(Value::as_u64)
            .map(ago)
            .unwrap_or_else(|| "never".to_owned());
        t.row(&[
            str_of(n, "node_id"),
            str_of(n, "grpc_url"),
            str_of(n, "state"),
            &services,
            &capacity,
            &seen,
        ]);
    }
    format!("{}\n{}", banner("Service Nodes"), t.render())
}

/// "3s ago", "2m ago", "1h ago".
fn ago(ms: u64) -> String {
    let s = ms / 1000;
    if s < 120 {
        format!("{s}s ago")
    } else if s < 7200 {
        format!("{}m ago", s / 60)
    } else {
        format!("{}h ago", s / 3600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_nodes() {
        let out = render(&[
            json!({"node_id": "node-a", "grpc_url": "http://a:50052", "state": "up",
                   "services": ["echo", "redis"], "capacity": 100, "used": 3,
                   "last_seen_ms_ago": 1500}),
            json!({"node_id": "gone", "grpc_url": null, "state": "unknown", "services": [],
                   "capacity": null, "used": 2, "last_seen_ms_ago": null}),
        ]);
        assert!(
            out.contains("| node-a | http://a:50052 | up      | echo, redis | 3/100               | 1s ago    |"),
            "{out}"
        );
        assert!(out.contains("| gone   |"), "{out}");
        assert!(out.contains("| 2/?  "), "{out}");
        assert!(out.contains("never"), "{out}");
    }

    #[test]
    fn ages() {
        assert_eq!(ago(0), "0s ago");
        assert_eq!(ago(119_999), "119s ago");
        assert_eq!(ago(600_000), "10m ago");
        assert_eq!(ago(7_200_000), "2h ago");
    }
}
