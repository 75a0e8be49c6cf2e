//! `GET /v1/me/export`: everything Parley holds about the caller, as one JSON document they can keep
//! or take elsewhere: the account, its API keys (never their secrets), every conversation with every
//! message, every stored completion with its request's messages, and the usage by day since the
//! account was made.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use parley_platform::ServiceError;
use parley_platform::cursor::MAX_PAGE;
use parley_platform::timestamps::{parse_rfc3339, rfc3339};
use parley_proto::chat::v1 as chat_pb;
use parley_proto::user::v1 as user_pb;
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::api_keys::ApiKeyView;
use crate::AppState;
use crate::auth::Caller;
use crate::problem::ApiResult;
use crate::views::{ConversationView, MessageView, UsageReportView, UserView};

#[derive(Debug, Serialize, ToSchema)]
pub struct ExportView {
    pub exported_at: String,
    pub user: UserView,
    pub api_keys: Vec<ApiKeyView>,
    pub conversations: Vec<ExportedConversationView>,
    /// The completions kept with OpenAI's `store: true`, oldest first.
    pub stored_completions: Vec<ExportedCompletionView>,
    pub usage: UsageReportView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExportedCompletionView {
    /// The `chat.completion` object as it was returned, with its metadata.
    #[schema(value_type = Object)]
    pub completion: serde_json::Value,
    /// The request's messages as they were sent.
    #[schema(value_type = Vec<Object>)]
    pub messages: serde_json::Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExportedConversationView {
    #[serde(flatten)]
    pub conversation: ConversationView,
    /// Every message, oldest first.
    pub messages: Vec<MessageView>,
}

/// Export the caller's account: profile, API keys, conversations with their messages, stored
/// completions, and usage.
#[utoipa::path(get, path = "/v1/me/export", tag = "identity", security(("bearer" = [])), responses(
    (status = 200, body = ExportView, headers(("Content-Disposition" = String, description = "attachment; filename=\"parley-export.json\""))),
))]
pub async fn export(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    let user_id = caller.user_id.to_string();
    let user = state.backends.user.clone().get_user(user_pb::GetUserRequest { user_id: user_id.clone() }).await?;
    let user = UserView::from(user.into_inner());
    let mut api_keys = Vec::new();
    let mut cursor = None;
    loop {
        let request = user_pb::ListApiKeysRequest { user_id: user_id.clone(), limit: MAX_PAGE, cursor };
        let page = state.backends.user.clone().list_api_keys(request).await?.into_inner();
        api_keys.extend(page.api_keys.into_iter().map(ApiKeyView::from));
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    let mut conversations = Vec::new();
    let mut cursor = None;
    loop {
        let request = chat_pb::ListConversationsRequest { user_id: user_id.clone(), limit: MAX_PAGE, cursor };
        let page = state.backends.chat.clone().list_conversations(request).await?.into_inner();
        for conversation in page.conversations {
            let messages = all_messages(&state, &user_id, &conversation.id).await?;
            conversations.push(ExportedConversationView { conversation: conversation.into(), messages });
        }
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    let stored_completions = all_stored_completions(&state, &user_id).await?;
    let now = OffsetDateTime::now_utc();
    let since = user.created_at.as_deref().and_then(parse_rfc3339).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let usage = super::usage::daily(&state, user_id, since, now).await?;
    let export = ExportView { exported_at: rfc3339(now), user, api_keys, conversations, stored_completions, usage };
    let mut response = Json(export).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_DISPOSITION, HeaderValue::from_static("attachment; filename=\"parley-export.json\""));
    Ok(response)
}

async fn all_messages(state: &AppState, user_id: &str, conversation_id: &str) -> ApiResult<Vec<MessageView>> {
    let mut messages = Vec::new();
    let mut cursor = None;
    loop {
        let request = chat_pb::ListMessagesRequest {
            user_id: user_id.to_owned(),
            conversation_id: conversation_id.to_owned(),
            limit: MAX_PAGE,
            cursor,
            // Everything it holds: every branch's messages.
            all_branches: true,
        };
        let page = state.backends.chat.clone().list_messages(request).await?.into_inner();
        messages.extend(page.messages.into_iter().map(MessageView::from));
        cursor = page.next_cursor;
        if cursor.is_none() {
            return Ok(messages);
        }
    }
}

/// Every stored completion of `user_id`, oldest first.
async fn all_stored_completions(state: &AppState, user_id: &str) -> ApiResult<Vec<ExportedCompletionView>> {
    let mut completions = Vec::new();
    let mut after = None;
    loop {
        let request = chat_pb::ListStoredCompletionsRequest {
            user_id: user_id.to_owned(),
            after: after.clone(),
            limit: MAX_PAGE,
            ..Default::default()
        };
        let page = state.backends.chat.clone().list_stored_completions(request).await?.into_inner();
        after = page.data.last().map(|stored| stored.id.clone());
        for listed in &page.data {
            // A listing leaves the messages behind: each completion is read whole.
            let request = chat_pb::StoredCompletionRequest { user_id: user_id.to_owned(), id: listed.id.clone() };
            let stored = state.backends.chat.clone().get_stored_completion(request).await?.into_inner();
            let completion = super::stored_completions::shown(&stored)?;
            let messages = serde_json::from_str(&stored.messages).map_err(|_| ServiceError::internal())?;
            completions.push(ExportedCompletionView { completion, messages });
        }
        if !page.has_more {
            return Ok(completions);
        }
    }
}
