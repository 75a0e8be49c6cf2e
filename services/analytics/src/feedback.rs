//! Ratings of the model's replies (`analytics.feedback`): one per reply, set, changed and removed by
//! the user it answered; read back per model (satisfaction) and exported by admins.

use parley_platform::cursor::{CursorKind, Position, page_size};
use parley_platform::replicas::ReadFloor;
use parley_platform::{ServiceError, timestamps};
use parley_proto::analytics::v1 as pb;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::service::AnalyticsService;

const COLUMNS: &str = "message_id, user_id, conversation_id, model, rating, comment, created_at, updated_at";

#[derive(sqlx::FromRow)]
struct FeedbackRow {
    message_id: Uuid,
    user_id: Uuid,
    conversation_id: Uuid,
    model: String,
    rating: String,
    comment: Option<String>,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
}

impl From<FeedbackRow> for pb::Feedback {
    fn from(row: FeedbackRow) -> Self {
        let rating = match row.rating.as_str() {
            "up" => pb::Rating::Up,
            "down" => pb::Rating::Down,
            _ => pb::Rating::Unspecified,
        };
        pb::Feedback {
            message_id: row.message_id.to_string(),
            user_id: row.user_id.to_string(),
            conversation_id: row.conversation_id.to_string(),
            model: row.model,
            rating: rating as i32,
            comment: row.comment,
            created_at: Some(timestamps::to_proto(row.created_at)),
            updated_at: Some(timestamps::to_proto(row.updated_at)),
        }
    }
}

/// The stored name of a rating; `None` for one the request did not name.
fn rating_name(rating: i32) -> Option<&'static str> {
    match pb::Rating::try_from(rating).ok()? {
        pb::Rating::Up => Some("up"),
        pb::Rating::Down => Some("down"),
        pb::Rating::Unspecified => None,
    }
}

fn uuid(field: &str, text: &str) -> Result<Uuid, ServiceError> {
    Uuid::parse_str(text).map_err(|_| ServiceError::invalid_field(field, "must be a UUID"))
}

fn time_or(
    field: &str,
    at: Option<&prost_types::Timestamp>,
    default: OffsetDateTime,
) -> Result<OffsetDateTime, ServiceError> {
    match at {
        None => Ok(default),
        Some(at) => timestamps::from_proto(at).ok_or_else(|| ServiceError::invalid_field(field, "is not a valid time")),
    }
}

impl AnalyticsService {
    pub(crate) async fn set_feedback(&self, request: pb::SetFeedbackRequest) -> Result<pb::Feedback, ServiceError> {
        let message_id = uuid("message_id", &request.message_id)?;
        let user_id = uuid("user_id", &request.user_id)?;
        let conversation_id = uuid("conversation_id", &request.conversation_id)?;
        let rating =
            rating_name(request.rating).ok_or_else(|| ServiceError::invalid_field("rating", "must be up or down"))?;
        // A rating moves to the new user only if it was theirs: another user's rating of the same id
        // (which the gateway's ownership check rules out) is left alone.
        let row: Option<FeedbackRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO analytics.feedback (message_id, user_id, conversation_id, model, rating, comment)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (message_id) DO UPDATE
             SET rating = EXCLUDED.rating, comment = EXCLUDED.comment, model = EXCLUDED.model, updated_at = now()
             WHERE analytics.feedback.user_id = EXCLUDED.user_id
             RETURNING {COLUMNS}"
        )))
        .bind(message_id)
        .bind(user_id)
        .bind(conversation_id)
        .bind(&request.model)
        .bind(rating)
        .bind(request.comment.as_deref())
        .fetch_optional(self.database.primary())
        .await?;
        let row = row.ok_or_else(|| ServiceError::not_found("message"))?;
        metrics::counter!(crate::metrics::FEEDBACK, "model" => row.model.clone(), "rating" => rating).increment(1);
        Ok(row.into())
    }

    pub(crate) async fn get_feedback(&self, request: pb::GetFeedbackRequest) -> Result<pb::Feedback, ServiceError> {
        let message_id = uuid("message_id", &request.message_id)?;
        let user_id = uuid("user_id", &request.user_id)?;
        let row: Option<FeedbackRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM analytics.feedback WHERE message_id = $1 AND user_id = $2"
        )))
        .bind(message_id)
        .bind(user_id)
        .fetch_optional(self.database.primary())
        .await?;
        row.map(Into::into).ok_or_else(|| ServiceError::not_found("feedback"))
    }

    pub(crate) async fn remove_feedback(&self, request: pb::GetFeedbackRequest) -> Result<bool, ServiceError> {
        let message_id = uuid("message_id", &request.message_id)?;
        let user_id = uuid("user_id", &request.user_id)?;
        let removed = sqlx::query("DELETE FROM analytics.feedback WHERE message_id = $1 AND user_id = $2")
            .bind(message_id)
            .bind(user_id)
            .execute(self.database.primary())
            .await?
            .rows_affected();
        Ok(removed > 0)
    }

    pub(crate) async fn list_feedback(
        &self,
        request: pb::ListFeedbackRequest,
    ) -> Result<pb::ListFeedbackResponse, ServiceError> {
        let now = OffsetDateTime::now_utc();
        let to = time_or("to", request.to.as_ref(), now)?;
        let from = time_or("from", request.from.as_ref(), OffsetDateTime::UNIX_EPOCH)?;
        let after = self.cursors.read(CursorKind::Feedback, request.cursor.as_deref())?;
        let limit = page_size(request.limit);
        let mut rows: Vec<FeedbackRow> = self
            .database
            .read(ReadFloor::Any, |pool| {
                let model = request.model.clone();
                async move {
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT {COLUMNS} FROM analytics.feedback
                         WHERE updated_at >= $1 AND updated_at < $2 AND ($3::text IS NULL OR model = $3)
                           AND ($4::timestamptz IS NULL OR (updated_at, message_id) < ($4, $5))
                         ORDER BY updated_at DESC, message_id DESC LIMIT $6"
                    )))
                    .bind(from)
                    .bind(to)
                    .bind(model)
                    .bind(after.map(|position| position.at))
                    .bind(after.map(|position| position.id))
                    .bind(i64::from(limit) + 1)
                    .fetch_all(&pool)
                    .await
                }
            })
            .await?;
        let next_cursor = self.cursors.next_page(CursorKind::Feedback, &mut rows, limit, |last| Position {
            at: last.updated_at,
            id: last.message_id,
        });
        Ok(pb::ListFeedbackResponse { feedback: rows.into_iter().map(Into::into).collect(), next_cursor })
    }

    pub(crate) async fn feedback_summary(
        &self,
        request: pb::FeedbackSummaryRequest,
    ) -> Result<pb::FeedbackSummaryResponse, ServiceError> {
        let now = OffsetDateTime::now_utc();
        let to = time_or("to", request.to.as_ref(), now)?;
        let from = time_or("from", request.from.as_ref(), OffsetDateTime::UNIX_EPOCH)?;
        let rows: Vec<(String, i64, i64)> = self
            .database
            .read(ReadFloor::Any, |pool| async move {
                sqlx::query_as(
                    "SELECT model, count(*) FILTER (WHERE rating = 'up'), count(*) FILTER (WHERE rating = 'down')
                     FROM analytics.feedback WHERE updated_at >= $1 AND updated_at < $2
                     GROUP BY model ORDER BY model",
                )
                .bind(from)
                .bind(to)
                .fetch_all(&pool)
                .await
            })
            .await?;
        let models = rows.into_iter().map(|(model, up, down)| pb::ModelSatisfaction { model, up, down }).collect();
        Ok(pb::FeedbackSummaryResponse { models })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parley_platform::config::DatabaseConfig;
    use parley_platform::replicas::Database;
    use parley_platform::test_database::TestDatabase;

    use super::*;

    fn rating(
        message: Uuid,
        user: Uuid,
        model: &str,
        rating: pb::Rating,
        comment: Option<&str>,
    ) -> pb::SetFeedbackRequest {
        pb::SetFeedbackRequest {
            message_id: message.to_string(),
            user_id: user.to_string(),
            conversation_id: Uuid::now_v7().to_string(),
            model: model.to_owned(),
            rating: rating as i32,
            comment: comment.map(str::to_owned),
        }
    }

    fn key(message: Uuid, user: Uuid) -> pb::GetFeedbackRequest {
        pb::GetFeedbackRequest { message_id: message.to_string(), user_id: user.to_string() }
    }

    #[tokio::test]
    async fn ratings_are_set_changed_kept_from_others_exported_newest_first_and_summed_per_model() {
        let database = TestDatabase::create("parley_analytics_feedback").await.unwrap();
        let config = DatabaseConfig { url: database.url().to_owned(), ..DatabaseConfig::default() };
        let pools = Database::connect_lazy(&config).unwrap();
        crate::migrate(pools.primary()).await.unwrap();
        let service = AnalyticsService::new(Arc::new(pools), "a cursor secret for tests");
        let (ada, bob) = (Uuid::now_v7(), Uuid::now_v7());
        let (first, second) = (Uuid::now_v7(), Uuid::now_v7());

        service.set_feedback(rating(first, ada, "model-a", pb::Rating::Up, None)).await.unwrap();
        let changed =
            service.set_feedback(rating(first, ada, "model-a", pb::Rating::Down, Some("too long"))).await.unwrap();
        assert_eq!((changed.rating, changed.comment.as_deref()), (pb::Rating::Down as i32, Some("too long")));
        // Another user cannot take over (or change) a rating of the same reply.
        let taken = service.set_feedback(rating(first, bob, "model-a", pb::Rating::Up, None)).await.unwrap_err();
        assert_eq!(taken.code, parley_platform::ErrorCode::NotFound);
        assert_eq!(service.get_feedback(key(first, ada)).await.unwrap().rating, pb::Rating::Down as i32);
        assert_eq!(service.get_feedback(key(first, bob)).await.unwrap_err().code, parley_platform::ErrorCode::NotFound);
        service.set_feedback(rating(second, ada, "model-b", pb::Rating::Up, None)).await.unwrap();
        let unnamed = service.set_feedback(rating(Uuid::now_v7(), ada, "model-b", pb::Rating::Unspecified, None)).await;
        assert_eq!(unnamed.unwrap_err().code, parley_platform::ErrorCode::InvalidRequest);

        let summary = service.feedback_summary(pb::FeedbackSummaryRequest::default()).await.unwrap();
        let per_model: Vec<(&str, i64, i64)> =
            summary.models.iter().map(|model| (model.model.as_str(), model.up, model.down)).collect();
        assert_eq!(per_model, [("model-a", 0, 1), ("model-b", 1, 0)]);

        // The export, newest change first, a page at a time; one model's alone.
        let page = |cursor: Option<String>, model: Option<&str>| pb::ListFeedbackRequest {
            limit: 1,
            cursor,
            model: model.map(str::to_owned),
            ..Default::default()
        };
        let one = service.list_feedback(page(None, None)).await.unwrap();
        assert_eq!(one.feedback[0].message_id, second.to_string());
        let two = service.list_feedback(page(one.next_cursor.clone(), None)).await.unwrap();
        assert_eq!(two.feedback[0].message_id, first.to_string());
        assert_eq!(two.next_cursor, None);
        let of_a = service.list_feedback(page(None, Some("model-a"))).await.unwrap();
        assert_eq!((of_a.feedback.len(), of_a.next_cursor), (1, None));

        assert!(service.remove_feedback(key(first, ada)).await.unwrap());
        assert!(!service.remove_feedback(key(first, ada)).await.unwrap());
        assert_eq!(service.get_feedback(key(first, ada)).await.unwrap_err().code, parley_platform::ErrorCode::NotFound);
    }
}
