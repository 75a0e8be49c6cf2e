//! Daily budget windows and the Redis counters that track them.

use time::{Date, OffsetDateTime, Time};
use uuid::Uuid;

/// The UTC day a charge counts against.
pub fn current_day(now: OffsetDateTime) -> Date {
    now.to_offset(time::UtcOffset::UTC).date()
}

/// When the window containing `now` ends (the next UTC midnight), as Unix seconds.
pub fn window_end(now: OffsetDateTime) -> i64 {
    let today = current_day(now);
    let tomorrow = today.next_day().unwrap_or(today);
    tomorrow.with_time(Time::MIDNIGHT).assume_utc().unix_timestamp()
}

pub fn counter_key(prefix: &str, user_id: Uuid, day: Date) -> String {
    format!("{prefix}:quota:{user_id}:{day}")
}

/// Counters outlive their day a little, so a charge settling just after midnight still finds yesterday's.
pub const COUNTER_TTL_SECS: i64 = 2 * 24 * 3600;

/// Adds to each counter (the day's, the month's) only if it exists. A missing counter is rebuilt from
/// the ledger on the next read, and the ledger already holds this charge, so creating it here would
/// undercount. Returns the first counter's new value, or -1 when it was missing.
pub const CHARGE_SCRIPT: &str = r"
local counted = -1
for index, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local value = redis.call('INCRBY', key, ARGV[1])
    if index == 1 then counted = value end
  end
end
return counted
";

/// Share of the budget a user may spend while Redis is unreachable and the ledger answers instead.
pub const DEGRADED_SHARE: f64 = 0.8;

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn windows_are_utc_days() {
        let now = datetime!(2026-11-23 23:59:59 UTC);
        assert_eq!(current_day(now).to_string(), "2026-11-23");
        assert_eq!(window_end(now), datetime!(2026-11-24 00:00:00 UTC).unix_timestamp());
        let elsewhere = datetime!(2026-11-24 01:00:00 +02:00);
        assert_eq!(current_day(elsewhere).to_string(), "2026-11-23");
    }
}

/// The first day of the month containing `day`, and of the next month.
pub fn month_bounds(day: Date) -> (Date, Date) {
    let first = day.replace_day(1).unwrap_or(day);
    let next = match first.month() {
        time::Month::December => Date::from_calendar_date(first.year() + 1, time::Month::January, 1),
        month => Date::from_calendar_date(first.year(), month.next(), 1),
    }
    .unwrap_or(first);
    (first, next)
}

pub fn month_key(prefix: &str, user_id: Uuid, day: Date) -> String {
    let (first, _) = month_bounds(day);
    format!("{prefix}:quota:{user_id}:month:{}-{:02}", first.year(), first.month() as u8)
}

/// Reservations of a user: a hash of id → tokens, a sorted set of id → expiry (ms), and the running
/// total of the tokens the hash holds.
pub fn reservation_keys(prefix: &str, user_id: Uuid) -> (String, String, String) {
    (
        format!("{prefix}:quota:{user_id}:reserved"),
        format!("{prefix}:quota:{user_id}:reserved-until"),
        format!("{prefix}:quota:{user_id}:reserved-total"),
    )
}

pub const MONTH_COUNTER_TTL_SECS: i64 = 33 * 24 * 3600;

/// The start of every reservation script. KEYS: day counter, month counter, reservation hash,
/// reservation expiry set, running total. Sets `now` (Redis's clock, ms) and `held` (the tokens of the
/// live reservations), expiring dead reservations on the way, and defines `store_held`, which writes
/// the total back with the hash's time to live (or drops it with the hash).
///
/// Each script keeps the total in step with the hash, so a reservation costs the same however many
/// a user holds: summing the hash on every reservation made one user's 10,000 open streams cost Redis
/// a millisecond each (`docs/performance.md`). A total that is missing (an older version wrote the
/// hash, or it expired) is counted from the hash once.
macro_rules! reservations_prelude {
    () => {
        r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local held = tonumber(redis.call('GET', KEYS[5]) or -1)
if held < 0 then
  held = 0
  for _, tokens in ipairs(redis.call('HVALS', KEYS[3])) do held = held + tonumber(tokens) end
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
for _, id in ipairs(expired) do
  held = held - tonumber(redis.call('HGET', KEYS[3], id) or 0)
  redis.call('HDEL', KEYS[3], id)
end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now) end
if held < 0 then held = 0 end
local function store_held(total)
  local ttl = redis.call('PTTL', KEYS[3])
  if ttl > 0 then redis.call('SET', KEYS[5], total, 'PX', ttl) else redis.call('DEL', KEYS[5]) end
end
"
    };
}

/// Expires dead reservations, then holds ARGV[2] tokens under id ARGV[1] (replacing what that id held)
/// if the day (ARGV[3]) and month (ARGV[4], negative: none) budgets allow it, for ARGV[5] ms. Returns
/// {granted, day used, month used, held}, or {-1} when a counter is missing and must be rebuilt from
/// the ledger first.
pub const RESERVE_SCRIPT: &str = concat!(
    r"
local day = redis.call('GET', KEYS[1])
local month = redis.call('GET', KEYS[2])
if not day or not month then return {-1, 0, 0, 0} end
",
    reservations_prelude!(),
    r"
-- Raising an existing reservation: only the difference has to fit.
local previous = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or 0)
local others = held - previous
local tokens = tonumber(ARGV[2])
local day_used = tonumber(day)
local month_used = tonumber(month)
local day_limit = tonumber(ARGV[3])
local month_limit = tonumber(ARGV[4])
local fits = day_used + others + tokens <= day_limit and (month_limit < 0 or month_used + others + tokens <= month_limit)
if fits then
  redis.call('HSET', KEYS[3], ARGV[1], tokens)
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[5]), ARGV[1])
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[5]) * 2)
  redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[5]) * 2)
  held = others + tokens
end
store_held(held)
return {fits and 1 or 0, day_used, month_used, held}
"
);

/// Releases reservation ARGV[1] and, when ARGV[3] is 1 (the ledger took the charge), adds ARGV[2]
/// tokens to the day and month counters that exist (a missing counter is rebuilt from the ledger,
/// which already holds this charge).
pub const SETTLE_SCRIPT: &str = concat!(
    reservations_prelude!(),
    r"
local tokens = redis.call('HGET', KEYS[3], ARGV[1])
if tokens then held = held - tonumber(tokens) end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
store_held(held)
if ARGV[3] == '1' then
  if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCRBY', KEYS[1], ARGV[2]) end
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('INCRBY', KEYS[2], ARGV[2]) end
end
return 1
"
);

/// The held tokens of live reservations (for budget reports), expiring dead ones.
pub const HELD_SCRIPT: &str = concat!(
    reservations_prelude!(),
    r"
store_held(held)
return held
"
);

#[cfg(test)]
mod month_tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn months_roll_over_years() {
        assert_eq!(month_bounds(date!(2026 - 11 - 23)), (date!(2026 - 11 - 01), date!(2026 - 12 - 01)));
        assert_eq!(month_bounds(date!(2026 - 12 - 31)), (date!(2026 - 12 - 01), date!(2027 - 01 - 01)));
        assert!(month_key("p", Uuid::nil(), date!(2026 - 03 - 05)).ends_with(":month:2026-03"));
    }
}
