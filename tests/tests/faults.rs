//! Faults under load: many concurrent OSB lifecycles (echo and redis, sync
//! and async) while the gateway, the allocator and the node are SIGKILLed
//! and restarted at random moments. Every answer is recorded: an outage is
//! answered 503 with `Retry-After` (or finds no gateway while it is down),
//! never another 5xx, never a hang. Once everything is up again and
//! reconciliation has settled: no operation is stuck, no port is leased
//! twice, nothing (lease, credential, daemon, directory, Redis ACL user)
//! lives without an owning instance or binding, every instance kept works
//! with its credentials, and deprovisioning them leaves nothing behind.
//!
//! The chaos is seeded; the seed is printed with the summary and
//! `SVCBROKER_FAULT_SEED=<seed>` replays the same kill schedule (the
//! interleaving with the clients is up to the machine).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use svcbroker_tests::faults::{
    self, ECHO, End, GatewayWatch, Kept, Ledger, Platform, REDIS, Rng, Svc, chaos,
    check_no_operation_stuck, settle,
};
use svcbroker_tests::models_support::{ProcStack, ProcStackOptions, RedisUser};
use svcbroker_tests::new_id;

/// How long components are killed at random.
const CHAOS: Duration = Duration::from_secs(60);
/// Concurrent platform clients, alternating echo and redis.
const CLIENTS: usize = 8;
/// Instances (with one binding each) a client keeps to the end, at most.
const KEPT_PER_CLIENT: usize = 2;
/// The gateway's `sync_timeout_ms`: a synchronous request is answered by
/// then (503 when its operation goes on).
const SYNC_TIMEOUT: Duration = Duration::from_secs(20);
/// What a client allows on top of it before it calls a request hung.
const ANSWER_MARGIN: Duration = Duration::from_secs(10);
/// How long reconciliation may take to repair what the kills left.
const SETTLE: Duration = Duration::from_secs(45);

/// Prints the summary when the test panics (an assertion outside the
/// ledger), so the counts and the seed are in the failure output too.
struct SummaryOnPanic(Arc<Ledger>, u64);

impl Drop for SummaryOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.0.tally().summary(self.1));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycles_survive_components_killed_at_random() {
    let seed = faults::seed();
    eprintln!(
        "fault test seed {seed} (replay with {}={seed})",
        faults::SEED_ENV
    );
    let mut rng = Rng::new(seed);
    let mut stack = ProcStack::start(ProcStackOptions {
        sync_timeout_ms: SYNC_TIMEOUT.as_millis() as u64,
        capacity: 100,
        ..ProcStackOptions::default()
    })
    .await;
    let ledger = Arc::new(Ledger::default());
    let _summary = SummaryOnPanic(Arc::clone(&ledger), seed);
    let watch = Arc::new(GatewayWatch::default());
    let platform = Platform::new(
        &stack,
        SYNC_TIMEOUT + ANSWER_MARGIN,
        Arc::clone(&ledger),
        Arc::clone(&watch),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let kept: Arc<Mutex<Vec<Kept>>> = Arc::default();
    let touched: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let svc = if i % 2 == 0 { ECHO } else { REDIS };
        clients.spawn(client(
            platform.clone(),
            Rng::new(rng.next_u64()),
            svc,
            Arc::clone(&stop),
            Arc::clone(&kept),
            Arc::clone(&touched),
        ));
    }
    chaos(&mut stack, &mut rng, CHAOS, &ledger, &watch).await;
    stack.wait_ready().await;
    // The clients finish the lifecycle they are in, with everything up.
    stop.store(true, Ordering::SeqCst);
    let joined = tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(r) = clients.join_next().await {
            r.expect("client task panicked");
        }
    })
    .await;
    assert!(
        joined.is_ok(),
        "clients did not finish their lifecycles within 90 s of the last restart"
    );
    stack.assert_running();

    let kept = kept.lock().unwrap().clone();
    settle(&stack, &platform, &kept, SETTLE).await;
    for k in &kept {
        works(&platform, k).await;
    }

    // Deprovision everything: nothing may be left anywhere.
    let mut cleanup = tokio::task::JoinSet::new();
    for k in kept.clone() {
        let p = platform.clone();
        cleanup.spawn(async move { unbind_and_deprovision(&p, &k, true).await });
    }
    while let Some(r) = cleanup.join_next().await {
        r.expect("cleanup task panicked");
    }
    settle(&stack, &platform, &[], SETTLE).await;
    let touched = touched.lock().unwrap().clone();
    check_no_operation_stuck(&platform, &touched).await;
    let left = stack.allocations(None).await;
    ledger.checked(2);
    if !left.leases.is_empty() || !left.credentials.is_empty() {
        ledger.violation(format!("allocations left at the end: {left:?}"));
    }
    if !stack.daemons().is_empty() {
        ledger.violation(format!("daemons left at the end: {:?}", stack.daemons()));
    }

    let tally = ledger.tally();
    let summary = tally.summary(seed);
    eprintln!("{summary}");
    assert!(tally.violations.is_empty(), "{summary}");
    // The run must have tested something: kills of every component while
    // lifecycles of both services ran in both modes.
    for c in ["gateway", "allocator", "node"] {
        assert!(
            tally.kills.get(c).copied().unwrap_or(0) >= 1,
            "{c} never killed\n{summary}"
        );
    }
    for s in ["echo", "redis"] {
        for mode in ["sync", "async"] {
            let key = format!("provision {s} {mode} succeeded");
            assert!(
                tally.ops.get(&key).copied().unwrap_or(0) >= 1,
                "no '{key}'\n{summary}"
            );
        }
    }
}

/// A platform client: full lifecycles until told to stop, each call sync or
/// async at random; some instances (with their binding) are kept.
async fn client(
    p: Platform,
    mut rng: Rng,
    svc: Svc,
    stop: Arc<AtomicBool>,
    kept: Arc<Mutex<Vec<Kept>>>,
    touched: Arc<Mutex<Vec<(String, String)>>>,
) {
    let mut kept_here = 0;
    while !stop.load(Ordering::SeqCst) {
        let (id, bid) = (new_id(), new_id());
        touched.lock().unwrap().push((id.clone(), bid.clone()));
        match p.provision(&svc, &id, rng.percent(50)).await {
            End::Succeeded => {}
            other => {
                p.ledger().violation(format!(
                    "provision of {} {id} did not succeed under faults: {other:?}",
                    svc.name
                ));
                // A platform deletes what failed to provision.
                p.deprovision(&svc, &id, true).await;
                continue;
            }
        }
        let Some(credentials) = p.bind(&svc, &id, &bid, rng.percent(50)).await else {
            p.ledger().violation(format!(
                "bind {bid} of {} {id} did not succeed under faults",
                svc.name
            ));
            p.unbind(&svc, &id, &bid, true).await;
            p.deprovision(&svc, &id, true).await;
            continue;
        };
        if credentials["name"].as_str() != Some(id.as_str()) {
            p.ledger().violation(format!(
                "bind {bid} of {id}: credentials name another instance: {:?}",
                credentials["name"]
            ));
        }
        let k = Kept {
            svc,
            id,
            bid,
            credentials,
        };
        if kept_here < KEPT_PER_CLIENT && rng.percent(25) {
            kept_here += 1;
            kept.lock().unwrap().push(k);
            continue;
        }
        unbind_and_deprovision(&p, &k, rng.percent(50)).await;
    }
}

/// Unbinds and deprovisions `k`; each must succeed (or find it gone).
async fn unbind_and_deprovision(p: &Platform, k: &Kept, accepts: bool) {
    let unbound = p.unbind(&k.svc, &k.id, &k.bid, accepts).await;
    if !matches!(unbound, End::Succeeded | End::Gone) {
        p.ledger()
            .violation(format!("unbind {} of {}: {unbound:?}", k.bid, k.id));
    }
    let removed = p.deprovision(&k.svc, &k.id, !accepts).await;
    if !matches!(removed, End::Succeeded | End::Gone) {
        p.ledger()
            .violation(format!("deprovision {}: {removed:?}", k.id));
    }
}

/// Checks that a kept instance works with its binding's credentials: the
/// broker still answers them, and for redis they AUTH, SET and GET.
async fn works(p: &Platform, k: &Kept) {
    let instance = p
        .get(&format!("/v2/service_instances/{}", k.id), "instance")
        .await;
    let binding = p
        .get(
            &format!("/v2/service_instances/{}/service_bindings/{}", k.id, k.bid),
            "binding",
        )
        .await;
    p.ledger().checked(2);
    match instance {
        Some(r) if r.status.as_u16() == 200 && r.body["service_id"] == k.svc.service_id => {}
        other => p.ledger().violation(format!(
            "GET instance {} at the end: {:?}",
            k.id,
            other.map(|r| (r.status, r.text))
        )),
    }
    match binding {
        Some(r) if r.status.as_u16() == 200 && r.body["credentials"] == k.credentials => {}
        Some(r) => p.ledger().violation(format!(
            "GET binding {} at the end: {} (credentials differ from the bind's: {})",
            k.bid,
            r.status,
            r.body["credentials"] != k.credentials
        )),
        None => {}
    }
    if k.svc.name == REDIS.name {
        p.ledger().checked(1);
        RedisUser::from_credentials(&k.credentials)
            .check_auth_set_get()
            .await;
    }
}
