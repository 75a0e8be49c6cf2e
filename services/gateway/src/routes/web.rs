//! The web client and the public status page: the files `web/` builds (`http.web_dir`), served as
//! they are. Pages are never cached and carry a content security policy that allows only this
//! origin; the hashed assets are cached for good.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use parley_platform::ErrorCode;
use tower::ServiceExt;
use tower_http::services::ServeFile;

use crate::AppState;
use crate::problem::{ApiError, ApiResult, Problem};

/// Scripts, styles, images and API calls from this origin only; never framed.
const PAGE_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                           connect-src 'self'; font-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
                           form-action 'self'; object-src 'none'";

/// The web client: sign in, conversations, search, usage and API keys.
#[utoipa::path(get, path = "/", tag = "web", responses(
    (status = 200, description = "The web client", content_type = "text/html"),
    (status = 404, body = Problem, description = "The web client is not built on this gateway"),
))]
pub async fn index(State(state): State<AppState>, request: Request) -> ApiResult<Response> {
    page(&state, "index.html", request).await
}

/// The public status page: each component's state and the recent error rate (from `GET /v1/status`).
#[utoipa::path(get, path = "/status", tag = "web", responses(
    (status = 200, description = "The status page", content_type = "text/html"),
    (status = 404, body = Problem, description = "The web client is not built on this gateway"),
))]
pub async fn status_page(State(state): State<AppState>, request: Request) -> ApiResult<Response> {
    page(&state, "status.html", request).await
}

/// The web client's scripts, styles and images (named by their content's hash).
#[utoipa::path(get, path = "/assets/{path}", tag = "web", params(("path" = String, Path)), responses(
    (status = 200, description = "The file"),
    (status = 404, body = Problem),
))]
pub async fn asset(State(state): State<AppState>, request: Request) -> ApiResult<Response> {
    let root = std::path::Path::new(&state.config.http.web_dir);
    // ServeDir resolves the request's path under the root and refuses `..` and the like.
    let Ok(response) = tower_http::services::ServeDir::new(root).oneshot(request).await;
    if !found(response.status()) {
        return Err(ApiError::new(ErrorCode::NotFound, "no such file"));
    }
    let mut response = response.into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=31536000, immutable"));
    Ok(response)
}

/// Whether the file was there: served whole, in part (a range), not again (the browser holds it), or
/// in no part the range asked for.
fn found(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::OK | StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED | StatusCode::RANGE_NOT_SATISFIABLE
    )
}

async fn page(state: &AppState, file: &str, request: Request) -> ApiResult<Response> {
    let path = std::path::Path::new(&state.config.http.web_dir).join(file);
    let Ok(response) = ServeFile::new(path).oneshot(request).await;
    if !found(response.status()) {
        let detail = "the web client is not built on this gateway (make web, or set PARLEY_WEB_DIR)";
        return Err(ApiError::new(ErrorCode::NotFound, detail));
    }
    let mut response = response.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_POLICY));
    Ok(response)
}
