//! API keys: shown once, listed without secrets, usable like an access token, revoked on every
//! gateway replica within a second.

use std::time::{Duration, Instant};

use parley::Service;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{Session, TestPlatform, assert_problem, eventually, read};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_shown_once_work_like_tokens_and_are_revoked_everywhere() {
    let mut t = TestPlatform::start().await;
    let other_gateway = t.launch(&[Service::Gateway]).await.unwrap();
    let session = t.register("keys-owner@example.com").await;

    let (status, created) = t.post(&session, "/v1/api-keys", json!({"name": "ci"})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("pk_") && key.len() > 40);
    assert!(key.starts_with(created["prefix"].as_str().unwrap()));
    let key_id = created["id"].as_str().unwrap().to_owned();

    let (_, list) = t.get(&session, "/v1/api-keys").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(&key), "the key is never shown again");
    assert_eq!(list["data"][0]["name"], "ci");

    // The key works like an access token, on any gateway.
    let as_key = Session { token: key.clone(), refresh_token: String::new(), user_id: session.user_id.clone() };
    let (status, me) = t.get(&as_key, "/v1/me").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["email"], "keys-owner@example.com");
    let on_other = |token: String| {
        let url = format!("{other_gateway}/v1/me");
        let http = t.http.clone();
        async move { http.get(url).bearer_auth(token).send().await.unwrap().status() }
    };
    assert_eq!(on_other(key.clone()).await, StatusCode::OK);

    // Someone else cannot see or revoke it; bad names and signing are clear errors.
    let stranger = t.register("keys-stranger@example.com").await;
    assert_eq!(t.delete(&stranger, &format!("/v1/api-keys/{key_id}")).await, StatusCode::NOT_FOUND);
    let (_, theirs) = t.get(&stranger, "/v1/api-keys").await;
    assert_eq!(theirs["data"].as_array().unwrap().len(), 0);
    let (status, body) = t.post(&session, "/v1/api-keys", json!({"name": ""})).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "name");

    // Revoked through one gateway, refused by the other within a second (it had the key cached).
    assert_eq!(t.delete(&session, &format!("/v1/api-keys/{key_id}")).await, StatusCode::NO_CONTENT);
    let revoked_at = Instant::now();
    eventually("the other gateway to refuse the revoked key", Duration::from_secs(1), || {
        let status = on_other(key.clone());
        async move { (status.await == StatusCode::UNAUTHORIZED).then_some(()) }
    })
    .await;
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    let (status, body) = t.get(&as_key, "/v1/me").await;
    assert_problem(status, &body, 401, "unauthorized");
    assert_eq!(t.delete(&session, &format!("/v1/api-keys/{key_id}")).await, StatusCode::NOT_FOUND);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_key_is_refused() {
    let t = TestPlatform::start().await;
    let response = t.http.get(t.url("/v1/me")).bearer_auth("pk_made_up_key").send().await.unwrap();
    let (status, body) = read(response).await;
    assert_problem(status, &body, 401, "unauthorized");
    t.stop().await;
}

/// How many `VerifyApiKey` calls the user service has answered, whatever their outcome.
async fn verify_calls(t: &TestPlatform) -> f64 {
    let text = t.http.get(t.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| line.starts_with("parley_grpc_server_requests_total{") && line.contains("/VerifyApiKey\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invented_key_costs_the_user_service_one_call() {
    let t = TestPlatform::start().await;
    let before = verify_calls(&t).await;
    for _ in 0..5 {
        let response = t.http.get(t.url("/v1/me")).bearer_auth("pk_invented-by-someone").send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(verify_calls(&t).await - before, 1.0, "the refusal is remembered");
    // A real key still works at once, however many invented ones came before.
    let session = t.register("keys-after-invented@example.com").await;
    let (_, created) = t.post(&session, "/v1/api-keys", json!({"name": "real"})).await;
    let key = created["key"].as_str().unwrap();
    let response = t.http.get(t.url("/v1/me")).bearer_auth(key).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    t.stop().await;
}

/// A platform whose client addresses may have 3 unverified API keys looked up a minute, and a new key
/// of a new user, not used yet.
async fn with_three_lookups_a_minute(email: &str) -> (TestPlatform, String) {
    let t = TestPlatform::start_with(|config| config.http.ip_requests_per_minute = 3, &Service::ALL).await;
    let session = t.register(email).await;
    let (_, created) = t.post(&session, "/v1/api-keys", json!({"name": "real"})).await;
    let key = created["key"].as_str().unwrap().to_owned();
    (t, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_keys_is_limited_per_client_address_before_the_user_service() {
    let (t, key) = with_three_lookups_a_minute("keys-guessed@example.com").await;
    // A real key, verified once (that lookup counts against the address too).
    let me = |credential: String| t.http.get(t.url("/v1/me")).bearer_auth(credential).send();
    assert_eq!(me(key.clone()).await.unwrap().status(), StatusCode::OK);

    let before = verify_calls(&t).await;
    let mut statuses = Vec::new();
    for guess in 0..6 {
        statuses.push(me(format!("pk_guess-{guess}")).await.unwrap().status());
    }
    // The address has 3 lookups a minute, and the real key's first use took one.
    assert!(statuses.iter().take(2).all(|status| *status == StatusCode::UNAUTHORIZED), "{statuses:?}");
    assert!(statuses.iter().skip(2).all(|status| *status == StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    assert_eq!(verify_calls(&t).await - before, 2.0, "a limited guess never reaches the user service");
    // The verified key is not held back by the guesses.
    assert_eq!(me(key).await.unwrap().status(), StatusCode::OK);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_a_new_key_asks_the_user_service_once_and_is_never_refused_for_it() {
    // Fewer lookups a minute per address than the burst has requests.
    let (t, key) = with_three_lookups_a_minute("keys-burst@example.com").await;

    let before = verify_calls(&t).await;
    let burst = (0..40).map(|_| t.http.get(t.url("/v1/me")).bearer_auth(key.clone()).send());
    let statuses: Vec<StatusCode> =
        futures::future::join_all(burst).await.into_iter().map(|response| response.unwrap().status()).collect();
    assert!(statuses.iter().all(|status| *status == StatusCode::OK), "{statuses:?}");
    assert_eq!(verify_calls(&t).await - before, 1.0, "the requests waited for one question");
    t.stop().await;
}
