//! Serving concerns: health, reflection, restarts, the database file.

mod common;

use common::{TestServer, fresh, port_request};
use svcbroker_proto::v1::IssueCredentialRequest;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn health_reports_serving() {
    let (_dir, server) = fresh().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["svcbroker.v1.Allocator", ""] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
}

#[tokio::test]
async fn reflection_lists_the_service() {
    let (_dir, server) = fresh().await;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"svcbroker.v1.Allocator"), "{names:?}");
}

#[tokio::test]
async fn leases_and_credentials_survive_a_restart() {
    let (dir, server) = fresh().await;
    let db = server.db_path.clone();
    let (port, password) = {
        let mut c = server.client().await;
        let mut req = port_request("p", "a", 10000, 10010);
        req.preferred = Some(10004);
        let port = c.allocate_port(req).await.unwrap().into_inner().port;
        let cred = c
            .issue_credential(IssueCredentialRequest {
                owner: "a".into(),
                kind: "instance".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .credential
            .unwrap();
        (port, cred.password)
    };
    server.stop().await;

    let server = TestServer::start(&db).await;
    let mut c = server.client().await;
    let again = c
        .allocate_port(port_request("p", "a", 10000, 10010))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.port, again.created), (port, false));
    let cred = c
        .issue_credential(IssueCredentialRequest {
            owner: "a".into(),
            kind: "instance".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!cred.created);
    assert_eq!(cred.credential.unwrap().password, password);
    server.stop().await;
    drop(dir);
}

#[cfg(unix)]
#[tokio::test]
async fn database_files_are_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let (_dir, server) = fresh().await;
    // Write something so that the WAL exists.
    server
        .client()
        .await
        .allocate_port(port_request("p", "a", 10000, 10010))
        .await
        .unwrap();
    let db = server.db_path.clone();
    let wal = db.with_extension("sqlite-wal");
    for path in [&db, &wal] {
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
}

#[cfg(unix)]
#[tokio::test]
async fn existing_world_readable_database_is_tightened() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sub/dir/a.sqlite");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    std::fs::write(&db, b"").unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = TestServer::start(&db).await;
    server.client().await;
    server.stop().await;
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test]
async fn unusable_database_fails_run() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file should be.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = svcbroker_allocator::Config {
        db_path: dir.path().to_path_buf(),
        ..Default::default()
    };
    let err = svcbroker_allocator::run(config, listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("cannot open database"), "{err}");
}
