//! Usage events from JetStream into `analytics.usage_events`, acknowledged only once stored.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use parley_platform::Config;
use parley_platform::events::{CostAlert, UsageEvent};
use parley_platform::nats::Names;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

pub struct Ingester {
    config: Arc<Config>,
    pool: PgPool,
    jetstream: jetstream::Context,
    names: Names,
    /// Months whose partition is known to exist.
    partitions: Mutex<HashSet<(i32, u8)>>,
    wake_alerts: Arc<Notify>,
}

impl Ingester {
    pub fn new(config: Arc<Config>, pool: PgPool, jetstream: jetstream::Context) -> Self {
        let names = Names::new(&config.nats.prefix);
        let (partitions, wake_alerts) = (Mutex::default(), Arc::default());
        Self { config, pool, jetstream, names, partitions, wake_alerts }
    }

    pub fn jetstream(&self) -> jetstream::Context {
        self.jetstream.clone()
    }

    /// The task that publishes the alerts this ingester raises.
    pub fn alert_publisher(&self) -> AlertPublisher {
        AlertPublisher {
            pool: self.pool.clone(),
            jetstream: self.jetstream.clone(),
            names: self.names.clone(),
            wake: self.wake_alerts.clone(),
        }
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
            let event = serde_json::from_slice::<UsageEvent>(&message.payload)
                .map_err(|error| error.to_string())
                .and_then(|event| match occurred_at(&event) {
                    Some(_) => Ok(event),
                    None => Err("occurred_at_ms is out of range".to_owned()),
                });
            let event = match event {
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

    /// Stores one event with its rollups and any alert it raises, in one transaction; false when it
    /// was already stored (a redelivery). Raised alerts are published after the commit.
    async fn store(&self, event: &UsageEvent) -> Result<bool, sqlx::Error> {
        // A reply served from the response cache cost no model tokens.
        let cost_micros = if event.cache_hit {
            0
        } else {
            cost_micros(&self.config, &event.model, event.input_tokens, event.output_tokens)
        };
        // Checked when the event was read: an out-of-range time is a malformed event.
        let occurred_at = occurred_at(event).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        self.ensure_partition(occurred_at).await?;
        let mut tx = self.pool.begin().await?;
        let result = sqlx::query(
            "INSERT INTO analytics.usage_events (event_id, user_id, conversation_id, message_id, model, provider,
                 input_tokens, output_tokens, cost_micros, latency_ms, ttft_ms, cache_hit, outcome, occurred_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
             ON CONFLICT (event_id, occurred_at) DO NOTHING",
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
        .execute(&mut *tx)
        .await?;
        if result.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        let day = occurred_at.date();
        sqlx::query(
            "INSERT INTO analytics.usage_daily AS d
                 (day, user_id, model, requests, input_tokens, output_tokens, cost_micros, cache_hits, failures)
             VALUES ($1, $2, $3, 1, $4, $5, $6, $7, $8)
             ON CONFLICT (day, user_id, model) DO UPDATE
             SET requests = d.requests + 1, input_tokens = d.input_tokens + EXCLUDED.input_tokens,
                 output_tokens = d.output_tokens + EXCLUDED.output_tokens,
                 cost_micros = d.cost_micros + EXCLUDED.cost_micros, cache_hits = d.cache_hits + EXCLUDED.cache_hits,
                 failures = d.failures + EXCLUDED.failures",
        )
        .bind(day)
        .bind(event.user_id)
        .bind(&event.model)
        .bind(event.input_tokens)
        .bind(event.output_tokens)
        .bind(cost_micros)
        .bind(i64::from(event.cache_hit))
        .bind(i64::from(event.outcome != "completed"))
        .execute(&mut *tx)
        .await?;
        let mut raised = Vec::new();
        // Spend only rises with a priced call: free events leave the alert state alone.
        if cost_micros > 0 {
            let (global,): (i64,) = sqlx::query_as(
                "INSERT INTO analytics.spend_daily AS s (day, cost_micros) VALUES ($1, $2)
                 ON CONFLICT (day) DO UPDATE SET cost_micros = s.cost_micros + EXCLUDED.cost_micros
                 RETURNING cost_micros",
            )
            .bind(day)
            .bind(cost_micros)
            .fetch_one(&mut *tx)
            .await?;
            let (user,): (i64,) = sqlx::query_as(
                "SELECT COALESCE(SUM(cost_micros), 0)::bigint FROM analytics.usage_daily WHERE day = $1 AND user_id = $2",
            )
            .bind(day)
            .bind(event.user_id)
            .fetch_one(&mut *tx)
            .await?;
            let analytics = &self.config.analytics;
            let checks = [
                ("user", event.user_id, user, &analytics.user_daily_spend_alerts_usd),
                ("global", Uuid::nil(), global, &analytics.global_daily_spend_alerts_usd),
            ];
            for (scope, user_id, spent, thresholds) in checks {
                for threshold in thresholds.iter().map(|usd| usd_to_micros(*usd)).filter(|&t| spent >= t) {
                    let inserted = sqlx::query(
                        "INSERT INTO analytics.cost_alerts (day, scope, user_id, threshold_micros, alert_id, spent_micros)
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    )
                    .bind(day)
                    .bind(scope)
                    .bind(user_id)
                    .bind(threshold)
                    .bind(Uuid::now_v7())
                    .bind(spent)
                    .execute(&mut *tx)
                    .await?;
                    if inserted.rows_affected() == 1 {
                        raised.push(scope);
                    }
                }
            }
        }
        tx.commit().await?;
        if cost_micros > 0 {
            metrics::counter!("parley_analytics_cost_microdollars_total", "model" => event.model.clone())
                .increment(cost_micros.unsigned_abs());
        }
        for scope in raised {
            tracing::warn!(scope, user_id = %event.user_id, "daily spend threshold crossed");
            metrics::counter!("parley_analytics_cost_alerts_total", "scope" => scope).increment(1);
            self.wake_alerts.notify_one();
        }
        Ok(true)
    }

    /// Creates the month partition an event belongs in, once per month per process.
    async fn ensure_partition(&self, at: OffsetDateTime) -> Result<(), sqlx::Error> {
        let month = (at.year(), u8::from(at.month()));
        if self.partitions.lock().is_ok_and(|months| months.contains(&month)) {
            return Ok(());
        }
        sqlx::query("SELECT analytics.ensure_usage_partition($1)").bind(at).execute(&self.pool).await?;
        if let Ok(mut months) = self.partitions.lock() {
            months.insert(month);
        }
        Ok(())
    }
}

/// When the event happened; `None` when its timestamp is out of range (a malformed event).
fn occurred_at(event: &UsageEvent) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(event.occurred_at_ms) * 1_000_000).ok()
}

fn usd_to_micros(usd: f64) -> i64 {
    (usd * 1_000_000.0).round() as i64
}

/// Publishes raised alerts that are not on NATS yet, oldest first, until `shutdown`. An alert is
/// marked published only after JetStream acknowledged it; its id is the message id, so a publish
/// repeated after a crash is dropped as a duplicate.
pub struct AlertPublisher {
    pool: PgPool,
    jetstream: jetstream::Context,
    names: Names,
    wake: Arc<Notify>,
}

#[derive(sqlx::FromRow)]
struct AlertRow {
    alert_id: Uuid,
    day: time::Date,
    scope: String,
    user_id: Uuid,
    threshold_micros: i64,
    spent_micros: i64,
    raised_at: OffsetDateTime,
}

impl AlertPublisher {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = ticker.tick() => {}
            }
            if let Err(error) = self.publish_pending().await {
                tracing::warn!(%error, "could not publish cost alerts; will retry");
            }
        }
    }

    async fn publish_pending(&self) -> Result<(), async_nats::Error> {
        let alerts: Vec<AlertRow> = sqlx::query_as(
            "SELECT alert_id, day, scope, user_id, threshold_micros, spent_micros, raised_at FROM analytics.cost_alerts
             WHERE published_at IS NULL ORDER BY raised_at LIMIT 100",
        )
        .fetch_all(&self.pool)
        .await?;
        if alerts.is_empty() {
            return Ok(());
        }
        parley_platform::nats::ensure_alerts_stream(&self.jetstream, &self.names).await?;
        for alert in alerts {
            let payload = CostAlert {
                alert_id: alert.alert_id,
                user_id: (alert.scope == "user").then_some(alert.user_id),
                scope: alert.scope,
                day: alert.day.to_string(),
                threshold_usd: alert.threshold_micros as f64 / 1_000_000.0,
                spent_usd: alert.spent_micros as f64 / 1_000_000.0,
                raised_at_ms: (alert.raised_at.unix_timestamp_nanos() / 1_000_000) as i64,
            };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", alert.alert_id.to_string().as_str());
            self.jetstream
                .publish_with_headers(self.names.cost_alerts_subject(), headers, serde_json::to_vec(&payload)?.into())
                .await?
                .await?;
            sqlx::query("UPDATE analytics.cost_alerts SET published_at = now() WHERE alert_id = $1")
                .bind(alert.alert_id)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
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
