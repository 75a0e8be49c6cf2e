//! Usage analytics: events from JetStream into month partitions and daily rollups, reports per day,
//! model and user that add partial days from the raw events to whole days from the rollup, and daily
//! spend alerts raised once per threshold; and the charges usage events carry to quota.

use std::time::Duration;

use futures::StreamExt;
use parley::Service;
use parley_platform::events::{AlertScope, CostAlert, Settlement, UsageEvent};
use parley_platform::nats::Names;
use reqwest::StatusCode;
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::harness::{Session, TestPlatform, eventually, run_parley};

/// Publishes a usage event as an agent would (with `msg_id` as the JetStream message id).
pub(crate) async fn publish(t: &TestPlatform, event: &UsageEvent, msg_id: &str) {
    let client = async_nats::connect(&t.config.nats.url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let names = Names::new(&t.config.nats.prefix);
    parley_platform::nats::ensure_usage_stream(&jetstream, &names).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
    let payload = serde_json::to_vec(event).unwrap();
    jetstream.publish_with_headers(names.usage_subject(), headers, payload.into()).await.unwrap().await.unwrap();
}

pub(crate) fn event(user: &Session, model: &str, input: i64, output: i64, at: OffsetDateTime) -> UsageEvent {
    UsageEvent {
        event_id: Uuid::now_v7(),
        user_id: Uuid::parse_str(&user.user_id).unwrap(),
        conversation_id: Uuid::now_v7(),
        message_id: Uuid::now_v7(),
        model: model.to_owned(),
        provider: "fake".to_owned(),
        provider_model: "fake-echo".to_owned(),
        input_tokens: input,
        output_tokens: output,
        latency_ms: 120,
        time_to_first_token_ms: Some(20),
        cache_hit: false,
        outcome: parley_platform::events::UsageOutcome::Completed,
        occurred_at_ms: (at.unix_timestamp_nanos() / 1_000_000) as i64,
        settlement: None,
        traceparent: None,
    }
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap()
}

async fn requests(t: &TestPlatform, session: &Session, query: &str) -> Value {
    let (status, body) = t.get(session, &format!("/v1/usage?{query}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_reported_per_day_model_and_user_from_partitions_and_rollups() {
    let t = TestPlatform::start_with(
        |config| {
            config.auth.admin_emails = vec!["boss@example.com".to_owned()];
            config.models.insert("parley-big".to_owned(), {
                let mut big = config.models["parley-fake"].clone();
                big.input_price_per_mtok = 3.0;
                big.output_price_per_mtok = 15.0;
                big
            });
        },
        &[Service::User, Service::Chat, Service::Quota, Service::Analytics, Service::Gateway],
    )
    .await;
    let alice = t.register("alice@example.com").await;
    let bob = t.register("bob@example.com").await;
    let boss = t.register("boss@example.com").await;

    // Five days, across a month boundary when today is early in the month: several partitions.
    let today = OffsetDateTime::now_utc().date().midnight().assume_utc();
    let day = |n: i64| today - time::Duration::days(n);
    let events = [
        event(&alice, "parley-fake", 1000, 2000, day(40) + time::Duration::hours(9)), // before the range
        event(&alice, "parley-fake", 1000, 2000, day(4) + time::Duration::hours(3)),  // before `from`, same day
        event(&alice, "parley-fake", 1000, 2000, day(4) + time::Duration::hours(18)), // partial first day
        event(&alice, "parley-big", 100, 10, day(3) + time::Duration::hours(1)),      // whole days
        event(&alice, "parley-fake", 10, 20, day(3) + time::Duration::hours(23)),
        event(&bob, "parley-fake", 500, 500, day(2) + time::Duration::hours(12)),
        event(&alice, "parley-big", 1, 1, day(1) + time::Duration::hours(2)), // partial last day
        event(&alice, "parley-big", 1, 1, day(1) + time::Duration::hours(20)), // after `to`
    ];
    for event in &events {
        publish(&t, event, &event.event_id.to_string()).await;
    }
    // Redelivered with a new message id (past JetStream's dedup): stored once all the same.
    publish(&t, &events[2], "again").await;

    let from = rfc3339(day(4) + time::Duration::hours(12));
    let to = rfc3339(day(1) + time::Duration::hours(12));
    let range = format!("from={from}&to={to}");
    let by_day = eventually("every event to be ingested", Duration::from_secs(15), || async {
        let body = requests(&t, &alice, &format!("{range}&group_by=day")).await;
        (body["totals"]["requests"] == 4).then_some(body)
    })
    .await;
    let days: Vec<(String, i64, i64)> = by_day["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["day"].as_str().unwrap().to_owned(),
                row["requests"].as_i64().unwrap(),
                row["total_tokens"].as_i64().unwrap(),
            )
        })
        .collect();
    let date = |n: i64| day(n).date().to_string();
    assert_eq!(days, vec![(date(4), 1, 3000), (date(3), 2, 140), (date(1), 1, 2)], "{by_day}");
    // parley-fake: $0.50 in, $1.50 out per million; parley-big: $3 and $15.
    let cost = |input: f64, output: f64, (p_in, p_out): (f64, f64)| (input * p_in + output * p_out) / 1e6;
    let expected = cost(1000.0, 2000.0, (0.5, 1.5))
        + cost(100.0, 10.0, (3.0, 15.0))
        + cost(10.0, 20.0, (0.5, 1.5))
        + cost(1.0, 1.0, (3.0, 15.0));
    assert!((by_day["totals"]["cost_usd"].as_f64().unwrap() - expected).abs() < 1e-9, "{by_day}");

    let by_model = requests(&t, &alice, &format!("{range}&group_by=model")).await;
    let models: Vec<(&str, i64)> = by_model["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (row["model"].as_str().unwrap(), row["requests"].as_i64().unwrap()))
        .collect();
    assert_eq!(models, vec![("parley-big", 2), ("parley-fake", 2)], "{by_model}");

    // Admins see everyone, grouped by user; nobody else may.
    let (status, by_user) = t.get(&boss, &format!("/v1/admin/usage?{range}&group_by=user")).await;
    assert_eq!(status, StatusCode::OK, "{by_user}");
    let mut users: Vec<(String, i64)> = by_user["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (row["user_id"].as_str().unwrap().to_owned(), row["requests"].as_i64().unwrap()))
        .collect();
    users.sort();
    let mut expected_users = vec![(alice.user_id.clone(), 4), (bob.user_id.clone(), 1)];
    expected_users.sort();
    assert_eq!(users, expected_users, "{by_user}");
    let (status, _) = t.get(&alice, &format!("/v1/admin/usage?{range}&group_by=user")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The events sit in month partitions; the rollup holds one row per day, user and model.
    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    let (partitions,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'analytics.usage_events'::regclass
         AND inhrelid <> 'analytics.usage_events_default'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(partitions >= 2, "events of two months are in separate partitions");
    let (in_default,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM analytics.usage_events_default").fetch_one(&pool).await.unwrap();
    assert_eq!(in_default, 0);
    let (stored,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM analytics.usage_events").fetch_one(&pool).await.unwrap();
    assert_eq!(stored, events.len() as i64, "the redelivered event is stored once");

    // Retention: raw events of months before last month are dropped as whole partitions; the day
    // 40 days ago still reports from its rollup.
    let old_day = format!("from={}&to={}", rfc3339(day(40)), rfc3339(day(39)));
    let before = requests(&t, &alice, &format!("{old_day}&group_by=day")).await;
    assert_eq!(before["totals"]["requests"], 1, "{before}");
    let output = run_parley(&[("DATABASE_URL", &t.config.database.url)], &["archive", "--usage-months", "0"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report = String::from_utf8_lossy(&output.stdout);
    let old_month =
        format!("usage_events_{}", day(40).format(&time::macros::format_description!("[year]_[month]")).unwrap());
    assert!(report.contains(&old_month), "{report}");
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM analytics.usage_events WHERE occurred_at < $1")
        .bind(today.replace_day(1).unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "raw events before this month are gone");
    let after = requests(&t, &alice, &format!("{old_day}&group_by=day")).await;
    assert_eq!(after["data"], before["data"], "whole days still report from the rollup");
    pool.close().await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_spend_alert_fires_once_per_threshold() {
    let t = TestPlatform::start_with(
        |config| {
            // parley-fake input costs $0.50 per million tokens: 10,000 tokens are half a cent.
            config.analytics.user_daily_spend_alerts_usd = vec![0.01];
            config.analytics.global_daily_spend_alerts_usd = vec![0.02];
        },
        &[Service::User, Service::Chat, Service::Quota, Service::Analytics, Service::Gateway],
    )
    .await;
    let alice = t.register("alice@example.com").await;
    let bob = t.register("bob@example.com").await;
    let client = async_nats::connect(&t.config.nats.url).await.unwrap();
    let names = Names::new(&t.config.nats.prefix);
    let mut alerts = client.subscribe(names.cost_alerts_subject()).await.unwrap();

    let now = OffsetDateTime::now_utc();
    let half_a_cent = |who: &Session| event(who, "parley-fake", 10_000, 0, now);
    // alice: 0.5, 1.0 (her threshold), 1.5 cents; bob: 0.5, 1.0 (his, and everyone's 2 cents at 2.5).
    for who in [&alice, &alice, &alice, &bob, &bob] {
        let event = half_a_cent(who);
        publish(&t, &event, &event.event_id.to_string()).await;
    }
    let mut received = Vec::new();
    while received.len() < 3 {
        let message = tokio::time::timeout(Duration::from_secs(15), alerts.next()).await.unwrap().unwrap();
        received.push(serde_json::from_slice::<CostAlert>(&message.payload).unwrap());
    }
    let mut scopes: Vec<(String, Option<String>)> = received
        .iter()
        .map(|alert| (alert.scope.as_str().to_owned(), alert.user_id.map(|id| id.to_string())))
        .collect();
    scopes.sort();
    let mut expected = vec![
        ("global".to_owned(), None),
        ("user".to_owned(), Some(alice.user_id.clone())),
        ("user".to_owned(), Some(bob.user_id.clone())),
    ];
    expected.sort();
    assert_eq!(scopes, expected, "{received:?}");
    let global = received.iter().find(|alert| alert.scope == AlertScope::Global).unwrap();
    assert_eq!(global.day, now.date().to_string());
    assert!((global.threshold_usd - 0.02).abs() < 1e-12 && global.spent_usd >= 0.02, "{global:?}");

    // More spend the same day crosses nothing new: no second alert, whatever is redelivered.
    let more = half_a_cent(&alice);
    publish(&t, &more, &more.event_id.to_string()).await;
    publish(&t, &more, "redelivered").await;
    eventually("the later event to be ingested", Duration::from_secs(15), || async {
        let body = requests(&t, &alice, "group_by=day").await;
        (body["totals"]["requests"] == 4).then_some(())
    })
    .await;
    assert!(tokio::time::timeout(Duration::from_millis(500), alerts.next()).await.is_err(), "no repeated alert");
    assert_eq!(t.metric("parley_analytics_cost_alerts_total{scope=\"user\"}").await, Some(2.0));
    assert_eq!(t.metric("parley_analytics_cost_alerts_total{scope=\"global\"}").await, Some(1.0));
    // The alerts stay on the alerts stream for tools that were not listening.
    let jetstream = async_nats::jetstream::new(client);
    let mut stream = jetstream.get_stream(names.alerts_stream()).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 3);
    t.stop().await;
}

/// A usage event carries its call's charge to quota, which settles it once however often the event is
/// delivered (here under two message ids, as after the stream's deduplication window); an event
/// without a settlement (from an agent that charged quota itself) charges nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_settles_the_charge_a_usage_event_carries_once() {
    let t = TestPlatform::start().await;
    let user = t.register("settled@example.com").await;
    let budget = || async {
        let (status, usage) = t.get(&user, "/v1/usage").await;
        assert_eq!(status, StatusCode::OK, "{usage}");
        (usage["budget"]["day"]["used"].as_i64().unwrap(), usage["budget"]["day"]["reserved"].as_i64().unwrap())
    };
    let now = OffsetDateTime::now_utc();

    let charged_already = event(&user, "parley-fake", 100, 200, now);
    publish(&t, &charged_already, "charged-already").await;
    let mut carried = event(&user, "parley-fake", 10, 20, now);
    carried.settlement = Some(Settlement { reservation_id: None, tokens: 30 });
    publish(&t, &carried, "carried-1").await;
    publish(&t, &carried, "carried-2").await;

    // Once quota's consumer has settled and acknowledged all three, 30 tokens were charged, once.
    let client = async_nats::connect(&t.config.nats.url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let names = Names::new(&t.config.nats.prefix);
    eventually("quota to settle every event", Duration::from_secs(10), || async {
        let mut stream = jetstream.get_stream(names.usage_stream()).await.ok()?;
        let last = stream.info().await.ok()?.state.last_sequence;
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(names.quota_consumer()).await.ok()?;
        let info = consumer.info().await.ok()?;
        (info.ack_floor.stream_sequence >= last && info.num_ack_pending == 0).then_some(())
    })
    .await;
    assert_eq!(budget().await, (30, 0));
    t.stop().await;
}

/// Several usage events in one message, as a busy agent publishes them, are each charged by quota and
/// each stored by analytics; an event one of them cannot take is dropped alone, the others kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_events_that_share_a_message_are_each_charged_and_stored() {
    let t = TestPlatform::start().await;
    let user = t.register("batched@example.com").await;
    let user_id = Uuid::parse_str(&user.user_id).unwrap();
    let now = OffsetDateTime::now_utc();
    let mut events: Vec<UsageEvent> = (1..=3)
        .map(|n| UsageEvent {
            settlement: Some(Settlement { reservation_id: None, tokens: 3 * n }),
            ..event(&user, "parley-fake", n, 2 * n, now)
        })
        .collect();
    // Quota cannot charge negative tokens (analytics stores the event); analytics cannot date an event
    // this far out (it carries no charge).
    events.push(UsageEvent {
        settlement: Some(Settlement { reservation_id: None, tokens: -5 }),
        ..event(&user, "parley-fake", 1, 1, now)
    });
    events.push(UsageEvent { occurred_at_ms: i64::MAX, ..event(&user, "parley-fake", 1, 1, now) });

    let client = async_nats::connect(&t.config.nats.url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let names = Names::new(&t.config.nats.prefix);
    parley_platform::nats::ensure_usage_stream(&jetstream, &names).await.unwrap();
    let payload = serde_json::to_vec(&events).unwrap();
    jetstream.publish(names.usage_subject(), payload.into()).await.unwrap().await.unwrap();

    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    let stored: Vec<(Uuid,)> =
        eventually("analytics to store the message's events", Duration::from_secs(10), || async {
            let stored: Vec<(Uuid,)> =
                sqlx::query_as("SELECT event_id FROM analytics.usage_events WHERE user_id = $1 ORDER BY event_id")
                    .bind(user_id)
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            (stored.len() == 4).then_some(stored)
        })
        .await;
    let mut expected: Vec<Uuid> = events[..4].iter().map(|event| event.event_id).collect();
    expected.sort();
    assert_eq!(stored.into_iter().map(|(id,)| id).collect::<Vec<_>>(), expected);
    eventually("quota to charge the three charges it can take", Duration::from_secs(10), || async {
        let (status, usage) = t.get(&user, "/v1/usage").await;
        assert_eq!(status, StatusCode::OK, "{usage}");
        (usage["budget"]["day"]["used"].as_i64() == Some(3 + 6 + 9)).then_some(())
    })
    .await;
    pool.close().await;
    t.stop().await;
}
