//! The node's in-memory state and the operations behind the RPCs.
//!
//! Each instance id has a slot with an async lock, so that calls for one id
//! are serialised (two concurrent Provisions never spawn twice) while calls
//! for different ids run in parallel. A slot lives in the map from the start
//! of the first call until the instance is gone; its presence also reserves
//! capacity, so concurrent Provisions cannot overshoot `capacity`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use svcbroker_proto::v1::{InstanceState, InstanceStatus, NodeInfo, PortRange};
use tokio::sync::OwnedMutexGuard;

use crate::config::Config;
use crate::error::Error;
use crate::meta::{self, InstanceMeta};
use crate::process::{self, Readiness};
use crate::procfs;
use crate::spec::{self, Kind, Provision};
use crate::supervisor::{self, Supervisor};

/// One instance the node holds.
struct Held {
    service: String,
    plan: String,
    kind: Kind,
    port: u32,
    spec_hash: String,
    /// The instance directory (kind "process" only).
    dir: Option<PathBuf>,
    /// The daemon's supervisor (kind "process" only).
    sup: Option<Arc<Supervisor>>,
}

#[derive(Default)]
struct Slot {
    /// Serialises operations on one id; `true` once the slot was retired
    /// from the map, telling a waiter to look the id up again.
    op: Arc<tokio::sync::Mutex<bool>>,
    /// Read without `op` so that listing never waits for a slow start.
    held: Mutex<Option<Arc<Held>>>,
    /// What ListInstances shows (state STARTING) while a first start waits
    /// for the port, before the instance is held.
    starting: Mutex<Option<InstanceStatus>>,
}

/// Clears `Slot::starting` on every way out of a start.
struct StartingGuard<'a>(&'a Mutex<Option<InstanceStatus>>);

impl Drop for StartingGuard<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap() = None;
    }
}

/// State shared by all RPC handlers.
pub(crate) struct Node {
    config: Config,
    boot_id: String,
    services: Vec<String>,
    grpc_url: String,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    closing: AtomicBool,
}

impl Node {
    /// `config.data_dir` must be absolute and exist.
    pub fn new(config: Config, services: Vec<String>, grpc_url: String) -> Self {
        Node {
            config,
            boot_id: uuid::Uuid::new_v4().to_string(),
            services,
            grpc_url,
            slots: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
        }
    }

    /// Returns who this node is and what it offers.
    pub fn info(&self) -> NodeInfo {
        let used = self
            .slots
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.held.lock().unwrap().is_some())
            .count();
        NodeInfo {
            node_id: self.config.node_id.clone(),
            services: self.services.clone(),
            capacity: self.config.capacity,
            used: used as u32,
            port_range: Some(PortRange {
                start: u32::from(self.config.port_range.start),
                end: u32::from(self.config.port_range.end),
            }),
            boot_id: self.boot_id.clone(),
            grpc_url: self.grpc_url.clone(),
            advertise_host: self.config.advertise_host.clone(),
            data_dir: self.config.data_dir.to_string_lossy().into_owned(),
            // Instances serve this host only until the node is told otherwise
            // (containers set a wider address in a later change).
            bind_host: "127.0.0.1".into(),
            attributes: Default::default(),
        }
    }

    /// Returns true when `port` may be given to an instance on this node.
    pub fn port_in_range(&self, port: u32) -> bool {
        self.config.port_range.contains(port)
    }

    fn grace(&self) -> Duration {
        Duration::from_millis(self.config.stop_grace_ms)
    }

    fn ready_default(&self) -> Duration {
        Duration::from_millis(self.config.ready_timeout_ms)
    }

    /// `<data_dir>/<id>`, checked to be directly inside `data_dir` so that
    /// nothing outside it is ever removed (the id was validated already;
    /// this is the second lock on the door).
    fn instance_dir(&self, id: &str) -> Result<PathBuf, Error> {
        spec::validate_instance_id(id)?;
        let dir = self.config.data_dir.join(id);
        if dir.parent() != Some(self.config.data_dir.as_path()) {
            return Err(Error::InvalidArgument(format!(
                "instance {id} does not map to a directory inside the data directory"
            )));
        }
        Ok(dir)
    }

    /// Locks the slot of `id`, creating it (and reserving capacity when
    /// `reserve` is set) if the id is new.
    async fn lock_slot(
        &self,
        id: &str,
        reserve: bool,
    ) -> Result<(Arc<Slot>, OwnedMutexGuard<bool>), Error> {
        loop {
            let slot = {
                let mut slots = self.slots.lock().unwrap();
                // Checked under the map lock: `shutdown` sets the flag under
                // it too, so no slot appears after its snapshot.
                if self.closing.load(Ordering::SeqCst) {
                    return Err(Error::ShuttingDown);
                }
                match slots.get(id) {
                    Some(s) => s.clone(),
                    None => {
                        if reserve && slots.len() >= self.config.capacity as usize {
                            return Err(Error::CapacityExhausted {
                                used: slots.len(),
                                capacity: self.config.capacity,
                            });
                        }
                        let s = Arc::new(Slot::default());
                        slots.insert(id.to_owned(), s.clone());
                        s
                    }
                }
            };
            let mut guard = slot.op.clone().lock_owned().await;
            if *guard {
                continue;
            }
            // A call that waited for the lock while `shutdown` went through
            // this slot must not start anything now.
            if self.closing.load(Ordering::SeqCst) {
                self.release(id, &slot, &mut guard);
                return Err(Error::ShuttingDown);
            }
            return Ok((slot, guard));
        }
    }

    /// Drops the slot of `id` from the map when it holds nothing any more.
    fn release(&self, id: &str, slot: &Arc<Slot>, guard: &mut OwnedMutexGuard<bool>) {
        if slot.held.lock().unwrap().is_some() {
            return;
        }
        **guard = true;
        let mut slots = self.slots.lock().unwrap();
        if slots.get(id).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            slots.remove(id);
        }
    }

    fn status_of(&self, id: &str, h: &Held) -> InstanceStatus {
        let (pid, state, message) = match &h.sup {
            Some(sup) => {
                let s = sup.status();
                (s.pid, s.state, s.message)
            }
            None => (0, InstanceState::Running, String::new()),
        };
        InstanceStatus {
            instance_id: id.to_owned(),
            service: h.service.clone(),
            plan: h.plan.clone(),
            kind: h.kind.as_str().to_owned(),
            port: h.port,
            pid,
            state: state as i32,
            dir: h
                .dir
                .as_ref()
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or_default(),
            message,
        }
    }

    /// Lists every instance held, sorted by id.
    pub fn list(&self) -> Vec<InstanceStatus> {
        let mut held: Vec<(String, Arc<Held>)> = Vec::new();
        let mut out: Vec<InstanceStatus> = Vec::new();
        for (id, s) in self.slots.lock().unwrap().iter() {
            if let Some(h) = s.held.lock().unwrap().clone() {
                held.push((id.clone(), h));
            } else if let Some(st) = s.starting.lock().unwrap().clone() {
                out.push(st);
            }
        }
        out.extend(held.iter().map(|(id, h)| self.status_of(id, h)));
        out.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        out
    }

    /// Returns true when the instance is held by this node.
    pub fn holds(&self, id: &str) -> bool {
        self.slots
            .lock()
            .unwrap()
            .get(id)
            .is_some_and(|s| s.held.lock().unwrap().is_some())
    }

    /// Makes the instance exist; returns its status and whether this call
    /// started it.
    pub async fn provision(&self, p: Provision) -> Result<(InstanceStatus, bool), Error> {
        let (slot, mut guard) = self
            .lock_slot(&p.instance_id, p.kind == Kind::Process)
            .await?;
        let result = self.provision_locked(&slot, &p).await;
        self.release(&p.instance_id, &slot, &mut guard);
        result
    }

    async fn provision_locked(
        &self,
        slot: &Slot,
        p: &Provision,
    ) -> Result<(InstanceStatus, bool), Error> {
        let id = &p.instance_id;
        let hash = p.spec_hash();
        let existing = slot.held.lock().unwrap().clone();
        if let Some(h) = existing {
            if h.kind != p.kind || h.service != p.service {
                return Err(Error::Conflict(format!(
                    "instance {id} exists as {} service {:?}, not {} service {:?}",
                    h.kind.as_str(),
                    h.service,
                    p.kind.as_str(),
                    p.service
                )));
            }
            if p.kind == Kind::Process && h.port != p.port {
                return Err(Error::Conflict(format!(
                    "instance {id} runs on port {}, not {}",
                    h.port, p.port
                )));
            }
            let Some(sup) = &h.sup else {
                // Kind "none": nothing runs; remember the latest plan.
                let h = self.replace_plan(slot, &h, &p.plan);
                return Ok((self.status_of(id, &h), false));
            };
            let failed = sup.status().state == InstanceState::Failed;
            if h.spec_hash == hash && !failed {
                if let Some(run) = &p.process {
                    sup.provide_spec(run);
                }
                if h.plan != p.plan {
                    sup.set_plan(&p.plan);
                }
                let h = self.replace_plan(slot, &h, &p.plan);
                return Ok((self.status_of(id, &h), false));
            }
            // A changed spec (or a daemon the node gave up on) is started
            // afresh in the same directory, keeping its data.
            tracing::info!(
                instance_id = %id,
                reason = if failed { "failed" } else { "spec changed" },
                "restarting instance"
            );
            sup.stop().await;
            *slot.held.lock().unwrap() = None;
        }
        match p.kind {
            Kind::None => {
                let h = Arc::new(Held {
                    service: p.service.clone(),
                    plan: p.plan.clone(),
                    kind: Kind::None,
                    port: p.port,
                    spec_hash: hash,
                    dir: None,
                    sup: None,
                });
                *slot.held.lock().unwrap() = Some(h.clone());
                tracing::info!(instance_id = %id, service = %p.service, "recorded instance");
                Ok((self.status_of(id, &h), true))
            }
            Kind::Process => self.start_process(slot, p, hash).await,
        }
    }

    fn replace_plan(&self, slot: &Slot, h: &Arc<Held>, plan: &str) -> Arc<Held> {
        if h.plan == plan {
            return h.clone();
        }
        let new = Arc::new(Held {
            service: h.service.clone(),
            plan: plan.to_owned(),
            kind: h.kind,
            port: h.port,
            spec_hash: h.spec_hash.clone(),
            dir: h.dir.clone(),
            sup: h.sup.clone(),
        });
        *slot.held.lock().unwrap() = Some(new.clone());
        new
    }

    fn meta_for(&self, p: &Provision, hash: &str, pid: u32, start_time: u64) -> InstanceMeta {
        InstanceMeta {
            instance_id: p.instance_id.clone(),
            service: p.service.clone(),
            plan: p.plan.clone(),
            kind: p.kind.as_str().to_owned(),
            port: p.port,
            pid,
            start_time,
            spec_hash: hash.to_owned(),
        }
    }

    fn params(&self, dir: &Path, m: InstanceMeta) -> supervisor::Params {
        supervisor::Params {
            dir: dir.to_owned(),
            port: m.port,
            grace: self.grace(),
            ready_default: self.ready_default(),
            meta: m,
        }
    }

    fn hold(
        &self,
        slot: &Slot,
        p: &Provision,
        hash: String,
        dir: &Path,
        sup: Arc<Supervisor>,
    ) -> Arc<Held> {
        let h = Arc::new(Held {
            service: p.service.clone(),
            plan: p.plan.clone(),
            kind: p.kind,
            port: p.port,
            spec_hash: hash,
            dir: Some(dir.to_owned()),
            sup: Some(sup),
        });
        *slot.held.lock().unwrap() = Some(h.clone());
        h
    }

    async fn start_process(
        &self,
        slot: &Slot,
        p: &Provision,
        hash: String,
    ) -> Result<(InstanceStatus, bool), Error> {
        let id = &p.instance_id;
        let run = p.process.as_ref().expect("kind process has a spec");
        let dir = self.instance_dir(id)?;
        // A directory that already exists holds data of an earlier life of
        // this instance (node restart): reuse it and never remove it.
        let pre_existing = match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => true,
            Ok(_) => {
                return Err(Error::Conflict(format!(
                    "{} exists and is not a directory",
                    dir.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                process::create_private_dir(&dir).map_err(Error::io("cannot create", &dir))?;
                false
            }
            Err(e) => return Err(Error::io("cannot inspect", &dir)(e)),
        };
        let cleanup = || {
            if !pre_existing && let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove instance directory");
            }
        };

        if pre_existing && let Some(m) = meta::read(&dir) {
            // Its daemon from before a node restart may still run (it was
            // not ready when the node scanned at start): never run two.
            if m.kind == Kind::Process.as_str() && procfs::is_our_leader(m.pid, m.start_time) {
                if m.port == p.port && m.spec_hash == hash && process::port_accepts(p.port).await {
                    let mut m = m;
                    m.plan = p.plan.clone();
                    let (pid, start_time) = (m.pid, m.start_time);
                    if let Err(e) = meta::write(&dir, &m) {
                        tracing::warn!(instance_id = %id, error = %e, "cannot update instance metadata");
                    }
                    let sup =
                        Supervisor::adopt(self.params(&dir, m), Some(run.clone()), pid, start_time);
                    tracing::info!(instance_id = %id, pid, "adopted running daemon");
                    let h = self.hold(slot, p, hash, &dir, sup);
                    return Ok((self.status_of(id, &h), false));
                }
                tracing::info!(instance_id = %id, pid = m.pid, "stopping old daemon with another spec");
                procfs::terminate_foreign_group(m.pid as i32, self.grace()).await;
            }
        }

        if let Err(e) = process::write_files(&dir, &run.files) {
            cleanup();
            return Err(e);
        }
        // If something already listens there, the readiness probe would
        // report our daemon ready while it fails to bind.
        if process::port_accepts(p.port).await {
            cleanup();
            return Err(Error::Conflict(format!(
                "port {} already accepts connections on this host",
                p.port
            )));
        }
        let mut spawned = match process::spawn(&dir, run) {
            Ok(s) => s,
            Err(reason) => {
                cleanup();
                return Err(Error::StartFailed {
                    instance_id: id.clone(),
                    reason,
                    stderr_tail: String::new(),
                });
            }
        };
        let pid = spawned.pid;
        let pgid = pid as i32;
        *slot.starting.lock().unwrap() = Some(InstanceStatus {
            instance_id: id.clone(),
            service: p.service.clone(),
            plan: p.plan.clone(),
            kind: p.kind.as_str().to_owned(),
            port: p.port,
            pid,
            state: InstanceState::Starting as i32,
            dir: dir.to_string_lossy().into_owned(),
            message: "waiting for the port".to_owned(),
        });
        let _starting = StartingGuard(&slot.starting);
        let m = self.meta_for(p, &hash, pid, spawned.start_time);
        if let Err(e) = meta::write(&dir, &m) {
            process::terminate_child(&mut spawned.child, pgid, self.grace()).await;
            cleanup();
            return Err(e);
        }
        let timeout = run.ready_timeout(self.ready_default());
        match process::wait_ready(&mut spawned.child, p.port, timeout).await {
            Readiness::Accepting => {
                tracing::info!(instance_id = %id, service = %p.service, port = p.port, pid, "instance started");
                let sup = Supervisor::start_owned(self.params(&dir, m), run.clone(), spawned);
                let h = self.hold(slot, p, hash, &dir, sup);
                Ok((self.status_of(id, &h), true))
            }
            Readiness::Exited(status) => {
                let stderr_tail = process::stderr_tail(&dir, spawned.stderr_offset);
                // The leader is gone, but children it forked may not be.
                procfs::signal_group(pgid, Signal::SIGKILL);
                procfs::wait_group_gone(pgid, Duration::from_secs(5)).await;
                cleanup();
                Err(Error::StartFailed {
                    instance_id: id.clone(),
                    reason: format!("exited before accepting connections ({status})"),
                    stderr_tail,
                })
            }
            Readiness::TimedOut => {
                process::terminate_child(&mut spawned.child, pgid, self.grace()).await;
                let stderr_tail = process::stderr_tail(&dir, spawned.stderr_offset);
                cleanup();
                Err(Error::ReadyTimeout {
                    instance_id: id.clone(),
                    port: p.port,
                    timeout_ms: timeout.as_millis() as u64,
                    stderr_tail,
                })
            }
        }
    }

    /// Stops and removes the instance; returns whether anything existed.
    pub async fn deprovision(&self, id: &str) -> Result<bool, Error> {
        let dir = self.instance_dir(id)?;
        let (slot, mut guard) = self.lock_slot(id, false).await?;
        let result = self.deprovision_locked(&slot, id, &dir).await;
        self.release(id, &slot, &mut guard);
        result
    }

    async fn deprovision_locked(&self, slot: &Slot, id: &str, dir: &Path) -> Result<bool, Error> {
        let held = slot.held.lock().unwrap().clone();
        let mut removed = false;
        if let Some(h) = held {
            if let Some(sup) = &h.sup {
                sup.stop().await;
            }
            *slot.held.lock().unwrap() = None;
            removed = true;
        }
        match std::fs::symlink_metadata(dir) {
            Ok(m) if m.is_dir() => {
                if !removed && let Some(meta) = meta::read(dir) {
                    // Not in memory (the node restarted): the recorded
                    // daemon is ours only if pid and start time both match;
                    // a recycled pid belongs to someone else.
                    if procfs::is_our_leader(meta.pid, meta.start_time) {
                        tracing::info!(instance_id = %id, pid = meta.pid, "stopping daemon from metadata");
                        procfs::terminate_foreign_group(meta.pid as i32, self.grace()).await;
                    }
                }
                std::fs::remove_dir_all(dir).map_err(Error::io("cannot remove", dir))?;
                removed = true;
            }
            // Not ours to keep: a stray file or symlink under our name.
            Ok(_) => {
                std::fs::remove_file(dir).map_err(Error::io("cannot remove", dir))?;
                removed = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("cannot inspect", dir)(e)),
        }
        if removed {
            tracing::info!(instance_id = %id, "instance removed");
        }
        Ok(removed)
    }

    /// Adopts daemons a previous node process left running in `data_dir`
    /// (verified by pid, start time and an open port). Directories whose
    /// daemon is gone are left for the gateway to provision again.
    pub async fn readopt(&self) {
        let entries = match std::fs::read_dir(&self.config.data_dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(data_dir = %self.config.data_dir.display(), error = %e, "cannot scan data directory");
                return;
            }
        };
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Ok(dir) = self.instance_dir(&id) else {
                continue;
            };
            if !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            let Some(m) = meta::read(&dir) else {
                continue;
            };
            if m.instance_id != id || m.kind != Kind::Process.as_str() {
                continue;
            }
            if !(procfs::is_our_leader(m.pid, m.start_time) && process::port_accepts(m.port).await)
            {
                tracing::info!(instance_id = %id, "daemon not running; directory kept for re-provisioning");
                continue;
            }
            let (pid, start_time) = (m.pid, m.start_time);
            let held = Arc::new(Held {
                service: m.service.clone(),
                plan: m.plan.clone(),
                kind: Kind::Process,
                port: m.port,
                spec_hash: m.spec_hash.clone(),
                dir: Some(dir.clone()),
                sup: Some(Supervisor::adopt(
                    self.params(&dir, m),
                    None,
                    pid,
                    start_time,
                )),
            });
            let slot = Arc::new(Slot::default());
            *slot.held.lock().unwrap() = Some(held);
            self.slots.lock().unwrap().insert(id.clone(), slot);
            tracing::info!(instance_id = %id, pid, "re-adopted running daemon");
        }
    }

    /// Refuses new operations, waits for running ones, then stops every
    /// daemon (or, with `keep_instances_on_shutdown`, leaves them running
    /// for the next node process to adopt). Directories always stay.
    pub async fn shutdown(&self) {
        let slots: Vec<Arc<Slot>> = {
            let slots = self.slots.lock().unwrap();
            self.closing.store(true, Ordering::SeqCst);
            slots.values().cloned().collect()
        };
        let keep = self.config.keep_instances_on_shutdown;
        let mut stops = tokio::task::JoinSet::new();
        for slot in slots {
            stops.spawn(async move {
                let _guard = slot.op.lock().await;
                let held = slot.held.lock().unwrap().clone();
                if let Some(sup) = held.and_then(|h| h.sup.clone()) {
                    if keep {
                        sup.detach();
                    } else {
                        sup.stop().await;
                    }
                }
            });
        }
        while stops.join_next().await.is_some() {}
    }
}
