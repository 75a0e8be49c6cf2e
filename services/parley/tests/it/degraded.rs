//! Degraded modes of shared/DESIGN.md that need a dependency to fail: NATS going away and coming back.

use std::process::{Child, Command};
use std::time::Duration;

use parley::Service;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{TestPlatform, eventually, read};

/// A NATS server with JetStream of this test's own, so stopping it disturbs no other test.
struct OwnNats {
    port: u16,
    store: std::path::PathBuf,
    child: Child,
}

impl OwnNats {
    async fn start(port: Option<u16>, store: Option<std::path::PathBuf>) -> Self {
        let port =
            port.unwrap_or_else(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
        let store = store
            .unwrap_or_else(|| std::env::temp_dir().join(format!("parley-nats-{}", uuid::Uuid::now_v7().simple())));
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server is installed by make test");
        eventually("the test's NATS to answer", Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
        })
        .await;
        Self { port, store, child }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn stop(mut self) -> (u16, std::path::PathBuf) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        (self.port, self.store)
    }
}

/// The other side of the outbox: with NATS up, each send publishes the job it committed itself and
/// marks its row, so the sweep (the safety net for the case below) finds nothing to publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_up_each_send_publishes_its_own_job() {
    let t = TestPlatform::start().await;
    let session = t.register("direct@example.com").await;
    let conversation = t.create_conversation(&session, "direct").await;
    for content in ["one", "two", "three"] {
        let (status, exchange) =
            t.post(&session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": content})).await;
        assert_eq!(status, StatusCode::OK, "{exchange}");
        assert_eq!(exchange["assistant_message"]["content"], parley_fake_llm::reply_for(content));
    }
    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    eventually("every outbox row marked published", Duration::from_secs(10), || async {
        let (unpublished,): (i64,) = sqlx::query_as("SELECT count(*) FROM chat.outbox WHERE published_at IS NULL")
            .fetch_one(&pool)
            .await
            .ok()?;
        (unpublished == 0).then_some(())
    })
    .await;
    assert_eq!(t.metric("parley_chat_outbox_published_total").await, Some(3.0));
    assert_eq!(t.metric("parley_chat_outbox_swept_total").await, None, "the sweep published a job a send had");
    assert_eq!(t.fake.requests(), 3);
    // Declared metrics carry their descriptions to Prometheus.
    let exposition = t.http.get(t.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        exposition.contains("# HELP parley_chat_outbox_published_total Jobs JetStream acknowledged"),
        "{exposition}"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_sends_are_accepted_and_wait_in_the_outbox_until_it_returns() {
    let nats = OwnNats::start(None, None).await;
    let url = nats.url();
    let t = TestPlatform::start_with(
        |config| {
            config.nats.url = url.clone();
            config.http.message_wait_secs = 1;
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("no-nats@example.com").await;
    let conversation = t.create_conversation(&session, "outage").await;

    let (port, store) = nats.stop();
    let (status, ready) = eventually("readiness to notice", Duration::from_secs(10), || async {
        let (status, body) = read(t.http.get(t.url("/readyz")).send().await.ok()?).await;
        (status == StatusCode::SERVICE_UNAVAILABLE).then_some((status, body))
    })
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_ne!(ready["checks"]["nats"], "ok", "{ready}");

    // The message is accepted (durable) and its job waits in the outbox.
    let (status, exchange) = t
        .post(&session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": "during the outage"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{exchange}");
    let reply_id = exchange["assistant_message"]["id"].as_str().unwrap().to_owned();

    // NATS returns: the job is relayed and answered, once.
    let nats = OwnNats::start(Some(port), Some(store)).await;
    let reply = eventually("the reply after NATS returns", Duration::from_secs(60), || async {
        let (_, message) = t.get(&session, &format!("/v1/messages/{reply_id}")).await;
        (message["status"] == "completed").then_some(message)
    })
    .await;
    assert_eq!(reply["content"], parley_fake_llm::reply_for("during the outage"));
    assert_eq!(t.fake.requests(), 1);
    t.stop().await;
    let (_, store) = nats.stop();
    let _ = std::fs::remove_dir_all(store);
}

/// A request that outlives `http.request_timeout_secs` (here: chat accepts the connection and never
/// answers) ends in a 503 problem with `Retry-After`, long before the gRPC client would give up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_is_a_503_with_retry_after() {
    let mut t = TestPlatform::start().await;
    let session = t.register("patient@example.com").await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            connections.push(connection);
        }
    });
    t.config.grpc.chat_url = silent_url;
    t.config.http.message_wait_secs = 1;
    t.config.http.request_timeout_secs = 2;
    let gateway = t.launch(&[Service::Gateway]).await.unwrap();

    let started = std::time::Instant::now();
    let response = t
        .http
        .post(format!("{gateway}/v1/conversations"))
        .bearer_auth(&session.token)
        .json(&json!({"title": "never stored"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned()), Some("1".to_owned()));
    let (status, body) = read(response).await;
    crate::harness::assert_problem(status, &body, 503, "unavailable");
    assert!(started.elapsed() < Duration::from_secs(20), "the deadline, not the gRPC timeout, ended it");
    let timeouts = t.metric("parley_http_timeouts_total").await;
    assert_eq!(timeouts, Some(1.0));
    held.abort();
    t.stop().await;
}
