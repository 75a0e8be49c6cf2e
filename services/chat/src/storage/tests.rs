//! The chat schema's SQL against a real PostgreSQL, one fresh database per test (dropped afterwards,
//! also when the test fails).

use std::sync::Arc;

use parley_platform::config::DatabaseConfig;
use parley_platform::events::AiJob;
use parley_platform::replicas::{Database, WriteMarks};
use parley_platform::test_database::TestDatabase;

use super::*;

/// A fresh database with the chat schema, and the storage on it.
struct Fixture {
    storage: Storage,
    _database: TestDatabase,
}

impl Fixture {
    async fn create() -> Self {
        let database = TestDatabase::create("parley_chat_storage").await.unwrap();
        let config = DatabaseConfig { url: database.url().to_owned(), ..DatabaseConfig::default() };
        let pools = Database::connect_lazy(&config).unwrap();
        crate::migrate(pools.primary()).await.unwrap();
        let storage = Storage::new(WriteMarks::new(Arc::new(pools), None, "test"));
        Self { storage, _database: database }
    }

    fn pool(&self) -> &PgPool {
        self.storage.pool()
    }

    async fn outbox(&self) -> Vec<AiJob> {
        let rows: Vec<(sqlx::types::Json<AiJob>,)> =
            sqlx::query_as("SELECT payload FROM chat.outbox ORDER BY id").fetch_all(self.pool()).await.unwrap();
        rows.into_iter().map(|(job,)| job.0).collect()
    }

    async fn count(&self, table: &str) -> i64 {
        let (count,): (i64,) =
            sqlx::query_as(sql(format!("SELECT count(*) FROM chat.{table}"))).fetch_one(self.pool()).await.unwrap();
        count
    }
}

fn exchange<'a>(user_id: Uuid, conversation_id: Uuid, content: &'a str) -> NewExchange<'a> {
    NewExchange {
        user_id,
        conversation_id,
        content,
        model: None,
        idempotency_key: None,
        tier: "free",
        jobs_subject: "test.jobs.chat",
        traceparent: None,
        generation: Generation::default(),
    }
}

#[tokio::test]
async fn a_send_stores_the_question_the_pending_reply_and_its_job_in_one_go() {
    let db = Fixture::create().await;
    let user = Uuid::now_v7();
    let conversation = db.storage.create_conversation(user, Some("t"), "model-a", None).await.unwrap();

    let first = db.storage.send(exchange(user, conversation.id, "one")).await.unwrap().unwrap();
    let named = NewExchange { model: Some("model-b"), ..exchange(user, conversation.id, "two") };
    let second = db.storage.send(named).await.unwrap().unwrap();

    for (sent, content, model) in [(&first, "one", "model-a"), (&second, "two", "model-b")] {
        assert_eq!((sent.user_message.role.as_str(), sent.user_message.content.as_str()), ("user", content));
        assert_eq!(sent.user_message.status, MessageStatus::Completed);
        assert_eq!(
            (sent.assistant_message.role.as_str(), sent.assistant_message.status),
            ("assistant", MessageStatus::Pending)
        );
        assert_eq!(sent.assistant_message.model.as_deref(), Some(model));
        assert!(sent.assistant_message.created_at > sent.user_message.created_at);
        let job = &sent.job.as_ref().unwrap().job;
        assert_eq!((job.message_id, job.model.as_str()), (sent.assistant_message.id, model));
    }
    // Each message sorts after everything sent before it.
    assert!(second.user_message.created_at > first.assistant_message.created_at);
    // The stored jobs are the ones handed to the relay, the model filled in from the conversation.
    let stored = db.outbox().await;
    assert_eq!(
        stored.iter().map(|job| (job.message_id, job.model.as_str())).collect::<Vec<_>>(),
        [(first.assistant_message.id, "model-a"), (second.assistant_message.id, "model-b")]
    );
    let touched = db.storage.conversation(ReadFloor::Primary, user, conversation.id).await.unwrap().unwrap();
    assert!(touched.updated_at >= second.user_message.created_at - time::Duration::seconds(1));
}

#[tokio::test]
async fn a_send_into_someone_elses_or_no_conversation_stores_nothing() {
    let db = Fixture::create().await;
    let (owner, stranger) = (Uuid::now_v7(), Uuid::now_v7());
    let conversation = db.storage.create_conversation(owner, None, "model-a", None).await.unwrap();
    assert!(db.storage.send(exchange(stranger, conversation.id, "hi")).await.unwrap().is_none());
    assert!(db.storage.send(exchange(owner, Uuid::now_v7(), "hi")).await.unwrap().is_none());
    let keyed = NewExchange { idempotency_key: Some("k"), ..exchange(stranger, conversation.id, "hi") };
    assert!(db.storage.send(keyed).await.unwrap().is_none());
    assert_eq!((db.count("messages").await, db.count("outbox").await), (0, 0));
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_first_exchange_and_queues_nothing() {
    let db = Fixture::create().await;
    let user = Uuid::now_v7();
    let conversation = db.storage.create_conversation(user, None, "model-a", None).await.unwrap();
    let keyed = || NewExchange { idempotency_key: Some("retry-1"), ..exchange(user, conversation.id, "once") };
    let first = db.storage.send(keyed()).await.unwrap().unwrap();
    let again = db.storage.send(keyed()).await.unwrap().unwrap();
    assert!(!first.replayed && again.replayed);
    assert!(again.job.is_none());
    assert_eq!(again.assistant_message.id, first.assistant_message.id);
    assert_eq!((db.count("messages").await, db.count("outbox").await), (2, 1));
}

#[tokio::test]
async fn a_reply_is_completed_once_and_its_job_context_reads_in_one_join() {
    let db = Fixture::create().await;
    let user = Uuid::now_v7();
    let conversation = db.storage.create_conversation(user, None, "model-a", Some("be brief")).await.unwrap();
    let sent = db.storage.send(exchange(user, conversation.id, "question")).await.unwrap().unwrap();
    let reply = sent.assistant_message.id;

    let (message, context) = db.storage.job_context(reply).await.unwrap().unwrap();
    assert_eq!((message.id, message.status), (reply, MessageStatus::Pending));
    assert_eq!((context.model.as_str(), context.system_prompt.as_deref()), ("model-a", Some("be brief")));
    assert!(context.summary.is_none());
    assert!(db.storage.job_context(Uuid::now_v7()).await.unwrap().is_none());

    let (done, changed) = db.storage.complete_message(reply, "answer", "model-a", 5, 7).await.unwrap().unwrap();
    assert!(changed);
    assert_eq!((done.status, done.content.as_str(), done.output_tokens), (MessageStatus::Completed, "answer", Some(7)));
    let (again, changed) = db.storage.complete_message(reply, "other", "model-a", 1, 1).await.unwrap().unwrap();
    assert!(!changed);
    assert_eq!(again.content, "answer");
    let (failed, changed) = db.storage.fail_message(reply, "x", "y", None).await.unwrap().unwrap();
    assert!(!changed && failed.status == MessageStatus::Completed);
    assert!(db.storage.complete_message(Uuid::now_v7(), "a", "m", 1, 1).await.unwrap().is_none());
}
