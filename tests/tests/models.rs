//! Every provisioning model for real, through the OSB API of a gateway
//! running as its own process, with a node and an allocator as processes:
//! redis (per-binding ACL users), memcached, PostgreSQL (database per
//! instance, role per binding), directories (volume mounts) and hooks (the
//! Stackato Elasticsearch plugin's index per instance, against a local HTTP
//! server). Also: DELETE during provisioning halts it, and an operation that
//! cannot finish fails with everything released.

use std::time::Duration;

use serde_json::{Value, json};
use svcbroker_tests::fixtures::redis as redis_ids;
use svcbroker_tests::fixtures::{SLOW_REDIS_YAML, slow_redis};
use svcbroker_tests::models_support::{
    HttpRecorder, PROC_NODE_ID, ProcStack, ProcStackOptions, RedisUser, ids, memcached, psql,
    require_postgres,
};
use svcbroker_tests::{bind_body, eventually, new_id, provision_body, until};

const OP_TIMEOUT: Duration = Duration::from_secs(60);

async fn provision_sync(stack: &ProcStack, id: &str, service: &str, plan: &str) {
    let r = stack
        .osb
        .provision(id, &provision_body(service, plan, json!({})), false)
        .await;
    r.expect(201);
}

async fn bind_sync(stack: &ProcStack, id: &str, bid: &str, service: &str, plan: &str) -> Value {
    let r = stack
        .osb
        .bind(id, bid, &bind_body(service, plan), false)
        .await;
    r.expect(201);
    r.body.clone()
}

async fn unbind_sync(stack: &ProcStack, id: &str, bid: &str, service: &str, plan: &str) {
    stack
        .osb
        .unbind(id, bid, service, plan, false)
        .await
        .expect(200);
}

async fn deprovision_sync(stack: &ProcStack, id: &str, service: &str, plan: &str) {
    stack
        .osb
        .deprovision(id, service, plan, false)
        .await
        .expect(200);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_binding_is_an_acl_user_until_unbound() {
    let stack = ProcStack::start(ProcStackOptions::default()).await;
    let (svc, plan) = (redis_ids::SERVICE, redis_ids::PLAN_SMALL);
    let id = new_id();
    provision_sync(&stack, &id, svc, plan).await;
    let (ba, bb) = (new_id(), new_id());
    let a =
        RedisUser::from_credentials(&bind_sync(&stack, &id, &ba, svc, plan).await["credentials"]);
    let b =
        RedisUser::from_credentials(&bind_sync(&stack, &id, &bb, svc, plan).await["credentials"]);
    assert_eq!(a.port, b.port, "one server per instance");
    assert_ne!(a.username, b.username, "one user per binding");
    a.check_auth_set_get().await;
    b.check_auth_set_get().await;
    // The same credentials come back on fetch.
    let fetched = stack.osb.get_binding(&id, &ba).await;
    fetched.expect(200);
    assert_eq!(fetched.body["credentials"]["username"], json!(a.username));
    // A binding user cannot give itself a way back in after unbind.
    let mut con = a.auth().await.expect("AUTH as binding A");
    let escalate = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("backdoor")
        .arg("on")
        .arg(">x")
        .arg("+@all")
        .query_async::<String>(&mut con)
        .await;
    assert!(
        escalate.is_err_and(|e| e.to_string().contains("NOPERM")),
        "binding users have no admin commands"
    );
    a.set_on(&mut con, "shared", "from-a").await;

    unbind_sync(&stack, &id, &ba, svc, plan).await;
    let Err(refused) = a.auth().await else {
        panic!("AUTH of an unbound user succeeded");
    };
    assert!(refused.contains("WRONGPASS"), "{refused}");
    // Its open connection was closed too.
    let dropped = redis::cmd("GET")
        .arg("shared")
        .query_async::<Option<String>>(&mut con)
        .await;
    assert!(
        dropped.is_err(),
        "connection of an unbound user still works"
    );
    // The other binding is untouched and sees the data.
    let mut con_b = b.auth().await.expect("binding B still works");
    assert_eq!(
        b.get_on(&mut con_b, "shared").await.as_deref(),
        Some("from-a")
    );
    // Unbinding again is 410 and changes nothing.
    stack
        .osb
        .unbind(&id, &ba, svc, plan, false)
        .await
        .expect(410);

    unbind_sync(&stack, &id, &bb, svc, plan).await;
    assert!(b.auth().await.is_err());
    deprovision_sync(&stack, &id, svc, plan).await;
    stack.assert_instance_gone(&id, &[&ba, &bb]).await;
    assert!(
        !a.port_open().await,
        "redis still listens after deprovision"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn memcached_lifecycle() {
    let stack = ProcStack::start(ProcStackOptions::default()).await;
    let (svc, plan) = (ids::memcached::SERVICE, ids::memcached::PLAN_SMALL);
    let id = new_id();
    provision_sync(&stack, &id, svc, plan).await;
    let node = stack.node_instance(&id).await.expect("on the node");
    assert!(node.pid != 0);
    let bid = new_id();
    let creds = bind_sync(&stack, &id, &bid, svc, plan).await["credentials"].clone();
    let host = creds["host"].as_str().expect("host").to_string();
    let port = creds["port"].as_u64().expect("numeric port") as u16;
    assert_eq!(u32::from(port), node.port);
    assert_eq!(creds["servers"], json!(format!("{host}:{port}")));
    assert_eq!(creds["node_id"], json!(PROC_NODE_ID));

    let out = memcached(
        &host,
        port,
        "set greeting 0 0 5\r\nhello\r\nget greeting\r\n",
    )
    .await;
    assert!(
        out.starts_with("STORED\r\nVALUE greeting 0 5\r\nhello\r\nEND\r\n"),
        "{out:?}"
    );
    // A second binding reaches the same cache.
    let bid2 = new_id();
    bind_sync(&stack, &id, &bid2, svc, plan).await;
    let out = memcached(&host, port, "get greeting\r\n").await;
    assert!(out.contains("hello"), "{out:?}");

    unbind_sync(&stack, &id, &bid, svc, plan).await;
    unbind_sync(&stack, &id, &bid2, svc, plan).await;
    deprovision_sync(&stack, &id, svc, plan).await;
    stack.assert_instance_gone(&id, &[&bid, &bid2]).await;
    assert!(
        tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .is_err(),
        "memcached still listens"
    );
}

/// `uri` with its database replaced by `db`.
fn on_database(uri: &str, db: &str) -> String {
    let (base, _) = uri.rsplit_once('/').expect("uri with a database");
    format!("{base}/{db}")
}

#[tokio::test(flavor = "multi_thread")]
async fn postgresql_database_per_instance_role_per_binding() {
    let admin = require_postgres();
    let stack = ProcStack::start(ProcStackOptions {
        postgres_url: Some(admin.clone()),
        ..Default::default()
    })
    .await;
    let (svc, plan) = (ids::postgresql::SERVICE, ids::postgresql::PLAN);
    assert!(
        stack.osb.catalog().await.body["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "postgresql")
    );
    let (a, b) = (new_id(), new_id());
    provision_sync(&stack, &a, svc, plan).await;
    provision_sync(&stack, &b, svc, plan).await;
    let (a1, a2, b1) = (new_id(), new_id(), new_id());
    let ca1 = bind_sync(&stack, &a, &a1, svc, plan).await["credentials"].clone();
    let ca2 = bind_sync(&stack, &a, &a2, svc, plan).await["credentials"].clone();
    let cb1 = bind_sync(&stack, &b, &b1, svc, plan).await["credentials"].clone();
    let text = |c: &Value, k: &str| {
        c[k].as_str()
            .unwrap_or_else(|| panic!("{k} in {c}"))
            .to_string()
    };
    let (db_a, db_b) = (text(&ca1, "database"), text(&cb1, "database"));
    assert_ne!(db_a, db_b, "one database per instance");
    assert_eq!(text(&ca2, "database"), db_a);
    assert_ne!(
        text(&ca1, "username"),
        text(&ca2, "username"),
        "one role per binding"
    );
    assert_eq!(
        ca1["port"],
        json!(5432),
        "the node's attribute, as a number"
    );
    assert!(text(&ca1, "uri").starts_with("postgres://"));

    // A table one binding of A makes is the other binding's too.
    psql(
        &text(&ca1, "uri"),
        "CREATE TABLE notes (body text); INSERT INTO notes VALUES ('kept');",
    )
    .expect("binding A1 creates a table");
    assert_eq!(
        psql(&text(&ca2, "uri"), "SELECT body FROM notes").expect("binding A2 reads it"),
        "kept"
    );
    psql(&text(&ca2, "uri"), "INSERT INTO notes VALUES ('too')").expect("and writes it");
    // A's roles are denied on B's database, and B's on A's.
    let denied = psql(&on_database(&text(&ca1, "uri"), &db_b), "SELECT 1")
        .expect_err("role of A connects to B's database");
    assert!(
        denied.contains("permission denied") || denied.contains("not permitted"),
        "{denied}"
    );
    assert!(psql(&on_database(&text(&cb1, "uri"), &db_a), "SELECT 1").is_err());
    assert!(
        psql(&text(&cb1, "uri"), "SELECT count(*) FROM notes").is_err(),
        "B has no table of A"
    );

    // Unbind drops the role: it cannot connect any more.
    unbind_sync(&stack, &a, &a1, svc, plan).await;
    assert!(psql(&text(&ca1, "uri"), "SELECT 1").is_err());
    let role_a1 = text(&ca1, "username");
    assert_eq!(
        psql(
            &admin,
            &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{role_a1}'")
        )
        .unwrap(),
        "0"
    );
    assert_eq!(
        psql(&text(&ca2, "uri"), "SELECT count(*) FROM notes").unwrap(),
        "2",
        "the data outlives the binding that wrote it"
    );

    unbind_sync(&stack, &a, &a2, svc, plan).await;
    unbind_sync(&stack, &b, &b1, svc, plan).await;
    deprovision_sync(&stack, &a, svc, plan).await;
    deprovision_sync(&stack, &b, svc, plan).await;
    for db in [&db_a, &db_b] {
        assert_eq!(
            psql(
                &admin,
                &format!("SELECT count(*) FROM pg_database WHERE datname = '{db}'")
            )
            .unwrap(),
            "0",
            "database {db} left"
        );
    }
    let names: Vec<String> = [&ca1, &ca2, &cb1]
        .iter()
        .map(|c| format!("'{}'", text(c, "username")))
        .chain([format!("'{db_a}'"), format!("'{db_b}'")])
        .collect();
    assert_eq!(
        psql(
            &admin,
            &format!(
                "SELECT count(*) FROM pg_roles WHERE rolname IN ({})",
                names.join(",")
            )
        )
        .unwrap(),
        "0",
        "roles left"
    );
    stack.assert_instance_gone(&a, &[&a1, &a2]).await;
    stack.assert_instance_gone(&b, &[&b1]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn directory_is_bound_as_a_volume_mount() {
    let stack = ProcStack::start(ProcStackOptions::default()).await;
    let (svc, plan) = (ids::filesystem::SERVICE, ids::filesystem::PLAN_SMALL);
    let catalog = stack.osb.catalog().await;
    let entry = catalog.body["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == svc)
        .expect("directory service in the catalog")
        .clone();
    assert_eq!(entry["requires"], json!(["volume_mount"]));

    let id = new_id();
    provision_sync(&stack, &id, svc, plan).await;
    let bid = new_id();
    let bound = bind_sync(&stack, &id, &bid, svc, plan).await;
    let path = bound["credentials"]["path"]
        .as_str()
        .expect("credentials.path")
        .to_string();
    let dir = std::path::PathBuf::from(&path);
    assert!(dir.is_absolute(), "{path}");
    assert!(dir.is_dir(), "{path} exists while bound");
    assert_eq!(dir, stack.node_data_dir.join(&id));
    std::fs::write(dir.join("hello.txt"), "data").expect("the directory is writable");

    let mounts = bound["volume_mounts"].as_array().expect("volume_mounts");
    assert_eq!(mounts.len(), 1, "{bound}");
    let m = &mounts[0];
    for key in ["driver", "container_dir", "mode", "device_type"] {
        assert!(
            m[key].as_str().is_some_and(|v| !v.is_empty()),
            "{key} in {m}"
        );
    }
    assert_eq!(m["mode"], "rw");
    assert_eq!(m["device"]["volume_id"], json!(id));
    assert_eq!(m["device"]["mount_config"]["source"], json!(path));
    // The same on fetch.
    let fetched = stack.osb.get_binding(&id, &bid).await;
    fetched.expect(200);
    assert_eq!(fetched.body["volume_mounts"], bound["volume_mounts"]);
    assert_eq!(fetched.body["credentials"]["path"], json!(path));

    unbind_sync(&stack, &id, &bid, svc, plan).await;
    assert!(dir.join("hello.txt").exists(), "unbind keeps the data");
    deprovision_sync(&stack, &id, svc, plan).await;
    assert!(!dir.exists(), "{path} left after deprovision");
    stack.assert_instance_gone(&id, &[&bid]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hooks_make_an_index_per_instance_on_a_shared_server() {
    let es = HttpRecorder::start().await;
    let yaml = std::fs::read_to_string(
        svcbroker_tests::workspace_root().join("examples/services.d/elasticsearch-shared.yaml"),
    )
    .expect("example definition");
    assert!(yaml.contains("http://127.0.0.1:9200"));
    let yaml = yaml.replace("http://127.0.0.1:9200", &es.url);
    let stack = ProcStack::start(ProcStackOptions {
        extra_services: vec![("elasticsearch-shared.yaml".into(), yaml)],
        ..Default::default()
    })
    .await;
    let (svc, plan) = (ids::es_shared::SERVICE, ids::es_shared::PLAN);
    let id = new_id();
    provision_sync(&stack, &id, svc, plan).await;
    let puts: Vec<_> = es
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .collect();
    assert_eq!(puts.len(), 1, "{puts:?}");
    let index = puts[0].path.trim_start_matches('/').to_string();
    assert!(
        index.starts_with("db_") && !index.contains('/'),
        "one lowercase index per instance: {index}"
    );
    let settings: Value = serde_json::from_str(&puts[0].body).expect("JSON body");
    assert_eq!(settings["settings"]["number_of_shards"], json!(1));

    let bid = new_id();
    let creds = bind_sync(&stack, &id, &bid, svc, plan).await["credentials"].clone();
    assert_eq!(creds["index"], json!(index));
    assert_eq!(creds["uri"], json!(format!("{}/{index}", es.url)));
    unbind_sync(&stack, &id, &bid, svc, plan).await;

    // Deleting an index that is already gone counts as done.
    es.answer("DELETE", 404);
    deprovision_sync(&stack, &id, svc, plan).await;
    let deletes: Vec<_> = es
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert_eq!(deletes[0].path, format!("/{index}"));
    stack.assert_instance_gone(&id, &[&bid]).await;

    // A hook refused for good (a 5xx would be retried until the deadline)
    // fails the provision, and what it took is released.
    es.answer("PUT", 403);
    let id2 = new_id();
    let r = stack
        .osb
        .provision(&id2, &provision_body(svc, plan, json!({})), true)
        .await;
    r.expect(202);
    let (state, body) = stack
        .osb
        .wait_instance(&id2, r.operation().as_deref(), OP_TIMEOUT)
        .await;
    assert_eq!(state, "failed", "{body}");
    stack.assert_instance_gone(&id2, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_during_provisioning_halts_it_and_leaves_nothing() {
    let stack = ProcStack::start(ProcStackOptions {
        extra_services: vec![("slow.yaml".into(), SLOW_REDIS_YAML.into())],
        ..Default::default()
    })
    .await;
    let (svc, plan) = (slow_redis::SERVICE, slow_redis::PLAN);
    let id = new_id();
    let r = stack
        .osb
        .provision(&id, &provision_body(svc, plan, json!({})), true)
        .await;
    r.expect(202);
    let provision_op = r.operation().expect("operation");
    // The daemon is starting on the node (it sleeps 3 s before listening).
    until(
        "the node to start the instance",
        Duration::from_secs(10),
        || async { stack.node_instance(&id).await.is_some() },
    )
    .await;

    let d = stack.osb.deprovision(&id, svc, plan, true).await;
    d.expect(202);
    let deprovision_op = d.operation().expect("operation");
    assert_ne!(deprovision_op, provision_op);
    // The provision is over at once, as failed.
    let p = stack.osb.last_operation(&id, Some(&provision_op)).await;
    p.expect(200);
    assert_eq!(p.body["state"], "failed", "{}", p.text);
    assert!(
        p.body["description"]
            .as_str()
            .unwrap_or("")
            .contains("halted"),
        "{}",
        p.text
    );
    // A second DELETE joins the deprovision.
    let again = stack.osb.deprovision(&id, svc, plan, true).await;
    again.expect(202);
    assert_eq!(again.operation().as_deref(), Some(deprovision_op.as_str()));

    let (state, body) = stack
        .osb
        .wait_instance(&id, Some(&deprovision_op), OP_TIMEOUT)
        .await;
    assert!(state == "gone" || state == "succeeded", "{state} {body}");
    stack.assert_instance_gone(&id, &[]).await;
    stack.osb.get_instance(&id).await.expect(404);
}

const STUCK_YAML: &str = r#"
id: 5b0c4f1e-7a2d-4e8b-9c3f-1d2e3f4a5b01
name: stuck
description: a daemon that never listens (tests only)
bindable: true
model: process
requires_executables: [sh, sleep]
process:
  command: [sh, -c, "exec sleep 600"]
  ready_timeout_ms: 1000
credentials:
  port: "{{port}}"
plans:
  - id: 5b0c4f1e-7a2d-4e8b-9c3f-1d2e3f4a5b11
    name: default
    description: gives up after 4 s
    maximum_polling_duration: 4
"#;

#[tokio::test(flavor = "multi_thread")]
async fn operations_that_cannot_finish_fail_and_release_everything() {
    let mut stack = ProcStack::start(ProcStackOptions {
        extra_services: vec![("stuck.yaml".into(), STUCK_YAML.into())],
        ..Default::default()
    })
    .await;
    let (svc, plan) = (
        "5b0c4f1e-7a2d-4e8b-9c3f-1d2e3f4a5b01",
        "5b0c4f1e-7a2d-4e8b-9c3f-1d2e3f4a5b11",
    );
    // A daemon that is never ready: the node gives up each try, the gateway
    // tries until the plan's maximum_polling_duration.
    let id = new_id();
    let r = stack
        .osb
        .provision(&id, &provision_body(svc, plan, json!({})), true)
        .await;
    r.expect(202);
    let (state, body) = stack
        .osb
        .wait_instance(&id, r.operation().as_deref(), OP_TIMEOUT)
        .await;
    assert_eq!(state, "failed", "{body}");
    assert!(
        body["description"]
            .as_str()
            .unwrap_or("")
            .contains("deadline"),
        "{body}"
    );
    stack.assert_instance_gone(&id, &[]).await;
    stack.osb.get_instance(&id).await.expect(404);

    // The node unreachable past the deadline: the port and credential taken
    // before are released all the same.
    stack.kill_node();
    let id2 = new_id();
    let r = stack
        .osb
        .provision(&id2, &provision_body(svc, plan, json!({})), true)
        .await;
    r.expect(202);
    let (state, body) = stack
        .osb
        .wait_instance(&id2, r.operation().as_deref(), OP_TIMEOUT)
        .await;
    assert_eq!(state, "failed", "{body}");
    let a = stack.allocations(Some(&id2)).await;
    assert!(
        a.leases.is_empty() && a.credentials.is_empty(),
        "allocations left: {a:?}"
    );
    // Back, the node holds nothing of it, and a DELETE clears the record.
    stack.start_node();
    stack.wait_ready().await;
    stack
        .osb
        .deprovision(&id2, svc, plan, false)
        .await
        .expect(200);
    stack.assert_instance_gone(&id2, &[]).await;
    let left = eventually("the node to answer", Duration::from_secs(10), || async {
        Some(stack.node_instances().await)
    })
    .await;
    assert!(left.is_empty(), "{left:?}");
}
