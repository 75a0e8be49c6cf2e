//! Keyset pagination while rows are being inserted: every row that existed when the walk began is
//! returned exactly once, no row twice, in order.

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;

use crate::harness::{Session, TestPlatform};

/// Follows `next_cursor` from `path` to the end, `limit` rows a page; every row in order.
async fn walk(t: &TestPlatform, session: &Session, path: &str, limit: u32) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let separator = if path.contains('?') { '&' } else { '?' };
        let mut url = format!("{path}{separator}limit={limit}");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let (status, page) = t.get(session, &url).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        rows.extend(page["data"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return rows,
        }
    }
}

/// (timestamp field, id) of each row: the order a list's cursor follows.
fn positions(rows: &[Value], field: &str) -> Vec<(OffsetDateTime, String)> {
    rows.iter()
        .map(|row| {
            let at = OffsetDateTime::parse(row[field].as_str().unwrap(), &Rfc3339).unwrap();
            (at, row["id"].as_str().unwrap().to_owned())
        })
        .collect()
}

fn ids(rows: &[Value]) -> Vec<String> {
    rows.iter().map(|row| row["id"].as_str().unwrap().to_owned()).collect()
}

fn assert_each_once(seen: &[String], existing: &[String]) {
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no row is returned twice");
    for id in existing {
        assert!(unique.contains(id), "row {id} existed before the walk and was skipped");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_page_exactly_once_while_new_ones_arrive() {
    let t = TestPlatform::start().await;
    let session = t.register("pager@example.com").await;
    for n in 0..40 {
        t.create_conversation(&session, &format!("existing {n}")).await;
    }
    let existing = ids(&walk(&t, &session, "/v1/conversations", 100).await);
    assert_eq!(existing.len(), 40);

    let stop = CancellationToken::new();
    let writer = {
        let (base, token, stop) = (t.base.clone(), session.token.clone(), stop.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut created = 0;
            while !stop.is_cancelled() {
                let response = http
                    .post(format!("{base}/v1/conversations"))
                    .bearer_auth(&token)
                    .json(&json!({"title": format!("new {created}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::CREATED);
                created += 1;
            }
            created
        })
    };
    let seen = walk(&t, &session, "/v1/conversations", 7).await;
    stop.cancel();
    let created = writer.await.unwrap();
    assert!(created > 0, "rows were inserted during the walk");
    assert_each_once(&ids(&seen), &existing);
    // Newest first, strictly: the order the cursor follows.
    let order = positions(&seen, "updated_at");
    assert!(order.windows(2).all(|pair| pair[0] > pair[1]), "{order:?}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_page_exactly_once_while_a_conversation_grows() {
    let t = TestPlatform::start().await;
    let session = t.register("reader@example.com").await;
    let conversation = t.create_conversation(&session, "growing").await;
    let path = format!("/v1/conversations/{conversation}/messages");
    for n in 0..15 {
        let (status, body) = t.post(&session, &path, json!({"content": format!("before {n}")})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let existing = ids(&walk(&t, &session, &path, 100).await);
    assert_eq!(existing.len(), 30);

    let stop = CancellationToken::new();
    let writer = {
        let (base, token, stop, path) = (t.base.clone(), session.token.clone(), stop.clone(), path.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut sent = 0;
            while !stop.is_cancelled() {
                let response = http
                    .post(format!("{base}{path}"))
                    .bearer_auth(&token)
                    .json(&json!({"content": format!("during {sent}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                sent += 1;
            }
            sent
        })
    };
    let seen = walk(&t, &session, &path, 4).await;
    stop.cancel();
    let sent = writer.await.unwrap();
    assert!(sent > 0, "messages were sent during the walk");
    let seen_ids = ids(&seen);
    assert_each_once(&seen_ids, &existing);
    // Oldest first, strictly, and the earlier rows are where they were.
    assert_eq!(seen_ids[..existing.len()], existing[..]);
    let order = positions(&seen, "created_at");
    assert!(order.windows(2).all(|pair| pair[0] < pair[1]), "{order:?}");
    // Whatever arrived while walking is either in the walk or after its end, never lost from the list.
    let everything = ids(&walk(&t, &session, &path, 100).await);
    assert_eq!(everything[..seen_ids.len()], seen_ids[..]);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_page_newest_first_and_refuse_a_cursor_of_another_list() {
    let t = TestPlatform::start().await;
    let session = t.register("many-keys@example.com").await;
    let mut created = Vec::new();
    for n in 0..5 {
        let (status, key) = t.post(&session, "/v1/api-keys", json!({"name": format!("key {n}")})).await;
        assert_eq!(status, StatusCode::CREATED, "{key}");
        created.push(key["id"].as_str().unwrap().to_owned());
    }
    let rows = walk(&t, &session, "/v1/api-keys", 2).await;
    assert_each_once(&ids(&rows), &created);
    assert_eq!(rows.len(), 5);
    let at = positions(&rows, "created_at");
    assert!(at.windows(2).all(|pair| pair[0].0 >= pair[1].0), "newest first: {at:?}");

    // One page of two, then a cursor: the next page holds the next two.
    let (_, first) = t.get(&session, "/v1/api-keys?limit=2").await;
    assert_eq!(first["data"].as_array().unwrap().len(), 2);
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let (_, second) = t.get(&session, &format!("/v1/api-keys?limit=2&cursor={cursor}")).await;
    assert_eq!(ids(second["data"].as_array().unwrap()), ids(&rows[2..4]));

    // Bad limits, and a conversations cursor offered to the API-key list, are 400s naming the field.
    for limit in ["0", "101", "many"] {
        let (status, body) = t.get(&session, &format!("/v1/api-keys?limit={limit}")).await;
        crate::harness::assert_problem(status, &body, 400, "invalid_request");
        assert_eq!(body["field"], "limit");
    }
    for n in 0..3 {
        t.create_conversation(&session, &format!("conversation {n}")).await;
    }
    let (_, conversations) = t.get(&session, "/v1/conversations?limit=1").await;
    let foreign = conversations["next_cursor"].as_str().unwrap();
    let (status, body) = t.get(&session, &format!("/v1/api-keys?cursor={foreign}")).await;
    crate::harness::assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "cursor");
    t.stop().await;
}
