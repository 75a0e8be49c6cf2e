//! One error-code type for the whole platform. Each code maps to an HTTP status, a problem `code`
//! string and a gRPC status code; the exact code (and the field at fault) also rides in gRPC metadata,
//! so it survives the hop between services unchanged: a chat `NotFound` is a 404 at the gateway.

use std::fmt;

use tonic::metadata::MetadataValue;

/// Stable error codes. Clients match on [`ErrorCode::as_str`]; never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    PreconditionFailed,
    PreconditionRequired,
    PayloadTooLarge,
    RateLimited,
    QuotaExceeded,
    UpstreamUnavailable,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::InvalidRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::PreconditionFailed,
        ErrorCode::PreconditionRequired,
        ErrorCode::PayloadTooLarge,
        ErrorCode::RateLimited,
        ErrorCode::QuotaExceeded,
        ErrorCode::UpstreamUnavailable,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PreconditionFailed => "precondition_failed",
            ErrorCode::PreconditionRequired => "precondition_required",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::UpstreamUnavailable => "upstream_unavailable",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    pub fn parse(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|candidate| candidate.as_str() == code)
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::PreconditionFailed => 412,
            ErrorCode::PreconditionRequired => 428,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::QuotaExceeded => 429,
            ErrorCode::UpstreamUnavailable => 503,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "Invalid request",
            ErrorCode::Unauthorized => "Unauthorized",
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::NotFound => "Not found",
            ErrorCode::Conflict => "Conflict",
            ErrorCode::PreconditionFailed => "Precondition failed",
            ErrorCode::PreconditionRequired => "Precondition required",
            ErrorCode::PayloadTooLarge => "Payload too large",
            ErrorCode::RateLimited => "Rate limited",
            ErrorCode::QuotaExceeded => "Quota exceeded",
            ErrorCode::UpstreamUnavailable => "Upstream unavailable",
            ErrorCode::Unavailable => "Service unavailable",
            ErrorCode::Internal => "Internal error",
        }
    }

    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorCode::InvalidRequest => tonic::Code::InvalidArgument,
            ErrorCode::Unauthorized => tonic::Code::Unauthenticated,
            ErrorCode::Forbidden => tonic::Code::PermissionDenied,
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::Conflict => tonic::Code::AlreadyExists,
            ErrorCode::PreconditionFailed => tonic::Code::FailedPrecondition,
            ErrorCode::PreconditionRequired => tonic::Code::FailedPrecondition,
            ErrorCode::PayloadTooLarge => tonic::Code::OutOfRange,
            ErrorCode::RateLimited => tonic::Code::ResourceExhausted,
            ErrorCode::QuotaExceeded => tonic::Code::ResourceExhausted,
            ErrorCode::UpstreamUnavailable => tonic::Code::Unavailable,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
            ErrorCode::Internal => tonic::Code::Internal,
        }
    }

    /// The code for a gRPC status that carries no Parley metadata (for example one made by tonic
    /// itself when a peer is unreachable).
    pub fn from_grpc_code(code: tonic::Code) -> Self {
        match code {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => ErrorCode::InvalidRequest,
            tonic::Code::Unauthenticated => ErrorCode::Unauthorized,
            tonic::Code::PermissionDenied => ErrorCode::Forbidden,
            tonic::Code::NotFound => ErrorCode::NotFound,
            tonic::Code::AlreadyExists | tonic::Code::Aborted => ErrorCode::Conflict,
            tonic::Code::FailedPrecondition => ErrorCode::PreconditionFailed,
            tonic::Code::ResourceExhausted => ErrorCode::RateLimited,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => ErrorCode::Unavailable,
            tonic::Code::Ok
            | tonic::Code::Unknown
            | tonic::Code::Unimplemented
            | tonic::Code::Internal
            | tonic::Code::DataLoss => ErrorCode::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const CODE_KEY: &str = "parley-error-code";
const FIELD_KEY: &str = "parley-error-field";
const RETRY_AFTER_KEY: &str = "parley-retry-after";

/// An error as a client may see it: a code, a message safe to show, and optionally the field at fault
/// and when to retry. Internal details never go in here; log them where they happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    pub code: ErrorCode,
    pub message: String,
    pub field: Option<String>,
    pub retry_after_secs: Option<u64>,
}

impl ServiceError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), field: None, retry_after_secs: None }
    }

    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        let message = format!("{field}: {}", message.into());
        Self { code: ErrorCode::InvalidRequest, message, field: Some(field), retry_after_secs: None }
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{what} not found"))
    }

    pub fn internal() -> Self {
        Self::new(ErrorCode::Internal, "an internal error occurred")
    }

    pub fn unavailable(what: &str) -> Self {
        Self::new(ErrorCode::Unavailable, format!("{what} is unavailable; try again shortly")).retry_after(1)
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ServiceError {}

impl From<ServiceError> for tonic::Status {
    fn from(error: ServiceError) -> Self {
        let mut status = tonic::Status::new(error.code.grpc_code(), error.message);
        let metadata = status.metadata_mut();
        metadata.insert(CODE_KEY, MetadataValue::from_static(error.code.as_str()));
        if let Some(field) = error.field.and_then(|field| MetadataValue::try_from(field).ok()) {
            metadata.insert(FIELD_KEY, field);
        }
        if let Some(secs) = error.retry_after_secs {
            metadata.insert(RETRY_AFTER_KEY, MetadataValue::from(secs));
        }
        status
    }
}

impl From<tonic::Status> for ServiceError {
    fn from(status: tonic::Status) -> Self {
        let metadata = status.metadata();
        let text = |key: &str| metadata.get(key).and_then(|value| value.to_str().ok()).map(str::to_owned);
        let tagged = text(CODE_KEY).and_then(|code| ErrorCode::parse(&code));
        let code = tagged.unwrap_or_else(|| ErrorCode::from_grpc_code(status.code()));
        // A status without our tag was made by the transport, not by a Parley service: its message may
        // name hosts or internals, so it is replaced.
        let message = match (tagged, code) {
            (Some(_), ErrorCode::Internal) | (None, _) => match code {
                ErrorCode::Unavailable => "a backend service is unavailable; try again shortly".to_owned(),
                ErrorCode::Internal => "an internal error occurred".to_owned(),
                _ => status.message().to_owned(),
            },
            (Some(_), _) => status.message().to_owned(),
        };
        let retry_after_secs =
            text(RETRY_AFTER_KEY).and_then(|secs| secs.parse().ok()).or((code == ErrorCode::Unavailable).then_some(1));
        ServiceError { code, message, field: text(FIELD_KEY), retry_after_secs }
    }
}

impl From<sqlx::Error> for ServiceError {
    /// A database that cannot be reached is a 503 the client may retry; anything else is a bug, logged
    /// here with its detail and shown to the client as a bare 500.
    fn from(error: sqlx::Error) -> Self {
        if crate::db::is_unavailable(&error) {
            tracing::warn!(%error, "database unavailable");
            ServiceError::unavailable("the database")
        } else {
            tracing::error!(%error, "database error");
            ServiceError::internal()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_their_names() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
    }

    #[test]
    fn every_code_survives_a_grpc_hop() {
        for code in ErrorCode::ALL {
            let original = ServiceError::new(code, "message").retry_after(7);
            let back = ServiceError::from(tonic::Status::from(original.clone()));
            assert_eq!(back.code, code, "{code}");
            assert_eq!(back.retry_after_secs, Some(7));
        }
    }

    #[test]
    fn the_field_survives_a_grpc_hop() {
        let original = ServiceError::invalid_field("email", "must be a valid email address");
        let back = ServiceError::from(tonic::Status::from(original));
        assert_eq!(back.code, ErrorCode::InvalidRequest);
        assert_eq!(back.field.as_deref(), Some("email"));
        assert!(back.message.contains("email"));
    }

    #[test]
    fn not_found_is_404_and_quota_is_429() {
        let not_found = ServiceError::from(tonic::Status::from(ServiceError::not_found("conversation")));
        assert_eq!(not_found.code.http_status(), 404);
        assert_eq!(ErrorCode::QuotaExceeded.http_status(), 429);
        assert_eq!(ErrorCode::PreconditionRequired.http_status(), 428);
    }

    #[test]
    fn untagged_transport_errors_do_not_leak_their_message() {
        let status = tonic::Status::unavailable("tcp connect error: 10.0.0.7:50051 connection refused");
        let error = ServiceError::from(status);
        assert_eq!(error.code, ErrorCode::Unavailable);
        assert!(!error.message.contains("10.0.0.7"));
        let status = tonic::Status::internal("relation \"chat.messages\" does not exist");
        let error = ServiceError::from(status);
        assert_eq!(error.code, ErrorCode::Internal);
        assert!(!error.message.contains("relation"));
    }

    #[test]
    fn untagged_grpc_codes_map_sensibly() {
        assert_eq!(ErrorCode::from_grpc_code(tonic::Code::NotFound), ErrorCode::NotFound);
        assert_eq!(ErrorCode::from_grpc_code(tonic::Code::DeadlineExceeded), ErrorCode::Unavailable);
        assert_eq!(ErrorCode::from_grpc_code(tonic::Code::Unknown), ErrorCode::Internal);
    }
}
