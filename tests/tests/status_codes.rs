//! Every status code the OSB spec assigns, with its error body: 200, 201,
//! 202, 400, 401, 404, 409, 410, 412, 422 (AsyncRequired and
//! ConcurrencyError), plus the request identity header on all of them.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use svcbroker_tests::fixtures::{SLOW_REDIS_YAML, echo, slow_redis};
use svcbroker_tests::{Osb, Stack, StackOptions, assert_error, bind_body, new_id, provision_body};

const OP_TIMEOUT: Duration = Duration::from_secs(60);

fn slow_stack_opts() -> StackOptions {
    StackOptions::default().service("slow-redis.yaml", SLOW_REDIS_YAML)
}

#[tokio::test(flavor = "multi_thread")]
async fn created_then_ok_for_an_identical_repeat() {
    let stack = Stack::start_default().await;
    let id = new_id();
    let body = provision_body(echo::SERVICE, echo::PLAN_FREE, json!({"message": "a"}));
    stack.osb.provision(&id, &body, false).await.expect(201);
    let again = stack.osb.provision(&id, &body, false).await;
    again.expect(200);
    assert!(again.body.is_object(), "{}", again.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn conflict_for_same_id_with_other_attributes() {
    let stack = Stack::start_default().await;
    let osb = &stack.osb;
    let id = new_id();
    let body = provision_body(echo::SERVICE, echo::PLAN_FREE, json!({"message": "a"}));
    osb.provision(&id, &body, false).await.expect(201);

    let other_params = provision_body(echo::SERVICE, echo::PLAN_FREE, json!({"message": "b"}));
    let r = osb.provision(&id, &other_params, false).await;
    assert_error(&r, 409, None);
    let other_plan = provision_body(echo::SERVICE, echo::PLAN_LOUD, json!({"message": "a"}));
    let r = osb.provision(&id, &other_plan, false).await;
    assert_error(&r, 409, None);
    let r = osb.provision(&id, &other_params, true).await;
    assert_error(&r, 409, None);

    // Unchanged: the original plan and parameters.
    let got = osb.get_instance(&id).await;
    got.expect(200);
    assert_eq!(got.body["plan_id"], echo::PLAN_FREE);
    if let Some(p) = got.body.get("parameters") {
        assert_eq!(p["message"], "a", "{}", got.text);
    }
    let bid = new_id();
    let b = osb
        .bind(&id, &bid, &bind_body(echo::SERVICE, echo::PLAN_FREE), false)
        .await;
    b.expect(201);
    assert_eq!(b.body["credentials"]["message"], "a");

    // Same for a binding id reused with other parameters.
    let mut other = bind_body(echo::SERVICE, echo::PLAN_FREE);
    other["parameters"] = json!({"x": 1});
    let r = osb.bind(&id, &bid, &other, false).await;
    assert_error(&r, 409, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn accepted_while_in_progress_with_the_same_operation() {
    let stack = Stack::start(slow_stack_opts()).await;
    let osb = &stack.osb;
    let id = new_id();
    let body = provision_body(slow_redis::SERVICE, slow_redis::PLAN, json!({}));
    let first = osb.provision(&id, &body, true).await;
    first.expect(202);
    let op = first.operation();

    // The daemon needs 3 s to start: these all happen while in progress.
    let again = osb.provision(&id, &body, true).await;
    again.expect(202);
    assert_eq!(
        again.operation(),
        op,
        "a re-sent PUT answers the original operation"
    );
    let poll = osb.last_operation(&id, op.as_deref()).await;
    poll.expect(200);
    assert_eq!(poll.body["state"], "in progress", "{}", poll.text);
    // Spec "Fetching a Service Instance": 404 while provisioning.
    osb.get_instance(&id).await.expect(404);

    let (state, last) = osb.wait_instance(&id, op.as_deref(), OP_TIMEOUT).await;
    assert_eq!(state, "succeeded", "{last}");
    osb.get_instance(&id).await.expect(200);
}

#[tokio::test(flavor = "multi_thread")]
async fn unprocessable_concurrency_error_while_an_operation_runs() {
    let stack = Stack::start(slow_stack_opts()).await;
    let osb = &stack.osb;
    let id = new_id();
    let body = provision_body(slow_redis::SERVICE, slow_redis::PLAN, json!({}));
    let first = osb.provision(&id, &body, true).await;
    first.expect(202);
    let op = first.operation();

    let update = json!({"service_id": slow_redis::SERVICE, "parameters": {}});
    let r = osb.update(&id, &update, true).await;
    assert_error(&r, 422, Some("ConcurrencyError"));
    let bid = new_id();
    let r = osb
        .bind(
            &id,
            &bid,
            &bind_body(slow_redis::SERVICE, slow_redis::PLAN),
            true,
        )
        .await;
    assert!(
        r.status.as_u16() == 422 || r.status.as_u16() == 404,
        "bind while provisioning: {} {}",
        r.status,
        r.text
    );
    if r.status.as_u16() == 422 {
        assert_error(&r, 422, Some("ConcurrencyError"));
    }

    // The refused requests changed nothing: the provision completes.
    let (state, last) = osb.wait_instance(&id, op.as_deref(), OP_TIMEOUT).await;
    assert_eq!(state, "succeeded", "{last}");
    osb.get_binding(&id, &bid).await.expect(404);
}

#[tokio::test(flavor = "multi_thread")]
async fn unprocessable_async_required() {
    let stack = Stack::start(slow_stack_opts()).await;
    let osb = &stack.osb;
    let id = new_id();
    let before = stack.snapshot().await;
    let body = provision_body(slow_redis::SERVICE, slow_redis::PLAN, json!({}));
    let r = osb.provision(&id, &body, false).await;
    assert_error(&r, 422, Some("AsyncRequired"));
    assert_eq!(stack.snapshot().await, before, "a 422 changed state");
    osb.get_instance(&id).await.expect(404);
    osb.last_operation(&id, None).await.expect(404);

    // Once it exists, deleting it also needs accepts_incomplete.
    let r = osb.provision(&id, &body, true).await;
    r.expect(202);
    let (state, _) = osb
        .wait_instance(&id, r.operation().as_deref(), OP_TIMEOUT)
        .await;
    assert_eq!(state, "succeeded");
    let r = osb
        .deprovision(&id, slow_redis::SERVICE, slow_redis::PLAN, false)
        .await;
    assert_error(&r, 422, Some("AsyncRequired"));
    osb.get_instance(&id).await.expect(200);
    let update = json!({"service_id": slow_redis::SERVICE, "parameters": {}});
    let r = osb.update(&id, &update, false).await;
    assert_error(&r, 422, Some("AsyncRequired"));

    let d = osb
        .deprovision(&id, slow_redis::SERVICE, slow_redis::PLAN, true)
        .await;
    d.expect(202);
    let (state, _) = osb
        .wait_instance(&id, d.operation().as_deref(), OP_TIMEOUT)
        .await;
    assert!(state == "gone" || state == "succeeded", "{state}");
    stack.assert_instance_gone(&id, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gone_and_not_found() {
    let stack = Stack::start_default().await;
    let osb = &stack.osb;
    let missing = new_id();
    let r = osb
        .deprovision(&missing, echo::SERVICE, echo::PLAN_FREE, false)
        .await;
    r.expect(410);
    assert!(
        r.body.is_object(),
        "410 body must be a JSON object: {}",
        r.text
    );
    osb.deprovision(&missing, echo::SERVICE, echo::PLAN_FREE, true)
        .await
        .expect(410);
    osb.get_instance(&missing).await.expect(404);
    osb.last_operation(&missing, None).await.expect(404);

    let id = new_id();
    osb.provision(
        &id,
        &provision_body(echo::SERVICE, echo::PLAN_FREE, json!({})),
        false,
    )
    .await
    .expect(201);
    let nb = new_id();
    let r = osb
        .unbind(&id, &nb, echo::SERVICE, echo::PLAN_FREE, false)
        .await;
    r.expect(410);
    assert!(r.body.is_object(), "{}", r.text);
    osb.get_binding(&id, &nb).await.expect(404);
    osb.binding_last_operation(&id, &nb, None).await.expect(404);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_request_for_malformed_or_incomplete_bodies() {
    let stack = Stack::start_default().await;
    let id = new_id();
    let before = stack.snapshot().await;
    let cases = [
        "{\"service_id\": ",
        "[]",
        "null",
        "{}",
        &format!("{{\"plan_id\": \"{}\"}}", echo::PLAN_FREE),
        &format!("{{\"service_id\": \"{}\"}}", echo::SERVICE),
        &format!(
            "{{\"service_id\": 7, \"plan_id\": \"{}\"}}",
            echo::PLAN_FREE
        ),
    ];
    for body in cases {
        let r = Osb::send(
            stack
                .osb
                .request(Method::PUT, &format!("/v2/service_instances/{id}"))
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await;
        assert_error(&r, 400, None);
    }
    // Deprovision requires service_id and plan_id.
    let r = Osb::send(
        stack
            .osb
            .request(Method::DELETE, &format!("/v2/service_instances/{id}")),
    )
    .await;
    assert_error(&r, 400, None);
    assert_eq!(stack.snapshot().await, before);
    stack.osb.get_instance(&id).await.expect(404);
}

#[tokio::test(flavor = "multi_thread")]
async fn unauthorized_without_the_right_basic_auth() {
    let stack = Stack::start_default().await;
    let id = new_id();
    let before = stack.snapshot().await;
    let body = provision_body(echo::SERVICE, echo::PLAN_FREE, json!({}));
    let wrong_password = stack.osb.with_auth(&stack.osb.username, "wrong");
    let wrong_user = stack.osb.with_auth("someone", &stack.osb.password);
    let empty = stack.osb.with_auth("", "");
    for client in [&wrong_password, &wrong_user, &empty] {
        let r = client.catalog().await;
        r.expect(401);
        assert!(
            r.header("www-authenticate")
                .is_some_and(|v| v.starts_with("Basic")),
            "401 must challenge for Basic auth: {:?}",
            r.headers
        );
        client.provision(&id, &body, false).await.expect(401);
    }
    let no_auth = Osb::send(
        stack
            .osb
            .bare(Method::GET, "/v2/catalog")
            .header("X-Broker-API-Version", "2.17"),
    )
    .await;
    no_auth.expect(401);
    for header in ["Bearer abc", "Basic !!!not-base64", "Basic Zm9v"] {
        let r = Osb::send(
            stack
                .osb
                .bare(Method::GET, "/v2/catalog")
                .header("X-Broker-API-Version", "2.17")
                .header("Authorization", header),
        )
        .await;
        r.expect(401);
    }
    assert_eq!(stack.snapshot().await, before);
    stack.osb.get_instance(&id).await.expect(404);
}

#[tokio::test(flavor = "multi_thread")]
async fn precondition_failed_without_a_supported_api_version() {
    let stack = Stack::start_default().await;
    let osb = &stack.osb;
    let versioned = |v: Option<&str>| {
        let req = osb
            .bare(Method::GET, "/v2/catalog")
            .basic_auth(&osb.username, Some(&osb.password));
        match v {
            Some(v) => req.header("X-Broker-API-Version", v),
            None => req,
        }
    };
    assert_error(&Osb::send(versioned(None)).await, 412, None);
    assert_error(&Osb::send(versioned(Some("2.12"))).await, 412, None);
    assert_error(&Osb::send(versioned(Some("1.0"))).await, 412, None);
    let garbage = Osb::send(versioned(Some("banana"))).await;
    assert!(
        matches!(garbage.status.as_u16(), 400 | 412),
        "unparsable version: {} {}",
        garbage.status,
        garbage.text
    );
    Osb::send(versioned(Some("2.13"))).await.expect(200);
    Osb::send(versioned(Some("2.17"))).await.expect(200);

    // A mutating request without the header changes nothing.
    let id = new_id();
    let r = Osb::send(
        osb.bare(Method::PUT, &format!("/v2/service_instances/{id}"))
            .basic_auth(&osb.username, Some(&osb.password))
            .json(&provision_body(echo::SERVICE, echo::PLAN_FREE, json!({}))),
    )
    .await;
    assert_error(&r, 412, None);
    osb.get_instance(&id).await.expect(404);
}

#[tokio::test(flavor = "multi_thread")]
async fn request_identity_is_echoed_on_every_answer() {
    let stack = Stack::start_default().await;
    let osb = &stack.osb;
    let id = new_id();
    let check = |r: &svcbroker_tests::Resp, sent: &str, what: &str| {
        assert_eq!(
            r.header("x-broker-api-request-identity"),
            Some(sent),
            "{what} ({}) must echo X-Broker-API-Request-Identity",
            r.status
        );
    };
    let with_identity = |req: reqwest::RequestBuilder| {
        let rid = new_id();
        (
            req.header("X-Broker-API-Request-Identity", rid.clone()),
            rid,
        )
    };

    let (req, rid) = with_identity(osb.request(Method::GET, "/v2/catalog"));
    check(&Osb::send(req).await, &rid, "catalog 200");

    let (req, rid) = with_identity(
        osb.request(Method::PUT, &format!("/v2/service_instances/{id}"))
            .json(&provision_body(echo::SERVICE, echo::PLAN_FREE, json!({}))),
    );
    let r = Osb::send(req).await;
    r.expect(201);
    check(&r, &rid, "provision 201");

    let (req, rid) = with_identity(
        osb.request(Method::PUT, &format!("/v2/service_instances/{}", new_id()))
            .header("content-type", "application/json")
            .body("{"),
    );
    check(&Osb::send(req).await, &rid, "malformed 400");

    let (req, rid) =
        with_identity(osb.request(Method::GET, &format!("/v2/service_instances/{}", new_id())));
    check(&Osb::send(req).await, &rid, "missing 404");

    let (req, rid) = with_identity(osb.request(
        Method::DELETE,
        &format!(
            "/v2/service_instances/{}?service_id={}&plan_id={}",
            new_id(),
            echo::SERVICE,
            echo::PLAN_FREE
        ),
    ));
    check(&Osb::send(req).await, &rid, "gone 410");

    let (req, rid) = with_identity(
        osb.bare(Method::GET, "/v2/catalog")
            .basic_auth(&osb.username, Some(&osb.password)),
    );
    check(&Osb::send(req).await, &rid, "version 412");

    let (req, rid) = with_identity(
        osb.bare(Method::GET, "/v2/catalog")
            .header("X-Broker-API-Version", "2.17"),
    );
    check(&Osb::send(req).await, &rid, "unauthorized 401");
}

/// Bodies schemathesis found accepted although malformed (conformance/FINDINGS.md
/// A4-A7): a `null` where the spec types an object, an empty or missing guid,
/// and `previous_values` of the wrong types are each a 400 that changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn bad_request_for_wrongly_typed_optional_fields() {
    let stack = Stack::start_default().await;
    let id = new_id();
    let good = provision_body(echo::SERVICE, echo::PLAN_FREE, json!({"message": "a"}));
    for (key, value) in [
        ("parameters", json!(null)),
        ("context", json!(null)),
        ("maintenance_info", json!(null)),
        ("space_guid", json!("")),
        ("organization_guid", json!("")),
    ] {
        let mut body = good.clone();
        body[key] = value;
        assert_error(&stack.osb.provision(&id, &body, false).await, 400, None);
    }
    // Deprecated, but REQUIRED ("organization_guid*", "space_guid*").
    for key in ["organization_guid", "space_guid"] {
        let mut body = good.clone();
        body.as_object_mut().unwrap().remove(key);
        let r = stack.osb.provision(&id, &body, true).await;
        assert_error(&r, 400, None);
        assert!(r.text.contains(key), "{}", r.text);
    }
    stack.osb.get_instance(&id).await.expect(404);

    stack.osb.provision(&id, &good, false).await.expect(201);
    let mut bind = bind_body(echo::SERVICE, echo::PLAN_FREE);
    bind["parameters"] = json!(null);
    let bid = new_id();
    assert_error(&stack.osb.bind(&id, &bid, &bind, false).await, 400, None);
    stack.osb.get_binding(&id, &bid).await.expect(404);

    for previous in [
        json!({"space_id": {}}),
        json!({"plan_id": 7}),
        json!({"service_id": null}),
        json!({"organization_id": ["org"]}),
        json!({"maintenance_info": "1.0.0"}),
        json!("old"),
        json!(null),
    ] {
        let body = json!({
            "service_id": echo::SERVICE,
            "parameters": {"message": "b"},
            "previous_values": previous,
        });
        assert_error(&stack.osb.update(&id, &body, false).await, 400, None);
    }
    let got = stack.osb.get_instance(&id).await;
    got.expect(200);
    assert_eq!(
        got.body["parameters"],
        json!({"message": "a"}),
        "{}",
        got.text
    );

    // Well-typed previous_values are informational and accepted.
    let body = json!({
        "service_id": echo::SERVICE,
        "parameters": {"message": "b"},
        "previous_values": {"plan_id": echo::PLAN_FREE, "space_id": "space-test"},
    });
    stack.osb.update(&id, &body, false).await.expect(200);
    let got = stack.osb.get_instance(&id).await;
    got.expect(200);
    assert_eq!(
        got.body["parameters"],
        json!({"message": "b"}),
        "{}",
        got.text
    );
}
