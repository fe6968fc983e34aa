//! Service definitions: the `services.d/*.yaml` format that turns a new
//! service into a YAML file instead of a program.
//!
//! A definition holds the OSB catalog entry (ids, names, plans, schemas), the
//! provisioning model (`none` or `process`) with its templates, and the
//! binding credential template. Everything is checked at load, so a request
//! never meets an unknown template variable or a broken JSON schema: load
//! errors name the file, the line and the reason.

mod template;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value, json};

pub use template::{ParseError, RenderError, Template, Vars};

/// Built-in variables every template of an instance may use.
pub const INSTANCE_VARS: &[&str] = &[
    "instance_id",
    "name",
    "service",
    "plan",
    "node_id",
    "host",
    "port",
    "dir",
    "username",
    "password",
    "bind_host",
    "database",
];

/// Prefix of variables a node supplies about itself (`NodeInfo.attributes`),
/// e.g. `{{node.postgresql_host}}`; which keys exist is known only at run time.
pub const NODE_VAR_PREFIX: &str = "node.";

/// Built-in variables that only binding credential templates may use.
pub const BINDING_VARS: &[&str] = &["binding_id", "binding.username", "binding.password"];

/// One problem found while loading definitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub file: PathBuf,
    /// 1-based line, when it could be located.
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Why the service definitions could not be loaded: every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid service definitions:\n{}", .issues.iter().map(|i| format!("  {i}")).collect::<Vec<_>>().join("\n"))]
pub struct LoadError {
    pub issues: Vec<Issue>,
}

/// A provisioning model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Model {
    /// Record only: credentials come from the template (the seed's echo).
    None,
    /// One supervised daemon per instance on an allocated port.
    Process,
    /// One database per instance, one role per binding, on a server the
    /// node manages.
    Database,
    /// One directory per instance with a size cap, bound as a volume mount.
    Directory,
}

impl Model {
    /// Returns the name used in YAML and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Model::None => "none",
            Model::Process => "process",
            Model::Database => "database",
            Model::Directory => "directory",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    id: String,
    name: String,
    description: String,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    requires: Vec<String>,
    #[serde(default = "yes")]
    bindable: bool,
    #[serde(default = "yes")]
    instances_retrievable: bool,
    #[serde(default = "yes")]
    bindings_retrievable: bool,
    #[serde(default)]
    plan_updateable: bool,
    #[serde(default)]
    allow_context_updates: bool,
    #[serde(default)]
    async_required: bool,
    #[serde(default)]
    metadata: Option<Value>,
    model: Model,
    #[serde(default)]
    process: Option<ProcessFile>,
    #[serde(default)]
    database: Option<DatabaseFile>,
    #[serde(default)]
    directory: Option<DirectoryFile>,
    #[serde(default)]
    volume_mount: Option<VolumeMountFile>,
    #[serde(default)]
    hooks: HooksFile,
    #[serde(default)]
    requires_executables: Vec<String>,
    #[serde(default)]
    credentials: BTreeMap<String, String>,
    plans: Vec<PlanFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabaseFile {
    engine: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectoryFile {
    /// A number or a template such as "{{size_mb}}".
    size_limit_mb: serde_yaml::Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeMountFile {
    driver: String,
    container_dir: String,
    #[serde(default = "rw")]
    mode: String,
}

fn rw() -> String {
    "rw".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HooksFile {
    #[serde(default)]
    provision: Vec<HookFile>,
    #[serde(default)]
    deprovision: Vec<HookFile>,
    #[serde(default)]
    bind: Vec<HookFile>,
    #[serde(default)]
    unbind: Vec<HookFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HookFile {
    #[serde(default)]
    command: Option<CommandFile>,
    #[serde(default)]
    http: Option<HttpFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandFile {
    argv: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    stdin: String,
    #[serde(default)]
    timeout_ms: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpFile {
    method: String,
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: String,
    #[serde(default)]
    timeout_ms: Option<u32>,
    #[serde(default)]
    accept_status: Vec<u16>,
}

/// When a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookEvent {
    Provision,
    Deprovision,
    Bind,
    Unbind,
}

/// A parsed hook.
#[derive(Debug, Clone)]
pub enum HookTemplate {
    Command {
        argv: Vec<Template>,
        env: BTreeMap<String, Template>,
        stdin: Template,
        timeout_ms: u32,
    },
    Http {
        method: String,
        url: Template,
        headers: BTreeMap<String, Template>,
        body: Template,
        timeout_ms: u32,
        accept_status: Vec<u16>,
    },
}

/// A rendered hook, ready to send to a node. It may hold secrets (env,
/// stdin, headers, body, URL), so its `Debug` shows none of them.
#[derive(Clone, PartialEq, Eq)]
pub enum RenderedHook {
    Command {
        argv: Vec<String>,
        env: BTreeMap<String, String>,
        stdin: String,
        timeout_ms: u32,
    },
    Http {
        method: String,
        url: String,
        headers: BTreeMap<String, String>,
        body: String,
        timeout_ms: u32,
        accept_status: Vec<u16>,
    },
}

impl std::fmt::Debug for RenderedHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RenderedHook::Command { argv, .. } => f
                .debug_struct("Command")
                .field("program", &argv.first())
                .finish_non_exhaustive(),
            RenderedHook::Http { method, .. } => f
                .debug_struct("Http")
                .field("method", method)
                .finish_non_exhaustive(),
        }
    }
}

/// The volume mount a directory binding returns (OSB `volume_mounts`).
#[derive(Debug, Clone)]
pub struct VolumeMountTemplate {
    pub driver: String,
    pub container_dir: Template,
    pub mode: String,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProcessFile {
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    files: Vec<FileFile>,
    #[serde(default)]
    ready_timeout_ms: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFile {
    path: String,
    content: String,
    #[serde(default)]
    mode: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    id: String,
    name: String,
    description: String,
    #[serde(default = "yes")]
    free: bool,
    #[serde(default)]
    bindable: Option<bool>,
    #[serde(default)]
    plan_updateable: Option<bool>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    maximum_polling_duration: Option<u64>,
    #[serde(default)]
    maintenance_info: Option<MaintenanceInfo>,
    #[serde(default)]
    variables: BTreeMap<String, Value>,
    #[serde(default)]
    schemas: Option<SchemasFile>,
}

/// OSB `maintenance_info` of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceInfo {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct SchemasFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service_instance: Option<InstanceSchemasFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service_binding: Option<BindingSchemasFile>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct InstanceSchemasFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    create: Option<ParamsSchema>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    update: Option<ParamsSchema>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct BindingSchemasFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    create: Option<ParamsSchema>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct ParamsSchema {
    parameters: Value,
}

/// Which of a plan's parameter schemas applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaKind {
    InstanceCreate,
    InstanceUpdate,
    BindingCreate,
}

/// Why request parameters were refused by a plan's schema. The message names
/// the failing location and rule, never the offending value (it may be a
/// secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    /// JSON pointer of the first failing location ("" for the root).
    pub path: String,
    pub message: String,
}

/// A file the process model writes into the instance directory.
#[derive(Debug, Clone)]
pub struct FileTemplate {
    pub path: String,
    pub content: Template,
    pub mode: u32,
}

/// How to run an instance of a `process` service.
#[derive(Debug, Clone)]
pub struct ProcessTemplate {
    pub command: Vec<Template>,
    pub env: BTreeMap<String, Template>,
    pub files: Vec<FileTemplate>,
    pub ready_timeout_ms: u32,
}

/// A rendered process, ready to send to a node. Its files may hold secrets.
#[derive(Clone)]
pub struct RenderedProcess {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// (relative path, content, mode)
    pub files: Vec<(String, String, u32)>,
    pub ready_timeout_ms: u32,
}

impl std::fmt::Debug for RenderedProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenderedProcess")
            .field("argv", &self.argv)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field(
                "files",
                &self.files.iter().map(|f| &f.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A plan of a service.
#[derive(Debug, Clone)]
pub struct PlanDef {
    pub id: String,
    pub name: String,
    pub description: String,
    pub free: bool,
    pub bindable: bool,
    pub plan_updateable: bool,
    pub maximum_polling_duration: Option<u64>,
    pub maintenance_info: Option<MaintenanceInfo>,
    /// Plan variables for templates; request parameters of the same name
    /// override them.
    pub variables: BTreeMap<String, Value>,
    validators: Arc<Validators>,
}

#[derive(Default)]
struct Validators {
    instance_create: Option<(Value, jsonschema::Validator)>,
    instance_update: Option<(Value, jsonschema::Validator)>,
    binding_create: Option<(Value, jsonschema::Validator)>,
}

impl std::fmt::Debug for Validators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validators")
            .field("instance_create", &self.instance_create.is_some())
            .field("instance_update", &self.instance_update.is_some())
            .field("binding_create", &self.binding_create.is_some())
            .finish()
    }
}

impl PlanDef {
    /// Checks `params` (a request's `parameters`, `{}` when absent) against
    /// the plan's schema of `kind`; a plan without that schema accepts any
    /// object.
    pub fn validate_params(&self, kind: SchemaKind, params: &Value) -> Result<(), ParamError> {
        if !params.is_object() {
            return Err(ParamError {
                path: String::new(),
                message: "parameters must be a JSON object".into(),
            });
        }
        let slot = match kind {
            SchemaKind::InstanceCreate => &self.validators.instance_create,
            SchemaKind::InstanceUpdate => &self.validators.instance_update,
            SchemaKind::BindingCreate => &self.validators.binding_create,
        };
        let Some((schema, validator)) = slot else {
            return Ok(());
        };
        let Some(err) = validator.iter_errors(params).next() else {
            return Ok(());
        };
        let path = err.instance_path.as_str().to_string();
        let schema_path = err.schema_path.as_str().to_string();
        let keyword = schema_path.rsplit('/').next().unwrap_or("").to_string();
        // Only these keywords' own messages never repeat the request's value.
        let rule = match keyword.as_str() {
            "required" | "additionalProperties" => err.to_string(),
            _ => match pointer(schema, &schema_path) {
                Some(v) if keyword != "$ref" => format!("must satisfy {keyword}: {v}"),
                _ => format!("must satisfy {keyword}"),
            },
        };
        let at = if path.is_empty() { "/" } else { &path };
        Err(ParamError {
            message: format!("parameters {at}: {rule}"),
            path,
        })
    }

    /// Returns the template values of this plan with `params` applied over
    /// its variables (only names the plan declares are taken).
    pub fn vars_with(&self, params: &Value) -> BTreeMap<String, Value> {
        let mut vars = self.variables.clone();
        if let Some(obj) = params.as_object() {
            for (k, v) in obj {
                if vars.contains_key(k) {
                    vars.insert(k.clone(), v.clone());
                }
            }
        }
        vars
    }
}

fn pointer<'a>(schema: &'a Value, path: &str) -> Option<&'a Value> {
    schema.pointer(path)
}

/// One service definition.
#[derive(Debug, Clone)]
pub struct ServiceDef {
    pub id: String,
    pub name: String,
    pub description: String,
    pub version: Option<String>,
    pub tags: Vec<String>,
    pub bindable: bool,
    pub instances_retrievable: bool,
    pub bindings_retrievable: bool,
    pub plan_updateable: bool,
    /// When true, provision, update and deprovision refuse requests without
    /// `accepts_incomplete=true` (OSB `AsyncRequired`), e.g. for services
    /// that take longer than a platform's request timeout to start.
    pub async_required: bool,
    pub model: Model,
    pub process: Option<ProcessTemplate>,
    /// Engine of a `database` service ("postgresql").
    pub database_engine: Option<String>,
    /// Size cap of a `directory` instance, in MiB (number or template).
    pub directory_limit_mb: Option<Template>,
    /// Returned by `volume_mount` bindings.
    pub volume_mount: Option<VolumeMountTemplate>,
    /// Whether the service declares `requires: [volume_mount]`.
    pub requires_volume_mount: bool,
    hooks: Vec<(HookEvent, HookTemplate)>,
    pub credentials: BTreeMap<String, Template>,
    pub plans: Vec<PlanDef>,
    /// The file it was loaded from.
    pub source: PathBuf,
    requires_executables: Vec<String>,
    catalog: Value,
}

impl ServiceDef {
    /// Returns the plan with OSB id `plan_id`.
    pub fn plan(&self, plan_id: &str) -> Option<&PlanDef> {
        self.plans.iter().find(|p| p.id == plan_id)
    }

    /// Returns the plan named `name`.
    pub fn plan_by_name(&self, name: &str) -> Option<&PlanDef> {
        self.plans.iter().find(|p| p.name == name)
    }

    /// Returns the programs a node needs to offer this service.
    pub fn executables(&self) -> Vec<String> {
        self.requires_executables.clone()
    }

    /// Returns this service's entry of the OSB catalog.
    pub fn catalog_entry(&self) -> &Value {
        &self.catalog
    }

    /// Renders the process to run for an instance.
    pub fn render_process(&self, vars: &Vars) -> Result<Option<RenderedProcess>, RenderError> {
        let Some(p) = &self.process else {
            return Ok(None);
        };
        Ok(Some(RenderedProcess {
            argv: p
                .command
                .iter()
                .map(|t| t.render(vars))
                .collect::<Result<_, _>>()?,
            env: p
                .env
                .iter()
                .map(|(k, t)| Ok((k.clone(), t.render(vars)?)))
                .collect::<Result<_, _>>()?,
            files: p
                .files
                .iter()
                .map(|f| Ok((f.path.clone(), f.content.render(vars)?, f.mode)))
                .collect::<Result<_, _>>()?,
            ready_timeout_ms: p.ready_timeout_ms,
        }))
    }

    /// Returns the database engine of a `database` service.
    pub fn database_engine(&self) -> Option<&str> {
        self.database_engine.as_deref()
    }

    /// Returns whether any hook runs on `event`.
    pub fn has_hooks(&self, event: HookEvent) -> bool {
        self.hooks.iter().any(|(e, _)| *e == event)
    }

    /// Renders the hooks of `event`, in file order.
    pub fn render_hooks(
        &self,
        event: HookEvent,
        vars: &Vars,
    ) -> Result<Vec<RenderedHook>, RenderError> {
        let map =
            |m: &BTreeMap<String, Template>| -> Result<BTreeMap<String, String>, RenderError> {
                m.iter()
                    .map(|(k, t)| Ok((k.clone(), t.render(vars)?)))
                    .collect()
            };
        self.hooks
            .iter()
            .filter(|(e, _)| *e == event)
            .map(|(_, h)| {
                Ok(match h {
                    HookTemplate::Command {
                        argv,
                        env,
                        stdin,
                        timeout_ms,
                    } => RenderedHook::Command {
                        argv: argv
                            .iter()
                            .map(|t| t.render(vars))
                            .collect::<Result<_, _>>()?,
                        env: map(env)?,
                        stdin: stdin.render(vars)?,
                        timeout_ms: *timeout_ms,
                    },
                    HookTemplate::Http {
                        method,
                        url,
                        headers,
                        body,
                        timeout_ms,
                        accept_status,
                    } => RenderedHook::Http {
                        method: method.clone(),
                        url: Some(url.render(vars)?)
                            .filter(|u| is_http_url(u))
                            .ok_or_else(|| {
                                RenderError::Invalid(
                                    "hook url must start with http:// or https://".into(),
                                )
                            })?,
                        headers: map(headers)?,
                        body: body.render(vars)?,
                        timeout_ms: *timeout_ms,
                        accept_status: accept_status.clone(),
                    },
                })
            })
            .collect()
    }

    /// Renders the size cap of a `directory` instance, in bytes.
    pub fn render_directory_limit(&self, vars: &Vars) -> Result<Option<u64>, RenderError> {
        let Some(t) = &self.directory_limit_mb else {
            return Ok(None);
        };
        let text = t.render(vars)?;
        let mb: u64 = text
            .trim()
            .parse()
            .map_err(|_| RenderError::NotScalar("size_limit_mb".into()))?;
        Ok(Some(mb.saturating_mul(1024 * 1024)))
    }

    /// Renders the OSB `volume_mounts` entry of a binding, with `path` the
    /// instance directory on the node.
    pub fn render_volume_mount(
        &self,
        vars: &Vars,
        volume_id: &str,
        path: &str,
    ) -> Result<Option<Value>, RenderError> {
        let Some(v) = &self.volume_mount else {
            return Ok(None);
        };
        Ok(Some(json!({
            "driver": v.driver,
            "container_dir": v.container_dir.render(vars)?,
            "mode": v.mode,
            "device_type": "shared",
            "device": {
                "volume_id": volume_id,
                "mount_config": { "source": path },
            },
        })))
    }

    /// Renders a binding's credentials object.
    pub fn render_credentials(&self, vars: &Vars) -> Result<Map<String, Value>, RenderError> {
        self.credentials
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.render_value(vars)?)))
            .collect()
    }
}

/// Every loaded service definition, and the OSB catalog made from them.
#[derive(Debug, Clone)]
pub struct Catalog {
    services: Vec<ServiceDef>,
    json: Value,
}

impl Catalog {
    /// Loads every `*.yaml` / `*.yml` file of `dir` (one service each, in
    /// file name order). All problems are reported together.
    pub fn load_dir(dir: &Path) -> Result<Catalog, LoadError> {
        let entries = std::fs::read_dir(dir).map_err(|e| LoadError {
            issues: vec![Issue {
                file: dir.to_path_buf(),
                line: None,
                message: format!("cannot read directory: {e}"),
            }],
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("yaml") | Some("yml")
                    )
            })
            .collect();
        files.sort();
        let mut sources = Vec::new();
        let mut issues = Vec::new();
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => sources.push((file, text)),
                Err(e) => issues.push(Issue {
                    file,
                    line: None,
                    message: format!("cannot read file: {e}"),
                }),
            }
        }
        match Catalog::from_sources(sources) {
            Ok(c) if issues.is_empty() => Ok(c),
            Ok(_) => Err(LoadError { issues }),
            Err(mut e) => {
                issues.append(&mut e.issues);
                Err(LoadError { issues })
            }
        }
    }

    /// Builds a catalog from (file name, YAML text) pairs.
    pub fn from_sources(sources: Vec<(PathBuf, String)>) -> Result<Catalog, LoadError> {
        let mut issues = Vec::new();
        let mut parsed = Vec::new();
        for (file, text) in &sources {
            match parse_service(file, text) {
                Ok(s) => parsed.push((file, text, s)),
                Err(mut found) => issues.append(&mut found),
            }
        }
        // Ids are global across services and plans, names per level (OSB).
        let mut ids: HashMap<&str, &Path> = HashMap::new();
        let mut names: HashSet<&str> = HashSet::new();
        for (file, text, s) in &parsed {
            if !names.insert(&s.name) {
                issues.push(issue_at(
                    file,
                    text,
                    &s.name,
                    format!("duplicate service name '{}'", s.name),
                ));
            }
            let mut plan_names = HashSet::new();
            for id in std::iter::once(&s.id).chain(s.plans.iter().map(|p| &p.id)) {
                if let Some(other) = ids.insert(id, file) {
                    issues.push(issue_at(
                        file,
                        text,
                        id,
                        format!("duplicate id '{id}' (also in {})", other.display()),
                    ));
                }
            }
            for p in &s.plans {
                if !plan_names.insert(&p.name) {
                    issues.push(issue_at(
                        file,
                        text,
                        &p.name,
                        format!("duplicate plan name '{}'", p.name),
                    ));
                }
            }
        }
        if !issues.is_empty() {
            return Err(LoadError { issues });
        }
        let services: Vec<ServiceDef> = parsed.into_iter().map(|(_, _, s)| s).collect();
        let json = json!({
            "services": services.iter().map(|s| s.catalog.clone()).collect::<Vec<_>>()
        });
        Ok(Catalog { services, json })
    }

    /// Returns every service.
    pub fn services(&self) -> &[ServiceDef] {
        &self.services
    }

    /// Returns the service with OSB id `id`.
    pub fn service(&self, id: &str) -> Option<&ServiceDef> {
        self.services.iter().find(|s| s.id == id)
    }

    /// Returns the service named `name`.
    pub fn service_by_name(&self, name: &str) -> Option<&ServiceDef> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Returns the `GET /v2/catalog` body.
    pub fn osb_json(&self) -> &Value {
        &self.json
    }
}

/// Returns an issue located at the first line of `text` containing `needle`.
fn issue_at(file: &Path, text: &str, needle: &str, message: String) -> Issue {
    let line = text.lines().position(|l| l.contains(needle)).map(|i| i + 1);
    Issue {
        file: file.to_path_buf(),
        line,
        message,
    }
}

/// What OSB ("Input Parameters Schema Object") requires of a published
/// schema beyond being valid JSON Schema: "The `$schema` key MUST be present
/// in the schema declaring the version of JSON schema the schema is using"
/// and "Schemas MUST NOT be larger than 64kB". ("Schemas MUST NOT contain any
/// external references": the validator, built without resolvers, already
/// refuses to compile them.)
fn osb_schema_rules(schema: &Value) -> Result<(), String> {
    if !schema.get("$schema").is_some_and(Value::is_string) {
        return Err("'$schema' (the JSON Schema version, e.g. \
                    http://json-schema.org/draft-04/schema#) is required"
            .into());
    }
    if serde_json::to_vec(schema).map_or(true, |b| b.len() > 64 * 1024) {
        return Err("larger than 64kB".into());
    }
    Ok(())
}

/// `MAJOR.MINOR.PATCH[-pre][+build]` with numeric parts without leading
/// zeros: OSB requires `maintenance_info.version` to be "a string conforming
/// to a semantic version 2.0".
fn is_semver(v: &str) -> bool {
    let ident = |s: &str| {
        !s.is_empty()
            && s.split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    let (rest, build) = match v.split_once('+') {
        Some((r, b)) => (r, Some(b)),
        None => (v, None),
    };
    let (core, pre) = match rest.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (rest, None),
    };
    let numeric = |p: &str| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && (p == "0" || !p.starts_with('0'))
    };
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| numeric(p))
        && pre.is_none_or(ident)
        && build.is_none_or(ident)
}

fn is_http_url(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// OSB: names are CLI-friendly, "alphanumeric characters, periods, and hyphens".
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
}

/// Ids travel in URL paths: keep them to characters that need no escaping.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
}

fn valid_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn parse_service(file: &Path, text: &str) -> Result<ServiceDef, Vec<Issue>> {
    let raw: ServiceFile = serde_yaml::from_str(text).map_err(|e| {
        vec![Issue {
            file: file.to_path_buf(),
            line: e.location().map(|l| l.line()),
            message: e.to_string(),
        }]
    })?;
    let mut issues = Vec::new();
    let mut bad =
        |needle: &str, message: String| issues.push(issue_at(file, text, needle, message));

    if !valid_id(&raw.id) {
        bad(&raw.id, format!("invalid service id '{}'", raw.id));
    }
    if !valid_name(&raw.name) {
        bad(
            "name:",
            format!(
                "invalid service name '{}': use letters, digits, '.' and '-'",
                raw.name
            ),
        );
    }
    if raw.plans.is_empty() {
        bad("plans:", "a service needs at least one plan".into());
    }
    for r in &raw.requires {
        if !matches!(
            r.as_str(),
            "syslog_drain" | "route_forwarding" | "volume_mount"
        ) {
            bad(
                "requires:",
                format!(
                    "unknown requires entry '{r}' (syslog_drain, route_forwarding, volume_mount)"
                ),
            );
        }
    }

    let parse = |source: &str, vars_ok: &dyn Fn(&str) -> bool, issues: &mut Vec<Issue>| {
        match Template::parse(source) {
            Ok(t) => {
                for v in t.variables() {
                    if !vars_ok(v) {
                        issues.push(issue_at(
                            file,
                            text,
                            &format!("{{{{{v}"),
                            format!("unknown template variable '{v}'"),
                        ));
                    }
                }
                Some(t)
            }
            Err(e) => {
                issues.push(issue_at(
                    file,
                    text,
                    source.lines().next().unwrap_or(source),
                    e.to_string(),
                ));
                None
            }
        }
    };

    // Plan variables must exist in every plan to be usable in templates,
    // otherwise one plan would render and another fail at request time.
    let plan_vars: Vec<HashSet<&str>> = raw
        .plans
        .iter()
        .map(|p| p.variables.keys().map(String::as_str).collect())
        .collect();
    let common_vars: HashSet<&str> = plan_vars
        .iter()
        .skip(1)
        .fold(plan_vars.first().cloned().unwrap_or_default(), |acc, s| {
            acc.intersection(s).copied().collect()
        });
    let instance_ok = |v: &str| {
        INSTANCE_VARS.contains(&v)
            || common_vars.contains(v)
            || v.strip_prefix(NODE_VAR_PREFIX).is_some_and(valid_var_name)
    };
    let binding_ok = |v: &str| instance_ok(v) || BINDING_VARS.contains(&v);

    let mut local = Vec::new();
    let process = match (raw.model, &raw.process) {
        (Model::Process, None) => {
            local.push(issue_at(
                file,
                text,
                "model:",
                "model 'process' needs a 'process' section".into(),
            ));
            None
        }
        (Model::None | Model::Database | Model::Directory, Some(_)) => {
            local.push(issue_at(
                file,
                text,
                "process:",
                "a 'process' section needs model 'process'".into(),
            ));
            None
        }
        (_, None) => None,
        (Model::Process, Some(p)) => {
            if p.command.is_empty() {
                local.push(issue_at(
                    file,
                    text,
                    "command:",
                    "process command is empty".into(),
                ));
            }
            let command = p
                .command
                .iter()
                .filter_map(|c| parse(c, &instance_ok, &mut local))
                .collect();
            let env = p
                .env
                .iter()
                .filter_map(|(k, v)| parse(v, &instance_ok, &mut local).map(|t| (k.clone(), t)))
                .collect();
            let mut files = Vec::new();
            for f in &p.files {
                let relative_ok = !f.path.is_empty()
                    && !f.path.starts_with('/')
                    && f.path
                        .split('/')
                        .all(|c| !c.is_empty() && c != "." && c != "..");
                if !relative_ok {
                    local.push(issue_at(
                        file,
                        text,
                        &f.path,
                        format!("file path '{}' must be relative, without '..'", f.path),
                    ));
                }
                if let Some(content) = parse(&f.content, &instance_ok, &mut local) {
                    files.push(FileTemplate {
                        path: f.path.clone(),
                        content,
                        mode: f.mode.unwrap_or(0o600),
                    });
                }
            }
            Some(ProcessTemplate {
                command,
                env,
                files,
                ready_timeout_ms: p.ready_timeout_ms.unwrap_or(10_000),
            })
        }
    };
    let database_engine = match (raw.model, &raw.database) {
        (Model::Database, Some(d)) if d.engine == "postgresql" => Some(d.engine.clone()),
        (Model::Database, Some(d)) => {
            local.push(issue_at(
                file,
                text,
                "engine:",
                format!("unknown database engine '{}' (postgresql)", d.engine),
            ));
            None
        }
        (Model::Database, None) => {
            local.push(issue_at(
                file,
                text,
                "model:",
                "model 'database' needs a 'database' section".into(),
            ));
            None
        }
        (_, Some(_)) => {
            local.push(issue_at(
                file,
                text,
                "database:",
                "a 'database' section needs model 'database'".into(),
            ));
            None
        }
        (_, None) => None,
    };
    let directory_limit_mb = match (raw.model, &raw.directory) {
        (Model::Directory, Some(d)) => {
            let source = match &d.size_limit_mb {
                serde_yaml::Value::Number(n) if n.as_u64().is_some() => Some(n.to_string()),
                serde_yaml::Value::String(s) => Some(s.clone()),
                _ => None,
            };
            match source {
                Some(src) => parse(&src, &instance_ok, &mut local),
                None => {
                    local.push(issue_at(
                        file,
                        text,
                        "size_limit_mb:",
                        "size_limit_mb must be a whole number or a template".into(),
                    ));
                    None
                }
            }
        }
        (Model::Directory, None) => {
            local.push(issue_at(
                file,
                text,
                "model:",
                "model 'directory' needs a 'directory' section".into(),
            ));
            None
        }
        (_, Some(_)) => {
            local.push(issue_at(
                file,
                text,
                "directory:",
                "a 'directory' section needs model 'directory'".into(),
            ));
            None
        }
        (_, None) => None,
    };
    let requires_volume_mount = raw.requires.iter().any(|r| r == "volume_mount");
    let volume_mount = match &raw.volume_mount {
        Some(v) => {
            if !matches!(v.mode.as_str(), "r" | "rw") {
                local.push(issue_at(
                    file,
                    text,
                    "mode:",
                    format!("volume_mount mode '{}' must be 'r' or 'rw'", v.mode),
                ));
            }
            if !requires_volume_mount {
                local.push(issue_at(
                    file,
                    text,
                    "volume_mount:",
                    "a 'volume_mount' section needs 'requires: [volume_mount]'".into(),
                ));
            }
            parse(&v.container_dir, &instance_ok, &mut local).map(|container_dir| {
                VolumeMountTemplate {
                    driver: v.driver.clone(),
                    container_dir,
                    mode: v.mode.clone(),
                }
            })
        }
        None => {
            if requires_volume_mount {
                local.push(issue_at(
                    file,
                    text,
                    "requires:",
                    "'requires: [volume_mount]' needs a 'volume_mount' section".into(),
                ));
            }
            None
        }
    };
    let mut hooks = Vec::new();
    let mut hook_programs = Vec::new();
    for (event, list) in [
        (HookEvent::Provision, &raw.hooks.provision),
        (HookEvent::Deprovision, &raw.hooks.deprovision),
        (HookEvent::Bind, &raw.hooks.bind),
        (HookEvent::Unbind, &raw.hooks.unbind),
    ] {
        let scope: &dyn Fn(&str) -> bool = match event {
            HookEvent::Bind | HookEvent::Unbind => &binding_ok,
            _ => &instance_ok,
        };
        for h in list {
            let parsed = match (&h.command, &h.http) {
                (Some(c), None) => {
                    if c.argv.is_empty() {
                        local.push(issue_at(file, text, "argv:", "hook argv is empty".into()));
                    }
                    if let Some(program) = c.argv.first().filter(|a| !a.contains("{{")) {
                        hook_programs.push(program.clone());
                    }
                    let argv: Vec<Template> = c
                        .argv
                        .iter()
                        .filter_map(|a| parse(a, scope, &mut local))
                        .collect();
                    let env: BTreeMap<String, Template> = c
                        .env
                        .iter()
                        .filter_map(|(k, v)| parse(v, scope, &mut local).map(|t| (k.clone(), t)))
                        .collect();
                    parse(&c.stdin, scope, &mut local).map(|stdin| HookTemplate::Command {
                        argv,
                        env,
                        stdin,
                        timeout_ms: c.timeout_ms.unwrap_or(30_000),
                    })
                }
                (None, Some(h)) => {
                    let method = h.method.to_ascii_uppercase();
                    if !matches!(
                        method.as_str(),
                        "GET" | "PUT" | "POST" | "DELETE" | "PATCH" | "HEAD"
                    ) {
                        local.push(issue_at(
                            file,
                            text,
                            &h.method,
                            format!("unknown HTTP method '{}'", h.method),
                        ));
                    }
                    // A URL starting with a variable is checked when rendered.
                    if !(h.url.starts_with("{{") || is_http_url(&h.url)) {
                        local.push(issue_at(
                            file,
                            text,
                            &h.url,
                            "hook url must start with http:// or https://".into(),
                        ));
                    }
                    let headers: BTreeMap<String, Template> = h
                        .headers
                        .iter()
                        .filter_map(|(k, v)| parse(v, scope, &mut local).map(|t| (k.clone(), t)))
                        .collect();
                    let url = parse(&h.url, scope, &mut local);
                    let body = parse(&h.body, scope, &mut local);
                    url.zip(body).map(|(url, body)| HookTemplate::Http {
                        method,
                        url,
                        headers,
                        body,
                        timeout_ms: h.timeout_ms.unwrap_or(30_000),
                        accept_status: h.accept_status.clone(),
                    })
                }
                _ => {
                    local.push(issue_at(
                        file,
                        text,
                        "hooks:",
                        "each hook needs exactly one of 'command' or 'http'".into(),
                    ));
                    None
                }
            };
            if let Some(p) = parsed {
                hooks.push((event, p));
            }
        }
    }
    let credentials = raw
        .credentials
        .iter()
        .filter_map(|(k, v)| parse(v, &binding_ok, &mut local).map(|t| (k.clone(), t)))
        .collect();

    let mut plans = Vec::new();
    for p in &raw.plans {
        if !valid_id(&p.id) {
            local.push(issue_at(
                file,
                text,
                &p.id,
                format!("invalid plan id '{}'", p.id),
            ));
        }
        if !valid_name(&p.name) {
            local.push(issue_at(
                file,
                text,
                &p.name,
                format!(
                    "invalid plan name '{}': use letters, digits, '.' and '-'",
                    p.name
                ),
            ));
        }
        for (k, v) in &p.variables {
            if !valid_var_name(k) || INSTANCE_VARS.contains(&k.as_str()) {
                local.push(issue_at(
                    file,
                    text,
                    k,
                    format!(
                        "plan variable '{k}' must be lowercase [a-z0-9_] and not a built-in name"
                    ),
                ));
            }
            if !(v.is_string() || v.is_number() || v.is_boolean()) {
                local.push(issue_at(
                    file,
                    text,
                    k,
                    format!("plan variable '{k}' must be a scalar"),
                ));
            }
        }
        if let Some(m) = &p.maintenance_info
            && !is_semver(&m.version)
        {
            local.push(issue_at(
                file,
                text,
                "maintenance_info",
                format!(
                    "plan '{}': maintenance_info.version '{}' is not a semantic version \
                     (MAJOR.MINOR.PATCH)",
                    p.name, m.version
                ),
            ));
        }
        let mut validators = Validators::default();
        if let Some(s) = &p.schemas {
            let mut compile = |schema: Option<&ParamsSchema>, what: &str| {
                let schema = schema?;
                match jsonschema::validator_for(&schema.parameters)
                    .map_err(|e| e.to_string())
                    .and_then(|v| osb_schema_rules(&schema.parameters).map(|()| v))
                {
                    Ok(v) => Some((schema.parameters.clone(), v)),
                    Err(e) => {
                        local.push(issue_at(
                            file,
                            text,
                            "schemas:",
                            format!("plan '{}': invalid {what} schema: {e}", p.name),
                        ));
                        None
                    }
                }
            };
            let si = s.service_instance.as_ref();
            validators.instance_create = compile(
                si.and_then(|x| x.create.as_ref()),
                "service_instance.create",
            );
            validators.instance_update = compile(
                si.and_then(|x| x.update.as_ref()),
                "service_instance.update",
            );
            validators.binding_create = compile(
                s.service_binding.as_ref().and_then(|x| x.create.as_ref()),
                "service_binding.create",
            );
        }
        plans.push(PlanDef {
            id: p.id.clone(),
            name: p.name.clone(),
            description: p.description.clone(),
            free: p.free,
            bindable: p.bindable.unwrap_or(raw.bindable),
            plan_updateable: p.plan_updateable.unwrap_or(raw.plan_updateable),
            maximum_polling_duration: p.maximum_polling_duration,
            maintenance_info: p.maintenance_info.clone(),
            variables: p.variables.clone(),
            validators: Arc::new(validators),
        });
    }
    issues.append(&mut local);

    let requires_executables = if !raw.requires_executables.is_empty() {
        raw.requires_executables.clone()
    } else {
        let mut programs: Vec<String> = raw
            .process
            .as_ref()
            .and_then(|p| p.command.first())
            .filter(|c| !c.contains("{{"))
            .cloned()
            .into_iter()
            .chain(hook_programs)
            .collect();
        programs.dedup();
        programs
    };
    if !issues.is_empty() {
        return Err(issues);
    }

    let catalog = catalog_entry(&raw);
    Ok(ServiceDef {
        id: raw.id,
        name: raw.name,
        description: raw.description,
        version: raw.version,
        tags: raw.tags,
        bindable: raw.bindable,
        instances_retrievable: raw.instances_retrievable,
        bindings_retrievable: raw.bindings_retrievable,
        plan_updateable: raw.plan_updateable,
        async_required: raw.async_required,
        model: raw.model,
        process,
        database_engine,
        directory_limit_mb,
        volume_mount,
        requires_volume_mount,
        hooks,
        credentials,
        plans,
        source: file.to_path_buf(),
        requires_executables,
        catalog,
    })
}

/// Builds the OSB catalog object of a service (only OSB fields).
fn catalog_entry(raw: &ServiceFile) -> Value {
    let mut s = Map::new();
    s.insert("id".into(), json!(raw.id));
    s.insert("name".into(), json!(raw.name));
    s.insert("description".into(), json!(raw.description));
    s.insert("tags".into(), json!(raw.tags));
    if !raw.requires.is_empty() {
        s.insert("requires".into(), json!(raw.requires));
    }
    s.insert("bindable".into(), json!(raw.bindable));
    s.insert(
        "instances_retrievable".into(),
        json!(raw.instances_retrievable),
    );
    s.insert(
        "bindings_retrievable".into(),
        json!(raw.bindings_retrievable),
    );
    s.insert("plan_updateable".into(), json!(raw.plan_updateable));
    s.insert(
        "allow_context_updates".into(),
        json!(raw.allow_context_updates),
    );
    let mut metadata = raw.metadata.clone().unwrap_or_else(|| json!({}));
    if let (Some(v), Some(m)) = (&raw.version, metadata.as_object_mut()) {
        m.entry("version").or_insert_with(|| json!(v));
    }
    s.insert("metadata".into(), metadata);
    let plans: Vec<Value> = raw
        .plans
        .iter()
        .map(|p| {
            let mut o = Map::new();
            o.insert("id".into(), json!(p.id));
            o.insert("name".into(), json!(p.name));
            o.insert("description".into(), json!(p.description));
            o.insert("free".into(), json!(p.free));
            if let Some(b) = p.bindable {
                o.insert("bindable".into(), json!(b));
            }
            if let Some(b) = p.plan_updateable {
                o.insert("plan_updateable".into(), json!(b));
            }
            if let Some(m) = &p.metadata {
                o.insert("metadata".into(), m.clone());
            }
            if let Some(d) = p.maximum_polling_duration {
                o.insert("maximum_polling_duration".into(), json!(d));
            }
            if let Some(m) = &p.maintenance_info {
                o.insert("maintenance_info".into(), json!(m));
            }
            if let Some(sc) = &p.schemas {
                o.insert("schemas".into(), json!(sc));
            }
            Value::Object(o)
        })
        .collect();
    s.insert("plans".into(), json!(plans));
    Value::Object(s)
}

#[cfg(test)]
mod tests;
