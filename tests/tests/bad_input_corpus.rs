//! The bad-input corpus over every OSB endpoint: for each endpoint, ids
//! with control characters, unicode and path traversal, bodies that are
//! truncated, nested 100,000 levels deep, of the wrong types, of unknown
//! service/plan ids or violating the plan schema, bodies and headers beyond
//! the limits, query parameters out of their domain, and requests replayed
//! or out of order. Each must get the spec's 4xx as JSON with a short, clear
//! `description`, change nothing (allocator, node, data directory,
//! processes and the gateway's own records, through the admin API), and
//! leave no panic, no secret and no forged line in the services' logs.
//!
//! `bad_input.rs` holds the first, hand-picked cases; this file is the
//! systematic sweep.

mod support;

use serde_json::{Value, json};
use support::FORGED;
use svcbroker_tests::fixtures::{echo, redis};
use svcbroker_tests::raw::chunked;
use svcbroker_tests::stack::TEST_TOKEN;
use svcbroker_tests::{Resp, Stack, assert_error, bind_body, new_id, provision_body};

/// Longest `description` accepted as "clear": an error names the field and
/// the rule, it does not echo a megabyte of input back.
const MAX_DESCRIPTION: usize = 1024;

/// A running stack with one ready echo instance and binding, and one redis
/// instance with a binding whose credentials are secrets that must never
/// appear in an answer to someone else's request or in a log.
struct Fixture {
    stack: Stack,
    echo_id: String,
    echo_bid: String,
    redis_id: String,
    redis_bid: String,
    secrets: Vec<String>,
}

impl Fixture {
    async fn start() -> Fixture {
        support::capture();
        let stack = Stack::start_default().await;
        let osb = &stack.osb;
        let echo_id = new_id();
        let echo_bid = new_id();
        osb.provision(
            &echo_id,
            &provision_body(echo::SERVICE, echo::PLAN_FREE, json!({"message": "hi"})),
            false,
        )
        .await
        .expect(201);
        osb.bind(
            &echo_id,
            &echo_bid,
            &bind_body(echo::SERVICE, echo::PLAN_FREE),
            false,
        )
        .await
        .expect(201);
        let redis_id = new_id();
        let redis_bid = new_id();
        osb.provision(
            &redis_id,
            &provision_body(redis::SERVICE, redis::PLAN_SMALL, json!({})),
            false,
        )
        .await
        .expect(201);
        let bound = osb
            .bind(
                &redis_id,
                &redis_bid,
                &bind_body(redis::SERVICE, redis::PLAN_SMALL),
                false,
            )
            .await;
        bound.expect(201);
        let creds = &bound.body["credentials"];
        let mut secrets = vec![stack.osb.password.clone(), TEST_TOKEN.to_string()];
        for key in ["password", "uri"] {
            let v = creds[key]
                .as_str()
                .unwrap_or_else(|| panic!("redis credentials without {key}: {}", bound.text));
            secrets.push(v.to_string());
        }
        Fixture {
            stack,
            echo_id,
            echo_bid,
            redis_id,
            redis_bid,
            secrets,
        }
    }

    /// Everything a refused request must leave as it was: the allocator,
    /// node, data directory and processes ([`Stack::snapshot`]) and the
    /// gateway's instances, bindings and operations (admin API).
    async fn state(&self) -> (svcbroker_tests::Snapshot, Value) {
        (self.stack.snapshot().await, self.gateway_records().await)
    }

    async fn gateway_records(&self) -> Value {
        let list = self.admin("/admin/v1/instances").await;
        let mut out = Vec::new();
        for inst in list["instances"].as_array().cloned().unwrap_or_default() {
            let id = inst["id"].as_str().unwrap_or_default().to_string();
            let mut detail = self.admin(&format!("/admin/v1/instances/{id}")).await;
            // What the reconciler last saw is refreshed on its own schedule,
            // not by requests.
            if let Some(m) = detail.as_object_mut() {
                m.remove("observed");
                m.remove("observed_state");
            }
            out.push(detail);
        }
        out.sort_by_key(|v| v["id"].as_str().unwrap_or_default().to_string());
        Value::Array(out)
    }

    async fn admin(&self, path: &str) -> Value {
        let r =
            svcbroker_tests::Osb::send(self.stack.osb.request(reqwest::Method::GET, path)).await;
        r.expect(200);
        r.body
    }

    /// Sends one case and checks its answer.
    async fn check(&self, c: &Case) {
        let r = self
            .stack
            .raw(
                &format!("{} {} HTTP/1.1", c.method, c.target),
                &c.headers,
                &c.body,
            )
            .await;
        self.assert_answer(c, &r);
    }

    #[track_caller]
    fn assert_answer(&self, c: &Case, r: &Resp) {
        let what = format!("{} ({} {})", c.name, c.method, short(&c.target));
        assert_eq!(
            r.status.as_u16(),
            c.want,
            "{what}: expected {}, got {} {}",
            c.want,
            r.status,
            short(&r.text)
        );
        if c.want >= 400 {
            // (A 2xx here is an identical replay of a bind, which rightly
            // answers the caller its own binding's credentials again.)
            support::assert_no_secret(&what, &r.text, &self.secrets);
            assert_error(r, c.want, None);
            let d = r.body["description"].as_str().unwrap_or_default();
            assert!(
                d.len() <= MAX_DESCRIPTION,
                "{what}: a {} byte description is not a clear message: {}",
                d.len(),
                short(d)
            );
            assert!(
                !d.chars().any(char::is_control),
                "{what}: the description carries control characters: {d:?}"
            );
        }
    }

    /// Asserts the services are still up and answering.
    async fn assert_alive(&mut self) {
        self.stack.assert_running();
        self.stack.osb.catalog().await.expect(200);
        self.stack.osb.get_instance(&self.echo_id).await.expect(200);
        self.stack
            .osb
            .get_binding(&self.redis_id, &self.redis_bid)
            .await
            .expect(200);
    }
}

/// One request of the corpus and the status the spec asks for.
struct Case {
    name: String,
    method: &'static str,
    /// Path and query, exactly as sent.
    target: String,
    /// Extra header lines.
    headers: String,
    body: Vec<u8>,
    want: u16,
}

fn case(
    name: impl Into<String>,
    method: &'static str,
    target: String,
    body: &[u8],
    want: u16,
) -> Case {
    Case {
        name: name.into(),
        method,
        target,
        headers: String::new(),
        body: body.to_vec(),
        want,
    }
}

fn short(s: &str) -> String {
    if s.len() <= 300 {
        s.to_string()
    } else {
        let cut = (0..=300)
            .rev()
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(0);
        format!("{}... ({} bytes)", &s[..cut], s.len())
    }
}

fn to_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("serialize")
}

fn del_query(service: &str, plan: &str) -> String {
    format!("?service_id={service}&plan_id={plan}")
}

/// Every endpoint with instance id `i` and binding id `b` placed verbatim
/// in the path, each with a request that would succeed for good ids.
fn endpoints(i: &str, b: &str) -> Vec<(&'static str, String, Vec<u8>)> {
    let inst = format!("/v2/service_instances/{i}");
    let bind = format!("{inst}/service_bindings/{b}");
    let q = del_query(echo::SERVICE, echo::PLAN_FREE);
    vec![
        ("GET", inst.clone(), vec![]),
        (
            "PUT",
            inst.clone(),
            to_bytes(&provision_body(echo::SERVICE, echo::PLAN_FREE, json!({}))),
        ),
        (
            "PATCH",
            inst.clone(),
            to_bytes(&json!({"service_id": echo::SERVICE, "parameters": {"message": "x"}})),
        ),
        ("DELETE", format!("{inst}{q}"), vec![]),
        ("GET", format!("{inst}/last_operation"), vec![]),
        (
            "PUT",
            bind.clone(),
            to_bytes(&bind_body(echo::SERVICE, echo::PLAN_FREE)),
        ),
        ("DELETE", format!("{bind}{q}"), vec![]),
        ("GET", bind.clone(), vec![]),
        ("GET", format!("{bind}/last_operation"), vec![]),
    ]
}

/// Ids as they appear in a request line: control characters, unicode,
/// traversal, reserved characters, too long. Every one is a 400.
fn bad_ids() -> Vec<String> {
    let mut ids: Vec<String> = [
        "%00",
        "a%00b",
        "a%0Ab",
        "a%0D%0A",
        "%1B%5B31m",
        "a%7F",
        "a%20b",
        "a%09b",
        "%C3%A9",
        "caf%C3%A9",
        "%E2%80%AE",
        "%EF%BC%8E%EF%BC%8E",
        "%F0%9F%92%A3",
        "%FF",
        "%C0%AE%C0%AE",
        ".",
        "..",
        "%2e%2e",
        "%2E%2E",
        ".%2E",
        "%2F",
        "a%2Fb",
        "a%2F..%2Fb",
        "..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "..%5C..%5Cwindows",
        "a%5Cb",
        "a%3Fb",
        "a%23b",
        "a%25b",
        "a:b",
        "a@b",
        "*",
        "a%2Cb",
        "%22%3E%3Cscript%3E",
        "a'b",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    ids.push(format!("a%0A{FORGED}"));
    ids.push("x".repeat(256));
    ids.push("%41".repeat(300));
    // Far beyond any id, but within what the HTTP server reads.
    ids.push("a".repeat(48 << 10));
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_refuses_bad_ids_bodies_queries_and_headers() {
    let mut f = Fixture::start().await;
    let before = f.state().await;
    let fresh = new_id();
    let fresh_b = new_id();
    let mut cases = Vec::new();

    // Ids, in the instance position of every endpoint and in the binding
    // position of every binding endpoint (under a real instance).
    for bad in bad_ids() {
        for (method, target, body) in endpoints(&bad, &fresh_b) {
            cases.push(case(
                format!("instance id {}", short(&bad)),
                method,
                target,
                &body,
                400,
            ));
        }
        for (method, target, body) in endpoints(&f.echo_id, &bad).into_iter().skip(5) {
            cases.push(case(
                format!("binding id {}", short(&bad)),
                method,
                target,
                &body,
                400,
            ));
        }
    }
    // Literal traversal segments match no route at all.
    for target in [
        "/v2/service_instances/a/../b".to_string(),
        "/v2/service_instances/../../etc/passwd".to_string(),
        format!(
            "/v2/service_instances/{}/service_bindings/a/../b",
            f.echo_id
        ),
        format!(
            "/v2/service_instances/{}/service_bindings/../../x",
            f.echo_id
        ),
        "/v2/../v2/catalog/..".to_string(),
    ] {
        for method in ["GET", "PUT", "DELETE"] {
            cases.push(case(
                "literal traversal",
                method,
                target.clone(),
                b"{}",
                404,
            ));
        }
    }
    // Not an OSB method: refused as JSON, not an empty answer.
    for (method, target) in [
        ("POST", "/v2/catalog".to_string()),
        ("DELETE", "/v2/catalog".to_string()),
        ("POST", format!("/v2/service_instances/{fresh}")),
        (
            "PATCH",
            format!(
                "/v2/service_instances/{}/service_bindings/{fresh_b}",
                f.echo_id
            ),
        ),
        (
            "PUT",
            format!("/v2/service_instances/{}/last_operation", f.echo_id),
        ),
    ] {
        cases.push(case("method not allowed", method, target, b"{}", 405));
    }
    // The operators' admin API takes an id or a name in its path too.
    for key in [
        format!("a%0A{FORGED}"),
        "%1B%5B2J".to_string(),
        "n".repeat(32 << 10),
    ] {
        cases.push(case(
            format!("admin instance {}", short(&key)),
            "GET",
            format!("/admin/v1/instances/{key}"),
            &[],
            404,
        ));
    }
    let r = f.stack.raw("POST /v2/catalog HTTP/1.1", "", b"{}").await;
    assert_eq!(
        r.header("allow"),
        Some("GET,HEAD"),
        "405 names the allowed methods"
    );

    body_cases(&f, &fresh, &fresh_b, &mut cases);
    // Endpoints that read no body still refuse one beyond the limit (the
    // announced length alone), rather than reading or ignoring 2 MiB.
    let huge = vec![b'x'; 2 << 20];
    cases.push(case("huge body", "GET", "/v2/catalog".into(), &huge, 413));
    for (method, target, _) in endpoints(&f.echo_id, &f.echo_bid) {
        if method == "GET" || method == "DELETE" {
            cases.push(case("huge body", method, target, &huge, 413));
        }
    }
    query_cases(&f, &fresh, &mut cases);
    header_cases(&mut cases);

    let total = cases.len();
    for c in &cases {
        f.check(c).await;
    }
    f.assert_alive().await;
    let after = f.state().await;
    assert_eq!(
        after.0, before.0,
        "refused requests changed allocator/node state"
    );
    assert_eq!(
        after.1, before.1,
        "refused requests changed the gateway's records"
    );
    support::assert_log_clean(&f.secrets);
    eprintln!("bad-input corpus: {total} requests refused, nothing changed");
}

/// (method, target, good body, string fields, object fields) of an endpoint.
type TypedFields<'a> = (
    &'static str,
    &'a str,
    &'a Value,
    &'static [&'static str],
    &'static [&'static str],
);

/// Bodies for the three endpoints that take one: provision (fresh id),
/// update (the real echo instance), bind (real instance, fresh binding id).
fn body_cases(f: &Fixture, fresh: &str, fresh_b: &str, cases: &mut Vec<Case>) {
    let put = format!("/v2/service_instances/{fresh}");
    let patch = format!("/v2/service_instances/{}", f.echo_id);
    let bind = format!(
        "/v2/service_instances/{}/service_bindings/{fresh_b}",
        f.echo_id
    );
    let good_put = provision_body(echo::SERVICE, echo::PLAN_FREE, json!({}));
    let good_patch = json!({"service_id": echo::SERVICE, "parameters": {"message": "x"}});
    let good_bind = bind_body(echo::SERVICE, echo::PLAN_FREE);
    let targets = [
        ("PUT", &put, &good_put),
        ("PATCH", &patch, &good_patch),
        ("PUT", &bind, &good_bind),
    ];

    let deep = 100_000;
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("empty body", vec![]),
        ("blank body", b"  \n ".to_vec()),
        ("truncated object", b"{".to_vec()),
        ("truncated member", br#"{"service_id": "#.to_vec()),
        (
            "trailing comma",
            br#"{"service_id": "x", "plan_id": "y",}"#.to_vec(),
        ),
        ("truncated literal", b"nul".to_vec()),
        ("NUL bytes", b"\0\0\0".to_vec()),
        ("invalid UTF-8", b"{\"service_id\": \"\xff\xfe\"}".to_vec()),
        (
            "UTF-16",
            "{}".encode_utf16().flat_map(u16::to_le_bytes).collect(),
        ),
        ("array", b"[]".to_vec()),
        ("null", b"null".to_vec()),
        ("number", b"17".to_vec()),
        ("string", br#""{}""#.to_vec()),
        ("two objects", b"{}{}".to_vec()),
        ("unterminated deep array", "[".repeat(deep).into_bytes()),
        (
            "deep array",
            format!("{}{}", "[".repeat(deep), "]".repeat(deep)).into_bytes(),
        ),
        (
            "unterminated deep object",
            r#"{"a":"#.repeat(deep).into_bytes(),
        ),
        (
            "deep object",
            format!("{}1{}", r#"{"a":"#.repeat(deep), "}".repeat(deep)).into_bytes(),
        ),
    ];
    for (method, target, good) in targets {
        for (name, body) in &malformed {
            cases.push(case(*name, method, target.clone(), body, 400));
        }
        // Valid JSON nested deep inside an otherwise good body.
        let mut nested = to_bytes(good);
        nested.truncate(nested.len() - 1);
        nested.extend_from_slice(br#","x-deep":"#);
        nested.extend_from_slice("[".repeat(deep).as_bytes());
        nested.extend_from_slice("]".repeat(deep).as_bytes());
        nested.push(b'}');
        cases.push(case(
            "deep value inside a good body",
            method,
            target.clone(),
            &nested,
            400,
        ));

        // Over the 1 MiB limit, announced and streamed.
        let mut huge = good.clone();
        huge["x-padding"] = json!("x".repeat(2 << 20));
        let huge = to_bytes(&huge);
        cases.push(case("huge body", method, target.clone(), &huge, 413));
        let mut c = case(
            "huge chunked body",
            method,
            target.clone(),
            &chunked(&huge, 256 << 10),
            413,
        );
        c.headers = "Transfer-Encoding: chunked".into();
        cases.push(c);
    }

    // Wrong types, field by field.
    let not_string = [
        json!(7),
        json!(true),
        json!(null),
        json!([]),
        json!({}),
        json!(""),
        json!(["a"]),
    ];
    let not_object = [
        json!(7),
        json!("x"),
        json!(null),
        json!([]),
        json!(true),
        json!([{}]),
    ];
    let fields: [TypedFields; 3] = [
        (
            "PUT",
            &put,
            &good_put,
            &["service_id", "plan_id", "organization_guid", "space_guid"],
            &["context", "parameters", "maintenance_info"],
        ),
        (
            "PATCH",
            &patch,
            &good_patch,
            &["service_id", "plan_id"],
            &[
                "context",
                "parameters",
                "maintenance_info",
                "previous_values",
            ],
        ),
        (
            "PUT",
            &bind,
            &good_bind,
            &["service_id", "plan_id", "app_guid"],
            &["context", "parameters", "bind_resource"],
        ),
    ];
    for (method, target, good, strings, objects) in fields {
        for key in strings {
            for v in &not_string {
                let mut body = good.clone();
                body[*key] = v.clone();
                cases.push(case(
                    format!("{key} = {v}"),
                    method,
                    target.to_string(),
                    &to_bytes(&body),
                    400,
                ));
            }
        }
        for key in objects {
            for v in &not_object {
                let mut body = good.clone();
                body[*key] = v.clone();
                cases.push(case(
                    format!("{key} = {v}"),
                    method,
                    target.to_string(),
                    &to_bytes(&body),
                    400,
                ));
            }
        }
        // Objects whose members have the wrong types.
        for (key, v) in [
            ("maintenance_info", json!({"version": 7})),
            ("maintenance_info", json!({"version": ""})),
            ("maintenance_info", json!({})),
            ("bind_resource", json!({"app_guid": 7})),
            ("bind_resource", json!({"route": ["r"]})),
        ] {
            let applies = objects.contains(&key);
            if applies {
                let mut body = good.clone();
                body[key] = v.clone();
                cases.push(case(
                    format!("{key} = {v}"),
                    method,
                    target.to_string(),
                    &to_bytes(&body),
                    400,
                ));
            }
        }
        // Unknown, foreign, hostile and huge service and plan ids.
        let unknown = new_id();
        for (key, v) in [
            ("service_id", unknown.clone()),
            ("plan_id", unknown.clone()),
            ("plan_id", redis::PLAN_SMALL.to_string()),
            ("service_id", format!("x\n{FORGED} service_id")),
            ("plan_id", format!("x\r\n{FORGED} plan_id")),
            ("service_id", "\u{1b}[2J\u{7}".to_string()),
            ("service_id", "é\u{202e}\u{0}".to_string()),
            ("service_id", "../../etc/passwd".to_string()),
            ("service_id", "s".repeat(512 << 10)),
            ("plan_id", "p".repeat(512 << 10)),
        ] {
            let mut body = good.clone();
            body[key] = json!(v);
            cases.push(case(
                format!("{key} {}", short(&v)),
                method,
                target.to_string(),
                &to_bytes(&body),
                400,
            ));
        }
    }

    // Parameters the plan schema refuses (provision and update).
    for (method, target, good) in [("PUT", &put, &good_put), ("PATCH", &patch, &good_patch)] {
        for params in [
            json!({"message": 5}),
            json!({"message": "x".repeat(201)}),
            json!({"message": "a\u{0}b"}),
            json!({"message": format!("a\n{FORGED} message")}),
            json!({"message": ["a"]}),
            json!({"colour": "red"}),
            json!({"message": {"nested": {"deeper": [1, 2, 3]}}}),
        ] {
            let mut body = good.clone();
            body["parameters"] = params.clone();
            cases.push(case(
                format!("parameters {}", short(&params.to_string())),
                method,
                target.clone(),
                &to_bytes(&body),
                400,
            ));
        }
    }
    // A maintenance_info.version that matches nothing, made to forge a log
    // line: the spec's 422 MaintenanceInfoConflict, the value not echoed raw.
    for (method, target, good) in [("PUT", &put, &good_put), ("PATCH", &patch, &good_patch)] {
        for version in [format!("1.0.0\n{FORGED} version"), "v".repeat(100_000)] {
            let mut body = good.clone();
            body["maintenance_info"] = json!({ "version": version });
            cases.push(case(
                format!("maintenance_info.version {}", short(&version)),
                method,
                target.clone(),
                &to_bytes(&body),
                422,
            ));
        }
    }
    // Unknown and foreign ids refused the same way for asynchronous clients.
    for (service, plan) in [
        (new_id(), echo::PLAN_FREE.to_string()),
        (echo::SERVICE.to_string(), new_id()),
        (echo::SERVICE.to_string(), redis::PLAN_SMALL.to_string()),
    ] {
        let body = provision_body(&service, &plan, json!({}));
        cases.push(case(
            format!("async provision of {service}/{plan}"),
            "PUT",
            format!("{put}?accepts_incomplete=true"),
            &to_bytes(&body),
            400,
        ));
    }
    // A binding with another service's ids, and rotation (not supported).
    let mut other = good_bind.clone();
    other["service_id"] = json!(redis::SERVICE);
    other["plan_id"] = json!(redis::PLAN_SMALL);
    cases.push(case(
        "bind with another service's ids",
        "PUT",
        bind.clone(),
        &to_bytes(&other),
        400,
    ));
    let mut rotate = good_bind.clone();
    rotate["predecessor_binding_id"] = json!(f.echo_bid);
    cases.push(case(
        "predecessor_binding_id",
        "PUT",
        bind.clone(),
        &to_bytes(&rotate),
        400,
    ));
    // An update naming another service than the instance's.
    let foreign = json!({"service_id": redis::SERVICE, "plan_id": redis::PLAN_SMALL});
    cases.push(case(
        "update with another service",
        "PATCH",
        patch.clone(),
        &to_bytes(&foreign),
        400,
    ));
}

/// Query parameters outside their domain, on every endpoint that reads one.
fn query_cases(f: &Fixture, fresh: &str, cases: &mut Vec<Case>) {
    let e = &f.echo_id;
    let eb = &f.echo_bid;
    let put_body = to_bytes(&provision_body(echo::SERVICE, echo::PLAN_FREE, json!({})));
    let patch_body =
        to_bytes(&json!({"service_id": echo::SERVICE, "parameters": {"message": "y"}}));
    let bind_body_bytes = to_bytes(&bind_body(echo::SERVICE, echo::PLAN_FREE));
    let q = del_query(echo::SERVICE, echo::PLAN_FREE);
    for v in [
        "yes",
        "TRUE",
        "1",
        "",
        "%00",
        "true%00",
        "%E2%9C%93",
        &"t".repeat(4096),
    ] {
        let ai = format!("accepts_incomplete={v}");
        let name = format!("accepts_incomplete={}", short(v));
        cases.push(case(
            name.clone(),
            "PUT",
            format!("/v2/service_instances/{fresh}?{ai}"),
            &put_body,
            400,
        ));
        cases.push(case(
            name.clone(),
            "PATCH",
            format!("/v2/service_instances/{e}?{ai}"),
            &patch_body,
            400,
        ));
        cases.push(case(
            name.clone(),
            "DELETE",
            format!("/v2/service_instances/{e}{q}&{ai}"),
            &[],
            400,
        ));
        cases.push(case(
            name.clone(),
            "PUT",
            format!("/v2/service_instances/{e}/service_bindings/{fresh}?{ai}"),
            &bind_body_bytes,
            400,
        ));
        cases.push(case(
            name,
            "DELETE",
            format!("/v2/service_instances/{e}/service_bindings/{eb}{q}&{ai}"),
            &[],
            400,
        ));
    }
    // service_id / plan_id of DELETE: missing, empty, hostile, unknown, huge.
    let unknown = new_id();
    let huge = "s".repeat(8 << 10);
    let values = [
        String::new(),
        "%00".to_string(),
        format!("x%0A{FORGED}"),
        "%C3%A9%E2%80%AE".to_string(),
        "%FF%FE".to_string(),
        "%ZZ".to_string(),
        "..%2F..%2Fetc".to_string(),
        unknown,
        huge,
    ];
    for v in &values {
        for (which, query) in [
            (
                "service_id",
                format!("?service_id={v}&plan_id={}", echo::PLAN_FREE),
            ),
            (
                "plan_id",
                format!("?service_id={}&plan_id={v}", echo::SERVICE),
            ),
        ] {
            let name = format!("DELETE {which}={}", short(v));
            cases.push(case(
                name.clone(),
                "DELETE",
                format!("/v2/service_instances/{e}{query}"),
                &[],
                400,
            ));
            cases.push(case(
                name.clone(),
                "DELETE",
                format!("/v2/service_instances/{fresh}{query}"),
                &[],
                400,
            ));
            cases.push(case(
                name,
                "DELETE",
                format!("/v2/service_instances/{e}/service_bindings/{eb}{query}"),
                &[],
                400,
            ));
        }
    }
    for query in [
        "",
        "?service_id=",
        "?plan_id=",
        "?service_id&plan_id",
        "?%00=%00",
    ] {
        cases.push(case(
            format!("DELETE query {query:?}"),
            "DELETE",
            format!("/v2/service_instances/{e}{query}"),
            &[],
            400,
        ));
        cases.push(case(
            format!("unbind query {query:?}"),
            "DELETE",
            format!("/v2/service_instances/{e}/service_bindings/{eb}{query}"),
            &[],
            400,
        ));
    }
    // Deleting with the ids of another service than the instance's.
    let redis_q = del_query(redis::SERVICE, redis::PLAN_SMALL);
    cases.push(case(
        "DELETE with another service's ids",
        "DELETE",
        format!("/v2/service_instances/{e}{redis_q}"),
        &[],
        400,
    ));
    cases.push(case(
        "unbind with another service's ids",
        "DELETE",
        format!("/v2/service_instances/{e}/service_bindings/{eb}{redis_q}"),
        &[],
        400,
    ));
    // last_operation of an instance or binding that does not exist, with
    // hostile operation values: 404, never an answer about something else.
    for op in [
        "%00",
        &format!("x%0A{FORGED}"),
        &"o".repeat(8 << 10),
        "..%2F..",
        "%FF",
    ] {
        let name = format!("last_operation operation={}", short(op));
        cases.push(case(
            name.clone(),
            "GET",
            format!("/v2/service_instances/{fresh}/last_operation?operation={op}"),
            &[],
            404,
        ));
        cases.push(case(
            name,
            "GET",
            format!(
                "/v2/service_instances/{e}/service_bindings/{fresh}/last_operation?operation={op}"
            ),
            &[],
            404,
        ));
    }
}

/// Headers: the API version out of its domain, broken basic auth, and
/// headers far beyond what a server should buffer.
fn header_cases(cases: &mut Vec<Case>) {
    for (name, header, want) in [
        (
            "huge request identity",
            format!("X-Broker-API-Request-Identity: {}", "i".repeat(64 << 10)),
            404,
        ),
        (
            "huge originating identity",
            format!(
                "X-Broker-API-Originating-Identity: cloudfoundry {}",
                "o".repeat(8 << 10)
            ),
            404,
        ),
        (
            "garbage originating identity",
            "X-Broker-API-Originating-Identity: %00 \\ \"x\" é".to_string(),
            404,
        ),
    ] {
        // A fresh id, so that the request reaches the handler and gets its 404.
        let mut c = case(
            name,
            "GET",
            format!("/v2/service_instances/{}", new_id()),
            &[],
            want,
        );
        c.headers = header;
        cases.push(c);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_beyond_every_limit_are_refused() {
    let mut f = Fixture::start().await;
    let before = f.state().await;
    let addr = f.stack.http_addr.to_string();
    let target = format!("/v2/service_instances/{}", f.echo_id);
    let version = svcbroker_tests::osb::API_VERSION;
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", f.stack.osb.username, f.stack.osb.password))
    };
    // API version values out of the domain: 412, before anything else runs.
    for v in [
        "",
        "2",
        "2.",
        "2.x",
        "3.17",
        "1.99",
        "2.99999999999999999999",
        "2.17.1",
        " 2 .17",
    ] {
        let head = format!(
            "GET {target} HTTP/1.1\nHost: {addr}\nAuthorization: Basic {auth}\nX-Broker-API-Version: {v}"
        );
        let r = svcbroker_tests::raw::request(&addr, &head, b"")
            .await
            .into_resp();
        let c = case(
            format!("X-Broker-API-Version {v:?}"),
            "GET",
            target.clone(),
            &[],
            412,
        );
        f.assert_answer(&c, &r);
    }
    // Broken basic auth: 401, and the password is never echoed.
    let password = f.stack.osb.password.clone();
    for value in [
        "Basic".to_string(),
        "Basic !!!!".to_string(),
        "Basic ".to_string() + &"A".repeat(16 << 10),
        format!("Bearer {password}"),
        format!("Basic {password}"),
        "Digest username=\"broker\"".to_string(),
    ] {
        let head = format!(
            "GET {target} HTTP/1.1\nHost: {addr}\nAuthorization: {value}\nX-Broker-API-Version: {version}"
        );
        let r = svcbroker_tests::raw::request(&addr, &head, b"")
            .await
            .into_resp();
        let c = case("broken basic auth", "GET", target.clone(), &[], 401);
        f.assert_answer(&c, &r);
    }
    // Headers beyond the server's buffer: one huge header, and too many.
    // The HTTP server answers 431 before any handler runs (no JSON body is
    // possible there), and keeps serving.
    for (name, extra) in [
        (
            "one 1 MiB header",
            format!("X-Filler: {}", "f".repeat(1 << 20)),
        ),
        (
            "500 headers",
            (0..500)
                .map(|i| format!("X-Filler-{i}: v"))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    ] {
        let r = f
            .stack
            .raw(&format!("GET {target} HTTP/1.1"), &extra, b"")
            .await;
        assert_eq!(
            r.status.as_u16(),
            431,
            "{name}: {} {}",
            r.status,
            short(&r.text)
        );
    }
    // A URI beyond the HTTP server's limit (64 KiB): 414, no handler runs.
    let long = format!(
        "GET /v2/service_instances/{} HTTP/1.1",
        "a".repeat(100 << 10)
    );
    let r = f.stack.raw(&long, "", b"").await;
    assert_eq!(r.status.as_u16(), 414, "100 KiB URI: {}", r.status);
    // Request lines and header lines HTTP/1.1 does not allow: refused by
    // the HTTP server with 400 before any handler runs.
    for (name, line, extra) in [
        (
            "raw UTF-8 in the path",
            "GET /v2/service_instances/é HTTP/1.1".to_string(),
            "",
        ),
        (
            "a space in the path",
            "GET /v2/service_instances/a b HTTP/1.1".to_string(),
            "",
        ),
        (
            "a header without a colon",
            format!("GET {target} HTTP/1.1"),
            "X-Broken-Header",
        ),
        (
            "a header name with a space",
            format!("GET {target} HTTP/1.1"),
            "X Bad: v",
        ),
    ] {
        let r = f.stack.raw(&line, extra, b"").await;
        assert_eq!(
            r.status.as_u16(),
            400,
            "{name}: {} {}",
            r.status,
            short(&r.text)
        );
        support::assert_no_secret(name, &r.text, &f.secrets);
    }
    f.assert_alive().await;
    let after = f.state().await;
    assert_eq!(after.0, before.0);
    assert_eq!(after.1, before.1);
    support::assert_log_clean(&f.secrets);
}

#[tokio::test(flavor = "multi_thread")]
async fn replayed_and_out_of_order_requests() {
    let mut f = Fixture::start().await;
    let osb = f.stack.osb.clone();
    let (e, eb, r, rb) = (
        f.echo_id.clone(),
        f.echo_bid.clone(),
        f.redis_id.clone(),
        f.redis_bid.clone(),
    );
    let echo_q = del_query(echo::SERVICE, echo::PLAN_FREE);
    let redis_q = del_query(redis::SERVICE, redis::PLAN_SMALL);

    // A finished lifecycle, replayed afterwards.
    let gone = new_id();
    let gone_b = new_id();
    let body = provision_body(echo::SERVICE, echo::PLAN_FREE, json!({}));
    osb.provision(&gone, &body, false).await.expect(201);
    osb.bind(
        &gone,
        &gone_b,
        &bind_body(echo::SERVICE, echo::PLAN_FREE),
        false,
    )
    .await
    .expect(201);
    osb.unbind(&gone, &gone_b, echo::SERVICE, echo::PLAN_FREE, false)
        .await
        .expect(200);
    osb.deprovision(&gone, echo::SERVICE, echo::PLAN_FREE, false)
        .await
        .expect(200);
    f.stack.assert_instance_gone(&gone, &[&gone_b]).await;
    let op_of_e = osb.last_operation(&e, None).await;
    op_of_e.expect(200);

    let before = f.state().await;
    let fresh = new_id();
    let fresh_b = new_id();
    let put = |id: &str| format!("/v2/service_instances/{id}");
    let bnd = |id: &str, b: &str| format!("/v2/service_instances/{id}/service_bindings/{b}");
    let echo_bind = to_bytes(&bind_body(echo::SERVICE, echo::PLAN_FREE));
    let redis_bind = to_bytes(&bind_body(redis::SERVICE, redis::PLAN_SMALL));
    let mut loud = body.clone();
    loud["plan_id"] = json!(echo::PLAN_LOUD);
    let mut other_params = body.clone();
    other_params["parameters"] = json!({"message": "bye"});
    let patch = to_bytes(&json!({"service_id": echo::SERVICE, "parameters": {"message": "z"}}));
    let mut other_bind = bind_body(echo::SERVICE, echo::PLAN_FREE);
    other_bind["parameters"] = json!({"x": 1});

    let cases = vec![
        // Replays of what finished.
        case(
            "delete replayed",
            "DELETE",
            format!("{}{echo_q}", put(&gone)),
            &[],
            410,
        ),
        case(
            "async delete replayed",
            "DELETE",
            format!("{}{echo_q}&accepts_incomplete=true", put(&gone)),
            &[],
            410,
        ),
        case(
            "unbind replayed",
            "DELETE",
            format!("{}{echo_q}", bnd(&gone, &gone_b)),
            &[],
            410,
        ),
        case("fetch deleted instance", "GET", put(&gone), &[], 404),
        case(
            "fetch deleted binding",
            "GET",
            bnd(&gone, &gone_b),
            &[],
            404,
        ),
        case(
            "poll deleted binding",
            "GET",
            format!("{}/last_operation", bnd(&gone, &gone_b)),
            &[],
            410,
        ),
        case("update deleted instance", "PATCH", put(&gone), &patch, 404),
        case(
            "bind to deleted instance",
            "PUT",
            bnd(&gone, &new_id()),
            &echo_bind,
            404,
        ),
        // Replays of what exists, with other attributes: 409.
        case(
            "provision replayed with another plan",
            "PUT",
            put(&e),
            &to_bytes(&loud),
            409,
        ),
        case(
            "provision replayed with other parameters",
            "PUT",
            put(&e),
            &to_bytes(&other_params),
            409,
        ),
        case(
            "bind replayed with other parameters",
            "PUT",
            bnd(&e, &eb),
            &to_bytes(&other_bind),
            409,
        ),
        case(
            "binding id reused under another instance",
            "PUT",
            bnd(&r, &eb),
            &redis_bind,
            409,
        ),
        // Identical replays: 200, nothing new.
        case(
            "provision replayed",
            "PUT",
            put(&r),
            &to_bytes(&provision_body(
                redis::SERVICE,
                redis::PLAN_SMALL,
                json!({}),
            )),
            200,
        ),
        case("bind replayed", "PUT", bnd(&r, &rb), &redis_bind, 200),
        // Out of order: things that never existed.
        case(
            "bind before provision",
            "PUT",
            bnd(&fresh, &fresh_b),
            &echo_bind,
            404,
        ),
        case("fetch before provision", "GET", put(&fresh), &[], 404),
        case(
            "poll before provision",
            "GET",
            format!("{}/last_operation", put(&fresh)),
            &[],
            404,
        ),
        case("update before provision", "PATCH", put(&fresh), &patch, 404),
        case(
            "delete before provision",
            "DELETE",
            format!("{}{echo_q}", put(&fresh)),
            &[],
            410,
        ),
        case(
            "unbind before bind",
            "DELETE",
            format!("{}{echo_q}", bnd(&e, &fresh_b)),
            &[],
            410,
        ),
        case(
            "unbind under an unknown instance",
            "DELETE",
            format!("{}{echo_q}", bnd(&fresh, &fresh_b)),
            &[],
            410,
        ),
        case(
            "fetch binding before bind",
            "GET",
            bnd(&e, &fresh_b),
            &[],
            404,
        ),
        case(
            "poll binding before bind",
            "GET",
            format!("{}/last_operation", bnd(&e, &fresh_b)),
            &[],
            404,
        ),
        // A real binding addressed under the wrong instance.
        case(
            "binding under the wrong instance",
            "GET",
            bnd(&r, &eb),
            &[],
            404,
        ),
        case(
            "poll binding under the wrong instance",
            "GET",
            format!("{}/last_operation", bnd(&r, &eb)),
            &[],
            404,
        ),
        case(
            "unbind under the wrong instance",
            "DELETE",
            format!("{}{echo_q}", bnd(&r, &eb)),
            &[],
            410,
        ),
        case(
            "unbind under the wrong instance, its ids",
            "DELETE",
            format!("{}{redis_q}", bnd(&r, &eb)),
            &[],
            410,
        ),
        // An operation id of one instance polled on another.
        case(
            "operation of another instance",
            "GET",
            format!("{}/last_operation?operation=does-not-exist", put(&fresh)),
            &[],
            404,
        ),
        // Deleting with the other instance's ids.
        case(
            "delete with another instance's service",
            "DELETE",
            format!("{}{redis_q}", put(&e)),
            &[],
            400,
        ),
        case(
            "provision replayed under a deleted id, other service",
            "PUT",
            put(&gone),
            &to_bytes(&provision_body(redis::SERVICE, "no-such-plan", json!({}))),
            400,
        ),
    ];
    let total = cases.len();
    for c in &cases {
        f.check(c).await;
    }
    f.assert_alive().await;
    let after = f.state().await;
    assert_eq!(
        after.0, before.0,
        "replayed/out-of-order requests changed allocator/node state"
    );
    assert_eq!(
        after.1, before.1,
        "replayed/out-of-order requests changed the gateway's records"
    );
    assert_eq!(osb.last_operation(&e, None).await.body, op_of_e.body);
    support::assert_log_clean(&f.secrets);
    eprintln!("replay/out-of-order corpus: {total} requests, nothing changed");
}
