//! Token, request and cost accounting, from the analytics service.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use parley_platform::ErrorCode;
use parley_platform::timestamps::{rfc3339, to_proto};
use parley_proto::analytics::v1 as pb;
use serde::Deserialize;
use time::OffsetDateTime;

use super::query_rejection;
use crate::AppState;
use crate::auth::Caller;
use crate::problem::{ApiError, ApiResult, Problem};
use crate::views::{UsageReportView, UsageRowView};

const DEFAULT_RANGE: time::Duration = time::Duration::days(30);

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Start (inclusive), RFC 3339. Default: 30 days before `to`.
    pub from: Option<String>,
    /// End (exclusive), RFC 3339. Default: now.
    pub to: Option<String>,
    /// `day` (default) or `model`; admins may also use `user`.
    pub group_by: Option<String>,
}

struct Range {
    from: OffsetDateTime,
    to: OffsetDateTime,
    group_by: pb::GroupBy,
    group_name: &'static str,
}

fn parse_range(query: &UsageQuery, allow_user: bool) -> Result<Range, ApiError> {
    let to = super::query_time("to", query.to.as_deref())?.unwrap_or_else(OffsetDateTime::now_utc);
    let from = super::query_time("from", query.from.as_deref())?.unwrap_or(to - DEFAULT_RANGE);
    if from >= to {
        return Err(ApiError::invalid_field("from", "must be before to"));
    }
    let (group_by, group_name) = match query.group_by.as_deref() {
        None | Some("") | Some("day") => (pb::GroupBy::Day, "day"),
        Some("model") => (pb::GroupBy::Model, "model"),
        Some("user") if allow_user => (pb::GroupBy::User, "user"),
        Some(_) if allow_user => {
            return Err(ApiError::invalid_field("group_by", "must be day, model or user"));
        }
        Some(_) => return Err(ApiError::invalid_field("group_by", "must be day or model")),
    };
    Ok(Range { from, to, group_by, group_name })
}

fn row_view(row: pb::UsageRow, group_by: Option<pb::GroupBy>) -> UsageRowView {
    let key = Some(row.key);
    let (day, model, user_id) = match group_by {
        Some(pb::GroupBy::Day) => (key, None, None),
        Some(pb::GroupBy::Model) => (None, key, None),
        Some(pb::GroupBy::User) => (None, None, key),
        Some(pb::GroupBy::Unspecified) | None => (None, None, None),
    };
    UsageRowView {
        day,
        model,
        user_id,
        input_tokens: row.input_tokens,
        output_tokens: row.output_tokens,
        total_tokens: row.input_tokens + row.output_tokens,
        requests: row.requests,
        cost_usd: row.cost_micros as f64 / 1_000_000.0,
    }
}

/// One user's usage by day from `from` to `to` (the account export's).
pub(super) async fn daily(
    state: &AppState,
    user_id: String,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> ApiResult<UsageReportView> {
    let range = Range { from, to, group_by: pb::GroupBy::Day, group_name: "day" };
    report(state, Some(user_id), range).await.map(|Json(report)| report)
}

async fn report(state: &AppState, user_id: Option<String>, range: Range) -> ApiResult<Json<UsageReportView>> {
    let request = pb::GetUsageRequest {
        user_id,
        from: Some(to_proto(range.from)),
        to: Some(to_proto(range.to)),
        group_by: range.group_by as i32,
    };
    let report = state.backends.analytics.clone().get_usage(request).await?.into_inner();
    Ok(Json(UsageReportView {
        from: rfc3339(range.from),
        to: rfc3339(range.to),
        group_by: range.group_name.to_owned(),
        data: report.rows.into_iter().map(|row| row_view(row, Some(range.group_by))).collect(),
        totals: row_view(report.totals.unwrap_or_default(), None),
        budget: None,
    }))
}

/// The caller's own tokens, requests and cost.
#[utoipa::path(get, path = "/v1/usage", tag = "usage", security(("bearer" = [])), params(UsageQuery), responses(
    (status = 200, body = UsageReportView),
    (status = 400, body = Problem),
))]
pub async fn own(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> ApiResult<Json<UsageReportView>> {
    let Query(query) = query.map_err(query_rejection)?;
    let range = parse_range(&query, false)?;
    let Json(mut usage) = report(&state, Some(caller.user_id.to_string()), range).await?;
    let request = parley_proto::quota::v1::GetBudgetRequest { user_id: caller.user_id.to_string(), tier: caller.tier };
    let budget = state.backends.quota.clone().get_budget(request).await?.into_inner();
    usage.budget = Some(budget.into());
    Ok(Json(usage))
}

/// Usage across every user (admins only); `group_by=user` breaks it down by user.
#[utoipa::path(get, path = "/v1/admin/usage", tag = "admin", security(("bearer" = [])), params(UsageQuery), responses(
    (status = 200, body = UsageReportView),
    (status = 403, body = Problem),
))]
pub async fn admin(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> ApiResult<Json<UsageReportView>> {
    if !caller.is_admin() {
        return Err(ApiError::new(ErrorCode::Forbidden, "admin role required"));
    }
    let Query(query) = query.map_err(query_rejection)?;
    let range = parse_range(&query, true)?;
    report(&state, None, range).await
}
