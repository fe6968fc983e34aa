//! Prometheus `/metrics` on the OSB listener, without authentication: it
//! carries no secrets and no instance ids, only counts by service, plan,
//! state, action, route template and node id.
//!
//! The exposition is written by hand: a few counters and one histogram do
//! not justify another dependency, and the text format is small and stable.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::engine::Engine;

/// Upper bounds (seconds) of the operation latency buckets.
const BUCKETS: [f64; 11] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Inner {
    /// (action, outcome) -> finished operations.
    operations: BTreeMap<(String, String), u64>,
    /// action -> latency.
    latency: BTreeMap<String, Histogram>,
    /// (method, route template, status) -> requests.
    http: BTreeMap<(String, String, u16), u64>,
}

/// Counters kept in memory since start (Prometheus handles resets).
#[derive(Default, Clone)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Counters stay usable after a panic elsewhere.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a finished operation and how long it took.
    pub fn operation_finished(&self, action: &str, outcome: &str, seconds: f64) {
        let mut inner = self.lock();
        *inner
            .operations
            .entry((action.to_owned(), outcome.to_owned()))
            .or_default() += 1;
        let h = inner.latency.entry(action.to_owned()).or_default();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// Records an HTTP request answered on a route.
    pub fn http_request(&self, method: &str, route: &str, status: u16) {
        *self
            .lock()
            .http
            .entry((method.to_owned(), route.to_owned(), status))
            .or_default() += 1;
    }
}

/// Middleware counting requests by route template (never the raw path,
/// which holds instance ids). Installed as a route layer, so requests no
/// route matches are not counted.
pub async fn count_requests(
    State(engine): State<Arc<Engine>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let response = next.run(req).await;
    engine
        .metrics()
        .http_request(&method, &route, response.status().as_u16());
    response
}

/// `GET /metrics`.
pub async fn metrics(State(engine): State<Arc<Engine>>) -> Response {
    match render(&engine).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot render metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Escapes a label value for the text format.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

async fn render(engine: &Engine) -> Result<String, crate::Error> {
    let mut out = String::new();

    header(
        &mut out,
        "svcbroker_instances",
        "gauge",
        "Service instances by service, plan and state.",
    );
    for (service, plan, state, n) in engine.store().instance_counts().await? {
        let _ = writeln!(
            out,
            "svcbroker_instances{{service_id=\"{}\",plan_id=\"{}\",state=\"{}\"}} {n}",
            esc(&service),
            esc(&plan),
            esc(&state)
        );
    }

    {
        let inner = engine.metrics().lock();
        header(
            &mut out,
            "svcbroker_operations_total",
            "counter",
            "Finished operations by action and outcome.",
        );
        for ((action, outcome), n) in &inner.operations {
            let _ = writeln!(
                out,
                "svcbroker_operations_total{{action=\"{}\",outcome=\"{}\"}} {n}",
                esc(action),
                esc(outcome)
            );
        }
        header(
            &mut out,
            "svcbroker_operation_duration_seconds",
            "histogram",
            "Time from an operation's start to its end, by action.",
        );
        for (action, h) in &inner.latency {
            let a = esc(action);
            for (bound, n) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "svcbroker_operation_duration_seconds_bucket{{action=\"{a}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "svcbroker_operation_duration_seconds_bucket{{action=\"{a}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "svcbroker_operation_duration_seconds_sum{{action=\"{a}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "svcbroker_operation_duration_seconds_count{{action=\"{a}\"}} {}",
                h.count
            );
        }
        header(
            &mut out,
            "svcbroker_http_requests_total",
            "counter",
            "HTTP requests by method, route template and status.",
        );
        for ((method, route, status), n) in &inner.http {
            let _ = writeln!(
                out,
                "svcbroker_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {n}",
                esc(method),
                esc(route)
            );
        }
    }

    let nodes = engine.registry().snapshot();
    for (name, help) in [
        (
            "svcbroker_node_up",
            "1 when the node announced itself within the timeout.",
        ),
        (
            "svcbroker_node_capacity",
            "Instances the node accepts in total.",
        ),
        (
            "svcbroker_node_used",
            "Instances the node holds, as it last said.",
        ),
    ] {
        header(&mut out, name, "gauge", help);
        for (info, up) in &nodes {
            let value = match name {
                "svcbroker_node_up" => u32::from(*up),
                "svcbroker_node_capacity" => info.capacity,
                _ => info.used,
            };
            let _ = writeln!(out, "{name}{{node_id=\"{}\"}} {value}", esc(&info.node_id));
        }
    }

    let r = engine.reconcile_stats();
    header(
        &mut out,
        "svcbroker_reconcile_total",
        "counter",
        "Reconciliation events by kind.",
    );
    for (kind, n) in [
        ("passes", r.passes),
        ("reprovisioned", r.reprovisioned),
        ("rebound", r.rebound),
        ("orphans_removed", r.orphans_removed),
        ("failed_seen", r.failed_seen),
    ] {
        let _ = writeln!(out, "svcbroker_reconcile_total{{kind=\"{kind}\"}} {n}");
    }
    Ok(out)
}
