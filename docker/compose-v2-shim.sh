#!/usr/bin/env bash
# A Docker CLI plugin that provides `docker compose` on hosts that only have
# the Python docker-compose 1.x (Debian bookworm ships no Compose v2).
# It forwards every command to docker-compose and implements what 1.x lacks
# and svcbroker's docs use: `up --wait [--wait-timeout N]`.
# Installed by scripts/install-compose-shim.sh; never used where a real
# Compose v2 plugin exists.
set -euo pipefail

if [ "${1:-}" = "docker-cli-plugin-metadata" ]; then
    printf '{"SchemaVersion":"0.1.0","Vendor":"svcbroker","Version":"v2-shim","ShortDescription":"docker-compose 1.x with --wait"}\n'
    exit 0
fi
[ "${1:-}" = "compose" ] && shift

args=()
global=()   # options before the subcommand (-f, -p, ...), reused for `ps`
wait=0
wait_timeout=300
is_up=0
while [ $# -gt 0 ]; do
    case "$1" in
        --wait) wait=1 ;;
        --wait-timeout) wait_timeout="$2"; shift ;;
        --wait-timeout=*) wait_timeout="${1#*=}" ;;
        up) is_up=1; args+=("$1") ;;
        *) args+=("$1"); [ "$is_up" = 0 ] && global+=("$1") ;;
    esac
    shift
done
if [ "$wait" = 1 ] && [ "$is_up" = 1 ]; then
    # --wait implies detached mode in Compose v2.
    printf '%s\n' "${args[@]}" | grep -qx -- '-d' || args+=("-d")
fi

docker-compose "${args[@]}"
[ "$wait" = 1 ] && [ "$is_up" = 1 ] || exit 0

# Wait until every container of the project is healthy (or running, when
# it has no health check); fail at once if one exits or turns unhealthy.
deadline=$((SECONDS + wait_timeout))
while :; do
    ids=$(docker-compose "${global[@]}" ps -q)
    pending=0
    for id in $ids; do
        state=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.Name}}' "$id")
        set -- $state
        case "$1:$2" in
            running:healthy|running:none) ;;
            running:starting) pending=1 ;;
            *) echo "container ${3#/} is $1 ($2)" >&2; exit 1 ;;
        esac
    done
    [ "$pending" = 0 ] && exit 0
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "timed out after ${wait_timeout}s waiting for containers to be healthy" >&2
        exit 1
    fi
    sleep 1
done
