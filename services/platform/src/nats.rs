//! NATS connections, and the names of every stream, consumer and subject Parley uses, derived from one
//! prefix so that deployments (and tests) sharing a NATS server never see each other's messages.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::config::NatsConfig;

/// Stream, consumer and subject names for one deployment.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
    stream_prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned(), stream_prefix: prefix.to_ascii_uppercase().replace('-', "_") }
    }

    /// Work queue of AI jobs.
    pub fn jobs_stream(&self) -> String {
        format!("{}_JOBS", self.stream_prefix)
    }

    pub fn jobs_subject(&self) -> String {
        format!("{}.jobs.chat", self.prefix)
    }

    /// Core NATS subject on which a revoked API key's id is announced to every gateway.
    pub fn api_key_revocations_subject(&self) -> String {
        format!("{}.identity.api-keys.revoked", self.prefix)
    }

    /// Core NATS subject on which tier and role changes are announced to every gateway.
    pub fn account_changes_subject(&self) -> String {
        format!("{}.identity.account-changed", self.prefix)
    }

    /// Every stream of this deployment (for tests that clean up after themselves).
    pub fn all_streams(&self) -> [String; 5] {
        [self.jobs_stream(), self.usage_stream(), self.events_stream(), self.dead_jobs_stream(), self.alerts_stream()]
    }

    /// Alerts the platform raises for operators (cost thresholds crossed), kept for a month.
    pub fn alerts_stream(&self) -> String {
        format!("{}_ALERTS", self.stream_prefix)
    }

    /// Where a crossed daily spend threshold is announced.
    pub fn cost_alerts_subject(&self) -> String {
        format!("{}.alerts.cost", self.prefix)
    }

    /// Jobs given up on, kept for inspection and replay.
    pub fn dead_jobs_stream(&self) -> String {
        format!("{}_JOBS_DEAD", self.stream_prefix)
    }

    pub fn dead_jobs_subject(&self) -> String {
        format!("{}.jobs-dead.chat", self.prefix)
    }

    /// The durable consumer every agent replica pulls from.
    pub fn agent_consumer(&self) -> &'static str {
        "agent"
    }

    /// Usage events, kept for replay by analytics.
    pub fn usage_stream(&self) -> String {
        format!("{}_USAGE", self.stream_prefix)
    }

    pub fn usage_subject(&self) -> String {
        format!("{}.usage.events", self.prefix)
    }

    pub fn analytics_consumer(&self) -> &'static str {
        "analytics"
    }

    /// The quota service's consumer of usage events, which settles the charges they carry.
    pub fn quota_consumer(&self) -> &'static str {
        "quota"
    }

    /// The subject carrying the events of one assistant message (deltas, then completed or failed).
    pub fn message_events_subject(&self, message_id: Uuid) -> String {
        format!("{}.messages.{message_id}", self.prefix)
    }

    /// Short-lived record of every message's events, so any gateway can replay a reply from its start.
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.stream_prefix)
    }

    /// Core NATS subject on which a client's stop of a reply being generated reaches every agent.
    pub fn stop_subject(&self, message_id: Uuid) -> String {
        format!("{}.stops.{message_id}", self.prefix)
    }

    /// Every reply's stop: what each agent follows.
    pub fn all_stops(&self) -> String {
        format!("{}.stops.*", self.prefix)
    }

    /// Every message's events: what the events stream records and what each gateway follows.
    pub fn all_message_events(&self) -> String {
        format!("{}.messages.>", self.prefix)
    }
}

/// Announces an account's current tier and role to every gateway, which apply them over the claims
/// of tokens issued before (core NATS: a gateway that misses it catches up with the user's next token).
pub async fn announce_account_change(
    client: &async_nats::Client,
    names: &Names,
    user_id: Uuid,
    tier: &str,
    role: &str,
) -> Result<(), async_nats::Error> {
    let change =
        crate::events::AccountChanged { user_id, tier: tier.to_owned(), role: role.to_owned(), deleted: false };
    client.publish(names.account_changes_subject(), serde_json::to_vec(&change)?.into()).await?;
    Ok(())
}

/// Announces an account's deletion to every gateway, which refuse its tokens from then on (core NATS:
/// a gateway that misses it accepts an access token issued before for the rest of its short life).
pub async fn announce_account_deleted(
    client: &async_nats::Client,
    names: &Names,
    user_id: Uuid,
) -> Result<(), async_nats::Error> {
    let change = crate::events::AccountChanged { user_id, tier: String::new(), role: String::new(), deleted: true };
    client.publish(names.account_changes_subject(), serde_json::to_vec(&change)?.into()).await?;
    Ok(())
}

/// How long a message's events stay replayable. A client that reconnects later still gets the stored
/// reply in its `message.completed` event.
pub const EVENTS_RETENTION: Duration = Duration::from_secs(3600);

/// The message event stream: kept an hour and capped in size (`nats.events_max_bytes`), the oldest
/// events dropped first. File-backed: JetStream reserves a stream's whole cap up front, and memory is
/// the scarcer of the two; the events are a convenience anyway (the stored message is the truth).
pub async fn ensure_events_stream(
    js: &jetstream::Context,
    names: &Names,
    config: &NatsConfig,
) -> Result<stream::Stream, async_nats::Error> {
    let config = stream::Config {
        name: names.events_stream(),
        subjects: vec![names.all_message_events()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: EVENTS_RETENTION,
        max_bytes: config.events_max_bytes,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    };
    Ok(js.get_or_create_stream(config).await?)
}

pub async fn connect(config: &NatsConfig, client_name: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::new()
        .name(client_name)
        .connection_timeout(Duration::from_secs(5))
        .retry_on_initial_connect()
        .connect(&config.url)
        .await
}

/// The AI job stream: a work queue (each job is removed once an agent acknowledges it), with a
/// deduplication window that drops a job the outbox relay publishes twice.
pub async fn ensure_jobs_stream(js: &jetstream::Context, names: &Names) -> Result<stream::Stream, async_nats::Error> {
    let config = stream::Config {
        name: names.jobs_stream(),
        subjects: vec![names.jobs_subject()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    Ok(js.get_or_create_stream(config).await?)
}

/// The dead-letter stream: jobs an agent gave up on, with the reason in their headers, kept 14 days.
pub async fn ensure_dead_jobs_stream(
    js: &jetstream::Context,
    names: &Names,
) -> Result<stream::Stream, async_nats::Error> {
    let config = stream::Config {
        name: names.dead_jobs_stream(),
        subjects: vec![names.dead_jobs_subject()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(14 * 24 * 3600),
        ..Default::default()
    };
    Ok(js.get_or_create_stream(config).await?)
}

/// The agents' durable pull consumer on the job stream.
pub async fn ensure_agent_consumer(
    js: &jetstream::Context,
    names: &Names,
    config: &NatsConfig,
) -> Result<consumer::Consumer<consumer::pull::Config>, async_nats::Error> {
    let stream = ensure_jobs_stream(js, names).await?;
    let consumer_config = consumer::pull::Config {
        durable_name: Some(names.agent_consumer().to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(config.job_ack_wait_secs),
        // One more than the agent's own limit, so the agent sees the last delivery and can mark the
        // message failed instead of JetStream silently dropping it.
        max_deliver: config.job_max_deliver + 1,
        max_ack_pending: 10_000,
        ..Default::default()
    };
    Ok(stream.get_or_create_consumer(names.agent_consumer(), consumer_config).await?)
}

/// The usage event stream: kept (limits retention) so analytics can replay it.
pub async fn ensure_usage_stream(js: &jetstream::Context, names: &Names) -> Result<stream::Stream, async_nats::Error> {
    let config = stream::Config {
        name: names.usage_stream(),
        subjects: vec![names.usage_subject()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(7 * 24 * 3600),
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    Ok(js.get_or_create_stream(config).await?)
}

/// The alerts stream: operators' tools subscribe to it (or read it back) to hear of crossed thresholds.
pub async fn ensure_alerts_stream(js: &jetstream::Context, names: &Names) -> Result<stream::Stream, async_nats::Error> {
    let config = stream::Config {
        name: names.alerts_stream(),
        subjects: vec![format!("{}.alerts.>", names.prefix)],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(31 * 24 * 3600),
        duplicate_window: Duration::from_secs(3600),
        ..Default::default()
    };
    Ok(js.get_or_create_stream(config).await?)
}

/// Exports a durable consumer's backlog every `every` until `shutdown`:
/// `parley_jetstream_consumer_pending_messages` (published, not yet delivered) and
/// `parley_jetstream_consumer_ack_pending_messages` (delivered, not yet acknowledged), labelled by
/// stream and consumer. Every replica exports the same figures; dashboards take the max.
pub async fn export_consumer_backlog(
    js: jetstream::Context,
    stream: String,
    consumer: &'static str,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let info = async {
            let mut consumer: consumer::PullConsumer = js.get_consumer_from_stream(consumer, &stream).await?;
            Ok::<_, async_nats::Error>(consumer.info().await?.clone())
        };
        match info.await {
            Ok(info) => {
                let labels = [("stream", stream.clone()), ("consumer", consumer.to_owned())];
                metrics::gauge!(crate::metrics::JETSTREAM_CONSUMER_PENDING, &labels).set(info.num_pending as f64);
                metrics::gauge!(crate::metrics::JETSTREAM_CONSUMER_ACK_PENDING, &labels)
                    .set(info.num_ack_pending as f64);
            }
            Err(error) => tracing::debug!(%error, %stream, consumer, "could not read the consumer's backlog"),
        }
    }
}

/// A durable consumer of the usage stream: analytics' (`Names::analytics_consumer`) and quota's
/// (`Names::quota_consumer`) each read every event. From the stream's start when first made: quota
/// acknowledges and skips an event that carries no settlement, and both are idempotent.
pub async fn ensure_usage_consumer(
    js: &jetstream::Context,
    names: &Names,
    durable_name: &str,
) -> Result<consumer::Consumer<consumer::pull::Config>, async_nats::Error> {
    let stream = ensure_usage_stream(js, names).await?;
    let consumer_config = consumer::pull::Config {
        durable_name: Some(durable_name.to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        ..Default::default()
    };
    Ok(stream.get_or_create_consumer(durable_name, consumer_config).await?)
}

/// How long a consumer that stores its messages in batches waits, after a message arrives, for more to
/// store with it. Under load a batch fills before then; at a trickle (one completion at a time) each
/// event would otherwise cost a transaction, a commit's flush and a wake-up of its own, work that
/// competes with the requests for the same cores. A usage event is settled and counted this much later.
pub const BATCH_LINGER: Duration = Duration::from_millis(20);

/// A pull consumer's messages in batches of at most `most`, each one what arrived within
/// [`BATCH_LINGER`] of its first message; read them with [`next_delivered`].
pub async fn delivered_in_batches(
    consumer: &consumer::Consumer<consumer::pull::Config>,
    most: usize,
) -> Result<
    std::pin::Pin<Box<impl futures::Stream<Item = Vec<Result<jetstream::Message, consumer::pull::MessagesError>>>>>,
    async_nats::Error,
> {
    use tokio_stream::StreamExt;
    Ok(Box::pin(consumer.messages().await?.chunks_timeout(most, BATCH_LINGER)))
}

/// The messages a pull consumer delivered together (read with [`delivered_in_batches`]), with the
/// error that cut the delivery short, if one did: the caller handles the messages, then returns the
/// error so that [`keep_consuming`] reconnects. `None` once `shutdown` is cancelled.
pub async fn next_delivered<S, E>(
    batches: &mut S,
    shutdown: &CancellationToken,
) -> Result<Option<(Vec<jetstream::Message>, Option<async_nats::Error>)>, async_nats::Error>
where
    S: futures::Stream<Item = Vec<Result<jetstream::Message, E>>> + Unpin,
    E: Into<async_nats::Error>,
{
    use futures::StreamExt;
    let batch = tokio::select! {
        _ = shutdown.cancelled() => return Ok(None),
        next = batches.next() => next.ok_or("the consumer's message stream ended")?,
    };
    let mut messages = Vec::with_capacity(batch.len());
    let mut interrupted = None;
    for message in batch {
        match message {
            Ok(message) => messages.push(message),
            Err(error) => {
                interrupted.get_or_insert(error.into());
            }
        }
    }
    Ok(Some((messages, interrupted)))
}

/// Runs `consume` until it returns `Ok` (it saw `shutdown`) or `shutdown` is cancelled, starting it
/// again with backoff after each error (NATS away, a consumer deleted): the loop of a service's
/// JetStream consumer.
pub async fn keep_consuming<F, Fut>(what: &str, shutdown: &CancellationToken, mut consume: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), async_nats::Error>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    while !shutdown.is_cancelled() {
        match consume().await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(%error, "{what} interrupted; retrying");
                if !backoff.wait(shutdown).await {
                    break;
                }
            }
        }
    }
    tracing::debug!("{what} stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let names = Names::new("t-1a2b");
        assert_eq!(names.jobs_stream(), "T_1A2B_JOBS");
        assert_eq!(names.jobs_subject(), "t-1a2b.jobs.chat");
        assert_eq!(names.usage_stream(), "T_1A2B_USAGE");
    }
}
