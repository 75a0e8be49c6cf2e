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

use crate::harness::{ALL_BUT_AGENT, TestPlatform, eventually};

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

    // Completing an already completed message changes nothing.
    let mut chat = ChatServiceClient::connect(t.config.grpc.chat_url.clone()).await.unwrap();
    let again = chat
        .complete_message(CompleteMessageRequest {
            message_id: reply_id.clone(),
            content: "a second, different reply".to_owned(),
            usage: None,
            model: "parley-fake".to_owned(),
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
    use crate::harness::SseReader;

    let mut t = TestPlatform::start_with(
        |config| {
            config.nats.job_ack_wait_secs = 2;
            config.fake_llm.tokens_per_second = 10.0;
        },
        ALL_BUT_AGENT,
    )
    .await;
    t.launch(&[Service::Agent]).await;
    let session = t.register("killed@example.com").await;
    let conversation = t.create_conversation(&session, "killed mid-stream").await;
    let response = t
        .http
        .post(t.url(&format!("/v1/conversations/{conversation}/messages")))
        .bearer_auth(&session.token)
        .header("accept", "text/event-stream")
        .json(&json!({"content": "survive a crash"}))
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(response);
    assert_eq!(reader.next().await.unwrap().event, "message.created");
    let first = reader.next().await.unwrap();
    assert_eq!(first.event, "message.delta");

    // The agent dies mid-reply, holding the job; a new one starts.
    t.kill_launched(0).await;
    t.launch(&[Service::Agent]).await;

    // The same stream carries on to the end: ids keep increasing, and the final reply is stored once.
    let mut ids = vec![first.id.clone().unwrap().parse::<u64>().unwrap()];
    let last = loop {
        let event = reader.next().await.unwrap();
        if event.event != "message.delta" {
            break event;
        }
        ids.push(event.id.unwrap().parse().unwrap());
    };
    assert_eq!(last.event, "message.completed", "{last:?}");
    assert!(ids.windows(2).all(|pair| pair[1] > pair[0]), "event ids never repeat: {ids:?}");
    assert_eq!(last.data["content"], parley_fake_llm::reply_for("survive a crash"));
    let (_, messages) = t.get(&session, &format!("/v1/conversations/{conversation}/messages")).await;
    let replies: Vec<_> = messages["data"].as_array().unwrap().iter().filter(|m| m["role"] == "assistant").collect();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0]["status"], "completed");
    assert_eq!(t.fake.requests(), 2, "the dead agent's call and the new agent's call");
    t.stop().await;
}
