//! HMAC request signing per API key, exactly as the API specifies: required for keys created with
//! `require_signature`, refused when missing, wrong, stale or replayed (on any gateway).

use std::time::Duration;

use parley::Service;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{Session, TestPlatform, assert_problem, eventually, read};

/// The two signing headers for a request, signed at `timestamp`.
fn sign(secret: &str, timestamp: i64, method: &str, path_and_query: &str, body: &[u8]) -> (String, String) {
    let body_hash = hex::encode(ring::digest::digest(&ring::digest::SHA256, body).as_ref());
    let message = format!("{timestamp}\n{method}\n{path_and_query}\n{body_hash}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    (timestamp.to_string(), format!("v1={}", hex::encode(ring::hmac::sign(&key, message.as_bytes()).as_ref())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_require_signatures_refuse_unsigned_stale_wrong_and_replayed_requests() {
    let mut t = TestPlatform::start().await;
    let other_gateway = t.launch(&[Service::Gateway]).await.unwrap();
    let session = t.register("signer@example.com").await;
    let (status, created) =
        t.post(&session, "/v1/api-keys", json!({"name": "signed", "require_signature": true})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    let secret = created["signing_secret"].as_str().expect("the signing secret, shown once").to_owned();
    let (_, list) = t.get(&session, "/v1/api-keys").await;
    assert!(!list.to_string().contains(&secret));
    assert_eq!(list["data"][0]["require_signature"], true);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();

    // Unsigned: refused.
    let response = t.http.get(t.url("/v1/me")).bearer_auth(&key).send().await.unwrap();
    let (status, body) = read(response).await;
    assert_problem(status, &body, 401, "unauthorized");

    // Signed: accepted, with a body and a query string too.
    let (timestamp, signature) = sign(&secret, now, "GET", "/v1/me", b"");
    let signed_get = |base: String, timestamp: String, signature: String| {
        t.http
            .get(format!("{base}/v1/me"))
            .bearer_auth(&key)
            .header("x-parley-timestamp", timestamp)
            .header("x-parley-signature", signature)
            .send()
    };
    let response = signed_get(t.base.clone(), timestamp.clone(), signature.clone()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = br#"{"title":"signed"}"#;
    let (ts, sig) = sign(&secret, now, "POST", "/v1/conversations", body);
    let response = t
        .http
        .post(t.url("/v1/conversations"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .header("x-parley-timestamp", ts)
        .header("x-parley-signature", sig)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED, "the body reaches the handler intact");
    let (ts, sig) = sign(&secret, now, "GET", "/v1/conversations?limit=5", b"");
    let response = t
        .http
        .get(t.url("/v1/conversations?limit=5"))
        .bearer_auth(&key)
        .header("x-parley-timestamp", ts)
        .header("x-parley-signature", sig)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // The same signature again, on either gateway: a replay.
    for base in [t.base.clone(), other_gateway.clone()] {
        let response = signed_get(base, timestamp.clone(), signature.clone()).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "replay");
    }
    // Stale, and signed with the wrong secret, or for another path.
    let (ts, sig) = sign(&secret, now - 400, "GET", "/v1/me", b"");
    assert_eq!(signed_get(t.base.clone(), ts, sig).await.unwrap().status(), StatusCode::UNAUTHORIZED, "stale");
    let (ts, sig) = sign("pss_not_the_secret", now, "GET", "/v1/me", b"");
    assert_eq!(signed_get(t.base.clone(), ts, sig).await.unwrap().status(), StatusCode::UNAUTHORIZED, "wrong secret");
    let (ts, sig) = sign(&secret, now + 1, "GET", "/v1/usage", b"");
    assert_eq!(signed_get(t.base.clone(), ts, sig).await.unwrap().status(), StatusCode::UNAUTHORIZED, "other path");
    assert_eq!(
        signed_get(t.base.clone(), now.to_string(), "v1=zz".to_owned()).await.unwrap().status(),
        StatusCode::UNAUTHORIZED,
        "malformed"
    );
    t.stop().await;
}

/// A platform whose every tier allows `per_minute` requests, a user, and an API key of theirs that
/// requires signatures (creating it is one of the user's requests): the platform, the user's session,
/// the key and its signing secret.
async fn limited_signing_key(per_minute: u32, email: &str) -> (TestPlatform, Session, String, String) {
    let t = TestPlatform::start_with(
        |config| {
            for tier in config.tiers.values_mut() {
                tier.requests_per_minute = per_minute;
            }
        },
        &Service::ALL,
    )
    .await;
    let session = t.register(email).await;
    let (status, created) =
        t.post(&session, "/v1/api-keys", json!({"name": "signed", "require_signature": true})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    let secret = created["signing_secret"].as_str().unwrap().to_owned();
    (t, session, key, secret)
}

/// The gateway's steps run in a fixed order: identity, limits, then signatures. A caller past their
/// rate limit is told 429 with `Retry-After` before any signature is looked at, so retrying unsigned
/// requests cannot be used to probe the signature check faster than the limit allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_applies_before_the_signature_check() {
    let (t, _, key, _) = limited_signing_key(2, "ordered@example.com").await;

    // The limit is the user's: creating the key used one of the two, the first unsigned request the
    // other (refused for its missing signature, with the limit's headers), the next one is 429.
    let response = t.http.get(t.url("/v1/me")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(response.headers()["ratelimit-remaining"], "0");
    let (status, body) = read(response).await;
    assert_problem(status, &body, 401, "unauthorized");
    let response = t.http.get(t.url("/v1/me")).bearer_auth(&key).send().await.unwrap();
    assert!(response.headers().contains_key("retry-after"));
    let (status, body) = read(response).await;
    assert_problem(status, &body, 429, "rate_limited");
    t.stop().await;
}

/// On a route that spends tokens, where an unsigned caller's limit waits to be decided with the budget
/// reservation, a signed request is still limited before its signature is checked: one refused for
/// the limit has not used up its signature in the replay check, and succeeds once the limit allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_request_past_the_limit_keeps_its_signature_for_its_retry() {
    // 30 a minute: a burst of 30, then one every two seconds.
    let (t, session, key, secret) = limited_signing_key(30, "retried@example.com").await;
    let body =
        serde_json::to_vec(&json!({"model": "parley-fake", "messages": [{"role": "user", "content": "hi"}]})).unwrap();
    let (timestamp, signature) =
        sign(&secret, time::OffsetDateTime::now_utc().unix_timestamp(), "POST", "/v1/chat/completions", &body);
    let signed = || {
        t.http
            .post(t.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .header("x-parley-timestamp", &timestamp)
            .header("x-parley-signature", &signature)
            .body(body.clone())
            .send()
    };
    // The rest of the allowance, used up by the same user's other requests.
    for _ in 0..40 {
        let response = t.http.get(t.url("/v1/me")).bearer_auth(&session.token).send().await.unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
    }
    let refused = signed().await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let answered = eventually("the limit to allow the signed request again", Duration::from_secs(10), || async {
        let response = signed().await.unwrap();
        (response.status() != StatusCode::TOO_MANY_REQUESTS).then_some(response.status())
    })
    .await;
    assert_eq!(answered, StatusCode::OK, "refusals for the limit left the signature unused");
    t.stop().await;
}
