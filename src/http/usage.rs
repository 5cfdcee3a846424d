//! Usage and budgets as the API shows them: `GET /api/users/me/usage`,
//! `GET /api/admin/users/{id}/usage`, the usage of each key in
//! `GET /api/keys`, and the `{token_budget, budget_period}` fields that
//! PATCH bodies share.

use std::sync::Arc;

use axum::{Json, extract::State};
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

use super::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{AuthUser, UuidPath},
    views::{BudgetPeriod, ErrorBody},
};
use crate::{
    clock::rfc3339,
    domain::{Validator, user::Role},
    quota::UsageReport,
    store::{TokenBudget, UsagePeriod},
};

/// A budget change of a PATCH body: `token_budget` absent leaves the budget
/// (a `budget_period` alone moves it to that period), `null` removes it.
/// Answers the budget to store, or `None` to leave it as it is.
pub fn budget_change(
    v: &mut Validator,
    token_budget: Option<Option<i64>>,
    budget_period: Option<BudgetPeriod>,
    current: Option<TokenBudget>,
) -> Option<Option<TokenBudget>> {
    let period = budget_period.map(UsagePeriod::from);
    match token_budget {
        None => period.map(|p| current.map(|b| TokenBudget { period: p, ..b })),
        Some(None) => Some(None),
        Some(Some(tokens)) if tokens < 0 => {
            v.error("token_budget", "must be a whole number of tokens, 0 or more (null removes the budget)");
            None
        }
        Some(Some(tokens)) => {
            Some(Some(TokenBudget { tokens, period: period.or(current.map(|b| b.period)).unwrap_or(UsagePeriod::Day) }))
        }
    }
}

/// One model's share of a period's usage.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelUsageView {
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
}

/// Usage in one period, with the budget that applies and what is left.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReportView {
    pub period: BudgetPeriod,
    /// The UTC day (`2026-11-22`) or month (`2026-11`).
    pub period_start: String,
    /// When the period ends and a budget is whole again.
    pub resets_at: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub models: Vec<ModelUsageView>,
    /// Tokens allowed per `budget_period`; null for no budget.
    pub token_budget: Option<i64>,
    pub budget_period: Option<BudgetPeriod>,
    /// What is left of the budget now (requests under way count as spent).
    pub remaining_tokens: Option<i64>,
}

impl From<UsageReport> for UsageReportView {
    fn from(r: UsageReport) -> Self {
        let models: Vec<ModelUsageView> = r
            .models
            .iter()
            .map(|m| ModelUsageView {
                model: m.model.clone(),
                requests: m.requests,
                prompt_tokens: m.prompt_tokens,
                completion_tokens: m.completion_tokens,
                total_tokens: m.prompt_tokens + m.completion_tokens,
            })
            .collect();
        let sum = |f: fn(&ModelUsageView) -> i64| models.iter().map(f).sum::<i64>();
        Self {
            period: r.period.into(),
            period_start: r.period_key,
            resets_at: rfc3339(r.resets_at),
            requests: sum(|m| m.requests),
            prompt_tokens: sum(|m| m.prompt_tokens),
            completion_tokens: sum(|m| m.completion_tokens),
            total_tokens: sum(|m| m.total_tokens),
            token_budget: r.budget.map(|b| b.tokens),
            budget_period: r.budget.map(|b| b.period.into()),
            remaining_tokens: r.remaining,
            models,
        }
    }
}

/// `?period=day|month`, read as every query here is (`extract::query_map`:
/// a repeated key keeps its last value; a bad one is a 422 in our shape).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// `day` or `month`; the budget's period by default, else `day`.
    #[param(value_type = Option<BudgetPeriod>)]
    pub period: Option<String>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for UsageQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        let mut q = super::extract::query_map(parts)?;
        Ok(UsageQuery { period: q.remove("period") })
    }
}

impl UsageQuery {
    fn period(&self) -> ApiResult<Option<UsagePeriod>> {
        match self.period.as_deref() {
            None => Ok(None),
            Some(p) => UsagePeriod::parse(p)
                .map(Some)
                .ok_or_else(|| ApiError::invalid_field("validation_error", "period", "must be day or month")),
        }
    }
}

/// The caller's usage this day or month: totals, per model, budget and what is left.
#[utoipa::path(get, path = "/api/users/me/usage", tag = "users", security(("bearer" = [])), params(UsageQuery),
    responses((status = 200, body = UsageReportView), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn my_usage(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    q: UsageQuery,
) -> ApiResult<Json<UsageReportView>> {
    let subject = format!("user:{}", auth.user.id);
    let report = state.chat.quota.usage(&subject, q.period()?, auth.user.token_budget).await?;
    Ok(Json(report.into()))
}

/// A user's usage this day or month (admins).
#[utoipa::path(get, path = "/api/admin/users/{id}/usage", tag = "admin", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path), UsageQuery),
    responses((status = 200, body = UsageReportView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn user_usage(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    id: UuidPath,
    q: UsageQuery,
) -> ApiResult<Json<UsageReportView>> {
    auth.require(&[Role::Admin])?;
    let user = state.store.user_by_id(id.one()).await?.ok_or(ApiError::NotFound)?;
    let subject = format!("user:{}", user.id);
    let report = state.chat.quota.usage(&subject, q.period()?, user.token_budget).await?;
    Ok(Json(report.into()))
}
