//! Many provisions at once: distinct ids run in parallel, the same id never
//! spawns twice.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use svcbroker_proto::v1::{DeprovisionRequest, InstanceState};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_provisions() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let ports = free_ports(64);
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let mut c = node.client.clone();
        set.spawn(async move {
            let r = c
                .provision(redis_request(&format!("c{i:02}"), port, "pw"))
                .await;
            (i, port, r)
        });
    }
    let mut pids = HashSet::new();
    while let Some(res) = set.join_next().await {
        let (i, port, r) = res.unwrap();
        let r = r
            .unwrap_or_else(|e| panic!("c{i:02} on {port}: {e:?}"))
            .into_inner();
        assert!(r.created);
        let inst = r.instance.unwrap();
        assert_eq!(state(&inst), InstanceState::Running);
        assert!(pids.insert(inst.pid));
    }
    eprintln!("64 redis instances ready in {:?}", started.elapsed());

    let listed = node.list().await;
    assert_eq!(listed.len(), 64);
    assert!(listed.iter().all(|i| state(i) == InstanceState::Running));
    for port in &ports {
        assert_eq!(
            redis_cmd(*port, &["PING"]).await.split(' ').next(),
            Some("-NOAUTH")
        );
    }
    assert_eq!(sb.live_pids().len(), 64);

    let mut set = tokio::task::JoinSet::new();
    for i in 0..64 {
        let mut c = node.client.clone();
        set.spawn(async move {
            c.deprovision(DeprovisionRequest {
                instance_id: format!("c{i:02}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .removed
        });
    }
    while let Some(removed) = set.join_next().await {
        assert!(removed.unwrap());
    }
    assert!(node.list().await.is_empty());
    assert!(sb.live_pids().is_empty());
    assert_eq!(std::fs::read_dir(sb.data_dir()).unwrap().count(), 0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_id_concurrently_spawns_once() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let port = free_ports(1)[0];
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let mut c = node.client.clone();
        set.spawn(async move {
            c.provision(redis_request("same", port, "pw"))
                .await
                .unwrap()
                .into_inner()
        });
    }
    let mut created = 0;
    let mut pids = HashSet::new();
    while let Some(r) = set.join_next().await {
        let r = r.unwrap();
        created += usize::from(r.created);
        pids.insert(r.instance.unwrap().pid);
    }
    assert_eq!(created, 1);
    assert_eq!(pids.len(), 1);
    assert_eq!(sb.live_pids().len(), 1);

    // Provision and Deprovision racing on one id end in a consistent state.
    let mut set = tokio::task::JoinSet::new();
    for k in 0..10 {
        let mut c = node.client.clone();
        set.spawn(async move {
            if k % 2 == 0 {
                c.deprovision(DeprovisionRequest {
                    instance_id: "same".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
            } else {
                c.provision(redis_request("same", port, "pw"))
                    .await
                    .map(|_| ())
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held = node.list().await.len();
    assert_eq!(sb.live_pids().len(), held, "one daemon per held instance");
    node.client
        .clone()
        .deprovision(DeprovisionRequest {
            instance_id: "same".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(sb.live_pids().is_empty());
    node.stop().await;
}
