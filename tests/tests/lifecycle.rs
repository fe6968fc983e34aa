//! The whole OSB lifecycle (provision, fetch, bind, fetch binding, unbind,
//! deprovision) for `echo` (record only) and `redis` (one process per
//! instance), synchronously and asynchronously, checked against what really
//! runs: the node's instances, the allocator's leases, processes in /proc
//! and a real Redis client.

use std::time::Duration;

use serde_json::json;
use svcbroker_proto::v1::InstanceState;
use svcbroker_tests::fixtures::{echo, failing, redis};
use svcbroker_tests::{
    NODE_ID, RedisCreds, Stack, StackOptions, bind_body, new_id, procs, provision_body,
};

const OP_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn catalog_lists_shipped_services() {
    let stack = Stack::start_default().await;
    let r = stack.osb.catalog().await;
    r.expect(200);
    let services = r.body["services"].as_array().expect("services array");
    let find = |id: &str| {
        services
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("service {id} not in catalog: {}", r.text))
    };
    let e = find(echo::SERVICE);
    assert_eq!(e["name"], "echo");
    assert_eq!(e["bindable"], true);
    let plans: Vec<&str> = e["plans"]
        .as_array()
        .expect("plans")
        .iter()
        .map(|p| p["id"].as_str().expect("plan id"))
        .collect();
    assert!(plans.contains(&echo::PLAN_FREE) && plans.contains(&echo::PLAN_LOUD));
    let rd = find(redis::SERVICE);
    assert_eq!(rd["name"], "redis");
    // The plan's parameter schema is published, so platforms can render forms.
    let small = rd["plans"]
        .as_array()
        .expect("plans")
        .iter()
        .find(|p| p["id"] == redis::PLAN_SMALL)
        .expect("small plan");
    assert!(
        small["schemas"]["service_instance"]["create"]["parameters"]["properties"]["maxmemory"]
            .is_object(),
        "schema missing: {small}"
    );
    // Only catalog fields: no templates (they mention passwords) leak out.
    assert!(!r.text.contains("requirepass"), "catalog leaks templates");
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_sync_lifecycle() {
    let stack = Stack::start_default().await;
    let osb = &stack.osb;
    let id = new_id();
    let bid = new_id();
    let body = provision_body(
        echo::SERVICE,
        echo::PLAN_FREE,
        json!({"message": "hi there"}),
    );

    let r = osb.provision(&id, &body, false).await;
    r.expect(201);
    assert!(
        r.body.is_object(),
        "provision body must be a JSON object: {}",
        r.text
    );
    // Identical repeat of a finished provision: 200 (spec "Provisioning").
    osb.provision(&id, &body, false).await.expect(200);

    let got = osb.get_instance(&id).await;
    got.expect(200);
    assert_eq!(got.body["service_id"], echo::SERVICE);
    assert_eq!(got.body["plan_id"], echo::PLAN_FREE);

    let bbody = bind_body(echo::SERVICE, echo::PLAN_FREE);
    let b = osb.bind(&id, &bid, &bbody, false).await;
    b.expect(201);
    let creds = &b.body["credentials"];
    assert_eq!(
        creds["message"], "hi there",
        "parameter reaches the credentials"
    );
    assert_eq!(creds["node_id"], NODE_ID);
    assert_eq!(creds["host"], "127.0.0.1");
    assert!(creds["name"].as_str().is_some_and(|n| !n.is_empty()));

    let again = osb.bind(&id, &bid, &bbody, false).await;
    again.expect(200);
    assert_eq!(
        again.body["credentials"], *creds,
        "repeat bind returns the same credentials"
    );
    let fetched = osb.get_binding(&id, &bid).await;
    fetched.expect(200);
    assert_eq!(fetched.body["credentials"], *creds);

    let u = osb
        .unbind(&id, &bid, echo::SERVICE, echo::PLAN_FREE, false)
        .await;
    u.expect(200);
    assert_eq!(u.body, json!({}));
    osb.unbind(&id, &bid, echo::SERVICE, echo::PLAN_FREE, false)
        .await
        .expect(410);
    osb.get_binding(&id, &bid).await.expect(404);

    let d = osb
        .deprovision(&id, echo::SERVICE, echo::PLAN_FREE, false)
        .await;
    d.expect(200);
    assert_eq!(d.body, json!({}));
    osb.deprovision(&id, echo::SERVICE, echo::PLAN_FREE, false)
        .await
        .expect(410);
    osb.get_instance(&id).await.expect(404);
    stack.assert_instance_gone(&id, &[&bid]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_plan_variables_apply_without_parameters() {
    let stack = Stack::start_default().await;
    let id = new_id();
    let bid = new_id();
    stack
        .osb
        .provision(
            &id,
            &provision_body(echo::SERVICE, echo::PLAN_LOUD, json!({})),
            false,
        )
        .await
        .expect(201);
    let b = stack
        .osb
        .bind(&id, &bid, &bind_body(echo::SERVICE, echo::PLAN_LOUD), false)
        .await;
    b.expect(201);
    assert_eq!(b.body["credentials"]["message"], "HELLO");
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_async_lifecycle() {
    let stack = Stack::start_default().await;
    let osb = &stack.osb;
    let id = new_id();
    let bid = new_id();
    let body = provision_body(echo::SERVICE, echo::PLAN_FREE, json!({}));

    let r = osb.provision(&id, &body, true).await;
    match r.status.as_u16() {
        // Nothing to run: a broker may finish at once (spec "Synchronous
        // Operations": it SHOULD, when it can guarantee completion).
        201 => {}
        202 => {
            let op = r.operation();
            let (state, last) = osb.wait_instance(&id, op.as_deref(), OP_TIMEOUT).await;
            assert_eq!(state, "succeeded", "{last}");
        }
        _ => panic!("async provision: {} {}", r.status, r.text),
    }
    osb.get_instance(&id).await.expect(200);

    let b = osb
        .bind(&id, &bid, &bind_body(echo::SERVICE, echo::PLAN_FREE), true)
        .await;
    let creds = match b.status.as_u16() {
        201 => b.body["credentials"].clone(),
        202 => {
            assert!(
                b.body.get("credentials").is_none(),
                "202 must not carry credentials: {}",
                b.text
            );
            let op = b.operation();
            let (state, last) = osb.wait_binding(&id, &bid, op.as_deref(), OP_TIMEOUT).await;
            assert_eq!(state, "succeeded", "{last}");
            let f = osb.get_binding(&id, &bid).await;
            f.expect(200);
            f.body["credentials"].clone()
        }
        _ => panic!("async bind: {} {}", b.status, b.text),
    };
    assert_eq!(creds["message"], "hello");

    let u = osb
        .unbind(&id, &bid, echo::SERVICE, echo::PLAN_FREE, true)
        .await;
    match u.status.as_u16() {
        200 => {}
        202 => {
            let op = u.operation();
            let (state, _) = osb.wait_binding(&id, &bid, op.as_deref(), OP_TIMEOUT).await;
            assert!(
                state == "succeeded" || state == "gone",
                "unbind ended {state}"
            );
        }
        _ => panic!("async unbind: {} {}", u.status, u.text),
    }
    osb.get_binding(&id, &bid).await.expect(404);

    deprovision_async(&stack, &id, echo::SERVICE, echo::PLAN_FREE).await;
    stack.assert_instance_gone(&id, &[&bid]).await;
}

/// Deprovisions with `accepts_incomplete=true` and waits until it is done.
async fn deprovision_async(stack: &Stack, id: &str, service: &str, plan: &str) {
    let d = stack.osb.deprovision(id, service, plan, true).await;
    match d.status.as_u16() {
        200 => {}
        202 => {
            let op = d.operation();
            let (state, last) = stack.osb.wait_instance(id, op.as_deref(), OP_TIMEOUT).await;
            // 410 while polling an async delete means done (spec).
            assert!(
                state == "gone" || state == "succeeded",
                "deprovision ended {state}: {last}"
            );
        }
        _ => panic!("async deprovision: {} {}", d.status, d.text),
    }
    stack.osb.get_instance(id).await.expect(404);
}

/// Checks what the node runs for a provisioned redis instance and returns
/// its pid.
async fn assert_redis_running(stack: &Stack, id: &str) -> i32 {
    let inst = stack
        .node_instance(id)
        .await
        .unwrap_or_else(|| panic!("node does not hold {id}"));
    assert_eq!(inst.state(), InstanceState::Running, "{inst:?}");
    assert_eq!(inst.service, "redis");
    let (lo, hi) = stack.port_range;
    assert!(
        (u32::from(lo)..=u32::from(hi)).contains(&inst.port),
        "port {} outside {lo}..={hi}",
        inst.port
    );
    let pid = i32::try_from(inst.pid).expect("pid");
    assert!(procs::is_alive(pid), "daemon pid {pid} is not running");
    let dir = stack.node_data_dir.join(id);
    assert!(dir.is_dir(), "instance directory {} missing", dir.display());
    let running = procs::processes_under(&dir);
    assert_eq!(
        running.len(),
        1,
        "exactly one daemon per instance: {running:?}"
    );
    assert!(running[0].cmdline.contains("redis-server"), "{running:?}");
    // The lease is the port the daemon was given.
    let a = stack.allocations(Some(id)).await;
    assert_eq!(a.leases.len(), 1, "{a:?}");
    assert_eq!(a.leases[0].port, inst.port);
    assert_eq!(a.leases[0].pool, NODE_ID);
    pid
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_sync_lifecycle_with_a_real_client() {
    let stack = Stack::start_default().await;
    let osb = &stack.osb;
    let id = new_id();
    let bid = new_id();
    let body = provision_body(redis::SERVICE, redis::PLAN_SMALL, json!({}));

    osb.provision(&id, &body, false).await.expect(201);
    let pid = assert_redis_running(&stack, &id).await;
    osb.provision(&id, &body, false).await.expect(200);

    let b = osb
        .bind(
            &id,
            &bid,
            &bind_body(redis::SERVICE, redis::PLAN_SMALL),
            false,
        )
        .await;
    b.expect(201);
    let creds = RedisCreds::from_credentials(&b.body["credentials"]);
    assert_eq!(
        u32::from(creds.port),
        stack.node_instance(&id).await.expect("instance").port
    );
    assert_eq!(b.body["credentials"]["node_id"], NODE_ID);
    creds.check_auth_set_get().await;
    // The password is not kept in a file anyone can read.
    let conf = stack.node_data_dir.join(&id).join("redis.conf");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&conf).expect("redis.conf").permissions(),
    );
    assert_eq!(mode & 0o077, 0, "redis.conf is mode {mode:o}");

    // Every binding is a Redis user of its own, and unbinding one locks
    // exactly that one out.
    let bid2 = new_id();
    let b2 = osb
        .bind(
            &id,
            &bid2,
            &bind_body(redis::SERVICE, redis::PLAN_SMALL),
            false,
        )
        .await;
    b2.expect(201);
    let creds2 = RedisCreds::from_credentials(&b2.body["credentials"]);
    assert!(creds.username.is_some(), "a binding has its own user");
    assert_ne!(creds.username, creds2.username);
    assert_ne!(creds.password, creds2.password);
    creds2.check_auth_set_get().await;
    osb.unbind(&id, &bid, redis::SERVICE, redis::PLAN_SMALL, false)
        .await
        .expect(200);
    assert!(
        !creds.auth_accepted().await,
        "unbound credentials still work"
    );
    assert!(
        creds2.auth_accepted().await,
        "unbinding one binding broke another"
    );
    osb.unbind(&id, &bid2, redis::SERVICE, redis::PLAN_SMALL, false)
        .await
        .expect(200);
    assert!(
        !creds2.auth_accepted().await,
        "unbound credentials still work"
    );

    osb.deprovision(&id, redis::SERVICE, redis::PLAN_SMALL, false)
        .await
        .expect(200);
    stack.assert_instance_gone(&id, &[&bid, &bid2]).await;
    assert!(
        !procs::is_alive(pid),
        "redis-server {pid} survived deprovision"
    );
    assert!(
        !creds.port_open().await,
        "port {} still accepts connections",
        creds.port
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_async_lifecycle_with_a_real_client() {
    let stack = Stack::start_default().await;
    let osb = &stack.osb;
    let id = new_id();
    let bid = new_id();
    let body = provision_body(redis::SERVICE, redis::PLAN_SMALL, json!({}));

    let r = osb.provision(&id, &body, true).await;
    r.expect(202);
    let op = r.operation();
    let (state, last) = osb.wait_instance(&id, op.as_deref(), OP_TIMEOUT).await;
    assert_eq!(state, "succeeded", "{last}");
    osb.get_instance(&id).await.expect(200);
    let pid = assert_redis_running(&stack, &id).await;

    let b = osb
        .bind(
            &id,
            &bid,
            &bind_body(redis::SERVICE, redis::PLAN_SMALL),
            true,
        )
        .await;
    let creds_json = match b.status.as_u16() {
        201 => b.body["credentials"].clone(),
        202 => {
            let op = b.operation();
            let (state, last) = osb.wait_binding(&id, &bid, op.as_deref(), OP_TIMEOUT).await;
            assert_eq!(state, "succeeded", "{last}");
            let f = osb.get_binding(&id, &bid).await;
            f.expect(200);
            f.body["credentials"].clone()
        }
        _ => panic!("async bind: {} {}", b.status, b.text),
    };
    let creds = RedisCreds::from_credentials(&creds_json);
    creds.check_auth_set_get().await;

    let u = osb
        .unbind(&id, &bid, redis::SERVICE, redis::PLAN_SMALL, true)
        .await;
    if u.status.as_u16() == 202 {
        let op = u.operation();
        osb.wait_binding(&id, &bid, op.as_deref(), OP_TIMEOUT).await;
    } else {
        u.expect(200);
    }
    deprovision_async(&stack, &id, redis::SERVICE, redis::PLAN_SMALL).await;
    stack.assert_instance_gone(&id, &[&bid]).await;
    assert!(
        !procs::is_alive(pid),
        "redis-server {pid} survived deprovision"
    );
    assert!(!creds.port_open().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_parameters_reach_the_daemon() {
    let stack = Stack::start_default().await;
    let id = new_id();
    let bid = new_id();
    let body = provision_body(
        redis::SERVICE,
        redis::PLAN_SMALL,
        json!({"maxmemory": "32mb"}),
    );
    stack.osb.provision(&id, &body, false).await.expect(201);
    let b = stack
        .osb
        .bind(
            &id,
            &bid,
            &bind_body(redis::SERVICE, redis::PLAN_SMALL),
            false,
        )
        .await;
    b.expect(201);
    let creds = RedisCreds::from_credentials(&b.body["credentials"]);
    assert_eq!(
        creds.info_field("memory", "maxmemory").await,
        (32u64 << 20).to_string()
    );

    // And a plan's own variable when no parameter overrides it.
    let id2 = new_id();
    let bid2 = new_id();
    let body2 = provision_body(redis::SERVICE, redis::PLAN_LARGE, json!({}));
    stack.osb.provision(&id2, &body2, false).await.expect(201);
    let b2 = stack
        .osb
        .bind(
            &id2,
            &bid2,
            &bind_body(redis::SERVICE, redis::PLAN_LARGE),
            false,
        )
        .await;
    b2.expect(201);
    let creds2 = RedisCreds::from_credentials(&b2.body["credentials"]);
    assert_eq!(
        creds2.info_field("memory", "maxmemory").await,
        (256u64 << 20).to_string()
    );
    assert_ne!(creds.port, creds2.port);
    assert_ne!(
        creds.password, creds2.password,
        "every instance has its own password"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_provision_is_reported_and_releases_everything() {
    let stack = Stack::start(
        StackOptions::default().service("failing.yaml", svcbroker_tests::fixtures::FAILING_YAML),
    )
    .await;
    let osb = &stack.osb;
    let id = new_id();
    let body = provision_body(failing::SERVICE, failing::PLAN, json!({}));

    let r = osb.provision(&id, &body, true).await;
    r.expect(202);
    let (state, last) = osb
        .wait_instance(&id, r.operation().as_deref(), OP_TIMEOUT)
        .await;
    assert_eq!(state, "failed", "{last}");
    assert!(
        last["description"].as_str().is_some_and(|d| !d.is_empty()),
        "a failed operation says why: {last}"
    );
    // Failed cleanly: nothing runs and nothing stays leased, before any
    // orphan mitigation.
    let dir = stack.node_data_dir.join(&id);
    assert!(procs::processes_under(&dir).is_empty());
    let a = stack.allocations(Some(&id)).await;
    assert!(a.leases.is_empty(), "lease kept after failure: {a:?}");
    osb.get_instance(&id).await.expect(404);

    // The platform's orphan mitigation: a delete succeeds or finds nothing.
    let d = osb
        .deprovision(&id, failing::SERVICE, failing::PLAN, true)
        .await;
    match d.status.as_u16() {
        200 | 410 => {}
        202 => {
            osb.wait_instance(&id, d.operation().as_deref(), OP_TIMEOUT)
                .await;
        }
        _ => panic!("deprovision of a failed instance: {} {}", d.status, d.text),
    }
    stack.assert_instance_gone(&id, &[]).await;

    // Synchronously, the failure is the answer: a 5xx with an error body.
    let id2 = new_id();
    let s = osb.provision(&id2, &body, false).await;
    assert!(
        s.status.is_server_error(),
        "sync failed provision: {} {}",
        s.status,
        s.text
    );
    let desc = s.body["description"].as_str().unwrap_or_default();
    assert!(
        !desc.is_empty(),
        "error body needs a description: {}",
        s.text
    );
    let left = stack.allocations(Some(&id2)).await.leases;
    assert!(
        left.is_empty(),
        "lease kept after a failed sync provision: {left:?}"
    );
}

/// A service whose program this host lacks (the seed's Elasticsearch on a
/// node without it).
const MISSING_EXECUTABLE_YAML: &str = r#"
id: 0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d1
name: no-such-daemon
description: needs a program no host has (tests only)
model: process
process:
  command: [svcbroker-test-no-such-daemon, --port, "{{port}}"]
credentials:
  port: "{{port}}"
plans:
  - id: 0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d2
    name: default
    description: the only plan
"#;

#[tokio::test(flavor = "multi_thread")]
async fn services_without_their_executables_are_not_offered() {
    let stack = Stack::start(
        StackOptions::default().service("no-such-daemon.yaml", MISSING_EXECUTABLE_YAML),
    )
    .await;
    let info = stack
        .node_agent()
        .await
        .describe(svcbroker_proto::v1::DescribeRequest {})
        .await
        .expect("Describe")
        .into_inner();
    assert!(
        info.services.iter().any(|s| s == "redis"),
        "{:?}",
        info.services
    );
    assert!(
        !info.services.iter().any(|s| s == "no-such-daemon"),
        "offered without its executable: {:?}",
        info.services
    );

    // No node can take it: a retryable 503 with an error body, and nothing
    // is left behind.
    let before = stack.snapshot().await;
    let id = new_id();
    let body = provision_body(
        "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d1",
        "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d2",
        json!({}),
    );
    for accepts_incomplete in [false, true] {
        let r = stack.osb.provision(&id, &body, accepts_incomplete).await;
        svcbroker_tests::assert_error(&r, 503, None);
        assert!(r.header("retry-after").is_some(), "503 without Retry-After");
    }
    assert_eq!(stack.snapshot().await, before);
    stack.osb.get_instance(&id).await.expect(404);
}
