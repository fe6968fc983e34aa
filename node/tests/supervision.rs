//! Restarts, giving up, and re-adoption across node restarts.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use svcbroker_proto::v1::{DeprovisionRequest, InstanceState};

#[tokio::test]
async fn killed_daemon_is_restarted_on_the_same_port() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    let port = free_ports(1)[0];
    let first = c
        .provision(redis_request("rs", port, "pw"))
        .await
        .unwrap()
        .into_inner()
        .instance
        .unwrap();
    redis_session(port, &[&["AUTH", "pw"], &["SET", "k", "kept"]]).await;

    kill(Pid::from_raw(first.pid as i32), Signal::SIGKILL).unwrap();
    let again = node
        .wait_for("rs", Duration::from_secs(15), |i| {
            i.pid != first.pid && i.pid != 0 && state(i) == InstanceState::Running
        })
        .await;
    assert_eq!(again.port, port);
    assert!(!pid_alive(first.pid));
    // Same directory, so the append-only file brought the data back.
    let r = redis_session(port, &[&["AUTH", "pw"], &["GET", "k"]]).await;
    assert_eq!(r, ["+OK", "kept"]);
    assert_eq!(sb.live_pids(), vec![again.pid as i32], "exactly one daemon");
    // The metadata follows the new pid, for a later re-adoption.
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(instance_dir(&sb.data_dir(), "rs").join(".svcbroker-instance.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(meta["pid"], again.pid);
    node.stop().await;
}

#[tokio::test]
async fn crash_looping_daemon_ends_failed() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    let port = free_ports(1)[0];
    // Becomes ready, then dies shortly after: every start "works" and every
    // run fails.
    let code = "import socket,sys,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1', int(sys.argv[1])))\ns.listen(1)\ntime.sleep(0.3)\nprint('crashing on purpose', file=sys.stderr)\nsys.exit(7)";
    c.provision(python_request("loop", port, code, &[&port.to_string()]))
        .await
        .unwrap();
    let failed = node
        .wait_for("loop", Duration::from_secs(30), |i| {
            state(i) == InstanceState::Failed
        })
        .await;
    assert!(failed.message.contains("gave up"), "{}", failed.message);
    assert_eq!(failed.pid, 0);
    assert!(sb.live_pids().is_empty());

    // Provisioning it again starts it afresh (and it fails again later).
    let r = c
        .provision(python_request("loop", port, code, &[&port.to_string()]))
        .await
        .unwrap()
        .into_inner();
    assert!(r.created);
    c.deprovision(DeprovisionRequest {
        instance_id: "loop".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(sb.live_pids().is_empty());
    node.stop().await;
}

#[tokio::test]
async fn restarted_node_readopts_running_daemons() {
    let sb = Sandbox::new();
    let mut cfg = sb.config();
    cfg.keep_instances_on_shutdown = true;
    let node = TestNode::start(cfg.clone()).await;
    let mut c = node.client.clone();
    let ports = free_ports(2);
    let redis = c
        .provision(redis_request("keep1", ports[0], "pw"))
        .await
        .unwrap()
        .into_inner()
        .instance
        .unwrap();
    let py = c
        .provision(python_request(
            "keep2",
            ports[1],
            PY_LISTEN,
            &[&ports[1].to_string()],
        ))
        .await
        .unwrap()
        .into_inner()
        .instance
        .unwrap();
    redis_session(ports[0], &[&["AUTH", "pw"], &["SET", "k", "v1"]]).await;
    let boot1 = c
        .describe(svcbroker_proto::v1::DescribeRequest {})
        .await
        .unwrap()
        .into_inner()
        .boot_id;
    node.stop().await;
    assert!(
        pid_alive(redis.pid) && pid_alive(py.pid),
        "daemons outlive the node"
    );

    let node = TestNode::start(cfg).await;
    let mut c = node.client.clone();
    let info = c
        .describe(svcbroker_proto::v1::DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_ne!(info.boot_id, boot1, "a new boot id per start");
    assert_eq!(info.used, 2);
    let listed = node.list().await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    let adopted = node.instance("keep1").await.unwrap();
    assert_eq!(
        (adopted.pid, state(&adopted)),
        (redis.pid, InstanceState::Running)
    );
    assert_eq!(adopted.service, "redis");

    // The gateway re-provisions after seeing the new boot id: no duplicate.
    let r = c
        .provision(redis_request("keep1", ports[0], "pw"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.created);
    assert_eq!(r.instance.unwrap().pid, redis.pid);
    let mut live = sb.live_pids();
    live.sort();
    let mut want = vec![redis.pid as i32, py.pid as i32];
    want.sort();
    assert_eq!(live, want, "no duplicate daemons");
    let got = redis_session(ports[0], &[&["AUTH", "pw"], &["GET", "k"]]).await;
    assert_eq!(got, ["+OK", "v1"]);

    // Now that it has the spec, the adopted daemon is restarted when it dies.
    kill(Pid::from_raw(redis.pid as i32), Signal::SIGKILL).unwrap();
    node.wait_for("keep1", Duration::from_secs(15), |i| {
        i.pid != redis.pid && i.pid != 0 && state(i) == InstanceState::Running
    })
    .await;

    // An adopted daemon is stopped by Deprovision although it is not the
    // node's child.
    let d = c
        .deprovision(DeprovisionRequest {
            instance_id: "keep2".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(d.into_inner().removed);
    assert!(!pid_alive(py.pid));
    assert!(!instance_dir(&sb.data_dir(), "keep2").exists());

    // keep_instances_on_shutdown is on: clean up explicitly.
    c.deprovision(DeprovisionRequest {
        instance_id: "keep1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(sb.live_pids().is_empty());
    node.stop().await;
}

#[tokio::test]
async fn dead_daemon_after_node_restart_is_reprovisioned_in_place() {
    let sb = Sandbox::new();
    let mut cfg = sb.config();
    cfg.keep_instances_on_shutdown = true;
    let node = TestNode::start(cfg.clone()).await;
    let mut c = node.client.clone();
    let port = free_ports(1)[0];
    let first = c
        .provision(redis_request("dd", port, "pw"))
        .await
        .unwrap()
        .into_inner()
        .instance
        .unwrap();
    redis_session(port, &[&["AUTH", "pw"], &["SET", "k", "survives"]]).await;
    node.stop().await;
    // The host lost the daemon while no node was running.
    kill(Pid::from_raw(first.pid as i32), Signal::SIGKILL).unwrap();
    for _ in 0..100 {
        if !pid_alive(first.pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let node = TestNode::start(cfg).await;
    let mut c = node.client.clone();
    assert!(node.list().await.is_empty(), "nothing to adopt");
    let dir = instance_dir(&sb.data_dir(), "dd");
    assert!(dir.exists(), "directory kept for re-provisioning");

    let r = c
        .provision(redis_request("dd", port, "pw"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.created);
    let got = redis_session(port, &[&["AUTH", "pw"], &["GET", "k"]]).await;
    assert_eq!(got, ["+OK", "survives"], "data directory reused, not wiped");
    c.deprovision(DeprovisionRequest {
        instance_id: "dd".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!dir.exists());
    node.stop().await;
}

#[tokio::test]
async fn deprovision_of_unknown_instance_uses_the_directory() {
    let sb = Sandbox::new();
    let mut cfg = sb.config();
    cfg.keep_instances_on_shutdown = true;
    let node = TestNode::start(cfg.clone()).await;
    let mut c = node.client.clone();
    let port = free_ports(1)[0];
    c.provision(redis_request("gone", port, "pw"))
        .await
        .unwrap();
    node.stop().await;
    // Forge a recycled pid: the recorded pid is alive (our own test
    // process) but the start time does not match, so it must not be killed.
    let dir = instance_dir(&sb.data_dir(), "gone");
    let meta_path = dir.join(".svcbroker-instance.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    let daemon = meta["pid"].as_u64().unwrap() as i32;
    kill(Pid::from_raw(daemon), Signal::SIGKILL).unwrap();
    meta["pid"] = std::process::id().into();
    std::fs::write(&meta_path, meta.to_string()).unwrap();

    let node = TestNode::start(cfg).await;
    let mut c = node.client.clone();
    let d = c
        .deprovision(DeprovisionRequest {
            instance_id: "gone".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(d.into_inner().removed);
    assert!(!dir.exists());
    // We are still alive to assert this: the forged pid was left alone.
    node.stop().await;
}

#[tokio::test]
async fn changed_spec_restarts_in_place_and_plan_change_does_not() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    let port = free_ports(1)[0];
    let req = python_request("chg", port, PY_LISTEN, &[&port.to_string()]);
    let first = c
        .provision(req.clone())
        .await
        .unwrap()
        .into_inner()
        .instance
        .unwrap();
    let dir = instance_dir(&sb.data_dir(), "chg");
    std::fs::write(dir.join("data.txt"), "kept").unwrap();

    let mut plan_only = req.clone();
    plan_only.plan = "bigger".into();
    let r = c.provision(plan_only).await.unwrap().into_inner();
    assert!(!r.created);
    let i = r.instance.unwrap();
    assert_eq!((i.pid, i.plan.as_str()), (first.pid, "bigger"));

    let mut changed = req.clone();
    changed
        .process
        .as_mut()
        .unwrap()
        .env
        .insert("SETTING".into(), "2".into());
    let r = c.provision(changed).await.unwrap().into_inner();
    assert!(r.created);
    let second = r.instance.unwrap();
    assert_ne!(second.pid, first.pid);
    assert!(!pid_alive(first.pid));
    assert_eq!(
        std::fs::read_to_string(dir.join("data.txt")).unwrap(),
        "kept"
    );
    assert_eq!(sb.live_pids(), vec![second.pid as i32]);
    node.stop().await;
}
