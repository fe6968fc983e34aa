//! The gateway's reconciliation against a node running as its own process:
//! a node killed with SIGKILL and restarted ends with exactly the daemons it
//! should have and their data; a daemon killed by hand is restarted and its
//! bindings work again; things no instance owns are removed after the grace
//! period; a daemon the node gave up on shows as failed on GET.

use std::collections::BTreeMap;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use svcbroker_proto::v1::{InstanceState, ProcessSpec, ProvisionRequest};
use svcbroker_tests::fixtures::{echo, redis as redis_ids};
use svcbroker_tests::models_support::{ProcStack, ProcStackOptions, RedisUser, ids, memcached};
use svcbroker_tests::{bind_body, eventually, new_id, procs, provision_body, until};

const WAIT: Duration = Duration::from_secs(60);

async fn provision(stack: &ProcStack, id: &str, service: &str, plan: &str) {
    stack
        .osb
        .provision(id, &provision_body(service, plan, json!({})), false)
        .await
        .expect(201);
}

async fn bind(stack: &ProcStack, id: &str, bid: &str, service: &str, plan: &str) -> Value {
    let r = stack
        .osb
        .bind(id, bid, &bind_body(service, plan), false)
        .await;
    r.expect(201);
    r.body["credentials"].clone()
}

/// (pid, port, state) of every instance the node lists.
async fn node_view(stack: &ProcStack) -> BTreeMap<String, (u32, u32, InstanceState)> {
    stack
        .node_instances()
        .await
        .into_iter()
        .map(|i| {
            let state = i.state();
            (i.instance_id, (i.pid, i.port, state))
        })
        .collect()
}

/// Number of live processes whose working directory is each instance's.
fn processes_per_instance(stack: &ProcStack) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for p in stack.daemons() {
        if let Ok(rel) = p.cwd.strip_prefix(&stack.node_data_dir)
            && let Some(first) = rel.components().next()
        {
            *out.entry(first.as_os_str().to_string_lossy().into_owned())
                .or_insert(0) += 1;
        }
    }
    out
}

async fn reconcile_counter(stack: &ProcStack, name: &str) -> u64 {
    stack.healthz().await["reconcile"][name]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn node_killed_and_restarted_keeps_exactly_its_daemons_and_data() {
    let mut stack = ProcStack::start(ProcStackOptions::default()).await;
    let (rs, rp) = (redis_ids::SERVICE, redis_ids::PLAN_SMALL);
    let (ms, mp) = (ids::memcached::SERVICE, ids::memcached::PLAN_SMALL);
    let (r1, r2, m1, e1) = (new_id(), new_id(), new_id(), new_id());
    provision(&stack, &r1, rs, rp).await;
    provision(&stack, &r2, rs, rp).await;
    provision(&stack, &m1, ms, mp).await;
    provision(&stack, &e1, echo::SERVICE, echo::PLAN_FREE).await;
    let (b1, b2) = (new_id(), new_id());
    let u1 = RedisUser::from_credentials(&bind(&stack, &r1, &b1, rs, rp).await);
    let u2 = RedisUser::from_credentials(&bind(&stack, &r2, &b2, rs, rp).await);
    let mut c1 = u1.auth().await.expect("AUTH r1");
    u1.set_on(&mut c1, "k1", "kept-1").await;
    let mut c2 = u2.auth().await.expect("AUTH r2");
    u2.set_on(&mut c2, "k2", "kept-2").await;
    // appendfsync everysec: the write reaches the AOF within a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let before = node_view(&stack).await;
    assert_eq!(before.len(), 4, "{before:?}");
    let expected: BTreeMap<String, usize> =
        [(r1.clone(), 1), (r2.clone(), 1), (m1.clone(), 1)].into();
    assert_eq!(processes_per_instance(&stack), expected);

    // The node dies without a chance to stop anything: its daemons live
    // on. One of them dies too while the node is down.
    stack.kill_node();
    let (pid1, port1, _) = before[&r1];
    let (pid2, port2, _) = before[&r2];
    let (pidm, portm, _) = before[&m1];
    assert!(procs::is_alive(pid1 as i32) && procs::is_alive(pid2 as i32));
    kill(Pid::from_raw(pid2 as i32), Signal::SIGKILL).expect("kill r2's redis");
    until("r2's redis to die", Duration::from_secs(10), || async {
        !procs::is_alive(pid2 as i32)
    })
    .await;

    stack.start_node();
    // Running again: the survivors re-adopted (same pid), the dead one
    // started again on its port, nothing twice.
    let after = eventually("the node to hold all four again", WAIT, || async {
        let v = node_view(&stack).await;
        let running = v.len() == 4 && v.values().all(|(_, _, s)| *s == InstanceState::Running);
        running.then_some(v)
    })
    .await;
    assert_eq!(after[&r1].0, pid1, "r1's daemon re-adopted, not restarted");
    assert_eq!(after[&m1].0, pidm, "memcached re-adopted");
    assert_ne!(after[&r2].0, pid2, "r2 started anew");
    assert_eq!(
        (after[&r1].1, after[&r2].1, after[&m1].1),
        (port1, port2, portm),
        "same ports"
    );
    assert_eq!(
        processes_per_instance(&stack),
        expected,
        "exactly one daemon each"
    );

    // Data and bindings: r1's never stopped; r2 restarted from its AOF and
    // its binding user was made again by the gateway.
    let mut c1 = u1.auth().await.expect("r1's binding still works");
    assert_eq!(u1.get_on(&mut c1, "k1").await.as_deref(), Some("kept-1"));
    let mut c2 = eventually("r2's binding to work again", WAIT, || async {
        u2.auth().await.ok()
    })
    .await;
    assert_eq!(u2.get_on(&mut c2, "k2").await.as_deref(), Some("kept-2"));
    let out = memcached(&u1.host, portm as u16, "version\r\n").await;
    assert!(out.starts_with("VERSION"), "{out:?}");
    assert!(reconcile_counter(&stack, "reprovisioned").await >= 1);

    // Further passes change nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = node_view(&stack).await;
    assert_eq!(
        later.iter().map(|(k, v)| (k, v.0)).collect::<Vec<_>>(),
        after.iter().map(|(k, v)| (k, v.0)).collect::<Vec<_>>()
    );
    assert_eq!(processes_per_instance(&stack), expected);

    for (id, bid, s, p) in [(&r1, &b1, rs, rp), (&r2, &b2, rs, rp)] {
        stack.osb.unbind(id, bid, s, p, false).await.expect(200);
    }
    for (id, s, p) in [
        (&r1, rs, rp),
        (&r2, rs, rp),
        (&m1, ms, mp),
        (&e1, echo::SERVICE, echo::PLAN_FREE),
    ] {
        stack.osb.deprovision(id, s, p, false).await.expect(200);
        stack.assert_instance_gone(id, &[]).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_killed_by_hand_is_restarted_with_its_bindings() {
    let stack = ProcStack::start(ProcStackOptions::default()).await;
    let (rs, rp) = (redis_ids::SERVICE, redis_ids::PLAN_SMALL);
    let id = new_id();
    provision(&stack, &id, rs, rp).await;
    let bid = new_id();
    let user = RedisUser::from_credentials(&bind(&stack, &id, &bid, rs, rp).await);
    let mut con = user.auth().await.expect("AUTH");
    user.set_on(&mut con, "k", "survives").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let old = stack.node_instance(&id).await.expect("instance").pid;

    kill(Pid::from_raw(old as i32), Signal::SIGKILL).expect("kill redis-server");
    let new = eventually("the node to restart redis", WAIT, || async {
        stack
            .node_instance(&id)
            .await
            .filter(|i| i.state() == InstanceState::Running && i.pid != 0 && i.pid != old)
            .map(|i| i.pid)
    })
    .await;
    assert!(procs::is_alive(new as i32));
    // Redis keeps ACL users in memory: the gateway binds again.
    let mut con = eventually("the binding to work again", WAIT, || async {
        user.auth().await.ok()
    })
    .await;
    assert_eq!(
        user.get_on(&mut con, "k").await.as_deref(),
        Some("survives")
    );
    assert!(reconcile_counter(&stack, "rebound").await >= 1);
    let procs_now = stack.daemons();
    assert_eq!(procs_now.len(), 1, "{procs_now:?}");

    stack.osb.unbind(&id, &bid, rs, rp, false).await.expect(200);
    stack.osb.deprovision(&id, rs, rp, false).await.expect(200);
    stack.assert_instance_gone(&id, &[&bid]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn orphans_are_removed_after_the_grace_period() {
    let stack = ProcStack::start(ProcStackOptions {
        orphan_grace_ms: 1_500,
        ..Default::default()
    })
    .await;
    // A real instance, which must be left alone.
    let kept = new_id();
    provision(&stack, &kept, redis_ids::SERVICE, redis_ids::PLAN_SMALL).await;
    // Something on the node that no instance owns (as if left by a
    // gateway that lost its database).
    let orphan = format!("orphan-{}", new_id());
    let port = u32::from(stack.port_range.1);
    stack
        .node_agent()
        .await
        .provision(ProvisionRequest {
            instance_id: orphan.clone(),
            service: "redis".into(),
            plan: "small".into(),
            kind: "process".into(),
            port,
            process: Some(ProcessSpec {
                argv: [
                    "redis-server",
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                ]
                .map(String::from)
                .to_vec(),
                ready_timeout_ms: 10_000,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("node provisions the orphan");
    let started = std::time::Instant::now();
    let dir = stack.node_data_dir.join(&orphan);
    until("the orphan to be removed", WAIT, || async {
        stack.node_instance(&orphan).await.is_none()
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(1_500),
        "removed before the grace period"
    );
    until("its daemon to exit", Duration::from_secs(10), || async {
        procs::processes_under(&dir).is_empty()
    })
    .await;
    assert!(!dir.exists(), "orphan directory left");
    assert!(reconcile_counter(&stack, "orphans_removed").await >= 1);
    assert!(
        stack.log("gateway").contains("orphan removed"),
        "the removal is logged"
    );
    // The owned instance is untouched.
    let i = stack
        .node_instance(&kept)
        .await
        .expect("owned instance kept");
    assert_eq!(i.state(), InstanceState::Running);
    stack
        .osb
        .deprovision(&kept, redis_ids::SERVICE, redis_ids::PLAN_SMALL, false)
        .await
        .expect(200);
    stack.assert_instance_gone(&kept, &[]).await;
}

/// A daemon that comes up, then exits a second later, every time.
const FLAKY_YAML: &str = r#"
id: 3e9d1c7a-5b2f-4a60-8e1d-7c6b5a4f3e01
name: flaky
description: a daemon that keeps exiting (tests only)
bindable: true
model: process
requires_executables: [sh, redis-server]
process:
  command: [sh, -c, "redis-server --port {{port}} --bind 127.0.0.1 --save '' & sleep 1; exit 1"]
  ready_timeout_ms: 5000
credentials:
  port: "{{port}}"
plans:
  - id: 3e9d1c7a-5b2f-4a60-8e1d-7c6b5a4f3e11
    name: default
    description: the only plan
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_the_node_gave_up_on_shows_as_failed() {
    let stack = ProcStack::start(ProcStackOptions {
        extra_services: vec![("flaky.yaml".into(), FLAKY_YAML.into())],
        ..Default::default()
    })
    .await;
    let (svc, plan) = (
        "3e9d1c7a-5b2f-4a60-8e1d-7c6b5a4f3e01",
        "3e9d1c7a-5b2f-4a60-8e1d-7c6b5a4f3e11",
    );
    let id = new_id();
    provision(&stack, &id, svc, plan).await;
    let attrs = stack.osb.get_instance(&id).await.body["metadata"]["attributes"].clone();
    assert_eq!(
        attrs["node_id"],
        json!(svcbroker_tests::models_support::PROC_NODE_ID)
    );

    // The node restarts it with backoff, then gives up; the gateway shows
    // it (OSB instance metadata) instead of dropping it silently.
    let attrs = eventually("GET instance to show it failed", WAIT, || async {
        let r = stack.osb.get_instance(&id).await;
        r.expect(200);
        let a = r.body["metadata"]["attributes"].clone();
        (a["observed_state"] == "failed").then_some(a)
    })
    .await;
    assert!(
        attrs["observed_message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{attrs}"
    );
    assert!(
        attrs["observed_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert!(reconcile_counter(&stack, "failed_seen").await >= 1);

    stack
        .osb
        .deprovision(&id, svc, plan, false)
        .await
        .expect(200);
    stack.assert_instance_gone(&id, &[]).await;
}
