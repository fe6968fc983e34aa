//! The database model against a real PostgreSQL server (the one
//! scripts/ensure-postgres.sh provides; SVCBROKER_TEST_POSTGRES_URL
//! overrides it). A missing server fails these tests: it never skips them.

mod common;

use common::*;
use svcbroker_proto::v1::{
    BindRequest, DatabaseSpec, DeprovisionRequest, DescribeRequest, ProvisionRequest, UnbindRequest,
};
use tonic::Code;

const DB_SERVICE: &str = "id: svc-pg
name: pgsvc
description: one database per instance
model: database
database:
  engine: postgresql
credentials:
  uri: \"postgres://{{username}}:{{password}}@{{node.postgresql_host}}:{{node.postgresql_port}}/{{database}}\"
plans:
  - id: svc-pg-plan
    name: small
    description: small
";

const PLAIN_SERVICE: &str = "id: svc-echo
name: echo
description: nothing to run
model: none
credentials:
  name: \"{{name}}\"
plans:
  - id: svc-echo-plan
    name: basic
    description: basic
";

fn write_services(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("pg.yaml"), DB_SERVICE).unwrap();
    std::fs::write(dir.join("echo.yaml"), PLAIN_SERVICE).unwrap();
}

fn db(name: &str) -> Option<DatabaseSpec> {
    Some(DatabaseSpec {
        engine: "postgresql".into(),
        name: name.into(),
    })
}

fn provision(id: &str, name: &str) -> ProvisionRequest {
    ProvisionRequest {
        instance_id: id.into(),
        service: "pgsvc".into(),
        plan: "small".into(),
        kind: "database".into(),
        database: db(name),
        ..Default::default()
    }
}

fn bind(id: &str, name: &str, user: &str, password: &str) -> BindRequest {
    BindRequest {
        instance_id: id.into(),
        binding_id: format!("b-{user}"),
        username: user.into(),
        password: password.into(),
        kind: "database".into(),
        database: db(name),
        ..Default::default()
    }
}

fn unbind(id: &str, name: &str, user: &str) -> UnbindRequest {
    UnbindRequest {
        instance_id: id.into(),
        binding_id: format!("b-{user}"),
        username: user.into(),
        kind: "database".into(),
        database: db(name),
        ..Default::default()
    }
}

fn deprovision(id: &str, name: &str) -> DeprovisionRequest {
    DeprovisionRequest {
        instance_id: id.into(),
        kind: "database".into(),
        database: db(name),
        ..Default::default()
    }
}

async fn role_exists(admin: &tokio_postgres::Client, name: &str) -> bool {
    admin
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await
        .unwrap()
        .is_some()
}

async fn database_exists(admin: &tokio_postgres::Client, name: &str) -> bool {
    admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap()
        .is_some()
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databases_are_isolated_per_instance_and_fully_removed() {
    let admin = pg_admin().await;
    let sb = Sandbox::new();
    let mut cfg = sb.config();
    cfg.postgres_url = Some(pg_url());
    write_services(&cfg.services_dir);
    let node = TestNode::start(cfg).await;
    let mut c = node.client.clone();

    let info = c.describe(DescribeRequest {}).await.unwrap().into_inner();
    assert_eq!(info.services, ["echo", "pgsvc"]);
    assert_eq!(info.attributes["postgresql_host"], "127.0.0.1");
    assert_eq!(info.attributes["postgresql_port"], "5432");

    let (a, b) = (unique_name("ta"), unique_name("tb"));
    let (ua1, ua2, ub1) = (format!("{a}_u1"), format!("{a}_u2"), format!("{b}_u1"));
    let r = c.provision(provision("ia", &a)).await.unwrap().into_inner();
    assert!(r.created);
    assert_eq!(r.instance.unwrap().kind, "database");
    assert!(
        !c.provision(provision("ia", &a))
            .await
            .unwrap()
            .into_inner()
            .created
    );
    c.provision(provision("ib", &b)).await.unwrap();
    // Another database under the same instance id is a conflict.
    assert_eq!(
        c.provision(provision("ia", &b)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    let owner: (bool, String) = {
        let row = admin
            .query_one(
                "SELECT r.rolcanlogin, pg_get_userbyid(d.datdba)::text FROM pg_database d \
                 JOIN pg_roles r ON r.rolname = d.datname WHERE d.datname = $1",
                &[&a],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(
        owner,
        (false, a.clone()),
        "NOLOGIN owner role of the same name"
    );

    c.bind(bind("ia", &a, &ua1, "pw-a1'\\x")).await.unwrap();
    c.bind(bind("ia", &a, &ua2, "pw-a2")).await.unwrap();
    c.bind(bind("ib", &b, &ub1, "pw-b1")).await.unwrap();

    // A binding creates a table; it belongs to the instance's owner role,
    // and another binding of the same instance can use it.
    let s1 = pg_connect(&pg_user_url(&ua1, "pw-a1%27%5Cx", &a))
        .await
        .expect("binding 1 connects to its instance");
    let who: String = s1
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, a, "sessions act as the owner role");
    s1.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        .await
        .unwrap();
    // pg_tables is per database: asked in the instance's database.
    let table_owner: String = s1
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 't' AND schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(table_owner, a);
    let s2 = pg_connect(&pg_user_url(&ua2, "pw-a2", &a)).await.unwrap();
    let x: i32 = s2.query_one("SELECT x FROM t", &[]).await.unwrap().get(0);
    assert_eq!(x, 42);

    // Isolation: A's roles cannot connect to B's database, nor B's to A's.
    let e = pg_connect(&pg_user_url(&ua1, "pw-a1%27%5Cx", &b))
        .await
        .expect_err("role of A must not connect to B");
    assert_eq!(sqlstate(&e), "42501", "{e}");
    let e = pg_connect(&pg_user_url(&ub1, "pw-b1", &a))
        .await
        .expect_err("role of B must not connect to A");
    assert_eq!(sqlstate(&e), "42501", "{e}");
    // Passwords are checked.
    let e = pg_connect(&pg_user_url(&ua2, "wrong", &a))
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&e), "28P01", "{e}");

    // A repeated Bind sets the password again.
    c.bind(bind("ia", &a, &ua2, "pw-a2-new")).await.unwrap();
    assert!(pg_connect(&pg_user_url(&ua2, "pw-a2", &a)).await.is_err());
    let s2 = pg_connect(&pg_user_url(&ua2, "pw-a2-new", &a))
        .await
        .unwrap();

    // Another instance's role (or the server's own) is never taken over.
    let e = c.bind(bind("ib", &b, &ua2, "x")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = c.unbind(unbind("ib", &b, &ua2)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = c.bind(bind("ib", &b, "postgres", "x")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c.bind(bind("ib", &b, &a, "x")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(s2.query_one("SELECT 1", &[]).await.is_ok());

    // Unbind ends the role's sessions and drops it; its data stays.
    c.unbind(unbind("ia", &a, &ua1)).await.unwrap();
    c.unbind(unbind("ia", &a, &ua1)).await.unwrap();
    assert!(
        s1.query_one("SELECT 1", &[]).await.is_err(),
        "session survived unbind"
    );
    assert!(!role_exists(&admin, &ua1).await);
    let x: i32 = s2.query_one("SELECT x FROM t", &[]).await.unwrap().get(0);
    assert_eq!(x, 42);

    // Bind to a database that does not exist: NOT_FOUND.
    let ghost = unique_name("tghost");
    let e = c
        .bind(bind("ghost", &ghost, &format!("{ghost}_u"), "x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Deprovision with a session open and a binding left: all gone.
    assert!(
        c.deprovision(deprovision("ia", &a))
            .await
            .unwrap()
            .into_inner()
            .removed
    );
    assert!(s2.query_one("SELECT 1", &[]).await.is_err());
    assert!(!database_exists(&admin, &a).await);
    assert!(!role_exists(&admin, &a).await);
    assert!(!role_exists(&admin, &ua2).await);
    assert!(
        !c.deprovision(deprovision("ia", &a))
            .await
            .unwrap()
            .into_inner()
            .removed
    );

    // A restarted node knows nothing: the request says what to drop.
    node.stop().await;
    let mut cfg = sb.config();
    cfg.postgres_url = Some(pg_url());
    let node = TestNode::start(cfg).await;
    let mut c = node.client.clone();
    assert!(node.list().await.is_empty());
    assert!(
        c.deprovision(deprovision("ib", &b))
            .await
            .unwrap()
            .into_inner()
            .removed
    );
    assert!(!database_exists(&admin, &b).await);
    assert!(!role_exists(&admin, &b).await);
    assert!(!role_exists(&admin, &ub1).await);
    node.stop().await;
}

#[tokio::test]
async fn server_databases_are_never_dropped() {
    let _admin = pg_admin().await;
    let sb = Sandbox::new();
    let mut cfg = sb.config();
    cfg.postgres_url = Some(pg_url());
    let node = TestNode::start(cfg).await;
    let mut c = node.client.clone();
    for name in ["postgres", "template1", "pg_x", "Bad"] {
        let e = c.deprovision(deprovision("x", name)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
    }
    node.stop().await;
}

#[tokio::test]
async fn without_a_reachable_server_nothing_is_offered() {
    let sb = Sandbox::new();
    let mut cfg = sb.config();
    write_services(&cfg.services_dir);
    let port = free_ports(1)[0];
    cfg.postgres_url = Some(format!(
        "postgres://postgres:hunter2@127.0.0.1:{port}/postgres"
    ));
    let node = TestNode::start(cfg).await;
    let mut c = node.client.clone();
    let info = c.describe(DescribeRequest {}).await.unwrap().into_inner();
    assert_eq!(info.services, ["echo"]);
    assert_eq!(info.attributes["postgresql_port"], port.to_string());
    let e = c
        .provision(provision("i", &unique_name("tdown")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(!e.message().contains("hunter2"), "{}", e.message());
    node.stop().await;

    // No postgres_url at all: database instances are refused.
    let sb = Sandbox::new();
    let cfg = sb.config();
    write_services(&cfg.services_dir);
    let node = TestNode::start(cfg).await;
    let mut c = node.client.clone();
    let info = c.describe(DescribeRequest {}).await.unwrap().into_inner();
    assert_eq!(info.services, ["echo"]);
    assert!(info.attributes.is_empty());
    let e = c.provision(provision("i", "whatever")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    node.stop().await;
}
