//! Stopping a reply through the public API: the model's call ends, what was streamed is the finished
//! reply (stored once, charged for what was generated), and every wrong stop is refused clearly.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{SseReader, TestPlatform, assert_problem};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_reply_keeps_what_was_streamed_and_is_charged_for_it() {
    let t = TestPlatform::start_with(|config| config.fake_llm.tokens_per_second = 20.0, &parley::Service::ALL).await;
    let ada = t.register("ada-stop@example.com").await;
    let conversation = t.create_conversation(&ada, "Stop").await;
    let content = "tell me a very long story about a lighthouse keeper and the sea, with many chapters";
    // Temperature 0: a reply the response cache would keep, and hand to the same request after.
    let response = t.send_streaming(&ada, &conversation, json!({"content": content, "temperature": 0})).await;
    let mut reader = SseReader::new(response);
    let created = reader.next().await.unwrap();
    assert_eq!(created.event, "message.created");
    let question = created.data["id"].as_str().unwrap().to_owned();
    let first = reader.next().await.unwrap();
    assert_eq!(first.event, "message.delta");
    let reply = first.data["message_id"].as_str().unwrap().to_owned();
    let mut seen = first.data["text"].as_str().unwrap().to_owned();

    let (status, stopping) = t.post(&ada, &format!("/v1/messages/{reply}/stop"), json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{stopping}");
    assert_eq!(stopping["id"], reply.as_str());
    let completed = loop {
        let event = reader.next().await.expect("the stream ends with the stopped reply");
        match event.event.as_str() {
            "message.delta" => seen.push_str(event.data["text"].as_str().unwrap()),
            "message.completed" => break event.data,
            other => panic!("unexpected {other}: {}", event.data),
        }
    };
    let whole = parley_fake_llm::reply_for(content);
    let stored = completed["content"].as_str().unwrap();
    assert_eq!(stored, seen, "the reply is what the client saw");
    assert!(stored.len() < whole.len() && whole.starts_with(stored), "stopped early: {stored:?}");
    assert!(completed["usage"]["output_tokens"].as_i64().unwrap() >= 1);
    let (_, message) = t.get(&ada, &format!("/v1/messages/{reply}")).await;
    assert_eq!(message["status"], "completed");
    assert_eq!(message["content"], stored);
    // Charged once, for what was generated.
    let usage =
        crate::harness::eventually("the stopped reply in the usage report", Duration::from_secs(10), || async {
            let (_, usage) = t.get(&ada, "/v1/usage").await;
            (usage["totals"]["requests"] == 1).then_some(usage)
        })
        .await;
    assert_eq!(usage["totals"]["output_tokens"], completed["usage"]["output_tokens"], "{usage}");

    // The cut-off reply was the stopping client's alone: the same request after gets a whole reply.
    let other = t.create_conversation(&ada, "Stop, again").await;
    let (status, again) = t
        .post(&ada, &format!("/v1/conversations/{other}/messages"), json!({"content": content, "temperature": 0}))
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["assistant_message"]["content"], whole.as_str());

    // A finished reply, a question and someone else's reply cannot be stopped.
    let (status, body) = t.post(&ada, &format!("/v1/messages/{reply}/stop"), json!({})).await;
    assert_problem(status, &body, 409, "conflict");
    let (status, body) = t.post(&ada, &format!("/v1/messages/{question}/stop"), json!({})).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "id");
    let bob = t.register("bob-stop@example.com").await;
    let (status, body) = t.post(&bob, &format!("/v1/messages/{reply}/stop"), json!({})).await;
    assert_problem(status, &body, 404, "not_found");
    let (status, body) = t.post(&bob, "/v1/messages/not-an-id/stop", json!({})).await;
    assert_problem(status, &body, 404, "not_found");
}
