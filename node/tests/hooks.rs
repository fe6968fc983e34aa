//! Lifecycle hooks through the gRPC API: HTTP hooks against a local server
//! (the Stackato Elasticsearch model: one index per instance on a shared
//! server), command hooks, and what their failures tell the caller.

mod common;

use common::*;
use svcbroker_proto::v1::{BindRequest, DeprovisionRequest, Hook, ProvisionRequest};
use tonic::Code;

fn none_request(id: &str, hooks: Vec<Hook>) -> ProvisionRequest {
    ProvisionRequest {
        instance_id: id.into(),
        service: "elasticsearch".into(),
        plan: "default".into(),
        kind: "none".into(),
        hooks,
        ..Default::default()
    }
}

#[tokio::test]
async fn http_hooks_make_and_remove_an_index_per_instance() {
    // The "server" knows no index until it is PUT; DELETE of an unknown
    // index is a 404.
    let server = HttpRecorder::start(|method, path| match (method, path) {
        ("PUT", _) => (200, "{\"acknowledged\":true}".into()),
        ("DELETE", "/idx-gone") => (404, "no such index".into()),
        ("DELETE", _) => (200, "{}".into()),
        _ => (405, String::new()),
    })
    .await;
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    let url = |idx: &str| format!("http://elastic:s3cret@{}/{idx}?timeout=5s", server.addr);
    let put = http_hook(
        "PUT",
        &url("idx-e1"),
        &[("Content-Type", "application/json")],
        "{\"settings\":{\"number_of_shards\":1}}",
        &[],
    );

    let r = c
        .provision(none_request("e1", vec![put.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert!(r.created);
    let seen = server.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "PUT");
    assert_eq!(seen[0].path, "/idx-e1?timeout=5s");
    assert_eq!(seen[0].body, "{\"settings\":{\"number_of_shards\":1}}");
    assert_eq!(seen[0].headers["content-type"], "application/json");
    // The URL's userinfo becomes basic auth, as for any HTTP client.
    assert_eq!(
        seen[0].headers["authorization"],
        "Basic ZWxhc3RpYzpzM2NyZXQ="
    );

    // A repeated Provision runs the hooks again (they are idempotent).
    let r = c
        .provision(none_request("e1", vec![put]))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.created);
    assert_eq!(server.requests().len(), 2);

    // Deprovision runs its hooks first; an accepted 404 is success.
    let d = c
        .deprovision(DeprovisionRequest {
            instance_id: "e1".into(),
            kind: "none".into(),
            hooks: vec![
                http_hook("DELETE", &url("idx-e1"), &[], "", &[404]),
                http_hook("DELETE", &url("idx-gone"), &[], "", &[404]),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.removed);
    let seen = server.requests();
    assert_eq!(seen.len(), 4);
    assert_eq!(
        (seen[2].method.as_str(), seen[3].path.as_str()),
        ("DELETE", "/idx-gone?timeout=5s")
    );
    assert!(node.list().await.is_empty());
    node.stop().await;
}

#[tokio::test]
async fn http_hook_failures_name_method_status_and_body_but_no_secret() {
    let long_body = format!("{}TAIL-AFTER-500", "e".repeat(500));
    let body = long_body.clone();
    let server = HttpRecorder::start(move |_, path| match path.split('?').next().unwrap() {
        "/bad" => (400, body.clone()),
        "/busy" => (503, "try later".into()),
        _ => (200, String::new()),
    })
    .await;
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    let secret_headers = [("Authorization", "Bearer hunter2-header")];
    let secret_body = "{\"password\":\"hunter2-body\"}";

    let bad = http_hook(
        "put",
        &format!(
            "http://elastic:hunter2-userinfo@{}/bad?token=hunter2-query",
            server.addr
        ),
        &secret_headers,
        secret_body,
        &[],
    );
    let err = c
        .provision(none_request("e2", vec![bad]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let msg = err.message();
    assert!(
        msg.starts_with(&format!(
            "provision hook 1 of 1 (PUT http://{}/bad) answered 400 Bad Request: ",
            server.addr
        )),
        "{msg}"
    );
    assert!(msg.contains(&"e".repeat(500)), "{msg}");
    assert!(!msg.contains("TAIL-AFTER-500"), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");

    // A 5xx may pass: UNAVAILABLE, so that the gateway retries.
    let busy = http_hook(
        "POST",
        &format!("http://{}/busy", server.addr),
        &[],
        "",
        &[],
    );
    let err = c
        .provision(none_request("e3", vec![busy]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("503"), "{}", err.message());

    // Nobody listening: UNAVAILABLE, and still no userinfo in the message.
    let port = free_ports(1)[0];
    let refused = http_hook(
        "PUT",
        &format!("http://elastic:hunter2-userinfo@127.0.0.1:{port}/x"),
        &secret_headers,
        secret_body,
        &[],
    );
    let err = c
        .provision(none_request("e4", vec![refused]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .contains(&format!("(PUT http://127.0.0.1:{port}/x) failed")),
        "{}",
        err.message()
    );
    assert!(!err.message().contains("hunter2"), "{}", err.message());

    // https needs TLS, which this node is built without: refused up front.
    let tls = http_hook("PUT", "https://127.0.0.1:1/x", &[], "", &[]);
    let err = c
        .provision(none_request("e5", vec![tls]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    node.stop().await;
}

#[tokio::test]
async fn command_hook_failure_tells_exit_status_and_stderr() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    c.provision(none_request("e6", vec![])).await.unwrap();
    let failing = command_hook(
        &[
            "sh",
            "-c",
            "cat >/dev/null; echo \"first\" >&2; echo \"cannot reach server\" >&2; exit 4",
        ],
        &[("SECRET_ENV", "hunter2-env")],
        "hunter2-stdin",
    );
    let err = c
        .bind(BindRequest {
            instance_id: "e6".into(),
            binding_id: "b1".into(),
            username: "u".into(),
            password: "hunter2-password".into(),
            hooks: vec![failing],
            kind: "none".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        err.message(),
        "bind hook 1 of 1 (command sh) exited with exit status: 4: stderr:\nfirst\ncannot reach server"
    );

    // The hook sees its env and stdin.
    let ok = command_hook(
        &[
            "sh",
            "-c",
            "read -r line; [ \"$line\" = \"ACL SETUSER u\" ] && [ \"$SECRET_ENV\" = x ]",
        ],
        &[("SECRET_ENV", "x")],
        "ACL SETUSER u\n",
    );
    c.bind(BindRequest {
        instance_id: "e6".into(),
        binding_id: "b2".into(),
        hooks: vec![ok],
        kind: "none".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    node.stop().await;
}

#[tokio::test]
async fn failing_deprovision_hook_keeps_the_instance() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    let port = free_ports(1)[0];
    c.provision(python_request("p1", port, PY_LISTEN, &[&port.to_string()]))
        .await
        .unwrap();
    let err = c
        .deprovision(DeprovisionRequest {
            instance_id: "p1".into(),
            kind: "process".into(),
            hooks: vec![command_hook(&["false"], &[], "")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .starts_with("deprovision hook 1 of 1 (command false) exited")
    );
    let inst = node.instance("p1").await.expect("instance kept");
    assert!(pid_alive(inst.pid));
    assert!(instance_dir(&sb.data_dir(), "p1").exists());
    // Without the failing hook it goes.
    assert!(
        c.deprovision(DeprovisionRequest {
            instance_id: "p1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .removed
    );
    assert!(!pid_alive(inst.pid));
    node.stop().await;
}

#[tokio::test]
async fn bind_needs_a_running_process_instance() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    let err = c
        .bind(BindRequest {
            instance_id: "ghost".into(),
            binding_id: "b".into(),
            kind: "process".into(),
            hooks: vec![command_hook(&["true"], &[], "")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // A kind "none" instance need not be known: its hooks are the binding.
    c.bind(BindRequest {
        instance_id: "ghost".into(),
        binding_id: "b".into(),
        kind: "none".into(),
        hooks: vec![command_hook(&["true"], &[], "")],
        ..Default::default()
    })
    .await
    .unwrap();
    node.stop().await;
}
