//! Shared by the bad-input corpora (`bad_input_corpus.rs`, `grpc_bad_input.rs`):
//! everything the in-process allocator, node and gateway log, and every
//! panic in this test process, captured so that a test can assert that
//! hostile input left no secret in a log line, forged no log line and
//! panicked nothing.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// What the services logged so far (all of this test process).
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// Panics on the services' threads (tokio catches a task's panic, the hook
/// still sees it).
static PANICS: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: OnceLock<()> = OnceLock::new();

/// A log line an input tries to forge by smuggling a newline into a logged
/// value; no line of the log may start with it.
pub const FORGED: &str = "FORGED-LOG-LINE";

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber (debug for svcbroker's crates, so that
/// secrets cannot hide in a debug line) and the panic counter. Call before
/// `Stack::start`, whose own `init_tracing` then leaves this one in place.
pub fn capture() {
    INSTALLED.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::new(
            "info,svcbroker_gateway=debug,svcbroker_node=debug,svcbroker_allocator=debug,svcbroker_proto=debug",
        );
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(|| Capture)
            .try_init()
            .expect("the capturing subscriber is the first one in this process");
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if is_service_thread(std::thread::current().name()) {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// True for the threads the in-process services run on: the stack's
/// runtime (tasks, blocking pool) and the SQLite store threads. A failing
/// test's own panic (under `cargo test`, other tests share the process) is
/// not the services'.
fn is_service_thread(name: Option<&str>) -> bool {
    name.is_some_and(|n| n.starts_with("stack-") || n.ends_with("-store"))
}

/// Everything logged so far.
pub fn log_text() -> String {
    String::from_utf8_lossy(&LOG.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

/// Asserts that nothing panicked, that no secret reached the log and that
/// no input forged a log line.
pub fn assert_log_clean(secrets: &[String]) {
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "a panic happened (see the output above)"
    );
    let log = log_text();
    assert!(
        !log.is_empty(),
        "nothing was captured: the capture is broken"
    );
    for s in secrets {
        assert!(
            !log.contains(s.as_str()),
            "a secret ({} characters) is in the services' log",
            s.len()
        );
    }
    for line in log.lines() {
        assert!(
            !line.trim_start().starts_with(FORGED),
            "an input forged a log line: {line:?}"
        );
    }
    // A huge value echoed into one line floods the log (ordinary lines are
    // a few hundred bytes).
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(
        longest <= 4 * 1024,
        "a log line is {longest} bytes long: some input is logged unbounded"
    );
}

/// Asserts that an answer carries none of `secrets`.
#[track_caller]
pub fn assert_no_secret(what: &str, text: &str, secrets: &[String]) {
    for s in secrets {
        assert!(
            !text.contains(s.as_str()),
            "{what}: the answer carries a secret ({} characters)",
            s.len()
        );
    }
}
