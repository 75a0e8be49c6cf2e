#!/usr/bin/env bash
# Benchmark of the two hottest reads, at scale: a conversation's messages and a user's conversations.
#
#   loadtests/listing-bench.sh            # seeds parley_bench, then measures (about 3 minutes)
#   SKIP_SEED=1 loadtests/listing-bench.sh  # measures again on the seeded database
#
# Seeds one million messages across 10,000 conversations of 200 users into a fresh database
# (PARLEY_BENCH_DB, default parley_bench) migrated by `parley migrate`, then runs each query exactly as
# the chat service issues it with pgbench (4 clients, 2 threads, DURATION seconds each) and reports
# p50/p99 latency from pgbench's per-transaction log, with the EXPLAIN (ANALYZE, BUFFERS) plan of one
# run. Every variant runs in this one script against the same data, so their ratios are comparable:
#   - messages, first page and a deep page (keyset), through chat.all_messages (what Parley runs)
#   - the same deep page with OFFSET (what keyset pagination avoids)
#   - the same first page on chat.messages directly (the cost of the archive view)
#   - a user's conversations, first page and the next page
set -euo pipefail

cd "$(dirname "$0")/.."
db="${PARLEY_BENCH_DB:-parley_bench}"
duration="${DURATION:-15}"
server="postgres://postgres@127.0.0.1:5432"
url="$server/$db"
version=$(psql "$server/postgres" -Atc "SHOW server_version_num")
pgbench="/usr/lib/postgresql/$((version / 10000))/bin/pgbench"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ -z "${SKIP_SEED:-}" ]; then
  cargo build --quiet --bin parley
  psql "$server/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
  DATABASE_URL="$url" PARLEY_LOG=warn ./target/debug/parley migrate >/dev/null
  echo "seeding 10,000 conversations and 1,000,000 messages..."
  start=$(date +%s)
  psql "$url" -q <<'SQL'
SET synchronous_commit = off;
-- 200 users with 50 conversations each; conversation n belongs to user n % 200.
CREATE TABLE public.bench_conversations AS
SELECT n, md5('conversation ' || n)::uuid AS id, md5('user ' || (n % 200))::uuid AS user_id,
       now() - interval '1 day' * (n % 365) AS updated_at
FROM generate_series(1, 10000) AS n;
CREATE UNIQUE INDEX ON public.bench_conversations (n);
INSERT INTO chat.conversations (id, user_id, title, model, created_at, updated_at)
SELECT id, user_id, 'Conversation ' || n, 'parley-fake', updated_at - interval '1 day', updated_at
FROM public.bench_conversations;
-- 100 messages per conversation, inserted in time order across all conversations, so one
-- conversation's messages are spread over the heap as they are in production.
INSERT INTO chat.messages (id, conversation_id, user_id, role, content, status, model, created_at, completed_at)
SELECT md5(c.n || '-' || k)::uuid, c.id, c.user_id,
       CASE WHEN k % 2 = 1 THEN 'user' ELSE 'assistant' END,
       repeat('Parley benchmark message text. ', 6), 'completed', 'parley-fake',
       c.updated_at - interval '1 day' + interval '1 second' * k, c.updated_at - interval '1 day' + interval '1 second' * k
FROM generate_series(1, 100) AS k, public.bench_conversations AS c
ORDER BY k, c.n;
-- The cursor positions the deep-page variants start from: each conversation's 60th message and each
-- user's 21st conversation.
CREATE TABLE public.bench_message_cursor AS
SELECT c.n, m.created_at, m.id FROM public.bench_conversations c
JOIN chat.messages m ON m.id = md5(c.n || '-' || 60)::uuid;
CREATE UNIQUE INDEX ON public.bench_message_cursor (n);
CREATE TABLE public.bench_conversation_cursor AS
SELECT u AS n, x.updated_at, x.id
FROM generate_series(0, 199) AS u,
LATERAL (SELECT updated_at, id FROM chat.conversations WHERE user_id = md5('user ' || u)::uuid
         ORDER BY updated_at DESC, id DESC OFFSET 20 LIMIT 1) AS x;
CREATE UNIQUE INDEX ON public.bench_conversation_cursor (n);
VACUUM ANALYZE;
SQL
  echo "seeded in $(( $(date +%s) - start )) s"
fi

columns="id, conversation_id, user_id, role, content, status, model, input_tokens, output_tokens, error_code, error_detail, created_at, completed_at"
conversation_columns="id, user_id, title, model, system_prompt, version, created_at, updated_at"

# Each variant: a name and one statement; :c is a random conversation (1..10000), :who a random user.
declare -A statements=(
  [messages_first_page]="SELECT $columns FROM chat.all_messages WHERE conversation_id = (SELECT id FROM bench_conversations WHERE n = :c) ORDER BY created_at, id LIMIT 21;"
  [messages_deep_page_keyset]="SELECT $columns FROM chat.all_messages WHERE conversation_id = (SELECT id FROM bench_conversations WHERE n = :c) AND (created_at, id) > (SELECT created_at, id FROM bench_message_cursor WHERE n = :c) ORDER BY created_at, id LIMIT 21;"
  [messages_deep_page_offset]="SELECT $columns FROM chat.all_messages WHERE conversation_id = (SELECT id FROM bench_conversations WHERE n = :c) ORDER BY created_at, id OFFSET 60 LIMIT 21;"
  [messages_first_page_hot_table_only]="SELECT $columns FROM chat.messages WHERE conversation_id = (SELECT id FROM bench_conversations WHERE n = :c) ORDER BY created_at, id LIMIT 21;"
  [conversations_first_page]="SELECT $conversation_columns FROM chat.conversations WHERE user_id = md5('user ' || :who)::uuid AND kind = 'chat' ORDER BY updated_at DESC, id DESC LIMIT 21;"
  [conversations_next_page]="SELECT $conversation_columns FROM chat.conversations WHERE user_id = md5('user ' || :who)::uuid AND kind = 'chat' AND (updated_at, id) < (SELECT updated_at, id FROM bench_conversation_cursor WHERE n = :who) ORDER BY updated_at DESC, id DESC LIMIT 21;"
)
order=(messages_first_page messages_deep_page_keyset messages_deep_page_offset messages_first_page_hot_table_only
  conversations_first_page conversations_next_page)

printf '%-36s %10s %10s %10s %12s\n' variant p50_ms p99_ms mean_ms transactions
for name in "${order[@]}"; do
  {
    echo '\set c random(1, 10000)'
    echo '\set who random(0, 199)'
    echo "${statements[$name]}"
  } >"$work/$name.sql"
  (cd "$work" && "$pgbench" -n -M prepared -c 4 -j 2 -T "$duration" -f "$name.sql" -l --log-prefix="$name" "$url" >/dev/null 2>&1)
  cat "$work/$name".* | awk '{print $3}' | sort -n >"$work/$name.latencies"
  count=$(wc -l <"$work/$name.latencies")
  p50=$(awk -v n="$count" 'NR == int(n * 0.50) + 1 {printf "%.3f", $1 / 1000}' "$work/$name.latencies")
  p99=$(awk -v n="$count" 'NR == int(n * 0.99) + 1 {printf "%.3f", $1 / 1000}' "$work/$name.latencies")
  mean=$(awk '{s += $1} END {printf "%.3f", s / NR / 1000}' "$work/$name.latencies")
  printf '%-36s %10s %10s %10s %12s\n' "$name" "$p50" "$p99" "$mean" "$count"
done

echo
for name in "${order[@]}"; do
  statement=${statements[$name]//:c/4242}
  statement=${statement//:who/42}
  echo "== EXPLAIN (ANALYZE, BUFFERS) $name"
  psql "$url" -Atc "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) $statement"
  echo
done
