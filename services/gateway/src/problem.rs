//! RFC 9457 problem responses, and a JSON extractor whose every rejection becomes one that names what
//! was wrong (a client mistake is never a 500).

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use parley_platform::{ErrorCode, ServiceError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// `https://parley.dev/errors/<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable snake_case error code.
    pub code: String,
    pub request_id: String,
    /// The request field at fault, for `invalid_request`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error a handler returns; rendered as problem+json with the request id.
#[derive(Debug)]
pub struct ApiError(pub ServiceError);

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(ServiceError::new(code, message))
    }

    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        Self(ServiceError::invalid_field(field, message))
    }

    pub fn not_found(what: &str) -> Self {
        Self(ServiceError::not_found(what))
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }
}

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        Self(error)
    }
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        Self(ServiceError::from(status))
    }
}

pub fn current_request_id() -> String {
    parley_platform::grpc::REQUEST_ID.try_with(Clone::clone).unwrap_or_default()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let error = self.0;
        let status = StatusCode::from_u16(error.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let problem = Problem {
            kind: format!("https://parley.dev/errors/{}", error.code),
            title: error.code.title().to_owned(),
            status: status.as_u16(),
            detail: error.message,
            code: error.code.as_str().to_owned(),
            request_id: current_request_id(),
            field: error.field,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(secs) = error.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if error.code == ErrorCode::Unauthorized {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// `axum::Json`, with rejections as problems: 413 past the body limit, 400 naming `Content-Type`
/// without a JSON content type, 400 for a body that is not a JSON object, and 400 naming the field for
/// malformed or mistyped JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = is_json(request.headers());
        let bytes = body_bytes(request, state).await?;
        if !is_json {
            return Err(ApiError::invalid_field("Content-Type", "must be application/json"));
        }
        parse(&bytes).map(Self)
    }
}

/// A path parameter, with its rejection as a problem: a segment that does not decode (invalid UTF-8
/// once percent-decoded) names no resource, so it is 404 like an id that does not exist.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiPath<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(_) => Err(ApiError::not_found("resource")),
        }
    }
}

/// An optional JSON body: an empty body is `None`; anything else must be JSON, as for [`ApiJson`].
impl<T, S> axum::extract::OptionalFromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        let is_json = is_json(request.headers());
        let bytes = body_bytes(request, state).await?;
        if bytes.is_empty() {
            return Ok(None);
        }
        if !is_json {
            return Err(ApiError::invalid_field("Content-Type", "must be application/json"));
        }
        parse(&bytes).map(|value| Some(Self(value)))
    }
}

fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json") || value.contains("+json"))
}

async fn body_bytes<S: Send + Sync>(request: Request, state: &S) -> Result<bytes::Bytes, ApiError> {
    match bytes::Bytes::from_request(request, state).await {
        Ok(bytes) => Ok(bytes),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::new(ErrorCode::PayloadTooLarge, "the request body is larger than the limit"))
        }
        Err(rejection) => Err(ApiError::new(ErrorCode::InvalidRequest, rejection.body_text())),
    }
}

/// Whether a body is (as far as its first character says) a JSON object.
pub fn is_json_object(bytes: &[u8]) -> bool {
    bytes.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'{')
}

/// Every body this API takes is a JSON object: an array (which serde would read as the struct's fields
/// in order), a string or a number is refused as such, before its contents are looked at.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if !is_json_object(bytes) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "the body must be a JSON object"));
    }
    axum::Json::<T>::from_bytes(bytes).map(|axum::Json(value)| value).map_err(json_rejection)
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::invalid_field("Content-Type", "must be application/json"),
        JsonRejection::JsonSyntaxError(error) => {
            ApiError::new(ErrorCode::InvalidRequest, format!("the body is not valid JSON: {}", source_text(&error)))
        }
        JsonRejection::JsonDataError(error) => {
            let body = error.body_text();
            let text = body.split_once("target type: ").map_or(body.as_str(), |(_, rest)| rest).to_owned();
            match field_of(&text) {
                // `invalid_field` puts the field in front of the message: once is enough.
                Some(field) => {
                    let message = text.strip_prefix(&format!("{field}: ")).unwrap_or(&text).to_owned();
                    ApiError::invalid_field(&field, message)
                }
                None => ApiError::new(ErrorCode::InvalidRequest, text),
            }
        }
        JsonRejection::BytesRejection(error) if error.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(ErrorCode::PayloadTooLarge, "the request body is larger than the limit")
        }
        other => ApiError::new(ErrorCode::InvalidRequest, other.body_text()),
    }
}

/// The innermost message of an error chain: serde's own words, without axum's preamble.
fn source_text(error: &dyn std::error::Error) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

/// The field a serde message is about: "missing field `email`" or "email: invalid type ...".
fn field_of(message: &str) -> Option<String> {
    if let Some(rest) = message.split("missing field `").nth(1) {
        return rest.split('`').next().map(str::to_owned);
    }
    if let Some(rest) = message.split("unknown field `").nth(1) {
        return rest.split('`').next().map(str::to_owned);
    }
    let (path, _) = message.split_once(": ")?;
    let valid = !path.is_empty()
        && path.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '[' || c == ']');
    valid.then(|| path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_in_serde_messages() {
        assert_eq!(field_of("missing field `email` at line 1 column 2").as_deref(), Some("email"));
        assert_eq!(field_of("password: invalid type: integer `5`, expected a string").as_deref(), Some("password"));
        assert_eq!(field_of("unknown field `emial`, expected one of `email`").as_deref(), Some("emial"));
        assert_eq!(field_of("expected value at line 1 column 1"), None);
    }
}
