//! Budgets and their bookkeeping: setting a user's or a key's limits, the
//! database's reservations (used when there is no Redis), and settled usage
//! per subject, period and model for the usage endpoints.
//!
//! A reservation is taken by one conditional UPDATE of the subject's counter
//! row (`used + reserved + tokens <= budget`): the row lock makes concurrent
//! reservations, on any number of instances, see each other.

use sqlx::AssertSqlSafe;

use super::{ApiKeyRecord, Store, StoreResult, TokenBudget, get, map_err};

/// The answer of a reservation: granted or not, and the counter after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    pub granted: bool,
    pub used: i64,
    /// Held by requests under way (this one included when granted).
    pub reserved: i64,
}

/// Where gathered usage is added: a subject's period (`2026-11-22`,
/// `2026-11`), and the user it belongs to (the key's owner for a key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubjectUsageKey {
    pub subject: String,
    pub period: String,
    pub owner: String,
}

/// Settled usage of one model in a period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectUsage {
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

fn budget_columns(b: Option<TokenBudget>) -> (Option<i64>, Option<&'static str>) {
    (b.map(|b| b.tokens), b.map(|b| b.period.as_str()))
}

impl Store {
    /// Sets (or with `None` removes) a user's token budget.
    pub async fn set_user_budget(&self, id: &str, budget: Option<TokenBudget>, now: i64) -> StoreResult<bool> {
        let (tokens, period) = budget_columns(budget);
        let done = sqlx::query("UPDATE users SET token_budget = $1, budget_period = $2, updated_at = $3 WHERE id = $4")
            .bind(tokens)
            .bind(period)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        self.accounts_changed();
        Ok(done.rows_affected() > 0)
    }

    /// A key by id, whoever owns it.
    pub async fn api_key(&self, id: &str) -> StoreResult<Option<ApiKeyRecord>> {
        let sql = format!("SELECT {} FROM api_keys k WHERE k.id = $1", super::api_keys::KEY_COLUMNS);
        let row = sqlx::query(AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await.map_err(map_err)?;
        row.map(|r| ApiKeyRecord::from_row(&r)).transpose().map_err(map_err)
    }

    /// Sets a key's budget and requests per minute.
    pub async fn set_key_limits(&self, id: &str, budget: Option<TokenBudget>, rpm: Option<i64>) -> StoreResult<()> {
        let (tokens, period) = budget_columns(budget);
        sqlx::query("UPDATE api_keys SET token_budget = $1, budget_period = $2, rpm = $3 WHERE id = $4")
            .bind(tokens)
            .bind(period)
            .bind(rpm)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        self.accounts_changed();
        Ok(())
    }

    /// Reserves `tokens` of `subject`'s `budget` in `period` if they fit,
    /// first giving back the subject's expired reservations.
    pub async fn reserve_tokens(
        &self,
        subject: &str,
        period: &str,
        budget: i64,
        reservation: (&str, i64),
        expires_at: i64,
        now: i64,
    ) -> StoreResult<Reserved> {
        let (id, tokens) = reservation;
        let mut tx = self.begin_write().await?;
        let expired = sqlx::query(
            "DELETE FROM quota_reservations WHERE subject = $1 AND expires_at <= $2 RETURNING period, tokens",
        )
        .bind(subject)
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        for row in &expired {
            let p: String = get(row, "period").map_err(map_err)?;
            let t: i64 = get(row, "tokens").map_err(map_err)?;
            sqlx::query("UPDATE quota_counters SET reserved = reserved - $1 WHERE subject = $2 AND period = $3")
                .bind(t)
                .bind(subject)
                .bind(p)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        sqlx::query(
            "INSERT INTO quota_counters (subject, period, used, reserved) VALUES ($1, $2, 0, 0) \
             ON CONFLICT (subject, period) DO NOTHING",
        )
        .bind(subject)
        .bind(period)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let taken = sqlx::query(
            "UPDATE quota_counters SET reserved = reserved + $1 \
             WHERE subject = $2 AND period = $3 AND used + reserved + $1 <= $4",
        )
        .bind(tokens)
        .bind(subject)
        .bind(period)
        .bind(budget)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let granted = taken.rows_affected() > 0;
        if granted {
            sqlx::query(
                "INSERT INTO quota_reservations (id, subject, period, tokens, expires_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(subject)
            .bind(period)
            .bind(tokens)
            .bind(expires_at)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        let row = sqlx::query("SELECT used, reserved FROM quota_counters WHERE subject = $1 AND period = $2")
            .bind(subject)
            .bind(period)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        let counted = Reserved {
            granted,
            used: get(&row, "used").map_err(map_err)?,
            reserved: get(&row, "reserved").map_err(map_err)?,
        };
        tx.commit().await.map_err(map_err)?;
        Ok(counted)
    }

    /// Turns a reservation into `actual` spent tokens (or, with `reservation`
    /// `None` or already expired, adds them): what Redis counts is kept here
    /// too, so a Redis that lost its data starts again from it.
    pub async fn settle_tokens(
        &self,
        subject: &str,
        period: &str,
        reservation: Option<&str>,
        actual: i64,
    ) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        let held: i64 = match reservation {
            Some(id) => {
                let rows = sqlx::query("DELETE FROM quota_reservations WHERE id = $1 RETURNING tokens")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(map_err)?;
                rows.first().map(|r| get(r, "tokens")).transpose().map_err(map_err)?.unwrap_or(0)
            }
            None => 0,
        };
        sqlx::query(
            "INSERT INTO quota_counters (subject, period, used, reserved) VALUES ($1, $2, $3, 0) \
             ON CONFLICT (subject, period) DO UPDATE SET used = quota_counters.used + excluded.used, \
             reserved = quota_counters.reserved - $4",
        )
        .bind(subject)
        .bind(period)
        .bind(actual)
        .bind(held)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await.map_err(map_err)
    }

    /// What `subject` has spent in `period` (settled).
    pub async fn tokens_used(&self, subject: &str, period: &str) -> StoreResult<i64> {
        let used: Option<i64> =
            sqlx::query_scalar("SELECT used FROM quota_counters WHERE subject = $1 AND period = $2")
                .bind(subject)
                .bind(period)
                .fetch_optional(&self.pool)
                .await
                .map_err(map_err)?;
        Ok(used.unwrap_or(0))
    }

    /// Adds a batch of gathered usage (`Quota::flush_usage`), in one
    /// transaction. A row whose owner was deleted meanwhile is not written.
    pub async fn add_subject_usage(&self, batch: &[(SubjectUsageKey, SubjectUsage)]) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        for (k, u) in batch {
            sqlx::query(
                "INSERT INTO quota_usage (subject, period, model, requests, prompt_tokens, completion_tokens) \
                 SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM users WHERE id = $7) \
                 ON CONFLICT (subject, period, model) DO UPDATE SET \
                 requests = quota_usage.requests + excluded.requests, \
                 prompt_tokens = quota_usage.prompt_tokens + excluded.prompt_tokens, \
                 completion_tokens = quota_usage.completion_tokens + excluded.completion_tokens",
            )
            .bind(k.subject.as_str())
            .bind(k.period.as_str())
            .bind(u.model.as_str())
            .bind(u.requests)
            .bind(u.prompt_tokens)
            .bind(u.completion_tokens)
            .bind(k.owner.as_str())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)
    }

    /// `subject`'s usage in the period with this key, by model.
    pub async fn subject_usage(&self, subject: &str, period: &str) -> StoreResult<Vec<SubjectUsage>> {
        let rows = sqlx::query(
            "SELECT model, requests, prompt_tokens, completion_tokens FROM quota_usage \
             WHERE subject = $1 AND period = $2 ORDER BY model",
        )
        .bind(subject)
        .bind(period)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                Ok(SubjectUsage {
                    model: get(r, "model")?,
                    requests: get(r, "requests")?,
                    prompt_tokens: get(r, "prompt_tokens")?,
                    completion_tokens: get(r, "completion_tokens")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(map_err)
    }
}
