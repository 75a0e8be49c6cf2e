//! `parley.analytics.v1.AnalyticsService`.

use parley_platform::{ServiceError, timestamps};
use parley_proto::analytics::v1 as pb;
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::AnalyticsError;

#[derive(Clone)]
pub struct AnalyticsService {
    pool: PgPool,
}

impl AnalyticsService {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
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
        let key = match group_by {
            pb::GroupBy::Model => "model",
            pb::GroupBy::User => "user_id::text",
            pb::GroupBy::Day | pb::GroupBy::Unspecified => "to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        };
        let aggregates = "COALESCE(SUM(input_tokens), 0)::bigint AS input_tokens,
                          COALESCE(SUM(output_tokens), 0)::bigint AS output_tokens,
                          COUNT(*)::bigint AS requests,
                          COALESCE(SUM(cost_micros), 0)::bigint AS cost_micros";
        let filter = "occurred_at >= $1 AND occurred_at < $2 AND ($3::uuid IS NULL OR user_id = $3)";
        let grouped = format!(
            "SELECT {key} AS key, {aggregates} FROM analytics.usage_events WHERE {filter} GROUP BY 1 ORDER BY 1"
        );
        let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(grouped))
            .bind(from)
            .bind(to)
            .bind(user_id)
            .fetch_all(&self.pool)
            .await
            .map_err(AnalyticsError::from)?;
        let totals_sql = format!("SELECT 'total' AS key, {aggregates} FROM analytics.usage_events WHERE {filter}");
        let totals: Row = sqlx::query_as(sqlx::AssertSqlSafe(totals_sql))
            .bind(from)
            .bind(to)
            .bind(user_id)
            .fetch_one(&self.pool)
            .await
            .map_err(AnalyticsError::from)?;
        Ok(Response::new(pb::UsageReport {
            rows: rows.into_iter().map(Into::into).collect(),
            totals: Some(totals.into()),
        }))
    }
}
