//! Provision / Deprovision / Bind against a real node server and real
//! daemons (redis-server, python3).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use svcbroker_proto::v1::{
    BindRequest, DeprovisionRequest, FileSpec, InstanceState, ProvisionRequest, UnbindRequest,
};
use tonic::Code;

#[tokio::test]
async fn redis_lifecycle_idempotent_and_clean() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    let port = free_ports(1)[0];

    let resp = c
        .provision(redis_request("r1", port, "s3cret-pw"))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.created);
    let inst = resp.instance.unwrap();
    assert_eq!(state(&inst), InstanceState::Running);
    assert_eq!(inst.port, port);
    assert!(inst.pid > 0);
    let dir = instance_dir(&sb.data_dir(), "r1");
    assert_eq!(inst.dir, dir.to_string_lossy());

    // The daemon answers, with the password from the file.
    let replies = redis_session(
        port,
        &[&["AUTH", "s3cret-pw"], &["SET", "k", "v"], &["GET", "k"]],
    )
    .await;
    assert_eq!(replies, ["+OK", "+OK", "v"]);

    // Files are private by default; the directory too; metadata is there.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join("redis.conf")), 0o600);
    assert_eq!(mode(&dir), 0o700);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(".svcbroker-instance.json")).unwrap())
            .unwrap();
    assert_eq!(meta["instance_id"], "r1");
    assert_eq!(meta["pid"], inst.pid);
    assert_eq!(meta["port"], port);
    assert!(meta["start_time"].as_u64().unwrap() > 0);
    assert!(
        !meta.to_string().contains("s3cret-pw"),
        "metadata holds no secret"
    );

    // Same request again: success, nothing new started.
    let again = c
        .provision(redis_request("r1", port, "s3cret-pw"))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.instance.unwrap().pid, inst.pid);

    // Same id, another port: refused, and the running one is untouched.
    let err = c
        .provision(redis_request("r1", port + 1, "s3cret-pw"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(pid_alive(inst.pid));

    // Bind checks the instance exists; Unbind always succeeds.
    let bind = |id: &str| BindRequest {
        instance_id: id.into(),
        binding_id: "b1".into(),
        username: "u".into(),
        password: "p".into(),
        ..Default::default()
    };
    c.bind(bind("r1")).await.unwrap();
    assert_eq!(
        c.bind(bind("nope")).await.unwrap_err().code(),
        Code::NotFound
    );
    c.unbind(UnbindRequest {
        instance_id: "nope".into(),
        binding_id: "b".into(),
        username: "u".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    let listed = node.list().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].instance_id, "r1");

    // Deprovision: process gone, directory gone, idempotent.
    let d = c
        .deprovision(DeprovisionRequest {
            instance_id: "r1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.removed);
    assert!(!pid_alive(inst.pid), "daemon {} still alive", inst.pid);
    assert!(!dir.exists());
    assert!(node.list().await.is_empty());
    let d = c
        .deprovision(DeprovisionRequest {
            instance_id: "r1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!d.removed);
    node.stop().await;
}

#[tokio::test]
async fn kind_none_is_recorded_only() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    let req = ProvisionRequest {
        instance_id: "e1".into(),
        service: "echo".into(),
        plan: "basic".into(),
        kind: "none".into(),
        port: 0,
        process: None,
        ..Default::default()
    };
    let r = c.provision(req.clone()).await.unwrap().into_inner();
    assert!(r.created);
    let i = r.instance.unwrap();
    assert_eq!(state(&i), InstanceState::Running);
    assert_eq!((i.pid, i.dir.as_str()), (0, ""));
    assert!(!c.provision(req).await.unwrap().into_inner().created);
    assert_eq!(
        std::fs::read_dir(sb.data_dir()).unwrap().count(),
        0,
        "no directory for kind none"
    );
    c.bind(BindRequest {
        instance_id: "e1".into(),
        binding_id: "b1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let d = c
        .deprovision(DeprovisionRequest {
            instance_id: "e1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(d.into_inner().removed);
    node.stop().await;
}

#[tokio::test]
async fn early_exit_reports_stderr_and_leaves_nothing() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    let port = free_ports(1)[0];
    let code = "import sys\nfor i in range(50): print('noise', i, file=sys.stderr)\nprint('fatal: bad config line 7', file=sys.stderr)\nsys.exit(3)";
    let err = c
        .provision(python_request("bad1", port, code, &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let msg = err.message();
    assert!(msg.contains("fatal: bad config line 7"), "{msg}");
    assert!(msg.contains("exit status: 3"), "{msg}");
    assert!(
        !msg.contains("noise 10\n"),
        "only the tail is quoted: {msg}"
    );
    assert!(msg.len() < 3000, "{}", msg.len());
    assert!(!instance_dir(&sb.data_dir(), "bad1").exists());
    assert!(node.list().await.is_empty());

    // A program that does not exist at all.
    let mut req = python_request("bad2", port, "", &[]);
    req.process.as_mut().unwrap().argv = vec!["no-such-program-svcbroker".into()];
    let err = c.provision(req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("no-such-program-svcbroker"),
        "{}",
        err.message()
    );
    assert!(!instance_dir(&sb.data_dir(), "bad2").exists());
    node.stop().await;
}

#[tokio::test]
async fn never_ready_times_out_and_kills_the_group() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    let port = free_ports(1)[0];
    let marker = format!("svcbroker-test-{}", uuid::Uuid::new_v4());
    // The leader forks a child into its group; neither opens the port.
    let code = "import subprocess,sys,time\nsubprocess.Popen([sys.executable,'-c','import time; time.sleep(300)',sys.argv[1]])\nprint('starting slowly', file=sys.stderr, flush=True)\ntime.sleep(300)";
    let mut req = python_request("slow", port, code, &[&marker]);
    req.process.as_mut().unwrap().ready_timeout_ms = 700;
    let started = std::time::Instant::now();
    let err = c.provision(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("starting slowly"),
        "{}",
        err.message()
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(
        pids_with_marker(&marker).is_empty(),
        "process group survived"
    );
    assert!(!instance_dir(&sb.data_dir(), "slow").exists());
    node.stop().await;
}

#[tokio::test]
async fn deprovision_stops_the_whole_group() {
    let sb = Sandbox::new();
    let mut cfg = sb.config();
    cfg.stop_grace_ms = 500;
    let node = TestNode::start(cfg).await;
    let mut c = node.client.clone();
    let port = free_ports(1)[0];
    let marker = format!("svcbroker-test-{}", uuid::Uuid::new_v4());
    // A daemon that forks a helper and ignores SIGTERM: SIGKILL after the
    // grace period must take both.
    let code = format!(
        "import signal,subprocess,sys\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nsubprocess.Popen([sys.executable,'-c','import time; time.sleep(300)',sys.argv[2]])\nexec({PY_LISTEN:?})"
    );
    let r = c
        .provision(python_request(
            "grp",
            port,
            &code,
            &[&port.to_string(), &marker],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(r.created);
    assert_eq!(pids_with_marker(&marker).len(), 2, "leader and helper run");
    let d = c
        .deprovision(DeprovisionRequest {
            instance_id: "grp".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(d.into_inner().removed);
    assert!(
        pids_with_marker(&marker).is_empty(),
        "group survived deprovision"
    );
    assert!(!instance_dir(&sb.data_dir(), "grp").exists());
    node.stop().await;
}

#[tokio::test]
async fn invalid_requests_create_nothing() {
    let sb = Sandbox::new();
    let mut cfg = sb.config();
    cfg.port_range = svcbroker_node::PortRangeConfig {
        start: 20000,
        end: 20010,
    };
    let node = TestNode::start(cfg).await;
    let mut c = node.client.clone();

    let long = "x".repeat(256);
    for id in ["", ".", "..", "a/b", "../evil", "a b", "é", long.as_str()] {
        let err = c
            .provision(redis_request(id, 20001, "pw"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "id {id:?}: {err:?}");
        let err = c
            .deprovision(DeprovisionRequest {
                instance_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "deprovision id {id:?}");
    }
    for path in [
        "/tmp/evil",
        "../evil",
        "conf/../../evil",
        "",
        ".svcbroker-instance.json",
    ] {
        let mut req = redis_request("okid", 20001, "pw");
        req.process.as_mut().unwrap().files.push(FileSpec {
            path: path.into(),
            content: "x".into(),
            mode: 0,
        });
        let err = c.provision(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "path {path:?}: {err:?}");
    }
    // Port outside the node's range, port 0, unknown kind, no argv.
    for port in [0, 19999, 20011] {
        let err = c
            .provision(redis_request("okid", port, "pw"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "port {port}");
    }
    let mut req = redis_request("okid", 20001, "pw");
    req.kind = "bogus".into();
    assert_eq!(
        c.provision(req).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut req = redis_request("okid", 20001, "pw");
    req.process.as_mut().unwrap().argv.clear();
    assert_eq!(
        c.provision(req).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut req = redis_request("okid", 20001, "pw");
    req.process = None;
    assert_eq!(
        c.provision(req).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    assert_eq!(std::fs::read_dir(sb.data_dir()).unwrap().count(), 0);
    assert!(!sb.root.path().join("evil").exists());
    assert!(node.list().await.is_empty());
    node.stop().await;
}

#[tokio::test]
async fn capacity_is_enforced() {
    let sb = Sandbox::new();
    let mut cfg = sb.config();
    cfg.capacity = 1;
    let node = TestNode::start(cfg).await;
    let mut c = node.client.clone();
    let ports = free_ports(2);
    c.provision(python_request(
        "c1",
        ports[0],
        PY_LISTEN,
        &[&ports[0].to_string()],
    ))
    .await
    .unwrap();
    let err = c
        .provision(python_request(
            "c2",
            ports[1],
            PY_LISTEN,
            &[&ports[1].to_string()],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(!instance_dir(&sb.data_dir(), "c2").exists());
    // Re-provisioning the one it holds is not a new instance.
    c.provision(python_request(
        "c1",
        ports[0],
        PY_LISTEN,
        &[&ports[0].to_string()],
    ))
    .await
    .unwrap();
    node.stop().await;
}

#[tokio::test]
async fn port_already_taken_is_refused() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = u32::from(squatter.local_addr().unwrap().port());
    let err = c
        .provision(redis_request("sq", port, "pw"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("already accepts connections"),
        "{}",
        err.message()
    );
    assert!(!instance_dir(&sb.data_dir(), "sq").exists());
    node.stop().await;
}

#[tokio::test]
async fn shutdown_stops_daemons_but_keeps_data() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    let port = free_ports(1)[0];
    let pid = c
        .provision(redis_request("keep", port, "pw"))
        .await
        .unwrap()
        .into_inner()
        .instance
        .unwrap()
        .pid;
    node.stop().await;
    assert!(!pid_alive(pid), "daemon must stop with the node");
    assert!(
        instance_dir(&sb.data_dir(), "keep")
            .join("redis.conf")
            .exists(),
        "data stays"
    );
    assert!(sb.live_pids().is_empty());
}

#[tokio::test]
async fn slow_start_is_listed_as_starting() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let port = free_ports(1)[0];
    let code = format!("import time\ntime.sleep(1.0)\nexec({PY_LISTEN:?})");
    let mut c = node.client.clone();
    let pending = tokio::spawn(async move {
        c.provision(python_request("slowok", port, &code, &[&port.to_string()]))
            .await
    });
    let starting = node
        .wait_for("slowok", Duration::from_secs(5), |i| {
            state(i) == InstanceState::Starting
        })
        .await;
    assert!(starting.pid > 0);
    let r = pending.await.unwrap().unwrap().into_inner();
    assert!(r.created);
    let running = r.instance.unwrap();
    assert_eq!(
        (running.pid, state(&running)),
        (starting.pid, InstanceState::Running)
    );
    node.stop().await;
}

/// A node SIGKILLed between starting a daemon and recording it in the
/// metadata leaves a daemon no metadata names, holding the instance's port.
/// Provisioning the instance again stops it (found by its working
/// directory) and starts one of its own; deprovisioning stops such a daemon
/// too. Found by the fault test (tests/tests/faults.rs).
#[tokio::test]
async fn a_daemon_left_unrecorded_by_a_killed_node_is_stopped() {
    use std::os::unix::process::CommandExt;

    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    let port = free_ports(1)[0];
    // What the killed node left: the directory, and the daemon running in
    // it in a process group of its own, but no metadata file.
    let start_stray = |id: &str| {
        let dir = instance_dir(&sb.data_dir(), id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .current_dir(&dir)
            .stdout(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        (dir, child)
    };
    let (dir, mut stray) = start_stray("r9");
    let pong = async {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port as u16))
                .await
                .is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(pong.await, "the stray daemon did not start");

    let resp = c
        .provision(redis_request("r9", port, "pw-r9"))
        .await
        .expect("provision despite the stray daemon")
        .into_inner();
    let inst = resp.instance.unwrap();
    assert_eq!(state(&inst), InstanceState::Running);
    assert_ne!(inst.pid, stray.id(), "the stray daemon was adopted");
    let _ = stray.wait();
    assert_eq!(
        redis_session(port, &[&["AUTH", "pw-r9"], &["PING"]]).await,
        ["+OK", "+PONG"],
        "the port is served by the node's own daemon"
    );
    c.deprovision(DeprovisionRequest {
        instance_id: "r9".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!dir.exists());

    // Deprovisioning a directory whose daemon was never recorded.
    let (dir, mut stray) = start_stray("r10");
    let d = c
        .deprovision(DeprovisionRequest {
            instance_id: "r10".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.removed);
    let _ = stray.wait();
    assert!(!dir.exists());
    node.stop().await;
}
