//! The chat schema's SQL against a real PostgreSQL, one fresh database per test (dropped afterwards,
//! also when the test fails).

use std::sync::Arc;

use parley_platform::config::DatabaseConfig;
use parley_platform::events::AiJob;
use parley_platform::replicas::{Database, WriteMarks};
use parley_platform::test_database::TestDatabase;

use super::*;

/// Reply `id` finished with `content` by model-a, its conversation and owner left for chat to find.
fn completed(id: Uuid, content: &str) -> CompletedReply<'_> {
    CompletedReply { id, conversation: None, owner: None, content, model: "model-a", input_tokens: 1, output_tokens: 1 }
}

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
        let keyring = Keyring::new(parley_platform::config::DEVELOPMENT_CONTENT_KEYS).unwrap();
        let storage = Storage::new(WriteMarks::new(Arc::new(pools), None, "test"), keyring);
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
        follows: Follows::ActiveBranch,
        history_limit: 10,
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
async fn a_reply_is_completed_once_and_its_job_context_reads_in_one_statement() {
    let db = Fixture::create().await;
    let user = Uuid::now_v7();
    let conversation = db.storage.create_conversation(user, None, "model-a", Some("be brief")).await.unwrap();
    let sent = db.storage.send(exchange(user, conversation.id, "question")).await.unwrap().unwrap();
    let reply = sent.assistant_message.id;

    let context = db.storage.job_context(reply, 10).await.unwrap().unwrap();
    assert_eq!((context.message.id, context.message.status), (reply, MessageStatus::Pending));
    let conversation_read = &context.conversation;
    assert_eq!(
        (conversation_read.model.as_str(), conversation_read.system_prompt.as_deref()),
        ("model-a", Some("be brief"))
    );
    assert!(conversation_read.summary.is_none());
    let history: Vec<&str> = context.history.iter().map(|message| message.content.as_str()).collect();
    assert_eq!(history, ["question"]);
    assert!(db.storage.job_context(Uuid::now_v7(), 10).await.unwrap().is_none());

    let answer = CompletedReply {
        conversation: Some(conversation.id),
        owner: Some(user),
        input_tokens: 5,
        output_tokens: 7,
        ..completed(reply, "answer")
    };
    let (done, changed) = db.storage.complete_message(answer).await.unwrap().unwrap();
    assert!(changed);
    assert_eq!((done.status, done.content.as_str(), done.output_tokens), (MessageStatus::Completed, "answer", Some(7)));
    // Indexed by the statement that stored it.
    let hits = db.storage.search(ReadFloor::Primary, user, "answer", None, 10).await.unwrap().unwrap();
    assert_eq!(hits.iter().map(|hit| hit.position.id).collect::<Vec<_>>(), [reply]);
    let (again, changed) = db.storage.complete_message(completed(reply, "other")).await.unwrap().unwrap();
    assert!(!changed);
    assert_eq!(again.content, "answer");
    let (failed, changed) = db.storage.fail_message(reply, None, "x", "y", None).await.unwrap().unwrap();
    assert!(!changed && failed.status == MessageStatus::Completed);
    assert!(db.storage.complete_message(completed(Uuid::now_v7(), "a")).await.unwrap().is_none());

    // The next reply's history: the finished messages before it, oldest first, within the limit and
    // after the running summary; the pending reply itself and later messages are not in it.
    let second = db.storage.send(exchange(user, conversation.id, "follow-up")).await.unwrap().unwrap();
    db.storage.send(exchange(user, conversation.id, "later")).await.unwrap().unwrap();
    let contents = |context: &JobContext| context.history.iter().map(|m| m.content.clone()).collect::<Vec<_>>();
    let context = db.storage.job_context(second.assistant_message.id, 10).await.unwrap().unwrap();
    assert_eq!(contents(&context), ["question", "answer", "follow-up"]);
    let context = db.storage.job_context(second.assistant_message.id, 2).await.unwrap().unwrap();
    assert_eq!(contents(&context), ["answer", "follow-up"]);
    assert!(db.storage.update_summary(conversation.id, "asked a question", sent.user_message.id).await.unwrap());
    let context = db.storage.job_context(second.assistant_message.id, 10).await.unwrap().unwrap();
    assert_eq!(contents(&context), ["answer", "follow-up"]);
    assert_eq!(context.conversation.summary.map(|(text, _)| text).as_deref(), Some("asked a question"));
}

#[tokio::test]
async fn what_users_write_is_sealed_at_rest_and_read_back_plain() {
    let db = Fixture::create().await;
    let user = Uuid::now_v7();
    let conversation = db.storage.create_conversation(user, Some("Secret plans"), "model-a", None).await.unwrap();
    assert_eq!(conversation.title.as_deref(), Some("Secret plans"));
    let sent = db.storage.send(exchange(user, conversation.id, "my private question")).await.unwrap().unwrap();
    assert_eq!(sent.user_message.content, "my private question");
    let reply = sent.assistant_message.id;
    let answer = CompletedReply {
        conversation: Some(conversation.id),
        owner: Some(user),
        ..completed(reply, "a private answer")
    };
    db.storage.complete_message(answer).await.unwrap();
    assert!(db.storage.update_summary(conversation.id, "the private gist", reply).await.unwrap());

    // At rest: sealed, the plain text nowhere.
    let stored: Vec<(String,)> = sqlx::query_as(
        "SELECT content FROM chat.messages UNION ALL SELECT title FROM chat.conversations
         UNION ALL SELECT summary FROM chat.conversations",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(stored.len(), 4);
    for (text,) in &stored {
        assert!(parley_platform::envelope::is_sealed(text) && !text.contains("private") && !text.contains("Secret"));
    }
    // Read back: plain.
    let read = db.storage.conversation(ReadFloor::Primary, user, conversation.id).await.unwrap().unwrap();
    assert_eq!(read.title.as_deref(), Some("Secret plans"));
    let listed = db.storage.list_messages(ReadFloor::Primary, conversation.id, None, None, 10).await.unwrap();
    let contents: Vec<&str> = listed.iter().map(|message| message.content.as_str()).collect();
    assert_eq!(contents, ["my private question", "a private answer"]);
    let context = db.storage.job_context(reply, 10).await.unwrap().unwrap();
    assert_eq!(context.conversation.summary.unwrap().0, "the private gist");

    // A conversation written before content was sealed (no data key, plain rows): read as it is,
    // sealed from its next write on.
    let conversation = db.storage.create_conversation(user, None, "model-a", None).await.unwrap();
    let sent = db.storage.send(exchange(user, conversation.id, "soon plain")).await.unwrap().unwrap();
    sqlx::query("UPDATE chat.conversations SET data_key = NULL, title = 'Old title' WHERE id = $1")
        .bind(conversation.id)
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE chat.messages SET content = 'old plain text' WHERE id = $1")
        .bind(sent.user_message.id)
        .execute(db.pool())
        .await
        .unwrap();
    db.storage.forget_data_keys();
    let read = db.storage.conversation(ReadFloor::Primary, user, conversation.id).await.unwrap().unwrap();
    assert_eq!(read.title.as_deref(), Some("Old title"));
    let message = db.storage.message(sent.user_message.id).await.unwrap().unwrap();
    assert_eq!(message.content, "old plain text");
    db.storage.send(exchange(user, conversation.id, "new and sealed")).await.unwrap().unwrap();
    let (key,): (Option<Vec<u8>>,) = sqlx::query_as("SELECT data_key FROM chat.conversations WHERE id = $1")
        .bind(conversation.id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(key.is_some(), "the conversation got a data key with its next write");
    let listed = db.storage.list_messages(ReadFloor::Primary, conversation.id, None, None, 10).await.unwrap();
    let contents: Vec<&str> = listed.iter().map(|message| message.content.as_str()).collect();
    assert_eq!(contents, ["old plain text", "", "new and sealed", ""], "the replies are still pending");
}

#[tokio::test]
async fn rotating_the_content_key_rewraps_data_keys_and_seals_what_was_plain() {
    let old = "old:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let new = "new:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    let db = Fixture::create().await;
    let marks = db.storage.marks.clone();
    let under_old = Storage::new(marks.clone(), Keyring::new(old).unwrap());
    let user = Uuid::now_v7();
    let sealed = under_old.create_conversation(user, Some("Under the old key"), "model-a", None).await.unwrap();
    under_old.send(exchange(user, sealed.id, "sealed under old")).await.unwrap().unwrap();
    // One from before content was sealed.
    let plain = under_old.create_conversation(user, None, "model-a", None).await.unwrap();
    under_old.send(exchange(user, plain.id, "was plain")).await.unwrap().unwrap();
    sqlx::query("UPDATE chat.conversations SET data_key = NULL, title = 'Plain title' WHERE id = $1")
        .bind(plain.id)
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE chat.messages SET content = 'was plain' WHERE conversation_id = $1 AND role = 'user'")
        .bind(plain.id)
        .execute(db.pool())
        .await
        .unwrap();

    // The new key first, the old one kept, while the stored keys are brought over.
    let both = Keyring::new(&format!("{new},{old}")).unwrap();
    let done = seal_stored(db.pool(), &both, 1).await.unwrap();
    // The user's search key is wrapped again too, and the title written behind the index's back is put in it.
    assert_eq!(done, Sealed { rewrapped: 1, keyed: 1, texts: 2, search_keys: 1, indexed: 1 });
    assert_eq!(seal_stored(db.pool(), &both, 1).await.unwrap(), Sealed::default(), "a second run has nothing to do");

    // The old key gone: everything still reads, nothing is stored plain.
    let under_new = Storage::new(marks, Keyring::new(new).unwrap());
    for (conversation, title, content) in
        [(sealed.id, "Under the old key", "sealed under old"), (plain.id, "Plain title", "was plain")]
    {
        let read = under_new.conversation(ReadFloor::Primary, user, conversation).await.unwrap().unwrap();
        assert_eq!(read.title.as_deref(), Some(title));
        let messages = under_new.list_messages(ReadFloor::Primary, conversation, None, None, 10).await.unwrap();
        assert_eq!(messages[0].content, content);
    }
    // Search still finds everything by its words under the new key alone.
    for (query, expected) in [("plain", 2), ("old", 2), ("title", 1)] {
        let hits = under_new.search(ReadFloor::Primary, user, query, None, 10).await.unwrap().unwrap();
        assert_eq!(hits.len(), expected, "{query}");
    }
    let (plain_texts,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM chat.messages WHERE content <> '' AND left(content, 5) <> $1")
            .bind(parley_platform::envelope::SEALED_PREFIX)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(plain_texts, 0);
}

#[tokio::test]
async fn a_stored_completion_reads_back_under_a_rotated_key_and_is_sealed_at_rest() {
    let old = "old:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let new = "new:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    let db = Fixture::create().await;
    let marks = db.storage.marks.clone();
    let under_old = Storage::new(marks.clone(), Keyring::new(old).unwrap());
    let (id, user) = (Uuid::now_v7(), Uuid::now_v7());
    let metadata = serde_json::json!({"team": "search"});
    let completion = r#"{"id":"chatcmpl-x","choices":[{"message":{"content":"the kept reply"}}]}"#;
    let messages = r#"[{"role":"user","content":"the kept question"}]"#;
    let new_completion = |completion| NewStoredCompletion {
        id,
        user_id: user,
        model: "model-a",
        metadata: &metadata,
        completion,
        messages,
    };
    under_old.store_completion(new_completion(completion)).await.unwrap();
    // Storing the same id again changes nothing.
    under_old.store_completion(new_completion(r#"{"other":true}"#)).await.unwrap();
    let (sealed_completion, sealed_messages): (String, String) =
        sqlx::query_as("SELECT completion, messages FROM chat.stored_completions WHERE id = $1")
            .bind(id)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(!sealed_completion.contains("kept reply") && !sealed_messages.contains("kept question"));

    let both = Keyring::new(&format!("{new},{old}")).unwrap();
    assert_eq!(seal_stored(db.pool(), &both, 10).await.unwrap().rewrapped, 1);
    let under_new = Storage::new(marks, Keyring::new(new).unwrap());
    let read = under_new.stored_completion(ReadFloor::Primary, user, id).await.unwrap().unwrap();
    assert_eq!((read.completion.as_str(), read.messages.as_str()), (completion, messages));
    assert_eq!(read.metadata.0, metadata);
    // Someone else's is not there.
    assert!(under_new.stored_completion(ReadFloor::Primary, Uuid::now_v7(), id).await.unwrap().is_none());
}

#[tokio::test]
async fn a_branched_reply_reads_its_own_path_and_a_summary_only_of_that_path() {
    let db = Fixture::create().await;
    let user = Uuid::now_v7();
    let conversation = db.storage.create_conversation(user, None, "model-a", None).await.unwrap();
    let answer = |sent: &SentExchange, text: &'static str| {
        let (storage, reply) = (db.storage.clone(), sent.assistant_message.id);
        // Without its owner: chat looks the conversation up and indexes the reply in a second statement.
        async move { storage.complete_message(completed(reply, text)).await.unwrap().unwrap() }
    };
    let first = db.storage.send(exchange(user, conversation.id, "q1")).await.unwrap().unwrap();
    answer(&first, "a1").await;
    let hits = db.storage.search(ReadFloor::Primary, user, "a1", None, 10).await.unwrap().unwrap();
    assert_eq!(hits.iter().map(|hit| hit.position.id).collect::<Vec<_>>(), [first.assistant_message.id]);
    let second = db.storage.send(exchange(user, conversation.id, "q2")).await.unwrap().unwrap();
    answer(&second, "a2").await;
    let contents = |context: &JobContext| context.history.iter().map(|m| m.content.clone()).collect::<Vec<_>>();

    // A summary of the first exchange, then an edit of the second question: the edit's branch still
    // holds the first exchange, so the summary applies to it.
    assert!(db.storage.update_summary(conversation.id, "gist of q1", first.assistant_message.id).await.unwrap());
    let edit = NewExchange {
        follows: Follows::Parent(Some(first.assistant_message.id)),
        ..exchange(user, conversation.id, "q2 edited")
    };
    let edited = db.storage.send(edit).await.unwrap().unwrap();
    let context = db.storage.job_context(edited.assistant_message.id, 10).await.unwrap().unwrap();
    assert_eq!(contents(&context), ["q2 edited"]);
    assert_eq!(context.conversation.summary.map(|(text, _)| text).as_deref(), Some("gist of q1"));

    // A summary that covers the edited branch does not apply to a regeneration on the old one.
    answer(&edited, "a2 edited").await;
    assert!(db.storage.update_summary(conversation.id, "gist of the edit", edited.assistant_message.id).await.unwrap());
    let regenerate =
        NewExchange { follows: Follows::Question(second.user_message.id), ..exchange(user, conversation.id, "") };
    let again = db.storage.send(regenerate).await.unwrap().unwrap();
    assert_eq!(again.user_message.id, second.user_message.id);
    let context = db.storage.job_context(again.assistant_message.id, 10).await.unwrap().unwrap();
    assert_eq!(contents(&context), ["q1", "a1", "q2"]);
    assert!(context.conversation.summary.is_none());
    let context = db.storage.job_context(again.assistant_message.id, 2).await.unwrap().unwrap();
    assert_eq!(contents(&context), ["a1", "q2"]);

    // The listing follows the active branch (the regeneration), the export's every message.
    let conversation = db.storage.conversation(ReadFloor::Primary, user, conversation.id).await.unwrap().unwrap();
    assert!(conversation.branched);
    let branch = conversation.active_leaf_id;
    let listed = db.storage.list_messages(ReadFloor::Primary, conversation.id, branch, None, 10).await.unwrap();
    let listed: Vec<&str> = listed.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(listed, ["q1", "a1", "q2", ""]);
    assert_eq!(db.storage.list_messages(ReadFloor::Primary, conversation.id, None, None, 10).await.unwrap().len(), 7);
}

#[tokio::test]
async fn the_outbox_hands_an_unpublished_job_to_one_relay_and_forgets_it_once_published() {
    let db = Fixture::create().await;
    let user = Uuid::now_v7();
    let conversation = db.storage.create_conversation(user, None, "model-a", None).await.unwrap();
    let (first, second) = (
        db.storage.send(exchange(user, conversation.id, "one")).await.unwrap().unwrap(),
        db.storage.send(exchange(user, conversation.id, "two")).await.unwrap().unwrap(),
    );
    let job_of = |sent: &SentExchange| sent.job.as_ref().unwrap().job.job_id;
    let grace = std::time::Duration::ZERO;

    // A fresh job is left to the relay that published it for `grace`.
    let mut tx = db.pool().begin().await.unwrap();
    assert!(Storage::lock_unpublished(&mut tx, 10, std::time::Duration::from_secs(60)).await.unwrap().is_empty());
    tx.rollback().await.unwrap();

    // One sweeping relay holds both rows; a second one sweeping meanwhile gets neither.
    let mut holder = db.pool().begin().await.unwrap();
    let held = Storage::lock_unpublished(&mut holder, 10, grace).await.unwrap();
    assert_eq!(held.iter().map(|row| row.job_id).collect::<Vec<_>>(), [job_of(&first), job_of(&second)]);
    assert_eq!(held[0].subject, "test.jobs.chat");
    let mut other = db.pool().begin().await.unwrap();
    assert!(Storage::lock_unpublished(&mut other, 10, grace).await.unwrap().is_empty());
    other.rollback().await.unwrap();
    Storage::mark_published(&mut holder, &[held[0].id]).await.unwrap();
    holder.commit().await.unwrap();

    // The published one is not handed out again; the other is, until marked by its job id.
    let mut tx = db.pool().begin().await.unwrap();
    let left = Storage::lock_unpublished(&mut tx, 10, grace).await.unwrap();
    assert_eq!(left.iter().map(|row| row.job_id).collect::<Vec<_>>(), [job_of(&second)]);
    tx.rollback().await.unwrap();
    Storage::mark_jobs_published(db.pool(), &[job_of(&second)]).await.unwrap();
    let mut tx = db.pool().begin().await.unwrap();
    assert!(Storage::lock_unpublished(&mut tx, 10, grace).await.unwrap().is_empty());
    tx.rollback().await.unwrap();

    // Published rows stay for JetStream's dedup window (an hour), then go.
    assert_eq!(Storage::purge_published(db.pool()).await.unwrap(), 0);
    sqlx::query("UPDATE chat.outbox SET published_at = now() - interval '2 hours' WHERE job_id = $1")
        .bind(job_of(&first))
        .execute(db.pool())
        .await
        .unwrap();
    assert_eq!(Storage::purge_published(db.pool()).await.unwrap(), 1);
    assert_eq!(db.outbox().await.iter().map(|job| job.job_id).collect::<Vec<_>>(), [job_of(&second)]);
}

/// The send's statement reads its job's context with the exchange, as `job_context` would after the
/// commit; when its snapshot misses a send into the same conversation that committed while it waited
/// for the conversation's lock, it reads none (chat then reads it after the commit).
#[tokio::test]
async fn a_send_reads_its_jobs_context_unless_its_snapshot_misses_a_concurrent_send() {
    let db = Fixture::create().await;
    let user = Uuid::now_v7();
    let conversation = db.storage.create_conversation(user, None, "model-a", Some("be brief")).await.unwrap();
    let first = db.storage.send(exchange(user, conversation.id, "first")).await.unwrap().unwrap();
    db.storage.complete_message(completed(first.assistant_message.id, "an answer")).await.unwrap();
    let second = db.storage.send(exchange(user, conversation.id, "second")).await.unwrap().unwrap();
    let carried = second.job.as_ref().and_then(|queued| queued.job.context.clone()).expect("read by the send");
    let contents: Vec<&str> = carried.history.iter().map(|message| message.content.as_str()).collect();
    assert_eq!(contents, ["first", "an answer", "second"]);
    assert_eq!(carried.system_prompt.as_deref(), Some("be brief"));
    let read_later = db.storage.carried_context(second.assistant_message.id, 10).await.unwrap();
    assert_eq!(Some(&carried), read_later.as_ref(), "the same context as read after the commit");
    assert!(db.outbox().await.iter().all(|job| job.context.is_none()), "the outbox never holds a context");

    // Another send holds the conversation's row lock; this one waits for it, its snapshot taken before.
    let mut other = db.pool().begin().await.unwrap();
    let elsewhere = exchange(user, conversation.id, "from another tab");
    insert(&mut *other, &elsewhere, None).await.unwrap().expect("stored");
    let storage = db.storage.clone();
    let waiting = tokio::spawn(async move { storage.send(exchange(user, conversation.id, "third")).await });
    // Committed only once the waiting send's statement is blocked on the lock (its snapshot taken).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(5));
    loop {
        poll.tick().await;
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the second send never waited for the lock");
    }
    other.commit().await.unwrap();
    let third = waiting.await.unwrap().unwrap().unwrap();
    assert_eq!(third.job.as_ref().map(|queued| queued.job.context.is_none()), Some(true));
    let read_later = db.storage.carried_context(third.assistant_message.id, 10).await.unwrap().unwrap();
    let contents: Vec<&str> = read_later.history.iter().map(|message| message.content.as_str()).collect();
    assert_eq!(contents, ["first", "an answer", "second", "from another tab", "third"]);
}
