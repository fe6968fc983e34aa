#!/usr/bin/env bash
# Makes the services the node's integration tests use for real available on
# this machine, idempotently, and prints the PostgreSQL admin URL:
#
#   - PostgreSQL listening on 127.0.0.1:5432, where
#     postgres://postgres@127.0.0.1:5432/postgres connects as superuser;
#   - redis-server (+ redis-cli), memcached and python3 installed.
#
# Works as root without systemd (CI, containers): clusters are started with
# pg_ctlcluster / pg_ctl, never through an init system. Safe to run again:
# whatever is already there and running is left as it is.
#
# THIS IS FOR TEST MACHINES ONLY: it lets the `postgres` superuser in over
# local TCP (127.0.0.1) without a password ("trust"). Other roles still need
# their password (scram-sha-256), which is what the tests check.
set -euo pipefail

PG_PORT=5432
PG_URL="postgres://postgres@127.0.0.1:${PG_PORT}/postgres"
# Marks the pg_hba.conf line this script adds, so a re-run finds it.
HBA_MARK="# svcbroker ensure-postgres.sh: test machine only"
# Used when no Debian cluster can be made (no pg_createcluster).
FALLBACK_PGDATA="/var/lib/postgresql/svcbroker-test"

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "need root (or sudo) for: $*" >&2
    return 1
  fi
}

# Runs a command as the postgres system user: the server refuses to run as root.
as_postgres() {
  if [ "$(id -un)" = postgres ]; then
    "$@"
  elif command -v runuser >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    as_root su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
  fi
}

apt_updated=0
apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing packages $* and no apt-get: install them by hand" >&2
    return 1
  fi
  if [ "$apt_updated" -eq 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "$@"
}

# The newest installed server's bin directory (Debian keeps one per major).
pg_bindir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$d" ] && [ -x "$d/postgres" ]; then
    echo "$d"
  elif command -v postgres >/dev/null 2>&1; then
    dirname "$(command -v postgres)"
  fi
}

pg_ready() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres
  else
    (exec 3<>"/dev/tcp/127.0.0.1/${PG_PORT}") 2>/dev/null
  fi
}

wait_ready() {
  local i
  for i in $(seq 1 60); do
    pg_ready && return 0
    sleep 0.5
  done
  return 1
}

# Adds the superuser trust line at the top of `hba` (first match wins) once.
ensure_trust() {
  local hba="$1"
  if ! grep -qF "$HBA_MARK" "$hba"; then
    log "allowing postgres@127.0.0.1 without password in $hba (test machine)"
    local tmp
    tmp=$(mktemp)
    {
      echo "$HBA_MARK"
      echo "host all postgres 127.0.0.1/32 trust"
      cat "$hba"
    } >"$tmp"
    as_root cp "$tmp" "$hba"
    rm -f "$tmp"
    return 0
  fi
  return 1
}

main() {
  # --- packages ---------------------------------------------------------------

  missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
  command -v memcached >/dev/null 2>&1 || missing+=(memcached)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  if [ -z "$(pg_bindir)" ]; then
    missing+=(postgresql)
  fi
  command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
  if [ "${#missing[@]}" -ne 0 ]; then
    apt_install "${missing[@]}"
  fi

  # --- the server ---------------------------------------------------------------

  if command -v pg_lsclusters >/dev/null 2>&1 && command -v pg_ctlcluster >/dev/null 2>&1; then
    # Debian layout: use (or make) the cluster on port 5432.
    cluster=$(pg_lsclusters -h 2>/dev/null | awk -v p="$PG_PORT" '$3 == p { print $1 " " $2; exit }')
    if [ -z "$cluster" ]; then
      major=$(basename "$(dirname "$(pg_bindir)")")
      log "creating cluster $major/main on port $PG_PORT"
      as_root pg_createcluster --port "$PG_PORT" "$major" main >/dev/null
      cluster="$major main"
    fi
    read -r ver name <<<"$cluster"
    conf="/etc/postgresql/$ver/$name"
    changed=0
    ensure_trust "$conf/pg_hba.conf" && changed=1
    # Debian's default listens on localhost already; make 127.0.0.1 explicit
    # in case an image changed it.
    if ! grep -qE "^listen_addresses" "$conf/postgresql.conf"; then
      echo "listen_addresses = '127.0.0.1'" | as_root tee -a "$conf/postgresql.conf" >/dev/null
      changed=1
    fi
    status=$(pg_lsclusters -h | awk -v v="$ver" -v n="$name" '$1 == v && $2 == n { print $4 }')
    if [[ "$status" == online* ]]; then
      if [ "$changed" -eq 1 ]; then
        as_root pg_ctlcluster "$ver" "$name" reload
      fi
    else
      log "starting cluster $ver/$name"
      as_root pg_ctlcluster "$ver" "$name" start
    fi
  else
    # No Debian wrappers: a private data directory run with pg_ctl.
    bindir=$(pg_bindir)
    if [ -z "$bindir" ]; then
      echo "no PostgreSQL server binaries found" >&2
      exit 1
    fi
    id postgres >/dev/null 2>&1 || as_root useradd --system --home-dir /var/lib/postgresql postgres
    if [ ! -s "$FALLBACK_PGDATA/PG_VERSION" ]; then
      log "initdb $FALLBACK_PGDATA"
      as_root mkdir -p "$FALLBACK_PGDATA"
      as_root chown postgres "$FALLBACK_PGDATA"
      as_postgres "$bindir/initdb" -D "$FALLBACK_PGDATA" -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 >/dev/null
    fi
    ensure_trust "$FALLBACK_PGDATA/pg_hba.conf" || true
    if ! as_postgres "$bindir/pg_ctl" -D "$FALLBACK_PGDATA" status >/dev/null 2>&1; then
      log "starting postgres in $FALLBACK_PGDATA"
      as_postgres "$bindir/pg_ctl" -D "$FALLBACK_PGDATA" -w -l "$FALLBACK_PGDATA/server.log" \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k /tmp" start >/dev/null
    else
      as_postgres "$bindir/pg_ctl" -D "$FALLBACK_PGDATA" reload >/dev/null
    fi
  fi

  if ! wait_ready; then
    echo "postgresql does not answer on 127.0.0.1:$PG_PORT" >&2
    exit 1
  fi
  if command -v psql >/dev/null 2>&1; then
    # Proves the URL works (trust line active), not just that the port is open.
    psql "$PG_URL" -qtAc 'select 1' >/dev/null
  fi
}

# stdout carries the URL only (callers capture it): everything main prints,
# apt's and pg_ctl's chatter included, goes to stderr. A redirection of the
# whole function (not `exec 3>&1`) also keeps the caller's pipe out of the
# daemons started here, which would otherwise hold `$(...)` open forever.
main 1>&2
echo "$PG_URL"
