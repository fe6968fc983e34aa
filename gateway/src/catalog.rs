//! The catalog behind a swappable pointer, so that service definitions can
//! be reloaded (SIGHUP) while requests run.
//!
//! Every request takes one [`Loaded`] snapshot at its start and uses it to
//! the end: a reload never changes what an in-flight request sees, and never
//! blocks it (the lock is held only to clone or swap an `Arc`).
//!
//! A service (or plan) that leaves the catalog is kept as *retired*: new
//! provisions cannot name it, but the instances made from it can still be
//! fetched, bound, unbound and deprovisioned with their own definition
//! (e.g. to render their deprovision hooks).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use axum::body::Bytes;
use svcbroker_svcdef::{Catalog, LoadError, PlanDef, ServiceDef};

/// One loaded catalog and what requests derive from it.
#[derive(Debug)]
pub struct Loaded {
    catalog: Catalog,
    /// The `GET /v2/catalog` body, serialized once per load.
    body: Bytes,
    current: HashMap<String, Arc<ServiceDef>>,
    /// Definitions that left the catalog (or lost plans) in an earlier
    /// reload, newest last.
    retired: Vec<Arc<ServiceDef>>,
}

impl Loaded {
    fn new(catalog: Catalog, retired: Vec<Arc<ServiceDef>>) -> Loaded {
        let body =
            Bytes::from(serde_json::to_vec(catalog.osb_json()).unwrap_or_else(|_| b"{}".to_vec()));
        let current = catalog
            .services()
            .iter()
            .map(|s| (s.id.clone(), Arc::new(s.clone())))
            .collect();
        Loaded {
            catalog,
            body,
            current,
            retired,
        }
    }

    /// Returns the catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Returns the serialized `GET /v2/catalog` body.
    pub fn body(&self) -> Bytes {
        self.body.clone()
    }

    /// Returns a service of the current catalog (what new requests may name).
    pub fn service(&self, service_id: &str) -> Option<&ServiceDef> {
        self.current.get(service_id).map(Arc::as_ref)
    }

    /// Returns the definition an existing instance of `service_id` on
    /// `plan_id` was made from: the current one when it still has the plan,
    /// else the newest retired one that has it.
    pub fn existing(&self, service_id: &str, plan_id: &str) -> Option<(Arc<ServiceDef>, PlanDef)> {
        let current = self.current.get(service_id).into_iter();
        let retired = self.retired.iter().rev().filter(|s| s.id == service_id);
        current
            .chain(retired)
            .find_map(|s| s.plan(plan_id).map(|p| (Arc::clone(s), p.clone())))
    }

    /// Returns the current definition of `service_id`, else the newest
    /// retired one.
    pub fn existing_service(&self, service_id: &str) -> Option<Arc<ServiceDef>> {
        self.current
            .get(service_id)
            .or_else(|| self.retired.iter().rev().find(|s| s.id == service_id))
            .cloned()
    }
}

/// The catalog of a running gateway and the directory it is loaded from.
#[derive(Debug)]
pub struct Catalogs {
    dir: PathBuf,
    current: RwLock<Arc<Loaded>>,
    /// Serialises reloads, so that two SIGHUPs cannot retire each other's
    /// definitions.
    reloading: Mutex<()>,
}

/// What a successful reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Services in the new catalog.
    pub services: usize,
    /// Names of services that are new.
    pub added: Vec<String>,
    /// Names of services that left (their instances keep working).
    pub removed: Vec<String>,
}

impl Catalogs {
    /// Loads every service definition of `dir`.
    pub fn load(dir: &Path) -> Result<Catalogs, LoadError> {
        let catalog = Catalog::load_dir(dir)?;
        Ok(Catalogs {
            dir: dir.to_path_buf(),
            current: RwLock::new(Arc::new(Loaded::new(catalog, Vec::new()))),
            reloading: Mutex::new(()),
        })
    }

    /// Wraps an already loaded catalog (tests, embedders); a reload reads
    /// `dir`.
    pub fn from_catalog(dir: &Path, catalog: Catalog) -> Catalogs {
        Catalogs {
            dir: dir.to_path_buf(),
            current: RwLock::new(Arc::new(Loaded::new(catalog, Vec::new()))),
            reloading: Mutex::new(()),
        }
    }

    /// Returns the directory definitions are loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns the catalog as it is now; it stays valid (and unchanged)
    /// for as long as the caller holds it.
    pub fn snapshot(&self) -> Arc<Loaded> {
        match self.current.read() {
            Ok(c) => Arc::clone(&c),
            // A panic while swapping cannot leave a half-written Arc.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Loads the directory again and, only when every file loads, swaps the
    /// new catalog in. On error the old catalog stays.
    pub fn reload(&self) -> Result<ReloadSummary, LoadError> {
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let catalog = Catalog::load_dir(&self.dir)?;
        let old = self.snapshot();
        let mut retired = old.retired.clone();
        let mut removed = Vec::new();
        for (id, def) in &old.current {
            match catalog.service(id) {
                None => {
                    removed.push(def.name.clone());
                    retired.push(Arc::clone(def));
                }
                // A plan that left: its instances still need the old one.
                Some(new) if def.plans.iter().any(|p| new.plan(&p.id).is_none()) => {
                    retired.push(Arc::clone(def));
                }
                Some(_) => {}
            }
        }
        let mut added: Vec<String> = catalog
            .services()
            .iter()
            .filter(|s| !old.current.contains_key(&s.id))
            .map(|s| s.name.clone())
            .collect();
        added.sort();
        removed.sort();
        let services = catalog.services().len();
        let loaded = Arc::new(Loaded::new(catalog, retired));
        match self.current.write() {
            Ok(mut c) => *c = loaded,
            Err(poisoned) => *poisoned.into_inner() = loaded,
        }
        Ok(ReloadSummary {
            services,
            added,
            removed,
        })
    }
}

/// Reloads the service definitions of `catalogs` and logs the outcome: the
/// services added and removed, or every problem found (file, line, reason),
/// in which case the old catalog stays in use.
pub fn reload_catalog(catalogs: &Catalogs) -> Result<ReloadSummary, LoadError> {
    match catalogs.reload() {
        Ok(summary) => {
            tracing::info!(
                services_dir = %catalogs.dir().display(),
                services = summary.services,
                added = ?summary.added,
                removed = ?summary.removed,
                "service definitions reloaded"
            );
            Ok(summary)
        }
        Err(e) => {
            for issue in &e.issues {
                tracing::error!(
                    file = %issue.file.display(),
                    line = issue.line.unwrap_or(0),
                    "cannot reload service definitions, keeping the old catalog: {issue}"
                );
            }
            Err(e)
        }
    }
}
