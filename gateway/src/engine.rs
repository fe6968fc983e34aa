//! The operations engine: drives every recorded operation to `succeeded` or
//! `failed`, talking gRPC to the allocator and the nodes.
//!
//! Every step is idempotent (the allocator's calls are idempotent per owner,
//! the node's per instance and binding), so an operation is driven by simply
//! running all of its steps again from the top: that is how a gateway
//! restarted after SIGKILL resumes the operations it left `in progress`.
//! Transient errors (a component down, a transport timeout) are retried with
//! backoff until the operation's deadline; permanent ones fail at once. A
//! failed provision or bind releases what it took (node instance, port,
//! credential).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use svcbroker_proto::v1::allocator_client::AllocatorClient;
use svcbroker_proto::v1::{
    AllocatePortRequest, BindRequest, Credential, DeprovisionRequest, FileSpec,
    IssueCredentialRequest, ListAllocationsRequest, PortRange, ProcessSpec, ProvisionRequest,
    ReleasePortRequest, RevokeCredentialRequest, UnbindRequest,
};
use svcbroker_svcdef::{Catalog, Model, PlanDef, ServiceDef, Vars};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, scrub};
use crate::registry::{NODE_CALL_TIMEOUT, NodeRegistry};
use crate::store::{
    Action, BindingRow, InstanceRow, OpState, OperationRow, Outcome, Store, now_ms,
};

/// How long one allocator call may take.
const ALLOCATOR_CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Extra time a node Provision call gets on top of the daemon's readiness
/// timeout.
const PROVISION_SLACK: Duration = Duration::from_secs(30);
/// Longest pause between two attempts of a transient failure.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Shared state of the engine.
pub struct Engine {
    store: Store,
    catalog: Arc<Catalog>,
    registry: NodeRegistry,
    allocator: AllocatorClient<Channel>,
    shutdown: watch::Receiver<bool>,
    waiters: Mutex<HashMap<String, watch::Sender<bool>>>,
    tasks: Mutex<JoinSet<()>>,
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

impl Engine {
    /// Builds the engine; `allocator_url` is connected lazily, so a down
    /// allocator delays operations instead of failing startup.
    pub fn new(
        store: Store,
        catalog: Arc<Catalog>,
        registry: NodeRegistry,
        allocator_url: &str,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Engine>, Error> {
        let endpoint = Endpoint::from_shared(allocator_url.to_owned())
            .map_err(|e| Error::BadRequest(format!("invalid allocator_url: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        Ok(Arc::new(Engine {
            store,
            catalog,
            registry,
            allocator: AllocatorClient::new(endpoint.connect_lazy()),
            shutdown,
            waiters: Mutex::new(HashMap::new()),
            tasks: Mutex::new(JoinSet::new()),
        }))
    }

    /// Returns the store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Returns the catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Returns the node registry.
    pub fn registry(&self) -> &NodeRegistry {
        &self.registry
    }

    /// Starts driving `op` in the background. Does nothing once shutdown has
    /// begun: the operation stays `in progress` and resumes at next start.
    pub fn spawn(self: &Arc<Self>, op: OperationRow) {
        if *self.shutdown.borrow() {
            return;
        }
        if let Ok(mut w) = self.waiters.lock() {
            w.entry(op.id.clone())
                .or_insert_with(|| watch::channel(false).0);
        }
        let engine = Arc::clone(self);
        let span = tracing::info_span!("operation", op_id = %op.id, action = %op.action,
            instance_id = %op.instance_id, binding_id = op.binding_id.as_deref().unwrap_or(""));
        let Ok(mut tasks) = self.tasks.lock() else {
            return;
        };
        // Reap finished drivers so the set does not grow without bound.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(tracing::Instrument::instrument(
            async move { engine.drive(op).await },
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

    async fn drive(self: Arc<Self>, op: OperationRow) {
        let mut secrets = Secrets::default();
        let result = match op.action {
            Action::Provision => self.provision(&op, &mut secrets).await,
            Action::Update => self.update(&op, &mut secrets).await,
            Action::Deprovision => self.deprovision(&op).await,
            Action::Bind => self.bind(&op, &mut secrets).await,
            Action::Unbind => self.unbind(&op).await,
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
                tracing::warn!(error = %secrets.scrub(&message), "operation failed");
                if let Some(cleanup) = self.release_after_failure(&op).await {
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
                    description: Some(secrets.scrub(&format!("{} failed: {message}", op.action))),
                    instance_usable,
                    update_repeatable,
                }
            }
        };
        if let Err(e) = self.store.finish_op(&op.id, outcome).await {
            // The operation stays in progress and is resumed at next start.
            tracing::error!(error = %e, "cannot record the end of the operation");
        }
        if let Ok(mut w) = self.waiters.lock()
            && let Some(tx) = w.remove(&op.id)
        {
            let _ = tx.send(true);
        }
    }

    /// Runs `f` until it succeeds, fails permanently, or the operation's
    /// deadline passes; transient errors are noted in the operation's
    /// description so that last_operation tells what it waits for.
    async fn retry<T, F, Fut>(&self, op: &OperationRow, step: &str, mut f: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
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
            }
            delay = (delay * 2).min(MAX_BACKOFF);
        }
    }

    fn service_and_plan(
        &self,
        service_id: &str,
        plan_id: &str,
    ) -> Result<(&ServiceDef, &PlanDef), Error> {
        let svc = self
            .catalog
            .service(service_id)
            .ok_or_else(|| Error::OperationFailed {
                message: format!("service '{service_id}' is no longer in the catalog"),
                instance_usable: None,
                update_repeatable: Some(false),
            })?;
        let plan = svc.plan(plan_id).ok_or_else(|| Error::OperationFailed {
            message: format!("plan '{plan_id}' is no longer in the catalog"),
            instance_usable: None,
            update_repeatable: Some(false),
        })?;
        Ok((svc, plan))
    }

    async fn load_instance(&self, instance_id: &str) -> Result<Option<InstanceRow>, Error> {
        Ok(self
            .store
            .get_instance(instance_id)
            .await?
            .map(|v| v.instance))
    }

    // ---- steps ----------------------------------------------------------

    async fn provision(&self, op: &OperationRow, secrets: &mut Secrets) -> Result<(), Error> {
        let Some(mut inst) = self.load_instance(&op.instance_id).await? else {
            return Err(Error::Internal("instance record vanished".into()));
        };
        let (svc, plan) = self.service_and_plan(&inst.service_id, &inst.plan_id)?;
        let node = self
            .retry(op, "waiting for node", || async {
                self.registry.require_live(&inst.node_id)
            })
            .await?;
        let port = match svc.model {
            Model::Process => {
                let range = node.info.port_range.ok_or_else(|| Error::OperationFailed {
                    message: format!("node '{}' announces no port range", inst.node_id),
                    instance_usable: None,
                    update_repeatable: None,
                })?;
                self.retry(op, "allocating port", || {
                    self.allocate_port(&inst.node_id, &inst.id, range, inst.port)
                })
                .await?
            }
            // Only daemons listen on a leased port; other models (none, and
            // those the node may learn later) get 0.
            _ => 0,
        };
        let dir = format!("{}/{}", node.info.data_dir.trim_end_matches('/'), inst.id);
        let host = node.info.advertise_host.clone();
        self.store
            .set_placement(&inst.id, port, &host, &dir)
            .await?;
        inst.port = Some(port);
        inst.host = Some(host);
        inst.dir = Some(dir);
        let cred = self
            .retry(op, "issuing credential", || {
                self.issue_credential(&inst.id, "instance")
            })
            .await?;
        secrets.add(&cred);
        let request = provision_request(&inst, svc, plan, &inst.parameters, &cred)?;
        self.retry(op, "starting on node", || {
            self.node_provision(&inst.node_id, request.clone())
        })
        .await
    }

    async fn update(&self, op: &OperationRow, secrets: &mut Secrets) -> Result<(), Error> {
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
        let (svc, plan) = self.service_and_plan(&inst.service_id, &plan_id)?;
        self.retry(op, "waiting for node", || async {
            self.registry.require_live(&inst.node_id)
        })
        .await?;
        let cred = self
            .retry(op, "issuing credential", || {
                self.issue_credential(&inst.id, "instance")
            })
            .await?;
        secrets.add(&cred);
        let request = provision_request(&inst, svc, plan, &params, &cred)?;
        let applied = self
            .retry(op, "applying on node", || {
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
            other => other,
        }
    }

    async fn deprovision(&self, op: &OperationRow) -> Result<(), Error> {
        let Some(inst) = self.load_instance(&op.instance_id).await? else {
            return Ok(());
        };
        self.retry(op, "removing from node", || self.node_deprovision(&inst))
            .await?;
        self.retry(op, "releasing port", || {
            self.release_port(&inst.node_id, &inst.id)
        })
        .await?;
        self.retry(op, "revoking credential", || {
            self.revoke_credential(&inst.id)
        })
        .await?;
        // Platforms unbind first, but leftovers must not keep credentials.
        for b in self.store.bindings_of(&inst.id).await? {
            self.retry(op, "revoking binding credential", || {
                self.revoke_credential(&b.id)
            })
            .await?;
        }
        Ok(())
    }

    async fn bind(&self, op: &OperationRow, secrets: &mut Secrets) -> Result<(), Error> {
        let binding_id = op
            .binding_id
            .clone()
            .ok_or_else(|| Error::Internal("bind without binding id".into()))?;
        let Some(inst) = self.load_instance(&op.instance_id).await? else {
            return Err(Error::Internal("instance record vanished".into()));
        };
        let cred = self
            .retry(op, "issuing binding credential", || {
                self.issue_credential(&binding_id, "binding")
            })
            .await?;
        secrets.add(&cred);
        let req = BindRequest {
            instance_id: inst.id.clone(),
            binding_id: binding_id.clone(),
            username: cred.username.clone(),
            password: cred.password.clone(),
            ..Default::default()
        };
        let bound = self
            .retry(op, "binding on node", || self.node_bind(&inst, req.clone()))
            .await;
        if let Err(Error::Upstream {
            code: tonic::Code::NotFound,
            ..
        }) = bound
        {
            // The node lost the instance (it restarted and was not told yet):
            // tell it again, then bind.
            let (svc, plan) = self.service_and_plan(&inst.service_id, &inst.plan_id)?;
            let icred = self
                .retry(op, "issuing credential", || {
                    self.issue_credential(&inst.id, "instance")
                })
                .await?;
            secrets.add(&icred);
            let request = provision_request(&inst, svc, plan, &inst.parameters, &icred)?;
            self.retry(op, "restoring instance on node", || {
                self.node_provision(&inst.node_id, request.clone())
            })
            .await?;
            self.retry(op, "binding on node", || self.node_bind(&inst, req.clone()))
                .await?;
        } else {
            bound?;
        }
        Ok(())
    }

    async fn unbind(&self, op: &OperationRow) -> Result<(), Error> {
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
            .retry(op, "looking up binding credential", || {
                self.credential_username(&binding_id)
            })
            .await?;
        if let Some(username) = username {
            let req = UnbindRequest {
                instance_id: inst.id.clone(),
                binding_id: binding_id.clone(),
                username,
                ..Default::default()
            };
            self.retry(op, "unbinding on node", || {
                self.node_unbind(&inst, req.clone())
            })
            .await?;
        }
        self.retry(op, "revoking binding credential", || {
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
                if let Err(e) = self.node_deprovision(&inst).await {
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
                    let req = UnbindRequest {
                        instance_id: inst.id.clone(),
                        binding_id: binding_id.to_owned(),
                        username,
                        ..Default::default()
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

    // ---- rendering --------------------------------------------------------

    /// Renders the credentials of a ready binding (re-obtaining the secrets
    /// from the allocator: the gateway stores none).
    pub async fn binding_credentials(
        &self,
        inst: &InstanceRow,
        binding: &BindingRow,
    ) -> Result<Map<String, Value>, Error> {
        let (svc, plan) = self
            .catalog
            .service(&inst.service_id)
            .and_then(|s| s.plan(&inst.plan_id).map(|p| (s, p)))
            .ok_or_else(|| {
                Error::Internal(format!(
                    "instance {} refers to a plan no longer in the catalog",
                    inst.id
                ))
            })?;
        let icred = self.issue_credential(&inst.id, "instance").await?;
        let bcred = self.issue_credential(&binding.id, "binding").await?;
        let mut vars = instance_vars(inst, svc, plan, &inst.parameters, &icred);
        vars.set("binding_id", binding.id.as_str())
            .set("binding.username", bcred.username.as_str())
            .set("binding.password", bcred.password.as_str());
        svc.render_credentials(&vars)
            .map_err(|e| Error::Internal(format!("cannot render credentials: {e}")))
    }

    // ---- reconciliation ---------------------------------------------------

    /// Tells a node that (re)started everything the database places on it:
    /// each settled instance is provisioned again (same port, same
    /// credentials; the node re-adopts what still runs) and its bindings
    /// bound again. Errors are logged; the next boot or operation retries.
    pub async fn reconcile_node(&self, node_id: &str) {
        let settled = match self.store.settled_on_node(node_id).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(node_id, error = %e, "cannot list instances to reconcile");
                return;
            }
        };
        if settled.is_empty() {
            return;
        }
        tracing::info!(
            node_id,
            instances = settled.len(),
            "re-provisioning instances on node"
        );
        for (inst, bindings) in settled {
            if *self.shutdown.borrow() {
                return;
            }
            let Some((svc, plan)) = self
                .catalog
                .service(&inst.service_id)
                .and_then(|s| s.plan(&inst.plan_id).map(|p| (s, p)))
            else {
                tracing::warn!(instance_id = %inst.id, "plan no longer in the catalog; not restored");
                continue;
            };
            let restored = async {
                let cred = self.issue_credential(&inst.id, "instance").await?;
                let request = provision_request(&inst, svc, plan, &inst.parameters, &cred)?;
                self.node_provision(node_id, request).await?;
                for b in &bindings {
                    let bc = self.issue_credential(&b.id, "binding").await?;
                    self.node_bind(
                        &inst,
                        BindRequest {
                            instance_id: inst.id.clone(),
                            binding_id: b.id.clone(),
                            username: bc.username,
                            password: bc.password,
                            ..Default::default()
                        },
                    )
                    .await?;
                }
                Ok::<(), Error>(())
            }
            .await;
            match restored {
                Ok(()) => tracing::info!(instance_id = %inst.id, node_id, "instance restored"),
                Err(e) => {
                    tracing::warn!(instance_id = %inst.id, node_id, error = %e, "cannot restore instance")
                }
            }
        }
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
        F: FnOnce(svcbroker_proto::v1::node_agent_client::NodeAgentClient<Channel>) -> Fut,
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

    async fn node_provision(&self, node_id: &str, req: ProvisionRequest) -> Result<(), Error> {
        let ready = req
            .process
            .as_ref()
            .map_or(0, |p| u64::from(p.ready_timeout_ms));
        let timeout = Duration::from_millis(ready.max(10_000)) + PROVISION_SLACK;
        let mut request = Request::new(req);
        request.set_timeout(timeout);
        self.node_call(node_id, timeout, |mut c| async move {
            c.provision(request).await
        })
        .await
        .map(|_| ())
    }

    /// Returns the provisioning model of an instance's service ("" when the
    /// service left the catalog: the node then goes by what it remembers).
    fn kind_of(&self, inst: &InstanceRow) -> String {
        self.catalog
            .service(&inst.service_id)
            .map(|s| s.model.as_str().to_owned())
            .unwrap_or_default()
    }

    async fn node_deprovision(&self, inst: &InstanceRow) -> Result<(), Error> {
        // The kind travels with the call: a restarted node may no longer
        // know what the instance was.
        let req = DeprovisionRequest {
            instance_id: inst.id.clone(),
            kind: self.kind_of(inst),
            ..Default::default()
        };
        self.node_call(&inst.node_id, NODE_CALL_TIMEOUT, |mut c| async move {
            c.deprovision(req).await
        })
        .await
        .map(|_| ())
    }

    async fn node_bind(&self, inst: &InstanceRow, mut req: BindRequest) -> Result<(), Error> {
        req.kind = self.kind_of(inst);
        self.node_call(&inst.node_id, NODE_CALL_TIMEOUT, |mut c| async move {
            c.bind(req).await
        })
        .await
        .map(|_| ())
    }

    async fn node_unbind(&self, inst: &InstanceRow, mut req: UnbindRequest) -> Result<(), Error> {
        req.kind = self.kind_of(inst);
        self.node_call(&inst.node_id, NODE_CALL_TIMEOUT, |mut c| async move {
            c.unbind(req).await
        })
        .await
        .map(|_| ())
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

/// Returns the template values of an instance: the built-ins and the plan's
/// variables with `params` applied.
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
    vars.set("instance_id", inst.id.as_str())
        .set("name", inst.id.as_str())
        .set("service", svc.name.as_str())
        .set("plan", plan.name.as_str())
        .set("node_id", inst.node_id.as_str())
        .set("host", inst.host.clone().unwrap_or_default())
        .set("port", inst.port.unwrap_or(0))
        .set("dir", inst.dir.clone().unwrap_or_default())
        .set("username", cred.username.as_str())
        .set("password", cred.password.as_str());
    vars
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
        .map_err(|e| Error::OperationFailed {
            message: format!("cannot render the process of service '{}': {e}", svc.name),
            instance_usable: None,
            update_repeatable: Some(false),
        })?;
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
    Ok(ProvisionRequest {
        instance_id: inst.id.clone(),
        service: svc.name.clone(),
        plan: plan.name.clone(),
        kind: svc.model.as_str().to_owned(),
        port: inst.port.unwrap_or(0),
        process,
        ..Default::default()
    })
}
