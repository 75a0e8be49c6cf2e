//! Rate limits that hold across replicas: per user by tier, per IP on the unauthenticated routes, with
//! `RateLimit-*` headers, and an in-process fallback while Redis is unreachable.

use std::process::{Child, Command};
use std::time::Duration;

use parley::Service;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{TestPlatform, assert_problem, eventually, read};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_share_one_limit_of_exactly_twenty_a_minute() {
    let mut t = TestPlatform::start_with(
        |config| config.tiers.get_mut("free").unwrap().requests_per_minute = 20,
        &Service::ALL,
    )
    .await;
    let second = t.launch(&[Service::Gateway]).await.unwrap();
    let third = t.launch(&[Service::Gateway]).await.unwrap();
    let session = t.register("limited@example.com").await;
    let gateways = [t.base.clone(), second, third];

    let mut allowed = 0;
    let mut refused = None;
    for attempt in 0..30 {
        let base = &gateways[attempt % 3];
        let response = t.http.get(format!("{base}/v1/me")).bearer_auth(&session.token).send().await.unwrap();
        assert_eq!(response.headers()["ratelimit-limit"], "20");
        assert!(response.headers().contains_key("ratelimit-remaining"));
        assert!(response.headers().contains_key("ratelimit-reset"));
        match response.status() {
            StatusCode::OK => {
                allowed += 1;
                assert_eq!(response.headers()["ratelimit-remaining"].to_str().unwrap(), (20 - allowed).to_string());
            }
            StatusCode::TOO_MANY_REQUESTS => {
                refused.get_or_insert(response);
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(allowed, 20, "twenty across three gateways, not sixty");
    let refused = refused.unwrap();
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after));
    let (status, body) = read(refused).await;
    assert_problem(status, &body, 429, "rate_limited");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_routes_are_limited_per_address() {
    let t = TestPlatform::start_with(|config| config.http.ip_requests_per_minute = 5, &Service::ALL).await;
    let login = || {
        t.http
            .post(t.url("/v1/auth/login"))
            .json(&json!({"email": "x@example.com", "password": "wrong password"}))
            .send()
    };
    for _ in 0..5 {
        let response = login().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()["ratelimit-limit"], "5");
    }
    let response = login().await.unwrap();
    assert!(response.headers().contains_key("retry-after"));
    let (status, body) = read(response).await;
    assert_problem(status, &body, 429, "rate_limited");
    t.stop().await;
}

/// A Redis of this test's own, so stopping it disturbs no other test.
pub struct OwnRedis {
    port: u16,
    child: Child,
}

impl OwnRedis {
    pub async fn start(port: Option<u16>) -> Self {
        let port =
            port.unwrap_or_else(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed by make test");
        eventually("the test's redis to answer", Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
        })
        .await;
        Self { port, child }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

async fn redis_has_key(url: &str, key: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else { return false };
    let Ok(mut connection) = client.get_multiplexed_async_connection().await else { return false };
    redis::cmd("EXISTS").arg(key).query_async::<i64>(&mut connection).await.unwrap_or(0) == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_limits_fall_back_to_each_replica_then_return_to_redis() {
    let redis = OwnRedis::start(None).await;
    let url = redis.url();
    let t = TestPlatform::start_with(
        |config| {
            config.redis.url = url.clone();
            config.tiers.get_mut("free").unwrap().requests_per_minute = 6;
            config.http.expected_gateway_replicas = 2;
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("fallback@example.com").await;
    let key = format!("{}:rl:user:{}", t.config.redis.key_prefix, session.user_id);
    let me = || t.http.get(t.url("/v1/me")).bearer_auth(&session.token).send();
    let count_allowed = |statuses: &[StatusCode]| statuses.iter().filter(|status| **status == StatusCode::OK).count();

    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(me().await.unwrap().status());
    }
    assert_eq!(count_allowed(&statuses), 6);
    assert!(redis_has_key(&url, &key).await, "the limit lives in redis");

    // Redis goes away: requests are still served, under this replica's share (6 / 2 replicas = 3).
    let port = redis.stop();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(me().await.unwrap().status());
    }
    assert!(
        statuses.iter().all(|status| *status == StatusCode::OK || *status == StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    assert_eq!(count_allowed(&statuses), 3, "{statuses:?}");
    let metrics = t.http.get(t.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("parley_ratelimit_fallback_decisions_total"), "the fallback is counted");
    // Every service degrades around Redis: the process stays ready (degraded) and says why.
    let response = t.http.get(t.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let ready: serde_json::Value = response.json().await.unwrap();
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert_ne!(ready["checks"]["redis"], "ok", "{ready}");
    assert_eq!(ready["checks"]["postgres"], "ok", "{ready}");

    // Redis is back (empty): limits are kept in redis again.
    let redis = OwnRedis::start(Some(port)).await;
    eventually("limits to return to redis", Duration::from_secs(10), || async {
        let _ = me().await;
        redis_has_key(&redis.url(), &key).await.then_some(())
    })
    .await;
    t.stop().await;
    redis.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_each_client_address_has_its_own_limit_and_cannot_be_spoofed() {
    let t = TestPlatform::start_with(
        |config| {
            config.http.ip_requests_per_minute = 2;
            config.http.trusted_proxy_hops = 1;
        },
        &Service::ALL,
    )
    .await;
    let login = |forwarded_for: &str| {
        t.http
            .post(t.url("/v1/auth/login"))
            .header("x-forwarded-for", forwarded_for)
            .json(&json!({"email": "x@example.com", "password": "wrong password"}))
            .send()
    };
    assert_eq!(login("203.0.113.1").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(login("203.0.113.1").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(login("203.0.113.1").await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    // A forged entry on the left changes nothing: the proxy's entry (the rightmost) is the client.
    assert_eq!(login("198.51.100.7, 203.0.113.1").await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    // Another client behind the same proxy has its own allowance.
    assert_eq!(login("203.0.113.2").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    t.stop().await;
}

/// On the routes that spend tokens a caller's limit is decided with the budget reservation, in one
/// Redis round trip: still one count a request, across gateways; a request past the limit is refused
/// before anything is reserved, in the route's own error shape; one the handler refuses before it
/// reserves (a bad body) counts too, and past the limit is told 429 rather than 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_decided_with_the_reservation_counts_each_request_once() {
    let mut t =
        TestPlatform::start_with(|config| config.tiers.get_mut("free").unwrap().requests_per_minute = 6, &Service::ALL)
            .await;
    let second = t.launch(&[Service::Gateway]).await.unwrap();
    let session = t.register("spends@example.com").await;
    let gateways = [t.base.clone(), second];
    let complete = |gateway: usize, body: serde_json::Value| {
        t.http.post(format!("{}/v1/chat/completions", gateways[gateway])).bearer_auth(&session.token).json(&body).send()
    };
    let hello = json!({"model": "parley-fake", "messages": [{"role": "user", "content": "hi"}]});
    let remaining =
        |response: &reqwest::Response| response.headers()["ratelimit-remaining"].to_str().unwrap().to_owned();

    let bad = complete(0, json!({"model": "parley-fake"})).await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(remaining(&bad), "5", "a refused body counts");
    let conversation = t.create_conversation(&session, "limited").await;
    for (attempt, left) in ["3", "2", "1"].into_iter().enumerate() {
        let response = complete(attempt % 2, hello.clone()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(remaining(&response), left);
        assert_eq!(response.headers()["ratelimit-limit"], "6");
    }
    let send = |body: serde_json::Value| {
        t.http
            .post(format!("{}/v1/conversations/{conversation}/messages", gateways[1]))
            .bearer_auth(&session.token)
            .json(&body)
            .send()
    };
    let sent = send(json!({"content": "hello"})).await.unwrap();
    assert!(sent.status().is_success(), "{}", sent.status());
    assert_eq!(remaining(&sent), "0");

    // Past the limit: refused in OpenAI's shape with Retry-After, and nothing is reserved.
    let refused = complete(0, hello.clone()).await.unwrap();
    assert_eq!(refused.headers()["ratelimit-remaining"], "0");
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after));
    let (status, body) = read(refused).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    let held = format!("{}:quota:{}:reserved", t.config.redis.key_prefix, session.user_id);
    let client = redis::Client::open(t.config.redis.url.as_str()).unwrap();
    let redis = client.get_multiplexed_async_connection().await.unwrap();
    eventually("the settled reservations to be released", Duration::from_secs(10), || {
        let (mut redis, held) = (redis.clone(), held.clone());
        async move {
            let held: i64 = redis::cmd("HLEN").arg(&held).query_async(&mut redis).await.unwrap();
            (held == 0).then_some(())
        }
    })
    .await;
    // A bad body past the limit is told the limit; so is a conversation message (as a problem).
    let bad = complete(1, json!({"model": "parley-fake"})).await.unwrap();
    assert_eq!(bad.status(), StatusCode::TOO_MANY_REQUESTS);
    let (status, body) = read(send(json!({"content": "again"})).await.unwrap()).await;
    assert_problem(status, &body, 429, "rate_limited");
    t.stop().await;
}
