//! Bounded polling: tests wait for a condition with a deadline instead of
//! sleeping for a guessed time.

use std::future::Future;
use std::time::{Duration, Instant};

/// Calls `probe` until it returns `Some`, starting at 20 ms between tries
/// and backing off to 250 ms; panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Like [`eventually`] for a plain condition.
pub async fn until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually(what, timeout, || {
        let f = cond();
        async move { f.await.then_some(()) }
    })
    .await
}
