//! What wraps every request: request id, trace span, security headers, `Server-Timing`, metrics and
//! compression.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::response::Response;
use parley_platform::grpc::REQUEST_ID;
use parley_platform::telemetry;
use tracing::Instrument;
use uuid::Uuid;

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

use crate::timing::ModelWait;

/// A client's request id is kept when it is reasonable (1 to 128 of `[A-Za-z0-9._-]`); else a new one.
fn request_id_from(request: &Request) -> String {
    request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|id| {
            (1..=128).contains(&id.len())
                && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        })
        .map_or_else(|| Uuid::now_v7().to_string(), str::to_owned)
}

/// The route template that served a request, for metrics and spans.
#[derive(Debug, Clone)]
struct RouteLabel(String);

/// Runs inside routing (as a route layer), where the matched route template is known, and hands it to
/// [`observe`], which runs outside routing so that it also wraps unmatched requests.
pub async fn label_route(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|path| path.as_str().to_owned());
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(RouteLabel(route));
    }
    response
}

/// Gives up on a request that takes longer than `http.request_timeout_secs` (503 with `Retry-After`).
/// Only the wait for the response's head counts: an event stream, once started, is not cut.
pub async fn deadline(State(state): State<crate::AppState>, request: Request, next: Next) -> Response {
    let limit = Duration::from_secs(state.config.http.request_timeout_secs);
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!(crate::metrics::HTTP_TIMEOUTS).increment(1);
            let error = parley_platform::ServiceError::new(
                parley_platform::ErrorCode::Unavailable,
                "the request took too long; try again shortly",
            )
            .retry_after(1);
            crate::problem::ApiError(error).into_response()
        }
    }
}

/// The error shape a route's clients read.
#[derive(Clone, Copy)]
enum Dialect {
    OpenAi,
    Anthropic,
}

/// The OpenAI- and Anthropic-compatible routes answer every error in their own API's shape, those of
/// the layers before the handler too (401, 429, 413, 405, a deadline's 503), which are written as
/// problems: rewritten here, their status and headers kept.
pub async fn foreign_errors(request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let dialect = match path {
        "/v1/chat/completions" | "/v1/models" | "/v1/embeddings" => Some(Dialect::OpenAi),
        // The stored completions.
        _ if path.starts_with("/v1/chat/completions/") => Some(Dialect::OpenAi),
        "/v1/messages" | "/v1/messages/count_tokens" => Some(Dialect::Anthropic),
        _ => None,
    };
    let response = next.run(request).await;
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/problem+json"));
    let Some(dialect) = dialect.filter(|_| is_problem) else {
        return response;
    };
    let (mut parts, body) = response.into_parts();
    // A problem is a few hundred bytes.
    let problem: serde_json::Value = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    };
    let text = |name: &str| problem.get(name).and_then(serde_json::Value::as_str);
    let detail = text("detail").unwrap_or("the request failed");
    let body = match dialect {
        Dialect::OpenAi => {
            let code = text("code").and_then(parley_platform::ErrorCode::parse);
            crate::routes::openai::error_body(parts.status, code, detail, text("field"))
        }
        Dialect::Anthropic => crate::routes::anthropic::AnthropicError::body(parts.status, detail),
    };
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body.to_string()))
}

/// Compresses a response with gzip or brotli when the client accepts it and tower-http's default
/// predicate agrees (not an event stream, not tiny, not an image). Decided once the handler has
/// answered, so that an event stream, never compressed, is not wrapped either: a compression body
/// holds its encoders' state inline (about 6 KB), which an open stream would keep for its whole life.
pub async fn compress(request: Request, next: Next) -> Response {
    use tower::{Layer, ServiceExt};
    let accept_encoding = request.headers().get(header::ACCEPT_ENCODING).cloned();
    let response = next.run(request).await;
    let Some(accept_encoding) = accept_encoding else {
        return response;
    };
    let is_event_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/event-stream"));
    if is_event_stream {
        return response;
    }
    // tower-http's compression, over a service that answers with the response already made.
    let mut answer = Some(response);
    let answered = tower::service_fn(move |_: Request| {
        std::future::ready(Ok::<_, std::convert::Infallible>(answer.take().unwrap_or_default()))
    });
    let mut probe = Request::new(axum::body::Body::empty());
    probe.headers_mut().insert(header::ACCEPT_ENCODING, accept_encoding);
    let compression = tower_http::compression::CompressionLayer::new().gzip(true).br(true).layer(answered);
    match compression.oneshot(probe).await {
        Ok(response) => response.map(axum::body::Body::new),
        Err(never) => match never {},
    }
}

pub async fn observe(State(state): State<crate::AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = request_id_from(&request);
    let method = request.method().clone();
    let authenticated = request.headers().contains_key(header::AUTHORIZATION);
    let span = tracing::info_span!(
        "http.request",
        otel.kind = "server",
        service = "api-gateway",
        http.request.method = %method,
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        request_id = %request_id,
        trace_id = tracing::field::Empty,
    );
    telemetry::set_parent_from(&span, &telemetry::HeaderCarrier(request.headers()));
    span.record("trace_id", telemetry::trace_id_of(&span));

    let mut response = REQUEST_ID.scope(request_id.clone(), next.run(request).instrument(span.clone())).await;

    let status = response.status().as_u16();
    let route = response.extensions().get::<RouteLabel>().map_or("unmatched", |label| label.0.as_str()).to_owned();
    span.record("http.response.status_code", status);
    span.record("http.route", route.as_str());
    let model_wait = response.extensions().get::<ModelWait>().map_or(Duration::ZERO, |wait| wait.0);
    let total = started.elapsed();
    let gateway_time = total.saturating_sub(model_wait);
    let mut timing = format!("gateway;dur={:.1}", gateway_time.as_secs_f64() * 1000.0);
    if !model_wait.is_zero() {
        timing.push_str(&format!(", llm;dur={:.1}", model_wait.as_secs_f64() * 1000.0));
    }

    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        headers.insert(REQUEST_ID_HEADER, value);
    }
    if let Ok(value) = HeaderValue::from_str(&timing) {
        headers.insert(SERVER_TIMING, value);
    }
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if authenticated {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if state.config.http.hsts {
        headers
            .insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000; includeSubDomains"));
    }

    if route.starts_with("/v1/") {
        state.status.record(status >= 500);
    }
    let labels = [("method", method.to_string()), ("route", route), ("status", status.to_string())];
    metrics::counter!(crate::metrics::HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(crate::metrics::HTTP_REQUEST_DURATION, &labels[..2]).record(gateway_time.as_secs_f64());
    response
}
