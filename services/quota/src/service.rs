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
use crate::ledger::{Charge, Ledger};
use crate::reserve::{Keys, Reserved, Reserver, count_rejection, month_end, window};

#[derive(Clone)]
pub struct QuotaService {
    config: Arc<Config>,
    pool: PgPool,
    ledger: Ledger,
    redis: ConnectionManager,
    charge_script: Arc<redis::Script>,
    scripts: Arc<Scripts>,
    reserver: Arc<Reserver>,
}

struct Scripts {
    settle: redis::Script,
    held: redis::Script,
}

impl QuotaService {
    pub fn new(config: Arc<Config>, pool: PgPool, redis: ConnectionManager) -> Self {
        let scripts = Scripts {
            settle: redis::Script::new(budget::SETTLE_SCRIPT),
            held: redis::Script::new(budget::HELD_SCRIPT),
        };
        Self {
            reserver: Arc::new(Reserver::new(config.clone())),
            config,
            ledger: Ledger::start(pool.clone()),
            pool,
            redis,
            charge_script: Arc::new(redis::Script::new(CHARGE_SCRIPT)),
            scripts: Arc::new(scripts),
        }
    }

    /// Writes a charge to the ledger; false when a charge with this reference was already recorded.
    async fn record_charge(
        &self,
        reference_id: &str,
        user_id: Uuid,
        day: Date,
        tokens: i64,
    ) -> Result<bool, QuotaError> {
        let charge = Charge { reference_id: reference_id.to_owned(), user_id, day, tokens };
        Ok(self.ledger.record(charge).await?)
    }

    /// Settles a reservation with the tokens actually used: charges them (once per reservation id)
    /// and releases the reservation. True when this charge is new.
    pub(crate) async fn settle_reservation(
        &self,
        user_id: Uuid,
        reservation_id: &str,
        tokens: i64,
    ) -> Result<bool, QuotaError> {
        let day = budget::current_day(OffsetDateTime::now_utc());
        let charged = tokens > 0 && self.record_charge(reservation_id, user_id, day, tokens).await?;
        let keys = self.keys(user_id, day);
        let mut redis = self.redis.clone();
        let mut invocation = keys.invocation(&self.scripts.settle);
        invocation.arg(reservation_id).arg(tokens).arg(if charged { "1" } else { "0" });
        if let Err(error) = invocation.invoke_async::<i64>(&mut redis).await {
            // The ledger has the charge; counters are rebuilt from it, and the reservation expires.
            tracing::warn!(%error, "redis unavailable; settlement recorded in the ledger only");
        }
        if charged {
            metrics::counter!(crate::metrics::TOKENS_CHARGED).increment(tokens as u64);
        }
        Ok(charged)
    }

    /// Charges tokens with no reservation, once per reference id. True when this charge is new.
    pub(crate) async fn charge_reference(
        &self,
        user_id: Uuid,
        reference_id: &str,
        tokens: i64,
    ) -> Result<bool, QuotaError> {
        let day = budget::current_day(OffsetDateTime::now_utc());
        let inserted = self.record_charge(reference_id, user_id, day, tokens).await?;
        if inserted {
            // Both budgets: a charge counts against the day and the month.
            let keys = self.keys(user_id, day);
            let mut redis = self.redis.clone();
            let counted: Result<i64, _> =
                self.charge_script.key(&keys.day).key(&keys.month).arg(tokens).invoke_async(&mut redis).await;
            if let Err(error) = counted {
                // The ledger has the charge; the counter is rebuilt from it when Redis answers again.
                tracing::warn!(%error, "redis unavailable; charge recorded in the ledger only");
            }
            metrics::counter!(crate::metrics::TOKENS_CHARGED).increment(tokens as u64);
        }
        Ok(inserted)
    }

    fn keys(&self, user_id: Uuid, day: Date) -> Keys {
        self.reserver.keys(user_id, day)
    }

    /// Erases a deleted account's ledger, then its counters and reservations in Redis (found by
    /// their common prefix). A counter a late settlement writes afterwards expires with its window.
    async fn erase(&self, user_id: Uuid) -> Result<(), QuotaError> {
        sqlx::query("DELETE FROM quota.ledger WHERE user_id = $1").bind(user_id).execute(&self.pool).await?;
        let pattern = format!("{}:quota:{user_id}:*", self.config.redis.key_prefix);
        let mut redis = self.redis.clone();
        let keys: Vec<String> = {
            let mut found = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut redis)
                    .await
                    .map_err(|error| QuotaError::Redis(error.to_string()))?;
                found.extend(page);
                if next == 0 {
                    break found;
                }
                cursor = next;
            }
        };
        if !keys.is_empty() {
            let _deleted: i64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut redis)
                .await
                .map_err(|error| QuotaError::Redis(error.to_string()))?;
        }
        Ok(())
    }

    fn monthly_limit(&self, tier: &str) -> Option<i64> {
        self.reserver.monthly_limit(tier)
    }

    async fn ledger_month_total(&self, user_id: Uuid, day: Date) -> Result<i64, sqlx::Error> {
        let (first, next) = budget::month_bounds(day);
        let (total,): (Option<i64>,) = sqlx::query_as(
            "SELECT SUM(tokens)::bigint FROM quota.ledger WHERE user_id = $1 AND day >= $2 AND day < $3",
        )
        .bind(user_id)
        .bind(first)
        .bind(next)
        .fetch_one(&self.pool)
        .await?;
        Ok(total.unwrap_or(0))
    }

    /// Rebuilds missing day and month counters from the ledger (`SET NX`: a counter another replica
    /// rebuilt meanwhile is kept).
    async fn rebuild_counters(&self, keys: &Keys, user_id: Uuid, day: Date) -> Result<(), QuotaError> {
        let day_total = self.ledger_total(user_id, day).await?;
        let month_total = self.ledger_month_total(user_id, day).await?;
        let mut redis = self.redis.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(&keys.day).arg(day_total).arg("NX").arg("EX").arg(COUNTER_TTL_SECS).ignore();
        pipe.cmd("SET")
            .arg(&keys.month)
            .arg(month_total)
            .arg("NX")
            .arg("EX")
            .arg(budget::MONTH_COUNTER_TTL_SECS)
            .ignore();
        let rebuilt: Result<(), redis::RedisError> = pipe.query_async(&mut redis).await;
        rebuilt.map_err(|error| QuotaError::Redis(error.to_string()))?;
        metrics::counter!(crate::metrics::COUNTER_REBUILDS).increment(1);
        Ok(())
    }

    /// Without Redis: the ledger's totals, against a conservative share of each budget (reservations
    /// held elsewhere cannot be seen, so part of the budget is kept back).
    async fn degraded_budget(&self, user_id: Uuid, tier: &str, day: Date) -> Result<pb::Budget, QuotaError> {
        metrics::counter!(crate::metrics::DEGRADED_CHECKS).increment(1);
        let now = OffsetDateTime::now_utc();
        let day_used = self.ledger_total(user_id, day).await?;
        let month_used = self.ledger_month_total(user_id, day).await?;
        let conservative = |limit: i64| (limit as f64 * DEGRADED_SHARE) as i64;
        let day_window = window(conservative(self.daily_limit(tier)), day_used, 0, budget::window_end(now));
        let month_window =
            self.monthly_limit(tier).map(|limit| window(conservative(limit), month_used, 0, month_end(day)));
        Ok(pb::Budget { day: Some(day_window), month: month_window, degraded: true })
    }

    fn daily_limit(&self, tier: &str) -> i64 {
        self.reserver.daily_limit(tier)
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
}

fn parse_uuid(field: &str, value: &str) -> Result<Uuid, QuotaError> {
    Uuid::parse_str(value).map_err(|_| ServiceError::invalid_field(field, "must be a UUID").into())
}

fn parse_user(user_id: &str) -> Result<Uuid, QuotaError> {
    Uuid::parse_str(user_id).map_err(|_| ServiceError::invalid_field("user_id", "must be a UUID").into())
}

#[tonic::async_trait]
impl pb::quota_service_server::QuotaService for QuotaService {
    async fn reserve(&self, request: Request<pb::ReserveRequest>) -> Result<Response<pb::Reservation>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        parse_uuid("reservation_id", &request.reservation_id)?;
        if request.tokens < 0 {
            return Err(QuotaError::from(ServiceError::invalid_field("tokens", "cannot be negative")).into());
        }
        let day = budget::current_day(OffsetDateTime::now_utc());
        let mut attempt = 0;
        let decided = loop {
            attempt += 1;
            let mut redis = self.redis.clone();
            let reserved = self
                .reserver
                .reserve(&mut redis, user_id, &request.tier, &request.reservation_id, request.tokens)
                .await;
            match reserved {
                Ok(Reserved::Decided(reservation)) => break Some(reservation),
                Ok(Reserved::CountersMissing) if attempt == 1 => {
                    self.rebuild_counters(&self.keys(user_id, day), user_id, day).await?;
                }
                Ok(Reserved::CountersMissing) => {
                    tracing::warn!("budget counters vanished again after a rebuild; answering from the ledger");
                    break None;
                }
                Err(error) => {
                    tracing::warn!(%error, "redis unavailable; budgets answered from the ledger, conservatively");
                    break None;
                }
            }
        };
        let reservation = match decided {
            Some(reservation) => reservation,
            None => {
                let budget = self.degraded_budget(user_id, &request.tier, day).await?;
                let fits =
                    |window: &Option<pb::Window>| window.as_ref().is_none_or(|w| w.used + request.tokens <= w.limit);
                let granted = fits(&budget.day) && fits(&budget.month);
                let retry_at = budget.day.as_ref().map_or(0, |window| window.resets_at);
                if !granted {
                    count_rejection(&request.tier);
                }
                pb::Reservation { granted, budget: Some(budget), retry_at }
            }
        };
        Ok(Response::new(reservation))
    }

    async fn settle(&self, request: Request<pb::SettleRequest>) -> Result<Response<pb::SettleResponse>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        parse_uuid("reservation_id", &request.reservation_id)?;
        if request.tokens < 0 {
            return Err(QuotaError::from(ServiceError::invalid_field("tokens", "cannot be negative")).into());
        }
        let charged = self.settle_reservation(user_id, &request.reservation_id, request.tokens).await?;
        Ok(Response::new(pb::SettleResponse { charged }))
    }

    async fn erase_user(
        &self,
        request: Request<pb::EraseUserRequest>,
    ) -> Result<Response<pb::EraseUserResponse>, Status> {
        let user_id = parse_user(&request.into_inner().user_id)?;
        self.erase(user_id).await?;
        tracing::info!(%user_id, "ledger and counters erased");
        Ok(Response::new(pb::EraseUserResponse {}))
    }

    async fn get_budget(&self, request: Request<pb::GetBudgetRequest>) -> Result<Response<pb::Budget>, Status> {
        let request = request.into_inner();
        let user_id = parse_user(&request.user_id)?;
        let now = OffsetDateTime::now_utc();
        let day = budget::current_day(now);
        let keys = self.keys(user_id, day);
        let mut redis = self.redis.clone();
        let read: Result<(Option<i64>, Option<i64>), redis::RedisError> =
            redis::cmd("MGET").arg(&keys.day).arg(&keys.month).query_async(&mut redis).await;
        let (day_used, month_used) = match read {
            Ok((Some(day_used), Some(month_used))) => (day_used, month_used),
            Ok(_) => {
                self.rebuild_counters(&keys, user_id, day).await?;
                (
                    self.ledger_total(user_id, day).await.map_err(QuotaError::from)?,
                    self.ledger_month_total(user_id, day).await.map_err(QuotaError::from)?,
                )
            }
            Err(_) => return Ok(Response::new(self.degraded_budget(user_id, &request.tier, day).await?)),
        };
        let held = keys.invocation(&self.scripts.held).invoke_async::<i64>(&mut redis).await.unwrap_or(0);
        let day_window = window(self.daily_limit(&request.tier), day_used, held, budget::window_end(now));
        let month_window =
            self.monthly_limit(&request.tier).map(|limit| window(limit, month_used, held, month_end(day)));
        Ok(Response::new(pb::Budget { day: Some(day_window), month: month_window, degraded: false }))
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
        let charged = self.charge_reference(user_id, &request.reference_id, request.tokens).await?;
        Ok(Response::new(pb::ChargeResponse { charged }))
    }
}

#[cfg(test)]
mod tests {
    use parley_platform::test_database::TestDatabase;
    use time::macros::date;

    use super::*;

    /// The ledger's totals (by day, by calendar month) that budgets fall back on without Redis, and an
    /// account's erasure, which takes its ledger and its Redis keys and nobody else's.
    #[tokio::test]
    async fn ledger_totals_count_a_day_and_a_month_and_erasure_takes_only_the_account() {
        let database = TestDatabase::create("parley_quota_service").await.unwrap();
        let pool = PgPool::connect(database.url()).await.unwrap();
        crate::migrate(&pool).await.unwrap();
        let mut config = Config::default();
        config.redis.key_prefix = format!("quota-test-{}", Uuid::now_v7().simple());
        let client = redis::Client::open(config.redis.url.as_str()).unwrap();
        let redis = ConnectionManager::new(client).await.unwrap();
        let service = QuotaService::new(Arc::new(config.clone()), pool.clone(), redis.clone());
        let (ada, bob) = (Uuid::now_v7(), Uuid::now_v7());
        let charges = [
            ("a1", ada, date!(2026 - 10 - 31), 1_000),
            ("a2", ada, date!(2026 - 11 - 01), 200),
            ("a3", ada, date!(2026 - 11 - 01), 30),
            ("a4", ada, date!(2026 - 11 - 28), 4),
            ("b1", bob, date!(2026 - 11 - 01), 50_000),
        ];
        for (reference, user, day, tokens) in charges {
            assert!(service.record_charge(reference, user, day, tokens).await.unwrap());
        }
        assert!(!service.record_charge("a2", ada, date!(2026 - 11 - 01), 200).await.unwrap(), "recorded once");
        assert_eq!(service.ledger_total(ada, date!(2026 - 11 - 01)).await.unwrap(), 230);
        assert_eq!(service.ledger_month_total(ada, date!(2026 - 11 - 15)).await.unwrap(), 234);
        assert_eq!(service.ledger_month_total(ada, date!(2026 - 10 - 01)).await.unwrap(), 1_000);
        assert_eq!(service.ledger_total(Uuid::now_v7(), date!(2026 - 11 - 01)).await.unwrap(), 0);
        let budget = service.degraded_budget(ada, "free", date!(2026 - 11 - 01)).await.unwrap();
        assert!(budget.degraded);
        assert_eq!(budget.day.unwrap().used, 230);

        let prefix = &config.redis.key_prefix;
        let mut connection = redis.clone();
        for user in [ada, bob] {
            let _: () = redis::cmd("SET")
                .arg(format!("{prefix}:quota:{user}:day"))
                .arg(1)
                .query_async(&mut connection)
                .await
                .unwrap();
        }
        service.erase(ada).await.unwrap();
        let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM quota.ledger").fetch_one(&pool).await.unwrap();
        assert_eq!(left, 1, "only bob's charge is left");
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut connection).await.unwrap();
        assert_eq!(keys, [format!("{prefix}:quota:{bob}:day")]);
        let _: () = redis::cmd("DEL").arg(keys).query_async(&mut connection).await.unwrap();
    }
}
