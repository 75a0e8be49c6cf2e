//! Branches through the public API: editing a question or regenerating a reply adds a version beside
//! the old one; the conversation follows its active branch in listings and in the model's context;
//! clients list a message's versions and switch branch; the export keeps every branch; idempotency
//! and bad input behave as for sends.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Session, TestPlatform, assert_problem, read};

async fn send(t: &TestPlatform, session: &Session, conversation: &str, content: &str) -> Value {
    let (status, exchange) =
        t.post(session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": content})).await;
    assert_eq!(status, StatusCode::OK, "{exchange}");
    exchange
}

fn id(value: &Value) -> String {
    value["id"].as_str().unwrap().to_owned()
}

async fn thread(t: &TestPlatform, session: &Session, conversation: &str) -> Vec<String> {
    let (status, page) = t.get(session, &format!("/v1/conversations/{conversation}/messages")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["data"].as_array().unwrap().iter().map(|message| message["content"].as_str().unwrap().to_owned()).collect()
}

/// The user messages of the fake model's last request, in order: what the model was shown.
fn shown(t: &TestPlatform) -> Vec<String> {
    let body = t.fake.last_body().unwrap();
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|message| message["role"] == "user")
        .map(|message| message["content"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_and_regenerations_branch_and_the_conversation_follows_the_active_branch() {
    let t = TestPlatform::start().await;
    let ada = t.register("ada-branches@example.com").await;
    let conversation = t.create_conversation(&ada, "Branches").await;
    let first = send(&t, &ada, &conversation, "one").await;
    let second = send(&t, &ada, &conversation, "two").await;
    let (q1, r1) = (id(&first["user_message"]), id(&first["assistant_message"]));
    let (q2, r2) = (id(&second["user_message"]), id(&second["assistant_message"]));
    assert!(first["user_message"]["parent_id"].is_null());
    assert_eq!(first["assistant_message"]["parent_id"], q1.as_str());
    assert_eq!(second["user_message"]["parent_id"], r1.as_str());

    // Regenerate the second reply: a new version after the same question, which the model answers
    // from the same history.
    let (status, again) = t.post(&ada, &format!("/v1/messages/{r2}/regenerate"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    let r2b = id(&again["assistant_message"]);
    assert_eq!(id(&again["user_message"]), q2);
    assert_eq!(again["assistant_message"]["parent_id"], q2.as_str());
    assert_eq!(again["assistant_message"]["status"], "completed");
    assert_eq!(shown(&t), ["one", "two"]);
    let (_, siblings) = t.get(&ada, &format!("/v1/messages/{r2}/siblings")).await;
    let versions: Vec<String> = siblings["data"].as_array().unwrap().iter().map(id).collect();
    assert_eq!(versions, [r2.clone(), r2b.clone()]);
    assert_eq!(siblings["active_id"], r2b.as_str());
    let listed = thread(&t, &ada, &conversation).await;
    assert_eq!(listed.len(), 4);
    assert_eq!(listed[2], "two");

    // Edit the second question: a new version after the first reply, with its own reply; the thread
    // and the model's context follow it, not the old question.
    let (status, edited) = t.post(&ada, &format!("/v1/messages/{q2}/edit"), json!({"content": "two, edited"})).await;
    assert_eq!(status, StatusCode::OK, "{edited}");
    let q2e = id(&edited["user_message"]);
    assert_eq!(edited["user_message"]["parent_id"], r1.as_str());
    assert_eq!(shown(&t), ["one", "two, edited"]);
    let listed = thread(&t, &ada, &conversation).await;
    assert_eq!(listed[..3], ["one".to_owned(), parley_fake_llm::reply_for("one"), "two, edited".to_owned()]);
    assert_eq!(listed.len(), 4);
    let (_, siblings) = t.get(&ada, &format!("/v1/messages/{q2}/siblings")).await;
    let versions: Vec<String> = siblings["data"].as_array().unwrap().iter().map(id).collect();
    assert_eq!(versions, [q2.clone(), q2e.clone()]);
    assert_eq!(siblings["active_id"], q2e.as_str());
    // Every message says which of its versions it is.
    let number = |message: &Value| (message["branch"].as_u64().unwrap(), message["branches"].as_u64().unwrap());
    assert_eq!(number(&again["assistant_message"]), (2, 2));
    assert_eq!(number(&edited["user_message"]), (2, 2));
    assert_eq!(number(&edited["assistant_message"]), (1, 1));
    let numbers: Vec<_> = siblings["data"].as_array().unwrap().iter().map(number).collect();
    assert_eq!(numbers, [(1, 2), (2, 2)]);
    let (_, page) = t.get(&ada, &format!("/v1/conversations/{conversation}/messages")).await;
    let numbers: Vec<_> = page["data"].as_array().unwrap().iter().map(number).collect();
    assert_eq!(numbers, [(1, 1), (1, 1), (2, 2), (1, 1)]);
    let (_, old_question) = t.get(&ada, &format!("/v1/messages/{q2}")).await;
    assert_eq!(number(&old_question), (1, 2));
    assert_eq!(number(&first["user_message"]), (1, 1));
    let send_after_edit = send(&t, &ada, &conversation, "three").await;
    assert_eq!(shown(&t), ["one", "two, edited", "three"]);
    assert_eq!(send_after_edit["user_message"]["parent_id"], edited["assistant_message"]["id"]);

    // Switch back to the original question: its newest reply (the regenerated one) ends the branch.
    let (status, switched) =
        t.put(&ada, &format!("/v1/conversations/{conversation}/active-branch"), json!({"message_id": q2})).await;
    assert_eq!(status, StatusCode::OK, "{switched}");
    let listed = thread(&t, &ada, &conversation).await;
    assert_eq!(listed.len(), 4);
    assert_eq!(listed[2], "two");
    let (_, siblings) = t.get(&ada, &format!("/v1/messages/{r2}/siblings")).await;
    assert_eq!(siblings["active_id"], r2b.as_str());
    // ... then to the first reply to it; the next question follows that one.
    let (status, _) =
        t.put(&ada, &format!("/v1/conversations/{conversation}/active-branch"), json!({"message_id": r2})).await;
    assert_eq!(status, StatusCode::OK);
    let next = send(&t, &ada, &conversation, "four").await;
    assert_eq!(next["user_message"]["parent_id"], r2.as_str());
    assert_eq!(shown(&t), ["one", "two", "four"]);
    let listed = thread(&t, &ada, &conversation).await;
    assert_eq!(
        listed,
        [
            "one".to_owned(),
            parley_fake_llm::reply_for("one"),
            "two".to_owned(),
            parley_fake_llm::reply_for("two"),
            "four".to_owned(),
            parley_fake_llm::reply_for("four")
        ]
    );

    // The export keeps every branch: 2 + 2 + 1 + 2 + 2 + 2 messages.
    let (_, export) = t.get(&ada, "/v1/me/export").await;
    let conversations = export["conversations"].as_array().unwrap();
    let exported = conversations.iter().find(|c| c["id"] == conversation.as_str()).unwrap();
    assert_eq!(exported["messages"].as_array().unwrap().len(), 11, "{exported}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branching_refuses_what_it_cannot_do_and_retries_are_idempotent() {
    let t = TestPlatform::start().await;
    let ada = t.register("ada-branch-errors@example.com").await;
    let conversation = t.create_conversation(&ada, "Errors").await;
    let exchange = send(&t, &ada, &conversation, "question").await;
    let (question, reply) = (id(&exchange["user_message"]), id(&exchange["assistant_message"]));

    let (status, body) = t.post(&ada, &format!("/v1/messages/{reply}/edit"), json!({"content": "x"})).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "id");
    let (status, body) = t.post(&ada, &format!("/v1/messages/{question}/regenerate"), json!({})).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "id");
    let (status, body) = t.post(&ada, &format!("/v1/messages/{question}/edit"), json!({"content": "  "})).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "content");
    let (status, body) = t.post(&ada, &format!("/v1/messages/{reply}/regenerate"), json!({"colour": 1})).await;
    assert_problem(status, &body, 400, "invalid_request");

    // Someone else's messages and conversations are not found; a message of another conversation does not
    // switch this one (a 400 naming it).
    let bob = t.register("bob-branch-errors@example.com").await;
    let (status, body) = t.post(&bob, &format!("/v1/messages/{reply}/regenerate"), json!({})).await;
    assert_problem(status, &body, 404, "not_found");
    let (status, body) = t.get(&bob, &format!("/v1/messages/{reply}/siblings")).await;
    assert_problem(status, &body, 404, "not_found");
    let other = t.create_conversation(&ada, "Other").await;
    let (status, body) =
        t.put(&ada, &format!("/v1/conversations/{other}/active-branch"), json!({"message_id": reply})).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "message_id");
    let (status, body) =
        t.put(&bob, &format!("/v1/conversations/{other}/active-branch"), json!({"message_id": reply})).await;
    assert_problem(status, &body, 404, "not_found");

    // A retried regeneration with the same key answers with the first one and makes no second reply.
    let regenerate = || {
        t.http
            .post(t.url(&format!("/v1/messages/{reply}/regenerate")))
            .bearer_auth(&ada.token)
            .header("Idempotency-Key", "again-1")
            .json(&json!({}))
            .send()
    };
    let (status, first) = read(regenerate().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let requests = t.fake.requests();
    let (status, second) = read(regenerate().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["assistant_message"]["id"], first["assistant_message"]["id"]);
    assert_eq!(t.fake.requests(), requests);
    let (_, siblings) = t.get(&ada, &format!("/v1/messages/{reply}/siblings")).await;
    assert_eq!(siblings["data"].as_array().unwrap().len(), 2);
    t.stop().await;
}
