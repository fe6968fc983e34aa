#!/usr/bin/env bash
# The one test command (README, .ci/run): makes sure the system services the
# integration tests use for real are there (redis-server, memcached,
# PostgreSQL), builds every binary (the tests run `target/<profile>/gateway`
# and `svcbroker` as child processes), runs the whole test suite, then the
# format and lint checks.
#
# Every check runs even when an earlier one failed, so one run shows every
# problem; the exit status is non-zero when any of them failed.
set -uo pipefail

cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*" >&2; }

failed=()

log "scripts/ensure-postgres.sh (redis-server, memcached, python3, PostgreSQL)"
# One script owns what the tests need on the machine: it installs what is
# missing (one apt-get update, only then) and starts PostgreSQL on
# 127.0.0.1:5432; it prints the admin URL the database tests use.
pg_url=$(scripts/ensure-postgres.sh) || { echo "cannot set up the test services" >&2; exit 1; }
export SVCBROKER_TEST_POSTGRES_URL="${SVCBROKER_TEST_POSTGRES_URL:-$pg_url}"

log "cargo build --workspace --bins"
# The tests locate target/<profile>/{gateway,...} next to their own binary;
# without a fresh build they would run stale or missing executables.
cargo build --workspace --bins || { echo "build failed" >&2; exit 1; }

# ---- compose end-to-end test (tests/tests/compose.rs) ------------------------
# It builds the svcbroker image from target/release/*, so where a Docker engine
# answers the release binaries are built before the suite runs; elsewhere the
# test skips itself with "SKIPPED: no docker engine".
if docker info >/dev/null 2>&1; then
  log "cargo build --release --bins (the compose end-to-end test's image)"
  cargo build --release --bins || { echo "release build failed" >&2; exit 1; }
fi
# ------------------------------------------------------------------------------

if cargo nextest --version >/dev/null 2>&1; then
  log "cargo nextest run --workspace --no-fail-fast"
  cargo nextest run --workspace --no-fail-fast || failed+=("tests")
else
  log "cargo-nextest not found: cargo test --workspace --no-fail-fast"
  cargo test --workspace --no-fail-fast || failed+=("tests")
fi

log "conformance/run.sh (schemathesis, the official OSB v2.17 spec, against svcbroker up)"
# Fixed seed and bounded examples: about 20 s (plus about 30 s the first time,
# when it installs schemathesis into target/conformance-venv).
conformance/run.sh || failed+=("conformance")

log "cargo fmt --all --check"
cargo fmt --all --check || failed+=("fmt")

log "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings || failed+=("clippy")

if [ "${#failed[@]}" -ne 0 ]; then
  log "FAILED: ${failed[*]}"
  exit 1
fi
log "all checks passed"
