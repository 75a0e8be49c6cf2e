//! Ratings of the model's replies: a user's thumbs up or down (and a comment) on a reply they got, and
//! admins' export and per-model satisfaction. Kept by the analytics service.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use parley_platform::ErrorCode;
use parley_platform::limits::MAX_FEEDBACK_COMMENT_CHARS;
use parley_platform::message_status::MessageStatus;
use parley_platform::timestamps::to_proto;
use parley_proto::analytics::v1 as pb;
use parley_proto::chat::v1 as chat_pb;
use serde::Deserialize;

use super::{page_limit, query_rejection, query_time};
use crate::AppState;
use crate::auth::Caller;
use crate::problem::{ApiError, ApiJson, ApiPath, ApiResult, Problem};
use crate::views::{FeedbackBody, FeedbackView, Page, SatisfactionView};

/// The caller's reply `id`, when it is one that can be rated: the model's, and finished.
async fn rated_reply(state: &AppState, caller: &Caller, id: String) -> Result<chat_pb::Message, ApiError> {
    let request = chat_pb::GetMessageRequest { user_id: caller.user_id.to_string(), message_id: id };
    let message = state.backends.chat.clone().get_message(request).await?.into_inner();
    if message.role != "assistant" {
        return Err(ApiError::invalid_field("id", "only the model's replies take feedback"));
    }
    match MessageStatus::of(&message) {
        Some(MessageStatus::Completed | MessageStatus::Failed) => Ok(message),
        _ => Err(ApiError::new(ErrorCode::Conflict, "the reply is not finished yet; rate it once it is")),
    }
}

/// Rates one of the model's replies to the caller: `up` or `down`, with an optional comment. Again
/// replaces the rating.
#[utoipa::path(put, path = "/v1/messages/{id}/feedback", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path)), request_body = FeedbackBody, responses(
    (status = 200, body = FeedbackView),
    (status = 404, body = Problem),
    (status = 409, body = Problem),
))]
pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<FeedbackBody>,
) -> ApiResult<Json<FeedbackView>> {
    let rating = match body.rating.as_str() {
        "up" => pb::Rating::Up,
        "down" => pb::Rating::Down,
        _ => return Err(ApiError::invalid_field("rating", "must be \"up\" or \"down\"")),
    };
    if let Some(comment) = &body.comment {
        if comment.chars().count() > MAX_FEEDBACK_COMMENT_CHARS {
            let detail = format!("must be at most {MAX_FEEDBACK_COMMENT_CHARS} characters");
            return Err(ApiError::invalid_field("comment", detail));
        }
        if comment.contains('\0') {
            return Err(ApiError::invalid_field("comment", "must not contain NUL characters"));
        }
    }
    let comment = body.comment.map(|comment| comment.trim().to_owned()).filter(|comment| !comment.is_empty());
    let reply = rated_reply(&state, &caller, id).await?;
    let request = pb::SetFeedbackRequest {
        message_id: reply.id,
        user_id: caller.user_id.to_string(),
        conversation_id: reply.conversation_id,
        model: reply.model.unwrap_or_default(),
        rating: rating as i32,
        comment,
    };
    let feedback = state.backends.analytics.clone().set_feedback(request).await?.into_inner();
    Ok(Json(FeedbackView::from(feedback)))
}

/// The caller's rating of a reply; 404 when there is none.
#[utoipa::path(get, path = "/v1/messages/{id}/feedback", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path)), responses((status = 200, body = FeedbackView), (status = 404, body = Problem)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<FeedbackView>> {
    let request = chat_pb::GetMessageRequest { user_id: caller.user_id.to_string(), message_id: id };
    let message = state.backends.chat.clone().get_message(request).await?.into_inner();
    let request = pb::GetFeedbackRequest { message_id: message.id, user_id: caller.user_id.to_string() };
    let feedback = state.backends.analytics.clone().get_feedback(request).await?.into_inner();
    Ok(Json(FeedbackView::from(feedback)))
}

/// Removes the caller's rating of a reply (204 also when there was none).
#[utoipa::path(delete, path = "/v1/messages/{id}/feedback", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path)), responses((status = 204), (status = 404, body = Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let request = chat_pb::GetMessageRequest { user_id: caller.user_id.to_string(), message_id: id };
    let message = state.backends.chat.clone().get_message(request).await?.into_inner();
    let request = pb::GetFeedbackRequest { message_id: message.id, user_id: caller.user_id.to_string() };
    state.backends.analytics.clone().remove_feedback(request).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FeedbackQuery {
    /// Start (inclusive) of the time a rating was last set, RFC 3339. Default: the beginning.
    pub from: Option<String>,
    /// End (exclusive), RFC 3339. Default: now.
    pub to: Option<String>,
    /// Only this model's ratings.
    pub model: Option<String>,
    /// Page size, 1 to 100 (default 20).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

fn admin(caller: &Caller) -> Result<(), ApiError> {
    match caller.is_admin() {
        true => Ok(()),
        false => Err(ApiError::new(ErrorCode::Forbidden, "admin role required")),
    }
}

/// Every rating, newest change first, with its comment, user, conversation and model (admins only).
#[utoipa::path(get, path = "/v1/admin/feedback", tag = "admin", security(("bearer" = [])), params(FeedbackQuery),
    responses((status = 200, body = Page<FeedbackView>), (status = 403, body = Problem)))]
pub async fn export(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<FeedbackQuery>, QueryRejection>,
) -> ApiResult<Json<Page<FeedbackView>>> {
    admin(&caller)?;
    let Query(query) = query.map_err(query_rejection)?;
    let (from, to) = range(query.from.as_deref(), query.to.as_deref())?;
    if query.model.as_deref().is_some_and(|model| model.contains('\0')) {
        return Err(ApiError::invalid_field("model", "must not contain NUL characters"));
    }
    let request = pb::ListFeedbackRequest {
        from,
        to,
        model: query.model.filter(|model| !model.is_empty()),
        limit: page_limit(query.limit.as_deref())?,
        cursor: query.cursor,
    };
    let page = state.backends.analytics.clone().list_feedback(request).await?.into_inner();
    Ok(Json(Page { data: page.feedback.into_iter().map(FeedbackView::from).collect(), next_cursor: page.next_cursor }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RangeQuery {
    /// Start (inclusive) of the time a rating was last set, RFC 3339. Default: the beginning.
    pub from: Option<String>,
    /// End (exclusive), RFC 3339. Default: now.
    pub to: Option<String>,
}

/// Ratings per model: ups, downs and the share of ups (admins only).
#[utoipa::path(get, path = "/v1/admin/feedback/summary", tag = "admin", security(("bearer" = [])),
    params(RangeQuery), responses((status = 200, body = Page<SatisfactionView>), (status = 403, body = Problem)))]
pub async fn summary(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<RangeQuery>, QueryRejection>,
) -> ApiResult<Json<Page<SatisfactionView>>> {
    admin(&caller)?;
    let Query(query) = query.map_err(query_rejection)?;
    let (from, to) = range(query.from.as_deref(), query.to.as_deref())?;
    let request = pb::FeedbackSummaryRequest { from, to };
    let summary = state.backends.analytics.clone().feedback_summary(request).await?.into_inner();
    Ok(Json(Page { data: summary.models.into_iter().map(SatisfactionView::from).collect(), next_cursor: None }))
}

type ProtoTime = Option<prost_types::Timestamp>;

fn range(from: Option<&str>, to: Option<&str>) -> Result<(ProtoTime, ProtoTime), ApiError> {
    let (from, to) = (query_time("from", from)?, query_time("to", to)?);
    if let (Some(from), Some(to)) = (from, to)
        && from >= to
    {
        return Err(ApiError::invalid_field("from", "must be before to"));
    }
    Ok((from.map(to_proto), to.map(to_proto)))
}
