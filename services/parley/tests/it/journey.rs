//! The user path of shared/API.md, walked through the REST API like a client would.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{TestPlatform, assert_problem, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_registers_chats_and_sees_their_usage() {
    let t = TestPlatform::start().await;

    // Register, and the mistakes a client can make while doing it.
    let session = t.register("ada@example.com").await;
    let register = |body: Value| t.http.post(t.url("/v1/auth/register")).json(&body).send();
    let (status, body) = crate::harness::read(
        register(json!({"email": "ADA@example.com", "password": "another long one"})).await.unwrap(),
    )
    .await;
    assert_problem(status, &body, 409, "conflict");
    let (status, body) =
        crate::harness::read(register(json!({"email": "not-an-email", "password": "long enough pass"})).await.unwrap())
            .await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "email");
    let (status, body) =
        crate::harness::read(register(json!({"email": "bob@example.com", "password": "short"})).await.unwrap()).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "password");
    let response = t
        .http
        .post(t.url("/v1/auth/register"))
        .header("content-type", "application/json")
        .body("{\"email\": ")
        .send()
        .await
        .unwrap();
    let (status, body) = crate::harness::read(response).await;
    assert_problem(status, &body, 400, "invalid_request");

    // Log in; a wrong password and an unknown email get the same answer.
    let login = |email: &str, password: &str| {
        t.http.post(t.url("/v1/auth/login")).json(&json!({"email": email, "password": password})).send()
    };
    let (status, body) = crate::harness::read(login("ada@example.com", "correct horse battery").await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert!(body["expires_in"].as_i64().unwrap() > 0);
    let (wrong_status, wrong_password) =
        crate::harness::read(login("ada@example.com", "wrong horse battery").await.unwrap()).await;
    let (unknown_status, unknown_email) =
        crate::harness::read(login("nobody@example.com", "wrong horse battery").await.unwrap()).await;
    assert_problem(wrong_status, &wrong_password, 401, "unauthorized");
    assert_eq!(unknown_status, wrong_status);
    assert_eq!(unknown_email["detail"], wrong_password["detail"]);

    // Who am I: 401 without a token, the profile with one.
    let response = t.http.get(t.url("/v1/me")).send().await.unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let (status, body) = crate::harness::read(response).await;
    assert_problem(status, &body, 401, "unauthorized");
    let (status, me) = t.get(&session, "/v1/me").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["email"], "ada@example.com");
    assert_eq!(me["tier"], "free");
    assert_eq!(me["role"], "user");
    assert_eq!(me["id"], session.user_id.as_str());

    // Conversations: create, list, read.
    let conversation = t.create_conversation(&session, "First chat").await;
    let second = t.create_conversation(&session, "Second chat").await;
    let (status, list) = t.get(&session, "/v1/conversations").await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![second.as_str(), conversation.as_str()], "most recently updated first");
    assert_eq!(list["next_cursor"], Value::Null);
    let response = t
        .http
        .get(t.url(&format!("/v1/conversations/{conversation}")))
        .bearer_auth(&session.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["etag"], "\"1\"");
    let (_, body) = crate::harness::read(response).await;
    assert_eq!(body["title"], "First chat");
    assert_eq!(body["model"], "parley-fake");

    // Send a message and get the model's reply (the waiting form).
    let (status, exchange) = t
        .post(&session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": "What is Parley?"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{exchange}");
    assert_eq!(exchange["user_message"]["content"], "What is Parley?");
    assert_eq!(exchange["user_message"]["role"], "user");
    let reply = &exchange["assistant_message"];
    assert_eq!(reply["status"], "completed");
    assert_eq!(reply["role"], "assistant");
    assert_eq!(reply["content"], parley_fake_llm::reply_for("What is Parley?"));
    assert!(reply["usage"]["output_tokens"].as_i64().unwrap() > 0);
    assert_eq!(t.fake.requests(), 1);

    // The conversation now lists both messages, oldest first; each can be read alone.
    let (_, messages) = t.get(&session, &format!("/v1/conversations/{conversation}/messages")).await;
    let messages = messages["data"].as_array().unwrap().clone();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[1]["role"], "assistant");
    let (status, message) = t.get(&session, &format!("/v1/messages/{}", reply["id"].as_str().unwrap())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&message, reply, "the waiting send answers with the reply exactly as stored");
    assert_eq!(message["conversation_id"], conversation.as_str());

    // The reply's tokens and cost show up in the caller's usage.
    let expected_tokens =
        reply["usage"]["input_tokens"].as_i64().unwrap() + reply["usage"]["output_tokens"].as_i64().unwrap();
    let usage = eventually("usage to be recorded", Duration::from_secs(10), || async {
        let (_, usage) = t.get(&session, "/v1/usage").await;
        (usage["totals"]["requests"] == 1).then_some(usage)
    })
    .await;
    assert_eq!(usage["totals"]["total_tokens"], expected_tokens);
    assert!(usage["totals"]["cost_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(usage["group_by"], "day");
    let (_, by_model) = t.get(&session, "/v1/usage?group_by=model").await;
    assert_eq!(by_model["data"][0]["model"], "parley-fake");
    let (status, body) = t.get(&session, "/v1/usage?group_by=user").await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "group_by");
    let (status, body) = t.get(&session, "/v1/usage?from=yesterday").await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "from");

    // Delete the conversation: it and its messages are gone.
    assert_eq!(t.delete(&session, &format!("/v1/conversations/{conversation}")).await, StatusCode::NO_CONTENT);
    let (status, body) = t.get(&session, &format!("/v1/conversations/{conversation}")).await;
    assert_problem(status, &body, 404, "not_found");
    let (status, _) = t.get(&session, &format!("/v1/messages/{}", reply["id"].as_str().unwrap())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(t.delete(&session, &format!("/v1/conversations/{conversation}")).await, StatusCode::NOT_FOUND);

    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_tokens_rotate_and_a_reused_one_revokes_the_family() {
    let t = TestPlatform::start().await;
    let session = t.register("rotate@example.com").await;
    let refresh = |token: &str| t.http.post(t.url("/v1/auth/refresh")).json(&json!({"refresh_token": token})).send();

    let (status, first) = crate::harness::read(refresh(&session.refresh_token).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let rotated = first["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(rotated, session.refresh_token);

    // The old token is spent; presenting it again revokes the family, including the new token.
    let (status, body) = crate::harness::read(refresh(&session.refresh_token).await.unwrap()).await;
    assert_problem(status, &body, 401, "unauthorized");
    let (status, _) = crate::harness::read(refresh(&rotated).await.unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Logout ends a session's refresh token.
    let other = t.register("logout@example.com").await;
    let response = t
        .http
        .post(t.url("/v1/auth/logout"))
        .json(&json!({"refresh_token": other.refresh_token}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (status, _) = crate::harness::read(refresh(&other.refresh_token).await.unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_exports_everything_it_holds_as_one_document() {
    let t = TestPlatform::start().await;
    let session = t.register("exporter@example.com").await;
    let (status, _) = t.post(&session, "/v1/api-keys", json!({"name": "laptop"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let mut sent = Vec::new();
    for title in ["first", "second"] {
        let conversation = t.create_conversation(&session, title).await;
        for text in ["one", "two"] {
            let content = format!("{title} {text}");
            let (status, body) = t
                .post(&session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": content}))
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            sent.push(content);
        }
    }
    // Someone else's data is not in it.
    let other = t.register("other@example.com").await;
    t.create_conversation(&other, "not mine").await;

    let usage = eventually("the replies' usage", Duration::from_secs(10), || async {
        let (_, usage) = t.get(&session, "/v1/usage").await;
        (usage["totals"]["requests"] == 4).then_some(usage)
    })
    .await;
    let response = t.http.get(t.url("/v1/me/export")).bearer_auth(&session.token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-disposition"], "attachment; filename=\"parley-export.json\"");
    let export: Value = response.json().await.unwrap();
    assert_eq!(export["user"]["email"], "exporter@example.com");
    assert_eq!(export["api_keys"][0]["name"], "laptop");
    assert!(export["api_keys"][0].get("key").is_none(), "no secret leaves: {export}");
    let conversations = export["conversations"].as_array().unwrap();
    assert_eq!(conversations.len(), 2, "{export}");
    let mut users_words: Vec<String> = conversations
        .iter()
        .flat_map(|conversation| conversation["messages"].as_array().unwrap().iter())
        .filter(|message| message["role"] == "user")
        .map(|message| message["content"].as_str().unwrap().to_owned())
        .collect();
    users_words.sort();
    sent.sort();
    assert_eq!(users_words, sent);
    for conversation in conversations {
        let messages = conversation["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 4, "both exchanges, oldest first: {conversation}");
        assert_eq!(messages[0]["role"], "user");
        assert_eq!(messages[1]["role"], "assistant");
        assert_eq!(messages[1]["content"], parley_fake_llm::reply_for(messages[0]["content"].as_str().unwrap()));
    }
    assert_eq!(export["usage"]["totals"], usage["totals"], "{export}");
    t.stop().await;
}
