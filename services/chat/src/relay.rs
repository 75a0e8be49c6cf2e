//! The outbox relay: publishes AI jobs written by [`crate::storage::Storage::send`] to JetStream.
//!
//! A job row is marked published only after JetStream acknowledged it, so a crash between the two
//! publishes it again; the `Nats-Msg-Id` header (the job id) lets JetStream drop that duplicate. Rows
//! are locked with `FOR UPDATE SKIP LOCKED`, so any number of chat replicas relay side by side. When
//! NATS is down the rows simply wait: sends keep being accepted and nothing is lost.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use parley_platform::nats::Names;
use parley_platform::telemetry::NatsHeaderCarrier;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::storage::Storage;

const BATCH: i64 = 100;
const IDLE_POLL: Duration = Duration::from_millis(500);
const PURGE_EVERY: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct OutboxRelay {
    pool: PgPool,
    jetstream: jetstream::Context,
    names: Names,
    wake: Arc<Notify>,
}

impl OutboxRelay {
    pub fn new(pool: PgPool, jetstream: jetstream::Context, names: Names) -> Self {
        Self { pool, jetstream, names, wake: Arc::new(Notify::new()) }
    }

    /// Wakes the relay right after a send commits, instead of at its next poll.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut stream_ready = false;
        let mut backoff = Duration::from_millis(100);
        let mut last_purge = tokio::time::Instant::now();
        loop {
            if !stream_ready {
                match parley_platform::nats::ensure_jobs_stream(&self.jetstream, &self.names).await {
                    Ok(_) => stream_ready = true,
                    Err(error) => {
                        tracing::warn!(%error, "job stream not ready; jobs wait in the outbox")
                    }
                }
            }
            let outcome = if stream_ready { self.publish_batch().await } else { Err("job stream not ready".into()) };
            let wait = match outcome {
                Ok(published) if published as i64 == BATCH => Duration::ZERO,
                Ok(_) => {
                    backoff = Duration::from_millis(100);
                    IDLE_POLL
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "outbox relay failed");
                    metrics::counter!("parley_chat_outbox_publish_errors_total").increment(1);
                    let wait = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                }
            };
            if last_purge.elapsed() >= PURGE_EVERY {
                last_purge = tokio::time::Instant::now();
                if let Err(error) = Storage::purge_published(&self.pool).await {
                    tracing::warn!(%error, "outbox purge failed");
                }
            }
            if wait.is_zero() {
                if shutdown.is_cancelled() {
                    break;
                }
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::debug!("outbox relay stopped");
    }

    /// Publishes one batch; the number of rows published.
    async fn publish_batch(&self) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
        let mut tx = self.pool.begin().await?;
        let rows = Storage::lock_unpublished(&mut tx, BATCH).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut acks = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, row.job_id.to_string().as_str());
            if let Some(traceparent) = &row.traceparent {
                headers.insert("traceparent", traceparent.as_str());
            } else {
                parley_platform::telemetry::inject_current(&mut NatsHeaderCarrier(&mut headers));
            }
            let payload = serde_json::to_vec(&row.payload.0)?;
            let ack = self.jetstream.publish_with_headers(row.subject.clone(), headers, payload.into()).await?;
            acks.push((row.id, ack));
        }
        let mut published = Vec::with_capacity(acks.len());
        let mut first_error = None;
        for (id, ack) in acks {
            match ack.await {
                Ok(_) => published.push(id),
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        Storage::mark_published(&mut tx, &published).await?;
        tx.commit().await?;
        metrics::counter!("parley_chat_outbox_published_total").increment(published.len() as u64);
        match first_error {
            Some(error) => Err(error.into()),
            None => Ok(published.len()),
        }
    }
}
