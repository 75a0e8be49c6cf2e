//! A fake LLM that speaks the OpenAI Chat Completions wire format (`POST /v1/chat/completions`,
//! streaming and not, and `GET /v1/models`). Its answer is derived from the prompt, so tests can assert
//! on it, and knobs set its time to first token, tokens per second, error rate and 429 rate.
//!
//! It is the default provider of `parley dev` (Parley runs offline with no key) and the upstream of the
//! tests and load tests. It must never be configured as a production provider.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use parley_platform::config::FakeLlmConfig;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The model names the fake serves; any other name is answered too (it is a fake), under that name.
pub const MODELS: &[&str] = &["fake-echo", "fake-small"];

/// How the fake behaves. Rates are fractions of requests in 0..=1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Knobs {
    pub time_to_first_token: Duration,
    pub tokens_per_second: f64,
    pub error_rate: f64,
    pub rate_limit_rate: f64,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            time_to_first_token: Duration::from_millis(50),
            tokens_per_second: 200.0,
            error_rate: 0.0,
            rate_limit_rate: 0.0,
        }
    }
}

impl From<&FakeLlmConfig> for Knobs {
    fn from(config: &FakeLlmConfig) -> Self {
        Self {
            time_to_first_token: Duration::from_millis(config.time_to_first_token_ms),
            tokens_per_second: config.tokens_per_second,
            error_rate: config.error_rate,
            rate_limit_rate: config.rate_limit_rate,
        }
    }
}

struct Shared {
    knobs: Mutex<Knobs>,
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
        Self {
            shared: Arc::new(Shared {
                knobs: Mutex::new(knobs),
                requests: AtomicU64::new(0),
                random_state: AtomicU64::new(seed),
            }),
        }
    }

    pub fn from_config(config: &FakeLlmConfig) -> Self {
        Self::new(Knobs::from(config))
    }

    /// Chat completion requests received so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    pub fn knobs(&self) -> Knobs {
        *self
            .shared
            .knobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn set_knobs(&self, knobs: Knobs) {
        *self
            .shared
            .knobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = knobs;
    }

    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route("/v1/models", get(list_models))
            .route("/v1/chat/completions", post(chat_completions))
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
    axum::serve(listener, fake.router())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
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
    let data: Vec<Value> = MODELS
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "parley-fake"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        // The array form: [{"type": "text", "text": "..."}].
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part.get("text")?.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The reply: it quotes the last user message, so a caller can tell which prompt it answers.
pub fn reply_for(last_user_message: &str) -> String {
    let quoted: String = last_user_message.chars().take(500).collect();
    format!("You said: {quoted}. This is Parley's fake model, answering offline.")
}

/// Splits a reply into tokens the way a model streams them: words with their leading space.
pub fn tokens_of(reply: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    for (index, word) in reply.split(' ').enumerate() {
        tokens.push(if index == 0 {
            word.to_owned()
        } else {
            format!(" {word}")
        });
    }
    tokens
}

/// Rough token count of a prompt (about four characters a token), as providers report usage.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

fn openai_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "code": kind}})),
    )
        .into_response()
}

async fn chat_completions(State(fake): State<FakeLlm>, body: Bytes) -> Response {
    fake.shared.requests.fetch_add(1, Ordering::SeqCst);
    let request: ChatRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            return openai_error(StatusCode::BAD_REQUEST, "invalid_request_error", &error.to_string());
        }
    };
    if request.messages.is_empty() {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "messages must not be empty",
        );
    }
    let knobs = fake.knobs();
    if fake.draw() < knobs.rate_limit_rate {
        let mut response = openai_error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", "fake rate limit");
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    }
    if fake.draw() < knobs.error_rate {
        return openai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "fake upstream failure",
        );
    }
    let last_user = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| text_of(&m.content));
    let prompt_tokens: u64 = request
        .messages
        .iter()
        .map(|m| estimate_tokens(&text_of(&m.content)))
        .sum();
    let mut tokens = tokens_of(&reply_for(last_user.as_deref().unwrap_or("")));
    let max_tokens = request.max_completion_tokens.or(request.max_tokens).unwrap_or(u32::MAX) as usize;
    let finish_reason = if tokens.len() > max_tokens {
        tokens.truncate(max_tokens);
        "length"
    } else {
        "stop"
    };
    let completion = Completion {
        id: format!("chatcmpl-fake-{}", uuid::Uuid::now_v7().simple()),
        created: time::OffsetDateTime::now_utc().unix_timestamp(),
        model: request.model,
        tokens,
        prompt_tokens,
        finish_reason,
        knobs,
    };
    if request.stream {
        let include_usage = request.stream_options.is_some_and(|options| options.include_usage);
        stream_completion(completion, include_usage)
    } else {
        tokio::time::sleep(completion.knobs.time_to_first_token + completion.generation_time()).await;
        Json(completion.whole()).into_response()
    }
}

struct Completion {
    id: String,
    created: i64,
    model: String,
    tokens: Vec<String>,
    prompt_tokens: u64,
    finish_reason: &'static str,
    knobs: Knobs,
}

impl Completion {
    fn token_interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.knobs.tokens_per_second.max(0.001))
    }

    fn generation_time(&self) -> Duration {
        self.token_interval() * self.tokens.len().saturating_sub(1) as u32
    }

    fn usage(&self) -> Value {
        let completion_tokens = self.tokens.len() as u64;
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    fn whole(&self) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": self.tokens.concat()},
                "finish_reason": self.finish_reason,
            }],
            "usage": self.usage(),
        })
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        })
    }
}

/// What the stream sends next.
enum Step {
    Token(usize),
    Usage,
    Done,
    End,
}

fn stream_completion(completion: Completion, include_usage: bool) -> Response {
    let completion = Arc::new(completion);
    let events = futures::stream::unfold(Step::Token(0), move |step| {
        let completion = completion.clone();
        async move {
            let (event, next) = match step {
                Step::Token(index) if index < completion.tokens.len() => {
                    let wait = if index == 0 {
                        completion.knobs.time_to_first_token
                    } else {
                        completion.token_interval()
                    };
                    tokio::time::sleep(wait).await;
                    let delta = if index == 0 {
                        json!({"role": "assistant", "content": completion.tokens[index]})
                    } else {
                        json!({"content": completion.tokens[index]})
                    };
                    (sse(&completion.chunk(delta, None)), Step::Token(index + 1))
                }
                Step::Token(_) => {
                    let next = if include_usage { Step::Usage } else { Step::Done };
                    (sse(&completion.chunk(json!({}), Some(completion.finish_reason))), next)
                }
                Step::Usage => {
                    let chunk = json!({
                        "id": completion.id,
                        "object": "chat.completion.chunk",
                        "created": completion.created,
                        "model": completion.model,
                        "choices": [],
                        "usage": completion.usage(),
                    });
                    (sse(&chunk), Step::Done)
                }
                Step::Done => (Bytes::from_static(b"data: [DONE]\n\n"), Step::End),
                Step::End => return None,
            };
            Some((Ok::<_, Infallible>(event), next))
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(events))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
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
