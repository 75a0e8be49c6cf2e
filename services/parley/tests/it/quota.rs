//! Token budgets: reserved before a job, settled after it, never overspent under concurrency, rebuilt
//! from the ledger when Redis loses its counters, released when a job dies, daily and monthly.

use std::time::Duration;

use parley::Service;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{ALL_BUT_AGENT, TestPlatform, assert_problem, eventually, read};

pub(crate) async fn ledger_total(t: &TestPlatform, user_id: &str) -> i64 {
    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    let (total,): (Option<i64>,) =
        sqlx::query_as("SELECT SUM(tokens)::bigint FROM quota.ledger WHERE user_id = $1::uuid")
            .bind(user_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    total.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_sends_never_overspend_by_more_than_one_reservation() {
    let t = TestPlatform::start_with(
        |config| {
            config.agent.max_output_tokens = 10;
            config.tiers.get_mut("free").unwrap().tokens_per_day = 150;
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("budget@example.com").await;
    let conversation = t.create_conversation(&session, "budget").await;
    let path = t.url(&format!("/v1/conversations/{conversation}/messages"));
    let sends = (0..50).map(|index| {
        let request = t.http.post(&path).bearer_auth(&session.token).json(&json!({"content": format!("send {index}")}));
        async move { request.send().await.unwrap().status() }
    });
    let statuses = futures::future::join_all(sends).await;
    // Accepted sends end completed, or failed with quota_exceeded when the agent finds the real prompt
    // (the thread's history included) does not fit what is left.
    let accepted = statuses.iter().filter(|status| status.is_success()).count();
    let refused = statuses.iter().filter(|status| **status == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!(accepted + refused, 50, "{statuses:?}");
    assert!(accepted >= 5 && refused >= 30, "accepted {accepted}, refused {refused}");

    // Once every reply settled, the tokens charged stay within the budget plus one reservation.
    let (_, usage) = eventually("every reservation to settle", Duration::from_secs(20), || async {
        let (status, usage) = t.get(&session, "/v1/usage").await;
        (status == StatusCode::OK && usage["budget"]["day"]["reserved"] == 0).then_some((status, usage))
    })
    .await;
    let charged = ledger_total(&t, &session.user_id).await;
    let one_reservation = 2 + 10;
    assert!(charged <= 150 + one_reservation, "charged {charged}");
    assert_eq!(usage["budget"]["day"]["used"], charged);
    assert_eq!(usage["budget"]["day"]["limit"], 150);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_are_rebuilt_from_the_ledger_when_redis_loses_them() {
    let t = TestPlatform::start().await;
    let session = t.register("rebuild@example.com").await;
    let conversation = t.create_conversation(&session, "rebuild").await;
    for content in ["one", "two"] {
        let (status, _) =
            t.post(&session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": content})).await;
        assert_eq!(status, StatusCode::OK);
    }
    // Both replies settled (their usage events are settled in batches, so one can land before the other).
    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    eventually("both charges", Duration::from_secs(10), || async {
        let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM quota.ledger WHERE user_id = $1::uuid")
            .bind(&session.user_id)
            .fetch_one(&pool)
            .await
            .unwrap();
        (rows == 2).then_some(())
    })
    .await;
    let charged = ledger_total(&t, &session.user_id).await;

    // Redis loses every quota counter of this deployment.
    let client = redis::Client::open(t.config.redis.url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:quota:*", t.config.redis.key_prefix))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut connection).await.unwrap();

    let (_, usage) = t.get(&session, "/v1/usage").await;
    assert_eq!(usage["budget"]["day"]["used"], charged, "rebuilt from the ledger");
    assert_eq!(usage["budget"]["month"]["used"], charged);
    t.stop().await;
}

/// Calls quota's `Reserve` has served, from the process's metrics (every service runs in this one).
async fn reserve_calls(t: &TestPlatform) -> f64 {
    let text = t.http.get(t.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| line.starts_with("parley_grpc_server_requests_total{"))
        .filter(|line| line.contains("method=\"/parley.quota.v1.QuotaService/Reserve\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_reserves_in_redis_and_asks_quota_only_to_rebuild_counters() {
    let t = TestPlatform::start().await;
    let session = t.register("fast-reserve@example.com").await;
    let conversation = t.create_conversation(&session, "fast path").await;
    let send = |content: &'static str| {
        let path = format!("/v1/conversations/{conversation}/messages");
        let (t, session) = (&t, &session);
        async move {
            let (status, body) = t.post(session, &path, json!({"content": content})).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    };
    // A new user has no counters yet: quota rebuilds them (one Reserve call); then Redis decides alone.
    send("first").await;
    assert_eq!(reserve_calls(&t).await, 1.0);
    send("second").await;
    send("third").await;
    assert_eq!(reserve_calls(&t).await, 1.0, "reservations with counters in Redis need no call to quota");

    // Counters lost: the gateway hands the reservation to quota, which rebuilds them from the ledger.
    let client = redis::Client::open(t.config.redis.url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:quota:{}:*", t.config.redis.key_prefix, session.user_id))
        .query_async(&mut connection)
        .await
        .unwrap();
    let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut connection).await.unwrap();
    send("fourth").await;
    assert_eq!(reserve_calls(&t).await, 2.0);
    send("fifth").await;
    assert_eq!(reserve_calls(&t).await, 2.0);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_whose_job_died_expires() {
    let t = TestPlatform::start_with(
        |config| {
            config.quota.reservation_ttl_secs = 4;
            config.http.message_wait_secs = 1;
        },
        ALL_BUT_AGENT,
    )
    .await;
    let session = t.register("expiry@example.com").await;
    let conversation = t.create_conversation(&session, "no agent").await;
    let (status, _) =
        t.post(&session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": "hold"})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (_, usage) = t.get(&session, "/v1/usage").await;
    assert!(usage["budget"]["day"]["reserved"].as_i64().unwrap() > 0, "{usage}");
    eventually("the reservation to expire", Duration::from_secs(10), || async {
        let (_, usage) = t.get(&session, "/v1/usage").await;
        (usage["budget"]["day"]["reserved"] == 0).then_some(())
    })
    .await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monthly_budget_binds_too() {
    let t = TestPlatform::start_with(
        |config| {
            config.agent.max_output_tokens = 10;
            let free = config.tiers.get_mut("free").unwrap();
            free.tokens_per_day = 1_000_000;
            free.tokens_per_month = Some(30);
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("monthly@example.com").await;
    let mut refused = None;
    for index in 0..5 {
        // A new conversation each time keeps every prompt as small as the gateway's estimate.
        let conversation = t.create_conversation(&session, &format!("monthly {index}")).await;
        let path = format!("/v1/conversations/{conversation}/messages");
        let response =
            t.http.post(t.url(&path)).bearer_auth(&session.token).json(&json!({"content": "x"})).send().await.unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(response);
            break;
        }
        let (_, body) = read(response).await;
        assert_eq!(body["assistant_message"]["status"], "completed", "{body}");
    }
    let refused = refused.expect("the monthly budget ran out");
    let retry_after: i64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    let until_midnight = 86_400 - time::OffsetDateTime::now_utc().time().as_hms().0 as i64 * 3600;
    assert!(retry_after >= until_midnight - 3600, "waits for the month to reset, not the day: {retry_after}");
    let (status, body) = read(refused).await;
    assert_problem(status, &body, 429, "quota_exceeded");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admins_tier_change_applies_on_the_next_request() {
    let mut t = TestPlatform::start_with(
        |config| {
            config.agent.max_output_tokens = 10;
            config.tiers.get_mut("free").unwrap().tokens_per_day = 20;
            config.auth.admin_emails = vec!["boss@example.com".to_owned()];
        },
        &Service::ALL,
    )
    .await;
    let other_gateway = t.launch(&[Service::Gateway]).await.unwrap();
    let boss = t.register("boss@example.com").await;
    let user = t.register("upgrade@example.com").await;
    // The free budget (20 tokens) allows one exchange of about 11 tokens, not two.
    assert_eq!(send_in_new_conversation(&t, &user, &t.base).await, StatusCode::OK);
    assert_eq!(send_in_new_conversation(&t, &user, &t.base).await, StatusCode::TOO_MANY_REQUESTS);

    let response = t
        .http
        .put(t.url(&format!("/v1/admin/users/{}/tier", user.user_id)))
        .bearer_auth(&boss.token)
        .json(&json!({"tier": "pro"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The same (old) access token, on either gateway: the pro budget applies at once.
    eventually("the tier change to reach every gateway", Duration::from_secs(1), || async {
        (send_in_new_conversation(&t, &user, &other_gateway).await == StatusCode::OK).then_some(())
    })
    .await;
    assert_eq!(send_in_new_conversation(&t, &user, &t.base).await, StatusCode::OK);
    t.stop().await;
}

async fn send_in_new_conversation(t: &TestPlatform, user: &crate::harness::Session, base: &str) -> StatusCode {
    let conversation = t.create_conversation(user, "a fresh thread").await;
    t.http
        .post(format!("{base}/v1/conversations/{conversation}/messages"))
        .bearer_auth(&user.token)
        .json(&json!({"content": "x"}))
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_budgets_turn_conservative_never_unlimited() {
    let redis = crate::rate_limits::OwnRedis::start(None).await;
    let url = redis.url();
    let t = TestPlatform::start_with(
        |config| {
            config.redis.url = url.clone();
            config.agent.max_output_tokens = 10;
            config.tiers.get_mut("free").unwrap().tokens_per_day = 100;
        },
        &Service::ALL,
    )
    .await;
    let user = t.register("no-redis@example.com").await;
    redis.stop();

    // Sends go on, answered from the ledger against 80% of the budget, until that share is spent:
    // then refused, at the gateway (429) or by the agent's exact reservation (failed, quota_exceeded).
    let mut completed = 0;
    let mut refused = 0;
    for _ in 0..12 {
        let conversation = t.create_conversation(&user, "no redis").await;
        let (status, exchange) =
            t.post(&user, &format!("/v1/conversations/{conversation}/messages"), json!({"content": "x"})).await;
        match (status, exchange["assistant_message"]["status"].as_str()) {
            (StatusCode::OK, Some("completed")) => completed += 1,
            (StatusCode::OK, Some("failed")) => {
                assert_eq!(exchange["assistant_message"]["error"]["code"], "quota_exceeded");
                refused += 1;
            }
            (StatusCode::TOO_MANY_REQUESTS, _) => refused += 1,
            other => panic!("unexpected {other:?}: {exchange}"),
        }
    }
    assert!(completed >= 3, "sends still work without redis: {completed}");
    assert!(refused >= 3, "but never without limit: {refused}");
    let charged = ledger_total(&t, &user.user_id).await;
    assert!(charged <= 80, "within the conservative share of 100: {charged}");
    let (_, usage) = t.get(&user, "/v1/usage").await;
    assert_eq!(usage["budget"]["degraded"], true, "{usage}");
    assert_eq!(usage["budget"]["day"]["limit"], 80);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_send_loses_nothing_and_holds_no_budget() {
    let t = TestPlatform::start().await;
    let session = t.register("hangup@example.com").await;
    let conversation = t.create_conversation(&session, "hang up").await;
    // Hold the conversation's row lock, as a concurrent send would, so the send waits inside chat.
    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM chat.conversations WHERE id = $1::uuid FOR UPDATE")
        .bind(&conversation)
        .execute(&mut *holder)
        .await
        .unwrap();
    let path = format!("/v1/conversations/{conversation}/messages");
    let hung_up = t
        .http
        .post(t.url(&path))
        .bearer_auth(&session.token)
        .json(&json!({"content": "are you still there"}))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(hung_up.is_err_and(|error| error.is_timeout()), "the client gave up while the send waited");
    holder.commit().await.unwrap();

    // The send went through all the same: the message is stored, answered, and its budget settled.
    eventually("the abandoned send to be answered and settled", Duration::from_secs(10), || async {
        let (_, messages) = t.get(&session, &path).await;
        let messages = messages["data"].as_array()?.clone();
        let (_, usage) = t.get(&session, "/v1/usage").await;
        let answered = messages.len() == 2 && messages[1]["status"] == "completed";
        (answered && usage["budget"]["day"]["reserved"] == 0).then_some(())
    })
    .await;
    t.stop().await;
}
