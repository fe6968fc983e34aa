//! Validated domain types built from the proto requests on receipt, so that
//! the rest of the node never sees an unchecked id or path.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use svcbroker_proto::v1::{
    BindRequest, DatabaseSpec, DeprovisionRequest, ProcessSpec, ProvisionRequest, UnbindRequest,
};

use crate::error::Error;
use crate::hooks::{self, Hook};

/// Name of the metadata file in every instance directory.
pub(crate) const META_FILE: &str = ".svcbroker-instance.json";
/// Daemon stdout, appended across restarts.
pub(crate) const STDOUT_LOG: &str = "stdout.log";
/// Daemon stderr, appended across restarts.
pub(crate) const STDERR_LOG: &str = "stderr.log";

/// Provisioning model of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Record only: no directory, no process.
    None,
    /// One supervised daemon in its own directory.
    Process,
    /// One database (and owner role) on the node's database server.
    Database,
    /// One size-capped directory.
    Directory,
}

impl Kind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::Process => "process",
            Kind::Database => "database",
            Kind::Directory => "directory",
        }
    }

    fn parse(s: &str) -> Result<Self, Error> {
        match s {
            "none" => Ok(Kind::None),
            "process" => Ok(Kind::Process),
            "database" => Ok(Kind::Database),
            "directory" => Ok(Kind::Directory),
            other => Err(Error::InvalidArgument(format!(
                "unsupported kind {:?} (this node runs \"none\", \"process\", \"database\" and \"directory\")",
                truncate(other, 64)
            ))),
        }
    }

    /// Parses the kind of a Deprovision/Bind/Unbind request, where an empty
    /// string (a gateway that does not send it) means "unknown".
    pub fn parse_optional(s: &str) -> Result<Option<Self>, Error> {
        if s.is_empty() {
            Ok(None)
        } else {
            Kind::parse(s).map(Some)
        }
    }
}

/// Linux's MAX_ARG_STRLEN (32 pages of 4 KiB): the longest single argument
/// or `NAME=value` string `execve` accepts.
const MAX_ARG_STRLEN: usize = 32 * 4096;

/// Largest directory cap: ext4's largest file (the loop image) and file
/// system with 4 KiB blocks, 16 TiB.
pub(crate) const MAX_DIRECTORY_BYTES: u64 = 16 << 40;

/// Smallest directory cap: below this an ext4 image is mostly metadata.
pub(crate) const MIN_DIRECTORY_BYTES: u64 = 1024 * 1024;

/// A validated database spec (engine "postgresql").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DbSpec {
    /// Database name, also its owner role's name.
    pub name: String,
}

/// Validates a database spec; `field` names it in errors.
pub(crate) fn validate_database(field: &str, d: DatabaseSpec) -> Result<DbSpec, Error> {
    if d.engine != "postgresql" {
        return Err(Error::InvalidArgument(format!(
            "{field}.engine {:?} is not supported (this node runs \"postgresql\")",
            truncate(&d.engine, 64)
        )));
    }
    crate::pg::validate_name(&format!("{field}.name"), &d.name)?;
    Ok(DbSpec { name: d.name })
}

fn required_database(field: &str, d: Option<DatabaseSpec>) -> Result<DbSpec, Error> {
    let d = d.ok_or_else(|| Error::InvalidArgument(format!("kind \"database\" needs {field}")))?;
    validate_database(field, d)
}

/// A validated Deprovision request.
pub(crate) struct Deprovision {
    pub instance_id: String,
    pub hooks: Vec<Hook>,
    /// `None` when the gateway did not say.
    pub kind: Option<Kind>,
    pub database: Option<DbSpec>,
}

impl Deprovision {
    /// Validates a request.
    pub fn from_request(req: DeprovisionRequest) -> Result<Self, Error> {
        validate_instance_id(&req.instance_id)?;
        let kind = Kind::parse_optional(&req.kind)?;
        let database = match (kind, req.database) {
            (Some(Kind::Database), d) => Some(required_database("database", d)?),
            (_, Some(d)) => Some(validate_database("database", d)?),
            (_, None) => None,
        };
        Ok(Deprovision {
            instance_id: req.instance_id,
            hooks: hooks::validate("hooks", req.hooks)?,
            kind,
            database,
        })
    }
}

/// A validated Bind or Unbind request (Unbind has no password).
pub(crate) struct Binding {
    pub instance_id: String,
    pub binding_id: String,
    pub username: String,
    pub password: String,
    pub hooks: Vec<Hook>,
    pub kind: Option<Kind>,
    pub database: Option<DbSpec>,
}

// Hand-written: the password must never reach a log line.
impl fmt::Debug for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Binding")
            .field("instance_id", &self.instance_id)
            .field("binding_id", &self.binding_id)
            .field("username", &self.username)
            .field("hooks", &self.hooks)
            .field("kind", &self.kind)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl Binding {
    fn build(
        instance_id: String,
        binding_id: String,
        username: String,
        password: String,
        hooks: Vec<svcbroker_proto::v1::Hook>,
        kind: &str,
        database: Option<DatabaseSpec>,
    ) -> Result<Self, Error> {
        validate_instance_id(&instance_id)?;
        // Not a directory name, but it reaches hooks and log lines.
        validate_id("binding_id", &binding_id)?;
        let kind = Kind::parse_optional(kind)?;
        let database = match (kind, database) {
            (Some(Kind::Database), d) => {
                let d = required_database("database", d)?;
                crate::pg::validate_name("username", &username)?;
                Some(d)
            }
            (_, Some(d)) => Some(validate_database("database", d)?),
            (_, None) => None,
        };
        Ok(Binding {
            instance_id,
            binding_id,
            username,
            password,
            hooks: hooks::validate("hooks", hooks)?,
            kind,
            database,
        })
    }

    /// Validates a Bind request.
    pub fn from_bind(req: BindRequest) -> Result<Self, Error> {
        Self::build(
            req.instance_id,
            req.binding_id,
            req.username,
            req.password,
            req.hooks,
            &req.kind,
            req.database,
        )
    }

    /// Validates an Unbind request.
    pub fn from_unbind(req: UnbindRequest) -> Result<Self, Error> {
        Self::build(
            req.instance_id,
            req.binding_id,
            req.username,
            String::new(),
            req.hooks,
            &req.kind,
            req.database,
        )
    }
}

/// A validated Provision request.
pub(crate) struct Provision {
    pub instance_id: String,
    pub service: String,
    pub plan: String,
    pub kind: Kind,
    pub port: u32,
    /// Set exactly when `kind` is [`Kind::Process`].
    pub process: Option<RunSpec>,
    /// Set exactly when `kind` is [`Kind::Database`].
    pub database: Option<DbSpec>,
    /// Size cap of a [`Kind::Directory`] instance; 0 means the node's
    /// default.
    pub size_limit_bytes: u64,
    /// Run once the instance exists, on every Provision.
    pub hooks: Vec<Hook>,
}

/// How to run one daemon: everything a restart needs.
#[derive(Clone)]
pub(crate) struct RunSpec {
    pub argv: Vec<String>,
    /// Sorted by name, so the hash does not depend on map order.
    pub env: Vec<(String, String)>,
    pub files: Vec<FileWrite>,
    /// 0 means "the node's default".
    pub ready_timeout_ms: u32,
}

/// One file to write into the instance directory.
#[derive(Clone)]
pub(crate) struct FileWrite {
    /// Relative, normal components only.
    pub path: PathBuf,
    pub content: String,
    /// Permission bits (already defaulted to 0600).
    pub mode: u32,
}

// Hand-written so that env values and file contents (passwords) never reach
// a log line through `{:?}`.
impl fmt::Debug for RunSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunSpec")
            .field("program", &self.argv.first())
            .field("args", &self.argv.len().saturating_sub(1))
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field(
                "files",
                &self.files.iter().map(|f| &f.path).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Checks an instance id: 1..=255 characters (the gateway's limit, and a
/// file name's) of `[A-Za-z0-9._~-]`, not `.` or `..`. It names a directory
/// under `data_dir`, so nothing else is safe.
pub(crate) fn validate_instance_id(id: &str) -> Result<(), Error> {
    // The node's own folder for images and directory records.
    if id == crate::directory::IMAGES_DIR {
        return Err(Error::InvalidArgument(format!(
            "instance_id {id:?} is reserved by the node"
        )));
    }
    validate_id("instance_id", id)
}

/// Checks an id the gateway made (instance or binding): the same rule as
/// the gateway's, so that it can name a file and appear in a log line.
fn validate_id(field: &str, id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 255
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{field} {:?} must be 1 to 255 characters of [A-Za-z0-9._~-] and not \".\" or \"..\"",
            truncate(id, 64)
        )))
    }
}

/// Checks a catalog name the node records and lists (service, plan): at
/// most 255 bytes, no control characters. The value is not echoed.
fn validate_label(field: &str, value: &str) -> Result<(), Error> {
    if value.len() > 255 {
        return Err(Error::InvalidArgument(format!(
            "{field} is {} bytes long, at most 255 are allowed",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!(
            "{field} contains a control character"
        )));
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn validate_file_path(raw: &str) -> Result<PathBuf, Error> {
    let bad = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "file path {:?} {why}",
            truncate(raw, 64)
        )))
    };
    if raw.is_empty() {
        return bad("is empty");
    }
    if raw.contains('\0') {
        return bad("contains a NUL byte");
    }
    // Linux's PATH_MAX and NAME_MAX: longer could never be written.
    if raw.len() >= 4096 {
        return bad("is 4096 bytes or longer");
    }
    if raw.split('/').any(|part| part.len() > 255) {
        return bad("has a component longer than 255 bytes");
    }
    let path = Path::new(raw);
    if path.is_absolute() {
        return bad("must be relative to the instance directory");
    }
    let mut clean = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir => return bad("must not contain \"..\""),
            Component::RootDir | Component::Prefix(_) => {
                return bad("must be relative to the instance directory");
            }
        }
    }
    if clean.as_os_str().is_empty() {
        return bad("names the instance directory itself");
    }
    if [META_FILE, STDOUT_LOG, STDERR_LOG]
        .iter()
        .any(|r| clean == Path::new(r))
    {
        return bad("is reserved by the node");
    }
    Ok(clean)
}

fn validate_process(p: ProcessSpec) -> Result<RunSpec, Error> {
    if p.argv.is_empty() || p.argv[0].is_empty() {
        return Err(Error::InvalidArgument(
            "process.argv must name a program".to_owned(),
        ));
    }
    if p.argv.iter().any(|a| a.contains('\0')) {
        return Err(Error::InvalidArgument(
            "process.argv must not contain NUL bytes".to_owned(),
        ));
    }
    // Linux refuses any single argument or environment string longer than
    // MAX_ARG_STRLEN at exec time; such a spec can never start.
    if p.argv.iter().any(|a| a.len() >= MAX_ARG_STRLEN) {
        return Err(Error::InvalidArgument(format!(
            "process.argv has an argument of {MAX_ARG_STRLEN} bytes or more"
        )));
    }
    let mut env: Vec<(String, String)> = p.env.into_iter().collect();
    if env
        .iter()
        .any(|(k, v)| k.len() + v.len() + 1 >= MAX_ARG_STRLEN)
    {
        return Err(Error::InvalidArgument(format!(
            "process.env has a variable of {MAX_ARG_STRLEN} bytes or more"
        )));
    }
    for (k, v) in &env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            // The value is not echoed: it may be a secret.
            return Err(Error::InvalidArgument(format!(
                "process.env name {:?} must be non-empty without '=' or NUL, value without NUL",
                truncate(k, 64)
            )));
        }
    }
    env.sort();
    let files = p
        .files
        .into_iter()
        .map(|f| {
            Ok(FileWrite {
                path: validate_file_path(&f.path)?,
                content: f.content,
                mode: if f.mode == 0 { 0o600 } else { f.mode & 0o777 },
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(RunSpec {
        argv: p.argv,
        env,
        files,
        ready_timeout_ms: p.ready_timeout_ms,
    })
}

impl Provision {
    /// Validates a request; `port_ok` says whether a port is in this node's
    /// range.
    pub fn from_request(
        req: ProvisionRequest,
        port_ok: impl Fn(u32) -> bool,
    ) -> Result<Self, Error> {
        validate_instance_id(&req.instance_id)?;
        if req.service.is_empty() {
            return Err(Error::InvalidArgument("service must be set".to_owned()));
        }
        // Both are recorded with the instance, listed and logged.
        validate_label("service", &req.service)?;
        validate_label("plan", &req.plan)?;
        let kind = Kind::parse(&req.kind)?;
        let mut database = None;
        let mut size_limit_bytes = 0;
        let process = match kind {
            Kind::None => None,
            Kind::Database => {
                database = Some(required_database("database", req.database)?);
                None
            }
            Kind::Directory => {
                size_limit_bytes = req.directory.map(|d| d.size_limit_bytes).unwrap_or(0);
                if size_limit_bytes != 0
                    && !(MIN_DIRECTORY_BYTES..=MAX_DIRECTORY_BYTES).contains(&size_limit_bytes)
                {
                    return Err(Error::InvalidArgument(format!(
                        "directory.size_limit_bytes must be 0 (the node's default) or \
                         {MIN_DIRECTORY_BYTES} to {MAX_DIRECTORY_BYTES}"
                    )));
                }
                None
            }
            Kind::Process => {
                if !port_ok(req.port) {
                    return Err(Error::InvalidArgument(format!(
                        "port {} is not in this node's port range",
                        req.port
                    )));
                }
                let p = req.process.ok_or_else(|| {
                    Error::InvalidArgument("kind \"process\" needs a process spec".to_owned())
                })?;
                Some(validate_process(p)?)
            }
        };
        Ok(Provision {
            instance_id: req.instance_id,
            service: req.service,
            plan: req.plan,
            kind,
            port: req.port,
            process,
            database,
            size_limit_bytes,
            hooks: hooks::validate("hooks", req.hooks)?,
        })
    }

    /// Stable hash of what determines the daemon (port, argv, env, files),
    /// recorded in the metadata file to recognise the same spec after a
    /// node restart. The plan is left out: a plan change alone needs no
    /// restart.
    pub fn spec_hash(&self) -> String {
        let mut h = Fnv::new();
        h.str("svcbroker-spec-v1");
        h.str(&self.service);
        h.str(self.kind.as_str());
        h.u64(u64::from(self.port));
        if let Some(p) = &self.process {
            h.u64(p.argv.len() as u64);
            p.argv.iter().for_each(|a| h.str(a));
            h.u64(p.env.len() as u64);
            for (k, v) in &p.env {
                h.str(k);
                h.str(v);
            }
            h.u64(p.files.len() as u64);
            for f in &p.files {
                h.str(&f.path.to_string_lossy());
                h.str(&f.content);
                h.u64(u64::from(f.mode));
            }
        }
        // Only hashed when set, so that hashes of process instances stay
        // what earlier node versions recorded. Hooks are left out: they run
        // on every Provision and restart nothing.
        if let Some(d) = &self.database {
            h.str(&d.name);
        }
        if self.kind == Kind::Directory {
            h.u64(self.size_limit_bytes);
        }
        format!("{:016x}", h.0)
    }
}

impl RunSpec {
    /// The readiness timeout, falling back to `default`.
    pub fn ready_timeout(&self, default: Duration) -> Duration {
        if self.ready_timeout_ms == 0 {
            default
        } else {
            Duration::from_millis(u64::from(self.ready_timeout_ms))
        }
    }
}

/// FNV-1a 64: tiny and, unlike `DefaultHasher`, stable across Rust
/// releases, which matters because hashes outlive the node binary.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    /// Length-prefixed, so ("ab","c") and ("a","bc") differ.
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.bytes(s.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids() {
        for ok in ["a", "abc-DEF_1.2", &"x".repeat(255), "a~b", "..."] {
            assert!(validate_instance_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".images",
            "a/b",
            "a b",
            "é",
            &"x".repeat(256),
            "a\0",
        ] {
            assert!(validate_instance_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn file_paths() {
        assert_eq!(
            validate_file_path("conf/redis.conf").unwrap(),
            Path::new("conf/redis.conf")
        );
        assert_eq!(validate_file_path("./a").unwrap(), Path::new("a"));
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            ".",
            META_FILE,
            "stderr.log",
        ] {
            assert!(validate_file_path(bad).is_err(), "{bad:?}");
        }
    }

    fn req(port: u32, arg: &str) -> ProvisionRequest {
        ProvisionRequest {
            instance_id: "i1".into(),
            service: "redis".into(),
            plan: "small".into(),
            kind: "process".into(),
            port,
            process: Some(ProcessSpec {
                argv: vec!["redis-server".into(), arg.into()],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn hash_is_stable_and_sensitive() {
        let a = Provision::from_request(req(10000, "x"), |_| true).unwrap();
        let b = Provision::from_request(req(10000, "x"), |_| true).unwrap();
        let c = Provision::from_request(req(10000, "y"), |_| true).unwrap();
        let d = Provision::from_request(req(10001, "x"), |_| true).unwrap();
        assert_eq!(a.spec_hash(), b.spec_hash());
        assert_ne!(a.spec_hash(), c.spec_hash());
        assert_ne!(a.spec_hash(), d.spec_hash());
    }

    #[test]
    fn debug_redacts_secrets() {
        let mut r = req(10000, "x");
        let p = r.process.as_mut().unwrap();
        p.env.insert("PASSWORD".into(), "hunter2".into());
        p.files.push(svcbroker_proto::v1::FileSpec {
            path: "redis.conf".into(),
            content: "requirepass hunter2".into(),
            mode: 0,
        });
        let v = Provision::from_request(r, |_| true).unwrap();
        let dbg = format!("{:?}", v.process.as_ref().unwrap());
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert_eq!(v.process.unwrap().files[0].mode, 0o600);
    }
}
