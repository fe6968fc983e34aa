#!/usr/bin/env bash
# The README's one command for the stack in containers: builds the release
# binaries (the image copies them from target/release), makes sure the base
# image exists (pulled, or built with debootstrap where no registry answers),
# makes `docker compose` available (a v2 shim over docker-compose 1.x where
# there is no Compose v2), builds the image and starts allocator, gateway and
# two nodes, waiting until every container is healthy:
#
#   scripts/compose-up.sh                 # then: OSB API on 127.0.0.1:8080
#   scripts/compose-up.sh -p mystack      # extra flags go to `docker compose`
#
# Credentials come from the environment or an .env file next to
# docker-compose.yml (SVCBROKER_USERNAME, SVCBROKER_PASSWORD, SVCBROKER_TOKEN,
# SVCBROKER_HTTP_PORT); the defaults are for a laptop.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

if ! docker info >/dev/null 2>&1; then
    echo "no Docker engine answers (is dockerd running, and may this user use it?)" >&2
    exit 1
fi

log "cargo build --release --bins"
cargo build --release --bins

log "docker/build-base-image.sh"
docker/build-base-image.sh

log "scripts/install-compose-shim.sh"
scripts/install-compose-shim.sh

log "docker compose $* build"
docker compose "$@" build

log "docker compose $* up -d --wait"
docker compose "$@" up -d --wait

port="${SVCBROKER_HTTP_PORT:-8080}"
if [ -n "${SVCBROKER_PASSWORD:-}" ]; then
    password_hint="# SVCBROKER_PASSWORD: the one you set"
else
    password_hint="export SVCBROKER_PASSWORD=svcbroker-local-password   # the default (unless .env sets one)"
fi
cat >&2 <<EOF
==> the stack is up: OSB API on http://127.0.0.1:${port}
    export SVCBROKER_URL=http://127.0.0.1:${port} SVCBROKER_USERNAME=${SVCBROKER_USERNAME:-admin}
    ${password_hint}
    target/release/svcbroker services; target/release/svcbroker nodes
    docker compose $* down     # stops it (-v also deletes its data)
EOF
