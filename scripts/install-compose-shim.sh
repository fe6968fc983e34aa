#!/usr/bin/env bash
# Makes `docker compose` (Compose v2 syntax) work. Where a real Compose v2
# plugin exists nothing is done. Debian bookworm only packages the Python
# docker-compose 1.x, so there docker/compose-v2-shim.sh is installed as the
# `compose` CLI plugin in front of it.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"

if docker compose version >/dev/null 2>&1; then
    exit 0
fi
if ! command -v docker-compose >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
fi
plugins=/usr/local/lib/docker/cli-plugins
mkdir -p "$plugins"
install -m 0755 "$here/docker/compose-v2-shim.sh" "$plugins/docker-compose"
docker compose version >/dev/null
echo "docker compose: installed the v2 shim over $(docker-compose version --short)"
