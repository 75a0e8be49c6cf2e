//! Replies streamed as server-sent events, resumed by `Last-Event-ID`, and relayed by any gateway.

use std::time::Duration;

use parley::Service;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{SseEvent, SseReader, TestPlatform, assert_problem, eventually};

async fn read_to_end(reader: &mut SseReader) -> (Vec<SseEvent>, SseEvent) {
    let mut deltas = Vec::new();
    while let Some(event) = reader.next().await {
        match event.event.as_str() {
            "message.delta" => deltas.push(event),
            "message.completed" | "message.failed" => return (deltas, event),
            other => panic!("unexpected event {other}: {event:?}"),
        }
    }
    panic!("the stream ended without a final event");
}

fn text_of(deltas: &[SseEvent]) -> String {
    deltas.iter().map(|event| event.data["text"].as_str().unwrap()).collect()
}

fn ids_of(deltas: &[SseEvent]) -> Vec<u64> {
    deltas.iter().map(|event| event.id.as_deref().unwrap().parse().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_streams_as_it_is_generated_and_a_dropped_client_resumes_where_it_left() {
    let mut t = TestPlatform::start_with(|config| config.fake_llm.tokens_per_second = 25.0, &Service::ALL).await;
    let session = t.register("stream@example.com").await;
    let conversation = t.create_conversation(&session, "streaming").await;
    let prompt = "please stream this answer";
    let expected = parley_fake_llm::reply_for(prompt);

    let response = t.send_streaming(&session, &conversation, json!({"content": prompt})).await;
    let mut reader = SseReader::new(response);
    let created = reader.next().await.unwrap();
    assert_eq!(created.event, "message.created");
    assert_eq!(created.id.as_deref(), Some("0"));
    assert_eq!(created.data["content"], prompt);
    assert_eq!(created.data["role"], "user");

    // The first delta arrives while the model is still generating: the stored reply is not finished.
    let first = reader.next().await.unwrap();
    assert_eq!(first.event, "message.delta");
    assert_eq!(first.id.as_deref(), Some("1"));
    assert_eq!(first.data["index"], 0);
    let reply_id = first.data["message_id"].as_str().unwrap().to_owned();
    let (_, stored) = t.get(&session, &format!("/v1/messages/{reply_id}")).await;
    assert_ne!(stored["status"], "completed", "deltas must arrive before the reply is finished");

    // Read two more deltas, then drop the connection.
    let mut seen = vec![first];
    for _ in 0..2 {
        let delta = reader.next().await.unwrap();
        assert_eq!(delta.event, "message.delta");
        seen.push(delta);
    }
    drop(reader);

    // Reconnect with Last-Event-ID: every remaining delta, nothing twice, then the stored reply.
    let response = t
        .http
        .get(t.url(&format!("/v1/messages/{reply_id}/events")))
        .bearer_auth(&session.token)
        .header("last-event-id", "3")
        .send()
        .await
        .unwrap();
    let (rest, last) = read_to_end(&mut SseReader::new(response)).await;
    assert_eq!(ids_of(&rest).first(), Some(&4));
    assert!(ids_of(&rest).windows(2).all(|pair| pair[1] == pair[0] + 1), "{:?}", ids_of(&rest));
    assert_eq!(last.event, "message.completed");
    assert_eq!(format!("{}{}", text_of(&seen), text_of(&rest)), expected);
    assert_eq!(last.data["content"], expected);
    assert_eq!(last.data["status"], "completed");
    assert!(last.data["usage"]["output_tokens"].as_i64().unwrap() > 0);
    // What the stream ends with is the reply as stored, field for field (the gateway takes it from the
    // agent's `completed` event rather than reading it back), but for its place among its versions,
    // which reads give and stream events do not.
    let (_, mut stored) = t.get(&session, &format!("/v1/messages/{reply_id}")).await;
    assert_eq!((stored["branch"].take(), stored["branches"].take()), (json!(1), json!(1)));
    let stored: serde_json::Map<_, _> =
        stored.as_object().unwrap().clone().into_iter().filter(|(_, v)| !v.is_null()).collect();
    assert_eq!(last.data, Value::Object(stored));

    // After completion the endpoint replays the whole reply, on any gateway replica.
    let other_gateway = t.launch(&[Service::Gateway]).await.unwrap();
    for base in [t.base.clone(), other_gateway] {
        let response = t
            .http
            .get(format!("{base}/v1/messages/{reply_id}/events"))
            .bearer_auth(&session.token)
            .send()
            .await
            .unwrap();
        let (deltas, last) = read_to_end(&mut SseReader::new(response)).await;
        assert_eq!(ids_of(&deltas).first(), Some(&1));
        assert_eq!(text_of(&deltas), expected);
        assert_eq!(last.event, "message.completed");
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_relays_a_reply_sent_through_another_and_disconnects_cancel_nothing() {
    let mut t = TestPlatform::start_with(|config| config.fake_llm.tokens_per_second = 40.0, &Service::ALL).await;
    let second_gateway = t.launch(&[Service::Gateway]).await.unwrap();
    let session = t.register("relay@example.com").await;
    let conversation = t.create_conversation(&session, "relay").await;

    // Send through the first gateway and hang up at once.
    let response = t.send_streaming(&session, &conversation, json!({"content": "relay me"})).await;
    let mut reader = SseReader::new(response);
    assert_eq!(reader.next().await.unwrap().event, "message.created");
    drop(reader);
    let (_, messages) = t.get(&session, &format!("/v1/conversations/{conversation}/messages")).await;
    let reply_id = messages["data"][1]["id"].as_str().unwrap().to_owned();

    // Follow it live from the second gateway.
    let response = t
        .http
        .get(format!("{second_gateway}/v1/messages/{reply_id}/events"))
        .bearer_auth(&session.token)
        .send()
        .await
        .unwrap();
    let (deltas, last) = read_to_end(&mut SseReader::new(response)).await;
    assert_eq!(last.event, "message.completed");
    assert_eq!(text_of(&deltas), parley_fake_llm::reply_for("relay me"));

    // The hang-up did not cancel the stored reply.
    let stored = eventually("the reply to be stored", Duration::from_secs(10), || async {
        let (_, message) = t.get(&session, &format!("/v1/messages/{reply_id}")).await;
        (message["status"] == "completed").then_some(message)
    })
    .await;
    assert_eq!(stored["content"], parley_fake_llm::reply_for("relay me"));

    // Someone else's reply has no events for them; a malformed Last-Event-ID is a 400.
    let stranger = t.register("stranger-stream@example.com").await;
    let (status, body) = t.get(&stranger, &format!("/v1/messages/{reply_id}/events")).await;
    assert_problem(status, &body, 404, "not_found");
    let response = t
        .http
        .get(t.url(&format!("/v1/messages/{reply_id}/events")))
        .bearer_auth(&session.token)
        .header("last-event-id", "three")
        .send()
        .await
        .unwrap();
    let (status, body) = crate::harness::read(response).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "Last-Event-ID");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_carries_the_same_events() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let t = TestPlatform::start_with(|config| config.fake_llm.tokens_per_second = 40.0, &Service::ALL).await;
    let session = t.register("socket@example.com").await;
    let conversation = t.create_conversation(&session, "socket").await;
    let (_, exchange) = t
        .post(&session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": "over a socket"}))
        .await;
    let reply_id = exchange["assistant_message"]["id"].as_str().unwrap().to_owned();
    let ws_base = t.base.replacen("http://", "ws://", 1);

    // Authorization header, resuming after the second delta.
    let mut request = format!("{ws_base}/v1/messages/{reply_id}/ws?last_event_id=2").into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", session.token).parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut events = Vec::new();
    while let Some(frame) = socket.next().await {
        match frame.unwrap() {
            Message::Text(text) => events.push(serde_json::from_str::<serde_json::Value>(&text).unwrap()),
            Message::Close(_) => break,
            _ => {}
        }
    }
    let (last, deltas) = events.split_last().unwrap();
    assert_eq!(last["event"], "message.completed");
    assert_eq!(deltas.first().unwrap()["id"], "3", "resumed after event 2");
    let expected = parley_fake_llm::reply_for("over a socket");
    let tokens = parley_fake_llm::tokens_of(&expected);
    let rest: String = deltas.iter().map(|event| event["data"]["text"].as_str().unwrap()).collect();
    assert_eq!(format!("{}{rest}", tokens[..2].concat()), expected);
    assert_eq!(last["data"]["content"], expected);

    // Browsers pass the token in the query; without one the handshake is refused.
    let url = format!("{ws_base}/v1/messages/{reply_id}/ws?access_token={}", session.token);
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let first = socket.next().await.unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("message.delta"));
    let refused = tokio_tungstenite::connect_async(format!("{ws_base}/v1/messages/{reply_id}/ws")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("expected a 401, got {other:?}"),
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_carries_heartbeats() {
    use futures::StreamExt;

    let t = TestPlatform::start_with(
        |config| {
            config.http.stream_heartbeat_secs = 1;
            config.fake_llm.time_to_first_token_ms = 2_500;
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("heartbeat@example.com").await;
    let conversation = t.create_conversation(&session, "quiet").await;
    let response = t.send_streaming(&session, &conversation, json!({"content": "take a moment"})).await;
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    // While the model thinks, the stream stays alive with comment lines.
    #[allow(clippy::disallowed_methods, reason = "the raw body, to see the comment lines events skip")]
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("keep-alive") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next()).await.expect("a heartbeat").unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        assert!(!seen.contains("message.delta"), "the heartbeat comes before the first token: {seen}");
    }
    t.stop().await;
}

/// A credential in the WebSocket's query string passes the checks a header does: a key that must sign
/// is refused unsigned, an unknown key is refused, and the caller's rate limit counts the requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_in_the_websocket_query_passes_the_same_checks_as_a_header() {
    let t = TestPlatform::start_with(
        |config| {
            if let Some(free) = config.tiers.get_mut("free") {
                free.requests_per_minute = 8;
            }
        },
        &Service::ALL,
    )
    .await;
    let session = t.register("ws-checks@example.com").await;
    let conversation = t.create_conversation(&session, "ws").await;
    let (status, exchange) =
        t.post(&session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": "hi"})).await;
    assert_eq!(status, StatusCode::OK, "{exchange}");
    let reply_id = exchange["assistant_message"]["id"].as_str().unwrap().to_owned();
    let (status, key) = t.post(&session, "/v1/api-keys", json!({"name": "signed", "require_signature": true})).await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let signed_key = key["key"].as_str().unwrap().to_owned();

    let ws_base = t.base.replacen("http://", "ws://", 1);
    for credential in [signed_key.as_str(), "pk_not-a-key-anyone-made"] {
        let url = format!("{ws_base}/v1/messages/{reply_id}/ws?access_token={credential}");
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
            other => panic!("{credential}: expected a 401, got {other:?}"),
        }
    }

    // The rate limit counts requests whose credential came in the query (no upgrade needed to count).
    let url = t.url(&format!("/v1/messages/{reply_id}/ws?access_token={}", session.token));
    let mut limited = None;
    for _ in 0..10 {
        let response = t.http.get(&url).send().await.unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(response);
            break;
        }
        assert!(response.headers().contains_key("ratelimit-remaining"), "{:?}", response.headers());
    }
    let limited = limited.expect("8 requests a minute: the query credential's requests are limited");
    assert!(limited.headers().contains_key("retry-after"));
    t.stop().await;
}
