//! Which services this node offers: those of `services_dir` whose every
//! executable is found on this host; database services only while the
//! node's database server answers (decided at Describe time).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A service definition reduced to what the offer needs.
struct Candidate {
    name: String,
    executables: Vec<String>,
    /// Set for model "database": the engine it needs.
    database_engine: Option<String>,
}

/// What this node can offer, split by what the offer depends on.
#[derive(Debug, Default, Clone)]
pub(crate) struct Offer {
    /// Offered whenever the node runs (executables found).
    pub plain: Vec<String>,
    /// Offered while the configured PostgreSQL server answers.
    pub database: Vec<String>,
}

/// Sorts `services` into an [`Offer`]; `has_postgres` says whether a
/// database server is configured at all.
pub(crate) fn offered_services(services_dir: &Path, has_postgres: bool) -> Offer {
    let mut offer = Offer::default();
    for (name, engine) in runnable_services(services_dir) {
        match engine.as_deref() {
            None => offer.plain.push(name),
            Some("postgresql") if has_postgres => offer.database.push(name),
            Some("postgresql") => {
                tracing::info!(service = %name, "not offered: no postgres_url configured");
            }
            Some(other) => {
                tracing::info!(service = %name, engine = other, "not offered: this node runs postgresql databases only");
            }
        }
    }
    offer
}

/// Returns the services in `services_dir` that this host can run, sorted,
/// with their database engine. A missing or unreadable directory offers
/// nothing (logged).
fn runnable_services(services_dir: &Path) -> Vec<(String, Option<String>)> {
    if !services_dir.is_dir() {
        tracing::warn!(
            services_dir = %services_dir.display(),
            "services directory not found: this node offers no services"
        );
        return Vec::new();
    }
    try_runnable_services(services_dir).unwrap_or_else(|e| {
        tracing::warn!(
            services_dir = %services_dir.display(),
            error = %e,
            "cannot load service definitions: this node offers no services"
        );
        Vec::new()
    })
}

/// Like [`offered_services`], but a directory that does not load is an
/// error (naming file and line), so that a reload keeps the old offer.
pub(crate) fn reload_offer(services_dir: &Path, has_postgres: bool) -> Result<Offer, String> {
    // Loading twice costs little next to a SIGHUP's rarity, and keeps the
    // sorting rules in one place.
    try_runnable_services(services_dir)?;
    Ok(offered_services(services_dir, has_postgres))
}

fn try_runnable_services(services_dir: &Path) -> Result<Vec<(String, Option<String>)>, String> {
    let candidates = load_candidates(services_dir)?;
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let mut offered = Vec::new();
    for c in candidates {
        let missing: Vec<&str> = c
            .executables
            .iter()
            .filter(|exe| find_executable(exe, &path_var).is_none())
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            offered.push((c.name, c.database_engine));
        } else {
            tracing::info!(service = %c.name, missing = ?missing, "not offered: executables not found");
        }
    }
    offered.sort();
    offered.dedup();
    Ok(offered)
}

/// The one place that knows the `svcbroker-svcdef` API.
fn load_candidates(services_dir: &Path) -> Result<Vec<Candidate>, String> {
    let catalog = svcbroker_svcdef::Catalog::load_dir(services_dir).map_err(|e| e.to_string())?;
    Ok(catalog
        .services()
        .iter()
        .map(|s| Candidate {
            name: s.name.clone(),
            executables: s.executables(),
            database_engine: database_engine(s),
        })
        .collect())
}

/// The engine a database service needs (`None` for other models).
fn database_engine(s: &svcbroker_svcdef::ServiceDef) -> Option<String> {
    match s.model {
        svcbroker_svcdef::Model::Database => {
            // svcdef refuses a database service without an engine at load
            // time; "postgresql" keeps the offer safe if that ever changes.
            Some(s.database_engine().unwrap_or("postgresql").to_owned())
        }
        _ => None,
    }
}

/// Finds `program` the way `execvp` would: an absolute path must be an
/// executable file; a bare name is searched in `path_var`. Relative paths
/// with a slash depend on the daemon's working directory, so they never
/// count as found.
pub(crate) fn find_executable(program: &str, path_var: &std::ffi::OsStr) -> Option<PathBuf> {
    if program.is_empty() {
        return None;
    }
    let candidate = Path::new(program);
    if program.contains('/') {
        return (candidate.is_absolute() && is_executable(candidate)).then(|| candidate.to_owned());
    }
    std::env::split_paths(path_var)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_on_path_and_absolute() {
        let path = std::ffi::OsString::from("/nonexistent:/bin:/usr/bin");
        assert!(find_executable("sh", &path).is_some());
        assert!(find_executable("/bin/sh", &path).is_some());
        assert!(find_executable("no-such-program-xyz", &path).is_none());
        assert!(find_executable("bin/sh", &path).is_none());
        assert!(find_executable("/etc/passwd", &path).is_none());
        assert!(find_executable("", &path).is_none());
    }
}
