//! Users: accounts, roles, the disabled flag, and account deletion.

use sqlx::{AssertSqlSafe, any::AnyRow};

use super::{SUPPORT_USER_ID, Store, StoreError, StoreResult, get, map_err, parse_col};
use crate::domain::user::Role;

#[derive(Debug, Clone)]
pub struct UserRecord {
    pub id: String,
    pub email: Option<String>,
    pub username: Option<String>,
    pub display_name: Option<String>,
    pub password_hash: String,
    pub role: Role,
    pub disabled_at: Option<i64>,
    pub created_at: i64,
    /// The user's own retention in days (conversations idle longer are deleted).
    pub retention_days: Option<i64>,
    /// Tokens the user may spend per day or month; `None` for no limit.
    pub token_budget: Option<super::TokenBudget>,
}

impl UserRecord {
    pub fn is_disabled(&self) -> bool {
        self.disabled_at.is_some()
    }

    pub(super) fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: get(row, "id")?,
            email: get(row, "email")?,
            username: get(row, "username")?,
            display_name: get(row, "display_name")?,
            password_hash: get(row, "password_hash")?,
            role: parse_col(row, "role")?,
            disabled_at: get(row, "disabled_at")?,
            created_at: get(row, "created_at")?,
            retention_days: get(row, "retention_days")?,
            token_budget: super::TokenBudget::from_columns(get(row, "token_budget")?, get(row, "budget_period")?),
        })
    }
}

pub struct NewUser<'a> {
    pub id: &'a str,
    pub email: Option<&'a str>,
    pub username: Option<&'a str>,
    pub display_name: Option<&'a str>,
    pub password_hash: &'a str,
    pub role: Role,
    pub now: i64,
}

pub(super) const USER_COLUMNS: &str = "u.id, u.email, u.username, u.display_name, u.password_hash, u.role, u.disabled_at, u.created_at, \
     u.retention_days, u.token_budget, u.budget_period";

impl Store {
    /// Inserts a user; `Conflict("email")` / `Conflict("username")` when taken.
    pub async fn insert_user(&self, u: NewUser<'_>) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO users (id, email, username, username_key, display_name, password_hash, role, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
        )
        .bind(u.id)
        .bind(u.email)
        .bind(u.username)
        .bind(u.username.map(str::to_ascii_lowercase))
        .bind(u.display_name)
        .bind(u.password_hash)
        .bind(u.role.as_str())
        .bind(u.now)
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::classify(e, &["email", "username"]))?;
        Ok(())
    }

    /// A user by id; the built-in support account is nobody's to see.
    pub async fn user_by_id(&self, id: &str) -> StoreResult<Option<UserRecord>> {
        if id == SUPPORT_USER_ID {
            return Ok(None);
        }
        let sql = format!("SELECT {USER_COLUMNS} FROM users u WHERE u.id = $1");
        let row = sqlx::query(AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await.map_err(map_err)?;
        row.map(|r| UserRecord::from_row(&r)).transpose().map_err(map_err)
    }

    /// Finds a user by email (case-insensitive) or username (case-insensitive).
    pub async fn user_by_login(&self, login: &str) -> StoreResult<Option<UserRecord>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users u WHERE u.email = $1 OR u.username_key = $1 LIMIT 1");
        let key = login.trim().to_lowercase();
        let row = sqlx::query(AssertSqlSafe(sql)).bind(key).fetch_optional(&self.pool).await.map_err(map_err)?;
        row.map(|r| UserRecord::from_row(&r)).transpose().map_err(map_err)
    }

    pub async fn set_display_name(&self, id: &str, name: Option<&str>, now: i64) -> StoreResult<()> {
        sqlx::query("UPDATE users SET display_name = $1, updated_at = $2 WHERE id = $3")
            .bind(name)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        self.accounts_changed();
        Ok(())
    }

    /// Sets (or, with `None`, clears) the user's own retention.
    pub async fn set_retention_days(&self, id: &str, days: Option<i64>, now: i64) -> StoreResult<()> {
        sqlx::query("UPDATE users SET retention_days = $1, updated_at = $2 WHERE id = $3")
            .bind(days)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        self.accounts_changed();
        Ok(())
    }

    pub async fn set_password_hash(&self, id: &str, hash: &str, now: i64) -> StoreResult<()> {
        sqlx::query("UPDATE users SET password_hash = $1, updated_at = $2 WHERE id = $3")
            .bind(hash)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        self.accounts_changed();
        Ok(())
    }

    /// Sets role and/or the disabled time; `None` leaves a field as it is.
    pub async fn update_user_admin(
        &self,
        id: &str,
        role: Option<Role>,
        disabled: Option<bool>,
        now: i64,
    ) -> StoreResult<Option<UserRecord>> {
        let Some(user) = self.user_by_id(id).await? else { return Ok(None) };
        let role = role.unwrap_or(user.role);
        let disabled_at = match disabled {
            Some(true) => user.disabled_at.or(Some(now)),
            Some(false) => None,
            None => user.disabled_at,
        };
        sqlx::query("UPDATE users SET role = $1, disabled_at = $2, updated_at = $3 WHERE id = $4")
            .bind(role.as_str())
            .bind(disabled_at)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        self.accounts_changed();
        self.user_by_id(id).await
    }

    /// A page of users, oldest first, and the total count.
    pub async fn list_users(&self, limit: i64, offset: i64) -> StoreResult<(Vec<UserRecord>, i64)> {
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM users u WHERE u.id <> '{SUPPORT_USER_ID}' ORDER BY u.created_at, u.id LIMIT $1 OFFSET $2"
        );
        let rows =
            sqlx::query(AssertSqlSafe(sql)).bind(limit).bind(offset).fetch_all(&self.pool).await.map_err(map_err)?;
        let users = rows.iter().map(UserRecord::from_row).collect::<Result<Vec<_>, _>>().map_err(map_err)?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE id <> $1")
            .bind(SUPPORT_USER_ID)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        Ok((users, total))
    }

    /// Deletes the user; their sessions, conversations, messages and keys go
    /// with them (foreign keys cascade), and so do the budget counters and
    /// usage kept for them and their keys (named by subject, not by key).
    pub async fn delete_user(&self, id: &str) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        for table in ["quota_usage", "quota_counters", "quota_reservations"] {
            let sql = format!(
                "DELETE FROM {table} WHERE subject = 'user:' || $1 \
                 OR subject IN (SELECT 'key:' || id FROM api_keys WHERE user_id = $1)"
            );
            sqlx::query(AssertSqlSafe(sql)).bind(id).execute(&mut *tx).await.map_err(map_err)?;
        }
        let done = sqlx::query("DELETE FROM users WHERE id = $1").bind(id).execute(&mut *tx).await.map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        self.accounts_changed();
        Ok(done.rows_affected() > 0)
    }
}
