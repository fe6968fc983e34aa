//! Gateway configuration: YAML file, then environment variables; `main.rs`
//! applies command-line flags on top.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Environment variable overriding [`Config::username`].
pub const ENV_USERNAME: &str = "SVCBROKER_USERNAME";
/// Environment variable overriding [`Config::password`].
pub const ENV_PASSWORD: &str = "SVCBROKER_PASSWORD";
/// Environment variable overriding [`Config::http_listen`].
pub const ENV_HTTP: &str = "SVCBROKER_GATEWAY_HTTP";
/// Environment variable overriding [`Config::grpc_listen`].
pub const ENV_GRPC: &str = "SVCBROKER_GATEWAY_GRPC";
/// Environment variable overriding [`Config::allocator_url`].
pub const ENV_ALLOCATOR_URL: &str = "SVCBROKER_ALLOCATOR_URL";
/// Environment variable overriding [`Config::db_path`].
pub const ENV_DB: &str = "SVCBROKER_GATEWAY_DB";
/// Environment variable overriding [`Config::services_dir`].
pub const ENV_SERVICES_DIR: &str = "SVCBROKER_SERVICES_DIR";
/// Environment variable overriding [`Config::nodes`] (comma-separated URLs).
pub const ENV_NODES: &str = "SVCBROKER_GATEWAY_NODES";

/// Environment variable overriding [`Config::token`].
pub use svcbroker_proto::auth::ENV_TOKEN;

/// Gateway settings.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the `gateway` binary binds the OSB REST API to
    /// (default `127.0.0.1:8080`). [`crate::run`] ignores it: the caller binds.
    pub http_listen: SocketAddr,
    /// Address the `gateway` binary binds the `svcbroker.v1.Registry` gRPC
    /// server to (default `127.0.0.1:50050`). [`crate::run`] ignores it.
    pub grpc_listen: SocketAddr,
    /// SQLite database holding the desired state (default `gateway.sqlite`).
    pub db_path: PathBuf,
    /// Directory of service definitions (default `services.d`).
    pub services_dir: PathBuf,
    /// OSB basic-auth user name; required.
    pub username: String,
    /// OSB basic-auth password; required. Never printed.
    pub password: String,
    /// gRPC URL of the allocator (default `http://127.0.0.1:50051`).
    pub allocator_url: String,
    /// gRPC URLs of nodes to poll with `Describe`, in addition to nodes that
    /// announce themselves.
    pub nodes: Vec<String>,
    /// A node not heard from for this long is considered down.
    pub node_timeout_ms: u64,
    /// How often nodes are asked to announce themselves (and how often the
    /// static `nodes` are polled).
    pub announce_interval_ms: u64,
    /// How long a request without `accepts_incomplete=true` waits for its
    /// operation before answering 503 (the operation goes on).
    pub sync_timeout_ms: u64,
    /// Largest accepted request body; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Deadline of an operation whose plan sets no `maximum_polling_duration`.
    pub default_max_polling_duration_s: u64,
    /// Time between two reconciliation passes, in which every live node's
    /// `ListInstances` is compared with the desired state (default 30000).
    pub reconcile_interval_ms: u64,
    /// How long something on a node that no instance owns is left alone
    /// before the reconciler removes it (default 300000).
    pub orphan_grace_ms: u64,
    /// Shared bearer token: required on every call to the Registry but
    /// health, and sent on every call to the allocator and the nodes.
    /// Unset: nothing is authenticated. Never printed.
    pub token: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            // Loopback by default: exposing the broker is an explicit decision.
            http_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            grpc_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 50050)),
            db_path: PathBuf::from("gateway.sqlite"),
            services_dir: PathBuf::from("services.d"),
            username: String::new(),
            password: String::new(),
            allocator_url: "http://127.0.0.1:50051".to_owned(),
            nodes: Vec::new(),
            node_timeout_ms: 15_000,
            announce_interval_ms: 5_000,
            sync_timeout_ms: 60_000,
            max_body_bytes: 1024 * 1024,
            default_max_polling_duration_s: 900,
            reconcile_interval_ms: 30_000,
            orphan_grace_ms: 300_000,
            token: None,
        }
    }
}

// The password must never reach a log line, so Debug is written by hand.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("http_listen", &self.http_listen)
            .field("grpc_listen", &self.grpc_listen)
            .field("db_path", &self.db_path)
            .field("services_dir", &self.services_dir)
            .field("username", &self.username)
            .field(
                "password",
                &if self.password.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("allocator_url", &self.allocator_url)
            .field("nodes", &self.nodes)
            .field("node_timeout_ms", &self.node_timeout_ms)
            .field("announce_interval_ms", &self.announce_interval_ms)
            .field("sync_timeout_ms", &self.sync_timeout_ms)
            .field("max_body_bytes", &self.max_body_bytes)
            .field(
                "default_max_polling_duration_s",
                &self.default_max_polling_duration_s,
            )
            .field("reconcile_interval_ms", &self.reconcile_interval_ms)
            .field("orphan_grace_ms", &self.orphan_grace_ms)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Config {
    /// Checks what serde cannot. Call it again after applying CLI flags.
    /// Missing credentials are not checked here (see
    /// [`Config::require_credentials`]) so that a config file may leave
    /// them to the environment.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_owned(),
            })
        };
        if self.db_path.as_os_str().is_empty() {
            return invalid("db_path", "must not be empty");
        }
        if self.services_dir.as_os_str().is_empty() {
            return invalid("services_dir", "must not be empty");
        }
        if !is_http_url(&self.allocator_url) {
            return invalid("allocator_url", "must be an http:// or https:// URL");
        }
        if self.nodes.iter().any(|n| !is_http_url(n)) {
            return invalid("nodes", "every entry must be an http:// or https:// URL");
        }
        if self.node_timeout_ms == 0 {
            return invalid("node_timeout_ms", "must be greater than 0");
        }
        if self.announce_interval_ms == 0 || self.announce_interval_ms > u64::from(u32::MAX) {
            return invalid("announce_interval_ms", "must be between 1 and 4294967295");
        }
        if self.announce_interval_ms >= self.node_timeout_ms {
            return invalid(
                "announce_interval_ms",
                "must be smaller than node_timeout_ms, or live nodes would be declared down",
            );
        }
        if self.sync_timeout_ms == 0 {
            return invalid("sync_timeout_ms", "must be greater than 0");
        }
        if self.max_body_bytes == 0 {
            return invalid("max_body_bytes", "must be greater than 0");
        }
        if self.default_max_polling_duration_s == 0 {
            return invalid("default_max_polling_duration_s", "must be greater than 0");
        }
        if self.reconcile_interval_ms == 0 {
            return invalid("reconcile_interval_ms", "must be greater than 0");
        }
        if self.token.as_deref() == Some("") {
            return invalid(
                "token",
                "must not be empty (leave it unset to run without one)",
            );
        }
        Ok(())
    }

    /// Fails unless both OSB basic-auth credentials are set: a broker
    /// without authentication would hand out credentials to anyone.
    pub fn require_credentials(&self) -> Result<(), ConfigError> {
        if self.username.is_empty() || self.password.is_empty() {
            return Err(ConfigError::Invalid {
                key: "username",
                message: format!(
                    "username and password are required (config keys username/password or \
                     {ENV_USERNAME}/{ENV_PASSWORD})"
                ),
            });
        }
        if self.username.contains(':') {
            return Err(ConfigError::Invalid {
                key: "username",
                message: "must not contain ':' (HTTP basic authentication)".into(),
            });
        }
        Ok(())
    }

    /// Returns [`Config::node_timeout_ms`] as a duration.
    pub fn node_timeout(&self) -> Duration {
        Duration::from_millis(self.node_timeout_ms)
    }

    /// Returns [`Config::announce_interval_ms`] as a duration.
    pub fn announce_interval(&self) -> Duration {
        Duration::from_millis(self.announce_interval_ms)
    }

    /// Returns the reconciler's settings.
    pub fn reconcile_settings(&self) -> crate::engine::ReconcileSettings {
        crate::engine::ReconcileSettings {
            interval: Duration::from_millis(self.reconcile_interval_ms),
            orphan_grace: Duration::from_millis(self.orphan_grace_ms),
        }
    }

    /// Returns [`Config::sync_timeout_ms`] as a duration.
    pub fn sync_timeout(&self) -> Duration {
        Duration::from_millis(self.sync_timeout_ms)
    }
}

fn is_http_url(s: &str) -> bool {
    (s.starts_with("http://") || s.starts_with("https://")) && s.parse::<http::Uri>().is_ok()
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file is not valid YAML for [`Config`]; serde_yaml's message names
    /// the key, `line` and `column` locate it.
    #[error("{}: {message}", location(path, *line, *column))]
    Parse {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the error, when known.
        line: Option<usize>,
        /// 1-based column of the error, when known.
        column: Option<usize>,
        /// What is wrong, naming the key.
        message: String,
    },
    /// An environment variable has an unusable value.
    #[error("environment variable {name}: {message}")]
    Env {
        /// The variable.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A setting has an unusable value.
    #[error("config key {key}: {message}")]
    Invalid {
        /// The config key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn location(path: &Path, line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{}:{l}:{c}", path.display()),
        (Some(l), None) => format!("{}:{l}", path.display()),
        _ => path.display().to_string(),
    }
}

/// Loads the configuration: defaults, then the YAML file at `path` (if
/// any), then the environment ([`ENV_USERNAME`], [`ENV_PASSWORD`],
/// [`ENV_HTTP`], [`ENV_GRPC`], [`ENV_ALLOCATOR_URL`], [`ENV_DB`],
/// [`ENV_SERVICES_DIR`], [`ENV_NODES`], [`ENV_TOKEN`]; empty values are ignored).
///
/// Missing credentials are not an error here; the binary checks them with
/// [`Config::require_credentials`] after applying its flags.
pub fn load_config(path: Option<&Path>) -> Result<Config, ConfigError> {
    load_config_with(path, |name| match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(ConfigError::Env {
            name,
            message: "not valid UTF-8".into(),
        }),
    })
}

/// [`load_config`] with the environment passed in, so that tests need not
/// mutate the process environment (unsafe with threads).
pub fn load_config_with(
    path: Option<&Path>,
    env: impl Fn(&'static str) -> Result<Option<String>, ConfigError>,
) -> Result<Config, ConfigError> {
    let mut config = match path {
        Some(path) => parse_file(path)?,
        None => Config::default(),
    };
    let get = |name| Ok::<_, ConfigError>(env(name)?.filter(|v: &String| !v.is_empty()));
    let addr = |name: &'static str, v: String| {
        v.parse::<SocketAddr>().map_err(|e| ConfigError::Env {
            name,
            message: format!("invalid socket address {v:?}: {e}"),
        })
    };
    if let Some(v) = get(ENV_USERNAME)? {
        config.username = v;
    }
    if let Some(v) = get(ENV_PASSWORD)? {
        config.password = v;
    }
    if let Some(v) = get(ENV_HTTP)? {
        config.http_listen = addr(ENV_HTTP, v)?;
    }
    if let Some(v) = get(ENV_GRPC)? {
        config.grpc_listen = addr(ENV_GRPC, v)?;
    }
    if let Some(v) = get(ENV_ALLOCATOR_URL)? {
        config.allocator_url = v;
    }
    if let Some(v) = get(ENV_DB)? {
        config.db_path = PathBuf::from(v);
    }
    if let Some(v) = get(ENV_SERVICES_DIR)? {
        config.services_dir = PathBuf::from(v);
    }
    if let Some(v) = get(ENV_TOKEN)? {
        config.token = Some(v);
    }
    if let Some(v) = get(ENV_NODES)? {
        config.nodes = v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
    }
    config.validate()?;
    Ok(config)
}

fn parse_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // An empty (or comment-only) file means "all defaults"; serde_yaml
    // would reject it as a missing document.
    let is_blank = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    if is_blank {
        return Ok(Config::default());
    }
    serde_yaml::from_str(&text).map_err(|e| {
        let loc = e.location();
        ConfigError::Parse {
            path: path.to_path_buf(),
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
            message: e.to_string(),
        }
    })
}
