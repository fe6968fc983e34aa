//! IssueCredential / RevokeCredential / ListAllocations through gRPC.

mod common;

use std::collections::HashSet;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{fresh, port_request};
use svcbroker_proto::v1::{
    IssueCredentialRequest, ListAllocationsRequest, RevokeCredentialRequest,
};
use tonic::Code;

fn issue(owner: &str) -> IssueCredentialRequest {
    IssueCredentialRequest {
        owner: owner.into(),
        kind: "instance".into(),
    }
}

#[tokio::test]
async fn issue_is_idempotent_and_well_formed() {
    let (_dir, server) = fresh().await;
    let mut c = server.client().await;

    let first = c
        .issue_credential(issue("inst-a"))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    let cred = first.credential.unwrap();
    assert_eq!(
        (cred.owner.as_str(), cred.kind.as_str()),
        ("inst-a", "instance")
    );

    // A valid Redis ACL user and unquoted PostgreSQL role name.
    let (u, hex) = cred.username.split_at(1);
    assert_eq!(u, "u");
    assert_eq!(hex.len(), 24);
    assert!(
        hex.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );

    // URI-safe, and at least 128 bits of entropy.
    let raw = URL_SAFE_NO_PAD.decode(&cred.password).unwrap();
    assert!(raw.len() * 8 >= 128, "{} bytes", raw.len());
    assert!(
        cred.password
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );

    // Same answer on repeat, whatever the kind.
    let mut again = issue("inst-a");
    again.kind = "binding".into();
    let again = c.issue_credential(again).await.unwrap().into_inner();
    assert!(!again.created);
    assert_eq!(again.credential.unwrap(), cred);
}

#[tokio::test]
async fn credentials_are_unique() {
    let (_dir, server) = fresh().await;
    let client = server.client().await;
    let calls = (0..100).map(|i| {
        let mut c = client.clone();
        tokio::spawn(async move {
            c.issue_credential(issue(&format!("owner-{i}")))
                .await
                .unwrap()
                .into_inner()
                .credential
                .unwrap()
        })
    });
    let creds: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let usernames: HashSet<_> = creds.iter().map(|c| c.username.clone()).collect();
    let passwords: HashSet<_> = creds.iter().map(|c| c.password.clone()).collect();
    assert_eq!(usernames.len(), 100);
    assert_eq!(passwords.len(), 100);
}

#[tokio::test]
async fn revoke_forgets_the_credential() {
    let (_dir, server) = fresh().await;
    let mut c = server.client().await;
    let old = c
        .issue_credential(issue("b"))
        .await
        .unwrap()
        .into_inner()
        .credential
        .unwrap();
    let revoke = || RevokeCredentialRequest { owner: "b".into() };
    assert!(
        c.revoke_credential(revoke())
            .await
            .unwrap()
            .into_inner()
            .revoked
    );
    // Revoking nothing is not an error.
    assert!(
        !c.revoke_credential(revoke())
            .await
            .unwrap()
            .into_inner()
            .revoked
    );

    let new = c.issue_credential(issue("b")).await.unwrap().into_inner();
    assert!(new.created);
    let new = new.credential.unwrap();
    assert_ne!(new.password, old.password);
    assert_ne!(new.username, old.username);
}

#[tokio::test]
async fn list_filters_and_never_includes_passwords() {
    let (_dir, server) = fresh().await;
    let mut c = server.client().await;
    let mut passwords = vec![];
    for owner in ["a", "b"] {
        passwords.push(
            c.issue_credential(issue(owner))
                .await
                .unwrap()
                .into_inner()
                .credential
                .unwrap()
                .password,
        );
        for pool in ["n1", "n2"] {
            c.allocate_port(port_request(pool, owner, 10000, 10010))
                .await
                .unwrap();
        }
    }

    let list = |pool: Option<&str>, owner: Option<&str>| {
        let mut c = c.clone();
        let req = ListAllocationsRequest {
            pool: pool.map(Into::into),
            owner: owner.map(Into::into),
        };
        async move { c.list_allocations(req).await.unwrap().into_inner() }
    };

    let all = list(None, None).await;
    assert_eq!(all.leases.len(), 4);
    assert_eq!(all.credentials.len(), 2);
    let dump = format!("{all:?}");
    for p in &passwords {
        assert!(!dump.contains(p.as_str()), "password listed: {dump}");
    }

    let n1 = list(Some("n1"), None).await;
    assert!(n1.leases.iter().all(|l| l.pool == "n1"));
    assert_eq!(n1.leases.len(), 2);

    let a = list(None, Some("a")).await;
    assert_eq!(a.leases.len(), 2);
    assert!(a.leases.iter().all(|l| l.owner == "a"));
    assert_eq!(a.credentials.len(), 1);
    assert_eq!(a.credentials[0].owner, "a");
    assert!(a.credentials[0].created_at > 0);

    let n2a = list(Some("n2"), Some("a")).await;
    assert_eq!(n2a.leases.len(), 1);
    assert_eq!(
        (n2a.leases[0].pool.as_str(), n2a.leases[0].port),
        ("n2", 10000)
    );
}

#[tokio::test]
async fn invalid_owner_is_rejected() {
    let (_dir, server) = fresh().await;
    let mut c = server.client().await;
    let err = c.issue_credential(issue("")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut bad_kind = issue("a");
    bad_kind.kind = "x\n".into();
    let err = c.issue_credential(bad_kind).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "kind contains a control character");
    let err = c
        .revoke_credential(RevokeCredentialRequest { owner: "\0".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let list = c
        .list_allocations(ListAllocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.credentials.is_empty());
}
