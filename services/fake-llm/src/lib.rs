//! A fake LLM that speaks two wire formats: the OpenAI Chat Completions API (`POST /v1/chat/completions`,
//! streaming and not, `POST /v1/embeddings` and `GET /v1/models`) and Anthropic's Messages API
//! (`POST /v1/messages`, streaming and not). Its answer is derived from the prompt, so tests can assert on it, and knobs set
//! its time to first token, tokens per second, error rate, 429 rate, a required API key, and a stream
//! that breaks off mid-reply.
//!
//! It is the default provider of `parley dev` (Parley runs offline with no key) and the upstream of the
//! tests and load tests. It must never be configured as a production provider.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures::StreamExt;
use parley_platform::config::FakeLlmConfig;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The model names the fake lists; any other name is answered too (it is a fake), under that name.
pub const MODELS: &[&str] = &["fake-echo", "fake-small", "fake-embed"];

/// How the fake behaves. Rates are fractions of requests in 0..=1.
#[derive(Debug, Clone, PartialEq)]
pub struct Knobs {
    pub time_to_first_token: Duration,
    pub tokens_per_second: f64,
    pub error_rate: f64,
    pub rate_limit_rate: f64,
    /// The `Retry-After` of its 429 answers, in seconds.
    pub retry_after_secs: u64,
    /// Streams break off (the connection drops) after this many tokens.
    pub fail_after_tokens: Option<usize>,
    /// When set, requests without this key (bearer or `x-api-key`) are answered 401.
    pub required_api_key: Option<String>,
    /// Streams end their lines with CR LF instead of LF, as some providers and proxies do.
    pub crlf: bool,
    /// A stream's last event is not followed by a blank line.
    pub unterminated_end: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Self::from(&FakeLlmConfig::default())
    }
}

impl From<&FakeLlmConfig> for Knobs {
    fn from(config: &FakeLlmConfig) -> Self {
        Self {
            time_to_first_token: Duration::from_millis(config.time_to_first_token_ms),
            tokens_per_second: config.tokens_per_second,
            error_rate: config.error_rate,
            rate_limit_rate: config.rate_limit_rate,
            retry_after_secs: 1,
            fail_after_tokens: None,
            required_api_key: None,
            crlf: false,
            unterminated_end: false,
        }
    }
}

/// The tokens the fake would bill, as a provider counts them: the prompt and the reply of every reply
/// it sent whole (what its `usage` said), and of a stream it broke off, the prompt and the tokens sent
/// before the break. Requests it refused (429, 500, 401) bill nothing.
#[derive(Default)]
struct Tally {
    input: AtomicU64,
    output: AtomicU64,
}

impl Tally {
    fn bill(&self, input: u64, output: u64) {
        self.input.fetch_add(input, Ordering::SeqCst);
        self.output.fetch_add(output, Ordering::SeqCst);
    }
}

struct Shared {
    knobs: Mutex<Knobs>,
    tally: Arc<Tally>,
    /// The body of the last completion request, as it came (read only by tests, so not parsed here).
    last_body: Mutex<Option<Bytes>>,
    requests: AtomicU64,
    random_state: AtomicU64,
}

/// A handle on one fake: its router, its knobs and its request count.
#[derive(Clone)]
pub struct FakeLlm {
    shared: Arc<Shared>,
}

impl FakeLlm {
    pub fn new(knobs: Knobs) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9E37_79B9_7F4A_7C15, |elapsed| elapsed.as_nanos() as u64)
            | 1;
        let shared = Shared {
            knobs: Mutex::new(knobs),
            last_body: Mutex::new(None),
            requests: AtomicU64::new(0),
            random_state: AtomicU64::new(seed),
            tally: Arc::default(),
        };
        Self { shared: Arc::new(shared) }
    }

    pub fn from_config(config: &FakeLlmConfig) -> Self {
        Self::new(Knobs::from(config))
    }

    /// Completion requests received so far (either wire format).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// The input and output tokens this fake would bill so far (see [`Tally`]): what a reconciliation
    /// compares Parley's ledger with.
    pub fn billed(&self) -> (u64, u64) {
        let tally = &self.shared.tally;
        (tally.input.load(Ordering::SeqCst), tally.output.load(Ordering::SeqCst))
    }

    /// The `temperature` of the last completion request (`None` when it had none).
    pub fn last_temperature(&self) -> Option<f64> {
        self.last_body()?.get("temperature")?.as_f64()
    }

    /// The body of the last completion request (either wire format), as it came: what a caller sent.
    pub fn last_body(&self) -> Option<Value> {
        let body = self.shared.last_body.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()?;
        serde_json::from_slice(&body).ok()
    }

    pub fn knobs(&self) -> Knobs {
        self.shared.knobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    pub fn set_knobs(&self, knobs: Knobs) {
        *self.shared.knobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = knobs;
    }

    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route("/v1/models", get(list_models))
            .route("/v1/chat/completions", post(openai_completions))
            .route("/v1/messages", post(anthropic_messages))
            .route("/v1/embeddings", post(embeddings))
            .with_state(self.clone())
    }

    /// A uniform draw in [0, 1) from a xorshift generator: enough for error rates, with no dependency.
    fn draw(&self) -> f64 {
        let mut x = self.shared.random_state.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.shared.random_state.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Serves `fake` on `listener` until `shutdown` is cancelled.
pub async fn serve(fake: FakeLlm, listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
    parley_platform::net::serve_http(listener, fake.router(), shutdown.cancelled_owned()).await
}

/// The reply: it quotes the last user message, so a caller can tell which prompt it answers.
pub fn reply_for(last_user_message: &str) -> String {
    let quoted: String = last_user_message.chars().take(500).collect();
    format!("You said: {quoted}. This is Parley's fake model, answering offline.")
}

/// The reply to a message with `images` images besides its text: the text's reply, then a count of
/// them, so a caller can tell the images arrived.
pub fn reply_with_images(last_user_message: &str, images: usize) -> String {
    let reply = reply_for(last_user_message);
    match images {
        0 => reply,
        1 => format!("{reply} I see 1 image."),
        n => format!("{reply} I see {n} images."),
    }
}

/// Splits a reply into tokens the way a model streams them: words with their leading space.
pub fn tokens_of(reply: &str) -> Vec<String> {
    reply
        .split(' ')
        .enumerate()
        .map(|(index, word)| if index == 0 { word.to_owned() } else { format!(" {word}") })
        .collect()
}

/// A prompt's tokens as the fake reports them: Parley's own estimate, at least one, as providers count.
pub fn estimate_tokens(text: &str) -> u64 {
    u64::from(parley_platform::tokens::estimate(text)).max(1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    OpenAi,
    Anthropic,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    #[serde(default)]
    messages: Vec<ChatMessage>,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    /// OpenAI's stop sequences: one, or a list.
    #[serde(default)]
    stop: Option<Value>,
    /// Anthropic's stop sequences.
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    tools: Vec<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<u32>,
}

impl ChatRequest {
    fn stop_sequences(&self) -> Vec<String> {
        match (&self.stop, &self.stop_sequences) {
            (Some(Value::String(one)), _) => vec![one.clone()],
            (Some(Value::Array(many)), _) => many.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
            (_, Some(sequences)) => sequences.clone(),
            _ => Vec::new(),
        }
    }

    /// The tool the model calls, if it calls one: when tools are offered, the choice allows it, and the
    /// last message is not a tool's result. The named one, else the first. (Either wire format.)
    fn tool_to_call(&self, answering_a_tool: bool) -> Option<String> {
        if self.tools.is_empty() || answering_a_tool {
            return None;
        }
        let choice = self.tool_choice.as_ref();
        if choice.is_some_and(|choice| choice == "none" || choice.get("type").is_some_and(|kind| kind == "none")) {
            return None;
        }
        let named = choice.and_then(|choice| choice.pointer("/function/name").or_else(|| choice.get("name")));
        let first = self.tools[0].pointer("/function/name").or_else(|| self.tools[0].get("name"));
        named.or(first).and_then(Value::as_str).map(str::to_owned)
    }

    /// The result of a tool call, when the last message carries one: an OpenAI `tool` message, or an
    /// Anthropic user message with a `tool_result` block.
    fn tool_result(&self) -> Option<String> {
        let last = self.messages.last()?;
        if last.role == "tool" {
            return Some(text_of(&last.content));
        }
        let blocks = last.content.as_array()?;
        let result = blocks.iter().find(|block| block.get("type").is_some_and(|kind| kind == "tool_result"))?;
        Some(text_of(result.get("content").unwrap_or(&Value::Null)))
    }

    /// JSON mode (`json_object` or `json_schema`): the reply is a JSON object.
    fn wants_json(&self) -> bool {
        let kind = self.response_format.as_ref().and_then(|format| format.get("type")).and_then(Value::as_str);
        matches!(kind, Some("json_object" | "json_schema"))
    }
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Value,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

async fn list_models() -> Json<Value> {
    let data: Vec<Value> =
        MODELS.iter().map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "parley-fake"})).collect();
    Json(json!({"object": "list", "data": data}))
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        // The array form: [{"type": "text", "text": "..."}].
        Value::Array(parts) => parts.iter().filter_map(|part| part.get("text")?.as_str()).collect::<Vec<_>>().join(" "),
        _ => String::new(),
    }
}

fn wire_error(wire: Wire, status: StatusCode, kind: &str, message: &str) -> Response {
    let body = match wire {
        Wire::OpenAi => json!({"error": {"message": message, "type": kind, "code": kind}}),
        Wire::Anthropic => json!({"type": "error", "error": {"type": kind, "message": message}}),
    };
    (status, Json(body)).into_response()
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    bearer.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
}

async fn openai_completions(State(fake): State<FakeLlm>, headers: HeaderMap, body: Bytes) -> Response {
    complete(fake, Wire::OpenAi, &headers, body).await
}

async fn anthropic_messages(State(fake): State<FakeLlm>, headers: HeaderMap, body: Bytes) -> Response {
    complete(fake, Wire::Anthropic, &headers, body).await
}

/// The failure the knobs call for, if any: a wrong key, a rate limit, a server error.
fn knob_failure(fake: &FakeLlm, knobs: &Knobs, wire: Wire, headers: &HeaderMap) -> Option<Response> {
    if let Some(required) = &knobs.required_api_key
        && presented_key(headers) != Some(required.as_str())
    {
        return Some(wire_error(wire, StatusCode::UNAUTHORIZED, "authentication_error", "invalid API key"));
    }
    if fake.draw() < knobs.rate_limit_rate {
        let mut response = wire_error(wire, StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "fake rate limit");
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(knobs.retry_after_secs));
        return Some(response);
    }
    if fake.draw() < knobs.error_rate {
        return Some(wire_error(wire, StatusCode::INTERNAL_SERVER_ERROR, "api_error", "fake upstream failure"));
    }
    None
}

#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: Value,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    encoding_format: Option<String>,
}

/// The length of the fake's vectors when the caller asks for none.
pub const EMBEDDING_DIMENSIONS: usize = 8;

/// The fake's vector for `text`: `dimensions` numbers drawn from a hash of the text, scaled to unit
/// length, so one text always gets one vector and two texts (almost surely) get two.
pub fn embedding_for(text: &str, dimensions: usize) -> Vec<f32> {
    // FNV-1a, then xorshift for each number.
    let mut state = text
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3));
    let values: Vec<f32> = (0..dimensions)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let norm = values.iter().map(|value| value * value).sum::<f32>().sqrt().max(f32::EPSILON);
    values.into_iter().map(|value| value / norm).collect()
}

/// OpenAI's `POST /v1/embeddings`: text inputs (one, or a list), float vectors.
async fn embeddings(State(fake): State<FakeLlm>, headers: HeaderMap, body: Bytes) -> Response {
    fake.shared.requests.fetch_add(1, Ordering::SeqCst);
    let invalid = |message: &str| wire_error(Wire::OpenAi, StatusCode::BAD_REQUEST, "invalid_request_error", message);
    let request: EmbeddingsRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => return invalid(&error.to_string()),
    };
    let inputs: Vec<String> = match &request.input {
        Value::String(text) => vec![text.clone()],
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_string) => {
            items.iter().filter_map(|item| item.as_str().map(str::to_owned)).collect()
        }
        _ => return invalid("input must be a string or a non-empty list of strings"),
    };
    if request.encoding_format.as_deref().is_some_and(|format| format != "float") {
        return invalid("this fake answers encoding_format float only");
    }
    *fake.shared.last_body.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(body);
    let knobs = fake.knobs();
    if let Some(failure) = knob_failure(&fake, &knobs, Wire::OpenAi, &headers) {
        return failure;
    }
    let dimensions = request.dimensions.unwrap_or(EMBEDDING_DIMENSIONS);
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| json!({"object": "embedding", "index": index, "embedding": embedding_for(text, dimensions)}))
        .collect();
    let prompt_tokens: u64 = inputs.iter().map(|text| estimate_tokens(text)).sum();
    wait_until(tokio::time::Instant::now() + knobs.time_to_first_token).await;
    fake.shared.tally.bill(prompt_tokens, 0);
    Json(json!({
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response()
}

async fn complete(fake: FakeLlm, wire: Wire, headers: &HeaderMap, body: Bytes) -> Response {
    fake.shared.requests.fetch_add(1, Ordering::SeqCst);
    let request: ChatRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            return wire_error(wire, StatusCode::BAD_REQUEST, "invalid_request_error", &error.to_string());
        }
    };
    if request.messages.is_empty() {
        return wire_error(wire, StatusCode::BAD_REQUEST, "invalid_request_error", "messages must not be empty");
    }
    *fake.shared.last_body.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(body);
    let knobs = fake.knobs();
    if let Some(failure) = knob_failure(&fake, &knobs, wire, headers) {
        return failure;
    }
    let last_user = request.messages.iter().rev().find(|m| m.role == "user").map(|m| text_of(&m.content));
    let system_tokens = request.system.as_ref().map_or(0, |system| estimate_tokens(&text_of(system)));
    let prompt_tokens =
        system_tokens + request.messages.iter().map(|m| estimate_tokens(&text_of(&m.content))).sum::<u64>();
    let tool_result = request.tool_result();
    let tool_call = request.tool_to_call(tool_result.is_some()).map(|name| {
        let id = match wire {
            Wire::OpenAi => format!("call_{}", uuid::Uuid::now_v7().simple()),
            Wire::Anthropic => format!("toolu_{}", uuid::Uuid::now_v7().simple()),
        };
        (id, name)
    });
    // Images of the last user message: OpenAI's image_url parts, Anthropic's image blocks.
    let images = request.messages.iter().rev().find(|m| m.role == "user").and_then(|m| m.content.as_array()).map_or(
        0,
        |parts| {
            parts
                .iter()
                .filter(|part| matches!(part.get("type").and_then(Value::as_str), Some("image_url" | "image")))
                .count()
        },
    );
    let mut reply = match &tool_result {
        Some(result) => format!("The tool said: {result}"),
        None => reply_with_images(last_user.as_deref().unwrap_or(""), images),
    };
    if tool_call.is_some() {
        // A call's arguments: the user's words, as JSON.
        reply = json!({"text": last_user.as_deref().unwrap_or("")}).to_string();
    } else if request.wants_json() {
        reply = json!({"reply": reply}).to_string();
    }
    // The reply ends before the first stop sequence it contains.
    let stopped_by = request
        .stop_sequences()
        .into_iter()
        .filter(|sequence| !sequence.is_empty())
        .filter_map(|sequence| reply.find(&sequence).map(|at| (at, sequence)))
        .min_by_key(|(at, _)| *at);
    if let Some((at, _)) = &stopped_by {
        reply.truncate(*at);
    }
    let mut tokens = tokens_of(&reply);
    let max_tokens = request.max_completion_tokens.or(request.max_tokens).unwrap_or(u32::MAX) as usize;
    let truncated = tokens.len() > max_tokens;
    tokens.truncate(max_tokens);
    let completion = Completion {
        wire,
        id: format!("fake-{}", uuid::Uuid::now_v7().simple()),
        created: time::OffsetDateTime::now_utc().unix_timestamp(),
        model: request.model,
        tokens,
        prompt_tokens,
        truncated,
        stopped_by: stopped_by.map(|(_, sequence)| sequence),
        tool_call,
        logprobs: (request.logprobs == Some(true)).then(|| request.top_logprobs.unwrap_or(0)),
        knobs,
        tally: fake.shared.tally.clone(),
    };
    if request.stream {
        let include_usage = request.stream_options.is_some_and(|options| options.include_usage);
        stream_completion(completion, include_usage)
    } else {
        wait_until(tokio::time::Instant::now() + completion.knobs.time_to_first_token + completion.generation_time())
            .await;
        completion.tally.bill(completion.prompt_tokens, completion.tokens.len() as u64);
        Json(completion.whole()).into_response()
    }
}

struct Completion {
    wire: Wire,
    id: String,
    created: i64,
    model: String,
    tokens: Vec<String>,
    prompt_tokens: u64,
    truncated: bool,
    /// The stop sequence the reply ended at.
    stopped_by: Option<String>,
    /// The tool the reply calls (id, name): then `tokens` are the pieces of its arguments.
    tool_call: Option<(String, String)>,
    /// Log probabilities were asked for, with this many alternatives a position (OpenAI's wire).
    logprobs: Option<u32>,
    knobs: Knobs,
    tally: Arc<Tally>,
}

impl Completion {
    fn token_interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.knobs.tokens_per_second.max(0.001))
    }

    fn generation_time(&self) -> Duration {
        self.token_interval() * self.tokens.len().saturating_sub(1) as u32
    }

    fn finish_reason(&self) -> &'static str {
        match (self.wire, self.truncated) {
            (Wire::OpenAi, false) if self.tool_call.is_some() => "tool_calls",
            (Wire::Anthropic, false) if self.tool_call.is_some() => "tool_use",
            (Wire::OpenAi, false) => "stop",
            (Wire::OpenAi, true) => "length",
            (Wire::Anthropic, false) if self.stopped_by.is_some() => "stop_sequence",
            (Wire::Anthropic, false) => "end_turn",
            (Wire::Anthropic, true) => "max_tokens",
        }
    }

    fn whole(&self) -> Value {
        let text = self.tokens.concat();
        if let Some((id, name)) = &self.tool_call {
            let mut whole = self.whole_text("");
            match self.wire {
                Wire::OpenAi => {
                    whole["choices"][0]["message"]["content"] = Value::Null;
                    whole["choices"][0]["message"]["tool_calls"] =
                        json!([{"id": id, "type": "function", "function": {"name": name, "arguments": text}}]);
                }
                Wire::Anthropic => {
                    let input: Value = serde_json::from_str(&text).unwrap_or_else(|_| json!({}));
                    whole["content"] = json!([{"type": "tool_use", "id": id, "name": name, "input": input}]);
                }
            }
            return whole;
        }
        self.whole_text(&text)
    }

    /// OpenAI's `logprobs.content` entry of a token: every token the fake says has probability
    /// e^-0.25, and its alternatives less.
    fn logprob_entry(&self, token: &str) -> Value {
        let top = self.logprobs.unwrap_or(0);
        let alternatives: Vec<Value> = (0..top)
            .map(|rank| {
                let alternative = if rank == 0 { token.to_owned() } else { format!("{token}~{rank}") };
                json!({"token": alternative, "logprob": -0.25 - f64::from(rank), "bytes": alternative.as_bytes()})
            })
            .collect();
        json!({"token": token, "logprob": -0.25, "bytes": token.as_bytes(), "top_logprobs": alternatives})
    }

    fn whole_text(&self, text: &str) -> Value {
        let completion_tokens = self.tokens.len() as u64;
        let logprobs = self.logprobs.map_or(
            Value::Null,
            |_| json!({"content": self.tokens.iter().map(|token| self.logprob_entry(token)).collect::<Vec<_>>()}),
        );
        match self.wire {
            Wire::OpenAi => json!({
                "id": format!("chatcmpl-{}", self.id),
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs,
                    "finish_reason": self.finish_reason(),
                }],
                "usage": {
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": self.prompt_tokens + completion_tokens,
                },
            }),
            Wire::Anthropic => json!({
                "id": format!("msg_{}", self.id),
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": self.finish_reason(),
                "stop_sequence": self.stopped_by,
                "usage": {"input_tokens": self.prompt_tokens, "output_tokens": completion_tokens},
            }),
        }
    }

    /// The events before the first token.
    fn opening(&self) -> Vec<Bytes> {
        match self.wire {
            Wire::OpenAi => Vec::new(),
            Wire::Anthropic => vec![
                anthropic_event(
                    "message_start",
                    &json!({
                        "type": "message_start",
                        "message": {
                            "id": format!("msg_{}", self.id), "type": "message", "role": "assistant", "model": self.model,
                            "content": [], "stop_reason": null, "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0},
                        },
                    }),
                ),
                anthropic_event(
                    "content_block_start",
                    &json!({
                        "type": "content_block_start", "index": 0,
                        "content_block": match &self.tool_call {
                            Some((id, name)) => json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                            None => json!({"type": "text", "text": ""}),
                        },
                    }),
                ),
            ],
        }
    }

    fn token_event(&self, index: usize) -> Bytes {
        let text = &self.tokens[index];
        match (self.wire, &self.tool_call) {
            (Wire::OpenAi, Some((id, name))) => {
                let piece = if index == 0 {
                    json!({"index": 0, "id": id, "type": "function", "function": {"name": name, "arguments": text}})
                } else {
                    json!({"index": 0, "function": {"arguments": text}})
                };
                let delta = json!({"role": "assistant", "tool_calls": [piece]});
                openai_event(&self.openai_chunk(json!([{"index": 0, "delta": delta, "finish_reason": null}]), None))
            }
            (Wire::Anthropic, Some(_)) => anthropic_event(
                "content_block_delta",
                &json!({
                    "type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": text},
                }),
            ),
            (Wire::OpenAi, None) => {
                let delta =
                    if index == 0 { json!({"role": "assistant", "content": text}) } else { json!({"content": text}) };
                let mut choice = json!({"index": 0, "delta": delta, "finish_reason": null});
                if self.logprobs.is_some() {
                    choice["logprobs"] = json!({"content": [self.logprob_entry(text)]});
                }
                openai_event(&self.openai_chunk(json!([choice]), None))
            }
            (Wire::Anthropic, None) => anthropic_event(
                "content_block_delta",
                &json!({
                    "type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text},
                }),
            ),
        }
    }

    /// The events after the last token.
    fn closing(&self, include_usage: bool) -> Vec<Bytes> {
        let mut events = self.closing_events(include_usage);
        if self.knobs.unterminated_end
            && let Some(last) = events.last_mut()
        {
            *last = last.slice(..last.len() - 1);
        }
        events
    }

    fn closing_events(&self, include_usage: bool) -> Vec<Bytes> {
        let completion_tokens = self.tokens.len() as u64;
        match self.wire {
            Wire::OpenAi => {
                let finish = json!([{"index": 0, "delta": {}, "finish_reason": self.finish_reason()}]);
                let mut events = vec![openai_event(&self.openai_chunk(finish, None))];
                if include_usage {
                    let usage = json!({
                        "prompt_tokens": self.prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": self.prompt_tokens + completion_tokens,
                    });
                    events.push(openai_event(&self.openai_chunk(json!([]), Some(usage))));
                }
                events.push(Bytes::from_static(b"data: [DONE]\n\n"));
                events
            }
            Wire::Anthropic => vec![
                anthropic_event("content_block_stop", &json!({"type": "content_block_stop", "index": 0})),
                anthropic_event(
                    "message_delta",
                    &json!({
                        "type": "message_delta",
                        "delta": {"stop_reason": self.finish_reason(), "stop_sequence": self.stopped_by},
                        "usage": {"output_tokens": completion_tokens},
                    }),
                ),
                anthropic_event("message_stop", &json!({"type": "message_stop"})),
            ],
        }
    }

    fn openai_chunk(&self, choices: Value, usage: Option<Value>) -> Value {
        let mut chunk = json!({
            "id": format!("chatcmpl-{}", self.id),
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        chunk
    }
}

/// What the stream sends next.
enum Step {
    Token(usize),
    Closing(Vec<Bytes>),
    End,
}

/// How long a stream told to break off waits after its last token before dropping the connection.
const BREAK_OFF_DELAY: Duration = Duration::from_millis(20);

/// Waits until `due`, and not at all when it has passed: a timer rounds every wait up to a millisecond,
/// so a fake told to answer at once must not sleep, or it would add a millisecond per token.
async fn wait_until(due: tokio::time::Instant) {
    if due > tokio::time::Instant::now() {
        tokio::time::sleep_until(due).await;
    }
}

fn stream_completion(completion: Completion, include_usage: bool) -> Response {
    let crlf = completion.knobs.crlf;
    let completion = Arc::new(completion);
    // Each token is due at a fixed offset from the start, so the pace holds however late a poll runs.
    let started = tokio::time::Instant::now();
    let opening = futures::stream::iter(completion.opening().into_iter().map(Ok::<_, std::io::Error>));
    let body = futures::stream::unfold(Step::Token(0), move |step| {
        let completion = completion.clone();
        async move {
            match step {
                Step::Token(index) if index < completion.tokens.len() => {
                    if completion.knobs.fail_after_tokens.is_some_and(|limit| index >= limit) {
                        // An error in the body makes the server drop the connection mid-reply. It waits a
                        // moment first, so the tokens before it have reached the client, as they would
                        // have from a provider that broke off while generating.
                        completion.tally.bill(completion.prompt_tokens, index as u64);
                        tokio::time::sleep(BREAK_OFF_DELAY).await;
                        return Some((Err(std::io::Error::other("fake stream failure")), Step::End));
                    }
                    let due =
                        started + completion.knobs.time_to_first_token + completion.token_interval() * index as u32;
                    wait_until(due).await;
                    Some((Ok(completion.token_event(index)), Step::Token(index + 1)))
                }
                Step::Token(_) => {
                    completion.tally.bill(completion.prompt_tokens, completion.tokens.len() as u64);
                    let mut closing = completion.closing(include_usage);
                    let first = closing.remove(0);
                    Some((Ok(first), Step::Closing(closing)))
                }
                Step::Closing(mut rest) if !rest.is_empty() => {
                    let next = rest.remove(0);
                    Some((Ok(next), Step::Closing(rest)))
                }
                Step::Closing(_) | Step::End => None,
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(opening.chain(body).map(move |event| event.map(|bytes| line_endings(bytes, crlf)))))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// An event as sent: with CR LF line endings when the fake is told to use them.
fn line_endings(event: Bytes, crlf: bool) -> Bytes {
    if !crlf {
        return event;
    }
    let text = String::from_utf8_lossy(&event).replace('\n', "\r\n");
    Bytes::from(text)
}

fn openai_event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn anthropic_event(name: &str, value: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {value}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reply_quotes_the_prompt_and_splits_into_words() {
        let reply = reply_for("hello there");
        assert!(reply.starts_with("You said: hello there."));
        let tokens = tokens_of(&reply);
        assert_eq!(tokens.concat(), reply);
        assert_eq!(tokens[1], " said:");
    }

    #[test]
    fn draws_are_in_the_unit_interval() {
        let fake = FakeLlm::new(Knobs::default());
        for _ in 0..1000 {
            let draw = fake.draw();
            assert!((0.0..1.0).contains(&draw));
        }
    }
}
