//! The operations engine: drives every recorded operation to `succeeded` or
//! `failed`, talking gRPC to the allocator and the nodes, and reconciles
//! what the nodes hold with the desired state.
//!
//! Every step is idempotent (the allocator's calls are idempotent per owner,
//! the node's per instance and binding), so an operation is driven by simply
//! running all of its steps again from the top: that is how a gateway
//! restarted after SIGKILL resumes the operations it left `in progress`.
//! Transient errors (a component down, a transport timeout) are retried with
//! backoff until the operation's deadline; permanent ones fail at once. A
//! failed provision or bind releases what it took (node instance, port,
//! credential).
//!
//! Everything that acts on one instance (operation drivers, the reconciler)
//! holds that instance's lock, so a deprovision never races the provision it
//! halted, and the reconciler never restores an instance being removed.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use svcbroker_proto::auth::{AuthChannel, BearerToken};
use svcbroker_proto::v1::allocator_client::AllocatorClient;
use svcbroker_proto::v1::{
    AllocatePortRequest, BindRequest, CommandHook, Credential, DatabaseSpec, DeprovisionRequest,
    DirectorySpec, FileSpec, Hook, HttpHook, InstanceState as NodeState, InstanceStatus,
    IssueCredentialRequest, ListAllocationsRequest, ListInstancesRequest, PortRange, ProcessSpec,
    ProvisionRequest, ProvisionResponse, ReleasePortRequest, RevokeCredentialRequest,
    UnbindRequest, hook,
};
use svcbroker_svcdef::{HookEvent, Model, PlanDef, RenderedHook, ServiceDef, Vars};
use tokio::sync::{OwnedMutexGuard, watch};
use tokio::task::JoinSet;
use tonic::Request;
use tonic::transport::Endpoint;

use crate::catalog::{Catalogs, Loaded};
use crate::error::{Error, scrub};
use crate::registry::{NODE_CALL_TIMEOUT, NodeRegistry};
use crate::store::{
    Action, BindingRow, InstanceRow, InstanceState, Observed, OpState, OperationRow, Outcome,
    Placement, Store, now_ms,
};

/// How long one allocator call may take.
const ALLOCATOR_CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Extra time a node Provision call gets on top of the daemon's readiness
/// timeout.
const PROVISION_SLACK: Duration = Duration::from_secs(30);
/// Longest pause between two attempts of a transient failure.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a node's ListInstances may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause between two restorations of an instance its node gave up on.
const MAX_FAILED_BACKOFF: Duration = Duration::from_secs(3600);
/// Host daemons listen on when a node does not say (nodes before
/// `bind_host` existed served their own host only).
const DEFAULT_BIND_HOST: &str = "127.0.0.1";

/// How the reconciler behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileSettings {
    /// Time between two passes over every live node.
    pub interval: Duration,
    /// How long something no instance owns may stay on a node before it is
    /// removed (it may belong to an operation whose record is being
    /// written).
    pub orphan_grace: Duration,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        ReconcileSettings {
            interval: Duration::from_secs(30),
            orphan_grace: Duration::from_secs(300),
        }
    }
}

/// Counters of the reconciler (for `/metrics` and `/healthz`).
#[derive(Debug, Default)]
pub struct ReconcileStats {
    passes: AtomicU64,
    reprovisioned: AtomicU64,
    rebound: AtomicU64,
    orphans_removed: AtomicU64,
    failed_seen: AtomicU64,
}

/// A copy of the reconciler's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReconcileCounts {
    /// Periodic passes over all live nodes.
    pub passes: u64,
    /// Instances provisioned again because their node lacked them, had
    /// given up on them, or restarted.
    pub reprovisioned: u64,
    /// Bindings applied again because their instance's daemon restarted
    /// (e.g. Redis ACL users, which live in the daemon's memory).
    pub rebound: u64,
    /// Things removed from nodes that no instance owned.
    pub orphans_removed: u64,
    /// Times an instance was seen failed on its node.
    pub failed_seen: u64,
}

impl ReconcileStats {
    /// Returns the current values.
    pub fn counts(&self) -> ReconcileCounts {
        ReconcileCounts {
            passes: self.passes.load(Ordering::Relaxed),
            reprovisioned: self.reprovisioned.load(Ordering::Relaxed),
            rebound: self.rebound.load(Ordering::Relaxed),
            orphans_removed: self.orphans_removed.load(Ordering::Relaxed),
            failed_seen: self.failed_seen.load(Ordering::Relaxed),
        }
    }
}

/// What the reconciler remembers between passes (not durable: a restarted
/// gateway only waits a grace period longer).
#[derive(Default)]
struct Memory {
    /// (node id, instance id) → when first seen without an owner.
    orphans: HashMap<(String, String), Instant>,
    /// Instance id → when it may be restored again after its node gave up
    /// on it, and how often that happened in a row.
    failed: HashMap<String, (u32, Instant)>,
}

/// Shared state of the engine.
pub struct Engine {
    store: Store,
    catalogs: Arc<Catalogs>,
    registry: NodeRegistry,
    allocator: AllocatorClient<AuthChannel>,
    shutdown: watch::Receiver<bool>,
    waiters: Mutex<HashMap<String, watch::Sender<bool>>>,
    /// Instance id → (provision operation id, its halt signal).
    halts: Mutex<HashMap<String, (String, watch::Sender<bool>)>>,
    /// Instance id → the lock every actor on that instance holds.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    tasks: Mutex<JoinSet<()>>,
    settings: ReconcileSettings,
    stats: ReconcileStats,
    metrics: crate::metrics::Metrics,
    memory: Mutex<Memory>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// Credentials an operation obtained, remembered so that their passwords
/// can be scrubbed from any message kept in the database.
#[derive(Default)]
struct Secrets(Vec<String>);

impl Secrets {
    fn add(&mut self, c: &Credential) {
        if !c.password.is_empty() {
            self.0.push(c.password.clone());
        }
    }
    fn scrub(&self, message: &str) -> String {
        let refs: Vec<&str> = self.0.iter().map(String::as_str).collect();
        scrub(message, &refs)
    }
}

/// An operation being driven, with its halt signal (provisions only).
struct Run {
    op: OperationRow,
    halt: Option<watch::Receiver<bool>>,
}

impl Run {
    fn halted(&self) -> bool {
        self.halt.as_ref().is_some_and(|h| *h.borrow())
    }

    /// Resolves when the operation is halted (never for other operations).
    async fn wait_halted(&self) {
        match self.halt.clone() {
            Some(mut h) => {
                if h.wait_for(|x| *x).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

/// Holds an instance's lock; dropping it forgets the lock when nobody else
/// waits for it.
struct InstanceLock<'a> {
    engine: &'a Engine,
    id: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for InstanceLock<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        if let Ok(mut locks) = self.engine.locks.lock()
            && locks
                .get(&self.id)
                .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.id);
        }
    }
}

/// The credentials (and volume mounts) of a binding, as OSB answers them.
#[derive(Debug, Clone, PartialEq)]
pub struct BindingAnswer {
    /// OSB `credentials`.
    pub credentials: Map<String, Value>,
    /// OSB `volume_mounts`, for services that declare
    /// `requires: [volume_mount]`.
    pub volume_mounts: Option<Vec<Value>>,
}

impl Engine {
    /// Builds the engine; `allocator_url` is connected lazily, so a down
    /// allocator delays operations instead of failing startup. Every
    /// allocator call carries `token`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        catalogs: Arc<Catalogs>,
        registry: NodeRegistry,
        allocator_url: &str,
        token: &BearerToken,
        settings: ReconcileSettings,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Engine>, Error> {
        let endpoint = Endpoint::from_shared(allocator_url.to_owned())
            .map_err(|e| Error::BadRequest(format!("invalid allocator_url: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        Ok(Arc::new(Engine {
            store,
            catalogs,
            registry,
            allocator: AllocatorClient::new(token.wrap(endpoint.connect_lazy())),
            shutdown,
            waiters: Mutex::new(HashMap::new()),
            halts: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            tasks: Mutex::new(JoinSet::new()),
            settings,
            stats: ReconcileStats::default(),
            metrics: crate::metrics::Metrics::default(),
            memory: Mutex::new(Memory::default()),
        }))
    }

    /// Returns the store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Returns the reloadable catalog.
    pub fn catalogs(&self) -> &Arc<Catalogs> {
        &self.catalogs
    }

    /// Returns the catalog as it is now (one snapshot per request).
    pub fn catalog(&self) -> Arc<Loaded> {
        self.catalogs.snapshot()
    }

    /// Returns the node registry.
    pub fn registry(&self) -> &NodeRegistry {
        &self.registry
    }

    /// Returns the reconciler's counters.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// Returns a copy of the reconciler's counters.
    pub fn reconcile_stats(&self) -> ReconcileCounts {
        self.stats.counts()
    }

    async fn lock_instance(&self, id: &str) -> InstanceLock<'_> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(locks.entry(id.to_owned()).or_default())
        };
        let guard = lock.lock_owned().await;
        InstanceLock {
            engine: self,
            id: id.to_owned(),
            guard: Some(guard),
        }
    }

    /// Starts driving `op` in the background. Does nothing once shutdown has
    /// begun: the operation stays `in progress` and resumes at next start.
    /// A deprovision halts the instance's provision driver, if one runs.
    pub fn spawn(self: &Arc<Self>, op: OperationRow) {
        if *self.shutdown.borrow() {
            return;
        }
        if let Ok(mut w) = self.waiters.lock() {
            w.entry(op.id.clone())
                .or_insert_with(|| watch::channel(false).0);
        }
        let mut halt = None;
        if let Ok(mut halts) = self.halts.lock() {
            match op.action {
                Action::Deprovision => {
                    if let Some((provision_op, tx)) = halts.get(&op.instance_id) {
                        tracing::info!(instance_id = %op.instance_id, op_id = %provision_op,
                            "halting provision: deprovision requested");
                        let _ = tx.send(true);
                    }
                }
                Action::Provision => {
                    let (tx, rx) = watch::channel(false);
                    halts.insert(op.instance_id.clone(), (op.id.clone(), tx));
                    halt = Some(rx);
                }
                _ => {}
            }
        }
        let engine = Arc::clone(self);
        // The OSB request that started the operation, when there is one
        // (not for operations resumed after a restart): its steps' gRPC
        // calls carry the id too.
        let request_id = svcbroker_proto::auth::current_request_id().unwrap_or_default();
        let span = tracing::info_span!("operation", op_id = %op.id, action = %op.action,
            instance_id = %op.instance_id, binding_id = op.binding_id.as_deref().unwrap_or(""),
            request_id = %request_id);
        let Ok(mut tasks) = self.tasks.lock() else {
            return;
        };
        // Reap finished drivers so the set does not grow without bound.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(tracing::Instrument::instrument(
            svcbroker_proto::auth::with_request_id(request_id, async move {
                engine.drive(Run { op, halt }).await
            }),
            span,
        ));
    }

    /// Resumes every operation left `in progress` (after a restart).
    pub async fn resume_all(self: &Arc<Self>) -> Result<usize, Error> {
        let ops = self.store.ops_in_progress().await?;
        let n = ops.len();
        for op in ops {
            tracing::info!(op_id = %op.id, action = %op.action, instance_id = %op.instance_id,
                "resuming operation");
            self.spawn(op);
        }
        Ok(n)
    }

    /// Stops every driver (their operations stay `in progress`).
    pub async fn stop(&self) {
        let mut tasks = match self.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => return,
        };
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    /// Waits up to `timeout` for operation `op_id` to finish; returns it
    /// when it did, `None` when it is still in progress (or the gateway is
    /// shutting down).
    pub async fn wait(
        &self,
        op_id: &str,
        timeout: Duration,
    ) -> Result<Option<OperationRow>, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self
            .waiters
            .lock()
            .ok()
            .and_then(|w| w.get(op_id).map(watch::Sender::subscribe));
        let shutdown = self.shutdown.clone();
        loop {
            let op = self
                .store
                .get_operation(op_id)
                .await?
                .ok_or_else(|| Error::Internal(format!("operation {op_id} vanished")))?;
            if op.state != OpState::InProgress {
                return Ok(Some(op));
            }
            let tick = tokio::time::sleep(Duration::from_millis(250));
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
                _ = crate::signalled(shutdown.clone()) => return Ok(None),
                _ = async {
                    match rx.as_mut() {
                        Some(rx) => { let _ = rx.wait_for(|d| *d).await; }
                        // Not driven by this process (yet): poll.
                        None => tick.await,
                    }
                } => {}
            }
            if rx.as_ref().is_some_and(|r| *r.borrow()) {
                rx = None;
            }
        }
    }

    fn notify_done(&self, op_id: &str) {
        if let Ok(mut w) = self.waiters.lock()
            && let Some(tx) = w.remove(op_id)
        {
            let _ = tx.send(true);
        }
    }

    fn forget_halt(&self, run: &Run) {
        if let Ok(mut halts) = self.halts.lock()
            && halts
                .get(&run.op.instance_id)
                .is_some_and(|(id, _)| *id == run.op.id)
        {
            halts.remove(&run.op.instance_id);
        }
    }

    async fn drive(self: Arc<Self>, run: Run) {
        let lock = self.lock_instance(&run.op.instance_id).await;
        let op = &run.op;
        // Queued behind another driver of the instance: the operation may
        // have ended meanwhile (a provision halted by a deprovision).
        let still_running = match self.store.get_operation(&op.id).await {
            Ok(Some(o)) => o.state == OpState::InProgress,
            Ok(None) => false,
            // Left in progress: the next start resumes it.
            Err(_) => return,
        };
        let result = if !still_running || run.halted() {
            Err(Error::Halted)
        } else {
            let mut secrets = Secrets::default();
            let r = match op.action {
                Action::Provision => self.provision(&run, &mut secrets).await,
                Action::Update => self.update(&run, &mut secrets).await,
                Action::Deprovision => self.deprovision(&run).await,
                Action::Bind => self.bind(&run, &mut secrets).await,
                Action::Unbind => self.unbind(&run).await,
            };
            match r {
                // The last step may have ended just as the halt came.
                Ok(()) if run.halted() => Err(Error::Halted),
                Err(e) => Err(secrets_scrubbed(e, &secrets)),
                ok => ok,
            }
        };
        let outcome = match result {
            Ok(()) => {
                tracing::info!("operation succeeded");
                Outcome {
                    state: OpState::Succeeded,
                    description: Some(success_text(op.action).to_owned()),
                    instance_usable: None,
                    update_repeatable: None,
                }
            }
            Err(Error::ShuttingDown) => {
                // Left in progress on purpose: the next start resumes it.
                self.forget_halt(&run);
                return;
            }
            Err(Error::Halted) => {
                // Already recorded as failed by the deprovision request; the
                // deprovision (waiting for this lock) undoes what was taken.
                tracing::info!("provision halted by a deprovision request");
                self.forget_halt(&run);
                drop(lock);
                self.notify_done(&op.id);
                return;
            }
            Err(e) => {
                let (mut message, instance_usable, update_repeatable) = match &e {
                    Error::OperationFailed {
                        message,
                        instance_usable,
                        update_repeatable,
                    } => (message.clone(), *instance_usable, *update_repeatable),
                    other => (other.to_string(), None, None),
                };
                tracing::warn!(error = %message, "operation failed");
                if let Some(cleanup) = self.release_after_failure(op).await {
                    message =
                        format!("{message} (cleanup incomplete: {cleanup}; a DELETE retries it)");
                }
                let (instance_usable, update_repeatable) = match op.action {
                    Action::Update => (
                        instance_usable.or(Some(true)),
                        update_repeatable.or(Some(true)),
                    ),
                    Action::Deprovision => (instance_usable.or(Some(true)), None),
                    _ => (None, None),
                };
                Outcome {
                    state: OpState::Failed,
                    description: Some(format!("{} failed: {message}", op.action)),
                    instance_usable,
                    update_repeatable,
                }
            }
        };
        let seconds = (crate::store::now_ms() - op.created_at).max(0) as f64 / 1000.0;
        self.metrics
            .operation_finished(op.action.as_str(), outcome.state.as_str(), seconds);
        if let Err(e) = self.store.finish_op(&op.id, outcome).await {
            // The operation stays in progress and is resumed at next start.
            tracing::error!(error = %e, "cannot record the end of the operation");
        }
        self.forget_halt(&run);
        drop(lock);
        self.notify_done(&op.id);
    }

    /// Runs `f` until it succeeds, fails permanently, or the operation's
    /// deadline passes; transient errors are noted in the operation's
    /// description so that last_operation tells what it waits for. A halted
    /// provision stops here, between steps.
    async fn retry<T, F, Fut>(&self, run: &Run, step: &str, mut f: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let op = &run.op;
        let mut delay = Duration::from_millis(200);
        let mut noted: Option<String> = None;
        let shutdown = self.shutdown.clone();
        // The step is informational (for operators); failing to record it
        // must not fail the operation.
        let _ = self.store.set_step(&op.id, step, None).await;
        loop {
            if *shutdown.borrow() {
                return Err(Error::ShuttingDown);
            }
            if run.halted() {
                return Err(Error::Halted);
            }
            let err = match f().await {
                Ok(v) => {
                    if noted.is_some() {
                        let _ = self
                            .store
                            .set_step(&op.id, step, Some(format!("{step}: in progress")))
                            .await;
                    }
                    return Ok(v);
                }
                Err(e) if e.is_transient() => e,
                Err(e) => return Err(e),
            };
            let left = op.deadline - now_ms();
            if left <= 0 {
                return Err(Error::OperationFailed {
                    message: format!("{step}: gave up at the operation's deadline: {err}"),
                    instance_usable: None,
                    update_repeatable: None,
                });
            }
            let text = format!("{step}: waiting ({err})");
            if noted.as_deref() != Some(text.as_str()) {
                tracing::info!(step, error = %err, "transient failure, retrying");
                let _ = self.store.set_step(&op.id, step, Some(text.clone())).await;
                noted = Some(text);
            }
            let pause = delay.min(Duration::from_millis(left.max(1) as u64));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = crate::signalled(shutdown.clone()) => return Err(Error::ShuttingDown),
                _ = run.wait_halted() => return Err(Error::Halted),
            }
            delay = (delay * 2).min(MAX_BACKOFF);
        }
    }

    /// Returns the definition an instance was made from (current catalog,
    /// else one retired by a reload).
    fn definition(
        &self,
        service_id: &str,
        plan_id: &str,
    ) -> Result<(Arc<ServiceDef>, PlanDef), Error> {
        self.catalog()
            .existing(service_id, plan_id)
            .ok_or_else(|| Error::OperationFailed {
                message: format!(
                    "service '{service_id}' with plan '{plan_id}' is no longer in the catalog"
                ),
                instance_usable: None,
                update_repeatable: Some(false),
            })
    }

    async fn load_instance(&self, instance_id: &str) -> Result<Option<InstanceRow>, Error> {
        Ok(self
            .store
            .get_instance(instance_id)
            .await?
            .map(|v| v.instance))
    }

    // ---- steps ----------------------------------------------------------

    async fn provision(&self, run: &Run, secrets: &mut Secrets) -> Result<(), Error> {
        let op = &run.op;
        let Some(mut inst) = self.load_instance(&op.instance_id).await? else {
            return Err(Error::Internal("instance record vanished".into()));
        };
        let (svc, plan) = self.definition(&inst.service_id, &inst.plan_id)?;
        let node = self
            .retry(run, "waiting for node", || async {
                self.registry.require_live(&inst.node_id)
            })
            .await?;
        let port = async {
            match svc.model {
                Model::Process => {
                    let range = node.info.port_range.ok_or_else(|| Error::OperationFailed {
                        message: format!("node '{}' announces no port range", inst.node_id),
                        instance_usable: None,
                        update_repeatable: None,
                    })?;
                    self.retry(run, "allocating port", || {
                        self.allocate_port(&inst.node_id, &inst.id, range, inst.port)
                    })
                    .await
                }
                // Only daemons listen on a leased port.
                _ => Ok(0),
            }
        };
        // The port and the credential do not depend on each other: asked
        // for together, they cost the provision one allocator round trip
        // (and share its commit) instead of two.
        let credential = self.retry(run, "issuing credential", || {
            self.issue_credential(&inst.id, "instance")
        });
        let (port, cred) = tokio::try_join!(port, credential)?;
        secrets.add(&cred);
        let placement = Placement {
            port,
            host: node.info.advertise_host.clone(),
            dir: format!("{}/{}", node.info.data_dir.trim_end_matches('/'), inst.id),
            bind_host: Some(node.info.bind_host.clone())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| DEFAULT_BIND_HOST.to_owned()),
            attributes: json!(node.info.attributes),
        };
        self.store
            .set_placement(&inst.id, placement.clone())
            .await?;
        inst.port = Some(placement.port);
        inst.host = Some(placement.host);
        inst.dir = Some(placement.dir);
        inst.bind_host = Some(placement.bind_host);
        inst.node_attributes = placement.attributes;
        // A template naming something this node does not have (e.g.
        // {{node.postgresql_host}}) fails the provision, not every bind.
        let probe = Credential {
            username: "probe".into(),
            password: "probe".into(),
            ..Default::default()
        };
        answer_for(&inst, &svc, &plan, &cred, "probe", &probe).map_err(|e| {
            Error::OperationFailed {
                message: e.to_string(),
                instance_usable: None,
                update_repeatable: None,
            }
        })?;
        let request = provision_request(&inst, &svc, &plan, &inst.parameters, &cred)?;
        self.retry(run, "starting on node", || {
            self.node_provision(&inst.node_id, request.clone())
        })
        .await
        .map(|_| ())
    }

    async fn update(&self, run: &Run, secrets: &mut Secrets) -> Result<(), Error> {
        let op = &run.op;
        let Some(inst) = self.load_instance(&op.instance_id).await? else {
            return Err(Error::Internal("instance record vanished".into()));
        };
        let plan_id = op
            .target
            .get("plan_id")
            .and_then(Value::as_str)
            .unwrap_or(&inst.plan_id)
            .to_owned();
        let params = op
            .target
            .get("parameters")
            .filter(|p| p.is_object())
            .cloned()
            .unwrap_or_else(|| inst.parameters.clone());
        let (svc, plan) = self.definition(&inst.service_id, &plan_id)?;
        self.retry(run, "waiting for node", || async {
            self.registry.require_live(&inst.node_id)
        })
        .await?;
        let cred = self
            .retry(run, "issuing credential", || {
                self.issue_credential(&inst.id, "instance")
            })
            .await?;
        secrets.add(&cred);
        let request = provision_request(&inst, &svc, &plan, &params, &cred)?;
        let applied = self
            .retry(run, "applying on node", || {
                self.node_provision(&inst.node_id, request.clone())
            })
            .await;
        match applied {
            // The node does not restart a running instance with a changed
            // spec (that would need a stop that keeps the data, which the
            // node API lacks); the instance keeps running unchanged.
            Err(Error::Upstream {
                code: tonic::Code::FailedPrecondition,
                message,
                ..
            }) => Err(Error::OperationFailed {
                message: format!(
                    "the node cannot apply the change to the running instance: {message}"
                ),
                instance_usable: Some(true),
                update_repeatable: Some(false),
            }),
            other => other.map(|_| ()),
        }
    }

    async fn deprovision(&self, run: &Run) -> Result<(), Error> {
        let op = &run.op;
        let Some(inst) = self.load_instance(&op.instance_id).await? else {
            return Ok(());
        };
        let hooks = match self.catalog().existing(&inst.service_id, &inst.plan_id) {
            Some((svc, plan)) if svc.has_hooks(HookEvent::Deprovision) => {
                let cred = self
                    .retry(run, "issuing credential", || {
                        self.issue_credential(&inst.id, "instance")
                    })
                    .await?;
                let vars = instance_vars(&inst, &svc, &plan, &inst.parameters, &cred);
                render_hooks(&svc, HookEvent::Deprovision, &vars)?
            }
            Some(_) => Vec::new(),
            None => {
                tracing::warn!(service_id = %inst.service_id,
                    "service definition gone: deprovisioning without its hooks");
                Vec::new()
            }
        };
        self.retry(run, "removing from node", || {
            self.node_deprovision(&inst, hooks.clone())
        })
        .await?;
        // Both only once the daemon is gone (it held the port and knew the
        // credential); independent of each other, so asked for together.
        let port = self.retry(run, "releasing port", || {
            self.release_port(&inst.node_id, &inst.id)
        });
        let credential = self.retry(run, "revoking credential", || {
            self.revoke_credential(&inst.id)
        });
        tokio::try_join!(port, credential)?;
        // Platforms unbind first, but leftovers must not keep credentials.
        for b in self.store.bindings_of(&inst.id).await? {
            self.retry(run, "revoking binding credential", || {
                self.revoke_credential(&b.id)
            })
            .await?;
        }
        Ok(())
    }

    async fn bind(&self, run: &Run, secrets: &mut Secrets) -> Result<(), Error> {
        let op = &run.op;
        let binding_id = op
            .binding_id
            .clone()
            .ok_or_else(|| Error::Internal("bind without binding id".into()))?;
        let Some(inst) = self.load_instance(&op.instance_id).await? else {
            return Err(Error::Internal("instance record vanished".into()));
        };
        let (svc, plan) = self.definition(&inst.service_id, &inst.plan_id)?;
        // Independent (each idempotent per owner): asked for together, one
        // round trip instead of two.
        let cred = self.retry(run, "issuing binding credential", || {
            self.issue_credential(&binding_id, "binding")
        });
        let icred = self.retry(run, "issuing credential", || {
            self.issue_credential(&inst.id, "instance")
        });
        let (cred, icred) = tokio::try_join!(cred, icred)?;
        secrets.add(&cred);
        secrets.add(&icred);
        // Credentials that cannot render would make every fetch fail: fail
        // the bind instead.
        answer_for(&inst, &svc, &plan, &icred, &binding_id, &cred).map_err(|e| {
            Error::OperationFailed {
                message: e.to_string(),
                instance_usable: None,
                update_repeatable: None,
            }
        })?;
        let req = bind_request(&inst, &svc, &plan, &binding_id, &icred, &cred)?;
        let bound = self
            .retry(run, "binding on node", || {
                self.node_bind(&inst, req.clone())
            })
            .await;
        if let Err(Error::Upstream {
            code: tonic::Code::NotFound,
            ..
        }) = bound
        {
            // The node lost the instance (it restarted and was not told yet):
            // tell it again, then bind.
            let request = provision_request(&inst, &svc, &plan, &inst.parameters, &icred)?;
            self.retry(run, "restoring instance on node", || {
                self.node_provision(&inst.node_id, request.clone())
            })
            .await?;
            self.retry(run, "binding on node", || {
                self.node_bind(&inst, req.clone())
            })
            .await?;
        } else {
            bound?;
        }
        Ok(())
    }

    async fn unbind(&self, run: &Run) -> Result<(), Error> {
        let op = &run.op;
        let binding_id = op
            .binding_id
            .clone()
            .ok_or_else(|| Error::Internal("unbind without binding id".into()))?;
        let Some(inst) = self.load_instance(&op.instance_id).await? else {
            return Ok(());
        };
        // The user name is looked up rather than re-issued: after a resumed
        // unbind the credential may already be revoked, and issuing would
        // create a new one.
        let username = self
            .retry(run, "looking up binding credential", || {
                self.credential_username(&binding_id)
            })
            .await?;
        if let Some(username) = username {
            let hooks = match self.catalog().existing(&inst.service_id, &inst.plan_id) {
                Some((svc, plan)) if svc.has_hooks(HookEvent::Unbind) => {
                    // It exists (just looked up), so issuing returns it.
                    let bcred = self
                        .retry(run, "issuing binding credential", || {
                            self.issue_credential(&binding_id, "binding")
                        })
                        .await?;
                    let icred = self
                        .retry(run, "issuing credential", || {
                            self.issue_credential(&inst.id, "instance")
                        })
                        .await?;
                    let vars = binding_vars(&inst, &svc, &plan, &icred, &binding_id, &bcred);
                    render_hooks(&svc, HookEvent::Unbind, &vars)?
                }
                Some(_) => Vec::new(),
                None => {
                    tracing::warn!(service_id = %inst.service_id,
                        "service definition gone: unbinding without its hooks");
                    Vec::new()
                }
            };
            let req = UnbindRequest {
                instance_id: inst.id.clone(),
                binding_id: binding_id.clone(),
                username,
                hooks,
                kind: self.kind_of(&inst),
                database: database_spec(&inst, &self.kind_of(&inst)),
            };
            self.retry(run, "unbinding on node", || {
                self.node_unbind(&inst, req.clone())
            })
            .await?;
        }
        self.retry(run, "revoking binding credential", || {
            self.revoke_credential(&binding_id)
        })
        .await
    }

    /// Undoes what a failed provision or bind may have taken; one attempt
    /// per step. Returns what could not be undone.
    async fn release_after_failure(&self, op: &OperationRow) -> Option<String> {
        let mut failed = Vec::new();
        match op.action {
            Action::Provision => {
                let inst = match self.load_instance(&op.instance_id).await {
                    Ok(Some(i)) => i,
                    _ => return None,
                };
                // Provision hooks may have run (e.g. an index made on a
                // shared server): the deprovision hooks undo them.
                let hooks = self.deprovision_hooks_best_effort(&inst).await;
                if let Err(e) = self.node_deprovision(&inst, hooks).await {
                    failed.push(format!("node: {e}"));
                }
                if let Err(e) = self.release_port(&inst.node_id, &inst.id).await {
                    failed.push(format!("port: {e}"));
                }
                if let Err(e) = self.revoke_credential(&inst.id).await {
                    failed.push(format!("credential: {e}"));
                }
            }
            Action::Bind => {
                let binding_id = op.binding_id.as_deref()?;
                let inst = match self.load_instance(&op.instance_id).await {
                    Ok(Some(i)) => i,
                    _ => return None,
                };
                if let Ok(Some(username)) = self.credential_username(binding_id).await {
                    let mut hooks = Vec::new();
                    if let Some((svc, plan)) =
                        self.catalog().existing(&inst.service_id, &inst.plan_id)
                        && svc.has_hooks(HookEvent::Unbind)
                        && let (Ok(icred), Ok(bcred)) = (
                            self.issue_credential(&inst.id, "instance").await,
                            self.issue_credential(binding_id, "binding").await,
                        )
                    {
                        let vars = binding_vars(&inst, &svc, &plan, &icred, binding_id, &bcred);
                        hooks = render_hooks(&svc, HookEvent::Unbind, &vars).unwrap_or_default();
                    }
                    let kind = self.kind_of(&inst);
                    let req = UnbindRequest {
                        instance_id: inst.id.clone(),
                        binding_id: binding_id.to_owned(),
                        username,
                        hooks,
                        database: database_spec(&inst, &kind),
                        kind,
                    };
                    if let Err(e) = self.node_unbind(&inst, req).await {
                        failed.push(format!("node: {e}"));
                    }
                }
                if let Err(e) = self.revoke_credential(binding_id).await {
                    failed.push(format!("credential: {e}"));
                }
            }
            // Updates change nothing that needs releasing; deprovision and
            // unbind are repeated by the platform.
            Action::Update | Action::Deprovision | Action::Unbind => {}
        }
        (!failed.is_empty()).then(|| failed.join("; "))
    }

    async fn deprovision_hooks_best_effort(&self, inst: &InstanceRow) -> Vec<Hook> {
        let Some((svc, plan)) = self.catalog().existing(&inst.service_id, &inst.plan_id) else {
            return Vec::new();
        };
        if !svc.has_hooks(HookEvent::Deprovision) {
            return Vec::new();
        }
        let Ok(cred) = self.issue_credential(&inst.id, "instance").await else {
            return Vec::new();
        };
        let vars = instance_vars(inst, &svc, &plan, &inst.parameters, &cred);
        render_hooks(&svc, HookEvent::Deprovision, &vars).unwrap_or_default()
    }

    // ---- rendering --------------------------------------------------------

    /// Renders the answer of a ready binding (re-obtaining the secrets from
    /// the allocator: the gateway stores none).
    pub async fn binding_answer(
        &self,
        inst: &InstanceRow,
        binding: &BindingRow,
    ) -> Result<BindingAnswer, Error> {
        let (svc, plan) = self
            .catalog()
            .existing(&inst.service_id, &inst.plan_id)
            .ok_or_else(|| {
                Error::Internal(format!(
                    "instance {} refers to a plan no longer in the catalog",
                    inst.id
                ))
            })?;
        let icred = self.issue_credential(&inst.id, "instance").await?;
        let bcred = self.issue_credential(&binding.id, "binding").await?;
        answer_for(inst, &svc, &plan, &icred, &binding.id, &bcred)
            .map_err(|e| Error::Internal(e.to_string()))
    }

    // ---- reconciliation ---------------------------------------------------

    /// One pass over every live node (see [`Engine::reconcile_node`]).
    pub async fn reconcile_all(&self) {
        self.stats.passes.fetch_add(1, Ordering::Relaxed);
        for (info, live) in self.registry.snapshot() {
            if *self.shutdown.borrow() {
                return;
            }
            if live {
                self.reconcile_node(&info.node_id, false).await;
            }
        }
    }

    /// Compares what `node_id` holds (`ListInstances`) with the desired
    /// state and repairs the difference:
    /// - a ready instance the node lacks, or has given up on (failed, with
    ///   backoff), is provisioned again (same port, credentials, data) and
    ///   its bindings bound again; after a new boot every instance is (the
    ///   node re-adopts what still runs and needs the spec back);
    /// - a daemon the node restarted gets its bindings applied again (they
    ///   may live in the daemon's memory, like Redis ACL users);
    /// - something no instance owns is removed once it was seen for
    ///   `orphan_grace`.
    ///
    /// What was seen is recorded on each instance. Errors are logged; the
    /// next pass tries again.
    pub async fn reconcile_node(&self, node_id: &str, new_boot: bool) {
        // Listed before the database is read: an instance created meanwhile
        // is then already recorded, so it cannot pass for an orphan.
        let listed = match self.node_list(node_id).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(node_id, error = %e, "cannot list instances of node");
                return;
            }
        };
        let rows = match self.store.instances_on_node(node_id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(node_id, error = %e, "cannot read instances to reconcile");
                return;
            }
        };
        let by_id: HashMap<&str, &InstanceStatus> =
            listed.iter().map(|s| (s.instance_id.as_str(), s)).collect();
        let owned: HashSet<&str> = rows
            .iter()
            .filter(|(i, busy)| *busy || i.state != InstanceState::Failed)
            .map(|(i, _)| i.id.as_str())
            .collect();
        if new_boot && !rows.is_empty() {
            tracing::info!(
                node_id,
                instances = rows.len(),
                "node (re)started: telling it its instances"
            );
        }
        for (inst, busy) in &rows {
            if *self.shutdown.borrow() {
                return;
            }
            if *busy || inst.state != InstanceState::Ready {
                continue;
            }
            let status = by_id.get(inst.id.as_str()).copied();
            self.reconcile_instance(node_id, inst, status, new_boot)
                .await;
        }

        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut memory = self.memory.lock().unwrap_or_else(|p| p.into_inner());
            let orphans: Vec<&InstanceStatus> = listed
                .iter()
                .filter(|s| !owned.contains(s.instance_id.as_str()))
                .collect();
            let present: HashSet<&str> = orphans.iter().map(|s| s.instance_id.as_str()).collect();
            memory
                .orphans
                .retain(|(n, id), _| n != node_id || present.contains(id.as_str()));
            for s in orphans {
                let key = (node_id.to_owned(), s.instance_id.clone());
                let first = *memory.orphans.entry(key).or_insert_with(|| {
                    tracing::warn!(node_id, instance_id = %s.instance_id, kind = %s.kind,
                        grace_ms = self.settings.orphan_grace.as_millis() as u64,
                        "orphan on node: no instance owns it; removing it after the grace period");
                    now
                });
                if now.duration_since(first) >= self.settings.orphan_grace {
                    due.push(s.clone());
                }
            }
        }
        for s in due {
            if *self.shutdown.borrow() {
                return;
            }
            self.remove_orphan(node_id, &s).await;
        }
    }

    async fn reconcile_instance(
        &self,
        node_id: &str,
        inst: &InstanceRow,
        status: Option<&InstanceStatus>,
        new_boot: bool,
    ) {
        let state = status.map_or(NodeState::Unspecified, |s| s.state());
        let seen = observed_name(status);
        let failed = state == NodeState::Failed;
        if failed && inst.observed.as_ref().is_none_or(|o| o.state != "failed") {
            self.stats.failed_seen.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(instance_id = %inst.id, node_id,
                message = status.map_or("", |s| s.message.as_str()),
                "node gave up on instance");
        }
        let now = Instant::now();
        // Restored only after a pause that doubles each time, so that its
        // failure stays visible (GET instance, metadata.attributes) and a
        // daemon that cannot run is not restarted in a tight loop.
        let base = self.settings.interval.saturating_mul(4);
        let failed_due = failed && {
            let mut memory = self.memory.lock().unwrap_or_else(|p| p.into_inner());
            let (_, next) = memory
                .failed
                .entry(inst.id.clone())
                .or_insert((0, now + base));
            now >= *next
        };
        if state == NodeState::Running {
            let mut memory = self.memory.lock().unwrap_or_else(|p| p.into_inner());
            if memory
                .failed
                .get(&inst.id)
                .is_some_and(|(_, next)| now >= *next)
            {
                memory.failed.remove(&inst.id);
            }
        }
        let reason = if status.is_none() {
            Some("missing on its node")
        } else if failed_due {
            Some("its node gave up on it")
        } else if new_boot {
            Some("its node restarted")
        } else {
            None
        };
        let restarted = status.is_some_and(|s| {
            s.state() == NodeState::Running
                && s.pid != 0
                && inst
                    .observed
                    .as_ref()
                    .is_some_and(|o| o.pid != 0 && o.pid != s.pid)
        });

        // What to record (the pid only once its bindings are applied, so a
        // failed re-bind is tried again next pass).
        // A known pid is kept while none runs (restarting, failed, missing):
        // the next pid seen is compared with the last one that ran.
        let previous_pid = inst.observed.as_ref().map_or(0, |o| o.pid);
        let mut record = Observed {
            state: seen.to_owned(),
            message: status.map(|s| s.message.clone()).unwrap_or_default(),
            pid: status.map_or(0, |s| s.pid),
            at: now_ms(),
        };
        if record.pid == 0 {
            record.pid = previous_pid;
        }
        if reason.is_some() || restarted {
            let Some(_lock) = self.lock_settled(&inst.id).await else {
                return;
            };
            if let Some(reason) = reason {
                if failed {
                    let mut memory = self.memory.lock().unwrap_or_else(|p| p.into_inner());
                    let entry = memory.failed.entry(inst.id.clone()).or_insert((0, now));
                    entry.0 += 1;
                    let wait = base
                        .saturating_mul(1 << entry.0.min(16))
                        .min(MAX_FAILED_BACKOFF);
                    entry.1 = now + wait;
                }
                match self.restore(inst).await {
                    Ok(resp) => {
                        self.stats.reprovisioned.fetch_add(1, Ordering::Relaxed);
                        let st = resp.instance.unwrap_or_default();
                        tracing::info!(instance_id = %inst.id, node_id, reason,
                            created = resp.created, pid = st.pid, "instance provisioned again");
                        record = Observed {
                            state: observed_name(Some(&st)).to_owned(),
                            message: st.message.clone(),
                            pid: previous_pid,
                            at: now_ms(),
                        };
                        // Started anew (not re-adopted): what bindings made
                        // inside the daemon is gone.
                        let fresh = resp.created || (st.pid != 0 && st.pid != previous_pid);
                        if !fresh || self.rebind_all(node_id, inst).await {
                            record.pid = st.pid;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(instance_id = %inst.id, node_id, reason, error = %e,
                            "cannot provision instance again");
                        record.message = format!("cannot provision it again: {e}");
                        record.pid = previous_pid;
                    }
                }
            } else if restarted {
                tracing::info!(instance_id = %inst.id, node_id, pid = record.pid,
                    "daemon restarted by its node: applying its bindings again");
                if !self.rebind_all(node_id, inst).await {
                    record.pid = previous_pid;
                }
            }
        }
        self.record_observed(inst, record).await;
    }

    /// Locks an instance for the reconciler and checks (under the lock) that
    /// it is still ready with no operation in progress; `None` otherwise.
    async fn lock_settled(&self, id: &str) -> Option<InstanceLock<'_>> {
        let lock = self.lock_instance(id).await;
        match self.store.get_instance(id).await {
            Ok(Some(v))
                if v.instance.state == InstanceState::Ready
                    && v.last_op
                        .as_ref()
                        .is_none_or(|o| o.state != OpState::InProgress) =>
            {
                Some(lock)
            }
            _ => None,
        }
    }

    /// Provisions an instance again with what it was made of.
    async fn restore(&self, inst: &InstanceRow) -> Result<ProvisionResponse, Error> {
        let (svc, plan) = self.definition(&inst.service_id, &inst.plan_id)?;
        self.hold_port_lease(inst, &svc).await?;
        let cred = self.issue_credential(&inst.id, "instance").await?;
        let request = provision_request(inst, &svc, &plan, &inst.parameters, &cred)?;
        self.node_provision(&inst.node_id, request)
            .await
            .map_err(|e| Error::Internal(scrub(&e.to_string(), &[cred.password.as_str()])))
    }

    /// Makes sure a process instance still leases the port it is recorded
    /// with before it is started there again: a deprovision that failed
    /// after releasing the port leaves the instance ready without its
    /// lease, and the port may since have gone to another instance.
    async fn hold_port_lease(&self, inst: &InstanceRow, svc: &ServiceDef) -> Result<(), Error> {
        let Some(port) = inst.port.filter(|p| *p != 0) else {
            return Ok(());
        };
        if svc.model != Model::Process {
            return Ok(());
        }
        let range = self
            .registry
            .require_live(&inst.node_id)?
            .info
            .port_range
            .ok_or_else(|| {
                Error::Internal(format!("node '{}' announces no port range", inst.node_id))
            })?;
        let leased = self
            .allocate_port(&inst.node_id, &inst.id, range, Some(port))
            .await?;
        if leased != port {
            // Not ours any more: give back the other port it just got.
            let _ = self.release_port(&inst.node_id, &inst.id).await;
            return Err(Error::Internal(format!(
                "port {port} of instance {} is leased to another instance",
                inst.id
            )));
        }
        Ok(())
    }

    /// Binds every ready binding of `inst` again; returns whether all were.
    async fn rebind_all(&self, node_id: &str, inst: &InstanceRow) -> bool {
        let bindings = match self.store.ready_bindings_of(&inst.id).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(instance_id = %inst.id, error = %e, "cannot list bindings");
                return false;
            }
        };
        let Ok((svc, plan)) = self.definition(&inst.service_id, &inst.plan_id) else {
            return false;
        };
        let mut all = true;
        for b in bindings {
            let done = async {
                let icred = self.issue_credential(&inst.id, "instance").await?;
                let bcred = self.issue_credential(&b.id, "binding").await?;
                let req = bind_request(inst, &svc, &plan, &b.id, &icred, &bcred)?;
                self.node_bind(inst, req).await
            }
            .await;
            match done {
                Ok(()) => {
                    self.stats.rebound.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(instance_id = %inst.id, binding_id = %b.id, node_id,
                        "binding applied again");
                }
                Err(e) => {
                    all = false;
                    tracing::warn!(instance_id = %inst.id, binding_id = %b.id, node_id,
                        error = %e, "cannot apply binding again");
                }
            }
        }
        all
    }

    /// Stores what was seen of an instance when it changed (a node's message
    /// is scrubbed of the instance's password first).
    async fn record_observed(&self, inst: &InstanceRow, mut seen: Observed) {
        if !seen.message.is_empty()
            && let Ok(cred) = self.issue_credential(&inst.id, "instance").await
        {
            seen.message = scrub(&seen.message, &[cred.password.as_str()]);
        }
        let unchanged = inst.observed.as_ref().is_some_and(|o| {
            o.state == seen.state && o.message == seen.message && o.pid == seen.pid
        });
        if unchanged {
            return;
        }
        if let Err(e) = self.store.set_observed(&inst.id, seen).await {
            tracing::warn!(instance_id = %inst.id, error = %e, "cannot record observed state");
        }
    }

    /// Removes something from a node that no instance owns, with what it
    /// holds in the allocator for that node.
    async fn remove_orphan(&self, node_id: &str, status: &InstanceStatus) {
        let id = status.instance_id.as_str();
        let _lock = self.lock_instance(id).await;
        // Looked at again under the lock: it may have been claimed since.
        let row = match self.store.get_instance(id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(instance_id = id, error = %e, "cannot check orphan");
                return;
            }
        };
        if let Some(v) = &row {
            let busy = v
                .last_op
                .as_ref()
                .is_some_and(|o| o.state == OpState::InProgress);
            if v.instance.node_id == node_id && (busy || v.instance.state != InstanceState::Failed)
            {
                return;
            }
        }
        let inst = row.as_ref().map(|v| &v.instance);
        // The node says what it is; a database needs its name, which only
        // our record knows (without it the node goes by its own memory).
        let database = inst
            .filter(|i| i.node_id == node_id)
            .and_then(|i| database_spec(i, &status.kind));
        let kind = if status.kind == Model::Database.as_str() && database.is_none() {
            String::new()
        } else {
            status.kind.clone()
        };
        let req = DeprovisionRequest {
            instance_id: id.to_owned(),
            hooks: Vec::new(),
            kind,
            database,
        };
        let removed = self
            .node_call(node_id, NODE_CALL_TIMEOUT, |mut c| async move {
                c.deprovision(req).await
            })
            .await;
        if let Err(e) = removed {
            tracing::warn!(instance_id = id, node_id, error = %e, "cannot remove orphan");
            return;
        }
        // The lease is this node's pool's; the credential only when nothing
        // in the database needs it (a failed instance holds nothing).
        if let Err(e) = self.release_port(node_id, id).await {
            tracing::warn!(instance_id = id, node_id, error = %e, "cannot release orphan's port");
        }
        let failed_here = inst.is_some_and(|i| i.node_id == node_id);
        match self.store.owner_exists(id).await {
            Ok(exists) if !exists || failed_here => {
                if let Err(e) = self.revoke_credential(id).await {
                    tracing::warn!(instance_id = id, error = %e, "cannot revoke orphan's credential");
                }
            }
            _ => {}
        }
        if let Ok(mut memory) = self.memory.lock() {
            memory.orphans.remove(&(node_id.to_owned(), id.to_owned()));
        }
        self.stats.orphans_removed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(instance_id = id, node_id, kind = %status.kind, "orphan removed from node");
    }

    // ---- allocator calls --------------------------------------------------

    async fn allocator_call<T, Fut>(&self, fut: Fut) -> Result<T, Error>
    where
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(ALLOCATOR_CALL_TIMEOUT, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(Error::from_grpc("allocator", status)),
            Err(_) => Err(Error::from_grpc(
                "allocator",
                tonic::Status::deadline_exceeded("call timed out"),
            )),
        }
    }

    async fn allocate_port(
        &self,
        node_id: &str,
        owner: &str,
        range: PortRange,
        preferred: Option<u32>,
    ) -> Result<u32, Error> {
        let mut c = self.allocator.clone();
        let req = AllocatePortRequest {
            pool: node_id.to_owned(),
            owner: owner.to_owned(),
            range: Some(range),
            preferred: preferred.filter(|p| *p != 0),
            exclude: Vec::new(),
        };
        Ok(self.allocator_call(c.allocate_port(req)).await?.port)
    }

    async fn release_port(&self, node_id: &str, owner: &str) -> Result<(), Error> {
        let mut c = self.allocator.clone();
        let req = ReleasePortRequest {
            pool: node_id.to_owned(),
            owner: owner.to_owned(),
        };
        self.allocator_call(c.release_port(req)).await.map(|_| ())
    }

    async fn issue_credential(&self, owner: &str, kind: &str) -> Result<Credential, Error> {
        let mut c = self.allocator.clone();
        let req = IssueCredentialRequest {
            owner: owner.to_owned(),
            kind: kind.to_owned(),
        };
        self.allocator_call(c.issue_credential(req))
            .await?
            .credential
            .ok_or_else(|| Error::Upstream {
                component: "allocator".into(),
                code: tonic::Code::Internal,
                message: "IssueCredential returned no credential".into(),
            })
    }

    async fn revoke_credential(&self, owner: &str) -> Result<(), Error> {
        let mut c = self.allocator.clone();
        let req = RevokeCredentialRequest {
            owner: owner.to_owned(),
        };
        self.allocator_call(c.revoke_credential(req))
            .await
            .map(|_| ())
    }

    async fn credential_username(&self, owner: &str) -> Result<Option<String>, Error> {
        let mut c = self.allocator.clone();
        let req = ListAllocationsRequest {
            pool: None,
            owner: Some(owner.to_owned()),
        };
        let list = self.allocator_call(c.list_allocations(req)).await?;
        Ok(list
            .credentials
            .into_iter()
            .find(|c| c.owner == owner)
            .map(|c| c.username))
    }

    // ---- node calls ---------------------------------------------------------

    async fn node_call<T, F, Fut>(&self, node_id: &str, timeout: Duration, f: F) -> Result<T, Error>
    where
        F: FnOnce(svcbroker_proto::v1::node_agent_client::NodeAgentClient<AuthChannel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let node = self.registry.require_live(node_id)?;
        let component = format!("node '{node_id}'");
        match tokio::time::timeout(timeout, f(node.client)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(Error::from_grpc(&component, status)),
            Err(_) => Err(Error::from_grpc(
                &component,
                tonic::Status::deadline_exceeded("call timed out"),
            )),
        }
    }

    async fn node_list(&self, node_id: &str) -> Result<Vec<InstanceStatus>, Error> {
        let mut request = Request::new(ListInstancesRequest {});
        request.set_timeout(LIST_TIMEOUT);
        self.node_call(node_id, LIST_TIMEOUT, |mut c| async move {
            c.list_instances(request).await
        })
        .await
        .map(|r| r.instances)
    }

    async fn node_provision(
        &self,
        node_id: &str,
        req: ProvisionRequest,
    ) -> Result<ProvisionResponse, Error> {
        let ready = req
            .process
            .as_ref()
            .map_or(0, |p| u64::from(p.ready_timeout_ms));
        // Hooks run after the instance exists, each with its own timeout.
        let hooks: u64 = req.hooks.iter().map(hook_timeout_ms).sum();
        let timeout = Duration::from_millis(ready.max(10_000) + hooks) + PROVISION_SLACK;
        let mut request = Request::new(req);
        request.set_timeout(timeout);
        self.node_call(node_id, timeout, |mut c| async move {
            c.provision(request).await
        })
        .await
    }

    /// Returns the provisioning model of an instance: the one recorded at
    /// creation, else the catalog's ("" when neither knows: the node then
    /// goes by what it remembers).
    fn kind_of(&self, inst: &InstanceRow) -> String {
        inst.kind.clone().unwrap_or_else(|| {
            self.catalog()
                .existing_service(&inst.service_id)
                .map(|s| s.model.as_str().to_owned())
                .unwrap_or_default()
        })
    }

    async fn node_deprovision(&self, inst: &InstanceRow, hooks: Vec<Hook>) -> Result<(), Error> {
        // The kind and database travel with the call: a restarted node may
        // no longer know what the instance was.
        let kind = self.kind_of(inst);
        let timeout =
            NODE_CALL_TIMEOUT + Duration::from_millis(hooks.iter().map(hook_timeout_ms).sum());
        let req = DeprovisionRequest {
            instance_id: inst.id.clone(),
            hooks,
            database: database_spec(inst, &kind),
            kind,
        };
        self.node_call(&inst.node_id, timeout, |mut c| async move {
            c.deprovision(req).await
        })
        .await
        .map(|_| ())
    }

    async fn node_bind(&self, inst: &InstanceRow, mut req: BindRequest) -> Result<(), Error> {
        req.kind = self.kind_of(inst);
        req.database = database_spec(inst, &req.kind);
        let timeout =
            NODE_CALL_TIMEOUT + Duration::from_millis(req.hooks.iter().map(hook_timeout_ms).sum());
        self.node_call(
            &inst.node_id,
            timeout,
            |mut c| async move { c.bind(req).await },
        )
        .await
        .map(|_| ())
    }

    async fn node_unbind(&self, inst: &InstanceRow, mut req: UnbindRequest) -> Result<(), Error> {
        req.kind = self.kind_of(inst);
        req.database = database_spec(inst, &req.kind);
        let timeout =
            NODE_CALL_TIMEOUT + Duration::from_millis(req.hooks.iter().map(hook_timeout_ms).sum());
        self.node_call(&inst.node_id, timeout, |mut c| async move {
            c.unbind(req).await
        })
        .await
        .map(|_| ())
    }
}

/// Scrubs the operation's secrets from a failure's message (it may quote a
/// node's error, e.g. a daemon's stderr).
fn secrets_scrubbed(e: Error, secrets: &Secrets) -> Error {
    match e {
        Error::OperationFailed {
            message,
            instance_usable,
            update_repeatable,
        } => Error::OperationFailed {
            message: secrets.scrub(&message),
            instance_usable,
            update_repeatable,
        },
        Error::ShuttingDown => Error::ShuttingDown,
        Error::Halted => Error::Halted,
        other => Error::OperationFailed {
            message: secrets.scrub(&other.to_string()),
            instance_usable: None,
            update_repeatable: None,
        },
    }
}

fn success_text(action: Action) -> &'static str {
    match action {
        Action::Provision => "service instance provisioned",
        Action::Update => "service instance updated",
        Action::Deprovision => "service instance deprovisioned",
        Action::Bind => "service binding created",
        Action::Unbind => "service binding deleted",
    }
}

/// The name an instance's node state is recorded and shown with.
fn observed_name(status: Option<&InstanceStatus>) -> &'static str {
    match status.map(InstanceStatus::state) {
        None => "missing",
        Some(NodeState::Starting) => "starting",
        Some(NodeState::Running) => "running",
        Some(NodeState::Restarting) => "restarting",
        Some(NodeState::Failed) => "failed",
        Some(NodeState::Unspecified) => "unknown",
    }
}

fn hook_timeout_ms(h: &Hook) -> u64 {
    let ms = match &h.action {
        Some(hook::Action::Command(c)) => c.timeout_ms,
        Some(hook::Action::Http(h)) => h.timeout_ms,
        None => 0,
    };
    // 0 means the node's default of 30 s.
    u64::from(if ms == 0 { 30_000 } else { ms })
}

/// The database of an instance of `kind` "database", as the node needs it.
fn database_spec(inst: &InstanceRow, kind: &str) -> Option<DatabaseSpec> {
    (kind == Model::Database.as_str())
        .then(|| inst.database.clone())
        .flatten()
        .map(|name| DatabaseSpec {
            engine: "postgresql".to_owned(),
            name,
        })
}

/// Returns the template values of an instance: the built-ins, the node's
/// attributes as `node.KEY` and the plan's variables with `params` applied.
pub fn instance_vars(
    inst: &InstanceRow,
    svc: &ServiceDef,
    plan: &PlanDef,
    params: &Value,
    cred: &Credential,
) -> Vars {
    let mut vars = Vars::new();
    for (k, v) in plan.vars_with(params) {
        vars.set(&k, v);
    }
    if let Some(attrs) = inst.node_attributes.as_object() {
        for (k, v) in attrs {
            // "5432" becomes 5432, so that `port: "{{node.postgresql_port}}"`
            // renders a number, like `{{port}}` does.
            let value = match v.as_str().map(|s| (s, s.parse::<u64>())) {
                Some((s, Ok(n))) if !s.starts_with('0') || s == "0" => json!(n),
                _ => v.clone(),
            };
            vars.set(&format!("{}{k}", svcbroker_svcdef::NODE_VAR_PREFIX), value);
        }
    }
    vars.set("instance_id", inst.id.as_str())
        .set("name", inst.id.as_str())
        .set("service", svc.name.as_str())
        .set("plan", plan.name.as_str())
        .set("node_id", inst.node_id.as_str())
        .set("host", inst.host.clone().unwrap_or_default())
        .set("port", inst.port.unwrap_or(0))
        .set("dir", inst.dir.clone().unwrap_or_default())
        .set(
            "bind_host",
            inst.bind_host
                .clone()
                .unwrap_or_else(|| DEFAULT_BIND_HOST.to_owned()),
        )
        .set("database", inst.database.clone().unwrap_or_default())
        .set("username", cred.username.as_str())
        .set("password", cred.password.as_str());
    vars
}

/// Returns the template values of a binding: the instance's and the
/// binding's credential.
fn binding_vars(
    inst: &InstanceRow,
    svc: &ServiceDef,
    plan: &PlanDef,
    icred: &Credential,
    binding_id: &str,
    bcred: &Credential,
) -> Vars {
    let mut vars = instance_vars(inst, svc, plan, &inst.parameters, icred);
    vars.set("binding_id", binding_id)
        .set("binding.username", bcred.username.as_str())
        .set("binding.password", bcred.password.as_str());
    vars
}

/// Renders the credentials (and volume mounts) a binding answers with.
fn answer_for(
    inst: &InstanceRow,
    svc: &ServiceDef,
    plan: &PlanDef,
    icred: &Credential,
    binding_id: &str,
    bcred: &Credential,
) -> Result<BindingAnswer, Error> {
    let vars = binding_vars(inst, svc, plan, icred, binding_id, bcred);
    let mut credentials = svc.render_credentials(&vars).map_err(|e| {
        Error::Internal(format!(
            "cannot render the credentials of service '{}': {e}",
            svc.name
        ))
    })?;
    let dir = inst.dir.clone().unwrap_or_default();
    // The contract of the directory model: where the data lives, whatever
    // the template says.
    if svc.model == Model::Directory {
        credentials.insert("path".into(), json!(dir));
    }
    let volume_mounts = if svc.requires_volume_mount {
        svc.render_volume_mount(&vars, &inst.id, &dir)
            .map_err(|e| {
                Error::Internal(format!(
                    "cannot render the volume mount of service '{}': {e}",
                    svc.name
                ))
            })?
            .map(|v| vec![v])
    } else {
        None
    };
    Ok(BindingAnswer {
        credentials,
        volume_mounts,
    })
}

fn render_failed(what: &str, svc: &ServiceDef, e: impl std::fmt::Display) -> Error {
    Error::OperationFailed {
        message: format!("cannot render the {what} of service '{}': {e}", svc.name),
        instance_usable: None,
        update_repeatable: Some(false),
    }
}

/// Renders the hooks of `event` into their wire form.
fn render_hooks(svc: &ServiceDef, event: HookEvent, vars: &Vars) -> Result<Vec<Hook>, Error> {
    let rendered = svc
        .render_hooks(event, vars)
        .map_err(|e| render_failed("hooks", svc, e))?;
    Ok(rendered
        .into_iter()
        .map(|h| Hook {
            action: Some(match h {
                RenderedHook::Command {
                    argv,
                    env,
                    stdin,
                    timeout_ms,
                } => hook::Action::Command(CommandHook {
                    argv,
                    env: env.into_iter().collect(),
                    stdin,
                    timeout_ms,
                }),
                RenderedHook::Http {
                    method,
                    url,
                    headers,
                    body,
                    timeout_ms,
                    accept_status,
                } => hook::Action::Http(HttpHook {
                    method,
                    url,
                    headers: headers.into_iter().collect(),
                    body,
                    timeout_ms,
                    accept_status: accept_status.into_iter().map(u32::from).collect(),
                }),
            }),
        })
        .collect())
}

/// Builds the node Bind request of a binding.
fn bind_request(
    inst: &InstanceRow,
    svc: &ServiceDef,
    plan: &PlanDef,
    binding_id: &str,
    icred: &Credential,
    bcred: &Credential,
) -> Result<BindRequest, Error> {
    let vars = binding_vars(inst, svc, plan, icred, binding_id, bcred);
    Ok(BindRequest {
        instance_id: inst.id.clone(),
        binding_id: binding_id.to_owned(),
        username: bcred.username.clone(),
        password: bcred.password.clone(),
        hooks: render_hooks(svc, HookEvent::Bind, &vars)?,
        // Set by `node_bind` from the instance.
        kind: String::new(),
        database: None,
    })
}

/// Builds the node Provision request of an instance.
fn provision_request(
    inst: &InstanceRow,
    svc: &ServiceDef,
    plan: &PlanDef,
    params: &Value,
    cred: &Credential,
) -> Result<ProvisionRequest, Error> {
    let vars = instance_vars(inst, svc, plan, params, cred);
    let rendered = svc
        .render_process(&vars)
        .map_err(|e| render_failed("process", svc, e))?;
    let process = rendered.map(|p| ProcessSpec {
        argv: p.argv,
        env: p.env.into_iter().collect(),
        files: p
            .files
            .into_iter()
            .map(|(path, content, mode)| FileSpec {
                path,
                content,
                mode,
            })
            .collect(),
        ready_timeout_ms: p.ready_timeout_ms,
    });
    let database = match svc.model {
        Model::Database => Some(DatabaseSpec {
            engine: svc.database_engine().unwrap_or("postgresql").to_owned(),
            name: inst.database.clone().ok_or_else(|| Error::OperationFailed {
                message: format!(
                    "instance {} has no database name (recorded before database services existed)",
                    inst.id
                ),
                instance_usable: None,
                update_repeatable: Some(false),
            })?,
        }),
        _ => None,
    };
    let directory = match svc.model {
        Model::Directory => Some(DirectorySpec {
            size_limit_bytes: svc
                .render_directory_limit(&vars)
                .map_err(|e| render_failed("directory size limit", svc, e))?
                .unwrap_or(0),
        }),
        _ => None,
    };
    Ok(ProvisionRequest {
        instance_id: inst.id.clone(),
        service: svc.name.clone(),
        plan: plan.name.clone(),
        kind: svc.model.as_str().to_owned(),
        port: inst.port.unwrap_or(0),
        process,
        database,
        directory,
        hooks: render_hooks(svc, HookEvent::Provision, &vars)?,
    })
}
