//! The log set-up every svcbroker binary shares, so that what keeps
//! secrets out of the logs holds in each of them, `svcbroker up` (which
//! holds all three services in one process) included.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Standard output (the services).
    Stdout,
    /// Standard error (the CLI, whose stdout is for its answers).
    Stderr,
}

/// The filter for a `RUST_LOG` value (`None`: unset or invalid, `info`).
///
/// tokio-postgres logs statement texts and parameters at debug level, and a
/// binding's `CREATE/ALTER ROLE` carries its password verifier: that crate
/// is capped at `info` whatever `RUST_LOG` says.
pub fn filter(rust_log: Option<&str>) -> EnvFilter {
    rust_log
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new("info"))
        .add_directive("tokio_postgres=info".parse().expect("static directive"))
}

/// Installs the global subscriber: [`filter`] of `RUST_LOG`, plain text,
/// colours only when the output is a terminal (a log file, journald or
/// `docker logs` gets no escape codes).
pub fn init(output: Output) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let builder = tracing_subscriber::fmt().with_env_filter(filter(rust_log.as_deref()));
    match output {
        Output::Stdout => builder.with_ansi(std::io::stdout().is_terminal()).init(),
        Output::Stderr => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged_with(rust_log: Option<&str>) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter(rust_log))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "tokio_postgres::query", "PASSWORD 'SCRAM-SHA-256$verifier'");
            tracing::info!(target: "tokio_postgres::connection", "connection notice");
            tracing::debug!(target: "svcbroker_node::engine", "a node detail");
            tracing::info!(target: "svcbroker_node::engine", "a node event");
        });
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn tokio_postgres_statements_stay_out_whatever_rust_log_says() {
        for rust_log in [
            Some("debug"),
            Some("trace"),
            Some("tokio_postgres=trace"),
            Some("info,tokio_postgres=debug"),
        ] {
            let out = logged_with(rust_log);
            assert!(!out.contains("SCRAM"), "{rust_log:?}: {out}");
            assert!(out.contains("connection notice"), "{rust_log:?}: {out}");
        }
        assert!(logged_with(Some("debug")).contains("a node detail"));
    }

    #[test]
    fn unset_or_invalid_rust_log_means_info() {
        for rust_log in [None, Some("not a =[filter")] {
            let out = logged_with(rust_log);
            assert!(out.contains("a node event"), "{out}");
            assert!(!out.contains("a node detail"), "{out}");
        }
    }
}
