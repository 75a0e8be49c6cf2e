//! Sampling parameters on the wire: what Parley sends upstream for each OpenAI parameter, on both
//! entry points (OpenAI-compatible completions and conversation messages) and both provider wire
//! formats, and the clear 400 for what a model's providers cannot honour.

use parley_fake_llm::reply_for;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Session, TestPlatform, add_model, read, start_with_anthropic};

/// Every sampling parameter, as a client sends it.
fn every_parameter() -> Value {
    json!({
        "temperature": 0.25,
        "top_p": 0.5,
        "stop": ["fake model", "STOP"],
        "seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"50256": -100, "7": 3},
        "response_format": {"type": "json_schema", "json_schema": {"name": "reply", "schema": {"type": "object"}}},
    })
}

/// `base` with `extra`'s fields added.
fn with(mut base: Value, extra: &Value) -> Value {
    for (key, value) in extra.as_object().unwrap() {
        base[key] = value.clone();
    }
    base
}

async fn complete(t: &TestPlatform, session: &Session, body: Value) -> (StatusCode, Value) {
    read(t.http.post(t.url("/v1/chat/completions")).bearer_auth(&session.token).json(&body).send().await.unwrap()).await
}

async fn send(t: &TestPlatform, session: &Session, conversation: &str, body: Value) -> (StatusCode, Value) {
    t.post(session, &format!("/v1/conversations/{conversation}/messages"), body).await
}

/// Asserts that every parameter of [`every_parameter`] reached an OpenAI-wire upstream as it was sent.
fn assert_sent_as_given(upstream: &Value) {
    for (key, value) in every_parameter().as_object().unwrap() {
        assert_eq!(&upstream[key], value, "{key} upstream: {upstream}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sampling_parameter_reaches_the_provider_from_both_entry_points() {
    let t = TestPlatform::start().await;
    let session = t.register("wire@example.com").await;
    let prompt = json!([{"role": "user", "content": "wire check"}]);

    // OpenAI-compatible: every parameter, the end user and the longest reply.
    let body = with(
        json!({"model": "parley-fake", "messages": prompt, "user": "end-user-9", "max_completion_tokens": 50}),
        &every_parameter(),
    );
    let (status, completion) = complete(&t, &session, body).await;
    assert_eq!(status, StatusCode::OK, "{completion}");
    let upstream = t.fake.last_body().unwrap();
    assert_sent_as_given(&upstream);
    assert_eq!(upstream["user"], "end-user-9");
    assert_eq!(upstream["max_tokens"], 50);
    // The fake honours JSON mode and the stop sequence: the reply is a JSON object cut before it.
    let whole = json!({"reply": reply_for("wire check")}).to_string();
    let content = completion["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content, &whole[..whole.find("fake model").unwrap()]);
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");

    // A lone stop string is a list of one upstream; an absent parameter is not sent at all.
    let body = json!({"model": "parley-fake", "messages": prompt, "stop": "STOP"});
    assert_eq!(complete(&t, &session, body).await.0, StatusCode::OK);
    let upstream = t.fake.last_body().unwrap();
    assert_eq!(upstream["stop"], json!(["STOP"]));
    for absent in ["top_p", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "user", "response_format"] {
        assert!(upstream.get(absent).is_none(), "{absent} was sent: {upstream}");
    }

    // A conversation message takes the same parameters and its own longest reply.
    let conversation = t.create_conversation(&session, "wire").await;
    let body = with(json!({"content": "wire check", "max_tokens": 40}), &every_parameter());
    let (status, exchange) = send(&t, &session, &conversation, body).await;
    assert_eq!(status, StatusCode::OK, "{exchange}");
    let upstream = t.fake.last_body().unwrap();
    assert_sent_as_given(&upstream);
    assert_eq!(upstream["max_tokens"], 40);
    assert!(upstream.get("user").is_none(), "a conversation names no end user: {upstream}");
    assert_eq!(exchange["assistant_message"]["content"], &whole[..whole.find("fake model").unwrap()]);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_provider_gets_its_own_names_and_refuses_what_it_lacks() {
    // "mixed": OpenAI first, Anthropic as the fallback: the fallback must not drop what the first honours.
    let (t, anthropic) = start_with_anthropic(|config| add_model(config, "mixed", &["fake", "anthropic"])).await;
    let session = t.register("anthropic-wire@example.com").await;
    let prompt = json!([{"role": "user", "content": "hello claude"}]);

    let body = json!({
        "model": "claude-fake", "messages": prompt, "temperature": 1.5, "top_p": 0.5, "stop": "fake model",
        "user": "end-user-9", "max_tokens": 30, "response_format": {"type": "text"},
    });
    let (status, completion) = complete(&t, &session, body).await;
    assert_eq!(status, StatusCode::OK, "{completion}");
    let upstream = anthropic.last_body().unwrap();
    assert_eq!(upstream["temperature"], 1.0, "Anthropic's range ends at 1: {upstream}");
    assert_eq!(upstream["top_p"], 0.5);
    assert_eq!(upstream["stop_sequences"], json!(["fake model"]));
    assert_eq!(upstream["metadata"], json!({"user_id": "end-user-9"}));
    assert_eq!(upstream["max_tokens"], 30);
    assert!(upstream.get("stop").is_none() && upstream.get("user").is_none(), "{upstream}");
    // Anthropic's stop_reason "stop_sequence" is OpenAI's "stop".
    let reply = reply_for("hello claude");
    assert_eq!(completion["choices"][0]["message"]["content"], &reply[..reply.find("fake model").unwrap()]);
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");

    // What Anthropic's API lacks is a 400 naming the parameter, before anything is called or stored.
    let calls = anthropic.requests();
    let conversation = t.create_conversation(&session, "refusals").await;
    let refused = [
        ("seed", json!(1)),
        ("presence_penalty", json!(0.5)),
        ("frequency_penalty", json!(0.5)),
        ("logit_bias", json!({"5": 1})),
        ("response_format", json!({"type": "json_object"})),
        ("logprobs", json!(true)),
    ];
    for model in ["claude-fake", "mixed"] {
        for (param, value) in refused.clone() {
            let body = json!({"model": model, "messages": prompt, param: value});
            let (status, error) = complete(&t, &session, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{model} {param}: {error}");
            assert_eq!(error["error"]["param"], param, "{error}");
            assert!(error["error"]["message"].as_str().unwrap().contains("anthropic"), "{error}");

            let body = json!({"content": "x", "model": model, param: value});
            let (status, problem) = send(&t, &session, &conversation, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{model} {param}: {problem}");
            assert_eq!(problem["field"], param, "{problem}");
        }
    }
    // Without a model in the send, the conversation's own model decides.
    let claude_conversation = {
        let (status, created) =
            t.post(&session, "/v1/conversations", json!({"title": "claude", "model": "claude-fake"})).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created["id"].as_str().unwrap().to_owned()
    };
    let (status, problem) = send(&t, &session, &claude_conversation, json!({"content": "x", "seed": 3})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(problem["field"], "seed");
    assert_eq!(anthropic.requests(), calls, "a refused request reaches no provider");
    let (_, messages) = t.get(&session, &format!("/v1/conversations/{claude_conversation}/messages")).await;
    assert_eq!(messages["data"].as_array().unwrap().len(), 0, "a refused send stores nothing");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_unavailable_parameters_are_refused_by_name() {
    let t = TestPlatform::start().await;
    let session = t.register("refusals@example.com").await;
    let prompt = json!([{"role": "user", "content": "x"}]);
    let cases = [
        ("top_p", json!(1.5)),
        ("temperature", json!(3)),
        ("presence_penalty", json!(-2.5)),
        ("stop", json!(["a", "b", "c", "d", "e"])),
        ("stop", json!([""])),
        ("logit_bias", json!({"not-a-token": 1})),
        ("logit_bias", json!({"5": 101})),
        ("seed", json!("seven")),
        ("response_format", json!({"type": "xml"})),
        ("response_format", json!({"type": "json_schema", "json_schema": {"schema": {}}})),
        ("tools", json!([{"type": "function", "function": {"name": "has space"}}])),
        ("tool_choice", json!("required")),
        ("functions", json!([{"name": "f"}])),
        ("top_logprobs", json!(2)),
        ("metadata", json!({"k": 1})),
        ("modalities", json!(["text", "audio"])),
        ("verbosity", json!("low")),
        ("no_such_parameter", json!(1)),
    ];
    let calls = t.fake.requests();
    for (param, value) in cases.clone() {
        let body = json!({"model": "parley-fake", "messages": prompt, param: value});
        let (status, error) = complete(&t, &session, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{param}: {error}");
        // The parameter, or a path inside it (`response_format.type`).
        assert!(error["error"]["param"].as_str().unwrap().starts_with(param), "{param}: {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    }
    assert_eq!(t.fake.requests(), calls, "a refused request reaches no provider");
    // What asks for nothing passes: no tools, no log probabilities, not stored, text only.
    let body = json!({
        "model": "parley-fake", "messages": prompt, "tools": [], "tool_choice": "none", "logprobs": false,
        "store": false, "modalities": ["text"], "parallel_tool_calls": true, "metadata": {"k": "v"},
        "prompt_cache_key": "k", "safety_identifier": "end-user-3",
    });
    let (status, completion) = complete(&t, &session, body).await;
    assert_eq!(status, StatusCode::OK, "{completion}");
    // OpenAI's newer name for the end user reaches the provider as `user`.
    assert_eq!(t.fake.last_body().unwrap()["user"], "end-user-3");

    // The conversation route refuses the same, as problem+json naming the field.
    let conversation = t.create_conversation(&session, "refusals").await;
    for (field, value) in [("top_p", json!(-1)), ("stop", json!(["", "x"])), ("max_tokens", json!(0))] {
        let (status, problem) = send(&t, &session, &conversation, json!({"content": "x", field: value})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {problem}");
        assert_eq!(problem["field"], field, "{problem}");
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_reach_models_that_take_them_and_are_refused_by_others() {
    let (t, anthropic) = start_with_anthropic(|config| {
        config.models.get_mut("claude-fake").unwrap().vision = true;
        // The same fake provider, but a model not configured for images.
        add_model(config, "blind", &["fake"]);
    })
    .await;
    let session = t.register("vision@example.com").await;
    let parts = json!([
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "https://images.example/cat.png", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]);
    let question = json!([{"role": "user", "content": parts}]);
    let expected = parley_fake_llm::reply_with_images("what is this", 2);

    // OpenAI's wire: the parts go as they came.
    let (status, completion) = complete(&t, &session, json!({"model": "parley-fake", "messages": question})).await;
    assert_eq!(status, StatusCode::OK, "{completion}");
    assert_eq!(completion["choices"][0]["message"]["content"], expected);
    assert_eq!(t.fake.last_body().unwrap()["messages"][0]["content"], parts);

    // Anthropic's: image blocks, by URL or inline as base64 with the media type.
    let (status, completion) = complete(&t, &session, json!({"model": "claude-fake", "messages": question})).await;
    assert_eq!(status, StatusCode::OK, "{completion}");
    assert_eq!(completion["choices"][0]["message"]["content"], expected);
    assert_eq!(
        anthropic.last_body().unwrap()["messages"][0]["content"],
        json!([
            {"type": "text", "text": "what is this"},
            {"type": "image", "source": {"type": "url", "url": "https://images.example/cat.png"}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        ])
    );

    // A model without images, an image a provider cannot fetch, a part of another kind: 400s naming
    // the message, before any provider is called.
    let calls = t.fake.requests();
    let unreadable = json!([{"type": "image_url", "image_url": {"url": "ftp://images.example/cat.png"}}]);
    let audio = json!([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]);
    for (model, content) in [("blind", parts), ("parley-fake", unreadable), ("parley-fake", audio)] {
        let body = json!({"model": model, "messages": [{"role": "user", "content": content}]});
        let (status, error) = complete(&t, &session, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
        assert_eq!(error["error"]["param"], "messages[0].content", "{error}");
    }
    assert_eq!(t.fake.requests(), calls);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_probabilities_come_back_with_the_reply_plain_and_streamed() {
    let t = TestPlatform::start().await;
    let session = t.register("logprobs@example.com").await;
    let body = json!({"model": "parley-fake", "messages": [{"role": "user", "content": "how sure"}],
        "logprobs": true, "top_logprobs": 2});
    let (status, completion) = complete(&t, &session, body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{completion}");
    let upstream = t.fake.last_body().unwrap();
    assert_eq!((upstream["logprobs"].clone(), upstream["top_logprobs"].clone()), (json!(true), json!(2)));
    let content = completion["choices"][0]["message"]["content"].as_str().unwrap();
    let entries = completion["choices"][0]["logprobs"]["content"].as_array().unwrap();
    let tokens: String = entries.iter().map(|entry| entry["token"].as_str().unwrap()).collect();
    assert_eq!(tokens, content, "one entry per token, in order");
    assert_eq!(entries[0]["logprob"], -0.25);
    assert_eq!(entries[0]["top_logprobs"].as_array().unwrap().len(), 2);

    // Streamed: the chunks' entries add up to the same tokens.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let response =
        t.http.post(t.url("/v1/chat/completions")).bearer_auth(&session.token).json(&streamed).send().await.unwrap();
    let text = response.text().await.unwrap();
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let streamed_tokens: String = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .map(|entry| entry["token"].as_str().unwrap())
        .collect();
    assert_eq!(streamed_tokens, content);
    // Without logprobs, none come back.
    let (_, plain) =
        complete(&t, &session, json!({"model": "parley-fake", "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(plain["choices"][0]["logprobs"], Value::Null);
    t.stop().await;
}
