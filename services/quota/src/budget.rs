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

/// Adds to a counter only if it exists. A missing counter is rebuilt from the ledger on the next read,
/// and the ledger already holds this charge, so creating it here would undercount.
pub const CHARGE_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('INCRBY', KEYS[1], ARGV[1])
end
return -1
";

/// Share of the budget a user may spend while Redis is unreachable and the ledger answers instead.
pub const DEGRADED_SHARE: f64 = 0.8;

/// Whether a request estimated at `estimated` tokens may start with `used` of `limit` spent.
pub fn allows(used: i64, estimated: i64, limit: i64) -> bool {
    used < limit && used.saturating_add(estimated.max(0)) <= limit
}

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

    #[test]
    fn a_request_must_fit_in_what_is_left() {
        assert!(allows(0, 100, 1000));
        assert!(allows(900, 100, 1000));
        assert!(!allows(901, 100, 1000));
        assert!(!allows(1000, 0, 1000));
    }
}
