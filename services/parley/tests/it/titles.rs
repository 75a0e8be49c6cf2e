//! Generated titles: a conversation created without a title gets one from the model after its first
//! exchange, which clients see through the API and search finds; it is charged like any call; a title
//! the user gave is kept; and the feature can be turned off.

use std::time::Duration;

use parley::Service;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Session, TestPlatform, eventually};

async fn untitled_conversation(t: &TestPlatform, session: &Session) -> String {
    let (status, conversation) = t.post(session, "/v1/conversations", json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{conversation}");
    assert!(conversation["title"].is_null());
    conversation["id"].as_str().unwrap().to_owned()
}

async fn send(t: &TestPlatform, session: &Session, conversation: &str, content: &str) {
    let (status, exchange) =
        t.post(session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": content})).await;
    assert_eq!(status, StatusCode::OK, "{exchange}");
}

async fn title_calls(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM analytics.usage_events WHERE outcome = 'title'")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untitled_conversation_is_titled_after_its_first_exchange_and_charged_once() {
    let t = TestPlatform::start().await;
    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    let ada = t.register("ada-titles@example.com").await;
    let conversation = untitled_conversation(&t, &ada).await;
    send(&t, &ada, &conversation, "Plan a walking holiday in the Pyrenees").await;

    let titled: Value = eventually("a generated title", Duration::from_secs(10), || async {
        let (_, body) = t.get(&ada, &format!("/v1/conversations/{conversation}")).await;
        body["title"].is_string().then_some(body)
    })
    .await;
    let title = titled["title"].as_str().unwrap();
    assert!(!title.is_empty() && title.chars().count() <= 81, "{title}");
    assert_eq!(titled["version"], 2, "the title is a change clients can see: {titled}");
    // Two calls upstream (the reply and the title), and the title's usage event charged.
    assert_eq!(t.fake.requests(), 2);
    eventually("the title's usage event", Duration::from_secs(10), || async {
        (title_calls(&pool).await == 1).then_some(())
    })
    .await;
    // Search finds the conversation by its new title.
    let word = title.split(|c: char| !c.is_alphanumeric()).find(|word| word.len() > 2).unwrap().to_owned();
    let request = t.http.get(t.url("/v1/search")).bearer_auth(&ada.token).query(&[("q", word.as_str())]);
    let page: Value = request.send().await.unwrap().json().await.unwrap();
    assert!(page["data"].as_array().unwrap().iter().any(|hit| hit["message_id"].is_null()), "{word}: {page}");

    // The next exchange does not title it again; a conversation the user titled is never titled.
    send(&t, &ada, &conversation, "And in September?").await;
    let named = t.create_conversation(&ada, "My own name").await;
    send(&t, &ada, &named, "Hello").await;
    assert_eq!(t.fake.requests(), 4, "two replies, no title call");
    let (_, body) = t.get(&ada, &format!("/v1/conversations/{named}")).await;
    assert_eq!(body["title"], "My own name");
    let (_, body) = t.get(&ada, &format!("/v1/conversations/{conversation}")).await;
    assert_eq!(body["title"], title);
    assert_eq!(title_calls(&pool).await, 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn titles_can_be_turned_off() {
    let t = TestPlatform::start_with(|config| config.agent.titles = false, &Service::ALL).await;
    let ada = t.register("ada-untitled@example.com").await;
    let conversation = untitled_conversation(&t, &ada).await;
    send(&t, &ada, &conversation, "No title please").await;
    assert_eq!(t.fake.requests(), 1);
    let (_, body) = t.get(&ada, &format!("/v1/conversations/{conversation}")).await;
    assert!(body["title"].is_null(), "{body}");
    t.stop().await;
}
