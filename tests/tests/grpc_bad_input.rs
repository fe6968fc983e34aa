//! The bad-input corpus over every gRPC method of svcbroker.v1.Allocator,
//! svcbroker.v1.NodeAgent and svcbroker.v1.Registry: empty messages,
//! missing required fields, traversal, control characters and huge strings
//! in ids and names, numbers out of range, unknown kinds, hostile hooks and
//! files, messages beyond the decode limit, bytes that are no protobuf at
//! all, and calls without or with a wrong bearer token. Each must be refused
//! with the right code and a short, clear message free of secrets, change
//! nothing (leases, credentials, node instances, data directory, processes,
//! the gateway's node registry), panic nothing and log no secret or forged
//! line.
//!
//! Codes: INVALID_ARGUMENT for a malformed request; NOT_FOUND for a bind on
//! an instance the node does not hold; UNAUTHENTICATED without the token.
//! Two codes come from the gRPC library before any handler runs, as the gRPC
//! status code conventions (grpc/doc/statuscodes.md) assign them: INTERNAL
//! for bytes that do not parse as the request message, OUT_OF_RANGE for a
//! message over the decode limit.

mod support;

use std::collections::HashMap;

use bytes::{Buf, BufMut};
use serde_json::{Value, json};
use support::FORGED;
use svcbroker_proto::v1 as pb;
use svcbroker_proto::v1::allocator_client::AllocatorClient;
use svcbroker_proto::v1::node_agent_client::NodeAgentClient;
use svcbroker_proto::v1::registry_client::RegistryClient;
use svcbroker_tests::fixtures::{echo, redis};
use svcbroker_tests::stack::{NODE_ID, TEST_TOKEN, connect, connect_with_token};
use svcbroker_tests::{Snapshot, Stack, bind_body, new_id, provision_body};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

/// Longest status message accepted as "clear".
const MAX_MESSAGE: usize = 1024;

/// A node id no real node has: an announcement that gets through under it
/// shows up in the registry.
const INTRUDER: &str = "intruder-node";

/// Every method, as its HTTP/2 path.
const METHODS: [&str; 12] = [
    "/svcbroker.v1.Allocator/AllocatePort",
    "/svcbroker.v1.Allocator/ReleasePort",
    "/svcbroker.v1.Allocator/IssueCredential",
    "/svcbroker.v1.Allocator/RevokeCredential",
    "/svcbroker.v1.Allocator/ListAllocations",
    "/svcbroker.v1.NodeAgent/Describe",
    "/svcbroker.v1.NodeAgent/Provision",
    "/svcbroker.v1.NodeAgent/Deprovision",
    "/svcbroker.v1.NodeAgent/Bind",
    "/svcbroker.v1.NodeAgent/Unbind",
    "/svcbroker.v1.NodeAgent/ListInstances",
    "/svcbroker.v1.Registry/Announce",
];

/// Sends and receives message bodies as they are, so a test can send bytes
/// no protobuf encoder would produce.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// The stack, with state worth protecting: a redis instance with a binding
/// (a running daemon, a lease, credentials) and an echo instance.
struct Fixture {
    stack: Stack,
    redis_id: String,
    echo_id: String,
    secrets: Vec<String>,
    /// Calls checked by [`Fixture::refused`], for the summary line.
    refusals: std::cell::Cell<usize>,
}

impl Fixture {
    async fn start() -> Fixture {
        support::capture();
        let stack = Stack::start_default().await;
        let osb = &stack.osb;
        let redis_id = new_id();
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
                &new_id(),
                &bind_body(redis::SERVICE, redis::PLAN_SMALL),
                false,
            )
            .await;
        bound.expect(201);
        let echo_id = new_id();
        osb.provision(
            &echo_id,
            &provision_body(echo::SERVICE, echo::PLAN_FREE, json!({})),
            false,
        )
        .await
        .expect(201);
        let password = bound.body["credentials"]["password"]
            .as_str()
            .expect("redis binding password")
            .to_string();
        let secrets = vec![stack.osb.password.clone(), TEST_TOKEN.to_string(), password];
        Fixture {
            stack,
            redis_id,
            echo_id,
            secrets,
            refusals: std::cell::Cell::new(0),
        }
    }

    /// Allocator, node, data directory, processes, and what the gateway's
    /// registry holds about nodes (less the liveness clock).
    async fn state(&self) -> (Snapshot, Value) {
        let r = svcbroker_tests::Osb::send(
            self.stack
                .osb
                .request(reqwest::Method::GET, "/admin/v1/nodes"),
        )
        .await;
        r.expect(200);
        let nodes: Vec<Value> = r.body["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|n| {
                json!({
                    "node_id": n["node_id"], "grpc_url": n["grpc_url"],
                    "advertise_host": n["advertise_host"], "services": n["services"],
                    "capacity": n["capacity"], "port_range": n["port_range"],
                    "boot_id": n["boot_id"],
                })
            })
            .collect();
        (self.stack.snapshot().await, Value::Array(nodes))
    }

    /// Checks a refused call: the code is one of `want`, the message is
    /// short, on one line and carries no secret.
    #[track_caller]
    fn refused<T: std::fmt::Debug>(
        &self,
        what: &str,
        result: Result<T, tonic::Status>,
        want: &[Code],
    ) {
        self.refusals.set(self.refusals.get() + 1);
        let status = match result {
            Ok(v) => panic!("{what}: accepted ({v:?}), expected one of {want:?}"),
            Err(s) => s,
        };
        assert!(
            want.contains(&status.code()),
            "{what}: {:?} {:?}, expected one of {want:?}",
            status.code(),
            short(status.message())
        );
        let m = status.message();
        assert!(!m.trim().is_empty(), "{what}: no message");
        assert!(
            m.len() <= MAX_MESSAGE,
            "{what}: a {} byte message is not a clear message: {}",
            m.len(),
            short(m)
        );
        assert!(
            !m.chars().any(char::is_control),
            "{what}: the message carries control characters: {m:?}"
        );
        support::assert_no_secret(what, m, &self.secrets);
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

/// Strings no id or name may be: empty, control characters, forged log
/// lines, traversal, unicode, and far too long.
fn bad_names() -> Vec<String> {
    vec![
        String::new(),
        "a\0b".into(),
        format!("a\n{FORGED}"),
        format!("a\r\n{FORGED}"),
        "\u{1b}[31mred".into(),
        "a\u{7f}".into(),
        "x".repeat(256),
        "y".repeat(1 << 20),
    ]
}

/// Ids the node uses as directory names: everything above, plus traversal,
/// separators and unicode.
fn bad_ids() -> Vec<String> {
    let mut ids = bad_names();
    ids.extend(
        [
            ".",
            "..",
            "../..",
            "../../etc",
            "a/b",
            "/etc/passwd",
            "a\\b",
            "é",
            "a b",
            ".images",
        ]
        .map(String::from),
    );
    ids
}

fn range(start: u32, end: u32) -> Option<pb::PortRange> {
    Some(pb::PortRange { start, end })
}

#[tokio::test(flavor = "multi_thread")]
async fn allocator_refuses_bad_requests() {
    let mut f = Fixture::start().await;
    let before = f.state().await;
    let mut a = AllocatorClient::new(connect(&f.stack.allocator_url).await);
    let (lo, hi) = f.stack.port_range;
    let (lo, hi) = (u32::from(lo), u32::from(hi));
    let invalid = &[Code::InvalidArgument];

    let port = |pool: &str, owner: &str, range: Option<pb::PortRange>| pb::AllocatePortRequest {
        pool: pool.into(),
        owner: owner.into(),
        range,
        preferred: None,
        exclude: vec![],
    };
    f.refused(
        "AllocatePort {}",
        a.allocate_port(pb::AllocatePortRequest::default()).await,
        invalid,
    );
    for (name, r) in [
        ("no range", None),
        ("0..10", range(0, 10)),
        ("end < start", range(hi, lo)),
        ("beyond 65535", range(65_000, 70_000)),
        ("u32::MAX", range(u32::MAX, u32::MAX)),
        ("0..0", range(0, 0)),
    ] {
        let owner = new_id();
        f.refused(
            &format!("AllocatePort {name}"),
            a.allocate_port(port(NODE_ID, &owner, r)).await,
            invalid,
        );
    }
    // Pools are node ids and owners instance or binding ids: the id rule.
    for bad in bad_ids().into_iter().filter(|b| b != ".images") {
        let what = short(&format!("{bad:?}"));
        f.refused(
            &format!("AllocatePort pool {what}"),
            a.allocate_port(port(&bad, &new_id(), range(lo, hi))).await,
            invalid,
        );
        f.refused(
            &format!("AllocatePort owner {what}"),
            a.allocate_port(port(NODE_ID, &bad, range(lo, hi))).await,
            invalid,
        );
        let release = pb::ReleasePortRequest {
            pool: bad.clone(),
            owner: f.redis_id.clone(),
        };
        f.refused(
            &format!("ReleasePort pool {what}"),
            a.release_port(release).await,
            invalid,
        );
        let release = pb::ReleasePortRequest {
            pool: NODE_ID.into(),
            owner: bad.clone(),
        };
        f.refused(
            &format!("ReleasePort owner {what}"),
            a.release_port(release).await,
            invalid,
        );
        let issue = pb::IssueCredentialRequest {
            owner: bad.clone(),
            kind: "instance".into(),
        };
        f.refused(
            &format!("IssueCredential owner {what}"),
            a.issue_credential(issue).await,
            invalid,
        );
        let revoke = pb::RevokeCredentialRequest { owner: bad.clone() };
        f.refused(
            &format!("RevokeCredential owner {what}"),
            a.revoke_credential(revoke).await,
            invalid,
        );
        let list = pb::ListAllocationsRequest {
            pool: Some(bad.clone()),
            owner: None,
        };
        f.refused(
            &format!("ListAllocations pool {what}"),
            a.list_allocations(list).await,
            invalid,
        );
        let list = pb::ListAllocationsRequest {
            pool: None,
            owner: Some(bad.clone()),
        };
        f.refused(
            &format!("ListAllocations owner {what}"),
            a.list_allocations(list).await,
            invalid,
        );
        // The kind is free text, but bounded and on one line.
        if bad.len() > 255 || bad.chars().any(char::is_control) {
            let issue = pb::IssueCredentialRequest {
                owner: new_id(),
                kind: bad.clone(),
            };
            f.refused(
                &format!("IssueCredential kind {what}"),
                a.issue_credential(issue).await,
                invalid,
            );
        }
    }
    // A call that logs, with a 12 KiB request id: every line stays bounded.
    // (The credential it issues is revoked: no state change in the end.)
    let owner = new_id();
    let mut req = tonic::Request::new(pb::IssueCredentialRequest {
        owner: owner.clone(),
        kind: "instance".into(),
    });
    let long_id = "r".repeat(12 << 10);
    req.metadata_mut()
        .insert("x-request-id", long_id.parse().expect("ascii metadata"));
    a.issue_credential(req)
        .await
        .expect("IssueCredential with a long request id");
    let revoked = a
        .revoke_credential(pb::RevokeCredentialRequest { owner })
        .await
        .expect("RevokeCredential")
        .into_inner()
        .revoked;
    assert!(revoked);
    f.refused(
        "ReleasePort {}",
        a.release_port(pb::ReleasePortRequest::default()).await,
        invalid,
    );
    f.refused(
        "IssueCredential {}",
        a.issue_credential(pb::IssueCredentialRequest::default())
            .await,
        invalid,
    );
    f.refused(
        "RevokeCredential {}",
        a.revoke_credential(pb::RevokeCredentialRequest::default())
            .await,
        invalid,
    );

    f.stack.assert_running();
    assert_eq!(
        f.state().await,
        before,
        "refused allocator calls changed state"
    );
    support::assert_log_clean(&f.secrets);
    eprintln!(
        "allocator corpus: {} calls refused, nothing changed",
        f.refusals.get()
    );
}

/// A Provision request that would succeed for a fresh id (kind "none").
fn provision_none(id: &str) -> pb::ProvisionRequest {
    pb::ProvisionRequest {
        instance_id: id.into(),
        service: "echo".into(),
        plan: "free".into(),
        kind: "none".into(),
        ..Default::default()
    }
}

/// A Provision request for a process on `port` that would start `sleep`.
fn provision_process(id: &str, port: u32) -> pb::ProvisionRequest {
    pb::ProvisionRequest {
        instance_id: id.into(),
        service: "redis".into(),
        plan: "small".into(),
        kind: "process".into(),
        port,
        process: Some(pb::ProcessSpec {
            argv: vec!["sleep".into(), "30".into()],
            env: HashMap::new(),
            files: vec![],
            ready_timeout_ms: 500,
        }),
        ..Default::default()
    }
}

fn command_hook(argv: &[&str]) -> pb::Hook {
    pb::Hook {
        action: Some(pb::hook::Action::Command(pb::CommandHook {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: HashMap::new(),
            stdin: String::new(),
            timeout_ms: 1000,
        })),
    }
}

fn http_hook(method: &str, url: &str) -> pb::Hook {
    pb::Hook {
        action: Some(pb::hook::Action::Http(pb::HttpHook {
            method: method.into(),
            url: url.into(),
            headers: HashMap::new(),
            body: String::new(),
            timeout_ms: 1000,
            accept_status: vec![],
        })),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn node_refuses_bad_requests() {
    let mut f = Fixture::start().await;
    let before = f.state().await;
    let mut node = NodeAgentClient::new(connect(&f.stack.node_url).await);
    let (lo, _) = f.stack.port_range;
    let port = u32::from(lo) + 50;
    let invalid = &[Code::InvalidArgument];

    // Ids, in every method that takes one.
    for bad in bad_ids() {
        let what = short(&format!("{bad:?}"));
        f.refused(
            &format!("Provision instance_id {what}"),
            node.provision(provision_none(&bad)).await,
            invalid,
        );
        f.refused(
            &format!("Provision process instance_id {what}"),
            node.provision(provision_process(&bad, port)).await,
            invalid,
        );
        let d = pb::DeprovisionRequest {
            instance_id: bad.clone(),
            ..Default::default()
        };
        f.refused(
            &format!("Deprovision instance_id {what}"),
            node.deprovision(d).await,
            invalid,
        );
        let b = pb::BindRequest {
            instance_id: bad.clone(),
            binding_id: new_id(),
            ..Default::default()
        };
        f.refused(
            &format!("Bind instance_id {what}"),
            node.bind(b).await,
            invalid,
        );
        let u = pb::UnbindRequest {
            instance_id: bad.clone(),
            binding_id: new_id(),
            ..Default::default()
        };
        f.refused(
            &format!("Unbind instance_id {what}"),
            node.unbind(u).await,
            invalid,
        );
        // Binding ids name nothing on disk (so ".images" is fine) but reach
        // hooks and log lines.
        if bad == ".images" {
            continue;
        }
        let b = pb::BindRequest {
            instance_id: f.echo_id.clone(),
            binding_id: bad.clone(),
            kind: "none".into(),
            ..Default::default()
        };
        f.refused(
            &format!("Bind binding_id {what}"),
            node.bind(b).await,
            invalid,
        );
        let u = pb::UnbindRequest {
            instance_id: f.echo_id.clone(),
            binding_id: bad.clone(),
            kind: "none".into(),
            ..Default::default()
        };
        f.refused(
            &format!("Unbind binding_id {what}"),
            node.unbind(u).await,
            invalid,
        );
    }
    // Service and plan names: recorded with the instance and listed.
    for bad in bad_names() {
        let what = short(&format!("{bad:?}"));
        let mut p = provision_none(&new_id());
        p.service = bad.clone();
        f.refused(
            &format!("Provision service {what}"),
            node.provision(p).await,
            invalid,
        );
        if !bad.is_empty() {
            let mut p = provision_none(&new_id());
            p.plan = bad.clone();
            f.refused(
                &format!("Provision plan {what}"),
                node.provision(p).await,
                invalid,
            );
        }
    }
    // Empty messages.
    f.refused(
        "Provision {}",
        node.provision(pb::ProvisionRequest::default()).await,
        invalid,
    );
    f.refused(
        "Deprovision {}",
        node.deprovision(pb::DeprovisionRequest::default()).await,
        invalid,
    );
    f.refused(
        "Bind {}",
        node.bind(pb::BindRequest::default()).await,
        invalid,
    );
    f.refused(
        "Unbind {}",
        node.unbind(pb::UnbindRequest::default()).await,
        invalid,
    );

    // Kinds, ports, specs and hooks out of their domain.
    let id = new_id();
    let mut provisions: Vec<(String, pb::ProvisionRequest)> = Vec::new();
    for kind in ["", "bogus", "NONE", "process\n", &"k".repeat(1 << 20)] {
        let mut p = provision_none(&id);
        p.kind = kind.into();
        provisions.push((format!("kind {}", short(&format!("{kind:?}"))), p));
    }
    for p in [
        0,
        1,
        80,
        u32::from(f.stack.port_range.1) + 1,
        65_536,
        u32::MAX,
    ] {
        provisions.push((format!("port {p}"), provision_process(&id, p)));
    }
    let mut p = provision_process(&id, port);
    p.process = None;
    provisions.push(("process without spec".into(), p));
    for argv in [
        vec![],
        vec![String::new()],
        vec!["sleep".into(), "a\0b".into()],
    ] {
        let mut p = provision_process(&id, port);
        p.process.as_mut().unwrap().argv = argv.clone();
        provisions.push((format!("argv {argv:?}"), p));
    }
    for (k, v) in [
        ("", "v"),
        ("A=B", "v"),
        ("A\0", "v"),
        ("A", "v\0"),
        (&*"E".repeat(1 << 20), "v"),
    ] {
        let mut p = provision_process(&id, port);
        p.process.as_mut().unwrap().env.insert(k.into(), v.into());
        provisions.push((format!("env {}", short(&format!("{k:?}"))), p));
    }
    for path in [
        "",
        "/etc/passwd",
        "../escape",
        "a/../../escape",
        ".",
        "./",
        ".svcbroker-instance.json",
        "stderr.log",
        "a\0b",
        &"p/".repeat(1 << 19),
    ] {
        let mut p = provision_process(&id, port);
        p.process.as_mut().unwrap().files.push(pb::FileSpec {
            path: path.into(),
            content: "x".into(),
            mode: 0,
        });
        provisions.push((format!("file path {}", short(&format!("{path:?}"))), p));
    }
    let mut p = provision_none(&id);
    p.kind = "directory".into();
    p.directory = Some(pb::DirectorySpec {
        size_limit_bytes: 1,
    });
    provisions.push(("directory of 1 byte".into(), p));
    // Beyond what an ext4 image can be: an INTERNAL error that left an
    // instance directory behind, before the node refused it up front.
    for size in [(16u64 << 40) + 1, u64::MAX] {
        let mut p = provision_none(&id);
        p.kind = "directory".into();
        p.directory = Some(pb::DirectorySpec {
            size_limit_bytes: size,
        });
        provisions.push((format!("directory of {size} bytes"), p));
    }
    for db in [
        None,
        Some(pb::DatabaseSpec {
            engine: "mysql".into(),
            name: "db_ok".into(),
        }),
        Some(pb::DatabaseSpec {
            engine: "k".repeat(1 << 20),
            name: "db_ok".into(),
        }),
        Some(pb::DatabaseSpec {
            engine: "postgresql".into(),
            name: "Robert'); DROP TABLE x;--".into(),
        }),
        Some(pb::DatabaseSpec {
            engine: "postgresql".into(),
            name: "pg_catalog".into(),
        }),
        Some(pb::DatabaseSpec {
            engine: "postgresql".into(),
            name: "postgres".into(),
        }),
        Some(pb::DatabaseSpec {
            engine: "postgresql".into(),
            name: "d".repeat(1 << 20),
        }),
    ] {
        let mut p = provision_none(&id);
        p.kind = "database".into();
        p.database = db.clone();
        provisions.push((format!("database {}", short(&format!("{db:?}"))), p));
    }
    for hook in [
        pb::Hook { action: None },
        command_hook(&[]),
        command_hook(&[""]),
        command_hook(&["sh", "a\0b"]),
        http_hook("", "http://127.0.0.1:1/"),
        http_hook("NOT A METHOD", "http://127.0.0.1:1/"),
        http_hook("GET", "not a url"),
        http_hook("GET", "file:///etc/passwd"),
        http_hook("GET", "https://127.0.0.1:1/"),
        http_hook("GET", "http://"),
        http_hook("GET", "http://user:pass@"),
    ] {
        let mut p = provision_none(&id);
        p.hooks = vec![hook.clone()];
        provisions.push((format!("hook {}", short(&format!("{hook:?}"))), p));
    }
    for (what, p) in provisions {
        f.refused(
            &format!("Provision {what}"),
            node.provision(p).await,
            invalid,
        );
    }
    // Deprovision, Bind and Unbind with kinds and specs out of domain.
    for kind in ["bogus", &"k".repeat(1 << 20)] {
        let d = pb::DeprovisionRequest {
            instance_id: new_id(),
            kind: kind.into(),
            ..Default::default()
        };
        f.refused("Deprovision kind", node.deprovision(d).await, invalid);
        let b = pb::BindRequest {
            instance_id: f.echo_id.clone(),
            binding_id: new_id(),
            kind: kind.into(),
            ..Default::default()
        };
        f.refused("Bind kind", node.bind(b).await, invalid);
        let u = pb::UnbindRequest {
            instance_id: f.echo_id.clone(),
            binding_id: new_id(),
            kind: kind.into(),
            ..Default::default()
        };
        f.refused("Unbind kind", node.unbind(u).await, invalid);
    }
    let d = pb::DeprovisionRequest {
        instance_id: new_id(),
        kind: "database".into(),
        ..Default::default()
    };
    f.refused(
        "Deprovision database without spec",
        node.deprovision(d).await,
        invalid,
    );
    let d = pb::DeprovisionRequest {
        instance_id: new_id(),
        hooks: vec![pb::Hook { action: None }],
        ..Default::default()
    };
    f.refused("Deprovision empty hook", node.deprovision(d).await, invalid);
    // A bind on a process instance the node does not hold: NOT_FOUND, and
    // the password it carries is not in the answer or the log. (A kind
    // "none" instance lives nowhere, so its bind is the hooks alone.)
    let b = pb::BindRequest {
        instance_id: new_id(),
        binding_id: new_id(),
        username: "u0123".into(),
        password: f.secrets[2].clone(),
        kind: "process".into(),
        ..Default::default()
    };
    f.refused(
        "Bind unknown instance",
        node.bind(b).await,
        &[Code::NotFound],
    );

    f.stack.assert_running();
    assert_eq!(f.state().await, before, "refused node calls changed state");
    assert!(f.stack.node_instance(&f.redis_id).await.is_some());
    support::assert_log_clean(&f.secrets);
    eprintln!(
        "node corpus: {} calls refused, nothing changed",
        f.refusals.get()
    );
}

/// An announcement of a node that does not exist, valid but for what a
/// case changes.
fn announcement() -> pb::NodeInfo {
    pb::NodeInfo {
        node_id: INTRUDER.into(),
        services: vec!["echo".into()],
        capacity: 10,
        used: 0,
        port_range: range(20_000, 20_010),
        boot_id: new_id(),
        grpc_url: "http://127.0.0.1:1".into(),
        advertise_host: "127.0.0.1".into(),
        data_dir: "/tmp/intruder".into(),
        bind_host: "127.0.0.1".into(),
        attributes: HashMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_refuses_bad_announcements() {
    let mut f = Fixture::start().await;
    let before = f.state().await;
    let mut reg = RegistryClient::new(connect(&f.stack.gateway_grpc_url).await);
    let invalid = &[Code::InvalidArgument];
    let mut cases: Vec<(String, pb::AnnounceRequest)> =
        vec![("no node".into(), pb::AnnounceRequest { node: None })];
    let mut add = |what: String, edit: &dyn Fn(&mut pb::NodeInfo)| {
        let mut node = announcement();
        edit(&mut node);
        cases.push((what, pb::AnnounceRequest { node: Some(node) }));
    };
    for bad in bad_ids() {
        let what = short(&format!("{bad:?}"));
        // ".images" is only reserved among instance directories.
        if bad != ".images" {
            add(format!("node_id {what}"), &|n| n.node_id = bad.clone());
        }
    }
    for bad in bad_names() {
        let what = short(&format!("{bad:?}"));
        // An opaque token: anything but empty, control characters or huge.
        add(format!("boot_id {what}"), &|n| n.boot_id = bad.clone());
        add(format!("service {what}"), &|n| {
            n.services = vec![bad.clone()]
        });
        if bad.is_empty() {
            continue;
        }
        add(format!("advertise_host {what}"), &|n| {
            n.advertise_host = bad.clone()
        });
        add(format!("bind_host {what}"), &|n| n.bind_host = bad.clone());
        // A 256-byte path or attribute value is fine.
        let bad_for_long_fields = bad.len() > 4096 || bad.chars().any(char::is_control);
        if !bad_for_long_fields {
            continue;
        }
        add(format!("grpc_url with {what}"), &|n| {
            n.grpc_url = format!("http://127.0.0.1:1/{bad}")
        });
        add(format!("attribute value {what}"), &|n| {
            n.attributes.insert("postgresql_host".into(), bad.clone());
        });
        add(format!("attribute key {what}"), &|n| {
            n.attributes.insert(bad.clone(), "v".into());
        });
    }
    for url in [
        "",
        "127.0.0.1:1",
        "ftp://127.0.0.1",
        "file:///etc/passwd",
        "http://",
        "http://[::1",
    ] {
        add(format!("grpc_url {url:?}"), &|n| n.grpc_url = url.into());
    }
    for (s, e) in [(0, 10), (10, 5), (1, 65_536), (u32::MAX, u32::MAX)] {
        add(format!("port_range {s}-{e}"), &|n| {
            n.port_range = range(s, e)
        });
    }
    for (what, req) in cases {
        f.refused(
            &format!("Announce {what}"),
            reg.announce(req).await,
            invalid,
        );
    }

    f.stack.assert_running();
    assert_eq!(
        f.state().await,
        before,
        "refused announcements changed the registry"
    );
    support::assert_log_clean(&f.secrets);
    eprintln!(
        "registry corpus: {} announcements refused, nothing changed",
        f.refusals.get()
    );
}

/// The URL of the server serving `method`.
fn server_of<'a>(stack: &'a Stack, method: &str) -> &'a str {
    if method.contains(".Allocator/") {
        &stack.allocator_url
    } else if method.contains(".NodeAgent/") {
        &stack.node_url
    } else {
        &stack.gateway_grpc_url
    }
}

async fn raw_call(
    url: &str,
    token: Option<&str>,
    method: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(connect_with_token(url, token).await);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static(method),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_method_refuses_garbage_oversized_and_unauthenticated_calls() {
    let mut f = Fixture::start().await;
    let before = f.state().await;
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("0xff bytes", vec![0xff; 64]),
        ("truncated varint", vec![0x08, 0xff, 0xff]),
        ("truncated length", vec![0x0a, 0x7f, b'a']),
        ("invalid UTF-8 string", vec![0x0a, 0x02, 0xff, 0xfe]),
        ("wrong wire type", vec![0x0d, 1, 2, 3, 4, 0x0a, 0x05]),
        ("field number 0", vec![0x00, 0x01]),
        ("group start", vec![0x0b]),
        ("nested 100k deep", nested_message(100_000)),
    ];
    for method in METHODS {
        let url = server_of(&f.stack, method).to_string();
        for (what, body) in &garbage {
            let r = raw_call(&url, Some(TEST_TOKEN), method, body.clone()).await;
            let ok_for_empty = matches!(
                method,
                "/svcbroker.v1.NodeAgent/Describe" | "/svcbroker.v1.NodeAgent/ListInstances"
            );
            // Describe and ListInstances take an empty message: fields they
            // do not know are skipped, as protobuf requires, but bytes that
            // do not parse still are refused.
            if ok_for_empty && r.is_ok() {
                continue;
            }
            f.refused(
                &format!("{method} {what}"),
                r,
                &[Code::Internal, Code::InvalidArgument],
            );
        }
        // Beyond the 4 MiB decode limit.
        let len = 5usize << 20;
        // Field 1, length-delimited, 5 MiB long.
        let mut big = vec![0x0a];
        let mut v = len;
        while v >= 0x80 {
            big.push((v as u8) | 0x80);
            v >>= 7;
        }
        big.push(v as u8);
        big.resize(big.len() + len, b'a');
        let r = raw_call(&url, Some(TEST_TOKEN), method, big).await;
        f.refused(
            &format!("{method} 5 MiB"),
            r,
            &[Code::OutOfRange, Code::ResourceExhausted],
        );
        // A 12 KiB request id: served as usual, logged bounded.
        let mut grpc = tonic::client::Grpc::new(connect(&url).await);
        grpc.ready().await.expect("channel ready");
        let mut req = tonic::Request::new(Vec::new());
        let id = "r".repeat(12 << 10);
        req.metadata_mut()
            .insert("x-request-id", id.parse().expect("ascii metadata"));
        let r = grpc
            .unary(req, PathAndQuery::from_static(method), RawCodec)
            .await;
        if let Err(status) = r {
            assert!(
                matches!(status.code(), Code::InvalidArgument),
                "{method} with a 12 KiB request id: {status:?}"
            );
        }
        // Without a token, with a wrong one, with one that is almost right.
        for token in [
            None,
            Some("wrong"),
            Some(&TEST_TOKEN[..TEST_TOKEN.len() - 1]),
            Some(""),
        ] {
            let r = raw_call(&url, token, method, vec![]).await;
            f.refused(
                &format!("{method} token {token:?}"),
                r,
                &[Code::Unauthenticated],
            );
        }
    }
    f.stack.assert_running();
    assert_eq!(f.state().await, before, "refused raw calls changed state");
    support::assert_log_clean(&f.secrets);
    eprintln!(
        "raw gRPC corpus: {} calls refused over {} methods, nothing changed",
        f.refusals.get(),
        METHODS.len()
    );
}

/// Field 1 holding field 1 holding ... `depth` times, written outside in
/// from the lengths computed inside out.
fn nested_message(depth: usize) -> Vec<u8> {
    fn varint(mut v: usize, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    // lengths[k]: the length of the content at nesting level k from the
    // inside (the innermost message is empty).
    let mut lengths = vec![0usize];
    for k in 0..depth - 1 {
        let mut prefix = Vec::new();
        varint(lengths[k], &mut prefix);
        lengths.push(1 + prefix.len() + lengths[k]);
    }
    let mut msg = Vec::new();
    for len in lengths.iter().rev() {
        msg.push(0x0a);
        varint(*len, &mut msg);
    }
    msg
}
