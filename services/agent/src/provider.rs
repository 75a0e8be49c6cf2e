//! LLM providers over HTTP, streaming. Two wire formats: the OpenAI Chat Completions API (OpenAI itself,
//! OpenRouter, vLLM, Ollama, llama.cpp's server, Together, Groq and Parley's fake LLM) and Anthropic's
//! Messages API.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use futures::StreamExt;
use parley_platform::config::{ProviderConfig, ProviderKind};
use parley_platform::finish::FinishReason;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Value, json};

/// One message of a prompt, serialized as OpenAI's wire takes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PromptMessage {
    pub role: String,
    /// The text (of the text parts, for a message with images).
    pub content: String,
    /// A message with images: its content parts as the client sent them (text and `image_url`), which
    /// go to the provider instead of `content`.
    pub parts: Vec<Value>,
    /// The tools an assistant message called.
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

impl Serialize for PromptMessage {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut message = serializer.serialize_map(None)?;
        message.serialize_entry("role", &self.role)?;
        if self.parts.is_empty() {
            message.serialize_entry("content", &self.content)?;
        } else {
            message.serialize_entry("content", &self.parts)?;
        }
        if !self.tool_calls.is_empty() {
            message.serialize_entry("tool_calls", &self.tool_calls)?;
        }
        if let Some(id) = &self.tool_call_id {
            message.serialize_entry("tool_call_id", id)?;
        }
        message.end()
    }
}

impl PromptMessage {
    /// How many images the message carries.
    pub fn images(&self) -> u32 {
        self.parts.iter().filter(|part| part.get("type").is_some_and(|kind| kind == "image_url")).count() as u32
    }
}

impl PromptMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), ..Self::default() }
    }
}

/// One call of a function tool by the model; its arguments are JSON text, as the model wrote them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl Serialize for ToolCall {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
            .serialize(serializer)
    }
}

/// A piece of a reply as it streams: text, or a piece of a tool call (whose id and name come with its
/// first piece).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delta<'a> {
    Text(&'a str),
    ToolCall {
        index: u32,
        id: &'a str,
        name: &'a str,
        arguments: &'a str,
    },
    /// The log probabilities of the text just passed on (OpenAI's `logprobs.content` entries).
    Logprobs(&'a [Value]),
}

/// A finished model call.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub content: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub time_to_first_token: Option<Duration>,
    /// Why the model stopped, in OpenAI's words (`stop`, `length`, `tool_calls`, `content_filter`),
    /// when the provider said.
    pub finish_reason: Option<FinishReason>,
    /// The tools the reply called.
    pub tool_calls: Vec<ToolCall>,
    /// The client stopped the reply: this is the part written before the stop (never cached, never
    /// shared with a request waiting on the same call).
    pub stopped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("provider answered HTTP {status}: {message}")]
    Status { status: u16, message: String, retry_after: Option<Duration> },
    #[error("could not reach the provider: {0}")]
    Transport(String),
    #[error("no first token within {0:?}")]
    FirstTokenTimeout(Duration),
    #[error("provider timed out after {0:?}")]
    Timeout(Duration),
    #[error("provider reported an error mid-stream: {0}")]
    Stream(String),
    #[error("provider sent something unreadable: {0}")]
    Protocol(String),
    #[error("provider is not configured: {0}")]
    Misconfigured(String),
}

impl ProviderError {
    /// Worth trying again (here or at the next provider): the provider may answer differently later.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => matches!(status, 401 | 403 | 408 | 429) || *status >= 500,
            ProviderError::Transport(_)
            | ProviderError::FirstTokenTimeout(_)
            | ProviderError::Timeout(_)
            | ProviderError::Stream(_) => true,
            ProviderError::Protocol(_) | ProviderError::Misconfigured(_) => false,
        }
    }

    /// Whether this failure says the provider is unhealthy (it counts towards its circuit breaker);
    /// 4xx answers, including 429, are about the request or the key, not the provider.
    pub fn is_provider_fault(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => *status >= 500,
            ProviderError::Transport(_)
            | ProviderError::FirstTokenTimeout(_)
            | ProviderError::Timeout(_)
            | ProviderError::Stream(_) => true,
            ProviderError::Protocol(_) | ProviderError::Misconfigured(_) => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ProviderError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    OpenAi,
    Anthropic,
}

/// How to sample a reply: the client's parameters (checked against the provider's wire format before
/// the job was accepted, `parley_platform::sampling::check_model`) and the longest reply.
#[derive(Debug, Clone, Copy)]
pub struct Sampling<'a> {
    pub max_tokens: u32,
    pub params: &'a parley_platform::sampling::Sampling,
}

/// The deadlines of one call.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub first_token: Duration,
    pub total: Duration,
}

#[derive(Clone)]
pub struct HttpProvider {
    pub name: String,
    wire: Wire,
    base_url: String,
    http: reqwest::Client,
    timeouts: Timeouts,
}

const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The body of an OpenAI chat completion call, written straight from what the call holds (the prompt is
/// not copied into a JSON tree first). The sampling parameters' JSON names are OpenAI's own: they go
/// into the body as they are.
#[derive(serde::Serialize)]
struct OpenAiRequest<'a> {
    model: &'a str,
    messages: &'a [PromptMessage],
    stream: bool,
    stream_options: StreamOptions,
    max_tokens: u32,
    #[serde(flatten)]
    params: &'a parley_platform::sampling::Sampling,
}

#[derive(serde::Serialize)]
struct StreamOptions {
    include_usage: bool,
}

impl HttpProvider {
    pub fn new(
        name: &str,
        config: &ProviderConfig,
        http: reqwest::Client,
        timeouts: Timeouts,
    ) -> Result<Self, ProviderError> {
        if config.base_url.is_empty() {
            return Err(ProviderError::Misconfigured(format!("provider {name} has no base_url")));
        }
        let wire = match config.kind {
            ProviderKind::Openai | ProviderKind::Fake => Wire::OpenAi,
            ProviderKind::Anthropic => Wire::Anthropic,
        };
        Ok(Self {
            name: name.to_owned(),
            wire,
            base_url: config.base_url.trim_end_matches('/').to_owned(),
            http,
            timeouts,
        })
    }

    /// Streams a completion with `key`, calling `on_delta` with each piece of text as it arrives.
    pub async fn stream_chat(
        &self,
        key: Option<&str>,
        model: &str,
        messages: &[PromptMessage],
        sampling: Sampling<'_>,
        on_delta: &mut (dyn FnMut(Delta<'_>) + Send),
    ) -> Result<Completion, ProviderError> {
        let total = self.timeouts.total;
        match tokio::time::timeout(total, self.call(key, model, messages, sampling, on_delta)).await {
            Ok(result) => result,
            Err(_) => Err(ProviderError::Timeout(total)),
        }
    }

    /// Vectors for `inputs`, in their order (OpenAI's `POST /embeddings`; Anthropic's API has none).
    pub async fn embed(
        &self,
        key: Option<&str>,
        model: &str,
        inputs: &[String],
        options: EmbedOptions<'_>,
    ) -> Result<Embedded, ProviderError> {
        if self.wire == Wire::Anthropic {
            return Err(ProviderError::Misconfigured(format!("{} (Anthropic) makes no embeddings", self.name)));
        }
        let mut body = json!({"model": model, "input": inputs, "encoding_format": "float"});
        if let Some(dimensions) = options.dimensions {
            body["dimensions"] = json!(dimensions);
        }
        if let Some(user) = options.user {
            body["user"] = json!(user);
        }
        let request = self.http.post(format!("{}/embeddings", self.base_url)).json(&body);
        let request = match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        let call = async {
            let response = request.send().await.map_err(|error| ProviderError::Transport(without_url(&error)))?;
            if !response.status().is_success() {
                return Err(status_error(response).await);
            }
            let body = response.bytes().await.map_err(|error| ProviderError::Transport(without_url(&error)))?;
            read_embeddings(&body, inputs)
        };
        let total = self.timeouts.total;
        tokio::time::timeout(total, call).await.unwrap_or(Err(ProviderError::Timeout(total)))
    }

    fn request(
        &self,
        key: Option<&str>,
        model: &str,
        messages: &[PromptMessage],
        sampling: Sampling<'_>,
    ) -> reqwest::RequestBuilder {
        match self.wire {
            Wire::OpenAi => {
                let body = OpenAiRequest {
                    model,
                    messages,
                    stream: true,
                    stream_options: StreamOptions { include_usage: true },
                    max_tokens: sampling.max_tokens,
                    params: sampling.params,
                };
                let request = self.http.post(format!("{}/chat/completions", self.base_url)).json(&body);
                match key {
                    Some(key) => request.bearer_auth(key),
                    None => request,
                }
            }
            Wire::Anthropic => {
                let (system, turns) = anthropic_messages(messages);
                let mut body =
                    json!({"model": model, "messages": turns, "max_tokens": sampling.max_tokens, "stream": true});
                let params = sampling.params;
                if let Some(temperature) = params.temperature {
                    // Anthropic's range is 0 to 1.
                    body["temperature"] = json!(temperature.min(1.0));
                }
                if let Some(top_p) = params.top_p {
                    body["top_p"] = json!(top_p);
                }
                if !params.stop.is_empty() {
                    body["stop_sequences"] = json!(params.stop);
                }
                if let Some(user) = &params.user {
                    body["metadata"] = json!({"user_id": user});
                }
                if !params.tools.is_empty() {
                    body["tools"] = anthropic_tools(&params.tools);
                }
                if let Some(choice) = anthropic_tool_choice(params) {
                    body["tool_choice"] = choice;
                }
                if !system.is_empty() {
                    body["system"] = Value::String(system);
                }
                let request = self
                    .http
                    .post(format!("{}/messages", self.base_url))
                    .header("anthropic-version", ANTHROPIC_VERSION)
                    .json(&body);
                match key {
                    Some(key) => request.header("x-api-key", key),
                    None => request,
                }
            }
        }
    }

    async fn call(
        &self,
        key: Option<&str>,
        model: &str,
        messages: &[PromptMessage],
        sampling: Sampling<'_>,
        on_delta: &mut (dyn FnMut(Delta<'_>) + Send),
    ) -> Result<Completion, ProviderError> {
        let started = Instant::now();
        let first_token_deadline = tokio::time::Instant::now() + self.timeouts.first_token;
        let first_token_timeout = ProviderError::FirstTokenTimeout(self.timeouts.first_token);
        let sent = tokio::time::timeout_at(first_token_deadline, self.request(key, model, messages, sampling).send());
        let response = match sent.await {
            Ok(response) => response.map_err(|error| ProviderError::Transport(without_url(&error)))?,
            Err(_) => return Err(first_token_timeout),
        };
        if !response.status().is_success() {
            return Err(status_error(response).await);
        }
        let mut state = StreamState::default();
        // (A stream may end on an event without the blank line after it: `events` gives it too.)
        #[allow(clippy::disallowed_methods, reason = "the body is read through sse::events")]
        let mut events = std::pin::pin!(parley_platform::sse::events(response.bytes_stream()));
        loop {
            let next = if state.time_to_first_token.is_none() {
                match tokio::time::timeout_at(first_token_deadline, events.next()).await {
                    Ok(next) => next,
                    Err(_) => return Err(first_token_timeout),
                }
            } else {
                events.next().await
            };
            let Some(event) = next else {
                break;
            };
            let event = event.map_err(|error| ProviderError::Transport(without_url(&error)))?;
            self.read_event(&event.data, &mut state, started, on_delta)?;
        }
        if self.wire == Wire::Anthropic && !state.finished {
            return Err(ProviderError::Stream("the stream ended before message_stop".to_owned()));
        }
        // Providers that do not report usage get an estimate of about four characters a token.
        let estimated_input = || {
            let image = i64::from(parley_platform::tokens::IMAGE_ESTIMATE);
            messages
                .iter()
                .map(|message| {
                    i64::from(parley_platform::tokens::estimate(&message.content)) + i64::from(message.images()) * image
                })
                .sum::<i64>()
        };
        let input_tokens = state.input_tokens.unwrap_or_else(estimated_input);
        let output_tokens = state.output_tokens.unwrap_or_else(|| {
            let arguments = state.tool_calls.iter().map(|call| parley_platform::tokens::estimate(&call.arguments));
            i64::from(parley_platform::tokens::estimate(&state.content)) + arguments.map(i64::from).sum::<i64>()
        });
        Ok(Completion {
            content: state.content,
            input_tokens,
            output_tokens,
            time_to_first_token: state.time_to_first_token,
            finish_reason: state.finish_reason,
            tool_calls: state.tool_calls,
            stopped: false,
        })
    }

    /// Applies one event's data to the reply so far, passing its text on.
    fn read_event(
        &self,
        data: &str,
        state: &mut StreamState,
        started: Instant,
        on_delta: &mut (dyn FnMut(Delta<'_>) + Send),
    ) -> Result<(), ProviderError> {
        let data = data.trim();
        if data == "[DONE]" || data.is_empty() {
            return Ok(());
        }
        let protocol = |error: serde_json::Error| ProviderError::Protocol(error.to_string());
        match self.wire {
            Wire::OpenAi => {
                let chunk: OpenAiChunk<'_> = serde_json::from_str(data).map_err(protocol)?;
                let pieces = state.read_openai(&chunk)?;
                state.pass_on(pieces, chunk.logprobs(), started, on_delta);
            }
            Wire::Anthropic => {
                let value: Value = serde_json::from_str(data).map_err(protocol)?;
                let pieces = state.read_anthropic(&value)?;
                state.pass_on(pieces, None, started, on_delta);
            }
        }
        Ok(())
    }
}

impl StreamState {
    /// Adds an event's pieces to the reply so far and passes them on, then its log probabilities.
    fn pass_on(
        &mut self,
        pieces: Pieces<'_>,
        logprobs: Option<&[Value]>,
        started: Instant,
        on_delta: &mut (dyn FnMut(Delta<'_>) + Send),
    ) {
        match pieces {
            Pieces::None => {}
            Pieces::Text(text) => {
                if !text.is_empty() {
                    self.time_to_first_token.get_or_insert_with(|| started.elapsed());
                    self.content.push_str(text);
                    on_delta(Delta::Text(text));
                }
            }
            Pieces::Tools(pieces) => {
                for piece in pieces {
                    self.time_to_first_token.get_or_insert_with(|| started.elapsed());
                    self.add_tool_piece(&piece);
                    on_delta(Delta::ToolCall {
                        index: piece.index,
                        id: piece.id.unwrap_or_default(),
                        name: piece.name.unwrap_or_default(),
                        arguments: piece.arguments,
                    });
                }
            }
        }
        if let Some(entries) = logprobs {
            on_delta(Delta::Logprobs(entries));
        }
    }
}

/// One event of an OpenAI chat completion stream, as far as Parley reads it: borrowed from the event's
/// text where no escape forces a copy. (Read into typed fields rather than a `serde_json::Value`: a
/// fast reply's events are most of the agent's parsing.)
#[derive(Deserialize)]
struct OpenAiChunk<'a> {
    #[serde(default)]
    error: Option<Value>,
    /// Once a stream, and read as leniently as any JSON: token counts that are not integers count as none.
    #[serde(default)]
    usage: Option<Value>,
    #[serde(borrow, default)]
    choices: Option<Vec<OpenAiChoice<'a>>>,
}

#[derive(Deserialize)]
struct OpenAiChoice<'a> {
    #[serde(borrow, default)]
    delta: Option<OpenAiDelta<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
    #[serde(default)]
    logprobs: Option<OpenAiLogprobs>,
}

#[derive(Deserialize)]
struct OpenAiDelta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<OpenAiToolCall<'a>>>,
}

#[derive(Deserialize)]
struct OpenAiToolCall<'a> {
    #[serde(default)]
    index: Option<u32>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    function: Option<OpenAiFunction<'a>>,
}

#[derive(Deserialize)]
struct OpenAiFunction<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    arguments: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct OpenAiLogprobs {
    #[serde(default)]
    content: Option<Vec<Value>>,
}

impl OpenAiChunk<'_> {
    /// The first choice's `logprobs.content` entries, when there are any.
    fn logprobs(&self) -> Option<&[Value]> {
        let entries = self.choices.as_deref()?.first()?.logprobs.as_ref()?.content.as_deref()?;
        (!entries.is_empty()).then_some(entries)
    }
}

/// What one event of a stream carries.
#[derive(Debug, PartialEq)]
enum Pieces<'v> {
    None,
    Text(&'v str),
    Tools(Vec<ToolPiece<'v>>),
}

/// A piece of tool call `index`.
#[derive(Debug, PartialEq)]
struct ToolPiece<'v> {
    index: u32,
    id: Option<&'v str>,
    name: Option<&'v str>,
    arguments: &'v str,
}

#[derive(Default)]
struct StreamState {
    content: String,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    time_to_first_token: Option<Duration>,
    finish_reason: Option<FinishReason>,
    finished: bool,
    tool_calls: Vec<ToolCall>,
    /// Anthropic: the content block index of each tool call, in order.
    tool_blocks: Vec<u64>,
}

impl StreamState {
    fn add_tool_piece(&mut self, piece: &ToolPiece<'_>) {
        let index = piece.index as usize;
        if self.tool_calls.len() <= index {
            self.tool_calls.resize_with(index + 1, ToolCall::default);
        }
        let call = &mut self.tool_calls[index];
        if let Some(id) = piece.id {
            call.id = id.to_owned();
        }
        if let Some(name) = piece.name {
            call.name = name.to_owned();
        }
        call.arguments.push_str(piece.arguments);
    }

    fn read_openai<'v>(&mut self, chunk: &'v OpenAiChunk<'_>) -> Result<Pieces<'v>, ProviderError> {
        if let Some(error) = &chunk.error {
            return Err(ProviderError::Stream(
                error.get("message").and_then(Value::as_str).unwrap_or("error").to_owned(),
            ));
        }
        if let Some(usage) = chunk.usage.as_ref().filter(|usage| !usage.is_null()) {
            self.input_tokens = usage.get("prompt_tokens").and_then(Value::as_i64);
            self.output_tokens = usage.get("completion_tokens").and_then(Value::as_i64);
        }
        let Some(choice) = chunk.choices.as_deref().and_then(<[_]>::first) else {
            return Ok(Pieces::None);
        };
        if let Some(reason) = &choice.finish_reason {
            self.finish_reason = Some(FinishReason::from_openai(reason));
        }
        let Some(delta) = &choice.delta else {
            return Ok(Pieces::None);
        };
        if let Some(calls) = &delta.tool_calls {
            let pieces = calls
                .iter()
                .map(|call| {
                    let function = call.function.as_ref();
                    ToolPiece {
                        index: call.index.unwrap_or(0),
                        id: call.id.as_deref(),
                        name: function.and_then(|function| function.name.as_deref()),
                        arguments: function.and_then(|function| function.arguments.as_deref()).unwrap_or_default(),
                    }
                })
                .collect();
            return Ok(Pieces::Tools(pieces));
        }
        Ok(delta.content.as_deref().map_or(Pieces::None, Pieces::Text))
    }

    fn read_anthropic<'v>(&mut self, value: &'v Value) -> Result<Pieces<'v>, ProviderError> {
        let block = value.get("index").and_then(Value::as_u64).unwrap_or(0);
        match value.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                self.input_tokens = value.pointer("/message/usage/input_tokens").and_then(Value::as_i64);
                Ok(Pieces::None)
            }
            Some("content_block_start")
                if value.pointer("/content_block/type").and_then(Value::as_str) == Some("tool_use") =>
            {
                self.tool_blocks.push(block);
                Ok(Pieces::Tools(vec![ToolPiece {
                    index: (self.tool_blocks.len() - 1) as u32,
                    id: value.pointer("/content_block/id").and_then(Value::as_str),
                    name: value.pointer("/content_block/name").and_then(Value::as_str),
                    arguments: "",
                }]))
            }
            Some("content_block_delta") => match value.pointer("/delta/type").and_then(Value::as_str) {
                Some("input_json_delta") => {
                    let Some(index) = self.tool_blocks.iter().position(|known| *known == block) else {
                        return Err(ProviderError::Protocol("input_json_delta outside a tool_use block".to_owned()));
                    };
                    let arguments = value.pointer("/delta/partial_json").and_then(Value::as_str).unwrap_or_default();
                    Ok(Pieces::Tools(vec![ToolPiece { index: index as u32, id: None, name: None, arguments }]))
                }
                _ => Ok(value.pointer("/delta/text").and_then(Value::as_str).map_or(Pieces::None, Pieces::Text)),
            },
            Some("message_delta") => {
                if let Some(output) = value.pointer("/usage/output_tokens").and_then(Value::as_i64) {
                    self.output_tokens = Some(output);
                }
                if let Some(reason) = value.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.finish_reason = Some(FinishReason::from_anthropic(reason));
                }
                Ok(Pieces::None)
            }
            Some("message_stop") => {
                self.finished = true;
                Ok(Pieces::None)
            }
            Some("error") => {
                let message = value.pointer("/error/message").and_then(Value::as_str).unwrap_or("error");
                Err(ProviderError::Stream(message.to_owned()))
            }
            _ => Ok(Pieces::None),
        }
    }
}

/// A provider's answer that is not a success, with its `Retry-After` and error message.
async fn status_error(response: reqwest::Response) -> ProviderError {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let text = response.text().await.unwrap_or_default();
    ProviderError::Status { status, message: error_message(&text), retry_after }
}

/// What an embeddings call takes besides its inputs.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmbedOptions<'a> {
    /// The vectors' length, when the caller asked for one.
    pub dimensions: Option<u32>,
    /// The end user, for the provider's abuse monitoring.
    pub user: Option<&'a str>,
}

/// The vectors of one embeddings call, in the inputs' order, and the tokens they took.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub input_tokens: i64,
}

/// An OpenAI embeddings response: one vector per input, placed by its `index`; the tokens from
/// `usage.prompt_tokens`, estimated when the provider does not say.
fn read_embeddings(body: &[u8], inputs: &[String]) -> Result<Embedded, ProviderError> {
    #[derive(Deserialize)]
    struct Response {
        data: Vec<Item>,
        #[serde(default)]
        usage: Option<Usage>,
    }
    #[derive(Deserialize)]
    struct Item {
        index: usize,
        embedding: Vec<f32>,
    }
    #[derive(Deserialize)]
    struct Usage {
        prompt_tokens: i64,
    }
    let response: Response = serde_json::from_slice(body)
        .map_err(|error| ProviderError::Protocol(format!("an embeddings response: {error}")))?;
    let mut vectors = vec![None; inputs.len()];
    for item in response.data {
        match vectors.get_mut(item.index) {
            Some(slot @ None) => *slot = Some(item.embedding),
            _ => return Err(ProviderError::Protocol(format!("embedding index {} out of place", item.index))),
        }
    }
    let vectors: Option<Vec<Vec<f32>>> = vectors.into_iter().collect();
    let vectors = vectors.ok_or_else(|| ProviderError::Protocol("fewer embeddings than inputs".to_owned()))?;
    let estimated = || inputs.iter().map(|input| i64::from(parley_platform::tokens::estimate(input))).sum();
    let input_tokens = response.usage.map_or_else(estimated, |usage| usage.prompt_tokens);
    Ok(Embedded { vectors, input_tokens })
}

/// Anthropic takes the system prompt apart, and turns that alternate between user and assistant,
/// starting with the user: consecutive messages of one role are joined. Tool calls become `tool_use`
/// blocks of the assistant's turn, and tool results `tool_result` blocks of the user's; a turn of text
/// alone stays a string.
fn anthropic_messages(messages: &[PromptMessage]) -> (String, Vec<Value>) {
    let mut system = Vec::new();
    let mut turns: Vec<(&str, Vec<Value>)> = Vec::new();
    for message in messages {
        let (role, blocks) = match message.role.as_str() {
            "system" => {
                system.push(message.content.as_str());
                continue;
            }
            "assistant" => {
                let mut blocks = Vec::new();
                if !message.content.is_empty() || message.tool_calls.is_empty() {
                    blocks.push(json!({"type": "text", "text": message.content}));
                }
                for call in &message.tool_calls {
                    // Anthropic takes the arguments as an object; ones that are not JSON go as none.
                    let input = serde_json::from_str::<Value>(&call.arguments)
                        .ok()
                        .filter(Value::is_object)
                        .unwrap_or_else(|| json!({}));
                    blocks.push(json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input}));
                }
                ("assistant", blocks)
            }
            "tool" => {
                let id = message.tool_call_id.as_deref().unwrap_or_default();
                ("user", vec![json!({"type": "tool_result", "tool_use_id": id, "content": message.content})])
            }
            _ if !message.parts.is_empty() => ("user", message.parts.iter().map(anthropic_part).collect()),
            _ => ("user", vec![json!({"type": "text", "text": message.content})]),
        };
        match turns.last_mut() {
            Some((last_role, last_blocks)) if *last_role == role => last_blocks.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    if turns.first().is_some_and(|(role, _)| *role == "assistant") {
        turns.insert(0, ("user", vec![json!({"type": "text", "text": "(conversation continues)"})]));
    }
    let turns = turns
        .into_iter()
        .map(|(role, blocks)| {
            let texts: Option<Vec<&str>> = blocks
                .iter()
                .map(|block| (block["type"] == "text").then(|| block["text"].as_str().unwrap_or_default()))
                .collect();
            match texts {
                Some(texts) => json!({"role": role, "content": texts.join("\n\n")}),
                None => json!({"role": role, "content": blocks}),
            }
        })
        .collect();
    (system.join("\n\n"), turns)
}

/// An OpenAI content part (text or `image_url`) as an Anthropic content block: an inline image as
/// base64 data with its media type, any other as a URL Anthropic fetches.
fn anthropic_part(part: &Value) -> Value {
    let Some(url) = part.pointer("/image_url/url").and_then(Value::as_str) else {
        return json!({"type": "text", "text": part.get("text").cloned().unwrap_or_default()});
    };
    let inline = url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
        .map(|(media_type, data)| json!({"type": "base64", "media_type": media_type, "data": data}));
    json!({"type": "image", "source": inline.unwrap_or_else(|| json!({"type": "url", "url": url}))})
}

/// OpenAI's function tools in Anthropic's shape.
fn anthropic_tools(tools: &[Value]) -> Value {
    let tools = tools
        .iter()
        .map(|tool| {
            let function = tool.get("function").cloned().unwrap_or_default();
            let mut converted = json!({
                "name": function.get("name").cloned().unwrap_or_default(),
                "input_schema": function.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"})),
            });
            if let Some(description) = function.get("description") {
                converted["description"] = description.clone();
            }
            converted
        })
        .collect();
    Value::Array(tools)
}

/// OpenAI's `tool_choice` and `parallel_tool_calls` as Anthropic's `tool_choice`.
fn anthropic_tool_choice(params: &parley_platform::sampling::Sampling) -> Option<Value> {
    let mut choice = match &params.tool_choice {
        None if params.parallel_tool_calls == Some(false) && !params.tools.is_empty() => json!({"type": "auto"}),
        None => return None,
        Some(Value::String(kind)) => match kind.as_str() {
            "none" => json!({"type": "none"}),
            "required" => json!({"type": "any"}),
            _ => json!({"type": "auto"}),
        },
        Some(named) => json!({"type": "tool", "name": named.pointer("/function/name").cloned().unwrap_or_default()}),
    };
    if params.parallel_tool_calls == Some(false) && choice["type"] != "none" {
        choice["disable_parallel_tool_use"] = json!(true);
    }
    Some(choice)
}

/// The error message of an OpenAI- or Anthropic-style error body, else a short prefix of the body.
fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|value| value.pointer("/error/message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(200).collect())
}

/// A transport error's text without the URL, which may carry a key in its query.
fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "<provider>");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_failures_are_transient_ones() {
        let status = |status| ProviderError::Status { status, message: String::new(), retry_after: None };
        assert!(status(429).is_retryable());
        assert!(status(503).is_retryable());
        assert!(status(401).is_retryable(), "another key may work");
        assert!(!status(400).is_retryable());
        assert!(!status(429).is_provider_fault());
        assert!(status(502).is_provider_fault());
        assert!(ProviderError::FirstTokenTimeout(Duration::from_secs(1)).is_retryable());
        assert!(!ProviderError::Protocol("x".into()).is_retryable());
    }

    #[test]
    fn an_openai_call_carries_the_prompt_the_longest_reply_and_every_sampling_parameter() {
        let params = parley_platform::sampling::Sampling {
            temperature: Some(0.5),
            stop: vec!["end".to_owned()],
            user: Some("someone".to_owned()),
            ..Default::default()
        };
        let messages = [PromptMessage {
            role: "user".to_owned(),
            content: "hi".to_owned(),
            parts: Vec::new(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }];
        let body = OpenAiRequest {
            model: "m",
            messages: &messages,
            stream: true,
            stream_options: StreamOptions { include_usage: true },
            max_tokens: 7,
            params: &params,
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": true,
                "stream_options": {"include_usage": true},
                "max_tokens": 7,
                "temperature": 0.5,
                "stop": ["end"],
                "user": "someone",
            })
        );
    }

    #[test]
    fn error_messages_come_from_the_provider_shapes() {
        assert_eq!(error_message(r#"{"error":{"message":"bad model"}}"#), "bad model");
        assert_eq!(error_message(r#"{"type":"error","error":{"type":"overloaded_error","message":"busy"}}"#), "busy");
        assert_eq!(error_message("plain text"), "plain text");
    }

    #[test]
    fn anthropic_turns_alternate_and_the_system_prompt_is_apart() {
        let message = |role: &str, content: &str| PromptMessage::new(role, content);
        let (system, turns) = anthropic_messages(&[
            message("system", "be brief"),
            message("assistant", "hello"),
            message("user", "a"),
            message("user", "b"),
        ]);
        assert_eq!(system, "be brief");
        assert_eq!(turns.len(), 3);
        assert_eq!(turns[0]["role"], "user");
        assert_eq!(turns[1]["role"], "assistant");
        assert_eq!(turns[2]["content"], "a\n\nb");
    }

    #[test]
    fn anthropic_events_give_text_and_usage() {
        let mut state = StreamState::default();
        let start = json!({"type": "message_start", "message": {"usage": {"input_tokens": 12}}});
        assert_eq!(state.read_anthropic(&start).unwrap(), Pieces::None);
        let delta = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}});
        assert_eq!(state.read_anthropic(&delta).unwrap(), Pieces::Text("Hi"));
        let end = json!({"type": "message_delta", "usage": {"output_tokens": 3}});
        state.read_anthropic(&end).unwrap();
        state.read_anthropic(&json!({"type": "message_stop"})).unwrap();
        assert_eq!((state.input_tokens, state.output_tokens, state.finished), (Some(12), Some(3), true));
        let error = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
        assert!(state.read_anthropic(&error).is_err());
    }

    #[test]
    fn anthropic_tool_use_blocks_are_tool_calls_and_results_go_back_as_blocks() {
        let mut state = StreamState::default();
        let text =
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me look."}});
        assert_eq!(state.read_anthropic(&text).unwrap(), Pieces::Text("Let me look."));
        let start = json!({"type": "content_block_start", "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}});
        let Pieces::Tools(pieces) = state.read_anthropic(&start).unwrap() else { panic!("a tool call") };
        assert_eq!(pieces, vec![ToolPiece { index: 0, id: Some("toolu_1"), name: Some("lookup"), arguments: "" }]);
        let json = json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"q\":"}});
        let Pieces::Tools(pieces) = state.read_anthropic(&json).unwrap() else { panic!("arguments") };
        assert_eq!(pieces[0].index, 0);
        assert_eq!(pieces[0].arguments, "{\"q\":");

        let call = ToolCall { id: "toolu_1".into(), name: "lookup".into(), arguments: "{\"q\":1}".into() };
        let (_, turns) = anthropic_messages(&[
            PromptMessage::new("user", "find it"),
            PromptMessage { tool_calls: vec![call], ..PromptMessage::new("assistant", "") },
            PromptMessage { tool_call_id: Some("toolu_1".into()), ..PromptMessage::new("tool", "found") },
        ]);
        assert_eq!(turns[0]["content"], "find it");
        assert_eq!(
            turns[1]["content"],
            json!([{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": 1}}])
        );
        assert_eq!(turns[2]["content"], json!([{"type": "tool_result", "tool_use_id": "toolu_1", "content": "found"}]));
    }

    #[test]
    fn openai_tool_call_deltas_are_read_by_index() {
        let mut state = StreamState::default();
        let first = json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "lookup", "arguments": ""}}]}}]});
        let first = serde_json::to_string(&first).unwrap();
        let first: OpenAiChunk<'_> = serde_json::from_str(&first).unwrap();
        let Pieces::Tools(pieces) = state.read_openai(&first).unwrap() else { panic!("a tool call") };
        assert_eq!(pieces, vec![ToolPiece { index: 0, id: Some("call_1"), name: Some("lookup"), arguments: "" }]);
        let more = json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]});
        let more = serde_json::to_string(&more).unwrap();
        let more: OpenAiChunk<'_> = serde_json::from_str(&more).unwrap();
        let Pieces::Tools(pieces) = state.read_openai(&more).unwrap() else { panic!("arguments") };
        assert_eq!(pieces[0].arguments, "{}");
        let message = PromptMessage {
            tool_calls: vec![ToolCall { id: "call_1".into(), name: "lookup".into(), arguments: "{}".into() }],
            ..PromptMessage::new("assistant", "")
        };
        assert_eq!(
            serde_json::to_value(&message).unwrap(),
            json!({"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "lookup", "arguments": "{}"}}]})
        );
    }
}
