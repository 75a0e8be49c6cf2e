//! OpenAI's stored completions: a completion made with `store: true` is kept, with its request's
//! messages and the client's `metadata`, and read back with `GET /v1/chat/completions/{id}`, listed with
//! `GET /v1/chat/completions`, its messages read with `GET /v1/chat/completions/{id}/messages`, its
//! metadata replaced with `POST /v1/chat/completions/{id}`, and deleted with
//! `DELETE /v1/chat/completions/{id}`, in OpenAI's shapes. Chat keeps them (sealed, like
//! what users write in conversations); a completion made without `store` is never written anywhere.
//!
//! A stored completion is kept before its response is sent (streamed: before `[DONE]`), so a read right
//! after the response finds it. When chat cannot keep it, the client still gets its completion, whose
//! tokens were spent and charged; the failure is logged and counted
//! (`parley_gateway_completions_not_stored_total`).

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use parley_platform::ServiceError;
use parley_proto::chat::v1 as pb;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::openai::{OpenAiError, OpenAiResult};
use crate::AppState;
use crate::auth::Caller;
use crate::problem::ApiError;

/// OpenAI's completion ids: this prefix, then (here) a UUID.
const ID_PREFIX: &str = "chatcmpl-";

/// `metadata` of a request, checked ([`parley_platform::limits::metadata`]): absent is none, and what
/// is wrong is a 400 naming `metadata`.
pub(super) fn metadata(given: Option<&Value>) -> OpenAiResult<Map<String, Value>> {
    parley_platform::limits::metadata(given.unwrap_or(&Value::Null))
        .map_err(|why| OpenAiError::invalid_param("metadata", format!("metadata: {why}")))
}

/// What keeping one completion needs besides the completion itself.
pub(super) struct Keep {
    pub state: AppState,
    pub user_id: Uuid,
    pub model: String,
    pub metadata: Map<String, Value>,
    /// The request's `messages`, as the client sent them.
    pub messages: Value,
}

impl Keep {
    /// Keeps `completion` (a `chat.completion` object) under `id`; a failure is logged and counted.
    pub(super) async fn store(&self, id: Uuid, completion: &Value) {
        let request = pb::StoredCompletion {
            id: id.to_string(),
            user_id: self.user_id.to_string(),
            model: self.model.clone(),
            metadata: Value::Object(self.metadata.clone()).to_string(),
            completion: completion.to_string(),
            messages: self.messages.to_string(),
            created_at: None,
        };
        if let Err(status) = self.state.backends.chat.clone().store_completion(request).await {
            metrics::counter!(crate::metrics::COMPLETIONS_NOT_STORED).increment(1);
            tracing::warn!(completion = %id, code = ?status.code(), message = status.message(), "a completion asked to be stored was not");
        }
    }
}

/// The UUID of a `chatcmpl-…` id; anything else names no stored completion.
fn completion_uuid(id: &str) -> Option<Uuid> {
    id.strip_prefix(ID_PREFIX).and_then(|uuid| Uuid::parse_str(uuid).ok())
}

fn not_found(id: &str) -> OpenAiError {
    OpenAiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        format!("No completion found with id {id:?}"),
    )
}

/// The request to chat naming the caller's stored completion `id`; an id not of Parley's form is 404.
fn named(caller: &Caller, id: &str) -> OpenAiResult<pb::StoredCompletionRequest> {
    let uuid = completion_uuid(id).ok_or_else(|| not_found(id))?;
    Ok(pb::StoredCompletionRequest { user_id: caller.user_id.to_string(), id: uuid.to_string() })
}

/// Chat's answer about completion `id` as OpenAI's error: not found is OpenAI's 404.
fn chat_error(id: &str, status: tonic::Status) -> OpenAiError {
    if status.code() == tonic::Code::NotFound { not_found(id) } else { status.into() }
}

/// The stored completion `id` of the caller, or 404.
async fn owned(state: &AppState, caller: &Caller, id: &str) -> OpenAiResult<pb::StoredCompletion> {
    let found = state.backends.chat.clone().get_stored_completion(named(caller, id)?).await;
    found.map(tonic::Response::into_inner).map_err(|status| chat_error(id, status))
}

/// A stored completion as OpenAI shows it: the completion object as it was returned, with its metadata
/// as it is now.
pub(super) fn shown(stored: &pb::StoredCompletion) -> Result<Value, ServiceError> {
    let mut completion: Value = serde_json::from_str(&stored.completion).map_err(|_| ServiceError::internal())?;
    let metadata: Value = serde_json::from_str(&stored.metadata).map_err(|_| ServiceError::internal())?;
    let Value::Object(fields) = &mut completion else {
        return Err(ServiceError::internal());
    };
    fields.insert("metadata".to_owned(), metadata);
    Ok(completion)
}

/// Get a stored completion (OpenAI wire format).
#[utoipa::path(get, path = "/v1/chat/completions/{id}", tag = "openai", security(("bearer" = [])),
    params(("id" = String, Path, description = "The completion's id (`chatcmpl-…`)")),
    responses(
        (status = 200, description = "The chat.completion object as it was returned, with its metadata"),
        (status = 404, description = "No stored completion of the caller's has this id (OpenAI error shape)"),
    ))]
pub async fn get(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(id): Path<String>,
) -> OpenAiResult<Json<Value>> {
    let caller = caller?;
    let stored = owned(&state, &caller, &id).await?;
    Ok(Json(shown(&stored)?))
}

/// What `POST /v1/chat/completions/{id}` changes: the metadata, all of it (null clears it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Update {
    metadata: Value,
}

/// Replace a stored completion's metadata (OpenAI wire format).
#[utoipa::path(post, path = "/v1/chat/completions/{id}", tag = "openai", security(("bearer" = [])),
    params(("id" = String, Path, description = "The completion's id (`chatcmpl-…`)")),
    request_body(content = Object, description = "{\"metadata\": {...}}: up to 16 string pairs, or null to clear them"),
    responses(
        (status = 200, description = "The chat.completion object with its new metadata"),
        (status = 400, description = "A body that is not {metadata} (OpenAI error shape, param named)"),
        (status = 404, description = "No stored completion of the caller's has this id (OpenAI error shape)"),
    ))]
pub async fn update(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> OpenAiResult<Json<Value>> {
    let caller = caller?;
    let update: Update = super::openai::json_body(&headers, body)?;
    let metadata = metadata(Some(&update.metadata))?;
    let named = named(&caller, &id)?;
    let request = pb::UpdateStoredCompletionRequest {
        user_id: named.user_id,
        id: named.id,
        metadata: Value::Object(metadata).to_string(),
    };
    let updated = state.backends.chat.clone().update_stored_completion(request).await;
    let stored = updated.map_err(|status| chat_error(&id, status))?.into_inner();
    Ok(Json(shown(&stored)?))
}

/// A list query's parameters, checked.
#[derive(Debug)]
struct ListQuery {
    after: Option<String>,
    limit: u32,
    descending: bool,
    model: Option<String>,
    metadata: Map<String, Value>,
}

/// Reads `after`, `limit` (1 to 100, default 20), `order` (`asc`, the default, or `desc`), `model` and
/// `metadata[key]=value` (OpenAI's form); any other parameter is a 400 naming it.
fn list_query(raw: Option<&str>, with_filters: bool) -> OpenAiResult<ListQuery> {
    let mut query = ListQuery { after: None, limit: 20, descending: false, model: None, metadata: Map::new() };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or_default())
        .map_err(|_| OpenAiError::invalid("the query string is not URL-encoded"))?;
    for (name, value) in pairs {
        match name.as_str() {
            "after" => query.after = Some(value),
            "limit" => {
                query.limit =
                    value.parse().ok().filter(|limit| (1..=100).contains(limit)).ok_or_else(|| {
                        OpenAiError::invalid_param("limit", "limit: must be an integer from 1 to 100")
                    })?;
            }
            "order" => {
                query.descending = match value.as_str() {
                    "asc" => false,
                    "desc" => true,
                    _ => return Err(OpenAiError::invalid_param("order", "order: must be asc or desc")),
                };
            }
            "model" if with_filters => {
                if value.contains('\0') {
                    return Err(OpenAiError::invalid_param("model", "model: must not contain NUL"));
                }
                query.model = Some(value);
            }
            key if with_filters && key.starts_with("metadata[") && key.ends_with(']') => {
                let key = &key["metadata[".len()..key.len() - 1];
                query.metadata.insert(key.to_owned(), Value::String(value));
            }
            other => {
                return Err(OpenAiError::invalid_param(other, format!("{other}: not a parameter of this list")));
            }
        }
    }
    metadata(Some(&Value::Object(query.metadata.clone())))?;
    Ok(query)
}

/// List stored completions (OpenAI wire format).
#[utoipa::path(get, path = "/v1/chat/completions", tag = "openai", security(("bearer" = [])),
    params(
        ("after" = Option<String>, Query, description = "The last id of the previous page"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "1 to 100 (default 20)"),
        ("order" = Option<String>, Query, pattern = "^(asc|desc)$", description = "asc (oldest first, the default) or desc"),
        ("model" = Option<String>, Query, description = "Only completions of this model"),
    ),
    responses(
        (status = 200, description = "An OpenAI list of the caller's stored completions: data, first_id, last_id, has_more"),
        (status = 400, description = "A parameter out of range (OpenAI error shape, param named)"),
    ))]
pub async fn list(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    RawQuery(raw): RawQuery,
) -> OpenAiResult<Json<Value>> {
    let caller = caller?;
    let query = list_query(raw.as_deref(), true)?;
    // An `after` that is not one of Parley's ids names nothing to start after: the page is empty.
    let after = match query.after.as_deref() {
        None => None,
        Some(id) => match completion_uuid(id) {
            Some(uuid) => Some(uuid.to_string()),
            None => return Ok(Json(page(Vec::new(), false))),
        },
    };
    let request = pb::ListStoredCompletionsRequest {
        user_id: caller.user_id.to_string(),
        after,
        limit: query.limit,
        descending: query.descending,
        model: query.model,
        metadata: Value::Object(query.metadata).to_string(),
    };
    let listed = state.backends.chat.clone().list_stored_completions(request).await?.into_inner();
    let data = listed.data.iter().map(shown).collect::<Result<Vec<_>, ServiceError>>()?;
    Ok(Json(page(data, listed.has_more)))
}

/// An OpenAI list page of objects that carry an `id`.
fn page(data: Vec<Value>, has_more: bool) -> Value {
    let id = |item: Option<&Value>| item.and_then(|item| item.get("id")).cloned().unwrap_or(Value::Null);
    json!({"object": "list", "first_id": id(data.first()), "last_id": id(data.last()), "has_more": has_more, "data": data})
}

/// List a stored completion's request messages (OpenAI wire format).
#[utoipa::path(get, path = "/v1/chat/completions/{id}/messages", tag = "openai", security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The completion's id (`chatcmpl-…`)"),
        ("after" = Option<String>, Query, description = "The last message id of the previous page"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "1 to 100 (default 20)"),
        ("order" = Option<String>, Query, pattern = "^(asc|desc)$", description = "asc (the default) or desc"),
    ),
    responses(
        (status = 200, description = "An OpenAI list of the request's messages, each with an id"),
        (status = 404, description = "No stored completion of the caller's has this id (OpenAI error shape)"),
    ))]
pub async fn messages(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> OpenAiResult<Json<Value>> {
    let caller = caller?;
    let query = list_query(raw.as_deref(), false)?;
    let stored = owned(&state, &caller, &id).await?;
    let Ok(Value::Array(sent)) = serde_json::from_str::<Value>(&stored.messages) else {
        return Err(ServiceError::internal().into());
    };
    // Each message's id is the completion's and its place in the request.
    let mut messages: Vec<Value> = sent
        .into_iter()
        .enumerate()
        .map(|(index, mut message)| {
            if let Value::Object(fields) = &mut message {
                fields.insert("id".to_owned(), json!(format!("{id}-{index}")));
            }
            message
        })
        .collect();
    if query.descending {
        messages.reverse();
    }
    let start = match &query.after {
        Some(after) => messages.iter().position(|message| message["id"] == *after).map_or(messages.len(), |at| at + 1),
        None => 0,
    };
    let limit = usize::try_from(query.limit).unwrap_or(usize::MAX);
    let has_more = messages.len() > start.saturating_add(limit);
    let data: Vec<Value> = messages.into_iter().skip(start).take(limit).collect();
    Ok(Json(page(data, has_more)))
}

/// Delete a stored completion (OpenAI wire format).
#[utoipa::path(delete, path = "/v1/chat/completions/{id}", tag = "openai", security(("bearer" = [])),
    params(("id" = String, Path, description = "The completion's id (`chatcmpl-…`)")),
    responses(
        (status = 200, description = "{id, object: chat.completion.deleted, deleted: true}"),
        (status = 404, description = "No stored completion of the caller's has this id (OpenAI error shape)"),
    ))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(id): Path<String>,
) -> OpenAiResult<Json<Value>> {
    let caller = caller?;
    let deleted = state.backends.chat.clone().delete_stored_completion(named(&caller, &id)?).await;
    deleted.map_err(|status| chat_error(&id, status))?;
    Ok(Json(json!({"id": id, "object": "chat.completion.deleted", "deleted": true})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_is_up_to_sixteen_short_strings() {
        assert!(metadata(None).unwrap().is_empty());
        assert!(metadata(Some(&Value::Null)).unwrap().is_empty());
        assert_eq!(metadata(Some(&json!({"team": "search"}))).unwrap()["team"], "search");
        let many: Map<String, Value> = (0..17).map(|n| (format!("k{n}"), json!("v"))).collect();
        for bad in [
            json!([]),
            json!({"n": 1}),
            Value::Object(many),
            json!({"k".repeat(65): "v"}),
            json!({"k": "v".repeat(513)}),
            json!({"k": "a\u{0}b"}),
        ] {
            let error = metadata(Some(&bad)).expect_err("refused");
            assert_eq!(error.param(), Some("metadata"), "{bad}");
        }
    }

    #[test]
    fn a_list_query_reads_openai_parameters_and_names_a_bad_one() {
        let query =
            list_query(Some("after=chatcmpl-x&limit=5&order=desc&model=m&metadata%5Bteam%5D=search"), true).unwrap();
        assert_eq!((query.after.as_deref(), query.limit, query.descending), (Some("chatcmpl-x"), 5, true));
        assert_eq!((query.model.as_deref(), query.metadata["team"].as_str()), (Some("m"), Some("search")));
        for (raw, param) in [
            ("limit=0", "limit"),
            ("limit=x", "limit"),
            ("order=up", "order"),
            ("colour=red", "colour"),
            ("model=a%00", "model"),
        ] {
            assert_eq!(list_query(Some(raw), true).expect_err("refused").param(), Some(param), "{raw}");
        }
        assert_eq!(list_query(Some("model=m"), false).expect_err("refused").param(), Some("model"));
    }
}
