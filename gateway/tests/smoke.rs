//! End-to-end smoke test inside one process: the real allocator, a real node
//! and the gateway, each on 127.0.0.1:0, provisioning a real redis-server
//! through OSB: provision → bind → use → fetch → unbind → deprovision.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::json;
use svcbroker_gateway::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

struct Side {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_allocator(dir: &std::path::Path) -> (String, Side) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let config = svcbroker_allocator::Config {
        db_path: dir.join("allocator.sqlite"),
        ..Default::default()
    };
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        svcbroker_allocator::run(config, l, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (url, Side { stop: tx, task })
}

async fn start_node(
    dir: &std::path::Path,
    gateway_grpc: std::net::SocketAddr,
    ports: (u16, u16),
) -> Side {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_node_on(dir, Some(gateway_grpc), ports, l).await
}

/// Starts a node on `l`; it announces itself only when `gateway_grpc` is
/// given (otherwise the gateway must poll it).
async fn start_node_on(
    dir: &std::path::Path,
    gateway_grpc: Option<std::net::SocketAddr>,
    ports: (u16, u16),
    l: TcpListener,
) -> Side {
    let config = svcbroker_node::Config {
        node_id: "node-1".into(),
        data_dir: dir.join("node-data"),
        services_dir: services_dir(),
        capacity: 4,
        port_range: svcbroker_node::PortRangeConfig {
            start: ports.0,
            end: ports.1,
        },
        advertise_host: "127.0.0.1".into(),
        gateway_url: gateway_grpc.map(|g| format!("http://{g}")),
        announce_interval_ms: 300,
        ..Default::default()
    };
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        svcbroker_node::run(config, l, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Side { stop: tx, task }
}

async fn stop(side: Side) {
    let _ = side.stop.send(());
    let _ = side.task.await;
}

/// Sends inline redis commands and returns the raw reply.
async fn redis(port: u16, commands: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(commands.as_bytes()).await.unwrap();
    s.write_all(b"QUIT\r\n").await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

fn have_redis_server() -> bool {
    std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_lifecycle_through_real_allocator_and_node() {
    if !have_redis_server() {
        eprintln!("redis-server not found on PATH: skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (alloc_url, allocator) = start_allocator(dir.path()).await;
    let gw = Gateway::start(config(dir.path(), &alloc_url)).await;
    // A port range unlikely to collide with other tests on this machine.
    let base = 20_000 + (std::process::id() % 2000) as u16 * 10;
    let node = start_node(dir.path(), gw.grpc, (base, base + 9)).await;
    gw.wait_live_nodes(1, Duration::from_secs(10)).await;

    let (status, catalog) = gw.call(Method::GET, "/v2/catalog", None).await;
    assert_eq!(status, 200);
    assert!(catalog["services"].as_array().unwrap().len() >= 2);

    // Provision asynchronously.
    let provision = json!({
        "service_id": REDIS_SERVICE, "plan_id": REDIS_SMALL,
        "organization_guid": "org", "space_guid": "space",
        "context": {"platform": "test"},
        "parameters": {"maxmemory": "32mb"}
    });
    let (status, body) = gw
        .call(
            Method::PUT,
            "/v2/service_instances/r1?accepts_incomplete=true",
            Some(provision.clone()),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let op = body["operation"].as_str().unwrap().to_owned();
    let (status, last) = gw
        .poll(
            &format!("/v2/service_instances/r1/last_operation?operation={op}"),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(
        (status, last["state"].as_str()),
        (200, Some("succeeded")),
        "{last}"
    );
    // An identical repeat is 200.
    let (status, _) = gw
        .call(
            Method::PUT,
            "/v2/service_instances/r1?accepts_incomplete=true",
            Some(provision),
        )
        .await;
    assert_eq!(status, 200);
    let (status, fetched) = gw.call(Method::GET, "/v2/service_instances/r1", None).await;
    assert_eq!(status, 200);
    assert_eq!(fetched["parameters"], json!({"maxmemory": "32mb"}));

    // Bind synchronously: credentials come back at once.
    let bind = json!({"service_id": REDIS_SERVICE, "plan_id": REDIS_SMALL,
        "bind_resource": {"app_guid": "app-1"}});
    let (status, bound) = gw
        .call(
            Method::PUT,
            "/v2/service_instances/r1/service_bindings/b1",
            Some(bind),
        )
        .await;
    assert_eq!(status, 201, "{bound}");
    let creds = &bound["credentials"];
    for key in [
        "host", "hostname", "port", "username", "password", "uri", "name", "node_id",
    ] {
        assert!(creds.get(key).is_some(), "missing {key} in {creds}");
    }
    assert_eq!(creds["node_id"], "node-1");
    let port = creds["port"].as_u64().unwrap() as u16;
    assert!((base..=base + 9).contains(&port));
    // Each binding is its own Redis ACL user.
    let username = creds["username"].as_str().unwrap().to_owned();
    let password = creds["password"].as_str().unwrap().to_owned();
    assert_eq!(
        creds["uri"].as_str().unwrap(),
        format!("redis://{username}:{password}@127.0.0.1:{port}")
    );

    // The credentials work; without them redis refuses.
    let out = redis(
        port,
        &format!("AUTH {username} {password}\r\nSET k v\r\nGET k\r\n"),
    )
    .await;
    assert!(out.starts_with("+OK\r\n+OK\r\n$1\r\nv\r\n"), "{out:?}");
    let out = redis(port, "GET k\r\n").await;
    assert!(out.starts_with("-NOAUTH"), "{out:?}");

    let (status, fetched) = gw
        .call(
            Method::GET,
            "/v2/service_instances/r1/service_bindings/b1",
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(&fetched["credentials"], creds);

    // Unbind, deprovision (async), and the instance is gone.
    let q = format!("service_id={REDIS_SERVICE}&plan_id={REDIS_SMALL}");
    let (status, body) = gw
        .call(
            Method::DELETE,
            &format!("/v2/service_instances/r1/service_bindings/b1?{q}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The binding's user is gone with it.
    let out = redis(port, &format!("AUTH {username} {password}\r\n")).await;
    assert!(out.starts_with("-WRONGPASS"), "{out:?}");
    let (status, _) = gw
        .call(
            Method::GET,
            "/v2/service_instances/r1/service_bindings/b1",
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, body) = gw
        .call(
            Method::DELETE,
            &format!("/v2/service_instances/r1?{q}&accepts_incomplete=true"),
            None,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let (status, _) = gw
        .poll(
            "/v2/service_instances/r1/last_operation",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(status, 410);
    let (status, _) = gw
        .call(
            Method::DELETE,
            &format!("/v2/service_instances/r1?{q}"),
            None,
        )
        .await;
    assert_eq!(status, 410);
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "redis-server still listening after deprovision"
    );

    gw.stop().await.unwrap();
    stop(node).await;
    stop(allocator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn echo_sync_lifecycle_and_update() {
    let dir = tempfile::tempdir().unwrap();
    let (alloc_url, allocator) = start_allocator(dir.path()).await;
    let gw = Gateway::start(config(dir.path(), &alloc_url)).await;
    let base = 22_000 + (std::process::id() % 2000) as u16 * 10;
    let node = start_node(dir.path(), gw.grpc, (base, base + 9)).await;
    gw.wait_live_nodes(1, Duration::from_secs(10)).await;

    let body = json!({"service_id": ECHO_SERVICE, "plan_id": ECHO_FREE,
        "organization_guid": "o", "space_guid": "s", "parameters": {"message": "hi"}});
    let (status, resp) = gw
        .call(Method::PUT, "/v2/service_instances/e1", Some(body))
        .await;
    assert_eq!(status, 201, "{resp}");
    let (status, bound) = gw
        .call(
            Method::PUT,
            "/v2/service_instances/e1/service_bindings/eb1",
            Some(json!({"service_id": ECHO_SERVICE, "plan_id": ECHO_FREE})),
        )
        .await;
    assert_eq!(status, 201, "{bound}");
    assert_eq!(bound["credentials"]["message"], "hi");
    assert_eq!(bound["credentials"]["name"], "e1");
    // A conflicting repeat is 409 and changes nothing.
    let (status, _) = gw
        .call(
            Method::PUT,
            "/v2/service_instances/e1/service_bindings/eb1",
            Some(json!({"service_id": ECHO_SERVICE, "plan_id": ECHO_FREE, "parameters": {"x": 1}})),
        )
        .await;
    assert_eq!(status, 409);

    // Update the parameters; new bindings see the new message.
    let (status, resp) = gw
        .call(
            Method::PATCH,
            "/v2/service_instances/e1",
            Some(json!({"service_id": ECHO_SERVICE, "parameters": {"message": "bye"}})),
        )
        .await;
    assert_eq!(status, 200, "{resp}");
    let (_, fetched) = gw.call(Method::GET, "/v2/service_instances/e1", None).await;
    assert_eq!(fetched["parameters"]["message"], "bye");
    let (_, b) = gw
        .call(
            Method::GET,
            "/v2/service_instances/e1/service_bindings/eb1",
            None,
        )
        .await;
    assert_eq!(b["credentials"]["message"], "bye");

    let q = format!("service_id={ECHO_SERVICE}&plan_id={ECHO_FREE}");
    let (status, _) = gw
        .call(
            Method::DELETE,
            &format!("/v2/service_instances/e1/service_bindings/eb1?{q}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = gw
        .call(
            Method::DELETE,
            &format!("/v2/service_instances/e1?{q}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = gw.call(Method::GET, "/v2/service_instances/e1", None).await;
    assert_eq!(status, 404);

    gw.stop().await.unwrap();
    stop(node).await;
    stop(allocator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operations_resume_after_restart_and_restarted_nodes_get_instances_back() {
    if !have_redis_server() {
        eprintln!("redis-server not found on PATH: skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = 24_000 + (std::process::id() % 2000) as u16 * 10;
    // A node the gateway polls (static `nodes`), announcing nothing itself.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node_addr = l.local_addr().unwrap();
    let node = start_node_on(dir.path(), None, (base, base + 9), l).await;
    let node_url = format!("http://{node_addr}");

    // First gateway: the allocator is down, so the provision waits.
    let gw = Gateway::start(Config {
        nodes: vec![node_url.clone()],
        ..config(dir.path(), "http://127.0.0.1:1")
    })
    .await;
    gw.wait_live_nodes(1, Duration::from_secs(10)).await;
    let (status, body) = gw
        .call(
            Method::PUT,
            "/v2/service_instances/r2?accepts_incomplete=true",
            Some(json!({"service_id": REDIS_SERVICE, "plan_id": REDIS_SMALL,
                "organization_guid": "o", "space_guid": "s"})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let op = body["operation"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, last) = gw
        .call(Method::GET, "/v2/service_instances/r2/last_operation", None)
        .await;
    assert_eq!(last["state"], "in progress", "{last}");
    gw.stop().await.unwrap();

    // Second gateway on the same database, allocator up: it resumes.
    let (alloc_url, allocator) = start_allocator(dir.path()).await;
    let gw = Gateway::start(Config {
        nodes: vec![node_url.clone()],
        ..config(dir.path(), &alloc_url)
    })
    .await;
    let (status, last) = gw
        .poll(
            &format!("/v2/service_instances/r2/last_operation?operation={op}"),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(
        (status, last["state"].as_str()),
        (200, Some("succeeded")),
        "{last}"
    );
    let (status, bound) = gw
        .call(
            Method::PUT,
            "/v2/service_instances/r2/service_bindings/b2",
            Some(json!({"service_id": REDIS_SERVICE, "plan_id": REDIS_SMALL})),
        )
        .await;
    assert_eq!(status, 201, "{bound}");
    let port = bound["credentials"]["port"].as_u64().unwrap() as u16;
    let password = bound["credentials"]["password"]
        .as_str()
        .unwrap()
        .to_owned();
    let username = bound["credentials"]["username"]
        .as_str()
        .unwrap()
        .to_owned();
    let auth = format!("AUTH {username} {password}");
    let out = redis(port, &format!("{auth}\r\nSET k kept\r\n")).await;
    assert!(out.starts_with("+OK\r\n+OK\r\n"), "{out:?}");

    // The node restarts (its daemons stop with it) on the same address:
    // the gateway sees a new boot id and provisions redis again, same port,
    // same password, same data.
    stop(node).await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    );
    let l = TcpListener::bind(node_addr).await.unwrap();
    let node = start_node_on(dir.path(), None, (base, base + 9), l).await;
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            let out = redis(port, &format!("{auth}\r\nGET k\r\n")).await;
            if out.starts_with("+OK\r\n$4\r\nkept\r\n") {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < end,
            "redis not restored on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let q = format!("service_id={REDIS_SERVICE}&plan_id={REDIS_SMALL}");
    let (status, _) = gw
        .call(
            Method::DELETE,
            &format!("/v2/service_instances/r2/service_bindings/b2?{q}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = gw
        .call(
            Method::DELETE,
            &format!("/v2/service_instances/r2?{q}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    gw.stop().await.unwrap();
    stop(node).await;
    stop(allocator).await;
}
