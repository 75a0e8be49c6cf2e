//! A budget reservation's hot path: one Redis script over the user's day and month counters and their
//! held reservations, which grants the tokens or says why not.
//!
//! The quota service's `Reserve` runs it, and so does the gateway itself before a send or a completion:
//! that saves a gRPC round trip to quota on every request, which a profile showed costing more than the
//! reservation's own work. The counters, their keys and the script stay this crate's; the gateway only
//! calls this type. What Redis cannot decide alone goes to the quota service, which owns the rest: a
//! missing counter (rebuilt from the ledger) and an unreachable Redis (the ledger answers,
//! conservatively).

use std::sync::Arc;

use parley_platform::Config;
use parley_platform::config::DEFAULT_TIER;
use parley_proto::quota::v1 as pb;
use redis::aio::ConnectionManager;
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use crate::budget;

/// What the script said.
#[derive(Debug)]
pub enum Reserved {
    /// Granted or refused, with the budget as it stands.
    Decided(pb::Reservation),
    /// The day's or the month's counter is not in Redis: it must be rebuilt from the ledger first.
    CountersMissing,
}

/// The Redis keys of one user's budgets on one day.
pub(crate) struct Keys {
    pub(crate) day: String,
    pub(crate) month: String,
    pub(crate) reserved: String,
    pub(crate) reserved_until: String,
    pub(crate) reserved_total: String,
}

/// How long a caller outside the quota service waits for Redis before asking the quota service.
pub const QUICKLY: std::time::Duration = std::time::Duration::from_millis(250);

/// Redis failed to answer a reservation, or answered too late.
#[derive(Debug)]
pub struct RedisFailed;

impl Keys {
    /// `script` over these keys, in the order every budget script takes them.
    pub(crate) fn invocation<'a>(&self, script: &'a redis::Script) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.key(&self.day);
        invocation.key(&self.month).key(&self.reserved).key(&self.reserved_until).key(&self.reserved_total);
        invocation
    }
}

pub struct Reserver {
    config: Arc<Config>,
    script: redis::Script,
}

/// One reservation's keys and arguments, and how to read what the script said of it.
pub struct ReserveRequest {
    keys: Keys,
    tier: String,
    reservation_id: String,
    tokens: i64,
    day_limit: i64,
    month_limit: Option<i64>,
    ttl_ms: u64,
    now: OffsetDateTime,
    day: Date,
}

impl ReserveRequest {
    /// `script` with this reservation's keys (KEYS[1] to KEYS[5]) and arguments (ARGV[1] to ARGV[5]), the
    /// ones [`RESERVE_SCRIPT`](budget::RESERVE_SCRIPT) reads; a script that embeds it
    /// ([`reserve_function`]) takes its own keys and arguments after them.
    pub fn invocation<'a>(&self, script: &'a redis::Script) -> redis::ScriptInvocation<'a> {
        let mut invocation = self.keys.invocation(script);
        invocation
            .arg(&self.reservation_id)
            .arg(self.tokens)
            .arg(self.day_limit)
            .arg(self.month_limit.unwrap_or(-1))
            .arg(self.ttl_ms);
        invocation
    }

    /// What the script's {granted, day used, month used, held} mean for this reservation. Refusals
    /// are counted in `parley_quota_rejections_total`.
    pub fn decide(self, (granted, day_used, month_used, held): (i64, i64, i64, i64)) -> Reserved {
        if granted == -1 {
            return Reserved::CountersMissing;
        }
        let day_window = window(self.day_limit, day_used, held, budget::window_end(self.now));
        let month_window = self.month_limit.map(|limit| window(limit, month_used, held, month_end(self.day)));
        let retry_at = match &month_window {
            Some(month) if month.used + month.reserved + self.tokens > month.limit => month.resets_at,
            _ => day_window.resets_at,
        };
        let reservation = pb::Reservation {
            granted: granted == 1,
            budget: Some(pb::Budget { day: Some(day_window), month: month_window, degraded: false }),
            retry_at,
        };
        if !reservation.granted {
            count_rejection(&self.tier);
        }
        Reserved::Decided(reservation)
    }
}

/// [`RESERVE_SCRIPT`](budget::RESERVE_SCRIPT) as a Lua function, `reserve()`, for a script that runs
/// checks of its own around it in the same round trip (the gateway's rate limit): it reads KEYS[1] to
/// KEYS[5] and ARGV[1] to ARGV[5] ([`ReserveRequest::invocation`]) and returns the script's answer.
pub fn reserve_function() -> String {
    format!("local function reserve()\n{}\nend\n", budget::RESERVE_SCRIPT)
}

impl Reserver {
    pub fn new(config: Arc<Config>) -> Self {
        Self { config, script: redis::Script::new(budget::RESERVE_SCRIPT) }
    }

    /// Reserves `tokens` of the user's budget under `reservation_id` (idempotent by that id), against
    /// the tier's daily and monthly limits. Refusals are counted in `parley_quota_rejections_total`.
    pub async fn reserve(
        &self,
        redis: &mut ConnectionManager,
        user_id: Uuid,
        tier: &str,
        reservation_id: &str,
        tokens: i64,
    ) -> Result<Reserved, redis::RedisError> {
        let request = self.request(user_id, tier, reservation_id, tokens);
        let said = request.invocation(&self.script).invoke_async::<(i64, i64, i64, i64)>(redis).await?;
        Ok(request.decide(said))
    }

    /// A reservation to make with [`RESERVE_SCRIPT`](budget::RESERVE_SCRIPT), or with a script that
    /// runs it after checks of its caller's own ([`ReserveRequest::invocation`]).
    pub fn request(&self, user_id: Uuid, tier: &str, reservation_id: &str, tokens: i64) -> ReserveRequest {
        let now = OffsetDateTime::now_utc();
        let day = budget::current_day(now);
        ReserveRequest {
            keys: self.keys(user_id, day),
            tier: tier.to_owned(),
            reservation_id: reservation_id.to_owned(),
            tokens,
            day_limit: self.daily_limit(tier),
            month_limit: self.monthly_limit(tier),
            ttl_ms: self.config.quota.reservation_ttl_secs.max(1) * 1000,
            now,
            day,
        }
    }

    /// [`Reserver::reserve`] for a caller outside the quota service, which asks the quota service
    /// whenever this returns no reservation: `Ok(None)` when the counters must be rebuilt first, and
    /// `Err` when Redis failed or took longer than [`QUICKLY`] (a reservation the script made meanwhile
    /// is not doubled: the quota service's is idempotent by the same id).
    pub async fn reserve_quickly(
        &self,
        redis: &mut ConnectionManager,
        user_id: Uuid,
        tier: &str,
        reservation_id: &str,
        tokens: i64,
    ) -> Result<Option<pb::Reservation>, RedisFailed> {
        match self.reserve_requested(redis, self.request(user_id, tier, reservation_id, tokens)).await? {
            Reserved::Decided(reservation) => Ok(Some(reservation)),
            Reserved::CountersMissing => Ok(None),
        }
    }

    /// [`Reserver::reserve`] of a prepared request, for a caller outside the quota service: `Err` when
    /// Redis failed or took longer than [`QUICKLY`].
    pub async fn reserve_requested(
        &self,
        redis: &mut ConnectionManager,
        request: ReserveRequest,
    ) -> Result<Reserved, RedisFailed> {
        let invocation = request.invocation(&self.script);
        match tokio::time::timeout(QUICKLY, invocation.invoke_async::<(i64, i64, i64, i64)>(redis)).await {
            Ok(Ok(said)) => Ok(request.decide(said)),
            Ok(Err(_)) | Err(_) => Err(RedisFailed),
        }
    }

    pub(crate) fn keys(&self, user_id: Uuid, day: Date) -> Keys {
        let prefix = &self.config.redis.key_prefix;
        let (reserved, reserved_until, reserved_total) = budget::reservation_keys(prefix, user_id);
        Keys {
            day: budget::counter_key(prefix, user_id, day),
            month: budget::month_key(prefix, user_id, day),
            reserved,
            reserved_until,
            reserved_total,
        }
    }

    pub(crate) fn daily_limit(&self, tier: &str) -> i64 {
        match self.config.tier(tier) {
            Some(tier) => tier.tokens_per_day,
            None => {
                tracing::warn!(tier, "unknown tier; using the default tier's budget");
                self.config.tier(DEFAULT_TIER).map_or(0, |tier| tier.tokens_per_day)
            }
        }
    }

    pub(crate) fn monthly_limit(&self, tier: &str) -> Option<i64> {
        self.config.tier(tier).or_else(|| self.config.tier(DEFAULT_TIER)).and_then(|tier| tier.tokens_per_month)
    }
}

/// A reservation refused for lack of budget.
pub(crate) fn count_rejection(tier: &str) {
    metrics::counter!(crate::metrics::REJECTIONS, "tier" => tier.to_owned()).increment(1);
}

pub(crate) fn window(limit: i64, used: i64, reserved: i64, resets_at: i64) -> pb::Window {
    pb::Window { limit, used, reserved, remaining: (limit - used - reserved).max(0), resets_at }
}

pub(crate) fn month_end(day: Date) -> i64 {
    let (_, next) = budget::month_bounds(day);
    next.with_time(time::Time::MIDNIGHT).assume_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reserver with a key prefix of its own, on this machine's Redis.
    async fn reserver() -> (Reserver, ConnectionManager, Keys, Uuid) {
        let mut config = Config::default();
        config.redis.key_prefix = format!("reserve-test-{}", Uuid::now_v7().simple());
        let reserver = Reserver::new(Arc::new(config));
        let mut redis = parley_platform::redis_pool::connect("redis://127.0.0.1:6379").await.expect("Redis");
        let user = Uuid::now_v7();
        let keys = reserver.keys(user, budget::current_day(OffsetDateTime::now_utc()));
        let _: () = redis::pipe().set(&keys.day, 0).set(&keys.month, 0).query_async(&mut redis).await.unwrap();
        (reserver, redis, keys, user)
    }

    async fn reserve(reserver: &Reserver, redis: &mut ConnectionManager, user: Uuid, id: &str, tokens: i64) -> i64 {
        match reserver.reserve(redis, user, "free", id, tokens).await.unwrap() {
            Reserved::Decided(reservation) => {
                assert!(reservation.granted, "{id}");
                reservation.budget.unwrap().day.unwrap().reserved
            }
            Reserved::CountersMissing => panic!("the counters were set"),
        }
    }

    async fn held(keys: &Keys, redis: &mut ConnectionManager) -> i64 {
        keys.invocation(&redis::Script::new(budget::HELD_SCRIPT)).invoke_async(redis).await.unwrap()
    }

    async fn settle(keys: &Keys, redis: &mut ConnectionManager, id: &str) {
        let script = redis::Script::new(budget::SETTLE_SCRIPT);
        let mut invocation = keys.invocation(&script);
        invocation.arg(id).arg(0).arg("0");
        let _: i64 = invocation.invoke_async(redis).await.unwrap();
    }

    #[tokio::test]
    async fn the_running_total_follows_every_reservation_settlement_and_expiry() {
        let (reserver, mut redis, keys, user) = reserver().await;
        for n in 0..100 {
            reserve(&reserver, &mut redis, user, &format!("r{n}"), 10).await;
        }
        assert_eq!(held(&keys, &mut redis).await, 1000);
        for n in 0..50 {
            settle(&keys, &mut redis, &format!("r{n}")).await;
        }
        assert_eq!(held(&keys, &mut redis).await, 500);
        // Raising a reservation counts the difference; settling an unknown one changes nothing.
        assert_eq!(reserve(&reserver, &mut redis, user, "r60", 30).await, 520);
        settle(&keys, &mut redis, "never-made").await;
        assert_eq!(held(&keys, &mut redis).await, 520);
        // A reservation past its time is dropped from the total on the next script.
        let _: () =
            redis::cmd("ZADD").arg(&keys.reserved_until).arg(0).arg("r60").query_async(&mut redis).await.unwrap();
        assert_eq!(held(&keys, &mut redis).await, 490);
        // A total that is missing (written by a version without it) is counted from the hash once.
        let _: () = redis::cmd("DEL").arg(&keys.reserved_total).query_async(&mut redis).await.unwrap();
        assert_eq!(reserve(&reserver, &mut redis, user, "r200", 5).await, 495);
        // Once nothing is held, the total goes with the hash.
        for n in (50..100).chain([200]) {
            settle(&keys, &mut redis, &format!("r{n}")).await;
        }
        assert_eq!(held(&keys, &mut redis).await, 0);
        let left: i64 =
            redis::cmd("EXISTS").arg(&keys.reserved).arg(&keys.reserved_total).query_async(&mut redis).await.unwrap();
        assert_eq!(left, 0);
        let _: () = redis::cmd("DEL")
            .arg(&keys.day)
            .arg(&keys.month)
            .arg(&keys.reserved_until)
            .query_async(&mut redis)
            .await
            .unwrap();
    }

    /// The reservation embedded in a script of the caller's (as the gateway embeds it after its rate
    /// limit) answers as the script alone does, from the same keys and arguments.
    #[tokio::test]
    async fn the_reservation_as_a_function_answers_as_its_script_does() {
        let (reserver, mut redis, keys, user) = reserver().await;
        let embedded = redis::Script::new(&format!("{}return reserve()", reserve_function()));
        let request = reserver.request(user, "free", "embedded", 40);
        let said: (i64, i64, i64, i64) = request.invocation(&embedded).invoke_async(&mut redis).await.unwrap();
        match request.decide(said) {
            Reserved::Decided(reservation) => assert_eq!(reservation.budget.unwrap().day.unwrap().reserved, 40),
            Reserved::CountersMissing => panic!("the counters were set"),
        }
        assert_eq!(reserve(&reserver, &mut redis, user, "alone", 2).await, 42);
        assert_eq!(held(&keys, &mut redis).await, 42);
        // Without counters, it says so.
        let missing = reserver.request(Uuid::now_v7(), "free", "embedded", 1);
        let said: (i64, i64, i64, i64) = missing.invocation(&embedded).invoke_async(&mut redis).await.unwrap();
        assert!(matches!(missing.decide(said), Reserved::CountersMissing));
    }
}
