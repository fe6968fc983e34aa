//! Allocator configuration: YAML file, then environment, then CLI flags.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment variable overriding [`Config::listen`].
pub const ENV_LISTEN: &str = "SVCBROKER_ALLOCATOR_LISTEN";
/// Environment variable overriding [`Config::db_path`].
pub const ENV_DB: &str = "SVCBROKER_ALLOCATOR_DB";

/// Environment variable overriding [`Config::token`].
pub use svcbroker_proto::auth::ENV_TOKEN;

/// Allocator settings. `Debug` is written by hand: `token` is a secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the `allocator` binary binds its gRPC server to
    /// (default `127.0.0.1:50051`). [`crate::run`] ignores it: the caller
    /// binds and passes the listener.
    pub listen: SocketAddr,
    /// SQLite database file holding leases and passwords (default
    /// `allocator.sqlite`); created with mode 0600.
    pub db_path: PathBuf,
    /// Shared bearer token every gRPC call but health must carry; calls are
    /// not authenticated when unset. Never logged.
    pub token: Option<String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("db_path", &self.db_path)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            // Loopback: the allocator hands out passwords, so exposing it is
            // an explicit decision.
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 50051)),
            db_path: PathBuf::from("allocator.sqlite"),
            token: None,
        }
    }
}

impl Config {
    /// Checks what serde cannot: currently that `db_path` is not empty.
    /// Call it again after applying CLI flags.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.db_path.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "db_path",
                message: "must not be empty".into(),
            });
        }
        if self.token.as_deref() == Some("") {
            return Err(ConfigError::Invalid {
                key: "token",
                message: "must not be empty (leave it unset to run without one)".into(),
            });
        }
        Ok(())
    }
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
    #[error("{key}: {message}")]
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
/// any), then [`ENV_LISTEN`], [`ENV_DB`] and [`ENV_TOKEN`] (empty values are ignored).
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
fn load_config_with(
    path: Option<&Path>,
    env: impl Fn(&'static str) -> Result<Option<String>, ConfigError>,
) -> Result<Config, ConfigError> {
    let mut config = match path {
        Some(path) => parse_file(path)?,
        None => Config::default(),
    };
    if let Some(v) = env(ENV_LISTEN)?.filter(|v| !v.is_empty()) {
        config.listen = v.parse().map_err(|e| ConfigError::Env {
            name: ENV_LISTEN,
            message: format!("invalid socket address {v:?}: {e}"),
        })?;
    }
    if let Some(v) = env(ENV_DB)?.filter(|v| !v.is_empty()) {
        config.db_path = PathBuf::from(v);
    }
    if let Some(v) = env(ENV_TOKEN)?.filter(|v| !v.is_empty()) {
        config.token = Some(v);
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
        let mut message = e.to_string();
        // serde_yaml appends the location, which `ConfigError` already
        // puts up front as file:line:column.
        if let Some(l) = &loc {
            let suffix = format!(" at line {} column {}", l.line(), l.column());
            if let Some(m) = message.strip_suffix(&suffix) {
                message = m.to_owned();
            }
        }
        ConfigError::Parse {
            path: path.to_path_buf(),
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
            message,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    fn no_env(_: &'static str) -> Result<Option<String>, ConfigError> {
        Ok(None)
    }

    #[test]
    fn defaults_without_file_or_env() {
        assert_eq!(load_config_with(None, no_env).unwrap(), Config::default());
        assert_eq!(Config::default().listen.to_string(), "127.0.0.1:50051");
    }

    #[test]
    fn file_then_env() {
        let f = write("listen: 0.0.0.0:6000\ndb_path: /var/lib/a.sqlite\n");
        let c = load_config_with(Some(f.path()), no_env).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:6000");
        assert_eq!(c.db_path, PathBuf::from("/var/lib/a.sqlite"));

        let c = load_config_with(Some(f.path()), |name| {
            Ok(match name {
                ENV_LISTEN => Some("127.0.0.1:7000".into()),
                ENV_DB => Some("b.sqlite".into()),
                _ => None,
            })
        })
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(c.db_path, PathBuf::from("b.sqlite"));
    }

    #[test]
    fn blank_file_is_defaults() {
        let f = write("# nothing yet\n\n");
        assert_eq!(
            load_config_with(Some(f.path()), no_env).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let f = write("listen: 127.0.0.1:1\ndb_pth: x\n");
        let err = load_config_with(Some(f.path()), no_env).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("{}:2:", f.path().display())),
            "{msg}"
        );
        assert!(msg.contains("db_pth"), "{msg}");
    }

    #[test]
    fn bad_value_names_key_and_line() {
        let f = write("db_path: a\nlisten: nowhere\n");
        let msg = load_config_with(Some(f.path()), no_env)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with(&format!("{}:2:", f.path().display())),
            "{msg}"
        );
        assert!(msg.contains("listen"), "{msg}");
    }

    #[test]
    fn bad_env_names_variable() {
        let err = load_config_with(None, |name| {
            Ok((name == ENV_LISTEN).then(|| "nowhere".into()))
        })
        .unwrap_err();
        assert!(err.to_string().contains(ENV_LISTEN), "{err}");
    }

    #[test]
    fn token_from_env_and_redacted() {
        let c = load_config_with(None, |name| {
            Ok((name == ENV_TOKEN).then(|| "s3cr3t-token".into()))
        })
        .unwrap();
        assert_eq!(c.token.as_deref(), Some("s3cr3t-token"));
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
    }

    #[test]
    fn empty_db_path_rejected() {
        let f = write("db_path: ''\n");
        let err = load_config_with(Some(f.path()), no_env).unwrap_err();
        assert!(err.to_string().contains("db_path"), "{err}");
    }
}
