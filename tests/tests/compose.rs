//! End to end in containers: `docker-compose.yml` brought up under a
//! project name of its own, a redis instance provisioned through the
//! gateway and used from another container on the compose network with the
//! bound credentials, then the node holding it killed (`docker compose
//! kill`): new instances go to the other node; started again, the node gets
//! its instance back (reconciliation of a new boot), data included.
//!
//! Needs a Docker engine and the release binaries (`cargo build --release
//! --bins`, which scripts/test.sh runs). Where no Docker engine answers the
//! test says "SKIPPED: no docker engine" and passes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use svcbroker_tests::fixtures::redis;
use svcbroker_tests::ports::PortBlock;
use svcbroker_tests::{Osb, RedisCreds, bind_body, eventually, new_id, workspace_root};

/// The image docker-compose.yml builds and runs.
const IMAGE: &str = "svcbroker:local";
/// The compose services that are nodes.
const NODE_SERVICES: [&str; 2] = ["node-a", "node-b"];

/// A compose project that is taken down, volumes included, however the
/// test ends.
struct Project {
    name: String,
    root: PathBuf,
    env: Vec<(String, String)>,
}

impl Project {
    /// `docker compose -p NAME ARGS` in the workspace root, with the
    /// project's environment; returns (success, stdout, stderr).
    fn compose(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new("docker");
        cmd.arg("compose")
            .args(["-p", &self.name])
            .args(args)
            .current_dir(&self.root)
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        run(cmd)
    }

    /// Like [`Project::compose`], panicking (with the containers' logs)
    /// when it fails.
    #[track_caller]
    fn compose_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.compose(args);
        assert!(
            ok,
            "docker compose {args:?} failed:\n{err}\n{out}\n--- logs ---\n{}",
            self.logs()
        );
        out
    }

    fn logs(&self) -> String {
        let (_, out, err) = self.compose(&["logs", "--no-color", "--tail", "60"]);
        format!("{out}{err}")
    }

    /// The container id of a compose service's (first) container.
    fn container(&self, service: &str) -> String {
        self.compose_ok(&["ps", "-q", service])
            .lines()
            .next()
            .unwrap_or_else(|| panic!("no container for {service}"))
            .trim()
            .to_owned()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let (ok, _, err) = self.compose(&["down", "-v", "--remove-orphans", "-t", "5"]);
        if !ok {
            eprintln!("docker compose -p {} down -v failed: {err}", self.name);
        }
    }
}

fn run(mut cmd: Command) -> (bool, String, String) {
    match cmd.output() {
        Ok(out) => (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ),
        Err(e) => (false, String::new(), format!("cannot run {cmd:?}: {e}")),
    }
}

fn docker_answers() -> bool {
    let mut cmd = Command::new("docker");
    cmd.args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null());
    run(cmd).0
}

/// Runs one of the repository's setup scripts (idempotent and quick when
/// its work is already done).
#[track_caller]
fn script(root: &Path, path: &str) {
    let mut cmd = Command::new(root.join(path));
    cmd.current_dir(root).stdin(Stdio::null());
    let (ok, out, err) = run(cmd);
    assert!(ok, "{path} failed:\n{out}\n{err}");
}

/// Runs `redis-cli ARGS` in a fresh container on the project's network (an
/// application container, not the node), returning its trimmed output.
#[track_caller]
fn redis_cli_from_other_container(network: &str, creds: &RedisCreds, args: &[&str]) -> String {
    let (ok, out) = try_redis_cli(network, creds, args);
    assert!(ok, "redis-cli {args:?} in a container failed: {out}");
    out
}

/// Like [`redis_cli_from_other_container`], returning (success, output).
/// The password reaches redis-cli in its environment (REDISCLI_AUTH), not
/// on a command line other users of the host can read.
fn try_redis_cli(network: &str, creds: &RedisCreds, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("docker");
    cmd.args(["run", "--rm", "--network", network, "-e", "REDISCLI_AUTH"])
        .args([IMAGE, "redis-cli", "-e"])
        .args(["-h", &creds.host, "-p", &creds.port.to_string()])
        .args([
            "--user",
            creds.username.as_deref().expect("redis binding user"),
        ])
        .args(args)
        .env("REDISCLI_AUTH", &creds.password)
        .stdin(Stdio::null());
    let (ok, out, err) = run(cmd);
    (ok, format!("{}{}", out.trim(), err.trim()))
}

async fn admin_get(osb: &Osb, path: &str) -> Option<Value> {
    let req = osb
        .bare(Method::GET, path)
        .basic_auth(&osb.username, Some(&osb.password))
        .timeout(Duration::from_secs(5));
    let resp = req.send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

/// Node id -> state ("up"/"down") from the admin API.
async fn node_states(osb: &Osb) -> Vec<(String, String)> {
    admin_get(osb, "/admin/v1/nodes")
        .await
        .and_then(|b| b["nodes"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|n| {
            (
                n["node_id"].as_str().unwrap_or("").to_owned(),
                n["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// Provisions a redis instance named `name` (async) and waits until it
/// succeeded; returns its id and node.
async fn provision(osb: &Osb, name: &str) -> (String, String) {
    let id = new_id();
    let body = json!({
        "service_id": redis::SERVICE,
        "plan_id": redis::PLAN_SMALL,
        "organization_guid": "svcbroker-e2e",
        "space_guid": "svcbroker-e2e",
        "context": { "platform": "svcbroker-e2e", "instance_name": name },
    });
    let r = osb.provision(&id, &body, true).await;
    assert_eq!(r.status.as_u16(), 202, "provision {name}: {}", r.text);
    let op = r.operation();
    let (state, body) = osb
        .wait_instance(&id, op.as_deref(), Duration::from_secs(60))
        .await;
    assert_eq!(state, "succeeded", "provision {name}: {body}");
    let inst = admin_get(osb, &format!("/admin/v1/instances/{name}"))
        .await
        .unwrap_or_else(|| panic!("admin API does not know {name}"));
    assert_eq!(inst["id"], id.as_str());
    (id, inst["node_id"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn compose_stack_end_to_end() {
    if !docker_answers() {
        // Visible in the test output whether or not it is captured.
        println!("SKIPPED: no docker engine");
        eprintln!("SKIPPED: no docker engine");
        return;
    }
    let started = Instant::now();
    let root = workspace_root();
    for bin in ["svcbroker", "gateway", "node", "allocator"] {
        let path = root.join("target/release").join(bin);
        assert!(
            path.is_file(),
            "{} is missing: the image copies the release binaries \
             (`cargo build --release --bins`, which scripts/test.sh runs)",
            path.display()
        );
    }
    script(&root, "docker/build-base-image.sh");
    script(&root, "scripts/install-compose-shim.sh");

    // A gateway port no other test process holds, published on loopback.
    let ports = PortBlock::acquire();
    let http_port = ports.reserved(0);
    let password = format!("e2e-{}", uuid::Uuid::new_v4().simple());
    let project = Project {
        name: format!("svcbroker-e2e-{}", std::process::id()),
        root: root.clone(),
        env: vec![
            ("SVCBROKER_HTTP_PORT".into(), http_port.to_string()),
            ("SVCBROKER_USERNAME".into(), "admin".into()),
            ("SVCBROKER_PASSWORD".into(), password.clone()),
            (
                "SVCBROKER_TOKEN".into(),
                format!("tok-{}", uuid::Uuid::new_v4().simple()),
            ),
        ],
    };
    // Down first: a project of the same name left by a killed run.
    let _ = project.compose(&["down", "-v", "--remove-orphans", "-t", "1"]);
    project.compose_ok(&["build"]);
    project.compose_ok(&["up", "-d", "--wait", "--wait-timeout", "120"]);
    eprintln!("stack healthy after {:?}", started.elapsed());

    let osb = Osb::new(&format!("http://127.0.0.1:{http_port}"), "admin", &password);
    let network = format!("{}_default", project.name);
    // The gateway knows both nodes (they announce themselves).
    let nodes: Vec<String> = eventually("both nodes up", Duration::from_secs(60), || async {
        let states = node_states(&osb).await;
        (states.len() == 2 && states.iter().all(|(_, s)| s == "up"))
            .then(|| states.into_iter().map(|(id, _)| id).collect())
    })
    .await;

    // A redis instance, bound, used from another container.
    let (id1, node1) = provision(&osb, "e2e-cache").await;
    assert!(nodes.contains(&node1), "{node1} not in {nodes:?}");
    let bid = new_id();
    let r = osb
        .bind(
            &id1,
            &bid,
            &bind_body(redis::SERVICE, redis::PLAN_SMALL),
            false,
        )
        .await;
    assert_eq!(r.status.as_u16(), 201, "bind: {}", r.text);
    let creds = RedisCreds::from_credentials(&r.body["credentials"]);
    assert_eq!(r.body["credentials"]["node_id"], node1.as_str());
    assert_eq!(
        redis_cli_from_other_container(&network, &creds, &["PING"]),
        "PONG"
    );
    assert_eq!(
        redis_cli_from_other_container(&network, &creds, &["SET", "e2e-key", "kept"]),
        "OK"
    );
    assert_eq!(
        redis_cli_from_other_container(&network, &creds, &["GET", "e2e-key"]),
        "kept"
    );

    // Which compose service runs node1 (node ids are container host names).
    let mut holder = None;
    for service in NODE_SERVICES {
        if project.container(service).starts_with(&node1) {
            holder = Some(service);
        }
    }
    let holder = holder.unwrap_or_else(|| panic!("no compose service runs node {node1}"));
    let other = nodes.iter().find(|n| **n != node1).unwrap().clone();

    project.compose_ok(&["kill", holder]);
    eventually(
        &format!("{node1} down after docker compose kill {holder}"),
        Duration::from_secs(60),
        || async {
            node_states(&osb)
                .await
                .iter()
                .any(|(n, s)| *n == node1 && s == "down")
                .then_some(())
        },
    )
    .await;
    for name in ["e2e-after-kill-1", "e2e-after-kill-2"] {
        let (_, node) = provision(&osb, name).await;
        assert_eq!(node, other, "{name} placed on the live node");
    }

    // Back again: a new boot, reconciled; the instance and its data return.
    project.compose_ok(&["start", holder]);
    eventually(
        &format!("{node1} up again"),
        Duration::from_secs(90),
        || async {
            node_states(&osb)
                .await
                .iter()
                .any(|(n, s)| *n == node1 && s == "up")
                .then_some(())
        },
    )
    .await;
    // Restored means: the daemon runs again on the restarted node, the
    // binding's ACL user exists again, and the data is still there.
    eventually(
        "the instance restored on its node, binding and data included",
        Duration::from_secs(90),
        || async {
            let (ok, out) = try_redis_cli(&network, &creds, &["GET", "e2e-key"]);
            (ok && out == "kept").then_some(())
        },
    )
    .await;
    let inst = admin_get(&osb, &format!("/admin/v1/instances/{id1}"))
        .await
        .expect("admin instance");
    assert_eq!(inst["node_id"], node1.as_str(), "it stayed on its node");
    eprintln!("compose end to end done in {:?}", started.elapsed());
}
