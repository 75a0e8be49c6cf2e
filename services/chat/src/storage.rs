//! Reads and writes of the `chat` schema.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use parley_platform::envelope::{DataKey, EnvelopeError, Field, Keyring, SearchKey};
use parley_platform::events::{self, AiJob, CacheDirective};
use parley_platform::message_status::MessageStatus;
use parley_platform::replicas::{ReadFloor, WriteMarks};
use parley_platform::sampling::Sampling;
use sqlx::{FromRow, PgPool, Postgres, Row, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use parley_platform::cursor::Position;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConversationRow {
    pub id: Uuid,
    pub user_id: Uuid,
    pub title: Option<String>,
    pub model: String,
    pub system_prompt: Option<String>,
    pub version: i64,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    /// Its data key, wrapped (none for a conversation made before content was sealed, until its next
    /// write).
    pub data_key: Option<Vec<u8>>,
    /// The last message of the active branch.
    pub active_leaf_id: Option<Uuid>,
    /// Whether a message has a sibling: until then the active branch is every message in order.
    pub branched: bool,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageRow {
    pub id: Uuid,
    pub conversation_id: Uuid,
    pub user_id: Uuid,
    pub role: String,
    pub content: String,
    #[sqlx(try_from = "String")]
    pub status: MessageStatus,
    pub model: Option<String>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub error_code: Option<String>,
    pub error_detail: Option<String>,
    pub created_at: OffsetDateTime,
    pub completed_at: Option<OffsetDateTime>,
    /// The message this one follows (none for a conversation's first).
    pub parent_id: Option<Uuid>,
    /// Which version of its siblings this is, when it was asked for (`Storage::number_versions`).
    #[sqlx(skip)]
    pub version: Option<Version>,
}

/// A message's place among its versions (the messages with its parent and its role).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// 1 for the oldest version.
    pub branch: u32,
    /// How many versions there are.
    pub branches: u32,
}

impl Version {
    /// The only version there is.
    pub const ONLY: Self = Self { branch: 1, branches: 1 };
}

const CONVERSATION_COLUMNS: &str =
    "id, user_id, title, model, system_prompt, version, created_at, updated_at, data_key, active_leaf_id, branched";
const MESSAGE_COLUMNS: &str = "id, conversation_id, user_id, role, content, status, model, input_tokens, \
                               output_tokens, error_code, error_detail, created_at, completed_at, parent_id";

/// What a send stored (or found, for a repeated idempotency key).
pub struct SentExchange {
    pub user_message: MessageRow,
    pub assistant_message: MessageRow,
    pub replayed: bool,
    /// The job stored with the reply, to publish now that it is committed (none for a replay).
    pub job: Option<QueuedJob>,
}

/// A job as stored in the outbox, on its way to the relay.
pub struct QueuedJob {
    pub job: AiJob,
    pub subject: String,
    pub traceparent: Option<String>,
    /// When its send committed: a job the relay publishes later than the sweep might have carries no
    /// context.
    pub committed: std::time::Instant,
}

pub struct NewExchange<'a> {
    pub user_id: Uuid,
    pub conversation_id: Uuid,
    pub content: &'a str,
    pub model: Option<&'a str>,
    pub idempotency_key: Option<&'a str>,
    pub tier: &'a str,
    pub jobs_subject: &'a str,
    pub traceparent: Option<String>,
    pub generation: Generation,
    pub follows: Follows,
    /// How many messages a job's context takes (`chat.history_limit`), the question included.
    pub history_limit: i64,
}

/// Where an exchange goes in its conversation's tree of messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follows {
    /// A new question after the active branch's last message.
    ActiveBranch,
    /// An edited question: a sibling of the question it edits, after that one's parent (none for a
    /// conversation's first question).
    Parent(Option<Uuid>),
    /// A regenerated reply: a sibling of the previous replies to this question; no new question.
    Question(Uuid),
}

/// What an update of a conversation found.
pub enum UpdateOutcome {
    Updated(ConversationRow),
    NotFound,
    VersionMismatch,
}

pub struct ConversationChanges<'a> {
    pub title: Option<&'a str>,
    pub model: Option<&'a str>,
    pub system_prompt: Option<&'a str>,
}

#[derive(Debug, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub job_id: Uuid,
    pub subject: String,
    pub payload: sqlx::types::Json<serde_json::Value>,
    pub traceparent: Option<String>,
}

/// Writes go to the primary; a user's listings and lookups go to a replica that has their latest
/// write, or to the primary. What users write (message content, titles, running summaries) is sealed
/// with its conversation's data key on the way in and opened on the way out (`platform::envelope`):
/// every method takes and returns plain text.
#[derive(Clone)]
pub struct Storage {
    marks: WriteMarks,
    keys: Arc<DataKeys>,
}

/// Most unwrapped data keys a chat replica keeps; past it the cache starts over.
const DATA_KEY_CACHE: usize = 10_000;

/// The conversations' data keys, unwrapped on first use and kept in memory.
struct DataKeys {
    keyring: Keyring,
    unwrapped: Mutex<HashMap<Uuid, Arc<DataKey>>>,
    /// The users' search keys, unwrapped on first use.
    search: Mutex<HashMap<Uuid, Arc<SearchKey>>>,
}

impl DataKeys {
    fn cached(&self, conversation: Uuid) -> Option<Arc<DataKey>> {
        self.unwrapped.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&conversation).cloned()
    }

    fn keep(&self, conversation: Uuid, key: DataKey) -> Arc<DataKey> {
        let key = Arc::new(key);
        let mut unwrapped = self.unwrapped.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if unwrapped.len() >= DATA_KEY_CACHE {
            unwrapped.clear();
        }
        unwrapped.insert(conversation, key.clone());
        key
    }

    /// The data key a wrapped key stands for, from the cache when it is there.
    fn open(&self, conversation: Uuid, wrapped: &[u8]) -> Result<Arc<DataKey>, sqlx::Error> {
        if let Some(key) = self.cached(conversation) {
            return Ok(key);
        }
        Ok(self.keep(conversation, self.keyring.unwrap(conversation, wrapped).map_err(sealing_error)?))
    }
}

/// A sealing failure as a database error (a stored value that does not open is corrupt data, or the
/// key that wrapped it is missing from the configuration: the operator's to fix, a 500 to the client).
fn sealing_error(error: EnvelopeError) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(error))
}

fn sql(text: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(text)
}

/// The message columns of `table` (an alias), for joins.
fn prefixed_columns(table: &str) -> String {
    MESSAGE_COLUMNS.split(", ").map(|column| format!("{table}.{column}")).collect::<Vec<_>>().join(", ")
}

impl Storage {
    pub fn new(marks: WriteMarks, keyring: Keyring) -> Self {
        Self { marks, keys: Arc::new(DataKeys { keyring, unwrapped: Mutex::default(), search: Mutex::default() }) }
    }

    /// The data key of `conversation`, made and stored first for a conversation made before content
    /// was sealed; `None` when there is no such conversation.
    async fn data_key(&self, conversation: Uuid) -> Result<Option<Arc<DataKey>>, sqlx::Error> {
        if let Some(key) = self.keys.cached(conversation) {
            return Ok(Some(key));
        }
        let stored: Option<(Option<Vec<u8>>,)> =
            sqlx::query_as("SELECT data_key FROM chat.conversations WHERE id = $1")
                .bind(conversation)
                .fetch_optional(self.pool())
                .await?;
        match stored {
            None => Ok(None),
            Some((Some(wrapped),)) => self.keys.open(conversation, &wrapped).map(Some),
            Some((None,)) => {
                let (_, wrapped) = self.keys.keyring.new_data_key(conversation).map_err(sealing_error)?;
                // Two writers at once: the first key stored is the conversation's.
                let (stored,): (Vec<u8>,) = sqlx::query_as(
                    "UPDATE chat.conversations SET data_key = COALESCE(data_key, $2) WHERE id = $1 RETURNING data_key",
                )
                .bind(conversation)
                .bind(&wrapped)
                .fetch_one(self.pool())
                .await?;
                self.keys.open(conversation, &stored).map(Some)
            }
        }
    }

    /// Drops the unwrapped data and search keys, as a restart would.
    #[cfg(test)]
    pub(crate) fn forget_data_keys(&self) {
        self.keys.unwrapped.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clear();
        self.keys.search.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clear();
    }

    /// The search key of `user`, made and stored on first use when `create`; `None` when the user has
    /// none and `create` is false (someone who never wrote has nothing to find).
    async fn search_key(&self, user: Uuid, create: bool) -> Result<Option<Arc<SearchKey>>, sqlx::Error> {
        let cache = || self.keys.search.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(key) = cache().get(&user) {
            return Ok(Some(key.clone()));
        }
        let stored: Option<(Vec<u8>,)> = sqlx::query_as("SELECT wrapped FROM chat.search_keys WHERE user_id = $1")
            .bind(user)
            .fetch_optional(self.pool())
            .await?;
        let wrapped = match stored {
            Some((wrapped,)) => wrapped,
            None if !create => return Ok(None),
            None => {
                let (_, wrapped) = self.keys.keyring.new_search_key(user).map_err(sealing_error)?;
                // Two writers at once: the first key stored is the user's.
                let (stored,): (Vec<u8>,) = sqlx::query_as(
                    "INSERT INTO chat.search_keys (user_id, wrapped) VALUES ($1, $2)
                     ON CONFLICT (user_id) DO UPDATE SET wrapped = chat.search_keys.wrapped RETURNING wrapped",
                )
                .bind(user)
                .bind(&wrapped)
                .fetch_one(self.pool())
                .await?;
                stored
            }
        };
        let key = Arc::new(self.keys.keyring.unwrap_search_key(user, &wrapped).map_err(sealing_error)?);
        let mut cache = cache();
        if cache.len() >= DATA_KEY_CACHE {
            cache.clear();
        }
        cache.insert(user, key.clone());
        Ok(Some(key))
    }

    /// The blind index terms of what `user` wrote (`None`: no words to index).
    async fn search_terms(&self, user: Uuid, text: &str) -> Result<Option<String>, sqlx::Error> {
        if crate::search::words(text).next().is_none() {
            return Ok(None);
        }
        let key = self.search_key(user, true).await?.ok_or(sqlx::Error::RowNotFound)?;
        Ok(crate::search::index_terms(&key, text))
    }

    /// `text` sealed for `field` of `conversation` (`None`: no such conversation).
    async fn seal(&self, conversation: Uuid, field: Field, text: &str) -> Result<Option<String>, sqlx::Error> {
        let Some(key) = self.data_key(conversation).await? else {
            return Ok(None);
        };
        key.seal_text(field, text).map(Some).map_err(sealing_error)
    }

    /// Opens the content of messages read from the database.
    async fn reveal_messages(&self, rows: &mut [MessageRow]) -> Result<(), sqlx::Error> {
        for row in rows.iter_mut().filter(|row| parley_platform::envelope::is_sealed(&row.content)) {
            let key = self.data_key(row.conversation_id).await?.ok_or(sqlx::Error::RowNotFound)?;
            row.content = key.open_text(Field::Content, &row.content).map_err(sealing_error)?;
        }
        Ok(())
    }

    /// Opens the title of a conversation read from the database.
    fn reveal_conversation(&self, row: &mut ConversationRow) -> Result<(), sqlx::Error> {
        if let (Some(title), Some(wrapped)) = (&row.title, &row.data_key)
            && parley_platform::envelope::is_sealed(title)
        {
            let key = self.keys.open(row.id, wrapped)?;
            row.title = Some(key.open_text(Field::Title, title).map_err(sealing_error)?);
        }
        Ok(())
    }

    fn pool(&self) -> &PgPool {
        self.marks.database().primary()
    }

    /// Records that `user_id` wrote, so their next reads see it on any chat replica.
    async fn wrote(&self, user_id: Uuid) {
        self.marks.wrote(user_id).await;
    }

    /// One row by id that must belong to `user_id`: `text` binds the id as $1 and the user as $2.
    async fn owned_row<T>(
        &self,
        floor: ReadFloor,
        text: String,
        id: Uuid,
        user_id: Uuid,
    ) -> Result<Option<T>, sqlx::Error>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        self.marks
            .database()
            .read(floor, |pool| {
                let text = text.clone();
                async move { sqlx::query_as(sql(text)).bind(id).bind(user_id).fetch_optional(&pool).await }
            })
            .await
    }

    /// One keyset page: `text` binds the list's key as $1, then the cursor's position as ($2, $3) when
    /// there is one, then the page size.
    async fn page<T>(
        &self,
        floor: ReadFloor,
        text: String,
        key: Uuid,
        after: Option<Position>,
        limit: i64,
    ) -> Result<Vec<T>, sqlx::Error>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        self.marks
            .database()
            .read(floor, |pool| {
                let text = text.clone();
                async move {
                    let query = sqlx::query_as(sql(text)).bind(key);
                    let query = match after {
                        Some(position) => query.bind(position.at).bind(position.id),
                        None => query,
                    };
                    query.bind(limit).fetch_all(&pool).await
                }
            })
            .await
    }

    /// How fresh `user_id`'s reads must be.
    pub async fn floor(&self, user_id: Uuid) -> ReadFloor {
        self.marks.floor(user_id).await
    }

    pub async fn create_conversation(
        &self,
        user_id: Uuid,
        title: Option<&str>,
        model: &str,
        system_prompt: Option<&str>,
    ) -> Result<ConversationRow, sqlx::Error> {
        let id = Uuid::now_v7();
        let (key, wrapped) = self.keys.keyring.new_data_key(id).map_err(sealing_error)?;
        let terms = match title {
            Some(title) => self.search_terms(user_id, title).await?,
            None => None,
        };
        let title = title.map(|title| key.seal_text(Field::Title, title)).transpose().map_err(sealing_error)?;
        self.keys.keep(id, key);
        let mut row = sqlx::query_as(sql(format!(
            "WITH created AS (
                 INSERT INTO chat.conversations (id, user_id, title, model, system_prompt, data_key)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING {CONVERSATION_COLUMNS}),
             indexed AS (
                 INSERT INTO chat.search_terms (item_id, conversation_id, user_id, terms)
                 SELECT id, id, user_id, $7::tsvector FROM created WHERE $7::tsvector IS NOT NULL)
             SELECT {CONVERSATION_COLUMNS} FROM created"
        )))
        .bind(id)
        .bind(user_id)
        .bind(title)
        .bind(model)
        .bind(system_prompt)
        .bind(wrapped)
        .bind(terms)
        .fetch_one(self.pool())
        .await?;
        self.wrote(user_id).await;
        self.reveal_conversation(&mut row)?;
        Ok(row)
    }

    /// One of a user's conversations, read as fresh as `floor` demands.
    pub async fn conversation(
        &self,
        floor: ReadFloor,
        user_id: Uuid,
        id: Uuid,
    ) -> Result<Option<ConversationRow>, sqlx::Error> {
        let text = format!("SELECT {CONVERSATION_COLUMNS} FROM chat.conversations WHERE id = $1 AND user_id = $2");
        let mut row: Option<ConversationRow> = self.owned_row(floor, text, id, user_id).await?;
        if let Some(row) = &mut row {
            self.reveal_conversation(row)?;
        }
        Ok(row)
    }

    /// A user's conversations, most recently updated first, after `after` (exclusive). Two statements,
    /// not one with `$2 IS NULL OR ...`, so a generic plan still seeks straight to the cursor.
    pub async fn list_conversations(
        &self,
        floor: ReadFloor,
        user_id: Uuid,
        after: Option<Position>,
        limit: i64,
    ) -> Result<Vec<ConversationRow>, sqlx::Error> {
        let text = match after {
            None => format!(
                "SELECT {CONVERSATION_COLUMNS} FROM chat.conversations WHERE user_id = $1 AND kind = 'chat'
                 ORDER BY updated_at DESC, id DESC LIMIT $2"
            ),
            Some(_) => format!(
                "SELECT {CONVERSATION_COLUMNS} FROM chat.conversations
                 WHERE user_id = $1 AND kind = 'chat' AND (updated_at, id) < ($2, $3)
                 ORDER BY updated_at DESC, id DESC LIMIT $4"
            ),
        };
        let mut rows: Vec<ConversationRow> = self.page(floor, text, user_id, after, limit).await?;
        for row in &mut rows {
            self.reveal_conversation(row)?;
        }
        Ok(rows)
    }

    pub async fn update_conversation(
        &self,
        user_id: Uuid,
        id: Uuid,
        expected_version: i64,
        changes: ConversationChanges<'_>,
    ) -> Result<UpdateOutcome, sqlx::Error> {
        let (title, terms) = match changes.title {
            Some(title) => match self.seal(id, Field::Title, title).await? {
                Some(sealed) => (Some(sealed), self.search_terms(user_id, title).await?),
                None => return Ok(UpdateOutcome::NotFound),
            },
            None => (None, None),
        };
        // A new title replaces the title's search terms (and removes them when it has no words).
        let updated: Option<ConversationRow> = sqlx::query_as(sql(format!(
            "WITH updated AS (
                 UPDATE chat.conversations
                 SET title = COALESCE($4, title), model = COALESCE($5, model),
                     system_prompt = COALESCE($6, system_prompt), version = version + 1, updated_at = now()
                 WHERE id = $1 AND user_id = $2 AND version = $3
                 RETURNING {CONVERSATION_COLUMNS}),
             unindexed AS (
                 DELETE FROM chat.search_terms
                 WHERE item_id = (SELECT id FROM updated) AND $4::text IS NOT NULL AND $7::tsvector IS NULL),
             indexed AS (
                 INSERT INTO chat.search_terms (item_id, conversation_id, user_id, terms)
                 SELECT id, id, user_id, $7::tsvector FROM updated WHERE $7::tsvector IS NOT NULL
                 ON CONFLICT (item_id) DO UPDATE SET terms = EXCLUDED.terms)
             SELECT {CONVERSATION_COLUMNS} FROM updated"
        )))
        .bind(id)
        .bind(user_id)
        .bind(expected_version)
        .bind(title)
        .bind(changes.model)
        .bind(changes.system_prompt)
        .bind(terms)
        .fetch_optional(self.pool())
        .await?;
        if let Some(mut row) = updated {
            self.wrote(user_id).await;
            self.reveal_conversation(&mut row)?;
            return Ok(UpdateOutcome::Updated(row));
        }
        Ok(match self.conversation(ReadFloor::Primary, user_id, id).await? {
            Some(_) => UpdateOutcome::VersionMismatch,
            None => UpdateOutcome::NotFound,
        })
    }

    /// Erases everything of a deleted account, in one transaction: its conversations (their messages,
    /// live and archived, go with them), its stored completions, its idempotency keys and its jobs not yet relayed (a job
    /// already relayed finds its message gone and is dropped). The number of conversations erased.
    pub async fn erase_user(&self, user_id: Uuid) -> Result<u64, sqlx::Error> {
        let mut tx = self.pool().begin().await?;
        let erased = sqlx::query("DELETE FROM chat.conversations WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM chat.idempotency_keys WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM chat.stored_completions WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM chat.outbox WHERE payload->>'user_id' = $1")
            .bind(user_id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.wrote(user_id).await;
        Ok(erased)
    }

    /// Deletes a conversation and its messages; false when the user has no such conversation.
    pub async fn delete_conversation(&self, user_id: Uuid, id: Uuid) -> Result<bool, sqlx::Error> {
        let result = sqlx::query("DELETE FROM chat.conversations WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(user_id)
            .execute(self.pool())
            .await?;
        let deleted = result.rows_affected() > 0;
        if deleted {
            self.wrote(user_id).await;
        }
        Ok(deleted)
    }

    /// Stores the user message, a pending assistant message and the job, atomically; with an
    /// idempotency key seen in the last 24 hours, stores nothing and returns the first exchange.
    /// `Ok(None)`: the user has no such conversation.
    pub async fn send(&self, exchange: NewExchange<'_>) -> Result<Option<SentExchange>, sqlx::Error> {
        let Some(content) = self.seal(exchange.conversation_id, Field::Content, exchange.content).await? else {
            return Ok(None);
        };
        let terms = match exchange.follows {
            Follows::Question(_) => None,
            Follows::ActiveBranch | Follows::Parent(_) => self.search_terms(exchange.user_id, exchange.content).await?,
        };
        let sealed = NewExchange { content: &content, ..exchange };
        let Some(mut sent) = self.store_exchange(sealed, terms.as_deref()).await? else {
            return Ok(None);
        };
        self.reveal_messages(std::slice::from_mut(&mut sent.user_message)).await?;
        self.reveal_messages(std::slice::from_mut(&mut sent.assistant_message)).await?;
        if let Some(context) = sent.job.as_mut().and_then(|queued| queued.job.context.as_mut()) {
            let key = self.data_key(sent.user_message.conversation_id).await?.ok_or(sqlx::Error::RowNotFound)?;
            for entry in &mut context.history {
                entry.content = key.open_text(Field::Content, &entry.content).map_err(sealing_error)?;
            }
            if let Some(summary) = &mut context.summary {
                *summary = key.open_text(Field::Summary, summary).map_err(sealing_error)?;
            }
            let question = &sent.user_message;
            let (id, role, content) = (question.id, question.role.clone(), question.content.clone());
            context.history.push(events::ContextMessage { id, role, content });
        }
        Ok(Some(sent))
    }

    /// [`Storage::send`] with the content sealed and its search terms made.
    async fn store_exchange(
        &self,
        exchange: NewExchange<'_>,
        terms: Option<&str>,
    ) -> Result<Option<SentExchange>, sqlx::Error> {
        let Some(key) = exchange.idempotency_key else {
            // One statement, so one round trip and one commit.
            let sent = insert(self.pool(), &exchange, terms).await?;
            if sent.is_some() {
                self.wrote(exchange.user_id).await;
            }
            return Ok(sent);
        };
        let mut tx = self.pool().begin().await?;
        // Locking the conversation first settles two concurrent requests carrying the same key: the
        // second reads the key only once the first has committed it.
        let conversation: Option<(Uuid,)> =
            sqlx::query_as("SELECT id FROM chat.conversations WHERE id = $1 AND user_id = $2 FOR UPDATE")
                .bind(exchange.conversation_id)
                .bind(exchange.user_id)
                .fetch_optional(&mut *tx)
                .await?;
        if conversation.is_none() {
            return Ok(None);
        }
        if let Some(previous) = replay_exchange(&mut tx, exchange.user_id, key).await? {
            tx.commit().await?;
            return Ok(Some(previous));
        }
        let Some(sent) = insert(&mut *tx, &exchange, terms).await? else {
            return Ok(None);
        };
        sqlx::query(
            "INSERT INTO chat.idempotency_keys (user_id, key, conversation_id, user_message_id, assistant_message_id)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (user_id, key) DO UPDATE
             SET conversation_id = EXCLUDED.conversation_id, user_message_id = EXCLUDED.user_message_id,
                 assistant_message_id = EXCLUDED.assistant_message_id, created_at = now()",
        )
        .bind(exchange.user_id)
        .bind(key)
        .bind(exchange.conversation_id)
        .bind(sent.user_message.id)
        .bind(sent.assistant_message.id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.wrote(exchange.user_id).await;
        Ok(Some(sent))
    }

    /// One of a user's messages, read as fresh as `floor` demands.
    pub async fn message_for_user(
        &self,
        floor: ReadFloor,
        user_id: Uuid,
        id: Uuid,
    ) -> Result<Option<MessageRow>, sqlx::Error> {
        let text = format!("SELECT {MESSAGE_COLUMNS} FROM chat.all_messages WHERE id = $1 AND user_id = $2");
        let mut row: Option<MessageRow> = self.owned_row(floor, text, id, user_id).await?;
        self.reveal_messages(row.as_mut_slice()).await?;
        Ok(row)
    }

    pub async fn message(&self, id: Uuid) -> Result<Option<MessageRow>, sqlx::Error> {
        let mut row: Option<MessageRow> =
            sqlx::query_as(sql(format!("SELECT {MESSAGE_COLUMNS} FROM chat.all_messages WHERE id = $1")))
                .bind(id)
                .fetch_optional(self.pool())
                .await?;
        self.reveal_messages(row.as_mut_slice()).await?;
        Ok(row)
    }

    /// A conversation's messages, oldest first, after `after` (exclusive): every message, or with
    /// `branch` (the active leaf of a conversation that has branched) those on the path from its first
    /// message to that leaf.
    pub async fn list_messages(
        &self,
        floor: ReadFloor,
        conversation_id: Uuid,
        branch: Option<Uuid>,
        after: Option<Position>,
        limit: i64,
    ) -> Result<Vec<MessageRow>, sqlx::Error> {
        if let Some(leaf) = branch {
            let after_clause = if after.is_some() { "WHERE (created_at, id) > ($2, $3)" } else { "" };
            let limit_at = if after.is_some() { 4 } else { 2 };
            let text = format!(
                "WITH RECURSIVE path AS (
                     SELECT {MESSAGE_COLUMNS} FROM chat.all_messages WHERE id = ${leaf_at} AND conversation_id = $1
                     UNION ALL
                     SELECT {parent} FROM chat.all_messages m JOIN path ON m.id = path.parent_id)
                 SELECT {MESSAGE_COLUMNS} FROM path {after_clause} ORDER BY created_at, id LIMIT ${limit_at}",
                leaf_at = limit_at + 1,
                parent = prefixed_columns("m"),
            );
            let mut rows: Vec<MessageRow> = self
                .marks
                .database()
                .read(floor, |pool| {
                    let text = text.clone();
                    async move {
                        let mut query = sqlx::query_as(sql(text)).bind(conversation_id);
                        if let Some(after) = after {
                            query = query.bind(after.at).bind(after.id);
                        }
                        query.bind(limit).bind(leaf).fetch_all(&pool).await
                    }
                })
                .await?;
            self.reveal_messages(&mut rows).await?;
            return Ok(rows);
        }
        let text = match after {
            None => format!(
                "SELECT {MESSAGE_COLUMNS} FROM chat.all_messages WHERE conversation_id = $1
                 ORDER BY created_at, id LIMIT $2"
            ),
            Some(_) => format!(
                "SELECT {MESSAGE_COLUMNS} FROM chat.all_messages
                 WHERE conversation_id = $1 AND (created_at, id) > ($2, $3)
                 ORDER BY created_at, id LIMIT $4"
            ),
        };
        let mut rows: Vec<MessageRow> = self.page(floor, text, conversation_id, after, limit).await?;
        self.reveal_messages(&mut rows).await?;
        Ok(rows)
    }

    /// One page of `user_id`'s messages and conversation titles that hold every word of `query`, best
    /// first (by `ts_rank`, then newest id), after `after`; with each hit's snippet. `None` when the
    /// query has no words to search for.
    pub async fn search(
        &self,
        floor: ReadFloor,
        user_id: Uuid,
        query: &str,
        after: Option<SearchPosition>,
        limit: i64,
    ) -> Result<Option<Vec<SearchHit>>, sqlx::Error> {
        if crate::search::words_of_query(query).next().is_none() {
            return Ok(None);
        }
        let Some(key) = self.search_key(user_id, false).await? else {
            return Ok(Some(Vec::new()));
        };
        let Some(query) = crate::search::Query::parse(&key, query) else {
            return Ok(None);
        };
        let tsquery = query.tsquery.clone();
        let rows: Vec<SearchRow> = self
            .marks
            .database()
            .read(floor, |pool| {
                let tsquery = tsquery.clone();
                async move {
                    sqlx::query_as(
                        // The page is ranked and cut from the terms alone; only its rows are then
                        // joined to their conversation and message (a common word matches thousands).
                        "WITH hits AS (
                             SELECT s.item_id, s.conversation_id, ts_rank(s.terms, q, 1) AS rank
                             FROM chat.search_terms s, CAST($2 AS tsquery) q
                             WHERE s.terms @@ q AND s.user_id = $1
                               AND ($3::real IS NULL OR (ts_rank(s.terms, q, 1), s.item_id) < ($3, $4))
                             ORDER BY rank DESC, s.item_id DESC
                             LIMIT $5)
                         SELECT h.item_id, h.conversation_id, h.rank, c.title, c.data_key, m.role, m.content,
                                COALESCE(m.created_at, c.created_at) AS created_at
                         FROM hits h
                         JOIN chat.conversations c ON c.id = h.conversation_id AND c.user_id = $1
                         LEFT JOIN chat.all_messages m ON m.id = h.item_id AND h.item_id <> h.conversation_id
                         ORDER BY h.rank DESC, h.item_id DESC",
                    )
                    .bind(user_id)
                    .bind(tsquery)
                    .bind(after.map(|position| position.rank))
                    .bind(after.map(|position| position.id))
                    .bind(limit)
                    .fetch_all(&pool)
                    .await
                }
            })
            .await?;
        let mut hits = Vec::with_capacity(rows.len());
        for row in rows {
            let data_key = match &row.data_key {
                Some(wrapped) => Some(self.keys.open(row.conversation_id, wrapped)?),
                None => None,
            };
            let open = |field: Field, text: &str| match &data_key {
                Some(key) => key.open_text(field, text).map_err(sealing_error),
                None => Ok(text.to_owned()),
            };
            let title = row.title.as_deref().map(|title| open(Field::Title, title)).transpose()?;
            // A message's hit is cut from its content, a title's from the title.
            let (role, snippet) = match (row.role, row.content) {
                (Some(role), Some(content)) if row.item_id != row.conversation_id => {
                    (Some(role), crate::search::snippet(&open(Field::Content, &content)?, &query.words))
                }
                _ => (None, crate::search::snippet(title.as_deref().unwrap_or_default(), &query.words)),
            };
            hits.push(SearchHit {
                position: SearchPosition { rank: row.rank, id: row.item_id },
                conversation_id: row.conversation_id,
                title,
                role,
                created_at: row.created_at,
                snippet,
            });
        }
        Ok(Some(hits))
    }

    /// What a job needs, in one statement on the primary: its reply message; of the conversation the
    /// model, the system prompt and the running summary with the position it covers; and the newest
    /// `history_limit` completed messages before the reply and after the summary, oldest first.
    pub async fn job_context(&self, message_id: Uuid, history_limit: i64) -> Result<Option<JobContext>, sqlx::Error> {
        let rows =
            sqlx::query(JOB_CONTEXT.as_str()).bind(message_id).bind(history_limit).fetch_all(self.pool()).await?;
        let mut target = None;
        let mut history = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.try_get(0)? {
                // By position: a history row carries its first six columns only (`JOB_CONTEXT`).
                let completed: bool = row.try_get(5)?;
                let message = HistoryMessage {
                    id: row.try_get(1)?,
                    role: row.try_get(2)?,
                    content: row.try_get(3)?,
                    created_at: row.try_get(4)?,
                };
                history.push((message, completed));
            } else {
                target = Some(JobContextRow::from_row(row)?);
            }
        }
        let Some(mut row) = target else {
            return Ok(None);
        };
        history.sort_by_key(|(message, _)| (message.created_at, message.id));
        if row.branched == Some(true) {
            // The path ends at the summary's last message when the summary covers this branch; else
            // the summary was written for another branch and does not apply.
            match history.iter().position(|(message, _)| Some(message.id) == row.summary_until_id) {
                Some(until) => {
                    history.drain(..=until);
                }
                None => row.summary = None,
            }
            history.retain(|(_, completed)| *completed);
            let keep = usize::try_from(history_limit).unwrap_or(usize::MAX);
            history.drain(..history.len().saturating_sub(keep));
        }
        let mut message = row.message;
        self.reveal_messages(std::slice::from_mut(&mut message)).await?;
        let mut history: Vec<HistoryMessage> = history.into_iter().map(|(message, _)| message).collect();
        // Every text here is the reply's conversation's: one data key opens them all.
        let is_sealed = parley_platform::envelope::is_sealed;
        let sealed = row.summary.as_deref().is_some_and(is_sealed) || history.iter().any(|m| is_sealed(&m.content));
        if sealed {
            let key = self.data_key(message.conversation_id).await?.ok_or(sqlx::Error::RowNotFound)?;
            for entry in history.iter_mut().filter(|entry| is_sealed(&entry.content)) {
                entry.content = key.open_text(Field::Content, &entry.content).map_err(sealing_error)?;
            }
            if let Some(summary) = &mut row.summary {
                *summary = key.open_text(Field::Summary, summary).map_err(sealing_error)?;
            }
        }
        let summary = match (row.summary, row.summary_until_at, row.summary_until_id) {
            (Some(summary), Some(at), Some(id)) => Some((summary, Position { at, id })),
            _ => None,
        };
        let conversation = JobConversation {
            model: row.conversation_model.unwrap_or_default(),
            system_prompt: row.system_prompt,
            summary,
            untitled: row.untitled.unwrap_or(false),
        };
        Ok(Some(JobContext { message, conversation, history }))
    }

    /// What the job of the reply `message_id` needs of its conversation, as a job carries it; `None`
    /// when the reply is gone.
    pub async fn carried_context(
        &self,
        message_id: Uuid,
        history_limit: i64,
    ) -> Result<Option<events::CarriedContext>, sqlx::Error> {
        let Some(JobContext { conversation, history, .. }) = self.job_context(message_id, history_limit).await? else {
            return Ok(None);
        };
        let history = history
            .into_iter()
            .map(|HistoryMessage { id, role, content, .. }| events::ContextMessage { id, role, content })
            .collect();
        Ok(Some(events::CarriedContext {
            system_prompt: conversation.system_prompt,
            summary: conversation.summary.map(|(text, _)| text),
            untitled: conversation.untitled,
            history,
        }))
    }

    /// Numbers each message among its versions (`MessageRow::version`), one statement per conversation.
    pub async fn number_versions(&self, floor: ReadFloor, rows: &mut [MessageRow]) -> Result<(), sqlx::Error> {
        let mut conversations: Vec<Uuid> = rows.iter().map(|row| row.conversation_id).collect();
        conversations.sort_unstable();
        conversations.dedup();
        for conversation_id in conversations {
            let ids: Vec<Uuid> =
                rows.iter().filter(|row| row.conversation_id == conversation_id).map(|row| row.id).collect();
            let numbers: Vec<(Uuid, i64, i64)> = self
                .marks
                .database()
                .read(floor, |pool| {
                    let ids = ids.clone();
                    async move {
                        sqlx::query_as(sql("SELECT id, branch, branches FROM (
                                 SELECT s.id, row_number() OVER (PARTITION BY s.role, s.parent_id
                                                                 ORDER BY s.created_at, s.id) AS branch,
                                        count(*) OVER (PARTITION BY s.role, s.parent_id) AS branches
                                 FROM chat.all_messages s
                                 WHERE s.conversation_id = $1 AND EXISTS (
                                     SELECT 1 FROM chat.all_messages t
                                     WHERE t.conversation_id = $1 AND t.id = ANY($2) AND t.role = s.role
                                       AND t.parent_id IS NOT DISTINCT FROM s.parent_id)) versions
                             WHERE id = ANY($2)"
                            .to_owned()))
                        .bind(conversation_id)
                        .bind(ids)
                        .fetch_all(&pool)
                        .await
                    }
                })
                .await?;
            for (id, branch, branches) in numbers {
                if let Some(row) = rows.iter_mut().find(|row| row.id == id) {
                    let count = |n: i64| u32::try_from(n).unwrap_or(u32::MAX);
                    row.version = Some(Version { branch: count(branch), branches: count(branches) });
                }
            }
        }
        Ok(())
    }

    /// The versions of one of a user's messages: the messages of its conversation with its parent and
    /// its role (itself included), oldest first, and the one on the active branch, if any.
    pub async fn siblings(
        &self,
        floor: ReadFloor,
        user_id: Uuid,
        message_id: Uuid,
    ) -> Result<Option<(Vec<MessageRow>, Option<Uuid>)>, sqlx::Error> {
        let Some(message) = self.message_for_user(floor, user_id, message_id).await? else {
            return Ok(None);
        };
        let Some(conversation) = self.conversation(floor, user_id, message.conversation_id).await? else {
            return Ok(None);
        };
        let text = format!(
            "SELECT {MESSAGE_COLUMNS} FROM chat.all_messages
             WHERE conversation_id = $1 AND role = $2 AND parent_id IS NOT DISTINCT FROM $3
             ORDER BY created_at, id"
        );
        let (conversation_id, role, parent) = (message.conversation_id, message.role.clone(), message.parent_id);
        let mut rows: Vec<MessageRow> =
            self.marks
                .database()
                .read(floor, |pool| {
                    let (text, role) = (text.clone(), role.clone());
                    async move {
                        sqlx::query_as(sql(text)).bind(conversation_id).bind(role).bind(parent).fetch_all(&pool).await
                    }
                })
                .await?;
        self.reveal_messages(&mut rows).await?;
        let branches = u32::try_from(rows.len()).unwrap_or(u32::MAX);
        for (branch, row) in (1..).zip(rows.iter_mut()) {
            row.version = Some(Version { branch, branches });
        }
        let active = match conversation.active_leaf_id {
            // Never branched: the message is its only version, on the one branch there is.
            _ if !conversation.branched => rows.first().map(|row| row.id),
            Some(leaf) => {
                let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
                self.on_path(floor, conversation_id, leaf, &ids).await?
            }
            None => None,
        };
        Ok(Some((rows, active)))
    }

    /// Which of `ids` lies on the path from the conversation's first message to `leaf`.
    async fn on_path(
        &self,
        floor: ReadFloor,
        conversation_id: Uuid,
        leaf: Uuid,
        ids: &[Uuid],
    ) -> Result<Option<Uuid>, sqlx::Error> {
        let ids = ids.to_vec();
        self.marks
            .database()
            .read(floor, |pool| {
                let ids = ids.clone();
                async move {
                    let found: Option<(Uuid,)> = sqlx::query_as(
                        "WITH RECURSIVE path AS (
                             SELECT id, parent_id FROM chat.all_messages WHERE id = $2 AND conversation_id = $1
                             UNION ALL
                             SELECT m.id, m.parent_id FROM chat.all_messages m JOIN path ON m.id = path.parent_id)
                         SELECT id FROM path WHERE id = ANY($3) LIMIT 1",
                    )
                    .bind(conversation_id)
                    .bind(leaf)
                    .bind(ids)
                    .fetch_optional(&pool)
                    .await?;
                    Ok(found.map(|(id,)| id))
                }
            })
            .await
    }

    /// Makes the branch through `message_id` the conversation's active one: its leaf is reached from
    /// the message by the newest child at every step. `None` when the user has no such message.
    pub async fn switch_branch(&self, user_id: Uuid, message_id: Uuid) -> Result<Option<ConversationRow>, sqlx::Error> {
        let Some(message) = self.message_for_user(ReadFloor::Primary, user_id, message_id).await? else {
            return Ok(None);
        };
        let mut leaf = message.id;
        // One step a query: a switch is rare, and a path is as deep as the thread below the message.
        loop {
            let child: Option<(Uuid,)> = sqlx::query_as(
                "SELECT id FROM chat.all_messages WHERE parent_id = $1 AND conversation_id = $2
                 ORDER BY created_at DESC, id DESC LIMIT 1",
            )
            .bind(leaf)
            .bind(message.conversation_id)
            .fetch_optional(self.pool())
            .await?;
            match child {
                Some((child,)) => leaf = child,
                None => break,
            }
        }
        let mut row: Option<ConversationRow> = sqlx::query_as(sql(format!(
            "UPDATE chat.conversations SET active_leaf_id = $3, version = version + 1
             WHERE id = $1 AND user_id = $2 RETURNING {CONVERSATION_COLUMNS}"
        )))
        .bind(message.conversation_id)
        .bind(user_id)
        .bind(leaf)
        .fetch_optional(self.pool())
        .await?;
        if let Some(row) = row.as_mut() {
            self.wrote(user_id).await;
            self.reveal_conversation(row)?;
        }
        Ok(row)
    }

    /// Gives `conversation_id` the generated `title` if it still has none (a title the user set
    /// meanwhile wins); false when it did not change. The title goes into the search index with it.
    pub async fn set_generated_title(
        &self,
        user_id: Uuid,
        conversation_id: Uuid,
        title: &str,
    ) -> Result<bool, sqlx::Error> {
        let Some(sealed) = self.seal(conversation_id, Field::Title, title).await? else {
            return Ok(false);
        };
        let terms = self.search_terms(user_id, title).await?;
        let changed: Option<(Uuid,)> = sqlx::query_as(
            "WITH titled AS (
                 UPDATE chat.conversations SET title = $3, version = version + 1
                 WHERE id = $1 AND user_id = $2 AND title IS NULL
                 RETURNING id, user_id),
             indexed AS (
                 INSERT INTO chat.search_terms (item_id, conversation_id, user_id, terms)
                 SELECT id, id, user_id, $4::tsvector FROM titled WHERE $4::tsvector IS NOT NULL
                 ON CONFLICT (item_id) DO UPDATE SET terms = EXCLUDED.terms)
             SELECT id FROM titled",
        )
        .bind(conversation_id)
        .bind(user_id)
        .bind(sealed)
        .bind(terms)
        .fetch_optional(self.pool())
        .await?;
        if changed.is_some() {
            self.wrote(user_id).await;
        }
        Ok(changed.is_some())
    }

    /// Replaces the running summary if the new one covers more; false when it does not.
    pub async fn update_summary(
        &self,
        conversation_id: Uuid,
        summary: &str,
        until_message_id: Uuid,
    ) -> Result<bool, sqlx::Error> {
        let Some(summary) = self.seal(conversation_id, Field::Summary, summary).await? else {
            return Ok(false);
        };
        let result = sqlx::query(
            "UPDATE chat.conversations c SET summary = $2, summary_until_at = m.created_at, summary_until_id = m.id
             FROM chat.all_messages m
             WHERE c.id = $1 AND m.id = $3 AND m.conversation_id = c.id
               AND (c.summary_until_at IS NULL OR (m.created_at, m.id) > (c.summary_until_at, c.summary_until_id))",
        )
        .bind(conversation_id)
        .bind(&summary)
        .bind(until_message_id)
        .execute(self.pool())
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Completes a pending or streaming assistant message. `Ok((row, false))` when it was already
    /// finished: the stored reply is never replaced. With the reply's owner given, its words go into
    /// the search index in the same statement (one commit); else, or when the reply turns out to be
    /// someone else's, in a second one.
    pub async fn complete_message(&self, reply: CompletedReply<'_>) -> Result<Option<(MessageRow, bool)>, sqlx::Error> {
        let CompletedReply { id, conversation, owner, content, model, input_tokens, output_tokens } = reply;
        let terms = match owner {
            Some(owner) => self.search_terms(owner, content).await?,
            None => None,
        };
        let Some((conversation, content)) = self.seal_reply(id, conversation, content).await? else {
            return Ok(None);
        };
        let updated: Option<MessageRow> = sqlx::query_as(sql(finishing(
            "SET content = $2, model = $3, input_tokens = $4, output_tokens = $5, status = 'completed',
                 completed_at = now()",
            6,
            Some((7, 8)),
        )))
        .bind(id)
        .bind(&content)
        .bind(model)
        .bind(input_tokens)
        .bind(output_tokens)
        .bind(conversation)
        .bind(owner)
        .bind(terms)
        .fetch_optional(self.pool())
        .await?;
        let indexed = updated.as_ref().is_some_and(|row| Some(row.user_id) == owner);
        let finished = self.finished(id, updated).await?;
        if let Some((reply, _)) = &finished
            && reply.status == MessageStatus::Completed
            && !indexed
        {
            self.index_reply(reply).await?;
        }
        Ok(finished)
    }

    /// Puts a completed reply's words in the search index; again (after a failure between the reply's
    /// store and this) changes nothing.
    async fn index_reply(&self, reply: &MessageRow) -> Result<(), sqlx::Error> {
        let Some(terms) = self.search_terms(reply.user_id, &reply.content).await? else {
            return Ok(());
        };
        sqlx::query(
            "INSERT INTO chat.search_terms (item_id, conversation_id, user_id, terms)
             SELECT $1, $2, $3, $4::tsvector WHERE EXISTS (SELECT 1 FROM chat.conversations WHERE id = $2)
             ON CONFLICT (item_id) DO NOTHING",
        )
        .bind(reply.id)
        .bind(reply.conversation_id)
        .bind(reply.user_id)
        .bind(terms)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Marks a pending or streaming assistant message failed; a finished message stays as it is.
    pub async fn fail_message(
        &self,
        id: Uuid,
        conversation: Option<Uuid>,
        code: &str,
        detail: &str,
        partial_content: Option<&str>,
    ) -> Result<Option<(MessageRow, bool)>, sqlx::Error> {
        // The partial text is sealed for the message's conversation; without one, the statement looks
        // the message up by its id alone.
        let (conversation, partial_content) = match partial_content {
            Some(partial) => match self.seal_reply(id, conversation, partial).await? {
                Some((conversation, sealed)) => (Some(conversation), Some(sealed)),
                None => return Ok(None),
            },
            None => (conversation, None),
        };
        let updated: Option<MessageRow> = sqlx::query_as(sql(finishing(
            "SET status = 'failed', error_code = $2, error_detail = $3, completed_at = now(),
                 content = COALESCE($4, content)",
            5,
            None,
        )))
        .bind(id)
        .bind(code)
        .bind(detail)
        .bind(partial_content.as_deref())
        .bind(conversation)
        .fetch_optional(self.pool())
        .await?;
        self.finished(id, updated).await
    }

    /// The conversation of reply `id` (`conversation` when the caller named it: the statement then
    /// checks it), and `text` sealed for it; `None` when there is no such message.
    async fn seal_reply(
        &self,
        id: Uuid,
        conversation: Option<Uuid>,
        text: &str,
    ) -> Result<Option<(Uuid, String)>, sqlx::Error> {
        let conversation = match conversation {
            Some(conversation) => conversation,
            None => {
                let found: Option<(Uuid,)> =
                    sqlx::query_as("SELECT conversation_id FROM chat.all_messages WHERE id = $1")
                        .bind(id)
                        .fetch_optional(self.pool())
                        .await?;
                match found {
                    Some((conversation,)) => conversation,
                    None => return Ok(None),
                }
            }
        };
        Ok(self.seal(conversation, Field::Content, text).await?.map(|sealed| (conversation, sealed)))
    }

    async fn finished(&self, id: Uuid, updated: Option<MessageRow>) -> Result<Option<(MessageRow, bool)>, sqlx::Error> {
        match updated {
            Some(mut row) => {
                self.wrote(row.user_id).await;
                self.reveal_messages(std::slice::from_mut(&mut row)).await?;
                Ok(Some((row, true)))
            }
            None => Ok(self.message(id).await?.map(|row| (row, false))),
        }
    }

    /// Locks up to `limit` outbox rows left unpublished for longer than `grace` (skipping rows another
    /// relay holds).
    pub async fn lock_unpublished(
        tx: &mut Transaction<'static, Postgres>,
        limit: i64,
        grace: std::time::Duration,
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, job_id, subject, payload, traceparent FROM chat.outbox
             WHERE published_at IS NULL AND created_at < now() - make_interval(secs => $2)
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(limit)
        .bind(grace.as_secs_f64())
        .fetch_all(&mut **tx)
        .await
    }

    pub async fn mark_published(tx: &mut Transaction<'static, Postgres>, ids: &[i64]) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE chat.outbox SET published_at = now() WHERE id = ANY($1)")
            .bind(ids)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Marks jobs published by id, in one statement.
    pub async fn mark_jobs_published(pool: &PgPool, job_ids: &[Uuid]) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE chat.outbox SET published_at = now() WHERE job_id = ANY($1) AND published_at IS NULL")
            .bind(job_ids)
            .execute(pool)
            .await?;
        Ok(())
    }

    /// Drops outbox rows published long enough ago that JetStream's dedup window has passed.
    pub async fn purge_published(pool: &PgPool) -> Result<u64, sqlx::Error> {
        let result =
            sqlx::query("DELETE FROM chat.outbox WHERE published_at < now() - interval '1 hour'").execute(pool).await?;
        Ok(result.rows_affected())
    }
}

/// A row of the send's statement (`INSERT_EXCHANGE`): the question or the reply; on the reply's, the
/// job's context as the statement read it, its texts as stored (sealed), the question not among them.
#[derive(sqlx::FromRow)]
struct ExchangeRow {
    #[sqlx(flatten)]
    message: MessageRow,
    /// Whether the statement could read the context (`None` on the question's row).
    context_read: Option<bool>,
    system_prompt: Option<String>,
    summary: Option<String>,
    untitled: Option<bool>,
    history_ids: Option<Vec<Uuid>>,
    history_roles: Option<Vec<String>>,
    history_contents: Option<Vec<String>>,
}

impl ExchangeRow {
    /// The context the statement read, taken out of the row.
    fn take_context(&mut self) -> events::CarriedContext {
        let ids = self.history_ids.take().unwrap_or_default();
        let roles = self.history_roles.take().unwrap_or_default();
        let contents = self.history_contents.take().unwrap_or_default();
        let history = ids
            .into_iter()
            .zip(roles)
            .zip(contents)
            .map(|((id, role), content)| events::ContextMessage { id, role, content })
            .collect();
        events::CarriedContext {
            system_prompt: self.system_prompt.take(),
            summary: self.summary.take(),
            untitled: self.untitled.unwrap_or(false),
            history,
        }
    }
}

#[derive(sqlx::FromRow)]
struct JobContextRow {
    #[sqlx(flatten)]
    message: MessageRow,
    conversation_model: Option<String>,
    system_prompt: Option<String>,
    summary: Option<String>,
    summary_until_at: Option<OffsetDateTime>,
    summary_until_id: Option<Uuid>,
    untitled: Option<bool>,
    branched: Option<bool>,
}

/// The statement of [`Storage::job_context`]: the reply's row (`in_history` false), read by name, then
/// the history's rows, whose only columns are the first six (`in_history`, id, role, content,
/// created_at, completed), read by position: up to `chat.history_limit` of them on every job, they carry
/// only what a prompt takes.
static JOB_CONTEXT: LazyLock<String> = LazyLock::new(|| {
    let absent = ["NULL"; 17].join(", ");
    format!(
        "WITH RECURSIVE target AS (
             SELECT {target}, c.model AS conversation_model, c.system_prompt, c.summary, c.summary_until_at,
                    c.summary_until_id, c.title IS NULL AS untitled, c.branched
             FROM chat.all_messages m
             JOIN chat.conversations c ON c.id = m.conversation_id AND c.user_id = m.user_id
             WHERE m.id = $1
         ),
         -- A branched conversation: the reply's ancestors, up to the summary's last message.
         path AS (
             SELECT {walked} FROM chat.all_messages h JOIN target t ON h.id = t.parent_id WHERE t.branched
             UNION ALL
             SELECT {walked} FROM chat.all_messages h JOIN path p ON h.id = p.parent_id
             WHERE p.id IS DISTINCT FROM (SELECT summary_until_id FROM target)
         )
         SELECT false AS in_history, id, role, content, created_at, status = 'completed' AS completed,
                conversation_id, user_id, status, model, input_tokens, output_tokens, error_code, error_detail,
                completed_at, parent_id, conversation_model, system_prompt, summary, summary_until_at,
                summary_until_id, untitled, branched
         FROM target
         UNION ALL
         SELECT true, h.id, h.role, h.content, h.created_at, true, {absent}
         FROM target t CROSS JOIN LATERAL (
             SELECT id, role, content, created_at FROM chat.all_messages h
             WHERE h.conversation_id = t.conversation_id AND (h.created_at, h.id) < (t.created_at, t.id)
               AND h.status = 'completed' AND NOT t.branched
               AND (t.summary_until_at IS NULL OR (h.created_at, h.id) > (t.summary_until_at, t.summary_until_id))
             ORDER BY h.created_at DESC, h.id DESC LIMIT $2
         ) h
         UNION ALL
         SELECT true, id, role, content, created_at, status = 'completed', {absent} FROM path",
        target = prefixed_columns("m"),
        walked = ["id", "role", "content", "created_at", "status", "parent_id"]
            .map(|column| format!("h.{column}"))
            .join(", "),
    )
});

/// Where a search result stands in its ranking: the cursor of the page after it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchPosition {
    pub rank: f32,
    pub id: Uuid,
}

/// One search result: a message (with its role) or, without one, a conversation's title.
pub struct SearchHit {
    pub position: SearchPosition,
    pub conversation_id: Uuid,
    pub title: Option<String>,
    pub role: Option<String>,
    pub created_at: OffsetDateTime,
    pub snippet: Vec<crate::search::Part>,
}

#[derive(sqlx::FromRow)]
struct SearchRow {
    item_id: Uuid,
    conversation_id: Uuid,
    rank: f32,
    title: Option<String>,
    data_key: Option<Vec<u8>>,
    role: Option<String>,
    content: Option<String>,
    created_at: OffsetDateTime,
}

/// What a job needs from chat: its reply message, the conversation, and the history to answer from.
pub struct JobContext {
    pub message: MessageRow,
    pub conversation: JobConversation,
    /// Oldest first; every one completed.
    pub history: Vec<HistoryMessage>,
}

/// A message of a job's history: what a prompt takes of it.
#[derive(Debug, Clone)]
pub struct HistoryMessage {
    pub id: Uuid,
    pub role: String,
    pub content: String,
    pub created_at: OffsetDateTime,
}

/// A conversation as a job sees it.
pub struct JobConversation {
    pub model: String,
    pub system_prompt: Option<String>,
    /// The running summary and the position of the last message it covers.
    pub summary: Option<(String, Position)>,
    /// No title yet.
    pub untitled: bool,
}

/// What one `parley archive` run moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Archived {
    pub conversations: u64,
    pub messages: u64,
}

/// What retention removed from the chat schema.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChatPruned {
    pub idempotency_keys: u64,
    pub conversations: u64,
    /// Stored completions made more than `conversation_days` ago.
    pub stored_completions: u64,
}

/// Retention for the chat schema: idempotency keys past the 24 hours they are honoured, and, when
/// `conversation_days` is set, conversations with no activity for that many days, with their messages
/// (live and archived), and stored completions made that long ago. The outbox prunes itself (the relay drops rows an hour after publishing them).
pub async fn prune(pool: &PgPool, conversation_days: Option<u32>) -> Result<ChatPruned, sqlx::Error> {
    use parley_platform::db::delete_in_batches;
    let honoured_hours = 24_i32;
    let condition = "created_at < now() - make_interval(hours => $1)";
    let idempotency_keys = delete_in_batches(pool, "chat.idempotency_keys", condition, honoured_hours).await?;
    let (conversations, stored_completions) = match conversation_days {
        Some(days) => {
            let days = i32::try_from(days).unwrap_or(i32::MAX);
            let condition = "updated_at < now() - make_interval(days => $1)";
            let conversations = delete_in_batches(pool, "chat.conversations", condition, days).await?;
            let condition = "created_at < now() - make_interval(days => $1)";
            (conversations, delete_in_batches(pool, "chat.stored_completions", condition, days).await?)
        }
        None => (0, 0),
    };
    Ok(ChatPruned { idempotency_keys, conversations, stored_completions })
}

/// Moves the messages of conversations idle for `idle_days` (no reply in progress) to the archive
/// table, `batch` conversations per transaction. Each conversation is locked as a send locks it, so a
/// send racing the move waits and then lands in the hot table; reads see the messages in one table or
/// the other, never neither or both.
pub async fn archive_idle(pool: &PgPool, idle_days: u32, batch: i64) -> Result<Archived, sqlx::Error> {
    let mut total = Archived::default();
    loop {
        let mut tx = pool.begin().await?;
        let ids: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT c.id FROM chat.conversations c
             WHERE c.archived_at IS NULL AND c.updated_at < now() - make_interval(days => $1)
               AND NOT EXISTS (SELECT 1 FROM chat.messages m
                               WHERE m.conversation_id = c.id AND m.status IN ('pending', 'streaming'))
             ORDER BY c.updated_at LIMIT $2 FOR UPDATE OF c SKIP LOCKED",
        )
        .bind(i32::try_from(idle_days).unwrap_or(i32::MAX))
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        if ids.is_empty() {
            tx.commit().await?;
            return Ok(total);
        }
        let ids: Vec<Uuid> = ids.into_iter().map(|(id,)| id).collect();
        let moved = sqlx::query(
            "WITH moved AS (DELETE FROM chat.messages WHERE conversation_id = ANY($1) RETURNING *)
             INSERT INTO chat.archived_messages SELECT * FROM moved",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE chat.conversations SET archived_at = now() WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        total.conversations += ids.len() as u64;
        total.messages += moved.rows_affected();
    }
}

/// The statement that finishes a pending or streaming reply with `set` (binding its id as $1, and as
/// `$<conversation>` its conversation, or NULL for any) and, in the same statement, marks its
/// conversation active and, with `index` = (owner, terms), puts the reply's search terms in the index
/// when the reply is the owner's: one round trip and one commit. Returns the row.
fn finishing(set: &str, conversation: usize, index: Option<(usize, usize)>) -> String {
    let indexed = match index {
        Some((owner, terms)) => format!(
            ", indexed AS (
                 INSERT INTO chat.search_terms (item_id, conversation_id, user_id, terms)
                 SELECT id, conversation_id, user_id, ${terms}::tsvector FROM finished
                 WHERE user_id = ${owner}::uuid AND status = 'completed' AND ${terms}::tsvector IS NOT NULL
                 ON CONFLICT (item_id) DO NOTHING)"
        ),
        None => String::new(),
    };
    format!(
        "WITH finished AS (
             UPDATE chat.messages {set}
             WHERE id = $1 AND role = 'assistant' AND status IN ('pending', 'streaming')
               AND (${conversation}::uuid IS NULL OR conversation_id = ${conversation})
             RETURNING {MESSAGE_COLUMNS}),
         touched AS (
             UPDATE chat.conversations SET updated_at = now(), archived_at = NULL
             WHERE id = (SELECT conversation_id FROM finished)){indexed}
         SELECT {MESSAGE_COLUMNS} FROM finished"
    )
}

/// A reply as the model finished it, to be stored ([`Storage::complete_message`]).
pub struct CompletedReply<'a> {
    pub id: Uuid,
    /// Its conversation, whose data key seals it (looked up when `None`; checked when given).
    pub conversation: Option<Uuid>,
    /// Its owner, whose search key indexes it in the statement that stores it.
    pub owner: Option<Uuid>,
    pub content: &'a str,
    pub model: &'a str,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

/// How a reply is to be generated: carried on its job.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    pub sampling: Sampling,
    pub cache: CacheDirective,
    /// The quota reservation the agent settles.
    pub reservation_id: Option<Uuid>,
    /// The longest reply the client asked for.
    pub max_tokens: Option<u32>,
}

/// Stores an exchange in one statement: a regenerated reply, or a question and its reply.
async fn insert<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    exchange: &NewExchange<'_>,
    terms: Option<&str>,
) -> Result<Option<SentExchange>, sqlx::Error> {
    match exchange.follows {
        Follows::Question(question) => insert_regeneration(executor, exchange, question).await,
        Follows::ActiveBranch | Follows::Parent(_) => insert_exchange(executor, exchange, terms).await,
    }
}

/// Stores an exchange in one statement: marks the conversation active (which locks its row, so sends
/// into one conversation take turns), inserts the user message, the pending reply just after it and
/// the reply's job in the outbox. `None` when the user has no such conversation (nothing is stored).
async fn insert_exchange<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    exchange: &NewExchange<'_>,
    terms: Option<&str>,
) -> Result<Option<SentExchange>, sqlx::Error> {
    let (user_message_id, assistant_message_id) = (Uuid::now_v7(), Uuid::now_v7());
    let job = reply_job(exchange, assistant_message_id);
    // The messages' times come from clock_timestamp() once the row lock is held, not from now() (the
    // statement's start), so they follow every message committed before them.
    let rows: Vec<ExchangeRow> = sqlx::query_as(INSERT_EXCHANGE.as_str())
        .bind(exchange.conversation_id)
        .bind(exchange.user_id)
        .bind(user_message_id)
        .bind(exchange.content)
        .bind(assistant_message_id)
        .bind(exchange.model)
        .bind(job.job_id)
        .bind(exchange.jobs_subject)
        .bind(sqlx::types::Json(&job))
        .bind(exchange.traceparent.as_deref())
        .bind(terms)
        .bind(matches!(exchange.follows, Follows::Parent(_)))
        .bind(match exchange.follows {
            Follows::Parent(parent) => parent,
            Follows::ActiveBranch | Follows::Question(_) => None,
        })
        .bind((exchange.history_limit - 1).max(0))
        .fetch_all(executor)
        .await?;
    let mut context = None;
    let mut messages = Vec::with_capacity(rows.len());
    for mut row in rows {
        if row.context_read == Some(true) {
            context = Some(row.take_context());
        }
        messages.push(row.message);
    }
    Ok(stored_exchange(exchange, messages, user_message_id, job, context))
}

/// The statement of [`insert_exchange`]: $1 conversation, $2 user, $3 question id, $4 its content
/// (sealed), $5 reply id, $6 model, $7 job id, $8 subject, $9 job, $10 traceparent, $11 search terms,
/// $12 whether the question is an edit (placed after $13, its parent, not after the active leaf), $14 how
/// many messages before the question the job's context takes. The reply's row also carries that
/// context as the statement read it (`ExchangeRow`).
static INSERT_EXCHANGE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH conversation AS (
             UPDATE chat.conversations SET updated_at = now(), archived_at = NULL,
                 prior_leaf_id = active_leaf_id, active_leaf_id = $5, branched = branched OR $12
             WHERE id = $1 AND user_id = $2
             RETURNING id, model, prior_leaf_id, branched, system_prompt, summary, summary_until_at,
                       summary_until_id, title IS NULL AS untitled),
         question AS (
             INSERT INTO chat.messages
                 (id, conversation_id, user_id, role, content, status, created_at, completed_at, parent_id)
             SELECT $3, id, $2, 'user', $4, 'completed', clock_timestamp(), clock_timestamp(),
                    CASE WHEN $12 THEN $13::uuid ELSE prior_leaf_id END
             FROM conversation
             RETURNING {MESSAGE_COLUMNS}),
         reply AS (
             INSERT INTO chat.messages (id, conversation_id, user_id, role, content, status, model, created_at, parent_id)
             SELECT $5, question.conversation_id, $2, 'assistant', '', 'pending', COALESCE($6, conversation.model),
                    question.created_at + interval '1 microsecond', question.id
             FROM question, conversation
             RETURNING {MESSAGE_COLUMNS}),
         job AS (
             INSERT INTO chat.outbox (job_id, subject, payload, traceparent)
             SELECT $7, $8, jsonb_set($9, '{{model}}', to_jsonb(reply.model)), $10 FROM reply),
         indexed AS (
             INSERT INTO chat.search_terms (item_id, conversation_id, user_id, terms)
             SELECT id, conversation_id, user_id, $11::tsvector FROM question WHERE $11::tsvector IS NOT NULL),
         -- The job's context is read here when this statement's snapshot holds the whole thread: the
         -- conversation has not branched and its newest message is the leaf this send follows (a send
         -- into it that committed while this one waited for the row lock is missing from the snapshot).
         context AS (
             SELECT c.*, NOT c.branched AND c.prior_leaf_id IS NOT DISTINCT FROM (
                 SELECT id FROM chat.all_messages WHERE conversation_id = c.id
                 ORDER BY created_at DESC, id DESC LIMIT 1) AS context_read
             FROM conversation c),
         history AS (
             SELECT array_agg(h.id ORDER BY h.created_at, h.id) AS ids,
                    array_agg(h.role ORDER BY h.created_at, h.id) AS roles,
                    array_agg(h.content ORDER BY h.created_at, h.id) AS contents
             FROM context c CROSS JOIN LATERAL (
                 SELECT id, role, content, created_at FROM chat.all_messages h
                 WHERE h.conversation_id = c.id AND h.status = 'completed' AND c.context_read
                   AND (c.summary_until_at IS NULL OR (h.created_at, h.id) > (c.summary_until_at, c.summary_until_id))
                 ORDER BY h.created_at DESC, h.id DESC LIMIT $14
             ) h)
         SELECT {MESSAGE_COLUMNS}, NULL::boolean AS context_read, NULL::text AS system_prompt, NULL::text AS summary,
                NULL::boolean AS untitled, NULL::uuid[] AS history_ids, NULL::text[] AS history_roles,
                NULL::text[] AS history_contents
         FROM question
         UNION ALL
         SELECT {reply}, c.context_read, c.system_prompt,
                CASE WHEN c.summary_until_id IS NOT NULL THEN c.summary END, c.untitled, h.ids, h.roles, h.contents
         FROM reply, context c, history h",
        reply = prefixed_columns("reply"),
    )
});

/// The statement of [`insert_regeneration`]: $1 conversation, $2 user, $3 question, $4 reply id,
/// $5 model, $6 job id, $7 subject, $8 job, $9 traceparent.
static INSERT_REGENERATION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH question AS (
             SELECT {MESSAGE_COLUMNS} FROM chat.all_messages
             WHERE id = $3 AND conversation_id = $1 AND user_id = $2 AND role = 'user'),
         conversation AS (
             UPDATE chat.conversations SET updated_at = now(), archived_at = NULL,
                 prior_leaf_id = active_leaf_id, active_leaf_id = $4, branched = true
             WHERE id = $1 AND user_id = $2 AND EXISTS (SELECT 1 FROM question)
             RETURNING id, model),
         reply AS (
             INSERT INTO chat.messages (id, conversation_id, user_id, role, content, status, model, created_at, parent_id)
             SELECT $4, conversation.id, $2, 'assistant', '', 'pending', COALESCE($5, conversation.model),
                    clock_timestamp(), $3
             FROM conversation
             RETURNING {MESSAGE_COLUMNS}),
         job AS (
             INSERT INTO chat.outbox (job_id, subject, payload, traceparent)
             SELECT $6, $7, jsonb_set($8, '{{model}}', to_jsonb(reply.model)), $9 FROM reply)
         SELECT {MESSAGE_COLUMNS} FROM question WHERE EXISTS (SELECT 1 FROM reply)
         UNION ALL SELECT {MESSAGE_COLUMNS} FROM reply"
    )
});

/// The job of a reply about to be stored.
fn reply_job(exchange: &NewExchange<'_>, assistant_message_id: Uuid) -> AiJob {
    AiJob {
        job_id: Uuid::now_v7(),
        message_id: assistant_message_id,
        conversation_id: exchange.conversation_id,
        user_id: exchange.user_id,
        // The conversation's model unless the send names one: set by the statement, which reads it.
        model: String::new(),
        tier: exchange.tier.to_owned(),
        sampling: exchange.generation.sampling.clone(),
        cache: exchange.generation.cache,
        reservation_id: exchange.generation.reservation_id,
        max_tokens: exchange.generation.max_tokens,
        context: None,
    }
}

/// The question and the reply an exchange's statement returned, with the reply's job; `None` when it
/// stored nothing.
fn stored_exchange(
    exchange: &NewExchange<'_>,
    rows: Vec<MessageRow>,
    question_id: Uuid,
    job: AiJob,
    context: Option<events::CarriedContext>,
) -> Option<SentExchange> {
    let mut rows = rows.into_iter();
    let (Some(first), Some(second)) = (rows.next(), rows.next()) else {
        return None;
    };
    let (user_message, assistant_message) = if first.id == question_id { (first, second) } else { (second, first) };
    let job = AiJob { model: assistant_message.model.clone().unwrap_or_default(), context, ..job };
    let job = QueuedJob {
        job,
        subject: exchange.jobs_subject.to_owned(),
        traceparent: exchange.traceparent.clone(),
        committed: std::time::Instant::now(),
    };
    Some(SentExchange { user_message, assistant_message, replayed: false, job: Some(job) })
}

/// Stores a regenerated reply in one statement: a new pending reply to `question` (a sibling of its
/// earlier replies), which becomes the end of the conversation's active branch, and its job. `None`
/// when the user has no such question in the conversation.
async fn insert_regeneration<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    exchange: &NewExchange<'_>,
    question: Uuid,
) -> Result<Option<SentExchange>, sqlx::Error> {
    let assistant_message_id = Uuid::now_v7();
    let job = reply_job(exchange, assistant_message_id);
    let rows: Vec<MessageRow> = sqlx::query_as(INSERT_REGENERATION.as_str())
        .bind(exchange.conversation_id)
        .bind(exchange.user_id)
        .bind(question)
        .bind(assistant_message_id)
        .bind(exchange.model)
        .bind(job.job_id)
        .bind(exchange.jobs_subject)
        .bind(sqlx::types::Json(&job))
        .bind(exchange.traceparent.as_deref())
        .fetch_all(executor)
        .await?;
    Ok(stored_exchange(exchange, rows, question, job, None))
}

async fn replay_exchange(
    tx: &mut Transaction<'static, Postgres>,
    user_id: Uuid,
    key: &str,
) -> Result<Option<SentExchange>, sqlx::Error> {
    let ids: Option<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT user_message_id, assistant_message_id FROM chat.idempotency_keys
         WHERE user_id = $1 AND key = $2 AND created_at > now() - interval '24 hours'",
    )
    .bind(user_id)
    .bind(key)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((user_message_id, assistant_message_id)) = ids else {
        return Ok(None);
    };
    let rows: Vec<MessageRow> = sqlx::query_as(sql(format!(
        "SELECT {MESSAGE_COLUMNS} FROM chat.all_messages WHERE id = ANY($1) AND user_id = $2"
    )))
    .bind(vec![user_message_id, assistant_message_id])
    .bind(user_id)
    .fetch_all(&mut **tx)
    .await?;
    let find = |id: Uuid| rows.iter().find(|row| row.id == id).cloned();
    // The first exchange's conversation may have been deleted since: then the key is free again.
    Ok(match (find(user_message_id), find(assistant_message_id)) {
        (Some(user_message), Some(assistant_message)) => {
            Some(SentExchange { user_message, assistant_message, replayed: true, job: None })
        }
        _ => None,
    })
}

mod completions;
#[cfg(test)]
mod tests;

pub use completions::{CompletionFilter, NewStoredCompletion, StoredCompletionRow};

/// What one `parley admin seal-content` run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// Data keys wrapped again with the current key-encryption key.
    pub rewrapped: u64,
    /// Conversations that had no data key and got one.
    pub keyed: u64,
    /// Texts (message contents, titles, summaries) written before content was sealed, sealed now.
    pub texts: u64,
    /// Search keys wrapped by an older key-encryption key, wrapped again.
    pub search_keys: u64,
    /// Messages and titles written before search existed, put in the search index now.
    pub indexed: u64,
}

/// A conversation as `seal_stored` reads it: id, owner, wrapped data key, title, summary.
type StoredConversation = (Uuid, Uuid, Option<Vec<u8>>, Option<String>, Option<String>);

/// Wraps the search keys of users who hold no conversation (which [`seal_stored`] reached through
/// their conversations) with the current key.
async fn rewrap_search_keys(pool: &PgPool, keyring: &Keyring, done: &mut Sealed) -> Result<(), sqlx::Error> {
    let keys: Vec<(Uuid, Vec<u8>)> =
        sqlx::query_as("SELECT user_id, wrapped FROM chat.search_keys").fetch_all(pool).await?;
    for (user, wrapped) in keys {
        if let Some(rewrapped) = keyring.rewrap_search_key(user, &wrapped).map_err(sealing_error)? {
            sqlx::query("UPDATE chat.search_keys SET wrapped = $2 WHERE user_id = $1 AND wrapped = $3")
                .bind(user)
                .bind(rewrapped)
                .bind(wrapped)
                .execute(pool)
                .await?;
            done.search_keys += 1;
        }
    }
    Ok(())
}

/// The search key of `user` in `seal_stored`'s transaction: rewrapped with the current key first when
/// an older one wrapped it, made when the user has none.
async fn stored_search_key(
    tx: &mut Transaction<'static, Postgres>,
    keyring: &Keyring,
    user: Uuid,
    done: &mut Sealed,
) -> Result<SearchKey, sqlx::Error> {
    let stored: Option<(Vec<u8>,)> =
        sqlx::query_as("SELECT wrapped FROM chat.search_keys WHERE user_id = $1 FOR UPDATE")
            .bind(user)
            .fetch_optional(&mut **tx)
            .await?;
    let wrapped = match stored {
        Some((wrapped,)) => match keyring.rewrap_search_key(user, &wrapped).map_err(sealing_error)? {
            Some(rewrapped) => {
                done.search_keys += 1;
                rewrapped
            }
            None => return keyring.unwrap_search_key(user, &wrapped).map_err(sealing_error),
        },
        None => keyring.new_search_key(user).map_err(sealing_error)?.1,
    };
    sqlx::query(
        "INSERT INTO chat.search_keys (user_id, wrapped) VALUES ($1, $2)
         ON CONFLICT (user_id) DO UPDATE SET wrapped = EXCLUDED.wrapped",
    )
    .bind(user)
    .bind(&wrapped)
    .execute(&mut **tx)
    .await?;
    keyring.unwrap_search_key(user, &wrapped).map_err(sealing_error)
}

/// Brings every conversation under the current key-encryption key, `batch` conversations per
/// transaction: data keys wrapped by an older key are wrapped again (the texts they seal are not
/// touched), conversations from before content was sealed get a data key, and their plain texts are
/// sealed. Each conversation is locked as a send locks it. Safe to run again and to stop half-way.
pub async fn seal_stored(pool: &PgPool, keyring: &Keyring, batch: i64) -> Result<Sealed, sqlx::Error> {
    let mut done = Sealed::default();
    let mut after = Uuid::nil();
    loop {
        let mut tx = pool.begin().await?;
        let rows: Vec<StoredConversation> = sqlx::query_as(
            "SELECT id, user_id, data_key, title, summary FROM chat.conversations WHERE id > $1 ORDER BY id
             LIMIT $2 FOR UPDATE",
        )
        .bind(after)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else {
            tx.commit().await?;
            rewrap_search_keys(pool, keyring, &mut done).await?;
            completions::rewrap_completion_keys(pool, keyring, &mut done).await?;
            return Ok(done);
        };
        after = last.0;
        let mut search_keys: HashMap<Uuid, SearchKey> = HashMap::new();
        for (id, user, wrapped, title, summary) in rows {
            let (key, wrapped) = match wrapped {
                Some(wrapped) => match keyring.rewrap(id, &wrapped).map_err(sealing_error)? {
                    Some(rewrapped) => {
                        done.rewrapped += 1;
                        (keyring.unwrap(id, &rewrapped).map_err(sealing_error)?, rewrapped)
                    }
                    None => (keyring.unwrap(id, &wrapped).map_err(sealing_error)?, wrapped),
                },
                None => {
                    done.keyed += 1;
                    keyring.new_data_key(id).map_err(sealing_error)?
                }
            };
            let mut seal = |field: Field, text: Option<String>| -> Result<Option<String>, sqlx::Error> {
                match text {
                    Some(text) if !text.is_empty() && !parley_platform::envelope::is_sealed(&text) => {
                        done.texts += 1;
                        key.seal_text(field, &text).map(Some).map_err(sealing_error)
                    }
                    other => Ok(other),
                }
            };
            let plain_title = match &title {
                Some(title) => Some(key.open_text(Field::Title, title).map_err(sealing_error)?),
                None => None,
            };
            let (title, summary) = (seal(Field::Title, title)?, seal(Field::Summary, summary)?);
            sqlx::query("UPDATE chat.conversations SET data_key = $2, title = $3, summary = $4 WHERE id = $1")
                .bind(id)
                .bind(&wrapped)
                .bind(title)
                .bind(summary)
                .execute(&mut *tx)
                .await?;
            for table in ["chat.messages", "chat.archived_messages"] {
                let plain: Vec<(Uuid, String)> = sqlx::query_as(sql(format!(
                    "SELECT id, content FROM {table}
                     WHERE conversation_id = $1 AND content <> '' AND left(content, 5) <> $2"
                )))
                .bind(id)
                .bind(parley_platform::envelope::SEALED_PREFIX)
                .fetch_all(&mut *tx)
                .await?;
                for (message, content) in plain {
                    let sealed = key.seal_text(Field::Content, &content).map_err(sealing_error)?;
                    sqlx::query(sql(format!("UPDATE {table} SET content = $2 WHERE id = $1")))
                        .bind(message)
                        .bind(sealed)
                        .execute(&mut *tx)
                        .await?;
                    done.texts += 1;
                }
            }
            // What was written before search existed: the title and the finished messages with no terms.
            let unindexed: Vec<(Uuid, String)> = sqlx::query_as(
                "SELECT m.id, m.content FROM chat.all_messages m
                 WHERE m.conversation_id = $1 AND m.status = 'completed' AND m.content <> ''
                   AND NOT EXISTS (SELECT 1 FROM chat.search_terms s WHERE s.item_id = m.id)",
            )
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
            let title_unindexed = match &plain_title {
                Some(title) if !title.is_empty() => {
                    let found: Option<(Uuid,)> =
                        sqlx::query_as("SELECT item_id FROM chat.search_terms WHERE item_id = $1")
                            .bind(id)
                            .fetch_optional(&mut *tx)
                            .await?;
                    found.is_none().then(|| (id, title.clone()))
                }
                _ => None,
            };
            let mut texts: Vec<(Uuid, String)> = title_unindexed.into_iter().collect();
            for (message, content) in unindexed {
                texts.push((message, key.open_text(Field::Content, &content).map_err(sealing_error)?));
            }
            let search_key = match search_keys.entry(user) {
                std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
                std::collections::hash_map::Entry::Vacant(new) => {
                    new.insert(stored_search_key(&mut tx, keyring, user, &mut done).await?)
                }
            };
            for (item, text) in texts {
                let Some(terms) = crate::search::index_terms(search_key, &text) else {
                    continue;
                };
                sqlx::query(
                    "INSERT INTO chat.search_terms (item_id, conversation_id, user_id, terms)
                     VALUES ($1, $2, $3, $4::tsvector) ON CONFLICT (item_id) DO NOTHING",
                )
                .bind(item)
                .bind(id)
                .bind(user)
                .bind(terms)
                .execute(&mut *tx)
                .await?;
                done.indexed += 1;
            }
        }
        tx.commit().await?;
    }
}
