//! Rate limits: GCRA (the generic cell rate algorithm), exact across any number of gateway replicas
//! because every decision is one atomic Lua script in Redis. Authenticated routes are limited per user
//! by tier; the unauthenticated ones per client IP. While Redis is unreachable each replica falls back
//! to the same algorithm in its own memory with its share of the limit, logs it, counts it in a metric,
//! and goes back to Redis as soon as Redis answers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use parley_quota::reserve::ReserveRequest;
use tokio::sync::Mutex as AsyncMutex;

/// The window every limit is per, in microseconds: microseconds, not milliseconds, so the emission
/// interval (period / limit) stays a whole, non-zero number for limits up to 60 million a minute.
const PERIOD_US: u64 = 60_000_000;
/// A Redis that takes longer than this to answer is treated as down for the decision at hand.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// How often to try reconnecting to a Redis that was down.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// GCRA in one step, as a Lua function: `gcra(key, interval, period)` with the emission interval
/// (period / limit) and the period in µs. Uses Redis's clock, so replicas' clocks do not matter.
/// Returns {allowed, remaining, reset_us, retry_after_us}. (Microsecond times since the epoch stay well
/// inside the 2^53 that Lua's numbers hold exactly.)
const GCRA_FUNCTION: &str = r"
local function gcra(key, interval, period)
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  if new_tat - now > period then
    return {0, 0, tat - now, new_tat - period - now}
  end
  redis.call('SET', key, new_tat, 'PX', math.ceil((new_tat - now) / 1000))
  return {1, math.floor((period - (new_tat - now)) / interval), new_tat - now, 0}
end
";

/// A limit alone. KEYS[1]: the limited key; ARGV[1], ARGV[2]: the interval and the period.
const GCRA_CALL: &str = "return gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))";

/// A limit, then, when it allows the request, a budget reservation (quota's script): one round trip
/// for both. KEYS[1] to KEYS[5] and ARGV[1] to ARGV[5] are the reservation's
/// (`parley_quota::reserve::ReserveRequest::invocation`), KEYS[6] the limited key, ARGV[6] and ARGV[7]
/// the limit's interval and period. Returns the limit's four numbers, then the reservation's four
/// ({-2, 0, 0, 0} when the limit refused the request and nothing was reserved).
const LIMIT_THEN_RESERVE: &str = r"
local limit = gcra(KEYS[6], tonumber(ARGV[6]), tonumber(ARGV[7]))
if limit[1] == 0 then return {limit[1], limit[2], limit[3], limit[4], -2, 0, 0, 0} end
local reserved = reserve()
return {limit[1], limit[2], limit[3], limit[4], reserved[1], reserved[2], reserved[3], reserved[4]}
";

/// One limiting decision, and the headers it puts on the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the allowance is whole again.
    pub reset_secs: u64,
    /// Seconds to wait before a retry can succeed (denied requests).
    pub retry_after_secs: u64,
}

impl Decision {
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert("ratelimit-limit", HeaderValue::from(self.limit));
        headers.insert("ratelimit-remaining", HeaderValue::from(self.remaining));
        headers.insert("ratelimit-reset", HeaderValue::from(self.reset_secs));
        if !self.allowed {
            headers.insert(axum::http::header::RETRY_AFTER, HeaderValue::from(self.retry_after_secs.max(1)));
        }
    }
}

fn ceil_secs(us: i64) -> u64 {
    (us.max(0) as u64).div_ceil(1_000_000)
}

/// The time one request uses up of the window: at least a microsecond.
fn emission_interval(limit: u32) -> u64 {
    (PERIOD_US / u64::from(limit.max(1))).max(1)
}

/// A caller's rate limit: the key it is kept under, its requests a minute, and the caller's tier.
#[derive(Debug)]
pub struct UserLimit {
    pub key: String,
    pub limit: u32,
    pub tier: String,
}

/// A caller's rate limit that waits to be decided with the request's budget reservation
/// (`pipeline::reserve_budget`), and the decision once it is taken (which `pipeline::admit` writes on
/// the response).
#[derive(Debug, Clone)]
pub struct DeferredLimit(std::sync::Arc<(UserLimit, std::sync::OnceLock<Decision>)>);

impl DeferredLimit {
    pub fn new(limit: UserLimit) -> Self {
        Self(std::sync::Arc::new((limit, std::sync::OnceLock::new())))
    }

    pub fn limit(&self) -> &UserLimit {
        &self.0.0
    }

    /// The decision, once taken.
    pub fn decided(&self) -> Option<Decision> {
        self.0.1.get().copied()
    }

    /// Keeps the decision (the first one taken).
    pub fn keep(&self, decision: Decision) {
        let _first = self.0.1.set(decision);
    }
}

/// GCRA on a map in this process's memory.
fn local_decision(tats: &mut HashMap<String, u64>, key: &str, limit: u32, now_us: u64) -> Decision {
    let interval = emission_interval(limit);
    let tat = tats.get(key).copied().unwrap_or(now_us).max(now_us);
    let new_tat = tat + interval;
    if new_tat - now_us > PERIOD_US {
        let retry = (new_tat - PERIOD_US - now_us) as i64;
        return Decision {
            allowed: false,
            limit,
            remaining: 0,
            reset_secs: ceil_secs((tat - now_us) as i64),
            retry_after_secs: ceil_secs(retry),
        };
    }
    tats.insert(key.to_owned(), new_tat);
    Decision {
        allowed: true,
        limit,
        remaining: ((PERIOD_US - (new_tat - now_us)) / interval) as u32,
        reset_secs: ceil_secs((new_tat - now_us) as i64),
        retry_after_secs: 0,
    }
}

/// How often the in-memory limits forget keys whose allowance is whole again.
const LOCAL_SWEEP_EVERY_US: u64 = 1_000_000;

/// The most keys a replica limits in memory at once while Redis is unreachable.
const LOCAL_KEYS: usize = 100_000;
/// The most signatures a replica remembers while Redis is unreachable (within [`SIGNATURE_MEMORY`]).
const LOCAL_SIGNATURES: usize = 100_000;

/// The limits a replica keeps in memory while Redis is unreachable. A key whose allowance is whole
/// again decides exactly as an absent one, so it is forgotten (swept at most once a second): memory
/// holds only the keys used within the last period. And at most `capacity` of them: past it, a key
/// not held is decided as a new one and not kept, so a flood of addresses during an outage costs no
/// memory beyond the cap (each of them could have had a whole allowance anyway).
struct LocalLimits {
    tats: HashMap<String, u64>,
    next_sweep_us: u64,
    capacity: usize,
}

impl LocalLimits {
    fn new(capacity: usize) -> Self {
        Self { tats: HashMap::new(), next_sweep_us: 0, capacity }
    }

    fn decide(&mut self, key: &str, limit: u32, now_us: u64) -> Decision {
        if now_us >= self.next_sweep_us {
            self.tats.retain(|_, tat| *tat > now_us);
            self.next_sweep_us = now_us + LOCAL_SWEEP_EVERY_US;
        }
        if self.tats.len() >= self.capacity && !self.tats.contains_key(key) {
            return local_decision(&mut HashMap::new(), key, limit, now_us);
        }
        local_decision(&mut self.tats, key, limit, now_us)
    }
}

/// Signatures seen while Redis is unreachable, to refuse their replay: each kept [`SIGNATURE_MEMORY`],
/// at most `capacity`. Past it a new signature is refused (as if replayed) until older ones expire:
/// replay protection fails closed rather than growing without bound.
struct LocalSignatures {
    seen: HashMap<String, Instant>,
    capacity: usize,
}

impl LocalSignatures {
    fn first_use(&mut self, token: &str) -> bool {
        if self.seen.len() >= self.capacity {
            self.seen.retain(|_, at| at.elapsed() < SIGNATURE_MEMORY);
        }
        match self.seen.get(token) {
            Some(at) if at.elapsed() < SIGNATURE_MEMORY => false,
            // Seen long enough ago that its timestamp is stale anyway: remembered afresh.
            Some(_) => self.seen.insert(token.to_owned(), Instant::now()).is_some(),
            None if self.seen.len() >= self.capacity => false,
            None => self.seen.insert(token.to_owned(), Instant::now()).is_none(),
        }
    }
}

/// How long a signature is remembered to refuse its replay: past the 300 s skew allowance either way.
pub const SIGNATURE_MEMORY: Duration = Duration::from_secs(600);

pub struct RateLimiter {
    /// The Redis URL (checked at start), or none when it is invalid.
    client: Option<String>,
    connection: AsyncMutex<(Option<redis::aio::ConnectionManager>, Option<Instant>)>,
    script: redis::Script,
    /// The limit and a budget reservation in one script ([`RateLimiter::check_and_reserve`]).
    with_reservation: redis::Script,
    prefix: String,
    replicas: u32,
    started: Instant,
    local: Mutex<LocalLimits>,
    degraded: std::sync::atomic::AtomicBool,
    seen_locally: Mutex<LocalSignatures>,
}

impl RateLimiter {
    pub fn new(redis_url: &str, prefix: &str, expected_replicas: u32) -> Self {
        let client = match redis::Client::open(redis_url) {
            Ok(_) => Some(redis_url.to_owned()),
            Err(error) => {
                tracing::error!(%error, "invalid REDIS_URL: rate limits stay in memory");
                None
            }
        };
        Self {
            client,
            connection: AsyncMutex::new((None, None)),
            script: redis::Script::new(&format!("{GCRA_FUNCTION}{GCRA_CALL}")),
            with_reservation: redis::Script::new(&format!(
                "{GCRA_FUNCTION}{}{LIMIT_THEN_RESERVE}",
                parley_quota::reserve::reserve_function()
            )),
            prefix: prefix.to_owned(),
            replicas: expected_replicas.max(1),
            started: Instant::now(),
            local: Mutex::new(LocalLimits::new(LOCAL_KEYS)),
            degraded: std::sync::atomic::AtomicBool::new(false),
            seen_locally: Mutex::new(LocalSignatures { seen: HashMap::new(), capacity: LOCAL_SIGNATURES }),
        }
    }

    /// A connection, reconnecting (at most once a second) after Redis was unreachable. Shared with the
    /// budget reservations the gateway makes in Redis.
    pub(crate) async fn connection(&self) -> Option<redis::aio::ConnectionManager> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = &slot.0 {
            return Some(connection.clone());
        }
        if slot.1.is_some_and(|at| at.elapsed() < RECONNECT_EVERY) {
            return None;
        }
        slot.1 = Some(Instant::now());
        let client = self.client.clone()?;
        match tokio::time::timeout(REDIS_TIMEOUT * 4, parley_platform::redis_pool::connect(&client)).await {
            Ok(Ok(connection)) => {
                slot.0 = Some(connection.clone());
                Some(connection)
            }
            _ => None,
        }
    }

    /// Drops a connection that failed or timed out; the next use reconnects (at most once a second).
    pub(crate) async fn forget_connection(&self) {
        let mut slot = self.connection.lock().await;
        slot.0 = None;
        slot.1 = Some(Instant::now());
    }

    /// True the first time `token` is seen (within [`SIGNATURE_MEMORY`]), on any replica: a `SET NX` in
    /// Redis, or this replica's memory while Redis is unreachable.
    pub async fn first_use(&self, token: &str) -> bool {
        if let Some(mut connection) = self.connection().await {
            let mut command = redis::cmd("SET");
            command
                .arg(format!("{}:seen:{token}", self.prefix))
                .arg(1)
                .arg("NX")
                .arg("EX")
                .arg(SIGNATURE_MEMORY.as_secs());
            let set = command.query_async::<Option<String>>(&mut connection);
            match tokio::time::timeout(REDIS_TIMEOUT, set).await {
                Ok(Ok(stored)) => return stored.is_some(),
                Ok(Err(_)) | Err(_) => self.forget_connection().await,
            }
        }
        self.seen_locally.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).first_use(token)
    }

    /// Decides whether one more request for `key` fits `limit` a minute.
    pub async fn check(&self, key: &str, limit: u32) -> Decision {
        let limit = limit.max(1);
        if let Some(mut connection) = self.connection().await {
            let mut invocation = self.script.key(self.redis_key(key));
            invocation.arg(emission_interval(limit)).arg(PERIOD_US);
            let call = invocation.invoke_async::<(i64, i64, i64, i64)>(&mut connection);
            if let Some(said) = self.answered(tokio::time::timeout(REDIS_TIMEOUT, call).await).await {
                return redis_decision(limit, said);
            }
        }
        self.decide_locally(key, limit)
    }

    /// [`RateLimiter::check`] and, when the limit allows the request, the budget reservation
    /// `reservation`, in one Redis round trip (one script). The reservation's answer is `None` when
    /// the limit refused the request (nothing was reserved). `None` in all when Redis did not answer:
    /// the caller then decides each alone (the limit falls back to memory, the quota service reserves).
    pub async fn check_and_reserve(
        &self,
        key: &str,
        limit: u32,
        reservation: &ReserveRequest,
    ) -> Option<(Decision, Option<(i64, i64, i64, i64)>)> {
        let limit = limit.max(1);
        let mut connection = self.connection().await?;
        let mut invocation = reservation.invocation(&self.with_reservation);
        invocation.key(self.redis_key(key)).arg(emission_interval(limit)).arg(PERIOD_US);
        let call = invocation.invoke_async::<(i64, i64, i64, i64, i64, i64, i64, i64)>(&mut connection);
        let said = self.answered(tokio::time::timeout(REDIS_TIMEOUT, call).await).await?;
        let (allowed, remaining, reset_us, retry_us, granted, day_used, month_used, held) = said;
        let decision = redis_decision(limit, (allowed, remaining, reset_us, retry_us));
        Some((decision, decision.allowed.then_some((granted, day_used, month_used, held))))
    }

    fn redis_key(&self, key: &str) -> String {
        format!("{}:rl:{key}", self.prefix)
    }

    /// What a script said, or `None` (and the connection dropped) when it failed or took too long.
    async fn answered<T>(&self, outcome: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>) -> Option<T> {
        match outcome {
            Ok(Ok(said)) => {
                if self.degraded.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    tracing::info!("redis answers again: rate limits are shared across replicas again");
                }
                return Some(said);
            }
            Ok(Err(error)) => tracing::debug!(%error, "rate limit script failed"),
            Err(_) => tracing::debug!("rate limit script timed out"),
        }
        self.forget_connection().await;
        None
    }

    /// The decision this replica takes alone while Redis is unreachable: its share of the limit.
    fn decide_locally(&self, key: &str, limit: u32) -> Decision {
        if !self.degraded.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                replicas = self.replicas,
                "redis unreachable: each gateway enforces its share of rate limits in memory"
            );
        }
        metrics::counter!(crate::metrics::RATELIMIT_FALLBACK_DECISIONS).increment(1);
        let share = (limit / self.replicas).max(1);
        let now_us = self.started.elapsed().as_micros() as u64;
        let mut local = self.local.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        local.decide(key, share, now_us)
    }
}

/// The decision the GCRA function returned: {allowed, remaining, reset_us, retry_after_us}.
fn redis_decision(limit: u32, (allowed, remaining, reset_us, retry_us): (i64, i64, i64, i64)) -> Decision {
    Decision {
        allowed: allowed == 1,
        limit,
        remaining: remaining.max(0) as u32,
        reset_secs: ceil_secs(reset_us),
        retry_after_secs: ceil_secs(retry_us),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_allowance_then_one_request_per_interval() {
        let mut tats = HashMap::new();
        let allowed = (0..25).filter(|_| local_decision(&mut tats, "k", 20, 1_000_000).allowed).count();
        assert_eq!(allowed, 20, "a burst of exactly the limit");
        let denied = local_decision(&mut tats, "k", 20, 1_000_000);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after_secs, 3, "one emission interval (3 s) until the next request fits");
        assert!(local_decision(&mut tats, "k", 20, 1_000_000 + 3_000_000).allowed);
        assert!(!local_decision(&mut tats, "k", 20, 1_000_000 + 3_000_000).allowed);
    }

    #[test]
    fn remaining_counts_down_and_keys_are_independent() {
        let mut tats = HashMap::new();
        assert_eq!(local_decision(&mut tats, "a", 5, 0).remaining, 4);
        assert_eq!(local_decision(&mut tats, "a", 5, 0).remaining, 3);
        assert_eq!(local_decision(&mut tats, "b", 5, 0).remaining, 4);
    }

    #[test]
    fn limits_above_a_thousand_a_second_still_hold() {
        // 100,000 a minute: an interval of 600 µs, which whole milliseconds would round to zero.
        let mut tats = HashMap::new();
        let allowed = (0..100_010).filter(|_| local_decision(&mut tats, "k", 100_000, 0).allowed).count();
        assert_eq!(allowed, 100_000);
        assert!(local_decision(&mut tats, "k", 100_000, 600).allowed);
        assert_eq!(emission_interval(u32::MAX), 1);
    }

    #[test]
    fn keys_whose_allowance_is_whole_again_are_forgotten() {
        let mut local = LocalLimits::new(LOCAL_KEYS);
        for address in 0..1000 {
            assert!(local.decide(&format!("ip:{address}"), 60, 0).allowed);
        }
        assert_eq!(local.tats.len(), 1000);
        // A second later each of them has its one-second interval back: only the new key remains.
        assert!(local.decide("ip:new", 60, 1_000_000).allowed);
        assert_eq!(local.tats.len(), 1);
        // A key still spending its allowance is limited, and kept by the next sweep.
        for _ in 0..60 {
            assert!(local.decide("ip:busy", 60, 1_000_000).allowed);
        }
        assert!(!local.decide("ip:busy", 60, 1_500_000).allowed);
        assert!(local.decide("ip:other", 60, 2_500_000).allowed);
        assert!(local.tats.contains_key("ip:busy"));
        assert!(!local.tats.contains_key("ip:new"));
    }

    #[test]
    fn the_local_limits_hold_at_most_their_capacity() {
        let mut local = LocalLimits::new(100);
        for address in 0..10_000 {
            assert!(local.decide(&format!("ip:{address}"), 60, 0).allowed);
        }
        assert_eq!(local.tats.len(), 100);
        // The keys held are still limited; one past the cap is decided as new, and not kept.
        for _ in 0..59 {
            local.decide("ip:0", 60, 0);
        }
        assert!(!local.decide("ip:0", 60, 0).allowed);
        assert!(local.decide("ip:10000", 60, 0).allowed);
        assert_eq!(local.tats.len(), 100);
    }

    #[test]
    fn remembered_signatures_are_refused_and_bounded() {
        let mut local = LocalSignatures { seen: HashMap::new(), capacity: 3 };
        assert!(local.first_use("a"));
        assert!(!local.first_use("a"), "a replay");
        assert!(local.first_use("b") && local.first_use("c"));
        // Full, with nothing expired: a new signature is refused rather than kept.
        assert!(!local.first_use("d"));
        assert_eq!(local.seen.len(), 3);
    }
}
