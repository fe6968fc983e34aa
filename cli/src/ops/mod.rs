//! The operator commands (`services`, `create-service`, `service`,
//! `bind-service`, `unbind-service`, `delete-service`, `nodes`,
//! `healthcheck`, `bench`): one module per command, sharing the gateway client, the
//! table printer, the progress display and the error type with its exit
//! codes.

use std::io::Write as _;

use serde_json::{Map, Value};

pub mod bench;
pub mod bind_service;
pub mod client;
pub mod create_service;
pub mod delete_service;
pub mod healthcheck;
pub mod nodes;
pub mod progress;
pub mod service;
pub mod services;
pub mod table;
pub mod unbind_service;

/// Why an operator command failed; each kind has the exit code that
/// `--help` documents, so that scripts can tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The operation ran (or was refused by the broker) and failed: exit 1.
    #[error("{0}")]
    Failed(String),
    /// Bad arguments: exit 2.
    #[error("{0}")]
    Usage(String),
    /// No such service, plan, instance or binding: exit 3.
    #[error("{0}")]
    NotFound(String),
    /// Wrong credentials, or the gateway cannot be reached: exit 4.
    #[error("{0}")]
    Access(String),
}

impl CliError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Failed(_) => 1,
            CliError::Usage(_) => 2,
            CliError::NotFound(_) => 3,
            CliError::Access(_) => 4,
        }
    }
}

/// Prints `value` as pretty JSON on stdout (the only thing `--json` puts
/// there).
pub fn print_json(value: &Value) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Failed(format!("cannot encode output: {e}")))?;
    write_stdout(&format!("{text}\n"))
}

/// Writes to stdout; a closed pipe (e.g. `| head`) is not an error worth a
/// panic.
pub fn write_stdout(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Failed(format!("cannot write output: {e}"))),
    }
}

/// Builds OSB `parameters` from `-c` arguments: `KEY=VALUE` (VALUE as JSON
/// when it parses, so `-c size=3` is a number and `-c tier=gold` a string)
/// or `@FILE` with a JSON object; later arguments win key by key.
pub fn parse_params(args: &[String]) -> Result<Map<String, Value>, CliError> {
    let mut out = Map::new();
    for arg in args {
        if let Some(path) = arg.strip_prefix('@') {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::Usage(format!("-c @{path}: {e}")))?;
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(m)) => out.extend(m),
                Ok(_) => {
                    return Err(CliError::Usage(format!(
                        "-c @{path}: the file must hold a JSON object"
                    )));
                }
                Err(e) => {
                    return Err(CliError::Usage(format!("-c @{path}: not valid JSON: {e}")));
                }
            }
            continue;
        }
        let Some((key, value)) = arg.split_once('=') else {
            return Err(CliError::Usage(format!(
                "-c {arg:?}: expected KEY=VALUE or @FILE"
            )));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(CliError::Usage(format!("-c {arg:?}: the key is empty")));
        }
        let value = serde_json::from_str::<Value>(value)
            .unwrap_or_else(|_| Value::String(value.to_owned()));
        out.insert(key.to_owned(), value);
    }
    Ok(out)
}

/// Checks a name given on the command line (instance or binding): it is
/// shown in tables and sent in the OSB context, so no control characters.
pub fn check_name(what: &str, name: &str) -> Result<(), CliError> {
    if name.trim().is_empty() {
        return Err(CliError::Usage(format!(
            "the {what} name must not be empty"
        )));
    }
    if name.len() > 255 {
        return Err(CliError::Usage(format!(
            "the {what} name must be at most 255 bytes"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(CliError::Usage(format!(
            "the {what} name must not contain control characters"
        )));
    }
    Ok(())
}

/// A string field of a JSON object, or "" when absent or not a string.
pub fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// A scalar as table text: strings bare, other values as JSON, null empty.
pub fn scalar_text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params_from_pairs_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.json");
        std::fs::write(&file, r#"{"a": 1, "b": {"c": true}}"#).unwrap();
        let args = vec![
            "maxmemory=128mb".to_owned(),
            "n=3".to_owned(),
            "flag=true".to_owned(),
            "quoted=\"7\"".to_owned(),
            "eq=a=b".to_owned(),
            format!("@{}", file.display()),
            "a=2".to_owned(),
        ];
        let p = parse_params(&args).unwrap();
        assert_eq!(
            Value::Object(p),
            json!({"maxmemory": "128mb", "n": 3, "flag": true, "quoted": "7",
                   "eq": "a=b", "a": 2, "b": {"c": true}})
        );
    }

    #[test]
    fn bad_params_are_usage_errors() {
        for bad in ["novalue", "=x", "@/nonexistent/file.json"] {
            let e = parse_params(&[bad.to_owned()]).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("list.json");
        std::fs::write(&file, "[1]").unwrap();
        let e = parse_params(&[format!("@{}", file.display())]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("instance", "mysearch1").is_ok());
        assert!(check_name("instance", " ").is_err());
        assert!(check_name("instance", "a\u{1b}[2J").is_err());
        assert!(check_name("instance", &"x".repeat(256)).is_err());
    }
}
