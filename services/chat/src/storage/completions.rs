//! Stored completions: the completions their clients asked to keep (OpenAI's `store: true`), each with
//! a data key of its own, wrapped like a conversation's, that seals the completion and its request's
//! messages. The metadata stays readable: listings filter on it.

use parley_platform::envelope::Field;
use parley_platform::replicas::ReadFloor;
use sqlx::FromRow;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Keyring, PgPool, Sealed, Storage, sealing_error, sql};

/// A completion to keep, its texts as the client saw them.
pub struct NewStoredCompletion<'a> {
    pub id: Uuid,
    pub user_id: Uuid,
    pub model: &'a str,
    /// A JSON object of strings.
    pub metadata: &'a serde_json::Value,
    pub completion: &'a str,
    pub messages: &'a str,
}

/// A stored completion, opened.
#[derive(Debug, Clone, FromRow)]
pub struct StoredCompletionRow {
    pub id: Uuid,
    pub user_id: Uuid,
    pub model: String,
    pub metadata: sqlx::types::Json<serde_json::Value>,
    pub data_key: Vec<u8>,
    pub completion: String,
    pub messages: String,
    pub created_at: OffsetDateTime,
}

/// Which of a user's stored completions a listing wants.
pub struct CompletionFilter<'a> {
    pub after: Option<Uuid>,
    pub limit: i64,
    pub descending: bool,
    pub model: Option<&'a str>,
    /// A JSON object of strings the metadata must hold (`{}`: any).
    pub metadata: &'a serde_json::Value,
}

const COLUMNS: &str = "id, user_id, model, metadata, data_key, completion, messages, created_at";
/// A listing's columns: the messages stay behind (read one completion for them), so a page of a
/// hundred completions does not carry a hundred prompts.
const LISTED_COLUMNS: &str = "id, user_id, model, metadata, data_key, completion, '' AS messages, created_at";

impl Storage {
    /// Keeps a completion; keeping the same id again changes nothing.
    pub async fn store_completion(&self, new: NewStoredCompletion<'_>) -> Result<(), sqlx::Error> {
        let (key, wrapped) = self.keys.keyring.new_data_key(new.id).map_err(sealing_error)?;
        let completion = key.seal_text(Field::Completion, new.completion).map_err(sealing_error)?;
        let messages = key.seal_text(Field::Prompt, new.messages).map_err(sealing_error)?;
        sqlx::query(
            "INSERT INTO chat.stored_completions (id, user_id, model, metadata, data_key, completion, messages)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
        )
        .bind(new.id)
        .bind(new.user_id)
        .bind(new.model)
        .bind(sqlx::types::Json(new.metadata))
        .bind(wrapped)
        .bind(completion)
        .bind(messages)
        .execute(self.pool())
        .await?;
        self.wrote(new.user_id).await;
        Ok(())
    }

    /// One of `user_id`'s stored completions.
    pub async fn stored_completion(
        &self,
        floor: ReadFloor,
        user_id: Uuid,
        id: Uuid,
    ) -> Result<Option<StoredCompletionRow>, sqlx::Error> {
        let text = format!("SELECT {COLUMNS} FROM chat.stored_completions WHERE id = $1 AND user_id = $2");
        let row: Option<StoredCompletionRow> = self.owned_row(floor, text, id, user_id).await?;
        row.map(|row| self.open_completion(row)).transpose()
    }

    /// A page of `user_id`'s stored completions in id order, and one more when there is one, without
    /// their messages.
    pub async fn list_stored_completions(
        &self,
        floor: ReadFloor,
        user_id: Uuid,
        filter: CompletionFilter<'_>,
    ) -> Result<Vec<StoredCompletionRow>, sqlx::Error> {
        let (beyond, order) = if filter.descending { ("<", "DESC") } else { (">", "ASC") };
        let text = format!(
            "SELECT {LISTED_COLUMNS} FROM chat.stored_completions
             WHERE user_id = $1 AND ($2::uuid IS NULL OR id {beyond} $2) AND ($3::text IS NULL OR model = $3)
               AND metadata @> $4
             ORDER BY id {order} LIMIT $5"
        );
        let (after, model, metadata) = (filter.after, filter.model.map(str::to_owned), filter.metadata.clone());
        let rows: Vec<StoredCompletionRow> = self
            .marks
            .database()
            .read(floor, |pool| {
                let (text, model, metadata) = (text.clone(), model.clone(), metadata.clone());
                async move {
                    sqlx::query_as(sql(text))
                        .bind(user_id)
                        .bind(after)
                        .bind(model)
                        .bind(sqlx::types::Json(metadata))
                        .bind(filter.limit + 1)
                        .fetch_all(&pool)
                        .await
                }
            })
            .await?;
        rows.into_iter().map(|row| self.open_completion(row)).collect()
    }

    /// Replaces the metadata of one of `user_id`'s stored completions; `None` when there is no such
    /// completion.
    pub async fn update_stored_completion(
        &self,
        user_id: Uuid,
        id: Uuid,
        metadata: &serde_json::Value,
    ) -> Result<Option<StoredCompletionRow>, sqlx::Error> {
        let text = format!(
            "UPDATE chat.stored_completions SET metadata = $3 WHERE id = $1 AND user_id = $2 RETURNING {COLUMNS}"
        );
        let row: Option<StoredCompletionRow> = sqlx::query_as(sql(text))
            .bind(id)
            .bind(user_id)
            .bind(sqlx::types::Json(metadata))
            .fetch_optional(self.pool())
            .await?;
        if row.is_some() {
            self.wrote(user_id).await;
        }
        row.map(|row| self.open_completion(row)).transpose()
    }

    /// Deletes one of `user_id`'s stored completions; false when there is no such completion.
    pub async fn delete_stored_completion(&self, user_id: Uuid, id: Uuid) -> Result<bool, sqlx::Error> {
        let deleted = sqlx::query("DELETE FROM chat.stored_completions WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(user_id)
            .execute(self.pool())
            .await?
            .rows_affected()
            > 0;
        if deleted {
            self.wrote(user_id).await;
        }
        Ok(deleted)
    }

    /// `row` with its texts opened (a completion's key is used once a read, so it is not cached).
    fn open_completion(&self, mut row: StoredCompletionRow) -> Result<StoredCompletionRow, sqlx::Error> {
        let key = self.keys.keyring.unwrap(row.id, &row.data_key).map_err(sealing_error)?;
        row.completion = key.open_text(Field::Completion, &row.completion).map_err(sealing_error)?;
        if !row.messages.is_empty() {
            row.messages = key.open_text(Field::Prompt, &row.messages).map_err(sealing_error)?;
        }
        Ok(row)
    }
}

/// Wraps again, with the current key-encryption key, the data keys of stored completions an older one
/// wrapped (their sealed texts are not touched).
pub(super) async fn rewrap_completion_keys(
    pool: &PgPool,
    keyring: &Keyring,
    done: &mut Sealed,
) -> Result<(), sqlx::Error> {
    let keys: Vec<(Uuid, Vec<u8>)> =
        sqlx::query_as("SELECT id, data_key FROM chat.stored_completions").fetch_all(pool).await?;
    for (id, wrapped) in keys {
        if let Some(rewrapped) = keyring.rewrap(id, &wrapped).map_err(sealing_error)? {
            sqlx::query("UPDATE chat.stored_completions SET data_key = $2 WHERE id = $1 AND data_key = $3")
                .bind(id)
                .bind(rewrapped)
                .bind(wrapped)
                .execute(pool)
                .await?;
            done.rewrapped += 1;
        }
    }
    Ok(())
}
