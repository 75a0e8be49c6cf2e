//! Full-text search over the caller's conversations: message contents and titles.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use parley_platform::limits::MAX_SEARCH_QUERY_CHARS;
use parley_proto::chat::v1 as pb;

use super::{page_limit, query_rejection};
use crate::AppState;
use crate::auth::Caller;
use crate::problem::{ApiError, ApiResult, Problem};
use crate::views::{Page, SearchHitView};

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchQuery {
    /// The words to find (all of them, whole words, any case), 1 to 500 characters.
    #[param(required = true, min_length = 1, max_length = 500)]
    pub q: Option<String>,
    /// Page size, 1 to 100 (default 20).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// The caller's messages and conversation titles that hold every word of `q`, best match first, with
/// highlighted snippets.
#[utoipa::path(get, path = "/v1/search", tag = "conversations", security(("bearer" = [])),
    params(SearchQuery), responses(
    (status = 200, body = Page<SearchHitView>),
    (status = 400, body = Problem),
))]
pub async fn search(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<SearchQuery>, QueryRejection>,
) -> ApiResult<Json<Page<SearchHitView>>> {
    let Query(query) = query.map_err(query_rejection)?;
    let text = query.q.unwrap_or_default();
    if text.trim().is_empty() {
        return Err(ApiError::invalid_field("q", "is required: the words to search for"));
    }
    if text.chars().count() > MAX_SEARCH_QUERY_CHARS {
        return Err(ApiError::invalid_field("q", format!("must be at most {MAX_SEARCH_QUERY_CHARS} characters")));
    }
    let request = pb::SearchRequest {
        user_id: caller.user_id.to_string(),
        query: text,
        limit: page_limit(query.limit.as_deref())?,
        cursor: query.cursor,
    };
    let page = state.backends.chat.clone().search(request).await?.into_inner();
    Ok(Json(Page { data: page.hits.into_iter().map(SearchHitView::from).collect(), next_cursor: page.next_cursor }))
}
