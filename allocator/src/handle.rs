//! Runs a [`Store`] on a dedicated thread so that SQLite's blocking calls
//! (fsync on every commit) never stall the async runtime.
//!
//! One thread owns the only connection and takes jobs from a channel in
//! order. That serialises writes inside the process, which SQLite would do
//! anyway, without any lock contention or `SQLITE_BUSY` between tasks.
//!
//! Commits are grouped: the thread runs every job already queued, syncs the
//! WAL once ([`Store::sync`]), and only then answers them, so concurrent
//! requests share one fsync and none is answered before its commit is on
//! disk.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;

use tokio::sync::{mpsc, oneshot};

use crate::{Error, Store};

/// Jobs waiting for the store thread. Bounded so that a flood of requests
/// waits in the callers (applying backpressure) instead of growing memory.
const QUEUE_DEPTH: usize = 256;

/// Most jobs run between two syncs.
const MAX_BATCH: usize = 256;

/// A job runs on the store thread and hands back the delivery of its
/// result, which waits until the batch's commits are synced.
type Job = Box<dyn FnOnce(&mut Store) -> Deliver + Send>;
type Deliver = Box<dyn FnOnce() + Send>;

enum Message {
    Job(Job),
    /// Close the database and acknowledge once it is closed.
    Close(oneshot::Sender<()>),
}

/// A cloneable async handle to a [`Store`] owned by its own thread.
#[derive(Clone, Debug)]
pub struct StoreHandle {
    tx: mpsc::Sender<Message>,
}

impl StoreHandle {
    /// Starts the store thread and opens the database at `path` on it.
    /// Returns once the database is open (or failed to open).
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self, Error> {
        let path = path.into();
        let (tx, mut rx) = mpsc::channel::<Message>(QUEUE_DEPTH);
        let (ready_tx, ready_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("allocator-store".into())
            .spawn(move || {
                let mut store = match Store::open(&path) {
                    Ok(store) => {
                        let _ = ready_tx.send(Ok(()));
                        store
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Some(first) = rx.blocking_recv() {
                    if let Some(ack) = run_batch(&mut store, first, &mut rx) {
                        drop(store);
                        if let Some(ack) = ack {
                            let _ = ack.send(());
                        }
                        return;
                    }
                }
            })
            .map_err(Error::Spawn)?;
        ready_rx.await.map_err(|_| Error::Unavailable)??;
        Ok(Self { tx })
    }

    /// Runs `f` on the store thread and returns its result.
    ///
    /// Fails with [`Error::Unavailable`] once the store is closed.
    pub async fn call<R, F>(&self, f: F) -> Result<R, Error>
    where
        F: FnOnce(&mut Store) -> Result<R, Error> + Send + 'static,
        R: Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel();
        let job: Job = Box::new(move |store| {
            let result = f(store);
            Box::new(move || {
                // The caller may have gone (request cancelled); the work is
                // committed regardless, which is fine since every call is
                // idempotent.
                let _ = reply_tx.send(result);
            })
        });
        self.tx
            .send(Message::Job(job))
            .await
            .map_err(|_| Error::Unavailable)?;
        reply_rx.await.map_err(|_| Error::Unavailable)?
    }

    /// Finishes the jobs queued before this call, closes the database and
    /// stops the thread, so that the file can be reopened at once. Later
    /// calls on any clone fail with [`Error::Unavailable`].
    pub async fn close(&self) {
        let (ack_tx, ack_rx) = oneshot::channel();
        if self.tx.send(Message::Close(ack_tx)).await.is_ok() {
            let _ = ack_rx.await;
        }
    }
}

/// Runs `first` and the jobs queued behind it, syncs once if any of them
/// changed something, then delivers their results. Returns `Some` when
/// the thread must stop: asked to (with the acknowledgement to send once
/// the database is closed), or the sync failed (after a failed fsync what
/// is on disk is unknown, so the results are dropped, their callers get
/// UNAVAILABLE, and the store serves nothing more).
fn run_batch(
    store: &mut Store,
    first: Message,
    rx: &mut mpsc::Receiver<Message>,
) -> Option<Option<oneshot::Sender<()>>> {
    let before = store.total_changes();
    let mut deliveries: Vec<Deliver> = Vec::new();
    let mut stop = None;
    let mut next = Some(first);
    while let Some(message) = next.take() {
        match message {
            Message::Job(job) => {
                // A panicking job drops its transaction (rolled back) and
                // its reply sender (the caller gets UNAVAILABLE); the store
                // keeps serving others.
                match std::panic::catch_unwind(AssertUnwindSafe(|| job(store))) {
                    Ok(deliver) => deliveries.push(deliver),
                    Err(_) => tracing::error!("store job panicked"),
                }
            }
            Message::Close(ack) => {
                stop = Some(Some(ack));
                break;
            }
        }
        if deliveries.len() < MAX_BATCH {
            next = rx.try_recv().ok();
        }
    }
    if store.total_changes() != before
        && let Err(e) = store.sync()
    {
        tracing::error!(error = %e, "the allocator store stops");
        return Some(stop.flatten());
    }
    for deliver in deliveries {
        deliver();
    }
    stop
}
