//! Registration, login, token refresh and logout, the caller's profile, the JWKS, and tier changes.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use parley_proto::user::v1 as pb;
use serde_json::json;

use crate::AppState;
use crate::auth::Caller;
use crate::pipeline::ClientIp;
use crate::problem::{ApiError, ApiJson, ApiPath, ApiResult, Problem};
use crate::views::{AuthView, LoginBody, RefreshBody, RegisterBody, TierBody, UserView};

/// Create an account. Returns the user and a first token pair.
#[utoipa::path(post, path = "/v1/auth/register", tag = "identity", request_body = RegisterBody, responses(
    (status = 201, body = AuthView),
    (status = 400, description = "Malformed email or password under 10 characters; `field` names it", body = Problem),
    (status = 409, description = "The email is taken", body = Problem),
))]
pub async fn register(
    State(state): State<AppState>,
    ClientIp(client_ip): ClientIp,
    ApiJson(body): ApiJson<RegisterBody>,
) -> ApiResult<Response> {
    let request =
        pb::RegisterRequest { email: body.email, password: body.password, display_name: body.display_name, client_ip };
    let response = state.backends.user.clone().register(request).await?.into_inner();
    Ok((StatusCode::CREATED, Json(AuthView::from(response))).into_response())
}

/// Exchange credentials for a token pair. Wrong email and wrong password get the same 401.
#[utoipa::path(post, path = "/v1/auth/login", tag = "identity", request_body = LoginBody, responses(
    (status = 200, body = AuthView),
    (status = 401, body = Problem),
))]
pub async fn login(
    State(state): State<AppState>,
    ClientIp(client_ip): ClientIp,
    ApiJson(body): ApiJson<LoginBody>,
) -> ApiResult<Json<AuthView>> {
    let request = pb::LoginRequest { email: body.email, password: body.password, client_ip };
    let response = state.backends.user.clone().login(request).await?.into_inner();
    Ok(Json(AuthView::from(response)))
}

/// Rotate a refresh token. Presenting an already rotated token revokes its whole family.
#[utoipa::path(post, path = "/v1/auth/refresh", tag = "identity", request_body = RefreshBody, responses(
    (status = 200, body = AuthView),
    (status = 401, body = Problem),
))]
pub async fn refresh(
    State(state): State<AppState>,
    ClientIp(client_ip): ClientIp,
    ApiJson(body): ApiJson<RefreshBody>,
) -> ApiResult<Json<AuthView>> {
    let request = pb::RefreshRequest { refresh_token: body.refresh_token, client_ip };
    let response = state.backends.user.clone().refresh(request).await?.into_inner();
    Ok(Json(AuthView::from(response)))
}

/// End the session the refresh token belongs to.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "identity", request_body = RefreshBody, responses((status = 204)))]
pub async fn logout(State(state): State<AppState>, ApiJson(body): ApiJson<RefreshBody>) -> ApiResult<StatusCode> {
    state.backends.user.clone().logout(pb::LogoutRequest { refresh_token: body.refresh_token }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's own profile.
#[utoipa::path(get, path = "/v1/me", tag = "identity", security(("bearer" = [])), responses(
    (status = 200, body = UserView),
    (status = 401, body = Problem),
))]
pub async fn me(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<UserView>> {
    let user = state.backends.user.clone().get_user(pb::GetUserRequest { user_id: caller.user_id.to_string() }).await?;
    Ok(Json(UserView::from(user.into_inner())))
}

/// Delete the caller's account and everything it owns: conversations and messages, API keys, sessions,
/// budgets and ledger. Usage totals stay, anonymised. Only from a signed-in session (an access token),
/// never with an API key. Safe to repeat if it fails part-way: each step is idempotent, and the account
/// itself goes last.
#[utoipa::path(delete, path = "/v1/me", tag = "identity", security(("bearer" = [])), responses(
    (status = 204, description = "The account and its data are gone; its tokens and keys no longer work"),
    (status = 401, body = Problem),
    (status = 403, body = Problem, description = "Called with an API key"),
))]
pub async fn delete_me(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
) -> ApiResult<StatusCode> {
    if crate::auth::bearer_token(&headers).is_some_and(|credential| credential.starts_with("pk_")) {
        let detail = "an account can be deleted only from a signed-in session, not with an API key";
        return Err(ApiError::new(parley_platform::ErrorCode::Forbidden, detail));
    }
    let user_id = caller.user_id.to_string();
    // What the other services hold first, the account last: a deletion that fails part-way leaves the
    // caller signed in to try again.
    let chat = parley_proto::chat::v1::EraseUserRequest { user_id: user_id.clone() };
    state.backends.chat.clone().erase_user(chat).await?;
    let quota = parley_proto::quota::v1::EraseUserRequest { user_id: user_id.clone() };
    state.backends.quota.clone().erase_user(quota).await?;
    let analytics = parley_proto::analytics::v1::EraseUserRequest { user_id: user_id.clone() };
    state.backends.analytics.clone().erase_user(analytics).await?;
    let deleted = state
        .backends
        .user
        .clone()
        .delete_account(pb::DeleteAccountRequest { user_id: user_id.clone() })
        .await?
        .into_inner();
    // Once more, now that no new session can start: what another session or a cached key wrote in the
    // meantime goes too.
    let chat = parley_proto::chat::v1::EraseUserRequest { user_id };
    state.backends.chat.clone().erase_user(chat).await?;
    for api_key_id in deleted.revoked_api_key_ids {
        state.api_keys.forget(&api_key_id);
        let subject = state.names.api_key_revocations_subject();
        if let Err(error) = state.nats.publish(subject, api_key_id.into_bytes().into()).await {
            tracing::warn!(%error, "could not announce a deleted account's API key; other gateways drop it within 30 s");
        }
    }
    let change = parley_platform::events::AccountChanged {
        user_id: caller.user_id,
        tier: String::new(),
        role: String::new(),
        deleted: true,
    };
    state.account_overrides.record(&change);
    if let Err(error) = parley_platform::nats::announce_account_deleted(&state.nats, &state.names, caller.user_id).await
    {
        tracing::warn!(%error, "could not announce an account deletion; other gateways refuse its tokens when they expire");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The public keys that verify access tokens, by `kid`.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "identity", responses((status = 200, description = "A JWK set")))]
pub async fn jwks(State(state): State<AppState>) -> Response {
    let keys: Vec<serde_json::Value> = state
        .keys
        .published()
        .await
        .into_iter()
        .map(|key| json!({"kty": "OKP", "crv": key.crv, "x": key.x, "kid": key.kid, "alg": key.alg, "use": "sig"}))
        .collect();
    let mut response = Json(json!({"keys": keys})).into_response();
    response
        .headers_mut()
        .insert(axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("public, max-age=300"));
    response
}

/// Change a user's tier (admins only). Applies from the user's next access token.
#[utoipa::path(put, path = "/v1/admin/users/{id}/tier", tag = "admin", security(("bearer" = [])), request_body = TierBody,
    params(("id" = String, Path, description = "User id")), responses(
    (status = 200, body = UserView),
    (status = 403, body = Problem),
    (status = 404, body = Problem),
))]
pub async fn set_tier(
    State(state): State<AppState>,
    caller: Caller,
    ClientIp(client_ip): ClientIp,
    ApiPath(user_id): ApiPath<String>,
    ApiJson(body): ApiJson<TierBody>,
) -> ApiResult<Json<UserView>> {
    if !caller.is_admin() {
        return Err(ApiError::new(parley_platform::ErrorCode::Forbidden, "admin role required"));
    }
    if uuid::Uuid::parse_str(&user_id).is_err() {
        return Err(ApiError::not_found("user"));
    }
    let request = pb::SetTierRequest {
        email: String::new(),
        user_id,
        tier: body.tier,
        actor_id: caller.user_id.to_string(),
        client_ip,
    };
    let user = state.backends.user.clone().set_tier(request).await?.into_inner();
    announce_account_change(&state, &user).await;
    Ok(Json(UserView::from(user)))
}

/// Tells every gateway, so the change applies on the user's next request, not their next token.
async fn announce_account_change(state: &AppState, user: &pb::User) {
    let Ok(user_id) = uuid::Uuid::parse_str(&user.id) else {
        return;
    };
    let announced =
        parley_platform::nats::announce_account_change(&state.nats, &state.names, user_id, &user.tier, &user.role)
            .await;
    if let Err(error) = announced {
        tracing::warn!(%error, "could not announce an account change; it applies with the user's next token");
    }
}
