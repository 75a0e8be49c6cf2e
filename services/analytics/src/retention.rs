//! Retention of raw usage events: whole month partitions are dropped once they are older than the
//! retention, in one statement each (no row-by-row delete, no bloat). The daily rollups are kept, so
//! reports over whole days stay complete after the raw events are gone.

use sqlx::PgPool;
use time::{Date, Month};

/// Drops the month partitions of `analytics.usage_events` that end before the first day of the month
/// `keep_months` before `today`'s month; returns the names dropped, oldest first.
pub async fn drop_old_usage_partitions(
    pool: &PgPool,
    today: Date,
    keep_months: u32,
) -> Result<Vec<String>, sqlx::Error> {
    let (cutoff_year, cutoff_month) = months_before(today.year(), today.month(), keep_months);
    let partitions: Vec<(String,)> = sqlx::query_as(
        "SELECT c.relname::text FROM pg_inherits i
         JOIN pg_class c ON c.oid = i.inhrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE i.inhparent = 'analytics.usage_events'::regclass AND n.nspname = 'analytics'
         ORDER BY c.relname",
    )
    .fetch_all(pool)
    .await?;
    let mut dropped = Vec::new();
    for (name,) in partitions {
        let Some((year, month)) = partition_month(&name) else { continue };
        if (year, month) < (cutoff_year, u8::from(cutoff_month)) {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE analytics.\"{name}\""))).execute(pool).await?;
            dropped.push(name);
        }
    }
    Ok(dropped)
}

/// What retention removed from the analytics schema besides whole partitions.
#[derive(Debug, Default, Clone, Copy)]
pub struct AnalyticsPruned {
    pub daily_rows: u64,
    pub spend_days: u64,
    pub cost_alerts: u64,
    pub erased_users: u64,
}

/// Retention for the analytics schema's tables that are not partitioned: when `rollup_months` is set,
/// the daily totals (per user and model, and overall spend) and the spend alerts of days before the
/// month that many whole months before the current one; always, the record of an erased account a
/// month after its erasure (its late usage events have long arrived by then).
pub async fn prune(pool: &PgPool, rollup_months: Option<u32>) -> Result<AnalyticsPruned, sqlx::Error> {
    use parley_platform::db::delete_in_batches;
    let mut pruned = AnalyticsPruned::default();
    if let Some(months) = rollup_months {
        let months = i32::try_from(months).unwrap_or(i32::MAX);
        let before = "day < (date_trunc('month', now() AT TIME ZONE 'UTC') - make_interval(months => $1))::date";
        pruned.daily_rows = delete_in_batches(pool, "analytics.usage_daily", before, months).await?;
        pruned.spend_days = delete_in_batches(pool, "analytics.spend_daily", before, months).await?;
        pruned.cost_alerts = delete_in_batches(pool, "analytics.cost_alerts", before, months).await?;
    }
    let erased = "erased_at < now() - make_interval(days => $1)";
    pruned.erased_users = delete_in_batches(pool, "analytics.erased_users", erased, 30).await?;
    Ok(pruned)
}

/// The (year, month) of a month partition's name, `usage_events_YYYY_MM`; `None` for the default one.
fn partition_month(name: &str) -> Option<(i32, u8)> {
    let rest = name.strip_prefix("usage_events_")?;
    let (year, month) = rest.split_once('_')?;
    let month: u8 = month.parse().ok()?;
    (1..=12).contains(&month).then_some(())?;
    Some((year.parse().ok()?, month))
}

fn months_before(year: i32, month: Month, months: u32) -> (i32, Month) {
    let index = i64::from(year) * 12 + i64::from(u8::from(month)) - 1 - i64::from(months);
    let year = i32::try_from(index.div_euclid(12)).unwrap_or(i32::MIN);
    let month = Month::try_from(u8::try_from(index.rem_euclid(12) + 1).unwrap_or(1)).unwrap_or(Month::January);
    (year, month)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_and_month_arithmetic() {
        assert_eq!(partition_month("usage_events_2026_03"), Some((2026, 3)));
        assert_eq!(partition_month("usage_events_default"), None);
        assert_eq!(partition_month("usage_events_2026_13"), None);
        assert_eq!(months_before(2026, Month::March, 0), (2026, Month::March));
        assert_eq!(months_before(2026, Month::March, 3), (2025, Month::December));
        assert_eq!(months_before(2026, Month::January, 13), (2024, Month::December));
    }
}
