#!/usr/bin/env bash
# The one test command (README, .ci/run): installs the system packages the
# integration tests start for real (redis-server, ...) when they are missing,
# builds every binary (the tests run `target/<profile>/gateway` as a child
# process), runs the whole test suite, then the format and lint checks.
#
# Every check runs even when an earlier one failed, so one run shows every
# problem; the exit status is non-zero when any of them failed.
set -uo pipefail

cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*" >&2; }

# Packages the tests need, as "command:debian-package" pairs.
REQUIRED=(
  "redis-server:redis-server"
  "memcached:memcached"
)

install_missing() {
  local missing=() pair
  for pair in "${REQUIRED[@]}"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing packages ${missing[*]} and no apt-get: install them by hand" >&2
    return 1
  fi
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "missing packages ${missing[*]}: run as root or install sudo" >&2
      return 1
    fi
    sudo=(sudo)
  fi
  log "installing ${missing[*]}"
  # One index update, only because something has to be installed.
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

failed=()

log "checking system packages"
install_missing || { echo "cannot install the packages the tests need" >&2; exit 1; }

log "cargo build --workspace --bins"
# The tests locate target/<profile>/{gateway,...} next to their own binary;
# without a fresh build they would run stale or missing executables.
cargo build --workspace --bins || { echo "build failed" >&2; exit 1; }

if cargo nextest --version >/dev/null 2>&1; then
  log "cargo nextest run --workspace --no-fail-fast"
  cargo nextest run --workspace --no-fail-fast || failed+=("tests")
else
  log "cargo-nextest not found: cargo test --workspace --no-fail-fast"
  cargo test --workspace --no-fail-fast || failed+=("tests")
fi

log "cargo fmt --all --check"
cargo fmt --all --check || failed+=("fmt")

log "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings || failed+=("clippy")

if [ "${#failed[@]}" -ne 0 ]; then
  log "FAILED: ${failed[*]}"
  exit 1
fi
log "all checks passed"
