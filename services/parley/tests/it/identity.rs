//! Identity under attack and over time: signing-key rotation, tokens that are not quite right, brute
//! force on login, the audit log, and gateways that keep verifying tokens while the user service is down.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parley::Service;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Session, TestPlatform, assert_problem, eventually, read};

fn parley_admin(database_url: &str, args: &[&str]) -> std::process::Output {
    let args: Vec<&str> = std::iter::once("admin").chain(args.iter().copied()).collect();
    crate::harness::run_parley(&[("DATABASE_URL", database_url)], &args)
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

async fn login(t: &TestPlatform, email: &str, password: &str) -> (StatusCode, Value) {
    read(
        t.http.post(t.url("/v1/auth/login")).json(&json!({"email": email, "password": password})).send().await.unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_signing_key_is_published_before_it_signs_and_old_tokens_stay_valid() {
    let t = TestPlatform::start_with(|config| config.auth.jwks_refresh_secs = 1, &Service::ALL).await;
    let old = t.register("rotate-key@example.com").await;
    let old_kid = kid_of(&old.token);

    let output = parley_admin(&t.config.database.url, &["rotate-signing-key", "--activate-in-secs", "3"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    // Published at once (two keys), while tokens are still signed with the old one.
    let keys = eventually("the new key in the JWKS", Duration::from_secs(5), || async {
        let (_, jwks) = read(t.http.get(t.url("/.well-known/jwks.json")).send().await.unwrap()).await;
        let keys = jwks["keys"].as_array().cloned().unwrap_or_default();
        (keys.len() == 2).then_some(keys)
    })
    .await;
    let (_, before) = login(&t, "rotate-key@example.com", "correct horse battery").await;
    assert_eq!(kid_of(before["access_token"].as_str().unwrap()), old_kid, "the new key does not sign yet");
    let new_kid = keys.iter().map(|key| key["kid"].as_str().unwrap().to_owned()).find(|kid| *kid != old_kid).unwrap();

    // Once active, the new key signs; tokens of both keys verify.
    let new_token = eventually("the new key to sign", Duration::from_secs(10), || async {
        let (_, body) = login(&t, "rotate-key@example.com", "correct horse battery").await;
        let token = body["access_token"].as_str()?.to_owned();
        (kid_of(&token) == new_kid).then_some(token)
    })
    .await;
    for token in [old.token.clone(), new_token] {
        let session = Session { token, refresh_token: String::new(), user_id: old.user_id.clone() };
        let (status, _) = t.get(&session, "/v1/me").await;
        assert_eq!(status, StatusCode::OK);
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_misaddressed_tokens_are_refused_even_when_properly_signed() {
    let t = TestPlatform::start().await;
    let session = t.register("claims@example.com").await;
    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    let (kid, sealed, sealed_flag): (String, Vec<u8>, bool) =
        sqlx::query_as("SELECT kid, private_key, private_key_sealed FROM identity.signing_keys LIMIT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    assert!(sealed_flag, "private keys are stored sealed");
    let private_key = open_sealed(&sealed);
    let key = EncodingKey::from_ed_der(&private_key);
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = |iss: &str, aud: &str, exp: i64| json!({"sub": session.user_id, "iss": iss, "aud": aud, "iat": now, "exp": exp, "jti": "t", "role": "user", "tier": "free"});
    let valid = jsonwebtoken::encode(&header, &claims("parley", "parley-api", now + 60), &key).unwrap();
    let cases = [
        (claims("parley", "parley-api", now - 3600), "expired"),
        (claims("parley", "someone-else", now + 60), "wrong audience"),
        (claims("not-parley", "parley-api", now + 60), "wrong issuer"),
    ];
    for (claims, what) in cases {
        let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        let (status, body) = read(t.http.get(t.url("/v1/me")).bearer_auth(token).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
    }
    let (status, _) = read(t.http.get(t.url("/v1/me")).bearer_auth(valid).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "the same key with the right claims works");
    t.stop().await;
}

/// A login from `address`, as a proxy in front of the gateway reports it.
async fn login_from(t: &TestPlatform, address: &str, email: &str, password: &str) -> (StatusCode, Value, Option<u64>) {
    let response = t
        .http
        .post(t.url("/v1/auth/login"))
        .header("x-forwarded-for", address)
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap();
    let retry_after = response.headers().get("retry-after").and_then(|value| value.to_str().ok()?.parse().ok());
    let (status, body) = read(response).await;
    (status, body, retry_after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_guessing_a_password_is_stopped_without_locking_the_owner_out() {
    let t = TestPlatform::start_with(
        |config| {
            config.auth.max_failed_logins = 3;
            config.http.trusted_proxy_hops = 1;
        },
        &Service::ALL,
    )
    .await;
    t.register("owner@example.com").await;
    let (owner, right, wrong) = ("198.51.100.7", "correct horse battery", "guess guess guess");
    for _ in 0..3 {
        let (status, _, _) = login_from(&t, "203.0.113.9", "owner@example.com", wrong).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // The guessing address is stopped for the whole window, even with the right password.
    let (status, body, retry_after) = login_from(&t, "203.0.113.9", "owner@example.com", right).await;
    assert_problem(status, &body, 429, "rate_limited");
    assert_eq!(retry_after, Some(15 * 60));
    // The owner, elsewhere, waits a second after the last failure at most, then logs in.
    let owner_logs_in = || async {
        let (status, _, _) = login_from(&t, owner, "owner@example.com", right).await;
        (status == StatusCode::OK).then_some(())
    };
    eventually("the owner to log in", Duration::from_secs(3), owner_logs_in).await;

    // Many addresses guessing: each failure past the threshold doubles the wait before the next try,
    // from anywhere (here 2, then 4 seconds), so guesses slow to one a minute at most.
    for (index, expected_wait) in [(1, 2), (2, 4)] {
        let guesser = format!("192.0.2.{index}");
        let (status, _, _) = login_from(&t, &guesser, "owner@example.com", wrong).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, body, retry_after) = login_from(&t, owner, "owner@example.com", right).await;
        assert_problem(status, &body, 429, "rate_limited");
        let retry_after = retry_after.unwrap();
        assert!(
            (1..=expected_wait).contains(&retry_after),
            "Retry-After {retry_after}, expected at most {expected_wait}"
        );
        eventually("the owner to log in", Duration::from_secs(expected_wait + 2), owner_logs_in).await;
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_on_an_account_is_stopped_and_everything_is_in_the_audit_log() {
    let t = TestPlatform::start_with(|config| config.auth.max_failed_logins = 3, &Service::ALL).await;
    let session = t.register("victim@example.com").await;
    let (status, _) = login(&t, "victim@example.com", "correct horse battery").await;
    assert_eq!(status, StatusCode::OK);
    for _ in 0..3 {
        let (status, _) = login(&t, "victim@example.com", "guess guess guess").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // Locked, even with the right password, and the same for an email nobody registered.
    let (status, body) = login(&t, "victim@example.com", "correct horse battery").await;
    assert_problem(status, &body, 429, "rate_limited");
    for _ in 0..3 {
        login(&t, "nobody@example.com", "guess guess guess").await;
    }
    let (status, _) = login(&t, "nobody@example.com", "guess guess guess").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);

    let (_, key) = t.post(&session, "/v1/api-keys", json!({"name": "audited"})).await;
    assert_eq!(
        t.delete(&session, &format!("/v1/api-keys/{}", key["id"].as_str().unwrap())).await,
        StatusCode::NO_CONTENT
    );

    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT event, client_ip FROM identity.audit_log WHERE user_id = $1::uuid OR email = 'victim@example.com' ORDER BY at",
    )
    .bind(&session.user_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let events: Vec<&str> = rows.iter().map(|(event, _)| event.as_str()).collect();
    assert_eq!(
        events,
        [
            "registered",
            "login_succeeded",
            "login_failed",
            "login_failed",
            "login_failed",
            "login_locked",
            "api_key_created",
            "api_key_revoked"
        ]
    );
    assert!(
        rows.iter().all(|(_, ip)| ip.as_deref() == Some("127.0.0.1")),
        "each with the address it came from: {rows:?}"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_keep_verifying_tokens_while_the_user_service_is_down() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let user_services = [Service::Chat, Service::Quota, Service::Analytics, Service::Agent, Service::Gateway];
    let mut t = TestPlatform::start_with(
        |config| {
            config.grpc.addr = format!("127.0.0.1:{port}");
            config.grpc.user_url = format!("http://127.0.0.1:{port}");
        },
        &user_services,
    )
    .await;
    t.launch_at_configured_address(&[Service::User]).await;
    let session = eventually("the user service", Duration::from_secs(10), || async {
        let response = t
            .http
            .post(t.url("/v1/auth/register"))
            .json(&json!({"email": "steady@example.com", "password": "correct horse battery"}))
            .send()
            .await
            .ok()?;
        let body: Value = response.json().await.ok()?;
        Some(Session {
            token: body["access_token"].as_str()?.to_owned(),
            refresh_token: String::new(),
            user_id: body["user"]["id"].as_str()?.to_owned(),
        })
    })
    .await;

    // The gateway started before the user service: it picks the keys up within its retry back-off.
    eventually("the gateway to serve this user", Duration::from_secs(5), || async {
        (t.get(&session, "/v1/me").await.0 == StatusCode::OK).then_some(())
    })
    .await;
    t.kill_launched(0).await;
    // Tokens still verify (cached keys): the API keeps working for signed-in users.
    let conversation = t.create_conversation(&session, "still here").await;
    let (status, exchange) = t
        .post(&session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": "are you there?"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{exchange}");
    // What needs the user service says so clearly.
    let (status, body) = login(&t, "steady@example.com", "correct horse battery").await;
    assert_problem(status, &body, 503, "unavailable");
    t.stop().await;
}

/// Opens a key sealed with the development secrets key (AES-256-GCM, nonce first), as the user service does.
fn open_sealed(stored: &[u8]) -> Vec<u8> {
    use base64::Engine;
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let secret =
        base64::engine::general_purpose::STANDARD.decode(parley_platform::config::DEVELOPMENT_SECRETS_KEY).unwrap();
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &secret).unwrap());
    let (nonce, sealed) = stored.split_at(12);
    let mut buffer = sealed.to_vec();
    let plain = key.open_in_place(Nonce::try_assume_unique_for_key(nonce).unwrap(), Aad::empty(), &mut buffer).unwrap();
    plain.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_read_the_audit_log_by_account_event_and_time_a_page_at_a_time() {
    let t = TestPlatform::start_with(
        |config| config.auth.admin_emails = vec!["boss@example.com".to_owned()],
        &Service::ALL,
    )
    .await;
    let boss = t.register("boss@example.com").await;
    let victim = t.register("audited@example.com").await;
    for _ in 0..2 {
        login(&t, "audited@example.com", "guess guess guess").await;
    }
    let (status, _) = t.post(&victim, "/v1/api-keys", json!({"name": "audited"})).await;
    assert_eq!(status, StatusCode::CREATED);

    // Not for everyone.
    let (status, body) = t.get(&victim, "/v1/admin/audit").await;
    assert_problem(status, &body, 403, "forbidden");

    let events = |page: &Value| -> Vec<String> {
        page["data"].as_array().unwrap().iter().map(|entry| entry["event"].as_str().unwrap().to_owned()).collect()
    };
    // By account id: what happened to the account, newest first.
    let (status, page) = t.get(&boss, &format!("/v1/admin/audit?account={}", victim.user_id)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(events(&page), ["api_key_created", "login_failed", "login_failed", "registered"]);
    assert_eq!(page["data"][0]["client_ip"], "127.0.0.1");
    assert!(page["data"][0]["detail"]["api_key_id"].is_string(), "{page}");
    // By email and event.
    let (_, page) = t.get(&boss, "/v1/admin/audit?account=Audited@Example.com&event=login_failed").await;
    assert_eq!(events(&page), ["login_failed", "login_failed"]);
    // A page at a time, each entry once.
    let (_, first) = t.get(&boss, &format!("/v1/admin/audit?account={}&limit=3", victim.user_id)).await;
    let cursor = first["next_cursor"].as_str().expect("a next page").to_owned();
    let (_, second) =
        t.get(&boss, &format!("/v1/admin/audit?account={}&limit=3&cursor={cursor}", victim.user_id)).await;
    assert_eq!(events(&second), ["registered"]);
    assert!(second["next_cursor"].is_null());
    // By time: nothing has happened in the future; a bad time or a foreign cursor is a 400.
    let (_, page) = t.get(&boss, "/v1/admin/audit?from=2999-01-01T00:00:00Z").await;
    assert_eq!(events(&page), Vec::<String>::new());
    let (status, body) = t.get(&boss, "/v1/admin/audit?to=yesterday").await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "to");
    let (status, body) = t.get(&boss, "/v1/admin/audit?cursor=AAAA").await;
    assert_problem(status, &body, 400, "invalid_request");
    t.stop().await;
}
