//! `svcbroker bench`: N concurrent clients running full OSB lifecycles
//! (provision, bind, unbind, deprovision) against a running gateway, with
//! latency per call kind, errors by status, peak RSS of each component, and
//! the host's physical baselines (durable SQLite commits/s, redis-server
//! spawn-to-PONG) to which the broker's figures are compared.
//!
//! It is a benchmark, not a test: it reports and checks the issue's
//! targets, and exits 0 whether they are met or not.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Map, Value, json};

use super::CliError;
use super::client::{Gateway, encode, find_plan, find_service};
use crate::cli::BenchArgs;

mod baseline;
mod rss;
mod stats;

use rss::Components;
use stats::{Recorded, Recorder, Summary, round};

/// How often an asynchronous operation's state is asked for.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// An operation not over by then counts as an error ("timeout").
const OP_TIMEOUT: Duration = Duration::from_secs(900);
/// Requests per kind when measuring catalog and last_operation at a scale.
const PROBES: usize = 500;
/// The scale at which catalog and last_operation are first measured.
const SMALL_SCALE: usize = 100;
/// How often the components' memory is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// The targets.
const LIFECYCLE_TARGET_RATIO: f64 = 0.25;
const COMMITS_PER_LIFECYCLE: f64 = 4.0;
const REDIS_PROVISION_SLACK_MS: f64 = 15.0;
const RSS_LIMIT_MB: f64 = 30.0;
const RSS_TARGET_INSTANCES: usize = 10_000;

/// Runs the benchmark and prints its report.
pub async fn run(args: BenchArgs) -> Result<(), CliError> {
    if args.concurrency == 0 {
        return Err(CliError::Usage("--concurrency must be at least 1".into()));
    }
    let gw = Gateway::new(&args.gateway)?;
    let target = Target::resolve(&gw, &args).await?;
    let ctx = Arc::new(Ctx {
        gw,
        asynchronous: AtomicBool::new(target.asynchronous),
        target,
    });
    let port = local_port(&args.gateway.url);
    let components = Arc::new(Mutex::new(match port {
        Some(p) => Components::discover(p),
        None => Components {
            note: Some("the gateway is not on this host".into()),
            ..Components::default()
        },
    }));

    let baseline_dir = args
        .baseline_dir
        .clone()
        .or_else(|| components.lock().ok()?.gateway_db_dir.clone())
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    let mut baselines = Baselines::measure(baseline_dir).await;

    let sampler = tokio::spawn(sample(Arc::clone(&components), port));
    let load = lifecycles(&ctx, args.concurrency, Duration::from_secs(args.seconds)).await;
    let scale = if args.instances > 0 {
        Some(
            scale(
                &ctx,
                &components,
                args.instances,
                args.concurrency,
                args.keep,
            )
            .await,
        )
    } else {
        None
    };
    sampler.abort();
    // Again after the load: a disk shared with other work syncs at a
    // varying rate, and the ratio is to the mean of both.
    baselines.measure_commits_again().await;
    let components = {
        let mut c = components.lock().map(|c| c.clone()).unwrap_or_default();
        c.sample();
        c
    };

    let report = Report {
        args: &args,
        target: &ctx.target,
        asynchronous: ctx.is_async(),
        load,
        scale,
        components,
        baselines,
    };
    if args.gateway.json {
        super::print_json(&report.to_json())
    } else {
        super::write_stdout(&report.to_text())
    }
}

/// The service and plan the lifecycles use, and how they are called.
#[derive(Debug)]
struct Target {
    service_id: String,
    service_name: String,
    plan_id: String,
    plan_name: String,
    /// --async: accepts_incomplete=true and polling from the start.
    asynchronous: bool,
    bindable: bool,
}

impl Target {
    async fn resolve(gw: &Gateway, args: &BenchArgs) -> Result<Target, CliError> {
        let services = gw.services().await?;
        let service = find_service(&services, &args.service).ok_or_else(|| {
            CliError::NotFound(format!(
                "no service '{}' in the catalog (svcbroker services lists them)",
                args.service
            ))
        })?;
        let plan = match &args.plan {
            Some(p) => find_plan(service, p).ok_or_else(|| {
                CliError::NotFound(format!("service '{}' has no plan '{p}'", args.service))
            })?,
            None => service
                .get("plans")
                .and_then(Value::as_array)
                .and_then(|p| p.first())
                .ok_or_else(|| {
                    CliError::NotFound(format!("service '{}' has no plans", args.service))
                })?,
        };
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let flag = |v: &Value, k: &str| v.get(k).and_then(Value::as_bool);
        Ok(Target {
            service_id: text(service, "id"),
            service_name: text(service, "name"),
            plan_id: text(plan, "id"),
            plan_name: text(plan, "name"),
            asynchronous: args.asynchronous,
            bindable: flag(plan, "bindable")
                .or_else(|| flag(service, "bindable"))
                .unwrap_or(false),
        })
    }
}

/// What every client shares.
struct Ctx {
    gw: Gateway,
    target: Target,
    /// Sends accepts_incomplete=true: --async, or since the broker
    /// answered 422 AsyncRequired (the catalog does not say so up front).
    asynchronous: AtomicBool,
}

/// The error of a call the plan only accepts asynchronously.
const ASYNC_REQUIRED: &str = "422 AsyncRequired";

/// Why a call did not succeed: an HTTP status, "transport", "failed" (the
/// operation ended failed) or "timeout".
type CallError = String;

impl Ctx {
    /// The query string of deletes and polls.
    fn ids_query(&self) -> String {
        format!(
            "service_id={}&plan_id={}",
            encode(&self.target.service_id),
            encode(&self.target.plan_id)
        )
    }

    fn is_async(&self) -> bool {
        self.asynchronous.load(Ordering::Relaxed)
    }

    fn incomplete(&self) -> &'static str {
        if self.is_async() {
            "accepts_incomplete=true"
        } else {
            "accepts_incomplete=false"
        }
    }

    /// Runs one state-changing call and, when answered 202, polls
    /// `resource/last_operation` until the operation is over. The latency
    /// recorded under `kind` is the whole wait.
    async fn call(
        &self,
        rec: &Recorder,
        kind: &'static str,
        method: Method,
        resource: &str,
        body: Option<Value>,
    ) -> Result<(), CallError> {
        let start = Instant::now();
        let mut result = self
            .call_untimed(method.clone(), resource, body.as_ref())
            .await;
        if matches!(&result, Err(s) if s == ASYNC_REQUIRED) {
            self.asynchronous.store(true, Ordering::Relaxed);
            result = self.call_untimed(method, resource, body.as_ref()).await;
        }
        match &result {
            Ok(()) => rec.call(kind, start.elapsed()),
            Err(status) => rec.error(kind, status),
        }
        result
    }

    async fn call_untimed(
        &self,
        method: Method,
        resource: &str,
        body: Option<&Value>,
    ) -> Result<(), CallError> {
        let query = if method == Method::DELETE {
            format!("{}&{}", self.incomplete(), self.ids_query())
        } else {
            self.incomplete().to_owned()
        };
        let r = self
            .gw
            .send(method, &format!("{resource}?{query}"), body)
            .await
            .map_err(|_| "transport".to_owned())?;
        match r.status {
            200 | 201 => Ok(()),
            202 => {
                let op = r.body.get("operation").and_then(Value::as_str);
                self.poll(resource, op).await
            }
            422 if r.body.get("error").and_then(Value::as_str) == Some("AsyncRequired") => {
                Err(ASYNC_REQUIRED.into())
            }
            s => Err(s.to_string()),
        }
    }

    /// Waits for the operation on `resource` to end; 410 means a delete
    /// finished.
    async fn poll(&self, resource: &str, op: Option<&str>) -> Result<(), CallError> {
        let mut query = self.ids_query();
        if let Some(op) = op {
            query.push_str(&format!("&operation={}", encode(op)));
        }
        let path = format!("{resource}/last_operation?{query}");
        let deadline = Instant::now() + OP_TIMEOUT;
        while Instant::now() < deadline {
            tokio::time::sleep(POLL_INTERVAL).await;
            let Ok(r) = self.gw.send(Method::GET, &path, None).await else {
                continue;
            };
            match (r.status, r.body.get("state").and_then(Value::as_str)) {
                (410, _) | (200, Some("succeeded")) => return Ok(()),
                (200, Some("failed")) => return Err("failed".into()),
                (200, _) => {}
                // The gateway restarting or busy: the operation goes on.
                (s, _) if s >= 500 => {}
                (s, _) => return Err(format!("last_operation {s}")),
            }
        }
        Err("timeout".into())
    }

    fn provision_body(&self) -> Value {
        json!({
            "service_id": self.target.service_id,
            "plan_id": self.target.plan_id,
            "organization_guid": "svcbroker-bench",
            "space_guid": "svcbroker-bench",
            "context": {"platform": "svcbroker-bench"},
        })
    }

    fn bind_body(&self) -> Value {
        json!({
            "service_id": self.target.service_id,
            "plan_id": self.target.plan_id,
            "context": {"platform": "svcbroker-bench"},
        })
    }

    async fn provision(&self, rec: &Recorder, id: &str) -> Result<(), CallError> {
        let body = Some(self.provision_body());
        self.call(rec, "provision", Method::PUT, &instance_path(id), body)
            .await
    }

    async fn deprovision(&self, rec: &Recorder, id: &str) -> Result<(), CallError> {
        self.call(rec, "deprovision", Method::DELETE, &instance_path(id), None)
            .await
    }

    /// One full lifecycle; on an error it still tries to leave nothing
    /// behind (unbind, deprovision), and does not count.
    async fn lifecycle(&self, rec: &Recorder) {
        let id = new_id();
        if self.provision(rec, &id).await.is_err() {
            let _ = self.deprovision(rec, &id).await;
            return;
        }
        let mut ok = true;
        if self.target.bindable {
            let binding = format!("{}/service_bindings/{}", instance_path(&id), new_id());
            let body = Some(self.bind_body());
            ok = self
                .call(rec, "bind", Method::PUT, &binding, body)
                .await
                .is_ok();
            ok &= self
                .call(rec, "unbind", Method::DELETE, &binding, None)
                .await
                .is_ok();
        }
        ok &= self.deprovision(rec, &id).await.is_ok();
        if ok {
            rec.lifecycle();
        }
    }
}

fn instance_path(id: &str) -> String {
    format!("/v2/service_instances/{id}")
}

/// Ids the bench creates: recognisable, URL-safe, unique.
fn new_id() -> String {
    format!("bench-{}", uuid::Uuid::new_v4().simple())
}

/// The lifecycle phase's results.
struct Load {
    recorded: Recorded,
    elapsed: Duration,
}

/// `concurrency` clients run lifecycles back to back for `seconds`; the
/// ones in flight then finish. The rate is over the whole time.
async fn lifecycles(ctx: &Arc<Ctx>, concurrency: usize, seconds: Duration) -> Load {
    let rec = Arc::new(Recorder::default());
    let start = Instant::now();
    let stop_at = start + seconds;
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (ctx, rec) = (Arc::clone(ctx), Arc::clone(&rec));
        clients.push(tokio::spawn(async move {
            while Instant::now() < stop_at {
                ctx.lifecycle(&rec).await;
            }
        }));
    }
    let progress = tokio::spawn(report_progress(Arc::clone(&rec), start));
    for c in clients {
        let _ = c.await;
    }
    progress.abort();
    let elapsed = start.elapsed();
    let recorded = rec.snapshot();
    eprintln!(
        "bench: {} lifecycles in {:.1} s, {} errors",
        recorded.lifecycles,
        elapsed.as_secs_f64(),
        recorded.error_total()
    );
    Load { recorded, elapsed }
}

/// A line per second on stderr while the lifecycles run.
async fn report_progress(rec: Arc<Recorder>, start: Instant) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = rec.snapshot();
        let s = start.elapsed().as_secs_f64();
        eprintln!(
            "bench: {s:.0} s: {} lifecycles ({:.1}/s), {} errors",
            r.lifecycles,
            r.lifecycles as f64 / s,
            r.error_total()
        );
    }
}

/// Reads the components' memory until aborted, looking again for the ones
/// not found yet (the gateway connects to the allocator and node lazily).
async fn sample(components: Arc<Mutex<Components>>, port: Option<u16>) {
    let mut tick = 0u64;
    loop {
        tokio::time::sleep(SAMPLE_EVERY).await;
        tick += 1;
        let Ok(mut c) = components.lock() else {
            return;
        };
        if tick.is_multiple_of(4)
            && !c.complete()
            && let Some(p) = port
        {
            c.merge(Components::discover(p));
        }
        c.sample();
    }
}

/// The scale phase's results.
struct Scale {
    instances: usize,
    provisioned: usize,
    small: Probes,
    large: Probes,
    /// Memory with `instances` provisioned.
    components_at_n: Value,
    provision_errors: Recorded,
}

/// catalog and last_operation latency at one scale.
struct Probes {
    catalog: Option<Summary>,
    last_operation: Option<Summary>,
    errors: u64,
}

/// Provisions instances up to `n`, measuring at 100 and at `n`, then
/// deprovisions them unless `keep`.
async fn scale(
    ctx: &Arc<Ctx>,
    components: &Arc<Mutex<Components>>,
    n: usize,
    concurrency: usize,
    keep: bool,
) -> Scale {
    let rec = Arc::new(Recorder::default());
    let ids = Arc::new(Mutex::new(Vec::<String>::with_capacity(n)));
    populate(ctx, &rec, &ids, SMALL_SCALE.min(n), concurrency).await;
    let small = probe(ctx, &ids).await;
    populate(ctx, &rec, &ids, n, concurrency).await;
    let large = probe(ctx, &ids).await;
    let components_at_n = components
        .lock()
        .map(|mut c| {
            c.sample();
            c.to_json()
        })
        .unwrap_or(Value::Null);
    let all: Vec<String> = ids.lock().map(|v| v.clone()).unwrap_or_default();
    let provisioned = all.len();
    if !keep {
        remove(ctx, all, concurrency).await;
    }
    Scale {
        instances: n,
        provisioned,
        small,
        large,
        components_at_n,
        provision_errors: rec.snapshot(),
    }
}

/// Provisions until `ids` holds `n` instances (attempts are capped, so a
/// broker refusing every request ends the phase). Each client claims a
/// slot before it provisions, so that exactly `n` are made.
async fn populate(
    ctx: &Arc<Ctx>,
    rec: &Arc<Recorder>,
    ids: &Arc<Mutex<Vec<String>>>,
    n: usize,
    concurrency: usize,
) {
    let have = ids.lock().map(|v| v.len()).unwrap_or(n);
    let todo = n.saturating_sub(have);
    let slots = Arc::new(AtomicUsize::new(todo));
    let attempts = Arc::new(AtomicUsize::new(0));
    let max_attempts = todo + todo / 10 + 10;
    let start = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..concurrency.min(todo) {
        let (ctx, rec, ids) = (Arc::clone(ctx), Arc::clone(rec), Arc::clone(ids));
        let (slots, attempts) = (Arc::clone(&slots), Arc::clone(&attempts));
        clients.push(tokio::spawn(async move {
            while slots
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| s.checked_sub(1))
                .is_ok()
            {
                if attempts.fetch_add(1, Ordering::SeqCst) >= max_attempts {
                    return;
                }
                let id = new_id();
                if ctx.provision(&rec, &id).await.is_err() {
                    slots.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                if let Ok(mut v) = ids.lock() {
                    v.push(id);
                    if v.len().is_multiple_of(1000) {
                        eprintln!(
                            "bench: {} instances provisioned ({:.0} s)",
                            v.len(),
                            start.elapsed().as_secs_f64()
                        );
                    }
                }
            }
        }));
    }
    for c in clients {
        let _ = c.await;
    }
}

/// Times catalog and last_operation requests one at a time (latency, not
/// queueing), last_operation on instances picked across all of them.
async fn probe(ctx: &Ctx, ids: &Mutex<Vec<String>>) -> Probes {
    let ids: Vec<String> = ids.lock().map(|v| v.clone()).unwrap_or_default();
    eprintln!(
        "bench: probing catalog and last_operation at {} instances",
        ids.len()
    );
    let mut catalog = Vec::with_capacity(PROBES);
    let mut last_op = Vec::with_capacity(PROBES);
    let mut errors = 0;
    for i in 0..PROBES {
        let start = Instant::now();
        match ctx.gw.send(Method::GET, "/v2/catalog", None).await {
            Ok(r) if r.status == 200 => catalog.push(start.elapsed()),
            _ => errors += 1,
        }
        if ids.is_empty() {
            continue;
        }
        // A stride through the ids, so that lookups are spread over the table.
        let id = &ids[(i * 7919) % ids.len()];
        let path = format!("{}/last_operation?{}", instance_path(id), ctx.ids_query());
        let start = Instant::now();
        match ctx.gw.send(Method::GET, &path, None).await {
            Ok(r) if r.status == 200 => last_op.push(start.elapsed()),
            _ => errors += 1,
        }
    }
    Probes {
        catalog: Summary::of(&catalog),
        last_operation: Summary::of(&last_op),
        errors,
    }
}

/// Deprovisions the scale phase's instances.
async fn remove(ctx: &Arc<Ctx>, ids: Vec<String>, concurrency: usize) {
    eprintln!("bench: deprovisioning {} instances", ids.len());
    let queue = Arc::new(Mutex::new(ids));
    let rec = Arc::new(Recorder::default());
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let (ctx, queue, rec) = (Arc::clone(ctx), Arc::clone(&queue), Arc::clone(&rec));
        clients.push(tokio::spawn(async move {
            while let Some(id) = queue.lock().ok().and_then(|mut q| q.pop()) {
                let _ = ctx.deprovision(&rec, &id).await;
            }
        }));
    }
    for c in clients {
        let _ = c.await;
    }
    let left = rec.snapshot().error_total();
    if left > 0 {
        eprintln!("bench: {left} instances could not be deprovisioned (ids start with bench-)");
    }
}

/// The host's physical baselines; an `Err` says why one could not be taken.
struct Baselines {
    dir: std::path::PathBuf,
    /// The mean of `commit_runs`.
    commits_per_s: Result<f64, String>,
    /// Durable commits/s before and after the load.
    commit_runs: Vec<f64>,
    /// As the shipped redis service starts an instance (AOF on).
    spawn_to_pong_ms: Result<f64, String>,
    /// With no persistence: the bare process start.
    spawn_to_pong_bare_ms: Result<f64, String>,
}

impl Baselines {
    async fn measure(dir: std::path::PathBuf) -> Baselines {
        eprintln!(
            "bench: measuring durable SQLite commits/s in {} and redis-server spawn-to-PONG",
            dir.display()
        );
        let commits_per_s = baseline::sqlite_commits_per_s(dir.clone()).await;
        let spawn_to_pong_ms =
            baseline::redis_spawn_to_pong_ms(baseline::RedisPersistence::Aof).await;
        let spawn_to_pong_bare_ms =
            baseline::redis_spawn_to_pong_ms(baseline::RedisPersistence::None).await;
        Baselines {
            dir,
            commit_runs: commits_per_s.iter().copied().collect(),
            commits_per_s,
            spawn_to_pong_ms,
            spawn_to_pong_bare_ms,
        }
    }

    async fn measure_commits_again(&mut self) {
        if self.commits_per_s.is_err() {
            return;
        }
        eprintln!("bench: measuring durable SQLite commits/s again");
        if let Ok(c) = baseline::sqlite_commits_per_s(self.dir.clone()).await {
            self.commit_runs.push(c);
            self.commits_per_s =
                Ok(self.commit_runs.iter().sum::<f64>() / self.commit_runs.len() as f64);
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "sqlite_dir": self.dir.display().to_string(),
            "sqlite_durable_commits_per_s": or_why(self.commits_per_s.as_ref().map(|c| round(*c))),
            "sqlite_durable_commits_per_s_before_after": self.commit_runs.iter().map(|c| round(*c)).collect::<Vec<_>>(),
            "redis_spawn_to_pong_ms": or_why(self.spawn_to_pong_ms.as_ref().map(|c| round(*c))),
            "redis_spawn_to_pong_no_persistence_ms": or_why(self.spawn_to_pong_bare_ms.as_ref().map(|c| round(*c))),
        })
    }
}

/// A figure, or `{"unavailable": why}`.
fn or_why(r: Result<f64, &String>) -> Value {
    match r {
        Ok(v) => json!(v),
        Err(why) => json!({ "unavailable": why }),
    }
}

/// Everything the run found, for JSON and text.
struct Report<'a> {
    args: &'a BenchArgs,
    target: &'a Target,
    /// Whether calls were asynchronous (by --async or the broker's 422).
    asynchronous: bool,
    load: Load,
    scale: Option<Scale>,
    components: Components,
    baselines: Baselines,
}

/// The call kinds of a lifecycle, in order.
const CALLS: [&str; 4] = ["provision", "bind", "unbind", "deprovision"];

impl Report<'_> {
    fn lifecycles_per_s(&self) -> f64 {
        self.load.recorded.lifecycles as f64 / self.load.elapsed.as_secs_f64().max(1e-9)
    }

    fn ratios(&self) -> Map<String, Value> {
        let mut out = Map::new();
        if let Ok(c) = &self.baselines.commits_per_s {
            let bound = c / COMMITS_PER_LIFECYCLE;
            out.insert(
                "lifecycles_per_s_vs_commit_bound".into(),
                json!(round(self.lifecycles_per_s() / bound)),
            );
        }
        if let (Ok(spawn), Some(p)) = (
            &self.baselines.spawn_to_pong_ms,
            self.load.recorded.summary("provision"),
        ) {
            out.insert(
                "provision_p50_vs_spawn_to_pong".into(),
                json!(round(p.p50_ms / spawn)),
            );
            out.insert(
                "provision_p50_minus_spawn_to_pong_ms".into(),
                json!(round(p.p50_ms - spawn)),
            );
        }
        out
    }

    /// The targets that apply to this run: name, figure, limit,
    /// met.
    fn targets(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let service = self.target.service_name.as_str();
        if service == "echo"
            && let Ok(c) = &self.baselines.commits_per_s
        {
            let need = LIFECYCLE_TARGET_RATIO * c / COMMITS_PER_LIFECYCLE;
            out.push(target(
                "echo lifecycles/s >= 25% of (durable commits/s / 4)",
                self.lifecycles_per_s(),
                need,
                self.lifecycles_per_s() >= need,
            ));
        }
        if service == "redis"
            && let (Ok(spawn), Some(p)) = (
                &self.baselines.spawn_to_pong_ms,
                self.load.recorded.summary("provision"),
            )
        {
            let limit = spawn + REDIS_PROVISION_SLACK_MS;
            out.push(target(
                "redis provision p50 ms <= spawn-to-PONG + 15 ms",
                p.p50_ms,
                limit,
                p.p50_ms <= limit,
            ));
        }
        if let Some(s) = &self.scale {
            out.extend(self.scale_targets(s));
        }
        out
    }

    fn scale_targets(&self, s: &Scale) -> Vec<Value> {
        let mut out = Vec::new();
        if s.instances >= RSS_TARGET_INSTANCES {
            // The peak up to the moment N instances were provisioned and
            // probed (the cleanup's own peak is in "components").
            let at_n = s.components_at_n.as_object().into_iter().flatten();
            for (name, c) in at_n.filter(|(_, c)| c["visible"] == true) {
                let peak = c["peak_rss_mb"].as_f64().unwrap_or(f64::INFINITY);
                out.push(target(
                    &format!("{name} peak RSS MB with {} instances <= 30", s.instances),
                    peak,
                    RSS_LIMIT_MB,
                    peak <= RSS_LIMIT_MB,
                ));
            }
        }
        if s.instances > SMALL_SCALE {
            let pairs = [
                ("catalog", s.small.catalog, s.large.catalog),
                (
                    "last_operation",
                    s.small.last_operation,
                    s.large.last_operation,
                ),
            ];
            for (what, small, large) in pairs {
                if let (Some(a), Some(b)) = (small, large) {
                    let limit = flat_limit(a.p99_ms);
                    out.push(target(
                        &format!(
                            "{what} p99 ms at {} instances unchanged from {SMALL_SCALE}",
                            s.instances
                        ),
                        b.p99_ms,
                        limit,
                        b.p99_ms <= limit,
                    ));
                }
            }
        }
        out
    }

    fn to_json(&self) -> Value {
        let r = &self.load.recorded;
        let mut calls = Map::new();
        for kind in CALLS {
            if let Some(s) = r.summary(kind) {
                calls.insert(kind.into(), s.to_json());
            }
        }
        json!({
            "service": self.target.service_name,
            "plan": self.target.plan_name,
            "asynchronous": self.asynchronous,
            "concurrency": self.args.concurrency,
            "seconds": round(self.load.elapsed.as_secs_f64()),
            "lifecycles": r.lifecycles,
            "lifecycles_per_s": round(self.lifecycles_per_s()),
            "calls": calls,
            "errors": {"total": r.error_total(), "by_call_and_status": r.errors},
            "components": self.components.to_json(),
            "baselines": self.baselines.to_json(),
            "ratios": self.ratios(),
            "scale": self.scale.as_ref().map(Scale::to_json),
            "targets": self.targets(),
        })
    }

    fn to_text(&self) -> String {
        let r = &self.load.recorded;
        let mut t = format!(
            "service {} plan {} ({}), {} clients, {:.1} s\n\
             lifecycles: {} ({:.2}/s), errors: {}\n",
            self.target.service_name,
            self.target.plan_name,
            if self.asynchronous { "async" } else { "sync" },
            self.args.concurrency,
            self.load.elapsed.as_secs_f64(),
            r.lifecycles,
            self.lifecycles_per_s(),
            r.error_total(),
        );
        for (what, n) in &r.errors {
            t.push_str(&format!("  error {what}: {n}\n"));
        }
        t.push_str("latency (ms)       count      p50      p99      max\n");
        for kind in CALLS {
            if let Some(s) = r.summary(kind) {
                t.push_str(&summary_line(kind, s));
            }
        }
        t.push_str("memory\n");
        t.push_str(&components_text(&self.components.to_json()));
        t.push_str(&format!(
            "baselines (scratch database in {})\n  durable SQLite commits/s: {} (before, after: {:?})\n  \
             redis-server spawn-to-PONG ms: {} (AOF on, as the redis service; no persistence: {})\n",
            self.baselines.dir.display(),
            figure(&self.baselines.commits_per_s),
            self.baselines.commit_runs.iter().map(|c| round(*c)).collect::<Vec<_>>(),
            figure(&self.baselines.spawn_to_pong_ms),
            figure(&self.baselines.spawn_to_pong_bare_ms),
        ));
        t.push_str("ratios\n");
        for (k, v) in self.ratios() {
            t.push_str(&format!("  {k}: {v}\n"));
        }
        if let Some(s) = &self.scale {
            t.push_str(&s.to_text());
        }
        t.push_str("targets\n");
        for x in self.targets() {
            t.push_str(&format!(
                "  [{}] {}: {} (limit {})\n",
                if x["met"] == true { "met" } else { "MISSED" },
                x["name"].as_str().unwrap_or(""),
                x["value"],
                x["limit"],
            ));
        }
        t
    }
}

/// "Unchanged" p99 at scale: within 50% or 2 ms of the small-scale p99,
/// whichever is larger (a shared 2-core machine jitters by that much).
fn flat_limit(small_p99_ms: f64) -> f64 {
    (small_p99_ms * 1.5).max(small_p99_ms + 2.0)
}

fn target(name: &str, value: f64, limit: f64, met: bool) -> Value {
    json!({"name": name, "value": round(value), "limit": round(limit), "met": met})
}

fn figure(r: &Result<f64, String>) -> String {
    match r {
        Ok(v) => format!("{v:.1}"),
        Err(why) => format!("unavailable ({why})"),
    }
}

fn summary_line(kind: &str, s: Summary) -> String {
    format!(
        "  {kind:<16}{:>7}{:>9.1}{:>9.1}{:>9.1}\n",
        s.count, s.p50_ms, s.p99_ms, s.max_ms
    )
}

fn components_text(json: &Value) -> String {
    let mut t = String::new();
    for (name, c) in json.as_object().into_iter().flatten() {
        if c["visible"] == true {
            t.push_str(&format!(
                "  {name:<14} pid {:<8} peak RSS {} MB (now {} MB, lifetime high {} MB)\n",
                c["pid"], c["peak_rss_mb"], c["rss_mb"], c["hwm_mb"]
            ));
        } else {
            t.push_str(&format!(
                "  {name:<14} not visible: {}\n",
                c["why"].as_str().unwrap_or("")
            ));
        }
    }
    t
}

impl Scale {
    fn to_json(&self) -> Value {
        json!({
            "instances": self.instances,
            "provisioned": self.provisioned,
            "provision_errors": self.provision_errors.errors,
            "provision": self.provision_errors.summary("provision").map(Summary::to_json),
            "at_100": self.small.to_json(),
            "at_n": self.large.to_json(),
            "components_at_n": self.components_at_n,
        })
    }

    fn to_text(&self) -> String {
        let mut t = format!(
            "scale: {} of {} instances provisioned\n",
            self.provisioned, self.instances
        );
        if let Some(s) = self.provision_errors.summary("provision") {
            t.push_str(&summary_line("provision", s));
        }
        for (label, p) in [
            (SMALL_SCALE.to_string(), &self.small),
            (self.instances.to_string(), &self.large),
        ] {
            t.push_str(&format!("  at {label} instances ({} errors)\n", p.errors));
            if let Some(s) = p.catalog {
                t.push_str(&summary_line("  catalog", s));
            }
            if let Some(s) = p.last_operation {
                t.push_str(&summary_line("  last_operation", s));
            }
        }
        t.push_str(&format!("  memory at {} instances\n", self.instances));
        t.push_str(&components_text(&self.components_at_n));
        t
    }
}

impl Probes {
    fn to_json(&self) -> Value {
        json!({
            "catalog": self.catalog.map(Summary::to_json),
            "last_operation": self.last_operation.map(Summary::to_json),
            "errors": self.errors,
        })
    }
}

/// The gateway's port when its URL names this host (loopback, localhost
/// or an address of this machine is assumed for any IP literal that
/// something here listens on; discovery then checks).
fn local_port(url: &str) -> Option<u16> {
    let rest = url.trim().strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            (h, p.parse::<u16>().ok()?)
        }
        _ => (authority, 80),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let local = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified());
    local.then_some(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_ports_from_urls() {
        assert_eq!(local_port("http://127.0.0.1:8080"), Some(8080));
        assert_eq!(local_port("http://localhost:9000/"), Some(9000));
        assert_eq!(local_port("http://[::1]:8081"), Some(8081));
        assert_eq!(local_port("http://127.0.0.1"), Some(80));
        assert_eq!(local_port("http://broker.example:8080"), None);
    }

    #[test]
    fn flat_limit_allows_jitter() {
        assert_eq!(flat_limit(1.0), 3.0);
        assert_eq!(flat_limit(10.0), 15.0);
    }
}
