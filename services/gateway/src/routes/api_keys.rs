//! API keys: create (the key is shown once), list (no secrets), revoke (refused by every gateway at
//! once: the revocation is announced on NATS and each gateway drops the key from its cache).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use parley_platform::timestamps::proto_to_rfc3339;
use parley_proto::user::v1 as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{PageQuery, page_limit, query_rejection};
use crate::AppState;
use crate::auth::Caller;
use crate::pipeline::ClientIp;
use crate::problem::{ApiJson, ApiPath, ApiResult, Problem};
use crate::views::Page;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyBody {
    pub name: String,
    /// Require HMAC request signing for this key.
    #[serde(default)]
    pub require_signature: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyView {
    pub id: String,
    pub name: String,
    /// The first characters of the key, to tell keys apart.
    pub prefix: String,
    pub require_signature: bool,
    pub created_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedApiKeyView {
    pub id: String,
    pub name: String,
    /// The key itself: shown in this response only.
    pub key: String,
    /// The HMAC secret for request signing, when the key requires it: shown in this response only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<String>,
    pub prefix: String,
    pub created_at: Option<String>,
}

impl From<pb::ApiKey> for ApiKeyView {
    fn from(key: pb::ApiKey) -> Self {
        Self {
            created_at: proto_to_rfc3339(key.created_at.as_ref()),
            last_used_at: proto_to_rfc3339(key.last_used_at.as_ref()),
            id: key.id,
            name: key.name,
            prefix: key.prefix,
            require_signature: key.require_signature,
        }
    }
}

/// Create an API key (`pk_...`), usable wherever an access token is.
#[utoipa::path(post, path = "/v1/api-keys", tag = "identity", security(("bearer" = [])), request_body = CreateApiKeyBody,
    responses(
        (status = 201, body = CreatedApiKeyView),
        (status = 400, description = "Bad name", body = Problem),
    ))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ClientIp(client_ip): ClientIp,
    ApiJson(body): ApiJson<CreateApiKeyBody>,
) -> ApiResult<Response> {
    let request = pb::CreateApiKeyRequest {
        user_id: caller.user_id.to_string(),
        name: body.name,
        require_signature: body.require_signature,
        client_ip,
    };
    let created = state.backends.user.clone().create_api_key(request).await?.into_inner();
    let key = created.api_key.unwrap_or_default();
    let view = CreatedApiKeyView {
        created_at: proto_to_rfc3339(key.created_at.as_ref()),
        id: key.id,
        name: key.name,
        key: created.key,
        signing_secret: created.signing_secret,
        prefix: key.prefix,
    };
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// The caller's live API keys, newest first (never the keys themselves).
#[utoipa::path(get, path = "/v1/api-keys", tag = "identity", security(("bearer" = [])),
    params(PageQuery), responses(
    (status = 200, body = Page<ApiKeyView>),
    (status = 400, description = "Bad limit or a cursor that was altered", body = Problem),
))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<Json<Page<ApiKeyView>>> {
    let Query(query) = query.map_err(query_rejection)?;
    let request = pb::ListApiKeysRequest {
        user_id: caller.user_id.to_string(),
        limit: page_limit(query.limit.as_deref())?,
        cursor: query.cursor,
    };
    let keys = state.backends.user.clone().list_api_keys(request).await?.into_inner();
    Ok(Json(Page { data: keys.api_keys.into_iter().map(ApiKeyView::from).collect(), next_cursor: keys.next_cursor }))
}

/// Revoke an API key; every gateway refuses it from then on.
#[utoipa::path(delete, path = "/v1/api-keys/{id}", tag = "identity", security(("bearer" = [])),
    params(("id" = String, Path)), responses((status = 204), (status = 404, body = Problem)))]
pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    ClientIp(client_ip): ClientIp,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let request = pb::RevokeApiKeyRequest { user_id: caller.user_id.to_string(), api_key_id: id.clone(), client_ip };
    state.backends.user.clone().revoke_api_key(request).await?;
    state.api_keys.forget(&id);
    if let Err(error) = state.nats.publish(state.names.api_key_revocations_subject(), id.into_bytes().into()).await {
        // Other gateways still drop the key when their cache entry expires.
        tracing::warn!(%error, "could not announce an API key revocation");
    }
    Ok(StatusCode::NO_CONTENT)
}
