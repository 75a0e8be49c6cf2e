//! `DELETE /v1/me`: an account and everything it owns go from every service's schema and from Redis;
//! usage totals stay, anonymised; its tokens, keys and sessions stop working at once.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::harness::{TestPlatform, assert_problem, eventually, read};

/// Rows of `table` whose `column` is `user_id`.
async fn rows(pool: &sqlx::PgPool, table: &str, column: &str, user_id: Uuid) -> i64 {
    // The table and column names are this file's own constants.
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table} WHERE {column} = $1")))
        .bind(user_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The tokens of the anonymous account's daily totals (where deleted accounts' usage goes).
async fn anonymous_tokens(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(SUM(input_tokens + output_tokens), 0)::bigint FROM analytics.usage_daily WHERE user_id = $1",
    )
    .bind(Uuid::nil())
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_account_erases_it_everywhere_and_keeps_usage_totals_anonymous() {
    let t = TestPlatform::start().await;
    let ada = t.register("ada@example.com").await;
    let ada_id = Uuid::parse_str(&ada.user_id).unwrap();
    let bob = t.register("bob@example.com").await;

    // Ada uses everything: a conversation with a reply, an API key, a stored OpenAI completion.
    let (status, created) = t.post(&ada, "/v1/api-keys", json!({"name": "laptop"})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    let conversation = t.create_conversation(&ada, "mine").await;
    let (status, sent) =
        t.post(&ada, &format!("/v1/conversations/{conversation}/messages"), json!({"content": "Hello there"})).await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    let completion = json!({"model": "parley-fake", "messages": [{"role": "user", "content": "Hi"}], "store": true});
    let response = t.http.post(t.url("/v1/chat/completions")).bearer_auth(&key).json(&completion).send().await;
    assert_eq!(response.unwrap().status(), StatusCode::OK);
    let bobs = t.create_conversation(&bob, "theirs").await;
    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    // Both calls settled and counted, so that there is something to erase and to keep.
    // The total is read once both events are in: analytics writes an event and its daily total in one
    // transaction, so read after the count it includes both (read before, it could miss the second).
    let counted: i64 = eventually("Ada's usage to be counted", Duration::from_secs(10), || async {
        let ledger = rows(&pool, "quota.ledger", "user_id", ada_id).await;
        if ledger != 2 || rows(&pool, "analytics.usage_events", "user_id", ada_id).await != 2 {
            return None;
        }
        let (tokens,): (Option<i64>,) = sqlx::query_as(
            "SELECT SUM(input_tokens + output_tokens)::bigint FROM analytics.usage_daily WHERE user_id = $1",
        )
        .bind(ada_id)
        .fetch_one(&pool)
        .await
        .unwrap();
        tokens
    })
    .await;
    let anonymous_before = anonymous_tokens(&pool).await;
    assert_eq!(rows(&pool, "chat.stored_completions", "user_id", ada_id).await, 1);

    // Not with an API key: a leaked key must not be able to end the account.
    let response = t.http.delete(t.url("/v1/me")).bearer_auth(&key).send().await.unwrap();
    let (status, body) = read(response).await;
    assert_problem(status, &body, 403, "forbidden");

    assert_eq!(t.delete(&ada, "/v1/me").await, StatusCode::NO_CONTENT);

    // The audit log keeps what happened under her id alone (before the attempts below, which are new
    // events: a login to her address is recorded like one to any unknown address).
    let (named,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM identity.audit_log WHERE (user_id = $1 OR email = 'ada@example.com')
         AND (email IS NOT NULL OR client_ip IS NOT NULL)",
    )
    .bind(ada_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(named, 0, "the audit log still names Ada or her address");
    let (deletions,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM identity.audit_log WHERE user_id = $1 AND event = 'account_deleted'")
            .bind(ada_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(deletions, 1);
    // Every credential stops working at once.
    let (status, body) = t.get(&ada, "/v1/me").await;
    assert_problem(status, &body, 401, "unauthorized");
    let response = t.http.get(t.url("/v1/conversations")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let refresh = json!({"refresh_token": ada.refresh_token});
    let response = t.http.post(t.url("/v1/auth/refresh")).json(&refresh).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let login = json!({"email": "ada@example.com", "password": "correct horse battery"});
    let response = t.http.post(t.url("/v1/auth/login")).json(&login).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(t.delete(&ada, "/v1/me").await, StatusCode::UNAUTHORIZED);

    // Nothing of Ada's is left in any schema...
    for (table, column) in [
        ("identity.users", "id"),
        ("identity.api_keys", "user_id"),
        ("identity.refresh_tokens", "user_id"),
        ("chat.conversations", "user_id"),
        ("chat.messages", "user_id"),
        ("chat.idempotency_keys", "user_id"),
        ("chat.stored_completions", "user_id"),
        ("quota.ledger", "user_id"),
        ("analytics.usage_events", "user_id"),
        ("analytics.usage_daily", "user_id"),
        ("analytics.cost_alerts", "user_id"),
    ] {
        assert_eq!(rows(&pool, table, column, ada_id).await, 0, "{table} still holds Ada's rows");
    }
    let (outbox,): (i64,) = sqlx::query_as("SELECT count(*) FROM chat.outbox WHERE payload->>'user_id' = $1")
        .bind(&ada.user_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(outbox, 0);
    // ...Redis holds none of her counters...
    let mut redis =
        redis::Client::open(t.config.redis.url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:quota:{ada_id}:*", t.config.redis.key_prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    // ...and the usage totals still add up, under the anonymous account.
    let anonymous_after = anonymous_tokens(&pool).await;
    assert_eq!(anonymous_after - anonymous_before, counted);

    // A usage event of hers that arrives late (a reply still generating) is stored anonymised.
    let late = crate::usage::event(&ada, "parley-fake", 7, 5, OffsetDateTime::now_utc());
    crate::usage::publish(&t, &late, &late.event_id.to_string()).await;
    let stored_as: Uuid = eventually("the late event to be stored", Duration::from_secs(10), || async {
        sqlx::query_scalar("SELECT user_id FROM analytics.usage_events WHERE event_id = $1")
            .bind(late.event_id)
            .fetch_optional(&pool)
            .await
            .unwrap()
    })
    .await;
    assert_eq!(stored_as, Uuid::nil());
    assert_eq!(rows(&pool, "analytics.usage_daily", "user_id", ada_id).await, 0);

    // Bob is untouched.
    let (status, listed) = t.get(&bob, "/v1/conversations").await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&Value> = listed["data"].as_array().unwrap().iter().map(|c| &c["id"]).collect();
    assert_eq!(ids, vec![&Value::String(bobs)]);
    t.stop().await;
}
