//! Replies as server-sent events: `message.created`, `message.delta` (many), then `message.completed` or
//! `message.failed`, each with an `id:`. A `message.reset` among the deltas (a job taken over after its
//! agent died mid-reply) voids the text of the deltas before it: the reply starts again.
//!
//! Agents publish a reply's events on its NATS subject. Each gateway follows all of them through one
//! subscription (the reply hub, `crate::replies`) and hands them to its open streams from memory, so the
//! gateway holding the connection need not be anywhere near the agent doing the work. The
//! `<PREFIX>_EVENTS` JetStream stream records the same events for an hour: a stream the hub cannot
//! vouch for (a resume on a gateway that started mid-reply, say) reads them from there, so a client
//! that reconnects with `Last-Event-ID` gets every event after that id, and nothing twice.
//! The final event is built from the stored message, the source of truth; a re-read of the stored
//! message after a quiet spell ends the stream even if NATS lost the events.
//!
//! Event ids: `message.created` is 0, the delta (or reset) with index `i` is `i + 1`, the final event
//! follows the last delta.

use std::convert::Infallible;
use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use parley_platform::events::{MessageEvent, StoredReply};
use parley_platform::message_status::{self, MessageStatus};
use parley_proto::chat::v1 as pb;
use serde_json::json;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;
use crate::problem::{ApiError, ApiPath, ApiResult, Problem};
use crate::replies::{HubEvent, Watch};
use crate::views::MessageView;

/// How often an open stream re-reads the stored reply, in case its events were lost.
const SAFETY_POLL: Duration = Duration::from_secs(5);
/// For a reply already finished when the stream opens: how long to wait for recorded events.
const REPLAY_IDLE: Duration = Duration::from_millis(300);

/// Whether the client asked for an event stream.
pub fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.split(',').any(|part| part.trim().starts_with("text/event-stream")))
}

type EventSource = Pin<Box<dyn Stream<Item = Option<MessageEvent>> + Send>>;

/// Opens an ordered consumer over the message's recorded events, from the first one: for the streams
/// the reply hub cannot serve.
async fn open_source(state: &AppState, message_id: Uuid) -> Option<EventSource> {
    let stream = state
        .events_stream
        .get_or_try_init(|| {
            let jetstream = jetstream::new(state.nats.clone());
            let names = state.names.clone();
            let config = state.config.nats.clone();
            async move { parley_platform::nats::ensure_events_stream(&jetstream, &names, &config).await }
        })
        .await;
    let stream = match stream {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, "message events unavailable; the stream will end with the stored reply");
            return None;
        }
    };
    let config = jetstream::consumer::pull::OrderedConfig {
        filter_subject: state.names.message_events_subject(message_id),
        deliver_policy: DeliverPolicy::All,
        ..Default::default()
    };
    let consumer = match stream.create_consumer(config).await {
        Ok(consumer) => consumer,
        Err(error) => {
            tracing::warn!(%error, "could not follow message events");
            return None;
        }
    };
    let messages = match consumer.messages().await {
        Ok(messages) => messages,
        Err(error) => {
            tracing::warn!(%error, "could not follow message events");
            return None;
        }
    };
    Some(Box::pin(messages.map(|message| match message {
        Ok(message) => serde_json::from_slice::<MessageEvent>(&message.payload).ok(),
        Err(error) => {
            tracing::debug!(%error, "message event stream hiccup");
            None
        }
    })))
}

/// What a reply feed yields.
pub enum ReplyItem {
    Delta {
        index: u64,
        text: String,
    },
    /// The text of every delta before this one is void: the reply starts again.
    Reset {
        index: u64,
    },
    /// The stored reply, completed or failed; the last item.
    Finished(Box<pb::Message>),
}

/// The reply hub's events for one message, in the shape of the recorded ones.
fn hub_source(message_id: Uuid, watch: Watch) -> EventSource {
    let to_event = move |event: HubEvent| match event {
        HubEvent::Delta { index, text } => MessageEvent::Delta { message_id, index, text: text.to_string() },
        HubEvent::Reset { index } => MessageEvent::Reset { message_id, index },
        HubEvent::Ended(reply) => MessageEvent::Completed { message_id, reply: reply.map(|reply| (*reply).clone()) },
    };
    let backlog = futures::stream::iter(watch.backlog);
    let live =
        futures::stream::unfold(watch.live, |mut live| async move { live.recv().await.map(|event| (event, live)) });
    Box::pin(backlog.chain(live).map(move |event| Some(to_event(event))))
}

/// The created time of a reply, for the hub to judge whether it can have missed any of its events.
fn created_at(message: &pb::Message) -> time::OffsetDateTime {
    message
        .created_at
        .as_ref()
        .and_then(parley_platform::timestamps::from_proto)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// A reply's progress: its deltas after a given id, then the stored reply once finished.
pub struct ReplyFeed {
    state: AppState,
    user_id: Uuid,
    message_id: Uuid,
    /// The highest event id already delivered (delta index + 1).
    after: u64,
    source: Option<EventSource>,
    /// Whether `source` is the reply hub (which hands over to the recorded events on a gap).
    from_hub: bool,
    poll: Duration,
    done: bool,
}

impl ReplyFeed {
    /// Follows `assistant` from the first event after `after` (0: from the start): from this gateway's
    /// reply hub when it holds every event from there, else from the recorded events.
    pub async fn open(state: AppState, user_id: Uuid, assistant: &pb::Message, after: u64) -> Option<Self> {
        let message_id = Uuid::parse_str(&assistant.id).ok()?;
        let finished = message_status::is_finished(assistant);
        let watch = state.replies.watch(message_id, after, created_at(assistant));
        let from_hub = watch.is_some();
        let source = match watch {
            Some(watch) => Some(hub_source(message_id, watch)),
            None => open_source(&state, message_id).await,
        };
        let poll = if finished { REPLAY_IDLE } else { SAFETY_POLL };
        Some(Self { state, user_id, message_id, after, source, from_hub, poll, done: false })
    }

    pub fn message_id(&self) -> Uuid {
        self.message_id
    }

    /// How often an idle stream of this feed sends a heartbeat.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.state.config.http.stream_heartbeat_secs)
    }

    /// The highest event id delivered so far.
    pub fn last_event_id(&self) -> u64 {
        self.after
    }

    pub async fn next(&mut self) -> Option<ReplyItem> {
        if self.done {
            return None;
        }
        loop {
            let wait = async {
                match self.source.as_mut() {
                    Some(source) => tokio::time::timeout(self.poll, source.next()).await.ok(),
                    None => {
                        tokio::time::sleep(self.poll).await;
                        None
                    }
                }
            };
            // A gateway shutting down ends its streams; clients resume elsewhere with Last-Event-ID.
            let next = tokio::select! {
                _ = self.state.shutdown.cancelled() => {
                    self.done = true;
                    return None;
                }
                next = wait => next,
            };
            match next {
                Some(Some(Some(event @ (MessageEvent::Delta { .. } | MessageEvent::Reset { .. })))) => {
                    let index = event.index().unwrap_or_default();
                    if index < self.after {
                        continue;
                    }
                    if index > self.after && self.from_hub {
                        // The hub missed a delta (a NATS reconnect): the recorded events have it.
                        tracing::debug!(
                            index,
                            expected = self.after,
                            "gap in the hub's events; reading the recorded ones"
                        );
                        self.from_hub = false;
                        // Boxed, as below: a rare step whose future would otherwise sit inline in every
                        // open stream's state, for the stream's whole life.
                        self.source = Box::pin(open_source(&self.state, self.message_id)).await;
                        continue;
                    }
                    // A reset before any delta this client was sent voids nothing it holds.
                    let voids_nothing = self.after == 0;
                    self.after = index + 1;
                    match event {
                        MessageEvent::Delta { text, .. } => return Some(ReplyItem::Delta { index, text }),
                        _ if voids_nothing => continue,
                        _ => return Some(ReplyItem::Reset { index }),
                    }
                }
                // An unreadable event: skip it.
                Some(Some(None)) => continue,
                // The consumer ended: rely on the stored message from now on.
                Some(None) => self.source = None,
                // The end, carrying the reply as stored: no need to read it back.
                Some(Some(Some(MessageEvent::Completed { reply: Some(reply), .. }))) => {
                    self.done = true;
                    return Some(ReplyItem::Finished(Box::new(stored_message(self.message_id, &reply))));
                }
                // The end was announced, or all was quiet for a while: is the stored reply finished?
                Some(Some(Some(MessageEvent::Completed { .. } | MessageEvent::Failed { .. }))) | None => {}
            }
            if let Some(message) = Box::pin(finished_reply(&self.state, self.user_id, self.message_id)).await {
                self.done = true;
                return Some(ReplyItem::Finished(Box::new(message)));
            }
        }
    }
}

/// A completed reply as its `completed` event carried it, in the shape chat returns.
pub fn stored_message(message_id: Uuid, reply: &StoredReply) -> pb::Message {
    let at = |nanos: i64| {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
            .ok()
            .map(parley_platform::timestamps::to_proto)
    };
    pb::Message {
        id: message_id.to_string(),
        conversation_id: reply.conversation_id.to_string(),
        role: "assistant".to_owned(),
        content: reply.content.clone(),
        status: MessageStatus::Completed.as_str().to_owned(),
        state: pb::MessageState::Completed.into(),
        model: reply.model.clone(),
        usage: Some(pb::Usage { input_tokens: reply.input_tokens, output_tokens: reply.output_tokens }),
        created_at: at(reply.created_at_ns),
        completed_at: reply.completed_at_ns.and_then(at),
        error_code: None,
        error_detail: None,
        parent_id: reply.parent_id.map(|id| id.to_string()),
        branch: None,
        branches: None,
    }
}

/// The stored reply, if it is finished.
async fn finished_reply(state: &AppState, user_id: Uuid, message_id: Uuid) -> Option<pb::Message> {
    let request = pb::GetMessageRequest { user_id: user_id.to_string(), message_id: message_id.to_string() };
    match state.backends.chat.clone().get_message(request).await {
        Ok(message) => {
            let message = message.into_inner();
            message_status::is_finished(&message).then_some(message)
        }
        Err(status) => {
            tracing::warn!(code = ?status.code(), "could not read the reply being streamed");
            None
        }
    }
}

/// Parley's SSE events for one feed item.
fn to_event(feed: &ReplyFeed, item: ReplyItem) -> Event {
    let (name, id, data) = event_parts(feed, item);
    Event::default().event(name).id(id.to_string()).data(data.to_string())
}

/// The name, id and data of the event for one feed item, shared by SSE and WebSocket.
fn event_parts(feed: &ReplyFeed, item: ReplyItem) -> (&'static str, u64, serde_json::Value) {
    let id = feed.last_event_id();
    match item {
        ReplyItem::Delta { index, text } => {
            ("message.delta", id, json!({"message_id": feed.message_id(), "index": index, "text": text}))
        }
        ReplyItem::Reset { index } => ("message.reset", id, json!({"message_id": feed.message_id(), "index": index})),
        ReplyItem::Finished(message) if MessageStatus::of(&message) == Some(MessageStatus::Completed) => {
            let view = serde_json::to_value(MessageView::from(*message)).unwrap_or_default();
            ("message.completed", id + 1, view)
        }
        ReplyItem::Finished(message) => {
            let data = json!({
                "message_id": feed.message_id(),
                "code": message.error_code.unwrap_or_else(|| "upstream_unavailable".to_owned()),
                "detail": message.error_detail.unwrap_or_default(),
            });
            ("message.failed", id + 1, data)
        }
    }
}

/// Marks a response as an event stream proxies must not buffer.
pub fn unbuffered(mut response: Response) -> Response {
    // Tell buffering proxies (nginx) to pass events through as they come.
    response.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

pub fn heartbeat(interval: Duration) -> KeepAlive {
    KeepAlive::new().interval(interval).text("keep-alive")
}

/// The SSE response for `assistant`, preceded by `message.created` for `created` when given.
pub async fn respond(
    state: AppState,
    user_id: Uuid,
    created: Option<pb::Message>,
    assistant: pb::Message,
    after: Option<u64>,
) -> ApiResult<Response> {
    let created = created.filter(|_| after.is_none()).map(|created| {
        let data = serde_json::to_string(&MessageView::from(created)).unwrap_or_default();
        Event::default().event("message.created").id("0").data(data)
    });
    let feed = ReplyFeed::open(state, user_id, &assistant, after.unwrap_or(0))
        .await
        .ok_or_else(|| ApiError::not_found("message"))?;
    let keep_alive = heartbeat(feed.heartbeat_interval());
    let created = futures::stream::iter(created.map(Ok::<_, Infallible>));
    let replies = futures::stream::unfold(feed, |mut feed| async move {
        let item = feed.next().await?;
        let event = to_event(&feed, item);
        Some((Ok::<_, Infallible>(event), feed))
    });
    Ok(unbuffered(Sse::new(created.chain(replies)).keep_alive(keep_alive).into_response()))
}

/// Follow (or replay) a reply's events; with `Last-Event-ID`, resume after that event.
#[utoipa::path(get, path = "/v1/messages/{id}/events", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path), ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event")),
    responses(
        (status = 200, description = "An event stream: message.delta events (a message.reset among them voids the text before it), then message.completed or message.failed", content_type = "text/event-stream"),
        (status = 400, description = "Malformed Last-Event-ID", body = Problem),
        (status = 404, body = Problem),
    ))]
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let after = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::invalid_field("Last-Event-ID", "must be an event id from this stream"))?,
        ),
    };
    let request = pb::GetMessageRequest { user_id: caller.user_id.to_string(), message_id: id };
    let message = state.backends.chat.clone().get_message(request).await?.into_inner();
    if message.role != "assistant" {
        return Err(ApiError::not_found("reply"));
    }
    respond(state, caller.user_id, None, message, after).await
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SocketQuery {
    /// Resume after this event id.
    pub last_event_id: Option<u64>,
    /// The bearer credential, for clients (browsers) that cannot set the Authorization header on a
    /// WebSocket handshake. Read by the request pipeline, where it passes the same checks as a header
    /// (signatures, rate limits).
    #[allow(dead_code)]
    pub access_token: Option<String>,
}

/// The same events as `/v1/messages/{id}/events`, over a WebSocket: one JSON text frame per event,
/// `{"event", "id", "data"}`, then a close frame after the final event.
#[utoipa::path(get, path = "/v1/messages/{id}/ws", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path), SocketQuery),
    responses(
        (status = 101, description = "WebSocket: one JSON text frame per event ({event, id, data})"),
        (status = 401, body = Problem),
        (status = 404, body = Problem),
    ))]
pub async fn websocket(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    query: Result<axum::extract::Query<SocketQuery>, axum::extract::rejection::QueryRejection>,
    caller: Result<Caller, ApiError>,
    upgrade: Result<axum::extract::ws::WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let axum::extract::Query(query) = query.map_err(super::query_rejection)?;
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::invalid_field("Upgrade", format!("this route speaks WebSocket only: {}", rejection.body_text()))
    })?;
    // The credential, from the header or the query string, went through the request pipeline.
    let caller = caller?;
    let request = pb::GetMessageRequest { user_id: caller.user_id.to_string(), message_id: id };
    let message = state.backends.chat.clone().get_message(request).await?.into_inner();
    if message.role != "assistant" {
        return Err(ApiError::not_found("reply"));
    }
    let feed = ReplyFeed::open(state, caller.user_id, &message, query.last_event_id.unwrap_or(0))
        .await
        .ok_or_else(|| ApiError::not_found("message"))?;
    Ok(upgrade.on_upgrade(move |socket| relay_to_socket(socket, feed)))
}

async fn relay_to_socket(mut socket: axum::extract::ws::WebSocket, mut feed: ReplyFeed) {
    use axum::extract::ws::Message;
    // The first ping is one period away (a first `tick().await` would wait for the timer wheel).
    let every = feed.heartbeat_interval();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            item = feed.next() => {
                let Some(item) = item else { break };
                let finished = matches!(item, ReplyItem::Finished(_));
                let (event, id, data) = event_parts(&feed, item);
                let frame = json!({"event": event, "id": id.to_string(), "data": data}).to_string();
                if socket.send(Message::Text(frame.into())).await.is_err() || finished {
                    break;
                }
            }
            incoming = socket.recv() => match incoming {
                // The client left: the reply carries on without it.
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                    return;
                }
            }
        }
    }
    let _already_gone = socket.send(Message::Close(None)).await;
}
