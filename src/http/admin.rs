//! /api/admin/users: user management for admins. Nobody changes their own
//! role or disabled flag, so no one can raise themselves or lock out the
//! last admin by accident.

use std::sync::Arc;

use axum::{Json, extract::State};
use serde::Deserialize;
use utoipa::ToSchema;

use super::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{ApiJson, AuthUser, PageQuery, Pagination, UuidPath, nullable_integer},
    usage::budget_change,
    views::{AdminUserView, BudgetPeriod, ErrorBody, Page},
};
use crate::domain::{Validator, user::Role};

/// Every account, oldest first.
#[utoipa::path(get, path = "/api/admin/users", tag = "admin", security(("bearer" = [])),
    params(PageQuery),
    responses((status = 200, body = Page<AdminUserView>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list_users(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    page: Pagination,
) -> ApiResult<Json<Page<AdminUserView>>> {
    auth.require(&[Role::Admin])?;
    let (users, total) = state.store.list_users(page.per_page, page.offset()).await?;
    Ok(Json(Page {
        items: users.iter().map(AdminUserView::from).collect(),
        page: page.page,
        per_page: page.per_page,
        total,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateUserBody {
    #[schema(value_type = Option<Role>)]
    pub role: Option<String>,
    /// A disabled user cannot log in and their live tokens stop working.
    pub disabled: Option<bool>,
    /// Tokens per `budget_period`, 0 or more; null removes the budget.
    #[serde(default, deserialize_with = "nullable_integer")]
    #[schema(value_type = Option<i64>, minimum = 0)]
    pub token_budget: Option<Option<i64>>,
    /// `day` (the default) or `month`.
    pub budget_period: Option<BudgetPeriod>,
}

/// Change a user's role, disable them, or set their token budget.
#[utoipa::path(patch, path = "/api/admin/users/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path)), request_body = UpdateUserBody,
    responses((status = 200, body = AdminUserView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update_user(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    id: UuidPath,
    ApiJson(body): ApiJson<UpdateUserBody>,
) -> ApiResult<Json<AdminUserView>> {
    auth.require(&[Role::Admin])?;
    let mut v = Validator::new();
    let role = v.check_opt("role", body.role, |r| r.parse::<Role>()).flatten();
    let current = state.store.user_by_id(id.one()).await?.ok_or(ApiError::NotFound)?;
    let budget = budget_change(&mut v, body.token_budget, body.budget_period, current.token_budget);
    v.finish().map_err(ApiError::invalid)?;
    if id.one() == auth.user.id && (role.is_some() || body.disabled.is_some()) {
        return Err(ApiError::forbidden("cannot_modify_self", "You cannot change your own role or disable yourself."));
    }
    let mut user = state.accounts.update_user_admin(id.one(), role, body.disabled).await?.ok_or(ApiError::NotFound)?;
    if let Some(budget) = budget {
        user = state.accounts.set_user_budget(id.one(), budget).await?;
    }
    Ok(Json(AdminUserView::from(&user)))
}
