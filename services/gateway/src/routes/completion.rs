//! A stateless completion, whichever wire format asked for it (OpenAI's Chat Completions at
//! `/v1/chat/completions`, Anthropic's Messages at `/v1/messages`): the budget reservation, the agent
//! call whose reply streams back over it, and that reply read whole. Each wire format reads its own
//! request into a [`Prompt`] and writes the reply in its own shape; everything between is here, once.

use axum::http::HeaderMap;
use parley_platform::finish::FinishReason;
use parley_platform::sampling::Sampling;
use parley_platform::{ErrorCode, ServiceError};
use parley_proto::agent::v1 as agent_pb;
use parley_proto::chat::v1 as pb;
use serde_json::Value;
use uuid::Uuid;

use super::messages::finish_even_if_abandoned;
use crate::AppState;
use crate::auth::Caller;
use crate::pipeline::{release_budget, reserve_budget};
use crate::problem::ApiError;

/// When every provider failed: how long a client should wait before trying again.
pub const UPSTREAM_RETRY_AFTER_SECS: u64 = 5;

/// A completion request, checked, in the agent's terms.
pub struct Prompt {
    pub model: String,
    pub messages: Vec<pb::PromptMessage>,
    pub sampling: Sampling,
    /// The longest reply, at most the configured one.
    pub longest_reply: u32,
    /// How many images the messages carry (each is estimated at a fixed number of tokens).
    pub images: u32,
    /// Whether the client reads the reply only once it is whole (no `stream`): the agent then sends
    /// it in one piece.
    pub whole: bool,
}

/// A prompt's tokens, counted as the agent counts a prompt without a tokenizer (so that the agent need
/// not raise a reservation made by this count).
pub fn prompt_tokens(prompt: &Prompt) -> i64 {
    prompt
        .messages
        .iter()
        .map(|message| i64::from(parley_platform::tokens::estimate_message(&message.content)))
        .sum::<i64>()
        + i64::from(prompt.images) * i64::from(parley_platform::tokens::IMAGE_ESTIMATE)
}

/// A completion under way: its id and the agent's stream of its events.
pub struct Started {
    pub id: Uuid,
    pub reply: tonic::Streaming<agent_pb::CompleteEvent>,
}

/// Reserves the prompt's budget and asks an agent for the completion ([`with_reservation`]).
pub async fn start(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    prompt: Prompt,
) -> Result<Started, ApiError> {
    let estimated_tokens = prompt_tokens(&prompt) + i64::from(prompt.longest_reply);
    let id = Uuid::now_v7();
    let call = agent_pb::CompleteRequest {
        completion_id: id.to_string(),
        user_id: caller.user_id.to_string(),
        tier: caller.tier.clone(),
        model: prompt.model,
        messages: prompt.messages,
        options: Some(super::generation_options(headers, &prompt.sampling)),
        // Filled in once the budget is reserved.
        reservation_id: String::new(),
        reserved_tokens: estimated_tokens,
        max_tokens: prompt.longest_reply,
        whole: prompt.whole,
    };
    let reply = with_reservation(state, caller, estimated_tokens, move |state, reservation_id| async move {
        let call = agent_pb::CompleteRequest { reservation_id, ..call };
        state.backends.agent.clone().complete(call).await.map(tonic::Response::into_inner)
    })
    .await?;
    Ok(Started { id, reply })
}

/// Reserves `tokens` of the caller's budget and makes `call` with the reservation's id. Both run in a
/// task of their own, so a client that hangs up in between cannot leave a reservation held for a call
/// nobody made; a call that fails (the agent refused before the model was called, or every provider
/// failed) gives the reservation back at once.
pub async fn with_reservation<T, F, Fut>(state: &AppState, caller: &Caller, tokens: i64, call: F) -> Result<T, ApiError>
where
    F: FnOnce(AppState, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, tonic::Status>> + Send,
    T: Send + 'static,
{
    let (state, caller) = (state.clone(), caller.clone());
    let work = {
        let state = state.clone();
        async move {
            let reservation = reserve_budget(&state, &caller, tokens).await?;
            match call(state.clone(), reservation.clone()).await {
                Ok(reply) => Ok(reply),
                Err(status) => {
                    release_budget(&state, &caller, &reservation).await;
                    Err(ApiError::from(status))
                }
            }
        }
    };
    finish_even_if_abandoned(&state, work).await
}

/// A whole reply: its text, its log probabilities (when asked for) and how it ended.
pub struct Collected {
    pub content: String,
    pub logprobs: Vec<Value>,
    pub done: agent_pb::CompleteDone,
}

/// Reads a reply to its end.
pub async fn collect(mut reply: tonic::Streaming<agent_pb::CompleteEvent>) -> Result<Collected, tonic::Status> {
    let mut content = String::new();
    let mut logprobs = Vec::new();
    while let Some(event) = reply.message().await? {
        match event.event {
            Some(agent_pb::complete_event::Event::Delta(text)) => content.push_str(&text),
            Some(agent_pb::complete_event::Event::Logprobs(entries)) => {
                if let Ok(Value::Array(entries)) = serde_json::from_str(&entries) {
                    logprobs.extend(entries);
                }
            }
            Some(agent_pb::complete_event::Event::Done(done)) => return Ok(Collected { content, logprobs, done }),
            // The whole calls come with `done`.
            Some(agent_pb::complete_event::Event::ToolCall(_)) | None => {}
        }
    }
    Err(ended_early().into())
}

/// A reply that ended before its `done`.
pub fn ended_early() -> ServiceError {
    ServiceError::new(ErrorCode::UpstreamUnavailable, "the reply ended before it was whole")
        .retry_after(UPSTREAM_RETRY_AFTER_SECS)
}

/// Why the model stopped, in OpenAI's words, as the provider said (`stop` when it did not;
/// `tool_calls` when it called tools and said nothing).
pub fn finish_reason(done: &agent_pb::CompleteDone) -> FinishReason {
    match done.finish_reason.as_str() {
        "" if !done.tool_calls.is_empty() => FinishReason::ToolCalls,
        "" => FinishReason::Stop,
        said => FinishReason::from_openai(said),
    }
}

/// Whether an image URL is one a provider can fetch (http or https) or decode (a base64 `data:image/`
/// URL).
pub fn is_image_url(url: &str) -> bool {
    let fetchable = url.starts_with("https://") || url.starts_with("http://");
    let inline = url.strip_prefix("data:image/").is_some_and(|rest| rest.contains(";base64,"));
    fetchable || inline
}
