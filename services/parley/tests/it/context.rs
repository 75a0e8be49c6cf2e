//! Threads longer than the model's context window: the messages that fall out are folded into a
//! running summary, stored with the conversation and reused, so replies keep coming and each prompt
//! stays bounded however long the thread grows.

use std::time::Duration;

use parley::Service;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{TestPlatform, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_longer_than_the_window_gets_a_summary_and_still_answers() {
    let t = TestPlatform::start_with(
        |config| {
            config.models.get_mut("parley-fake").unwrap().context_window = 400;
            config.agent.max_output_tokens = 60;
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("long@example.com").await;
    let conversation = t.create_conversation(&session, "a long thread").await;
    let mut input_tokens = Vec::new();
    for turn in 1..=8 {
        let content = format!("Turn {turn}: {}", "tell me more about the history of tea in detail please. ".repeat(3));
        let (status, exchange) =
            t.post(&session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": content})).await;
        assert_eq!(status, StatusCode::OK, "{exchange}");
        let reply = &exchange["assistant_message"];
        assert_eq!(reply["status"], "completed", "{reply}");
        assert!(reply["content"].as_str().unwrap().contains(&format!("Turn {turn}:")), "the reply answers this turn");
        input_tokens.push(reply["usage"]["input_tokens"].as_i64().unwrap());
    }

    // A summary was written and stored with the conversation, sealed with its data key like what the
    // user wrote.
    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    let (summary, wrapped): (Option<String>, Vec<u8>) =
        sqlx::query_as("SELECT summary, data_key FROM chat.conversations WHERE id = $1::uuid")
            .bind(&conversation)
            .fetch_one(&pool)
            .await
            .unwrap();
    let summary = summary.expect("a running summary");
    assert!(parley_platform::envelope::is_sealed(&summary), "{summary}");
    let keyring = parley_platform::envelope::Keyring::new(&t.config.chat.content_keys).unwrap();
    let key = keyring.unwrap(uuid::Uuid::parse_str(&conversation).unwrap(), &wrapped).unwrap();
    let summary = key.open_text(parley_platform::envelope::Field::Summary, &summary).unwrap();
    assert!(summary.contains("Current summary") || summary.contains("New messages"), "{summary}");
    assert!(t.fake.requests() > 8, "summaries were written by the model: {} calls", t.fake.requests());

    // Each prompt stays within the window, even though the whole thread is far larger.
    let (_, messages) = t.get(&session, &format!("/v1/conversations/{conversation}/messages?limit=100")).await;
    let thread_chars: usize =
        messages["data"].as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap().chars().count()).sum();
    assert!(thread_chars / 4 > 2 * 400, "the thread itself is over twice the window: {thread_chars} characters");
    assert!(input_tokens.iter().all(|tokens| *tokens <= 400), "{input_tokens:?}");

    // The summary calls are reported and charged like any call, once per summary: a priced usage event
    // each (outcome "summary"), and its charge in the ledger under the event's id.
    let summaries: Vec<(String, i64, i64, Option<i64>)> =
        eventually("the summaries to be reported and charged", Duration::from_secs(10), || async {
            let rows: Vec<(String, i64, i64, Option<i64>)> = sqlx::query_as(
                "SELECT e.event_id::text, e.input_tokens + e.output_tokens, e.cost_micros, l.tokens
                 FROM analytics.usage_events e LEFT JOIN quota.ledger l ON l.reference_id = e.event_id::text
                 WHERE e.user_id = $1::uuid AND e.outcome = 'summary'",
            )
            .bind(&session.user_id)
            .fetch_all(&pool)
            .await
            .unwrap();
            (!rows.is_empty() && rows.iter().all(|(_, _, _, charged)| charged.is_some())).then_some(rows)
        })
        .await;
    for (event_id, tokens, cost, charged) in &summaries {
        assert!(*tokens > 0 && *cost > 0, "summary {event_id}: {tokens} tokens cost {cost}");
        assert_eq!(charged, &Some(*tokens), "summary {event_id} charged what it used");
    }
    pool.close().await;
    t.stop().await;
}

/// A reply's job carries what the reply needs of its conversation, read right after the send, so its
/// run asks chat for nothing; the model sees the system prompt and the thread all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_job_carries_its_context_so_the_agent_asks_for_none() {
    let t = TestPlatform::start().await;
    let session = t.register("carried@example.com").await;
    let (status, conversation) = t
        .post(&session, "/v1/conversations", json!({"title": "tea", "system_prompt": "Answer like a tea merchant."}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{conversation}");
    let messages = format!("/v1/conversations/{}/messages", conversation["id"].as_str().unwrap());
    for question in ["Which tea is green?", "And which is black?"] {
        let (status, exchange) = t.post(&session, &messages, json!({"content": question})).await;
        assert_eq!(status, StatusCode::OK, "{exchange}");
        assert_eq!(exchange["assistant_message"]["content"], parley_fake_llm::reply_for(question));
    }

    let prompt = t.fake.last_body().expect("the model was called")["messages"].clone();
    let sent: Vec<(&str, &str)> = prompt
        .as_array()
        .unwrap()
        .iter()
        .map(|message| (message["role"].as_str().unwrap(), message["content"].as_str().unwrap()))
        .collect();
    let first_reply = parley_fake_llm::reply_for("Which tea is green?");
    assert_eq!(
        sent,
        [
            ("system", "Answer like a tea merchant."),
            ("user", "Which tea is green?"),
            ("assistant", first_reply.as_str()),
            ("user", "And which is black?"),
        ]
    );
    let carried = eventually("both jobs to be counted", Duration::from_secs(5), || async {
        t.metric("parley_agent_job_contexts_total{source=\"carried\"}").await.filter(|count| *count >= 2.0)
    })
    .await;
    assert_eq!(carried, 2.0);
    assert_eq!(t.metric("parley_agent_job_contexts_total{source=\"asked\"}").await, None);
    t.stop().await;
}
