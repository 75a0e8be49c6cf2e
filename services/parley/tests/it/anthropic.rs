//! Anthropic's Messages API (`POST /v1/messages`), driven by the official Anthropic Python SDK and by
//! hand for error shapes and for what reaches the provider.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use parley::Service;

use crate::harness::{TestPlatform, eventually, read, start_with_anthropic};
use crate::openai::{run_sdk_script, tools_dir};

/// Both fake models take images: `parley-fake` behind an OpenAI-wire provider, `claude-fake` behind an
/// Anthropic one, so each request crosses both mappings.
fn with_vision(config: &mut parley_platform::Config) {
    for model in config.models.values_mut() {
        model.vision = true;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_anthropic_sdk_works_unchanged() {
    let (t, _anthropic) = start_with_anthropic(with_vision).await;
    let python = tools_dir().join("venv/bin/python");
    let models =
        [("anthropic-sdk@example.com", "parley-fake", "served"), ("claude-sdk@example.com", "claude-fake", "refused")];
    for (email, model, json_mode) in models {
        let env = vec![
            ("PARLEY_MODEL", model.to_owned()),
            ("PARLEY_EXPECTED_IMAGE", parley_fake_llm::reply_with_images("what is this", 1)),
            ("PARLEY_JSON_MODE", json_mode.to_owned()),
        ];
        let session = run_sdk_script(&t, email, python.clone(), "anthropic_client.py", env).await;
        // Messages are accounted like any completion; counting tokens and the refused requests cost
        // nothing: three plain (whole, streamed, raw events), the stopped one, the short one, the
        // structured one where it is served, three with tools, one with an image.
        let expected = if json_mode == "served" { 10 } else { 9 };
        let usage = eventually("usage of the SDK calls", Duration::from_secs(10), || async {
            let (_, usage) = t.get(&session, "/v1/usage").await;
            let settled = usage["budget"]["day"]["reserved"] == 0;
            (usage["totals"]["requests"].as_i64()? >= expected && settled).then_some(usage)
        })
        .await;
        assert_eq!(usage["totals"]["requests"], expected, "{model}: {usage}");
        let (_, conversations) = t.get(&session, "/v1/conversations").await;
        assert_eq!(conversations["data"].as_array().unwrap().len(), 0);
    }
    t.stop().await;
}

/// Posts a Messages request with an API key in `X-Api-Key`, as Anthropic's SDKs send it.
async fn post_message(t: &TestPlatform, key: &str, body: Value) -> (StatusCode, Value) {
    let response = t
        .http
        .post(t.url("/v1/messages"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap();
    read(response).await
}

async fn api_key(t: &TestPlatform, email: &str) -> String {
    let session = t.register(email).await;
    let (status, created) = t.post(&session, "/v1/api-keys", json!({"name": "anthropic"})).await;
    assert_eq!(status, StatusCode::CREATED);
    created["key"].as_str().unwrap().to_owned()
}

fn assert_anthropic_error(status: StatusCode, body: &Value, expected: u16, kind: &str, mentions: &str) {
    assert_eq!(status.as_u16(), expected, "{body}");
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(mentions), "{message:?} should mention {mentions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_errors_use_the_anthropic_shape_from_every_layer() {
    let t = TestPlatform::start_with(
        |config| {
            config.http.body_limit_bytes = 64 * 1024;
            config.tiers.get_mut("free").unwrap().requests_per_minute = 30;
        },
        &Service::ALL,
    )
    .await;
    let key = api_key(&t, "anthropic-errors@example.com").await;
    let hello = json!([{"role": "user", "content": "hi"}]);

    // Without credentials, and with a key that is not one.
    let response = t.http.post(t.url("/v1/messages")).json(&json!({})).send().await.unwrap();
    let (status, body) = read(response).await;
    assert_anthropic_error(status, &body, 401, "authentication_error", "credentials");
    let (status, body) = post_message(&t, "pk_not_a_key", json!({})).await;
    assert_anthropic_error(status, &body, 401, "authentication_error", "");

    // The request's own mistakes name the parameter.
    let cases = [
        (json!({"model": "parley-fake", "messages": hello}), "max_tokens"),
        (json!({"model": "parley-fake", "max_tokens": 0, "messages": hello}), "max_tokens"),
        (json!({"model": "parley-fake", "max_tokens": 9, "messages": hello, "frequency": 1}), "frequency"),
        (json!({"model": "parley-fake", "max_tokens": 9, "messages": []}), "messages"),
        (
            json!({"model": "parley-fake", "max_tokens": 9, "messages": [{"role": "system", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "parley-fake", "max_tokens": 9, "messages": [{"role": "user", "content": [{"type": "document"}]}]}),
            "messages[0].content[0]",
        ),
        (
            json!({"model": "parley-fake", "max_tokens": 9, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "text/plain", "data": "x"}}]}]}),
            "messages[0].content[0].source",
        ),
        (json!({"model": "parley-fake", "max_tokens": 9, "messages": hello, "stop_sequences": [""]}), "stop_sequences"),
        (json!({"model": "parley-fake", "max_tokens": 9, "messages": hello, "top_k": 5}), "top_k"),
        (json!({"model": "parley-fake", "max_tokens": 9, "messages": hello, "tools": [{"name": "x"}]}), "tools[0]"),
        (
            json!({"model": "parley-fake", "max_tokens": 9, "messages": hello, "output_config": {"format": {"type": "xml"}}}),
            "output_config.format",
        ),
        (json!(["not", "an", "object"]), "object"),
    ];
    for (request, mentions) in cases {
        let (status, body) = post_message(&t, &key, request.clone()).await;
        assert_anthropic_error(status, &body, 400, "invalid_request_error", mentions);
    }
    let (status, body) = post_message(&t, &key, json!({"model": "nope", "max_tokens": 9, "messages": hello})).await;
    assert_anthropic_error(status, &body, 404, "not_found_error", "nope");

    // The layers before the handler: the body limit, a wrong method, the rate limit.
    let big = "x".repeat(70 * 1024);
    let (status, body) = post_message(
        &t,
        &key,
        json!({"model": "parley-fake", "max_tokens": 9, "messages": [{"role": "user", "content": big}]}),
    )
    .await;
    assert_anthropic_error(status, &body, 413, "request_too_large", "");
    let response = t.http.get(t.url("/v1/messages")).header("x-api-key", &key).send().await.unwrap();
    let (status, body) = read(response).await;
    assert_anthropic_error(status, &body, 405, "invalid_request_error", "method");
    // A second user, who spends their whole minute on counting tokens.
    let busy = api_key(&t, "anthropic-busy@example.com").await;
    let mut limited = None;
    for _ in 0..40 {
        let response = t
            .http
            .post(t.url("/v1/messages/count_tokens"))
            .header("x-api-key", &busy)
            .json(&json!({"model": "parley-fake", "messages": hello}))
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(response.headers().contains_key("retry-after"));
            limited = Some(read(response).await);
            break;
        }
        assert_eq!(response.status(), StatusCode::OK);
    }
    let (status, body) = limited.expect("the rate limit to answer 429");
    assert_anthropic_error(status, &body, 429, "rate_limit_error", "Retry-After");

    // The OpenAI-compatible route's clients get OpenAI's shape from the same layers.
    let response = t.http.post(t.url("/v1/chat/completions")).bearer_auth(&busy).json(&json!({})).send().await.unwrap();
    let (status, body) = read(response).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_reaches_an_anthropic_provider_as_anthropic_wrote_it() {
    let (t, anthropic) = start_with_anthropic(with_vision).await;
    let key = api_key(&t, "anthropic-wire@example.com").await;
    let tools = json!([{
        "name": "lookup",
        "description": "Looks a text up.",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
    }]);
    let request = json!({
        "model": "claude-fake",
        "max_tokens": 64,
        "system": [{"type": "text", "text": "You are terse."}],
        "stop_sequences": ["END"],
        "metadata": {"user_id": "end-user-7"},
        "temperature": 0.25,
        "tools": tools,
        "tool_choice": {"type": "tool", "name": "lookup", "disable_parallel_tool_use": true},
        "messages": [
            {"role": "user", "content": "look it up"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Looking."},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"text": "it"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "found"}]},
                {"type": "text", "text": "and this?"},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
            ]},
        ],
    });
    let (status, reply) = post_message(&t, &key, request).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let sent = anthropic.last_body().unwrap();
    assert_eq!(sent["system"], "You are terse.", "{sent}");
    assert_eq!(sent["stop_sequences"], json!(["END"]), "{sent}");
    assert_eq!(sent["metadata"]["user_id"], "end-user-7", "{sent}");
    assert_eq!(sent["temperature"], 0.25, "{sent}");
    assert_eq!(sent["tools"][0]["name"], "lookup", "{sent}");
    assert_eq!(sent["tools"][0]["input_schema"]["properties"]["text"]["type"], "string", "{sent}");
    assert_eq!(
        sent["tool_choice"],
        json!({"type": "tool", "name": "lookup", "disable_parallel_tool_use": true}),
        "{sent}"
    );
    let turns = sent["messages"].as_array().unwrap();
    assert_eq!(turns.len(), 3, "{sent}");
    assert_eq!(
        turns[1]["content"][1],
        json!({"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"text": "it"}})
    );
    assert_eq!(turns[2]["content"][0], json!({"type": "tool_result", "tool_use_id": "toolu_1", "content": "found"}));
    assert_eq!(
        turns[2]["content"][2]["source"],
        json!({"type": "url", "url": "https://example.com/cat.png"}),
        "{sent}"
    );

    // The reply uses the tool's result, in Anthropic's blocks.
    assert_eq!(reply["content"], json!([{"type": "text", "text": "The tool said: found"}]), "{reply}");
    assert_eq!(reply["stop_reason"], "end_turn", "{reply}");
    assert!(reply["usage"]["input_tokens"].as_i64().unwrap() > 0, "{reply}");
    t.stop().await;
}
