//! Bind and Unbind of a real redis-server instance through the command
//! hooks the gateway renders for Redis: an ACL user per binding, made and
//! removed with `redis-cli`, the instance password in env, the commands on
//! stdin (never on the command line).

mod common;

use std::time::Duration;

use common::*;
use svcbroker_proto::v1::{BindRequest, DeprovisionRequest, Hook, UnbindRequest};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tonic::Code;

const ADMIN_PW: &str = "instance-admin-pw";

fn redis_cli(port: u32, stdin: &str) -> Hook {
    command_hook(
        &["redis-cli", "-p", &port.to_string()],
        &[("REDISCLI_AUTH", ADMIN_PW)],
        stdin,
    )
}

/// One RESP command on an open connection; `None` when the server closed
/// the connection.
async fn send(conn: &mut BufReader<TcpStream>, args: &[&str]) -> Option<String> {
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    conn.get_mut().write_all(req.as_bytes()).await.ok()?;
    let mut line = String::new();
    match tokio::time::timeout(Duration::from_secs(5), conn.read_line(&mut line)).await {
        Ok(Ok(0)) | Ok(Err(_)) => None,
        Ok(Ok(_)) => Some(line.trim_end().to_owned()),
        Err(_) => panic!("redis did not answer {args:?}"),
    }
}

#[tokio::test]
async fn acl_user_per_binding() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    let port = free_ports(1)[0];
    c.provision(redis_request("r1", port, ADMIN_PW))
        .await
        .unwrap();

    let bind = BindRequest {
        instance_id: "r1".into(),
        binding_id: "b1".into(),
        username: "u1".into(),
        password: "binding-pw".into(),
        hooks: vec![redis_cli(
            port,
            "ACL SETUSER u1 on >binding-pw ~* &* +@all\n",
        )],
        kind: "process".into(),
        ..Default::default()
    };
    c.bind(bind.clone()).await.unwrap();
    // Idempotent.
    c.bind(bind).await.unwrap();

    let replies = redis_session(
        port,
        &[
            &["AUTH", "u1", "binding-pw"],
            &["SET", "k", "v"],
            &["GET", "k"],
        ],
    )
    .await;
    assert_eq!(replies, ["+OK", "+OK", "v"]);

    // A connection authenticated as the binding's user, open across unbind.
    let mut open = BufReader::new(
        TcpStream::connect(("127.0.0.1", port as u16))
            .await
            .unwrap(),
    );
    assert_eq!(
        send(&mut open, &["AUTH", "u1", "binding-pw"])
            .await
            .as_deref(),
        Some("+OK")
    );

    let unbind = UnbindRequest {
        instance_id: "r1".into(),
        binding_id: "b1".into(),
        username: "u1".into(),
        hooks: vec![redis_cli(port, "ACL DELUSER u1\nCLIENT KILL USER u1\n")],
        kind: "process".into(),
        ..Default::default()
    };
    c.unbind(unbind.clone()).await.unwrap();
    c.unbind(unbind).await.unwrap();

    let replies = redis_session(port, &[&["AUTH", "u1", "binding-pw"]]).await;
    assert!(replies[0].starts_with("-WRONGPASS"), "{replies:?}");
    assert_eq!(
        send(&mut open, &["PING"]).await,
        None,
        "open connection was not killed"
    );

    // Unbinding from an instance that is gone is a success.
    c.deprovision(DeprovisionRequest {
        instance_id: "r1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.unbind(UnbindRequest {
        instance_id: "r1".into(),
        binding_id: "b1".into(),
        username: "u1".into(),
        hooks: vec![redis_cli(port, "ACL DELUSER u1\n")],
        kind: "process".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Binding to it is NOT_FOUND.
    let err = c
        .bind(BindRequest {
            instance_id: "r1".into(),
            binding_id: "b2".into(),
            username: "u2".into(),
            password: "pw".into(),
            hooks: vec![redis_cli(port, "ACL SETUSER u2 on >pw\n")],
            kind: "process".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    node.stop().await;
}
