//! `svcbroker up`: the one-command local stack, run as its real binary.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::json;
use svcbroker_tests::fixtures::{echo, redis};
use svcbroker_tests::ports::PortBlock;
use svcbroker_tests::{Osb, RedisCreds, bind_body, new_id, procs, provision_body};

/// A running `svcbroker up` and what its banner said.
struct Up {
    child: Child,
    url: String,
    password: Option<String>,
    banner: String,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn start_up(data_dir: &Path, ports: &PortBlock, env: &[(&str, &str)]) -> Up {
    let (lo, hi) = ports.instance_range();
    let mut cmd = Command::new(svcbroker_tests::binary("svcbroker"));
    cmd.args(["up", "--data-dir"])
        .arg(data_dir)
        .args([
            "--http",
            "127.0.0.1:0",
            "--allocator-grpc",
            "127.0.0.1:0",
            "--node-grpc",
            "127.0.0.1:0",
            "--gateway-grpc",
            "127.0.0.1:0",
            "--ports",
            &format!("{lo}-{hi}"),
        ])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start svcbroker up");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut banner = String::new();
    let mut url = None;
    let mut password = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no complete banner from svcbroker up:\n{banner}"));
        banner.push_str(&line);
        banner.push('\n');
        if let Some(u) = line.strip_prefix("OSB API listening on ") {
            url = Some(u.trim().to_string());
        }
        if let Some(p) = line.trim().strip_prefix("password: ")
            && !p.starts_with('(')
        {
            password = p.split_whitespace().next().map(str::to_string);
        }
        if line.starts_with("Ctrl-C") {
            break;
        }
    }
    Up {
        child,
        url: url.unwrap_or_else(|| panic!("no OSB URL in banner:\n{banner}")),
        password,
        banner,
    }
}

/// Sends `signal` (SIGTERM from a service manager, SIGINT from Ctrl-C) and
/// waits for `svcbroker up` to exit.
fn stop(mut up: Up, signal: Signal) -> std::process::ExitStatus {
    kill(Pid::from_raw(up.child.id() as i32), signal).expect("signal svcbroker up");
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(status) = up.child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "svcbroker up ignored {signal}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn up_serves_the_shipped_services_and_stops_cleanly() {
    let tmp = svcbroker_tests::test_dir();
    let data = tmp.path().join("data");
    let ports = PortBlock::acquire();
    let up = start_up(&data, &ports, &[]);
    let password = up
        .password
        .clone()
        .unwrap_or_else(|| panic!("a generated password is printed:\n{}", up.banner));
    assert!(password.len() >= 16, "generated password too short");
    assert!(up.banner.contains("username: admin"), "{}", up.banner);

    // The shipped definitions were written to DATA/services.d.
    for f in ["echo.yaml", "redis.yaml"] {
        assert!(
            data.join("services.d").join(f).is_file(),
            "{f} not installed"
        );
    }
    let pw_mode = std::fs::metadata(data.join("osb-password"))
        .expect("password file")
        .permissions()
        .mode();
    assert_eq!(pw_mode & 0o077, 0, "osb-password is mode {pw_mode:o}");

    let osb = Osb::new(&up.url, "admin", &password);
    osb.with_auth("admin", "wrong").catalog().await.expect(401);
    let cat = osb.catalog().await;
    cat.expect(200);
    for name in ["echo", "redis"] {
        assert!(
            cat.text.contains(&format!("\"{name}\"")),
            "{name} missing: {}",
            cat.text
        );
    }

    // The node announced itself: provisioning works through all three.
    let eid = new_id();
    let ebid = new_id();
    svcbroker_tests::until(
        "the node to be registered",
        Duration::from_secs(30),
        || async {
            osb.provision(
                &eid,
                &provision_body(echo::SERVICE, echo::PLAN_FREE, json!({})),
                false,
            )
            .await
            .status
            .as_u16()
                == 201
        },
    )
    .await;
    let b = osb
        .bind(
            &eid,
            &ebid,
            &bind_body(echo::SERVICE, echo::PLAN_FREE),
            false,
        )
        .await;
    b.expect(201);
    assert_eq!(b.body["credentials"]["node_id"], "node-1");

    let rid = new_id();
    let rbid = new_id();
    osb.provision(
        &rid,
        &provision_body(redis::SERVICE, redis::PLAN_SMALL, json!({})),
        false,
    )
    .await
    .expect(201);
    let b = osb
        .bind(
            &rid,
            &rbid,
            &bind_body(redis::SERVICE, redis::PLAN_SMALL),
            false,
        )
        .await;
    b.expect(201);
    RedisCreds::from_credentials(&b.body["credentials"])
        .check_auth_set_get()
        .await;
    let node_dir = data.join("node");
    assert_eq!(procs::processes_under(&node_dir).len(), 1);

    let status = stop(up, Signal::SIGTERM);
    assert!(status.success(), "svcbroker up exit status {status}");
    assert!(
        procs::processes_under(&node_dir).is_empty(),
        "daemons outlived svcbroker up: {:?}",
        procs::processes_under(&node_dir)
    );

    // A second start reuses the saved password, or takes the one from the
    // environment without printing it.
    let again = start_up(&data, &ports, &[]);
    assert_eq!(again.password.as_deref(), Some(password.as_str()));
    Osb::new(&again.url, "admin", &password)
        .catalog()
        .await
        .expect(200);
    assert!(stop(again, Signal::SIGINT).success());

    let env_pw = "from-the-environment-1234";
    let third = start_up(
        &data,
        &ports,
        &[
            ("SVCBROKER_PASSWORD", env_pw),
            ("SVCBROKER_USERNAME", "ops"),
        ],
    );
    assert!(
        third.password.is_none(),
        "an operator's password is not printed"
    );
    assert!(!third.banner.contains(env_pw), "{}", third.banner);
    Osb::new(&third.url, "ops", env_pw)
        .catalog()
        .await
        .expect(200);
    Osb::new(&third.url, "admin", &password)
        .catalog()
        .await
        .expect(401);
    assert!(stop(third, Signal::SIGTERM).success());
}

#[test]
fn up_refuses_broken_service_definitions_with_exit_64() {
    let tmp = svcbroker_tests::test_dir();
    let services = tmp.path().join("services.d");
    std::fs::create_dir_all(&services).unwrap();
    std::fs::write(
        services.join("bad.yaml"),
        "id: x1\nname: bad\ndescription: d\nmodel: none\nplans: []\n",
    )
    .unwrap();
    let out = Command::new(svcbroker_tests::binary("svcbroker"))
        .args(["up", "--data-dir"])
        .arg(tmp.path().join("data"))
        .arg("--services-dir")
        .arg(&services)
        .args(["--http", "127.0.0.1:0"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .expect("run svcbroker up");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml:5"),
        "names file and line: {stderr}"
    );
}
