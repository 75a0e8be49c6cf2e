//! The durable ledger of charges, written in groups. Charges that arrive while a write is in flight
//! are inserted together by the next one (one statement, one commit), so a busy quota service commits
//! far less often than it charges, while a lone charge waits for nothing.

use std::collections::HashSet;

use parley_platform::ServiceError;
use sqlx::PgPool;
use time::Date;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Most charges in one write.
const MAX_GROUP: usize = 512;
/// Charges waiting for a write before callers wait to hand theirs over.
const QUEUE: usize = 8192;

/// One charge: `tokens` for `user_id` on `day`, recorded once per `reference_id`.
pub struct Charge {
    pub reference_id: String,
    pub user_id: Uuid,
    pub day: Date,
    pub tokens: i64,
}

struct Pending {
    charge: Charge,
    recorded: oneshot::Sender<Result<bool, ServiceError>>,
}

/// Hands charges to the ledger's writer task.
#[derive(Clone)]
pub struct Ledger {
    queue: mpsc::Sender<Pending>,
}

impl Ledger {
    /// Starts the writer; it ends once every handle is dropped.
    pub fn start(pool: PgPool) -> Self {
        let (queue, pending) = mpsc::channel(QUEUE);
        tokio::spawn(write(pool, pending));
        Self { queue }
    }

    /// Records a charge once it is committed; false when a charge with this reference was already
    /// recorded.
    pub async fn record(&self, charge: Charge) -> Result<bool, ServiceError> {
        let (recorded, outcome) = oneshot::channel();
        self.queue.send(Pending { charge, recorded }).await.map_err(|_| ServiceError::unavailable("the ledger"))?;
        outcome.await.map_err(|_| ServiceError::unavailable("the ledger"))?
    }
}

async fn write(pool: PgPool, mut pending: mpsc::Receiver<Pending>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while pending.recv_many(&mut group, MAX_GROUP).await > 0 {
        let charges: Vec<&Charge> = group.iter().map(|pending| &pending.charge).collect();
        match insert(&pool, &charges).await {
            Ok(mut inserted) => {
                for pending in group.drain(..) {
                    // Two charges with one reference in one group: the first is the one recorded.
                    let first = inserted.remove(&pending.charge.reference_id);
                    let _caller_gone = pending.recorded.send(Ok(first));
                }
            }
            Err(error) => {
                let error = ServiceError::from(error);
                for pending in group.drain(..) {
                    let _caller_gone = pending.recorded.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Inserts the charges not recorded yet; the references inserted.
async fn insert(pool: &PgPool, charges: &[&Charge]) -> Result<HashSet<String>, sqlx::Error> {
    let inserted: Vec<(String,)> = sqlx::query_as(
        "INSERT INTO quota.ledger (reference_id, user_id, day, tokens)
         SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::date[], $4::bigint[])
         ON CONFLICT (reference_id) DO NOTHING
         RETURNING reference_id",
    )
    .bind(charges.iter().map(|charge| charge.reference_id.as_str()).collect::<Vec<_>>())
    .bind(charges.iter().map(|charge| charge.user_id).collect::<Vec<_>>())
    .bind(charges.iter().map(|charge| charge.day).collect::<Vec<_>>())
    .bind(charges.iter().map(|charge| charge.tokens).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?;
    Ok(inserted.into_iter().map(|(reference_id,)| reference_id).collect())
}

/// Retention for the quota schema: ledger rows of days before the first day of the month `months`
/// whole months before the current one (budgets read the current day and month only; usage reports
/// come from analytics). The number deleted.
pub async fn prune(pool: &PgPool, months: u32) -> Result<u64, sqlx::Error> {
    let months = i32::try_from(months).unwrap_or(i32::MAX);
    let condition = "day < (date_trunc('month', now() AT TIME ZONE 'UTC') - make_interval(months => $1))::date";
    parley_platform::db::delete_in_batches(pool, "quota.ledger", condition, months).await
}

#[cfg(test)]
mod tests {
    use parley_platform::test_database::TestDatabase;

    use super::*;

    async fn ledger() -> (Ledger, PgPool, TestDatabase) {
        let database = TestDatabase::create("parley_quota_ledger").await.unwrap();
        let pool = PgPool::connect(database.url()).await.unwrap();
        crate::migrate(&pool).await.unwrap();
        (Ledger::start(pool.clone()), pool, database)
    }

    fn charge(reference_id: &str, user_id: Uuid, tokens: i64) -> Charge {
        let day = Date::from_calendar_date(2026, time::Month::November, 28).unwrap();
        Charge { reference_id: reference_id.to_owned(), user_id, day, tokens }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_charges_are_each_recorded_once_whatever_group_they_land_in() {
        let (ledger, pool, _database) = ledger().await;
        let user = Uuid::now_v7();
        // 200 charges at once over 50 references: every reference four times.
        let mut tasks = tokio::task::JoinSet::new();
        for attempt in 0..200 {
            let (ledger, reference) = (ledger.clone(), format!("reservation-{}", attempt % 50));
            tasks.spawn(async move { (reference.clone(), ledger.record(charge(&reference, user, 10)).await.unwrap()) });
        }
        let mut recorded = HashSet::new();
        while let Some(joined) = tasks.join_next().await {
            let (reference, first) = joined.unwrap();
            if first {
                assert!(recorded.insert(reference.clone()), "{reference} was recorded twice");
            }
        }
        assert_eq!(recorded.len(), 50);
        let (rows, tokens): (i64, i64) =
            sqlx::query_as("SELECT count(*), COALESCE(sum(tokens), 0)::bigint FROM quota.ledger WHERE user_id = $1")
                .bind(user)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!((rows, tokens), (50, 500));
        // A charge already in the ledger, in a later write, is not recorded again.
        assert!(!ledger.record(charge("reservation-7", user, 10)).await.unwrap());
        assert!(ledger.record(charge("reservation-50", user, 10)).await.unwrap());
    }

    #[tokio::test]
    async fn a_failed_write_fails_every_charge_in_it() {
        let (ledger, pool, _database) = ledger().await;
        sqlx::query("DROP TABLE quota.ledger").execute(&pool).await.unwrap();
        let error = ledger.record(charge("reservation-1", Uuid::now_v7(), 10)).await.unwrap_err();
        assert_eq!(error.code, parley_platform::ErrorCode::Internal);
    }
}
