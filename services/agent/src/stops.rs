//! Stopping a reply while it is generated: a client's stop (`POST /v1/messages/{id}/stop`) is announced
//! on core NATS to every agent; the one generating that reply ends its provider call and keeps what was
//! streamed so far as the finished reply, charged for what was generated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The replies this agent is generating, each with the token that stops it.
#[derive(Default)]
pub(crate) struct Stops {
    running: Mutex<HashMap<Uuid, CancellationToken>>,
}

/// A reply being generated; dropping it forgets the reply.
pub(crate) struct Running {
    stops: Arc<Stops>,
    message_id: Uuid,
    token: CancellationToken,
}

impl Running {
    /// Resolves when a client stops the reply.
    pub(crate) async fn stopped(&self) {
        self.token.cancelled().await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stops.lock().remove(&self.message_id);
    }
}

impl Stops {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, CancellationToken>> {
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a reply this agent is about to generate.
    pub(crate) fn run(self: &Arc<Self>, message_id: Uuid) -> Running {
        let token = CancellationToken::new();
        self.lock().insert(message_id, token.clone());
        Running { stops: self.clone(), message_id, token }
    }

    /// Stops the reply, if this agent is generating it.
    pub(crate) fn stop(&self, message_id: Uuid) -> bool {
        self.lock().get(&message_id).map(CancellationToken::cancel).is_some()
    }

    /// Follows the stops announced on `subjects` (`<prefix>.stops.*`) until `shutdown`, resubscribing
    /// when the subscription ends.
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
        assert!(running.token.is_cancelled());
        drop(running);
        assert!(!stops.stop(id), "a finished reply is forgotten");
    }
}
