//! What a request to `/v1/` passes before its handler runs, in this order:
//!
//! 1. **Identity**: the bearer credential (an access token, or an API key) names the caller: from the
//!    `Authorization` header (or an API key in `X-Api-Key`, as Anthropic's SDKs send it), or on the
//!    WebSocket route, whose browser clients cannot set headers, from
//!    the `access_token` query parameter; either way every later step applies to it alike. A request
//!    without one is anonymous; one whose credential is refused is answered 401 by any handler that
//!    needs a caller (the [`Caller`] extractor), and passes to the handlers that do not (login). An API
//!    key this gateway has never verified is first limited per client address, since verifying it
//!    costs the user service a call (so guessing keys is slow); requests that need one key verified at
//!    once wait for one call ([`key_grant`]).
//! 2. **Limits**: the unauthenticated routes (register, login, refresh) per client address; every other
//!    route per caller, by tier. `RateLimit-*` headers go on every limited response; 429 past it. On
//!    the routes that spend tokens the caller's limit is decided with the budget reservation, in the
//!    same Redis round trip ([`reserve_budget`]), unless its signature is checked; a request that the
//!    handler refuses before it reserves (a bad body, say) is limited once the handler has answered, and
//!    answered 429 past the limit.
//! 3. **Signatures**: a request made with an API key that requires signing (or that carries a
//!    signature) must be signed, fresh and not replayed, or it is 401.
//! 4. **Budgets**: token reservations ([`reserve_budget`], [`release_budget`]), called by the handlers
//!    that spend tokens, since only they know the estimate.
//!
//! A request that fails a step is answered there; the later steps do not run.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parley_platform::{ErrorCode, ServiceError};
use parley_proto::quota::v1 as quota_pb;
use parley_quota::reserve::{ReserveRequest, Reserved};
use uuid::Uuid;

use crate::AppState;
use crate::auth::{Caller, KeyCheck, KeyGrant, bearer_token};
use crate::limits::{Decision, DeferredLimit, UserLimit};
use crate::problem::ApiError;

/// The unauthenticated routes, limited per client address.
const PER_IP_ROUTES: [&str; 3] = ["/v1/auth/register", "/v1/auth/login", "/v1/auth/refresh"];

/// The routes (all `POST`) whose handlers reserve a budget before anything they do has an effect:
/// their rate limit waits for the reservation, so that both take one Redis round trip.
const LIMITED_WITH_RESERVATION: [&str; 6] = [
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/embeddings",
    "/v1/conversations/{id}/messages",
    "/v1/messages/{id}/edit",
    "/v1/messages/{id}/regenerate",
];

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
    let client_ip = |request: &Request| client_ip(request.headers(), request.extensions(), hops);
    let mut identity = match credential.as_deref() {
        None => Identity::Anonymous,
        Some(key) if key.starts_with("pk_") => {
            // The headers and extensions, not the request (whose body is not `Sync`), across the awaits.
            let (headers, extensions) = (request.headers(), request.extensions());
            let address = || self::client_ip(headers, extensions, hops);
            let found = match key_grant(&state, key, address).await {
                Ok(found) => found,
                Err(limited) => return limited,
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
    } else if let Identity::Caller(caller) = &mut identity {
        let tier = state.config.tier(&caller.tier).or_else(|| state.config.tier(parley_platform::config::DEFAULT_TIER));
        let limit = UserLimit {
            key: format!("user:{}", caller.user_id),
            limit: tier.map_or(1, |tier| tier.requests_per_minute),
            tier: caller.tier.clone(),
        };
        // A request whose signature is checked is limited first, as on every other route: a request
        // past the limit must not use up its signature (the replay check records it).
        let signature_checked = request.headers().contains_key("x-parley-signature")
            || grant.as_ref().is_some_and(|grant| grant.require_signature);
        if request.method() == axum::http::Method::POST
            && !signature_checked
            && LIMITED_WITH_RESERVATION.contains(&route.as_str())
        {
            caller.rate_limit = Some(DeferredLimit::new(limit));
            None
        } else {
            match limit.check(&state).await {
                Ok(decision) => Some(decision),
                Err(limited) => return limited,
            }
        }
    } else {
        None
    };
    let deferred = match &identity {
        Identity::Caller(caller) => caller.rate_limit.clone(),
        _ => None,
    };
    request.extensions_mut().insert(identity);

    // 3. Signatures.
    let signed = request.headers().contains_key("x-parley-signature");
    let request = match grant {
        Some(grant) if grant.require_signature || signed => match check_signature(&state, &grant, request).await {
            Ok(request) => request,
            Err(refused) => return answered(&state, refused, decision, deferred).await,
        },
        _ => request,
    };

    let response = next.run(request).await;
    answered(&state, response, decision, deferred).await
}

/// `response` with the rate limit's headers, once the limit is decided: a limit the handler did not
/// decide with a reservation is decided now (the request counts), and past it the answer is 429.
async fn answered(
    state: &AppState,
    response: Response,
    decision: Option<Decision>,
    deferred: Option<DeferredLimit>,
) -> Response {
    let decision = match deferred {
        None => decision,
        Some(deferred) => match deferred.decided() {
            Some(decided) => Some(decided),
            None => match deferred.limit().check(state).await {
                Ok(decided) => Some(decided),
                Err(limited) => return limited,
            },
        },
    };
    with_limit_headers(response, decision)
}

impl UserLimit {
    /// Decides the limit alone; `Err`: the 429 to answer.
    async fn check(&self, state: &AppState) -> Result<Decision, Response> {
        let decision = state.limiter.check(&self.key, self.limit).await;
        match self.refusal(decision) {
            None => Ok(decision),
            Some(error) => Err(limited(error, decision)),
        }
    }

    /// The error for a request `decision` refuses (counted), if it does.
    fn refusal(&self, decision: Decision) -> Option<ApiError> {
        if decision.allowed {
            return None;
        }
        metrics::counter!(crate::metrics::RATELIMIT_REJECTIONS, "scope" => "user", "tier" => self.tier.clone())
            .increment(1);
        let message = format!("more than {} requests a minute; retry after the time in Retry-After", self.limit);
        Some(ApiError::new(ErrorCode::RateLimited, message))
    }
}

/// Keeps `decision` of a limit that waited for the reservation; the 429 to answer when it refuses the
/// request.
fn decide(deferred: &DeferredLimit, decision: Decision) -> Result<(), ApiError> {
    deferred.keep(decision);
    match deferred.limit().refusal(decision) {
        None => Ok(()),
        Some(error) => Err(ApiError(error.0.retry_after(decision.retry_after_secs.max(1)))),
    }
}

/// What API key `key` grants: as verified lately, else from the answer another request is getting
/// about it, else from the user service. A key this gateway has never verified costs the user service
/// a call, so it is first limited per client address (`client`), like the unauthenticated routes, so
/// guessing keys is slow; one it verified before, whose entry expired, is no guess. `Err`: the 429 to
/// answer.
async fn key_grant(
    state: &AppState,
    key: &str,
    client: impl Fn() -> String,
) -> Result<Result<KeyGrant, ApiError>, Response> {
    loop {
        if let Some(found) = state.api_keys.cached(key) {
            return Ok(Ok(found));
        }
        match state.api_keys.check(key) {
            // If the request asking gave up without asking, the question is open again.
            KeyCheck::Wait(answer) => match answer.await {
                Ok(answer) => return Ok(answer.map_err(ApiError)),
                Err(_) => continue,
            },
            KeyCheck::Ask(question) => {
                if !question.known {
                    let limited_key = format!("key-lookup:{}", client());
                    let decision = state.limiter.check(&limited_key, state.config.http.ip_requests_per_minute).await;
                    if !decision.allowed {
                        metrics::counter!(crate::metrics::RATELIMIT_REJECTIONS, "scope" => "key_lookup").increment(1);
                        let message =
                            "too many unverified API keys from this address; retry after the time in Retry-After";
                        return Err(limited(ApiError::new(ErrorCode::RateLimited, message), decision));
                    }
                }
                return Ok(question.ask(key).await);
            }
        }
    }
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

/// The client's address: the TCP peer, or, behind `http.trusted_proxy_hops` proxies, the
/// `X-Forwarded-For` entry that many places from the right (entries further left can be forged).
pub struct ClientIp(pub String);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(client_ip(&parts.headers, &parts.extensions, state.config.http.trusted_proxy_hops)))
    }
}

pub fn client_ip(headers: &axum::http::HeaderMap, extensions: &axum::http::Extensions, hops: usize) -> String {
    let peer = extensions.get::<ConnectInfo<SocketAddr>>().map(|info| info.0.ip().to_string()).unwrap_or_default();
    if hops == 0 {
        return peer;
    }
    let forwarded: Vec<String> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|entry| entry.trim().to_owned())
        .filter(|entry| !entry.is_empty())
        .collect();
    // The nearest proxy appended the address it saw; with `hops` proxies the client is hops-1 further left.
    forwarded.len().checked_sub(hops).and_then(|index| forwarded.get(index).cloned()).unwrap_or(peer)
}

// 4. Budgets.

/// Holds the estimated tokens of a request against the caller's budgets: the reservation id, or 429
/// `quota_exceeded` with `Retry-After` until the window that refused it resets. The caller's rate
/// limit, when it waits for this ([`DeferredLimit`]), is decided first, in the same Redis round trip:
/// 429 `rate_limited` past it, and nothing reserved.
pub async fn reserve_budget(state: &AppState, caller: &Caller, estimated_tokens: i64) -> Result<String, ApiError> {
    let reservation_id = Uuid::now_v7().to_string();
    let request = state.reserver.request(caller.user_id, &caller.tier, &reservation_id, estimated_tokens);
    let deferred = caller.rate_limit.as_ref().filter(|deferred| deferred.decided().is_none());
    let in_redis = match deferred {
        Some(deferred) => {
            let limit = deferred.limit();
            match state.limiter.check_and_reserve(&limit.key, limit.limit, &request).await {
                Some((decision, said)) => {
                    decide(deferred, decision)?;
                    said.map(|said| request.decide(said))
                }
                // Redis did not answer: the limit as it decides alone, the reservation by the quota service.
                None => {
                    decide(deferred, state.limiter.check(&limit.key, limit.limit).await)?;
                    None
                }
            }
        }
        None => reserve_in_redis(state, request).await,
    };
    let reservation = match in_redis {
        Some(Reserved::Decided(reservation)) => reservation,
        // Only the quota service can decide (counters to rebuild from the ledger, Redis unreachable):
        // the same reservation id, so a reservation the script made before timing out is not doubled.
        Some(Reserved::CountersMissing) | None => state
            .backends
            .quota
            .clone()
            .reserve(quota_pb::ReserveRequest {
                user_id: caller.user_id.to_string(),
                tier: caller.tier.clone(),
                reservation_id: reservation_id.clone(),
                tokens: estimated_tokens,
            })
            .await?
            .into_inner(),
    };
    if reservation.granted {
        return Ok(reservation_id);
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let retry_after = (reservation.retry_at - now).max(1) as u64;
    let detail = match reservation.budget.and_then(|budget| budget.day) {
        Some(day) => format!("token budget exhausted ({} of {} used today)", day.used + day.reserved, day.limit),
        None => "token budget exhausted".to_owned(),
    };
    Err(ServiceError::new(ErrorCode::QuotaExceeded, detail).retry_after(retry_after).into())
}

/// The reservation as quota's script decides it in Redis, run from here (no gRPC round trip to quota);
/// `None` when Redis did not answer in time.
async fn reserve_in_redis(state: &AppState, request: ReserveRequest) -> Option<Reserved> {
    let mut redis = state.limiter.connection().await?;
    match state.reserver.reserve_requested(&mut redis, request).await {
        Ok(reserved) => Some(reserved),
        Err(_) => {
            // The next use reconnects; meanwhile the quota service decides.
            state.limiter.forget_connection().await;
            None
        }
    }
}

/// Gives back a reservation whose request queued no job.
pub async fn release_budget(state: &AppState, caller: &Caller, reservation_id: &str) {
    let request = quota_pb::SettleRequest {
        user_id: caller.user_id.to_string(),
        reservation_id: reservation_id.to_owned(),
        tokens: 0,
    };
    if let Err(status) = state.backends.quota.clone().settle(request).await {
        tracing::warn!(code = ?status.code(), "could not release a reservation; it expires by itself");
    }
}
