//! Test harness for svcbroker's integration tests: a whole stack on
//! loopback ([`Stack`]), an OSB client ([`Osb`]), raw HTTP for requests a
//! client library will not send ([`raw`]), `/proc` inspection ([`procs`])
//! and bounded polling ([`poll`]).

pub mod faults;
pub mod fixtures;
pub mod models_support;
pub mod osb;
pub mod poll;
pub mod ports;
pub mod procs;
pub mod raw;
pub mod redis_check;
pub mod stack;

use std::path::PathBuf;

pub use osb::{Osb, Resp, assert_error, bind_body, provision_body};
pub use poll::{eventually, until};
pub use redis_check::RedisCreds;
pub use stack::{GatewayMode, NODE_ID, Snapshot, Stack, StackOptions};

/// Returns the workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives in the workspace")
        .to_path_buf()
}

/// Returns the path of workspace binary `name` in the profile directory of
/// the running test (`target/<profile>/<name>`), panicking with the command
/// that builds it when it is missing.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // Test executables live in target/<profile>/deps/.
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test exe in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build it first (`cargo build --workspace --bins`, which scripts/test.sh does)",
        path.display()
    );
    path
}

/// Sends this process's tracing output (the in-process services') to the
/// test's captured output, filtered as the binaries filter theirs
/// (`RUST_LOG`, default info, tokio-postgres capped).
pub fn init_tracing() {
    let filter = svcbroker_proto::logging::filter(std::env::var("RUST_LOG").ok().as_deref());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Returns a fresh temporary directory for one test's files (removed when
/// dropped), first killing what tests killed earlier left running (see
/// [`procs::reap_orphans_of_killed_tests`]).
pub fn test_dir() -> tempfile::TempDir {
    procs::reap_orphans_of_killed_tests(&std::env::temp_dir());
    tempfile::Builder::new()
        .prefix(stack::DIR_PREFIX)
        .tempdir()
        .expect("create temp dir")
}

/// A fresh OSB id (instance or binding).
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
