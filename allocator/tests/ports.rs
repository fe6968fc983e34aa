//! AllocatePort / ReleasePort through a real gRPC server.

mod common;

use std::collections::HashSet;

use common::{fresh, port_request};
use svcbroker_proto::v1::{
    AllocatePortRequest, ListAllocationsRequest, PortRange, ReleasePortRequest,
};
use tonic::Code;

#[tokio::test]
async fn allocate_is_idempotent_per_owner() {
    let (_dir, server) = fresh().await;
    let mut c = server.client().await;

    let first = c
        .allocate_port(port_request("node-1", "inst-a", 10000, 10010))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.port, first.created), (10000, true));

    let again = c
        .allocate_port(port_request("node-1", "inst-a", 10000, 10010))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.port, again.created), (10000, false));

    // Still the existing lease when asked with another range, preference
    // and exclusions: a retrying caller must get the same port.
    let mut other = port_request("node-1", "inst-a", 20000, 20010);
    other.preferred = Some(20005);
    other.exclude = vec![10000];
    let other = c.allocate_port(other).await.unwrap().into_inner();
    assert_eq!((other.port, other.created), (10000, false));
}

#[tokio::test]
async fn preferred_port_is_honoured_when_free_and_in_range() {
    let (_dir, server) = fresh().await;
    let mut c = server.client().await;

    let mut req = port_request("p", "a", 10000, 10010);
    req.preferred = Some(10007);
    assert_eq!(c.allocate_port(req).await.unwrap().into_inner().port, 10007);

    // Taken by "a": "b" gets the lowest free port instead.
    let mut req = port_request("p", "b", 10000, 10010);
    req.preferred = Some(10007);
    assert_eq!(c.allocate_port(req).await.unwrap().into_inner().port, 10000);

    // Out of range: ignored.
    let mut req = port_request("p", "c", 10000, 10010);
    req.preferred = Some(9999);
    assert_eq!(c.allocate_port(req).await.unwrap().into_inner().port, 10001);

    // Not a TCP port at all: ignored, not an error.
    let mut req = port_request("p", "d", 10000, 10010);
    req.preferred = Some(70000);
    assert_eq!(c.allocate_port(req).await.unwrap().into_inner().port, 10002);

    // Excluded: ignored.
    let mut req = port_request("p", "e", 10000, 10010);
    req.preferred = Some(10009);
    req.exclude = vec![10009];
    assert_eq!(c.allocate_port(req).await.unwrap().into_inner().port, 10003);
}

#[tokio::test]
async fn lowest_free_port_fills_gaps() {
    let (_dir, server) = fresh().await;
    let mut c = server.client().await;
    for (owner, want) in [("a", 10000), ("b", 10001), ("c", 10002)] {
        let got = c
            .allocate_port(port_request("p", owner, 10000, 10010))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((got.port, got.created), (want, true));
    }
    c.release_port(ReleasePortRequest {
        pool: "p".into(),
        owner: "b".into(),
    })
    .await
    .unwrap();
    let got = c
        .allocate_port(port_request("p", "d", 10000, 10010))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.port, 10001);

    // Pools are independent: the same port is free in another pool.
    let got = c
        .allocate_port(port_request("q", "a", 10000, 10010))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.port, 10000);
}

#[tokio::test]
async fn excluded_ports_are_skipped() {
    let (_dir, server) = fresh().await;
    let mut c = server.client().await;
    let mut req = port_request("p", "a", 10000, 10010);
    req.exclude = vec![10000, 10001, 10003];
    assert_eq!(c.allocate_port(req).await.unwrap().into_inner().port, 10002);
    let mut req = port_request("p", "b", 10000, 10010);
    req.exclude = vec![10000, 10001, 10003];
    assert_eq!(c.allocate_port(req).await.unwrap().into_inner().port, 10004);
}

#[tokio::test]
async fn full_range_is_resource_exhausted() {
    let (_dir, server) = fresh().await;
    let mut c = server.client().await;
    for owner in ["a", "b"] {
        c.allocate_port(port_request("node-1", owner, 10000, 10001))
            .await
            .unwrap();
    }
    let err = c
        .allocate_port(port_request("node-1", "c", 10000, 10001))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        err.message(),
        "no free port in pool node-1 range 10000-10001"
    );

    // Exclusions can exhaust a range too.
    let mut req = port_request("node-2", "a", 10000, 10001);
    req.exclude = vec![10000, 10001];
    let err = c.allocate_port(req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    // Nothing was stored for the failed owners.
    let list = c
        .list_allocations(ListAllocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.leases.len(), 2);
}

#[tokio::test]
async fn release_then_reallocate() {
    let (_dir, server) = fresh().await;
    let mut c = server.client().await;
    let port = c
        .allocate_port(port_request("p", "a", 10000, 10010))
        .await
        .unwrap()
        .into_inner()
        .port;
    let release = || ReleasePortRequest {
        pool: "p".into(),
        owner: "a".into(),
    };
    let released = c.release_port(release()).await.unwrap().into_inner();
    assert_eq!(released.released, vec![port]);
    // Releasing nothing is not an error.
    let released = c.release_port(release()).await.unwrap().into_inner();
    assert!(released.released.is_empty());

    let again = c
        .allocate_port(port_request("p", "a", 10000, 10010))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.port, again.created), (port, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_owners_get_distinct_ports() {
    let (_dir, server) = fresh().await;
    let client = server.client().await;
    let calls = (0..64).map(|i| {
        let mut c = client.clone();
        tokio::spawn(async move {
            c.allocate_port(port_request("p", &format!("owner-{i}"), 20000, 20999))
                .await
                .unwrap()
                .into_inner()
        })
    });
    let results = futures::future::join_all(calls).await;
    let ports: HashSet<u32> = results
        .into_iter()
        .map(|r| {
            let r = r.unwrap();
            assert!(r.created);
            r.port
        })
        .collect();
    assert_eq!(ports.len(), 64);
    // Concurrency does not skip ports: exactly the 64 lowest.
    assert_eq!(ports, (20000..20064).collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_for_one_owner_get_one_port() {
    let (_dir, server) = fresh().await;
    let client = server.client().await;
    let calls = (0..32).map(|_| {
        let mut c = client.clone();
        tokio::spawn(async move {
            c.allocate_port(port_request("p", "same", 20000, 20999))
                .await
                .unwrap()
                .into_inner()
        })
    });
    let results: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let ports: HashSet<u32> = results.iter().map(|r| r.port).collect();
    assert_eq!(ports.len(), 1);
    assert_eq!(results.iter().filter(|r| r.created).count(), 1);
}

#[tokio::test]
async fn invalid_requests_are_rejected_and_store_nothing() {
    let (_dir, server) = fresh().await;
    let mut c = server.client().await;
    let long = "x".repeat(256);
    let cases: Vec<(AllocatePortRequest, &str)> = vec![
        (port_request("", "a", 1000, 2000), "pool must not be empty"),
        (port_request("p", "", 1000, 2000), "owner must not be empty"),
        (
            port_request(&long, "a", 1000, 2000),
            "pool is 256 bytes long, at most 255 are allowed",
        ),
        (
            port_request("p", "a\u{7}", 1000, 2000),
            "owner contains a control character",
        ),
        (
            AllocatePortRequest {
                range: None,
                ..port_request("p", "a", 1, 1)
            },
            "range is required",
        ),
        (
            port_request("p", "a", 0, 2000),
            "range start 0 is outside 1-65535",
        ),
        (
            port_request("p", "a", 1000, 65536),
            "range end 65536 is outside 1-65535",
        ),
        (
            port_request("p", "a", 2000, 1000),
            "range start 2000 is greater than range end 1000",
        ),
    ];
    for (req, message) in cases {
        let err = c.allocate_port(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.message(), message);
    }
    let err = c
        .release_port(ReleasePortRequest {
            pool: "p".into(),
            owner: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let list = c
        .list_allocations(ListAllocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.leases.is_empty() && list.credentials.is_empty());

    // The edges of the valid range are fine.
    let ok = c
        .allocate_port(AllocatePortRequest {
            range: Some(PortRange {
                start: 65535,
                end: 65535,
            }),
            ..port_request("p", &"o".repeat(200), 1, 1)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.port, 65535);
}
