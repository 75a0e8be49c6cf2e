//! Stopping a reply while it is generated: a client's stop (`POST /v1/messages/{id}/stop`) is announced
//! on core NATS to every agent; the one generating that reply ends its provider call and keeps what was
//! streamed so far as the finished reply, charged for what was generated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The replies this agent is generating, each with the token that stops it and the number of the
/// run that registered it.
#[derive(Default)]
pub(crate) struct Stops {
    running: Mutex<HashMap<Uuid, (u64, CancellationToken)>>,
    runs: std::sync::atomic::AtomicU64,
}

/// A reply's job, from before its first provider call to its end (retries and fallbacks included);
/// dropping it forgets the reply.
pub(crate) struct Running {
    stops: Arc<Stops>,
    message_id: Uuid,
    run: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = self.stops.lock();
        // A later run of the same reply (a redelivery) keeps its own entry.
        if running.get(&self.message_id).is_some_and(|(run, _)| *run == self.run) {
            running.remove(&self.message_id);
        }
    }
}

impl Stops {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (u64, CancellationToken)>> {
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a reply this agent is about to generate.
    pub(crate) fn run(self: &Arc<Self>, message_id: Uuid) -> Running {
        let run = self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().insert(message_id, (run, CancellationToken::new()));
        Running { stops: self.clone(), message_id, run }
    }

    /// The token that a stop of the reply cancels, while its job runs here.
    pub(crate) fn token(&self, message_id: Uuid) -> Option<CancellationToken> {
        self.lock().get(&message_id).map(|(_, token)| token.clone())
    }

    /// Stops the reply, if this agent is generating it.
    pub(crate) fn stop(&self, message_id: Uuid) -> bool {
        self.lock().get(&message_id).map(|(_, token)| token.cancel()).is_some()
    }

    /// Follows the stops announced on `subjects` (`<prefix>.stops.*`) until `shutdown` (or until its
    /// task is aborted), resubscribing when the subscription ends.
    pub(crate) async fn follow(
        self: Arc<Self>,
        nats: async_nats::Client,
        subjects: String,
        shutdown: CancellationToken,
    ) {
        while !shutdown.is_cancelled() {
            let mut subscriber = match nats.subscribe(subjects.clone()).await {
                Ok(subscriber) => subscriber,
                Err(error) => {
                    tracing::warn!(%error, "could not follow reply stops; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let message = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    message = subscriber.next() => message,
                };
                let Some(message) = message else { break };
                let id = message.subject.rsplit('.').next().and_then(|id| Uuid::parse_str(id).ok());
                if let Some(id) = id
                    && self.stop(id)
                {
                    tracing::info!(message_id = %id, "a client stopped the reply");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_reaches_only_a_reply_being_generated() {
        let stops = Arc::new(Stops::default());
        let id = Uuid::now_v7();
        assert!(!stops.stop(id), "nothing runs yet");
        let running = stops.run(id);
        assert!(stops.stop(id));
        assert!(stops.token(id).unwrap().is_cancelled());
        // A redelivered job's run replaces the first; the first ending does not forget the second.
        let again = stops.run(id);
        drop(running);
        assert!(!stops.token(id).unwrap().is_cancelled());
        drop(again);
        assert!(!stops.stop(id), "a finished reply is forgotten");
    }
}
