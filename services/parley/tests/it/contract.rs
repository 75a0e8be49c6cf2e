//! The cross-cutting promises of shared/API.md: operations endpoints, headers, error shapes, tokens,
//! pagination, optimistic locking, idempotency, waiting, body limits and budgets.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{TestPlatform, assert_problem, read};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_endpoints_and_response_headers() {
    let t = TestPlatform::start().await;

    let response = t.http.get(t.url("/healthz")).header("x-request-id", "client-id-123").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-request-id"], "client-id-123");
    assert!(response.headers()["server-timing"].to_str().unwrap().starts_with("gateway;dur="));
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    assert_eq!(response.headers()["referrer-policy"], "no-referrer");
    assert_eq!(response.headers()["x-frame-options"], "DENY");

    // A request id that is not well-formed is replaced by one of ours.
    let response = t.http.get(t.url("/healthz")).header("x-request-id", "bad id with spaces").send().await.unwrap();
    let id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(id, "bad id with spaces");
    assert!(uuid::Uuid::parse_str(&id).is_ok());

    let (status, ready) = read(t.http.get(t.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ready["status"], "ready");
    for check in ["postgres", "redis", "nats", "user", "chat", "quota", "analytics"] {
        assert_eq!(ready["checks"][check], "ok", "{ready}");
    }

    let metrics = t.http.get(t.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("parley_http_requests_total"), "{metrics}");
    assert!(metrics.contains("parley_grpc_server_requests_total"), "{metrics}");

    let (status, openapi) = read(t.http.get(t.url("/openapi.json")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(openapi["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in [
        "/v1/auth/register",
        "/v1/auth/login",
        "/v1/auth/refresh",
        "/v1/auth/logout",
        "/v1/me",
        "/.well-known/jwks.json",
        "/v1/conversations",
        "/v1/conversations/{id}",
        "/v1/conversations/{id}/messages",
        "/v1/messages/{id}",
        "/v1/usage",
        "/healthz",
        "/readyz",
    ] {
        assert!(openapi["paths"].get(path).is_some(), "the OpenAPI document lacks {path}");
    }
    // A conversation can be started without a body, and the document says so.
    assert_ne!(openapi["paths"]["/v1/conversations"]["post"]["requestBody"]["required"], true);
    // Every documented error is what the server sends: problem+json (OpenAI's and Anthropic's routes:
    // their shapes, as JSON), and the errors any request can get are on every operation that can get them.
    for (path, item) in openapi["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let foreign = operation["tags"]
                .as_array()
                .is_some_and(|tags| tags.contains(&json!("openai")) || tags.contains(&json!("anthropic")));
            let media = if foreign { "application/json" } else { "application/problem+json" };
            let responses = operation["responses"].as_object().unwrap();
            for (status, response) in responses {
                if let Some(content) = response["content"].as_object().filter(|_| status.as_str() >= "400") {
                    assert!(content.keys().all(|key| key == media), "{method} {path} {status}: {content:?}");
                }
            }
            let mut expected = Vec::new();
            if operation["security"].as_array().is_some_and(|security| !security.is_empty()) {
                expected.extend(["401", "429", "503"]);
            }
            if operation.get("requestBody").is_some() {
                expected.extend(["400", "413"]);
            }
            for status in expected {
                assert!(responses.contains_key(status), "{method} {path} does not document {status}");
            }
        }
    }

    let (status, body) = read(t.http.get(t.url("/v1/nothing-here")).send().await.unwrap()).await;
    assert_problem(status, &body, 404, "not_found");
    let response = t.http.delete(t.url("/v1/auth/login")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()["content-type"], "application/problem+json");

    let (status, jwks) = read(t.http.get(t.url("/.well-known/jwks.json")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let key = &jwks["keys"][0];
    assert_eq!(key["kty"], "OKP");
    assert_eq!(key["crv"], "Ed25519");
    assert_eq!(key["alg"], "EdDSA");
    assert!(key["kid"].as_str().is_some_and(|kid| !kid.is_empty()));

    // Authenticated responses are never cached.
    let session = t.register("headers@example.com").await;
    let response = t.http.get(t.url("/v1/me")).bearer_auth(&session.token).send().await.unwrap();
    assert_eq!(response.headers()["cache-control"], "no-store");
    t.stop().await;
}

fn forge(header: Value, claims: Value, signature: &[u8]) -> String {
    let encode = |value: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap());
    format!("{}.{}.{}", encode(&header), encode(&claims), URL_SAFE_NO_PAD.encode(signature))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_were_not_issued_by_parley_are_refused() {
    let t = TestPlatform::start().await;
    let session = t.register("tokens@example.com").await;
    let (_, jwks) = read(t.http.get(t.url("/.well-known/jwks.json")).send().await.unwrap()).await;
    let kid = jwks["keys"][0]["kid"].as_str().unwrap().to_owned();
    let claims = json!({
        "sub": session.user_id, "iss": "parley", "aud": "parley-api", "iat": 1, "exp": 4_000_000_000i64,
        "jti": "x", "role": "admin", "tier": "enterprise",
    });

    let mut tampered = session.token.clone();
    tampered.pop();
    tampered.push(if session.token.ends_with('A') { 'B' } else { 'A' });
    let candidates = [
        ("garbage".to_owned(), "not a JWT"),
        (forge(json!({"alg": "none", "typ": "JWT"}), claims.clone(), b""), "alg none"),
        (forge(json!({"alg": "HS256", "kid": kid}), claims.clone(), &[7; 32]), "HMAC with a guessed key"),
        (forge(json!({"alg": "EdDSA", "kid": kid}), claims.clone(), &[0; 64]), "forged signature"),
        (forge(json!({"alg": "EdDSA", "kid": "unknown-kid"}), claims, &[0; 64]), "unknown kid"),
        (tampered, "tampered signature"),
        ("pk_not_a_real_key".to_owned(), "unknown API key"),
    ];
    for (token, what) in candidates {
        let response = t.http.get(t.url("/v1/me")).bearer_auth(&token).send().await.unwrap();
        let (status, body) = read(response).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(body["code"], "unauthorized", "{what}");
    }
    let (status, _) = t.get(&session, "/v1/me").await;
    assert_eq!(status, StatusCode::OK, "the genuine token still works");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_paginated_with_tamper_evident_cursors() {
    let t = TestPlatform::start().await;
    let session = t.register("pages@example.com").await;
    let mut created = Vec::new();
    for index in 0..5 {
        created.push(t.create_conversation(&session, &format!("conversation {index}")).await);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/v1/conversations?limit=2&cursor={cursor}"),
            None => "/v1/conversations?limit=2".to_owned(),
        };
        let (status, page) = t.get(&session, &path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert!(page["data"].as_array().unwrap().len() <= 2);
        seen.extend(page["data"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    created.reverse();
    assert_eq!(seen, created, "every conversation once, newest first");

    let (_, first) = t.get(&session, "/v1/conversations?limit=2").await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let mut altered = cursor.to_owned();
    let last = altered.pop().unwrap();
    altered.push(if last == 'A' { 'B' } else { 'A' });
    let (status, body) = t.get(&session, &format!("/v1/conversations?cursor={altered}")).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "cursor");
    // A cursor of one list is not a cursor of another.
    let (status, _) = t.get(&session, &format!("/v1/conversations/{}/messages?cursor={cursor}", created[0])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    for limit in ["0", "101", "ten"] {
        let (status, body) = t.get(&session, &format!("/v1/conversations?limit={limit}")).await;
        assert_problem(status, &body, 400, "invalid_request");
        assert_eq!(body["field"], "limit");
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_updates_need_the_current_version() {
    let t = TestPlatform::start().await;
    let session = t.register("locking@example.com").await;
    let conversation = t.create_conversation(&session, "v1").await;
    let path = t.url(&format!("/v1/conversations/{conversation}"));
    let patch = |if_match: Option<&str>, title: &str| {
        let mut request = t.http.patch(&path).bearer_auth(&session.token).json(&json!({"title": title}));
        if let Some(value) = if_match {
            request = request.header("if-match", value);
        }
        request.send()
    };
    let (status, body) = read(patch(None, "no precondition").await.unwrap()).await;
    assert_problem(status, &body, 428, "precondition_required");
    let response = patch(Some("\"1\""), "v2").await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["etag"], "\"2\"");
    let (_, body) = read(response).await;
    assert_eq!(body["title"], "v2");
    assert_eq!(body["version"], 2);
    let (status, body) = read(patch(Some("\"1\""), "stale").await.unwrap()).await;
    assert_problem(status, &body, 412, "precondition_failed");
    let (status, body) = read(patch(Some("version one"), "malformed").await.unwrap()).await;
    assert_problem(status, &body, 400, "invalid_request");
    let (_, current) = t.get(&session, &format!("/v1/conversations/{conversation}")).await;
    assert_eq!(current["title"], "v2");

    let unknown_model = t
        .http
        .patch(&path)
        .bearer_auth(&session.token)
        .header("if-match", "\"2\"")
        .json(&json!({"model": "no-such-model"}))
        .send()
        .await
        .unwrap();
    let (status, body) = read(unknown_model).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "model");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_with_the_same_idempotency_key_returns_the_first_reply() {
    let t = TestPlatform::start().await;
    let session = t.register("idempotent@example.com").await;
    let conversation = t.create_conversation(&session, "retries").await;
    let send = |key: &str| {
        t.http
            .post(t.url(&format!("/v1/conversations/{conversation}/messages")))
            .bearer_auth(&session.token)
            .header("idempotency-key", key)
            .json(&json!({"content": "only once"}))
            .send()
    };
    let (status, first) = read(send("key-1").await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (status, second) = read(send("key-1").await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["assistant_message"]["id"], second["assistant_message"]["id"]);
    assert_eq!(first["user_message"]["id"], second["user_message"]["id"]);
    assert_eq!(second["assistant_message"]["content"], first["assistant_message"]["content"]);
    assert_eq!(t.fake.requests(), 1, "the retry started no second reply");
    let (_, messages) = t.get(&session, &format!("/v1/conversations/{conversation}/messages")).await;
    assert_eq!(messages["data"].as_array().unwrap().len(), 2);

    // Keys are scoped per user: another user's identical key is a new message.
    let other = t.register("other-idempotent@example.com").await;
    let theirs = t.create_conversation(&other, "theirs").await;
    let response = t
        .http
        .post(t.url(&format!("/v1/conversations/{theirs}/messages")))
        .bearer_auth(&other.token)
        .header("idempotency-key", "key-1")
        .json(&json!({"content": "mine"}))
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(body["assistant_message"]["id"], first["assistant_message"]["id"]);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reply_is_accepted_then_completed() {
    let t = TestPlatform::start_with(
        |config| {
            config.http.message_wait_secs = 1;
            config.fake_llm.time_to_first_token_ms = 2_500;
        },
        &parley::Service::ALL,
    )
    .await;
    let session = t.register("slow@example.com").await;
    let conversation = t.create_conversation(&session, "slow").await;
    let response = t
        .http
        .post(t.url(&format!("/v1/conversations/{conversation}/messages")))
        .bearer_auth(&session.token)
        .json(&json!({"content": "take your time"}))
        .send()
        .await
        .unwrap();
    let timing = response.headers()["server-timing"].to_str().unwrap().to_owned();
    let (status, exchange) = read(response).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{exchange}");
    assert_eq!(exchange["assistant_message"]["status"], "pending");
    assert!(timing.contains("llm;dur="), "{timing}");
    let reply_id = exchange["assistant_message"]["id"].as_str().unwrap().to_owned();
    let message = crate::harness::eventually("the reply to complete", Duration::from_secs(20), || async {
        let (_, message) = t.get(&session, &format!("/v1/messages/{reply_id}")).await;
        (message["status"] == "completed").then_some(message)
    })
    .await;
    assert_eq!(message["content"], parley_fake_llm::reply_for("take your time"));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_bad_input_and_spent_budgets_are_clear_errors() {
    let t = TestPlatform::start_with(
        |config| {
            config.http.body_limit_bytes = 4096;
            config.agent.max_output_tokens = 10;
            config.tiers.get_mut("free").unwrap().tokens_per_day = 40;
        },
        &parley::Service::ALL,
    )
    .await;
    let session = t.register("limits@example.com").await;
    let conversation = t.create_conversation(&session, "limits").await;
    let path = format!("/v1/conversations/{conversation}/messages");

    let (status, body) = t.post(&session, &path, json!({"content": "x".repeat(5000)})).await;
    assert_problem(status, &body, 413, "payload_too_large");
    let (status, body) = t.post(&session, &path, json!({"content": "   "})).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "content");
    let (status, body) = t.post(&session, &path, json!({"content": 42})).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "content");
    let (status, body) = t.post(&session, &path, json!({"content": "hi", "model": "gpt-nonexistent"})).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "model");
    // A body that is not a JSON object is refused as such (serde would read an array as the fields).
    let (status, body) = t.post(&session, &path, json!(["from an array"])).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["detail"], "the body must be a JSON object");
    let (status, body) = t.post(&session, "/v1/chat/completions", json!(["parley-fake", []])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["message"], "the body must be a JSON object");
    // Over the body limit on the OpenAI route: 413 in OpenAI's error shape, not text.
    let huge = json!({"model": "parley-fake", "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    let (status, body) = t.post(&session, "/v1/chat/completions", huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large");
    // A path segment that does not decode names nothing (404), and a WebSocket route asked without an
    // upgrade says so: both as problems, not text.
    let response = t.http.get(t.url("/v1/conversations/%FF%FE")).bearer_auth(&session.token).send().await.unwrap();
    let (status, body) = read(response).await;
    assert_problem(status, &body, 404, "not_found");
    let ws = format!("/v1/messages/{}/ws", uuid::Uuid::now_v7());
    let (status, body) = read(t.http.get(t.url(&ws)).bearer_auth(&session.token).send().await.unwrap()).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "Upgrade");
    // The bearer scheme's name is case-insensitive.
    let me = t.http.get(t.url("/v1/me")).header("authorization", format!("bearer {}", session.token)).send().await;
    assert_eq!(me.unwrap().status(), StatusCode::OK);
    // A NUL character, which PostgreSQL's text cannot hold, is the client's 400, wherever it comes.
    let (status, body) = t.post(&session, &path, json!({"content": "a\u{0}b"})).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "content");
    for (field, value) in [("title", "a\u{0}b"), ("system_prompt", "be\u{0}kind")] {
        let (status, body) = t.post(&session, "/v1/conversations", json!({ field: value })).await;
        assert_problem(status, &body, 400, "invalid_request");
        assert_eq!(body["field"], field, "{body}");
        let url = t.url(&format!("/v1/conversations/{conversation}"));
        let current = t.http.get(url.clone()).bearer_auth(&session.token).send().await.unwrap();
        let etag = current.headers()["etag"].clone();
        let response =
            t.http.patch(url).bearer_auth(&session.token).header("if-match", etag).json(&json!({ field: value }));
        let (status, body) = read(response.send().await.unwrap()).await;
        assert_problem(status, &body, 400, "invalid_request");
        assert_eq!(body["field"], field, "{body}");
    }
    let (status, body) = t.post(&session, "/v1/api-keys", json!({"name": "ci\u{0}key"})).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "name");
    let response =
        t.http.post(t.url(&path)).bearer_auth(&session.token).body("{\"content\":\"hi\"}").send().await.unwrap();
    let (status, body) = read(response).await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "Content-Type");

    // A budget of 40 tokens a day: each exchange costs about 14, so the third is refused until midnight.
    // (A new conversation each time keeps the prompts as small as the gateway's estimate.)
    let mut refused = None;
    for index in 0..5 {
        let fresh = t.create_conversation(&session, &format!("budget {index}")).await;
        let response = t
            .http
            .post(t.url(&format!("/v1/conversations/{fresh}/messages")))
            .bearer_auth(&session.token)
            .json(&json!({"content": "count me"}))
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(response);
            break;
        }
        assert_eq!(response.status(), StatusCode::OK);
    }
    let refused = refused.expect("the budget ran out");
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry_after));
    let (status, body) = read(refused).await;
    assert_problem(status, &body, 429, "quota_exceeded");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_compressed_except_streams_and_cors_and_hsts_are_configurable() {
    let t = TestPlatform::start_with(
        |config| {
            config.http.cors_allowed_origins = vec!["https://app.example.com".to_owned()];
            config.http.hsts = true;
        },
        &parley::Service::ALL,
    )
    .await;

    for encoding in ["gzip", "br"] {
        let response = t.http.get(t.url("/openapi.json")).header("accept-encoding", encoding).send().await.unwrap();
        assert_eq!(response.headers()["content-encoding"], encoding);
    }
    let plain = t.http.get(t.url("/openapi.json")).send().await.unwrap();
    assert!(!plain.headers().contains_key("content-encoding"));
    assert_eq!(plain.headers()["strict-transport-security"], "max-age=31536000; includeSubDomains");

    // A browser preflight from an allowed origin, and from another.
    let preflight = |origin: &str| {
        t.http
            .request(reqwest::Method::OPTIONS, t.url("/v1/conversations"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization,content-type")
            .send()
    };
    let allowed = preflight("https://app.example.com").await.unwrap();
    assert_eq!(allowed.headers()["access-control-allow-origin"], "https://app.example.com");
    let other = preflight("https://evil.example.com").await.unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));

    // Event streams are never compressed, even when the client accepts it.
    let session = t.register("compress@example.com").await;
    let conversation = t.create_conversation(&session, "stream").await;
    let response = t
        .http
        .post(t.url(&format!("/v1/conversations/{conversation}/messages")))
        .bearer_auth(&session.token)
        .header("accept", "text/event-stream")
        .header("accept-encoding", "gzip, br")
        .json(&json!({"content": "no compression please"}))
        .send()
        .await
        .unwrap();
    assert!(!response.headers().contains_key("content-encoding"));
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    drop(response);
    t.stop().await;
}
