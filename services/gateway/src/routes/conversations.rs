//! Conversations: create, list, read, update (optimistic locking with ETag / If-Match), delete.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use parley_platform::ErrorCode;
use parley_proto::chat::v1 as pb;

use super::{PageQuery, page_limit, query_rejection};
use crate::AppState;
use crate::auth::Caller;
use crate::problem::{ApiError, ApiJson, ApiPath, ApiResult, Problem};
use crate::views::{ConversationBody, ConversationView, Page};

fn with_etag(status: StatusCode, conversation: pb::Conversation) -> Response {
    let etag = format!("\"{}\"", conversation.version);
    let mut response = (status, Json(ConversationView::from(conversation))).into_response();
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

/// Start a conversation.
#[utoipa::path(post, path = "/v1/conversations", tag = "conversations", security(("bearer" = [])),
    request_body(content = Option<ConversationBody>, description = "Optional: a body-less request starts an untitled conversation with the default model"), responses(
    (status = 201, body = ConversationView),
    (status = 400, description = "Unknown model or an over-long field, named in `field`", body = Problem),
))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Option<ApiJson<ConversationBody>>,
) -> ApiResult<Response> {
    let body = body.map(|ApiJson(body)| body).unwrap_or_default();
    let request = pb::CreateConversationRequest {
        user_id: caller.user_id.to_string(),
        title: body.title,
        model: body.model,
        system_prompt: body.system_prompt,
    };
    let conversation = state.backends.chat.clone().create_conversation(request).await?.into_inner();
    let location = format!("/v1/conversations/{}", conversation.id);
    let mut response = with_etag(StatusCode::CREATED, conversation);
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

/// The caller's conversations, most recently updated first.
#[utoipa::path(get, path = "/v1/conversations", tag = "conversations", security(("bearer" = [])),
    params(PageQuery), responses(
    (status = 200, body = Page<ConversationView>),
    (status = 400, description = "Bad limit or a cursor that was altered", body = Problem),
))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<Json<Page<ConversationView>>> {
    let Query(query) = query.map_err(query_rejection)?;
    let request = pb::ListConversationsRequest {
        user_id: caller.user_id.to_string(),
        limit: page_limit(query.limit.as_deref())?,
        cursor: query.cursor,
    };
    let page = state.backends.chat.clone().list_conversations(request).await?.into_inner();
    Ok(Json(Page {
        data: page.conversations.into_iter().map(ConversationView::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// One conversation, with `ETag: "<version>"`.
#[utoipa::path(get, path = "/v1/conversations/{id}", tag = "conversations", security(("bearer" = [])),
    params(("id" = String, Path)), responses(
    (status = 200, body = ConversationView, headers(("ETag" = String, description = "\"<version>\""))),
    (status = 404, body = Problem),
))]
pub async fn get(State(state): State<AppState>, caller: Caller, ApiPath(id): ApiPath<String>) -> ApiResult<Response> {
    let request = pb::GetConversationRequest { user_id: caller.user_id.to_string(), conversation_id: id };
    let conversation = state.backends.chat.clone().get_conversation(request).await?.into_inner();
    Ok(with_etag(StatusCode::OK, conversation))
}

/// The version an `If-Match` header names: `"3"`, or `*` for whatever is current.
enum Precondition {
    Version(i64),
    Any,
}

fn if_match(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Err(ApiError::new(
            ErrorCode::PreconditionRequired,
            "If-Match with the conversation's ETag is required",
        ));
    };
    let text = value.to_str().unwrap_or_default().trim();
    if text == "*" {
        return Ok(Precondition::Any);
    }
    text.strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .and_then(|version| version.parse::<i64>().ok())
        .map(Precondition::Version)
        .ok_or_else(|| ApiError::invalid_field("If-Match", "must be an ETag such as \"3\""))
}

/// Change a conversation's title, model or system prompt. Requires `If-Match`.
#[utoipa::path(patch, path = "/v1/conversations/{id}", tag = "conversations", security(("bearer" = [])),
    params(("id" = String, Path), ("If-Match" = String, Header, description = "The ETag last read")),
    request_body = ConversationBody, responses(
    (status = 200, body = ConversationView),
    (status = 404, body = Problem),
    (status = 412, description = "The conversation changed since that version", body = Problem),
    (status = 428, description = "No If-Match", body = Problem),
))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ConversationBody>,
) -> ApiResult<Response> {
    let expected_version = match if_match(&headers)? {
        Precondition::Version(version) => version,
        Precondition::Any => {
            let request =
                pb::GetConversationRequest { user_id: caller.user_id.to_string(), conversation_id: id.clone() };
            state.backends.chat.clone().get_conversation(request).await?.into_inner().version
        }
    };
    let request = pb::UpdateConversationRequest {
        user_id: caller.user_id.to_string(),
        conversation_id: id,
        expected_version,
        title: body.title,
        model: body.model,
        system_prompt: body.system_prompt,
    };
    let conversation = state.backends.chat.clone().update_conversation(request).await?.into_inner();
    Ok(with_etag(StatusCode::OK, conversation))
}

/// Delete a conversation and its messages.
#[utoipa::path(delete, path = "/v1/conversations/{id}", tag = "conversations", security(("bearer" = [])),
    params(("id" = String, Path)), responses((status = 204), (status = 404, body = Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let request = pb::DeleteConversationRequest { user_id: caller.user_id.to_string(), conversation_id: id };
    state.backends.chat.clone().delete_conversation(request).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Which branch of a conversation to follow.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BranchBody {
    /// A message of the branch (any version from `/v1/messages/{id}/siblings`); the branch continues
    /// from it by the newest message at every step.
    pub message_id: String,
}

/// Switch the conversation's active branch: listings and the model's context follow it from now on.
/// Returns the conversation, whose version it bumps.
#[utoipa::path(put, path = "/v1/conversations/{id}/active-branch", tag = "conversations", security(("bearer" = [])),
    params(("id" = String, Path)), request_body = BranchBody, responses(
    (status = 200, body = ConversationView, headers(("ETag" = String, description = "\"<version>\""))),
    (status = 400, body = Problem),
    (status = 404, body = Problem),
))]
pub async fn switch_branch(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<BranchBody>,
) -> ApiResult<Response> {
    // The conversation must be the caller's (404); the message one of its own (else the body is wrong).
    let request = pb::GetConversationRequest { user_id: caller.user_id.to_string(), conversation_id: id.clone() };
    state.backends.chat.clone().get_conversation(request).await?;
    let request = pb::GetMessageRequest { user_id: caller.user_id.to_string(), message_id: body.message_id.clone() };
    let message = state.backends.chat.clone().get_message(request).await;
    if message.map_or(true, |message| message.into_inner().conversation_id != id) {
        return Err(ApiError::invalid_field("message_id", "names no message of this conversation"));
    }
    let request = pb::SwitchBranchRequest { user_id: caller.user_id.to_string(), message_id: body.message_id };
    let conversation = state.backends.chat.clone().switch_branch(request).await?.into_inner();
    Ok(with_etag(StatusCode::OK, conversation))
}
