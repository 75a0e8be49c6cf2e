//! The routes of the public API, one module per area of shared/API.md.

pub mod anthropic;
pub mod api_keys;
pub mod audit;
pub mod completion;
pub mod conversations;
pub mod embeddings;
pub mod export;
pub mod feedback;
pub mod identity;
pub mod messages;
pub mod openai;
pub mod ops;
pub mod search;
pub mod stored_completions;
pub mod streaming;
pub mod usage;
pub mod web;

use axum::Router;
use axum::routing::{get, post, put};

use crate::AppState;
use crate::problem::ApiError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/", get(web::index))
        .route("/status", get(web::status_page))
        .route("/assets/{*path}", get(web::asset))
        .route("/v1/status", get(ops::status))
        .route("/.well-known/jwks.json", get(identity::jwks))
        .route("/v1/auth/register", post(identity::register))
        .route("/v1/auth/login", post(identity::login))
        .route("/v1/auth/refresh", post(identity::refresh))
        .route("/v1/auth/logout", post(identity::logout))
        .route("/v1/me", get(identity::me).delete(identity::delete_me))
        .route("/v1/me/export", get(export::export))
        .route("/v1/api-keys", post(api_keys::create).get(api_keys::list))
        .route("/v1/api-keys/{id}", axum::routing::delete(api_keys::revoke))
        .route("/v1/conversations", post(conversations::create).get(conversations::list))
        .route(
            "/v1/conversations/{id}",
            get(conversations::get).patch(conversations::update).delete(conversations::delete),
        )
        .route("/v1/conversations/{id}/messages", post(messages::send).get(messages::list))
        .route("/v1/messages/{id}", get(messages::get))
        .route("/v1/messages/{id}/edit", post(messages::edit))
        .route("/v1/messages/{id}/stop", post(messages::stop))
        .route("/v1/messages/{id}/regenerate", post(messages::regenerate))
        .route("/v1/messages/{id}/siblings", get(messages::siblings))
        .route("/v1/conversations/{id}/active-branch", put(conversations::switch_branch))
        .route("/v1/messages/{id}/feedback", get(feedback::get).put(feedback::put).delete(feedback::delete))
        .route("/v1/search", get(search::search))
        .route("/v1/admin/feedback", get(feedback::export))
        .route("/v1/admin/feedback/summary", get(feedback::summary))
        .route("/v1/messages/{id}/events", get(streaming::events))
        .route("/v1/messages/{id}/ws", get(streaming::websocket))
        .route("/v1/chat/completions", post(openai::chat_completions).get(stored_completions::list))
        .route(
            "/v1/chat/completions/{id}",
            get(stored_completions::get).post(stored_completions::update).delete(stored_completions::delete),
        )
        .route("/v1/chat/completions/{id}/messages", get(stored_completions::messages))
        .route("/v1/models", get(openai::models))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/usage", get(usage::own))
        .route("/v1/admin/usage", get(usage::admin))
        .route("/v1/admin/audit", get(audit::list))
        .route("/v1/admin/users/{id}/tier", put(identity::set_tier))
}

/// `?limit=` for lists: 1 to 100, 20 when absent.
pub fn page_limit(limit: Option<&str>) -> Result<u32, ApiError> {
    match limit {
        None | Some("") => Ok(20),
        Some(text) => match text.parse::<u32>() {
            Ok(limit) if (1..=100).contains(&limit) => Ok(limit),
            _ => Err(ApiError::invalid_field("limit", "must be an integer from 1 to 100")),
        },
    }
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size, 1 to 100 (default 20).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A time in a query string (`from`, `to`): RFC 3339, or nothing when absent or empty.
pub fn query_time(field: &str, value: Option<&str>) -> Result<Option<time::OffsetDateTime>, ApiError> {
    match value {
        None | Some("") => Ok(None),
        Some(text) => parley_platform::timestamps::parse_rfc3339(text)
            .map(Some)
            .ok_or_else(|| ApiError::invalid_field(field, "must be an RFC 3339 time such as 2026-01-31T00:00:00Z")),
    }
}

/// A query string that could not be read is a 400, like any other malformed input.
pub fn query_rejection(rejection: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::new(parley_platform::ErrorCode::InvalidRequest, rejection.body_text())
}

/// The generation options of a send: its sampling parameters, and what `Cache-Control` allows the
/// response cache (`no-cache`: do not answer from it; `no-store`: do not keep the reply).
pub fn generation_options(
    headers: &axum::http::HeaderMap,
    sampling: &parley_platform::sampling::Sampling,
) -> parley_proto::chat::v1::GenerationOptions {
    let directives: Vec<String> = headers
        .get_all(axum::http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|directive| directive.trim().to_ascii_lowercase())
        .collect();
    let has = |name: &str| directives.iter().any(|directive| directive == name);
    parley_proto::chat::v1::GenerationOptions {
        skip_cache_read: has("no-cache") || has("no-store"),
        skip_cache_write: has("no-store"),
        ..sampling.to_options()
    }
}

/// The longest reply of a request: what the client asked for (`asked` names the parameter), at most the
/// configured longest (`agent.max_output_tokens`); below 1 is refused.
pub fn longest_reply(
    config: &parley_platform::Config,
    asked: Option<(&str, i64)>,
) -> Result<u32, parley_platform::ServiceError> {
    let configured = config.agent.max_output_tokens;
    match asked {
        None => Ok(configured),
        Some((_, asked)) if asked >= 1 => Ok(u32::try_from(asked).unwrap_or(u32::MAX).min(configured)),
        Some((param, _)) => Err(parley_platform::ServiceError::invalid_field(param, "must be at least 1")),
    }
}
