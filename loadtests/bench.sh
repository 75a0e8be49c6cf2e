#!/usr/bin/env bash
# Parley's load tests, in one command (`make bench`): throughput, latency, CPU per request and memory
# of the gateway paths against a fake upstream that answers at once, then time to first token and
# concurrent streams. Prints a Markdown table and writes it, with the raw figures, to
# loadtests/results/<timestamp>.md.
#
# What it does:
#   1. makes sure PostgreSQL, Redis and NATS answer (scripts/ensure-services.sh) and that wrk and jq are
#      installed (apt-get);
#   2. builds `parley` and `parley-streams` (loadtests/streams) in release mode, unless PARLEY_BIN names
#      a parley binary to use instead (for before/after comparisons);
#   3. starts two external fake upstreams (`parley fake-llm`): a fast one (time to first token 0, no
#      delay between tokens) and a slow one (STREAM_TOKENS_PER_SECOND) for the concurrent-streams test;
#      then `parley dev` in a fresh database (BENCH_DB), with its own NATS and Redis prefixes, from a
#      TOML file whose models' only provider is the external fakes (the in-process fake of `parley dev`
#      starts too but gets no traffic). Governance stays on: API-key authentication, rate limits,
#      budgets and usage accounting, with the bench user on a `bench` tier whose limits are high enough
#      for the whole run;
#   4. pins the load generators and the upstreams to one core and Parley to another (PIN);
#   5. wrk (2 threads, 1 for one connection, --latency) for DURATION seconds per cell, for each of
#      CONNECTIONS: the upstream alone (JSON, streamed), then through Parley: OpenAI JSON, OpenAI
#      streamed, a conversation message (JSON) and a conversation message as server-sent events, with
#      CPU per request of Parley, PostgreSQL, Redis, NATS and the upstream from /proc/<pid>/stat;
#   6. parley-streams: time to first token at one stream (TTFT_REQUESTS sequential requests) for the
#      upstream alone and both Parley stream paths, then STREAMS concurrent streams (ramped up over RAMP
#      seconds) for the upstream alone and both Parley stream paths, sampling Parley's memory;
#   7. stops everything it started, drops its database, NATS streams and Redis keys.
#
# Environment (defaults in brackets):
#   DURATION [15]            seconds per wrk cell
#   CONNECTIONS ["1 10 50"]  wrk connection counts
#   STREAMS [1000]           concurrent streams (the target is 10000; needs ulimit -n above 2x that)
#   RAMP [2]                 seconds over which the concurrent streams start
#   STREAM_TOKENS_PER_SECOND [4]  the slow upstream's pace (20 tokens a reply: ~5 s a stream)
#   TTFT_REQUESTS [200]      sequential requests of the time-to-first-token measurement
#   AGENT_CONCURRENCY [max(32, STREAMS)]  agent.concurrency (jobs at once; the shipped default is 32)
#   PARLEY_BIN               use this parley binary instead of building one
#   LOADTEST_BIN             use this parley-streams binary instead of building one
#   FAKE_BIN [the parley binary]  the binary whose `fake-llm` is the upstream: keep it the same across a
#                            before/after comparison so that only Parley changes
#   PIN [1 when nproc >= 2]  pin load generators and upstreams to LOAD_CPUS [0], Parley to PARLEY_CPUS [1]
#   PHASES ["wrk ttft streams"]  which measurements to run
#   STREAM_PATHS ["upstream openai conversation"]  which paths the concurrent-streams phase measures
#   WRK_PATHS ["openai-json openai-stream conversation-json conversation-sse"]  which Parley paths wrk
#                            measures (the upstream alone always)
#   TOPOLOGY [dev]           dev: every service in one `parley dev`; split: each service its own process,
#                            `parley serve <service>` as the chart deploys them (memory is then the
#                            gateway's, CPU the sum of all six; each process has its own file limit, so
#                            10,000 streams fit)
#   GATEWAYS [1], AGENTS [1]  split: replicas of the gateway (on BENCH_PORT, BENCH_PORT+1, ...) and of the
#                            agent (each on its own loopback address, the gateways calling them as one
#                            comma-separated list); wrk then runs one instance per gateway, the
#                            connections split between them, and a cell adds their requests up and
#                            reports the worse of their percentiles
#   BENCH_DB [parley_loadtest], BENCH_PORT [18080], FAKE_PORT [18089], SLOW_FAKE_PORT [18090]
#   BENCH_PREFIX [parleybench]  the run's NATS and Redis prefix; with its own BENCH_DB and ports, two runs
#                            (two builds, PIN=0) can share the machine at once, each seeing the same noise
#   BENCH_LOG [info]         Parley's log filter (its logs go to a file)
#   CARGO [cargo]            the cargo command, e.g. "flock /tmp/parley-cargo.lock cargo"
#   LABEL                    a name for this run in the report, e.g. "before"
#   BENCH_RPM [6000000]      the bench tier's requests a minute
#   KEEP_WORK                keep the work directory (logs, config, raw outputs) after a successful run
#   GATEWAY_WRAP             split: a command the gateway runs under, e.g. "heaptrack -o /tmp/gateway"
#                            with a PARLEY_BIN built `--no-default-features` (the system allocator, which
#                            heaptrack sees); the memory reported is then the wrapper's, not the gateway's
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

duration="${DURATION:-15}"
read -ra connection_counts <<<"${CONNECTIONS:-1 10 50}"
streams="${STREAMS:-1000}"
ramp="${RAMP:-2}"
slow_tps="${STREAM_TOKENS_PER_SECOND:-4}"
ttft_requests="${TTFT_REQUESTS:-200}"
agent_concurrency="${AGENT_CONCURRENCY:-$((streams > 32 ? streams : 32))}"
phases=" ${PHASES:-wrk ttft streams} "
stream_paths=" ${STREAM_PATHS:-upstream openai conversation} "
wrk_paths=" ${WRK_PATHS:-openai-json openai-stream conversation-json conversation-sse} "
topology="${TOPOLOGY:-dev}"
[[ "$topology" == dev || "$topology" == split ]] || { echo "error: TOPOLOGY is dev or split, not '$topology'" >&2; exit 2; }
gateways="${GATEWAYS:-1}"
agents="${AGENTS:-1}"
if [ "$topology" = dev ] && [ "$gateways$agents" != 11 ]; then
  echo "error: GATEWAYS and AGENTS need TOPOLOGY=split" >&2
  exit 2
fi
db="${BENCH_DB:-parley_loadtest}"
port="${BENCH_PORT:-18080}"
fake_port="${FAKE_PORT:-18089}"
slow_port="${SLOW_FAKE_PORT:-18090}"
log_filter="${BENCH_LOG:-info}"
read -ra cargo <<<"${CARGO:-cargo}"
prefix="${BENCH_PREFIX:-parleybench}"
server="postgres://postgres@127.0.0.1:5432"
base="http://127.0.0.1:$port"
fast_upstream="http://127.0.0.1:$fake_port/v1"
slow_upstream="http://127.0.0.1:$slow_port/v1"
# The short prompt of every measurement (11 tokens in the fake's reply), and the prompt of the
# concurrent streams (20 tokens). No quotes: the Lua scripts put them in JSON as they are.
bench_rpm="${BENCH_RPM:-6000000}"
prompt="Hello, Parley!"
long_prompt="Please tell me a short story about a lighthouse keeper tonight"

for value in "$duration" "$streams" "$ttft_requests" "$agent_concurrency"; do
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || { echo "error: '$value' is not a positive whole number" >&2; exit 2; }
done

stamp=$(date -u +%Y%m%dT%H%M%SZ)
work=$(mktemp -d "/tmp/parley-bench.$stamp.XXXXXX")
results_dir="$root/loadtests/results"
mkdir -p "$results_dir"
results="$results_dir/$stamp${BENCH_PREFIX:+-$BENCH_PREFIX}.md"

say() { printf '\n== %s\n' "$*" >&2; }
note() { printf '   %s\n' "$*" >&2; }

# --- processes we start, and cleanup ----------------------------------------------------------------

pids=()
parley_pid=""   # the process whose memory is reported: parley dev, or the gateway when split
parley_pids=()  # every Parley process (CPU is their sum)
gateway_bases=("$base")  # split: every gateway, for wrk to spread its connections over
declare -A service_pid=()  # split: each service's process, whose CPU is also reported on its own
fake_pid=""
slow_pid=""
failed=1

tail_logs() {
  for log in "$work"/*.log; do
    [ -s "$log" ] || continue
    echo "---- last lines of $log" >&2
    tail -n 25 "$log" >&2
  done
}

fail() {
  echo >&2
  echo "error: $*" >&2
  tail_logs
  exit 1
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do
    pkill -TERM -P "$pid" 2>/dev/null || true # a GATEWAY_WRAP wrapper's child
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "${streams_bin:-}" ] && [ -x "$streams_bin" ]; then
    timeout 30 "$streams_bin" nats-cleanup --prefix "$prefix" >/dev/null 2>&1 || true
  fi
  if command -v redis-cli >/dev/null 2>&1; then
    timeout 30 redis-cli --scan --pattern "$prefix:*" 2>/dev/null | timeout 30 xargs -r -n 500 redis-cli del >/dev/null 2>&1 || true
  fi
  psql "$server/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  if [ "$status" -eq 0 ] && [ "$failed" -eq 0 ] && [ -z "${KEEP_WORK:-}" ]; then
    rm -rf "$work"
  else
    echo "logs and raw outputs kept in $work" >&2
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tools and build --------------------------------------------------------------------------------

say "dependencies"
scripts/ensure-services.sh >&2

apt_install() {
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    fail "$* missing; install it with: sudo apt-get install -y $*"
  fi
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >"$work/apt.log" 2>&1; then
    apt-get update -qq >>"$work/apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>"$work/apt.log" 2>&1 || fail "apt-get install $* failed"
  fi
}
for tool in wrk jq curl; do
  command -v "$tool" >/dev/null 2>&1 || { note "installing $tool"; apt_install "$tool"; }
done
command -v psql >/dev/null 2>&1 || fail "psql is missing (it comes with PostgreSQL's client package)"

say "build"
# Which binaries to build: parley unless PARLEY_BIN is given, parley-streams unless LOADTEST_BIN is.
build_bins=()
[ -n "${PARLEY_BIN:-}" ] || build_bins+=(--bin parley)
[ -n "${LOADTEST_BIN:-}" ] || build_bins+=(--bin parley-streams)
if [ "${#build_bins[@]}" -gt 0 ]; then
  "${cargo[@]}" build --release --quiet "${build_bins[@]}" || fail "cargo build --release ${build_bins[*]} failed"
fi
parley_bin=$(realpath "${PARLEY_BIN:-$root/target/release/parley}")
streams_bin=$(realpath "${LOADTEST_BIN:-$root/target/release/parley-streams}")
fake_bin=$(realpath "${FAKE_BIN:-$parley_bin}")
for bin in "$parley_bin" "$streams_bin" "$fake_bin"; do
  [ -x "$bin" ] || fail "$bin is not an executable"
done
note "parley: $parley_bin${PARLEY_BIN:+ (given)}"
[ "$fake_bin" = "$parley_bin" ] || note "upstream: $fake_bin fake-llm"
# A standby streaming from this PostgreSQL (the replica tests leave one: scripts/test-replica.sh)
# replays every write the run makes, on the same two cores, and its processes count as PostgreSQL's.
standbys=$(psql "$server/postgres" -Atc "SELECT count(*) FROM pg_stat_replication" 2>/dev/null || echo 0)
if [ "${standbys:-0}" -gt 0 ]; then
  note "warning: $standbys standby(s) replicate this PostgreSQL and replay every write of the run;"
  note "         stop the test replica first (scripts/test-replica.sh stop) for figures without one"
fi

# Every stream is a socket in the load generator and in Parley (and one to the upstream for each job).
ulimit -n 65535 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
files=$(ulimit -n)
if [ "$files" != "unlimited" ] && [ "$files" -lt $((2 * streams + 1000)) ]; then
  note "warning: ulimit -n is $files: Parley may run out of sockets with $streams streams (one from the client"
  note "and one to the upstream per stream); raise the hard limit to measure that many"
fi

# --- pinning ----------------------------------------------------------------------------------------

pin="${PIN:-}"
if [ -z "$pin" ]; then
  if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null 2>&1; then pin=1; else pin=0; fi
fi
load_cpus="${LOAD_CPUS:-0}"
parley_cpus="${PARLEY_CPUS:-1}"
# Command prefixes (arrays, so that a process started in the background is the one whose pid we keep:
# env and taskset exec what they run).
load_pin=()
parley_pin=()
if [ "$pin" = 1 ]; then
  load_pin=(taskset -c "$load_cpus")
  parley_pin=(taskset -c "$parley_cpus")
fi
if [ "$pin" = 1 ]; then
  note "pinned: wrk, parley-streams and the upstreams on CPU $load_cpus, Parley on CPU $parley_cpus"
else
  note "not pinned"
fi

# --- start ------------------------------------------------------------------------------------------

port_free() { ! (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null; }
for p in "$port" "$fake_port" "$slow_port"; do
  port_free "$p" || fail "port $p is in use (another benchmark or parley running?); set BENCH_PORT/FAKE_PORT/SLOW_FAKE_PORT"
done

# Waits until `url` answers 2xx, while `pid` lives, for at most `seconds`.
wait_http() {
  local url=$1 pid=$2 seconds=$3 name=$4
  local deadline=$((SECONDS + seconds))
  while [ "$SECONDS" -lt "$deadline" ]; do
    kill -0 "$pid" 2>/dev/null || fail "$name exited during start-up"
    if curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  fail "$name did not answer $url within $seconds s"
}

say "start"
# The upstreams read no configuration file: their knobs are flags (they apply to every request).
env PARLEY_CONFIG= "${load_pin[@]}" "$fake_bin" fake-llm --addr "127.0.0.1:$fake_port" \
  --time-to-first-token-ms 0 --tokens-per-second 1000000000 >"$work/fake-llm.log" 2>&1 &
fake_pid=$!
pids+=("$fake_pid")
env PARLEY_CONFIG= "${load_pin[@]}" "$fake_bin" fake-llm --addr "127.0.0.1:$slow_port" \
  --time-to-first-token-ms 0 --tokens-per-second "$slow_tps" >"$work/fake-llm-slow.log" 2>&1 &
slow_pid=$!
pids+=("$slow_pid")
wait_http "$fast_upstream/models" "$fake_pid" 15 "the fake upstream"
wait_http "$slow_upstream/models" "$slow_pid" 15 "the slow fake upstream"

cat >"$work/parley.toml" <<EOF
# Written by loadtests/bench.sh. Both models' only provider is an external fake upstream, so the load
# on the upstream runs (pinned) outside Parley; governance stays as in production.
default_model = "bench"

[http]
addr = "127.0.0.1:$port"

[agent]
# Jobs one agent runs at once (shipped default 1024): set so the concurrent-streams test measures
# streams held open, not the agent's queue.
concurrency = $agent_concurrency

[telemetry]
log_filter = "$log_filter"
log_format = "json"

# The in-process fake of \`parley dev\`: it starts, but no provider points at it.
[fake_llm]
addr = "127.0.0.1:0"

[providers.upstream]
kind = "openai"
base_url = "$fast_upstream"

[providers.upstream-slow]
kind = "openai"
base_url = "$slow_upstream"

[models.bench]
chain = [{ provider = "upstream", model = "fake-echo" }]
context_window = 8192
input_price_per_mtok = 0.5
output_price_per_mtok = 1.5

[models.bench-slow]
chain = [{ provider = "upstream-slow", model = "fake-echo" }]
context_window = 8192
input_price_per_mtok = 0.5
output_price_per_mtok = 1.5

[tiers.free]
requests_per_minute = 20
tokens_per_day = 50000
tokens_per_month = 1000000

# The bench user's tier: limits and budgets far above what a run uses, so they are checked on every
# request but never refuse one. (BENCH_RPM=60000 for binaries older than the microsecond limiter.)
[tiers.bench]
requests_per_minute = $bench_rpm
tokens_per_day = 1000000000000
tokens_per_month = 10000000000000
EOF

parley_env=(
  PARLEY_CONFIG="$work/parley.toml"
  DATABASE_URL="$server/$db"
  PARLEY_NATS_PREFIX="$prefix"
  PARLEY_REDIS_PREFIX="$prefix"
)

psql "$server/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null ||
  fail "cannot (re)create database $db"
timeout 60 "$streams_bin" nats-cleanup --prefix "$prefix" >/dev/null || fail "cannot reach NATS to clear old streams"
env "${parley_env[@]}" "$parley_bin" check-config >"$work/check-config.log" 2>&1 || fail "the generated configuration is invalid"

if [ "$topology" = dev ]; then
  env "${parley_env[@]}" "${parley_pin[@]}" "$parley_bin" dev >"$work/parley.log" 2>&1 &
  parley_pid=$!
  pids+=("$parley_pid")
  parley_pids=("$parley_pid")
  wait_http "$base/readyz" "$parley_pid" 120 "parley dev"
  note "parley dev is ready on $base (pid $parley_pid)"
else
  env "${parley_env[@]}" PARLEY_LOG=warn "$parley_bin" migrate >"$work/migrate.log" 2>&1 || fail "parley migrate failed"
  # One process per service, each on its own gRPC and admin port, peers found by URL as in the chart.
  split_services=(user chat quota analytics agent)
  grpc_port=$((port + 100))
  split_env=("${parley_env[@]}")
  # Agent replica r listens on 127.0.1.r; the gateways call them all, as one comma-separated list.
  agent_urls=()
  for r in $(seq 1 "$agents"); do
    agent_urls+=("http://127.0.1.$r:$((grpc_port + 4))")
  done
  for i in "${!split_services[@]}"; do
    name=${split_services[$i]}
    split_env+=("PARLEY_${name^^}_URL=http://127.0.0.1:$((grpc_port + i))")
  done
  split_env+=("PARLEY_AGENT_URL=$(IFS=,; echo "${agent_urls[*]}")")
  for i in "${!split_services[@]}"; do
    name=${split_services[$i]}
    replicas=1
    [ "$name" = agent ] && replicas=$agents
    for r in $(seq 1 "$replicas"); do
      host=127.0.0.1
      [ "$name" = agent ] && host=127.0.1.$r
      admin_port=$((grpc_port + 50 + i + 10 * (r - 1)))
      port_free $((grpc_port + i)) "$host" || fail "port $host:$((grpc_port + i)) is in use"
      env "${split_env[@]}" PARLEY_GRPC_ADDR="$host:$((grpc_port + i))" PARLEY_ADMIN_ADDR="127.0.0.1:$admin_port" \
        "${parley_pin[@]}" "$parley_bin" serve "$name" >"$work/parley-$name-$r.log" 2>&1 &
      pids+=("$!")
      parley_pids+=("$!")
      if [ "$r" -eq 1 ]; then service_pid[$name]=$!; else service_pid[$name-$r]=$!; fi
      wait_http "http://127.0.0.1:$admin_port/readyz" "$!" 120 "parley serve $name ($r)"
    done
  done
  read -ra gateway_wrap <<<"${GATEWAY_WRAP:-}"
  gateway_bases=()
  for r in $(seq 1 "$gateways"); do
    gateway_port=$((port + r - 1))
    env "${split_env[@]}" PARLEY_HTTP_ADDR="127.0.0.1:$gateway_port" "${parley_pin[@]}" "${gateway_wrap[@]}" "$parley_bin" \
      serve api-gateway >"$work/parley-api-gateway-$r.log" 2>&1 &
    pids+=("$!")
    parley_pids+=("$!")
    gateway_bases+=("http://127.0.0.1:$gateway_port")
    if [ "$r" -eq 1 ]; then
      parley_pid=$!
      service_pid[api-gateway]=$!
    else
      service_pid[api-gateway-$r]=$!
    fi
    wait_http "http://127.0.0.1:$gateway_port/readyz" "$!" 120 "parley serve api-gateway ($r)"
  done
  note "$((4 + gateways + agents)) processes (parley serve <service>) ready: $gateways gateway(s) from $base, $agents agent(s)"
fi

# --- the bench user ---------------------------------------------------------------------------------

api() { # method path [body] -> response body; fails on non-2xx
  local method=$1 path=$2 body=${3:-}
  local args=(-sS --max-time 30 -X "$method" -H 'content-type: application/json' -w '\n%{http_code}')
  [ -n "${bearer:-}" ] && args+=(-H "authorization: Bearer $bearer")
  [ -n "$body" ] && args+=(-d "$body")
  local out code
  out=$(curl "${args[@]}" "$base$path") || fail "$method $path: no answer"
  code=${out##*$'\n'}
  out=${out%$'\n'*}
  [[ "$code" == 2* ]] || fail "$method $path answered $code: $out"
  printf '%s' "$out"
}

say "bench user"
email="bench-$stamp@example.com"
bearer=""
access=$(api POST /v1/auth/register "{\"email\":\"$email\",\"password\":\"load test password $stamp\"}" | jq -r .access_token)
[ -n "$access" ] && [ "$access" != null ] || fail "registration returned no access token"
env "${parley_env[@]}" PARLEY_LOG=warn "$parley_bin" admin set-tier --email "$email" --tier bench >"$work/set-tier.log" 2>&1 ||
  fail "parley admin set-tier failed: $(cat "$work/set-tier.log")"
bearer=$access
key=$(api POST /v1/api-keys '{"name":"load test"}' | jq -r .key)
[[ "$key" == pk_* ]] || fail "no pk_ key in the API key response"
bearer=$key
tier=""
for _ in $(seq 1 50); do
  tier=$(api GET /v1/me | jq -r .tier)
  [ "$tier" = bench ] && break
  sleep 0.2
done
[ "$tier" = bench ] || fail "the bench user is on tier '$tier', not 'bench'"
note "$email on tier bench, API key ${key:0:10}..."
export PARLEY_KEY=$key LOADTESTS_DIR="$root/loadtests"

# --- measurement helpers ----------------------------------------------------------------------------

clk_tck=$(getconf CLK_TCK)
pids_of() {
  case $1 in
    parley) echo "${parley_pids[*]}" ;;
    service:*) echo "${service_pid[${1#service:}]}" ;;
    upstream) echo "$fake_pid $slow_pid" ;;
    postgres) pgrep -x postgres || true ;;
    redis) pgrep -x redis-server || true ;;
    nats) pgrep -x nats-server || true ;;
  esac
}
groups=(parley postgres redis nats upstream)
for name in "${!service_pid[@]}"; do
  groups+=("service:$name")
done
# "group pid ticks" for every process of every group (utime + stime, fields 14 and 15).
cpu_snapshot() {
  local group pid
  for group in "${groups[@]}"; do
    for pid in $(pids_of "$group"); do
      awk -v g="$group" -v p="$pid" '{ sub(/^.*\) /, ""); print g, p, $12 + $13 }' "/proc/$pid/stat" 2>/dev/null || true
    done
  done
}
# Milliseconds of CPU per group between two snapshots, as JSON. Processes that ended in between are
# missed; new ones count whole.
cpu_delta() {
  awk -v hz="$clk_tck" 'NR == FNR { before[$1 " " $2] = $3; next }
    { used[$1] += $3 - (($1 " " $2) in before ? before[$1 " " $2] : 0) }
    END { sep = ""; printf "{"; for (g in used) { printf "%s\"%s\":%.1f", sep, g, used[g] * 1000 / hz; sep = "," } printf "}" }' "$1" "$2"
}
rss_kb() { awk -v f="${2:-VmRSS}:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
alive() {
  local pid
  for pid in "${parley_pids[@]}"; do
    kill -0 "$pid" 2>/dev/null || fail "a Parley process ($pid) died"
  done
}

cells="$work/cells.jsonl"
streams_out="$work/streams.jsonl"
: >"$cells"
: >"$streams_out"
new_conversations() { # count model file
  "$streams_bin" conversations --url "$base" --count "$1" --model "$2" >"$3" || fail "creating $1 conversations failed"
}

# wrk_cell path title connections url script [VAR=value...]: one cell, appended to $cells.
wrk_cell() {
  local path=$1 title=$2 connections=$3 url=$4 script=$5
  shift 5
  local threads=2
  [ "$connections" -eq 1 ] && threads=1
  alive
  local before="$work/cpu.before" after="$work/cpu.after" out="$work/wrk-$path-$connections.txt"
  # With several gateways, one wrk per gateway, the connections split between them.
  local targets=("$url")
  if [ "${#gateway_bases[@]}" -gt 1 ] && [[ "$url" == "$base"* ]] && [ "$connections" -ge "${#gateway_bases[@]}" ]; then
    targets=()
    local gateway_base
    for gateway_base in "${gateway_bases[@]}"; do
      targets+=("$gateway_base${url#"$base"}")
    done
    threads=1
  fi
  local each=$((connections / ${#targets[@]})) wrk_pids=() k
  cpu_snapshot >"$before"
  for k in "${!targets[@]}"; do
    env "$@" WRK_THREADS="$threads" "${load_pin[@]}" wrk -t"$threads" -c"$each" -d"${duration}s" --latency \
      --timeout 30s -s "$root/loadtests/wrk/$script" "${targets[$k]}" >"$out.$k" 2>&1 &
    wrk_pids+=("$!")
  done
  for k in "${!wrk_pids[@]}"; do
    wait "${wrk_pids[$k]}" || fail "wrk failed for $title at $connections connections: $(tail -n 5 "$out.$k")"
  done
  cpu_snapshot >"$after"
  cat "$out".* >"$out"
  rm -f "$out".*
  local summary
  # One wrk: its summary. Several: requests, errors and statuses added up, the worse percentiles.
  summary=$(grep '^WRK_JSON ' "$out" | cut -d' ' -f2- | jq -s -c '
    if length == 1 then .[0] else
      {requests: (map(.requests) | add), duration_us: (map(.duration_us) | max), bytes: (map(.bytes) | add),
       p50_us: (map(.p50_us) | max), p90_us: (map(.p90_us) | max), p99_us: (map(.p99_us) | max),
       max_us: (map(.max_us) | max), mean_us: (map(.mean_us) | max),
       connect_errors: (map(.connect_errors) | add), read_errors: (map(.read_errors) | add),
       write_errors: (map(.write_errors) | add), timeouts: (map(.timeouts) | add),
       statuses: (reduce (.[].statuses | to_entries[]) as $e ({}; .[$e.key] += $e.value))}
    end')
  [ -n "$summary" ] && [ "$summary" != null ] || fail "wrk printed no summary for $title: $(tail -n 5 "$out")"
  local cpu
  cpu=$(cpu_delta "$before" "$after")
  jq -c -n --argjson w "$summary" --argjson cpu "$cpu" --arg path "$path" --arg title "$title" \
    --argjson c "$connections" --argjson rss "$(rss_kb "$parley_pid")" '
    ($w.requests) as $n
    | {kind: "wrk", path: $path, title: $title, connections: $c, requests: $n,
       duration_s: ($w.duration_us / 1e6), rps: ($n / ($w.duration_us / 1e6)),
       p50_ms: ($w.p50_us / 1000), p90_ms: ($w.p90_us / 1000), p99_ms: ($w.p99_us / 1000),
       max_ms: ($w.max_us / 1000), statuses: $w.statuses,
       non2xx: ([$w.statuses | to_entries[] | select((.key | tonumber) < 200 or (.key | tonumber) > 299) | .value] | add // 0),
       accepted_pending: ($w.statuses["202"] // 0),
       socket_errors: {connect: $w.connect_errors, read: $w.read_errors, write: $w.write_errors, timeout: $w.timeouts},
       cpu_ms: $cpu,
       cpu_ms_per_request: ($cpu | with_entries(.value = (if $n > 0 then .value / $n else null end))),
       parley_rss_kb: $rss}' >>"$cells"
  jq -r '"   \(.title) c=\(.connections): \(.rps | floor) req/s, p50 \(.p50_ms) ms, p99 \(.p99_ms) ms, non-2xx \(.non2xx), socket errors \(.socket_errors | add)\(if .non2xx + (.socket_errors | add) + .accepted_pending > 0 then "  <-- ERRORS: statuses \(.statuses), sockets \(.socket_errors)" else "" end)"' <<<"$(tail -n 1 "$cells")" >&2
  sleep 2
}

# streams_run kind target title [parley-streams run args...]: appended to $streams_out, with the peak
# of Parley's resident memory sampled every 200 ms while it runs.
streams_run() {
  local kind=$1 target=$2 title=$3
  shift 3
  alive
  local out="$work/streams-$kind-$target.json" peak=0 rss
  "${load_pin[@]}" "$streams_bin" run --label "$title" "$@" >"$out" 2>"$work/streams-$kind-$target.err" &
  local tool=$!
  local deadline=$((SECONDS + 600))
  while kill -0 "$tool" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
    rss=$(rss_kb "$parley_pid")
    [ "${rss:-0}" -gt "$peak" ] && peak=$rss
    sleep 0.2
  done
  if kill -0 "$tool" 2>/dev/null; then
    kill -TERM "$tool" 2>/dev/null || true
    fail "parley-streams ($title) ran for more than 600 s"
  fi
  wait "$tool" || fail "parley-streams ($title) failed: $(tail -n 5 "$work/streams-$kind-$target.err")"
  jq -c --arg kind "$kind" --arg target "$target" --argjson rss "$peak" \
    '{kind: $kind, target: $target, parley_rss_peak_kb: $rss, result: .}' "$out" >>"$streams_out"
  jq -r '"   \(.label): \(.completed)/\(.requests) completed, TTFT p50 \(.ttft_ms.p50 // "-") ms p99 \(.ttft_ms.p99 // "-") ms, errors \(.errors)\(if .failed > 0 then "  <-- ERRORS: \(.error_samples)" else "" end)"' "$out" >&2
  sleep 2
}

# --- measurements -----------------------------------------------------------------------------------

rss_idle=$(rss_kb "$parley_pid")

say "warm-up"
new_conversations 4 bench "$work/warm.ids"
for _ in 1 2 3 4 5; do
  api POST /v1/chat/completions "{\"model\":\"bench\",\"messages\":[{\"role\":\"user\",\"content\":\"$prompt\"}]}" >/dev/null
  api POST "/v1/conversations/$(head -n 1 "$work/warm.ids")/messages" "{\"content\":\"$prompt\"}" >/dev/null
done
"${load_pin[@]}" "$streams_bin" run --label warm-up --mode openai --url "$base/v1/chat/completions" --model bench \
  --prompt "$prompt" --streams 4 --requests 40 >/dev/null || fail "warm-up streams failed"
"${load_pin[@]}" "$streams_bin" run --label warm-up --mode conversation --url "$base" --conversations-file "$work/warm.ids" \
  --prompt "$prompt" --streams 4 --requests 40 >/dev/null || fail "warm-up conversation streams failed"

if [[ "$phases" == *" wrk "* ]]; then
  say "wrk: $duration s per cell, connections ${connection_counts[*]}"
  for c in "${connection_counts[@]}"; do
    wrk_cell upstream-json "upstream alone, JSON" "$c" "$fast_upstream/chat/completions" openai.lua \
      MODEL=fake-echo PROMPT="$prompt" PARLEY_KEY=
    wrk_cell upstream-stream "upstream alone, streamed" "$c" "$fast_upstream/chat/completions" openai.lua \
      MODEL=fake-echo PROMPT="$prompt" STREAM=1 PARLEY_KEY=
  done
  if [[ "$wrk_paths" == *" openai-json "* ]]; then
    for c in "${connection_counts[@]}"; do
      wrk_cell openai-json "Parley OpenAI, JSON" "$c" "$base/v1/chat/completions" openai.lua MODEL=bench PROMPT="$prompt"
    done
  fi
  if [[ "$wrk_paths" == *" openai-stream "* ]]; then
    for c in "${connection_counts[@]}"; do
      wrk_cell openai-stream "Parley OpenAI, streamed" "$c" "$base/v1/chat/completions" openai.lua \
        MODEL=bench PROMPT="$prompt" STREAM=1
    done
  fi
  if [[ "$wrk_paths" == *" conversation-json "* ]]; then
    for c in "${connection_counts[@]}"; do
      new_conversations $((c * 4)) bench "$work/conversations-json-$c.ids"
      wrk_cell conversation-json "Parley conversation message, JSON" "$c" "$base/" conversation.lua \
        PROMPT="$prompt" CONVERSATIONS_FILE="$work/conversations-json-$c.ids"
    done
  fi
  if [[ "$wrk_paths" == *" conversation-sse "* ]]; then
    for c in "${connection_counts[@]}"; do
      new_conversations $((c * 4)) bench "$work/conversations-sse-$c.ids"
      wrk_cell conversation-sse "Parley conversation message, SSE" "$c" "$base/" conversation.lua \
        PROMPT="$prompt" SSE=1 CONVERSATIONS_FILE="$work/conversations-sse-$c.ids"
    done
  fi
fi
rss_after_wrk=$(rss_kb "$parley_pid")

if [[ "$phases" == *" ttft "* ]]; then
  say "time to first token: $ttft_requests sequential requests"
  streams_run ttft upstream "upstream alone" --mode openai --url "$fast_upstream/chat/completions" \
    --model fake-echo --prompt "$prompt" --streams 1 --requests "$ttft_requests"
  streams_run ttft openai "Parley OpenAI, streamed" --mode openai --url "$base/v1/chat/completions" \
    --model bench --prompt "$prompt" --streams 1 --requests "$ttft_requests"
  new_conversations 10 bench "$work/ttft.ids"
  streams_run ttft conversation "Parley conversation SSE" --mode conversation --url "$base" \
    --conversations-file "$work/ttft.ids" --prompt "$prompt" --streams 1 --requests "$ttft_requests"
fi

if [[ "$phases" == *" streams "* ]]; then
  say "concurrent streams: $streams, ramped up over $ramp s, upstream at $slow_tps tokens/s"
  if [[ "$stream_paths" == *" upstream "* ]]; then
    streams_run concurrent upstream "upstream alone" --mode openai --url "$slow_upstream/chat/completions" \
      --model fake-echo --prompt "$long_prompt" --streams "$streams" --ramp-secs "$ramp"
  fi
  if [[ "$stream_paths" == *" openai "* ]]; then
    streams_run concurrent openai "Parley OpenAI, streamed" --mode openai --url "$base/v1/chat/completions" \
      --model bench-slow --prompt "$long_prompt" --streams "$streams" --ramp-secs "$ramp"
  fi
  if [[ "$stream_paths" == *" conversation "* ]]; then
    new_conversations "$streams" bench-slow "$work/streams.ids"
    streams_run concurrent conversation "Parley conversation SSE" --mode conversation --url "$base" \
      --conversations-file "$work/streams.ids" --prompt "$long_prompt" --streams "$streams" --ramp-secs "$ramp"
  fi
fi

alive
rss_end=$(rss_kb "$parley_pid")
rss_hwm=$(rss_kb "$parley_pid" VmHWM)

# --- report -----------------------------------------------------------------------------------------

say "report"
if [ -n "${PARLEY_BIN:-}" ]; then
  build="given binary"
else
  build="built from $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  git diff --quiet HEAD -- services proto migrations 2>/dev/null || build="$build with uncommitted changes"
fi
jq -n \
  --arg date "$(date -u '+%Y-%m-%d %H:%M UTC')" --arg run "${LABEL:-}" --arg build "$build" --arg binary "$parley_bin" \
  --arg fake "$fake_bin" --arg topology "$topology" --argjson gateways "$gateways" --argjson agents "$agents" --arg cpu "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" --argjson nproc "$(nproc)" \
  --arg pin "$([ "$pin" = 1 ] && echo "load generators and upstreams on CPU $load_cpus, Parley on CPU $parley_cpus" || echo "none")" \
  --argjson duration "$duration" --arg connections "${connection_counts[*]}" --argjson streams "$streams" \
  --arg ramp "$ramp" --arg slow_tps "$slow_tps" --argjson ttft_requests "$ttft_requests" \
  --argjson agent_concurrency "$agent_concurrency" --arg files "$files" --arg log "$log_filter" \
  --arg postgres "$(psql "$server/postgres" -Atc 'SHOW server_version' 2>/dev/null || echo '?')" \
  --arg redis "$(redis-cli INFO server 2>/dev/null | awk -F: '/^redis_version/ { sub(/\r/, "", $2); print $2 }' || echo '?')" \
  --arg nats "$(timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/4222; head -n 1 <&3' 2>/dev/null | sed 's/^INFO //' | jq -r '.version // "?"' 2>/dev/null || echo '?')" \
  --argjson rss_idle "${rss_idle:-0}" --argjson rss_after_wrk "${rss_after_wrk:-0}" \
  --argjson rss_end "${rss_end:-0}" --argjson rss_hwm "${rss_hwm:-0}" \
  '{date: $date, run: $run, build: $build, binary: $binary, fake: $fake, topology: $topology, gateways: $gateways, agents: $agents, cpu: $cpu, nproc: $nproc, pin: $pin, duration: $duration,
    connections: $connections, streams: $streams, ramp: $ramp, slow_tps: $slow_tps, ttft_requests: $ttft_requests,
    agent_concurrency: $agent_concurrency, files: $files, log: $log,
    versions: {postgres: $postgres, redis: $redis, nats: $nats},
    rss_kb: {idle: $rss_idle, after_wrk: $rss_after_wrk, end: $rss_end, peak: $rss_hwm}}' >"$work/meta.json"

jq -r -n --slurpfile meta "$work/meta.json" --slurpfile cells "$cells" --slurpfile streams "$streams_out" \
  -f "$root/loadtests/report.jq" >"$work/report.md"
{
  cat "$work/report.md"
  echo
  echo "## Raw results"
  echo
  echo '```json'
  cat "$work/meta.json"
  echo
  cat "$cells" "$streams_out"
  echo '```'
  echo
  echo "## Configuration used"
  echo
  echo '```toml'
  cat "$work/parley.toml"
  echo '```'
} >"$results"
echo
cat "$work/report.md"
echo
echo "results written to ${results#"$root"/}"
problems=$(jq -s '[.[] | select(.non2xx + (.socket_errors | add) + .accepted_pending > 0)] | length' "$cells")
problems=$((problems + $(jq -s '[.[] | select(.result.failed > 0)] | length' "$streams_out")))
if [ "$problems" -gt 0 ]; then
  echo >&2
  echo "!! $problems measurements had errors (non-2xx, 202 pending replies, socket errors or failed streams): see Errors above" >&2
fi
failed=0
