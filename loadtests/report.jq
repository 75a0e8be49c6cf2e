# The Markdown report of bench.sh. Inputs (jq --slurpfile): $meta (one object), $cells (wrk cells),
# $streams (parley-streams runs). Run with -r -n.

def num(d): if . == null then "-" else ((. * pow(10; d) | round) / pow(10; d) | tostring) end;
def int: if . == null then "-" else (round | tostring) end;
def mb: if . == null or . == 0 then "-" else (. / 1024 | num(1)) end;
def signed(d): if . == null then "-" elif . >= 0 then "+" + num(d) else num(d) end;
def flag: if . == null or . == 0 then tostring else "**\(.)** ⚠" end;
def errors_text: if . == {} or . == null then "0" else ([to_entries[] | "\(.key) \(.value)"] | join(", ") | "**\(.)** ⚠") end;

$meta[0] as $m
| ($cells | map(select(.path == "upstream-stream")) | map({key: (.connections | tostring), value: .}) | from_entries) as $base
| ($streams | map(select(.kind == "ttft" and .target == "upstream")) | first | .result.ttft_ms) as $ttft_base
| ($cells | map(select(.non2xx > 0 or (.socket_errors | add) > 0 or (.accepted_pending // 0) > 0))) as $bad_cells
| ($streams | map(select(.result.failed > 0))) as $bad_streams

| "# Parley load test\(if $m.run == "" then "" else ": " + $m.run end), \($m.date)",
  "",
  "Parley `\($m.binary)` (\($m.build)), \(if $m.topology == "split" then "each service its own process (`parley serve`; \($m.gateways // 1) gateway(s) and \($m.agents // 1) agent(s); memory below is the first gateway's, CPU the sum of every Parley process)" else "all services in one `parley dev`" end), on \($m.cpu), \($m.nproc) CPUs; pinning: \($m.pin). PostgreSQL \($m.versions.postgres), Redis \($m.versions.redis), NATS \($m.versions.nats) (not pinned).",
  "Upstream: `\($m.fake) fake-llm` as its own process (time to first token 0, no delay between tokens; \($m.slow_tps) tokens/s for the concurrent streams), sharing its CPU with the load generators. Governance on: API key, rate limit, budgets, usage accounting. agent.concurrency \($m.agent_concurrency); log filter \($m.log); ulimit -n \($m.files).",
  "wrk: \($m.duration) s per cell, 2 threads (1 for one connection), --latency.",
  "",
  "## Errors",
  "",
  (if ($bad_cells | length) == 0 and ($bad_streams | length) == 0 then "None: every request answered 2xx (none 202, reply pending) and every stream completed."
   else
     ($bad_cells[] | "- ⚠ **\(.title), \(.connections) connections**: \(.non2xx) non-2xx, \(.accepted_pending // 0) answered 202 (reply still pending); statuses \(.statuses | tostring), socket errors \(.socket_errors | tostring)"),
     ($bad_streams[] | "- ⚠ **\(.result.label) (\(.kind), \(.result.streams) streams)**: \(.result.failed) of \(.result.requests) failed: \(.result.errors | tostring); first of each: \(.result.error_samples | tostring)")
   end),
  "",
  "## Throughput and latency (wrk)",
  "",
  "Added latency: Parley minus the upstream alone, streamed, at the same connection count (Parley always calls its upstream streamed).",
  "",
  "| path | conn | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | non-2xx | socket errors |",
  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ($cells[]
   | ($base[.connections | tostring]) as $b
   | (if (.path | startswith("upstream")) or $b == null then null else (.p50_ms - $b.p50_ms) end) as $added50
   | (if (.path | startswith("upstream")) or $b == null then null else (.p99_ms - $b.p99_ms) end) as $added99
   | "| \(.title) | \(.connections) | \(.rps | int) | \(.p50_ms | num(2)) | \(.p99_ms | num(2)) | \($added50 | signed(2)) | \($added99 | signed(2)) | \(.non2xx | flag) | \(.socket_errors | add | flag) |"),
  "",
  "## CPU per request (ms)",
  "",
  "utime + stime from /proc/<pid>/stat over each cell, divided by the responses wrk counted. PostgreSQL is every postgres process of the machine.",
  "",
  "| path | conn | requests | Parley | PostgreSQL | Redis | NATS | upstream | all |",
  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ($cells[]
   | .cpu_ms_per_request as $c
   | "| \(.title) | \(.connections) | \(.requests) | \($c.parley | num(3)) | \($c.postgres | num(3)) | \($c.redis | num(3)) | \($c.nats | num(3)) | \($c.upstream | num(3)) | \([$c.parley, $c.postgres, $c.redis, $c.nats, $c.upstream] | map(select(. != null)) | add | num(3)) |"),
  "",
  (if $m.topology == "split" and ($cells | length) > 0 then
    "Parley by service (split topology):",
    "",
    "| path | conn | api-gateway | user | chat | quota | analytics | agent |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ($cells[] | select(.path | startswith("upstream") | not)
     | .cpu_ms_per_request as $c
     | "| \(.title) | \(.connections) | \($c["service:api-gateway"] | num(3)) | \($c["service:user"] | num(3)) | \($c["service:chat"] | num(3)) | \($c["service:quota"] | num(3)) | \($c["service:analytics"] | num(3)) | \($c["service:agent"] | num(3)) |"),
    ""
   else empty end),
  "## Memory (\(if $m.topology == "split" then "the gateway's" else "Parley's" end) resident set, MB)",
  "",
  "| idle (after start) | after the wrk cells | at the end | peak (VmHWM) |",
  "| ---: | ---: | ---: | ---: |",
  "| \($m.rss_kb.idle | mb) | \($m.rss_kb.after_wrk | mb) | \($m.rss_kb.end | mb) | \($m.rss_kb.peak | mb) |",
  "",
  (if ($streams | map(select(.kind == "ttft")) | length) > 0 then
    "## Time to first token (one stream, \($m.ttft_requests) sequential requests)",
    "",
    "First `delta` chunk (OpenAI) or first `message.delta` event (Parley SSE), from sending the request. Added: minus the upstream alone.",
    "",
    "| path | completed | errors | TTFT p50 ms | TTFT p99 ms | TTFT max ms | added p50 ms | added p99 ms | total p50 ms | total p99 ms |",
    "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ($streams[] | select(.kind == "ttft") | .result as $r
     | (if .target == "upstream" or $ttft_base == null or $r.ttft_ms == null then null else ($r.ttft_ms.p50 - $ttft_base.p50) end) as $a50
     | (if .target == "upstream" or $ttft_base == null or $r.ttft_ms == null then null else ($r.ttft_ms.p99 - $ttft_base.p99) end) as $a99
     | "| \($r.label) | \($r.completed)/\($r.requests) | \($r.errors | errors_text) | \($r.ttft_ms.p50 | num(2)) | \($r.ttft_ms.p99 | num(2)) | \($r.ttft_ms.max | num(2)) | \($a50 | signed(2)) | \($a99 | signed(2)) | \($r.total_ms.p50 | num(2)) | \($r.total_ms.p99 | num(2)) |"),
    ""
  else empty end),
  (if ($streams | map(select(.kind == "concurrent")) | length) > 0 then
    "## Concurrent streams (\($m.streams), started over \($m.ramp) s; upstream at \($m.slow_tps) tokens/s, 20 tokens a reply)",
    "",
    "Most open at once: streams with response headers received and not yet finished, as the client saw them. Parley RSS: peak sampled every 200 ms during the run.",
    "",
    "| path | completed | errors | most open at once | TTFT p50 ms | TTFT p99 ms | TTFT max ms | total p50 s | total p99 s | mean gap between tokens ms | Parley RSS peak MB |",
    "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ($streams[] | select(.kind == "concurrent") | .result as $r
     | "| \($r.label) | \($r.completed)/\($r.requests) | \($r.errors | errors_text) | \($r.max_open_streams) | \($r.ttft_ms.p50 | num(1)) | \($r.ttft_ms.p99 | num(1)) | \($r.ttft_ms.max | num(1)) | \(if $r.total_ms == null then null else $r.total_ms.p50 / 1000 end | num(2)) | \(if $r.total_ms == null then null else $r.total_ms.p99 / 1000 end | num(2)) | \($r.mean_gap_ms | num(1)) | \(if .target == "upstream" then "-" else (.parley_rss_peak_kb | mb) end) |"),
    ""
  else empty end)
