//! Sending messages and reading them back.
//!
//! A send checks the caller's budget, has chat store the user message, a pending reply and the AI job
//! in one transaction, then waits for the reply on the message's NATS subject (with a slow poll of the
//! stored message as a safety net, since core NATS may drop an event). Past the configured wait the
//! answer is 202 with the reply still pending; it is finished in the background all the same.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use parley_platform::events::MessageEvent;
use parley_platform::message_status::is_finished;
use parley_platform::{ErrorCode, ServiceError};
use parley_proto::chat::v1 as pb;
use uuid::Uuid;

use super::{PageQuery, page_limit, query_rejection};
use crate::AppState;
use crate::auth::Caller;
use crate::pipeline::{release_budget, reserve_budget};
use crate::problem::{ApiError, ApiJson, ApiPath, ApiResult, Problem};
use crate::replies::HubEvent;
use crate::timing::ModelWait;
use crate::views::{ExchangeView, MessageView, Page, RegenerateBody, SendMessageBody, SiblingsView};

const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// How often a waiting send re-reads the stored reply in case its completion event was lost.
const SAFETY_POLL: Duration = Duration::from_secs(2);

/// Runs `work` to its end even if the client hangs up meanwhile (which drops the handler): a send
/// that reached chat is not cut off mid-transaction, and a reservation it took is released when
/// nothing was queued, instead of being held until it expires. The gateway waits for these at shutdown.
pub async fn finish_even_if_abandoned<T, F>(state: &AppState, work: F) -> Result<T, ApiError>
where
    F: std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
    T: Send + 'static,
{
    // The task carries on the request's trace and request id.
    let work = tracing::Instrument::instrument(work, tracing::Span::current());
    let request_id = parley_platform::grpc::REQUEST_ID.try_with(Clone::clone).unwrap_or_default();
    let work = parley_platform::grpc::REQUEST_ID.scope(request_id, work);
    state.tasks.spawn(work).await.map_err(|error| {
        tracing::error!(%error, "a send's task failed");
        ApiError(ServiceError::internal())
    })?
}

/// Send a message and get the assistant's reply: streamed as server-sent events with
/// `Accept: text/event-stream`, else in one response once finished.
#[utoipa::path(post, path = "/v1/conversations/{id}/messages", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key within 24 h return the first result")),
    request_body = SendMessageBody, responses(
    (status = 200, description = "The reply is finished (or, with Accept: text/event-stream, the event stream)", body = ExchangeView),
    (status = 202, description = "The reply is still pending after the wait", body = ExchangeView),
    (status = 400, body = Problem),
    (status = 404, body = Problem),
    (status = 429, description = "Token budget exhausted (`quota_exceeded`)", body = Problem),
))]
pub async fn send(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(conversation_id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SendMessageBody>,
) -> ApiResult<Response> {
    send_into(state, caller, Target::Conversation(conversation_id), headers, body).await
}

/// Where an exchange goes in its conversation's tree: after the active branch of a conversation (a
/// send), or as a new version of a question (an edit) or of a reply (a regeneration), whose
/// conversation chat finds from the message.
enum Target {
    Conversation(String),
    Edit(String),
    Regenerate(String),
}

impl Target {
    /// The conversation's id, read through the message for an edit or a regeneration.
    async fn conversation_id(&self, state: &AppState, caller: &Caller) -> ApiResult<String> {
        let message_id = match self {
            Target::Conversation(id) => return Ok(id.clone()),
            Target::Edit(id) | Target::Regenerate(id) => id.clone(),
        };
        let request = pb::GetMessageRequest { user_id: caller.user_id.to_string(), message_id };
        Ok(state.backends.chat.clone().get_message(request).await?.into_inner().conversation_id)
    }
}

/// Edit one of your questions: a new version of it, a sibling after the same earlier message, with a
/// new reply; the conversation's active branch moves to it (the old version and its replies stay, see
/// `/v1/messages/{id}/siblings`). Answered as a send is.
#[utoipa::path(post, path = "/v1/messages/{id}/edit", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key within 24 h return the first result")),
    request_body = SendMessageBody, responses(
    (status = 200, description = "The reply is finished (or, with Accept: text/event-stream, the event stream)", body = ExchangeView),
    (status = 202, description = "The reply is still pending after the wait", body = ExchangeView),
    (status = 400, body = Problem),
    (status = 404, body = Problem),
    (status = 429, description = "Token budget exhausted (`quota_exceeded`)", body = Problem),
))]
pub async fn edit(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SendMessageBody>,
) -> ApiResult<Response> {
    send_into(state, caller, Target::Edit(id), headers, body).await
}

/// Answer a question again: a new version of one of the model's finished replies, a sibling after the
/// same question; the conversation's active branch moves to it. The body may name another model and
/// the sampling of a send (`{}` for the conversation's). Answered as a send is; 409 while the reply
/// is still being written.
#[utoipa::path(post, path = "/v1/messages/{id}/regenerate", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key within 24 h return the first result")),
    request_body = RegenerateBody, responses(
    (status = 200, description = "The reply is finished (or, with Accept: text/event-stream, the event stream)", body = ExchangeView),
    (status = 202, description = "The reply is still pending after the wait", body = ExchangeView),
    (status = 400, body = Problem),
    (status = 404, body = Problem),
    (status = 409, body = Problem),
    (status = 429, description = "Token budget exhausted (`quota_exceeded`)", body = Problem),
))]
pub async fn regenerate(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RegenerateBody>,
) -> ApiResult<Response> {
    send_into(state, caller, Target::Regenerate(id), headers, body.into_send()).await
}

/// The versions of a message (itself included, oldest first) and which one is on the conversation's
/// active branch.
#[utoipa::path(get, path = "/v1/messages/{id}/siblings", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path)), responses((status = 200, body = SiblingsView), (status = 404, body = Problem)))]
pub async fn siblings(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<SiblingsView>> {
    let request = pb::GetMessageRequest { user_id: caller.user_id.to_string(), message_id: id };
    let siblings = state.backends.chat.clone().list_siblings(request).await?.into_inner();
    Ok(Json(SiblingsView {
        data: siblings.messages.into_iter().map(MessageView::from).collect(),
        active_id: siblings.active_id,
    }))
}

async fn send_into(
    state: AppState,
    caller: Caller,
    target: Target,
    headers: HeaderMap,
    body: SendMessageBody,
) -> ApiResult<Response> {
    let idempotency_key = match headers.get(IDEMPOTENCY_KEY) {
        None => None,
        // Printable ASCII, spaces inside included (HTTP has already trimmed the ends); no tabs.
        Some(value)
            if (1..=parley_platform::limits::MAX_IDEMPOTENCY_KEY_CHARS).contains(&value.len())
                && value.as_bytes().iter().all(|byte| (0x20..=0x7e).contains(byte)) =>
        {
            Some(value.to_str().unwrap_or_default().to_owned())
        }
        Some(_) => {
            return Err(ApiError::invalid_field("Idempotency-Key", "must be 1 to 255 printable ASCII characters"));
        }
    };
    let sampling = body.sampling()?;
    if sampling.needs_provider_check() {
        // A parameter some provider cannot honour is refused by the model that would answer: the one
        // the send names, else its conversation's (read only in this case).
        let model = match &body.model {
            Some(model) => model.clone(),
            None => {
                let conversation_id = target.conversation_id(&state, &caller).await?;
                let request = pb::GetConversationRequest { user_id: caller.user_id.to_string(), conversation_id };
                state.backends.chat.clone().get_conversation(request).await?.into_inner().model
            }
        };
        parley_platform::sampling::check_model(&state.config, &model, &sampling)?;
    }
    let longest_reply = super::longest_reply(&state.config, body.max_tokens.map(|asked| ("max_tokens", asked)))?;
    let estimated_tokens = i64::from(parley_platform::tokens::estimate(&body.content)) + i64::from(longest_reply);
    let (conversation_id, edit_of, regenerate_of) = match target {
        Target::Conversation(id) => (id, None, None),
        Target::Edit(id) => (String::new(), Some(id), None),
        Target::Regenerate(id) => (String::new(), None, Some(id)),
    };
    let request = pb::SendMessageRequest {
        user_id: caller.user_id.to_string(),
        conversation_id,
        content: body.content,
        model: body.model,
        idempotency_key,
        tier: caller.tier.clone(),
        options: Some(super::generation_options(&headers, &sampling)),
        max_tokens: longest_reply,
        // Filled in once the budget is reserved, inside the task below.
        reservation_id: None,
        edit_of,
        regenerate_of,
    };
    let sending = {
        let (state, caller) = (state.clone(), caller.clone());
        async move {
            let reservation = reserve_budget(&state, &caller, estimated_tokens).await?;
            let request = pb::SendMessageRequest { reservation_id: Some(reservation.clone()), ..request };
            let sent = match state.backends.chat.clone().send_message(request).await {
                Ok(sent) => sent.into_inner(),
                Err(status) => {
                    release_budget(&state, &caller, &reservation).await;
                    return Err(ApiError::from(status));
                }
            };
            if sent.replayed {
                // The first request's job holds its own reservation; this one queued nothing.
                release_budget(&state, &caller, &reservation).await;
            }
            Ok(sent)
        }
    };
    let sent = finish_even_if_abandoned(&state, sending).await?;
    let assistant = sent.assistant_message.ok_or_else(|| ApiError(ServiceError::internal()))?;
    if super::streaming::wants_event_stream(&headers) {
        return super::streaming::respond(state, caller.user_id, sent.user_message, assistant, None).await;
    }
    let wait = Duration::from_secs(state.config.http.message_wait_secs);
    let (assistant, waited) = wait_for_reply(&state, caller.user_id, assistant, wait).await;
    let status = if is_finished(&assistant) { StatusCode::OK } else { StatusCode::ACCEPTED };
    let exchange = ExchangeView {
        user_message: sent.user_message.map(MessageView::from),
        assistant_message: Some(MessageView::from(assistant)),
    };
    let mut response = (status, Json(exchange)).into_response();
    response.extensions_mut().insert(ModelWait(waited));
    Ok(response)
}

/// Waits until `message` is finished or `wait` has passed; returns its latest state and the time spent.
/// The end is announced by the reply hub; the stored reply is re-read after a quiet spell in case the
/// announcement was lost, and up front when the hub cannot vouch for having seen every event.
pub async fn wait_for_reply(
    state: &AppState,
    user_id: Uuid,
    message: pb::Message,
    wait: Duration,
) -> (pb::Message, Duration) {
    let started = Instant::now();
    if is_finished(&message) {
        return (message, Duration::ZERO);
    }
    let Ok(message_id) = Uuid::parse_str(&message.id) else {
        return (message, Duration::ZERO);
    };
    let created_at = message.created_at.as_ref().and_then(parley_platform::timestamps::from_proto);
    let mut ending = match created_at.and_then(|created_at| state.replies.watch(message_id, u64::MAX, created_at)) {
        Some(watch) => Ending::Hub(watch),
        // Subscribe before reading, so a completion between the read and the subscription is not missed.
        None => match state.nats.subscribe(state.names.message_events_subject(message_id)).await {
            Ok(subscriber) => Ending::Subject(subscriber),
            Err(error) => {
                tracing::warn!(%error, "cannot subscribe to message events; polling instead");
                Ending::Unannounced
            }
        },
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut latest = message;
    // With the hub watching from before any event, nothing can have ended unseen: skip the first read.
    let mut read_now = !matches!(&ending, Ending::Hub(watch) if watch.backlog.is_empty());
    loop {
        if read_now {
            let request = pb::GetMessageRequest { user_id: user_id.to_string(), message_id: message_id.to_string() };
            match state.backends.chat.clone().get_message(request).await {
                Ok(current) => latest = current.into_inner(),
                Err(status) => {
                    tracing::warn!(code = ?status.code(), "could not re-read a pending reply")
                }
            }
        }
        if is_finished(&latest) || tokio::time::Instant::now() >= deadline {
            return (latest, started.elapsed());
        }
        let next_poll = (tokio::time::Instant::now() + SAFETY_POLL).min(deadline);
        read_now = true;
        tokio::select! {
            _ = tokio::time::sleep_until(next_poll) => {}
            reply = ending.announced(message_id) => if let Some(reply) = reply {
                // The end carried the reply as stored: no need to read it back (its place among its
                // versions is the one the send was given).
                latest = pb::Message { branch: latest.branch, branches: latest.branches, ..reply };
                read_now = false;
            },
        }
    }
}

/// Where the end of a reply is announced.
enum Ending {
    /// This gateway's reply hub, which has seen every event of the reply.
    Hub(crate::replies::Watch),
    /// The reply's own subject, for a reply the hub cannot vouch for.
    Subject(async_nats::Subscriber),
    /// Nowhere (NATS is unreachable): only re-reading the stored reply tells.
    Unannounced,
}

impl Ending {
    /// Resolves when the reply is announced ended, with the reply as stored when the announcement
    /// carried it; never, when the announcements stop.
    async fn announced(&mut self, message_id: Uuid) -> Option<pb::Message> {
        match self {
            Ending::Hub(watch) => {
                while let Some(event) = watch.live.recv().await {
                    if let HubEvent::Ended(reply) = event {
                        return reply.map(|reply| super::streaming::stored_message(message_id, &reply));
                    }
                }
            }
            Ending::Subject(subscriber) => {
                while let Some(event) = subscriber.next().await {
                    match serde_json::from_slice::<MessageEvent>(&event.payload) {
                        Ok(MessageEvent::Completed { reply, .. }) => {
                            return reply.map(|reply| super::streaming::stored_message(message_id, &reply));
                        }
                        Ok(MessageEvent::Failed { .. }) => return None,
                        _ => {}
                    }
                }
            }
            Ending::Unannounced => {}
        }
        futures::future::pending::<Option<pb::Message>>().await
    }
}

/// A conversation's messages, oldest first.
#[utoipa::path(get, path = "/v1/conversations/{id}/messages", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path), PageQuery), responses(
    (status = 200, body = Page<MessageView>),
    (status = 400, body = Problem),
    (status = 404, body = Problem),
))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(conversation_id): ApiPath<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<Json<Page<MessageView>>> {
    let Query(query) = query.map_err(query_rejection)?;
    let request = pb::ListMessagesRequest {
        user_id: caller.user_id.to_string(),
        conversation_id,
        limit: page_limit(query.limit.as_deref())?,
        cursor: query.cursor,
        all_branches: false,
    };
    let page = state.backends.chat.clone().list_messages(request).await?.into_inner();
    Ok(Json(Page { data: page.messages.into_iter().map(MessageView::from).collect(), next_cursor: page.next_cursor }))
}

/// Stop a reply while it is generated: the model's call ends, and what was streamed so far becomes the
/// finished reply, charged for what was generated. Answers 202 with the reply as it stands; the reply's
/// stream ends with `message.completed`. A reply that has not started streaming may finish whole.
#[utoipa::path(post, path = "/v1/messages/{id}/stop", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path)), responses(
    (status = 202, body = MessageView, description = "The stop was sent to the reply's agent"),
    (status = 400, body = Problem, description = "The message is a question, not a reply"),
    (status = 404, body = Problem),
    (status = 409, body = Problem, description = "The reply has already finished"),
))]
pub async fn stop(State(state): State<AppState>, caller: Caller, ApiPath(id): ApiPath<String>) -> ApiResult<Response> {
    let request = pb::GetMessageRequest { user_id: caller.user_id.to_string(), message_id: id };
    let message = state.backends.chat.clone().get_message(request).await?.into_inner();
    if message.role != "assistant" {
        return Err(ApiError::invalid_field("id", "names a question; only a reply can be stopped"));
    }
    if is_finished(&message) {
        return Err(ApiError::new(ErrorCode::Conflict, "the reply has already finished"));
    }
    let message_id = Uuid::parse_str(&message.id).map_err(|_| ApiError::new(ErrorCode::Internal, "bad message id"))?;
    let subject = state.names.stop_subject(message_id);
    if let Err(error) = state.nats.publish(subject, bytes::Bytes::new()).await {
        tracing::warn!(%error, "could not announce a stop");
        return Err(ApiError::new(ErrorCode::UpstreamUnavailable, "the stop could not be sent; try again"));
    }
    Ok((StatusCode::ACCEPTED, Json(MessageView::from(message))).into_response())
}

/// One message.
#[utoipa::path(get, path = "/v1/messages/{id}", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path)), responses((status = 200, body = MessageView), (status = 404, body = Problem)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<MessageView>> {
    let request = pb::GetMessageRequest { user_id: caller.user_id.to_string(), message_id: id };
    let message = state.backends.chat.clone().get_message(request).await?.into_inner();
    Ok(Json(MessageView::from(message)))
}
