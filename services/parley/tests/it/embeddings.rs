//! `POST /v1/embeddings`: routed by model to an embeddings model's provider chain, with fallbacks,
//! budgets and accounting; errors in OpenAI's shape. (The official OpenAI SDK's embeddings calls run in
//! `openai.rs`.)

use std::time::Duration;

use parley::Service;
use parley_fake_llm::{EMBEDDING_DIMENSIONS, Knobs, embedding_for};
use parley_platform::config::{ModelConfig, ModelKind, ModelTarget, ProviderKind};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Session, TestPlatform, add_provider, eventually, read, spawn_fake};

async fn embed(t: &TestPlatform, session: &Session, body: Value) -> (StatusCode, Value) {
    let response = t.http.post(t.url("/v1/embeddings")).bearer_auth(&session.token).json(&body).send().await.unwrap();
    read(response).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_fall_back_along_the_chain_and_are_charged_once() {
    // The chain's first provider always fails: its retries give up and the next provider answers.
    let (flaky, flaky_url) = spawn_fake(Knobs { error_rate: 1.0, ..Knobs::default() }).await;
    let t = TestPlatform::start_with(
        |config| {
            add_provider(config, "flaky", ProviderKind::Openai, &flaky_url, &[]);
            let target = |provider: &str| ModelTarget::new(provider, "fake-embed");
            config.models.insert(
                "embed-chain".to_owned(),
                ModelConfig {
                    chain: vec![target("flaky"), target("fake")],
                    context_window: 8192,
                    input_price_per_mtok: 0.02,
                    output_price_per_mtok: 0.0,
                    router: None,
                    vision: false,
                    kind: ModelKind::Embeddings,
                },
            );
            config.agent.retry.max_attempts = 2;
            config.agent.retry.base_delay_ms = 1;
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("embeddings@example.com").await;
    let (status, body) = embed(&t, &session, json!({"model": "embed-chain", "input": ["one", "two"]})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(flaky.requests() >= 1, "the first provider was tried");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "embed-chain");
    for (index, text) in ["one", "two"].into_iter().enumerate() {
        assert_eq!(body["data"][index]["index"], index);
        let vector: Vec<f32> = serde_json::from_value(body["data"][index]["embedding"].clone()).unwrap();
        assert_eq!(vector, embedding_for(text, EMBEDDING_DIMENSIONS), "{body}");
    }
    // What the provider counted is charged, once, and nothing stays reserved.
    let tokens = body["usage"]["prompt_tokens"].as_i64().unwrap();
    assert!(tokens > 0, "{body}");
    let usage = eventually("the embeddings to be charged", Duration::from_secs(10), || async {
        let (_, usage) = t.get(&session, "/v1/usage").await;
        let settled = usage["budget"]["day"]["reserved"] == 0 && usage["budget"]["day"]["used"] == tokens;
        (settled && usage["totals"]["requests"] == 1).then_some(usage)
    })
    .await;
    assert_eq!(usage["totals"]["input_tokens"], tokens, "{usage}");
    assert_eq!(usage["totals"]["output_tokens"], 0, "{usage}");

    // Every provider down: 503 with Retry-After, nothing charged, the reservation given back.
    t.fake.set_knobs(Knobs { error_rate: 1.0, ..t.fake.knobs() });
    let response = t
        .http
        .post(t.url("/v1/embeddings"))
        .bearer_auth(&session.token)
        .json(&json!({"model": "embed-chain", "input": "x"}));
    let response = response.send().await.unwrap();
    assert!(response.headers().contains_key("retry-after"));
    let (status, body) = read(response).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "upstream_unavailable", "{body}");
    eventually("the failed call's reservation to be released", Duration::from_secs(10), || async {
        let (_, usage) = t.get(&session, "/v1/usage").await;
        (usage["budget"]["day"]["reserved"] == 0 && usage["budget"]["day"]["used"] == tokens).then_some(())
    })
    .await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_embeddings_requests_are_refused_naming_the_parameter() {
    let t = TestPlatform::start().await;
    let session = t.register("embeddings-errors@example.com").await;
    let model = parley_platform::config::FAKE_EMBEDDINGS_MODEL;
    let (status, body) = embed(&t, &session, json!({"model": "nope", "input": "x"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    let cases = [
        (json!({"model": "parley-fake", "input": "x"}), "model"),
        (json!({"model": model, "input": [1, 2, 3]}), "input"),
        (json!({"model": model, "input": [[1, 2]]}), "input"),
        (json!({"model": model, "input": []}), "input"),
        (json!({"model": model, "input": ["fine", ""]}), "input"),
        (json!({"model": model, "input": 7}), "input"),
        (json!({"model": model, "input": "x", "encoding_format": "hex"}), "encoding_format"),
        (json!({"model": model, "input": "x", "dimensions": 0}), "dimensions"),
        (json!({"model": model, "input": "x", "dimensions": 4097}), "dimensions"),
        (json!({"model": model, "input": "x", "user": "\u{0}"}), "user"),
        (json!({"model": model, "input": "x", "truncate": true}), ""),
    ];
    for (request, param) in cases {
        let (status, body) = embed(&t, &session, request.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{request}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{request}: {body}");
        if !param.is_empty() {
            assert_eq!(body["error"]["param"], param, "{request}: {body}");
        }
    }
    // A chat route refuses an embeddings model, in its own shape.
    let (status, body) = t
        .post(&session, "/v1/chat/completions", json!({"model": model, "messages": [{"role": "user", "content": "x"}]}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");
    let conversation = t.create_conversation(&session, "vectors").await;
    let (status, body) = t
        .post(&session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": "x", "model": model}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "model", "{body}");
    // `encoding_format: base64` is little-endian 32-bit floats.
    let (status, body) = embed(&t, &session, json!({"model": model, "input": "x", "encoding_format": "base64"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    use base64::Engine;
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(body["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let vector: Vec<f32> =
        bytes.chunks_exact(4).map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])).collect();
    assert_eq!(vector, embedding_for("x", EMBEDDING_DIMENSIONS));
    t.stop().await;
}
