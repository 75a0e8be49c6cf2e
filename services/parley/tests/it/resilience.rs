//! Providers that fail: retries, fail-over along the chain, circuit breakers, key pools, replies that
//! break off mid-stream, dead-lettered jobs, and the Anthropic wire format.

use std::time::Duration;

use parley::Service;
use parley_fake_llm::{Knobs, reply_for};
use parley_platform::config::{ProviderKind, RouterConfig};
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{
    Session, SseReader, TestPlatform, add_model, add_provider, eventually, read, spawn_fake, start_with_anthropic,
};

async fn ask(t: &TestPlatform, session: &Session, conversation: &str, model: &str, content: &str) -> serde_json::Value {
    let (status, exchange) = t
        .post(
            session,
            &format!("/v1/conversations/{conversation}/messages"),
            json!({"content": content, "model": model}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{exchange}");
    exchange["assistant_message"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_fails_over_on_500_on_429_and_on_a_slow_first_token() {
    let (failing, failing_url) = spawn_fake(Knobs { error_rate: 1.0, ..Knobs::default() }).await;
    let (limited, limited_url) =
        spawn_fake(Knobs { rate_limit_rate: 1.0, retry_after_secs: 1, ..Knobs::default() }).await;
    let (slow, slow_url) = spawn_fake(Knobs::default()).await;
    slow.set_knobs(Knobs { time_to_first_token: Duration::from_secs(10), ..slow.knobs() });
    let t = TestPlatform::start_with(
        |config| {
            config.agent.retry.max_attempts = 2;
            config.agent.retry.base_delay_ms = 10;
            config.agent.time_to_first_token_timeout_ms = 300;
            config.agent.breaker.failure_threshold = 100;
            add_provider(config, "failing", ProviderKind::Openai, &failing_url, &[]);
            add_provider(config, "limited", ProviderKind::Openai, &limited_url, &[]);
            add_provider(config, "slow", ProviderKind::Openai, &slow_url, &[]);
            add_model(config, "after-500", &["failing", "fake"]);
            add_model(config, "after-429", &["limited", "fake"]);
            add_model(config, "after-slow", &["slow", "fake"]);
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("failover@example.com").await;
    let conversation = t.create_conversation(&session, "fail-over").await;

    let reply = ask(&t, &session, &conversation, "after-500", "first").await;
    assert_eq!(reply["content"], reply_for("first"));
    assert_eq!(failing.requests(), 2, "a 500 is retried, up to max_attempts");

    let reply = ask(&t, &session, &conversation, "after-429", "second").await;
    assert_eq!(reply["content"], reply_for("second"));
    assert_eq!(limited.requests(), 2, "a 429 is retried after its Retry-After");

    let reply = ask(&t, &session, &conversation, "after-slow", "third").await;
    assert_eq!(reply["content"], reply_for("third"));
    assert_eq!(slow.requests(), 2, "a missed first-token deadline is retried, then the chain moves on");

    assert_eq!(t.fake.requests(), 3, "the fallback answered each time");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_after_failures_and_half_opens_after_its_cool_down() {
    let (flaky, flaky_url) = spawn_fake(Knobs { error_rate: 1.0, ..Knobs::default() }).await;
    let t = TestPlatform::start_with(
        |config| {
            config.agent.retry.max_attempts = 1;
            config.agent.breaker.failure_threshold = 2;
            config.agent.breaker.cool_down_secs = 1;
            add_provider(config, "flaky", ProviderKind::Openai, &flaky_url, &[]);
            add_model(config, "guarded", &["flaky", "fake"]);
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("breaker@example.com").await;
    let conversation = t.create_conversation(&session, "breaker").await;

    ask(&t, &session, &conversation, "guarded", "one").await;
    ask(&t, &session, &conversation, "guarded", "two").await;
    assert_eq!(flaky.requests(), 2);
    // Open: the third reply does not even try the failing provider.
    let reply = ask(&t, &session, &conversation, "guarded", "three").await;
    assert_eq!(reply["content"], reply_for("three"));
    assert_eq!(flaky.requests(), 2);
    let metrics = t.http.get(t.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("parley_llm_breaker_state{provider=\"flaky\"} 2"), "{metrics}");
    let (status, ready) = read(t.http.get(t.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "an open circuit to one provider does not make the service unready");
    assert_eq!(ready["providers"]["flaky"], "open", "{ready}");

    // The provider recovers; after the cool-down a probe goes through and closes the circuit.
    flaky.set_knobs(Knobs { error_rate: 0.0, ..flaky.knobs() });
    let mut asked = 3;
    eventually("the breaker to let a probe through", Duration::from_secs(10), || {
        asked += 1;
        let content = format!("probe {asked}");
        let (t, session, conversation, flaky) = (&t, &session, &conversation, &flaky);
        async move {
            ask(t, session, conversation, "guarded", &content).await;
            (flaky.requests() > 2).then_some(())
        }
    })
    .await;
    let fallback_calls = t.fake.requests();
    ask(&t, &session, &conversation, "guarded", "closed again").await;
    assert_eq!(t.fake.requests(), fallback_calls, "a closed circuit sends calls to the primary again");
    let metrics = t.http.get(t.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("parley_llm_breaker_state{provider=\"flaky\"} 0"), "{metrics}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_key_gives_way_to_the_next_and_a_failing_key_is_benched() {
    let (bad_var, good_var) = ("PARLEY_TEST_BAD_KEY", "PARLEY_TEST_GOOD_KEY");
    let (keyed, keyed_url) =
        spawn_fake(Knobs { required_api_key: Some("good-key".to_owned()), ..Knobs::default() }).await;
    let t = TestPlatform::start_with(
        |config| {
            add_provider(config, "keyed", ProviderKind::Openai, &keyed_url, &[bad_var, good_var]);
            add_model(config, "keyed-model", &["keyed"]);
            // Keys are passed in, as `Config::load` reads them from the environment.
            config.provider_keys.insert(bad_var, "revoked-key");
            config.provider_keys.insert(good_var, "good-key");
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("keys@example.com").await;
    let conversation = t.create_conversation(&session, "keys").await;
    // Keys are used in turn: each of the first three replies tries the revoked key, gets 401 and
    // moves straight to the good one. After three rejections the revoked key is benched, so the fourth
    // reply uses only the good key.
    for round in 1..=4 {
        let reply = ask(&t, &session, &conversation, "keyed-model", &format!("round {round}")).await;
        assert_eq!(reply["content"], reply_for(&format!("round {round}")));
    }
    assert_eq!(keyed.requests(), 3 * 2 + 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_breaks_off_mid_stream_fails_keeping_what_was_said() {
    let (backup, backup_url) = spawn_fake(Knobs::default()).await;
    let t = TestPlatform::start_with(
        |config| {
            add_provider(config, "backup", ProviderKind::Openai, &backup_url, &[]);
            add_model(config, "breaks", &["fake", "backup"]);
        },
        &Service::ALL,
    )
    .await;
    t.fake.set_knobs(Knobs { fail_after_tokens: Some(3), ..t.fake.knobs() });
    let session = t.register("midstream@example.com").await;
    let conversation = t.create_conversation(&session, "mid-stream").await;
    let response =
        t.send_streaming(&session, &conversation, json!({"content": "break please", "model": "breaks"})).await;
    let mut reader = SseReader::new(response);
    let mut streamed = String::new();
    let last = loop {
        let event = reader.next().await.unwrap();
        match event.event.as_str() {
            "message.created" => {}
            "message.delta" => streamed.push_str(event.data["text"].as_str().unwrap()),
            _ => break event,
        }
    };
    assert_eq!(last.event, "message.failed", "{last:?}");
    assert_eq!(last.data["code"], "upstream_unavailable");
    // The fake breaks off after three tokens; what reached the agent before the break is a prefix.
    let whole = reply_for("break please");
    let at_most: String = parley_fake_llm::tokens_of(&whole)[..3].concat();
    assert!(!streamed.is_empty() && at_most.starts_with(&streamed), "{streamed:?}");
    let expected = streamed.clone();
    let (_, stored) = t.get(&session, &format!("/v1/messages/{}", last.data["message_id"].as_str().unwrap())).await;
    assert_eq!(stored["status"], "failed");
    assert_eq!(stored["content"], expected, "what was generated is kept");
    assert_eq!(stored["error"]["code"], "upstream_unavailable");
    assert_eq!(backup.requests(), 0, "no fail-over once the client has seen part of a reply");
    // What the model consumed before it broke off is charged (the prompt and the streamed part, as the
    // agent counts them), and the rest of the reservation released.
    let streamed_tokens = i64::from(parley_platform::tokens::estimate(&expected));
    let (used, reserved) =
        eventually("the failed reply's consumption to be charged", Duration::from_secs(10), || async {
            let (_, usage) = t.get(&session, "/v1/usage").await;
            let day = &usage["budget"]["day"];
            let (used, reserved) = (day["used"].as_i64()?, day["reserved"].as_i64()?);
            (reserved == 0 && used > 0).then_some((used, reserved))
        })
        .await;
    assert!(used > streamed_tokens, "the prompt counts too: {used} tokens charged");
    assert_eq!(reserved, 0);
    t.stop().await;
}

async fn dead_jobs(t: &TestPlatform) -> u64 {
    let client = async_nats::connect(&t.config.nats.url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let names = parley_platform::nats::Names::new(&t.config.nats.prefix);
    match jetstream.get_stream(names.dead_jobs_stream()).await {
        Ok(mut stream) => stream.info().await.unwrap().state.messages,
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_failing_ends_failed_and_dead_lettered() {
    let t = TestPlatform::start_with(
        |config| {
            config.nats.job_max_deliver = 2;
            config.agent.retry.max_attempts = 1;
            config.http.message_wait_secs = 1;
            config.fake_llm.error_rate = 1.0;
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("poison@example.com").await;
    let conversation = t.create_conversation(&session, "poison").await;
    let (status, exchange) = t
        .post(&session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": "never answered"}))
        .await;
    assert!(status == StatusCode::OK || status == StatusCode::ACCEPTED, "{exchange}");
    let reply_id = exchange["assistant_message"]["id"].as_str().unwrap().to_owned();
    let failed = eventually("the message to end failed", Duration::from_secs(20), || async {
        let (_, message) = t.get(&session, &format!("/v1/messages/{reply_id}")).await;
        (message["status"] == "failed").then_some(message)
    })
    .await;
    assert_eq!(failed["error"]["code"], "upstream_unavailable");
    assert_eq!(t.fake.requests(), 2, "one call per delivery, two deliveries");
    eventually("the job in the dead-letter stream", Duration::from_secs(10), || async {
        (dead_jobs(&t).await == 1).then_some(())
    })
    .await;
    // It is kept 14 days, without the conversation's text the job carried to its agent.
    let client = async_nats::connect(&t.config.nats.url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let names = parley_platform::nats::Names::new(&t.config.nats.prefix);
    let dead = jetstream.get_stream(names.dead_jobs_stream()).await.unwrap().get_raw_message(1).await.unwrap();
    let job: parley_platform::events::AiJob = serde_json::from_slice(&dead.payload).unwrap();
    assert_eq!(job.message_id.to_string(), reply_id);
    assert_eq!(job.context, None);
    assert!(!String::from_utf8_lossy(&dead.payload).contains("never answered"));

    // A job that cannot even be read goes straight to the dead-letter stream.
    jetstream.publish(names.jobs_subject(), "{not a job".into()).await.unwrap().await.unwrap();
    eventually("the poison job in the dead-letter stream", Duration::from_secs(10), || async {
        (dead_jobs(&t).await == 2).then_some(())
    })
    .await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_provider_streams_replies_too() {
    let (t, anthropic) = start_with_anthropic(|_| {}).await;
    let session = t.register("anthropic@example.com").await;
    let conversation = t.create_conversation(&session, "anthropic").await;
    let reply = ask(&t, &session, &conversation, "claude-fake", "hello claude").await;
    assert_eq!(reply["content"], reply_for("hello claude"));
    assert!(reply["usage"]["input_tokens"].as_i64().unwrap() > 0);
    assert_eq!(reply["usage"]["output_tokens"], parley_fake_llm::tokens_of(&reply_for("hello claude")).len());
    assert_eq!(anthropic.requests(), 1);
    assert_eq!(t.fake.requests(), 0);
    t.stop().await;
}

/// Providers (or proxies in front of them) that end lines with CR LF and close the stream right after
/// the last event, without the blank line: every event still counts, on both wire formats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_with_crlf_lines_and_no_final_blank_line_are_read_whole() {
    let quirks = Knobs { crlf: true, unterminated_end: true, ..Knobs::default() };
    let (openai, openai_url) = spawn_fake(quirks.clone()).await;
    let (anthropic, anthropic_url) = spawn_fake(quirks).await;
    let t = TestPlatform::start_with(
        |config| {
            add_provider(config, "crlf-openai", ProviderKind::Openai, &openai_url, &[]);
            add_model(config, "crlf-openai", &["crlf-openai"]);
            add_provider(config, "crlf-anthropic", ProviderKind::Anthropic, &anthropic_url, &[]);
            add_model(config, "crlf-anthropic", &["crlf-anthropic"]);
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("crlf@example.com").await;
    let conversation = t.create_conversation(&session, "crlf").await;
    for model in ["crlf-openai", "crlf-anthropic"] {
        let content = format!("hello over {model}");
        let reply = ask(&t, &session, &conversation, model, &content).await;
        assert_eq!(reply["status"], "completed", "{reply}");
        assert_eq!(reply["content"], reply_for(&content), "{reply}");
        assert_eq!(reply["usage"]["output_tokens"], parley_fake_llm::tokens_of(&reply_for(&content)).len(), "{reply}");
    }
    assert_eq!((openai.requests(), anthropic.requests()), (1, 1));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_requests_are_routed_to_the_cheaper_model() {
    let (cheap, cheap_url) = spawn_fake(Knobs::default()).await;
    let t = TestPlatform::start_with(
        |config| {
            add_provider(config, "cheap-provider", ProviderKind::Openai, &cheap_url, &[]);
            add_model(config, "cheap", &["cheap-provider"]);
            add_model(config, "smart", &["fake"]);
            let router = RouterConfig { model: "cheap".to_owned(), max_prompt_chars: 40, max_messages: 2 };
            config.models.get_mut("smart").unwrap().router = Some(router);
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("router@example.com").await;
    let conversation = t.create_conversation(&session, "routing").await;
    let reply = ask(&t, &session, &conversation, "smart", "hi").await;
    assert_eq!(reply["content"], reply_for("hi"));
    assert_eq!(reply["model"], "cheap", "the model that answered is recorded");
    assert_eq!((cheap.requests(), t.fake.requests()), (1, 0));

    let long = "please think hard about this long and detailed question";
    let conversation = t.create_conversation(&session, "not simple").await;
    let reply = ask(&t, &session, &conversation, "smart", long).await;
    assert_eq!(reply["model"], "smart");
    assert_eq!((cheap.requests(), t.fake.requests()), (1, 1));
    t.stop().await;
}

/// Why a model stopped reaches OpenAI clients as the provider said it, on both wire formats: a reply
/// cut at the longest allowed is `length`, plain and streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reason_a_model_stopped_reaches_openai_clients() {
    let (openai, openai_url) = spawn_fake(Knobs::default()).await;
    let (anthropic, anthropic_url) = spawn_fake(Knobs::default()).await;
    let t = TestPlatform::start_with(
        |config| {
            config.agent.max_output_tokens = 3;
            add_provider(config, "cut-openai", ProviderKind::Openai, &openai_url, &[]);
            add_model(config, "cut-openai", &["cut-openai"]);
            add_provider(config, "cut-anthropic", ProviderKind::Anthropic, &anthropic_url, &[]);
            add_model(config, "cut-anthropic", &["cut-anthropic"]);
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("finish@example.com").await;
    for model in ["cut-openai", "cut-anthropic"] {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "say a lot"}]});
        let (status, completion) = t.post(&session, "/v1/chat/completions", body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{completion}");
        assert_eq!(completion["choices"][0]["finish_reason"], "length", "{model}: {completion}");
        let expected: String = parley_fake_llm::tokens_of(&reply_for("say a lot"))[..3].concat();
        assert_eq!(completion["choices"][0]["message"]["content"], expected.as_str());

        let mut streamed = body;
        streamed["stream"] = json!(true);
        let response = t
            .http
            .post(t.url("/v1/chat/completions"))
            .bearer_auth(&session.token)
            .json(&streamed)
            .send()
            .await
            .unwrap();
        let text = response.text().await.unwrap();
        let reasons: Vec<String> = text
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
            .filter_map(|chunk| chunk["choices"][0]["finish_reason"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(reasons, ["length"], "{model}: {text}");
    }
    // The client's own longest reply, below the configured one, cuts it shorter; above it, it is bounded.
    for (asked, kept) in [(2, 2), (50, 3)] {
        let request = json!({"model": "cut-openai", "max_completion_tokens": asked,
            "messages": [{"role": "user", "content": "say a lot"}]});
        let (status, completion) = t.post(&session, "/v1/chat/completions", request).await;
        assert_eq!(status, StatusCode::OK, "{completion}");
        let expected: String = parley_fake_llm::tokens_of(&reply_for("say a lot"))[..kept].concat();
        assert_eq!(completion["choices"][0]["message"]["content"], expected.as_str(), "asked {asked}");
        assert_eq!(completion["choices"][0]["finish_reason"], "length");
    }
    assert!(openai.requests() >= 2 && anthropic.requests() >= 2);
    t.stop().await;
}
