//! Anthropic's Messages API: `POST /v1/messages` (whole, or streamed with `stream: true`) and
//! `POST /v1/messages/count_tokens`, so the official Anthropic SDKs work unchanged against
//! `http://<gateway>` with a Parley API key (sent as `X-Api-Key`, as the SDKs do, or as a bearer token).
//!
//! A message here is a stateless completion like an OpenAI one (`completion`): the request is read
//! into the agent's terms (the system prompt first, a user turn's `tool_result` blocks as tool
//! messages, `tool_use` blocks as tool calls, images as image parts), with the same rate limits, budget
//! reservation, provider chain, fallbacks and accounting; the reply is written back as Anthropic's
//! content blocks and stream events. Errors use Anthropic's shape,
//! `{"type": "error", "error": {"type", "message"}}`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use parley_platform::ServiceError;
use parley_platform::sampling::{ResponseFormat, Sampling};
use parley_proto::agent::v1 as agent_pb;
use parley_proto::chat::v1 as pb;
use serde::Deserialize;
use serde_json::{Value, json};

use super::completion::{Prompt, collect, finish_reason};
use super::streaming::{heartbeat, unbuffered};
use crate::AppState;
use crate::auth::Caller;
use crate::problem::ApiError;
use crate::timing::ModelWait;

/// An error in Anthropic's wire shape.
pub struct AnthropicError {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
}

impl AnthropicError {
    fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        ServiceError::invalid_field(field, message.to_string()).into()
    }

    /// Anthropic's name for the kind of error a status is.
    fn kind(status: StatusCode) -> &'static str {
        match status.as_u16() {
            400 | 405 | 409 | 412 | 415 | 422 | 428 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            502..=504 | 529 => "overloaded_error",
            _ => "api_error",
        }
    }

    /// The body of an error of `status`.
    pub fn body(status: StatusCode, message: &str) -> Value {
        json!({"type": "error", "error": {"type": Self::kind(status), "message": message}})
    }
}

impl From<ServiceError> for AnthropicError {
    fn from(error: ServiceError) -> Self {
        let status = StatusCode::from_u16(error.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // Sampling is checked in OpenAI's words; the client wrote Anthropic's.
        let message = match error.field.as_deref() {
            Some(field) => {
                let renamed = anthropic_name(field);
                error.message.strip_prefix(field).map_or(error.message.clone(), |rest| format!("{renamed}{rest}"))
            }
            None => error.message,
        };
        Self { status, message, retry_after: error.retry_after_secs }
    }
}

impl From<ApiError> for AnthropicError {
    fn from(error: ApiError) -> Self {
        error.0.into()
    }
}

/// A body that could not be read (past the limit: 413).
impl From<axum::extract::rejection::BytesRejection> for AnthropicError {
    fn from(rejection: axum::extract::rejection::BytesRejection) -> Self {
        Self { status: rejection.status(), message: rejection.body_text(), retry_after: None }
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(Self::body(self.status, &self.message))).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// A request parameter's Anthropic name, for a parameter the sampling check named in OpenAI's words.
fn anthropic_name(field: &str) -> &str {
    match field {
        "stop" => "stop_sequences",
        "response_format" => "output_config.format",
        "user" => "metadata.user_id",
        "parallel_tool_calls" => "tool_choice.disable_parallel_tool_use",
        other => other,
    }
}

type AnthropicResult<T> = Result<T, AnthropicError>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagesRequest {
    model: String,
    messages: Vec<InputMessage>,
    #[serde(deserialize_with = "parley_platform::json_int::integer")]
    max_tokens: i64,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    stop_sequences: Vec<String>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    metadata: Option<Metadata>,
    #[serde(default)]
    tools: Vec<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    output_config: Option<OutputConfig>,
    /// Accepted and not used: there is one service tier.
    #[serde(default)]
    #[allow(dead_code)]
    service_tier: Option<Value>,
    /// Accepted and not used: prompt caching is the provider's business.
    #[serde(default)]
    #[allow(dead_code)]
    cache_control: Option<Value>,
    /// Refused when they ask for something this gateway does not do (see [`MessagesRequest::refused`]).
    #[serde(default)]
    top_k: Option<Value>,
    #[serde(default)]
    thinking: Option<Value>,
    #[serde(default)]
    container: Option<Value>,
    #[serde(default)]
    mcp_servers: Option<Value>,
    #[serde(default)]
    context_management: Option<Value>,
    #[serde(default)]
    speed: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    #[serde(default)]
    user_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputConfig {
    #[serde(default)]
    format: Option<Value>,
    #[serde(default)]
    effort: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputMessage {
    role: String,
    content: Value,
}

impl MessagesRequest {
    /// The first parameter that asks for something this gateway does not do, and why; one that asks
    /// for nothing (`thinking: {"type": "disabled"}`, `speed: "standard"`, an empty list) passes.
    fn refused(&self) -> Option<(&'static str, &'static str)> {
        let given = |value: &Option<Value>| value.as_ref().is_some_and(|value| !value.is_null());
        let listed = |value: &Option<Value>| {
            given(value) && !value.as_ref().and_then(Value::as_array).is_some_and(Vec::is_empty)
        };
        let thinking = given(&self.thinking)
            && self.thinking.as_ref().and_then(|thinking| thinking.get("type")).and_then(Value::as_str)
                != Some("disabled");
        let effort = self.output_config.as_ref().is_some_and(|config| given(&config.effort));
        let speed = given(&self.speed) && self.speed.as_ref().and_then(Value::as_str) != Some("standard");
        [
            ("top_k", given(&self.top_k), "top_k is not available on this gateway; use temperature or top_p"),
            ("thinking", thinking, "extended thinking is not available on this gateway"),
            ("output_config.effort", effort, "effort is not available on this gateway"),
            ("container", given(&self.container), "containers are not available"),
            ("mcp_servers", listed(&self.mcp_servers), "MCP servers are not available"),
            ("context_management", given(&self.context_management), "context management is not available"),
            ("speed", speed, "only the standard speed is available"),
        ]
        .into_iter()
        .find_map(|(param, asked, why)| asked.then_some((param, why)))
    }

    /// The sampling parameters in the agent's (OpenAI's) terms, checked.
    fn sampling(&self) -> AnthropicResult<Sampling> {
        let tools =
            self.tools.iter().enumerate().map(|(index, tool)| function_tool(index, tool)).collect::<Result<_, _>>()?;
        let (tool_choice, parallel_tool_calls) = match &self.tool_choice {
            None => (None, None),
            Some(choice) => tool_choice(choice)?,
        };
        let response_format = match self.output_config.as_ref().and_then(|config| config.format.as_ref()) {
            None | Some(Value::Null) => None,
            Some(format) => Some(response_format(format)?),
        };
        let sampling = Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self.stop_sequences.clone(),
            user: self.metadata.as_ref().and_then(|metadata| metadata.user_id.clone()).filter(|user| !user.is_empty()),
            response_format,
            tools,
            tool_choice,
            parallel_tool_calls,
            ..Sampling::default()
        };
        // Anthropic's temperature goes to 1; OpenAI's (which `check` knows) to 2.
        if sampling.temperature.is_some_and(|temperature| !(0.0..=1.0).contains(&temperature)) {
            return Err(AnthropicError::invalid("temperature", "must be between 0 and 1"));
        }
        sampling.check()?;
        Ok(sampling)
    }
}

/// An Anthropic tool (`{"name", "description"?, "input_schema"}`) as the function tool the agent takes.
fn function_tool(index: usize, tool: &Value) -> AnthropicResult<Value> {
    let field = format!("tools[{index}]");
    if tool.get("type").is_some_and(|kind| !kind.is_null() && kind.as_str() != Some("custom")) {
        return Err(AnthropicError::invalid(&field, "only custom tools (name, description, input_schema) are served"));
    }
    let (Some(name), Some(schema)) = (tool.get("name"), tool.get("input_schema")) else {
        return Err(AnthropicError::invalid(&field, "a tool needs a name and an input_schema"));
    };
    let mut function = json!({"name": name, "parameters": schema});
    if let Some(description) = tool.get("description") {
        function["description"] = description.clone();
    }
    Ok(json!({"type": "function", "function": function}))
}

/// Anthropic's `tool_choice` as OpenAI's `tool_choice` and `parallel_tool_calls`.
fn tool_choice(choice: &Value) -> AnthropicResult<(Option<Value>, Option<bool>)> {
    let parallel = match choice.get("disable_parallel_tool_use") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(disabled)) => Some(!disabled),
        Some(_) => return Err(AnthropicError::invalid("tool_choice", "disable_parallel_tool_use must be a boolean")),
    };
    let openai = match (choice.get("type").and_then(Value::as_str), choice.get("name").and_then(Value::as_str)) {
        (Some("auto"), _) => json!("auto"),
        (Some("any"), _) => json!("required"),
        (Some("none"), _) => json!("none"),
        (Some("tool"), Some(name)) => json!({"type": "function", "function": {"name": name}}),
        _ => {
            let message = "must be {\"type\": \"auto\"}, {\"type\": \"any\"}, {\"type\": \"none\"} or {\"type\": \"tool\", \"name\"}";
            return Err(AnthropicError::invalid("tool_choice", message));
        }
    };
    Ok((Some(openai), parallel))
}

/// `output_config.format` (`{"type": "json_schema", "schema"}`) as OpenAI's `response_format`.
fn response_format(format: &Value) -> AnthropicResult<ResponseFormat> {
    match (format.get("type").and_then(Value::as_str), format.get("schema")) {
        (Some("json_schema"), Some(schema)) if schema.is_object() => {
            Ok(ResponseFormat::JsonSchema { json_schema: json!({"name": "output", "schema": schema}) })
        }
        _ => Err(AnthropicError::invalid(
            "output_config.format",
            "must be {\"type\": \"json_schema\", \"schema\": {...}}",
        )),
    }
}

/// The text of a `system` prompt or a `tool_result`'s content: a string, or a list of text blocks.
fn text_of(field: &str, content: &Value) -> AnthropicResult<String> {
    match content {
        Value::String(text) => Ok(text.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(blocks) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for (index, block) in blocks.iter().enumerate() {
                match (block.get("type").and_then(Value::as_str), block.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(text)) => texts.push(text),
                    _ => return Err(AnthropicError::invalid(&format!("{field}[{index}]"), "must be a text block")),
                }
            }
            Ok(texts.join("\n\n"))
        }
        _ => Err(AnthropicError::invalid(field, "must be a string or a list of text blocks")),
    }
}

/// An Anthropic image block's source as an OpenAI `image_url` part.
fn image_part(field: &str, block: &Value) -> AnthropicResult<Value> {
    let source = block.get("source").unwrap_or(&Value::Null);
    let text = |name: &str| source.get(name).and_then(Value::as_str).unwrap_or_default();
    let url = match text("type") {
        "base64" if text("media_type").starts_with("image/") && !text("data").is_empty() => {
            format!("data:{};base64,{}", text("media_type"), text("data"))
        }
        "url" => text("url").to_owned(),
        _ => String::new(),
    };
    if !super::completion::is_image_url(&url) {
        let message = "source must be {\"type\": \"base64\", \"media_type\": \"image/...\", \"data\"} or {\"type\": \"url\", \"url\": \"http(s)://...\"}";
        return Err(AnthropicError::invalid(&format!("{field}.source"), message));
    }
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// One Anthropic turn as the agent's messages: a user turn's `tool_result` blocks become tool messages
/// (first, as they answer the previous turn's calls) and the rest one user message; an assistant turn
/// one message with its `tool_use` blocks as tool calls. Returns the images the turn carries.
fn turn_messages(index: usize, message: &InputMessage, out: &mut Vec<pb::PromptMessage>) -> AnthropicResult<u32> {
    let field = format!("messages[{index}]");
    let role = match message.role.as_str() {
        role @ ("user" | "assistant") => role,
        _ => return Err(AnthropicError::invalid(&format!("{field}.role"), "must be user or assistant")),
    };
    let blocks = match &message.content {
        Value::String(text) => {
            out.push(prompt_message(role, text.clone()));
            return Ok(0);
        }
        Value::Array(blocks) => blocks,
        _ => return Err(AnthropicError::invalid(&format!("{field}.content"), "must be a string or a list of blocks")),
    };
    let mut turn = prompt_message(role, String::new());
    let mut parts = Vec::new();
    let mut images = 0;
    for (position, block) in blocks.iter().enumerate() {
        let field = format!("{field}.content[{position}]");
        let text = |name: &str| block.get(name).and_then(Value::as_str);
        match (role, text("type")) {
            (_, Some("text")) => {
                let Some(piece) = text("text") else {
                    return Err(AnthropicError::invalid(&field, "a text block needs text"));
                };
                turn.content.push_str(piece);
                parts.push(json!({"type": "text", "text": piece}));
            }
            ("user", Some("image")) => {
                parts.push(image_part(&field, block)?);
                images += 1;
            }
            ("user", Some("tool_result")) => {
                let Some(id) = text("tool_use_id").filter(|id| !id.is_empty()) else {
                    return Err(AnthropicError::invalid(&field, "a tool_result block needs its tool_use_id"));
                };
                let content = text_of(&format!("{field}.content"), block.get("content").unwrap_or(&Value::Null))?;
                out.push(pb::PromptMessage { tool_call_id: id.to_owned(), ..prompt_message("tool", content) });
            }
            ("assistant", Some("tool_use")) => {
                let (Some(id), Some(name)) = (text("id"), text("name")) else {
                    return Err(AnthropicError::invalid(&field, "a tool_use block needs an id and a name"));
                };
                let input = block.get("input").filter(|input| input.is_object()).cloned().unwrap_or_else(|| json!({}));
                let arguments = input.to_string();
                turn.tool_calls.push(pb::ToolCall { id: id.to_owned(), name: name.to_owned(), arguments });
            }
            _ => {
                let served = if role == "user" { "text, image and tool_result" } else { "text and tool_use" };
                return Err(AnthropicError::invalid(
                    &field,
                    format!("only {served} blocks are served in a {role} turn"),
                ));
            }
        }
    }
    if images > 0 {
        turn.parts = Value::Array(parts).to_string();
    }
    // A user turn of tool results alone needs no user message after them.
    let only_results = !blocks.is_empty() && blocks.iter().all(|block| block["type"] == "tool_result");
    if role == "assistant" || !only_results {
        out.push(turn);
    }
    Ok(images)
}

fn prompt_message(role: &str, content: String) -> pb::PromptMessage {
    pb::PromptMessage { role: role.to_owned(), content, ..pb::PromptMessage::default() }
}

/// Reads and checks a request body: the model known, every parameter served, the turns in the agent's
/// terms.
fn read_request(state: &AppState, headers: &HeaderMap, body: &Bytes) -> AnthropicResult<(Prompt, bool)> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !is_json {
        return Err(AnthropicError::invalid("Content-Type", "must be application/json"));
    }
    let request: MessagesRequest = crate::problem::parse(body)?;
    if !state.config.models.contains_key(&request.model) {
        let message = format!("model: {}", request.model);
        return Err(AnthropicError { status: StatusCode::NOT_FOUND, message, retry_after: None });
    }
    if !state.config.serves_chat(&request.model) {
        return Err(AnthropicError::invalid("model", format!("{:?} makes embeddings, not messages", request.model)));
    }
    if let Some((param, why)) = request.refused() {
        return Err(AnthropicError::invalid(param, why));
    }
    if request.messages.is_empty() {
        return Err(AnthropicError::invalid("messages", "must not be empty"));
    }
    let sampling = request.sampling()?;
    parley_platform::sampling::check_model(&state.config, &request.model, &sampling)?;
    let longest_reply = super::longest_reply(&state.config, Some(("max_tokens", request.max_tokens)))?;
    let mut messages = Vec::with_capacity(request.messages.len() + 1);
    if let Some(system) = &request.system {
        let system = text_of("system", system)?;
        if !system.is_empty() {
            messages.push(prompt_message("system", system));
        }
    }
    let mut images = 0;
    for (index, message) in request.messages.iter().enumerate() {
        let count = turn_messages(index, message, &mut messages)?;
        if count > 0 && !state.config.takes_images(&request.model) {
            let message = format!("the model {:?} does not take images", request.model);
            return Err(AnthropicError::invalid(&format!("messages[{index}].content"), message));
        }
        images += count;
    }
    let chars: usize = messages.iter().map(|message| message.content.chars().count()).sum();
    if chars > state.config.chat.max_message_chars {
        let limit = state.config.chat.max_message_chars;
        return Err(AnthropicError::invalid(
            "messages",
            format!("with the system prompt, must total at most {limit} characters"),
        ));
    }
    let whole = !request.stream;
    let prompt = Prompt { model: request.model, messages, sampling, longest_reply, images, whole };
    Ok((prompt, request.stream))
}

/// Create a message (Anthropic's Messages API).
#[utoipa::path(post, path = "/v1/messages", tag = "anthropic", security(("bearer" = []), ("api_key" = [])), responses(
    (status = 200, description = "A message object, or with stream=true a stream of Anthropic's message events"),
    (status = 400, description = "Anthropic error shape"),
    (status = 404, description = "Unknown model (Anthropic error shape, not_found_error)"),
    (status = 429, description = "Rate limit or token budget (Anthropic error shape, rate_limit_error)"),
))]
pub async fn messages(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> AnthropicResult<Response> {
    let caller = caller?;
    let body = body?;
    let (prompt, stream) = read_request(&state, &headers, &body)?;
    let model = prompt.model.clone();
    let started = super::completion::start(&state, &caller, &headers, prompt).await?;
    let message = MessageHead { id: format!("msg_{}", started.id.simple()), model };
    if stream {
        let heartbeat_interval = Duration::from_secs(state.config.http.stream_heartbeat_secs);
        return Ok(stream_events(started.reply, message, heartbeat_interval));
    }
    let waited = std::time::Instant::now();
    let wait = Duration::from_secs(state.config.http.message_wait_secs);
    let mut response = match tokio::time::timeout(wait, collect(started.reply)).await {
        Ok(Ok(collected)) => {
            let mut content = Vec::new();
            if !collected.content.is_empty() || collected.done.tool_calls.is_empty() {
                content.push(json!({"type": "text", "text": collected.content}));
            }
            content.extend(collected.done.tool_calls.iter().map(tool_use_block));
            let mut body = message.with_content(content, &collected.done);
            body["stop_reason"] = json!(stop_reason(&collected.done));
            Json(body).into_response()
        }
        Ok(Err(status)) => AnthropicError::from(ServiceError::from(status)).into_response(),
        Err(_) => {
            let status = StatusCode::GATEWAY_TIMEOUT;
            AnthropicError { status, message: "the model did not finish in time".to_owned(), retry_after: None }
                .into_response()
        }
    };
    response.extensions_mut().insert(ModelWait(waited.elapsed()));
    Ok(response)
}

/// Count the tokens of a message request (Anthropic's `count_tokens`): the estimate the gateway
/// reserves the prompt's budget by, without calling a model.
#[utoipa::path(post, path = "/v1/messages/count_tokens", tag = "anthropic", security(("bearer" = []), ("api_key" = [])), responses(
    (status = 200, description = "{\"input_tokens\": n}"),
    (status = 400, description = "Anthropic error shape"),
    (status = 404, description = "Unknown model (Anthropic error shape, not_found_error)"),
))]
pub async fn count_tokens(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> AnthropicResult<Json<Value>> {
    caller?;
    let body = body?;
    // The same body as a message, whose max_tokens Anthropic's count_tokens does not take.
    let mut request: Value = crate::problem::parse(&body)?;
    if let Some(object) = request.as_object_mut() {
        object.entry("max_tokens").or_insert(json!(1));
        object.remove("stream");
    }
    let body = Bytes::from(request.to_string());
    let (prompt, _) = read_request(&state, &headers, &body)?;
    Ok(Json(json!({"input_tokens": super::completion::prompt_tokens(&prompt)})))
}

/// An Anthropic stop reason for how the model stopped.
fn stop_reason(done: &agent_pb::CompleteDone) -> &'static str {
    finish_reason(done).as_anthropic()
}

fn tool_use_block(call: &pb::ToolCall) -> Value {
    let input =
        serde_json::from_str::<Value>(&call.arguments).ok().filter(Value::is_object).unwrap_or_else(|| json!({}));
    json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input})
}

/// What every form of one message shares.
struct MessageHead {
    id: String,
    model: String,
}

impl MessageHead {
    fn with_content(&self, content: Vec<Value>, done: &agent_pb::CompleteDone) -> Value {
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": null,
            "stop_sequence": null,
            "usage": {"input_tokens": done.input_tokens, "output_tokens": done.output_tokens},
        })
    }
}

fn sse(name: &'static str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// The content block a streamed message has open.
#[derive(Clone, Copy, PartialEq)]
enum Block {
    None,
    Text,
    /// The tool call of this index (the agent's numbering).
    Tool(u32),
}

/// Where a streamed message stands: the block open, and the index the next block takes.
struct Blocks {
    open: Block,
    next: u32,
}

impl Blocks {
    /// Opens `block` (closing the one open) unless it is open already.
    fn open(&mut self, block: Block, start: Value, events: &mut Vec<Event>) {
        if self.open == block {
            return;
        }
        self.close(events);
        let index = self.next;
        events.push(sse(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        self.open = block;
    }

    fn close(&mut self, events: &mut Vec<Event>) {
        if self.open != Block::None {
            events.push(sse("content_block_stop", &json!({"type": "content_block_stop", "index": self.next})));
            self.open = Block::None;
            self.next += 1;
        }
    }

    fn delta(&self, delta: Value) -> Event {
        sse("content_block_delta", &json!({"type": "content_block_delta", "index": self.next, "delta": delta}))
    }
}

/// The reply as Anthropic's stream: `message_start`, each content block's start, deltas and stop,
/// `message_delta` with the stop reason and usage, `message_stop`; an `error` event if it breaks off.
fn stream_events(
    reply: tonic::Streaming<agent_pb::CompleteEvent>,
    message: MessageHead,
    heartbeat_interval: Duration,
) -> Response {
    let mut head = message.with_content(Vec::new(), &agent_pb::CompleteDone::default());
    head["usage"] = json!({"input_tokens": 0, "output_tokens": 0});
    let start = vec![sse("message_start", &json!({"type": "message_start", "message": head}))];
    let blocks = Blocks { open: Block::None, next: 0 };
    let steps = futures::stream::unfold(Some((reply, blocks)), |state| async move {
        let (mut reply, mut blocks) = state?;
        let mut events = Vec::new();
        match reply.message().await {
            Ok(Some(agent_pb::CompleteEvent { event: Some(event) })) => match event {
                agent_pb::complete_event::Event::Delta(text) => {
                    blocks.open(Block::Text, json!({"type": "text", "text": ""}), &mut events);
                    events.push(blocks.delta(json!({"type": "text_delta", "text": text})));
                }
                agent_pb::complete_event::Event::ToolCall(call) => {
                    let start = json!({"type": "tool_use", "id": call.id, "name": call.name, "input": {}});
                    blocks.open(Block::Tool(call.index), start, &mut events);
                    if !call.arguments.is_empty() {
                        events.push(blocks.delta(json!({"type": "input_json_delta", "partial_json": call.arguments})));
                    }
                }
                agent_pb::complete_event::Event::Done(done) => {
                    blocks.close(&mut events);
                    let delta = json!({
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason(&done), "stop_sequence": null},
                        "usage": {"input_tokens": done.input_tokens, "output_tokens": done.output_tokens},
                    });
                    events.push(sse("message_delta", &delta));
                    events.push(sse("message_stop", &json!({"type": "message_stop"})));
                    return Some((events, None));
                }
                // Log probabilities have no place in Anthropic's stream.
                agent_pb::complete_event::Event::Logprobs(_) => {}
            },
            Ok(Some(agent_pb::CompleteEvent { event: None })) => {}
            outcome => {
                let error = match outcome {
                    Err(status) => ServiceError::from(status),
                    _ => super::completion::ended_early(),
                };
                let status = StatusCode::from_u16(error.code.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
                events.push(sse("error", &AnthropicError::body(status, &error.message)));
                return Some((events, None));
            }
        }
        Some((events, Some((reply, blocks))))
    });
    let events = futures::stream::iter([start])
        .chain(steps)
        .flat_map(|events| futures::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>)));
    unbuffered(Sse::new(events).keep_alive(heartbeat(heartbeat_interval)).into_response())
}
