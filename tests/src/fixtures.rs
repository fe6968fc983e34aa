//! Service definitions only the tests use, next to the shipped ones.

/// Catalog ids of the shipped `echo` service (`services.d/echo.yaml`).
pub mod echo {
    pub const SERVICE: &str = "4f6f3b0e-6b1f-4c2a-9a57-0c8f1f3e9a01";
    pub const PLAN_FREE: &str = "4f6f3b0e-6b1f-4c2a-9a57-0c8f1f3e9a11";
    pub const PLAN_LOUD: &str = "4f6f3b0e-6b1f-4c2a-9a57-0c8f1f3e9a12";
}

/// Catalog ids of the shipped `redis` service (`services.d/redis.yaml`).
pub mod redis {
    pub const SERVICE: &str = "9d3e3c4a-1f4b-4a8e-bb8e-5a7a6e2d7c01";
    pub const PLAN_SMALL: &str = "9d3e3c4a-1f4b-4a8e-bb8e-5a7a6e2d7c11";
    pub const PLAN_LARGE: &str = "9d3e3c4a-1f4b-4a8e-bb8e-5a7a6e2d7c12";
}

/// Catalog ids of [`SLOW_REDIS_YAML`].
pub mod slow_redis {
    pub const SERVICE: &str = "7c1d9a52-0b7e-4d61-9f3e-2a5b8c4d6e01";
    pub const PLAN: &str = "7c1d9a52-0b7e-4d61-9f3e-2a5b8c4d6e11";
}

/// Catalog ids of [`FAILING_YAML`].
pub mod failing {
    pub const SERVICE: &str = "c0ffee00-1d2e-4f60-8a9b-0c1d2e3f4a01";
    pub const PLAN: &str = "c0ffee00-1d2e-4f60-8a9b-0c1d2e3f4a11";
}

/// A redis that needs 3 s before it listens, so tests can act while an
/// operation is in progress (202 repeats, ConcurrencyError, a gateway
/// killed mid-operation). It must be provisioned asynchronously.
pub const SLOW_REDIS_YAML: &str = r#"
id: 7c1d9a52-0b7e-4d61-9f3e-2a5b8c4d6e01
name: slow-redis
description: redis-server that takes 3 s to start (tests only)
bindable: true
async_required: true
model: process
requires_executables: [sh, redis-server]
process:
  command: [sh, -c, "sleep 3; exec redis-server redis.conf"]
  ready_timeout_ms: 20000
  files:
    - path: redis.conf
      mode: 0o600
      content: |
        port {{port}}
        bind 127.0.0.1
        protected-mode yes
        requirepass {{password}}
        dir {{dir}}
        appendonly no
        save ""
        daemonize no
credentials:
  host: "{{host}}"
  port: "{{port}}"
  password: "{{password}}"
  uri: "redis://:{{password}}@{{host}}:{{port}}"
plans:
  - id: 7c1d9a52-0b7e-4d61-9f3e-2a5b8c4d6e11
    name: default
    description: the only plan
"#;

/// A process service whose daemon exits at once: provisioning it fails.
pub const FAILING_YAML: &str = r#"
id: c0ffee00-1d2e-4f60-8a9b-0c1d2e3f4a01
name: failing
description: a daemon that exits immediately (tests only)
bindable: true
model: process
requires_executables: [sh]
process:
  command: [sh, -c, "echo cannot start >&2; exit 3"]
  ready_timeout_ms: 3000
credentials:
  port: "{{port}}"
plans:
  - id: c0ffee00-1d2e-4f60-8a9b-0c1d2e3f4a11
    name: default
    description: the only plan
"#;
