//! What a request to `/v1/` passes before its handler runs, in this order:
//!
//! 1. **Identity**: the bearer credential (an access token, or an API key) names the caller: from the
//!    `Authorization` header (or an API key in `X-Api-Key`, as Anthropic's SDKs send it), or on the
//!    WebSocket route, whose browser clients cannot set headers, from
//!    the `access_token` query parameter; either way every later step applies to it alike. A request
//!    without one is anonymous; one whose credential is refused is answered 401 by any handler that
//!    needs a caller (the [`Caller`] extractor), and passes to the handlers that do not (login). An API
//!    key this gateway has not verified lately is first limited per client address, since verifying it
//!    costs the user service a call (so guessing keys is slow).
//! 2. **Limits**: the unauthenticated routes (register, login, refresh) per client address; every other
//!    route per caller, by tier. `RateLimit-*` headers go on every limited response; 429 past it.
//! 3. **Signatures**: a request made with an API key that requires signing (or that carries a
//!    signature) must be signed, fresh and not replayed, or it is 401.
//! 4. **Budgets**: token reservations, in the handlers that spend tokens (only they know the estimate).
//!
//! A request that fails a step is answered there; the later steps do not run.

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parley_platform::ErrorCode;

use crate::AppState;
use crate::auth::{Caller, KeyGrant, bearer_token};
use crate::limits::Decision;
use crate::problem::ApiError;

/// The unauthenticated routes, limited per client address.
const PER_IP_ROUTES: [&str; 3] = ["/v1/auth/register", "/v1/auth/login", "/v1/auth/refresh"];

/// The route whose credential may come in the query string (browsers cannot set headers on a
/// WebSocket handshake).
const QUERY_CREDENTIAL_ROUTE: &str = "/v1/messages/{id}/ws";

/// Largest clock difference accepted between a signed request's timestamp and the gateway.
const SIGNATURE_SKEW_SECS: i64 = 300;

/// Who a request comes from, as step 1 found; left in the request for the [`Caller`] extractor.
#[derive(Clone)]
enum Identity {
    Anonymous,
    Refused(parley_platform::ServiceError),
    Caller(Caller),
}

/// Runs steps 1 to 3 for every `/v1/` route (a route layer, so the matched route is known).
pub async fn admit(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|path| path.as_str().to_owned()).unwrap_or_default();
    if !route.starts_with("/v1/") {
        return next.run(request).await;
    }

    // 1. Identity.
    let credential = bearer_token(request.headers())
        .map(str::to_owned)
        .or_else(|| (route == QUERY_CREDENTIAL_ROUTE).then(|| query_credential(request.uri())).flatten());
    let mut grant = None;
    let hops = state.config.http.trusted_proxy_hops;
    let client_ip = |request: &Request| crate::routes::client_ip(request.headers(), request.extensions(), hops);
    let identity = match credential.as_deref() {
        None => Identity::Anonymous,
        Some(key) if key.starts_with("pk_") => {
            let found = match state.api_keys.cached(key) {
                Some(found) => Ok(found),
                None => {
                    // A key this gateway has not verified lately costs the user service a call: those
                    // are limited per client address, like the unauthenticated routes, so guessing keys
                    // is slow.
                    let limit = state.config.http.ip_requests_per_minute;
                    let limited_key = format!("key-lookup:{}", client_ip(&request));
                    let decision = state.limiter.check(&limited_key, limit).await;
                    if !decision.allowed {
                        metrics::counter!(crate::metrics::RATELIMIT_REJECTIONS, "scope" => "key_lookup").increment(1);
                        let message =
                            "too many unverified API keys from this address; retry after the time in Retry-After";
                        return limited(ApiError::new(ErrorCode::RateLimited, message), decision);
                    }
                    state.api_keys.verify_with_user_service(key).await
                }
            };
            match found {
                Ok(found) => {
                    let caller = found.caller.clone();
                    grant = Some(found);
                    Identity::Caller(caller)
                }
                Err(ApiError(error)) => Identity::Refused(error),
            }
        }
        Some(token) => match Caller::from_token(&state, token).await {
            Ok(caller) => Identity::Caller(caller),
            Err(ApiError(error)) => Identity::Refused(error),
        },
    };

    // 2. Limits.
    let decision = if PER_IP_ROUTES.contains(&route.as_str()) {
        let limited_key = format!("ip:{}", client_ip(&request));
        let decision = state.limiter.check(&limited_key, state.config.http.ip_requests_per_minute).await;
        if !decision.allowed {
            metrics::counter!(crate::metrics::RATELIMIT_REJECTIONS, "scope" => "ip").increment(1);
            let message = "too many requests from this address; retry after the time in Retry-After";
            return limited(ApiError::new(ErrorCode::RateLimited, message), decision);
        }
        Some(decision)
    } else if let Identity::Caller(caller) = &identity {
        let tier = state.config.tier(&caller.tier).or_else(|| state.config.tier(parley_platform::config::DEFAULT_TIER));
        let limit = tier.map_or(1, |tier| tier.requests_per_minute);
        let decision = state.limiter.check(&format!("user:{}", caller.user_id), limit).await;
        if !decision.allowed {
            metrics::counter!(crate::metrics::RATELIMIT_REJECTIONS, "scope" => "user", "tier" => caller.tier.clone())
                .increment(1);
            let message = format!("more than {limit} requests a minute; retry after the time in Retry-After");
            return limited(ApiError::new(ErrorCode::RateLimited, message), decision);
        }
        Some(decision)
    } else {
        None
    };
    request.extensions_mut().insert(identity);

    // 3. Signatures.
    let signed = request.headers().contains_key("x-parley-signature");
    let request = match grant {
        Some(grant) if grant.require_signature || signed => match check_signature(&state, &grant, request).await {
            Ok(request) => request,
            Err(refused) => return with_limit_headers(refused, decision),
        },
        _ => request,
    };

    with_limit_headers(next.run(request).await, decision)
}

/// The `access_token` query parameter, when there is a non-empty one.
fn query_credential(uri: &axum::http::Uri) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Credential {
        access_token: Option<String>,
    }
    let axum::extract::Query(credential) = axum::extract::Query::<Credential>::try_from_uri(uri).ok()?;
    credential.access_token.map(|token| token.trim().to_owned()).filter(|token| !token.is_empty())
}

fn limited(error: ApiError, decision: Decision) -> Response {
    let error = ApiError(error.0.retry_after(decision.retry_after_secs.max(1)));
    with_limit_headers(error.into_response(), Some(decision))
}

fn with_limit_headers(mut response: Response, decision: Option<Decision>) -> Response {
    if let Some(decision) = decision {
        decision.write_headers(response.headers_mut());
    }
    response
}

/// HMAC request signing: `X-Parley-Signature: v1=hex(HMAC-SHA256(signing_secret, timestamp "\n" METHOD
/// "\n" path_and_query "\n" hex(SHA256(body))))` with `X-Parley-Timestamp`. A missing, stale (over
/// 300 s), wrong or replayed signature is 401. The request comes back whole (its body read and put back).
async fn check_signature(state: &AppState, grant: &KeyGrant, request: Request) -> Result<Request, Response> {
    let refuse = |why: &str| ApiError::unauthorized(format!("request signature {why}")).into_response();
    let Some(secret) = &grant.signing_secret else {
        return Err(refuse("cannot be checked: this key has no signing secret"));
    };
    // In a block of its own: a borrow of the request must not live across the awaits below.
    let (timestamp, signature) = {
        let header = |name: &str| request.headers().get(name).and_then(|value| value.to_str().ok()).map(str::to_owned);
        (header("x-parley-timestamp"), header("x-parley-signature"))
    };
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
        return Err(refuse("missing: this key requires X-Parley-Timestamp and X-Parley-Signature"));
    };
    let Ok(sent_at) = timestamp.trim().parse::<i64>() else {
        return Err(refuse("timestamp is not a number of seconds"));
    };
    if (time::OffsetDateTime::now_utc().unix_timestamp() - sent_at).abs() > SIGNATURE_SKEW_SECS {
        return Err(refuse("timestamp is too far from now"));
    }
    let Some(presented) = signature.trim().strip_prefix("v1=").and_then(|text| hex::decode(text).ok()) else {
        return Err(refuse("is malformed; expected v1=<hex>"));
    };
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, state.config.http.body_limit_bytes).await else {
        let error = ApiError::new(ErrorCode::PayloadTooLarge, "the request body is larger than the limit");
        return Err(error.into_response());
    };
    let body_hash = hex::encode(ring::digest::digest(&ring::digest::SHA256, &body));
    let path_and_query =
        parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let message = format!("{sent_at}\n{}\n{path_and_query}\n{body_hash}", parts.method);
    let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    if ring::hmac::verify(&hmac_key, message.as_bytes(), &presented).is_err() {
        return Err(refuse("does not match"));
    }
    if !state.limiter.first_use(&format!("sig:{}", hex::encode(&presented))).await {
        return Err(refuse("was already used (replay)"));
    }
    Ok(Request::from_parts(parts, axum::body::Body::from(body)))
}

/// The caller [`admit`] identified; 401 when there is none.
impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &AppState) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Identity>() {
            Some(Identity::Caller(caller)) => Ok(caller.clone()),
            Some(Identity::Refused(error)) => Err(ApiError(error.clone())),
            Some(Identity::Anonymous) | None => Err(ApiError::unauthorized("missing bearer credentials")),
        }
    }
}
