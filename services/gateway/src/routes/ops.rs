//! Health, readiness, metrics, the OpenAPI document, and the answers for unknown routes.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use parley_platform::ErrorCode;

use crate::AppState;
use crate::problem::ApiError;

/// Liveness: the process runs. Checks no dependency.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "The process is alive")))]
pub async fn healthz() -> Response {
    parley_platform::health::healthz().await
}

/// Readiness: every dependency answers.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Ready; every check is \"ok\""),
    (status = 503, description = "Not ready; the failing checks are named"),
))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    state.readiness.response().await
}

/// The platform's state for the public status page: each component and the recent error rate. No
/// credentials needed; nothing secret or per user.
#[utoipa::path(get, path = "/v1/status", tag = "operations", responses(
    (status = 200, body = crate::status::StatusView, description = "Each component's state and the recent error rate"),
))]
pub async fn status(State(state): State<AppState>) -> Response {
    Json(state.status.view(&state).await).into_response()
}

/// Prometheus metrics, text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Metrics", content_type = "text/plain")))]
pub async fn metrics() -> Response {
    parley_platform::health::metrics().await
}

pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

pub async fn method_not_allowed() -> Response {
    let problem = crate::problem::Problem {
        kind: "https://parley.dev/errors/invalid_request".to_owned(),
        title: "Method not allowed".to_owned(),
        status: 405,
        detail: "this route does not accept that method".to_owned(),
        code: ErrorCode::InvalidRequest.as_str().to_owned(),
        request_id: crate::problem::current_request_id(),
        field: None,
    };
    let mut response = (axum::http::StatusCode::METHOD_NOT_ALLOWED, Json(problem)).into_response();
    response
        .headers_mut()
        .insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/problem+json"));
    response
}
