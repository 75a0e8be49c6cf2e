//! The OpenAI-compatible API: `POST /v1/chat/completions` (whole, or streamed with `stream: true` and
//! `stream_options.include_usage`) and `GET /v1/models`, so the official OpenAI SDKs work unchanged
//! against `http://<gateway>/v1`.
//!
//! A completion is stateless: after the rate limit and the budget reservation the gateway calls an
//! agent directly (`parley.agent.v1.AgentService/Complete`), which runs the model's provider chain and
//! streams the reply back; the agent settles the tokens and reports usage once the reply is whole.
//! Nothing is stored on the way; a completion made with `store: true` is kept once it is whole
//! ([`super::stored_completions`]). Errors here use
//! OpenAI's shape, `{"error": {"message", "type", "code"}}`, instead of problem+json.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use parley_platform::sampling::{ResponseFormat, Sampling};
use parley_platform::{ErrorCode, ServiceError};
use parley_proto::agent::v1 as agent_pb;
use parley_proto::chat::v1 as pb;
use serde::Deserialize;
use serde_json::{Value, json};

use super::completion::{Collected, Prompt, collect, finish_reason};
use super::stored_completions::Keep;
use super::streaming::{heartbeat, unbuffered};
use crate::AppState;
use crate::auth::Caller;
use crate::problem::ApiError;
use crate::timing::ModelWait;

/// An error in OpenAI's wire shape.
#[derive(Debug)]
pub struct OpenAiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: String,
    /// The request parameter at fault, when one is.
    param: Option<String>,
    retry_after: Option<u64>,
}

impl OpenAiError {
    pub(super) fn new(status: StatusCode, kind: &'static str, code: &str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, code: code.to_owned(), param: None, retry_after: None }
    }

    pub(super) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request", message)
    }

    /// A 400 naming the parameter at fault.
    pub(super) fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self { param: Some(param.to_owned()), ..Self::invalid(message) }
    }

    #[cfg(test)]
    pub(super) fn param(&self) -> Option<&str> {
        self.param.as_deref()
    }
}

/// OpenAI's error type and code for one of Parley's error codes.
fn kind_and_code(code: ErrorCode) -> (&'static str, &'static str) {
    let kind = match code {
        ErrorCode::InvalidRequest
        | ErrorCode::NotFound
        | ErrorCode::Conflict
        | ErrorCode::PreconditionFailed
        | ErrorCode::PreconditionRequired
        | ErrorCode::PayloadTooLarge => "invalid_request_error",
        ErrorCode::Unauthorized => "authentication_error",
        ErrorCode::Forbidden => "permission_error",
        ErrorCode::RateLimited | ErrorCode::QuotaExceeded => "rate_limit_error",
        ErrorCode::UpstreamUnavailable | ErrorCode::Unavailable | ErrorCode::Internal => "api_error",
    };
    let code = match code {
        ErrorCode::QuotaExceeded => "insufficient_quota",
        other => other.as_str(),
    };
    (kind, code)
}

impl From<ServiceError> for OpenAiError {
    fn from(error: ServiceError) -> Self {
        let status = StatusCode::from_u16(error.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let (kind, code) = kind_and_code(error.code);
        let code = code.to_owned();
        Self { status, message: error.message, kind, code, param: error.field, retry_after: error.retry_after_secs }
    }
}

/// The body of an error of `status` (of Parley's `code`, when it has one) in OpenAI's shape.
pub fn error_body(status: StatusCode, code: Option<ErrorCode>, message: &str, param: Option<&str>) -> Value {
    let (kind, code) = code.map_or(("api_error", "error"), kind_and_code);
    let kind = if status == StatusCode::METHOD_NOT_ALLOWED { "invalid_request_error" } else { kind };
    json!({"error": {"message": message, "type": kind, "code": code, "param": param}})
}

impl From<ApiError> for OpenAiError {
    fn from(error: ApiError) -> Self {
        error.0.into()
    }
}

impl From<tonic::Status> for OpenAiError {
    fn from(status: tonic::Status) -> Self {
        ServiceError::from(status).into()
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"message": self.message, "type": self.kind, "code": self.code, "param": self.param}});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

pub type OpenAiResult<T> = Result<T, OpenAiError>;

/// 404 `model_not_found` for a model that is not configured; 400 naming `model` for one that does not
/// make what the route makes (`kind`: chat replies, embeddings).
pub fn check_model(state: &AppState, model: &str, makes: &str) -> OpenAiResult<()> {
    let Some(config) = state.config.models.get(model) else {
        let message = format!("The model `{model}` does not exist");
        return Err(OpenAiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "model_not_found", message));
    };
    let serves = match config.kind {
        parley_platform::config::ModelKind::Chat => "chat replies",
        parley_platform::config::ModelKind::Embeddings => "embeddings",
    };
    if serves != makes {
        return Err(OpenAiError::invalid_param("model", format!("model: `{model}` makes {serves}, not {makes}")));
    }
    Ok(())
}

/// The models this deployment serves, by the names clients use.
#[utoipa::path(get, path = "/v1/models", tag = "openai", security(("bearer" = [])), responses(
    (status = 200, description = "An OpenAI model list"),
    (status = 401, description = "OpenAI error shape"),
))]
pub async fn models(State(state): State<AppState>, caller: Result<Caller, ApiError>) -> OpenAiResult<Json<Value>> {
    caller?;
    let data: Vec<Value> = state
        .config
        .models
        .keys()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "parley"}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionRequest {
    model: String,
    messages: Vec<InputMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "parley_platform::json_int::optional_integer")]
    n: Option<u32>,
    /// The longest reply (OpenAI's older name).
    #[serde(default, deserialize_with = "parley_platform::json_int::optional_integer")]
    max_tokens: Option<i64>,
    /// The longest reply (OpenAI's current name; wins over `max_tokens`).
    #[serde(default, deserialize_with = "parley_platform::json_int::optional_integer")]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stop: Option<crate::views::Stop>,
    #[serde(default, deserialize_with = "parley_platform::json_int::optional_integer")]
    seed: Option<i64>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default, deserialize_with = "parley_platform::json_int::optional_integer_map")]
    logit_bias: Option<std::collections::BTreeMap<String, i32>>,
    #[serde(default)]
    user: Option<String>,
    /// OpenAI's newer name for the end user (`user` wins when both are given).
    #[serde(default)]
    safety_identifier: Option<String>,
    #[serde(default)]
    response_format: Option<ResponseFormat>,
    /// Keep the completion, to be read back with `GET /v1/chat/completions/{id}` ([`super::stored_completions`]).
    #[serde(default)]
    store: Option<bool>,
    /// Up to 16 string pairs kept with a stored completion; listings filter on them.
    #[serde(default)]
    metadata: Option<Value>,
    /// Accepted and not used: there is one service tier.
    #[serde(default)]
    #[allow(dead_code)]
    service_tier: Option<Value>,
    /// Accepted and not used: a hint for the provider's prompt cache, which Parley's requests do not
    /// carry across replicas.
    #[serde(default)]
    #[allow(dead_code)]
    prompt_cache_key: Option<Value>,
    /// Function tools the model may call, passed to the provider.
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    /// Refused when they ask for something this gateway does not do (see [`refused`]).
    #[serde(default)]
    functions: Option<Value>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default, deserialize_with = "parley_platform::json_int::optional_integer")]
    top_logprobs: Option<u32>,
    #[serde(default)]
    modalities: Option<Value>,
    #[serde(default)]
    audio: Option<Value>,
    #[serde(default)]
    prediction: Option<Value>,
    #[serde(default)]
    reasoning_effort: Option<Value>,
    #[serde(default)]
    web_search_options: Option<Value>,
    #[serde(default)]
    verbosity: Option<Value>,
}

impl CompletionRequest {
    /// The first parameter that asks for something this gateway does not do, and why; a parameter
    /// that asks for nothing (`functions: []`, `function_call: "none"`, `modalities: ["text"]`) passes.
    fn refused(&self) -> Option<(&'static str, &'static str)> {
        let given = |value: &Option<Value>| value.as_ref().is_some_and(|value| !value.is_null());
        // Given, and not an empty list.
        let listed = |value: &Option<Value>| {
            given(value) && !value.as_ref().and_then(Value::as_array).is_some_and(Vec::is_empty)
        };
        let choice = |value: &Option<Value>| {
            given(value) && !matches!(value.as_ref().and_then(Value::as_str), Some("none" | "auto"))
        };
        let text_only = self.modalities.as_ref().is_none_or(|value| value.is_null() || *value == json!(["text"]));
        [
            ("functions", listed(&self.functions), "the deprecated functions are not served; use tools"),
            (
                "function_call",
                choice(&self.function_call),
                "the deprecated function_call is not served; use tool_choice",
            ),
            ("modalities", !text_only, "only text replies are available"),
            ("audio", given(&self.audio), "audio replies are not available"),
            ("prediction", given(&self.prediction), "predicted outputs are not available"),
            ("reasoning_effort", given(&self.reasoning_effort), "reasoning effort is not available on this gateway"),
            ("web_search_options", given(&self.web_search_options), "web search is not available"),
            ("verbosity", given(&self.verbosity), "verbosity is not available on this gateway"),
        ]
        .into_iter()
        .find_map(|(param, asked, why)| asked.then_some((param, why)))
    }

    /// The sampling parameters, checked.
    fn sampling(&self) -> Result<Sampling, ServiceError> {
        let sampling = Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self.stop.clone().map(crate::views::Stop::into_list).unwrap_or_default(),
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone().unwrap_or_default(),
            user: self.user.clone().or_else(|| self.safety_identifier.clone()).filter(|user| !user.is_empty()),
            response_format: self.response_format.clone(),
            tools: self.tools.clone().unwrap_or_default(),
            tool_choice: self.tool_choice.clone().filter(|choice| !choice.is_null()),
            parallel_tool_calls: self.parallel_tool_calls,
            logprobs: self.logprobs,
            top_logprobs: self.top_logprobs,
        };
        sampling.check()?;
        Ok(sampling)
    }
}

#[derive(Debug, Deserialize)]
struct InputMessage {
    role: String,
    #[serde(default)]
    content: Value,
    /// The tools an assistant message called.
    #[serde(default)]
    tool_calls: Vec<InputToolCall>,
    /// The call a `tool` message answers.
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct InputToolCall {
    id: String,
    function: InputFunction,
}

#[derive(Debug, Deserialize)]
struct InputFunction {
    name: String,
    #[serde(default)]
    arguments: String,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The JSON body of a request to an OpenAI route: 413 past the body limit, 400 without a JSON content
/// type or for a body that does not read as `T`.
pub fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> OpenAiResult<T> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            let message = "the request body is larger than the limit";
            OpenAiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "payload_too_large", message)
        } else {
            OpenAiError::invalid(rejection.body_text())
        }
    })?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !is_json {
        return Err(OpenAiError::invalid_param("Content-Type", "Content-Type must be application/json"));
    }
    Ok(crate::problem::parse(&body)?)
}

/// An OpenAI message's content: a string, or an array of parts. Returns its text and, when it carries
/// images, its parts as they came (text and `image_url` parts; any other kind is refused), and how many
/// images.
fn content_of(index: usize, content: &Value) -> OpenAiResult<(String, Option<&Vec<Value>>, u32)> {
    let param = format!("messages[{index}].content");
    match content {
        Value::String(text) => Ok((text.clone(), None, 0)),
        Value::Null => Ok((String::new(), None, 0)),
        Value::Array(parts) => {
            let mut text = String::new();
            let mut images = 0;
            for part in parts {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => match part.get("text").and_then(Value::as_str) {
                        Some(piece) => text.push_str(piece),
                        None => {
                            return Err(OpenAiError::invalid_param(&param, format!("{param}: a text part needs text")));
                        }
                    },
                    Some("image_url") => {
                        if !is_image_url(part) {
                            let message = format!(
                                "{param}: an image_url part needs image_url.url, an http(s) URL or a data:image/...;base64, URL, \
                                 and a detail of auto, low or high if any"
                            );
                            return Err(OpenAiError::invalid_param(&param, message));
                        }
                        images += 1;
                    }
                    _ => {
                        let message = format!("{param}: only text and image_url parts are supported");
                        return Err(OpenAiError::invalid_param(&param, message));
                    }
                }
            }
            Ok((text, (images > 0).then_some(parts), images))
        }
        _ => Err(OpenAiError::invalid_param(&param, format!("{param} must be a string or an array of parts"))),
    }
}

/// An `image_url` part a provider can fetch or decode.
fn is_image_url(part: &Value) -> bool {
    let url = part.pointer("/image_url/url").and_then(Value::as_str).unwrap_or_default();
    let detail = part.pointer("/image_url/detail");
    super::completion::is_image_url(url)
        && detail.is_none_or(|detail| matches!(detail.as_str(), Some("auto" | "low" | "high")))
}

/// Create a chat completion (OpenAI wire format).
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", security(("bearer" = [])), responses(
    (status = 200, description = "A chat.completion object, or with stream=true a stream of chat.completion.chunk"),
    (status = 400, description = "OpenAI error shape"),
    (status = 404, description = "Unknown model (OpenAI error shape, code model_not_found)"),
    (status = 429, description = "Rate limit or token budget (OpenAI error shape)"),
))]
pub async fn chat_completions(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> OpenAiResult<Response> {
    let caller = caller?;
    let raw = body.as_ref().ok().cloned();
    let request: CompletionRequest = json_body(&headers, body)?;
    check_model(&state, &request.model, "chat replies")?;
    let metadata = super::stored_completions::metadata(request.metadata.as_ref())?;
    if request.n.is_some_and(|n| n != 1) {
        return Err(OpenAiError::invalid_param("n", "n: only one choice (n = 1) is served"));
    }
    if let Some((param, why)) = request.refused() {
        return Err(OpenAiError::invalid_param(param, format!("{param}: {why}")));
    }
    let sampling = request.sampling()?;
    parley_platform::sampling::check_model(&state.config, &request.model, &sampling)?;
    let mut messages = Vec::with_capacity(request.messages.len());
    let mut images = 0;
    for (index, message) in request.messages.iter().enumerate() {
        let (text, parts, count) = content_of(index, &message.content)?;
        if count > 0 && !state.config.takes_images(&request.model) {
            let param = format!("messages[{index}].content");
            let message = format!("{param}: the model `{}` does not take images", request.model);
            return Err(OpenAiError::invalid_param(&param, message));
        }
        images += count;
        messages.push(pb::PromptMessage {
            role: message.role.clone(),
            content: text,
            parts: parts.map(|parts| Value::Array(parts.clone()).to_string()).unwrap_or_default(),
            tool_calls: message
                .tool_calls
                .iter()
                .map(|call| pb::ToolCall {
                    id: call.id.clone(),
                    name: call.function.name.clone(),
                    arguments: call.function.arguments.clone(),
                })
                .collect(),
            tool_call_id: message.tool_call_id.clone().unwrap_or_default(),
        });
    }
    // The longest reply: what the client asked for (OpenAI's current name first), at most the configured.
    let older = request.max_tokens.map(|asked| ("max_tokens", asked));
    // Both are checked, though the current name wins.
    super::longest_reply(&state.config, older)?;
    let asked = request.max_completion_tokens.map(|asked| ("max_completion_tokens", asked)).or(older);
    let longest_reply = super::longest_reply(&state.config, asked)?;
    let wants_logprobs = sampling.wants_logprobs();
    let whole = !request.stream;
    let prompt = Prompt { model: request.model.clone(), messages, sampling, longest_reply, images, whole };
    let keep = match (request.store, raw) {
        (Some(true), Some(raw)) => {
            // The messages as the client sent them, unknown fields and all, to be kept with the completion.
            #[derive(Deserialize)]
            struct Sent {
                messages: Value,
            }
            let sent: Sent = serde_json::from_slice(&raw).map_err(|error| OpenAiError::invalid(error.to_string()))?;
            let model = request.model.clone();
            Some(Keep { state: state.clone(), user_id: caller.user_id, model, metadata, messages: sent.messages })
        }
        _ => None,
    };
    let started = super::completion::start(&state, &caller, &headers, prompt).await?;
    let reply = started.reply;
    let completion_id = started.id;
    let chunk = Chunk {
        id: format!("chatcmpl-{completion_id}"),
        created: time::OffsetDateTime::now_utc().unix_timestamp(),
        model: request.model,
    };
    if request.stream {
        let include_usage = request.stream_options.is_some_and(|options| options.include_usage);
        let heartbeat_interval = Duration::from_secs(state.config.http.stream_heartbeat_secs);
        let keep = keep.map(|keep| {
            Box::new(Kept { keep, id: completion_id, wants_logprobs, content: String::new(), logprobs: Vec::new() })
        });
        return Ok(stream(reply, chunk, include_usage, heartbeat_interval, keep));
    }
    let started = std::time::Instant::now();
    let wait = Duration::from_secs(state.config.http.message_wait_secs);
    let outcome = tokio::time::timeout(wait, collect(reply)).await;
    let waited = started.elapsed();
    let mut response = match outcome {
        Ok(Ok(collected)) => {
            let completion = completion(&chunk, &collected, wants_logprobs);
            if let Some(keep) = &keep {
                // Boxed, so that the call's future does not widen every completion's own.
                Box::pin(keep.store(completion_id, &completion)).await;
            }
            Json(completion).into_response()
        }
        Ok(Err(status)) => OpenAiError::from(status).into_response(),
        Err(_) => {
            OpenAiError::new(StatusCode::GATEWAY_TIMEOUT, "api_error", "timeout", "the model did not finish in time")
                .into_response()
        }
    };
    response.extensions_mut().insert(ModelWait(waited));
    Ok(response)
}

fn usage_of(done: &agent_pb::CompleteDone) -> Value {
    json!({
        "prompt_tokens": done.input_tokens,
        "completion_tokens": done.output_tokens,
        "total_tokens": done.input_tokens + done.output_tokens,
    })
}

fn completion(chunk: &Chunk, collected: &Collected, wants_logprobs: bool) -> Value {
    let (content, done) = (collected.content.as_str(), &collected.done);
    let logprobs = if wants_logprobs { json!({"content": collected.logprobs, "refusal": null}) } else { Value::Null };
    let mut message = json!({"role": "assistant", "content": content, "refusal": null});
    if !done.tool_calls.is_empty() {
        let calls: Vec<Value> = done
            .tool_calls
            .iter()
            .map(|call| json!({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}))
            .collect();
        message["tool_calls"] = Value::Array(calls);
        if content.is_empty() {
            message["content"] = Value::Null;
        }
    }
    json!({
        "id": chunk.id,
        "object": "chat.completion",
        "created": chunk.created,
        "model": chunk.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish_reason(done).as_openai(),
        }],
        "usage": usage_of(done),
    })
}

/// What every chunk of one completion shares.
struct Chunk {
    id: String,
    created: i64,
    model: String,
}

impl Chunk {
    fn with(&self, choices: Value, usage: Option<Value>) -> Event {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        Event::default().data(chunk.to_string())
    }
}

/// A streamed completion to be kept once whole, and what it has said so far.
struct Kept {
    keep: Keep,
    id: uuid::Uuid,
    wants_logprobs: bool,
    content: String,
    logprobs: Vec<Value>,
}

impl Kept {
    /// Keeps the streamed completion, whole now that `done` has come.
    async fn store(self: Box<Self>, chunk: &Chunk, done: agent_pb::CompleteDone) {
        let Kept { keep, id, wants_logprobs, content, logprobs } = *self;
        let whole = Collected { content, logprobs, done };
        keep.store(id, &completion(chunk, &whole, wants_logprobs)).await;
    }
}

/// Where a streamed completion stands.
enum Phase {
    Streaming {
        first: bool,
    },
    /// Events still to send after the reply finished.
    Closing(Vec<Event>),
    Done,
}

fn stream(
    reply: tonic::Streaming<agent_pb::CompleteEvent>,
    chunk: Chunk,
    include_usage: bool,
    heartbeat_interval: Duration,
    kept: Option<Box<Kept>>,
) -> Response {
    let state = (reply, chunk, Phase::Streaming { first: true }, kept);
    let events = futures::stream::unfold(state, move |(mut reply, chunk, phase, mut kept)| async move {
        match phase {
            Phase::Done => None,
            Phase::Closing(mut rest) => {
                if rest.is_empty() {
                    return None;
                }
                let event = rest.remove(0);
                let phase = if rest.is_empty() { Phase::Done } else { Phase::Closing(rest) };
                Some((Ok::<_, Infallible>(event), (reply, chunk, phase, kept)))
            }
            Phase::Streaming { first } => match reply.message().await {
                Ok(Some(agent_pb::CompleteEvent { event: Some(agent_pb::complete_event::Event::Delta(text)) })) => {
                    if let Some(kept) = &mut kept {
                        kept.content.push_str(&text);
                    }
                    let delta =
                        if first { json!({"role": "assistant", "content": text}) } else { json!({"content": text}) };
                    let event = chunk.with(json!([{"index": 0, "delta": delta, "finish_reason": null}]), None);
                    Some((Ok(event), (reply, chunk, Phase::Streaming { first: false }, kept)))
                }
                Ok(Some(agent_pb::CompleteEvent {
                    event: Some(agent_pb::complete_event::Event::Logprobs(entries)),
                })) => {
                    let entries: Value = serde_json::from_str(&entries).unwrap_or_else(|_| json!([]));
                    if let (Some(kept), Value::Array(list)) = (&mut kept, &entries) {
                        kept.logprobs.extend(list.iter().cloned());
                    }
                    let choice =
                        json!([{"index": 0, "delta": {}, "logprobs": {"content": entries}, "finish_reason": null}]);
                    Some((Ok(chunk.with(choice, None)), (reply, chunk, Phase::Streaming { first }, kept)))
                }
                Ok(Some(agent_pb::CompleteEvent { event: Some(agent_pb::complete_event::Event::ToolCall(call)) })) => {
                    let mut piece = json!({"index": call.index, "function": {"arguments": call.arguments}});
                    if !call.id.is_empty() {
                        piece["id"] = json!(call.id);
                        piece["type"] = json!("function");
                    }
                    if !call.name.is_empty() {
                        piece["function"]["name"] = json!(call.name);
                    }
                    let mut delta = json!({"tool_calls": [piece]});
                    if first {
                        delta["role"] = json!("assistant");
                    }
                    let event = chunk.with(json!([{"index": 0, "delta": delta, "finish_reason": null}]), None);
                    Some((Ok(event), (reply, chunk, Phase::Streaming { first: false }, kept)))
                }
                Ok(Some(agent_pb::CompleteEvent { event: Some(agent_pb::complete_event::Event::Done(done)) })) => {
                    // Kept before the stream ends, so a read after `[DONE]` finds it.
                    if let Some(kept) = kept.take() {
                        // Boxed: held across this await, the store's future would otherwise be part of
                        // every open stream's state, kept or not.
                        Box::pin(kept.store(&chunk, done.clone())).await;
                    }
                    let mut rest = Vec::new();
                    if include_usage {
                        rest.push(chunk.with(json!([]), Some(usage_of(&done))));
                    }
                    rest.push(Event::default().data("[DONE]"));
                    let finish = chunk.with(
                        json!([{"index": 0, "delta": {}, "finish_reason": finish_reason(&done).as_openai()}]),
                        None,
                    );
                    Some((Ok(finish), (reply, chunk, Phase::Closing(rest), kept)))
                }
                Ok(Some(_)) => {
                    Some((Ok(Event::default().comment("")), (reply, chunk, Phase::Streaming { first }, kept)))
                }
                outcome => {
                    let detail = match outcome {
                        Err(status) => ServiceError::from(status).message,
                        _ => super::completion::ended_early().message,
                    };
                    let error =
                        json!({"error": {"message": detail, "type": "api_error", "code": "upstream_unavailable"}});
                    let rest = vec![Event::default().data("[DONE]")];
                    Some((Ok(Event::default().data(error.to_string())), (reply, chunk, Phase::Closing(rest), kept)))
                }
            },
        }
    });
    unbuffered(Sse::new(events).keep_alive(heartbeat(heartbeat_interval)).into_response())
}
