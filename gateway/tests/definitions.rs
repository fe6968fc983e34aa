//! The shipped service definitions (`services.d/`) and the examples
//! (`examples/services.d/`) load, and have the shapes the broker's users
//! rely on.

use std::path::{Path, PathBuf};

use svcbroker_svcdef::{Catalog, HookEvent, Model};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn shipped_definitions_load_with_the_expected_models() {
    let c = Catalog::load_dir(&root().join("services.d")).unwrap_or_else(|e| panic!("{e}"));
    let model = |name: &str| {
        c.service_by_name(name)
            .unwrap_or_else(|| panic!("service {name} shipped"))
            .model
    };
    assert_eq!(model("redis"), Model::Process);
    assert_eq!(model("memcached"), Model::Process);
    assert_eq!(model("postgresql"), Model::Database);
    assert_eq!(model("echo"), Model::None);
    let fs = c
        .services()
        .iter()
        .find(|s| s.model == Model::Directory)
        .expect("a directory service");
    assert!(fs.requires_volume_mount);
    assert_eq!(
        fs.catalog_entry()["requires"],
        serde_json::json!(["volume_mount"])
    );
    let pg = c.service_by_name("postgresql").unwrap();
    assert_eq!(pg.database_engine(), Some("postgresql"));
    assert!(
        pg.executables().is_empty(),
        "a database service needs the server, not a program"
    );

    let redis = c.service_by_name("redis").unwrap();
    assert!(redis.has_hooks(HookEvent::Bind) && redis.has_hooks(HookEvent::Unbind));
    assert_eq!(redis.executables(), ["redis-server", "redis-cli"]);
    for key in ["username", "password", "uri", "host", "port"] {
        assert!(
            redis.credentials.contains_key(key),
            "redis credentials.{key}"
        );
    }
}

#[test]
fn examples_load_next_to_the_shipped_definitions() {
    let dir = tempfile::tempdir().unwrap();
    for src in ["services.d", "examples/services.d"] {
        for e in std::fs::read_dir(root().join(src)).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let c = Catalog::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let es = c.service_by_name("elasticsearch").expect("process example");
    assert_eq!(es.model, Model::Process);
    assert_eq!(es.executables(), ["elasticsearch"]);
    let shared = c
        .service_by_name("elasticsearch-shared")
        .expect("hooks example");
    assert_eq!(shared.model, Model::None);
    assert!(shared.has_hooks(HookEvent::Provision));
    assert!(shared.has_hooks(HookEvent::Deprovision));
    assert!(shared.executables().is_empty());
}
