//! Node configuration: YAML file, then environment variables; `main.rs`
//! applies command-line flags on top.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Configuration of one node agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the NodeAgent gRPC server listens on.
    pub listen: SocketAddr,
    /// Stable id of this node, chosen by its operator.
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
            self.node_id = v;
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
        Ok(())
    }

    /// Validates the values and makes `data_dir` and `services_dir`
    /// absolute; called by [`load_config`] and again by `main` after flags.
    pub fn finish(&mut self) -> Result<(), ConfigError> {
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
        self.data_dir = absolute(&self.data_dir, "data_dir")?;
        self.services_dir = absolute(&self.services_dir, "services_dir")?;
        Ok(())
    }
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
    fn bad_env_is_an_error() {
        let mut c = Config::default();
        let err = c
            .apply_env(|k| (k == "SVCBROKER_NODE_LISTEN").then(|| "nope".into()))
            .unwrap_err();
        assert!(err.to_string().contains("SVCBROKER_NODE_LISTEN"));
    }
}
