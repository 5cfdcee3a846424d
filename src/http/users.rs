//! /api/users/me: read, update (display name, retention, password), delete with all data.

use std::sync::Arc;

use axum::{Json, extract::State, http::StatusCode};
use serde::Deserialize;
use utoipa::ToSchema;

use super::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{ApiJson, AuthUser, nullable, nullable_integer},
    views::{ErrorBody, UserView},
};
use crate::domain::{
    Validator,
    user::{DisplayName, Password, RetentionDays},
};

/// The current user.
#[utoipa::path(get, path = "/api/users/me", tag = "users", security(("bearer" = [])),
    responses((status = 200, body = UserView), (status = 401, body = ErrorBody)))]
pub async fn me(auth: AuthUser) -> Json<UserView> {
    Json(UserView::from(&auth.user))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateMeBody {
    /// null clears it.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(schema_with = super::docs::optional_display_name)]
    pub display_name: Option<Option<String>>,
    #[schema(min_length = 8, max_length = 128, pattern = r"^[^\u0000]*$")]
    pub password: Option<String>,
    /// Days an idle conversation is kept before it is deleted (the shorter
    /// of this and the server's `PALAVER_RETENTION_DAYS` applies); null clears it.
    #[serde(default, deserialize_with = "nullable_integer")]
    #[schema(schema_with = super::docs::optional_retention_days)]
    pub retention_days: Option<Option<i64>>,
    /// Required with `password`.
    pub current_password: Option<String>,
}

/// Change the display name, the own retention or the password (which revokes the other login sessions).
#[utoipa::path(patch, path = "/api/users/me", tag = "users", security(("bearer" = [])), request_body = UpdateMeBody,
    responses((status = 200, body = UserView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn update_me(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    ApiJson(body): ApiJson<UpdateMeBody>,
) -> ApiResult<Json<UserView>> {
    let mut v = Validator::new();
    let display_name = body.display_name.map(|d| v.check_opt("display_name", d, |s| DisplayName::parse(&s)));
    let retention = body.retention_days.map(|d| v.check_opt("retention_days", d, RetentionDays::parse));
    let password = v.check_opt("password", body.password, Password::parse).flatten();
    if password.is_some() && body.current_password.is_none() {
        v.error("current_password", "field required to change the password");
    }
    v.finish().map_err(ApiError::invalid)?;

    if let Some(new_password) = password {
        let current = body.current_password.unwrap_or_default();
        if !state.hasher.verify(&current, Some(&auth.user.password_hash)).await? {
            return Err(wrong_password());
        }
        let hash = state.hasher.hash(&new_password).await?;
        state.accounts.set_password_hash(&auth.user.id, &hash, &auth.session_id).await?;
    }
    if let Some(Some(name)) = display_name {
        state.accounts.set_display_name(&auth.user.id, name.map(DisplayName::into_inner).as_deref()).await?;
    }
    if let Some(Some(days)) = retention {
        state.accounts.set_retention_days(&auth.user.id, days.map(RetentionDays::days)).await?;
    }
    let user = state.store.user_by_id(&auth.user.id).await?.ok_or(ApiError::Unauthorized)?;
    Ok(Json(UserView::from(&user)))
}

fn wrong_password() -> ApiError {
    ApiError::forbidden("wrong_password", "The password is not correct.")
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct DeleteMeBody {
    pub password: String,
}

/// Delete the account and everything in it.
#[utoipa::path(delete, path = "/api/users/me", tag = "users", security(("bearer" = [])), request_body = DeleteMeBody,
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn delete_me(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    ApiJson(body): ApiJson<DeleteMeBody>,
) -> ApiResult<StatusCode> {
    if body.password.chars().count() > 128
        || !state.hasher.verify(&body.password, Some(&auth.user.password_hash)).await?
    {
        return Err(wrong_password());
    }
    state.accounts.delete_user(&auth.user.id).await?;
    Ok(StatusCode::NO_CONTENT)
}
