#!/usr/bin/env bash
# Runs `svcbroker bench` against a fresh stack on this machine, as the
# README's "Benchmark" section does:
#
#   scripts/bench.sh separate [bench flags]   allocator, node, gateway as three processes
#   scripts/bench.sh up [bench flags]         the same in one `svcbroker up` process
#
# e.g. scripts/bench.sh separate --seconds 20 --concurrency 8
#
# Release binaries from target/release (built when missing), data in a
# temporary directory under $TMPDIR (removed at the end), loopback ports
# 18450-18452 and 18480, instance ports 40000-40999. The bench's own flags
# are described by `svcbroker bench --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
case "$mode" in
    separate | up) shift ;;
    *)
        echo "usage: $0 separate|up [svcbroker bench flags]" >&2
        exit 2
        ;;
esac

for b in svcbroker gateway allocator node; do
    [ -x "target/release/$b" ] || cargo build --release --bins
done
bin="$PWD/target/release"
dir="$(mktemp -d "${TMPDIR:-/tmp}/svcbroker-bench-XXXXXX")"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

export SVCBROKER_USERNAME=bench
export SVCBROKER_PASSWORD="bench-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
export SVCBROKER_TOKEN="token-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export SVCBROKER_URL=http://127.0.0.1:18480
cp -r services.d "$dir/services.d"

if [ "$mode" = up ]; then
    "$bin/svcbroker" up --data-dir "$dir" --services-dir "$dir/services.d" \
        --http 127.0.0.1:18480 --gateway-grpc 127.0.0.1:18450 \
        --allocator-grpc 127.0.0.1:18451 --node-grpc 127.0.0.1:18452 \
        --capacity 20000 --ports 40000-40999 >"$dir/up.log" 2>&1 &
    pids+=($!)
else
    cat >"$dir/node.yaml" <<YAML
listen: 127.0.0.1:18452
node_id: bench-node
data_dir: $dir/node
services_dir: $dir/services.d
capacity: 20000
port_range: {start: 40000, end: 40999}
grpc_url: http://127.0.0.1:18452
gateway_url: http://127.0.0.1:18450
YAML
    cat >"$dir/gateway.yaml" <<YAML
http_listen: 127.0.0.1:18480
grpc_listen: 127.0.0.1:18450
db_path: $dir/gateway.sqlite
services_dir: $dir/services.d
allocator_url: http://127.0.0.1:18451
YAML
    "$bin/allocator" --listen 127.0.0.1:18451 --db "$dir/allocator.sqlite" >"$dir/allocator.log" 2>&1 &
    pids+=($!)
    "$bin/node" --config "$dir/node.yaml" >"$dir/node.log" 2>&1 &
    pids+=($!)
    "$bin/gateway" --config "$dir/gateway.yaml" >"$dir/gateway.log" 2>&1 &
    pids+=($!)
fi

# Ready when the catalog offers echo (the node has announced itself).
for _ in $(seq 1 100); do
    if curl -fsS -u "$SVCBROKER_USERNAME:$SVCBROKER_PASSWORD" -H 'X-Broker-API-Version: 2.17' \
        "$SVCBROKER_URL/v2/catalog" 2>/dev/null | grep -q '"name":"echo"'; then
        break
    fi
    sleep 0.2
done
"$bin/svcbroker" bench --baseline-dir "$dir" "$@"
