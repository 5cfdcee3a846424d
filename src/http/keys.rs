//! /api/keys: the caller's API keys (`pk_…`) for `/v1` and `/api`.

use std::sync::Arc;

use axum::{Json, extract::State, http::StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    AppState,
    docs::ModelIdSchema,
    error::{ApiError, ApiResult},
    extract::{ApiJson, AuthUser, UuidPath, nullable_integer},
    usage::{UsageReportView, budget_change},
    views::{BudgetPeriod, ErrorBody, Items},
};
use crate::{
    clock::rfc3339,
    domain::{
        Validator,
        validation::{char_len, check_len},
    },
    store::ApiKeyRecord,
};

/// The most models one key may be limited to.
const MAX_KEY_MODELS: usize = 100;

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateKeyBody {
    /// 1–100 characters, not all blank.
    #[schema(min_length = 1, max_length = 100, pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$")]
    pub name: String,
    /// RFC 3339, in the future; the key stops working then. Absent or null: never.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<String>,
    /// Model ids (`provider/model`) the key may use. Absent or null: all.
    #[serde(default)]
    #[schema(value_type = Option<Vec<ModelIdSchema>>, min_items = 1, max_items = 100)]
    pub models: Option<Vec<String>>,
}

/// A key as listed: never its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    #[schema(format = Uuid)]
    pub id: String,
    pub name: String,
    /// The key's first characters, to tell keys apart.
    pub prefix: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub last_used_at: Option<String>,
    pub models: Option<Vec<String>>,
    /// Tokens the key may spend per `budget_period`; null for no budget.
    pub token_budget: Option<i64>,
    pub budget_period: Option<BudgetPeriod>,
    /// Requests per minute; null for no limit.
    pub rpm: Option<i64>,
    /// The key's usage this period (its budget's, else the day).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageReportView>,
}

impl From<&ApiKeyRecord> for KeyView {
    fn from(k: &ApiKeyRecord) -> Self {
        Self {
            id: k.id.clone(),
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            created_at: rfc3339(k.created_at),
            expires_at: k.expires_at.map(rfc3339),
            last_used_at: k.last_used_at.map(rfc3339),
            models: k.models.clone(),
            token_budget: k.token_budget.map(|b| b.tokens),
            budget_period: k.token_budget.map(|b| b.period.into()),
            rpm: k.rpm,
            usage: None,
        }
    }
}

/// A new key, with its secret shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKeyView {
    #[schema(format = Uuid)]
    pub id: String,
    pub name: String,
    /// The secret: `Authorization: Bearer pk_…`. Not shown again.
    pub key: String,
    pub prefix: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub models: Option<Vec<String>>,
}

/// Create an API key.
#[utoipa::path(post, path = "/api/keys", tag = "keys", operation_id = "create_key", security(("bearer" = [])), request_body = CreateKeyBody,
    responses((status = 201, body = CreatedKeyView), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    ApiJson(body): ApiJson<CreateKeyBody>,
) -> ApiResult<(StatusCode, Json<CreatedKeyView>)> {
    let now = state.clock.now_ms();
    let mut v = Validator::new();
    let name = body.name.trim().to_owned();
    v.check("name", check_len(&name, 1, 100));
    let expires_at = v
        .check_opt("expires_at", body.expires_at, |s| {
            let at = time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                .map_err(|_| "must be an RFC 3339 time, e.g. 2030-01-01T00:00:00Z".to_owned())?;
            let ms = i64::try_from(at.unix_timestamp_nanos() / 1_000_000).map_err(|_| "is out of range".to_owned())?;
            if ms <= now { Err("must be in the future".to_owned()) } else { Ok(ms) }
        })
        .flatten();
    let models = v
        .check_opt("models", body.models, |models| {
            if models.is_empty() {
                return Err("must name at least one model (leave it out to allow all)".into());
            }
            if models.len() > MAX_KEY_MODELS {
                return Err(format!("may name at most {MAX_KEY_MODELS} models"));
            }
            let mut ids: Vec<String> = Vec::with_capacity(models.len());
            for m in models {
                if char_len(&m) > 200 {
                    return Err("names a model id longer than 200 characters".into());
                }
                let id = state.providers.validate_model(&m).map_err(|e| format!("`{m}`: {e}"))?.to_string();
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            Ok(ids)
        })
        .flatten();
    v.finish().map_err(ApiError::invalid)?;
    let created = state.accounts.create_key(&auth.user.id, &name, expires_at, models.as_deref()).await?;
    let k = created.record;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKeyView {
            id: k.id,
            name: k.name,
            key: created.key,
            prefix: k.prefix,
            created_at: rfc3339(k.created_at),
            expires_at: k.expires_at.map(rfc3339),
            models: k.models,
        }),
    ))
}

/// The caller's keys, newest first, without their secrets.
#[utoipa::path(get, path = "/api/keys", tag = "keys", operation_id = "list_keys", security(("bearer" = [])),
    responses((status = 200, body = Items<KeyView>), (status = 401, body = ErrorBody)))]
pub async fn list(State(state): State<Arc<AppState>>, auth: AuthUser) -> ApiResult<Json<Items<KeyView>>> {
    let keys = state.accounts.keys(&auth.user.id).await?;
    let mut items = Vec::with_capacity(keys.len());
    for k in &keys {
        items.push(with_usage(&state, k).await?);
    }
    Ok(Json(Items { items }))
}

async fn with_usage(state: &AppState, k: &ApiKeyRecord) -> ApiResult<KeyView> {
    let report = state.chat.quota.usage(&format!("key:{}", k.id), None, k.token_budget).await?;
    Ok(KeyView { usage: Some(report.into()), ..KeyView::from(k) })
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateKeyBody {
    /// Tokens per `budget_period`, 0 or more; null removes the budget.
    #[serde(default, deserialize_with = "nullable_integer")]
    #[schema(value_type = Option<i64>, minimum = 0)]
    pub token_budget: Option<Option<i64>>,
    /// `day` (the default) or `month`.
    pub budget_period: Option<BudgetPeriod>,
    /// Requests per minute, 1 or more; null removes the limit.
    #[serde(default, deserialize_with = "nullable_integer")]
    #[schema(value_type = Option<i64>, minimum = 1)]
    pub rpm: Option<Option<i64>>,
}

/// Set a key's token budget and rate limit (its owner or an admin).
#[utoipa::path(patch, path = "/api/keys/{id}", tag = "keys", operation_id = "update_key", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path, description = "Key id")), request_body = UpdateKeyBody,
    responses((status = 200, body = KeyView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn update(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    id: UuidPath,
    ApiJson(body): ApiJson<UpdateKeyBody>,
) -> ApiResult<Json<KeyView>> {
    let key = state.accounts.key_for(&auth.user, id.one()).await?;
    let mut v = Validator::new();
    let budget = budget_change(&mut v, body.token_budget, body.budget_period, key.token_budget);
    if let Some(Some(rpm)) = body.rpm
        && rpm < 1
    {
        v.error("rpm", "must be 1 or more (null removes the limit)");
    }
    v.finish().map_err(ApiError::invalid)?;
    let budget = budget.unwrap_or(key.token_budget);
    let rpm = body.rpm.unwrap_or(key.rpm);
    let key = state.accounts.set_key_limits(&key, budget, rpm).await?;
    Ok(Json(with_usage(&state, &key).await?))
}

/// Revoke a key: it stops working at once, on every instance.
#[utoipa::path(delete, path = "/api/keys/{id}", tag = "keys", operation_id = "revoke_key", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path, description = "Key id")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn revoke(State(state): State<Arc<AppState>>, auth: AuthUser, id: UuidPath) -> ApiResult<StatusCode> {
    state.accounts.revoke_key(&auth.user.id, id.one()).await?;
    Ok(StatusCode::NO_CONTENT)
}
