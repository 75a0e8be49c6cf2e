//! Whatever `parley check-config` accepts runs: the platform started with every numeric setting at the
//! lowest its range allows, then at the highest, serves a short workload of every kind of request
//! without a panic and without a 500. A setting is moved to its extreme only while the configuration
//! still validates (a few ranges depend on each other: the request timeout must exceed the message
//! wait), so each run holds as many extremes at once as the rules allow.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parley::Service;
use parley_fake_llm::Knobs;
use parley_platform::Config;
use parley_platform::config::{RouterConfig, numeric_ranges};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::TestPlatform;

/// Panics anywhere in this process (each test runs in a process of its own), tasks included.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        report(info);
    }));
}

#[derive(Clone, Copy, Debug)]
enum End {
    Lowest,
    Highest,
}

/// Sets every number at `path` (`*` expanded) in `written` to `value`.
fn set_numbers(written: &mut Value, path: &[&str], value: &Value) {
    let Some((segment, rest)) = path.split_first() else {
        if written.is_number() {
            *written = value.clone();
        }
        return;
    };
    match (*segment, written) {
        ("*", Value::Object(entries)) => entries.values_mut().for_each(|entry| set_numbers(entry, rest, value)),
        ("*", Value::Array(items)) => items.iter_mut().for_each(|item| set_numbers(item, rest, value)),
        (key, Value::Object(entries)) => {
            if let Some(entry) = entries.get_mut(key) {
                set_numbers(entry, rest, value);
            }
        }
        _ => {}
    }
}

/// Moves each numeric setting but those in `except` to `end` of its range, keeping each move only if
/// the configuration still validates; the settings moved.
fn to_extremes(config: &mut Config, end: End, except: &[&str]) -> Vec<&'static str> {
    // A router to a cheaper model, so that its settings are moved too.
    let fake = parley_platform::config::FAKE_MODEL;
    let cheaper = config.models[fake].clone();
    config.models.insert("parley-fake-cheaper".to_owned(), cheaper);
    config.models.get_mut(fake).unwrap().router =
        Some(RouterConfig { model: "parley-fake-cheaper".to_owned(), max_prompt_chars: 10, max_messages: 2 });
    let mut moved = Vec::new();
    for range in numeric_ranges().filter(|range| !except.contains(&range.path)) {
        let bound = match end {
            End::Lowest => range.min,
            End::Highest => range.max,
        };
        // Integral bounds as integers, which every numeric field reads.
        let value = if bound.fract() == 0.0 { json!(bound as i64) } else { json!(bound) };
        let mut written = serde_json::to_value(&*config).unwrap();
        set_numbers(&mut written, &range.path.split('.').collect::<Vec<_>>(), &value);
        let mut candidate: Config = serde_json::from_value(written).unwrap();
        candidate.provider_keys = config.provider_keys.clone();
        if candidate.validate().is_ok() {
            *config = candidate;
            moved.push(range.path);
        }
    }
    moved
}

/// Sends one of every kind of request, each allowed any answer but a 500 within its timeout.
async fn workload(platform: &TestPlatform) {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let url = |path: &str| platform.url(path);
    let mut answers: Vec<(String, StatusCode)> = Vec::new();
    let mut note = |what: &str, response: Result<reqwest::Response, reqwest::Error>| -> Option<reqwest::Response> {
        match response {
            Ok(response) => {
                answers.push((what.to_owned(), response.status()));
                Some(response)
            }
            // A request may time out (a one-request-a-minute tier waits): that is not a panic.
            Err(error) => {
                assert!(error.is_timeout(), "{what}: {error}");
                None
            }
        }
    };

    let credentials = json!({"email": "extremes@example.com", "password": "correct horse battery"});
    let registered = note("register", http.post(url("/v1/auth/register")).json(&credentials).send().await);
    let mut token = match registered {
        Some(response) if response.status() == StatusCode::CREATED => {
            response.json::<Value>().await.unwrap()["access_token"].as_str().map(str::to_owned)
        }
        _ => None,
    };
    if let Some(response) = note("login", http.post(url("/v1/auth/login")).json(&credentials).send().await)
        && response.status() == StatusCode::OK
    {
        token = response.json::<Value>().await.unwrap()["access_token"].as_str().map(str::to_owned);
    }
    let token = token.unwrap_or_else(|| "not-a-token".to_owned());

    let created = note(
        "create conversation",
        http.post(url("/v1/conversations")).bearer_auth(&token).json(&json!({"title": "extremes"})).send().await,
    );
    let conversation = match created {
        Some(response) if response.status() == StatusCode::CREATED => {
            response.json::<Value>().await.unwrap()["id"].as_str().unwrap_or_default().to_owned()
        }
        _ => "00000000-0000-0000-0000-000000000000".to_owned(),
    };
    let messages = url(&format!("/v1/conversations/{conversation}/messages"));
    let send = json!({"content": "Hello at the edges of every setting"});
    note("send (JSON)", http.post(&messages).bearer_auth(&token).json(&send).send().await);
    if let Some(response) = note(
        "send (SSE)",
        http.post(&messages).bearer_auth(&token).header("accept", "text/event-stream").json(&send).send().await,
    ) {
        // Some of the stream, whatever it holds, then hang up.
        let _partial = tokio::time::timeout(Duration::from_secs(2), response.bytes()).await;
    }
    note("list messages", http.get(&messages).bearer_auth(&token).send().await);
    note("list conversations", http.get(url("/v1/conversations")).bearer_auth(&token).send().await);
    let completion = json!({"model": "parley-fake", "messages": [{"role": "user", "content": "Hi there"}]});
    note(
        "OpenAI completion",
        http.post(url("/v1/chat/completions")).bearer_auth(&token).json(&completion).send().await,
    );
    let streamed = json!({"model": "parley-fake", "stream": true, "messages": [{"role": "user", "content": "Hi"}]});
    if let Some(response) =
        note("OpenAI stream", http.post(url("/v1/chat/completions")).bearer_auth(&token).json(&streamed).send().await)
    {
        let _partial = tokio::time::timeout(Duration::from_secs(2), response.bytes()).await;
    }
    let embeddings = json!({"model": "parley-fake-embed", "input": ["one", "two"]});
    note("embeddings", http.post(url("/v1/embeddings")).bearer_auth(&token).json(&embeddings).send().await);
    note("usage", http.get(url("/v1/usage")).bearer_auth(&token).send().await);
    note("models", http.get(url("/v1/models")).bearer_auth(&token).send().await);
    note("bad body", http.post(&messages).bearer_auth(&token).body("{not json").send().await);

    let failed: Vec<&(String, StatusCode)> = answers
        .iter()
        .filter(|(_, status)| {
            status.is_server_error()
                && *status != StatusCode::SERVICE_UNAVAILABLE
                && *status != StatusCode::GATEWAY_TIMEOUT
        })
        .collect();
    assert!(failed.is_empty(), "server errors: {failed:?} (all answers: {answers:?})");
    let live = http.get(url("/healthz")).send().await.unwrap();
    assert_eq!(live.status(), StatusCode::OK);
}

async fn runs_at(end: End, except: &[&str]) {
    count_panics();
    let mut moved = Vec::new();
    let platform = TestPlatform::start_with(|config| moved = to_extremes(config, end, except), &Service::ALL).await;
    let expected = numeric_ranges().count() - except.len();
    assert!(moved.len() + 2 >= expected, "only {} of {expected} settings moved: {moved:?}", moved.len());
    // The fake is the test's upstream, not a part under test: at its own extremes (an hour to its first
    // token) the replies would outlast the test.
    platform.fake.set_knobs(Knobs {
        time_to_first_token: Duration::ZERO,
        tokens_per_second: 1000.0,
        ..Knobs::default()
    });
    workload(&platform).await;
    platform.stop().await;
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "the platform panicked at the {end:?} settings");
}

/// What at its lowest refuses the workload before it reaches the services behind the gateway: one
/// request a minute, a budget of no tokens, messages of one character.
const REFUSERS: [&str; 5] = [
    "http.ip_requests_per_minute",
    "tiers.*.requests_per_minute",
    "tiers.*.tokens_per_day",
    "tiers.*.tokens_per_month",
    "chat.max_message_chars",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lowest_value_of_every_numeric_setting_runs_without_a_panic() {
    runs_at(End::Lowest, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lowest_values_but_the_refusing_ones_run_without_a_panic() {
    runs_at(End::Lowest, &REFUSERS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_highest_value_of_every_numeric_setting_runs_without_a_panic() {
    runs_at(End::Highest, &[]).await;
}
