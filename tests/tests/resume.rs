//! A gateway that dies mid-operation (SIGKILL: no chance to clean up or
//! save anything) resumes the operation when it restarts on the same
//! database, without duplicating or leaking anything.

use std::time::Duration;

use serde_json::json;
use svcbroker_tests::fixtures::{SLOW_REDIS_YAML, slow_redis};
use svcbroker_tests::{
    GatewayMode, RedisCreds, Stack, StackOptions, bind_body, eventually, new_id, procs,
    provision_body,
};

const OP_TIMEOUT: Duration = Duration::from_secs(90);

async fn slow_stack() -> Stack {
    Stack::start(StackOptions {
        gateway: GatewayMode::Process,
        ..StackOptions::default().service("slow-redis.yaml", SLOW_REDIS_YAML)
    })
    .await
}

/// Checks that instance `id` runs exactly once, holds exactly one lease and
/// one credential, and that a binding's credentials work.
async fn assert_single_working_instance(stack: &Stack, id: &str) -> String {
    let dir = stack.node_data_dir.join(id);
    let running = procs::processes_under(&dir);
    assert_eq!(
        running.len(),
        1,
        "exactly one daemon after resume: {running:?}"
    );
    let a = stack.allocations(Some(id)).await;
    assert_eq!(a.leases.len(), 1, "{a:?}");
    assert_eq!(a.credentials.len(), 1, "{a:?}");
    let node = stack
        .node_instance(id)
        .await
        .expect("node holds the instance");
    assert_eq!(node.port, a.leases[0].port);

    let bid = new_id();
    let b = stack
        .osb
        .bind(
            id,
            &bid,
            &bind_body(slow_redis::SERVICE, slow_redis::PLAN),
            true,
        )
        .await;
    let creds = match b.status.as_u16() {
        201 => b.body["credentials"].clone(),
        202 => {
            let (state, last) = stack
                .osb
                .wait_binding(id, &bid, b.operation().as_deref(), OP_TIMEOUT)
                .await;
            assert_eq!(state, "succeeded", "{last}");
            stack.osb.get_binding(id, &bid).await.body["credentials"].clone()
        }
        _ => panic!("bind after resume: {} {}", b.status, b.text),
    };
    let creds = RedisCreds::from_credentials(&creds);
    assert_eq!(u32::from(creds.port), node.port);
    creds.check_auth_set_get().await;
    bid
}

async fn deprovision_and_check(stack: &Stack, id: &str, bid: &str) {
    let u = stack
        .osb
        .unbind(id, bid, slow_redis::SERVICE, slow_redis::PLAN, true)
        .await;
    if u.status.as_u16() == 202 {
        stack
            .osb
            .wait_binding(id, bid, u.operation().as_deref(), OP_TIMEOUT)
            .await;
    } else {
        u.expect(200);
    }
    let d = stack
        .osb
        .deprovision(id, slow_redis::SERVICE, slow_redis::PLAN, true)
        .await;
    d.expect(202);
    let (state, last) = stack
        .osb
        .wait_instance(id, d.operation().as_deref(), OP_TIMEOUT)
        .await;
    assert!(state == "gone" || state == "succeeded", "{last}");
    stack.assert_instance_gone(id, &[bid]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_killed_while_the_node_starts_the_daemon() {
    let mut stack = slow_stack().await;
    let id = new_id();
    let body = provision_body(slow_redis::SERVICE, slow_redis::PLAN, json!({}));
    let r = stack.osb.provision(&id, &body, true).await;
    r.expect(202);
    let op = r.operation();

    // Mid-operation for sure: the node has begun the instance, whose
    // daemon needs 3 s before it listens.
    eventually(
        "the node to start the instance",
        Duration::from_secs(20),
        || async { stack.node_instance(&id).await },
    )
    .await;
    stack.kill_gateway();
    // While the gateway is down the daemon keeps starting on the node.
    stack.start_gateway_process().await;

    let (state, last) = stack
        .osb
        .wait_instance(&id, op.as_deref(), OP_TIMEOUT)
        .await;
    assert_eq!(state, "succeeded", "{last}\n{}", stack.gateway_log_text());
    let bid = assert_single_working_instance(&stack, &id).await;
    deprovision_and_check(&stack, &id, &bid).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_killed_right_after_accepting() {
    let mut stack = slow_stack().await;
    let id = new_id();
    let body = provision_body(slow_redis::SERVICE, slow_redis::PLAN, json!({}));
    let r = stack.osb.provision(&id, &body, true).await;
    r.expect(202);
    let op = r.operation();
    stack.kill_gateway();
    stack.start_gateway_process().await;

    // The platform re-sends the PUT (it never saw an answer it trusts):
    // same operation, still in progress or already done.
    let again = stack.osb.provision(&id, &body, true).await;
    assert!(
        matches!(again.status.as_u16(), 200 | 202),
        "{} {}",
        again.status,
        again.text
    );
    if again.status.as_u16() == 202 {
        assert_eq!(again.operation(), op);
    }
    let (state, last) = stack
        .osb
        .wait_instance(&id, op.as_deref(), OP_TIMEOUT)
        .await;
    assert_eq!(state, "succeeded", "{last}\n{}", stack.gateway_log_text());
    let bid = assert_single_working_instance(&stack, &id).await;
    deprovision_and_check(&stack, &id, &bid).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_killed_mid_deprovision() {
    let mut stack = slow_stack().await;
    let id = new_id();
    let body = provision_body(slow_redis::SERVICE, slow_redis::PLAN, json!({}));
    let r = stack.osb.provision(&id, &body, true).await;
    r.expect(202);
    let (state, last) = stack
        .osb
        .wait_instance(&id, r.operation().as_deref(), OP_TIMEOUT)
        .await;
    assert_eq!(state, "succeeded", "{last}");

    let d = stack
        .osb
        .deprovision(&id, slow_redis::SERVICE, slow_redis::PLAN, true)
        .await;
    d.expect(202);
    let op = d.operation();
    stack.kill_gateway();
    stack.start_gateway_process().await;
    let (state, last) = stack
        .osb
        .wait_instance(&id, op.as_deref(), OP_TIMEOUT)
        .await;
    assert!(
        state == "gone" || state == "succeeded",
        "{last}\n{}",
        stack.gateway_log_text()
    );
    stack.assert_instance_gone(&id, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_stopped_gracefully_mid_provision_resumes() {
    let mut stack = slow_stack().await;
    let id = new_id();
    let body = provision_body(slow_redis::SERVICE, slow_redis::PLAN, json!({}));
    let r = stack.osb.provision(&id, &body, true).await;
    r.expect(202);
    let op = r.operation();
    let status = stack.terminate_gateway(Duration::from_secs(15)).await;
    assert!(status.success(), "gateway exit on SIGTERM: {status}");
    stack.start_gateway_process().await;
    let (state, last) = stack
        .osb
        .wait_instance(&id, op.as_deref(), OP_TIMEOUT)
        .await;
    assert_eq!(state, "succeeded", "{last}\n{}", stack.gateway_log_text());
    let bid = assert_single_working_instance(&stack, &id).await;
    deprovision_and_check(&stack, &id, &bid).await;
}
