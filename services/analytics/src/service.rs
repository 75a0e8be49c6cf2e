//! `parley.analytics.v1.AnalyticsService`.

use parley_platform::{ServiceError, timestamps};
use parley_proto::analytics::v1 as pb;
use std::sync::Arc;

use parley_platform::replicas::{Database, ReadFloor};
use time::{Date, OffsetDateTime, Time, UtcOffset};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::AnalyticsError;

#[derive(Clone)]
pub struct AnalyticsService {
    pub(crate) database: Arc<Database>,
    pub(crate) cursors: parley_platform::cursor::CursorCodec,
}

impl AnalyticsService {
    /// `cursor_secret` signs the feedback export's cursors, as every list's (`chat.cursor_secret`).
    pub fn new(database: Arc<Database>, cursor_secret: &str) -> Self {
        Self { database, cursors: parley_platform::cursor::CursorCodec::new(cursor_secret) }
    }
}

#[derive(sqlx::FromRow)]
struct Row {
    key: String,
    input_tokens: i64,
    output_tokens: i64,
    requests: i64,
    cost_micros: i64,
}

impl From<Row> for pb::UsageRow {
    fn from(row: Row) -> Self {
        pb::UsageRow {
            key: row.key,
            input_tokens: row.input_tokens,
            output_tokens: row.output_tokens,
            requests: row.requests,
            cost_micros: row.cost_micros,
        }
    }
}

impl Row {
    fn total() -> Self {
        Row { key: "total".to_owned(), input_tokens: 0, output_tokens: 0, requests: 0, cost_micros: 0 }
    }
}

impl AnalyticsService {
    /// Usage in `[from, to)` grouped by `group_by`: whole UTC days from the daily rollup, the partial
    /// days at either end from the raw events. Read from a replica when one is in rotation (a report
    /// may trail the newest events by the replica's lag).
    async fn report(
        &self,
        group_by: pb::GroupBy,
        from: OffsetDateTime,
        to: OffsetDateTime,
        user_id: Option<Uuid>,
    ) -> Result<Vec<Row>, sqlx::Error> {
        let (event_key, rollup_key) = match group_by {
            pb::GroupBy::Model => ("model", "model"),
            pb::GroupBy::User => ("user_id::text", "user_id::text"),
            pb::GroupBy::Day | pb::GroupBy::Unspecified => {
                ("to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')", "to_char(day, 'YYYY-MM-DD')")
            }
        };
        let user_filter = if user_id.is_some() { "user_id = $7" } else { "$7::uuid IS NULL" };
        let text = format!(
            "SELECT key, SUM(input_tokens)::bigint AS input_tokens, SUM(output_tokens)::bigint AS output_tokens,
                    SUM(requests)::bigint AS requests, SUM(cost_micros)::bigint AS cost_micros
             FROM (
                 SELECT {event_key} AS key, input_tokens, output_tokens, 1::bigint AS requests, cost_micros
                 FROM analytics.usage_events
                 WHERE ((occurred_at >= $1 AND occurred_at < $2) OR (occurred_at >= $3 AND occurred_at < $4))
                   AND {user_filter}
                 UNION ALL
                 SELECT {rollup_key}, input_tokens, output_tokens, requests, cost_micros
                 FROM analytics.usage_daily WHERE day >= $5 AND day < $6 AND {user_filter}
             ) parts
             GROUP BY key ORDER BY key"
        );
        let split = DaySplit::of(from, to);
        self.database
            .read(ReadFloor::Any, |pool| {
                let text = text.clone();
                async move {
                    sqlx::query_as(sqlx::AssertSqlSafe(text))
                        .bind(split.head.0)
                        .bind(split.head.1)
                        .bind(split.tail.0)
                        .bind(split.tail.1)
                        .bind(split.days.0)
                        .bind(split.days.1)
                        .bind(user_id)
                        .fetch_all(&pool)
                        .await
                }
            })
            .await
    }
}

/// A time range cut into the whole UTC days it covers (`days`, end exclusive) and the partial days
/// before and after them (`head`, `tail`, end exclusive; empty ranges when there are none).
#[derive(Debug, Clone, Copy, PartialEq)]
struct DaySplit {
    head: (OffsetDateTime, OffsetDateTime),
    days: (Date, Date),
    tail: (OffsetDateTime, OffsetDateTime),
}

impl DaySplit {
    fn of(from: OffsetDateTime, to: OffsetDateTime) -> Self {
        let (from, to) = (from.to_offset(UtcOffset::UTC), to.to_offset(UtcOffset::UTC));
        let first_whole =
            if from.time() == Time::MIDNIGHT { from.date() } else { from.date().next_day().unwrap_or(Date::MAX) };
        let end_whole = to.date();
        if first_whole >= end_whole {
            return DaySplit { head: (from, to), days: (end_whole, end_whole), tail: (to, to) };
        }
        DaySplit {
            head: (from, first_whole.midnight().assume_utc()),
            days: (first_whole, end_whole),
            tail: (end_whole.midnight().assume_utc(), to),
        }
    }
}

#[tonic::async_trait]
impl pb::analytics_service_server::AnalyticsService for AnalyticsService {
    async fn get_usage(&self, request: Request<pb::GetUsageRequest>) -> Result<Response<pb::UsageReport>, Status> {
        let request = request.into_inner();
        let group_by = request.group_by();
        let user_id = match request.user_id.as_deref() {
            Some(id) => Some(
                Uuid::parse_str(id)
                    .map_err(|_| AnalyticsError::from(ServiceError::invalid_field("user_id", "must be a UUID")))?,
            ),
            None => None,
        };
        let from = request.from.as_ref().and_then(timestamps::from_proto);
        let to = request.to.as_ref().and_then(timestamps::from_proto);
        let (Some(from), Some(to)) = (from, to) else {
            return Err(AnalyticsError::from(ServiceError::invalid_field("from", "from and to are required")).into());
        };
        let rows = self.report(group_by, from, to, user_id).await.map_err(AnalyticsError::from)?;
        let totals = rows.iter().fold(Row::total(), |mut total, row| {
            total.input_tokens += row.input_tokens;
            total.output_tokens += row.output_tokens;
            total.requests += row.requests;
            total.cost_micros += row.cost_micros;
            total
        });
        Ok(Response::new(pb::UsageReport {
            rows: rows.into_iter().map(Into::into).collect(),
            totals: Some(totals.into()),
        }))
    }

    async fn erase_user(
        &self,
        request: Request<pb::EraseUserRequest>,
    ) -> Result<Response<pb::EraseUserResponse>, Status> {
        let user_id = Uuid::parse_str(&request.into_inner().user_id)
            .map_err(|_| AnalyticsError::from(ServiceError::invalid_field("user_id", "must be a UUID")))?;
        if user_id.is_nil() {
            return Err(AnalyticsError::from(ServiceError::invalid_field("user_id", "names no account")).into());
        }
        self.erase(user_id).await.map_err(AnalyticsError::from)?;
        tracing::info!(%user_id, "usage anonymised");
        Ok(Response::new(pb::EraseUserResponse {}))
    }

    async fn set_feedback(&self, request: Request<pb::SetFeedbackRequest>) -> Result<Response<pb::Feedback>, Status> {
        Ok(Response::new(self.set_feedback(request.into_inner()).await.map_err(AnalyticsError::from)?))
    }

    async fn get_feedback(&self, request: Request<pb::GetFeedbackRequest>) -> Result<Response<pb::Feedback>, Status> {
        Ok(Response::new(self.get_feedback(request.into_inner()).await.map_err(AnalyticsError::from)?))
    }

    async fn remove_feedback(
        &self,
        request: Request<pb::GetFeedbackRequest>,
    ) -> Result<Response<pb::RemoveFeedbackResponse>, Status> {
        let removed = self.remove_feedback(request.into_inner()).await.map_err(AnalyticsError::from)?;
        Ok(Response::new(pb::RemoveFeedbackResponse { removed }))
    }

    async fn list_feedback(
        &self,
        request: Request<pb::ListFeedbackRequest>,
    ) -> Result<Response<pb::ListFeedbackResponse>, Status> {
        Ok(Response::new(self.list_feedback(request.into_inner()).await.map_err(AnalyticsError::from)?))
    }

    async fn feedback_summary(
        &self,
        request: Request<pb::FeedbackSummaryRequest>,
    ) -> Result<Response<pb::FeedbackSummaryResponse>, Status> {
        Ok(Response::new(self.feedback_summary(request.into_inner()).await.map_err(AnalyticsError::from)?))
    }
}

/// Ingestion and erasure exclude each other through this transaction-level advisory lock (ingestion
/// shares it, an erasure holds it alone), so no batch that read the erased accounts before an erasure
/// commits its rows after it.
pub(crate) const ERASURE_LOCK: i64 = 0x5041_524c_4559_4552; // "PARLEYER"

impl AnalyticsService {
    /// Moves a deleted account's usage to the anonymous account and records it as erased, in one
    /// transaction.
    async fn erase(&self, user_id: Uuid) -> Result<(), sqlx::Error> {
        let mut tx = self.database.primary().begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(ERASURE_LOCK).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO analytics.erased_users (user_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE analytics.usage_events SET user_id = $2 WHERE user_id = $1")
            .bind(user_id)
            .bind(Uuid::nil())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO analytics.usage_daily AS d
                 (day, user_id, model, requests, input_tokens, output_tokens, cost_micros, cache_hits, failures)
             SELECT day, $2, model, requests, input_tokens, output_tokens, cost_micros, cache_hits, failures
             FROM analytics.usage_daily WHERE user_id = $1
             ON CONFLICT (day, user_id, model) DO UPDATE SET
                 requests = d.requests + EXCLUDED.requests,
                 input_tokens = d.input_tokens + EXCLUDED.input_tokens,
                 output_tokens = d.output_tokens + EXCLUDED.output_tokens,
                 cost_micros = d.cost_micros + EXCLUDED.cost_micros,
                 cache_hits = d.cache_hits + EXCLUDED.cache_hits,
                 failures = d.failures + EXCLUDED.failures",
        )
        .bind(user_id)
        .bind(Uuid::nil())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM analytics.usage_daily WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
        // Ratings carry the user's own words: erased, not anonymised.
        sqlx::query("DELETE FROM analytics.feedback WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM analytics.cost_alerts WHERE scope = 'user' AND user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn ranges_split_into_partial_and_whole_days() {
        let split = DaySplit::of(datetime!(2026-11-01 10:00 UTC), datetime!(2026-11-04 06:00 UTC));
        assert_eq!(split.head, (datetime!(2026-11-01 10:00 UTC), datetime!(2026-11-02 00:00 UTC)));
        assert_eq!(split.days, (time::macros::date!(2026 - 11 - 02), time::macros::date!(2026 - 11 - 04)));
        assert_eq!(split.tail, (datetime!(2026-11-04 00:00 UTC), datetime!(2026-11-04 06:00 UTC)));

        let aligned = DaySplit::of(datetime!(2026-11-01 00:00 UTC), datetime!(2026-11-03 00:00 UTC));
        assert_eq!(aligned.days, (time::macros::date!(2026 - 11 - 01), time::macros::date!(2026 - 11 - 03)));
        assert_eq!(aligned.head.0, aligned.head.1);
        assert_eq!(aligned.tail.0, aligned.tail.1);

        let within = DaySplit::of(datetime!(2026-11-01 10:00 UTC), datetime!(2026-11-01 12:00 UTC));
        assert_eq!(within.head, (datetime!(2026-11-01 10:00 UTC), datetime!(2026-11-01 12:00 UTC)));
        assert_eq!(within.days.0, within.days.1);
    }

    /// Whole days come from the daily rollups and the partial days at either end from the raw events,
    /// so each call in the range counts once, whatever the grouping, and none outside it.
    #[tokio::test]
    async fn a_report_counts_each_call_in_its_range_once_from_rollups_and_events() {
        let database = parley_platform::test_database::TestDatabase::create("parley_analytics_report").await.unwrap();
        let config = Arc::new(parley_platform::Config::default());
        let pools = Database::connect_lazy(&parley_platform::config::DatabaseConfig {
            url: database.url().to_owned(),
            ..Default::default()
        })
        .unwrap();
        crate::migrate(pools.primary()).await.unwrap();
        let nats = parley_platform::nats::connect(&config.nats, "analytics-report-test").await.unwrap();
        let ingester =
            crate::ingest::Ingester::new(config.clone(), pools.primary().clone(), async_nats::jetstream::new(nats));
        let (ada, bob) = (Uuid::now_v7(), Uuid::now_v7());
        let sample = crate::ingest::sample_event;
        let calls = [
            sample(ada, "model-a", datetime!(2026-11-01 10:00 UTC)), // before the range
            sample(ada, "model-a", datetime!(2026-11-01 14:00 UTC)), // its first, partial day
            sample(ada, "model-b", datetime!(2026-11-02 09:00 UTC)), // a whole day
            sample(bob, "model-a", datetime!(2026-11-02 23:59 UTC)), // a whole day, another user
            sample(ada, "model-a", datetime!(2026-11-03 05:00 UTC)), // its last, partial day
            sample(ada, "model-a", datetime!(2026-11-03 07:00 UTC)), // after the range
        ];
        assert_eq!(ingester.store(&calls.iter().collect::<Vec<_>>()).await.unwrap(), calls.len());
        let service = AnalyticsService::new(Arc::new(pools), "a cursor secret for tests");
        let (from, to) = (datetime!(2026-11-01 12:00 UTC), datetime!(2026-11-03 06:00 UTC));
        let requests = |rows: Vec<Row>| rows.into_iter().map(|row| (row.key, row.requests)).collect::<Vec<_>>();

        let by_day = requests(service.report(pb::GroupBy::Day, from, to, None).await.unwrap());
        assert_eq!(by_day, [("2026-11-01".to_owned(), 1), ("2026-11-02".to_owned(), 2), ("2026-11-03".to_owned(), 1)]);
        let by_model = requests(service.report(pb::GroupBy::Model, from, to, Some(ada)).await.unwrap());
        assert_eq!(by_model, [("model-a".to_owned(), 2), ("model-b".to_owned(), 1)]);
        let by_user = requests(service.report(pb::GroupBy::User, from, to, None).await.unwrap());
        let mut expected = [(ada.to_string(), 3), (bob.to_string(), 1)];
        expected.sort();
        assert_eq!(by_user, expected);
        let tokens = service.report(pb::GroupBy::Model, from, to, Some(bob)).await.unwrap();
        assert_eq!((tokens[0].input_tokens, tokens[0].output_tokens), (1_000, 10));
    }
}
