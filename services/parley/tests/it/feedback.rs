//! Feedback on replies through the public API: set, changed and removed by the user the reply was
//! for; nobody else's; only the model's finished replies; satisfaction per model and the export for
//! admins; the metric the dashboard reads; and erased with the account.

use reqwest::StatusCode;
use serde_json::{Value, json};

use parley::Service;

use crate::harness::{Session, TestPlatform, assert_problem, read};

async fn put(t: &TestPlatform, session: &Session, message: &str, body: Value) -> (StatusCode, Value) {
    let request = t.http.put(t.url(&format!("/v1/messages/{message}/feedback"))).bearer_auth(&session.token);
    read(request.json(&body).send().await.unwrap()).await
}

async fn exchange(t: &TestPlatform, session: &Session, content: &str) -> Value {
    let conversation = t.create_conversation(session, "Rated").await;
    let (status, exchange) =
        t.post(session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": content})).await;
    assert_eq!(status, StatusCode::OK, "{exchange}");
    exchange
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_are_rated_changed_and_unrated_and_admins_see_satisfaction() {
    let t = TestPlatform::start_with(
        |config| config.auth.admin_emails = vec!["boss-feedback@example.com".to_owned()],
        &Service::ALL,
    )
    .await;
    let ada = t.register("ada-feedback@example.com").await;
    let first = exchange(&t, &ada, "Rate this").await;
    let reply = first["assistant_message"]["id"].as_str().unwrap().to_owned();
    let model = first["assistant_message"]["model"].as_str().unwrap().to_owned();
    let path = format!("/v1/messages/{reply}/feedback");

    // None yet; then up with a comment; then changed to down; the comment trimmed.
    let (status, body) = t.get(&ada, &path).await;
    assert_problem(status, &body, 404, "not_found");
    let (status, body) = put(&t, &ada, &reply, json!({"rating": "up", "comment": "  spot on "})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["rating"].as_str(), body["comment"].as_str()), (Some("up"), Some("spot on")));
    assert_eq!(body["model"], model.as_str());
    let (status, body) = put(&t, &ada, &reply, json!({"rating": "down"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, read_back) = t.get(&ada, &path).await;
    assert_eq!((read_back["rating"].as_str(), read_back["comment"].clone()), (Some("down"), Value::Null));
    assert!(
        t.metric(&format!("parley_analytics_feedback_total{{model=\"{model}\",rating=\"down\"}}")).await >= Some(1.0)
    );

    // Another reply rated up: satisfaction for the model is one of two.
    let second = exchange(&t, &ada, "And this").await;
    let second_reply = second["assistant_message"]["id"].as_str().unwrap().to_owned();
    let (status, _) = put(&t, &ada, &second_reply, json!({"rating": "up"})).await;
    assert_eq!(status, StatusCode::OK);

    // Bad input, with the field named; the user's own message and someone else's reply cannot be rated.
    for (body, field) in [
        (json!({"rating": "meh"}), "rating"),
        (json!({}), "rating"),
        (json!({"rating": "up", "comment": "x".repeat(2001)}), "comment"),
        (json!({"rating": "up", "stars": 5}), "stars"),
    ] {
        let (status, problem) = put(&t, &ada, &reply, body).await;
        assert_problem(status, &problem, 400, "invalid_request");
        assert_eq!(problem["field"], field, "{problem}");
    }
    let question = first["user_message"]["id"].as_str().unwrap();
    let (status, problem) = put(&t, &ada, question, json!({"rating": "up"})).await;
    assert_problem(status, &problem, 400, "invalid_request");
    assert_eq!(problem["field"], "id");
    let bob = t.register("bob-feedback@example.com").await;
    let (status, problem) = put(&t, &bob, &reply, json!({"rating": "up"})).await;
    assert_problem(status, &problem, 404, "not_found");
    let (status, problem) = t.get(&bob, &path).await;
    assert_problem(status, &problem, 404, "not_found");
    // An id that names no message (as on GET /v1/messages/{id}).
    let (status, problem) = put(&t, &ada, "not-a-uuid", json!({"rating": "up"})).await;
    assert_problem(status, &problem, 404, "not_found");

    // Admins: the export (with comments) and satisfaction per model; others are refused.
    let (status, problem) = t.get(&ada, "/v1/admin/feedback").await;
    assert_problem(status, &problem, 403, "forbidden");
    let boss = t.register("boss-feedback@example.com").await;
    let (status, page) = t.get(&boss, "/v1/admin/feedback?limit=1").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["data"][0]["message_id"], second_reply.as_str(), "newest change first");
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, page) = t.get(&boss, &format!("/v1/admin/feedback?limit=1&cursor={cursor}")).await;
    assert_eq!(page["data"][0]["message_id"], reply.as_str());
    assert_eq!(page["data"][0]["user_id"], ada.user_id.as_str());
    let (status, summary) = t.get(&boss, "/v1/admin/feedback/summary").await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    let row = summary["data"].as_array().unwrap().iter().find(|row| row["model"] == model.as_str()).unwrap().clone();
    assert_eq!((row["up"].as_i64(), row["down"].as_i64(), row["satisfaction"].as_f64()), (Some(1), Some(1), Some(0.5)));
    let (status, problem) = t.get(&boss, "/v1/admin/feedback?from=2030-01-01T00:00:00Z&to=2029-01-01T00:00:00Z").await;
    assert_problem(status, &problem, 400, "invalid_request");
    assert_eq!(problem["field"], "from");
    let (status, problem) = t.get(&boss, "/v1/admin/feedback?model=a%00b").await;
    assert_problem(status, &problem, 400, "invalid_request");
    assert_eq!(problem["field"], "model");

    // Removed: gone, and removing again is fine.
    assert_eq!(t.delete(&ada, &path).await, StatusCode::NO_CONTENT);
    assert_eq!(t.delete(&ada, &path).await, StatusCode::NO_CONTENT);
    let (status, _) = t.get(&ada, &path).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // An account's deletion erases its ratings.
    let response = t.http.delete(t.url("/v1/me")).bearer_auth(&ada.token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (_, page) = t.get(&boss, "/v1/admin/feedback").await;
    assert_eq!(page["data"], json!([]), "{page}");
    t.stop().await;
}
