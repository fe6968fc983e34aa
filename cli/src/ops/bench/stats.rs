//! Latency samples and error counts, shared by the bench's clients.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

/// p50/p99/max of one kind of call, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    /// Summarises `samples` (any order); `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        Some(Summary {
            count: ms.len(),
            p50_ms: percentile(&ms, 50.0),
            p99_ms: percentile(&ms, 99.0),
            max_ms: ms[ms.len() - 1],
        })
    }

    pub fn to_json(self) -> Value {
        json!({
            "count": self.count,
            "p50_ms": round(self.p50_ms),
            "p99_ms": round(self.p99_ms),
            "max_ms": round(self.max_ms),
        })
    }
}

/// Nearest-rank percentile of sorted values: the smallest value with at
/// least `p` percent of the samples at or below it.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Rounds to 0.01, so that JSON and tables show no float noise.
pub fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// What the clients measured: latencies per call kind, errors by call
/// kind and status, completed lifecycles.
#[derive(Debug, Default)]
pub struct Recorder {
    inner: Mutex<Recorded>,
}

#[derive(Debug, Default, Clone)]
pub struct Recorded {
    pub latencies: BTreeMap<&'static str, Vec<Duration>>,
    /// "provision 503", "bind transport", ... -> count.
    pub errors: BTreeMap<String, u64>,
    pub lifecycles: u64,
}

impl Recorder {
    pub fn call(&self, kind: &'static str, took: Duration) {
        if let Ok(mut r) = self.inner.lock() {
            r.latencies.entry(kind).or_default().push(took);
        }
    }

    /// An unexpected answer (`status` an HTTP status, or "transport",
    /// "failed" for an operation that ended failed).
    pub fn error(&self, kind: &str, status: &str) {
        if let Ok(mut r) = self.inner.lock() {
            *r.errors.entry(format!("{kind} {status}")).or_default() += 1;
        }
    }

    pub fn lifecycle(&self) {
        if let Ok(mut r) = self.inner.lock() {
            r.lifecycles += 1;
        }
    }

    pub fn snapshot(&self) -> Recorded {
        self.inner.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Recorded {
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn summary(&self, kind: &str) -> Option<Summary> {
        self.latencies.get(kind).and_then(|v| Summary::of(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Summary::of(&samples).unwrap();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_ms, 50.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.max_ms, 100.0);
        let one = Summary::of(&[Duration::from_millis(7)]).unwrap();
        assert_eq!((one.p50_ms, one.p99_ms, one.max_ms), (7.0, 7.0, 7.0));
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn errors_are_counted_by_kind_and_status() {
        let r = Recorder::default();
        r.error("provision", "503");
        r.error("provision", "503");
        r.error("bind", "transport");
        let s = r.snapshot();
        assert_eq!(s.errors["provision 503"], 2);
        assert_eq!(s.error_total(), 3);
    }
}
