//! Starting a platform for one test, and the client helpers every test uses.

use std::future::Future;
use std::time::Duration;

use parley::{GrpcBind, LaunchOptions, Platform, Service};
use parley_fake_llm::{FakeLlm, Knobs};
use parley_platform::Config;
use parley_platform::config::{ModelConfig, ModelTarget, ProviderConfig, ProviderKind, TelemetryConfig};
use parley_platform::test_database::TestDatabase;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const ALL_BUT_AGENT: &[Service] =
    &[Service::User, Service::Chat, Service::Quota, Service::Analytics, Service::Gateway];

pub struct TestPlatform {
    pub base: String,
    pub http: reqwest::Client,
    pub config: Config,
    pub fake: parley_fake_llm::FakeLlm,
    platforms: Vec<Platform>,
    /// Dropped with the platform, also when a test panics.
    _database: TestDatabase,
    _brokers: TestBrokers,
}

pub struct Session {
    pub token: String,
    pub refresh_token: String,
    pub user_id: String,
}

impl TestPlatform {
    pub async fn start() -> Self {
        Self::start_with(|_| {}, &Service::ALL).await
    }

    /// Starts `services` with a fresh database and private NATS and Redis prefixes; `tweak` adjusts
    /// the configuration first.
    pub async fn start_with(tweak: impl FnOnce(&mut Config), services: &[Service]) -> Self {
        let _telemetry = parley_platform::telemetry::init(
            "parley-test",
            &TelemetryConfig { log_filter: "info,sqlx=warn,async_nats=warn".to_owned(), ..TelemetryConfig::default() },
        );
        let id = uuid::Uuid::now_v7().simple().to_string();
        let tag = &id[id.len() - 12..];
        let database = TestDatabase::create("parley_test").await.unwrap();
        let mut config = Config::default();
        config.database.url = database.url().to_owned();
        config.nats.prefix = format!("t{tag}");
        config.redis.key_prefix = format!("t{tag}");
        config.http.message_wait_secs = 15;
        config.http.addr = "127.0.0.1:0".to_owned();
        config.nats.events_max_bytes = 16 * 1024 * 1024;
        // Tests make many requests as one user from one address; the rate-limit tests set their own.
        config.http.ip_requests_per_minute = 10_000;
        for tier in config.tiers.values_mut() {
            tier.requests_per_minute = 10_000;
        }
        config.fake_llm.time_to_first_token_ms = 5;
        config.fake_llm.tokens_per_second = 2000.0;
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let options = LaunchOptions {
            services: services.to_vec(),
            grpc_bind: GrpcBind::EphemeralLoopback,
            http_listener: Some(listener),
            admin_server: false,
            fake_llm: true,
            migrate: true,
        };
        let platform = Platform::launch(config, options).await.unwrap();
        let fake = platform.fake_llm.as_ref().unwrap().0.clone();
        let config = (*platform.config).clone();
        let brokers = TestBrokers {
            nats_url: config.nats.url.clone(),
            nats_prefix: config.nats.prefix.clone(),
            redis_url: config.redis.url.clone(),
            redis_prefix: config.redis.key_prefix.clone(),
        };
        let test = TestPlatform {
            base,
            http: reqwest::Client::new(),
            config,
            fake,
            platforms: vec![platform],
            _database: database,
            _brokers: brokers,
        };
        if services.contains(&Service::User) {
            test.wait_until_ready().await;
        } else {
            // Readiness needs the user service; without it, the gateway being up has to do.
            test.wait_until_live().await;
        }
        test
    }

    /// Starts more services in this process, wired to the ones already running; the base URL of the
    /// new gateway, when one was started.
    pub async fn launch(&mut self, services: &[Service]) -> Option<String> {
        let options = LaunchOptions {
            services: services.to_vec(),
            grpc_bind: GrpcBind::EphemeralLoopback,
            http_listener: None,
            admin_server: false,
            fake_llm: false,
            migrate: false,
        };
        let platform = Platform::launch(self.config.clone(), options).await.unwrap();
        let base = platform.http_addr.map(|addr| format!("http://{addr}"));
        self.platforms.push(platform);
        base
    }

    /// Starts `services` with their gRPC server on the configured `grpc.addr` (so peers started before
    /// them can be told where they will be).
    pub async fn launch_at_configured_address(&mut self, services: &[Service]) {
        let options = LaunchOptions {
            services: services.to_vec(),
            grpc_bind: GrpcBind::Configured,
            http_listener: None,
            admin_server: false,
            fake_llm: false,
            migrate: false,
        };
        let platform = Platform::launch(self.config.clone(), options).await.unwrap();
        self.platforms.push(platform);
    }

    /// Kills (without a graceful shutdown) the platform started by the `index`th `launch` call.
    pub async fn kill_launched(&mut self, index: usize) {
        let platform = self.platforms.remove(index + 1);
        platform.kill().await;
    }

    /// Stops, as SIGTERM does, the platform started by the `index`th `launch` call; the handle ends
    /// once it has shut down.
    pub fn stop_launched(&mut self, index: usize) -> tokio::task::JoinHandle<()> {
        let platform = self.platforms.remove(index + 1);
        tokio::spawn(async move { platform.stop().await.unwrap() })
    }

    async fn wait_until_live(&self) {
        eventually("the gateway to be up", Duration::from_secs(20), || async {
            let response = self.http.get(self.url("/healthz")).send().await.ok()?;
            (response.status() == StatusCode::OK).then_some(())
        })
        .await;
    }

    async fn wait_until_ready(&self) {
        eventually("the gateway to be ready", Duration::from_secs(20), || async {
            let response = self.http.get(self.url("/readyz")).send().await.ok()?;
            (response.status() == StatusCode::OK).then_some(())
        })
        .await;
    }

    /// The value of one series on the gateway's /metrics, e.g. `parley_db_reads_total{target="replica"}`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.http.get(self.url("/metrics")).send().await.ok()?.text().await.ok()?;
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn register(&self, email: &str) -> Session {
        let response = self
            .http
            .post(self.url("/v1/auth/register"))
            .json(&json!({"email": email, "password": "correct horse battery"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.unwrap();
        Session {
            token: body["access_token"].as_str().unwrap().to_owned(),
            refresh_token: body["refresh_token"].as_str().unwrap().to_owned(),
            user_id: body["user"]["id"].as_str().unwrap().to_owned(),
        }
    }

    pub async fn get(&self, session: &Session, path: &str) -> (StatusCode, Value) {
        let response = self.http.get(self.url(path)).bearer_auth(&session.token).send().await.unwrap();
        read(response).await
    }

    pub async fn post(&self, session: &Session, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self.http.post(self.url(path)).bearer_auth(&session.token).json(&body).send().await.unwrap();
        read(response).await
    }

    /// Sends a message asking for its reply as an event stream; the response is the open stream.
    pub async fn send_streaming(&self, session: &Session, conversation: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/v1/conversations/{conversation}/messages")))
            .bearer_auth(&session.token)
            .header("accept", "text/event-stream")
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn put(&self, session: &Session, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self.http.put(self.url(path)).bearer_auth(&session.token).json(&body).send().await.unwrap();
        read(response).await
    }

    pub async fn delete(&self, session: &Session, path: &str) -> StatusCode {
        self.http.delete(self.url(path)).bearer_auth(&session.token).send().await.unwrap().status()
    }

    pub async fn create_conversation(&self, session: &Session, title: &str) -> String {
        let (status, body) = self.post(session, "/v1/conversations", json!({"title": title})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// Stops every service gracefully; the test's database, streams and Redis keys go when it is
    /// dropped (as they do when a test panics).
    pub async fn stop(mut self) {
        for platform in self.platforms.drain(..).rev() {
            platform.stop().await.unwrap();
        }
    }
}

/// The test's JetStream streams and Redis keys (all under its private prefixes), removed when the
/// platform is dropped, also when a test panics, so that a failing test leaves nothing behind.
struct TestBrokers {
    nats_url: String,
    nats_prefix: String,
    redis_url: String,
    redis_prefix: String,
}

impl Drop for TestBrokers {
    fn drop(&mut self) {
        let (nats_url, redis_url) = (self.nats_url.clone(), self.redis_url.clone());
        let (names, pattern) =
            (parley_platform::nats::Names::new(&self.nats_prefix), format!("{}:*", self.redis_prefix));
        // A runtime of its own: the test's may be gone or unwinding.
        let removed = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                if let Ok(client) = async_nats::connect(&nats_url).await {
                    let jetstream = async_nats::jetstream::new(client);
                    for stream in names.all_streams() {
                        let _absent_is_fine = jetstream.delete_stream(stream).await;
                    }
                }
                let mut redis = redis::Client::open(redis_url).ok()?.get_multiplexed_async_connection().await.ok()?;
                let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(&mut redis).await.ok()?;
                if !keys.is_empty() {
                    let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut redis).await;
                }
                Some(())
            })
        });
        let _best_effort = removed.join();
    }
}

/// Runs the real `parley` binary with `args`, without any PARLEY_CONFIG of the caller's, quiet logs,
/// and `envs` set.
pub fn run_parley(envs: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_parley"));
    command.args(args).env_remove("PARLEY_CONFIG").env("PARLEY_LOG", "warn");
    for (name, value) in envs {
        command.env(name, value);
    }
    command.output().unwrap()
}

pub async fn read(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.unwrap();
    let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
    (status, body)
}

/// Polls `check` until it returns `Some`, failing the test after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    loop {
        poll.tick().await;
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
    }
}

/// Asserts an RFC 9457 problem with `code`, and returns its body.
pub fn assert_problem(status: StatusCode, body: &Value, expected_status: u16, code: &str) {
    assert_eq!(status.as_u16(), expected_status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], expected_status, "{body}");
    assert_eq!(body["type"], format!("https://parley.dev/errors/{code}"), "{body}");
    assert!(body["request_id"].as_str().is_some_and(|id| !id.is_empty()), "{body}");
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: Value,
}

/// Reads server-sent events from a streaming response.
pub struct SseReader {
    events: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<parley_platform::sse::Event>> + Send>>,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        #[allow(clippy::disallowed_methods, reason = "the body is read through sse::events")]
        let bytes = response.bytes_stream();
        Self { events: Box::pin(parley_platform::sse::events(bytes)) }
    }

    /// The next event with data (comments such as heartbeats are skipped); `None` when the stream ends.
    pub async fn next(&mut self) -> Option<SseEvent> {
        use futures::StreamExt;
        loop {
            let event = tokio::time::timeout(Duration::from_secs(30), self.events.next())
                .await
                .expect("an event within 30 s")?
                .unwrap();
            if event.data.is_empty() {
                continue;
            }
            return Some(SseEvent {
                event: event.event.unwrap_or_else(|| "message".to_owned()),
                id: event.id,
                data: serde_json::from_str(&event.data).unwrap_or(Value::String(event.data)),
            });
        }
    }
}

/// A fake provider of its own, on an ephemeral port; its base URL.
pub async fn spawn_fake(knobs: Knobs) -> (FakeLlm, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let fake =
        FakeLlm::new(Knobs { time_to_first_token: Duration::from_millis(5), tokens_per_second: 2000.0, ..knobs });
    tokio::spawn(parley_fake_llm::serve(fake.clone(), listener, CancellationToken::new()));
    (fake, url)
}

pub fn add_provider(config: &mut Config, name: &str, kind: ProviderKind, url: &str, key_envs: &[&str]) {
    let provider = ProviderConfig {
        kind,
        base_url: url.to_owned(),
        api_key_env: None,
        api_key_envs: key_envs.iter().map(|name| (*name).to_owned()).collect(),
    };
    config.providers.insert(name.to_owned(), provider);
}

/// A model whose chain is the given providers, in order (each serving "fake-echo").
pub fn add_model(config: &mut Config, name: &str, providers: &[&str]) {
    let chain = providers.iter().map(|provider| ModelTarget::new(*provider, "fake-echo")).collect();
    config.models.insert(
        name.to_owned(),
        ModelConfig {
            chain,
            context_window: 8192,
            input_price_per_mtok: 1.0,
            output_price_per_mtok: 1.0,
            router: None,
            vision: false,
            kind: parley_platform::config::ModelKind::Chat,
        },
    );
}

/// A platform whose model `claude-fake` is served by a fake Anthropic provider of its own (`anthropic`),
/// with `tweak` applied after; the fake's handle.
pub async fn start_with_anthropic(tweak: impl FnOnce(&mut Config)) -> (TestPlatform, FakeLlm) {
    let (anthropic, anthropic_url) = spawn_fake(Knobs::default()).await;
    let t = TestPlatform::start_with(
        |config| {
            add_provider(config, "anthropic", ProviderKind::Anthropic, &anthropic_url, &[]);
            add_model(config, "claude-fake", &["anthropic"]);
            tweak(config);
        },
        &Service::ALL,
    )
    .await;
    (t, anthropic)
}
