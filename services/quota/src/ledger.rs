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
