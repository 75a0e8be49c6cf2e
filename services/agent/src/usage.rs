//! The usage events an agent reports, published together. Each caller waits until its event is stored
//! in the usage stream, as it would for a message of its own; but the events reported within
//! [`LINGER`] of one another, or while the previous message is on its way, go in one message (a JSON
//! array). A busy agent then publishes one message per batch, and quota and analytics each read and
//! acknowledge one, instead of one per model call: at a few thousand completions a second that work
//! was most of what NATS did for Parley, on cores the requests need.
//!
//! A batch carries no `Nats-Msg-Id` (a single event carries its own): nobody sends a batch again, and
//! both consumers are idempotent per event, so an event that its caller reports again after a failed
//! publish is charged and counted once whichever message brings it first. Each event carries its
//! call's `traceparent` in the payload, since a batch's headers can carry only one.

use std::time::Duration;

use async_nats::jetstream;
use parley_platform::events::UsageEvent;
use tokio::sync::{mpsc, oneshot};

use crate::AgentError;

/// How long the first event of a batch waits for others to join it.
pub(crate) const LINGER: Duration = Duration::from_millis(5);

/// An event waiting to be published, and who waits for it.
struct Pending {
    event: UsageEvent,
    stored: oneshot::Sender<Result<(), String>>,
}

/// The queue of this agent's usage events; its task publishes them until every handle is dropped.
#[derive(Clone)]
pub(crate) struct UsagePublisher {
    queue: mpsc::UnboundedSender<Pending>,
}

impl UsagePublisher {
    /// Starts the task that publishes on `subject`, at most `most` events a message (1: each alone).
    pub(crate) fn start(jetstream: jetstream::Context, subject: String, most: usize) -> Self {
        let (queue, received) = mpsc::unbounded_channel();
        tokio::spawn(publish_batches(jetstream, subject, received, most.max(1)));
        Self { queue }
    }

    /// Publishes `event`, returning once the usage stream has stored it.
    pub(crate) async fn publish(&self, event: UsageEvent) -> Result<(), AgentError> {
        let stopped = || AgentError::Nats("the usage publisher stopped".to_owned());
        let (stored, outcome) = oneshot::channel();
        self.queue.send(Pending { event, stored }).map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?.map_err(AgentError::Nats)
    }
}

/// Publishes what `received` brings, a batch at a time, until every sender is gone.
async fn publish_batches(
    jetstream: jetstream::Context,
    subject: String,
    mut received: mpsc::UnboundedReceiver<Pending>,
    most: usize,
) {
    let mut batch = Vec::with_capacity(most);
    while received.recv_many(&mut batch, most).await > 0 {
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < most {
            let more = most - batch.len();
            match tokio::time::timeout_at(deadline, received.recv_many(&mut batch, more)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let outcome = publish(&jetstream, &subject, &batch).await;
        for pending in batch.drain(..) {
            // A caller that gave up waiting has nothing left to tell.
            let _gone = pending.stored.send(outcome.clone());
        }
    }
}

async fn publish(jetstream: &jetstream::Context, subject: &str, batch: &[Pending]) -> Result<(), String> {
    let mut headers = async_nats::HeaderMap::new();
    let payload = match batch {
        [one] => {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, one.event.event_id.to_string().as_str());
            if let Some(traceparent) = &one.event.traceparent {
                headers.insert("traceparent", traceparent.as_str());
            }
            serde_json::to_vec(&one.event)
        }
        several => serde_json::to_vec(&several.iter().map(|pending| &pending.event).collect::<Vec<_>>()),
    }
    .map_err(|error| error.to_string())?;
    let ack = jetstream
        .publish_with_headers(subject.to_owned(), headers, payload.into())
        .await
        .map_err(|error| error.to_string())?;
    ack.await.map_err(|error| error.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use parley_platform::events::{UsageOutcome, usage_events};
    use parley_platform::nats::Names;
    use uuid::Uuid;

    use super::*;

    fn event(tokens: i64) -> UsageEvent {
        let id = Uuid::now_v7();
        UsageEvent {
            event_id: id,
            user_id: Uuid::now_v7(),
            conversation_id: Uuid::nil(),
            message_id: id,
            model: "parley-fake".to_owned(),
            provider: "fake".to_owned(),
            provider_model: String::new(),
            input_tokens: tokens,
            output_tokens: tokens,
            latency_ms: 1,
            time_to_first_token_ms: None,
            cache_hit: false,
            outcome: UsageOutcome::Completed,
            occurred_at_ms: 1_764_000_000_000,
            settlement: None,
            traceparent: Some(format!("00-{:032x}-{:016x}-01", tokens + 1, tokens + 1)),
        }
    }

    /// On this machine's NATS, in a usage stream of its own.
    #[tokio::test]
    async fn events_reported_together_share_a_message_and_each_caller_hears_they_are_stored() {
        let client = async_nats::connect("nats://127.0.0.1:4222").await.expect("NATS");
        let jetstream = jetstream::new(client);
        let names = Names::new(&format!("usage-test-{}", Uuid::now_v7().simple()));
        parley_platform::nats::ensure_usage_stream(&jetstream, &names).await.unwrap();
        let publisher = UsagePublisher::start(jetstream.clone(), names.usage_subject(), 4);

        // Six at once, at most four a message: two messages, in the order reported.
        let events: Vec<UsageEvent> = (0..6).map(event).collect();
        let published = futures::future::join_all(events.iter().cloned().map(|event| publisher.publish(event))).await;
        assert!(published.iter().all(Result::is_ok), "{published:?}");
        let stream = jetstream.get_stream(names.usage_stream()).await.unwrap();
        let mut read = Vec::new();
        for sequence in [1, 2] {
            let message = stream.get_raw_message(sequence).await.unwrap();
            assert_eq!(message.payload.first(), Some(&b'['));
            read.extend(usage_events(&message.payload).unwrap());
        }
        assert_eq!(read, events, "every event, each with its own trace context");

        // One alone goes as one event, deduplicated by its id and joined to its trace by its headers.
        let alone = event(7);
        publisher.publish(alone.clone()).await.unwrap();
        let message = stream.get_raw_message(3).await.unwrap();
        assert_eq!(usage_events(&message.payload).unwrap(), std::slice::from_ref(&alone));
        assert_eq!(message.payload.first(), Some(&b'{'));
        let header = |name: &str| message.headers.get(name).map(|value| value.as_str().to_owned());
        assert_eq!(header("Nats-Msg-Id"), Some(alone.event_id.to_string()));
        assert_eq!(header("traceparent"), alone.traceparent);
        assert_eq!(jetstream.get_stream(names.usage_stream()).await.unwrap().info().await.unwrap().state.messages, 3);
        jetstream.delete_stream(names.usage_stream()).await.unwrap();
    }
}
