//! Desired state in SQLite: service instances, bindings and operations.
//!
//! One connection lives on a dedicated thread; async callers send it closures
//! over a channel ([`Store::call`]), so no SQLite call ever blocks a tokio
//! worker. Every mutation is atomic on its own (a savepoint, see below).
//! Uniqueness is the database's job: a duplicate instance or binding id hits
//! the primary key, and "one operation in progress per instance / per
//! binding" is a partial UNIQUE index, so two racing requests cannot both
//! win.
//!
//! Commits are grouped: the thread runs every job queued at once in one
//! transaction (each job a savepoint in it), commits and syncs the WAL a
//! single time, and only then answers them ([`run_batch`]), so concurrent
//! requests share an fsync and none is answered before its commit is on
//! disk.
//!
//! Secrets are never stored here: credentials are re-obtained from the
//! allocator (whose `IssueCredential` is idempotent per owner).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, params};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::error::Error;

/// The schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i32 = 2;

const SCHEMA_V1: &str = "
CREATE TABLE instances (
    id                  TEXT PRIMARY KEY,
    service_id          TEXT NOT NULL,
    plan_id             TEXT NOT NULL,
    node_id             TEXT NOT NULL,
    port                INTEGER,
    host                TEXT,
    dir                 TEXT,
    parameters          TEXT NOT NULL,
    context             TEXT NOT NULL,
    organization_guid   TEXT,
    space_guid          TEXT,
    maintenance_version TEXT,
    state               TEXT NOT NULL CHECK (state IN
                          ('provisioning', 'ready', 'updating', 'deprovisioning', 'failed')),
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
) STRICT;
CREATE INDEX instances_node ON instances (node_id);

CREATE TABLE bindings (
    id            TEXT PRIMARY KEY,
    instance_id   TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    service_id    TEXT NOT NULL,
    plan_id       TEXT NOT NULL,
    parameters    TEXT NOT NULL,
    context       TEXT NOT NULL,
    bind_resource TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('binding', 'ready', 'unbinding', 'failed')),
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
) STRICT;
CREATE INDEX bindings_instance ON bindings (instance_id);

-- Operations outlive their instance or binding: after a deprovision the
-- succeeded operation is what makes last_operation answer 410 Gone.
CREATE TABLE operations (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,
    instance_id       TEXT NOT NULL,
    binding_id        TEXT,
    action            TEXT NOT NULL CHECK (action IN
                        ('provision', 'update', 'deprovision', 'bind', 'unbind')),
    state             TEXT NOT NULL CHECK (state IN ('in progress', 'succeeded', 'failed')),
    description       TEXT,
    step              TEXT,
    target            TEXT NOT NULL DEFAULT '{}',
    instance_usable   INTEGER,
    update_repeatable INTEGER,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    deadline          INTEGER NOT NULL
) STRICT;
-- At most one operation in progress per instance (instance-level actions)
-- and per binding: the OSB ConcurrencyError is this constraint.
CREATE UNIQUE INDEX operations_one_per_instance ON operations (instance_id)
    WHERE state = 'in progress' AND binding_id IS NULL;
CREATE UNIQUE INDEX operations_one_per_binding ON operations (binding_id)
    WHERE state = 'in progress' AND binding_id IS NOT NULL;
CREATE INDEX operations_instance ON operations (instance_id, seq);
CREATE INDEX operations_binding ON operations (binding_id, seq);
";

/// Version 2: what the node models beyond `process` need to be told again
/// without the catalog (kind, database name, bind host, node attributes),
/// and what the reconciler last saw of the instance on its node.
const SCHEMA_V2: &str = "
ALTER TABLE instances ADD COLUMN kind TEXT;
ALTER TABLE instances ADD COLUMN database_name TEXT;
ALTER TABLE instances ADD COLUMN bind_host TEXT;
ALTER TABLE instances ADD COLUMN node_attributes TEXT NOT NULL DEFAULT '{}';
ALTER TABLE instances ADD COLUMN observed_state TEXT;
ALTER TABLE instances ADD COLUMN observed_message TEXT;
ALTER TABLE instances ADD COLUMN observed_pid INTEGER;
ALTER TABLE instances ADD COLUMN observed_at INTEGER;
-- One database per instance: a name is never given out twice.
CREATE UNIQUE INDEX instances_database ON instances (database_name)
    WHERE database_name IS NOT NULL;
";

/// Description of a provision halted by a deprovision request.
pub const HALTED_DESCRIPTION: &str =
    "provision failed: halted by a deprovision request received while provisioning";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $variant),+ }
        impl $name {
            /// Returns the name stored in the database.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }
            fn parse(s: &str) -> Result<Self, Error> {
                match s {
                    $($s => Ok($name::$variant),)+
                    other => Err(Error::Internal(format!(
                        concat!("unknown ", stringify!($name), " {:?} in database"), other))),
                }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// Lifecycle state of a service instance.
    InstanceState {
        /// The provision operation is in progress.
        Provisioning => "provisioning",
        /// Provisioned; usable.
        Ready => "ready",
        /// An update operation is in progress.
        Updating => "updating",
        /// The deprovision operation is in progress.
        Deprovisioning => "deprovisioning",
        /// Provisioning failed and what it took was released; a DELETE
        /// removes the record, an identical PUT tries again.
        Failed => "failed",
    }
);

string_enum!(
    /// Lifecycle state of a service binding.
    BindingState {
        /// The bind operation is in progress.
        Binding => "binding",
        /// Bound; fetchable.
        Ready => "ready",
        /// The unbind operation is in progress.
        Unbinding => "unbinding",
        /// Binding failed and what it took was released.
        Failed => "failed",
    }
);

string_enum!(
    /// What an operation does.
    Action {
        /// Create an instance.
        Provision => "provision",
        /// Change an instance's plan or parameters.
        Update => "update",
        /// Remove an instance.
        Deprovision => "deprovision",
        /// Create a binding.
        Bind => "bind",
        /// Remove a binding.
        Unbind => "unbind",
    }
);

string_enum!(
    /// OSB operation state, spelled as in `last_operation`.
    OpState {
        /// Still running.
        InProgress => "in progress",
        /// Done.
        Succeeded => "succeeded",
        /// Gave up; what it took was released.
        Failed => "failed",
    }
);

/// A stored service instance.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRow {
    /// OSB instance id.
    pub id: String,
    /// Catalog service id.
    pub service_id: String,
    /// Catalog plan id (the current plan; an update's new plan is applied
    /// when it succeeds).
    pub plan_id: String,
    /// The node it is placed on.
    pub node_id: String,
    /// The leased port, once allocated (0 for model `none`).
    pub port: Option<u32>,
    /// The node's advertised host, recorded at provisioning so that
    /// credentials render without the node being reachable.
    pub host: Option<String>,
    /// The instance directory on the node.
    pub dir: Option<String>,
    /// Request parameters (a JSON object).
    pub parameters: Value,
    /// OSB context object.
    pub context: Value,
    /// Deprecated OSB field, kept as sent.
    pub organization_guid: Option<String>,
    /// Deprecated OSB field, kept as sent.
    pub space_guid: Option<String>,
    /// `maintenance_info.version` the instance runs.
    pub maintenance_version: Option<String>,
    /// Lifecycle state.
    pub state: InstanceState,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    /// Milliseconds since the epoch.
    pub updated_at: i64,
    /// Provisioning model at creation ("process", "database", ...), so that
    /// the node can be told what to remove even after the service left the
    /// catalog. `None` for instances recorded before schema version 2.
    pub kind: Option<String>,
    /// A unique name generated at creation (`^[a-z_][a-z0-9_]{0,62}$`): the
    /// database of a `database` instance, the `{{database}}` of any other.
    pub database: Option<String>,
    /// The address the node's daemons listen on, recorded at placement.
    pub bind_host: Option<String>,
    /// The node's attributes (`{{node.KEY}}`), recorded at placement so that
    /// credentials render without the node.
    pub node_attributes: Value,
    /// What the reconciler last saw of it on its node.
    pub observed: Option<Observed>,
}

/// What the reconciler saw of an instance on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// "starting", "running", "restarting", "failed" or "missing".
    pub state: String,
    /// The node's detail (already scrubbed of secrets).
    pub message: String,
    /// Process id of its daemon (0 when none runs).
    pub pid: u32,
    /// When it was seen so (milliseconds since the epoch).
    pub at: i64,
}

/// Where an instance landed: what its node said about itself when the
/// instance was placed there.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// The leased port (0 for models without a daemon).
    pub port: u32,
    /// The node's advertised host.
    pub host: String,
    /// The instance directory on the node.
    pub dir: String,
    /// The address daemons listen on.
    pub bind_host: String,
    /// The node's attributes (a JSON object of strings).
    pub attributes: Value,
}

/// A stored service binding.
#[derive(Debug, Clone, PartialEq)]
pub struct BindingRow {
    /// OSB binding id.
    pub id: String,
    /// The instance it belongs to.
    pub instance_id: String,
    /// Catalog service id as sent.
    pub service_id: String,
    /// Catalog plan id as sent.
    pub plan_id: String,
    /// Request parameters (a JSON object).
    pub parameters: Value,
    /// OSB context object.
    pub context: Value,
    /// OSB `bind_resource` (with a top-level `app_guid` folded in).
    pub bind_resource: Value,
    /// Lifecycle state.
    pub state: BindingState,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    /// Milliseconds since the epoch.
    pub updated_at: i64,
}

/// A stored operation.
#[derive(Debug, Clone, PartialEq)]
pub struct OperationRow {
    /// Operation id, returned to the platform as `operation`.
    pub id: String,
    /// The instance it acts on.
    pub instance_id: String,
    /// The binding it acts on (bind and unbind).
    pub binding_id: Option<String>,
    /// What it does.
    pub action: Action,
    /// OSB state.
    pub state: OpState,
    /// User-facing progress or failure message (never a secret).
    pub description: Option<String>,
    /// The step it reached, for operators.
    pub step: Option<String>,
    /// What an update changes to: `{plan_id, parameters,
    /// maintenance_version, context}`; `{}` for other actions.
    pub target: Value,
    /// OSB `instance_usable` of a failed update or deprovision.
    pub instance_usable: Option<bool>,
    /// OSB `update_repeatable` of a failed update.
    pub update_repeatable: Option<bool>,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    /// Milliseconds since the epoch.
    pub updated_at: i64,
    /// When the operation gives up (milliseconds since the epoch).
    pub deadline: i64,
}

/// What a new instance is made of.
#[derive(Debug, Clone)]
pub struct NewInstance {
    /// OSB instance id.
    pub id: String,
    /// Catalog service id.
    pub service_id: String,
    /// Catalog plan id.
    pub plan_id: String,
    /// Request parameters (`{}` when absent).
    pub parameters: Value,
    /// OSB context (`{}` when absent).
    pub context: Value,
    /// Deprecated OSB field.
    pub organization_guid: Option<String>,
    /// Deprecated OSB field.
    pub space_guid: Option<String>,
    /// The plan's `maintenance_info.version`.
    pub maintenance_version: Option<String>,
    /// The service's provisioning model.
    pub kind: String,
    /// A unique name (`^[a-z_][a-z0-9_]{0,62}$`), e.g. from
    /// [`NewInstance::generate_database_name`].
    pub database: Option<String>,
}

impl NewInstance {
    /// Returns a fresh name for an instance's database: `db_` and 32 hex
    /// digits, a valid unquoted PostgreSQL identifier that never clashes
    /// with the server's own names.
    pub fn generate_database_name() -> String {
        format!("db_{}", uuid::Uuid::new_v4().simple())
    }
}

/// What a new binding is made of.
#[derive(Debug, Clone)]
pub struct NewBinding {
    /// OSB binding id.
    pub id: String,
    /// The instance.
    pub instance_id: String,
    /// Catalog service id.
    pub service_id: String,
    /// Catalog plan id.
    pub plan_id: String,
    /// Request parameters (`{}` when absent).
    pub parameters: Value,
    /// OSB context (`{}` when absent).
    pub context: Value,
    /// OSB bind_resource (`{}` when absent).
    pub bind_resource: Value,
}

/// A new operation.
#[derive(Debug, Clone)]
pub struct NewOperation {
    /// Operation id.
    pub id: String,
    /// When it gives up (milliseconds since the epoch).
    pub deadline: i64,
    /// See [`OperationRow::target`].
    pub target: Value,
}

impl NewOperation {
    /// Returns an operation with a fresh id, `deadline_ms` from now.
    pub fn fresh(deadline_in_ms: i64, target: Value) -> NewOperation {
        NewOperation {
            id: uuid::Uuid::new_v4().to_string(),
            deadline: now_ms().saturating_add(deadline_in_ms),
            target,
        }
    }
}

/// A node that could take a new instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSlot {
    /// Node id.
    pub node_id: String,
    /// Its total capacity.
    pub capacity: u32,
}

/// An instance with its most recent instance-level operation.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceView {
    /// The instance.
    pub instance: InstanceRow,
    /// Its most recent instance-level operation.
    pub last_op: Option<OperationRow>,
}

/// A binding with its most recent operation.
#[derive(Debug, Clone, PartialEq)]
pub struct BindingView {
    /// The binding.
    pub binding: BindingRow,
    /// Its most recent operation.
    pub last_op: Option<OperationRow>,
}

/// Result of [`Store::create_instance`].
#[derive(Debug, Clone, PartialEq)]
pub enum CreateInstance {
    /// The instance and its provision operation were recorded.
    Created(InstanceView),
    /// An instance with this id exists (the primary key said so).
    Exists(InstanceView),
    /// No candidate node has a free slot.
    NoCapacity,
}

/// Result of [`Store::create_binding`].
#[derive(Debug, Clone, PartialEq)]
pub enum CreateBinding {
    /// The binding and its bind operation were recorded.
    Created(BindingView),
    /// A binding with this id exists (the primary key said so).
    Exists(BindingView),
    /// The instance does not exist.
    InstanceMissing,
    /// The instance is not in a state that can be bound (provisioning,
    /// failed, deprovisioning) or another instance operation runs.
    InstanceBusy(Box<InstanceView>),
}

/// Result of starting an operation on an existing instance or binding.
#[derive(Debug, Clone, PartialEq)]
pub enum StartOp {
    /// Recorded; the operation is returned.
    Started(OperationRow),
    /// The instance or binding does not exist.
    Missing,
    /// Another operation is in progress (returned when known).
    Busy(Option<OperationRow>),
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Succeeded or Failed.
    pub state: OpState,
    /// User-facing message.
    pub description: Option<String>,
    /// OSB `instance_usable`.
    pub instance_usable: Option<bool>,
    /// OSB `update_repeatable`.
    pub update_repeatable: Option<bool>,
}

const INSERT_INSTANCE: &str = "
INSERT INTO instances (id, service_id, plan_id, node_id, parameters, context,
    organization_guid, space_guid, maintenance_version, state, created_at, updated_at,
    kind, database_name)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'provisioning', ?10, ?10, ?11, ?12)";

const INSERT_BINDING: &str = "
INSERT INTO bindings (id, instance_id, service_id, plan_id, parameters, context,
    bind_resource, state, created_at, updated_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'binding', ?8, ?8)";

/// What a job hands back: the delivery of its result, run only once the
/// batch is committed and on disk. Called with an error instead when the
/// batch's transaction was lost (its commit failed, or SQLite rolled it
/// back), so no caller hears of a write that did not happen.
type Deliver = Box<dyn FnOnce(Option<Error>) + Send>;

/// Whether a job's writes must be on disk before its result is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Its commit is what an answer to a client stands on.
    Durable,
    /// Informational or redone on resume (an operation's step, a
    /// placement the resumed operation records again): it becomes durable
    /// with the next durable commit (the WAL is written in order) and
    /// costs no fsync of its own.
    Lazy,
}

enum Msg {
    Job(
        Box<dyn FnOnce(&mut Connection) -> Deliver + Send>,
        Durability,
    ),
    Close,
}

/// Most jobs run between two WAL syncs.
const MAX_BATCH: usize = 256;

/// Group commit: runs `first` and every job already queued behind it in
/// one transaction (each job's own transaction is a savepoint inside it),
/// commits once, makes the commit durable with one fdatasync of the WAL,
/// and only then hands out the results, so that no caller hears of a
/// commit (and no client gets its 2xx) before it is on disk.
///
/// One transaction per batch rather than per job: the file locks are taken
/// once and a page several jobs touched (the operations table's last leaf,
/// its indexes) is appended to the WAL once, not once per job; profiling
/// the echo benchmark showed those locks and WAL writes as most of the
/// store thread's time. A failing job only rolls back its savepoint.
///
/// Returns false when the thread should stop (asked to, or the WAL could
/// not be synced: after a failed fsync what is on disk is unknown, so the
/// store refuses all further work rather than answer from it).
fn run_batch(
    conn: &mut Connection,
    wal: &mut WalSync,
    first: Msg,
    rx: &std::sync::mpsc::Receiver<Msg>,
) -> bool {
    let mut needs_sync = false;
    let mut pending: Vec<Deliver> = Vec::new();
    let mut next = Some(first);
    let mut keep_running = true;
    // Without the batch transaction (BEGIN failed: an I/O error) every
    // job's savepoint is a transaction of its own, as before batching.
    let mut batched = begin_batch(conn);
    while let Some(msg) = next.take() {
        match msg {
            Msg::Job(job, durability) => {
                let before = conn.total_changes();
                pending.push(job(conn));
                needs_sync |= durability == Durability::Durable && conn.total_changes() != before;
                if batched && conn.is_autocommit() {
                    // SQLite rolled the whole transaction back (it does on
                    // some I/O and out-of-memory errors): every write of the
                    // batch so far is gone, so none of its jobs succeeded.
                    tracing::error!("the gateway database rolled a batch back; its requests fail");
                    fail_all(&mut pending, "the batch's transaction was rolled back");
                    batched = begin_batch(conn);
                }
            }
            Msg::Close => {
                keep_running = false;
                break;
            }
        }
        if pending.len() < MAX_BATCH {
            next = rx.try_recv().ok();
        }
    }
    if batched && let Err(e) = conn.execute_batch("COMMIT") {
        tracing::error!(error = %e, "cannot commit a batch to the gateway database; its requests fail");
        let _ = conn.execute_batch("ROLLBACK");
        fail_all(&mut pending, "the batch could not be committed");
        return keep_running;
    }
    if needs_sync && let Err(e) = wal.sync() {
        tracing::error!(error = %e, "cannot sync the gateway database's WAL; the store stops");
        // Dropping the deliveries answers every caller ShuttingDown.
        return false;
    }
    for deliver in pending {
        deliver(None);
    }
    keep_running
}

/// Opens a batch's transaction; false (logged) when it cannot.
fn begin_batch(conn: &Connection) -> bool {
    // IMMEDIATE: the write lock up front, so no statement of the batch
    // waits for it halfway (this connection is the only writer anyway).
    match conn.execute_batch("BEGIN IMMEDIATE") {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "cannot begin a batch transaction; jobs commit one by one");
            false
        }
    }
}

/// Answers every pending job with an internal error.
fn fail_all(pending: &mut Vec<Deliver>, why: &str) {
    for deliver in pending.drain(..) {
        deliver(Some(Error::Internal(format!("storage: {why}"))));
    }
}

/// The WAL file of the store's database, synced by hand: the connection
/// runs with `synchronous=NORMAL` (commits write the WAL but do not sync
/// it) and [`run_batch`] syncs once for a whole batch of commits. On Linux
/// fdatasync through any descriptor of the file flushes all of its data.
struct WalSync {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl WalSync {
    fn new(db: &Path) -> WalSync {
        let mut path = db.as_os_str().to_owned();
        path.push("-wal");
        WalSync {
            path: PathBuf::from(path),
            file: None,
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let current = match std::fs::metadata(&self.path) {
            Ok(m) => m.ino(),
            // No WAL: everything is in the database file, which SQLite
            // syncs itself at checkpoints.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        // SQLite recreates the WAL only when the last connection closed it;
        // follow it if that ever happens.
        let stale = match &self.file {
            Some(f) => f.metadata()?.ino() != current,
            None => true,
        };
        if stale {
            self.file = Some(std::fs::File::open(&self.path)?);
        }
        match &self.file {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }
}

/// Handle to the store thread; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: std::sync::mpsc::Sender<Msg>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path` on a new thread,
    /// in WAL mode with group commit (see `run_batch`), migrating the
    /// schema.
    pub async fn open(path: &Path) -> Result<Store, Error> {
        let path = path.to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel::<Msg>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread_path = path.clone();
        let thread = std::thread::Builder::new()
            .name("gateway-store".into())
            .spawn(move || {
                let mut conn = match open_connection(&thread_path) {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut wal = WalSync::new(&thread_path);
                while let Ok(first) = rx.recv() {
                    if !run_batch(&mut conn, &mut wal, first, &rx) {
                        break;
                    }
                }
                // Dropping the connection checkpoints the WAL and closes the
                // file, so the same database can be reopened at once.
                drop(conn);
            })?;
        ready_rx
            .await
            .map_err(|_| Error::Internal("store thread died while opening".into()))??;
        Ok(Store {
            tx,
            thread: Arc::new(Mutex::new(Some(thread))),
            path: Arc::new(path),
        })
    }

    /// Runs `f` on the store thread and returns its result once what it
    /// wrote is on disk.
    pub async fn call<R, F>(&self, f: F) -> Result<R, Error>
    where
        F: FnOnce(&mut Connection) -> Result<R, Error> + Send + 'static,
        R: Send + 'static,
    {
        self.call_with(Durability::Durable, f).await
    }

    /// Runs `f` on the store thread and returns its result without
    /// waiting for its own fsync (see [`Durability::Lazy`]).
    async fn call_lazy<R, F>(&self, f: F) -> Result<R, Error>
    where
        F: FnOnce(&mut Connection) -> Result<R, Error> + Send + 'static,
        R: Send + 'static,
    {
        self.call_with(Durability::Lazy, f).await
    }

    async fn call_with<R, F>(&self, durability: Durability, f: F) -> Result<R, Error>
    where
        F: FnOnce(&mut Connection) -> Result<R, Error> + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Job(
                Box::new(move |conn| {
                    let result = f(conn);
                    Box::new(move |lost: Option<Error>| {
                        let _ = tx.send(match lost {
                            None => result,
                            Some(e) => Err(e),
                        });
                    })
                }),
                durability,
            ))
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Stops the store thread after the jobs already queued and waits for
    /// it, closing the database. Later calls fail with
    /// [`Error::ShuttingDown`].
    pub async fn close(&self) {
        let _ = self.tx.send(Msg::Close);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    /// Records a new instance and its provision operation, placing it on the
    /// candidate with the most free slots (capacity minus instances already
    /// placed there, counted inside the same transaction). A duplicate id
    /// hits the primary key and returns [`CreateInstance::Exists`].
    pub async fn create_instance(
        &self,
        new: NewInstance,
        op: NewOperation,
        candidates: Vec<NodeSlot>,
    ) -> Result<CreateInstance, Error> {
        self.call(move |conn| {
            let tx = conn.savepoint()?;
            let placed = pick_node(&tx, &candidates)?;
            let Some(node_id) = placed else {
                let existing = instance_view(&tx, &new.id)?;
                return Ok(match existing {
                    Some(v) => CreateInstance::Exists(v),
                    None => CreateInstance::NoCapacity,
                });
            };
            let now = now_ms();
            let inserted = tx.prepare_cached(INSERT_INSTANCE)?.execute(params![
                new.id,
                new.service_id,
                new.plan_id,
                node_id,
                new.parameters.to_string(),
                new.context.to_string(),
                new.organization_guid,
                new.space_guid,
                new.maintenance_version,
                now,
                new.kind,
                new.database
            ]);
            match inserted {
                Ok(_) => {}
                Err(e) if is_constraint(&e) => {
                    let existing = instance_view(&tx, &new.id)?.ok_or_else(|| {
                        Error::Internal("instance vanished in a transaction".into())
                    })?;
                    return Ok(CreateInstance::Exists(existing));
                }
                Err(e) => return Err(e.into()),
            }
            insert_op(&tx, &op, &new.id, None, Action::Provision)?;
            let view = instance_view(&tx, &new.id)?
                .ok_or_else(|| Error::Internal("instance vanished in a transaction".into()))?;
            tx.commit()?;
            Ok(CreateInstance::Created(view))
        })
        .await
    }

    /// Starts a new provision operation for an instance whose provisioning
    /// failed (an identical PUT after a failure tries again).
    pub async fn retry_provision(
        &self,
        instance_id: &str,
        op: NewOperation,
    ) -> Result<StartOp, Error> {
        let instance_id = instance_id.to_owned();
        self.call(move |conn| {
            let tx = conn.savepoint()?;
            let Some(view) = instance_view(&tx, &instance_id)? else {
                return Ok(StartOp::Missing);
            };
            if view.instance.state != InstanceState::Failed {
                return Ok(StartOp::Busy(view.last_op));
            }
            let started = match insert_op(&tx, &op, &instance_id, None, Action::Provision) {
                Ok(op) => op,
                Err(Error::Storage(e)) if is_constraint(&e) => {
                    return Ok(StartOp::Busy(active_instance_op(&tx, &instance_id)?));
                }
                Err(e) => return Err(e),
            };
            set_instance_state(&tx, &instance_id, InstanceState::Provisioning)?;
            tx.commit()?;
            Ok(StartOp::Started(started))
        })
        .await
    }

    /// Starts an update or deprovision operation on an existing instance.
    /// Refused ([`StartOp::Busy`]) while any operation on the instance or
    /// one of its bindings is in progress.
    pub async fn start_instance_op(
        &self,
        instance_id: &str,
        action: Action,
        op: NewOperation,
    ) -> Result<StartOp, Error> {
        let new_state = match action {
            Action::Update => InstanceState::Updating,
            Action::Deprovision => InstanceState::Deprovisioning,
            other => {
                return Err(Error::Internal(format!(
                    "start_instance_op called for {other}"
                )));
            }
        };
        let instance_id = instance_id.to_owned();
        self.call(move |conn| {
            let tx = conn.savepoint()?;
            let Some(view) = instance_view(&tx, &instance_id)? else {
                return Ok(StartOp::Missing);
            };
            let binding_busy: bool = tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM operations WHERE instance_id = ?1
                     AND binding_id IS NOT NULL AND state = 'in progress')",
                )?
                .query_row([&instance_id], |r| r.get(0))?;
            if binding_busy {
                return Ok(StartOp::Busy(None));
            }
            if action == Action::Update && view.instance.state != InstanceState::Ready {
                return Ok(StartOp::Busy(view.last_op));
            }
            // OSB: a deprovision accepted during provisioning "MUST have the
            // net effect of halting the current creation process". The
            // provision ends `failed` in this transaction (so it can never
            // also end `succeeded`); its driver stops at its next step and
            // the deprovision undoes what it took.
            if action == Action::Deprovision
                && let Some(active) = active_instance_op(&tx, &instance_id)?
                && active.action == Action::Provision
            {
                tx.prepare_cached(
                    "UPDATE operations SET state = 'failed', description = ?2, updated_at = ?3
                     WHERE id = ?1",
                )?
                .execute(params![active.id, HALTED_DESCRIPTION, now_ms()])?;
            }
            let started = match insert_op(&tx, &op, &instance_id, None, action) {
                Ok(op) => op,
                Err(Error::Storage(e)) if is_constraint(&e) => {
                    return Ok(StartOp::Busy(active_instance_op(&tx, &instance_id)?));
                }
                Err(e) => return Err(e),
            };
            set_instance_state(&tx, &instance_id, new_state)?;
            tx.commit()?;
            Ok(StartOp::Started(started))
        })
        .await
    }

    /// Records a new binding and its bind operation. A duplicate id hits the
    /// primary key and returns [`CreateBinding::Exists`] (whatever state the
    /// instance is in, so that repeats get their idempotent answer).
    pub async fn create_binding(
        &self,
        new: NewBinding,
        op: NewOperation,
    ) -> Result<CreateBinding, Error> {
        self.call(move |conn| {
            let tx = conn.savepoint()?;
            let Some(instance) = instance_view(&tx, &new.instance_id)? else {
                // Another instance's binding with this id still "exists".
                return Ok(match binding_view(&tx, &new.id)? {
                    Some(b) => CreateBinding::Exists(b),
                    None => CreateBinding::InstanceMissing,
                });
            };
            let now = now_ms();
            let inserted = tx.prepare_cached(INSERT_BINDING)?.execute(params![
                new.id,
                new.instance_id,
                new.service_id,
                new.plan_id,
                new.parameters.to_string(),
                new.context.to_string(),
                new.bind_resource.to_string(),
                now
            ]);
            match inserted {
                Ok(_) => {}
                Err(e) if is_constraint(&e) => {
                    let existing = binding_view(&tx, &new.id)?.ok_or_else(|| {
                        Error::Internal("binding vanished in a transaction".into())
                    })?;
                    return Ok(CreateBinding::Exists(existing));
                }
                Err(e) => return Err(e.into()),
            }
            let instance_busy = instance.instance.state != InstanceState::Ready
                || instance
                    .last_op
                    .as_ref()
                    .is_some_and(|o| o.state == OpState::InProgress);
            if instance_busy {
                // Dropping the transaction rolls the binding back.
                return Ok(CreateBinding::InstanceBusy(Box::new(instance)));
            }
            insert_op(&tx, &op, &new.instance_id, Some(&new.id), Action::Bind)?;
            let view = binding_view(&tx, &new.id)?
                .ok_or_else(|| Error::Internal("binding vanished in a transaction".into()))?;
            tx.commit()?;
            Ok(CreateBinding::Created(view))
        })
        .await
    }

    /// Starts a new bind operation for a binding whose binding failed.
    pub async fn retry_bind(&self, binding_id: &str, op: NewOperation) -> Result<StartOp, Error> {
        let binding_id = binding_id.to_owned();
        self.call(move |conn| {
            let tx = conn.savepoint()?;
            let Some(view) = binding_view(&tx, &binding_id)? else {
                return Ok(StartOp::Missing);
            };
            let instance = instance_view(&tx, &view.binding.instance_id)?;
            let instance_ok = instance.as_ref().is_some_and(|i| {
                i.instance.state == InstanceState::Ready
                    && !i
                        .last_op
                        .as_ref()
                        .is_some_and(|o| o.state == OpState::InProgress)
            });
            if view.binding.state != BindingState::Failed || !instance_ok {
                return Ok(StartOp::Busy(view.last_op));
            }
            let instance_id = view.binding.instance_id.clone();
            let started = match insert_op(&tx, &op, &instance_id, Some(&binding_id), Action::Bind) {
                Ok(op) => op,
                Err(Error::Storage(e)) if is_constraint(&e) => return Ok(StartOp::Busy(None)),
                Err(e) => return Err(e),
            };
            set_binding_state(&tx, &binding_id, BindingState::Binding)?;
            tx.commit()?;
            Ok(StartOp::Started(started))
        })
        .await
    }

    /// Starts an unbind operation. Refused while an operation on the
    /// instance or on this binding is in progress.
    pub async fn start_unbind(
        &self,
        instance_id: &str,
        binding_id: &str,
        op: NewOperation,
    ) -> Result<StartOp, Error> {
        let (instance_id, binding_id) = (instance_id.to_owned(), binding_id.to_owned());
        self.call(move |conn| {
            let tx = conn.savepoint()?;
            let Some(view) = binding_view(&tx, &binding_id)? else {
                return Ok(StartOp::Missing);
            };
            if view.binding.instance_id != instance_id {
                return Ok(StartOp::Missing);
            }
            if let Some(active) = active_instance_op(&tx, &instance_id)? {
                return Ok(StartOp::Busy(Some(active)));
            }
            let started = match insert_op(&tx, &op, &instance_id, Some(&binding_id), Action::Unbind)
            {
                Ok(op) => op,
                Err(Error::Storage(e)) if is_constraint(&e) => {
                    return Ok(StartOp::Busy(
                        binding_view(&tx, &binding_id)?.and_then(|b| b.last_op),
                    ));
                }
                Err(e) => return Err(e),
            };
            set_binding_state(&tx, &binding_id, BindingState::Unbinding)?;
            tx.commit()?;
            Ok(StartOp::Started(started))
        })
        .await
    }

    /// Ends an operation (if still in progress) and applies its effect on
    /// the instance or binding in the same transaction. Returns the
    /// operation as stored afterwards.
    pub async fn finish_op(&self, op_id: &str, outcome: Outcome) -> Result<OperationRow, Error> {
        let op_id = op_id.to_owned();
        self.call(move |conn| {
            let tx = conn.savepoint()?;
            let op = get_op(&tx, &op_id)?
                .ok_or_else(|| Error::Internal(format!("operation {op_id} not found")))?;
            if op.state != OpState::InProgress {
                return Ok(op);
            }
            let ok = outcome.state == OpState::Succeeded;
            let iid = op.instance_id.as_str();
            match (op.action, &op.binding_id) {
                (Action::Provision, _) => set_instance_state(
                    &tx,
                    iid,
                    if ok {
                        InstanceState::Ready
                    } else {
                        InstanceState::Failed
                    },
                )?,
                (Action::Update, _) => {
                    if ok {
                        let t = &op.target;
                        if let Some(plan) = t.get("plan_id").and_then(Value::as_str) {
                            tx.prepare_cached("UPDATE instances SET plan_id = ?2 WHERE id = ?1")?
                                .execute(params![iid, plan])?;
                        }
                        if let Some(p) = t.get("parameters").filter(|p| p.is_object()) {
                            tx.prepare_cached(
                                "UPDATE instances SET parameters = ?2 WHERE id = ?1",
                            )?
                            .execute(params![iid, p.to_string()])?;
                        }
                        if let Some(m) = t.get("maintenance_version").and_then(Value::as_str) {
                            tx.prepare_cached(
                                "UPDATE instances SET maintenance_version = ?2 WHERE id = ?1",
                            )?
                            .execute(params![iid, m])?;
                        }
                        if let Some(c) = t.get("context").filter(|c| c.is_object()) {
                            tx.prepare_cached("UPDATE instances SET context = ?2 WHERE id = ?1")?
                                .execute(params![iid, c.to_string()])?;
                        }
                    }
                    set_instance_state(&tx, iid, InstanceState::Ready)?;
                }
                (Action::Deprovision, _) => {
                    if ok {
                        // Bindings go with it (ON DELETE CASCADE).
                        tx.prepare_cached("DELETE FROM instances WHERE id = ?1")?
                            .execute([iid])?;
                    } else {
                        set_instance_state(&tx, iid, InstanceState::Ready)?;
                    }
                }
                (Action::Bind, Some(bid)) => set_binding_state(
                    &tx,
                    bid,
                    if ok {
                        BindingState::Ready
                    } else {
                        BindingState::Failed
                    },
                )?,
                (Action::Unbind, Some(bid)) => {
                    if ok {
                        tx.prepare_cached("DELETE FROM bindings WHERE id = ?1")?
                            .execute([bid])?;
                    } else {
                        set_binding_state(&tx, bid, BindingState::Ready)?;
                    }
                }
                (action, None) => {
                    return Err(Error::Internal(format!(
                        "{action} operation without binding"
                    )));
                }
            }
            tx.prepare_cached(
                "UPDATE operations SET state = ?2, description = ?3, instance_usable = ?4,
                     update_repeatable = ?5, updated_at = ?6 WHERE id = ?1",
            )?
            .execute(params![
                op_id,
                outcome.state.as_str(),
                outcome.description,
                outcome.instance_usable,
                outcome.update_repeatable,
                now_ms()
            ])?;
            let op = get_op(&tx, &op_id)?
                .ok_or_else(|| Error::Internal(format!("operation {op_id} not found")))?;
            tx.commit()?;
            Ok(op)
        })
        .await
    }

    /// Records the step an operation reached and, optionally, a progress
    /// description. Informational: queued without waiting (jobs run in
    /// order, so it lands before the operation's end, and the guard on
    /// `state` keeps a late one from touching a finished operation) and
    /// without an fsync of its own ([`Durability::Lazy`]). A failure is
    /// logged, not returned.
    pub async fn set_step(
        &self,
        op_id: &str,
        step: &str,
        description: Option<String>,
    ) -> Result<(), Error> {
        let (op_id, step) = (op_id.to_owned(), step.to_owned());
        let job = move |conn: &mut Connection| -> Deliver {
            let updated = conn
                .prepare_cached(
                    "UPDATE operations SET step = ?2, description = COALESCE(?3, description),
                     updated_at = ?4 WHERE id = ?1 AND state = 'in progress'",
                )
                .and_then(|mut stmt| stmt.execute(params![op_id, step, description, now_ms()]));
            if let Err(e) = updated {
                tracing::warn!(error = %e, "cannot record an operation's step");
            }
            Box::new(|_| {})
        };
        self.tx
            .send(Msg::Job(Box::new(job), Durability::Lazy))
            .map_err(|_| Error::ShuttingDown)
    }

    /// Records where an instance landed: its port and what its node said
    /// about itself (host, instance directory, bind host, attributes).
    pub async fn set_placement(
        &self,
        instance_id: &str,
        placement: Placement,
    ) -> Result<(), Error> {
        let id = instance_id.to_owned();
        // Lazy: a resumed provision records the placement again (the port
        // lease is the allocator's, idempotent per owner), and the
        // operation's durable end makes it durable with it.
        self.call_lazy(move |conn| {
            conn.prepare_cached(
                "UPDATE instances SET port = ?2, host = ?3, dir = ?4, bind_host = ?5,
                     node_attributes = ?6, updated_at = ?7 WHERE id = ?1",
            )?
            .execute(params![
                id,
                placement.port,
                placement.host,
                placement.dir,
                placement.bind_host,
                placement.attributes.to_string(),
                now_ms()
            ])?;
            Ok(())
        })
        .await
    }

    /// Records what the reconciler saw of an instance on its node.
    pub async fn set_observed(&self, instance_id: &str, observed: Observed) -> Result<(), Error> {
        let id = instance_id.to_owned();
        self.call(move |conn| {
            conn.prepare_cached(
                "UPDATE instances SET observed_state = ?2, observed_message = ?3,
                     observed_pid = ?4, observed_at = ?5 WHERE id = ?1",
            )?
            .execute(params![
                id,
                observed.state,
                observed.message,
                observed.pid,
                observed.at
            ])?;
            Ok(())
        })
        .await
    }

    /// Replaces an instance's context (a context-only update needs no
    /// operation).
    pub async fn set_context(&self, instance_id: &str, context: Value) -> Result<(), Error> {
        let id = instance_id.to_owned();
        self.call(move |conn| {
            conn.prepare_cached(
                "UPDATE instances SET context = ?2, updated_at = ?3 WHERE id = ?1",
            )?
            .execute(params![id, context.to_string(), now_ms()])?;
            Ok(())
        })
        .await
    }

    /// Returns an instance with its most recent instance-level operation.
    pub async fn get_instance(&self, id: &str) -> Result<Option<InstanceView>, Error> {
        let id = id.to_owned();
        self.call(move |conn| instance_view(conn, &id)).await
    }

    /// Returns a binding with its most recent operation.
    pub async fn get_binding(&self, id: &str) -> Result<Option<BindingView>, Error> {
        let id = id.to_owned();
        self.call(move |conn| binding_view(conn, &id)).await
    }

    /// Returns an operation by id.
    pub async fn get_operation(&self, id: &str) -> Result<Option<OperationRow>, Error> {
        let id = id.to_owned();
        self.call(move |conn| get_op(conn, &id)).await
    }

    /// Returns the most recent instance-level operation of `instance_id`,
    /// even after the instance was deleted.
    pub async fn last_instance_op(&self, instance_id: &str) -> Result<Option<OperationRow>, Error> {
        let id = instance_id.to_owned();
        self.call(move |conn| last_instance_op(conn, &id)).await
    }

    /// Returns the most recent operation of `binding_id`, even after the
    /// binding was deleted.
    pub async fn last_binding_op(&self, binding_id: &str) -> Result<Option<OperationRow>, Error> {
        let id = binding_id.to_owned();
        self.call(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {OP_COLUMNS} FROM operations WHERE binding_id = ?1
                     ORDER BY seq DESC LIMIT 1"
            ))?
            .query_row([id], op_from_row)
            .optional()?
            .transpose()
        })
        .await
    }

    /// Returns every operation still in progress, oldest first (resumed at
    /// startup).
    pub async fn ops_in_progress(&self) -> Result<Vec<OperationRow>, Error> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {OP_COLUMNS} FROM operations WHERE state = 'in progress' ORDER BY seq"
            ))?;
            let rows = stmt.query_map([], op_from_row)?;
            rows.map(|r| r?).collect()
        })
        .await
    }

    /// Returns the bindings of an instance.
    pub async fn bindings_of(&self, instance_id: &str) -> Result<Vec<BindingRow>, Error> {
        let id = instance_id.to_owned();
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {BINDING_COLUMNS} FROM bindings WHERE instance_id = ?1 ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map([id], binding_from_row)?;
            rows.map(|r| r?).collect()
        })
        .await
    }

    /// Returns the instances placed on `node_id` that are ready and have no
    /// operation in progress, each with its ready bindings: what a node that
    /// restarted must be told again.
    pub async fn settled_on_node(
        &self,
        node_id: &str,
    ) -> Result<Vec<(InstanceRow, Vec<BindingRow>)>, Error> {
        let node_id = node_id.to_owned();
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {INSTANCE_COLUMNS} FROM instances i WHERE node_id = ?1 AND state = 'ready'
                   AND NOT EXISTS (SELECT 1 FROM operations o WHERE o.instance_id = i.id
                                   AND o.state = 'in progress')
                 ORDER BY created_at, id"
            ))?;
            let instances: Vec<InstanceRow> = stmt
                .query_map([&node_id], instance_from_row)?
                .map(|r| r?)
                .collect::<Result<_, Error>>()?;
            let mut out = Vec::with_capacity(instances.len());
            let mut bstmt = conn.prepare_cached(&format!(
                "SELECT {BINDING_COLUMNS} FROM bindings WHERE instance_id = ?1 AND state = 'ready'
                 ORDER BY created_at, id"
            ))?;
            for i in instances {
                let bindings = bstmt
                    .query_map([&i.id], binding_from_row)?
                    .map(|r| r?)
                    .collect::<Result<Vec<_>, Error>>()?;
                out.push((i, bindings));
            }
            Ok(out)
        })
        .await
    }

    /// Returns every instance placed on `node_id`, each with whether an
    /// operation (of the instance or one of its bindings) is in progress.
    pub async fn instances_on_node(
        &self,
        node_id: &str,
    ) -> Result<Vec<(InstanceRow, bool)>, Error> {
        let node_id = node_id.to_owned();
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {INSTANCE_COLUMNS}, EXISTS (SELECT 1 FROM operations o
                     WHERE o.instance_id = i.id AND o.state = 'in progress')
                 FROM instances i WHERE node_id = ?1 ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map([&node_id], |r| {
                let busy: bool = r.get(23)?;
                Ok(instance_from_row(r)?.map(|i| (i, busy)))
            })?;
            rows.map(|r| r?).collect()
        })
        .await
    }

    /// Returns the ready bindings of an instance.
    pub async fn ready_bindings_of(&self, instance_id: &str) -> Result<Vec<BindingRow>, Error> {
        let id = instance_id.to_owned();
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {BINDING_COLUMNS} FROM bindings WHERE instance_id = ?1 AND state = 'ready'
                 ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map([id], binding_from_row)?;
            rows.map(|r| r?).collect()
        })
        .await
    }

    /// Returns true when an instance or a binding with this id exists (an
    /// allocator owner that something still needs).
    pub async fn owner_exists(&self, id: &str) -> Result<bool, Error> {
        let id = id.to_owned();
        self.call(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM instances WHERE id = ?1)
                     OR EXISTS (SELECT 1 FROM bindings WHERE id = ?1)",
                )?
                .query_row([id], |r| r.get(0))?)
        })
        .await
    }

    /// Returns how many instances the database places on each node.
    pub async fn instances_per_node(&self) -> Result<Vec<(String, u32)>, Error> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT node_id, COUNT(*) FROM instances GROUP BY node_id ORDER BY node_id",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Counts instances by (service id, plan id, state), for `/metrics`.
    pub async fn instance_counts(&self) -> Result<Vec<(String, String, String, u64)>, Error> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT service_id, plan_id, state, COUNT(*) FROM instances \
                 GROUP BY service_id, plan_id, state ORDER BY service_id, plan_id, state",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Returns every instance with its most recent instance-level operation
    /// and how many bindings it has (failed ones not counted), oldest first:
    /// the admin API's instance list.
    pub async fn list_instances(&self) -> Result<Vec<(InstanceView, u32)>, Error> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {INSTANCE_COLUMNS}, (SELECT COUNT(*) FROM bindings b
                     WHERE b.instance_id = i.id AND b.state != 'failed')
                 FROM instances i ORDER BY i.created_at, i.id"
            ))?;
            let rows: Vec<(InstanceRow, u32)> = stmt
                .query_map([], |r| {
                    let bindings: u32 = r.get(23)?;
                    Ok(instance_from_row(r)?.map(|i| (i, bindings)))
                })?
                .map(|r| r?)
                .collect::<Result<_, Error>>()?;
            rows.into_iter()
                .map(|(instance, bindings)| {
                    let last_op = last_instance_op(conn, &instance.id)?;
                    Ok((InstanceView { instance, last_op }, bindings))
                })
                .collect()
        })
        .await
    }
}

fn open_connection(path: &Path) -> Result<Connection, Error> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Internal(format!(
            "database {} does not support WAL journal mode (got {mode})",
            path.display()
        )));
    }
    // NORMAL, and the store thread syncs the WAL itself once per batch of
    // commits before answering any of them (group commit, see
    // `run_batch`): an operation the platform was told about (202) still
    // survives a power loss, at one fsync per batch instead of per commit.
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")?;
    migrate(&conn)?;
    // Every statement the store runs stays prepared: parsing and planning
    // them again on each call was a fifth of the store thread's time.
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn migrate(conn: &Connection) -> Result<(), Error> {
    let version: i32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(Error::UnsupportedSchema {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    if version < 1 {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {SCHEMA_V1} PRAGMA user_version = 1; COMMIT;"
        ))?;
    }
    if version < 2 {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {SCHEMA_V2} PRAGMA user_version = 2; COMMIT;"
        ))?;
    }
    Ok(())
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation)
}

const INSTANCE_COLUMNS: &str = "id, service_id, plan_id, node_id, port, host, dir, parameters, \
     context, organization_guid, space_guid, maintenance_version, state, created_at, updated_at, \
     kind, database_name, bind_host, node_attributes, observed_state, observed_message, \
     observed_pid, observed_at";
const BINDING_COLUMNS: &str = "id, instance_id, service_id, plan_id, parameters, context, \
     bind_resource, state, created_at, updated_at";
const OP_COLUMNS: &str = "id, instance_id, binding_id, action, state, description, step, target, \
     instance_usable, update_repeatable, created_at, updated_at, deadline";

fn json_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Value> {
    let text: String = row.get(idx)?;
    Ok(serde_json::from_str(&text).unwrap_or_else(|_| json!({})))
}

fn instance_from_row(row: &Row<'_>) -> rusqlite::Result<Result<InstanceRow, Error>> {
    let state: String = row.get(12)?;
    let state = match InstanceState::parse(&state) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(InstanceRow {
        id: row.get(0)?,
        service_id: row.get(1)?,
        plan_id: row.get(2)?,
        node_id: row.get(3)?,
        port: row.get(4)?,
        host: row.get(5)?,
        dir: row.get(6)?,
        parameters: json_col(row, 7)?,
        context: json_col(row, 8)?,
        organization_guid: row.get(9)?,
        space_guid: row.get(10)?,
        maintenance_version: row.get(11)?,
        state,
        created_at: row.get(13)?,
        updated_at: row.get(14)?,
        kind: row.get(15)?,
        database: row.get(16)?,
        bind_host: row.get(17)?,
        node_attributes: json_col(row, 18)?,
        observed: match row.get::<_, Option<String>>(19)? {
            Some(state) => Some(Observed {
                state,
                message: row.get::<_, Option<String>>(20)?.unwrap_or_default(),
                pid: row.get::<_, Option<u32>>(21)?.unwrap_or(0),
                at: row.get::<_, Option<i64>>(22)?.unwrap_or(0),
            }),
            None => None,
        },
    }))
}

fn binding_from_row(row: &Row<'_>) -> rusqlite::Result<Result<BindingRow, Error>> {
    let state: String = row.get(7)?;
    let state = match BindingState::parse(&state) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(BindingRow {
        id: row.get(0)?,
        instance_id: row.get(1)?,
        service_id: row.get(2)?,
        plan_id: row.get(3)?,
        parameters: json_col(row, 4)?,
        context: json_col(row, 5)?,
        bind_resource: json_col(row, 6)?,
        state,
        created_at: row.get(8)?,
        updated_at: row.get(9)?,
    }))
}

fn op_from_row(row: &Row<'_>) -> rusqlite::Result<Result<OperationRow, Error>> {
    let action: String = row.get(3)?;
    let state: String = row.get(4)?;
    let (action, state) = match (Action::parse(&action), OpState::parse(&state)) {
        (Ok(a), Ok(s)) => (a, s),
        (Err(e), _) | (_, Err(e)) => return Ok(Err(e)),
    };
    Ok(Ok(OperationRow {
        id: row.get(0)?,
        instance_id: row.get(1)?,
        binding_id: row.get(2)?,
        action,
        state,
        description: row.get(5)?,
        step: row.get(6)?,
        target: json_col(row, 7)?,
        instance_usable: row.get(8)?,
        update_repeatable: row.get(9)?,
        created_at: row.get(10)?,
        updated_at: row.get(11)?,
        deadline: row.get(12)?,
    }))
}

fn get_op(conn: &Connection, id: &str) -> Result<Option<OperationRow>, Error> {
    conn.prepare_cached(&format!(
        "SELECT {OP_COLUMNS} FROM operations WHERE id = ?1"
    ))?
    .query_row([id], op_from_row)
    .optional()?
    .transpose()
}

fn last_instance_op(conn: &Connection, instance_id: &str) -> Result<Option<OperationRow>, Error> {
    conn.prepare_cached(&format!(
        "SELECT {OP_COLUMNS} FROM operations WHERE instance_id = ?1 AND binding_id IS NULL
             ORDER BY seq DESC LIMIT 1"
    ))?
    .query_row([instance_id], op_from_row)
    .optional()?
    .transpose()
}

fn active_instance_op(conn: &Connection, instance_id: &str) -> Result<Option<OperationRow>, Error> {
    Ok(last_instance_op(conn, instance_id)?.filter(|o| o.state == OpState::InProgress))
}

fn instance_view(conn: &Connection, id: &str) -> Result<Option<InstanceView>, Error> {
    let Some(instance) = conn
        .prepare_cached(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = ?1"
        ))?
        .query_row([id], instance_from_row)
        .optional()?
        .transpose()?
    else {
        return Ok(None);
    };
    let last_op = last_instance_op(conn, id)?;
    Ok(Some(InstanceView { instance, last_op }))
}

fn binding_view(conn: &Connection, id: &str) -> Result<Option<BindingView>, Error> {
    let Some(binding) = conn
        .prepare_cached(&format!(
            "SELECT {BINDING_COLUMNS} FROM bindings WHERE id = ?1"
        ))?
        .query_row([id], binding_from_row)
        .optional()?
        .transpose()?
    else {
        return Ok(None);
    };
    let last_op = conn
        .prepare_cached(&format!(
            "SELECT {OP_COLUMNS} FROM operations WHERE binding_id = ?1 ORDER BY seq DESC LIMIT 1"
        ))?
        .query_row([id], op_from_row)
        .optional()?
        .transpose()?;
    Ok(Some(BindingView { binding, last_op }))
}

fn insert_op(
    conn: &Connection,
    op: &NewOperation,
    instance_id: &str,
    binding_id: Option<&str>,
    action: Action,
) -> Result<OperationRow, Error> {
    let now = now_ms();
    conn.prepare_cached(
        "INSERT INTO operations (id, instance_id, binding_id, action, state, target,
             created_at, updated_at, deadline)
         VALUES (?1, ?2, ?3, ?4, 'in progress', ?5, ?6, ?6, ?7)",
    )?
    .execute(params![
        op.id,
        instance_id,
        binding_id,
        action.as_str(),
        op.target.to_string(),
        now,
        op.deadline
    ])?;
    get_op(conn, &op.id)?.ok_or_else(|| Error::Internal("operation vanished".into()))
}

fn set_instance_state(conn: &Connection, id: &str, state: InstanceState) -> Result<(), Error> {
    conn.prepare_cached("UPDATE instances SET state = ?2, updated_at = ?3 WHERE id = ?1")?
        .execute(params![id, state.as_str(), now_ms()])?;
    Ok(())
}

fn set_binding_state(conn: &Connection, id: &str, state: BindingState) -> Result<(), Error> {
    conn.prepare_cached("UPDATE bindings SET state = ?2, updated_at = ?3 WHERE id = ?1")?
        .execute(params![id, state.as_str(), now_ms()])?;
    Ok(())
}

/// Picks the candidate with the most free slots (ties: lowest node id).
fn pick_node(conn: &Connection, candidates: &[NodeSlot]) -> Result<Option<String>, Error> {
    let mut best: Option<(i64, &str)> = None;
    for c in candidates {
        let used: i64 = conn
            .prepare_cached("SELECT COUNT(*) FROM instances WHERE node_id = ?1")?
            .query_row([&c.node_id], |r| r.get(0))?;
        let free = i64::from(c.capacity) - used;
        if free <= 0 {
            continue;
        }
        let better = match best {
            None => true,
            Some((bf, bid)) => free > bf || (free == bf && c.node_id.as_str() < bid),
        };
        if better {
            best = Some((free, &c.node_id));
        }
    }
    Ok(best.map(|(_, id)| id.to_owned()))
}
