//! Usage events from JetStream into `analytics.usage_events`, acknowledged only once stored. The events
//! that arrive together (within `nats::BATCH_LINGER` of each other) are stored in one transaction with
//! their rollups, so the work per event falls as the load rises.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use parley_platform::Config;
use parley_platform::events::{AlertScope, CostAlert, UsageEvent};
use parley_platform::nats::Names;
use sqlx::PgPool;
use time::{Date, OffsetDateTime};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// Most events stored in one transaction.
const BATCH: usize = 256;

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
        parley_platform::nats::keep_consuming("usage ingestion", &shutdown, || self.consume(&shutdown)).await;
    }

    async fn consume(&self, shutdown: &CancellationToken) -> Result<(), async_nats::Error> {
        let consumer =
            parley_platform::nats::ensure_usage_consumer(&self.jetstream, &self.names, self.names.analytics_consumer())
                .await?;
        // What arrives within a few milliseconds is stored together: one transaction per batch.
        let mut batches = parley_platform::nats::delivered_in_batches(&consumer, BATCH).await?;
        while let Some((messages, interrupted)) = parley_platform::nats::next_delivered(&mut batches, shutdown).await? {
            let mut received = Vec::with_capacity(messages.len());
            for message in messages {
                if let Some(events) = self.read(&message).await? {
                    received.push((message, events));
                }
            }
            self.ingest(received).await?;
            if let Some(error) = interrupted {
                return Err(error);
            }
        }
        Ok(())
    }

    /// The events a message carries, each with the span that joins it to its reply's trace; `None` (and
    /// the message terminated) when it is unreadable. An event of a message that carries several, whose
    /// time is out of range, is dropped alone: the others are stored.
    async fn read(
        &self,
        message: &jetstream::Message,
    ) -> Result<Option<Vec<(UsageEvent, tracing::Span)>>, async_nats::Error> {
        let events = match parley_platform::events::usage_events(&message.payload) {
            Ok(events) => events,
            Err(error) => {
                tracing::error!(%error, "dropping a malformed usage event");
                message.ack_with(AckKind::Term).await?;
                return Ok(None);
            }
        };
        let (events, malformed): (Vec<UsageEvent>, Vec<UsageEvent>) =
            events.into_iter().partition(|event| occurred_at(event).is_some());
        for event in &malformed {
            tracing::error!(event_id = %event.event_id, "dropping a malformed usage event: occurred_at_ms is out of range");
        }
        if events.is_empty() {
            message.ack_with(AckKind::Term).await?;
            return Ok(None);
        }
        let spanned = events
            .into_iter()
            .map(|event| {
                // The span lasts from the event's arrival until its batch is stored.
                let span = tracing::info_span!(
                    "analytics.ingest",
                    service = "analytics",
                    event_id = %event.event_id,
                    trace_id = tracing::field::Empty,
                );
                match (&event.traceparent, &message.headers) {
                    (Some(traceparent), _) => {
                        parley_platform::telemetry::set_parent_from_traceparent(&span, traceparent)
                    }
                    (None, Some(headers)) => parley_platform::telemetry::set_parent_from(
                        &span,
                        &parley_platform::telemetry::NatsHeaderReader(headers),
                    ),
                    (None, None) => {}
                }
                span.record("trace_id", parley_platform::telemetry::trace_id_of(&span));
                (event, span)
            })
            .collect();
        Ok(Some(spanned))
    }

    /// Stores a batch and acknowledges each of its messages, or hands them all back for a retry.
    async fn ingest(
        &self,
        received: Vec<(jetstream::Message, Vec<(UsageEvent, tracing::Span)>)>,
    ) -> Result<(), async_nats::Error> {
        if received.is_empty() {
            return Ok(());
        }
        let events: Vec<&UsageEvent> =
            received.iter().flat_map(|(_, events)| events.iter().map(|(event, _)| event)).collect();
        let span = tracing::info_span!("analytics.ingest_batch", service = "analytics", events = events.len());
        match self.store(&events).instrument(span).await {
            Ok(inserted) => {
                metrics::counter!(crate::metrics::EVENTS_INGESTED).increment(inserted as u64);
                for (message, _) in &received {
                    message.ack().await?;
                }
            }
            Err(error) => {
                tracing::warn!(%error, events = events.len(), "could not store usage events; will retry");
                for (message, _) in &received {
                    message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await?;
                }
            }
        }
        Ok(())
    }

    /// Stores events with their rollups and any alert they raise, in one transaction; the number
    /// stored (a redelivered event is already there and counts nothing). Raised alerts are published
    /// after the commit.
    pub(crate) async fn store(&self, events: &[&UsageEvent]) -> Result<usize, sqlx::Error> {
        let priced: Vec<(&UsageEvent, OffsetDateTime, i64)> = events
            .iter()
            .map(|event| {
                // A reply served from the response cache cost no model tokens.
                let cost = if event.cache_hit { 0 } else { cost_micros(&self.config, event) };
                // Checked when the event was read: an out-of-range time is a malformed event.
                (*event, occurred_at(event).unwrap_or(OffsetDateTime::UNIX_EPOCH), cost)
            })
            .collect();
        for (_, at, _) in &priced {
            self.ensure_partition(*at).await?;
        }
        let mut tx = self.pool.begin().await?;
        // The events of deleted accounts are stored anonymised (see `service::ERASURE_LOCK`).
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(crate::service::ERASURE_LOCK)
            .execute(&mut *tx)
            .await?;
        let users: Vec<Uuid> = priced.iter().map(|(event, _, _)| event.user_id).collect();
        let erased: HashSet<Uuid> =
            sqlx::query_scalar("SELECT user_id FROM analytics.erased_users WHERE user_id = ANY($1)")
                .bind(&users)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
        let anonymised: HashMap<Uuid, UsageEvent> = priced
            .iter()
            .filter(|(event, _, _)| erased.contains(&event.user_id))
            .map(|(event, _, _)| (event.event_id, UsageEvent { user_id: Uuid::nil(), ..(*event).clone() }))
            .collect();
        let priced: Vec<(&UsageEvent, OffsetDateTime, i64)> = priced
            .into_iter()
            .map(|(event, at, cost)| (anonymised.get(&event.event_id).unwrap_or(event), at, cost))
            .collect();
        let ids = |pick: fn(&UsageEvent) -> Uuid| priced.iter().map(|(event, _, _)| pick(event)).collect::<Vec<_>>();
        let stored: Vec<(Uuid,)> = sqlx::query_as(
            "INSERT INTO analytics.usage_events (event_id, user_id, conversation_id, message_id, model, provider,
                 input_tokens, output_tokens, cost_micros, latency_ms, ttft_ms, cache_hit, outcome, occurred_at)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::text[],
                 $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::boolean[], $13::text[],
                 $14::timestamptz[])
             ON CONFLICT (event_id, occurred_at) DO NOTHING
             RETURNING event_id",
        )
        .bind(ids(|event| event.event_id))
        .bind(ids(|event| event.user_id))
        .bind(ids(|event| event.conversation_id))
        .bind(ids(|event| event.message_id))
        .bind(priced.iter().map(|(event, _, _)| event.model.as_str()).collect::<Vec<_>>())
        .bind(priced.iter().map(|(event, _, _)| event.provider.as_str()).collect::<Vec<_>>())
        .bind(priced.iter().map(|(event, _, _)| event.input_tokens).collect::<Vec<_>>())
        .bind(priced.iter().map(|(event, _, _)| event.output_tokens).collect::<Vec<_>>())
        .bind(priced.iter().map(|(_, _, cost)| *cost).collect::<Vec<_>>())
        .bind(priced.iter().map(|(event, _, _)| event.latency_ms).collect::<Vec<_>>())
        .bind(priced.iter().map(|(event, _, _)| event.time_to_first_token_ms).collect::<Vec<_>>())
        .bind(priced.iter().map(|(event, _, _)| event.cache_hit).collect::<Vec<_>>())
        .bind(priced.iter().map(|(event, _, _)| event.outcome.as_str()).collect::<Vec<_>>())
        .bind(priced.iter().map(|(_, at, _)| *at).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?;
        if stored.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        // Only what was stored now counts: a redelivered event is already in the rollups.
        let mut new: HashSet<Uuid> = stored.into_iter().map(|(id,)| id).collect();
        let stored = new.len();
        let mut rollups = Rollups::default();
        // Taken out of the set as it is counted: an event delivered twice in one batch counts once.
        for (event, at, cost) in priced.iter().filter(|(event, _, _)| new.remove(&event.event_id)) {
            rollups.add(event, at.date(), *cost);
        }
        rollups.write(&mut tx).await?;
        let raised = self.raise_alerts(&mut tx, &rollups).await?;
        tx.commit().await?;
        for (model, cost) in &rollups.cost_by_model {
            metrics::counter!(crate::metrics::COST_MICRODOLLARS, "model" => model.clone())
                .increment(cost.unsigned_abs());
        }
        for (scope, user_id) in raised {
            tracing::warn!(scope = scope.as_str(), %user_id, "daily spend threshold crossed");
            metrics::counter!(crate::metrics::COST_ALERTS, "scope" => scope.as_str()).increment(1);
            self.wake_alerts.notify_one();
        }
        Ok(stored)
    }

    /// Records the daily spend thresholds that the batch's priced calls crossed, once each: the scope
    /// and user of each alert raised.
    async fn raise_alerts(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        rollups: &Rollups,
    ) -> Result<Vec<(AlertScope, Uuid)>, sqlx::Error> {
        let analytics = &self.config.analytics;
        let mut raised = Vec::new();
        // Spend only rises with a priced call: free events leave the alert state alone.
        for (&day, &cost) in rollups.cost_by_day.iter().filter(|(_, cost)| **cost > 0) {
            let (global,): (i64,) = sqlx::query_as(
                "INSERT INTO analytics.spend_daily AS s (day, cost_micros) VALUES ($1, $2)
                 ON CONFLICT (day) DO UPDATE SET cost_micros = s.cost_micros + EXCLUDED.cost_micros
                 RETURNING cost_micros",
            )
            .bind(day)
            .bind(cost)
            .fetch_one(&mut **tx)
            .await?;
            // The anonymous account (deleted accounts' usage) is nobody to alert about.
            let users: Vec<Uuid> = rollups
                .priced_users
                .iter()
                .filter(|(d, user)| *d == day && !user.is_nil())
                .map(|(_, user)| *user)
                .collect();
            let spent_by_user: Vec<(Uuid, i64)> = sqlx::query_as(
                "SELECT user_id, COALESCE(SUM(cost_micros), 0)::bigint FROM analytics.usage_daily
                 WHERE day = $1 AND user_id = ANY($2) GROUP BY user_id",
            )
            .bind(day)
            .bind(&users)
            .fetch_all(&mut **tx)
            .await?;
            let checks = spent_by_user
                .into_iter()
                .map(|(user_id, spent)| (AlertScope::User, user_id, spent, &analytics.user_daily_spend_alerts_usd))
                .chain([(AlertScope::Global, Uuid::nil(), global, &analytics.global_daily_spend_alerts_usd)]);
            for (scope, user_id, spent, thresholds) in checks {
                for threshold in thresholds.iter().map(|usd| usd_to_micros(*usd)).filter(|&t| spent >= t) {
                    let inserted = sqlx::query(
                        "INSERT INTO analytics.cost_alerts (day, scope, user_id, threshold_micros, alert_id, spent_micros)
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    )
                    .bind(day)
                    .bind(scope.as_str())
                    .bind(user_id)
                    .bind(threshold)
                    .bind(Uuid::now_v7())
                    .bind(spent)
                    .execute(&mut **tx)
                    .await?;
                    if inserted.rows_affected() == 1 {
                        raised.push((scope, user_id));
                    }
                }
            }
        }
        Ok(raised)
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

/// What a batch of stored events adds: the daily rollups by (day, user, model), and its priced spend.
#[derive(Default)]
struct Rollups {
    daily: BTreeMap<(Date, Uuid, String), DailyUsage>,
    cost_by_day: BTreeMap<Date, i64>,
    cost_by_model: BTreeMap<String, i64>,
    /// The (day, user) pairs with a priced call.
    priced_users: BTreeSet<(Date, Uuid)>,
}

#[derive(Default)]
struct DailyUsage {
    requests: i64,
    input_tokens: i64,
    output_tokens: i64,
    cost_micros: i64,
    cache_hits: i64,
    failures: i64,
}

impl Rollups {
    fn add(&mut self, event: &UsageEvent, day: Date, cost: i64) {
        let usage = self.daily.entry((day, event.user_id, event.model.clone())).or_default();
        usage.requests += 1;
        usage.input_tokens += event.input_tokens;
        usage.output_tokens += event.output_tokens;
        usage.cost_micros += cost;
        usage.cache_hits += i64::from(event.cache_hit);
        usage.failures += i64::from(event.outcome == parley_platform::events::UsageOutcome::Failed);
        if cost > 0 {
            *self.cost_by_day.entry(day).or_default() += cost;
            *self.cost_by_model.entry(event.model.clone()).or_default() += cost;
            self.priced_users.insert((day, event.user_id));
        }
    }

    /// Adds to the daily rollups, one row per (day, user, model) of the batch.
    async fn write(&self, tx: &mut sqlx::Transaction<'static, sqlx::Postgres>) -> Result<(), sqlx::Error> {
        let column = |pick: fn(&DailyUsage) -> i64| self.daily.values().map(pick).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO analytics.usage_daily AS d
                 (day, user_id, model, requests, input_tokens, output_tokens, cost_micros, cache_hits, failures)
             SELECT * FROM UNNEST($1::date[], $2::uuid[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
                 $7::bigint[], $8::bigint[], $9::bigint[])
             ON CONFLICT (day, user_id, model) DO UPDATE
             SET requests = d.requests + EXCLUDED.requests, input_tokens = d.input_tokens + EXCLUDED.input_tokens,
                 output_tokens = d.output_tokens + EXCLUDED.output_tokens,
                 cost_micros = d.cost_micros + EXCLUDED.cost_micros, cache_hits = d.cache_hits + EXCLUDED.cache_hits,
                 failures = d.failures + EXCLUDED.failures",
        )
        .bind(self.daily.keys().map(|(day, _, _)| *day).collect::<Vec<_>>())
        .bind(self.daily.keys().map(|(_, user_id, _)| *user_id).collect::<Vec<_>>())
        .bind(self.daily.keys().map(|(_, _, model)| model.as_str()).collect::<Vec<_>>())
        .bind(column(|usage| usage.requests))
        .bind(column(|usage| usage.input_tokens))
        .bind(column(|usage| usage.output_tokens))
        .bind(column(|usage| usage.cost_micros))
        .bind(column(|usage| usage.cache_hits))
        .bind(column(|usage| usage.failures))
        .execute(&mut **tx)
        .await?;
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
    #[sqlx(try_from = "String")]
    scope: AlertScope,
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
                user_id: (alert.scope == AlertScope::User).then_some(alert.user_id),
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
pub fn cost_micros(config: &Config, event: &UsageEvent) -> i64 {
    let Some((input, output)) = prices(config, &event.model, &event.provider, &event.provider_model) else {
        return 0;
    };
    // USD per million tokens × tokens = micro-USD.
    (input * event.input_tokens as f64 + output * event.output_tokens as f64).round() as i64
}

/// USD per million input and output tokens of a call of `model` that `provider`'s `provider_model`
/// answered: that chain entry's own prices where it has them (a fallback to another vendor's model
/// costs what that model costs), else the model's. `None` for a model not configured.
pub fn prices(config: &Config, model: &str, provider: &str, provider_model: &str) -> Option<(f64, f64)> {
    let configured = config.models.get(model)?;
    let answered_by =
        configured.chain.iter().find(|target| target.provider == provider && target.model == provider_model);
    let own = |price: fn(&parley_platform::config::ModelTarget) -> Option<f64>| answered_by.and_then(price);
    Some((
        own(|target| target.input_price_per_mtok).unwrap_or(configured.input_price_per_mtok),
        own(|target| target.output_price_per_mtok).unwrap_or(configured.output_price_per_mtok),
    ))
}

/// A completed call of `model` by `user_id` at `at` (1,000 tokens in, 10 out, from the fake), for tests.
#[cfg(test)]
pub(crate) fn sample_event(user_id: Uuid, model: &str, at: OffsetDateTime) -> UsageEvent {
    UsageEvent {
        event_id: Uuid::now_v7(),
        user_id,
        conversation_id: Uuid::now_v7(),
        message_id: Uuid::now_v7(),
        model: model.to_owned(),
        provider: "fake".to_owned(),
        provider_model: "fake-echo".to_owned(),
        input_tokens: 1_000,
        output_tokens: 10,
        latency_ms: 5,
        time_to_first_token_ms: None,
        cache_hit: false,
        outcome: parley_platform::events::UsageOutcome::Completed,
        occurred_at_ms: i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX),
        settlement: None,
        traceparent: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_follows_the_price_table_of_what_answered() {
        let mut config = Config::default();
        let priced = |model: &str, provider: &str, provider_model: &str, input: i64, output: i64| UsageEvent {
            provider: provider.to_owned(),
            provider_model: provider_model.to_owned(),
            input_tokens: input,
            output_tokens: output,
            ..event(Uuid::nil(), model, 0, false)
        };
        // parley-fake: $0.50 in, $1.50 out per million tokens.
        assert_eq!(cost_micros(&config, &priced("parley-fake", "fake", "fake-echo", 1_000_000, 0)), 500_000);
        assert_eq!(cost_micros(&config, &priced("parley-fake", "fake", "fake-echo", 1000, 2000)), 500 + 3000);
        assert_eq!(cost_micros(&config, &priced("unknown-model", "fake", "fake-echo", 1000, 2000)), 0);
        // A fallback entry with prices of its own: its tokens cost its prices, the input's only where
        // it set one.
        let mut fallback = parley_platform::config::ModelTarget::new("other", "other-model");
        fallback.output_price_per_mtok = Some(10.0);
        config.models.get_mut("parley-fake").unwrap().chain.push(fallback);
        assert_eq!(cost_micros(&config, &priced("parley-fake", "other", "other-model", 1000, 2000)), 500 + 20_000);
        // A cached reply names no provider model: the model's prices (and it is not charged anyway).
        assert_eq!(cost_micros(&config, &priced("parley-fake", "cache", "", 1000, 2000)), 500 + 3000);
    }

    fn event(user_id: Uuid, model: &str, output_tokens: i64, cache_hit: bool) -> UsageEvent {
        UsageEvent { output_tokens, cache_hit, ..sample_event(user_id, model, OffsetDateTime::now_utc()) }
    }

    /// A batch with a repeated event, two models and a cache hit: each new event counts once in the
    /// rollups, priced ones in the spend, and the same batch delivered again adds nothing.
    #[tokio::test]
    async fn a_batch_counts_each_new_event_once_in_events_rollups_and_spend() {
        let database = parley_platform::test_database::TestDatabase::create("parley_analytics_ingest").await.unwrap();
        let pool = PgPool::connect(database.url()).await.unwrap();
        crate::migrate(&pool).await.unwrap();
        let config = Arc::new(Config::default());
        let nats = parley_platform::nats::connect(&config.nats, "analytics-test").await.unwrap();
        let ingester = Ingester::new(config.clone(), pool.clone(), jetstream::new(nats));

        let user = Uuid::now_v7();
        let first = event(user, "parley-fake", 2_000, false);
        let batch =
            [first.clone(), first.clone(), event(user, "parley-fake", 500, true), event(user, "other", 10, false)];
        let events: Vec<&UsageEvent> = batch.iter().collect();
        assert_eq!(ingester.store(&events).await.unwrap(), 3);
        assert_eq!(ingester.store(&events).await.unwrap(), 0, "a redelivered batch is already stored");

        let rollups: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT model, requests, output_tokens, cost_micros, cache_hits FROM analytics.usage_daily
             WHERE user_id = $1 ORDER BY model",
        )
        .bind(user)
        .fetch_all(&pool)
        .await
        .unwrap();
        let priced = cost_micros(&config, &first);
        assert_eq!(rollups, [("other".to_owned(), 1, 10, 0, 0), ("parley-fake".to_owned(), 2, 2_500, priced, 1)]);
        let (spent,): (i64,) =
            sqlx::query_as("SELECT cost_micros FROM analytics.spend_daily").fetch_one(&pool).await.unwrap();
        assert_eq!(spent, priced);
        pool.close().await;
    }
}
