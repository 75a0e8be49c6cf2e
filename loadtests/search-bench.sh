#!/usr/bin/env bash
# Search at scale, through the public API: GET /v1/search over one million stored messages.
#
#   loadtests/search-bench.sh              # about 17 minutes on a 2-core machine (sealing takes most)
#   SKIP_SEED=1 loadtests/search-bench.sh  # measures again on the seeded database (about 2 minutes)
#
# Builds Parley in release mode (unless PARLEY_BIN names a binary), starts `parley dev` on a fresh
# database (PARLEY_BENCH_DB, default parley_search_bench), registers USERS users (default 200), each
# with an API key, and seeds 50 conversations of 100 messages for each with SQL (1,000,000 messages
# for 200 users), written as plain text the way messages from before sealing and search were. Then
# `parley admin seal-content` seals them and puts them in the search index, as an upgrade does (timed).
# wrk then measures, DURATION seconds each at CONNECTIONS connections, every request with a random
# user's key:
#   - GET /v1/me: the floor (authentication, the rate limit, one call behind the gateway)
#   - a rare word (in one message of a million)
#   - a word in 1% of the messages (about 50 of each user's 5,000)
#   - a word in every message (all 5,000 of the user's: the most a query can match)
#   - two words (a rare one and a common one)
# Results: latency p50/p99, requests a second and non-2xx answers per variant.
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="$PWD/.tools/bin:$HOME/.cargo/bin:$PATH"
db="${PARLEY_BENCH_DB:-parley_search_bench}"
users="${USERS:-200}"
duration="${DURATION:-15}"
connections="${CONNECTIONS:-4}"
port="${BENCH_PORT:-18090}"
server="postgres://postgres@127.0.0.1:5432"
url="$server/$db"
base="http://127.0.0.1:$port"
work=$(mktemp -d)
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "search-bench: $*" >&2; exit 1; }
command -v wrk >/dev/null || fail "wrk is missing: make tools installs it"
command -v jq >/dev/null || fail "jq is missing: make tools installs it"

parley="${PARLEY_BIN:-}"
if [ -z "$parley" ]; then
  cargo build --quiet --release --bin parley
  parley=target/release/parley
fi

if [ -z "${SKIP_SEED:-}" ]; then
  psql "$server/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
fi
cat >"$work/parley.toml" <<EOF
[http]
addr = "127.0.0.1:$port"
# Registering the users from one address.
ip_requests_per_minute = 100000000

[tiers.free]
requests_per_minute = 100000000
tokens_per_day = 1000000000
tokens_per_month = 10000000000
EOF
export PARLEY_CONFIG="$work/parley.toml" DATABASE_URL="$url" PARLEY_LOG=warn
"$parley" dev >"$work/parley.log" 2>&1 &
pid=$!
for _ in $(seq 1 150); do
  curl -fsS -o /dev/null "$base/readyz" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || fail "parley exited: $(tail -5 "$work/parley.log")"
  sleep 0.2
done
curl -fsS -o /dev/null "$base/readyz" || fail "parley did not become ready"

route=register
[ -n "${SKIP_SEED:-}" ] && route=login
echo "$route: $users users, an API key each..."
: >"$work/keys"
for u in $(seq 1 "$users"); do
  token=$(curl -fsS "$base/v1/auth/$route" -H 'content-type: application/json' \
    -d "{\"email\":\"searcher$u@example.com\",\"password\":\"correct horse battery\"}" | jq -r .access_token)
  curl -fsS "$base/v1/api-keys" -H "authorization: Bearer $token" -H 'content-type: application/json' \
    -d '{"name":"search bench"}' | jq -r .key >>"$work/keys"
done

if [ -z "${SKIP_SEED:-}" ]; then

echo "seeding $((users * 5000)) messages..."
start=$(date +%s)
psql "$url" -q <<'SQL'
SET synchronous_commit = off;
CREATE TABLE public.bench_users AS
SELECT row_number() OVER (ORDER BY id) - 1 AS u, id FROM identity.users WHERE email LIKE 'searcher%';
-- 50 conversations per user, 100 messages per conversation, in one line each (parent = the one before).
CREATE TABLE public.bench_conversations AS
SELECT u.u * 50 + c AS n, md5('search conversation ' || (u.u * 50 + c))::uuid AS id, u.id AS user_id
FROM public.bench_users u, generate_series(0, 49) AS c;
INSERT INTO chat.conversations (id, user_id, title, model, created_at, updated_at, active_leaf_id)
SELECT id, user_id, 'Notes ' || n, 'parley-fake', now() - interval '2 days', now() - interval '1 day',
       md5(n || '-' || 100)::uuid
FROM public.bench_conversations;
-- Message k of conversation n: the word r<n*100+k> is in it alone, c<(n*100+k) % 100> in 1% of all,
-- and "benchmark" in every one.
INSERT INTO chat.messages (id, conversation_id, user_id, role, content, status, model, created_at, completed_at, parent_id)
SELECT md5(c.n || '-' || k)::uuid, c.id, c.user_id,
       CASE WHEN k % 2 = 1 THEN 'user' ELSE 'assistant' END,
       'Parley benchmark note ' || k || ' about r' || (c.n * 100 + k) || ' and c' || ((c.n * 100 + k) % 100)
         || ' written in plain words for the search benchmark of Parley',
       'completed', 'parley-fake',
       now() - interval '2 days' + interval '1 second' * k, now() - interval '2 days' + interval '1 second' * k,
       CASE WHEN k > 1 THEN md5(c.n || '-' || (k - 1))::uuid END
FROM generate_series(1, 100) AS k, public.bench_conversations AS c
ORDER BY k, c.n;
SQL
echo "seeded in $(($(date +%s) - start)) s; sealing and indexing them with parley admin seal-content..."
start=$(date +%s)
"$parley" admin seal-content --batch 100 | tail -1
echo "sealed and indexed in $(($(date +%s) - start)) s"
psql "$url" -qc "VACUUM ANALYZE"
fi
psql "$url" -Atc "SELECT 'messages: ' || count(*) FROM chat.messages"
psql "$url" -Atc "SELECT 'search terms rows: ' || count(*) || ', ' || pg_size_pretty(pg_total_relation_size('chat.search_terms')) FROM chat.search_terms"

cat >"$work/search.lua" <<'EOF'
local keys = {}
local queries = {}
function init(args)
  for line in io.lines(os.getenv("KEYS_FILE")) do keys[#keys + 1] = line end
  for query in string.gmatch(os.getenv("QUERIES"), "[^;]+") do queries[#queries + 1] = query end
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
end
function request()
  local key = keys[math.random(#keys)]
  local path = os.getenv("ROUTE")
  if #queries > 0 then
    local query = queries[math.random(#queries)]
    query = string.gsub(query, "{n}", tostring(math.random(0, 999999)))
    query = string.gsub(query, "{c}", tostring(math.random(0, 99)))
    path = path .. "?q=" .. query
  end
  return wrk.format("GET", path, { ["Authorization"] = "Bearer " .. key })
end
function done(summary, latency, requests)
  io.write(string.format("RESULT %.3f %.3f %.1f %d %d\n", latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.requests / (summary.duration / 1000000), summary.errors.status, summary.requests))
end
EOF

printf '\n%-34s %10s %10s %10s %12s\n' variant p50_ms p99_ms req/s non-2xx
run() { # name route queries
  local line
  line=$(KEYS_FILE="$work/keys" ROUTE="$2" QUERIES="$3" wrk -t 2 -c "$connections" -d "${duration}s" \
    -s "$work/search.lua" "$base" | grep '^RESULT')
  read -r _ p50 p99 rps errors _ <<<"$line"
  printf '%-34s %10s %10s %10s %12s\n' "$1" "$p50" "$p99" "$rps" "$errors"
}
run "floor: GET /v1/me" /v1/me ""
run "search: a rare word" /v1/search "r{n}"
run "search: a word in 1% of messages" /v1/search "c{c}"
run "search: a word in every message" /v1/search "benchmark"
run "search: two words" /v1/search "benchmark+r{n}"

