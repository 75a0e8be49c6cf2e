//! An agent that dies holding a job: JetStream redelivers it, another agent finishes it, and the reply
//! is stored once.

use std::time::Duration;

use futures::StreamExt;
use parley::Service;
use parley_platform::events::AiJob;
use parley_platform::nats::Names;
use parley_proto::chat::v1::CompleteMessageRequest;
use parley_proto::chat::v1::chat_service_client::ChatServiceClient;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{ALL_BUT_AGENT, SseReader, TestPlatform, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_held_by_a_dead_agent_is_redelivered_and_answered_once() {
    let mut t = TestPlatform::start_with(
        |config| {
            config.nats.job_ack_wait_secs = 2;
            config.http.message_wait_secs = 1;
        },
        ALL_BUT_AGENT,
    )
    .await;
    let session = t.register("redelivery@example.com").await;
    let conversation = t.create_conversation(&session, "redelivery").await;

    // No agent runs yet: past the wait the reply is accepted but pending.
    let (status, exchange) = t
        .post(&session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": "anyone there?"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{exchange}");
    let reply_id = exchange["assistant_message"]["id"].as_str().unwrap().to_owned();
    assert_eq!(exchange["assistant_message"]["status"], "pending");

    // An agent takes the job from the shared consumer, then dies without acknowledging it.
    let nats = async_nats::connect(&t.config.nats.url).await.unwrap();
    let jetstream = async_nats::jetstream::new(nats);
    let names = Names::new(&t.config.nats.prefix);
    let consumer = parley_platform::nats::ensure_agent_consumer(&jetstream, &names, &t.config.nats).await.unwrap();
    let mut batch = consumer.fetch().max_messages(1).expires(Duration::from_secs(5)).messages().await.unwrap();
    let taken = batch.next().await.expect("the job was published").unwrap();
    let job: AiJob = serde_json::from_slice(&taken.payload).unwrap();
    assert_eq!(job.message_id.to_string(), reply_id);
    let carried = job.context.expect("a job published at once carries its context");
    assert_eq!(carried.history.last().map(|message| message.content.as_str()), Some("anyone there?"));
    drop(taken);
    drop(batch);

    // A healthy agent starts; once the dead one's hold lapses, the job is redelivered and answered.
    t.launch(&[Service::Agent]).await;
    let message = eventually("the reply to be completed", Duration::from_secs(30), || async {
        let (_, message) = t.get(&session, &format!("/v1/messages/{reply_id}")).await;
        (message["status"] == "completed").then_some(message)
    })
    .await;
    assert_eq!(message["content"], parley_fake_llm::reply_for("anyone there?"));
    let (_, messages) = t.get(&session, &format!("/v1/conversations/{conversation}/messages")).await;
    let assistants = messages["data"].as_array().unwrap().iter().filter(|m| m["role"] == "assistant").count();
    assert_eq!(assistants, 1, "exactly one stored reply");
    assert_eq!(t.fake.requests(), 1, "only the living agent called the model");
    // A redelivered job asks chat for its context, which says whether its reply is stored already.
    assert_eq!(t.metric("parley_agent_job_contexts_total{source=\"asked\"}").await, Some(1.0));
    assert_eq!(t.metric("parley_agent_job_contexts_total{source=\"carried\"}").await, None);

    // Completing an already completed message changes nothing.
    let mut chat = ChatServiceClient::connect(t.config.grpc.chat_url.clone()).await.unwrap();
    let again = chat
        .complete_message(CompleteMessageRequest {
            message_id: reply_id.clone(),
            content: "a second, different reply".to_owned(),
            usage: None,
            model: "parley-fake".to_owned(),
            // Left for the chat service to look up, as an older agent would.
            conversation_id: String::new(),
            user_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.changed);
    let (_, message) = t.get(&session, &format!("/v1/messages/{reply_id}")).await;
    assert_eq!(message["content"], parley_fake_llm::reply_for("anyone there?"));

    // The reply is accounted once.
    let usage = eventually("usage to be recorded", Duration::from_secs(10), || async {
        let (_, usage) = t.get(&session, "/v1/usage").await;
        (usage["totals"]["requests"].as_i64()? >= 1).then_some(usage)
    })
    .await;
    assert_eq!(usage["totals"]["requests"], 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_stream_leaves_the_job_to_another_and_one_reply_is_stored() {
    let Streaming { mut t, session, conversation, mut reader, first } =
        stream_with_one_agent("killed@example.com", "survive a crash").await;

    // The agent dies mid-reply, holding the job; a new one starts.
    t.kill_launched(0).await;
    t.launch(&[Service::Agent]).await;

    // The same stream carries on to the end: ids keep increasing, the new agent's `message.reset` voids
    // the dead one's text, and what the client assembles is the reply stored once.
    let mut live = Assembled::default();
    live.take(&first);
    let last = live.read_to_end(&mut reader).await;
    assert_eq!(last.event, "message.completed", "{last:?}");
    assert!(live.ids.windows(2).all(|pair| pair[1] > pair[0]), "event ids never repeat: {:?}", live.ids);
    assert_eq!(live.resets, 1, "the new agent started the reply again");
    let stored = parley_fake_llm::reply_for("survive a crash");
    assert_eq!(last.data["content"], stored);
    assert_eq!(live.text, stored, "the text the client assembled is the stored reply");
    let reply_id = last.data["id"].as_str().unwrap().to_owned();

    // Replayed, from the start and from each event on: the same text, over SSE and over a WebSocket.
    let reset_id = *live.ids.iter().find(|id| live.reset_ids.contains(id)).unwrap();
    for after in [None, Some(0), Some(1), Some(reset_id - 1), Some(reset_id), Some(reset_id + 1)] {
        let mut request = t.http.get(t.url(&format!("/v1/messages/{reply_id}/events"))).bearer_auth(&session.token);
        let mut replay = Assembled::default();
        if let Some(after) = after {
            request = request.header("last-event-id", after.to_string());
            replay.text = live.text_at(after);
        }
        let last = replay.read_to_end(&mut SseReader::new(request.send().await.unwrap())).await;
        assert_eq!(last.event, "message.completed");
        assert_eq!(replay.text, stored, "replayed after {after:?}: {:?}", replay.ids);
    }
    let socket_text = websocket_text(&t, &session, &reply_id, 1, live.text_at(1)).await;
    assert_eq!(socket_text, stored, "over a WebSocket, resumed after the first delta");

    let (_, messages) = t.get(&session, &format!("/v1/conversations/{conversation}/messages")).await;
    let replies: Vec<_> = messages["data"].as_array().unwrap().iter().filter(|m| m["role"] == "assistant").collect();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0]["status"], "completed");
    assert_eq!(t.fake.requests(), 2, "the dead agent's call and the new agent's call");

    // Both calls consumed tokens and both are charged, once each: the new agent reports the dead one's
    // attempt (its prompt and the text it streamed) as failed, beside its own reply.
    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    let charged: Vec<(String, i64, i64, String)> =
        eventually("both attempts to be charged", Duration::from_secs(10), || async {
            let rows: Vec<(String, i64, i64, String)> = sqlx::query_as(
                "SELECT outcome, input_tokens, output_tokens, message_id::text FROM analytics.usage_events
                 WHERE user_id = $1::uuid ORDER BY outcome",
            )
            .bind(&session.user_id)
            .fetch_all(&pool)
            .await
            .unwrap();
            let reported: i64 = rows.iter().map(|row| row.1 + row.2).sum();
            let settled = crate::quota::ledger_total(&t, &session.user_id).await == reported;
            (rows.len() >= 2 && settled).then_some(rows)
        })
        .await;
    let outcomes: Vec<&str> = charged.iter().map(|row| row.0.as_str()).collect();
    assert_eq!(outcomes, ["completed", "failed"], "{charged:?}");
    let abandoned = &charged[1];
    assert!(abandoned.1 > 0 && abandoned.2 > 0, "the abandoned attempt's prompt and streamed text: {charged:?}");
    assert_ne!(abandoned.3, reply_id, "under an event id of its own");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stopped_mid_stream_finishes_its_reply_before_it_exits() {
    let Streaming { mut t, session: _, conversation: _, mut reader, first } =
        stream_with_one_agent("drained@example.com", "finish what you started").await;

    // SIGTERM, as a rolling deploy sends it: the agent pulls nothing more and finishes the reply.
    let stopping = t.stop_launched(0);
    let mut live = Assembled::default();
    live.take(&first);
    let last = live.read_to_end(&mut reader).await;
    assert_eq!(last.event, "message.completed", "{last:?}");
    assert_eq!(live.resets, 0, "nothing was generated twice");
    let stored = parley_fake_llm::reply_for("finish what you started");
    assert_eq!(live.text, stored);
    tokio::time::timeout(Duration::from_secs(10), stopping).await.expect("the agent exits once drained").unwrap();
    assert_eq!(t.fake.requests(), 1, "one model call: the reply was not handed to another agent");
    t.stop().await;
}

/// What a client holds of a reply from its events: deltas appended, a reset voiding what came before.
#[derive(Default)]
struct Assembled {
    text: String,
    ids: Vec<u64>,
    reset_ids: Vec<u64>,
    resets: usize,
    /// The text held after each event id.
    history: Vec<(u64, String)>,
}

impl Assembled {
    /// Takes one event; false for the final one (or anything that is not a delta or a reset).
    fn take(&mut self, event: &crate::harness::SseEvent) -> bool {
        let id = event.id.as_deref().and_then(|id| id.parse().ok()).unwrap_or_default();
        match event.event.as_str() {
            "message.delta" => self.text.push_str(event.data["text"].as_str().unwrap()),
            "message.reset" => {
                self.text.clear();
                self.resets += 1;
                self.reset_ids.push(id);
            }
            _ => return false,
        }
        self.ids.push(id);
        self.history.push((id, self.text.clone()));
        true
    }

    /// Takes every event up to the final one, which it returns.
    async fn read_to_end(&mut self, reader: &mut SseReader) -> crate::harness::SseEvent {
        loop {
            let event = reader.next().await.unwrap();
            if !self.take(&event) {
                return event;
            }
        }
    }

    /// The text a client held once it had seen every event up to id `after`.
    fn text_at(&self, after: u64) -> String {
        self.history.iter().rev().find(|(id, _)| *id <= after).map(|(_, text)| text.clone()).unwrap_or_default()
    }
}

/// The reply's text as a WebSocket client assembles it, resuming after event `after` with `held`.
async fn websocket_text(
    t: &TestPlatform,
    session: &crate::harness::Session,
    reply_id: &str,
    after: u64,
    held: String,
) -> String {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let url = format!("{}/v1/messages/{reply_id}/ws?last_event_id={after}", t.base.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", session.token).parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut text = held;
    while let Some(frame) = socket.next().await {
        let Message::Text(frame) = frame.unwrap() else { continue };
        let event: serde_json::Value = serde_json::from_str(&frame).unwrap();
        match event["event"].as_str().unwrap() {
            "message.delta" => text.push_str(event["data"]["text"].as_str().unwrap()),
            "message.reset" => text.clear(),
            _ => break,
        }
    }
    text
}

/// A reply streaming from the one agent running, its first delta read.
struct Streaming {
    t: TestPlatform,
    session: crate::harness::Session,
    conversation: String,
    reader: SseReader,
    first: crate::harness::SseEvent,
}

/// Starts a platform whose one agent generates slowly (10 tokens a second, jobs held for 2 s without
/// a progress ack), sends `content` with an event stream and reads up to the reply's first delta.
async fn stream_with_one_agent(email: &str, content: &str) -> Streaming {
    let mut t = TestPlatform::start_with(
        |config| {
            config.nats.job_ack_wait_secs = 2;
            config.fake_llm.tokens_per_second = 10.0;
        },
        ALL_BUT_AGENT,
    )
    .await;
    t.launch(&[Service::Agent]).await;
    let session = t.register(email).await;
    let conversation = t.create_conversation(&session, content).await;
    let response = t.send_streaming(&session, &conversation, json!({"content": content})).await;
    let mut reader = SseReader::new(response);
    assert_eq!(reader.next().await.unwrap().event, "message.created");
    let first = reader.next().await.unwrap();
    assert_eq!(first.event, "message.delta");
    Streaming { t, session, conversation, reader, first }
}
