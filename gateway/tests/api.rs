//! The OSB REST surface of a gateway running alone (no allocator, and at
//! most a fake node that announces itself but cannot be reached): auth,
//! version, validation, idempotency answers, errors, deadlines.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use svcbroker_gateway::Config;
use svcbroker_proto::v1::registry_client::RegistryClient;
use svcbroker_proto::v1::{AnnounceRequest, NodeInfo, PortRange};

/// Nothing listens on port 1: calls there fail at once with UNAVAILABLE.
const DEAD_URL: &str = "http://127.0.0.1:1";
const SLOW_SERVICE: &str = "slow-service-0001";
const SLOW_PLAN: &str = "slow-plan-0001";

/// A services dir with the shipped definitions plus an `async_required`
/// service whose operations give up after 2 s.
fn services(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("services.d");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["echo.yaml", "redis.yaml"] {
        std::fs::copy(services_dir().join(f), out.join(f)).unwrap();
    }
    std::fs::write(
        out.join("slow.yaml"),
        format!(
            "id: {SLOW_SERVICE}\nname: slow\ndescription: needs async\nmodel: none\n\
             async_required: true\ncredentials:\n  name: \"{{{{name}}}}\"\nplans:\n\
             \x20 - id: {SLOW_PLAN}\n    name: default\n    description: d\n    \
             maximum_polling_duration: 2\n"
        ),
    )
    .unwrap();
    out
}

fn test_config(dir: &Path) -> Config {
    Config {
        services_dir: services(dir),
        ..config(dir, DEAD_URL)
    }
}

async fn announce_fake_node(gw: &Gateway, services: &[&str]) {
    let mut c = RegistryClient::connect(format!("http://{}", gw.grpc))
        .await
        .unwrap();
    let r = c
        .announce(AnnounceRequest {
            node: Some(NodeInfo {
                node_id: "fake-1".into(),
                services: services.iter().map(|s| s.to_string()).collect(),
                capacity: 5,
                used: 0,
                port_range: Some(PortRange {
                    start: 30000,
                    end: 30009,
                }),
                boot_id: "boot-1".into(),
                grpc_url: DEAD_URL.into(),
                advertise_host: "127.0.0.1".into(),
                data_dir: "/nonexistent".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.new_boot);
    assert_eq!(r.interval_ms, 300);
}

/// Sends a PUT without any client-side path normalisation; returns the
/// status code.
async fn raw_put(gw: &Gateway, path: &str, body: &str) -> u16 {
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"));
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let req = format!(
        "PUT {path} HTTP/1.1\r\nhost: x\r\nauthorization: Basic {auth}\r\n\
         x-broker-api-version: 2.17\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split(' ').nth(1).unwrap().parse().unwrap()
}

fn text(v: &Value) -> &str {
    v["description"].as_str().unwrap_or("")
}

#[tokio::test]
async fn auth_version_identity_and_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(test_config(dir.path())).await;
    let c = &gw.client;

    let r = c.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "healthz needs no auth");
    assert!(r.headers().contains_key("x-broker-api-request-identity"));

    let r = c
        .get(gw.url("/v2/catalog"))
        .header("X-Broker-API-Version", "2.17")
        .header("X-Broker-API-Request-Identity", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-broker-api-request-identity"], "req-42");
    let body: Value = r.json().await.unwrap();
    assert!(!text(&body).is_empty());

    let r = c
        .get(gw.url("/v2/catalog"))
        .basic_auth(USER, Some("wrong"))
        .header("X-Broker-API-Version", "2.17")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    for version in [None, Some("2.12"), Some("nonsense")] {
        let mut r = c.get(gw.url("/v2/catalog")).basic_auth(USER, Some(PASS));
        if let Some(v) = version {
            r = r.header("X-Broker-API-Version", v);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 412, "{version:?}");
        let body: Value = r.json().await.unwrap();
        assert!(text(&body).contains("2.13"), "{body}");
    }

    let r = gw
        .req(Method::GET, "/v2/catalog")
        .header("X-Broker-API-Request-Identity", "req-43")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-broker-api-request-identity"], "req-43");
    let catalog: Value = r.json().await.unwrap();
    let names: Vec<&str> = catalog["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo", "redis", "slow"]);
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_requests_are_400_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(test_config(dir.path())).await;
    let ok = json!({"service_id": ECHO_SERVICE, "plan_id": ECHO_FREE,
        "organization_guid": "o", "space_guid": "s"});

    let bad_bodies: Vec<(Option<String>, &str)> = vec![
        (Some("{not json".to_owned()), "not valid JSON"),
        (Some("[1,2]".to_owned()), "JSON object"),
        (Some("".to_owned()), "JSON object"),
        (Some(r#"{"plan_id": "p"}"#.to_owned()), "service_id"),
        (
            Some(r#"{"service_id": 7, "plan_id": "p"}"#.to_owned()),
            "service_id",
        ),
        (
            Some(r#"{"service_id": "nope", "plan_id": "p"}"#.to_owned()),
            "unknown service_id",
        ),
        (
            Some(json!({"service_id": ECHO_SERVICE, "plan_id": REDIS_SMALL}).to_string()),
            "is not a plan of service 'echo'",
        ),
        (
            Some(
                json!({"service_id": ECHO_SERVICE, "plan_id": ECHO_FREE, "context": "x"})
                    .to_string(),
            ),
            "'context' must be an object",
        ),
        (
            Some(
                json!({"service_id": REDIS_SERVICE, "plan_id": REDIS_SMALL,
                       "parameters": {"maxmemory": "lots"}})
                .to_string(),
            ),
            "parameters /maxmemory: must satisfy pattern",
        ),
        (
            Some(
                json!({"service_id": ECHO_SERVICE, "plan_id": ECHO_FREE,
                       "parameters": {"unknown": 1}})
                .to_string(),
            ),
            "parameters",
        ),
    ];
    for (body, needle) in bad_bodies {
        let mut r = gw.req(Method::PUT, "/v2/service_instances/i1");
        if let Some(b) = &body {
            r = r.header("content-type", "application/json").body(b.clone());
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 400, "{body:?}");
        let v: Value = r.json().await.unwrap();
        assert!(text(&v).contains(needle), "{body:?}: {v}");
        assert!(!text(&v).contains("lots"), "no request values echoed: {v}");
    }

    // Schema-valid, but no template can take a newline (it could smuggle a
    // directive into a config file): refused up front.
    let (status, v) = gw
        .call(
            Method::PUT,
            "/v2/service_instances/i1",
            Some(json!({"service_id": ECHO_SERVICE, "plan_id": ECHO_FREE,
                "parameters": {"message": "a\nslaveof evil 1"}})),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(text(&v).contains("/message"), "{v}");
    assert!(!text(&v).contains("evil"), "{v}");

    // Ids that could escape a directory or confuse anything downstream.
    for path in [
        "/v2/service_instances/a%2Fb",
        "/v2/service_instances/%C3%A9",
        "/v2/service_instances/a%00b",
        "/v2/service_instances/a%20b",
    ] {
        let (status, v) = gw.call(Method::PUT, path, Some(ok.clone())).await;
        assert_eq!(status, 400, "{path}: {v}");
    }
    // HTTP clients normalise a literal "..", so send it raw.
    for raw_path in [
        "/v2/service_instances/..",
        "/v2/service_instances/.",
        "/v2/service_instances/%2E%2E",
        "/v2/service_instances/%2e",
    ] {
        let status = raw_put(&gw, raw_path, &ok.to_string()).await;
        assert_eq!(status, 400, "{raw_path}");
    }
    let long = format!("/v2/service_instances/{}", "x".repeat(256));
    assert_eq!(gw.call(Method::PUT, &long, Some(ok.clone())).await.0, 400);
    let (status, _) = gw
        .call(
            Method::PUT,
            "/v2/service_instances/i1/service_bindings/b%2F1",
            Some(ok.clone()),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = gw
        .call(
            Method::PUT,
            "/v2/service_instances/i1?accepts_incomplete=maybe",
            Some(ok.clone()),
        )
        .await;
    assert_eq!(status, 400);
    for q in [
        "",
        "?service_id=x",
        &format!("?plan_id={ECHO_FREE}"),
        "?service_id=&plan_id=",
    ] {
        let (status, v) = gw
            .call(
                Method::DELETE,
                &format!("/v2/service_instances/i1{q}"),
                None,
            )
            .await;
        assert_eq!(status, 400, "{q}: {v}");
    }
    let (status, v) = gw
        .call(
            Method::DELETE,
            "/v2/service_instances/i1/service_bindings/b1",
            None,
        )
        .await;
    assert_eq!(status, 400, "{v}");

    // Nothing was stored.
    let (status, _) = gw
        .call(Method::GET, "/v2/service_instances/i1/last_operation", None)
        .await;
    assert_eq!(status, 404);
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn oversized_body_is_413() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(Config {
        max_body_bytes: 1024,
        ..test_config(dir.path())
    })
    .await;
    let big = json!({"service_id": ECHO_SERVICE, "plan_id": ECHO_FREE,
        "parameters": {"message": "x".repeat(4096)}});
    let (status, v) = gw
        .call(Method::PUT, "/v2/service_instances/i1", Some(big))
        .await;
    assert_eq!(status, 413, "{v}");
    assert!(text(&v).contains("1024"), "{v}");
    // An announced length over the limit is refused before the body comes.
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"));
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(
        format!(
            "PUT /v2/service_instances/i1 HTTP/1.1\r\nhost: x\r\nauthorization: Basic {auth}\r\n\
             x-broker-api-version: 2.17\r\ncontent-length: 1000000000\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("answered before the body arrived")
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 413");
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn no_capacity_unknown_resources_and_422s() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(test_config(dir.path())).await;

    let r = gw
        .req(
            Method::PUT,
            "/v2/service_instances/r1?accepts_incomplete=true",
        )
        .json(&json!({"service_id": REDIS_SERVICE, "plan_id": REDIS_SMALL,
            "organization_guid": "o", "space_guid": "s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        text(&v),
        "no live node offers service 'redis' with free capacity"
    );

    let q = format!("service_id={ECHO_SERVICE}&plan_id={ECHO_FREE}");
    let cases = [
        (Method::DELETE, format!("/v2/service_instances/r1?{q}"), 410),
        (Method::GET, "/v2/service_instances/r1".to_owned(), 404),
        (
            Method::GET,
            "/v2/service_instances/r1/last_operation".to_owned(),
            404,
        ),
        (
            Method::DELETE,
            format!("/v2/service_instances/r1/service_bindings/b1?{q}"),
            410,
        ),
        (
            Method::GET,
            "/v2/service_instances/r1/service_bindings/b1".to_owned(),
            404,
        ),
        (
            Method::GET,
            "/v2/service_instances/r1/service_bindings/b1/last_operation".to_owned(),
            404,
        ),
        (Method::GET, "/v2/nothing".to_owned(), 404),
    ];
    for (m, path, want) in cases {
        let (status, v) = gw.call(m.clone(), &path, None).await;
        assert_eq!(status, want, "{m} {path}: {v}");
        assert!(!text(&v).is_empty(), "{m} {path}: {v}");
    }
    let (status, v) = gw
        .call(
            Method::PATCH,
            "/v2/service_instances/r1",
            Some(json!({"service_id": ECHO_SERVICE})),
        )
        .await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = gw
        .call(
            Method::PUT,
            "/v2/service_instances/r1/service_bindings/b1",
            Some(json!({"service_id": ECHO_SERVICE, "plan_id": ECHO_FREE})),
        )
        .await;
    assert_eq!(status, 404, "{v}");

    let (status, v) = gw
        .call(
            Method::PUT,
            "/v2/service_instances/s1",
            Some(json!({"service_id": SLOW_SERVICE, "plan_id": SLOW_PLAN})),
        )
        .await;
    assert_eq!((status, v["error"].as_str()), (422, Some("AsyncRequired")));

    let (status, v) = gw
        .call(
            Method::PUT,
            "/v2/service_instances/e1?accepts_incomplete=true",
            Some(json!({"service_id": ECHO_SERVICE, "plan_id": ECHO_FREE,
                "maintenance_info": {"version": "9.9.9"}})),
        )
        .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (422, Some("MaintenanceInfoConflict")),
        "{v}"
    );
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_progress_answers_then_deadline_fails_and_releases() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(test_config(dir.path())).await;
    announce_fake_node(&gw, &["echo", "slow"]).await;
    gw.wait_live_nodes(1, Duration::from_secs(5)).await;

    let body = json!({"service_id": SLOW_SERVICE, "plan_id": SLOW_PLAN,
        "organization_guid": "o", "space_guid": "s"});
    let path = "/v2/service_instances/s1?accepts_incomplete=true";
    let (status, v) = gw.call(Method::PUT, path, Some(body.clone())).await;
    assert_eq!(status, 202, "{v}");
    let op = v["operation"].as_str().unwrap().to_owned();

    // Repeats and competing requests while it runs (the allocator is down).
    let (status, v) = gw.call(Method::PUT, path, Some(body.clone())).await;
    assert_eq!((status, v["operation"].as_str()), (202, Some(op.as_str())));
    let mut different = body.clone();
    different["parameters"] = json!({"x": 1});
    assert_eq!(gw.call(Method::PUT, path, Some(different)).await.0, 409);
    assert_eq!(
        gw.call(Method::GET, "/v2/service_instances/s1", None)
            .await
            .0,
        404
    );
    // (A DELETE now would halt the provision: tests/tests/models.rs.)
    let (status, v) = gw
        .call(
            Method::PUT,
            "/v2/service_instances/s1/service_bindings/b1",
            Some(json!({"service_id": SLOW_SERVICE, "plan_id": SLOW_PLAN})),
        )
        .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (422, Some("ConcurrencyError"))
    );
    let (status, v) = gw
        .call(Method::GET, "/v2/service_instances/s1/last_operation", None)
        .await;
    assert_eq!((status, v["state"].as_str()), (200, Some("in progress")));

    // The plan's maximum_polling_duration (2 s) is the deadline.
    let (status, v) = gw
        .poll(
            &format!("/v2/service_instances/s1/last_operation?operation={op}"),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!((status, v["state"].as_str()), (200, Some("failed")), "{v}");
    let d = text(&v);
    assert!(d.contains("allocator is unavailable"), "{d}");
    assert!(d.contains("cleanup incomplete"), "{d}");
    assert!(
        v.get("instance_usable").is_none(),
        "only for update/deprovision: {v}"
    );
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_request_past_sync_timeout_is_503_and_continues() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(Config {
        sync_timeout_ms: 300,
        ..test_config(dir.path())
    })
    .await;
    announce_fake_node(&gw, &["echo"]).await;
    gw.wait_live_nodes(1, Duration::from_secs(5)).await;
    let r = gw
        .req(Method::PUT, "/v2/service_instances/e1")
        .json(&json!({"service_id": ECHO_SERVICE, "plan_id": ECHO_FREE,
            "organization_guid": "o", "space_guid": "s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let (status, v) = gw
        .call(Method::GET, "/v2/service_instances/e1/last_operation", None)
        .await;
    assert_eq!(
        (status, v["state"].as_str()),
        (200, Some("in progress")),
        "{v}"
    );
    assert!(text(&v).contains("waiting"), "{v}");
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn run_refuses_missing_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(Config {
        password: String::new(),
        ..test_config(dir.path())
    })
    .await;
    let err = gw.stop().await.unwrap_err();
    assert!(err.to_string().contains("password"), "{err}");
}
