//! Another user's resources do not exist for you: every one is a 404, never a 403.

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{TestPlatform, assert_problem};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_conversations_and_messages_are_not_found() {
    let t = TestPlatform::start().await;
    let owner = t.register("owner@example.com").await;
    let stranger = t.register("stranger@example.com").await;
    let conversation = t.create_conversation(&owner, "private").await;
    let (status, exchange) =
        t.post(&owner, &format!("/v1/conversations/{conversation}/messages"), json!({"content": "secret"})).await;
    assert_eq!(status, StatusCode::OK);
    let message = exchange["assistant_message"]["id"].as_str().unwrap().to_owned();

    for path in [
        format!("/v1/conversations/{conversation}"),
        format!("/v1/conversations/{conversation}/messages"),
        format!("/v1/messages/{message}"),
    ] {
        let (status, body) = t.get(&stranger, &path).await;
        assert_problem(status, &body, 404, "not_found");
    }
    let (status, body) =
        t.post(&stranger, &format!("/v1/conversations/{conversation}/messages"), json!({"content": "let me in"})).await;
    assert_problem(status, &body, 404, "not_found");
    let response = t
        .http
        .patch(t.url(&format!("/v1/conversations/{conversation}")))
        .bearer_auth(&stranger.token)
        .header("if-match", "\"1\"")
        .json(&json!({"title": "mine now"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(t.delete(&stranger, &format!("/v1/conversations/{conversation}")).await, StatusCode::NOT_FOUND);
    let (_, list) = t.get(&stranger, "/v1/conversations").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    let (_, usage) = t.get(&stranger, "/v1/usage").await;
    assert_eq!(usage["totals"]["requests"], 0);

    // Ids that are not even UUIDs name nothing either.
    let (status, body) = t.get(&stranger, "/v1/conversations/not-a-uuid").await;
    assert_problem(status, &body, 404, "not_found");

    // The owner still has everything.
    let (_, messages) = t.get(&owner, &format!("/v1/conversations/{conversation}/messages")).await;
    assert_eq!(messages["data"].as_array().unwrap().len(), 2);
    t.stop().await;
}
