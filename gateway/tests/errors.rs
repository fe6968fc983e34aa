//! The one mapping from gRPC statuses to domain errors, and from domain
//! errors to OSB HTTP answers.

use axum::response::IntoResponse;
use serde_json::json;
use svcbroker_gateway::Error;
use svcbroker_gateway::error::scrub;
use tonic::{Code, Status};

#[test]
fn transient_grpc_codes_become_unavailable() {
    for code in [
        Code::Unavailable,
        Code::DeadlineExceeded,
        Code::Cancelled,
        Code::Aborted,
    ] {
        let e = Error::from_grpc("allocator", Status::new(code, "x"));
        assert!(e.is_transient(), "{code:?}");
        assert_eq!(e.status().as_u16(), 503);
        assert!(e.to_string().contains("allocator"), "{e}");
    }
}

#[test]
fn other_grpc_codes_are_permanent() {
    for (code, http) in [
        (Code::InvalidArgument, 502),
        (Code::FailedPrecondition, 502),
        (Code::NotFound, 502),
        (Code::Internal, 502),
        (Code::ResourceExhausted, 503),
    ] {
        let e = Error::from_grpc("node 'n1'", Status::new(code, "boom"));
        assert!(!e.is_transient(), "{code:?}");
        assert_eq!(e.status().as_u16(), http, "{code:?}");
    }
}

#[test]
fn osb_codes_and_statuses() {
    let cases = [
        (Error::BadRequest("b".into()), 400, None),
        (Error::Unauthorized, 401, None),
        (Error::NotFound("n".into()), 404, None),
        (Error::Conflict("c".into()), 409, None),
        (Error::Gone("g".into()), 410, None),
        (Error::ApiVersion("v".into()), 412, None),
        (Error::PayloadTooLarge { limit: 10 }, 413, None),
        (Error::AsyncRequired("a".into()), 422, Some("AsyncRequired")),
        (
            Error::Concurrency("c".into()),
            422,
            Some("ConcurrencyError"),
        ),
        (
            Error::MaintenanceInfoConflict("m".into()),
            422,
            Some("MaintenanceInfoConflict"),
        ),
        (Error::Unprocessable("u".into()), 422, None),
        (
            Error::Unavailable {
                message: "down".into(),
            },
            503,
            None,
        ),
    ];
    for (e, status, code) in cases {
        assert_eq!(e.status().as_u16(), status, "{e:?}");
        let body = e.body();
        assert_eq!(body.get("error").and_then(|v| v.as_str()), code, "{e:?}");
        let d = body["description"].as_str().unwrap();
        assert!(!d.is_empty());
    }
}

#[tokio::test]
async fn unavailable_carries_retry_after() {
    let r = Error::Unavailable {
        message: "no live node offers service 'redis' with free capacity".into(),
    }
    .into_response();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        body,
        json!({"description": "no live node offers service 'redis' with free capacity"})
    );
}

#[test]
fn internals_are_not_exposed() {
    let e = Error::Internal("sqlite said something about /var/lib".into());
    assert_eq!(e.status().as_u16(), 500);
    assert_eq!(e.body()["description"], "internal broker error");
}

#[test]
fn failed_operations_carry_osb_flags() {
    let e = Error::OperationFailed {
        message: "update failed: x".into(),
        instance_usable: Some(true),
        update_repeatable: Some(false),
    };
    let b = e.body();
    assert_eq!(b["instance_usable"], true);
    assert_eq!(b["update_repeatable"], false);
}

#[test]
fn scrub_removes_secrets() {
    let msg = "bad line: requirepass Sup3rSecretPw in redis.conf";
    assert_eq!(
        scrub(msg, &["Sup3rSecretPw"]),
        "bad line: requirepass <redacted> in redis.conf"
    );
    // Too-short strings are not scrubbed: they would mangle the message.
    assert_eq!(scrub("abc", &["a"]), "abc");
}
