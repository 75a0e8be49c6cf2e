//! Usage events from JetStream into `analytics.usage_events`, acknowledged only once stored.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use parley_platform::Config;
use parley_platform::events::UsageEvent;
use parley_platform::nats::Names;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub struct Ingester {
    config: Arc<Config>,
    pool: PgPool,
    jetstream: jetstream::Context,
    names: Names,
}

impl Ingester {
    pub fn new(config: Arc<Config>, pool: PgPool, jetstream: jetstream::Context) -> Self {
        let names = Names::new(&config.nats.prefix);
        Self { config, pool, jetstream, names }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match self.consume(&shutdown).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(%error, "usage ingestion interrupted; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        tracing::debug!("usage ingester stopped");
    }

    async fn consume(&self, shutdown: &CancellationToken) -> Result<(), async_nats::Error> {
        let consumer = parley_platform::nats::ensure_analytics_consumer(&self.jetstream, &self.names).await?;
        let mut messages = consumer.messages().await?;
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                next = messages.next() => match next {
                    Some(message) => message?,
                    None => return Err("usage consumer closed".into()),
                },
            };
            let event: UsageEvent = match serde_json::from_slice(&message.payload) {
                Ok(event) => event,
                Err(error) => {
                    tracing::error!(%error, "dropping a malformed usage event");
                    message.ack_with(AckKind::Term).await?;
                    continue;
                }
            };
            // The event joins the trace of the reply it accounts for.
            let span = tracing::info_span!(
                "analytics.ingest",
                service = "analytics",
                event_id = %event.event_id,
                trace_id = tracing::field::Empty,
            );
            if let Some(headers) = &message.headers {
                parley_platform::telemetry::set_parent_from(
                    &span,
                    &parley_platform::telemetry::NatsHeaderReader(headers),
                );
            }
            span.record("trace_id", parley_platform::telemetry::trace_id_of(&span));
            match self.store(&event).instrument(span).await {
                Ok(inserted) => {
                    if inserted {
                        metrics::counter!("parley_analytics_events_ingested_total").increment(1);
                    }
                    message.ack().await?;
                }
                Err(error) => {
                    tracing::warn!(%error, event_id = %event.event_id, "could not store usage event; will retry");
                    message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await?;
                }
            }
        }
    }

    /// Stores one event; false when it was already stored (a redelivery).
    async fn store(&self, event: &UsageEvent) -> Result<bool, sqlx::Error> {
        // A reply served from the response cache cost no model tokens.
        let cost_micros = if event.cache_hit {
            0
        } else {
            cost_micros(&self.config, &event.model, event.input_tokens, event.output_tokens)
        };
        let occurred_at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(event.occurred_at_ms) * 1_000_000)
            .unwrap_or_else(|_| OffsetDateTime::now_utc());
        let result = sqlx::query(
            "INSERT INTO analytics.usage_events (event_id, user_id, conversation_id, message_id, model, provider,
                 input_tokens, output_tokens, cost_micros, latency_ms, ttft_ms, cache_hit, outcome, occurred_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event.event_id)
        .bind(event.user_id)
        .bind(event.conversation_id)
        .bind(event.message_id)
        .bind(&event.model)
        .bind(&event.provider)
        .bind(event.input_tokens)
        .bind(event.output_tokens)
        .bind(cost_micros)
        .bind(event.latency_ms)
        .bind(event.time_to_first_token_ms)
        .bind(event.cache_hit)
        .bind(&event.outcome)
        .bind(occurred_at)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }
}

/// The price of a call in millionths of a US dollar, from the model's configured prices per million
/// tokens. Priced at ingestion, so a later price change does not rewrite history.
pub fn cost_micros(config: &Config, model: &str, input_tokens: i64, output_tokens: i64) -> i64 {
    let Some(prices) = config.models.get(model) else {
        return 0;
    };
    // USD per million tokens × tokens = micro-USD.
    let micros =
        prices.input_price_per_mtok * input_tokens as f64 + prices.output_price_per_mtok * output_tokens as f64;
    micros.round() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_follows_the_price_table() {
        let config = Config::default();
        // parley-fake: $0.50 in, $1.50 out per million tokens.
        assert_eq!(cost_micros(&config, "parley-fake", 1_000_000, 0), 500_000);
        assert_eq!(cost_micros(&config, "parley-fake", 1000, 2000), 500 + 3000);
        assert_eq!(cost_micros(&config, "unknown-model", 1000, 2000), 0);
    }
}
