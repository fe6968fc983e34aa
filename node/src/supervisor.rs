//! One task per daemon: it waits for the daemon to exit, restarts it with
//! exponential backoff, gives up after repeated failures, and stops it on
//! request.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use svcbroker_proto::v1::InstanceState;
use tokio::process::Child;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::meta::{self, InstanceMeta};
use crate::process::{self, Readiness, Spawned};
use crate::procfs;
use crate::spec::RunSpec;

/// Failed starts within [`FAILURE_WINDOW`] after which the node gives up.
const MAX_FAILURES: usize = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often an adopted daemon (not our child, so no exit notification) is
/// checked.
const ADOPTED_POLL: Duration = Duration::from_millis(250);

/// What ListInstances shows about a daemon.
#[derive(Debug, Clone)]
pub(crate) struct ProcStatus {
    pub pid: u32,
    pub state: InstanceState,
    pub message: String,
}

/// Fixed facts a supervisor needs to (re)start its daemon.
pub(crate) struct Params {
    pub dir: PathBuf,
    pub port: u32,
    /// Where the readiness probe connects (see [`process::probe_ip`]).
    pub probe: std::net::IpAddr,
    pub grace: Duration,
    pub ready_default: Duration,
    /// Rewritten with the new pid and start time at each restart.
    pub meta: InstanceMeta,
}

/// Handle on the supervision task of one daemon.
pub(crate) struct Supervisor {
    params: Params,
    status: Mutex<ProcStatus>,
    /// `None` for a daemon adopted after a node restart until the gateway
    /// provisions it again: the node keeps no copy of argv, env or files
    /// (the latter may hold passwords), so it cannot restart it before.
    spec: Mutex<Option<RunSpec>>,
    stop_tx: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// The daemon the task currently watches.
enum Current {
    /// Started by this node process: `wait()` reports its exit.
    Child(Child, u32),
    /// Adopted after a node restart: only `/proc` tells when it is gone.
    Foreign { pid: u32, start_time: u64 },
}

impl Supervisor {
    /// Supervises a daemon this node just started and saw become ready.
    pub fn start_owned(params: Params, spec: RunSpec, spawned: Spawned) -> Arc<Self> {
        let pid = spawned.pid;
        Self::launch(params, Some(spec), pid, Current::Child(spawned.child, pid))
    }

    /// Supervises a daemon a previous node process started (verified by
    /// pid and start time).
    pub fn adopt(params: Params, spec: Option<RunSpec>, pid: u32, start_time: u64) -> Arc<Self> {
        Self::launch(params, spec, pid, Current::Foreign { pid, start_time })
    }

    fn launch(params: Params, spec: Option<RunSpec>, pid: u32, current: Current) -> Arc<Self> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let sup = Arc::new(Supervisor {
            params,
            status: Mutex::new(ProcStatus {
                pid,
                state: InstanceState::Running,
                message: String::new(),
            }),
            spec: Mutex::new(spec),
            stop_tx,
            task: Mutex::new(None),
        });
        let task = tokio::spawn(sup.clone().supervise(current, stop_rx));
        *sup.task.lock().unwrap() = Some(task);
        sup
    }

    /// The daemon's current pid, state and detail.
    pub fn status(&self) -> ProcStatus {
        self.status.lock().unwrap().clone()
    }

    /// Gives an adopted daemon the spec to restart it with (the spec hash
    /// was checked by the caller).
    pub fn provide_spec(&self, spec: &RunSpec) {
        let mut s = self.spec.lock().unwrap();
        if s.is_none() {
            *s = Some(spec.clone());
        }
    }

    /// Records a new plan in the metadata file.
    pub fn set_plan(&self, plan: &str) {
        let mut m = self.current_meta();
        m.plan = plan.to_owned();
        if let Err(e) = meta::write(&self.params.dir, &m) {
            tracing::warn!(error = %e, "cannot update instance metadata");
        }
    }

    fn current_meta(&self) -> InstanceMeta {
        // The file is the record of pid and start time; fall back to the
        // launch-time copy if it is unreadable.
        meta::read(&self.params.dir).unwrap_or_else(|| self.params.meta.clone())
    }

    /// Stops the daemon's process group (SIGTERM, grace, SIGKILL) and waits
    /// until the supervision task is over. Safe to call more than once.
    pub async fn stop(&self) {
        self.stop_tx.send_replace(true);
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Ends supervision but leaves the daemon running (the node is stopping
    /// with `keep_instances_on_shutdown`; the next node process adopts it).
    pub fn detach(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }

    fn set(&self, pid: u32, state: InstanceState, message: impl Into<String>) {
        *self.status.lock().unwrap() = ProcStatus {
            pid,
            state,
            message: message.into(),
        };
    }

    fn instance_id(&self) -> &str {
        &self.params.meta.instance_id
    }

    async fn supervise(self: Arc<Self>, mut current: Current, mut stop: watch::Receiver<bool>) {
        let mut failures: VecDeque<Instant> = VecDeque::new();
        loop {
            // Run until the daemon exits or we are told to stop.
            let (pgid, reason) = match &mut current {
                Current::Child(child, pid) => {
                    let pgid = *pid as i32;
                    tokio::select! {
                        status = child.wait() => (pgid, match status {
                            Ok(s) => s.to_string(),
                            Err(e) => e.to_string(),
                        }),
                        _ = stopped(&mut stop) => {
                            process::terminate_child(child, pgid, self.params.grace).await;
                            self.set(0, InstanceState::Unspecified, "stopped");
                            return;
                        }
                    }
                }
                Current::Foreign { pid, start_time } => {
                    let (pid, start_time) = (*pid, *start_time);
                    tokio::select! {
                        _ = wait_foreign_exit(pid, start_time) => {
                            (pid as i32, format!("adopted daemon (pid {pid}) exited"))
                        }
                        _ = stopped(&mut stop) => {
                            procfs::terminate_foreign_group(pid as i32, self.params.grace).await;
                            self.set(0, InstanceState::Unspecified, "stopped");
                            return;
                        }
                    }
                }
            };
            tracing::warn!(instance_id = %self.instance_id(), %reason, "daemon exited unexpectedly");
            // Whatever the leader left behind in its group would hold the
            // port or the data files: clear it before restarting.
            procfs::signal_group(pgid, Signal::SIGKILL);
            procfs::wait_group_gone(pgid, Duration::from_secs(5)).await;

            match self.restart(&mut failures, reason, &mut stop).await {
                Some(next) => current = next,
                None => return,
            }
        }
    }

    /// Starts the daemon again until it becomes ready (returns it), the node
    /// gives up or is told to stop (returns `None`).
    async fn restart(
        &self,
        failures: &mut VecDeque<Instant>,
        mut reason: String,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Current> {
        loop {
            let now = Instant::now();
            failures.push_back(now);
            while failures
                .front()
                .is_some_and(|t| now.duration_since(*t) > FAILURE_WINDOW)
            {
                failures.pop_front();
            }
            if failures.len() >= MAX_FAILURES {
                let msg = format!(
                    "gave up after {} failed starts within {} s; last: {reason}",
                    failures.len(),
                    FAILURE_WINDOW.as_secs()
                );
                tracing::error!(instance_id = %self.instance_id(), "{msg}");
                self.set(0, InstanceState::Failed, msg);
                return None;
            }
            let Some(spec) = self.spec.lock().unwrap().clone() else {
                let msg = format!("{reason}; provision it again to restart it");
                tracing::warn!(instance_id = %self.instance_id(), "adopted daemon exited; waiting for provision");
                self.set(0, InstanceState::Failed, msg);
                return None;
            };
            self.set(0, InstanceState::Restarting, reason.clone());
            // 200 ms, 400 ms, 800 ms, ... capped at 5 s.
            let backoff = BACKOFF_START
                .saturating_mul(1 << (failures.len() - 1).min(16))
                .min(BACKOFF_MAX);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stopped(stop) => {
                    self.set(0, InstanceState::Unspecified, "stopped");
                    return None;
                }
            }
            match self.start_once(&spec, stop).await {
                Ok(Some(current)) => return Some(current),
                Ok(None) => return None,
                Err(r) => {
                    tracing::warn!(instance_id = %self.instance_id(), "restart failed");
                    reason = r;
                }
            }
        }
    }

    /// One restart attempt: `Ok(Some)` when ready, `Ok(None)` when stopped
    /// meanwhile, `Err(reason)` when it failed.
    async fn start_once(
        &self,
        spec: &RunSpec,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<Current>, String> {
        let port = self.params.port;
        if process::port_accepts(self.params.probe, port).await {
            return Err(format!("port {port} is taken by another process"));
        }
        let mut spawned = process::spawn(&self.params.dir, spec)?;
        let pid = spawned.pid;
        let mut m = self.current_meta();
        m.pid = pid;
        m.start_time = spawned.start_time;
        if let Err(e) = meta::write(&self.params.dir, &m) {
            // Without metadata a later node could not adopt it, but the
            // daemon itself is fine: keep going.
            tracing::warn!(instance_id = %self.instance_id(), error = %e, "cannot write instance metadata");
        }
        self.set(pid, InstanceState::Restarting, "waiting for the port");
        let timeout = spec.ready_timeout(self.params.ready_default);
        let ready = tokio::select! {
            r = process::wait_ready(&mut spawned.child, self.params.probe, port, timeout) => r,
            _ = stopped(stop) => {
                process::terminate_child(&mut spawned.child, pid as i32, self.params.grace).await;
                self.set(0, InstanceState::Unspecified, "stopped");
                return Ok(None);
            }
        };
        match ready {
            Readiness::Accepting => {
                tracing::info!(instance_id = %self.instance_id(), pid, port, "daemon restarted");
                self.set(pid, InstanceState::Running, "");
                Ok(Some(Current::Child(spawned.child, pid)))
            }
            Readiness::Exited(status) => {
                procfs::signal_group(pid as i32, Signal::SIGKILL);
                Err(with_tail(
                    status.to_string(),
                    &process::stderr_tail(&self.params.dir, spawned.stderr_offset),
                ))
            }
            Readiness::TimedOut => {
                process::terminate_child(&mut spawned.child, pid as i32, self.params.grace).await;
                Err(with_tail(
                    format!("port {port} not open after {} ms", timeout.as_millis()),
                    &process::stderr_tail(&self.params.dir, spawned.stderr_offset),
                ))
            }
        }
    }
}

/// Adds the last stderr line (not the whole tail: this message is kept in
/// memory and listed) to a failure reason.
fn with_tail(reason: String, tail: &str) -> String {
    match tail.lines().last() {
        Some(line) if !line.trim().is_empty() => format!("{reason}: {}", line.trim()),
        _ => reason,
    }
}

/// Resolves when an adopted daemon is no longer the process we recorded.
async fn wait_foreign_exit(pid: u32, start_time: u64) {
    while procfs::is_our_leader(pid, start_time) {
        tokio::time::sleep(ADOPTED_POLL).await;
    }
}

/// Resolves once `rx` turns true (or its sender is gone). A helper rather
/// than `wait_for` inline: its `Ref` guard is not `Send` and must not live
/// into a `select!` handler.
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
