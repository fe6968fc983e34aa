//! Many requests at once: ports are never leased twice, idempotent repeats
//! racing each other make one instance.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use futures::future::join_all;
use serde_json::json;
use svcbroker_tests::fixtures::{echo, redis};
use svcbroker_tests::{
    NODE_ID, RedisCreds, Stack, StackOptions, bind_body, new_id, procs, provision_body,
};

#[tokio::test(flavor = "multi_thread")]
async fn sixty_four_concurrent_provisions_get_distinct_ports() {
    const N: usize = 64;
    let stack = Stack::start(StackOptions {
        capacity: 80,
        ..Default::default()
    })
    .await;
    let osb = &stack.osb;
    let ids: Vec<String> = (0..N).map(|_| new_id()).collect();
    let body = provision_body(
        redis::SERVICE,
        redis::PLAN_SMALL,
        json!({"maxmemory": "8mb"}),
    );

    let answers = join_all(ids.iter().map(|id| osb.provision(id, &body, true))).await;
    let mut ops = HashMap::new();
    for (id, r) in ids.iter().zip(&answers) {
        r.expect(202);
        ops.insert(id.clone(), r.operation());
    }
    let finals = join_all(
        ids.iter()
            .map(|id| osb.wait_instance(id, ops[id].as_deref(), Duration::from_secs(180))),
    )
    .await;
    for (id, (state, last)) in ids.iter().zip(&finals) {
        assert_eq!(state, "succeeded", "{id}: {last}");
    }

    // Allocator: one lease per instance, all distinct, all in range.
    let a = stack.allocations(None).await;
    let leases: Vec<_> = a.leases.iter().filter(|l| ids.contains(&l.owner)).collect();
    assert_eq!(leases.len(), N, "{:?}", a.leases);
    let ports: BTreeSet<u32> = leases.iter().map(|l| l.port).collect();
    assert_eq!(ports.len(), N, "a port was leased twice: {leases:?}");
    let (lo, hi) = stack.port_range;
    assert!(
        ports
            .iter()
            .all(|p| (u32::from(lo)..=u32::from(hi)).contains(p))
    );
    assert!(leases.iter().all(|l| l.pool == NODE_ID));

    // Node: the same ports, each daemon really listening on its own.
    let instances = stack.node_instances().await;
    let node_ports: BTreeSet<u32> = instances
        .iter()
        .filter(|i| ids.contains(&i.instance_id))
        .map(|i| i.port)
        .collect();
    assert_eq!(node_ports, ports);
    assert_eq!(procs::processes_under(&stack.node_data_dir).len(), N);

    // Every binding reaches its own server with its own password.
    let bids: Vec<String> = (0..N).map(|_| new_id()).collect();
    let bb = bind_body(redis::SERVICE, redis::PLAN_SMALL);
    let binds = join_all(
        ids.iter()
            .zip(&bids)
            .map(|(id, bid)| osb.bind(id, bid, &bb, false)),
    )
    .await;
    let mut seen = BTreeSet::new();
    for b in &binds {
        b.expect(201);
        let creds = RedisCreds::from_credentials(&b.body["credentials"]);
        assert!(
            seen.insert(creds.port),
            "two bindings share port {}",
            creds.port
        );
        assert!(ports.contains(&u32::from(creds.port)));
        creds.check_auth_set_get().await;
    }

    let gone = join_all(ids.iter().map(|id| async move {
        let d = osb
            .deprovision(id, redis::SERVICE, redis::PLAN_SMALL, true)
            .await;
        match d.status.as_u16() {
            200 => {}
            202 => {
                let (state, last) = osb
                    .wait_instance(id, d.operation().as_deref(), Duration::from_secs(120))
                    .await;
                assert!(state == "gone" || state == "succeeded", "{id}: {last}");
            }
            _ => panic!("deprovision {id}: {} {}", d.status, d.text),
        }
    }))
    .await;
    assert_eq!(gone.len(), N);
    for (id, bid) in ids.iter().zip(&bids) {
        stack.assert_instance_gone(id, &[bid]).await;
    }
    assert!(stack.allocations(None).await.leases.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn racing_identical_provisions_make_one_instance() {
    const N: usize = 16;
    let stack = Stack::start_default().await;
    let osb = &stack.osb;
    let id = new_id();
    let body = provision_body(redis::SERVICE, redis::PLAN_SMALL, json!({}));
    let answers = join_all((0..N).map(|_| osb.provision(&id, &body, true))).await;
    let mut ops = BTreeSet::new();
    for r in &answers {
        // 202 while in progress; 200 if one finished before another arrived.
        assert!(
            matches!(r.status.as_u16(), 200 | 202),
            "{} {}",
            r.status,
            r.text
        );
        if r.status.as_u16() == 202 {
            ops.insert(r.operation());
        }
    }
    assert!(ops.len() <= 1, "one provision, one operation: {ops:?}");
    let op = ops.into_iter().next().flatten();
    let (state, last) = osb
        .wait_instance(&id, op.as_deref(), Duration::from_secs(60))
        .await;
    assert_eq!(state, "succeeded", "{last}");

    let a = stack.allocations(Some(&id)).await;
    assert_eq!(a.leases.len(), 1, "{a:?}");
    let instances: Vec<_> = stack
        .node_instances()
        .await
        .into_iter()
        .filter(|i| i.instance_id == id)
        .collect();
    assert_eq!(instances.len(), 1);
    let running = procs::processes_under(&stack.node_data_dir.join(&id));
    assert_eq!(running.len(), 1, "duplicate daemons: {running:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_binds_on_one_instance() {
    const N: usize = 16;
    let stack = Stack::start_default().await;
    let osb = &stack.osb;
    let id = new_id();
    osb.provision(
        &id,
        &provision_body(echo::SERVICE, echo::PLAN_FREE, json!({})),
        false,
    )
    .await
    .expect(201);
    let bids: Vec<String> = (0..N).map(|_| new_id()).collect();
    let bb = bind_body(echo::SERVICE, echo::PLAN_FREE);
    let answers = join_all(bids.iter().map(|bid| osb.bind(&id, bid, &bb, false))).await;
    for (bid, r) in bids.iter().zip(&answers) {
        match r.status.as_u16() {
            201 => {
                osb.get_binding(&id, bid).await.expect(200);
            }
            // Spec "Blocking Operations": a broker MAY serialize bindings.
            422 => {
                svcbroker_tests::assert_error(r, 422, Some("ConcurrencyError"));
                osb.get_binding(&id, bid).await.expect(404);
            }
            _ => panic!("bind {bid}: {} {}", r.status, r.text),
        }
    }
    assert!(
        answers.iter().any(|r| r.status.as_u16() == 201),
        "at least one bind succeeds"
    );
}
