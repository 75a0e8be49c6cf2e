#!/usr/bin/env bash
# Makes sure PostgreSQL, Redis and NATS (with JetStream) answer on their standard local ports:
# uses them when they answer, starts them when installed but stopped, installs them with apt-get when
# missing on Debian/Ubuntu as root, and otherwise prints the exact command to run and fails.
set -euo pipefail

state_dir="${PARLEY_STATE_DIR:-$(cd "$(dirname "$0")/.." && pwd)/.run}"
mkdir -p "$state_dir"

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {
  local name=$1 port=$2
  for _ in $(seq 1 50); do
    answers "$port" && return 0
    sleep 0.2
  done
  echo "error: $name did not come up on 127.0.0.1:$port" >&2
  return 1
}

apt_updated=""
install_packages() {
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: $* missing; install with: sudo apt-get install -y $*" >&2
    exit 1
  fi
  if [ -z "$apt_updated" ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {
  answers 5432 && return 0
  local fresh=""
  if [ ! -d /etc/postgresql ] || [ -z "$(ls -A /etc/postgresql 2>/dev/null)" ]; then
    echo "installing PostgreSQL"
    install_packages postgresql
    fresh=1
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if [ -n "$fresh" ]; then
    # A fresh development install: trust local TCP connections, as the README's DATABASE_URL expects.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+$/\1trust/' "$hba"
  fi
  echo "starting PostgreSQL $version"
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
  else
    echo "error: PostgreSQL is installed but pg_ctlcluster is missing; start it by hand" >&2
    exit 1
  fi
  wait_for PostgreSQL 5432
}

ensure_redis() {
  answers 6379 && return 0
  command -v redis-server >/dev/null 2>&1 || { echo "installing Redis"; install_packages redis-server; }
  answers 6379 && return 0
  echo "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir "$state_dir" --logfile "$state_dir/redis.log"
  wait_for Redis 6379
}

ensure_nats() {
  answers 4222 && return 0
  command -v nats-server >/dev/null 2>&1 || { echo "installing NATS"; install_packages nats-server; }
  echo "starting NATS with JetStream"
  mkdir -p "$state_dir/nats"
  nohup nats-server -a 127.0.0.1 -p 4222 -js -sd "$state_dir/nats" -l "$state_dir/nats.log" >/dev/null 2>&1 &
  wait_for NATS 4222
}

ensure_postgres
ensure_redis
ensure_nats
echo "PostgreSQL, Redis and NATS are up"
