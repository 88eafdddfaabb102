#!/usr/bin/env bash
# Start a PostgreSQL cluster on 127.0.0.1 for twinflow's scale-out test (MLflow's backend store).
#
# Idempotent: installs Debian's postgresql only if its binaries are missing (apt-get update once),
# initialises the cluster only if its data directory is empty, starts it only if it is not running.
# Prints the connection settings as shell exports on stdout (progress goes to stderr):
#   eval "$(.ci/postgres.sh)"      # sets SCALEOUT_POSTGRES_URL, PGHOST, PGPORT, PGUSER
# Environment (all optional):
#   SCALEOUT_PGDATA   data directory        (default /tmp/twinflow-ci-postgres)
#   SCALEOUT_PGPORT   port on 127.0.0.1     (default 55432)
#   SCALEOUT_PG_NO_INSTALL=1  never apt-get: exit 3 when the binaries are missing
# The cluster trusts local connections on loopback only: it is for tests, not production.
set -euo pipefail

PGDATA_DIR="${SCALEOUT_PGDATA:-/tmp/twinflow-ci-postgres}"
PORT="${SCALEOUT_PGPORT:-55432}"
log() { echo "postgres.sh: $*" >&2; }

find_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
  done
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
    pg_config --bindir; return 0
  fi
  command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
  return 1
}

BINDIR="$(find_bindir || true)"
if [ -z "$BINDIR" ]; then
  if [ "${SCALEOUT_PG_NO_INSTALL:-0}" = "1" ]; then
    log "PostgreSQL binaries not found and SCALEOUT_PG_NO_INSTALL=1"; exit 3
  fi
  if [ "$(id -u)" != "0" ]; then
    log "PostgreSQL binaries not found; run as root (apt-get) or install postgresql"; exit 3
  fi
  log "installing postgresql (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
  BINDIR="$(find_bindir)"
fi

# initdb/postgres refuse to run as root: run them as the postgres user then.
as_pg() {
  if [ "$(id -u)" = "0" ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

mkdir -p "$PGDATA_DIR"
if [ "$(id -u)" = "0" ]; then chown postgres "$PGDATA_DIR"; chmod 700 "$PGDATA_DIR"; fi

if [ ! -s "$PGDATA_DIR/PG_VERSION" ]; then
  log "initialising cluster in $PGDATA_DIR"
  as_pg "$BINDIR/initdb" -D "$PGDATA_DIR" -U postgres -A trust --no-instructions >&2
fi

if as_pg "$BINDIR/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
  log "already running ($PGDATA_DIR)"
  PORT="$(sed -n 4p "$PGDATA_DIR/postmaster.pid" 2>/dev/null || echo "$PORT")"
else
  log "starting on 127.0.0.1:$PORT"
  as_pg "$BINDIR/pg_ctl" -D "$PGDATA_DIR" -l "$PGDATA_DIR/server.log" -w -t 60 \
    -o "-h 127.0.0.1 -p $PORT -k $PGDATA_DIR" start >&2
fi

for _ in $(seq 1 60); do
  "$BINDIR/pg_isready" -h 127.0.0.1 -p "$PORT" -q && break
  sleep 0.5
done
"$BINDIR/pg_isready" -h 127.0.0.1 -p "$PORT" >&2

echo "export SCALEOUT_POSTGRES_URL=postgresql://postgres@127.0.0.1:${PORT}/postgres"
echo "export SCALEOUT_PGDATA=${PGDATA_DIR}"
echo "export PGHOST=127.0.0.1 PGPORT=${PORT} PGUSER=postgres"
