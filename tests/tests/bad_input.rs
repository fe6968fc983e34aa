//! Hostile and broken requests: each gets a clear error and changes
//! nothing, checked through the OSB API and through what the allocator,
//! the node, the data directory and /proc hold. Malformed bodies and
//! unknown service/plan ids are swept systematically, endpoint by
//! endpoint, in `bad_input_corpus.rs`.

use reqwest::Method;
use serde_json::json;
use svcbroker_tests::fixtures::{echo, redis};
use svcbroker_tests::raw::chunked;
use svcbroker_tests::{Osb, Stack, assert_error, bind_body, new_id, provision_body};

#[tokio::test(flavor = "multi_thread")]
async fn schema_violations_name_the_failing_path_and_change_nothing() {
    let stack = Stack::start_default().await;
    let osb = &stack.osb;
    let id = new_id();
    let before = stack.snapshot().await;

    let r = osb
        .provision(
            &id,
            &provision_body(echo::SERVICE, echo::PLAN_FREE, json!({"message": 5})),
            false,
        )
        .await;
    assert_error(&r, 400, None);
    let d = r.body["description"].as_str().unwrap_or_default();
    assert!(
        d.contains("/message"),
        "description must name /message: {d}"
    );

    let long = "x".repeat(201);
    let r = osb
        .provision(
            &id,
            &provision_body(echo::SERVICE, echo::PLAN_FREE, json!({"message": long})),
            true,
        )
        .await;
    assert_error(&r, 400, None);
    let d = r.body["description"].as_str().unwrap_or_default();
    assert!(d.contains("/message"), "{d}");
    assert!(
        !d.contains(&long),
        "the rejected value is not echoed back: {d}"
    );

    let r = osb
        .provision(
            &id,
            &provision_body(echo::SERVICE, echo::PLAN_FREE, json!({"colour": "red"})),
            false,
        )
        .await;
    assert_error(&r, 400, None);
    let d = r.body["description"].as_str().unwrap_or_default();
    assert!(
        d.contains("colour"),
        "additionalProperties names the key: {d}"
    );

    // A value that would smuggle a second directive into redis.conf.
    let sneaky = "64mb\nrequirepass hacked";
    let r = osb
        .provision(
            &id,
            &provision_body(
                redis::SERVICE,
                redis::PLAN_SMALL,
                json!({"maxmemory": sneaky}),
            ),
            false,
        )
        .await;
    assert_error(&r, 400, None);
    let d = r.body["description"].as_str().unwrap_or_default();
    assert!(d.contains("/maxmemory"), "{d}");
    assert!(
        !d.contains("hacked"),
        "the rejected value is not echoed back: {d}"
    );

    let r = osb
        .provision(
            &id,
            &provision_body(echo::SERVICE, echo::PLAN_FREE, json!("a string")),
            false,
        )
        .await;
    assert_error(&r, 400, None);

    assert_eq!(stack.snapshot().await, before);
    osb.get_instance(&id).await.expect(404);
}

#[tokio::test(flavor = "multi_thread")]
async fn control_characters_in_parameters_are_refused_up_front() {
    // The echo schema allows any string of 200 characters, but templates
    // refuse control characters: that must be a 400 at provision time, not
    // an instance that can never be bound.
    let stack = Stack::start_default().await;
    let id = new_id();
    let before = stack.snapshot().await;
    let r = stack
        .osb
        .provision(
            &id,
            &provision_body(echo::SERVICE, echo::PLAN_FREE, json!({"message": "a\nb"})),
            false,
        )
        .await;
    assert_error(&r, 400, None);
    assert_eq!(stack.snapshot().await, before);
    stack.osb.get_instance(&id).await.expect(404);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_auth_changes_nothing() {
    let stack = Stack::start_default().await;
    let id = new_id();
    let before = stack.snapshot().await;
    let bad = stack.osb.with_auth(&stack.osb.username, "guess");
    let body = provision_body(redis::SERVICE, redis::PLAN_SMALL, json!({}));
    bad.provision(&id, &body, false).await.expect(401);
    bad.provision(&id, &body, true).await.expect(401);
    bad.deprovision(&id, redis::SERVICE, redis::PLAN_SMALL, false)
        .await
        .expect(401);
    assert_eq!(stack.snapshot().await, before);
    stack.osb.get_instance(&id).await.expect(404);
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_bodies_are_refused() {
    let stack = Stack::start_default().await;
    let id = new_id();
    let before = stack.snapshot().await;
    // 4 MiB of otherwise valid JSON, over the 1 MiB default limit.
    let mut body = provision_body(echo::SERVICE, echo::PLAN_FREE, json!({}));
    body["padding"] = json!("x".repeat(4 << 20));
    let text = serde_json::to_vec(&body).unwrap();

    let r = stack
        .raw(
            &format!("PUT /v2/service_instances/{id} HTTP/1.1"),
            "",
            &text,
        )
        .await;
    assert_error(&r, 413, None);
    // Without a Content-Length the limit must hold while streaming.
    let r = stack
        .raw(
            &format!("PUT /v2/service_instances/{id} HTTP/1.1"),
            "Transfer-Encoding: chunked",
            &chunked(&text, 64 << 10),
        )
        .await;
    assert_error(&r, 413, None);
    // A Content-Length that announces too much is refused at once, before
    // any of the body arrives (a client must not hold a handler by
    // announcing a gigabyte).
    let line = format!("PUT /v2/service_instances/{id} HTTP/1.1");
    let announced = stack.raw(&line, "Content-Length: 1000000000", b"");
    let r = tokio::time::timeout(std::time::Duration::from_secs(5), announced)
        .await
        .expect("no answer to an announced 1 GB body within 5 s: the limit waits for the body");
    assert_error(&r, 413, None);

    assert_eq!(stack.snapshot().await, before);
    stack.osb.get_instance(&id).await.expect(404);
}

#[tokio::test(flavor = "multi_thread")]
async fn ids_with_slashes_or_dot_dot_are_refused() {
    let stack = Stack::start_default().await;
    let osb = &stack.osb;
    // One real instance, so binding ids are checked under an existing one.
    let id = new_id();
    let body = provision_body(echo::SERVICE, echo::PLAN_FREE, json!({}));
    osb.provision(&id, &body, false).await.expect(201);
    let before = stack.snapshot().await;

    let body_bytes = serde_json::to_vec(&body).unwrap();
    let bind_bytes = serde_json::to_vec(&bind_body(echo::SERVICE, echo::PLAN_FREE)).unwrap();
    let bad_ids = [
        "a%2Fb",
        "%2Fetc%2Fpasswd",
        "..",
        "%2E%2E",
        "..%2F..%2Ftmp",
        "x%2F..%2F..",
    ];
    for bad in bad_ids {
        let r = stack
            .raw(
                &format!("PUT /v2/service_instances/{bad} HTTP/1.1"),
                "",
                &body_bytes,
            )
            .await;
        assert_error(&r, 400, None);
        let r = stack
            .raw(
                &format!("PUT /v2/service_instances/{bad}?accepts_incomplete=true HTTP/1.1"),
                "",
                &body_bytes,
            )
            .await;
        assert_error(&r, 400, None);
        let r = stack
            .raw(
                &format!("PUT /v2/service_instances/{id}/service_bindings/{bad} HTTP/1.1"),
                "",
                &bind_bytes,
            )
            .await;
        assert_error(&r, 400, None);
        let r = stack
            .raw(
                &format!(
                    "DELETE /v2/service_instances/{bad}?service_id={}&plan_id={} HTTP/1.1",
                    echo::SERVICE,
                    echo::PLAN_FREE
                ),
                "",
                b"",
            )
            .await;
        assert!(
            matches!(r.status.as_u16(), 400 | 410),
            "DELETE {bad}: {} {}",
            r.status,
            r.text
        );
    }
    assert_eq!(stack.snapshot().await, before);
    // The real instance is untouched, and nothing escaped the data dir.
    osb.get_instance(&id).await.expect(200);
    let root = stack.dir();
    for entry in std::fs::read_dir(root).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            ["services.d", "node", "gateway.yaml", "gateway.log"].contains(&name.as_str())
                || name.ends_with(".sqlite")
                || name.contains(".sqlite-"),
            "unexpected file {name} in the stack directory"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_fields_are_ignored() {
    // Spec "Vendor Extension Fields": receivers MUST ignore unknown fields.
    let stack = Stack::start_default().await;
    let id = new_id();
    let mut body = provision_body(echo::SERVICE, echo::PLAN_FREE, json!({}));
    body["x-vendor-thing"] = json!({"a": [1, 2, 3]});
    body["context"]["x-more"] = json!(true);
    stack.osb.provision(&id, &body, false).await.expect(201);
}

#[tokio::test(flavor = "multi_thread")]
async fn binding_with_another_service_is_refused() {
    let stack = Stack::start_default().await;
    let id = new_id();
    stack
        .osb
        .provision(
            &id,
            &provision_body(echo::SERVICE, echo::PLAN_FREE, json!({})),
            false,
        )
        .await
        .expect(201);
    let before = stack.snapshot().await;
    let bid = new_id();
    let r = stack
        .osb
        .bind(
            &id,
            &bid,
            &bind_body(redis::SERVICE, redis::PLAN_SMALL),
            false,
        )
        .await;
    assert_error(&r, 400, None);
    let r = stack
        .osb
        .bind(
            &new_id(),
            &bid,
            &bind_body(echo::SERVICE, echo::PLAN_FREE),
            false,
        )
        .await;
    assert!(
        matches!(r.status.as_u16(), 400 | 404),
        "bind to a missing instance: {} {}",
        r.status,
        r.text
    );
    assert_eq!(stack.snapshot().await, before);
    stack.osb.get_binding(&id, &bid).await.expect(404);
}

#[tokio::test(flavor = "multi_thread")]
async fn deprovision_without_ids_keeps_the_instance() {
    let stack = Stack::start_default().await;
    let id = new_id();
    stack
        .osb
        .provision(
            &id,
            &provision_body(echo::SERVICE, echo::PLAN_FREE, json!({})),
            false,
        )
        .await
        .expect(201);
    for q in [
        String::new(),
        format!("?service_id={}", echo::SERVICE),
        format!("?plan_id={}", echo::PLAN_FREE),
    ] {
        let r = Osb::send(
            stack
                .osb
                .request(Method::DELETE, &format!("/v2/service_instances/{id}{q}")),
        )
        .await;
        assert_error(&r, 400, None);
    }
    stack.osb.get_instance(&id).await.expect(200);
}
