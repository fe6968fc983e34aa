//! The operator CLI (`svcbroker services`, `create-service`, `service`,
//! `bind-service`, `unbind-service`, `delete-service`, `nodes`,
//! `healthcheck`) run as its real binary against a running stack, and the
//! admin API it reads: tables, `--json`, names, exit codes.

use std::process::Stdio;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use svcbroker_tests::{Osb, RedisCreds, Stack, StackOptions};

/// What one CLI run gave.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    /// Panics unless the exit code is `want`, showing both streams.
    #[track_caller]
    fn expect(&self, want: i32) -> &Self {
        assert_eq!(
            self.code, want,
            "expected exit code {want}\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// stdout as JSON (all of it: `--json` prints nothing else there).
    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

/// Runs `svcbroker ARGS` with only the given environment (no SVCBROKER_*
/// from the developer's shell).
async fn run_with(env: &[(&str, &str)], args: &[&str]) -> Out {
    let mut cmd = tokio::process::Command::new(svcbroker_tests::binary("svcbroker"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("svcbroker {args:?} did not finish within 120 s"))
        .expect("run svcbroker");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `svcbroker ARGS` pointed at `stack` with its credentials.
async fn cli(stack: &Stack, args: &[&str]) -> Out {
    let env = [
        ("SVCBROKER_URL", stack.http_url.as_str()),
        ("SVCBROKER_USERNAME", stack.osb.username.as_str()),
        ("SVCBROKER_PASSWORD", stack.osb.password.as_str()),
    ];
    run_with(&env, args).await
}

/// The cells of each data row of a text table (`| a | b |`), trimmed.
fn table_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

async fn admin(osb: &Osb, path: &str) -> (u16, String) {
    let r = Osb::send(
        osb.bare(Method::GET, path)
            .basic_auth(&osb.username, Some(&osb.password)),
    )
    .await;
    (r.status.as_u16(), r.text)
}

#[tokio::test(flavor = "multi_thread")]
async fn services_table_and_json() {
    let stack = Stack::start_default().await;

    let out = cli(&stack, &["services"]).await;
    out.expect(0);
    assert!(
        out.stdout.contains("System Services"),
        "title like the seed's:\n{}",
        out.stdout
    );
    let header = out
        .stdout
        .lines()
        .find(|l| l.starts_with("| Service"))
        .unwrap_or_else(|| panic!("no header row:\n{}", out.stdout));
    for col in ["Service", "Version", "Description", "Plans"] {
        assert!(header.contains(col), "{header}");
    }
    let redis_row = out
        .stdout
        .lines()
        .find(|l| l.starts_with("| redis "))
        .unwrap_or_else(|| panic!("no redis row:\n{}", out.stdout));
    assert!(redis_row.contains("| 7 "), "version column: {redis_row}");
    assert!(
        redis_row.contains("small, large"),
        "plans column: {redis_row}"
    );

    let out = cli(&stack, &["services", "--json"]).await;
    out.expect(0);
    let services = out.json();
    let redis = services
        .as_array()
        .expect("an array")
        .iter()
        .find(|s| s["name"] == "redis")
        .expect("redis in --json");
    assert_eq!(redis["version"], "7");
    let plans: Vec<&str> = redis["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(plans, ["small", "large"]);
    assert!(out.stderr.is_empty(), "stderr: {}", out.stderr);

    // No instances yet: an empty list, still valid JSON.
    let out = cli(&stack, &["services", "--instances", "--json"]).await;
    out.expect(0);
    assert_eq!(out.json(), json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn instance_lifecycle_by_name() {
    let stack = Stack::start_default().await;

    let out = cli(
        &stack,
        &["create-service", "redis", "cache1", "-c", "maxmemory=32mb"],
    )
    .await;
    out.expect(0);
    assert!(
        out.stderr.contains("Creating service cache1") && out.stderr.contains("OK"),
        "progress on stderr (not a terminal: plain lines):\n{}",
        out.stderr
    );
    // One name, one instance.
    cli(&stack, &["create-service", "redis", "cache1"])
        .await
        .expect(1);

    let out = cli(&stack, &["services", "--instances"]).await;
    out.expect(0);
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with("| cache1 "))
        .unwrap_or_else(|| panic!("no cache1 row:\n{}", out.stdout));
    for cell in ["redis", "small", svcbroker_tests::NODE_ID, "ready"] {
        assert!(row.contains(cell), "{cell} missing in {row}");
    }
    let list = cli(&stack, &["services", "--instances", "--json"]).await;
    list.expect(0);
    let list = list.json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let inst = &list[0];
    assert_eq!(inst["name"], "cache1");
    assert_eq!(inst["service_name"], "redis");
    assert_eq!(inst["plan_name"], "small");
    assert_eq!(inst["node_id"], svcbroker_tests::NODE_ID);
    assert_eq!(inst["state"], "ready");
    assert_eq!(inst["binding_count"], 0);
    assert_eq!(inst["last_operation"]["action"], "provision");
    assert_eq!(inst["last_operation"]["state"], "succeeded");
    let id = inst["id"].as_str().unwrap().to_owned();
    uuid::Uuid::parse_str(&id).expect("the CLI makes uuid instance ids");

    // Bind with a name; the credentials work with a real client.
    let out = cli(
        &stack,
        &["bind-service", "cache1", "--binding-name", "app", "--json"],
    )
    .await;
    out.expect(0);
    let bound = out.json();
    assert_eq!(bound["binding_name"], "app");
    assert_eq!(bound["instance_id"], id.as_str());
    let creds = RedisCreds::from_credentials(&bound["credentials"]);
    creds.check_auth_set_get().await;
    let password = creds.password.clone();
    cli(&stack, &["bind-service", "cache1", "--binding-name", "app"])
        .await
        .expect(1);

    // The seed's `stackato service` table: credentials, meta, properties.
    let out = cli(&stack, &["service", "cache1"]).await;
    out.expect(0);
    let text = &out.stdout;
    assert!(text.lines().any(|l| l == "cache1"), "title:\n{text}");
    let rows = table_rows(text);
    let value_of = |what: &str| -> &str {
        rows.iter()
            .find(|r| r[0] == what)
            .map(|r| r[1].as_str())
            .unwrap_or_else(|| panic!("no {what:?} row in\n{text}"))
    };
    assert_eq!(value_of("What"), "Value");
    assert!(
        value_of("credentials").starts_with("binding app ("),
        "{text}"
    );
    assert_eq!(value_of("- password"), password);
    assert_eq!(value_of("- port"), creds.port.to_string());
    assert_eq!(value_of("- node_id"), svcbroker_tests::NODE_ID);
    assert_eq!(value_of("- plan"), "small");
    assert_eq!(value_of("- tags"), "redis key-value cache");
    assert_eq!(value_of("- version"), "7.0.0");
    assert!(value_of("- created").ends_with('Z'), "{text}");
    assert!(value_of("- updated").ends_with('Z'), "{text}");
    assert_eq!(value_of("meta"), "");
    assert_eq!(value_of("properties"), "");
    assert_eq!(value_of("vendor"), "redis");
    assert_eq!(value_of("version"), "7");
    assert_eq!(value_of("state"), "ready");
    assert_eq!(value_of("- maxmemory"), "32mb");
    let out = cli(&stack, &["service", "cache1", "--json"]).await;
    out.expect(0);
    let shown = out.json();
    assert_eq!(shown["bindings"][0]["name"], "app");
    assert_eq!(
        shown["bindings"][0]["credentials"]["password"],
        password.as_str()
    );
    assert_eq!(shown["parameters"]["maxmemory"], "32mb");

    // The admin API never carries a secret, whatever the CLI shows.
    for path in [
        "/admin/v1/instances".to_owned(),
        "/admin/v1/instances/cache1".to_owned(),
        format!("/admin/v1/instances/{id}"),
        "/admin/v1/nodes".to_owned(),
    ] {
        let (status, text) = admin(&stack.osb, &path).await;
        assert_eq!(status, 200, "{path}: {text}");
        assert!(!text.contains(&password), "{path} leaks a password: {text}");
        assert!(!text.contains("password"), "{path}: {text}");
    }

    // An instance with bindings is not deleted by accident.
    cli(&stack, &["delete-service", "cache1"]).await.expect(1);
    cli(&stack, &["unbind-service", "cache1", "nope"])
        .await
        .expect(3);
    let out = cli(&stack, &["unbind-service", "cache1", "app", "--json"]).await;
    out.expect(0);
    assert_eq!(out.json()["deleted"], true);
    assert!(
        !creds.auth_accepted().await,
        "an unbound binding's credentials stop working"
    );

    let out = cli(&stack, &["delete-service", "cache1"]).await;
    out.expect(0);
    assert!(
        out.stderr.contains("Deleting service cache1"),
        "{}",
        out.stderr
    );
    cli(&stack, &["service", "cache1"]).await.expect(3);
    let out = cli(&stack, &["services", "--instances", "--json"]).await;
    assert_eq!(out.json(), json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_force_unbinds_first_and_ids_work_as_names() {
    let stack = Stack::start_default().await;
    let out = cli(
        &stack,
        &["create-service", "echo", "e1", "--plan", "loud", "--json"],
    )
    .await;
    out.expect(0);
    let created = out.json();
    assert_eq!(created["name"], "e1");
    assert_eq!(created["plan_name"], "loud");
    let id = created["id"].as_str().unwrap().to_owned();

    let out = cli(&stack, &["bind-service", &id, "--json"]).await;
    out.expect(0);
    let binding_id = out.json()["binding_id"].as_str().unwrap().to_owned();
    // An unnamed binding is shown and deleted by its id.
    let out = cli(&stack, &["service", "e1"]).await;
    out.expect(0);
    assert!(
        out.stdout.contains(&format!("binding {binding_id}")),
        "{}",
        out.stdout
    );
    cli(&stack, &["bind-service", "e1", "--binding-name", "b2"])
        .await
        .expect(0);

    let out = cli(&stack, &["delete-service", "e1", "--force", "--json"]).await;
    out.expect(0);
    assert_eq!(out.json(), json!({"id": id, "name": "e1", "deleted": true}));
    cli(&stack, &["service", &id]).await.expect(3);
}

#[tokio::test(flavor = "multi_thread")]
async fn names_from_other_platforms_and_ambiguous_names() {
    let stack = Stack::start_default().await;
    // Instances made by another OSB client: named by `context.name`, twice
    // the same name, and not named at all.
    let mut ids = Vec::new();
    for context in [
        json!({"platform": "kubernetes", "name": "twin"}),
        json!({"platform": "cloudfoundry", "instance_name": "twin"}),
        json!({"platform": "other"}),
    ] {
        let id = svcbroker_tests::new_id();
        let mut body = svcbroker_tests::provision_body(
            svcbroker_tests::fixtures::echo::SERVICE,
            svcbroker_tests::fixtures::echo::PLAN_FREE,
            json!({}),
        );
        body["context"] = context;
        stack.osb.provision(&id, &body, false).await.expect(201);
        ids.push(id);
    }

    let out = cli(&stack, &["services", "--instances", "--json"]).await;
    out.expect(0);
    let names: Vec<Value> = out
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].clone())
        .collect();
    assert_eq!(names, [json!("twin"), json!("twin"), Value::Null]);
    let out = cli(&stack, &["services", "--instances"]).await;
    assert!(
        out.stdout.contains(&format!("| ({}) ", ids[2])),
        "an unnamed instance shows its id:\n{}",
        out.stdout
    );

    // One name, two instances: refused with the ids, and ids still work.
    let out = cli(&stack, &["service", "twin"]).await;
    out.expect(1);
    assert!(
        out.stderr.contains(&ids[0]) && out.stderr.contains("use an id"),
        "{}",
        out.stderr
    );
    let out = cli(&stack, &["service", &ids[1], "--json"]).await;
    out.expect(0);
    assert_eq!(out.json()["name"], "twin");
    cli(&stack, &["service", &ids[2]]).await.expect(0);
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_table_and_json() {
    let stack = Stack::start(StackOptions {
        capacity: 7,
        ..Default::default()
    })
    .await;
    cli(&stack, &["create-service", "echo", "n1"])
        .await
        .expect(0);

    let out = cli(&stack, &["nodes"]).await;
    out.expect(0);
    let header = out
        .stdout
        .lines()
        .find(|l| l.starts_with("| Id"))
        .unwrap_or_else(|| panic!("no header:\n{}", out.stdout));
    for col in [
        "Address",
        "State",
        "Services",
        "Capacity used/total",
        "Last seen",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with(&format!("| {} ", svcbroker_tests::NODE_ID)))
        .unwrap_or_else(|| panic!("no node row:\n{}", out.stdout));
    assert!(row.contains(&stack.node_url), "{row}");
    assert!(row.contains("| up "), "{row}");
    assert!(row.contains("| 1/7 "), "{row}");
    assert!(row.contains("redis"), "{row}");
    assert!(row.contains("s ago"), "{row}");

    let out = cli(&stack, &["nodes", "--json"]).await;
    out.expect(0);
    let nodes = out.json();
    let n = &nodes[0];
    assert_eq!(n["node_id"], svcbroker_tests::NODE_ID);
    assert_eq!(n["state"], "up");
    assert_eq!(n["capacity"], 7);
    assert_eq!(n["used"], 1);
    assert_eq!(n["grpc_url"], stack.node_url.as_str());
    assert!(!n["boot_id"].as_str().unwrap().is_empty());
    assert!(
        n["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "echo")
    );
    assert!(n["last_seen"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes() {
    let stack = Stack::start_default().await;
    let url = stack.http_url.as_str();
    let user = stack.osb.username.as_str();

    // 3: not found (instance, service, plan).
    let out = cli(&stack, &["service", "no-such-instance"]).await;
    out.expect(3);
    assert!(out.stderr.contains("no-such-instance"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    cli(&stack, &["create-service", "no-such-service", "x"])
        .await
        .expect(3);
    cli(&stack, &["create-service", "redis", "x", "--plan", "huge"])
        .await
        .expect(3);
    cli(&stack, &["delete-service", "no-such-instance"])
        .await
        .expect(3);

    // 1: the broker refused or the operation failed, with its description.
    let out = cli(
        &stack,
        &["create-service", "redis", "x", "-c", "maxmemory=lots"],
    )
    .await;
    out.expect(1);
    assert!(
        out.stderr.contains("maxmemory"),
        "OSB description: {}",
        out.stderr
    );

    // 2: usage.
    cli(&stack, &["services", "--no-such-flag"]).await.expect(2);
    cli(&stack, &["create-service", "redis"]).await.expect(2);
    cli(&stack, &["create-service", "redis", "x", "-c", "novalue"])
        .await
        .expect(2);

    // 4: wrong password, no password, nobody listening.
    let out = run_with(
        &[
            ("SVCBROKER_URL", url),
            ("SVCBROKER_USERNAME", user),
            ("SVCBROKER_PASSWORD", "wrong"),
        ],
        &["services"],
    )
    .await;
    out.expect(4);
    assert!(out.stderr.contains("credentials"), "{}", out.stderr);
    run_with(&[("SVCBROKER_URL", url)], &["nodes"])
        .await
        .expect(4);
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    run_with(
        &[("SVCBROKER_PASSWORD", "x")],
        &["services", "--url", &format!("http://{closed}")],
    )
    .await
    .expect(4);

    // The admin API wants the same basic auth as OSB.
    let r = Osb::send(stack.osb.bare(Method::GET, "/admin/v1/instances")).await;
    assert_eq!(r.status.as_u16(), 401, "{}", r.text);
    let r = Osb::send(
        stack
            .osb
            .bare(Method::GET, "/admin/v1/nodes")
            .basic_auth(user, Some("wrong")),
    )
    .await;
    assert_eq!(r.status.as_u16(), 401, "{}", r.text);

    // --help documents the codes.
    let out = run_with(&[], &["service", "--help"]).await;
    out.expect(0);
    for code in ["0  success", "3  not found", "4  authentication"] {
        assert!(out.stdout.contains(code), "{}", out.stdout);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn healthcheck_serving_and_unreachable() {
    let stack = Stack::start_default().await;
    let out = run_with(&[], &["healthcheck", &stack.gateway_grpc_url]).await;
    out.expect(0);
    assert!(out.stdout.contains("SERVING"), "{}", out.stdout);
    let out = run_with(
        &[],
        &[
            "healthcheck",
            &stack.allocator_url,
            "--service",
            "svcbroker.v1.Allocator",
            "--json",
        ],
    )
    .await;
    out.expect(0);
    assert_eq!(out.json()["status"], "SERVING");
    // A service the server does not have is not SERVING.
    run_with(
        &[],
        &[
            "healthcheck",
            &stack.node_url,
            "--service",
            "no.such.Service",
        ],
    )
    .await
    .expect(1);

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let started = std::time::Instant::now();
    run_with(&[], &["healthcheck", &format!("http://{closed}")])
        .await
        .expect(1);
    assert!(started.elapsed() < Duration::from_secs(5));
}
