//! The blocking `Store` on its own, without gRPC.

use std::time::{Duration, Instant};

use rusqlite::params;
use svcbroker_allocator::{Error, PortRange, PortRequest, Store};

fn req(pool: &str, owner: &str, start: u32, end: u32) -> PortRequest {
    PortRequest::new(pool, owner, PortRange::new(start, end).unwrap(), None, []).unwrap()
}

#[test]
fn allocation_stays_fast_with_many_leases() {
    const N: u32 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.sqlite");
    drop(Store::open(&path).unwrap());
    {
        // Bulk-load in one transaction; the store commits (and fsyncs) once
        // per lease, which would make this test slow for no insight.
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        for pool in ["busy", "other"] {
            for i in 0..N {
                tx.execute(
                    "INSERT INTO leases (pool, owner, port, created_at) VALUES (?1, ?2, ?3, 0)",
                    params![pool, format!("o{i}"), 10_000 + i],
                )
                .unwrap();
            }
        }
        tx.execute(
            "DELETE FROM leases WHERE pool = 'busy' AND port = ?1",
            [10_000 + N / 2],
        )
        .unwrap();
        tx.commit().unwrap();
    }

    let mut store = Store::open(&path).unwrap();
    let started = Instant::now();
    let gap = store
        .allocate_port(&req("busy", "new-1", 10_000, 60_000))
        .unwrap();
    let end = store
        .allocate_port(&req("busy", "new-2", 10_000, 60_000))
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(gap.port, 10_000 + N as u16 / 2);
    assert_eq!(end.port, 10_000 + N as u16);
    // Generous bound (debug build, fsyncs): a full-table or all-pools scan
    // per call would still pass, but a per-lease round trip would not.
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");

    // A full range answers RESOURCE_EXHAUSTED quickly too.
    let err = store
        .allocate_port(&req("other", "x", 10_000, 10_000 + N - 1))
        .unwrap_err();
    assert!(matches!(err, Error::PoolExhausted { .. }), "{err}");
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.sqlite");
    drop(Store::open(&path).unwrap());
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 2)
        .unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedSchema {
                found: 2,
                supported: 1
            }
        ),
        "{err}"
    );
}

#[test]
fn store_api_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path().join("a.sqlite")).unwrap();
    let lease = store.allocate_port(&req("p", "a", 5000, 5001)).unwrap();
    assert_eq!((lease.port, lease.created), (5000, true));
    let issued = store.issue_credential("a", "instance").unwrap();
    assert!(issued.created);
    let list = store.list(None, Some("a")).unwrap();
    assert_eq!(list.leases.len(), 1);
    assert_eq!(list.credentials[0].username, issued.credential.username);
    assert_eq!(store.release_port("p", "a").unwrap(), vec![5000]);
    assert!(store.revoke_credential("a").unwrap());
    assert_eq!(store.list(None, None).unwrap(), Default::default());
}
