//! `svcbroker bench` run as its real binary against a running stack (the
//! gateway as its own process, so that the bench finds it in /proc): the
//! JSON report has its figures, lifecycles ran without errors, the
//! baselines were measured, and the bench left no instance behind. It
//! asserts no speed: that is the benchmark's own report.

use std::process::Stdio;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use svcbroker_tests::{GatewayMode, Osb, Stack, StackOptions};

/// Runs `svcbroker bench ARGS` against `stack` with only its credentials
/// in the environment; returns stdout parsed as JSON (all of it: `--json`
/// prints one object and nothing else there).
async fn bench(stack: &Stack, args: &[&str]) -> Value {
    let mut cmd = tokio::process::Command::new(svcbroker_tests::binary("svcbroker"));
    cmd.arg("bench")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("SVCBROKER_URL", &stack.http_url)
        .env("SVCBROKER_USERNAME", &stack.osb.username)
        .env("SVCBROKER_PASSWORD", &stack.osb.password)
        // The baseline's scratch database goes here, not into the checkout.
        .current_dir(stack.dir())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .expect("svcbroker bench did not finish within 180 s")
        .expect("run svcbroker bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status.code()
    );
    assert!(
        !stdout.contains(&stack.osb.password) && !stderr.contains(&stack.osb.password),
        "the password was printed"
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{stdout}"))
}

/// The instances the gateway holds, from the admin API.
async fn instance_count(osb: &Osb) -> usize {
    let r = Osb::send(osb.request(Method::GET, "/admin/v1/instances")).await;
    r.expect(200);
    r.body["instances"]
        .as_array()
        .expect("instances array")
        .len()
}

fn number(v: &Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_reports_lifecycles_baselines_and_cleans_up() {
    let stack = Stack::start(StackOptions {
        gateway: GatewayMode::Process,
        // --instances 105 on top of the lifecycles' instances.
        capacity: 200,
        ..StackOptions::default()
    })
    .await;
    let r = bench(
        &stack,
        &[
            "--seconds",
            "1",
            "--concurrency",
            "2",
            "--instances",
            "105",
            "--json",
        ],
    )
    .await;

    assert_eq!(r["service"], "echo", "{r:#}");
    assert!(number(&r["lifecycles"], "lifecycles") > 0.0, "{r:#}");
    assert!(number(&r["lifecycles_per_s"], "lifecycles_per_s") > 0.0);
    assert_eq!(r["errors"]["total"], 0, "{r:#}");
    for call in ["provision", "bind", "unbind", "deprovision"] {
        let c = &r["calls"][call];
        assert_eq!(c["count"], r["lifecycles"], "{call}: {r:#}");
        let (p50, p99, max) = (
            number(&c["p50_ms"], "p50"),
            number(&c["p99_ms"], "p99"),
            number(&c["max_ms"], "max"),
        );
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{call}: {c}");
    }

    // The gateway runs as its own process: found through its socket.
    let gw = &r["components"]["gateway"];
    assert_eq!(gw["visible"], true, "{r:#}");
    assert!(number(&gw["peak_rss_mb"], "peak_rss_mb") > 0.0, "{gw}");
    // The allocator and node run inside this test process: not a
    // component's executable, so reported as not visible, with a reason.
    for c in ["allocator", "node"] {
        assert_eq!(r["components"][c]["visible"], false, "{r:#}");
        assert!(r["components"][c]["why"].is_string(), "{r:#}");
    }

    let b = &r["baselines"];
    assert!(number(&b["sqlite_durable_commits_per_s"], "commits/s") > 0.0);
    assert!(number(&b["redis_spawn_to_pong_ms"], "spawn-to-PONG") > 0.0);
    assert!(r["ratios"]["lifecycles_per_s_vs_commit_bound"].is_number());

    let s = &r["scale"];
    assert_eq!(s["provisioned"], 105, "{s:#}");
    for at in ["at_100", "at_n"] {
        for what in ["catalog", "last_operation"] {
            assert!(s[at][what]["p99_ms"].is_number(), "{at} {what}: {s:#}");
        }
        assert_eq!(s[at]["errors"], 0, "{at}: {s:#}");
    }
    let targets = r["targets"].as_array().expect("targets");
    assert!(
        targets
            .iter()
            .any(|t| t["name"].as_str().is_some_and(|n| n.contains("lifecycles"))),
        "{targets:?}"
    );
    assert!(targets.iter().all(|t| t["met"].is_boolean()), "{targets:?}");

    // Everything the bench created is gone again.
    assert_eq!(instance_count(&stack.osb).await, 0);
}
