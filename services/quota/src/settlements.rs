//! Charges that arrive on usage events. An agent reports each model call in one usage event, which
//! analytics stores and this consumer settles: the reservation is charged with the tokens the event
//! carries and the rest of it released. The charge needs no call of its own on the way, and a call is
//! charged exactly when it is reported. The events that arrive together (within `nats::BATCH_LINGER`
//! of each other) are settled concurrently (the ledger writes the charges in one statement, Redis
//! pipelines the scripts), each message (which may carry several events) acknowledged once its
//! settlements are stored and handed back for a retry when one could not be.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use parley_platform::events::UsageEvent;
use parley_platform::nats::Names;
use tokio_util::sync::CancellationToken;

use crate::{QuotaError, QuotaService};

/// Most events settled at once.
const BATCH: usize = 256;
/// How long a settlement that failed (the ledger unreachable) waits before it is delivered again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub struct Settlements {
    service: QuotaService,
    jetstream: jetstream::Context,
    names: Names,
}

impl Settlements {
    pub fn new(service: QuotaService, jetstream: jetstream::Context, names: Names) -> Self {
        Self { service, jetstream, names }
    }

    /// Settles usage events until `shutdown`, reconnecting with backoff when NATS goes away (charges
    /// wait in the stream meanwhile; reservations hold the budget until then or until they expire).
    pub async fn run(self, shutdown: CancellationToken) {
        parley_platform::nats::keep_consuming("usage settlement", &shutdown, || self.consume(&shutdown)).await;
    }

    async fn consume(&self, shutdown: &CancellationToken) -> Result<(), async_nats::Error> {
        let consumer =
            parley_platform::nats::ensure_usage_consumer(&self.jetstream, &self.names, self.names.quota_consumer())
                .await?;
        let mut batches = parley_platform::nats::delivered_in_batches(&consumer, BATCH).await?;
        while let Some((messages, interrupted)) = parley_platform::nats::next_delivered(&mut batches, shutdown).await? {
            let settled = futures::future::join_all(messages.iter().map(|message| self.settle(message))).await;
            for (message, outcome) in messages.iter().zip(settled) {
                let ack = match outcome {
                    Ok(()) => AckKind::Ack,
                    Err(Failure::Malformed(error)) => {
                        tracing::error!(%error, "dropping a malformed usage event");
                        AckKind::Term
                    }
                    Err(Failure::Quota(error)) => {
                        tracing::warn!(%error, "could not settle a usage event; will retry");
                        metrics::counter!(crate::metrics::SETTLEMENT_RETRIES).increment(1);
                        AckKind::Nak(Some(RETRY_AFTER))
                    }
                };
                message.ack_with(ack).await?;
            }
            if let Some(error) = interrupted {
                return Err(error);
            }
        }
        Ok(())
    }

    /// Settles the charges a message carries (one event's, or each of several events'). One that
    /// could not be stored hands the whole message back: settling an event again changes nothing.
    async fn settle(&self, message: &jetstream::Message) -> Result<(), Failure> {
        let events = parley_platform::events::usage_events(&message.payload)
            .map_err(|error| Failure::Malformed(error.to_string()))?;
        let settled = futures::future::join_all(events.iter().map(|event| self.settle_event(event))).await;
        let mut outcome = Ok(());
        for (event, result) in events.iter().zip(settled) {
            match result {
                Ok(()) => {}
                // A message of one event is dropped whole (the caller logs it); of several, the
                // malformed event alone.
                Err(Failure::Malformed(error)) if events.len() > 1 => {
                    tracing::error!(%error, event_id = %event.event_id, "dropping a malformed usage event");
                }
                Err(failure) if outcome.is_ok() => outcome = Err(failure),
                Err(_) => {}
            }
        }
        outcome
    }

    /// Settles the charge one event carries, if it carries one.
    async fn settle_event(&self, event: &UsageEvent) -> Result<(), Failure> {
        let Some(settlement) = event.settlement else {
            // Charged by its agent already (agents before settlements rode on the event).
            return Ok(());
        };
        if settlement.tokens < 0 {
            return Err(Failure::Malformed("a settlement cannot charge negative tokens".to_owned()));
        }
        match settlement.reservation_id {
            Some(reservation_id) => {
                self.service.settle_reservation(event.user_id, &reservation_id.to_string(), settlement.tokens).await?;
            }
            None if settlement.tokens == 0 => {}
            None => {
                self.service.charge_reference(event.user_id, &event.message_id.to_string(), settlement.tokens).await?;
            }
        }
        Ok(())
    }
}

enum Failure {
    /// Not a usage event: it can never be settled.
    Malformed(String),
    /// The ledger could not take the charge: settle it later.
    Quota(QuotaError),
}

impl From<QuotaError> for Failure {
    fn from(error: QuotaError) -> Self {
        Self::Quota(error)
    }
}
