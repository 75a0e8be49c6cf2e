//! OpenAI's stored completions through the public API: a completion made with `store: true`, whole or
//! streamed, is read back, listed (in order, a page at a time, filtered by model and metadata), its
//! request's messages read, its metadata replaced, exported with the account, and deleted; one made without `store` is kept nowhere; another user sees
//! none of them; the texts are sealed at rest.

use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{Session, SseReader, TestPlatform, read};
use crate::openai::{run_sdk_script, tools_dir};

async fn complete(t: &TestPlatform, session: &Session, body: Value) -> Value {
    let (status, completion) = t.post(session, "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{completion}");
    completion
}

/// A streamed completion: its id and the text its chunks carried, read to `[DONE]`.
async fn complete_streamed(t: &TestPlatform, session: &Session, body: Value) -> (String, String) {
    let response =
        t.http.post(t.url("/v1/chat/completions")).bearer_auth(&session.token).json(&body).send().await.unwrap();
    let mut events = SseReader::new(response);
    let (mut id, mut text) = (String::new(), String::new());
    while let Some(event) = events.next().await {
        if event.data == "[DONE]" {
            return (id, text);
        }
        id = event.data["id"].as_str().unwrap().to_owned();
        if let Some(piece) = event.data.pointer("/choices/0/delta/content").and_then(Value::as_str) {
            text.push_str(piece);
        }
    }
    panic!("the stream ended before [DONE]");
}

fn ids(list: &Value) -> Vec<&str> {
    list["data"].as_array().unwrap().iter().map(|item| item["id"].as_str().unwrap()).collect()
}

fn assert_openai_not_found(status: StatusCode, body: &Value) {
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "not_found", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_completions_are_read_listed_and_deleted_and_only_those_asked_for_are_kept() {
    let t = TestPlatform::start().await;
    let ada = t.register("ada@example.com").await;
    let bob = t.register("bob@example.com").await;
    let messages = json!([
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is a stored completion?", "name": "ada"}
    ]);

    // Kept whole: read back as it was returned, with its metadata.
    let request = json!({"model": "parley-fake", "messages": messages, "store": true, "metadata": {"team": "search"}});
    let first = complete(&t, &ada, request).await;
    let first_id = first["id"].as_str().unwrap().to_owned();
    let (status, stored) = t.get(&ada, &format!("/v1/chat/completions/{first_id}")).await;
    assert_eq!(status, StatusCode::OK, "{stored}");
    for field in ["id", "object", "created", "model", "choices", "usage"] {
        assert_eq!(stored[field], first[field], "{field}");
    }
    assert_eq!(stored["metadata"], json!({"team": "search"}));

    // Kept streamed: the reply its chunks carried, whole, with its finish reason and usage.
    let request = json!({"model": "parley-fake", "messages": [{"role": "user", "content": "Stream it"}],
        "stream": true, "store": true, "metadata": {"team": "ads"}});
    let (second_id, streamed) = complete_streamed(&t, &ada, request).await;
    assert!(!streamed.is_empty());
    let (status, stored) = t.get(&ada, &format!("/v1/chat/completions/{second_id}")).await;
    assert_eq!(status, StatusCode::OK, "{stored}");
    assert_eq!(stored["object"], "chat.completion");
    assert_eq!(stored["choices"][0]["message"]["content"], streamed.as_str());
    assert_eq!(stored["choices"][0]["finish_reason"], "stop");
    assert!(stored["usage"]["total_tokens"].as_i64().unwrap() > 0, "{stored}");

    // Not asked to be kept, whole or streamed: nothing to read.
    let plain = complete(&t, &ada, json!({"model": "parley-fake", "messages": messages})).await;
    let (status, body) = t.get(&ada, &format!("/v1/chat/completions/{}", plain["id"].as_str().unwrap())).await;
    assert_openai_not_found(status, &body);
    let request = json!({"model": "parley-fake", "messages": messages, "stream": true, "store": false});
    let (unkept, _) = complete_streamed(&t, &ada, request).await;
    let (status, body) = t.get(&ada, &format!("/v1/chat/completions/{unkept}")).await;
    assert_openai_not_found(status, &body);

    // Listed oldest first, a page at a time either way, filtered by model and metadata.
    let (status, list) = t.get(&ada, "/v1/chat/completions").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(ids(&list), [first_id.as_str(), second_id.as_str()]);
    assert_eq!((&list["object"], &list["has_more"]), (&json!("list"), &json!(false)));
    assert_eq!((list["first_id"].as_str(), list["last_id"].as_str()), (Some(&*first_id), Some(&*second_id)));
    let (_, page) = t.get(&ada, "/v1/chat/completions?order=desc&limit=1").await;
    assert_eq!((ids(&page), &page["has_more"]), (vec![second_id.as_str()], &json!(true)));
    let (_, page) = t.get(&ada, &format!("/v1/chat/completions?order=desc&limit=1&after={second_id}")).await;
    assert_eq!((ids(&page), &page["has_more"]), (vec![first_id.as_str()], &json!(false)));
    let (_, page) = t.get(&ada, &format!("/v1/chat/completions?after={first_id}")).await;
    assert_eq!(ids(&page), [second_id.as_str()]);
    let (_, page) = t.get(&ada, "/v1/chat/completions?metadata%5Bteam%5D=ads").await;
    assert_eq!(ids(&page), [second_id.as_str()]);
    let (_, page) = t.get(&ada, "/v1/chat/completions?metadata[team]=nobody").await;
    assert!(ids(&page).is_empty());
    let (_, page) = t.get(&ada, "/v1/chat/completions?model=parley-fake&limit=5").await;
    assert_eq!(ids(&page).len(), 2);

    // The request's messages, as sent, each with an id.
    let (status, sent) = t.get(&ada, &format!("/v1/chat/completions/{first_id}/messages")).await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    assert_eq!(ids(&sent), [format!("{first_id}-0"), format!("{first_id}-1")]);
    assert_eq!(sent["data"][1]["content"], "What is a stored completion?");
    assert_eq!(sent["data"][1]["name"], "ada");
    let (_, sent) = t.get(&ada, &format!("/v1/chat/completions/{first_id}/messages?order=desc&limit=1")).await;
    let last = format!("{first_id}-1");
    assert_eq!((ids(&sent), &sent["has_more"]), (vec![last.as_str()], &json!(true)));

    // Its metadata replaced, all of it: read and filtered on as it is now.
    let path = format!("/v1/chat/completions/{first_id}");
    let (status, updated) = t.post(&ada, &path, json!({"metadata": {"team": "ads", "round": "2"}})).await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!((&updated["id"], &updated["metadata"]), (&json!(first_id), &json!({"team": "ads", "round": "2"})));
    let (_, stored) = t.get(&ada, &path).await;
    assert_eq!(stored["metadata"], json!({"team": "ads", "round": "2"}));
    assert_eq!(stored["choices"], first["choices"]);
    let (_, page) = t.get(&ada, "/v1/chat/completions?metadata[team]=ads").await;
    assert_eq!(ids(&page), [first_id.as_str(), second_id.as_str()]);
    let (_, page) = t.get(&ada, "/v1/chat/completions?metadata[team]=ads&metadata[round]=2").await;
    assert_eq!(ids(&page), [first_id.as_str()]);
    for bad in [json!({"metadata": {"n": 1}}), json!({"metadata": {"k": "v"}, "colour": "red"}), json!({})] {
        let (status, error) = t.post(&ada, &path, bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    }

    // The account's export carries them, oldest first, with the messages they were asked with.
    let (status, export) = t.get(&ada, "/v1/me/export").await;
    assert_eq!(status, StatusCode::OK, "{export}");
    let exported = export["stored_completions"].as_array().unwrap();
    let exported_ids: Vec<&str> = exported.iter().map(|item| item["completion"]["id"].as_str().unwrap()).collect();
    assert_eq!(exported_ids, [first_id.as_str(), second_id.as_str()]);
    assert_eq!(exported[0]["messages"], messages);
    assert_eq!(exported[0]["completion"]["metadata"]["team"], "ads");

    // Someone else's are not there for Bob, in any way.
    let (status, body) = t.get(&bob, &format!("/v1/chat/completions/{first_id}")).await;
    assert_openai_not_found(status, &body);
    let (status, body) = t.get(&bob, &format!("/v1/chat/completions/{first_id}/messages")).await;
    assert_openai_not_found(status, &body);
    let (_, list) = t.get(&bob, "/v1/chat/completions").await;
    assert!(ids(&list).is_empty());
    let (status, body) = t.post(&bob, &path, json!({"metadata": {"team": "bob's"}})).await;
    assert_openai_not_found(status, &body);
    let (_, export) = t.get(&bob, "/v1/me/export").await;
    assert_eq!(export["stored_completions"], json!([]));
    let response = t.http.delete(t.url(&format!("/v1/chat/completions/{first_id}"))).bearer_auth(&bob.token);
    let (status, body) = read(response.send().await.unwrap()).await;
    assert_openai_not_found(status, &body);

    // Sealed at rest: neither the reply nor the question is readable in the table.
    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    let uuid = Uuid::parse_str(first_id.strip_prefix("chatcmpl-").unwrap()).unwrap();
    let (completion, sent): (String, String) =
        sqlx::query_as("SELECT completion, messages FROM chat.stored_completions WHERE id = $1")
            .bind(uuid)
            .fetch_one(&pool)
            .await
            .unwrap();
    let reply = first["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!completion.contains(reply) && !sent.contains("stored completion"), "stored in the clear");

    // Deleted once; then gone.
    let response = t.http.delete(t.url(&format!("/v1/chat/completions/{first_id}"))).bearer_auth(&ada.token);
    let (status, deleted) = read(response.send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    assert_eq!(deleted, json!({"id": first_id, "object": "chat.completion.deleted", "deleted": true}));
    let (status, body) = t.get(&ada, &format!("/v1/chat/completions/{first_id}")).await;
    assert_openai_not_found(status, &body);
    let (_, list) = t.get(&ada, "/v1/chat/completions").await;
    assert_eq!(ids(&list), [second_id.as_str()]);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_stored_completion_requests_are_refused_naming_the_parameter() {
    let t = TestPlatform::start().await;
    let ada = t.register("ada@example.com").await;
    let messages = json!([{"role": "user", "content": "hi"}]);
    let many: serde_json::Map<String, Value> = (0..17).map(|n| (format!("k{n}"), json!("v"))).collect();
    for metadata in
        [json!({"n": 1}), json!("team"), Value::Object(many), json!({"k": "v".repeat(513)}), json!({"k": "a\u{0}b"})]
    {
        let body = json!({"model": "parley-fake", "messages": messages, "store": true, "metadata": metadata});
        let (status, error) = t.post(&ada, "/v1/chat/completions", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
        assert_eq!(error["error"]["param"], "metadata", "{error}");
    }
    for (query, param) in
        [("limit=0", "limit"), ("limit=101", "limit"), ("order=sideways", "order"), ("colour=red", "colour")]
    {
        let (status, error) = t.get(&ada, &format!("/v1/chat/completions?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {error}");
        assert_eq!(error["error"]["param"], param, "{error}");
    }
    // Ids that are not Parley's name nothing.
    for id in ["chatcmpl-nope", "not-an-id", "chatcmpl-00000000-0000-0000-0000-000000000000"] {
        let (status, body) = t.get(&ada, &format!("/v1/chat/completions/{id}")).await;
        assert_openai_not_found(status, &body);
    }
    let (status, list) = t.get(&ada, "/v1/chat/completions?after=chatcmpl-nope").await;
    assert_eq!((status, ids(&list).len()), (StatusCode::OK, 0));
    // Without credentials: OpenAI's shape too.
    let (status, error) = read(t.http.get(t.url("/v1/chat/completions")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{error}");
    assert!(error["error"]["message"].is_string(), "{error}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_reads_lists_and_deletes_stored_completions() {
    let t = TestPlatform::start().await;
    let python = tools_dir().join("venv/bin/python");
    run_sdk_script(&t, "stored-sdk@example.com", python, "openai_stored.py", Vec::new()).await;
    t.stop().await;
}
