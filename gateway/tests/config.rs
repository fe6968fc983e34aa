//! Configuration: defaults, file, environment, errors naming file/line/key,
//! and a Debug that never prints the password.

use std::io::Write;
use std::path::PathBuf;

use svcbroker_gateway::config::{
    ENV_ALLOCATOR_URL, ENV_DB, ENV_GRPC, ENV_HTTP, ENV_NODES, ENV_PASSWORD, ENV_SERVICES_DIR,
    ENV_USERNAME, load_config_with,
};
use svcbroker_gateway::{Config, ConfigError};

fn write(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn no_env(_: &'static str) -> Result<Option<String>, ConfigError> {
    Ok(None)
}

#[test]
fn defaults() {
    let c = load_config_with(None, no_env).unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.http_listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.grpc_listen.to_string(), "127.0.0.1:50050");
    assert_eq!(c.db_path, PathBuf::from("gateway.sqlite"));
    assert_eq!(c.services_dir, PathBuf::from("services.d"));
    assert_eq!(c.allocator_url, "http://127.0.0.1:50051");
    assert_eq!(c.node_timeout_ms, 15_000);
    assert_eq!(c.announce_interval_ms, 5_000);
    assert_eq!(c.sync_timeout_ms, 60_000);
    assert_eq!(c.max_body_bytes, 1 << 20);
    assert_eq!(c.default_max_polling_duration_s, 900);
    assert!(c.nodes.is_empty());
    assert!(
        c.require_credentials().is_err(),
        "no credentials by default"
    );
}

#[test]
fn file_then_env() {
    let f = write(
        "http_listen: 0.0.0.0:9000\nusername: u\npassword: p\nnodes: [\"http://10.0.0.1:50052\"]\n",
    );
    let c = load_config_with(Some(f.path()), no_env).unwrap();
    assert_eq!(c.http_listen.to_string(), "0.0.0.0:9000");
    assert_eq!(c.nodes, ["http://10.0.0.1:50052"]);
    c.require_credentials().unwrap();

    let c = load_config_with(Some(f.path()), |name| {
        Ok(match name {
            ENV_USERNAME => Some("env-user".into()),
            ENV_PASSWORD => Some("env-pass".into()),
            ENV_HTTP => Some("127.0.0.1:1".into()),
            ENV_GRPC => Some("127.0.0.1:2".into()),
            ENV_ALLOCATOR_URL => Some("http://a:3".into()),
            ENV_DB => Some("/tmp/g.sqlite".into()),
            ENV_SERVICES_DIR => Some("/etc/svc".into()),
            ENV_NODES => Some("http://n1:1, http://n2:2".into()),
            _ => None,
        })
    })
    .unwrap();
    assert_eq!(
        (c.username.as_str(), c.password.as_str()),
        ("env-user", "env-pass")
    );
    assert_eq!(c.http_listen.to_string(), "127.0.0.1:1");
    assert_eq!(c.grpc_listen.to_string(), "127.0.0.1:2");
    assert_eq!(c.allocator_url, "http://a:3");
    assert_eq!(c.db_path, PathBuf::from("/tmp/g.sqlite"));
    assert_eq!(c.services_dir, PathBuf::from("/etc/svc"));
    assert_eq!(c.nodes, ["http://n1:1", "http://n2:2"]);
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let f = write("username: u\nsync_timeout: 5\n");
    let msg = load_config_with(Some(f.path()), no_env)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(&format!("{}:2:", f.path().display())),
        "{msg}"
    );
    assert!(msg.contains("sync_timeout"), "{msg}");
}

#[test]
fn bad_values_are_named() {
    let f = write("grpc_listen: nowhere\n");
    let msg = load_config_with(Some(f.path()), no_env)
        .unwrap_err()
        .to_string();
    assert!(msg.contains(":1:") && msg.contains("grpc_listen"), "{msg}");

    let f = write("allocator_url: ftp://x\n");
    let msg = load_config_with(Some(f.path()), no_env)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("allocator_url"), "{msg}");

    let msg = load_config_with(None, |n| Ok((n == ENV_HTTP).then(|| "x".into())))
        .unwrap_err()
        .to_string();
    assert!(msg.contains(ENV_HTTP), "{msg}");
}

#[test]
fn debug_redacts_the_password() {
    let c = Config {
        username: "u".into(),
        password: "hunter2-very-secret".into(),
        ..Config::default()
    };
    let s = format!("{c:?}");
    assert!(!s.contains("hunter2"), "{s}");
    assert!(s.contains("<redacted>"), "{s}");
}

#[test]
fn binary_refuses_to_start_without_credentials() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .env_remove(ENV_USERNAME)
        .env_remove(ENV_PASSWORD)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("password"), "{err}");

    let f = write("usrname: x\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--config")
        .arg(f.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usrname"));
}
