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
