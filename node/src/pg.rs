//! The `database` model on PostgreSQL: one database per instance, owned by
//! a NOLOGIN role of the same name; one LOGIN role per binding, member of
//! that owner role, with `role` set to it so that everything a binding
//! creates belongs to the instance and every other binding can use it.
//!
//! The node keeps no state: every call looks at the server's catalogs, so
//! repeating a call (or making it after a node restart) is harmless.
//!
//! Safety rules, because names come from the network and the admin
//! connection is all-powerful:
//! - names are validated (`^[a-z_][a-z0-9_]{0,62}$`, not reserved) and
//!   still quoted as identifiers;
//! - an existing role or database is only touched when it has the shape the
//!   node gives it (an owner role cannot log in and owns the database of its
//!   name; a binding role is a plain LOGIN role, member of nothing but its
//!   instance's owner), so a request naming `postgres` or another
//!   instance's role is refused instead of altering it;
//! - passwords go to the server only as SCRAM-SHA-256 verifiers computed
//!   here, quoted as literals (CREATE ROLE takes no bind parameters), in
//!   statements that are never logged.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use crate::error::Error;

/// How long connecting to the server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Names the node refuses for databases and roles: they exist on every
/// server and belong to it.
const RESERVED: &[&str] = &["postgres", "template0", "template1", "public", "none"];

/// Checks a database or role name: 1..=63 characters of `[a-z0-9_]`, not
/// starting with a digit, not `pg_*` (reserved by PostgreSQL) and not one of
/// the server's own names. `what` names the field in the error.
pub(crate) fn validate_name(what: &str, name: &str) -> Result<(), Error> {
    let b = name.as_bytes();
    let shape = !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_');
    if !shape {
        return Err(Error::InvalidArgument(format!(
            "{what} {:?} must match ^[a-z_][a-z0-9_]{{0,62}}$",
            name.chars().take(80).collect::<String>()
        )));
    }
    if name.starts_with("pg_") || RESERVED.contains(&name) {
        return Err(Error::InvalidArgument(format!(
            "{what} {name:?} is reserved by the database server"
        )));
    }
    Ok(())
}

/// Quotes an identifier (already validated, so the quotes are belt and
/// braces).
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal the way PostgreSQL's `quote_literal` does: quotes
/// doubled, and when a backslash occurs the `E'...'` form with backslashes
/// doubled, so the result means the same whatever
/// `standard_conforming_strings` says. NUL cannot be sent at all.
pub(crate) fn quote_literal(s: &str) -> Result<String, Error> {
    if s.contains('\0') {
        return Err(Error::InvalidArgument(
            "value must not contain a NUL byte".to_owned(),
        ));
    }
    let body = s.replace('\'', "''");
    Ok(if s.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    })
}

/// Maps a client error: a server-side error is permanent, anything else
/// (refused connection, timeout, lost connection) is worth retrying.
fn db_err(context: &str, e: tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) => Error::Database {
            message: format!("{context}: {} ({})", db.message(), db.code().code()),
            transient: false,
        },
        // Display of a non-server error never carries the connection URL.
        None => Error::Database {
            message: format!("{context}: {e}"),
            transient: true,
        },
    }
}

fn is_code(e: &tokio_postgres::Error, code: &SqlState) -> bool {
    e.code() == Some(code)
}

/// What the server says about a role.
struct RoleInfo {
    can_login: bool,
    superuser: bool,
    create_role: bool,
    create_db: bool,
    /// Roles it is a member of.
    member_of: Vec<String>,
}

/// The admin side of one PostgreSQL server.
pub(crate) struct Postgres {
    /// Parsed admin URL; holds the password, so it is never formatted.
    config: tokio_postgres::Config,
    host: String,
    port: u16,
}

impl Postgres {
    /// Parses the admin URL. `advertise_host` (else the URL's host) is what
    /// clients are told to connect to.
    pub fn new(url: &str, advertise_host: Option<&str>) -> Result<Self, Error> {
        // The parser's message is dropped: it could quote the URL.
        let mut config: tokio_postgres::Config = url.parse().map_err(|_| {
            Error::Unsupported("postgres_url is not a valid connection URL".to_owned())
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("svcbroker-node");
        let url_host = config
            .get_hosts()
            .iter()
            .find_map(|h| match h {
                tokio_postgres::config::Host::Tcp(h) => Some(h.clone()),
                #[allow(unreachable_patterns)]
                _ => None,
            })
            .unwrap_or_else(|| "127.0.0.1".to_owned());
        let host = advertise_host.map(str::to_owned).unwrap_or(url_host);
        let port = config.get_ports().first().copied().unwrap_or(5432);
        Ok(Postgres { config, host, port })
    }

    /// Host clients reach the server at.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Port clients reach the server at.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connects as admin to `dbname` (the URL's database when `None`).
    async fn connect(&self, dbname: Option<&str>) -> Result<Client, Error> {
        let mut config = self.config.clone();
        if let Some(db) = dbname {
            config.dbname(db);
        }
        let (client, connection) = config
            .connect(NoTls)
            .await
            .map_err(|e| db_err("cannot connect", e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgresql connection ended");
            }
        });
        Ok(client)
    }

    /// Succeeds when the server answers a query.
    pub async fn ping(&self) -> Result<(), Error> {
        let c = self.connect(None).await?;
        c.simple_query("SELECT 1")
            .await
            .map_err(|e| db_err("ping", e))?;
        Ok(())
    }

    async fn role(c: &Client, name: &str) -> Result<Option<RoleInfo>, Error> {
        let row = c
            .query_opt(
                "SELECT r.rolcanlogin, r.rolsuper, r.rolcreaterole, r.rolcreatedb, \
                 ARRAY(SELECT g.rolname::text FROM pg_auth_members m \
                       JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid) \
                 FROM pg_roles r WHERE r.rolname = $1",
                &[&name],
            )
            .await
            .map_err(|e| db_err("cannot read role", e))?;
        Ok(row.map(|r| RoleInfo {
            can_login: r.get(0),
            superuser: r.get(1),
            create_role: r.get(2),
            create_db: r.get(3),
            member_of: r.get(4),
        }))
    }

    /// The owner of database `name`, if it exists.
    async fn db_owner(c: &Client, name: &str) -> Result<Option<String>, Error> {
        let row = c
            .query_opt(
                "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $1",
                &[&name],
            )
            .await
            .map_err(|e| db_err("cannot read database", e))?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn exec(c: &Client, context: &str, sql: &str) -> Result<(), Error> {
        c.batch_execute(sql).await.map_err(|e| db_err(context, e))
    }

    /// Makes database `name` with its NOLOGIN owner role `name`, closed to
    /// PUBLIC, its `public` schema owned by the owner role. Returns true
    /// when the database was created by this call.
    pub async fn create_database(&self, name: &str) -> Result<bool, Error> {
        validate_name("database name", name)?;
        let c = self.connect(None).await?;
        let q = ident(name);
        match Self::role(&c, name).await? {
            None => {
                if let Err(e) = c.batch_execute(&format!("CREATE ROLE {q} NOLOGIN")).await
                    && !is_code(&e, &SqlState::DUPLICATE_OBJECT)
                {
                    return Err(db_err("cannot create owner role", e));
                }
            }
            Some(r) if r.can_login || r.superuser => {
                return Err(Error::Conflict(format!(
                    "role {name} exists and is not an instance owner role"
                )));
            }
            Some(_) => {}
        }
        let mut created = false;
        match Self::db_owner(&c, name).await? {
            None => {
                // Not in a transaction: CREATE DATABASE refuses one.
                match c
                    .batch_execute(&format!("CREATE DATABASE {q} OWNER {q}"))
                    .await
                {
                    Ok(()) => created = true,
                    Err(e) if is_code(&e, &SqlState::DUPLICATE_DATABASE) => {}
                    Err(e) => return Err(db_err("cannot create database", e)),
                }
            }
            Some(owner) if owner != name => {
                return Err(Error::Conflict(format!(
                    "database {name} exists and is owned by another role"
                )));
            }
            Some(_) => {}
        }
        Self::exec(
            &c,
            "cannot revoke public access",
            &format!("REVOKE ALL ON DATABASE {q} FROM PUBLIC"),
        )
        .await?;
        let inst = self.connect(Some(name)).await?;
        // PG15 makes `public` owned by pg_database_owner; owning it outright
        // keeps the same meaning on older servers, where PUBLIC could also
        // create in it.
        Self::exec(
            &inst,
            "cannot set up schema public",
            &format!("ALTER SCHEMA public OWNER TO {q}; REVOKE ALL ON SCHEMA public FROM PUBLIC"),
        )
        .await?;
        if created {
            tracing::info!(database = name, "created database");
        }
        Ok(created)
    }

    /// Terminates every session on database `name`, drops it, then drops
    /// the roles that are members of its owner role (bindings left behind)
    /// and the owner role. Returns true when anything existed.
    pub async fn drop_database(&self, name: &str) -> Result<bool, Error> {
        validate_name("database name", name)?;
        let c = self.connect(None).await?;
        let q = ident(name);
        let mut removed = false;
        let owner_role = Self::role(&c, name).await?;
        if owner_role
            .as_ref()
            .is_some_and(|r| r.can_login || r.superuser)
        {
            return Err(Error::Conflict(format!(
                "role {name} is not an instance owner role; not dropping it"
            )));
        }
        match Self::db_owner(&c, name).await? {
            Some(owner) if owner != name => {
                return Err(Error::Conflict(format!(
                    "database {name} is owned by another role; not dropping it"
                )));
            }
            Some(_) => {
                // No new sessions from here on, then end the existing ones.
                Self::exec(
                    &c,
                    "cannot close database",
                    &format!("ALTER DATABASE {q} WITH ALLOW_CONNECTIONS false"),
                )
                .await?;
                let mut attempt = 0;
                loop {
                    c.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = $1 AND pid <> pg_backend_pid()",
                        &[&name],
                    )
                    .await
                    .map_err(|e| db_err("cannot terminate sessions", e))?;
                    match c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {q}"))
                        .await
                    {
                        Ok(()) => break,
                        // A terminated backend takes a moment to exit.
                        Err(e) if is_code(&e, &SqlState::OBJECT_IN_USE) && attempt < 50 => {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => return Err(db_err("cannot drop database", e)),
                    }
                }
                removed = true;
                tracing::info!(database = name, "dropped database");
            }
            None => {}
        }
        if owner_role.is_some() {
            let members: Vec<String> = c
                .query(
                    "SELECT m.rolname::text FROM pg_roles o \
                     JOIN pg_auth_members am ON am.roleid = o.oid \
                     JOIN pg_roles m ON m.oid = am.member \
                     WHERE o.rolname = $1 AND m.rolcanlogin AND NOT m.rolsuper \
                     AND m.rolname <> current_user",
                    &[&name],
                )
                .await
                .map_err(|e| db_err("cannot list bindings", e))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for m in members {
                // Leftover bindings: only those that are ours in shape.
                if let Some(info) = Self::role(&c, &m).await?
                    && binding_shape_ok(&info, name)
                {
                    self.drop_role(&c, &m).await?;
                }
            }
            Self::exec(
                &c,
                "cannot drop owner role",
                &format!("DROP OWNED BY {q}; DROP ROLE IF EXISTS {q}"),
            )
            .await?;
            removed = true;
        }
        Ok(removed)
    }

    /// Ends `role`'s sessions, revokes what it holds in the current
    /// database and on shared objects, and drops it.
    async fn drop_role(&self, c: &Client, role: &str) -> Result<(), Error> {
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            &[&role],
        )
        .await
        .map_err(|e| db_err("cannot terminate sessions", e))?;
        let q = ident(role);
        Self::exec(
            c,
            "cannot drop role",
            &format!("DROP OWNED BY {q}; DROP ROLE IF EXISTS {q}"),
        )
        .await
    }

    /// Makes `user` a LOGIN role with `password` on instance database `db`:
    /// member of the owner role, acting as it by default, allowed to
    /// connect. An existing binding role gets the password again.
    pub async fn create_login(&self, db: &str, user: &str, password: &str) -> Result<(), Error> {
        validate_name("database name", db)?;
        validate_name("username", user)?;
        if user == db {
            return Err(Error::InvalidArgument(
                "username must differ from the database name".to_owned(),
            ));
        }
        let c = self.connect(None).await?;
        match Self::db_owner(&c, db).await? {
            Some(owner) if owner == db => {}
            Some(_) => {
                return Err(Error::Conflict(format!(
                    "database {db} is not an instance database"
                )));
            }
            None => return Err(Error::NotFound(format!("database {db}"))),
        }
        // Computed here so that the plain password never reaches the server
        // (nor a statement log there).
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        let password_sql = quote_literal(&verifier)?;
        let (qu, qd) = (ident(user), ident(db));
        let existing = Self::role(&c, user).await?;
        match existing {
            Some(r) if !binding_shape_ok(&r, db) => {
                return Err(Error::Conflict(format!(
                    "role {user} exists and is not a binding of this instance"
                )));
            }
            Some(_) => {
                Self::exec(
                    &c,
                    "cannot update role",
                    &format!("ALTER ROLE {qu} WITH LOGIN PASSWORD {password_sql}"),
                )
                .await?;
            }
            None => {
                if let Err(e) = c
                    .batch_execute(&format!("CREATE ROLE {qu} LOGIN PASSWORD {password_sql}"))
                    .await
                {
                    if !is_code(&e, &SqlState::DUPLICATE_OBJECT) {
                        return Err(db_err("cannot create role", e));
                    }
                    // Created concurrently by a repeated Bind: same shape
                    // checks, then the password.
                    match Self::role(&c, user).await? {
                        Some(r) if binding_shape_ok(&r, db) => {}
                        _ => {
                            return Err(Error::Conflict(format!(
                                "role {user} exists and is not a binding of this instance"
                            )));
                        }
                    }
                    Self::exec(
                        &c,
                        "cannot update role",
                        &format!("ALTER ROLE {qu} WITH LOGIN PASSWORD {password_sql}"),
                    )
                    .await?;
                }
            }
        }
        Self::exec(
            &c,
            "cannot grant instance access",
            &format!(
                "GRANT {qd} TO {qu}; ALTER ROLE {qu} SET role = {}; \
                 GRANT CONNECT ON DATABASE {qd} TO {qu}",
                quote_literal(db)?
            ),
        )
        .await?;
        tracing::info!(database = db, role = user, "binding role ready");
        Ok(())
    }

    /// Drops binding role `user` of instance database `db`: ends its
    /// sessions, hands what it owns there to the owner role, revokes the
    /// rest and drops it. Returns true when the role existed.
    pub async fn drop_login(&self, db: &str, user: &str) -> Result<bool, Error> {
        validate_name("database name", db)?;
        validate_name("username", user)?;
        let c = self.connect(None).await?;
        let Some(info) = Self::role(&c, user).await? else {
            return Ok(false);
        };
        let current: String = c
            .query_one("SELECT current_user::text", &[])
            .await
            .map_err(|e| db_err("cannot read current user", e))?
            .get(0);
        if user == current || !binding_shape_ok(&info, db) {
            return Err(Error::Conflict(format!(
                "role {user} is not a binding of this instance; not dropping it"
            )));
        }
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            &[&user],
        )
        .await
        .map_err(|e| db_err("cannot terminate sessions", e))?;
        let (qu, qd) = (ident(user), ident(db));
        if Self::db_owner(&c, db).await?.as_deref() == Some(db) {
            let inst = self.connect(Some(db)).await?;
            // Objects it made after `RESET role` belong to it: they stay
            // with the instance.
            Self::exec(
                &inst,
                "cannot reassign objects",
                &format!("REASSIGN OWNED BY {qu} TO {qd}; DROP OWNED BY {qu}"),
            )
            .await?;
        }
        Self::exec(
            &c,
            "cannot drop role",
            &format!("DROP OWNED BY {qu}; DROP ROLE IF EXISTS {qu}"),
        )
        .await?;
        tracing::info!(database = db, role = user, "binding role dropped");
        Ok(true)
    }
}

/// True when `r` looks like a binding role of instance `db`: it can log in,
/// holds no admin attribute and is a member of nothing but `db`'s owner role
/// (nothing at all before its first grant).
fn binding_shape_ok(r: &RoleInfo, db: &str) -> bool {
    r.can_login
        && !r.superuser
        && !r.create_role
        && !r.create_db
        && r.member_of.iter().all(|m| m == db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "_x", "inst_0123", &"a".repeat(63)] {
            assert!(validate_name("n", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "0a",
            "A",
            "a-b",
            "a b",
            "a\"b",
            "é",
            &"a".repeat(64),
            "postgres",
            "pg_signal_backend",
            "public",
            "template1",
        ] {
            assert!(validate_name("n", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn literals() {
        assert_eq!(quote_literal("abc").unwrap(), "'abc'");
        assert_eq!(quote_literal("a'b").unwrap(), "'a''b'");
        assert_eq!(quote_literal("a\\'b").unwrap(), "E'a\\\\''b'");
        assert_eq!(quote_literal("").unwrap(), "''");
        assert!(quote_literal("a\0b").is_err());
        assert_eq!(ident("x"), "\"x\"");
    }

    #[test]
    fn new_reads_host_and_port_and_hides_password() {
        let pg = Postgres::new("postgres://admin:hunter2@db.internal:5433/postgres", None).unwrap();
        assert_eq!((pg.host(), pg.port()), ("db.internal", 5433));
        let pg = Postgres::new("postgres://admin@127.0.0.1/postgres", Some("10.0.0.5")).unwrap();
        assert_eq!((pg.host(), pg.port()), ("10.0.0.5", 5432));
        let err = Postgres::new("postgres://admin:hunter2@h:notaport/x", None)
            .err()
            .unwrap()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
