//! `parley-streams`: the measurements of `loadtests/bench.sh` that wrk cannot make. It opens streaming
//! requests (OpenAI `stream: true` chunks, or Parley's server-sent events of a conversation message),
//! sequentially or many at once with a ramp-up, and reports time to first token, total time, the gap
//! between tokens, the most streams open at once and every error by kind, as one JSON line.
//!
//! It also has two chores of the script: creating conversations through the REST API (their ids, one a
//! line) and deleting the JetStream streams a benchmark left under its NATS prefix.

// The reports are lines on stdout that bench.sh reads: printing is what this binary is for.
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use parley_platform::sse::{Event, events};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(name = "parley-streams", about = "Streaming load tests for Parley: time to first token, concurrent streams")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open streaming requests and report time to first token, total time and errors as one JSON line.
    Run(RunArgs),
    /// Create conversations through the REST API and print their ids, one a line.
    Conversations(ConversationArgs),
    /// Delete the JetStream streams of one NATS prefix (what a benchmark run leaves behind).
    NatsCleanup(NatsCleanupArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// POST <url> (a /v1/chat/completions) with `stream: true`: the gateway's or the upstream's.
    Openai,
    /// POST <url>/v1/conversations/{id}/messages with `Accept: text/event-stream`.
    Conversation,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Name of this measurement in the report.
    #[arg(long)]
    label: String,
    #[arg(long, value_enum)]
    mode: Mode,
    /// openai: the whole URL (http://127.0.0.1:8080/v1/chat/completions); conversation: the API base
    /// (http://127.0.0.1:8080).
    #[arg(long)]
    url: String,
    /// Bearer credential (a `pk_...` API key); none for the upstream.
    #[arg(long, env = "PARLEY_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Model named in OpenAI requests.
    #[arg(long, default_value = "bench")]
    model: String,
    #[arg(long, default_value = "Hello, Parley!")]
    prompt: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Requests in all; by default one per stream.
    #[arg(long)]
    requests: Option<usize>,
    /// The streams start evenly spread over this many seconds.
    #[arg(long, default_value_t = 0.0)]
    ramp_secs: f64,
    /// Longest one request may take, from sending it to its final event.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// conversation mode: a file with one conversation id a line. Stream `w` sends its `j`-th message to
    /// id `(w + j * streams) % ids`, so with at least as many ids as streams no two streams share one.
    #[arg(long)]
    conversations_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ConversationArgs {
    /// The API base, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    #[arg(long, env = "PARLEY_KEY", hide_env_values = true)]
    key: String,
    #[arg(long)]
    count: usize,
    /// The conversations' model; the deployment's default when unset.
    #[arg(long)]
    model: Option<String>,
    /// Creations in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

#[derive(Debug, clap::Args)]
struct NatsCleanupArgs {
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// The deployment's NATS prefix (`nats.prefix`).
    #[arg(long)]
    prefix: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => run(args).await,
        Command::Conversations(args) => conversations(args).await,
        Command::NatsCleanup(args) => nats_cleanup(args).await,
    }
}

/// What every stream of one run shares.
struct Shared {
    client: reqwest::Client,
    args: RunArgs,
    conversations: Vec<String>,
    total: usize,
    next_ticket: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// When the run began: each stream starts at its own offset from it.
    ramp_start: tokio::time::Instant,
}

/// One request's result.
struct Outcome {
    error: Option<Failure>,
    first_token: Option<Duration>,
    total: Duration,
    tokens: usize,
    gap_total: Duration,
    gaps: usize,
}

struct Failure {
    kind: String,
    detail: String,
}

impl Failure {
    fn new(kind: impl Into<String>, detail: impl ToString) -> Self {
        let detail: String = detail.to_string().chars().take(300).collect();
        Self { kind: kind.into(), detail }
    }
}

/// Counts a stream as open while it lives.
struct OpenStream<'a>(&'a Shared);

impl<'a> OpenStream<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.streams >= 1, "--streams must be at least 1");
    let conversations = match (args.mode, &args.conversations_file) {
        (Mode::Conversation, Some(path)) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let ids: Vec<String> = text.lines().map(str::trim).filter(|id| !id.is_empty()).map(str::to_owned).collect();
            anyhow::ensure!(!ids.is_empty(), "{} holds no conversation ids", path.display());
            if ids.len() < args.streams {
                eprintln!(
                    "warning: {} conversations for {} streams: some streams share a conversation (sends into one \
                     conversation are serialised)",
                    ids.len(),
                    args.streams
                );
            }
            ids
        }
        (Mode::Conversation, None) => bail!("--conversations-file is required in conversation mode"),
        (Mode::Openai, _) => Vec::new(),
    };
    warn_about_file_limit(args.streams);
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .context("cannot build the HTTP client")?;
    let total = args.requests.unwrap_or(args.streams);
    let shared = Arc::new(Shared {
        client,
        conversations,
        total,
        next_ticket: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
        ramp_start: tokio::time::Instant::now(),
        args,
    });
    let started = Instant::now();
    let mut workers = Vec::with_capacity(shared.args.streams);
    for index in 0..shared.args.streams {
        workers.push(tokio::spawn(worker(shared.clone(), index)));
    }
    let mut outcomes = Vec::with_capacity(total);
    for handle in workers {
        outcomes.extend(handle.await.context("a stream task failed")?);
    }
    let wall = started.elapsed();
    println!("{}", report(&shared, &outcomes, wall));
    Ok(())
}

/// Stream `index`: starts at its place in the ramp (streams start evenly spread over `ramp_secs` from
/// the run's start), then sends requests one after another while tickets last (`total` in all).
async fn worker(shared: Arc<Shared>, index: usize) -> Vec<Outcome> {
    let args = &shared.args;
    if args.ramp_secs > 0.0 && args.streams > 1 {
        let offset = Duration::from_secs_f64(args.ramp_secs * index as f64 / args.streams as f64);
        tokio::time::sleep_until(shared.ramp_start + offset).await;
    }
    let mut outcomes = Vec::new();
    for round in 0..shared.total {
        if shared.next_ticket.fetch_add(1, Ordering::SeqCst) >= shared.total {
            break;
        }
        outcomes.push(one_request(&shared, index, round).await);
    }
    outcomes
}

async fn one_request(shared: &Shared, stream: usize, round: usize) -> Outcome {
    let args = &shared.args;
    let request = match args.mode {
        Mode::Openai => {
            let body = json!({
                "model": args.model,
                "messages": [{"role": "user", "content": args.prompt}],
                "stream": true,
                "stream_options": {"include_usage": true},
            });
            shared.client.post(&args.url).json(&body)
        }
        Mode::Conversation => {
            let ids = &shared.conversations;
            let id = &ids[(stream + round * args.streams) % ids.len()];
            let url = format!("{}/v1/conversations/{id}/messages", args.url.trim_end_matches('/'));
            shared.client.post(url).header("accept", "text/event-stream").json(&json!({"content": args.prompt}))
        }
    };
    let request = match &args.key {
        Some(key) => request.bearer_auth(key),
        None => request,
    };
    let started = Instant::now();
    let mut progress = Progress::default();
    let work = follow(shared, request, started, &mut progress);
    let error = match tokio::time::timeout(Duration::from_secs(args.timeout_secs), work).await {
        Ok(Ok(())) => None,
        Ok(Err(failure)) => Some(failure),
        Err(_) => Some(Failure::new("timeout", format!("no final event within {} s", args.timeout_secs))),
    };
    Outcome {
        error,
        first_token: progress.first_token,
        total: started.elapsed(),
        tokens: progress.tokens,
        gap_total: progress.gap_total,
        gaps: progress.tokens.saturating_sub(1),
    }
}

#[derive(Default)]
struct Progress {
    first_token: Option<Duration>,
    last_token: Option<Instant>,
    tokens: usize,
    gap_total: Duration,
}

impl Progress {
    fn token(&mut self, started: Instant) {
        let now = Instant::now();
        if self.first_token.is_none() {
            self.first_token = Some(now - started);
        }
        if let Some(last) = self.last_token {
            self.gap_total += now - last;
        }
        self.last_token = Some(now);
        self.tokens += 1;
    }
}

/// What one server-sent event means for the measurement.
enum Meaning {
    Token,
    Done,
    Failed(String),
    Other,
}

async fn follow(
    shared: &Shared,
    request: reqwest::RequestBuilder,
    started: Instant,
    progress: &mut Progress,
) -> Result<(), Failure> {
    let response = request.send().await.map_err(|error| Failure::new(send_error_kind(&error), error))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(Failure::new(format!("http_{}", status.as_u16()), body));
    }
    let _open = OpenStream::enter(shared);
    #[allow(clippy::disallowed_methods, reason = "the body is read through sse::events")]
    let mut events = std::pin::pin!(events(response.bytes_stream()));
    while let Some(event) = events.next().await {
        let event = event.map_err(|error| Failure::new("body_error", error))?;
        match meaning(shared.args.mode, &event) {
            Meaning::Token => progress.token(started),
            Meaning::Done => return Ok(()),
            Meaning::Failed(detail) => return Err(Failure::new("stream_error", detail)),
            Meaning::Other => {}
        }
    }
    Err(Failure::new("incomplete", "the stream ended before its final event"))
}

fn send_error_kind(error: &reqwest::Error) -> &'static str {
    if error.is_connect() {
        "connect"
    } else if error.is_timeout() {
        "timeout"
    } else {
        "send"
    }
}

fn meaning(mode: Mode, event: &Event) -> Meaning {
    match mode {
        Mode::Openai => {
            if event.data.trim() == "[DONE]" {
                return Meaning::Done;
            }
            let Ok(chunk) = serde_json::from_str::<Value>(&event.data) else {
                return Meaning::Other;
            };
            if let Some(error) = chunk.get("error") {
                return Meaning::Failed(error.to_string());
            }
            let content = chunk.pointer("/choices/0/delta/content").and_then(Value::as_str);
            if content.is_some_and(|text| !text.is_empty()) { Meaning::Token } else { Meaning::Other }
        }
        Mode::Conversation => match event.event.as_deref().unwrap_or("message") {
            "message.delta" => Meaning::Token,
            "message.completed" => Meaning::Done,
            "message.failed" => Meaning::Failed(event.data.clone()),
            _ => Meaning::Other,
        },
    }
}

fn report(shared: &Shared, outcomes: &[Outcome], wall: Duration) -> Value {
    let completed: Vec<&Outcome> = outcomes.iter().filter(|outcome| outcome.error.is_none()).collect();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut samples: BTreeMap<String, String> = BTreeMap::new();
    for failure in outcomes.iter().filter_map(|outcome| outcome.error.as_ref()) {
        *errors.entry(failure.kind.clone()).or_default() += 1;
        samples.entry(failure.kind.clone()).or_insert_with(|| failure.detail.clone());
    }
    let millis = |duration: Duration| duration.as_secs_f64() * 1000.0;
    let first_tokens: Vec<f64> = completed.iter().filter_map(|outcome| outcome.first_token).map(millis).collect();
    let totals: Vec<f64> = completed.iter().map(|outcome| millis(outcome.total)).collect();
    let gaps: usize = completed.iter().map(|outcome| outcome.gaps).sum();
    let gap_total: Duration = completed.iter().map(|outcome| outcome.gap_total).sum();
    let tokens: usize = completed.iter().map(|outcome| outcome.tokens).sum();
    let mean_gap = if gaps > 0 { Some(round(millis(gap_total) / gaps as f64)) } else { None };
    json!({
        "label": shared.args.label,
        "mode": match shared.args.mode { Mode::Openai => "openai", Mode::Conversation => "conversation" },
        "streams": shared.args.streams,
        "ramp_secs": shared.args.ramp_secs,
        "requests": outcomes.len(),
        "completed": completed.len(),
        "failed": outcomes.len() - completed.len(),
        "errors": errors,
        "error_samples": samples,
        "ttft_ms": summary(first_tokens),
        "total_ms": summary(totals),
        "mean_gap_ms": mean_gap,
        "tokens_per_stream": if completed.is_empty() { 0.0 } else { round(tokens as f64 / completed.len() as f64) },
        "max_open_streams": shared.max_in_flight.load(Ordering::SeqCst),
        "wall_s": round(wall.as_secs_f64()),
        "completed_per_s": round(completed.len() as f64 / wall.as_secs_f64().max(1e-9)),
    })
}

/// p50, p90, p99, max and mean of some milliseconds (nearest rank), rounded to microseconds.
fn summary(mut values: Vec<f64>) -> Value {
    if values.is_empty() {
        return Value::Null;
    }
    values.sort_by(f64::total_cmp);
    let rank = |fraction: f64| {
        let index = ((fraction * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1;
        round(values[index])
    };
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    json!({
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": round(values[values.len() - 1]),
        "mean": round(mean),
        "count": values.len(),
    })
}

fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// Every stream needs a socket; warns when this process may not open that many.
fn warn_about_file_limit(streams: usize) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|value| value.parse::<usize>().ok());
    if let Some(soft) = soft
        && soft < streams + 64
    {
        eprintln!("warning: this process may open {soft} files, fewer than {streams} streams need (ulimit -n)");
    }
}

async fn conversations(args: ConversationArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let url = format!("{}/v1/conversations", args.url.trim_end_matches('/'));
    let creations = futures::stream::iter(0..args.count)
        .map(|index| {
            let mut body = json!({"title": format!("load test {index}")});
            if let Some(model) = &args.model {
                body["model"] = json!(model);
            }
            let request = client.post(&url).bearer_auth(&args.key).json(&body);
            async move {
                let response = request.send().await.context("POST /v1/conversations failed")?;
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                anyhow::ensure!(status.is_success(), "POST /v1/conversations answered {status}: {text}");
                let created: Value = serde_json::from_str(&text).context("the created conversation is not JSON")?;
                let id = created.get("id").and_then(Value::as_str).context("the created conversation has no id")?;
                Ok(id.to_owned())
            }
        })
        .buffer_unordered(args.concurrency.max(1));
    let ids: Vec<String> = creations.collect::<Vec<_>>().await.into_iter().collect::<anyhow::Result<_>>()?;
    println!("{}", ids.join("\n"));
    Ok(())
}

async fn nats_cleanup(args: NatsCleanupArgs) -> anyhow::Result<()> {
    let connect = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(5)).connect(&args.url);
    let client = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .context("NATS did not answer in time")?
        .with_context(|| format!("cannot connect to {}", args.url))?;
    let jetstream = async_nats::jetstream::new(client);
    // The names Parley derives from its prefix (parley_platform::nats::Names::all_streams).
    let stem = args.prefix.to_ascii_uppercase().replace('-', "_");
    let mut deleted = Vec::new();
    for suffix in ["JOBS", "USAGE", "EVENTS", "JOBS_DEAD", "ALERTS"] {
        let name = format!("{stem}_{suffix}");
        let delete = jetstream.delete_stream(&name);
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(10), delete).await {
            deleted.push(name);
        }
    }
    println!("deleted streams: {}", if deleted.is_empty() { "none".to_owned() } else { deleted.join(", ") });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(data: &str) -> Event {
        Event { data: data.to_owned(), ..Event::default() }
    }

    #[test]
    fn events_mean_tokens_ends_and_failures() {
        let delta = Event { event: Some("message.delta".to_owned()), ..data(r#"{"text":"hi"}"#) };
        assert!(matches!(meaning(Mode::Conversation, &delta), Meaning::Token));
        assert!(matches!(meaning(Mode::Openai, &data("[DONE]")), Meaning::Done));
    }

    #[test]
    fn openai_chunks_with_text_are_tokens() {
        assert!(matches!(meaning(Mode::Openai, &data(r#"{"choices":[{"delta":{"content":"a"}}]}"#)), Meaning::Token));
        assert!(matches!(meaning(Mode::Openai, &data(r#"{"choices":[],"usage":{}}"#)), Meaning::Other));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let summary = summary(values);
        assert_eq!(summary["p50"], 50.0);
        assert_eq!(summary["p99"], 99.0);
        assert_eq!(summary["max"], 100.0);
    }
}
