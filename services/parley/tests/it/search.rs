//! Full-text search through the public API: what a user wrote, what the model answered and titles are
//! found by their words, ranked, with highlighted snippets, page by page; nobody else's; and the
//! words never stand in clear in the database.

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Session, TestPlatform, assert_problem, read};

async fn send(t: &TestPlatform, session: &Session, conversation: &str, content: &str) -> Value {
    let (status, exchange) =
        t.post(session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": content})).await;
    assert_eq!(status, StatusCode::OK, "{exchange}");
    exchange
}

async fn search(t: &TestPlatform, session: &Session, query: &str) -> Value {
    let request = t.http.get(t.url("/v1/search")).bearer_auth(&session.token).query(&[("q", query)]);
    let (status, page) = read(request.send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page
}

/// The snippet's highlighted words, lowercased.
fn highlighted(hit: &Value) -> HashSet<String> {
    hit["snippet"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|part| part["highlight"] == true)
        .map(|part| part["text"].as_str().unwrap().to_lowercase())
        .collect()
}

fn snippet_text(hit: &Value) -> String {
    hit["snippet"].as_array().unwrap().iter().map(|part| part["text"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_replies_and_titles_are_found_ranked_with_snippets() {
    let t = TestPlatform::start().await;
    let ada = t.register("ada-search@example.com").await;
    let trip = t.create_conversation(&ada, "Walking holiday in the Pyrenees").await;
    let tea = t.create_conversation(&ada, "Kitchen notes").await;
    let asked = send(&t, &ada, &trip, "Which Pyrenees villages are best for hiking in June?").await;
    send(&t, &ada, &tea, "Green TEA or black tea? I drink tea every morning, tea tea.").await;
    send(&t, &ada, &tea, "Is tea good with lemon?").await;

    // A word of a user message, in any case: the message, with its conversation and the word marked;
    // then the reply that quotes it (the fake model echoes the question), longer so ranked lower.
    let page = search(&t, &ada, "villages").await;
    let hits = page["data"].as_array().unwrap();
    assert_eq!(hits.len(), 2, "{page}");
    assert_eq!(hits[0]["message_id"], asked["user_message"]["id"]);
    assert_eq!(hits[1]["message_id"], asked["assistant_message"]["id"]);
    assert_eq!(hits[0]["conversation_id"], trip.as_str());
    assert_eq!(hits[0]["title"], "Walking holiday in the Pyrenees");
    assert_eq!(hits[0]["role"], "user");
    assert_eq!(highlighted(&hits[0]), HashSet::from(["villages".to_owned()]));
    assert_eq!(snippet_text(&hits[0]), "Which Pyrenees villages are best for hiking in June?");
    assert!(page["next_cursor"].is_null());

    // A title's word finds the conversation (no message) and the messages holding it.
    let page = search(&t, &ada, "PYRENEES").await;
    let hits = page["data"].as_array().unwrap();
    assert_eq!(hits.len(), 3, "{page}");
    assert!(hits.iter().any(|hit| hit["message_id"].is_null() && hit["conversation_id"] == trip.as_str()));

    // The model's replies are indexed once stored: words only the replies hold find every reply.
    let page = search(&t, &ada, "answering offline").await;
    let found = page["data"].as_array().unwrap();
    assert_eq!(found.len(), 3, "{page}");
    assert!(found.iter().all(|hit| hit["role"] == "assistant"), "{page}");
    assert!(found.iter().any(|hit| hit["message_id"] == asked["assistant_message"]["id"]), "{page}");

    // Every word must be there; ranked by how much the text is about them.
    let page = search(&t, &ada, "tea").await;
    let hits = page["data"].as_array().unwrap();
    assert_eq!(hits.len(), 4, "two questions and their replies: {page}");
    assert!(snippet_text(&hits[0]).starts_with("Green TEA"), "the message with more of the word ranks first: {page}");
    assert!(hits[0]["rank"].as_f64().unwrap() >= hits[1]["rank"].as_f64().unwrap());
    assert_eq!(highlighted(&hits[0]), HashSet::from(["tea".to_owned()]));
    let page = search(&t, &ada, "tea lemon").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2, "{page}");
    assert_eq!(search(&t, &ada, "coffee").await["data"], json!([]));

    // Someone else finds nothing of Ada's, even by her words.
    let bob = t.register("bob-search@example.com").await;
    assert_eq!(search(&t, &bob, "tea").await["data"], json!([]));
    let bobs = t.create_conversation(&bob, "Tea for Bob").await;
    let page = search(&t, &bob, "tea").await;
    let hits = page["data"].as_array().unwrap();
    assert_eq!(hits.len(), 1, "{page}");
    assert_eq!(hits[0]["conversation_id"], bobs.as_str());

    // A new title replaces the old one's words.
    let response = t
        .http
        .patch(t.url(&format!("/v1/conversations/{trip}")))
        .bearer_auth(&ada.token)
        .header("If-Match", "\"1\"")
        .json(&json!({"title": "Mountain plans"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let page = search(&t, &ada, "walking").await;
    assert_eq!(page["data"], json!([]), "{page}");
    let page = search(&t, &ada, "mountain").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1, "{page}");

    // At rest, neither the words nor the text are readable.
    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    let terms: Vec<(String,)> =
        sqlx::query_as("SELECT terms::text FROM chat.search_terms").fetch_all(&pool).await.unwrap();
    assert!(!terms.is_empty());
    for (terms,) in &terms {
        assert!(!terms.contains("tea") && !terms.contains("villages"), "{terms}");
    }

    // A deleted conversation's messages are not found any more.
    assert_eq!(t.delete(&ada, &format!("/v1/conversations/{tea}")).await, StatusCode::NO_CONTENT);
    assert_eq!(search(&t, &ada, "tea").await["data"], json!([]));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_pages_with_a_cursor_and_refuses_bad_queries() {
    let t = TestPlatform::start().await;
    let ada = t.register("ada-pages@example.com").await;
    let conversation = t.create_conversation(&ada, "Numbers").await;
    let mut sent = HashSet::new();
    for n in 0..7 {
        let content = format!("river {}", "river ".repeat(n));
        let exchange = send(&t, &ada, &conversation, &content).await;
        sent.insert(exchange["user_message"]["id"].as_str().unwrap().to_owned());
    }
    // Pages of three: every hit once, ranks never rising.
    let mut seen = Vec::new();
    let mut ids = Vec::new();
    let mut ranks = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/v1/search?q=river&limit=3".to_owned();
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let (status, page) = t.get(&ada, &path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for hit in page["data"].as_array().unwrap() {
            if hit["role"] == "user" {
                seen.push(hit["message_id"].as_str().unwrap().to_owned());
            }
            ids.push(hit["message_id"].as_str().unwrap().to_owned());
            ranks.push(hit["rank"].as_f64().unwrap());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(ids.len(), 14, "seven questions and their replies: {ids:?}");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 14, "none twice: {ids:?}");
    assert_eq!(seen.len(), 7, "{seen:?}");
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), sent);
    assert!(ranks.windows(2).all(|pair| pair[0] >= pair[1]), "{ranks:?}");

    // Bad input: 400 naming the field.
    for path in ["/v1/search", "/v1/search?q=", "/v1/search?q=%20%20", "/v1/search?q=%3F%21%2E"] {
        let (status, body) = t.get(&ada, path).await;
        assert_problem(status, &body, 400, "invalid_request");
        assert_eq!(body["field"], "q", "{path}: {body}");
    }
    let (status, body) = t.get(&ada, &format!("/v1/search?q={}", "a".repeat(501))).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "q");
    let (status, body) = t.get(&ada, "/v1/search?q=river&cursor=forged").await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "cursor");
    let (status, body) = t.get(&ada, "/v1/search?q=river&limit=0").await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "limit");
    let response = t.http.get(t.url("/v1/search?q=river")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    t.stop().await;
}
