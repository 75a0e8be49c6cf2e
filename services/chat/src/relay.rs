//! The outbox relay: publishes AI jobs written by [`crate::storage::Storage::send`] to JetStream.
//!
//! A send hands its job to the relay as soon as the job is committed and its context read
//! ([`JobQueue::publish`]), and the relay publishes it at once, without reading it back, carrying that
//! context when it is small (the outbox row never holds it); its row is then marked published, together
//! with the rows of the other jobs published within `MARK_LINGER` (one statement and one commit for
//! them all, not one per send at a trickle). The outbox is the safety net: a sweep
//! publishes every row left unpublished for longer than [`SWEEP_GRACE`] (its send's replica died,
//! NATS was down, the queue to the relay was full).
//!
//! A job row is marked published only after JetStream acknowledged it, so a crash between the two
//! publishes it again; the `Nats-Msg-Id` header (the job id) lets JetStream drop that duplicate. The
//! sweep locks rows with `FOR UPDATE SKIP LOCKED`, so any number of chat replicas relay side by side.
//! When NATS is down the rows simply wait: sends keep being accepted and nothing is lost.

use std::time::Duration;

use async_nats::jetstream;
use parley_platform::backoff::Backoff;
use parley_platform::nats::Names;
use parley_platform::telemetry::NatsHeaderCarrier;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::storage::{QueuedJob, Storage};

const BATCH: usize = 100;
const IDLE_POLL: Duration = Duration::from_millis(500);
/// How long a committed job may wait for its send's relay before the sweep publishes it.
const SWEEP_GRACE: Duration = Duration::from_secs(2);
/// Committed jobs waiting for the relay; past this, they wait for the sweep instead.
const QUEUE: usize = 4096;
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// How long published jobs wait to be marked together: at a trickle of sends each mark would be a
/// statement and a commit of its own (well inside `SWEEP_GRACE`, so the sweep does not take them).
const MARK_LINGER: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Largest job payload that carries its context (a quarter of NATS's default `max_payload`).
const MAX_CARRIED_PAYLOAD: usize = 256 * 1024;

/// Where a send hands the job it just committed.
#[derive(Clone)]
pub struct JobQueue {
    sender: mpsc::Sender<QueuedJob>,
}

impl JobQueue {
    /// Publishes a committed job soon; if the relay is behind, the sweep publishes it instead.
    pub fn publish(&self, job: QueuedJob) {
        if self.sender.try_send(job).is_err() {
            metrics::counter!(crate::metrics::OUTBOX_LEFT_TO_SWEEP).increment(1);
        }
    }
}

pub struct OutboxRelay {
    pool: PgPool,
    jetstream: jetstream::Context,
    names: Names,
    queue: mpsc::Sender<QueuedJob>,
    committed: mpsc::Receiver<QueuedJob>,
}

impl OutboxRelay {
    pub fn new(pool: PgPool, jetstream: jetstream::Context, names: Names) -> Self {
        let (queue, committed) = mpsc::channel(QUEUE);
        Self { pool, jetstream, names, queue, committed }
    }

    pub fn queue(&self) -> JobQueue {
        JobQueue { sender: self.queue.clone() }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut stream_ready = false;
        let mut backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
        let mut next_sweep = tokio::time::Instant::now();
        let mut last_purge = tokio::time::Instant::now();
        let mut committed = Vec::with_capacity(BATCH);
        // Published, not yet marked; marked together once the first has waited MARK_LINGER.
        let mut unmarked: Vec<Uuid> = Vec::new();
        let mut mark_at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                received = self.committed.recv_many(&mut committed, BATCH) => {
                    if received == 0 {
                        break;
                    }
                    if stream_ready {
                        let published = self.publish_committed(std::mem::take(&mut committed)).await;
                        if unmarked.is_empty() {
                            mark_at = tokio::time::Instant::now() + MARK_LINGER;
                        }
                        unmarked.extend(published);
                        if unmarked.len() >= BATCH {
                            self.mark(&mut unmarked).await;
                        }
                    } else {
                        // The sweep publishes them once the stream is there.
                        committed.clear();
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(mark_at), if !unmarked.is_empty() => {
                    self.mark(&mut unmarked).await;
                    continue;
                }
                _ = tokio::time::sleep_until(next_sweep) => {}
            }
            if !stream_ready {
                match parley_platform::nats::ensure_jobs_stream(&self.jetstream, &self.names).await {
                    Ok(_) => stream_ready = true,
                    Err(error) => {
                        tracing::warn!(%error, "job stream not ready; jobs wait in the outbox")
                    }
                }
            }
            let outcome = if stream_ready { self.sweep().await } else { Err("job stream not ready".into()) };
            let wait = match outcome {
                Ok(published) if published == BATCH => Duration::ZERO,
                Ok(_) => {
                    backoff.reset();
                    IDLE_POLL
                }
                Err(error) => {
                    let wait = backoff.next_wait();
                    tracing::warn!(%error, retry_in_ms = wait.as_millis() as u64, "outbox relay failed");
                    metrics::counter!(crate::metrics::OUTBOX_PUBLISH_ERRORS).increment(1);
                    wait
                }
            };
            next_sweep = tokio::time::Instant::now() + wait;
            if last_purge.elapsed() >= PURGE_EVERY {
                last_purge = tokio::time::Instant::now();
                if let Err(error) = Storage::purge_published(&self.pool).await {
                    tracing::warn!(%error, "outbox purge failed");
                }
            }
        }
        self.mark(&mut unmarked).await;
        tracing::debug!("outbox relay stopped");
    }

    /// Marks published jobs as such, in one statement.
    async fn mark(&self, published: &mut Vec<Uuid>) {
        if published.is_empty() {
            return;
        }
        if let Err(error) = Storage::mark_jobs_published(&self.pool, published).await {
            // JetStream drops the sweep's second publish of these as duplicates.
            tracing::warn!(%error, "could not mark published jobs; the sweep publishes them again");
        }
        published.clear();
    }

    /// Publishes jobs just committed; the ids of those JetStream took, to be marked published. A job
    /// that fails here stays unpublished for the sweep.
    async fn publish_committed(&self, jobs: Vec<QueuedJob>) -> Vec<Uuid> {
        let mut acks = Vec::with_capacity(jobs.len());
        for mut queued in jobs {
            let payload = match payload(&mut queued) {
                Ok(payload) => payload,
                Err(error) => {
                    tracing::error!(%error, "could not encode a job; the sweep publishes its stored row");
                    continue;
                }
            };
            let headers = job_headers(queued.job.job_id, queued.traceparent.as_deref());
            match self.jetstream.publish_with_headers(queued.subject.clone(), headers, payload.into()).await {
                Ok(ack) => acks.push((queued.job.job_id, ack)),
                Err(error) => {
                    tracing::warn!(%error, "could not publish a job; the sweep will");
                    metrics::counter!(crate::metrics::OUTBOX_PUBLISH_ERRORS).increment(1);
                }
            }
        }
        let mut published: Vec<Uuid> = Vec::with_capacity(acks.len());
        for (job_id, ack) in acks {
            match ack.await {
                Ok(_) => published.push(job_id),
                Err(error) => {
                    tracing::warn!(%error, "a job was not acknowledged; the sweep will publish it");
                    metrics::counter!(crate::metrics::OUTBOX_PUBLISH_ERRORS).increment(1);
                }
            }
        }
        metrics::counter!(crate::metrics::OUTBOX_PUBLISHED).increment(published.len() as u64);
        published
    }

    /// Publishes one batch of rows left unpublished past the grace period; the number published.
    async fn sweep(&self) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
        let mut tx = self.pool.begin().await?;
        let rows = Storage::lock_unpublished(&mut tx, BATCH as i64, SWEEP_GRACE).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut acks = Vec::with_capacity(rows.len());
        for row in &rows {
            let headers = job_headers(row.job_id, row.traceparent.as_deref());
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
        metrics::counter!(crate::metrics::OUTBOX_PUBLISHED).increment(published.len() as u64);
        metrics::counter!(crate::metrics::OUTBOX_SWEPT).increment(published.len() as u64);
        match first_error {
            Some(error) => Err(error.into()),
            None => Ok(published.len()),
        }
    }
}

/// A committed job's payload, with the context it carries when that is still safe and small: a job
/// published later than the sweep may have published it could run a second time with a context read
/// before its first run stored the reply, and a payload past `MAX_CARRIED_PAYLOAD` would be refused by
/// NATS (`max_payload`) or fill the jobs stream. Without a context the agent asks chat for it.
fn payload(queued: &mut QueuedJob) -> serde_json::Result<Vec<u8>> {
    if queued.committed.elapsed() >= SWEEP_GRACE {
        queued.job.context = None;
    }
    let payload = serde_json::to_vec(&queued.job)?;
    if payload.len() <= MAX_CARRIED_PAYLOAD || queued.job.context.is_none() {
        return Ok(payload);
    }
    queued.job.context = None;
    serde_json::to_vec(&queued.job)
}

/// A job's headers: its id, which JetStream deduplicates on, and the trace of the send that queued it.
fn job_headers(job_id: Uuid, traceparent: Option<&str>) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, job_id.to_string().as_str());
    match traceparent {
        Some(traceparent) => headers.insert("traceparent", traceparent),
        None => parley_platform::telemetry::inject_current(&mut NatsHeaderCarrier(&mut headers)),
    }
    headers
}

#[cfg(test)]
mod tests {
    use parley_platform::events::{AiJob, CacheDirective, CarriedContext, ContextMessage};

    use super::*;

    fn queued(content: &str, committed: std::time::Instant) -> QueuedJob {
        let id = Uuid::now_v7();
        let message = ContextMessage { id, role: "user".to_owned(), content: content.to_owned() };
        let job = AiJob {
            job_id: id,
            message_id: id,
            conversation_id: id,
            user_id: id,
            model: "parley-fake".to_owned(),
            tier: "free".to_owned(),
            sampling: Default::default(),
            cache: CacheDirective::default(),
            reservation_id: None,
            max_tokens: None,
            context: Some(CarriedContext { history: vec![message], ..CarriedContext::default() }),
        };
        QueuedJob { job, subject: "jobs".to_owned(), traceparent: None, committed }
    }

    fn sent(queued: &mut QueuedJob) -> AiJob {
        serde_json::from_slice(&payload(queued).unwrap()).unwrap()
    }

    #[test]
    fn a_job_published_at_once_carries_its_context() {
        let mut job = queued("What is tea?", std::time::Instant::now());
        let context = sent(&mut job).context.expect("a context");
        assert_eq!(context.history[0].content, "What is tea?");
    }

    #[test]
    fn a_job_published_past_the_sweeps_grace_carries_none() {
        let committed = std::time::Instant::now().checked_sub(SWEEP_GRACE).expect("up longer than the grace");
        let mut job = queued("What is tea?", committed);
        assert_eq!(sent(&mut job).context, None, "the sweep may have published it already");
    }

    #[test]
    fn a_context_too_large_to_carry_is_left_out() {
        let mut job = queued(&"tea ".repeat(MAX_CARRIED_PAYLOAD / 4), std::time::Instant::now());
        let payload = payload(&mut job).unwrap();
        assert!(payload.len() < 1024, "{} bytes", payload.len());
        let sent: AiJob = serde_json::from_slice(&payload).unwrap();
        assert_eq!(sent.context, None);
        assert_eq!(sent.message_id, job.job.message_id, "the job itself goes");
    }
}
