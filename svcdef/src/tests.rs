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
    // The daemon, and redis-cli for the ACL bind/unbind hooks.
    assert_eq!(redis.executables(), ["redis-server", "redis-cli"]);
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
        .set("bind_host", "127.0.0.1")
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
    // Bindings get their own ACL user, not the instance password.
    vars.set("binding.username", "u1")
        .set("binding.password", "bpw");
    let creds = redis.render_credentials(&vars).unwrap();
    assert_eq!(creds["port"], json!(10001));
    assert_eq!(creds["uri"], json!("redis://u1:bpw@127.0.0.1:10001"));
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

/// OSB "Input Parameters Schema Object" and "Maintenance Info Object" rules
/// a catalog must meet, checked at load (spec review, README "Spec
/// conformance").
#[test]
fn rejects_schemas_and_maintenance_versions_osb_forbids() {
    let schema = |body: &str| {
        format!(
            "{MINIMAL}    schemas:\n      service_instance:\n        create:\n          parameters:\n{body}"
        )
    };
    let draft = "            $schema: http://json-schema.org/draft-04/schema#\n";
    one(&schema(&format!("{draft}            type: object\n"))).expect("a valid schema loads");
    for (body, needle) in [
        ("            type: object\n".to_string(), "'$schema'"),
        (
            format!(
                "{draft}            properties:\n              a:\n                $ref: http://example.invalid/s.json\n"
            ),
            // the validator has no resolver for it
            "http://example.invalid/s.json",
        ),
        (
            format!(
                "{draft}            description: {}\n",
                "x".repeat(65 * 1024)
            ),
            "64kB",
        ),
    ] {
        let e = one(&schema(&body)).unwrap_err();
        assert!(
            e.to_string()
                .contains("invalid service_instance.create schema"),
            "{e}"
        );
        assert!(e.to_string().contains(needle), "{needle}: {e}");
    }
    let local_ref = format!(
        "{draft}            definitions:\n              s: {{type: string}}\n            properties:\n              a: {{$ref: '#/definitions/s'}}\n"
    );
    one(&schema(&local_ref)).expect("a local $ref is allowed");

    let mi = |v: &str| format!("{MINIMAL}    maintenance_info: {{version: '{v}'}}\n");
    for good in ["1.0.0", "10.20.30", "1.0.0-rc.1+build.5"] {
        one(&mi(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for bad in ["1", "1.0", "01.0.0", "1.0.0-", "v1.0.0", "1.0.0+a..b"] {
        let e = one(&mi(bad)).unwrap_err();
        assert!(
            e.to_string().contains("not a semantic version"),
            "{bad}: {e}"
        );
    }
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

const HOOKED: &str = "\
id: es-shared
name: search
description: one index per instance on a shared cluster
model: none
hooks:
  provision:
    - http:
        method: put
        url: \"{{cluster}}/{{instance_id}}\"
        headers:
          authorization: \"Basic {{token}}\"
        body: '{\"settings\": {}}'
        accept_status: [400]
  bind:
    - command:
        argv: [redis-cli, -p, \"{{port}}\"]
        env:
          REDISCLI_AUTH: \"{{password}}\"
        stdin: \"ACL SETUSER {{binding.username}} on >{{binding.password}}\"
credentials:
  index: \"{{instance_id}}\"
plans:
  - id: es-shared-plan
    name: shared
    description: d
    variables:
      cluster: http://127.0.0.1:9200
      token: abc
";

#[test]
fn hooks_parse_render_and_hide_secrets() {
    let c = one(HOOKED).unwrap();
    let s = &c.services()[0];
    assert!(s.has_hooks(HookEvent::Provision) && !s.has_hooks(HookEvent::Unbind));
    assert_eq!(s.executables(), ["redis-cli"]);
    let mut vars = Vars::new();
    for (k, v) in s.plans[0].vars_with(&json!({})) {
        vars.set(&k, v);
    }
    vars.set("instance_id", "i1")
        .set("port", 7000)
        .set("password", "adminpw")
        .set("binding.username", "u1")
        .set("binding.password", "bindpw");
    let hooks = s.render_hooks(HookEvent::Provision, &vars).unwrap();
    let RenderedHook::Http {
        method,
        url,
        headers,
        accept_status,
        ..
    } = &hooks[0]
    else {
        panic!("http hook expected")
    };
    assert_eq!(method, "PUT");
    assert_eq!(url, "http://127.0.0.1:9200/i1");
    assert_eq!(headers["authorization"], "Basic abc");
    assert_eq!(accept_status, &[400]);
    let bind = s.render_hooks(HookEvent::Bind, &vars).unwrap();
    let RenderedHook::Command { stdin, env, .. } = &bind[0] else {
        panic!("command hook expected")
    };
    assert_eq!(stdin, "ACL SETUSER u1 on >bindpw");
    assert_eq!(env["REDISCLI_AUTH"], "adminpw");
    let shown = format!("{bind:?}{hooks:?}");
    assert!(
        !shown.contains("bindpw") && !shown.contains("abc"),
        "{shown}"
    );
    // A value with a newline could add a second command to stdin.
    vars.set("binding.password", "x\nFLUSHALL");
    assert!(s.render_hooks(HookEvent::Bind, &vars).is_err());
}

#[test]
fn binding_variables_are_refused_in_provision_hooks() {
    let text = HOOKED.replace(
        "{{cluster}}/{{instance_id}}",
        "{{cluster}}/{{binding.username}}",
    );
    let e = one(&text).unwrap_err();
    assert!(
        e.to_string()
            .contains("unknown template variable 'binding.username'"),
        "{e}"
    );
    let text = HOOKED.replace(
        "    - http:\n        method: put",
        "    - http:\n        method: fetch",
    );
    assert!(
        one(&text)
            .unwrap_err()
            .to_string()
            .contains("unknown HTTP method")
    );
}

#[test]
fn database_and_directory_models() {
    let db = MINIMAL
        .replace(
            "model: none",
            "model: database\ndatabase:\n  engine: postgresql",
        )
        .replace("{{name}}", "{{node.postgresql_host}}/{{database}}");
    let c = one(&db).unwrap();
    assert_eq!(c.services()[0].database_engine(), Some("postgresql"));
    let bad = MINIMAL.replace("model: none", "model: database\ndatabase:\n  engine: mysql");
    assert!(
        one(&bad)
            .unwrap_err()
            .to_string()
            .contains("unknown database engine 'mysql'")
    );
    let bad = MINIMAL.replace("model: none", "model: database");
    assert!(
        one(&bad)
            .unwrap_err()
            .to_string()
            .contains("needs a 'database' section")
    );

    let dir = MINIMAL
        .replace(
            "model: none",
            "model: directory\nrequires: [volume_mount]\ndirectory:\n  size_limit_mb: \"{{size_mb}}\"\nvolume_mount:\n  driver: local\n  container_dir: /data/{{name}}",
        )
        + "    variables:\n      size_mb: 5\n";
    let c = one(&dir).unwrap();
    let s = &c.services()[0];
    assert!(s.requires_volume_mount);
    let mut vars = Vars::new();
    vars.set("size_mb", 5).set("name", "i1");
    assert_eq!(
        s.render_directory_limit(&vars).unwrap(),
        Some(5 * 1024 * 1024)
    );
    let vm = s
        .render_volume_mount(&vars, "i1", "/srv/i1")
        .unwrap()
        .unwrap();
    assert_eq!(vm["container_dir"], "/data/i1");
    assert_eq!(vm["device"]["mount_config"]["source"], "/srv/i1");
    assert_eq!(s.catalog_entry()["requires"], json!(["volume_mount"]));
    let missing = dir.replace("requires: [volume_mount]\n", "");
    assert!(
        one(&missing)
            .unwrap_err()
            .to_string()
            .contains("needs 'requires: [volume_mount]'")
    );
}
