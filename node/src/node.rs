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
use crate::directory::{self, CapMode, Watch};
use crate::error::Error;
use crate::hooks::HookRunner;
use crate::meta::{self, InstanceMeta};
use crate::offer::Offer;
use crate::pg::Postgres;
use crate::process::{self, Readiness};
use crate::procfs;
use crate::spec::{self, Binding, DbSpec, Deprovision, Kind, Provision};
use crate::supervisor::{self, Supervisor};

/// One instance the node holds.
struct Held {
    service: String,
    plan: String,
    kind: Kind,
    port: u32,
    spec_hash: String,
    /// The instance directory (kinds "process" and "directory").
    dir: Option<PathBuf>,
    /// The daemon's supervisor (kind "process" only).
    sup: Option<Arc<Supervisor>>,
    /// The instance's database (kind "database" only).
    database: Option<DbSpec>,
    /// How the directory's cap is enforced, and its size (kind "directory").
    cap: Option<(CapMode, u64)>,
    /// The supervised cap's checker (kind "directory", supervised mode).
    watch: Option<Arc<Watch>>,
}

impl Held {
    /// A held instance with nothing running and no directory.
    fn plain(p: &Provision, kind: Kind, hash: String) -> Held {
        Held {
            service: p.service.clone(),
            plan: p.plan.clone(),
            kind,
            port: p.port,
            spec_hash: hash,
            dir: None,
            sup: None,
            database: None,
            cap: None,
            watch: None,
        }
    }
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
    /// Replaced on SIGHUP.
    offer: std::sync::RwLock<Offer>,
    grpc_url: String,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    closing: AtomicBool,
    hooks: HookRunner,
    /// The database server, when `postgres_url` is configured.
    pg: Option<Arc<Postgres>>,
    /// Whether that server answered the last check: database services are
    /// offered only then.
    pg_up: AtomicBool,
    /// How new directory instances get their cap.
    dir_mode: CapMode,
}

impl Node {
    /// `config.data_dir` must be absolute and exist.
    pub fn new(
        config: Config,
        offer: Offer,
        grpc_url: String,
        dir_mode: CapMode,
        pg: Option<Arc<Postgres>>,
    ) -> Self {
        Node {
            config,
            boot_id: uuid::Uuid::new_v4().to_string(),
            offer: std::sync::RwLock::new(offer),
            grpc_url,
            slots: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            hooks: HookRunner::new(),
            pg,
            pg_up: AtomicBool::new(false),
            dir_mode,
        }
    }

    /// Pings the database server (if any) and records whether it answered;
    /// logs only changes.
    pub async fn check_postgres(&self) {
        let Some(pg) = &self.pg else { return };
        let up = match pg.ping().await {
            Ok(()) => true,
            Err(e) => {
                if self.pg_up.load(Ordering::SeqCst) {
                    tracing::warn!(error = %e, "postgresql server stopped answering: database services withdrawn");
                } else {
                    tracing::debug!(error = %e, "postgresql server does not answer");
                }
                false
            }
        };
        if up && !self.pg_up.load(Ordering::SeqCst) {
            tracing::info!(
                host = pg.host(),
                port = pg.port(),
                "postgresql server answers: database services offered"
            );
        }
        self.pg_up.store(up, Ordering::SeqCst);
    }

    /// True when a database server is configured.
    pub fn has_postgres(&self) -> bool {
        self.pg.is_some()
    }

    fn postgres(&self) -> Result<&Postgres, Error> {
        self.pg.as_deref().ok_or_else(|| {
            Error::Unsupported(
                "no postgresql server is configured on this node (postgres_url)".to_owned(),
            )
        })
    }

    /// Reloads the service offer from `services_dir`; a directory that does
    /// not load keeps the old offer (logged with file and line).
    pub async fn reload_offer(&self) {
        let dir = self.config.services_dir.clone();
        let has_pg = self.pg.is_some();
        let loaded = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || crate::offer::reload_offer(&dir, has_pg)).await
        };
        match loaded {
            Ok(Ok(offer)) => {
                tracing::info!(services_dir = %dir.display(), services = ?offer.plain,
                    database_services = ?offer.database, "service offer reloaded");
                *self.offer.write().unwrap_or_else(|p| p.into_inner()) = offer;
            }
            Ok(Err(e)) => tracing::error!(services_dir = %dir.display(), error = %e,
                "cannot reload service definitions: keeping the old offer"),
            Err(e) => tracing::error!(error = %e, "service offer reload failed"),
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
        let mut services = {
            let offer = self.offer.read().unwrap_or_else(|p| p.into_inner());
            let mut services = offer.plain.clone();
            if self.pg_up.load(Ordering::SeqCst) {
                services.extend(offer.database.iter().cloned());
            }
            services
        };
        services.sort();
        services.dedup();
        let mut attributes = HashMap::new();
        if let Some(pg) = &self.pg {
            attributes.insert("postgresql_host".to_owned(), pg.host().to_owned());
            attributes.insert("postgresql_port".to_owned(), pg.port().to_string());
        }
        NodeInfo {
            node_id: self.config.node_id.clone(),
            services,
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
            bind_host: self.config.bind_host.clone(),
            attributes,
        }
    }

    /// Returns true when `port` may be given to an instance on this node.
    pub fn port_in_range(&self, port: u32) -> bool {
        self.config.port_range.contains(port)
    }

    /// Where readiness probes connect, from `bind_host`.
    fn probe(&self) -> std::net::IpAddr {
        process::probe_ip(&self.config.bind_host)
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
        let (pid, state, message) = match (&h.sup, &h.watch) {
            (Some(sup), _) => {
                let s = sup.status();
                (s.pid, s.state, s.message)
            }
            (None, Some(w)) => (0, InstanceState::Running, w.message().to_owned()),
            (None, None) => (0, InstanceState::Running, String::new()),
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

    /// Makes the instance exist; returns its status and whether this call
    /// started it.
    pub async fn provision(&self, p: Provision) -> Result<(InstanceStatus, bool), Error> {
        // Every kind but "none" takes something of this host (or of its
        // database server), so it counts against the capacity.
        let (slot, mut guard) = self.lock_slot(&p.instance_id, p.kind != Kind::None).await?;
        let result = match self.ensure_instance(&slot, &p).await {
            // Hooks run once the instance exists, on every Provision (they
            // are idempotent by contract). A failure leaves the instance:
            // the gateway deprovisions a failed provision, or repeats it.
            Ok(r) => self
                .hooks
                .run_all("provision", &p.instance_id, &p.hooks)
                .await
                .map(|()| r),
            Err(e) => Err(e),
        };
        self.release(&p.instance_id, &slot, &mut guard);
        result
    }

    async fn ensure_instance(
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
            if p.kind == Kind::Database && h.database != p.database {
                return Err(Error::Conflict(format!(
                    "instance {id} has another database"
                )));
            }
            if p.kind == Kind::Directory {
                // Checked again every time: a host reboot unmounts it.
                return self.provide_directory(slot, p, hash).await;
            }
            let Some(sup) = &h.sup else {
                // Kind "none" (or "database", checked on the server below):
                // nothing runs; remember the latest plan.
                if p.kind == Kind::Database {
                    self.postgres()?
                        .create_database(&h.database.as_ref().expect("database held").name)
                        .await?;
                }
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
                let h = Arc::new(Held::plain(p, Kind::None, hash));
                *slot.held.lock().unwrap() = Some(h.clone());
                tracing::info!(instance_id = %id, service = %p.service, "recorded instance");
                Ok((self.status_of(id, &h), true))
            }
            Kind::Process => self.start_process(slot, p, hash).await,
            Kind::Database => {
                let db = p.database.as_ref().expect("kind database has a spec");
                let created = self.postgres()?.create_database(&db.name).await?;
                let mut held = Held::plain(p, Kind::Database, hash);
                held.database = Some(db.clone());
                let h = Arc::new(held);
                *slot.held.lock().unwrap() = Some(h.clone());
                tracing::info!(instance_id = %id, service = %p.service, database = %db.name, created, "database instance ready");
                Ok((self.status_of(id, &h), created))
            }
            Kind::Directory => self.provide_directory(slot, p, hash).await,
        }
    }

    /// Makes a directory instance exist with its cap (idempotent: mounts
    /// an image that is not mounted, restarts a checker that is not
    /// running) and holds it.
    async fn provide_directory(
        &self,
        slot: &Slot,
        p: &Provision,
        hash: String,
    ) -> Result<(InstanceStatus, bool), Error> {
        let id = &p.instance_id;
        let dir = self.instance_dir(id)?;
        let record_path = directory::record_path(&self.config.data_dir, id);
        let record = meta::read_at(&record_path);
        if record.is_none() && meta::read(&dir).is_some_and(|m| m.kind == Kind::Process.as_str()) {
            return Err(Error::Conflict(format!(
                "instance {id} exists as a process instance"
            )));
        }
        let limit = if p.size_limit_bytes == 0 {
            self.config.directory_default_limit_bytes
        } else {
            p.size_limit_bytes
        };
        // An existing instance keeps the mode it was made with.
        let mode = record
            .as_ref()
            .and_then(|m| m.cap.as_deref().and_then(CapMode::parse))
            .unwrap_or(self.dir_mode);
        let old_limit = record.as_ref().and_then(|m| m.size_limit_bytes);
        if mode == CapMode::Loop && old_limit.is_some_and(|l| l != limit) {
            return Err(Error::Conflict(format!(
                "instance {id} is a loop-mounted directory of {} bytes; it cannot be resized to {limit}",
                old_limit.unwrap_or(0)
            )));
        }
        let held = slot.held.lock().unwrap().clone();
        let created = match mode {
            CapMode::Loop => {
                directory::setup_loop(&self.config.data_dir, id, &dir, limit).await?
                    && record.is_none()
            }
            CapMode::Supervised => {
                directory::ensure_images_dir(&self.config.data_dir)?;
                let existed = dir.exists();
                directory::create_dir(&dir)?;
                !existed && record.is_none()
            }
        };
        let m = InstanceMeta {
            instance_id: id.clone(),
            service: p.service.clone(),
            plan: p.plan.clone(),
            kind: Kind::Directory.as_str().to_owned(),
            port: p.port,
            pid: 0,
            start_time: 0,
            spec_hash: hash.clone(),
            size_limit_bytes: Some(limit),
            cap: Some(mode.as_str().to_owned()),
        };
        meta::write_at(&record_path, &m)?;
        let watch = match (mode, held.as_ref().and_then(|h| h.watch.clone())) {
            (CapMode::Supervised, Some(w)) => {
                w.set_limit(limit);
                Some(w)
            }
            (CapMode::Supervised, None) => Some(self.start_watch(id, &dir, limit)),
            (CapMode::Loop, _) => None,
        };
        let h = Arc::new(Held {
            dir: Some(dir),
            cap: Some((mode, limit)),
            watch,
            ..Held::plain(p, Kind::Directory, hash)
        });
        *slot.held.lock().unwrap() = Some(h.clone());
        if created {
            tracing::info!(instance_id = %id, limit, cap = mode.as_str(), "directory instance created");
        }
        Ok((self.status_of(id, &h), created))
    }

    fn start_watch(&self, id: &str, dir: &Path, limit: u64) -> Arc<Watch> {
        Watch::start(
            &self.config.data_dir,
            id,
            dir,
            limit,
            Duration::from_millis(self.config.directory_check_interval_ms),
        )
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
            database: h.database.clone(),
            cap: h.cap,
            watch: h.watch.clone(),
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
            size_limit_bytes: None,
            cap: None,
        }
    }

    fn params(&self, dir: &Path, m: InstanceMeta) -> supervisor::Params {
        supervisor::Params {
            dir: dir.to_owned(),
            port: m.port,
            probe: self.probe(),
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
            dir: Some(dir.to_owned()),
            sup: Some(sup),
            ..Held::plain(p, p.kind, hash)
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
        if directory::record_path(&self.config.data_dir, id).exists() {
            return Err(Error::Conflict(format!(
                "instance {id} exists as a directory instance"
            )));
        }
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
                if m.port == p.port
                    && m.spec_hash == hash
                    && process::port_accepts(self.probe(), p.port).await
                {
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

        if pre_existing {
            self.stop_unrecorded_daemons(id, &dir).await;
        }
        if let Err(e) = process::write_files(&dir, &run.files) {
            cleanup();
            return Err(e);
        }
        // If something already listens there, the readiness probe would
        // report our daemon ready while it fails to bind.
        if process::port_accepts(self.probe(), p.port).await {
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
        match process::wait_ready(&mut spawned.child, self.probe(), p.port, timeout).await {
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

    /// Stops what still runs in a process instance's directory that the
    /// node does not hold: a daemon whose node was killed after starting it
    /// but before recording it in the metadata (found by working directory).
    /// Left running, it would keep the instance's port, so the instance
    /// could never start again, and outlive its deprovision.
    async fn stop_unrecorded_daemons(&self, id: &str, dir: &Path) {
        for pid in procfs::leaders_in(dir) {
            tracing::info!(instance_id = %id, pid, "stopping a daemon left unrecorded by an earlier node process");
            procfs::terminate_foreign_group(pid as i32, self.grace()).await;
        }
    }

    /// Runs the deprovision hooks, then stops and removes the instance;
    /// returns whether anything existed.
    pub async fn deprovision(&self, d: Deprovision) -> Result<bool, Error> {
        let id = d.instance_id.as_str();
        let dir = self.instance_dir(id)?;
        let (slot, mut guard) = self.lock_slot(id, false).await?;
        let result = async {
            // First, and a failure fails the call with nothing removed: the
            // hooks may need the instance (e.g. its daemon) to still exist.
            self.hooks.run_all("deprovision", id, &d.hooks).await?;
            self.deprovision_locked(&slot, &d, &dir).await
        }
        .await;
        self.release(id, &slot, &mut guard);
        result
    }

    async fn deprovision_locked(
        &self,
        slot: &Slot,
        d: &Deprovision,
        dir: &Path,
    ) -> Result<bool, Error> {
        let id = d.instance_id.as_str();
        let held = slot.held.lock().unwrap().clone();
        let mut removed = false;
        let record = directory::record_path(&self.config.data_dir, id);
        // What the instance is: the node's memory first, then what the
        // gateway says (a restarted node forgot), then what is on disk.
        let kind = held.as_ref().map(|h| h.kind).or(d.kind).or_else(|| {
            (record.exists() || directory::mount_source(dir).is_some()).then_some(Kind::Directory)
        });
        if kind == Some(Kind::Database) {
            let db = d
                .database
                .clone()
                .or_else(|| held.as_ref().and_then(|h| h.database.clone()))
                .ok_or_else(|| {
                    Error::InvalidArgument(
                        "deprovisioning a database instance needs its database".to_owned(),
                    )
                })?;
            removed |= self.postgres()?.drop_database(&db.name).await?;
        }
        if let Some(h) = held {
            if let Some(sup) = &h.sup {
                sup.stop().await;
            }
            if let Some(w) = &h.watch {
                w.stop().await;
            }
            *slot.held.lock().unwrap() = None;
            removed = true;
        }
        if kind == Some(Kind::Directory)
            || record.exists()
            || directory::mount_source(dir).is_some()
        {
            // Never the process path below: the directory belongs to the
            // application, so a metadata file in it is not to be trusted.
            removed |= directory::remove(&self.config.data_dir, id, dir).await?;
            if removed {
                tracing::info!(instance_id = %id, "instance removed");
            }
            return Ok(removed);
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
                self.stop_unrecorded_daemons(id, dir).await;
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
            if m.instance_id != id
                || m.kind != Kind::Process.as_str()
                || directory::record_path(&self.config.data_dir, &id).exists()
            {
                continue;
            }
            if !(procfs::is_our_leader(m.pid, m.start_time)
                && process::port_accepts(self.probe(), m.port).await)
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
                database: None,
                cap: None,
                watch: None,
            });
            let slot = Arc::new(Slot::default());
            *slot.held.lock().unwrap() = Some(held);
            self.slots.lock().unwrap().insert(id.clone(), slot);
            tracing::info!(instance_id = %id, pid, "re-adopted running daemon");
        }
        self.readopt_directories().await;
    }

    /// Holds the directory instances recorded in `.images`: mounts images
    /// that are not mounted (a host reboot), restarts supervised checkers.
    async fn readopt_directories(&self) {
        let images = self.config.data_dir.join(directory::IMAGES_DIR);
        let Ok(entries) = std::fs::read_dir(&images) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if id.ends_with(".lock") {
                continue;
            }
            let Ok(dir) = self.instance_dir(id) else {
                continue;
            };
            let Some(m) = meta::read_at(&entry.path()) else {
                continue;
            };
            let (Some(mode), Some(limit)) = (
                m.cap.as_deref().and_then(CapMode::parse),
                m.size_limit_bytes,
            ) else {
                continue;
            };
            if m.instance_id != id || m.kind != Kind::Directory.as_str() || !dir.is_dir() {
                tracing::warn!(instance_id = %id, "directory record without its directory; left for re-provisioning");
                continue;
            }
            let watch = match mode {
                CapMode::Loop => {
                    if let Err(e) =
                        directory::setup_loop(&self.config.data_dir, id, &dir, limit).await
                    {
                        tracing::warn!(instance_id = %id, error = %e, "cannot mount directory image; left for re-provisioning");
                        continue;
                    }
                    None
                }
                CapMode::Supervised => Some(self.start_watch(id, &dir, limit)),
            };
            let held = Arc::new(Held {
                service: m.service,
                plan: m.plan,
                kind: Kind::Directory,
                port: m.port,
                spec_hash: m.spec_hash,
                dir: Some(dir),
                sup: None,
                database: None,
                cap: Some((mode, limit)),
                watch,
            });
            let slot = Arc::new(Slot::default());
            *slot.held.lock().unwrap() = Some(held);
            self.slots.lock().unwrap().insert(id.to_owned(), slot);
            tracing::info!(instance_id = %id, cap = mode.as_str(), "re-adopted directory");
        }
    }

    /// Makes a binding's credentials real: for a database instance its
    /// role, then the hooks.
    pub async fn bind(&self, b: &Binding) -> Result<(), Error> {
        let id = b.instance_id.as_str();
        let held = self.held(id);
        match held.as_ref().map(|h| h.kind).or(b.kind) {
            // A process instance (or one the gateway did not name the
            // kind of) must be here, and its daemon up for the hooks.
            Some(Kind::Process) | None => {
                self.require_running(id, held.as_deref())?;
            }
            // Nothing of it lives here: the hooks are the binding.
            Some(Kind::None) => {}
            Some(Kind::Directory) => {
                if held.is_none() && !self.instance_dir(id)?.is_dir() {
                    return Err(Error::NotFound(id.to_owned()));
                }
            }
            Some(Kind::Database) => {
                let db = self.database_of(b.database.as_ref(), held.as_deref())?;
                self.postgres()?
                    .create_login(&db.name, &b.username, &b.password)
                    .await
                    .map_err(|e| match e {
                        Error::NotFound(_) => Error::NotFound(id.to_owned()),
                        other => other,
                    })?;
            }
        }
        self.hooks.run_all("bind", id, &b.hooks).await
    }

    /// Undoes [`Node::bind`]: the hooks, then for a database instance the
    /// role. Unbinding from an instance that is gone succeeds.
    pub async fn unbind(&self, b: &Binding) -> Result<(), Error> {
        let id = b.instance_id.as_str();
        let held = self.held(id);
        match held.as_ref().map(|h| h.kind).or(b.kind) {
            Some(Kind::Process) | None => {
                if held.is_none() {
                    // The instance (and every credential in it) is gone.
                    return Ok(());
                }
                self.require_running(id, held.as_deref())?;
                self.hooks.run_all("unbind", id, &b.hooks).await
            }
            Some(Kind::None) => self.hooks.run_all("unbind", id, &b.hooks).await,
            Some(Kind::Directory) => {
                if held.is_none() && !self.instance_dir(id)?.is_dir() {
                    return Ok(());
                }
                self.hooks.run_all("unbind", id, &b.hooks).await
            }
            Some(Kind::Database) => {
                let db = self.database_of(b.database.as_ref(), held.as_deref())?;
                self.hooks.run_all("unbind", id, &b.hooks).await?;
                self.postgres()?.drop_login(&db.name, &b.username).await?;
                Ok(())
            }
        }
    }

    fn held(&self, id: &str) -> Option<Arc<Held>> {
        let slot = self.slots.lock().unwrap().get(id).cloned()?;
        slot.held.lock().unwrap().clone()
    }

    /// NOT_FOUND unless the instance is held; UNAVAILABLE while its daemon
    /// is not running (restarting, or given up on), so that the gateway
    /// retries instead of running hooks against a daemon that is down.
    fn require_running(&self, id: &str, held: Option<&Held>) -> Result<(), Error> {
        let h = held.ok_or_else(|| Error::NotFound(id.to_owned()))?;
        if let Some(sup) = &h.sup {
            let s = sup.status();
            if s.state != InstanceState::Running {
                let state = s
                    .state
                    .as_str_name()
                    .trim_start_matches("INSTANCE_STATE_")
                    .to_lowercase();
                return Err(Error::Unavailable(format!(
                    "instance {id} is not running ({state}{}{})",
                    if s.message.is_empty() { "" } else { ": " },
                    s.message
                )));
            }
        }
        Ok(())
    }

    fn database_of(&self, given: Option<&DbSpec>, held: Option<&Held>) -> Result<DbSpec, Error> {
        given
            .cloned()
            .or_else(|| held.and_then(|h| h.database.clone()))
            .ok_or_else(|| {
                Error::InvalidArgument(
                    "a database instance's binding needs its database".to_owned(),
                )
            })
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
                // Directories stay (mounted, too): only their checker stops.
                if let Some(w) = held.as_ref().and_then(|h| h.watch.clone()) {
                    w.stop().await;
                }
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
