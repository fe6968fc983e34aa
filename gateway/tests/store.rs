//! The SQLite store: uniqueness by constraints, one operation at a time,
//! operation effects, persistence across reopen.

use serde_json::json;
use svcbroker_gateway::Error;
use svcbroker_gateway::store::{
    Action, BindingState, CreateBinding, CreateInstance, HALTED_DESCRIPTION, InstanceState,
    NewBinding, NewInstance, NewOperation, NodeSlot, Observed, OpState, Outcome, Placement,
    StartOp, Store,
};

fn instance(id: &str) -> NewInstance {
    NewInstance {
        id: id.into(),
        service_id: "svc".into(),
        plan_id: "plan".into(),
        parameters: json!({"a": 1}),
        context: json!({}),
        organization_guid: Some("org".into()),
        space_guid: Some("space".into()),
        maintenance_version: None,
        kind: "process".into(),
        database: Some(NewInstance::generate_database_name()),
    }
}

fn binding(id: &str, instance_id: &str) -> NewBinding {
    NewBinding {
        id: id.into(),
        instance_id: instance_id.into(),
        service_id: "svc".into(),
        plan_id: "plan".into(),
        parameters: json!({}),
        context: json!({}),
        bind_resource: json!({"app_guid": "app"}),
    }
}

fn op() -> NewOperation {
    NewOperation::fresh(60_000, json!({}))
}

fn slots(list: &[(&str, u32)]) -> Vec<NodeSlot> {
    list.iter()
        .map(|(n, c)| NodeSlot {
            node_id: (*n).into(),
            capacity: *c,
        })
        .collect()
}

fn done(state: OpState) -> Outcome {
    Outcome {
        state,
        description: Some("d".into()),
        instance_usable: None,
        update_repeatable: None,
    }
}

async fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(&dir.path().join("g.sqlite")).await.unwrap()
}

/// Creates an instance and finishes its provision successfully.
async fn ready(store: &Store, id: &str) {
    let CreateInstance::Created(v) = store
        .create_instance(instance(id), op(), slots(&[("n1", 100)]))
        .await
        .unwrap()
    else {
        panic!("not created")
    };
    store
        .finish_op(&v.last_op.unwrap().id, done(OpState::Succeeded))
        .await
        .unwrap();
}

#[tokio::test]
async fn duplicate_instance_hits_the_primary_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.create_instance(instance("i1"), op(), slots(&[("n1", 100)]))
                .await
                .unwrap()
        }));
    }
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            CreateInstance::Created(v) => {
                created += 1;
                assert_eq!(v.instance.state, InstanceState::Provisioning);
                assert_eq!(v.instance.node_id, "n1");
                let op = v.last_op.unwrap();
                assert_eq!(
                    (op.action, op.state),
                    (Action::Provision, OpState::InProgress)
                );
            }
            CreateInstance::Exists(v) => assert_eq!(v.instance.id, "i1"),
            CreateInstance::NoCapacity => panic!("capacity"),
        }
    }
    assert_eq!(created, 1);
    assert_eq!(store.ops_in_progress().await.unwrap().len(), 1);
    store.close().await;
}

#[tokio::test]
async fn placement_takes_most_free_node_and_respects_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let nodes = slots(&[("a", 2), ("b", 3)]);
    let place = |id: &'static str| {
        let (s, n) = (store.clone(), nodes.clone());
        async move {
            match s.create_instance(instance(id), op(), n).await.unwrap() {
                CreateInstance::Created(v) => Some(v.instance.node_id),
                CreateInstance::NoCapacity => None,
                CreateInstance::Exists(_) => panic!("exists"),
            }
        }
    };
    assert_eq!(place("i1").await.as_deref(), Some("b"));
    // a: 2 free, b: 2 free: the tie goes to the lowest id.
    assert_eq!(place("i2").await.as_deref(), Some("a"));
    assert_eq!(place("i3").await.as_deref(), Some("b"));
    assert_eq!(place("i4").await.as_deref(), Some("a"));
    assert_eq!(place("i5").await.as_deref(), Some("b"));
    assert_eq!(place("i6").await, None);
    // An existing id is still answered as existing when nodes are full.
    assert!(matches!(
        store
            .create_instance(instance("i1"), op(), nodes.clone())
            .await
            .unwrap(),
        CreateInstance::Exists(_)
    ));
    assert!(matches!(
        store
            .create_instance(instance("x"), op(), vec![])
            .await
            .unwrap(),
        CreateInstance::NoCapacity
    ));
    let per_node = store.instances_per_node().await.unwrap();
    assert_eq!(per_node, vec![("a".into(), 2), ("b".into(), 3)]);
    store.close().await;
}

#[tokio::test]
async fn one_operation_at_a_time_per_instance() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let CreateInstance::Created(v) = store
        .create_instance(instance("i1"), op(), slots(&[("n1", 10)]))
        .await
        .unwrap()
    else {
        panic!()
    };
    let provision = v.last_op.unwrap();
    // Provisioning: no update, no binding (a deprovision halts it: see
    // `deprovision_halts_a_provision_in_progress`).
    assert!(matches!(
        store
            .start_instance_op("i1", Action::Update, op())
            .await
            .unwrap(),
        StartOp::Busy(_)
    ));
    assert!(matches!(
        store
            .create_binding(binding("b1", "i1"), op())
            .await
            .unwrap(),
        CreateBinding::InstanceBusy(_)
    ));
    assert!(
        store.get_binding("b1").await.unwrap().is_none(),
        "a refused binding leaves no row"
    );

    store
        .finish_op(&provision.id, done(OpState::Succeeded))
        .await
        .unwrap();
    let target = json!({"plan_id": "plan2", "parameters": {"a": 2}, "maintenance_version": "1.0.0", "context": {"k": "v"}});
    let StartOp::Started(update) = store
        .start_instance_op("i1", Action::Update, NewOperation::fresh(1000, target))
        .await
        .unwrap()
    else {
        panic!()
    };
    assert!(matches!(
        store
            .start_instance_op("i1", Action::Deprovision, op())
            .await
            .unwrap(),
        StartOp::Busy(Some(_))
    ));
    let finished = store
        .finish_op(&update.id, done(OpState::Succeeded))
        .await
        .unwrap();
    assert_eq!(finished.state, OpState::Succeeded);
    let inst = store.get_instance("i1").await.unwrap().unwrap().instance;
    assert_eq!(inst.state, InstanceState::Ready);
    assert_eq!(inst.plan_id, "plan2");
    assert_eq!(inst.parameters, json!({"a": 2}));
    assert_eq!(inst.maintenance_version.as_deref(), Some("1.0.0"));
    assert_eq!(inst.context, json!({"k": "v"}));
    // Finishing twice changes nothing.
    let again = store
        .finish_op(&update.id, done(OpState::Failed))
        .await
        .unwrap();
    assert_eq!(again.state, OpState::Succeeded);
    store.close().await;
}

#[tokio::test]
async fn failed_update_keeps_the_old_attributes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    ready(&store, "i1").await;
    let target = json!({"plan_id": "plan2", "parameters": {"a": 9}});
    let StartOp::Started(update) = store
        .start_instance_op("i1", Action::Update, NewOperation::fresh(1000, target))
        .await
        .unwrap()
    else {
        panic!()
    };
    let failed = store
        .finish_op(
            &update.id,
            Outcome {
                state: OpState::Failed,
                description: Some("update failed: nope".into()),
                instance_usable: Some(true),
                update_repeatable: Some(false),
            },
        )
        .await
        .unwrap();
    assert_eq!(failed.update_repeatable, Some(false));
    let inst = store.get_instance("i1").await.unwrap().unwrap().instance;
    assert_eq!(
        (inst.state, inst.plan_id.as_str()),
        (InstanceState::Ready, "plan")
    );
    assert_eq!(inst.parameters, json!({"a": 1}));
    store.close().await;
}

#[tokio::test]
async fn bindings_block_instance_operations_and_go_with_deprovision() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    ready(&store, "i1").await;
    let CreateBinding::Created(b) = store
        .create_binding(binding("b1", "i1"), op())
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(b.binding.state, BindingState::Binding);
    assert!(matches!(
        store
            .create_binding(binding("b1", "i1"), op())
            .await
            .unwrap(),
        CreateBinding::Exists(_)
    ));
    assert!(matches!(
        store
            .create_binding(binding("b2", "nope"), op())
            .await
            .unwrap(),
        CreateBinding::InstanceMissing
    ));
    // A bind in progress blocks deprovisioning.
    assert!(matches!(
        store
            .start_instance_op("i1", Action::Deprovision, op())
            .await
            .unwrap(),
        StartOp::Busy(None)
    ));
    store
        .finish_op(&b.last_op.unwrap().id, done(OpState::Succeeded))
        .await
        .unwrap();
    assert_eq!(
        store
            .get_binding("b1")
            .await
            .unwrap()
            .unwrap()
            .binding
            .state,
        BindingState::Ready
    );
    assert!(matches!(
        store.start_unbind("other", "b1", op()).await.unwrap(),
        StartOp::Missing
    ));
    let StartOp::Started(deprov) = store
        .start_instance_op("i1", Action::Deprovision, op())
        .await
        .unwrap()
    else {
        panic!()
    };
    assert!(matches!(
        store.start_unbind("i1", "b1", op()).await.unwrap(),
        StartOp::Busy(Some(_))
    ));
    store
        .finish_op(&deprov.id, done(OpState::Succeeded))
        .await
        .unwrap();
    assert!(store.get_instance("i1").await.unwrap().is_none());
    assert!(store.get_binding("b1").await.unwrap().is_none());
    let last = store.last_instance_op("i1").await.unwrap().unwrap();
    assert_eq!(
        (last.action, last.state),
        (Action::Deprovision, OpState::Succeeded)
    );
    store.close().await;
}

#[tokio::test]
async fn failed_provision_can_be_retried() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let CreateInstance::Created(v) = store
        .create_instance(instance("i1"), op(), slots(&[("n1", 1)]))
        .await
        .unwrap()
    else {
        panic!()
    };
    store
        .finish_op(&v.last_op.unwrap().id, done(OpState::Failed))
        .await
        .unwrap();
    let view = store.get_instance("i1").await.unwrap().unwrap();
    assert_eq!(view.instance.state, InstanceState::Failed);
    let StartOp::Started(again) = store.retry_provision("i1", op()).await.unwrap() else {
        panic!()
    };
    assert_eq!(again.action, Action::Provision);
    assert!(matches!(
        store.retry_provision("i1", op()).await.unwrap(),
        StartOp::Busy(_)
    ));
    store.close().await;
}

/// Concurrent requests share a batch transaction (each job a savepoint in
/// it): a job that hits a constraint, or that rolls its own insert back,
/// must undo only its own writes, and everything the others were told is
/// committed must be there after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_jobs_in_a_batch_undo_only_their_own_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let mut tasks = Vec::new();
    for round in 0..3 {
        for i in 0..20 {
            let s = store.clone();
            // Two creates per id race (one hits the primary key), and a
            // binding on the still-provisioning instance is inserted and
            // rolled back inside its savepoint (InstanceBusy).
            tasks.push(tokio::spawn(async move {
                let id = format!("i{i}");
                let created = s
                    .create_instance(instance(&id), op(), slots(&[("n1", 1000)]))
                    .await
                    .unwrap();
                let bound = s
                    .create_binding(binding(&format!("b{i}-{round}"), &id), op())
                    .await
                    .unwrap();
                let missing = s
                    .create_binding(binding(&format!("m{i}-{round}"), "nope"), op())
                    .await
                    .unwrap();
                (created, bound, missing)
            }));
        }
    }
    let mut created = 0;
    for t in tasks {
        let (c, b, m) = t.await.unwrap();
        match c {
            CreateInstance::Created(_) => created += 1,
            CreateInstance::Exists(v) => assert!(v.instance.id.starts_with('i')),
            CreateInstance::NoCapacity => panic!("capacity"),
        }
        assert!(matches!(b, CreateBinding::InstanceBusy(_)), "{b:?}");
        assert!(matches!(m, CreateBinding::InstanceMissing), "{m:?}");
    }
    assert_eq!(created, 20);
    store.close().await;

    let store = open(&dir).await;
    assert_eq!(store.ops_in_progress().await.unwrap().len(), 20);
    for i in 0..20 {
        let v = store.get_instance(&format!("i{i}")).await.unwrap().unwrap();
        assert_eq!(v.instance.state, InstanceState::Provisioning);
        assert!(store.bindings_of(&v.instance.id).await.unwrap().is_empty());
        for round in 0..3 {
            assert!(
                store
                    .get_binding(&format!("b{i}-{round}"))
                    .await
                    .unwrap()
                    .is_none()
            );
        }
    }
    store.close().await;
}

#[tokio::test]
async fn operations_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    store
        .create_instance(instance("i1"), op(), slots(&[("n1", 1)]))
        .await
        .unwrap();
    store
        .set_placement(
            "i1",
            Placement {
                port: 10001,
                host: "h".into(),
                dir: "/d/i1".into(),
                bind_host: "0.0.0.0".into(),
                attributes: json!({"postgresql_port": "5432"}),
            },
        )
        .await
        .unwrap();
    store.close().await;
    assert!(matches!(
        store.get_instance("i1").await,
        Err(Error::ShuttingDown)
    ));

    let store = open(&dir).await;
    let ops = store.ops_in_progress().await.unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].instance_id, "i1");
    let inst = store.get_instance("i1").await.unwrap().unwrap().instance;
    assert_eq!(inst.port, Some(10001));
    assert_eq!(inst.dir.as_deref(), Some("/d/i1"));
    assert_eq!(inst.bind_host.as_deref(), Some("0.0.0.0"));
    assert_eq!(inst.node_attributes, json!({"postgresql_port": "5432"}));
    assert_eq!(inst.kind.as_deref(), Some("process"));
    let db = inst.database.expect("database name kept");
    assert!(db.starts_with("db_") && db.len() <= 63, "{db}");
    assert!(
        db.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    );
    store.close().await;
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.sqlite");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(conn);
    let err = Store::open(&path).await.unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedSchema { found: 99, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn deprovision_halts_a_provision_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let CreateInstance::Created(v) = store
        .create_instance(instance("i1"), op(), slots(&[("n1", 10)]))
        .await
        .unwrap()
    else {
        panic!()
    };
    let provision = v.last_op.unwrap();
    let StartOp::Started(deprovision) = store
        .start_instance_op("i1", Action::Deprovision, op())
        .await
        .unwrap()
    else {
        panic!("a deprovision is accepted while provisioning")
    };
    let halted = store.get_operation(&provision.id).await.unwrap().unwrap();
    assert_eq!(halted.state, OpState::Failed);
    assert_eq!(halted.description.as_deref(), Some(HALTED_DESCRIPTION));
    let view = store.get_instance("i1").await.unwrap().unwrap();
    assert_eq!(view.instance.state, InstanceState::Deprovisioning);
    assert_eq!(view.last_op.unwrap().id, deprovision.id);
    // The halted provision's driver finishing late changes nothing.
    let late = store
        .finish_op(&provision.id, done(OpState::Succeeded))
        .await
        .unwrap();
    assert_eq!(late.state, OpState::Failed);
    assert_eq!(
        store
            .get_instance("i1")
            .await
            .unwrap()
            .unwrap()
            .instance
            .state,
        InstanceState::Deprovisioning
    );
    // A second DELETE finds the deprovision in progress.
    match store
        .start_instance_op("i1", Action::Deprovision, op())
        .await
        .unwrap()
    {
        StartOp::Busy(Some(o)) => assert_eq!(o.id, deprovision.id),
        other => panic!("{other:?}"),
    }
    store
        .finish_op(&deprovision.id, done(OpState::Succeeded))
        .await
        .unwrap();
    assert!(store.get_instance("i1").await.unwrap().is_none());
    store.close().await;
}

#[tokio::test]
async fn observed_state_is_kept_and_listed_per_node() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    store
        .create_instance(instance("i1"), op(), slots(&[("n1", 10)]))
        .await
        .unwrap();
    ready(&store, "i2").await;
    let seen = Observed {
        state: "failed".into(),
        message: "gave up".into(),
        pid: 42,
        at: 1_700_000_000_000,
    };
    store.set_observed("i2", seen.clone()).await.unwrap();
    let inst = store.get_instance("i2").await.unwrap().unwrap().instance;
    assert_eq!(inst.observed, Some(seen));
    let on_node = store.instances_on_node("n1").await.unwrap();
    let busy: Vec<(String, bool)> = on_node.iter().map(|(i, b)| (i.id.clone(), *b)).collect();
    assert_eq!(busy, vec![("i1".into(), true), ("i2".into(), false)]);
    assert!(store.owner_exists("i2").await.unwrap());
    assert!(!store.owner_exists("nope").await.unwrap());
    store.close().await;
}

#[tokio::test]
async fn version_1_databases_are_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.sqlite");
    let conn = rusqlite::Connection::open(&path).unwrap();
    // The version 1 instances table, with a row, as an older gateway left it.
    conn.execute_batch(
        "CREATE TABLE instances (
            id TEXT PRIMARY KEY, service_id TEXT NOT NULL, plan_id TEXT NOT NULL,
            node_id TEXT NOT NULL, port INTEGER, host TEXT, dir TEXT,
            parameters TEXT NOT NULL, context TEXT NOT NULL, organization_guid TEXT,
            space_guid TEXT, maintenance_version TEXT,
            state TEXT NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL
         ) STRICT;
         CREATE TABLE bindings (id TEXT PRIMARY KEY, instance_id TEXT NOT NULL,
            service_id TEXT NOT NULL, plan_id TEXT NOT NULL, parameters TEXT NOT NULL,
            context TEXT NOT NULL, bind_resource TEXT NOT NULL, state TEXT NOT NULL,
            created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL) STRICT;
         CREATE TABLE operations (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
            instance_id TEXT NOT NULL, binding_id TEXT, action TEXT NOT NULL,
            state TEXT NOT NULL, description TEXT, step TEXT, target TEXT NOT NULL DEFAULT '{}',
            instance_usable INTEGER, update_repeatable INTEGER, created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL, deadline INTEGER NOT NULL) STRICT;
         INSERT INTO instances VALUES ('old', 's', 'p', 'n1', 10000, 'h', '/d/old', '{}', '{}',
            NULL, NULL, NULL, 'ready', 1, 1);
         PRAGMA user_version = 1;",
    )
    .unwrap();
    drop(conn);
    let store = Store::open(&path).await.unwrap();
    let inst = store.get_instance("old").await.unwrap().unwrap().instance;
    assert_eq!(inst.port, Some(10000));
    assert_eq!(inst.kind, None);
    assert_eq!(inst.database, None);
    assert_eq!(inst.node_attributes, json!({}));
    assert_eq!(inst.observed, None);
    store.close().await;
}
