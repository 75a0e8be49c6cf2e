#!/usr/bin/env bash
# A real streaming replica of the local PostgreSQL for the replica tests, on a second port.
#
#   scripts/test-replica.sh start    # make one (pg_basebackup -R) unless it answers; start it
#   scripts/test-replica.sh stop     # stop it (fast shutdown), keeping its data directory
#   scripts/test-replica.sh resume   # start it again after `stop`, replaying from where it was
#   scripts/test-replica.sh status   # exit 0 when it answers and is a standby
#
# The primary is 127.0.0.1:5432 (trust auth, as scripts/ensure-services.sh sets up). The replica
# listens on 127.0.0.1:${PARLEY_REPLICA_PORT:-5433}, with its data directory in
# ${PARLEY_REPLICA_DIR:-/var/lib/postgresql/parley-test-replica}. A replica that is not running is
# made afresh, so one left behind by an earlier machine state never replays a stale history.
set -euo pipefail

port="${PARLEY_REPLICA_PORT:-5433}"
dir="${PARLEY_REPLICA_DIR:-/var/lib/postgresql/parley-test-replica}"
primary_port=5432

bin_dir() {
  local version
  version=$(psql -h 127.0.0.1 -p "$primary_port" -U postgres -Atc "SHOW server_version_num")
  echo "/usr/lib/postgresql/$((version / 10000))/bin"
}

# Runs a command as the owner of PostgreSQL's files (postgres when we are root).
as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

is_standby() {
  [ "$(psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atc "SELECT pg_is_in_recovery()" 2>/dev/null)" = "t" ]
}

# Replication connections need their own pg_hba.conf line; a development install trusts local TCP.
allow_replication() {
  local hba
  hba=$(psql -h 127.0.0.1 -p "$primary_port" -U postgres -Atc "SHOW hba_file")
  if ! grep -Eq '^host\s+replication\s+all\s+127\.0\.0\.1/32' "$hba"; then
    echo "host replication all 127.0.0.1/32 trust" >>"$hba"
    psql -h 127.0.0.1 -p "$primary_port" -U postgres -Atc "SELECT pg_reload_conf()" >/dev/null
  fi
}

make_replica() {
  local bin
  bin=$(bin_dir)
  allow_replication
  rm -rf "$dir"
  mkdir -p "$dir"
  chmod 700 "$dir"
  [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$dir"
  echo "making a streaming replica of 127.0.0.1:$primary_port in $dir"
  as_postgres "$bin/pg_basebackup" -h 127.0.0.1 -p "$primary_port" -U postgres -D "$dir" -R -X stream -c fast
  # Debian keeps the primary's configuration under /etc: the copy needs its own.
  as_postgres tee "$dir/postgresql.conf" >/dev/null <<EOF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
hot_standby = on
max_connections = 200
shared_buffers = 64MB
fsync = off
EOF
  as_postgres tee "$dir/pg_hba.conf" >/dev/null <<'EOF'
local all all trust
host all all 127.0.0.1/32 trust
EOF
}

start() {
  local bin
  bin=$(bin_dir)
  as_postgres "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null
  for _ in $(seq 1 100); do
    is_standby && return 0
    sleep 0.1
  done
  echo "error: the replica on port $port did not come up as a standby (see $dir/server.log)" >&2
  exit 1
}

case "${1:-start}" in
  start)
    is_standby && exit 0
    if [ -f "$dir/postmaster.pid" ]; then
      as_postgres "$(bin_dir)/pg_ctl" -D "$dir" -m immediate stop >/dev/null 2>&1 || true
    fi
    make_replica
    start
    ;;
  stop)
    as_postgres "$(bin_dir)/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
    ;;
  resume)
    is_standby || start
    ;;
  status)
    is_standby
    ;;
  *)
    echo "usage: $0 start|stop|resume|status" >&2
    exit 2
    ;;
esac
