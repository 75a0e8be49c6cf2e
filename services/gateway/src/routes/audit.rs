//! `GET /v1/admin/audit`: the security audit log the user service writes (registrations, logins and
//! their failures and lockouts, refresh-token reuse, API keys, role and tier changes, key rotation),
//! newest first, for admins.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use parley_platform::ErrorCode;
use parley_platform::timestamps::{proto_to_rfc3339, to_proto};
use parley_proto::user::v1 as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{page_limit, query_rejection};
use crate::AppState;
use crate::auth::Caller;
use crate::problem::{ApiError, ApiResult};
use crate::views::Page;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Events about one account: its id, or an email (which also finds events about an address with
    /// no account, such as failed logins).
    pub account: Option<String>,
    /// One kind of event: `registered`, `login_succeeded`, `login_failed`, `login_locked`,
    /// `refresh_token_reused`, `api_key_created`, `api_key_revoked`, `role_changed`, `tier_changed` or
    /// `signing_key_rotated`.
    pub event: Option<String>,
    /// Start (inclusive), RFC 3339.
    pub from: Option<String>,
    /// End (exclusive), RFC 3339.
    pub to: Option<String>,
    /// Page size, 1 to 100 (default 20).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntryView {
    pub id: String,
    pub at: Option<String>,
    pub event: String,
    /// The account the event is about, when there is one.
    pub user_id: Option<String>,
    /// The account that acted, when it is not the subject (an admin changing a tier).
    pub actor_id: Option<String>,
    pub email: Option<String>,
    pub client_ip: Option<String>,
    /// The event's details.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

impl From<pb::AuditEntry> for AuditEntryView {
    fn from(entry: pb::AuditEntry) -> Self {
        Self {
            at: proto_to_rfc3339(entry.at.as_ref()),
            detail: serde_json::from_str(&entry.detail).unwrap_or_else(|_| serde_json::json!({})),
            id: entry.id,
            event: entry.event,
            user_id: entry.user_id,
            actor_id: entry.actor_id,
            email: entry.email,
            client_ip: entry.client_ip,
        }
    }
}

/// The audit log, newest first (admins only), filtered by account, event and time.
#[utoipa::path(get, path = "/v1/admin/audit", tag = "admin", security(("bearer" = [])), params(AuditQuery), responses(
    (status = 200, body = Page<AuditEntryView>),
    (status = 403, body = crate::problem::Problem),
))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> ApiResult<Json<Page<AuditEntryView>>> {
    if !caller.is_admin() {
        return Err(ApiError::new(ErrorCode::Forbidden, "admin role required"));
    }
    let Query(query) = query.map_err(query_rejection)?;
    for (field, value) in [("account", &query.account), ("event", &query.event)] {
        if value.as_deref().is_some_and(|text| text.contains('\0')) {
            return Err(ApiError::invalid_field(field, "must not contain the NUL character (U+0000)"));
        }
    }
    let time = |field: &str, value: Option<&str>| super::query_time(field, value).map(|at| at.map(to_proto));
    let request = pb::ListAuditRequest {
        account: query.account.clone(),
        event: query.event.clone(),
        from: time("from", query.from.as_deref())?,
        to: time("to", query.to.as_deref())?,
        limit: page_limit(query.limit.as_deref())?,
        cursor: query.cursor.clone(),
    };
    let entries = state.backends.user.clone().list_audit(request).await?.into_inner();
    let data = entries.entries.into_iter().map(AuditEntryView::from).collect();
    Ok(Json(Page { data, next_cursor: entries.next_cursor }))
}
