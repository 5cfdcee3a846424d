//! Login sessions and their refresh tokens. Access tokens name a login
//! session, so revoking the session (logout, password change, reuse of a
//! dead refresh token) ends every credential of it at once.

use sqlx::{AssertSqlSafe, any::AnyRow};

use super::{Store, StoreResult, UserRecord, get, map_err, users::USER_COLUMNS};

#[derive(Debug, Clone)]
pub struct LoginSessionRecord {
    pub id: String,
    pub user_id: String,
    pub user_agent: Option<String>,
    pub created_at: i64,
    pub last_used_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

impl LoginSessionRecord {
    fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: get(row, "s_id")?,
            user_id: get(row, "s_user_id")?,
            user_agent: get(row, "s_user_agent")?,
            created_at: get(row, "s_created_at")?,
            last_used_at: get(row, "s_last_used_at")?,
            expires_at: get(row, "s_expires_at")?,
            revoked_at: get(row, "s_revoked_at")?,
        })
    }

    pub fn is_live(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at > now
    }
}

/// A login session together with its user, as the auth check needs them.
#[derive(Debug, Clone)]
pub struct SessionAuth {
    pub session: LoginSessionRecord,
    pub user: UserRecord,
}

impl SessionAuth {
    /// Live session of an enabled user.
    pub fn is_valid(&self, now: i64) -> bool {
        self.session.is_live(now) && !self.user.is_disabled()
    }
}

pub struct NewLoginSession<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub cookie_hash: &'a str,
    pub user_agent: Option<&'a str>,
    pub refresh_hash: &'a str,
    pub now: i64,
    pub expires_at: i64,
}

#[derive(Debug)]
pub enum RefreshOutcome {
    /// The token was live; it is now used and its successor is stored.
    Rotated(Box<SessionAuth>),
    /// The token had been used before: its session is now revoked.
    Reused,
    /// Unknown, expired, or its session/user is no longer valid.
    Invalid,
}

const SESSION_COLUMNS: &str = "s.id AS s_id, s.user_id AS s_user_id, s.user_agent AS s_user_agent, \
     s.created_at AS s_created_at, s.last_used_at AS s_last_used_at, s.expires_at AS s_expires_at, \
     s.revoked_at AS s_revoked_at";

/// Sessions are touched at most this often, so a busy client does not turn
/// every read into a write.
const TOUCH_INTERVAL_MS: i64 = 60_000;

impl Store {
    /// Creates a login session with its first refresh token, atomically.
    pub async fn create_login_session(&self, s: NewLoginSession<'_>) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO login_sessions (id, user_id, cookie_hash, user_agent, created_at, last_used_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $5, $6)",
        )
        .bind(s.id)
        .bind(s.user_id)
        .bind(s.cookie_hash)
        .bind(s.user_agent)
        .bind(s.now)
        .bind(s.expires_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(s.refresh_hash)
        .bind(s.id)
        .bind(s.now)
        .bind(s.expires_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(())
    }

    async fn session_auth_where(&self, clause: &str, value: &str) -> StoreResult<Option<SessionAuth>> {
        let sql = format!(
            "SELECT {SESSION_COLUMNS}, {USER_COLUMNS} FROM login_sessions s JOIN users u ON u.id = s.user_id WHERE {clause}"
        );
        let row = sqlx::query(AssertSqlSafe(sql)).bind(value).fetch_optional(&self.pool).await.map_err(map_err)?;
        row.map(|r| -> Result<SessionAuth, sqlx::Error> {
            Ok(SessionAuth { session: LoginSessionRecord::from_row(&r)?, user: UserRecord::from_row(&r)? })
        })
        .transpose()
        .map_err(map_err)
    }

    pub async fn session_auth_by_id(&self, session_id: &str) -> StoreResult<Option<SessionAuth>> {
        self.session_auth_where("s.id = $1", session_id).await
    }

    pub async fn session_auth_by_cookie(&self, cookie_hash: &str) -> StoreResult<Option<SessionAuth>> {
        self.session_auth_where("s.cookie_hash = $1", cookie_hash).await
    }

    /// Records use of a session, at most once a minute; true when it wrote.
    pub async fn touch_session(&self, session: &LoginSessionRecord, now: i64) -> StoreResult<bool> {
        if now - session.last_used_at < TOUCH_INTERVAL_MS {
            return Ok(false);
        }
        sqlx::query("UPDATE login_sessions SET last_used_at = $1 WHERE id = $2 AND last_used_at < $1")
            .bind(now)
            .bind(&session.id)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(true)
    }

    /// Uses up a refresh token and stores its successor. Presenting a token
    /// that was already used revokes its whole session (the token leaked, or
    /// a thief raced the owner).
    pub async fn rotate_refresh_token(&self, old_hash: &str, new_hash: &str, now: i64) -> StoreResult<RefreshOutcome> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query("SELECT session_id, used_at, expires_at FROM refresh_tokens WHERE token_hash = $1")
            .bind(old_hash)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
        let Some(row) = row else { return Ok(RefreshOutcome::Invalid) };
        let session_id: String = get(&row, "session_id").map_err(map_err)?;
        let used_at: Option<i64> = get(&row, "used_at").map_err(map_err)?;
        let expires_at: i64 = get(&row, "expires_at").map_err(map_err)?;

        let claimed = used_at.is_none()
            && sqlx::query("UPDATE refresh_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL")
                .bind(now)
                .bind(old_hash)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?
                .rows_affected()
                == 1;
        if !claimed {
            sqlx::query("UPDATE login_sessions SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now)
                .bind(&session_id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            tx.commit().await.map_err(map_err)?;
            self.accounts_changed();
            return Ok(RefreshOutcome::Reused);
        }
        if expires_at <= now {
            return Ok(RefreshOutcome::Invalid);
        }
        // Read in the transaction: whoever claimed the token answers for
        // the session as it was, even if a concurrent reuse revokes it next.
        let sql = format!(
            "SELECT {SESSION_COLUMNS}, {USER_COLUMNS} FROM login_sessions s JOIN users u ON u.id = s.user_id WHERE s.id = $1"
        );
        let row = sqlx::query(AssertSqlSafe(sql)).bind(&session_id).fetch_one(&mut *tx).await.map_err(map_err)?;
        let auth = (|| -> Result<SessionAuth, sqlx::Error> {
            Ok(SessionAuth { session: LoginSessionRecord::from_row(&row)?, user: UserRecord::from_row(&row)? })
        })()
        .map_err(map_err)?;
        if !auth.is_valid(now) {
            return Ok(RefreshOutcome::Invalid);
        }
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(new_hash)
        .bind(&session_id)
        .bind(now)
        .bind(auth.session.expires_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        sqlx::query("UPDATE login_sessions SET last_used_at = $1 WHERE id = $2")
            .bind(now)
            .bind(&session_id)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(RefreshOutcome::Rotated(Box::new(auth)))
    }

    /// Revokes one session of `user_id`; false when there is no such live session.
    pub async fn revoke_session(&self, session_id: &str, user_id: &str, now: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE login_sessions SET revoked_at = $1 WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL AND expires_at > $1",
        )
        .bind(now)
        .bind(session_id)
        .bind(user_id)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        self.accounts_changed();
        Ok(done.rows_affected() > 0)
    }

    /// Revokes every session of the user except `keep`.
    pub async fn revoke_other_sessions(&self, user_id: &str, keep: &str, now: i64) -> StoreResult<()> {
        sqlx::query("UPDATE login_sessions SET revoked_at = $1 WHERE user_id = $2 AND id <> $3 AND revoked_at IS NULL")
            .bind(now)
            .bind(user_id)
            .bind(keep)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        self.accounts_changed();
        Ok(())
    }

    /// The user's live sessions, most recently used first.
    pub async fn list_live_sessions(&self, user_id: &str, now: i64) -> StoreResult<Vec<LoginSessionRecord>> {
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM login_sessions s WHERE s.user_id = $1 AND s.revoked_at IS NULL \
             AND s.expires_at > $2 ORDER BY s.last_used_at DESC, s.id"
        );
        let rows =
            sqlx::query(AssertSqlSafe(sql)).bind(user_id).bind(now).fetch_all(&self.pool).await.map_err(map_err)?;
        rows.iter().map(LoginSessionRecord::from_row).collect::<Result<_, _>>().map_err(map_err)
    }
}
