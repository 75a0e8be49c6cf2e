//! `parley.quota.v1.QuotaService`.

use std::sync::Arc;

use parley_platform::{Config, ServiceError};
use parley_proto::quota::v1 as pb;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use time::{Date, OffsetDateTime};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::QuotaError;
use crate::budget::{self, CHARGE_SCRIPT, COUNTER_TTL_SECS, DEGRADED_SHARE};

#[derive(Clone)]
pub struct QuotaService {
    config: Arc<Config>,
    pool: PgPool,
    redis: ConnectionManager,
    charge_script: Arc<redis::Script>,
}

impl QuotaService {
    pub fn new(config: Arc<Config>, pool: PgPool, redis: ConnectionManager) -> Self {
        Self { config, pool, redis, charge_script: Arc::new(redis::Script::new(CHARGE_SCRIPT)) }
    }

    fn daily_limit(&self, tier: &str) -> i64 {
        match self.config.tier(tier) {
            Some(tier) => tier.tokens_per_day,
            None => {
                tracing::warn!(tier, "unknown tier; using the default tier's budget");
                self.config.tier(parley_platform::config::DEFAULT_TIER).map_or(0, |tier| tier.tokens_per_day)
            }
        }
    }

    async fn ledger_total(&self, user_id: Uuid, day: Date) -> Result<i64, sqlx::Error> {
        let (total,): (Option<i64>,) =
            sqlx::query_as("SELECT SUM(tokens)::bigint FROM quota.ledger WHERE user_id = $1 AND day = $2")
                .bind(user_id)
                .bind(day)
                .fetch_one(&self.pool)
                .await?;
        Ok(total.unwrap_or(0))
    }

    /// Tokens used today from Redis, rebuilding the counter from the ledger when Redis has none.
    async fn used_from_redis(
        &self,
        key: &str,
        user_id: Uuid,
        day: Date,
    ) -> Result<Result<i64, redis::RedisError>, sqlx::Error> {
        let mut redis = self.redis.clone();
        let cached: Option<i64> = match redis::cmd("GET").arg(key).query_async(&mut redis).await {
            Ok(value) => value,
            Err(error) => return Ok(Err(error)),
        };
        if let Some(used) = cached {
            return Ok(Ok(used));
        }
        let total = self.ledger_total(user_id, day).await?;
        let stored: Result<(), redis::RedisError> = redis::cmd("SET")
            .arg(key)
            .arg(total)
            .arg("NX")
            .arg("EX")
            .arg(COUNTER_TTL_SECS)
            .query_async(&mut redis)
            .await;
        if let Err(error) = stored {
            return Ok(Err(error));
        }
        metrics::counter!("parley_quota_counter_rebuilds_total").increment(1);
        Ok(Ok(total))
    }
}

fn parse_user(user_id: &str) -> Result<Uuid, QuotaError> {
    Uuid::parse_str(user_id).map_err(|_| ServiceError::invalid_field("user_id", "must be a UUID").into())
}

#[tonic::async_trait]
impl pb::quota_service_server::QuotaService for QuotaService {
    async fn check_budget(
        &self,
        request: Request<pb::CheckBudgetRequest>,
    ) -> Result<Response<pb::BudgetStatus>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let now = OffsetDateTime::now_utc();
        let day = budget::current_day(now);
        let key = budget::counter_key(&self.config.redis.key_prefix, user_id, day);
        let limit = self.daily_limit(&request.tier);
        let (used, effective_limit) = match self.used_from_redis(&key, user_id, day).await.map_err(QuotaError::from)? {
            Ok(used) => (used, limit),
            Err(error) => {
                tracing::warn!(%error, "redis unavailable; answering budgets from the ledger, conservatively");
                metrics::counter!("parley_quota_degraded_checks_total").increment(1);
                let used = self.ledger_total(user_id, day).await.map_err(QuotaError::from)?;
                (used, (limit as f64 * DEGRADED_SHARE) as i64)
            }
        };
        let allowed = budget::allows(used, request.estimated_tokens, effective_limit);
        if !allowed {
            metrics::counter!("parley_quota_rejections_total", "tier" => request.tier.clone()).increment(1);
        }
        Ok(Response::new(pb::BudgetStatus {
            allowed,
            limit,
            used,
            remaining: (limit - used).max(0),
            resets_at: budget::window_end(now),
        }))
    }

    async fn charge(&self, request: Request<pb::ChargeRequest>) -> Result<Response<pb::ChargeResponse>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        if request.tokens < 0 {
            return Err(QuotaError::from(ServiceError::invalid_field("tokens", "cannot be negative")).into());
        }
        if request.reference_id.is_empty() {
            return Err(QuotaError::from(ServiceError::invalid_field("reference_id", "is required")).into());
        }
        let day = budget::current_day(OffsetDateTime::now_utc());
        let inserted = sqlx::query(
            "INSERT INTO quota.ledger (reference_id, user_id, day, tokens) VALUES ($1, $2, $3, $4)
             ON CONFLICT (reference_id) DO NOTHING",
        )
        .bind(&request.reference_id)
        .bind(user_id)
        .bind(day)
        .bind(request.tokens)
        .execute(&self.pool)
        .await
        .map_err(QuotaError::from)?
        .rows_affected()
            == 1;
        if inserted {
            let key = budget::counter_key(&self.config.redis.key_prefix, user_id, day);
            let mut redis = self.redis.clone();
            let counted: Result<i64, _> =
                self.charge_script.key(&key).arg(request.tokens).invoke_async(&mut redis).await;
            if let Err(error) = counted {
                // The ledger has the charge; the counter is rebuilt from it when Redis answers again.
                tracing::warn!(%error, "redis unavailable; charge recorded in the ledger only");
            }
            metrics::counter!("parley_quota_tokens_charged_total").increment(request.tokens as u64);
        }
        Ok(Response::new(pb::ChargeResponse { charged: inserted }))
    }
}
