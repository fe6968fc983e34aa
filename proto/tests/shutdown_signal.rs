//! `shutdown_signal` registers its handlers when called, before it is
//! polled: a service creates it before announcing itself ready, and a
//! signal that arrives in between must be a clean stop, not the default
//! action (the process killed by the signal).

use std::time::Duration;

use nix::sys::signal::{Signal, raise};

async fn signal_before_first_poll_is_caught(signal: Signal) {
    let stop = svcbroker_proto::server::shutdown_signal();
    // Sent before the future is first polled; with lazily registered
    // handlers this kills the test process.
    raise(signal).expect("raise");
    tokio::time::timeout(Duration::from_secs(10), stop)
        .await
        .unwrap_or_else(|_| panic!("{signal} sent before the first poll was lost"));
}

#[tokio::test]
async fn sigint_before_the_first_poll_stops_cleanly() {
    signal_before_first_poll_is_caught(Signal::SIGINT).await;
}

#[tokio::test]
async fn sigterm_before_the_first_poll_stops_cleanly() {
    signal_before_first_poll_is_caught(Signal::SIGTERM).await;
}
