use super::*;
use serde_json::json;

fn shipped() -> Catalog {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../services.d");
    Catalog::load_dir(&dir).expect("shipped services.d loads")
}

fn one(text: &str) -> Result<Catalog, LoadError> {
    Catalog::from_sources(vec![(PathBuf::from("t.yaml"), text.to_string())])
}

const MINIMAL: &str = "\
id: svc-1
name: thing
description: a thing
model: none
credentials:
  who: \"{{name}}\"
plans:
  - id: plan-1
    name: basic
    description: basic
";

#[test]
fn shipped_definitions_load_and_form_an_osb_catalog() {
    let c = shipped();
    let names: Vec<_> = c.services().iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"echo") && names.contains(&"redis"),
        "{names:?}"
    );
    let redis = c.service_by_name("redis").unwrap();
    assert_eq!(redis.executables(), ["redis-server"]);
    let entry = redis.catalog_entry();
    assert_eq!(entry["name"], "redis");
    assert_eq!(entry["bindable"], true);
    assert!(entry["plans"][0]["schemas"]["service_instance"]["create"]["parameters"].is_object());
    assert!(
        entry.get("model").is_none(),
        "non-OSB fields stay out of the catalog"
    );
    assert_eq!(
        c.osb_json()["services"].as_array().unwrap().len(),
        c.services().len()
    );
}

#[test]
fn renders_redis_process_and_typed_credentials() {
    let c = shipped();
    let redis = c.service_by_name("redis").unwrap();
    let plan = redis.plan_by_name("small").unwrap();
    let mut vars = Vars::new();
    for (k, v) in plan.vars_with(&json!({"maxmemory": "10mb", "other": "x"})) {
        vars.set(&k, v);
    }
    vars.set("port", 10001)
        .set("password", "s3cret")
        .set("dir", "/d/i1")
        .set("host", "127.0.0.1")
        .set("name", "i1")
        .set("node_id", "n1");
    let p = redis.render_process(&vars).unwrap().unwrap();
    assert_eq!(p.argv, ["redis-server", "redis.conf"]);
    let conf = &p.files[0].1;
    assert!(conf.contains("port 10001\n") && conf.contains("maxmemory 10mb\n"));
    assert_eq!(p.files[0].2, 0o600);
    assert!(
        !format!("{p:?}").contains("s3cret"),
        "Debug must not print secrets"
    );
    let creds = redis.render_credentials(&vars).unwrap();
    assert_eq!(creds["port"], json!(10001));
    assert_eq!(creds["uri"], json!("redis://:s3cret@127.0.0.1:10001"));
}

#[test]
fn validates_parameters_without_echoing_values() {
    let c = shipped();
    let plan = c
        .service_by_name("redis")
        .unwrap()
        .plan_by_name("small")
        .unwrap();
    assert!(
        plan.validate_params(SchemaKind::InstanceCreate, &json!({}))
            .is_ok()
    );
    assert!(
        plan.validate_params(SchemaKind::InstanceCreate, &json!({"maxmemory": "32mb"}))
            .is_ok()
    );
    let e = plan
        .validate_params(
            SchemaKind::InstanceCreate,
            &json!({"maxmemory": "topsecretvalue"}),
        )
        .unwrap_err();
    assert_eq!(e.path, "/maxmemory");
    assert!(e.message.contains("pattern"), "{}", e.message);
    assert!(!e.message.contains("topsecretvalue"), "{}", e.message);
    let e = plan
        .validate_params(SchemaKind::InstanceCreate, &json!({"bogus": 1}))
        .unwrap_err();
    assert!(e.message.contains("bogus"), "{}", e.message);
    assert!(
        plan.validate_params(SchemaKind::InstanceCreate, &json!([1]))
            .is_err()
    );
}

#[test]
fn rejects_unknown_keys_with_line() {
    let text = MINIMAL.replace("model: none", "model: none\nflavour: x");
    let e = one(&text).unwrap_err();
    assert_eq!(e.issues[0].line, Some(5), "{e}");
    assert!(e.to_string().contains("t.yaml:5"), "{e}");
    assert!(e.to_string().contains("flavour"), "{e}");
}

#[test]
fn rejects_unknown_template_variables_with_line() {
    let text = MINIMAL.replace("{{name}}", "{{nmae}}");
    let e = one(&text).unwrap_err();
    assert_eq!(e.issues[0].line, Some(6), "{e}");
    assert!(
        e.to_string().contains("unknown template variable 'nmae'"),
        "{e}"
    );
}

#[test]
fn rejects_duplicate_ids_across_files() {
    let other = MINIMAL
        .replace("name: thing", "name: other")
        .replace("plan-1", "plan-2");
    let e = Catalog::from_sources(vec![
        (PathBuf::from("a.yaml"), MINIMAL.to_string()),
        (PathBuf::from("b.yaml"), other),
    ])
    .unwrap_err();
    assert!(
        e.to_string().contains("b.yaml:1: duplicate id 'svc-1'"),
        "{e}"
    );
}

#[test]
fn rejects_bad_schema_and_names() {
    let text = format!(
        "{MINIMAL}    schemas:\n      service_instance:\n        create:\n          parameters:\n            type: 12\n"
    );
    let e = one(&text).unwrap_err();
    assert!(
        e.to_string()
            .contains("invalid service_instance.create schema"),
        "{e}"
    );
    assert_eq!(e.issues[0].line, Some(11), "{e}");
    let e = one(&MINIMAL.replace("name: thing", "name: my thing")).unwrap_err();
    assert!(e.to_string().contains("invalid service name"), "{e}");
    let e = one(&MINIMAL.replace("model: none", "model: process")).unwrap_err();
    assert!(e.to_string().contains("needs a 'process' section"), "{e}");
}

#[test]
fn plan_variables_must_exist_in_every_plan() {
    let text = MINIMAL.replace("{{name}}", "{{size}}")
        + "    variables:\n      size: 1\n  - id: plan-2\n    name: other\n    description: d\n";
    let e = one(&text).unwrap_err();
    assert!(
        e.to_string().contains("unknown template variable 'size'"),
        "{e}"
    );
}

#[test]
fn load_dir_reports_file_and_skips_other_extensions() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), MINIMAL).unwrap();
    std::fs::write(dir.path().join("README.md"), "not yaml").unwrap();
    assert_eq!(Catalog::load_dir(dir.path()).unwrap().services().len(), 1);
    std::fs::write(dir.path().join("b.yml"), "id: [").unwrap();
    let e = Catalog::load_dir(dir.path()).unwrap_err();
    assert!(e.issues[0].file.ends_with("b.yml"), "{e}");
    assert!(e.issues[0].line.is_some(), "{e}");
}
