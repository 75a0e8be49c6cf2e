//! The response cache: deterministic replies served without calling the model, identical concurrent
//! requests coalesced into one call, the client's Cache-Control honoured, and cached answers served
//! when every provider is down.

use std::time::Duration;

use parley::Service;
use parley_fake_llm::{Knobs, reply_for};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Session, TestPlatform, read};

async fn complete(
    t: &TestPlatform,
    session: &Session,
    content: &str,
    temperature: Option<f64>,
    cache_control: Option<&str>,
) -> (StatusCode, Value) {
    let mut body = json!({"model": "parley-fake", "messages": [{"role": "user", "content": content}]});
    if let Some(temperature) = temperature {
        body["temperature"] = json!(temperature);
    }
    let mut request = t.http.post(t.url("/v1/chat/completions")).bearer_auth(&session.token).json(&body);
    if let Some(value) = cache_control {
        request = request.header("cache-control", value);
    }
    read(request.send().await.unwrap()).await
}

fn content_of(body: &Value) -> &str {
    body["choices"][0]["message"]["content"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deterministic_replies_come_from_the_cache_unless_the_client_says_no() {
    let t = TestPlatform::start().await;
    let session = t.register("cache@example.com").await;

    let (status, first) = complete(&t, &session, "cache me", Some(0.0), None).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (_, second) = complete(&t, &session, "cache me", Some(0.0), None).await;
    assert_eq!(content_of(&second), reply_for("cache me"));
    assert_eq!(t.fake.requests(), 1, "the second reply came from the cache");

    // Cache-Control: no-cache goes to the model again; a non-zero temperature is never cached.
    complete(&t, &session, "cache me", Some(0.0), Some("no-cache")).await;
    assert_eq!(t.fake.requests(), 2);
    complete(&t, &session, "creative", Some(0.9), None).await;
    complete(&t, &session, "creative", Some(0.9), None).await;
    assert_eq!(t.fake.requests(), 4);
    let sent = t.fake.last_temperature().unwrap();
    assert!((sent - 0.9).abs() < 1e-6, "the temperature reaches the provider: {sent}");

    // Conversations share the cache when the whole prompt is the same.
    for title in ["one", "two"] {
        let conversation = t.create_conversation(&session, title).await;
        let (status, exchange) = t
            .post(
                &session,
                &format!("/v1/conversations/{conversation}/messages"),
                json!({"content": "same question", "temperature": 0}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{exchange}");
        assert_eq!(exchange["assistant_message"]["content"], reply_for("same question"));
    }
    assert_eq!(t.fake.requests(), 5);
    let conversation = t.create_conversation(&session, "bad").await;
    let (status, body) = t
        .post(
            &session,
            &format!("/v1/conversations/{conversation}/messages"),
            json!({"content": "x", "temperature": 7}),
        )
        .await;
    crate::harness::assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "temperature");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_requests_make_one_upstream_call() {
    let t = TestPlatform::start().await;
    t.fake.set_knobs(Knobs { time_to_first_token: Duration::from_millis(800), ..t.fake.knobs() });
    let session = t.register("coalesce@example.com").await;
    let requests = (0..5).map(|_| complete(&t, &session, "all at once", Some(0.0), None));
    let answers = futures::future::join_all(requests).await;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(content_of(body), reply_for("all at once"));
    }
    assert_eq!(t.fake.requests(), 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_provider_down_a_cached_answer_is_served_else_503() {
    let t = TestPlatform::start_with(
        |config| {
            config.nats.job_max_deliver = 1;
            config.agent.retry.max_attempts = 1;
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("failopen@example.com").await;
    let (status, _) = complete(&t, &session, "remember this", Some(0.0), None).await;
    assert_eq!(status, StatusCode::OK);

    t.fake.set_knobs(Knobs { error_rate: 1.0, ..t.fake.knobs() });
    // Not cacheable (temperature 0.7), so it goes to the model, which is down: the cache answers.
    let (status, body) = complete(&t, &session, "remember this", Some(0.7), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(content_of(&body), reply_for("remember this"));

    // Nothing cached for this one: 503 with Retry-After, in OpenAI's error shape.
    let response = t
        .http
        .post(t.url("/v1/chat/completions"))
        .bearer_auth(&session.token)
        .json(&json!({"model": "parley-fake", "messages": [{"role": "user", "content": "never seen"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let (_, body) = read(response).await;
    assert_eq!(body["error"]["code"], "upstream_unavailable");
    t.stop().await;
}
