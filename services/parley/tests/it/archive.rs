//! `parley archive`: conversations idle for N days move to the archive table, and everything a client
//! can do with them keeps working: read, page, look up a message, replay an idempotent send, continue
//! the thread (with its archived history as context), delete.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Session, TestPlatform, run_parley};

fn archive(t: &TestPlatform, idle_days: &str) -> String {
    let output =
        run_parley(&[("DATABASE_URL", &t.config.database.url)], &["archive", "--idle-days", idle_days, "--batch", "1"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

async fn all_messages(t: &TestPlatform, session: &Session, conversation: &str) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut path = format!("/v1/conversations/{conversation}/messages?limit=4");
    loop {
        let (status, page) = t.get(session, &path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        rows.extend(page["data"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/conversations/{conversation}/messages?limit=4&cursor={cursor}"),
            None => return rows,
        }
    }
}

async fn send(t: &TestPlatform, session: &Session, conversation: &str, content: &str, key: &str) -> Value {
    let response = t
        .http
        .post(t.url(&format!("/v1/conversations/{conversation}/messages")))
        .bearer_auth(&session.token)
        .header("idempotency-key", key)
        .json(&json!({"content": content}))
        .send()
        .await
        .unwrap();
    let (status, body) = crate::harness::read(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_conversations_are_archived_and_still_read_continued_and_deleted() {
    let t = TestPlatform::start().await;
    let session = t.register("archivist@example.com").await;
    let old = t.create_conversation(&session, "from last season").await;
    let first = send(&t, &session, &old, "What is the capital of France?", "k-1").await;
    for n in 2..=3 {
        send(&t, &session, &old, &format!("Follow-up number {n}"), &format!("k-{n}")).await;
    }
    let recent = t.create_conversation(&session, "this week").await;
    send(&t, &session, &recent, "Hello", "k-recent").await;
    let before = all_messages(&t, &session, &old).await;
    assert_eq!(before.len(), 6);

    // The old conversation has been idle for 40 days.
    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    sqlx::query("UPDATE chat.conversations SET updated_at = now() - interval '40 days' WHERE id = $1::uuid")
        .bind(&old)
        .execute(&pool)
        .await
        .unwrap();
    let report = archive(&t, "30");
    assert!(report.contains("archived 1 conversations"), "{report}");
    assert!(report.contains("6 messages moved"), "{report}");
    let count = |table: &'static str, conversation: String| {
        let pool = pool.clone();
        async move {
            let query = format!("SELECT count(*) FROM chat.{table} WHERE conversation_id = $1::uuid");
            let (n,): (i64,) =
                sqlx::query_as(sqlx::AssertSqlSafe(query)).bind(conversation).fetch_one(&pool).await.unwrap();
            n
        }
    };
    assert_eq!(count("messages", old.clone()).await, 0, "the hot table no longer holds them");
    assert_eq!(count("archived_messages", old.clone()).await, 6);
    assert_eq!(count("messages", recent.clone()).await, 2, "an active conversation stays");

    // Reads are unchanged: the same messages, in the same order, page by page; lookups by id.
    assert_eq!(all_messages(&t, &session, &old).await, before);
    let (status, conversation) = t.get(&session, &format!("/v1/conversations/{old}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(conversation["title"], "from last season");
    let reply_id = first["assistant_message"]["id"].as_str().unwrap();
    let (status, reply) = t.get(&session, &format!("/v1/messages/{reply_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply["content"], first["assistant_message"]["content"]);
    // A retried send whose first exchange is archived returns that exchange and stores nothing.
    let replayed = send(&t, &session, &old, "What is the capital of France?", "k-1").await;
    assert_eq!(replayed["assistant_message"]["id"], first["assistant_message"]["id"]);

    // The thread goes on, with its archived history in the model's context.
    let continued = send(&t, &session, &old, "And of Italy?", "k-4").await;
    let fresh = t.create_conversation(&session, "no history").await;
    let alone = send(&t, &session, &fresh, "And of Italy?", "k-5").await;
    let tokens = |exchange: &Value| exchange["assistant_message"]["usage"]["input_tokens"].as_i64().unwrap();
    assert!(tokens(&continued) > tokens(&alone), "the archived messages were part of the prompt");
    let after = all_messages(&t, &session, &old).await;
    assert_eq!(after.len(), 8);
    assert_eq!(after[..6], before[..]);
    // Active again, so a second run leaves it alone.
    assert!(archive(&t, "30").contains("archived 0 conversations"));

    // Deleting an archived conversation removes its archived messages too.
    assert_eq!(t.delete(&session, &format!("/v1/conversations/{old}")).await, StatusCode::NO_CONTENT);
    assert_eq!(count("archived_messages", old.clone()).await, 0);
    let (status, _) = t.get(&session, &format!("/v1/messages/{reply_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    pool.close().await;
    t.stop().await;
}

/// Rows of `table` matching `condition` (this file's own constants).
async fn count(pool: &sqlx::PgPool, table: &str, condition: &str) -> i64 {
    let query = format!("SELECT count(*) FROM {table} WHERE {condition}");
    sqlx::query_scalar(sqlx::AssertSqlSafe(query)).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_what_is_past_it_in_every_schema_and_keeps_the_rest() {
    let t = TestPlatform::start().await;
    let session = t.register("keeper@example.com").await;
    let old_conversation = t.create_conversation(&session, "old").await;
    let recent_conversation = t.create_conversation(&session, "recent").await;
    send(&t, &session, &recent_conversation, "Hello", "key-recent").await;
    send(&t, &session, &old_conversation, "Hello from long ago", "key-old").await;
    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    let user_id = uuid::Uuid::parse_str(&session.user_id).unwrap();
    crate::harness::eventually("the sends to be charged", std::time::Duration::from_secs(10), || async {
        (count(&pool, "quota.ledger", "true").await >= 2).then_some(())
    })
    .await;

    // Make some of everything old: past each table's retention, beside recent rows that must stay.
    let statements = [
        // A second session, then the first one's token expired two days ago.
        "UPDATE identity.refresh_tokens SET expires_at = now() - interval '2 days'
         WHERE id = (SELECT id FROM identity.refresh_tokens ORDER BY created_at LIMIT 1)",
        "INSERT INTO identity.audit_log (id, at, event) VALUES (gen_random_uuid(), now() - interval '400 days', 'old')",
        "CREATE TEMP TABLE retired AS SELECT * FROM identity.signing_keys LIMIT 1",
        "UPDATE retired SET kid = 'retired-long-ago', retired_at = now() - interval '31 days'",
        "INSERT INTO identity.signing_keys SELECT * FROM retired",
        "UPDATE chat.idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'key-old'",
        "INSERT INTO quota.ledger (reference_id, user_id, day, tokens)
         SELECT 'long-ago', user_id, (now() - interval '15 months')::date, 5 FROM quota.ledger LIMIT 1",
        "INSERT INTO analytics.usage_daily
             (day, user_id, model, requests, input_tokens, output_tokens, cost_micros, cache_hits, failures)
         VALUES ((now() - interval '30 months')::date, gen_random_uuid(), 'old-model', 1, 1, 1, 1, 0, 0)",
        "INSERT INTO analytics.spend_daily (day, cost_micros) VALUES ((now() - interval '30 months')::date, 1)",
        "INSERT INTO chat.stored_completions (id, user_id, model, data_key, completion, messages, created_at)
         VALUES (gen_random_uuid(), gen_random_uuid(), 'kept-long-ago', '\\x00', '', '[]', now() - interval '40 days'),
                (gen_random_uuid(), gen_random_uuid(), 'kept-lately', '\\x00', '', '[]', now() - interval '20 days')",
        "INSERT INTO analytics.erased_users (user_id, erased_at) VALUES (gen_random_uuid(), now() - interval '31 days'),
             (gen_random_uuid(), now())",
    ];
    let mut connection = pool.acquire().await.unwrap();
    for statement in statements {
        sqlx::query(statement).execute(&mut *connection).await.unwrap();
    }
    drop(connection);
    let second = t
        .http
        .post(t.url("/v1/auth/login"))
        .json(&json!({"email": "keeper@example.com", "password": "correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    sqlx::query("UPDATE chat.conversations SET updated_at = now() - interval '40 days' WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&old_conversation).unwrap())
        .execute(&pool)
        .await
        .unwrap();
    let before = |table: &'static str| count(&pool, table, "true");
    let (tokens, audit, keys, ledger) = (
        before("identity.refresh_tokens").await,
        before("identity.audit_log").await,
        before("identity.signing_keys").await,
        before("quota.ledger").await,
    );

    let output = run_parley(
        &[("DATABASE_URL", &t.config.database.url)],
        &[
            "archive",
            "--audit-days",
            "365",
            "--ledger-months",
            "13",
            "--rollup-months",
            "24",
            "--conversation-days",
            "30",
        ],
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(printed.contains("identity: 1 expired refresh tokens, 1 audit entries"), "{printed}");

    // Exactly the old rows are gone...
    assert_eq!(count(&pool, "identity.refresh_tokens", "true").await, tokens - 1);
    assert_eq!(count(&pool, "identity.audit_log", "true").await, audit - 1);
    assert_eq!(count(&pool, "identity.signing_keys", "true").await, keys - 1);
    assert_eq!(count(&pool, "identity.signing_keys", "kid = 'retired-long-ago'").await, 0);
    assert_eq!(count(&pool, "chat.idempotency_keys", "key = 'key-old'").await, 0);
    assert_eq!(count(&pool, "chat.idempotency_keys", "key = 'key-recent'").await, 1);
    assert_eq!(count(&pool, "quota.ledger", "true").await, ledger - 1);
    assert_eq!(count(&pool, "quota.ledger", "reference_id = 'long-ago'").await, 0);
    assert_eq!(count(&pool, "analytics.usage_daily", "model = 'old-model'").await, 0);
    assert_eq!(count(&pool, "analytics.spend_daily", "day < now() - interval '29 months'").await, 0);
    assert_eq!(count(&pool, "analytics.erased_users", "true").await, 1);
    assert!(printed.contains("and 1 stored completions older than 30 days deleted"), "{printed}");
    assert_eq!(count(&pool, "chat.stored_completions", "model = 'kept-long-ago'").await, 0);
    assert_eq!(count(&pool, "chat.stored_completions", "model = 'kept-lately'").await, 1);
    // ...the idle conversation with its messages, and nothing else of the user's.
    let (status, _) = t.get(&session, &format!("/v1/conversations/{old_conversation}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let messages = all_messages(&t, &session, &recent_conversation).await;
    assert_eq!(messages.len(), 2);
    assert!(count(&pool, "analytics.usage_daily", &format!("user_id = '{user_id}'")).await > 0);
    t.stop().await;
}
