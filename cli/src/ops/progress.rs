//! What an operator sees while an asynchronous operation runs, always on
//! stderr (stdout is for results): a spinner line redrawn in place when
//! stderr is a terminal, plain lines (one per change of state) when it is
//! not, and nothing but the outcome with `--json` on a non-terminal.

use std::io::{IsTerminal as _, Write as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

enum Mode {
    /// Redrawn in place by a ticker task.
    Spinner {
        state: Arc<Mutex<String>>,
        ticker: JoinHandle<()>,
    },
    /// One line per change.
    Plain { last: String },
    /// Nothing (machine output to a pipe).
    Quiet,
}

/// The progress display of one operation.
pub struct Progress {
    label: String,
    mode: Mode,
}

impl Progress {
    /// Starts showing `label` (e.g. "Creating service mysearch1").
    pub fn start(label: &str, json: bool) -> Progress {
        let label = sanitize(label);
        let mode = if std::io::stderr().is_terminal() {
            let state = Arc::new(Mutex::new(String::from("starting")));
            let ticker = tokio::spawn(spin(label.clone(), Arc::clone(&state)));
            Mode::Spinner { state, ticker }
        } else if json {
            Mode::Quiet
        } else {
            eprintln!("{label} ...");
            Mode::Plain {
                last: String::new(),
            }
        };
        Progress { label, mode }
    }

    /// Shows the operation's current state (its OSB `description`).
    pub fn update(&mut self, state: &str) {
        let state = sanitize(state);
        match &mut self.mode {
            Mode::Spinner { state: s, .. } => {
                if let Ok(mut s) = s.lock() {
                    *s = state;
                }
            }
            Mode::Plain { last } => {
                if *last != state {
                    eprintln!("{}: {state}", self.label);
                    *last = state;
                }
            }
            Mode::Quiet => {}
        }
    }

    /// Ends the display with `outcome` ("OK", "FAILED"), as the seed's
    /// "Creating Service: OK".
    pub fn finish(mut self, outcome: &str) {
        match std::mem::replace(&mut self.mode, Mode::Quiet) {
            Mode::Spinner { ticker, .. } => {
                ticker.abort();
                eprint!("\r\x1b[2K");
                eprintln!("{}: {outcome}", self.label);
            }
            Mode::Plain { .. } => eprintln!("{}: {outcome}", self.label),
            Mode::Quiet => {}
        }
    }

    /// Ends the display with "OK" or "FAILED" after `result`, passing it on.
    pub fn conclude<T, E>(self, result: Result<T, E>) -> Result<T, E> {
        self.finish(if result.is_ok() { "OK" } else { "FAILED" });
        result
    }
}

impl Drop for Progress {
    /// A display dropped without an outcome (an early error) stops its
    /// spinner and clears its line, so the error message stands alone.
    fn drop(&mut self) {
        if let Mode::Spinner { ticker, .. } = &self.mode {
            ticker.abort();
            eprint!("\r\x1b[2K");
        }
    }
}

async fn spin(label: String, state: Arc<Mutex<String>>) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for frame in FRAMES.iter().cycle() {
        tick.tick().await;
        let state = state.lock().map(|s| s.clone()).unwrap_or_default();
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K{frame} {label}: {state} ({}s)",
            started.elapsed().as_secs()
        );
        let _ = err.flush();
    }
}

/// Drops control characters: text from the broker must not move the
/// cursor or change the terminal.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_dropped() {
        assert_eq!(sanitize("a\u{1b}[2Jb\nc"), "a [2Jb c");
    }
}
