#!/usr/bin/env bash
# Spec conformance: schemathesis against a live `svcbroker up`, with the official OSB v2.17
# openapi.yaml plus conformance/overlay.yaml (documented fixes where the spec FILE is wrong/silent).
# Usage: conformance/run.sh   (env: ST_MAX_EXAMPLES, ST_SEED, ST_SERVICE, OSB_SPEC, ST_EXTRA_ARGS, CONFORMANCE_OVERLAY)
# Exit status: schemathesis' own.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SPEC="${OSB_SPEC:-$ROOT/../shared/osb-spec/openapi.yaml}"
[ -f "$SPEC" ] || SPEC=/work/shared/osb-spec/openapi.yaml
SCHEMATHESIS_VERSION=4.32.5
SEED="${ST_SEED:-20261125}"
MAX_EXAMPLES="${ST_MAX_EXAMPLES:-25}"
VENV="$ROOT/target/conformance-venv"
OUT="$ROOT/target/conformance"
# echo is a record-only service (no daemon), so CI stays fast and deterministic; ST_SERVICE=redis (etc.)
# probes another service's published schemas and lifecycle locally.
SERVICE="${ST_SERVICE:-echo}"
mkdir -p "$OUT"

# 1. schemathesis in a venv under target/ (already git-ignored), pinned so that a run is reproducible
if ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  rm -rf "$VENV"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    # Debian and Ubuntu ship the venv module separately.
    if command -v apt-get >/dev/null 2>&1; then
      SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
      $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    fi
    rm -rf "$VENV"
    python3 -m venv "$VENV" || { echo "conformance: python3 -m venv failed (install python3-venv)" >&2; exit 2; }
  fi
  "$VENV/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION" ||
    { echo "conformance: cannot install schemathesis $SCHEMATHESIS_VERSION" >&2; rm -rf "$VENV"; exit 2; }
fi

# 2. the broker, built the way scripts/test.sh builds it (a no-op there; the same feature set, so
#    no rebuild of dependencies)
cargo build --quiet --workspace --bins
BIN="$ROOT/target/debug/svcbroker"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
DATA="$(mktemp -d)"
export SVCBROKER_USERNAME=conformance
export SVCBROKER_PASSWORD="conf-$RANDOM$RANDOM"
URL="http://127.0.0.1:$PORT"
"$BIN" up --data-dir "$DATA" --http "127.0.0.1:$PORT" --allocator-grpc 127.0.0.1:0 \
  --node-grpc 127.0.0.1:0 --gateway-grpc 127.0.0.1:0 >"$OUT/broker.log" 2>&1 &
PID=$!
# Instances outlive the broker (by design), so a probe of the filesystem service leaves its size-capped
# directories mounted: unmount what is under $DATA before removing it.
cleanup() {
  kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  { findmnt -rn -o TARGET 2>/dev/null | grep "^$DATA/" || true; } | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" || true
  done
  rm -rf "$DATA"
}
trap cleanup EXIT INT TERM

for _ in $(seq 1 100); do
  curl -fsS "$URL/healthz" >/dev/null 2>&1 && break
  kill -0 "$PID" 2>/dev/null || { echo "svcbroker exited; see $OUT/broker.log" >&2; exit 2; }
  sleep 0.2
done
curl -fsS "$URL/healthz" >/dev/null || { echo "svcbroker not healthy; see $OUT/broker.log" >&2; exit 2; }

# 3. the effective spec: official file + overlay, with the catalog's real ids
curl -fsS -u "$SVCBROKER_USERNAME:$SVCBROKER_PASSWORD" -H 'X-Broker-API-Version: 2.17' \
  "$URL/v2/catalog" >"$OUT/catalog.json"
"$VENV/bin/python" "$ROOT/conformance/overlay.py" "$SPEC" "${CONFORMANCE_OVERLAY:-$ROOT/conformance/overlay.yaml}" \
  "$OUT/openapi.effective.yaml" "$OUT/catalog.json" "$SERVICE"

# 4. schemathesis: all checks, all phases, fixed seed, bounded examples
set +e
# shellcheck disable=SC2086
"$VENV/bin/st" --config-file "$ROOT/conformance/schemathesis.toml" run "$OUT/openapi.effective.yaml" \
  --url "$URL" \
  --auth "$SVCBROKER_USERNAME:$SVCBROKER_PASSWORD" \
  --header 'X-Broker-API-Version: 2.17' \
  --checks all \
  --seed "$SEED" \
  --max-examples "$MAX_EXAMPLES" \
  --workers 1 \
  --request-timeout 30 \
  --no-color \
  --report junit,ndjson --report-dir "$OUT/report" \
  ${ST_EXTRA_ARGS:-}
STATUS=$?
set -e
echo "conformance: schemathesis exit status $STATUS (broker log: $OUT/broker.log)"
exit "$STATUS"
