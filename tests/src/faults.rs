//! Harness of the fault test (`tests/faults.rs`): a platform-like OSB
//! client that retries as a platform would and records every answer, a
//! chaos driver that SIGKILLs and restarts the components of a
//! [`ProcStack`] at random moments, and the invariants checked once the
//! stack has settled.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;

use crate::models_support::{PROC_NODE_ID, ProcStack};
use crate::osb::{Resp, bind_body, percent_encode, provision_body};

/// Environment variable that fixes the chaos seed (to replay a failure).
pub const SEED_ENV: &str = "SVCBROKER_FAULT_SEED";

// ---- a seeded random source ----------------------------------------------------

/// SplitMix64: small, seedable and good enough to pick kill moments.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator started at `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A duration between `lo_ms` and `hi_ms`.
    pub fn millis(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(lo_ms + self.below(hi_ms - lo_ms + 1))
    }
}

/// The seed of this run: [`SEED_ENV`] when set, else a fresh one.
pub fn seed() -> u64 {
    if let Some(s) = std::env::var(SEED_ENV).ok().filter(|s| !s.is_empty()) {
        return s
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_ENV}={s} is not a number"));
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    Rng::new(nanos ^ u64::from(std::process::id())).next_u64() % 1_000_000_000
}

// ---- what the clients saw -----------------------------------------------------------

/// Counts of everything the clients saw, and what broke a promise.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// HTTP answers by "METHOD route status".
    pub answers: BTreeMap<String, u64>,
    /// Operations by "action service mode result".
    pub ops: BTreeMap<String, u64>,
    /// SIGKILLs by component.
    pub kills: BTreeMap<&'static str, u64>,
    /// Requests that found no gateway (refused or cut by a kill).
    pub refused_while_down: u64,
    /// 503 answers (each with `Retry-After`, else it is a violation).
    pub unavailable: u64,
    /// Invariants checked after the chaos.
    pub invariants_checked: u64,
    /// Broken promises.
    pub violations: Vec<String>,
}

/// The shared record of a run.
#[derive(Debug, Default)]
pub struct Ledger(Mutex<Tally>);

impl Ledger {
    fn with<T>(&self, f: impl FnOnce(&mut Tally) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Records a broken promise (also printed at once, with the time).
    pub fn violation(&self, what: String) {
        eprintln!("VIOLATION: {what}");
        self.with(|t| t.violations.push(what));
    }

    /// Records the end of an operation.
    pub fn op(&self, action: &str, service: &str, accepts: bool, result: &str) {
        let mode = if accepts { "async" } else { "sync" };
        self.with(|t| {
            *t.ops
                .entry(format!("{action} {service} {mode} {result}"))
                .or_default() += 1
        });
    }

    /// Records a SIGKILL of `component`.
    pub fn kill(&self, component: &'static str) {
        self.with(|t| *t.kills.entry(component).or_default() += 1);
    }

    /// Adds `n` checked invariants.
    pub fn checked(&self, n: u64) {
        self.with(|t| t.invariants_checked += n);
    }

    fn answer(&self, method: &Method, route: &str, status: u16) {
        self.with(|t| {
            *t.answers
                .entry(format!("{method} {route} {status}"))
                .or_default() += 1
        });
    }

    /// A copy of the tally.
    pub fn tally(&self) -> Tally {
        self.with(|t| t.clone())
    }
}

impl Tally {
    /// The end-of-run summary.
    pub fn summary(&self, seed: u64) -> String {
        let mut s = format!("fault test summary (seed {seed}, replay with {SEED_ENV}={seed})\n");
        let total: u64 = self.ops.values().sum();
        s += &format!("operations: {total}\n");
        for (k, n) in &self.ops {
            s += &format!("  {k}: {n}\n");
        }
        let kills: u64 = self.kills.values().sum();
        s += &format!("kills: {kills}\n");
        for (k, n) in &self.kills {
            s += &format!("  {k}: {n}\n");
        }
        s += &format!(
            "503 with Retry-After: {}\nrequests that found the gateway down: {}\n",
            self.unavailable, self.refused_while_down
        );
        s += "answers:\n";
        for (k, n) in &self.answers {
            s += &format!("  {k}: {n}\n");
        }
        s += &format!(
            "invariants checked: {}\nviolations: {}\n",
            self.invariants_checked,
            self.violations.len()
        );
        for v in &self.violations {
            s += &format!("  - {v}\n");
        }
        s
    }
}

/// What the chaos driver tells clients about the gateway, so that a
/// request that found no gateway can be told from one that failed while it
/// was up.
#[derive(Debug)]
pub struct GatewayWatch {
    kills: AtomicU64,
    up: AtomicBool,
}

impl Default for GatewayWatch {
    fn default() -> Self {
        GatewayWatch {
            kills: AtomicU64::new(0),
            up: AtomicBool::new(true),
        }
    }
}

impl GatewayWatch {
    fn snapshot(&self) -> (u64, bool) {
        (
            self.kills.load(Ordering::SeqCst),
            self.up.load(Ordering::SeqCst),
        )
    }
}

// ---- the services the clients use ---------------------------------------------

/// A service and plan of the catalog.
#[derive(Debug, Clone, Copy)]
pub struct Svc {
    pub name: &'static str,
    pub service_id: &'static str,
    pub plan_id: &'static str,
}

/// The shipped echo service (record only).
pub const ECHO: Svc = Svc {
    name: "echo",
    service_id: crate::fixtures::echo::SERVICE,
    plan_id: crate::fixtures::echo::PLAN_FREE,
};

/// The shipped redis service (a daemon per instance, an ACL user per binding).
pub const REDIS: Svc = Svc {
    name: "redis",
    service_id: crate::fixtures::redis::SERVICE,
    plan_id: crate::fixtures::redis::PLAN_SMALL,
};

/// How an operation ended, as the platform saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Succeeded,
    /// `failed`, with the broker's description.
    Failed(String),
    /// The instance or binding is gone (410): a delete's success.
    Gone,
    /// The client gave up (already recorded as a violation).
    Aborted,
}

// ---- a platform ------------------------------------------------------------------

/// Longest a platform keeps retrying one request.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);
/// Longest a platform waits for a `Retry-After` (kept short: the test is
/// about answers, not about waiting).
const MAX_RETRY_WAIT: Duration = Duration::from_secs(2);

/// An OSB client that behaves like a platform: it retries after
/// `Retry-After` on 503 and after connection errors, polls
/// `last_operation` after 202, and records every answer in the ledger.
#[derive(Clone)]
pub struct Platform {
    base: String,
    username: String,
    password: String,
    http: reqwest::Client,
    request_timeout: Duration,
    ledger: Arc<Ledger>,
    gateway: Arc<GatewayWatch>,
}

impl Platform {
    /// A client of `stack`'s gateway; a request with no answer within
    /// `request_timeout` (the gateway's own limit plus a margin) is a
    /// violation.
    pub fn new(
        stack: &ProcStack,
        request_timeout: Duration,
        ledger: Arc<Ledger>,
        gateway: Arc<GatewayWatch>,
    ) -> Platform {
        Platform {
            base: stack.http_url.clone(),
            username: stack.osb.username.clone(),
            password: stack.osb.password.clone(),
            // No idle connections are kept: a connection to a gateway
            // killed earlier would fail a request made while it is up.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(request_timeout)
                .build()
                .expect("http client"),
            request_timeout,
            ledger,
            gateway,
        }
    }

    /// The ledger this client records into.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// One attempt: the answer, or `None` when there was none (recorded).
    async fn attempt(
        &self,
        method: &Method,
        path: &str,
        body: Option<&Value>,
        route: &str,
    ) -> Option<Resp> {
        let (kills_before, up_before) = self.gateway.snapshot();
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .basic_auth(&self.username, Some(&self.password))
            .header("X-Broker-API-Version", crate::osb::API_VERSION);
        if let Some(b) = body {
            req = req.json(b);
        }
        let result = async {
            let r = req.send().await?;
            let status = r.status();
            let headers = r.headers().clone();
            let text = r.text().await?;
            Ok::<_, reqwest::Error>(Resp {
                status,
                headers,
                body: serde_json::from_str(&text).unwrap_or(Value::Null),
                text,
            })
        }
        .await;
        match result {
            Ok(r) => Some(r),
            Err(e) if e.is_timeout() => {
                self.ledger.violation(format!(
                    "{method} {route}: no answer within {:?} (the gateway must answer 503 \
                     before its request timeout)",
                    self.request_timeout
                ));
                None
            }
            Err(e) => {
                let (kills_after, up_after) = self.gateway.snapshot();
                if up_before && up_after && kills_before == kills_after {
                    self.ledger.violation(format!(
                        "{method} {route}: transport error while the gateway was up: {e}"
                    ));
                } else {
                    self.ledger.with(|t| t.refused_while_down += 1);
                }
                None
            }
        }
    }

    /// Sends until an answer that is not a 503, as a platform does; `None`
    /// when it gave up (recorded as a violation). Every 503 must carry
    /// `Retry-After` and a description; any other 5xx is a violation.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        route: &str,
    ) -> Option<Resp> {
        let deadline = Instant::now() + GIVE_UP_AFTER;
        while Instant::now() < deadline {
            let Some(r) = self.attempt(&method, path, body, route).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let status = r.status.as_u16();
            self.ledger.answer(&method, route, status);
            if status == 503 {
                self.ledger.with(|t| t.unavailable += 1);
                let wait = r
                    .header("retry-after")
                    .and_then(|v| v.trim().parse::<u64>().ok());
                let described = r.body["description"]
                    .as_str()
                    .is_some_and(|d| !d.is_empty());
                if wait.is_none() || !described {
                    self.ledger.violation(format!(
                        "{method} {route}: 503 without a Retry-After in seconds or a \
                         description: {:?} {}",
                        r.header("retry-after"),
                        r.text
                    ));
                }
                let wait = Duration::from_secs(wait.unwrap_or(1)).min(MAX_RETRY_WAIT);
                tokio::time::sleep(wait).await;
                continue;
            }
            if r.status.is_server_error() {
                // Returned, not retried: the caller's operation ends there
                // (a platform gives up on it and cleans up).
                self.ledger.violation(format!(
                    "{method} {route} {path}: {status} (only 503 may answer an outage): {}",
                    r.text
                ));
            }
            return Some(r);
        }
        self.ledger.violation(format!(
            "{method} {route} {path}: gave up after {GIVE_UP_AFTER:?} of retries"
        ));
        None
    }

    /// Polls a `last_operation` until the operation is no longer in progress.
    async fn wait(&self, path: &str, operation: Option<&str>, route: &str) -> End {
        let path = match operation {
            Some(op) => format!("{path}?operation={}", percent_encode(op)),
            None => path.to_string(),
        };
        let deadline = Instant::now() + GIVE_UP_AFTER;
        while Instant::now() < deadline {
            let Some(r) = self.request(Method::GET, &path, None, route).await else {
                return End::Aborted;
            };
            match (r.status.as_u16(), r.body["state"].as_str()) {
                (200, Some("in progress")) => {}
                (200, Some("succeeded")) => return End::Succeeded,
                (200, Some("failed")) => {
                    return End::Failed(r.body["description"].as_str().unwrap_or("").into());
                }
                (410, _) => return End::Gone,
                (s, _) => {
                    self.ledger
                        .violation(format!("GET {route} {path}: unexpected {s}: {}", r.text));
                    return End::Aborted;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.ledger.violation(format!(
            "GET {route} {path}: still in progress after {GIVE_UP_AFTER:?}"
        ));
        End::Aborted
    }

    /// Ends an operation answered with `r` (200/201 done, 202 polled,
    /// 410 gone when `gone_ok`), recording it.
    async fn finish(
        &self,
        r: Option<Resp>,
        last_op_path: &str,
        last_op_route: &str,
        ok: &[u16],
        what: (&str, &Svc, bool),
    ) -> End {
        let (action, svc, accepts) = what;
        let end = match r {
            None => End::Aborted,
            Some(r) if r.status.as_u16() == 202 => {
                let op = r.body["operation"].as_str().map(str::to_string);
                self.wait(last_op_path, op.as_deref(), last_op_route).await
            }
            Some(r) if r.status.as_u16() == 410 => End::Gone,
            Some(r) if ok.contains(&r.status.as_u16()) => End::Succeeded,
            Some(r) => {
                self.ledger.violation(format!(
                    "{action} {} ({}): unexpected {}: {}",
                    svc.name,
                    if accepts { "async" } else { "sync" },
                    r.status,
                    r.text
                ));
                End::Aborted
            }
        };
        let result = match &end {
            End::Succeeded => "succeeded",
            End::Failed(_) => "failed",
            End::Gone => "gone",
            End::Aborted => "aborted",
        };
        self.ledger.op(action, svc.name, accepts, result);
        end
    }

    /// Provisions instance `id` of `svc`.
    pub async fn provision(&self, svc: &Svc, id: &str, accepts: bool) -> End {
        let body = provision_body(svc.service_id, svc.plan_id, serde_json::json!({}));
        let q = if accepts {
            "?accepts_incomplete=true"
        } else {
            ""
        };
        let path = format!("/v2/service_instances/{id}");
        let r = self
            .request(Method::PUT, &format!("{path}{q}"), Some(&body), "instance")
            .await;
        let end = self
            .finish(
                r,
                &format!("{path}/last_operation"),
                "instance last_operation",
                &[200, 201],
                ("provision", svc, accepts),
            )
            .await;
        self.expect_not_gone("provision", id, end)
    }

    /// Binds `bid` to `id`; the binding's credentials when it succeeded.
    pub async fn bind(&self, svc: &Svc, id: &str, bid: &str, accepts: bool) -> Option<Value> {
        let body = bind_body(svc.service_id, svc.plan_id);
        let q = if accepts {
            "?accepts_incomplete=true"
        } else {
            ""
        };
        let path = format!("/v2/service_instances/{id}/service_bindings/{bid}");
        let r = self
            .request(Method::PUT, &format!("{path}{q}"), Some(&body), "binding")
            .await;
        let answered = r.as_ref().and_then(|r| {
            (matches!(r.status.as_u16(), 200 | 201)).then(|| r.body["credentials"].clone())
        });
        let end = self
            .finish(
                r,
                &format!("{path}/last_operation"),
                "binding last_operation",
                &[200, 201],
                ("bind", svc, accepts),
            )
            .await;
        if self.expect_not_gone("bind", bid, end) != End::Succeeded {
            return None;
        }
        if let Some(c) = answered.filter(Value::is_object) {
            return Some(c);
        }
        let r = self.request(Method::GET, &path, None, "binding").await?;
        if r.status.as_u16() != 200 || !r.body["credentials"].is_object() {
            self.ledger.violation(format!(
                "GET binding {bid} after its bind succeeded: {} {}",
                r.status, r.text
            ));
            return None;
        }
        Some(r.body["credentials"].clone())
    }

    /// Unbinds `bid` from `id`.
    pub async fn unbind(&self, svc: &Svc, id: &str, bid: &str, accepts: bool) -> End {
        let path = format!("/v2/service_instances/{id}/service_bindings/{bid}");
        let r = self
            .request(
                Method::DELETE,
                &format!("{path}{}", delete_query(svc, accepts)),
                None,
                "binding",
            )
            .await;
        self.finish(
            r,
            &format!("{path}/last_operation"),
            "binding last_operation",
            &[200],
            ("unbind", svc, accepts),
        )
        .await
    }

    /// Deprovisions `id`.
    pub async fn deprovision(&self, svc: &Svc, id: &str, accepts: bool) -> End {
        let path = format!("/v2/service_instances/{id}");
        let r = self
            .request(
                Method::DELETE,
                &format!("{path}{}", delete_query(svc, accepts)),
                None,
                "instance",
            )
            .await;
        self.finish(
            r,
            &format!("{path}/last_operation"),
            "instance last_operation",
            &[200],
            ("deprovision", svc, accepts),
        )
        .await
    }

    /// A provision or bind that ends "gone" broke a promise.
    fn expect_not_gone(&self, action: &str, id: &str, end: End) -> End {
        if end == End::Gone {
            self.ledger
                .violation(format!("{action} of {id}: last_operation answered 410"));
            return End::Aborted;
        }
        end
    }

    /// `GET path` with the broker's credentials (admin API included).
    pub async fn get(&self, path: &str, route: &str) -> Option<Resp> {
        self.request(Method::GET, path, None, route).await
    }
}

fn delete_query(svc: &Svc, accepts: bool) -> String {
    let mut q = format!("?service_id={}&plan_id={}", svc.service_id, svc.plan_id);
    if accepts {
        q += "&accepts_incomplete=true";
    }
    q
}

// ---- chaos --------------------------------------------------------------------------

/// A component chaos kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Gateway,
    Allocator,
    Node,
}

impl Component {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Component::Gateway => "gateway",
            Component::Allocator => "allocator",
            Component::Node => "node",
        }
    }
}

/// SIGKILLs and restarts the components of `stack` at random moments for
/// `duration`: up 0.5-3 s, then one component (sometimes two) killed and
/// left down 0.1-2.5 s. Returns with everything running and the gateway
/// answering.
pub async fn chaos(
    stack: &mut ProcStack,
    rng: &mut Rng,
    duration: Duration,
    ledger: &Ledger,
    gateway: &GatewayWatch,
) {
    let all = [Component::Gateway, Component::Allocator, Component::Node];
    let end = Instant::now() + duration;
    while Instant::now() < end {
        tokio::time::sleep(rng.millis(500, 3_000)).await;
        let first = all[rng.below(3) as usize];
        let mut down = vec![first];
        if rng.percent(20) {
            let second = all[rng.below(3) as usize];
            if second != first {
                down.push(second);
            }
        }
        for c in &down {
            kill(stack, *c, ledger, gateway);
            if down.len() > 1 {
                tokio::time::sleep(rng.millis(0, 500)).await;
            }
        }
        tokio::time::sleep(rng.millis(100, 2_500)).await;
        for c in down {
            start(stack, c, gateway).await;
        }
    }
}

fn kill(stack: &mut ProcStack, c: Component, ledger: &Ledger, gateway: &GatewayWatch) {
    stack.assert_running();
    match c {
        Component::Gateway => {
            gateway.up.store(false, Ordering::SeqCst);
            gateway.kills.fetch_add(1, Ordering::SeqCst);
            stack.kill_gateway();
        }
        Component::Allocator => stack.kill_allocator(),
        Component::Node => stack.kill_node(),
    }
    ledger.kill(c.name());
}

async fn start(stack: &mut ProcStack, c: Component, gateway: &GatewayWatch) {
    match c {
        Component::Gateway => {
            stack.start_gateway();
            // Clients count the gateway up once it answers again.
            let deadline = Instant::now() + Duration::from_secs(30);
            while stack.healthz().await.is_null() {
                stack.assert_running();
                assert!(
                    Instant::now() < deadline,
                    "gateway did not answer within 30 s of its restart; log:\n{}",
                    stack.log("gateway")
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            gateway.up.store(true, Ordering::SeqCst);
        }
        Component::Allocator => stack.start_allocator(),
        Component::Node => stack.start_node(),
    }
}

// ---- invariants -----------------------------------------------------------------------

/// An instance (and binding) the clients kept to the end, with the
/// credentials the bind answered.
#[derive(Clone)]
pub struct Kept {
    pub svc: Svc,
    pub id: String,
    pub bid: String,
    pub credentials: Value,
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept")
            .field("svc", &self.svc.name)
            .field("id", &self.id)
            .field("bid", &self.bid)
            .finish_non_exhaustive()
    }
}

/// The gateway's desired state, read through the admin API.
#[derive(Debug, Default)]
pub struct Desired {
    /// Instance id → (service name, state, last operation state).
    pub instances: BTreeMap<String, (String, String, String)>,
    /// Binding id → (instance id, state, last operation state).
    pub bindings: BTreeMap<String, (String, String, String)>,
}

impl Desired {
    /// Reads it (every instance, then each one's bindings).
    pub async fn read(p: &Platform) -> Option<Desired> {
        let list = p.get("/admin/v1/instances", "admin instances").await?;
        let mut d = Desired::default();
        for i in list.body["instances"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let id = i["id"].as_str().unwrap_or_default().to_string();
            let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
            d.instances.insert(
                id.clone(),
                (
                    text(&i["service_name"]),
                    text(&i["state"]),
                    text(&i["last_operation"]["state"]),
                ),
            );
            let one = p
                .get(&format!("/admin/v1/instances/{id}"), "admin instance")
                .await?;
            for b in one.body["bindings"].as_array().cloned().unwrap_or_default() {
                d.bindings.insert(
                    text(&b["id"]),
                    (
                        id.clone(),
                        text(&b["state"]),
                        text(&b["last_operation"]["state"]),
                    ),
                );
            }
        }
        Some(d)
    }
}

/// Counts invariants as they are checked and collects the broken ones.
#[derive(Default)]
struct Check {
    checked: u64,
    broken: Vec<String>,
}

impl Check {
    fn that(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.checked += 1;
        if !ok {
            self.broken.push(what());
        }
    }
}

/// Compares everything the allocator, the node and the host hold with the
/// gateway's desired state; returns (invariants checked, broken ones).
/// `kept` must all exist and be ready; nothing else the clients made may.
pub async fn check_consistency(
    stack: &ProcStack,
    p: &Platform,
    kept: &[Kept],
) -> (u64, Vec<String>) {
    let mut c = Check::default();
    let Some(d) = Desired::read(p).await else {
        return (1, vec!["the admin API did not answer".into()]);
    };
    // Nothing stuck, nothing but what the clients kept.
    for (id, (svc, state, op)) in &d.instances {
        c.that(op != "in progress", || {
            format!("instance {id} ({svc}): operation still in progress")
        });
        c.that(state == "ready", || {
            format!("instance {id} ({svc}) left in state {state} (last operation {op})")
        });
        c.that(kept.iter().any(|k| &k.id == id), || {
            format!("instance {id} ({svc}) exists but the client deprovisioned or never kept it")
        });
    }
    for (bid, (id, state, op)) in &d.bindings {
        c.that(op != "in progress", || {
            format!("binding {bid} of {id}: operation still in progress")
        });
        c.that(state == "ready", || {
            format!("binding {bid} of {id} left in state {state} (last operation {op})")
        });
        c.that(kept.iter().any(|k| &k.bid == bid), || {
            format!("binding {bid} of {id} exists but the client unbound or never kept it")
        });
    }
    for k in kept {
        c.that(d.instances.contains_key(&k.id), || {
            format!("kept instance {} is missing", k.id)
        });
        c.that(d.bindings.contains_key(&k.bid), || {
            format!("kept binding {} is missing", k.bid)
        });
    }

    // The allocator: no port twice, nothing without an owner.
    let a = stack.allocations(None).await;
    let mut ports = BTreeMap::new();
    for l in &a.leases {
        let first = ports.insert((l.pool.clone(), l.port), l.owner.clone());
        c.that(first.is_none(), || {
            format!(
                "port {} of pool {} leased twice ({} and {first:?})",
                l.port, l.pool, l.owner
            )
        });
        c.that(d.instances.contains_key(&l.owner), || {
            format!(
                "lease of port {} owned by {}, which is no instance",
                l.port, l.owner
            )
        });
    }
    for cred in &a.credentials {
        let owned = d.instances.contains_key(&cred.owner) || d.bindings.contains_key(&cred.owner);
        c.that(owned, || {
            format!(
                "{} credential of {} has no owning instance or binding",
                cred.kind, cred.owner
            )
        });
    }
    for (id, (svc, _, _)) in &d.instances {
        let leases = a.leases.iter().filter(|l| &l.owner == id).count();
        let want = usize::from(svc == "redis");
        c.that(leases == want, || {
            format!("instance {id} ({svc}) holds {leases} leases, not {want}")
        });
    }

    // The node: what it runs, its processes and directories.
    let on_node = stack.node_instances().await;
    let mut node_ports = BTreeSet::new();
    for s in &on_node {
        c.that(d.instances.contains_key(&s.instance_id), || {
            format!(
                "node holds {} ({}), which is no instance",
                s.instance_id, s.kind
            )
        });
        if s.port != 0 {
            c.that(node_ports.insert(s.port), || {
                format!("node runs two instances on port {}", s.port)
            });
            let leased = a
                .leases
                .iter()
                .any(|l| l.owner == s.instance_id && l.port == s.port && l.pool == PROC_NODE_ID);
            c.that(leased, || {
                format!(
                    "node runs {} on port {}, which it does not lease",
                    s.instance_id, s.port
                )
            });
        }
    }
    for id in d.instances.keys() {
        c.that(on_node.iter().any(|s| &s.instance_id == id), || {
            format!("instance {id} is not on the node")
        });
    }
    let mut daemons: BTreeMap<String, usize> = BTreeMap::new();
    for proc in stack.daemons() {
        let id = proc
            .cwd
            .strip_prefix(&stack.node_data_dir)
            .ok()
            .and_then(|rest| rest.iter().next())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        *daemons.entry(id).or_default() += 1;
    }
    for (id, n) in &daemons {
        c.that(d.instances.contains_key(id), || {
            format!("{n} process(es) of {id}, which is no instance")
        });
    }
    for (id, (svc, _, _)) in &d.instances {
        let n = daemons.get(id).copied().unwrap_or(0);
        let want = usize::from(svc == "redis");
        c.that(n == want, || {
            format!("instance {id} ({svc}) runs {n} processes, not {want}")
        });
    }
    for dir in instance_dirs(stack) {
        c.that(d.instances.contains_key(&dir), || {
            format!("directory {dir} in the node's data dir belongs to no instance")
        });
    }

    // Redis: exactly the ACL users of the instance's bindings.
    for (id, (svc, _, _)) in d.instances.iter().filter(|(_, (s, _, _))| s == "redis") {
        let want: BTreeSet<String> = d
            .bindings
            .iter()
            .filter(|(_, (i, _, _))| i == id)
            .filter_map(|(bid, _)| a.credentials.iter().find(|c| &c.owner == bid))
            .map(|cred| cred.username.clone())
            .collect();
        match acl_users(stack, id).await {
            Ok(users) => c.that(users == want, || {
                format!("redis {id} ({svc}) has ACL users {users:?}, its bindings {want:?}")
            }),
            Err(e) => c.that(false, || format!("redis {id}: cannot list ACL users: {e}")),
        }
    }
    (c.checked, c.broken)
}

/// The instance directories in the node's data dir (dot entries are the
/// node's own).
pub fn instance_dirs(stack: &ProcStack) -> Vec<String> {
    std::fs::read_dir(&stack.node_data_dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// The ACL users of redis instance `id` other than `default`, asked as the
/// instance's own `default` user (its password read from the redis.conf
/// the node wrote: the test's ground truth, not the broker's answer).
async fn acl_users(stack: &ProcStack, id: &str) -> Result<BTreeSet<String>, String> {
    let conf = std::fs::read_to_string(stack.node_data_dir.join(id).join("redis.conf"))
        .map_err(|e| format!("redis.conf: {e}"))?;
    let setting = |key: &str| {
        conf.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .ok_or_else(|| format!("no {key}in redis.conf"))
    };
    let port = setting("port ")?;
    let password = setting("requirepass ")?;
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{port}/")).map_err(|e| e.to_string())?;
    let mut con = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    redis::cmd("AUTH")
        .arg(&password)
        .query_async::<String>(&mut con)
        .await
        .map_err(|e| format!("AUTH default: {e}"))?;
    let users: Vec<String> = redis::cmd("ACL")
        .arg("USERS")
        .query_async(&mut con)
        .await
        .map_err(|e| e.to_string())?;
    Ok(users.into_iter().filter(|u| u != "default").collect())
}

/// Asks `last_operation` of every instance and binding the clients touched
/// (`(instance id, binding id)`): none may still be in progress; a deleted
/// one answers 410 (or 404 when its deletion left no record).
pub async fn check_no_operation_stuck(p: &Platform, touched: &[(String, String)]) {
    for (id, bid) in touched {
        let instance = format!("/v2/service_instances/{id}/last_operation");
        let binding = format!("/v2/service_instances/{id}/service_bindings/{bid}/last_operation");
        for (path, route) in [
            (instance, "instance last_operation"),
            (binding, "binding last_operation"),
        ] {
            let Some(r) = p.get(&path, route).await else {
                continue;
            };
            p.ledger().checked(1);
            let ended = match r.status.as_u16() {
                200 => matches!(r.body["state"].as_str(), Some("succeeded" | "failed")),
                404 | 410 => true,
                _ => false,
            };
            if !ended {
                p.ledger()
                    .violation(format!("GET {path} at the end: {} {}", r.status, r.text));
            }
        }
    }
}

/// Checks until [`check_consistency`] finds nothing broken (reconciliation
/// may need a few passes after the last restart) or `timeout` passes;
/// records the invariants checked in the last pass and what stayed broken.
pub async fn settle(stack: &ProcStack, p: &Platform, kept: &[Kept], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (checked, broken) = check_consistency(stack, p, kept).await;
        if broken.is_empty() || Instant::now() >= deadline {
            p.ledger().checked(checked);
            for b in broken {
                p.ledger()
                    .violation(format!("after settling {timeout:?}: {b}"));
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
