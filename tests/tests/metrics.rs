//! Observability: Prometheus `/metrics` on the gateway's HTTP listener
//! (valid exposition text that changes when instances are created, without
//! authentication and without instance ids), and the OSB request id in the
//! allocator's and node's logs.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use svcbroker_tests::fixtures::echo;
use svcbroker_tests::{NODE_ID, Stack, new_id, provision_body};

/// Samples by `name{labels}` (labels as written), checking every line
/// against the text exposition format on the way.
fn parse(text: &str) -> HashMap<String, f64> {
    let is_name = |s: &str| {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut samples = HashMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, value) = (parts.next(), parts.next(), parts.next());
            match kind {
                Some("HELP") => assert!(name.is_some_and(is_name), "{line}"),
                Some("TYPE") => {
                    assert!(name.is_some_and(is_name), "{line}");
                    assert!(
                        matches!(
                            value,
                            Some("counter" | "gauge" | "histogram" | "summary" | "untyped")
                        ),
                        "{line}"
                    );
                }
                _ => {}
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                    assert!(is_name(k), "label name {k:?}: {line}");
                    assert!(
                        !v.trim_end_matches('"').contains('"') || v.contains("\\\""),
                        "{line}"
                    );
                }
                name
            }
            None => series,
        };
        assert!(is_name(name), "metric name {name:?}: {line}");
        samples.insert(series.to_owned(), value);
    }
    samples
}

async fn scrape(stack: &Stack) -> (String, HashMap<String, f64>) {
    // No credentials: Prometheus scrapes without them.
    let r = reqwest::get(format!("{}/metrics", stack.http_url))
        .await
        .expect("GET /metrics");
    assert_eq!(r.status(), 200);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(ct.starts_with("text/plain"), "{ct}");
    let text = r.text().await.expect("body");
    let samples = parse(&text);
    (text, samples)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_change_when_instances_are_created() {
    let stack = Stack::start_default().await;
    let instances = format!(
        "svcbroker_instances{{service_id=\"{}\",plan_id=\"{}\",state=\"ready\"}}",
        echo::SERVICE,
        echo::PLAN_FREE
    );
    let ops = "svcbroker_operations_total{action=\"provision\",outcome=\"succeeded\"}";
    let node_up = format!("svcbroker_node_up{{node_id=\"{NODE_ID}\"}}");

    let (_, before) = scrape(&stack).await;
    assert_eq!(before.get(&instances), None);

    let mut ids = Vec::new();
    for _ in 0..2 {
        let id = new_id();
        let r = stack
            .osb
            .provision(
                &id,
                &provision_body(echo::SERVICE, echo::PLAN_FREE, json!({})),
                true,
            )
            .await;
        assert!(r.status == 201 || r.status == 202, "{}", r.status);
        let (state, last) = stack
            .osb
            .wait_instance(&id, r.operation().as_deref(), Duration::from_secs(60))
            .await;
        assert_eq!(state, "succeeded", "{last}");
        ids.push(id);
    }

    let (text, after) = scrape(&stack).await;
    assert_eq!(after.get(&instances), Some(&2.0), "{text}");
    assert!(after.get(ops).is_some_and(|n| *n >= 2.0), "{text}");
    assert!(
        after
            .get("svcbroker_operation_duration_seconds_count{action=\"provision\"}")
            .is_some_and(|n| *n >= 2.0),
        "{text}"
    );
    assert_eq!(after.get(&node_up), Some(&1.0), "{text}");
    assert!(
        text.contains("svcbroker_http_requests_total{method=\"PUT\",route=\"/v2/service_instances/{instance_id}\""),
        "{text}"
    );
    assert!(
        text.contains("svcbroker_reconcile_total{kind=\"passes\"}"),
        "{text}"
    );
    for id in &ids {
        assert!(
            !text.contains(id.as_str()),
            "instance id in metrics: {text}"
        );
    }
}

/// Everything the in-process services log, for the request id test.
static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn request_id_reaches_allocator_and_node_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(|| Capture)
        .try_init();
    let stack = Stack::start_default().await;
    let id = new_id();
    let request_id = format!("req-{}", new_id());
    let r = svcbroker_tests::Osb::send(
        stack
            .osb
            .request(
                reqwest::Method::PUT,
                &format!("/v2/service_instances/{id}?accepts_incomplete=true"),
            )
            .header("X-Broker-API-Request-Identity", &request_id)
            .json(&provision_body(echo::SERVICE, echo::PLAN_FREE, json!({}))),
    )
    .await;
    assert!(r.status == 201 || r.status == 202, "{}", r.status);
    let (state, last) = stack
        .osb
        .wait_instance(&id, r.operation().as_deref(), Duration::from_secs(60))
        .await;
    assert_eq!(state, "succeeded", "{last}");

    let logs =
        String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    let tagged: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(&format!("request_id={request_id}")))
        .collect();
    assert!(
        tagged
            .iter()
            .any(|l| l.contains("/svcbroker.v1.Allocator/")),
        "no allocator log line with the request id:\n{logs}"
    );
    assert!(
        tagged
            .iter()
            .any(|l| l.contains("/svcbroker.v1.NodeAgent/")),
        "no node log line with the request id:\n{logs}"
    );
}
