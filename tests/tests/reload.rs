//! Catalog reload on SIGHUP of a gateway running as its own process: a new
//! YAML file shows up in the catalog, a broken one keeps the old catalog and
//! is logged with file and line, requests in flight are not dropped, and
//! instances of a service that left the catalog keep working.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use svcbroker_tests::fixtures::echo;
use svcbroker_tests::models_support::{HttpRecorder, ProcStack, ProcStackOptions, ids};
use svcbroker_tests::{Osb, bind_body, eventually, new_id, provision_body, until};

const WAIT: Duration = Duration::from_secs(30);

const HELLO_YAML: &str = r#"id: 6a1f0c2e-9d4b-4e7a-8b3c-2f1e0d9c8b01
name: hello
description: added while the gateway runs
model: none
credentials:
  greeting: "hello from {{node_id}}"
plans:
  - id: 6a1f0c2e-9d4b-4e7a-8b3c-2f1e0d9c8b11
    name: default
    description: the only plan
"#;

/// Line 4 holds a key the format does not know.
const BROKEN_YAML: &str = r#"id: 6a1f0c2e-9d4b-4e7a-8b3c-2f1e0d9c8b02
name: broken
description: not a valid definition
colour: blue
model: none
plans:
  - id: 6a1f0c2e-9d4b-4e7a-8b3c-2f1e0d9c8b12
    name: default
    description: the only plan
"#;

async fn service_names(osb: &Osb) -> Vec<String> {
    let r = osb.catalog().await;
    r.expect(200);
    let mut names: Vec<String> = r.body["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect();
    names.sort();
    names
}

/// Keeps `workers` clients busy with catalog fetches and echo
/// provision/deprovision cycles until `stop`; counts requests and failures.
fn load(
    osb: &Osb,
    workers: usize,
    stop: &Arc<AtomicBool>,
    done: &Arc<AtomicUsize>,
    failed: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|w| {
            let (osb, stop, done, failed) = (
                osb.clone(),
                Arc::clone(stop),
                Arc::clone(done),
                Arc::clone(failed),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let ok = if w % 2 == 0 {
                        let r = osb.catalog().await;
                        r.status == 200 && r.body["services"].is_array()
                    } else {
                        let id = new_id();
                        let body = provision_body(echo::SERVICE, echo::PLAN_FREE, json!({}));
                        let p = osb.provision(&id, &body, false).await;
                        let d = osb
                            .deprovision(&id, echo::SERVICE, echo::PLAN_FREE, false)
                            .await;
                        p.status == 201 && d.status == 200
                    };
                    done.fetch_add(1, Ordering::SeqCst);
                    if !ok {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_catalog_and_a_broken_file_keeps_the_old_one() {
    let stack = ProcStack::start(ProcStackOptions::default()).await;
    let before = service_names(&stack.osb).await;
    assert!(!before.contains(&"hello".to_string()));
    let (stop, done, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let workers = load(&stack.osb, 4, &stop, &done, &failed);

    // One new YAML file and a SIGHUP: the service is offered.
    std::fs::write(stack.services_dir.join("hello.yaml"), HELLO_YAML).expect("write");
    stack.sighup_gateway();
    let with_hello = eventually("hello in the catalog", WAIT, || async {
        let names = service_names(&stack.osb).await;
        names.contains(&"hello".to_string()).then_some(names)
    })
    .await;
    let mut expected = before.clone();
    expected.push("hello".into());
    expected.sort();
    assert_eq!(with_hello, expected);

    // A broken file: the error names file and line; the catalog stays.
    std::fs::write(stack.services_dir.join("broken.yaml"), BROKEN_YAML).expect("write");
    stack.sighup_gateway();
    until("the gateway to log the broken file", WAIT, || async {
        stack.log("gateway").contains("broken.yaml:4")
    })
    .await;
    let log = stack.log("gateway");
    let line = log
        .lines()
        .find(|l| l.contains("broken.yaml:4"))
        .expect("log line");
    assert!(line.contains("colour"), "the reason is given: {line}");
    assert!(line.contains("keeping the old catalog"), "{line}");
    assert_eq!(service_names(&stack.osb).await, expected);

    // More reloads under load.
    for _ in 0..5 {
        stack.sighup_gateway();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::remove_file(stack.services_dir.join("broken.yaml")).expect("remove");
    stack.sighup_gateway();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.expect("worker");
    }
    assert!(done.load(Ordering::SeqCst) > 10, "the load ran");
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests failed during reloads"
    );
    assert_eq!(service_names(&stack.osb).await, expected);
    // The gateway is the same process all along.
    let mut stack = stack;
    stack.assert_running();
}

/// A plain service that will leave the catalog.
const VANISHING_YAML: &str = r#"id: 6a1f0c2e-9d4b-4e7a-8b3c-2f1e0d9c8b03
name: vanishing
description: removed while it has instances
model: none
credentials:
  name: "{{name}}"
plans:
  - id: 6a1f0c2e-9d4b-4e7a-8b3c-2f1e0d9c8b13
    name: default
    description: the only plan
"#;
const VANISHING: (&str, &str) = (
    "6a1f0c2e-9d4b-4e7a-8b3c-2f1e0d9c8b03",
    "6a1f0c2e-9d4b-4e7a-8b3c-2f1e0d9c8b13",
);

#[tokio::test(flavor = "multi_thread")]
async fn instances_of_a_removed_service_keep_working() {
    let es = HttpRecorder::start().await;
    let shared = std::fs::read_to_string(
        svcbroker_tests::workspace_root().join("examples/services.d/elasticsearch-shared.yaml"),
    )
    .expect("example")
    .replace("http://127.0.0.1:9200", &es.url);
    let mut stack = ProcStack::start(ProcStackOptions {
        extra_services: vec![
            ("es.yaml".into(), shared),
            ("vanishing.yaml".into(), VANISHING_YAML.into()),
        ],
        ..Default::default()
    })
    .await;
    let (es_svc, es_plan) = (ids::es_shared::SERVICE, ids::es_shared::PLAN);
    let (v_svc, v_plan) = VANISHING;
    let (i1, b1, i2) = (new_id(), new_id(), new_id());
    let osb = stack.osb.clone();
    osb.provision(&i1, &provision_body(es_svc, es_plan, json!({})), false)
        .await
        .expect(201);
    let bound = osb.bind(&i1, &b1, &bind_body(es_svc, es_plan), false).await;
    bound.expect(201);
    osb.provision(&i2, &provision_body(v_svc, v_plan, json!({})), false)
        .await
        .expect(201);

    for f in ["es.yaml", "vanishing.yaml"] {
        std::fs::remove_file(stack.services_dir.join(f)).expect("remove definition");
    }
    stack.sighup_gateway();
    until("both services to leave the catalog", WAIT, || async {
        let names = service_names(&osb).await;
        !names
            .iter()
            .any(|n| n == "vanishing" || n == "elasticsearch-shared")
    })
    .await;

    // No new instances...
    let r = osb
        .provision(
            &new_id(),
            &provision_body(es_svc, es_plan, json!({})),
            false,
        )
        .await;
    r.expect(400);
    // ...but the existing ones are fetched, unbound and deleted with the
    // definition they were made from (its deprovision hook runs).
    osb.get_instance(&i1).await.expect(200);
    let fetched = osb.get_binding(&i1, &b1).await;
    fetched.expect(200);
    assert_eq!(fetched.body["credentials"], bound.body["credentials"]);
    osb.unbind(&i1, &b1, es_svc, es_plan, false)
        .await
        .expect(200);
    osb.deprovision(&i1, es_svc, es_plan, false)
        .await
        .expect(200);
    assert!(
        es.requests().iter().any(|r| r.method == "DELETE"),
        "the removed service's deprovision hook ran: {:?}",
        es.requests()
    );
    stack.assert_instance_gone(&i1, &[&b1]).await;

    // Even a gateway restarted without the definition can still show and
    // delete an instance made from it.
    stack.stop_gateway();
    stack.start_gateway();
    stack.wait_ready().await;
    osb.get_instance(&i2).await.expect(200);
    osb.deprovision(&i2, v_svc, v_plan, false).await.expect(200);
    osb.get_instance(&i2).await.expect(404);
}
