//! Accounting that adds up. A mixed workload (conversation replies, running summaries, OpenAI
//! completions whole and streamed, response-cache hits, a fallback to a second upstream, a call that
//! failed before any token, a reply cut off mid-stream, embeddings, and a job delivered again after
//! its reply was stored) leaves the upstreams' own counts, Parley's ledger, its usage events, its
//! budget counters and its usage report in agreement.

use std::time::Duration;

use parley::Service;
use parley_fake_llm::Knobs;
use parley_platform::config::ProviderKind;
use parley_platform::nats::Names;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{TestPlatform, add_model, add_provider, eventually, spawn_fake};

/// The usage events of one user: (outcome, cache hit, input, output, cost), all of them.
async fn events(pool: &sqlx::PgPool, user_id: Uuid) -> Vec<(String, bool, i64, i64, i64, String)> {
    sqlx::query_as(
        "SELECT outcome, cache_hit, input_tokens, output_tokens, cost_micros, model FROM analytics.usage_events
         WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_and_the_usage_reports_add_up_to_the_upstreams_own_counts() {
    let (backup, backup_url) = spawn_fake(Knobs::default()).await;
    let t = TestPlatform::start_with(
        |config| {
            add_provider(config, "backup", ProviderKind::Openai, &backup_url, &[]);
            // The built-in fake first, then the backup upstream, whose tokens cost more.
            add_model(config, "chained", &["fake", "backup"]);
            let fallback = &mut config.models.get_mut("chained").unwrap().chain[1];
            (fallback.input_price_per_mtok, fallback.output_price_per_mtok) = (Some(3.0), Some(100.0));
            // A window small enough that a thread of a few turns needs running summaries.
            config.models.get_mut("parley-fake").unwrap().context_window = 400;
            config.agent.max_output_tokens = 60;
            config.agent.breaker.failure_threshold = 100;
            config.agent.retry.base_delay_ms = 1;
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("ledger@example.com").await;
    let user_id = Uuid::parse_str(&session.user_id).unwrap();
    let completions = t.url("/v1/chat/completions");
    let complete = |body: Value| t.http.post(&completions).bearer_auth(&session.token).json(&body).send();
    let ask = |model: &str, content: &str| json!({"model": model, "messages": [{"role": "user", "content": content}]});

    // Conversation replies, long enough that the thread is summarised.
    let thread = t.create_conversation(&session, "a long thread").await;
    for turn in 1..=6 {
        let content = format!("Turn {turn}: {}", "tell me about the history of tea in great detail. ".repeat(3));
        let path = format!("/v1/conversations/{thread}/messages");
        let (status, exchange) = t.post(&session, &path, json!({"content": content})).await;
        assert_eq!(status, StatusCode::OK, "{exchange}");
    }
    // OpenAI completions, whole and streamed (read to the end).
    for content in ["First question", "Second question"] {
        assert_eq!(complete(ask("parley-fake", content)).await.unwrap().status(), StatusCode::OK);
    }
    let streamed =
        json!({"model": "parley-fake", "stream": true, "messages": [{"role": "user", "content": "Stream it"}]});
    let response = complete(streamed).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.bytes().await.unwrap();
    // The same deterministic question twice: the second is a cache hit, served without the upstream.
    let deterministic =
        json!({"model": "parley-fake", "temperature": 0, "messages": [{"role": "user", "content": "Cache me"}]});
    for _ in 0..2 {
        assert_eq!(complete(deterministic.clone()).await.unwrap().status(), StatusCode::OK);
    }
    // The first upstream failing: the chained model falls back to the backup, at the backup's prices.
    t.fake.set_knobs(Knobs { error_rate: 1.0, ..t.fake.knobs() });
    for content in ["Fall back once", "Fall back twice"] {
        assert_eq!(complete(ask("chained", content)).await.unwrap().status(), StatusCode::OK);
    }
    // Every provider failing before any token: a 503, nothing consumed.
    let refused = complete(ask("parley-fake", "Nobody answers")).await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    // A reply cut off mid-stream: the prompt and what was streamed were consumed.
    t.fake.set_knobs(Knobs { error_rate: 0.0, fail_after_tokens: Some(2), ..t.fake.knobs() });
    let cut = t.create_conversation(&session, "cut off").await;
    let before_cut = t.fake.billed();
    let (status, exchange) =
        t.post(&session, &format!("/v1/conversations/{cut}/messages"), json!({"content": "Say a lot"})).await;
    assert!(status.is_success(), "{exchange}");
    let after_cut = t.fake.billed();
    // What the upstream would bill for the cut-off reply: its prompt and the two tokens it sent.
    let cut_billed =
        (i64::try_from(after_cut.0 - before_cut.0).unwrap(), i64::try_from(after_cut.1 - before_cut.1).unwrap());
    assert_eq!(cut_billed.1, 2);
    t.fake.set_knobs(Knobs { fail_after_tokens: None, ..t.fake.knobs() });
    // Embeddings.
    let embeddings = json!({"model": "parley-fake-embed", "input": ["one text", "and another"]});
    let response = t.http.post(t.url("/v1/embeddings")).bearer_auth(&session.token).json(&embeddings).send().await;
    assert_eq!(response.unwrap().status(), StatusCode::OK);

    // A job delivered again after its reply was stored (an agent that died before acknowledging it):
    // the first turn's job, published anew from the outbox.
    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    let (subject, payload): (String, Value) = sqlx::query_as(
        "SELECT subject, payload FROM chat.outbox WHERE payload->>'conversation_id' = $1 ORDER BY id LIMIT 1",
    )
    .bind(&thread)
    .fetch_one(&pool)
    .await
    .unwrap();
    let jetstream = async_nats::jetstream::new(async_nats::connect(&t.config.nats.url).await.unwrap());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, Uuid::now_v7().to_string().as_str());
    let body = serde_json::to_vec(&payload).unwrap();
    let published = jetstream.publish_with_headers(subject, headers, body.into()).await.unwrap().await.unwrap();
    let names = Names::new(&t.config.nats.prefix);
    eventually("the agent to take the redelivered job", Duration::from_secs(10), || async {
        let stream = jetstream.get_stream(names.jobs_stream()).await.ok()?;
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(names.agent_consumer()).await.ok()?;
        let acknowledged = consumer.info().await.ok()?.ack_floor.stream_sequence;
        (acknowledged >= published.sequence).then_some(())
    })
    .await;

    // Everything reported and settled (the usage consumers batch for a few milliseconds).
    let upstreams = || {
        let ((a_in, a_out), (b_in, b_out)) = (t.fake.billed(), backup.billed());
        (i64::try_from(a_in + b_in).unwrap(), i64::try_from(a_out + b_out).unwrap())
    };
    let settled = eventually("the ledger to settle every call", Duration::from_secs(10), || async {
        let reported = events(&pool, user_id).await;
        let charged: i64 = reported.iter().filter(|e| !e.1).map(|e| e.2 + e.3).sum();
        let ledger = crate::quota::ledger_total(&t, &session.user_id).await;
        (ledger == charged && reported.len() >= 16).then_some(reported)
    })
    .await;

    // Every kind of call is there, once.
    let count = |outcome: &str| settled.iter().filter(|e| e.0 == outcome).count();
    assert!(count("summary") >= 1, "{settled:?}");
    assert_eq!(count("failed"), 2, "the refused call and the cut-off reply: {settled:?}");
    assert_eq!(settled.iter().filter(|e| e.1).count(), 1, "one cache hit: {settled:?}");
    let cut_off: Vec<_> = settled.iter().filter(|e| e.0 == "failed" && e.3 > 0).collect();
    assert_eq!(cut_off.len(), 1, "the cut-off reply charged what it streamed: {settled:?}");
    assert!(settled.iter().any(|e| e.0 == "failed" && e.2 + e.3 == 0), "the refused call charged nothing");
    // 6 turns + 3 completions + 1 cache miss and 1 hit + 2 fallbacks + 1 embeddings + 2 failures +
    // the summaries; the redelivered job added nothing.
    assert_eq!(settled.len(), 16 + count("summary"), "{settled:?}");

    // The upstreams' own counts of the calls they answered whole equal what Parley reported of them...
    let answered: Vec<_> = settled.iter().filter(|e| !e.1 && e.0 != "failed").collect();
    let reported = (answered.iter().map(|e| e.2).sum::<i64>(), answered.iter().map(|e| e.3).sum::<i64>());
    let (billed_in, billed_out) = upstreams();
    assert_eq!(reported, (billed_in - cut_billed.0, billed_out - cut_billed.1), "{settled:?}");
    // ...the cut-off reply, whose stream broke before any usage came, is charged Parley's estimate of
    // its prompt and of what it streamed (the upstream's own count of it cannot reach a client)...
    let (cut_in, cut_out) = (cut_off[0].2, cut_off[0].3);
    assert!(cut_in > 0 && cut_out > 0, "{cut_off:?}");
    // ...and the ledger holds exactly those tokens, each call once.
    let ledger = crate::quota::ledger_total(&t, &session.user_id).await;
    assert_eq!(ledger, reported.0 + reported.1 + cut_in + cut_out);

    // The daily totals count the two failures as failures, and the summaries not.
    let (failures,): (Option<i64>,) =
        sqlx::query_as("SELECT SUM(failures)::bigint FROM analytics.usage_daily WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(failures, Some(2));

    // The fallback calls were priced at the backup's prices.
    for (_, _, input, output, cost, _) in settled.iter().filter(|e| e.5 == "chained") {
        assert_eq!(*cost, ((3.0 * *input as f64) + (100.0 * *output as f64)).round() as i64);
    }

    // The budget counters in Redis hold the ledger's day and month.
    let mut redis =
        redis::Client::open(t.config.redis.url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let today = time::OffsetDateTime::now_utc().date();
    let prefix = &t.config.redis.key_prefix;
    let day_key = format!("{prefix}:quota:{user_id}:{today}");
    let month_key = format!("{prefix}:quota:{user_id}:month:{}-{:02}", today.year(), today.month() as u8);
    let (day, month): (Option<i64>, Option<i64>) =
        redis::cmd("MGET").arg(&day_key).arg(&month_key).query_async(&mut redis).await.unwrap();
    assert_eq!((day, month), (Some(ledger), Some(ledger)));

    // The usage report says the same.
    let (status, report) = t.get(&session, "/v1/usage?group_by=model").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let totals = &report["totals"];
    let all = (settled.iter().map(|e| e.2).sum::<i64>(), settled.iter().map(|e| e.3).sum::<i64>());
    assert_eq!((totals["input_tokens"].as_i64().unwrap(), totals["output_tokens"].as_i64().unwrap()), all, "{report}");
    t.stop().await;
}
