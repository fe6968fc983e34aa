//! The blocking SQLite store: port leases and credentials.
//!
//! [`Store`] owns one connection and does every request as one
//! `BEGIN IMMEDIATE` transaction, so it is usable on its own (a CLI, a test)
//! as well as behind [`crate::StoreHandle`], which runs it on a dedicated
//! thread for the async gRPC service.

use std::collections::HashSet;
use std::fmt;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::TryRngCore as _;
use rand::rngs::OsRng;
use rusqlite::{Connection, OptionalExtension as _, Transaction, TransactionBehavior, params};

use crate::Error;

/// Longest pool, owner or kind accepted, in bytes: owners are OSB instance
/// and binding ids, which the gateway accepts up to 255 characters.
pub const MAX_NAME_LEN: usize = 255;

/// The schema this build writes, stored in `PRAGMA user_version`.
const SCHEMA_VERSION: i32 = 1;

/// How long to wait for a lock held by another process on the same file
/// before answering UNAVAILABLE. Inside one allocator the writer thread
/// serialises everything, so this only matters when two processes share it.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Random bytes in a username: 96 bits make collisions negligible, and the
/// UNIQUE constraint catches the rest.
const USERNAME_BYTES: usize = 12;
/// Random bytes in a password: 192 bits, well above the 128 the contract asks.
const PASSWORD_BYTES: usize = 24;
/// Username collisions are retried with a fresh name this many times.
const USERNAME_ATTEMPTS: usize = 8;

const SCHEMA_V1: &str = "
CREATE TABLE leases (
    pool       TEXT    NOT NULL,
    owner      TEXT    NOT NULL,
    port       INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (pool, owner),
    -- The one rule that matters: no port is leased twice in a pool.
    UNIQUE (pool, port)
) STRICT;
-- ListAllocations filtered by owner only.
CREATE INDEX leases_owner ON leases (owner);
CREATE TABLE credentials (
    owner      TEXT    NOT NULL PRIMARY KEY,
    kind       TEXT    NOT NULL,
    username   TEXT    NOT NULL UNIQUE,
    password   TEXT    NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
";

/// An inclusive range of TCP ports, valid by construction (1 ≤ start ≤ end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    start: u16,
    end: u16,
}

impl PortRange {
    /// Checks that `start..=end` is a non-empty range within 1..=65535.
    pub fn new(start: u32, end: u32) -> Result<Self, Error> {
        let port = |name: &str, p: u32| {
            u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid(format!("range {name} {p} is outside 1-65535")))
        };
        let (start, end) = (port("start", start)?, port("end", end)?);
        if start > end {
            return Err(invalid(format!(
                "range start {start} is greater than range end {end}"
            )));
        }
        Ok(Self { start, end })
    }

    /// The first port of the range.
    pub fn start(&self) -> u16 {
        self.start
    }

    /// The last port of the range (inclusive).
    pub fn end(&self) -> u16 {
        self.end
    }

    /// True when `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

/// A validated request for a port lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRequest {
    pool: String,
    owner: String,
    range: PortRange,
    preferred: Option<u16>,
    exclude: HashSet<u16>,
}

impl PortRequest {
    /// Validates `pool` and `owner` (see [`validate_name`]). A `preferred`
    /// port or `exclude` entry that is not a TCP port can never be leased,
    /// so it is dropped rather than rejected.
    pub fn new(
        pool: impl Into<String>,
        owner: impl Into<String>,
        range: PortRange,
        preferred: Option<u32>,
        exclude: impl IntoIterator<Item = u32>,
    ) -> Result<Self, Error> {
        let (pool, owner) = (pool.into(), owner.into());
        validate_name("pool", &pool)?;
        validate_name("owner", &owner)?;
        Ok(Self {
            pool,
            owner,
            range,
            preferred: preferred.and_then(|p| u16::try_from(p).ok()),
            exclude: exclude
                .into_iter()
                .filter_map(|p| u16::try_from(p).ok())
                .collect(),
        })
    }

    /// The pool the lease is in.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// Who holds the lease.
    pub fn owner(&self) -> &str {
        &self.owner
    }
}

/// The answer to [`Store::allocate_port`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortAllocation {
    /// The leased port.
    pub port: u16,
    /// True when this call made the lease, false when it already existed.
    pub created: bool,
}

/// A stored port lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The pool (node) the port belongs to.
    pub pool: String,
    /// The holder of the lease.
    pub owner: String,
    /// The leased port.
    pub port: u16,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
}

/// A generated credential, password included. Its `Debug` redacts the
/// password so that it cannot leak through a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// Who the credential belongs to.
    pub owner: String,
    /// What it is for, as given by the caller.
    pub kind: String,
    /// `u` followed by 24 lowercase hex digits.
    pub username: String,
    /// 24 random bytes, base64url without padding.
    pub password: String,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("owner", &self.owner)
            .field("kind", &self.kind)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// The answer to [`Store::issue_credential`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCredential {
    /// The credential (new or existing).
    pub credential: Credential,
    /// True when this call generated it, false when it already existed.
    pub created: bool,
}

/// A stored credential without its password, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialInfo {
    /// Who the credential belongs to.
    pub owner: String,
    /// What it is for.
    pub kind: String,
    /// The generated username.
    pub username: String,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
}

/// The answer to [`Store::list`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocations {
    /// Leases, ordered by pool then port.
    pub leases: Vec<LeaseInfo>,
    /// Credentials (no passwords), ordered by owner.
    pub credentials: Vec<CredentialInfo>,
}

/// Checks a pool or owner: non-empty, at most [`MAX_NAME_LEN`] bytes, no
/// control characters (they would corrupt log lines and CLI output), and
/// made of `[A-Za-z0-9._~-]`, not `.` or `..`: pools are node ids and
/// owners instance or binding ids, which follow that rule everywhere else
/// (they name directories on nodes), so anything else is a caller's bug.
/// The message names `field`, never echoes the value.
pub fn validate_name(field: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(invalid(format!("{field} must not be empty")));
    }
    validate_text(field, value)?;
    let id_like = value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~'));
    if !id_like {
        return Err(invalid(format!(
            "{field} must be made of A-Z, a-z, 0-9, '.', '_', '-' and '~' (not '.' or '..')"
        )));
    }
    Ok(())
}

fn validate_text(field: &str, value: &str) -> Result<(), Error> {
    if value.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "{field} is {} bytes long, at most {MAX_NAME_LEN} are allowed",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(format!("{field} contains a control character")));
    }
    Ok(())
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// The port leases and credentials database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// The WAL, synced by [`Store::sync`] (commits do not sync it).
    wal: Option<std::fs::File>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed, with mode 0600 since it holds passwords)
    /// the database at `path`, switches it to WAL and brings the schema up
    /// to date. Commits are durable once [`Store::sync`] returned.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        create_private_file(&path)?;
        let mut conn = Connection::open(&path)?;
        // Set first: switching to WAL below may itself wait for a lock.
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::NoWal { path, mode });
        }
        // NORMAL does not fsync at commit: an acknowledged lease or password
        // must survive a power loss, so whoever answers syncs first
        // (`Store::sync`, once per batch of commits: group commit).
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Overwrite deleted rows (revoked passwords) instead of leaving them
        // readable in free pages.
        conn.pragma_update(None, "secure_delete", "ON")?;
        migrate(&mut conn)?;
        Ok(Self {
            conn,
            path,
            wal: None,
        })
    }

    /// Rows changed since the database was opened: a batch that changed
    /// this needs a [`Store::sync`] before it is answered.
    pub fn total_changes(&self) -> u64 {
        self.conn.total_changes()
    }

    /// Makes every commit so far durable: fdatasync of the WAL (on Linux
    /// any descriptor of the file flushes all of its data). With no WAL
    /// file everything is in the database, which checkpoints sync.
    pub fn sync(&mut self) -> Result<(), Error> {
        use std::os::unix::fs::MetadataExt as _;
        let mut wal_path = self.path.as_os_str().to_owned();
        wal_path.push("-wal");
        let current = match std::fs::metadata(&wal_path) {
            Ok(m) => m.ino(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        // SQLite recreates the WAL only after the last connection closed
        // it; follow it if that ever happens.
        let stale = match &self.wal {
            Some(f) => f.metadata()?.ino() != current,
            None => true,
        };
        if stale {
            self.wal = Some(std::fs::File::open(&wal_path)?);
        }
        if let Some(f) = &self.wal {
            f.sync_data()?;
        }
        Ok(())
    }

    /// The path the store was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leases a port in `req.pool()` for `req.owner()`.
    ///
    /// An existing lease of the owner is returned unchanged (`created =
    /// false`), even if it is outside the range or excluded now: callers
    /// repeat the call after a crash and must get the same port. Otherwise
    /// the preferred port if it is in range, not excluded and free, else the
    /// lowest free port of the range that is not excluded.
    pub fn allocate_port(&mut self, req: &PortRequest) -> Result<PortAllocation, Error> {
        // `req` was validated by `PortRequest::new`, its only constructor.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(port) = lease_of(&tx, &req.pool, &req.owner)? {
            return Ok(PortAllocation {
                port,
                created: false,
            });
        }

        let mut skip = req.exclude.clone();
        let mut candidate = req
            .preferred
            .filter(|p| req.range.contains(*p) && !skip.contains(p));
        let now = unix_now();
        loop {
            let port = match candidate.take() {
                Some(p) => p,
                None => lowest_free(&tx, &req.pool, req.range, &skip)?.ok_or_else(|| {
                    Error::PoolExhausted {
                        pool: req.pool.clone(),
                        start: req.range.start,
                        end: req.range.end,
                    }
                })?,
            };
            // The INSERT, not the lookup above, is what decides: the
            // UNIQUE(pool, port) constraint makes a double lease impossible
            // whatever else touches the file.
            let inserted = tx.execute(
                "INSERT INTO leases (pool, owner, port, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![req.pool, req.owner, port, now],
            );
            match inserted {
                Ok(_) => {
                    tx.commit()?;
                    return Ok(PortAllocation {
                        port,
                        created: true,
                    });
                }
                // The port is taken (the preferred one, or a race with
                // another process): try the next one.
                Err(e) if constraint(&e) == Some(Constraint::Unique) => {
                    skip.insert(port);
                }
                // The owner got a lease meanwhile: that one is the answer.
                Err(e) if constraint(&e) == Some(Constraint::PrimaryKey) => {
                    let port = lease_of(&tx, &req.pool, &req.owner)?.ok_or(Error::Storage(e))?;
                    return Ok(PortAllocation {
                        port,
                        created: false,
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Deletes the lease of `owner` in `pool` and returns the released
    /// ports (empty when there was none).
    pub fn release_port(&mut self, pool: &str, owner: &str) -> Result<Vec<u16>, Error> {
        validate_name("pool", pool)?;
        validate_name("owner", owner)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let released = {
            let mut stmt = tx.prepare_cached(
                "DELETE FROM leases WHERE pool = ?1 AND owner = ?2 RETURNING port",
            )?;
            stmt.query_map(params![pool, owner], |r| r.get::<_, u16>(0))?
                .collect::<Result<Vec<_>, _>>()?
        };
        tx.commit()?;
        Ok(released)
    }

    /// Returns the credential of `owner`, generating it on first call
    /// (`kind` is recorded then; later calls return the stored one as is).
    pub fn issue_credential(&mut self, owner: &str, kind: &str) -> Result<IssuedCredential, Error> {
        validate_name("owner", owner)?;
        validate_text("kind", kind)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(credential) = credential_of(&tx, owner)? {
            return Ok(IssuedCredential {
                credential,
                created: false,
            });
        }
        let password = URL_SAFE_NO_PAD.encode(random_bytes::<PASSWORD_BYTES>()?);
        let created_at = unix_now();
        for _ in 0..USERNAME_ATTEMPTS {
            // A leading letter and lowercase hex: valid unquoted as a
            // PostgreSQL role and as a Redis ACL user.
            let username = format!("u{}", hex(&random_bytes::<USERNAME_BYTES>()?));
            let inserted = tx.execute(
                "INSERT INTO credentials (owner, kind, username, password, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![owner, kind, username, password, created_at],
            );
            match inserted {
                Ok(_) => {
                    tx.commit()?;
                    let credential = Credential {
                        owner: owner.to_owned(),
                        kind: kind.to_owned(),
                        username,
                        password,
                        created_at,
                    };
                    return Ok(IssuedCredential {
                        credential,
                        created: true,
                    });
                }
                Err(e) if constraint(&e) == Some(Constraint::Unique) => continue,
                Err(e) if constraint(&e) == Some(Constraint::PrimaryKey) => {
                    let credential = credential_of(&tx, owner)?.ok_or(Error::Storage(e))?;
                    return Ok(IssuedCredential {
                        credential,
                        created: false,
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Internal("could not generate a unique username"))
    }

    /// Deletes the credential of `owner`; true when there was one.
    pub fn revoke_credential(&mut self, owner: &str) -> Result<bool, Error> {
        validate_name("owner", owner)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let deleted = tx.execute("DELETE FROM credentials WHERE owner = ?1", [owner])?;
        tx.commit()?;
        Ok(deleted > 0)
    }

    /// Lists leases (only in `pool` and of `owner`, when given) and
    /// credentials (only of `owner`, when given), without passwords.
    pub fn list(&mut self, pool: Option<&str>, owner: Option<&str>) -> Result<Allocations, Error> {
        if let Some(pool) = pool {
            validate_name("pool filter", pool)?;
        }
        if let Some(owner) = owner {
            validate_name("owner filter", owner)?;
        }
        // One read transaction: leases and credentials from the same snapshot.
        let tx = self.conn.transaction()?;
        // Spelled out per filter combination rather than `?1 IS NULL OR ...`,
        // which would keep SQLite from using the indexes.
        let (sql, args): (&str, Vec<&str>) = match (pool, owner) {
            (None, None) => (
                "SELECT pool, owner, port, created_at FROM leases ORDER BY pool, port",
                vec![],
            ),
            (Some(p), None) => (
                "SELECT pool, owner, port, created_at FROM leases WHERE pool = ?1 ORDER BY port",
                vec![p],
            ),
            (None, Some(o)) => (
                "SELECT pool, owner, port, created_at FROM leases WHERE owner = ?1 ORDER BY pool, port",
                vec![o],
            ),
            (Some(p), Some(o)) => (
                "SELECT pool, owner, port, created_at FROM leases WHERE pool = ?1 AND owner = ?2",
                vec![p, o],
            ),
        };
        let leases = {
            let mut stmt = tx.prepare_cached(sql)?;
            stmt.query_map(rusqlite::params_from_iter(args), |r| {
                Ok(LeaseInfo {
                    pool: r.get(0)?,
                    owner: r.get(1)?,
                    port: r.get(2)?,
                    created_at: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?
        };
        let credentials = {
            // The password column is never selected here.
            let mut stmt = tx.prepare_cached(
                "SELECT owner, kind, username, created_at FROM credentials \
                 WHERE ?1 IS NULL OR owner = ?1 ORDER BY owner",
            )?;
            stmt.query_map([owner], |r| {
                Ok(CredentialInfo {
                    owner: r.get(0)?,
                    kind: r.get(1)?,
                    username: r.get(2)?,
                    created_at: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?
        };
        tx.commit()?;
        Ok(Allocations {
            leases,
            credentials,
        })
    }
}

/// Creates the database file with mode 0600 before SQLite does (SQLite
/// would use 0644 less the umask), and tightens an existing one. SQLite
/// gives its `-wal` and `-shm` files the mode of the database file.
fn create_private_file(path: &Path) -> Result<(), Error> {
    let open_err = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(open_err)?;
    }
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        options.mode(0o600);
        let file = options.open(path).map_err(open_err)?;
        let mode = file.metadata().map_err(open_err)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "database readable by others, setting mode 0600");
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(open_err)?;
        }
    }
    #[cfg(not(unix))]
    options.open(path).map_err(open_err)?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), Error> {
    // IMMEDIATE so that two processes opening a fresh file do not both
    // try to create the tables.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i32 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    match version {
        0 => {
            tx.execute_batch(SCHEMA_V1)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        SCHEMA_VERSION => {}
        found => {
            return Err(Error::UnsupportedSchema {
                found,
                supported: SCHEMA_VERSION,
            });
        }
    }
    tx.commit()?;
    Ok(())
}

fn lease_of(tx: &Transaction<'_>, pool: &str, owner: &str) -> Result<Option<u16>, Error> {
    let mut stmt = tx.prepare_cached("SELECT port FROM leases WHERE pool = ?1 AND owner = ?2")?;
    Ok(stmt
        .query_row(params![pool, owner], |r| r.get(0))
        .optional()?)
}

fn credential_of(tx: &Transaction<'_>, owner: &str) -> Result<Option<Credential>, Error> {
    let mut stmt = tx.prepare_cached(
        "SELECT owner, kind, username, password, created_at FROM credentials WHERE owner = ?1",
    )?;
    Ok(stmt
        .query_row([owner], |r| {
            Ok(Credential {
                owner: r.get(0)?,
                kind: r.get(1)?,
                username: r.get(2)?,
                password: r.get(3)?,
                created_at: r.get(4)?,
            })
        })
        .optional()?)
}

/// The lowest port of `range` that is neither leased in `pool` nor in
/// `skip`. Walks the leased ports of this pool and range only, in index
/// order, and stops at the first gap, so a pool with many leases costs
/// one index range scan up to that gap.
fn lowest_free(
    tx: &Transaction<'_>,
    pool: &str,
    range: PortRange,
    skip: &HashSet<u16>,
) -> Result<Option<u16>, Error> {
    let mut stmt = tx.prepare_cached(
        "SELECT port FROM leases WHERE pool = ?1 AND port BETWEEN ?2 AND ?3 ORDER BY port",
    )?;
    let mut rows = stmt.query(params![pool, range.start, range.end])?;
    fn next_taken(rows: &mut rusqlite::Rows<'_>) -> Result<Option<u16>, Error> {
        Ok(match rows.next()? {
            Some(row) => Some(row.get(0)?),
            None => None,
        })
    }
    let mut taken = next_taken(&mut rows)?;
    for port in range.start..=range.end {
        while let Some(t) = taken
            && t < port
        {
            taken = next_taken(&mut rows)?;
        }
        if taken != Some(port) && !skip.contains(&port) {
            return Ok(Some(port));
        }
    }
    Ok(None)
}

#[derive(Debug, PartialEq, Eq)]
enum Constraint {
    PrimaryKey,
    Unique,
}

/// Which key a failed INSERT collided with, if that is why it failed.
fn constraint(err: &rusqlite::Error) -> Option<Constraint> {
    match err {
        rusqlite::Error::SqliteFailure(e, _) => match e.extended_code {
            rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY => Some(Constraint::PrimaryKey),
            rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE => Some(Constraint::Unique),
            _ => None,
        },
        _ => None,
    }
}

/// Bytes straight from the operating system's CSPRNG.
fn random_bytes<const N: usize>() -> Result<[u8; N], Error> {
    let mut buf = [0u8; N];
    OsRng
        .try_fill_bytes(&mut buf)
        .map_err(|e| Error::Rng(e.to_string()))?;
    Ok(buf)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("a.sqlite")).unwrap();
        (dir, store)
    }

    #[test]
    fn lowest_free_uses_the_pool_port_index() {
        let (_dir, store) = store();
        let plan: Vec<String> = store
            .conn
            .prepare(
                "EXPLAIN QUERY PLAN SELECT port FROM leases \
                 WHERE pool = ?1 AND port BETWEEN ?2 AND ?3 ORDER BY port",
            )
            .unwrap()
            .query_map(params!["p", 1, 2], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains("USING COVERING INDEX"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    }

    #[test]
    fn constraint_kinds_are_told_apart() {
        let (_dir, mut store) = store();
        let range = PortRange::new(1000, 1010).unwrap();
        let req = PortRequest::new("p", "a", range, None, []).unwrap();
        store.allocate_port(&req).unwrap();
        let insert = |owner: &str, port: u16| {
            store.conn.execute(
                "INSERT INTO leases (pool, owner, port, created_at) VALUES ('p', ?1, ?2, 0)",
                params![owner, port],
            )
        };
        assert_eq!(
            constraint(&insert("b", 1000).unwrap_err()),
            Some(Constraint::Unique)
        );
        assert_eq!(
            constraint(&insert("a", 1001).unwrap_err()),
            Some(Constraint::PrimaryKey)
        );
    }

    #[test]
    fn validation_messages_name_the_field() {
        let msg = |r: Result<(), Error>| r.unwrap_err().to_string();
        assert_eq!(msg(validate_name("pool", "")), "pool must not be empty");
        assert_eq!(
            msg(validate_name("owner", "a\nb")),
            "owner contains a control character"
        );
        assert!(msg(validate_name("owner", &"x".repeat(256))).contains("at most 255"));
        assert!(validate_name("owner", &"x".repeat(255)).is_ok());
        assert!(PortRange::new(0, 10).is_err());
        assert!(PortRange::new(10, 65536).is_err());
        assert!(PortRange::new(11, 10).is_err());
        assert!(PortRange::new(65535, 65535).is_ok());
    }

    #[test]
    fn credential_debug_redacts_the_password() {
        let (_dir, mut store) = store();
        let issued = store.issue_credential("o", "instance").unwrap();
        let debug = format!("{issued:?}");
        assert!(!debug.contains(&issued.credential.password), "{debug}");
        assert!(debug.contains("<redacted>"));
    }
}
