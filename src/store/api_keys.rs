//! API keys and the gateway's usage totals. A key is found by the SHA-256
//! of its secret, with its owner, in one query: revoking deletes the row and
//! deleting a user cascades. Every change to a key or a user bumps the
//! store's accounts epoch, which is what keeps cached keys honest
//! (`accounts::key_cache`).

use sqlx::{AssertSqlSafe, any::AnyRow};

use super::{Store, StoreResult, get, map_err, users::USER_COLUMNS};
use crate::store::UserRecord;

#[derive(Debug, Clone)]
pub struct ApiKeyRecord {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub prefix: String,
    /// The model ids the key may use; `None` for all.
    pub models: Option<Vec<String>>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    /// Tokens the key may spend per day or month; `None` for no limit.
    pub token_budget: Option<super::TokenBudget>,
    /// Requests per minute; `None` for no limit.
    pub rpm: Option<i64>,
}

impl ApiKeyRecord {
    pub(super) fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        let models: Option<String> = get(row, "k_models")?;
        let models =
            models.map(|m| serde_json::from_str(&m).map_err(|e| sqlx::Error::Decode(Box::new(e)))).transpose()?;
        Ok(Self {
            id: get(row, "k_id")?,
            user_id: get(row, "k_user_id")?,
            name: get(row, "k_name")?,
            prefix: get(row, "k_prefix")?,
            models,
            created_at: get(row, "k_created_at")?,
            expires_at: get(row, "k_expires_at")?,
            last_used_at: get(row, "k_last_used_at")?,
            token_budget: super::TokenBudget::from_columns(get(row, "k_token_budget")?, get(row, "k_budget_period")?),
            rpm: get(row, "k_rpm")?,
        })
    }

    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at.is_some_and(|at| at <= now_ms)
    }

    /// Whether the key may call `model` (a `provider/model` id).
    pub fn allows(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.iter().any(|allowed| allowed == model))
    }
}

pub struct NewApiKey<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub name: &'a str,
    pub prefix: &'a str,
    pub key_hash: &'a str,
    pub models: Option<&'a [String]>,
    pub expires_at: Option<i64>,
    pub now: i64,
}

/// One batch line of gateway usage.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ApiUsageKey {
    /// Empty for calls authenticated with an access token.
    pub key_id: String,
    pub user_id: String,
    pub model: String,
    pub day: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiUsageCounts {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

pub(super) const KEY_COLUMNS: &str = "k.id AS k_id, k.user_id AS k_user_id, k.name AS k_name, k.prefix AS k_prefix, \
     k.models AS k_models, k.created_at AS k_created_at, k.expires_at AS k_expires_at, \
     k.last_used_at AS k_last_used_at, k.token_budget AS k_token_budget, \
     k.budget_period AS k_budget_period, k.rpm AS k_rpm";

impl Store {
    pub async fn insert_api_key(&self, k: NewApiKey<'_>) -> StoreResult<ApiKeyRecord> {
        let models = k.models.map(|m| serde_json::to_string(m).expect("strings serialize"));
        sqlx::query(
            "INSERT INTO api_keys (id, user_id, name, prefix, key_hash, models, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(k.id)
        .bind(k.user_id)
        .bind(k.name)
        .bind(k.prefix)
        .bind(k.key_hash)
        .bind(models)
        .bind(k.now)
        .bind(k.expires_at)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(ApiKeyRecord {
            id: k.id.to_owned(),
            user_id: k.user_id.to_owned(),
            name: k.name.to_owned(),
            prefix: k.prefix.to_owned(),
            models: k.models.map(<[String]>::to_vec),
            created_at: k.now,
            expires_at: k.expires_at,
            last_used_at: None,
            token_budget: None,
            rpm: None,
        })
    }

    /// The user's keys, newest first.
    pub async fn list_api_keys(&self, user_id: &str) -> StoreResult<Vec<ApiKeyRecord>> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.user_id = $1 ORDER BY k.created_at DESC, k.id");
        let rows = sqlx::query(AssertSqlSafe(sql)).bind(user_id).fetch_all(&self.pool).await.map_err(map_err)?;
        rows.iter().map(ApiKeyRecord::from_row).collect::<Result<_, _>>().map_err(map_err)
    }

    /// Deletes one of the user's keys; false when there is no such key of theirs.
    pub async fn delete_api_key(&self, user_id: &str, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM api_keys WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(user_id)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        self.accounts_changed();
        Ok(done.rows_affected() > 0)
    }

    /// The key with this hash and its owner.
    pub async fn api_key_by_hash(&self, key_hash: &str) -> StoreResult<Option<(ApiKeyRecord, UserRecord)>> {
        let sql = format!(
            "SELECT {KEY_COLUMNS}, {USER_COLUMNS} FROM api_keys k JOIN users u ON u.id = k.user_id \
             WHERE k.key_hash = $1"
        );
        let row = sqlx::query(AssertSqlSafe(sql)).bind(key_hash).fetch_optional(&self.pool).await.map_err(map_err)?;
        row.map(|r| Ok((ApiKeyRecord::from_row(&r)?, UserRecord::from_row(&r)?))).transpose().map_err(map_err)
    }

    /// Stamps when keys were last used (batched by the caller).
    pub async fn touch_api_keys(&self, used: &[(String, i64)]) -> StoreResult<()> {
        for (id, at) in used {
            sqlx::query(
                "UPDATE api_keys SET last_used_at = $1 WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $1)",
            )
            .bind(*at)
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        }
        Ok(())
    }

    /// Adds a batch of gateway usage in one transaction.
    pub async fn add_api_usage(&self, batch: &[(ApiUsageKey, ApiUsageCounts)]) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        for (k, c) in batch {
            sqlx::query(
                "INSERT INTO api_usage (key_id, user_id, model, day, requests, prompt_tokens, completion_tokens) \
                 SELECT $1, $2, $3, $4, $5, $6, $7 WHERE EXISTS (SELECT 1 FROM users WHERE id = $2) \
                 ON CONFLICT (key_id, user_id, model, day) DO UPDATE SET \
                 requests = api_usage.requests + excluded.requests, \
                 prompt_tokens = api_usage.prompt_tokens + excluded.prompt_tokens, \
                 completion_tokens = api_usage.completion_tokens + excluded.completion_tokens",
            )
            .bind(k.key_id.as_str())
            .bind(k.user_id.as_str())
            .bind(k.model.as_str())
            .bind(k.day.as_str())
            .bind(c.requests)
            .bind(c.prompt_tokens)
            .bind(c.completion_tokens)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)
    }

    /// The gateway usage of a user, for tests and reports.
    pub async fn api_usage_of(&self, user_id: &str) -> StoreResult<Vec<(ApiUsageKey, ApiUsageCounts)>> {
        let rows = sqlx::query(
            "SELECT key_id, user_id, model, day, requests, prompt_tokens, completion_tokens FROM api_usage \
             WHERE user_id = $1 ORDER BY day, model, key_id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                Ok((
                    ApiUsageKey {
                        key_id: get(r, "key_id")?,
                        user_id: get(r, "user_id")?,
                        model: get(r, "model")?,
                        day: get(r, "day")?,
                    },
                    ApiUsageCounts {
                        requests: get(r, "requests")?,
                        prompt_tokens: get(r, "prompt_tokens")?,
                        completion_tokens: get(r, "completion_tokens")?,
                    },
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(map_err)
    }
}
