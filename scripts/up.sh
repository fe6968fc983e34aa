#!/usr/bin/env bash
# The README's one command to run svcbroker on this machine: installs the
# daemons the shipped services run when they are missing (redis-server,
# memcached; Debian/Ubuntu as root), builds the release binaries and starts
# `svcbroker up` with any flags given, e.g.
#
#   scripts/up.sh --data-dir .data --http 127.0.0.1:8080
#
# PostgreSQL instances are offered when SVCBROKER_POSTGRES_URL holds an
# admin connection URL; nothing here installs or exposes a database server.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v memcached >/dev/null || missing+=(memcached)
if [ "${#missing[@]}" -gt 0 ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
        echo "==> installing ${missing[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "==> ${missing[*]} not installed: those services will not be offered" >&2
    fi
fi

echo "==> cargo build --release" >&2
cargo build --release --bins
exec target/release/svcbroker up "$@"
