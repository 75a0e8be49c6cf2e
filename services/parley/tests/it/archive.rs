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
