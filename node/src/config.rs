//! Node configuration: YAML file, then environment variables; `main.rs`
//! applies command-line flags on top.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Configuration of one node agent.
///
/// `Debug` is written by hand: `postgres_url` carries the database server's
/// admin password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the NodeAgent gRPC server listens on.
    pub listen: SocketAddr,
    /// Stable id of this node, chosen by its operator; `"auto"` (or an
    /// empty `SVCBROKER_NODE_ID`) means the host name, so that containers
    /// scaled from one compose service, which share their environment,
    /// still get distinct ids.
    pub node_id: String,
    /// Directory holding one sub-directory per instance; made absolute at load.
    pub data_dir: PathBuf,
    /// Directory of service definitions (`*.yaml`) this node may offer.
    pub services_dir: PathBuf,
    /// How many instances this node accepts in total.
    pub capacity: u32,
    /// Ports instances on this node may be given (inclusive).
    pub port_range: PortRangeConfig,
    /// Host name or address clients use to reach instances on this node.
    pub advertise_host: String,
    /// gRPC URL the gateway reaches this node at; defaults to
    /// `http://<listen address as bound>`.
    pub grpc_url: Option<String>,
    /// gRPC URL of the gateway's Registry to announce to; no announcements
    /// when unset.
    pub gateway_url: Option<String>,
    /// Announce interval used until the gateway answers with its own.
    pub announce_interval_ms: u64,
    /// Default readiness timeout for requests that give 0.
    pub ready_timeout_ms: u64,
    /// How long a stopping daemon gets between SIGTERM and SIGKILL.
    pub stop_grace_ms: u64,
    /// Leaves daemons running when the node stops, so that the next node
    /// process on the same `data_dir` re-adopts them.
    pub keep_instances_on_shutdown: bool,
    /// Address instance daemons listen on, reported to the gateway as
    /// `bind_host`: 127.0.0.1 for a node serving its own host, 0.0.0.0 in a
    /// container whose instances other hosts reach.
    pub bind_host: String,
    /// Admin connection URL of the PostgreSQL server this node manages
    /// databases on (`postgres://user:password@host:port/db`); no database
    /// services without it. Holds a password: never logged.
    pub postgres_url: Option<String>,
    /// Host clients use to reach that server, reported as the node attribute
    /// `postgresql_host`; defaults to the host of `postgres_url`.
    pub postgres_advertise_host: Option<String>,
    /// Size cap of a directory instance whose request gives 0.
    pub directory_default_limit_bytes: u64,
    /// How directory size caps are enforced.
    pub directory_cap: DirectoryCap,
    /// How often the supervised cap measures a directory.
    pub directory_check_interval_ms: u64,
    /// Shared bearer token: required on every NodeAgent call but health,
    /// and sent with every announcement. Unset: nothing is authenticated.
    /// Never logged.
    pub token: Option<String>,
}

/// How the node enforces a directory instance's size cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectoryCap {
    /// `loop` when this host can loop-mount an image, else `supervised`.
    Auto,
    /// A real cap: an ext4 image file of the cap's size loop-mounted on the
    /// directory (needs root and loop devices).
    Loop,
    /// A soft cap: the node measures the directory periodically and makes it
    /// read-only while it is over the cap (root writers are not stopped).
    Supervised,
}

impl std::str::FromStr for DirectoryCap {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DirectoryCap::Auto),
            "loop" => Ok(DirectoryCap::Loop),
            "supervised" => Ok(DirectoryCap::Supervised),
            other => Err(format!(
                "{other:?} is not one of \"auto\", \"loop\", \"supervised\""
            )),
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured without `..`, so a new field cannot be forgotten here.
        let Config {
            listen,
            node_id,
            data_dir,
            services_dir,
            capacity,
            port_range,
            advertise_host,
            grpc_url,
            gateway_url,
            announce_interval_ms,
            ready_timeout_ms,
            stop_grace_ms,
            keep_instances_on_shutdown,
            bind_host,
            postgres_url,
            postgres_advertise_host,
            directory_default_limit_bytes,
            directory_cap,
            directory_check_interval_ms,
            token,
        } = self;
        f.debug_struct("Config")
            .field("listen", listen)
            .field("node_id", node_id)
            .field("data_dir", data_dir)
            .field("services_dir", services_dir)
            .field("capacity", capacity)
            .field("port_range", port_range)
            .field("advertise_host", advertise_host)
            .field("grpc_url", grpc_url)
            .field("gateway_url", gateway_url)
            .field("announce_interval_ms", announce_interval_ms)
            .field("ready_timeout_ms", ready_timeout_ms)
            .field("stop_grace_ms", stop_grace_ms)
            .field("keep_instances_on_shutdown", keep_instances_on_shutdown)
            .field("bind_host", bind_host)
            .field("postgres_url", &postgres_url.as_ref().map(|_| "<redacted>"))
            .field("token", &token.as_ref().map(|_| "<redacted>"))
            .field("postgres_advertise_host", postgres_advertise_host)
            .field(
                "directory_default_limit_bytes",
                directory_default_limit_bytes,
            )
            .field("directory_cap", directory_cap)
            .field("directory_check_interval_ms", directory_check_interval_ms)
            .finish()
    }
}

/// Inclusive port range, as in `svcbroker.v1.PortRange`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRangeConfig {
    /// First port of the range.
    pub start: u16,
    /// Last port of the range (inclusive).
    pub end: u16,
}

impl PortRangeConfig {
    /// Returns true when `port` lies in the range.
    pub fn contains(&self, port: u32) -> bool {
        port >= u32::from(self.start) && port <= u32::from(self.end)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50052)),
            node_id: "node-1".to_owned(),
            data_dir: PathBuf::from("data/node"),
            services_dir: PathBuf::from("services.d"),
            capacity: 100,
            port_range: PortRangeConfig {
                start: 10000,
                end: 10999,
            },
            advertise_host: "127.0.0.1".to_owned(),
            grpc_url: None,
            gateway_url: None,
            announce_interval_ms: 5000,
            ready_timeout_ms: 10_000,
            stop_grace_ms: 5000,
            keep_instances_on_shutdown: false,
            bind_host: "127.0.0.1".to_owned(),
            postgres_url: None,
            postgres_advertise_host: None,
            directory_default_limit_bytes: 100 * 1024 * 1024,
            directory_cap: DirectoryCap::Auto,
            directory_check_interval_ms: 2000,
            token: None,
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML for [`Config`]; `message` names the key.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the error (0 when unknown).
        line: usize,
        /// 1-based column of the error (0 when unknown).
        column: usize,
        /// serde's message, which names the offending key.
        message: String,
    },
    /// An environment variable holds a value that does not parse.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable's name.
        var: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The values parse but do not make sense together.
    #[error("invalid config key {key}: {message}")]
    Invalid {
        /// The offending key.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// Loads the configuration: defaults, then the YAML file at `path` (if any),
/// then the `SVCBROKER_*` environment variables; relative directories are
/// made absolute against the current directory.
pub fn load_config(path: Option<&Path>) -> Result<Config, ConfigError> {
    let mut config = match path {
        Some(path) => parse_file(path)?,
        None => Config::default(),
    };
    config.apply_env(|name| std::env::var(name).ok())?;
    config.finish()?;
    Ok(config)
}

fn parse_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    // An empty file means "all defaults"; serde_yaml would reject it as
    // "EOF while parsing a value".
    if text.trim().is_empty() {
        return Ok(Config::default());
    }
    serde_yaml::from_str(&text).map_err(|err| {
        let (line, column) = err
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            column,
            message: err.to_string(),
        }
    })
}

impl Config {
    /// Applies the environment overrides, reading variables through `get`
    /// (so tests need not touch the process environment).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get("SVCBROKER_NODE_ID") {
            // Empty means "unset": the host name, like "auto".
            self.node_id = if v.is_empty() { AUTO.to_owned() } else { v };
        }
        if let Some(v) = get("SVCBROKER_NODE_LISTEN") {
            self.listen = v.parse().map_err(|e| ConfigError::Env {
                var: "SVCBROKER_NODE_LISTEN",
                message: format!("{v:?}: {e}"),
            })?;
        }
        if let Some(v) = get("SVCBROKER_NODE_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = get("SVCBROKER_SERVICES_DIR") {
            self.services_dir = PathBuf::from(v);
        }
        if let Some(v) = get("SVCBROKER_GATEWAY_GRPC") {
            self.gateway_url = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = get("SVCBROKER_ADVERTISE_HOST") {
            self.advertise_host = v;
        }
        if let Some(v) = get("SVCBROKER_BIND_HOST") {
            self.bind_host = v;
        }
        if let Some(v) = get("SVCBROKER_POSTGRES_URL") {
            self.postgres_url = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = get("SVCBROKER_POSTGRES_ADVERTISE_HOST") {
            self.postgres_advertise_host = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = get(svcbroker_proto::auth::ENV_TOKEN) {
            self.token = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = get("SVCBROKER_DIRECTORY_CAP") {
            self.directory_cap = v.parse().map_err(|message| ConfigError::Env {
                var: "SVCBROKER_DIRECTORY_CAP",
                message,
            })?;
        }
        Ok(())
    }

    /// Validates the values and makes `data_dir` and `services_dir`
    /// absolute; called by [`load_config`] and again by `main` after flags.
    pub fn finish(&mut self) -> Result<(), ConfigError> {
        if self.node_id == AUTO {
            self.node_id = host_name()?;
        }
        if self.node_id.trim().is_empty() {
            return Err(ConfigError::Invalid {
                key: "node_id",
                message: "must not be empty".to_owned(),
            });
        }
        if self.port_range.start == 0 || self.port_range.start > self.port_range.end {
            return Err(ConfigError::Invalid {
                key: "port_range",
                message: format!(
                    "start ({}) must be at least 1 and not above end ({})",
                    self.port_range.start, self.port_range.end
                ),
            });
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "data_dir",
                message: "must not be empty".to_owned(),
            });
        }
        if self.bind_host.trim().is_empty() {
            return Err(ConfigError::Invalid {
                key: "bind_host",
                message: "must not be empty".to_owned(),
            });
        }
        if let Some(url) = &self.postgres_url {
            // The parser's message is kept out: it could quote the URL.
            if url.parse::<tokio_postgres::Config>().is_err() {
                return Err(ConfigError::Invalid {
                    key: "postgres_url",
                    message: "is not a valid postgres:// connection URL".to_owned(),
                });
            }
        }
        if self.directory_default_limit_bytes == 0 {
            return Err(ConfigError::Invalid {
                key: "directory_default_limit_bytes",
                message: "must be above 0".to_owned(),
            });
        }
        if self.directory_check_interval_ms == 0 {
            return Err(ConfigError::Invalid {
                key: "directory_check_interval_ms",
                message: "must be above 0".to_owned(),
            });
        }
        self.data_dir = absolute(&self.data_dir, "data_dir")?;
        self.services_dir = absolute(&self.services_dir, "services_dir")?;
        Ok(())
    }
}

/// The `node_id` value that means "use the host name".
const AUTO: &str = "auto";

fn host_name() -> Result<String, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        key: "node_id",
        message,
    };
    let name = nix::unistd::gethostname()
        .map_err(|e| invalid(format!("\"auto\" needs the host name: {e}")))?;
    let name = name
        .into_string()
        .map_err(|_| invalid("\"auto\": the host name is not UTF-8".to_owned()))?;
    if name.trim().is_empty() {
        return Err(invalid("\"auto\": the host name is empty".to_owned()));
    }
    Ok(name)
}

fn absolute(path: &Path, key: &'static str) -> Result<PathBuf, ConfigError> {
    std::path::absolute(path).map_err(|e| ConfigError::Invalid {
        key,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.yaml");
        std::fs::write(&path, yaml).unwrap();
        parse_file(&path)
    }

    #[test]
    fn defaults_and_partial_file() {
        let c = parse("node_id: n7\nport_range: {start: 20000, end: 20010}\n").unwrap();
        assert_eq!(c.node_id, "n7");
        assert_eq!(c.port_range.end, 20010);
        assert_eq!(c.capacity, 100);
        assert_eq!(c.listen.to_string(), "127.0.0.1:50052");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("node_id: n1\ncapacty: 3\n").unwrap_err().to_string();
        assert!(err.contains("node.yaml:2:"), "{err}");
        assert!(err.contains("capacty"), "{err}");
    }

    #[test]
    fn bad_value_names_key() {
        let err = parse("port_range:\n  start: abc\n  end: 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("start"), "{err}");
        assert!(err.contains(":2:"), "{err}");
    }

    #[test]
    fn env_overrides_and_absolute_dirs() {
        let mut c = Config::default();
        c.apply_env(|k| match k {
            "SVCBROKER_NODE_ID" => Some("env-node".into()),
            "SVCBROKER_NODE_LISTEN" => Some("127.0.0.1:7000".into()),
            "SVCBROKER_GATEWAY_GRPC" => Some("http://127.0.0.1:9".into()),
            _ => None,
        })
        .unwrap();
        c.finish().unwrap();
        assert_eq!(c.node_id, "env-node");
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.gateway_url.as_deref(), Some("http://127.0.0.1:9"));
        assert!(c.data_dir.is_absolute());
        assert!(c.services_dir.is_absolute());
    }

    #[test]
    fn node_id_auto_is_the_host_name() {
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        let mut c = Config::default();
        c.apply_env(|k| (k == "SVCBROKER_NODE_ID").then(String::new))
            .unwrap();
        c.finish().unwrap();
        assert_eq!(c.node_id, host);
        let mut c = parse("node_id: auto\n").unwrap();
        c.finish().unwrap();
        assert_eq!(c.node_id, host);
    }

    #[test]
    fn new_keys_from_file_and_env() {
        let c = parse(
            "bind_host: 0.0.0.0\npostgres_url: postgres://a:b@db:5433/postgres\n\
             directory_cap: supervised\ndirectory_default_limit_bytes: 1024\n",
        )
        .unwrap();
        assert_eq!(c.bind_host, "0.0.0.0");
        assert_eq!(c.directory_cap, DirectoryCap::Supervised);
        assert_eq!(c.directory_default_limit_bytes, 1024);
        let mut c = Config::default();
        assert_eq!(c.bind_host, "127.0.0.1");
        c.apply_env(|k| match k {
            "SVCBROKER_BIND_HOST" => Some("0.0.0.0".into()),
            "SVCBROKER_POSTGRES_URL" => Some("postgres://admin:hunter2@h:5432/postgres".into()),
            "SVCBROKER_DIRECTORY_CAP" => Some("loop".into()),
            _ => None,
        })
        .unwrap();
        c.finish().unwrap();
        assert_eq!(c.bind_host, "0.0.0.0");
        assert_eq!(c.directory_cap, DirectoryCap::Loop);
        assert!(c.postgres_url.is_some());
        let err = Config::default()
            .apply_env(|k| (k == "SVCBROKER_DIRECTORY_CAP").then(|| "quota".into()))
            .unwrap_err();
        assert!(err.to_string().contains("SVCBROKER_DIRECTORY_CAP"), "{err}");
    }

    #[test]
    fn debug_and_errors_hide_the_postgres_password() {
        let mut c = Config {
            postgres_url: Some("postgres://admin:hunter2@h:5432/postgres".into()),
            ..Config::default()
        };
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
        c.postgres_url = Some("postgres://admin:hunter2@h:notaport/postgres".into());
        let err = c.finish().unwrap_err().to_string();
        assert!(
            err.contains("postgres_url") && !err.contains("hunter2"),
            "{err}"
        );
    }

    #[test]
    fn bad_env_is_an_error() {
        let mut c = Config::default();
        let err = c
            .apply_env(|k| (k == "SVCBROKER_NODE_LISTEN").then(|| "nope".into()))
            .unwrap_err();
        assert!(err.to_string().contains("SVCBROKER_NODE_LISTEN"));
    }
}
