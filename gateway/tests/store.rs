//! The SQLite store: uniqueness by constraints, one operation at a time,
//! operation effects, persistence across reopen.

use serde_json::json;
use svcbroker_gateway::Error;
use svcbroker_gateway::store::{
    Action, BindingState, CreateBinding, CreateInstance, InstanceState, NewBinding, NewInstance,
    NewOperation, NodeSlot, OpState, Outcome, StartOp, Store,
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
    // Provisioning: no update, no deprovision, no binding.
    assert!(matches!(
        store
            .start_instance_op("i1", Action::Update, op())
            .await
            .unwrap(),
        StartOp::Busy(_)
    ));
    match store
        .start_instance_op("i1", Action::Deprovision, op())
        .await
        .unwrap()
    {
        StartOp::Busy(Some(o)) => assert_eq!(o.id, provision.id),
        other => panic!("{other:?}"),
    }
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

#[tokio::test]
async fn operations_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    store
        .create_instance(instance("i1"), op(), slots(&[("n1", 1)]))
        .await
        .unwrap();
    store
        .set_placement("i1", 10001, "h", "/d/i1")
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
