//! Retention: finding the conversations and closed support sessions whose
//! time is up, deleting them a batch of rows at a time (so no statement
//! holds the write lock for long), and the leases that let one instance of
//! several do such a job.

use sqlx::AssertSqlSafe;

use super::{SUPPORT_USER_ID, Store, StoreResult, get, map_err};

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// A conversation whose time is up: it may be deleted while it has had no
/// activity since `cutoff`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueConversation {
    pub id: String,
    pub cutoff: i64,
}

impl Store {
    /// Up to `limit` of the users' conversations with no activity for
    /// `server_days` (when set) or for their owner's own retention. The
    /// support desk's conversations are not among them: closed sessions
    /// have a retention of their own.
    pub async fn conversations_due(
        &self,
        server_days: Option<i64>,
        now: i64,
        limit: i64,
    ) -> StoreResult<Vec<DueConversation>> {
        let server_cutoff = server_days.map_or(i64::MIN, |d| now - d * DAY_MS);
        // Only constants are formatted in; every value is bound.
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT id, CAST($1 AS BIGINT) AS cutoff FROM conversations \
             WHERE updated_at < $1 AND user_id <> '{SUPPORT_USER_ID}' \
             UNION ALL \
             SELECT c.id, CAST($2 - u.retention_days * {DAY_MS} AS BIGINT) AS cutoff \
             FROM users u JOIN conversations c ON c.user_id = u.id \
             WHERE u.retention_days IS NOT NULL AND c.updated_at < $2 - u.retention_days * {DAY_MS} \
             LIMIT $3"
        )))
        .bind(server_cutoff)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let mut due: Vec<DueConversation> = Vec::with_capacity(rows.len());
        for row in &rows {
            let (id, cutoff): (String, i64) = (get(row, "id")?, get(row, "cutoff")?);
            // Due under both rules: the later cutoff is the one that holds.
            match due.iter_mut().find(|d| d.id == id) {
                Some(d) => d.cutoff = d.cutoff.max(cutoff),
                None => due.push(DueConversation { id, cutoff }),
            }
        }
        Ok(due)
    }

    /// Deletes a conversation that is still due, `batch` messages per
    /// statement and then the conversation itself. Activity after `cutoff`
    /// stops it between two batches (what was deleted by then was due).
    /// True when the conversation is gone.
    pub async fn delete_due_conversation(&self, due: &DueConversation, batch: i64) -> StoreResult<bool> {
        loop {
            let deleted = sqlx::query(
                "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages m \
                 JOIN conversations c ON c.id = m.conversation_id \
                 WHERE m.conversation_id = $1 AND c.updated_at < $2 LIMIT $3)",
            )
            .bind(&due.id)
            .bind(due.cutoff)
            .bind(batch)
            .execute(&self.pool)
            .await
            .map_err(map_err)?
            .rows_affected();
            if deleted < batch as u64 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let done = sqlx::query("DELETE FROM conversations WHERE id = $1 AND updated_at < $2")
            .bind(&due.id)
            .bind(due.cutoff)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    /// Up to `limit` support sessions closed before `cutoff`: (session, conversation).
    pub async fn support_sessions_due(&self, cutoff: i64, limit: i64) -> StoreResult<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT id, conversation_id FROM support_sessions \
             WHERE closed_at < $1 AND status = 'closed' LIMIT $2",
        )
        .bind(cutoff)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(|r| Ok((get(r, "id")?, get(r, "conversation_id")?))).collect()
    }

    /// Deletes a closed support session with its event log and transcript,
    /// `batch` rows per statement. True when the session is gone.
    pub async fn delete_support_session(
        &self,
        session_id: &str,
        conversation_id: &str,
        batch: i64,
    ) -> StoreResult<bool> {
        let batches = [
            "DELETE FROM support_events WHERE seq IN \
             (SELECT seq FROM support_events WHERE session_id = $1 LIMIT $2)",
            "DELETE FROM messages WHERE id IN \
             (SELECT id FROM messages WHERE conversation_id = $1 LIMIT $2)",
        ];
        for (sql, key) in batches.into_iter().zip([session_id, conversation_id]) {
            loop {
                let deleted =
                    sqlx::query(sql).bind(key).bind(batch).execute(&self.pool).await.map_err(map_err)?.rows_affected();
                if deleted < batch as u64 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        // The session goes with its conversation (ON DELETE CASCADE).
        let done = sqlx::query("DELETE FROM conversations WHERE id = $1")
            .bind(conversation_id)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    /// Takes or renews the lease `name` for `holder` until `now + ttl_ms`;
    /// false while another holder's lease runs.
    pub async fn take_lease(&self, name: &str, holder: &str, now: i64, ttl_ms: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at <= $4",
        )
        .bind(name)
        .bind(holder)
        .bind(now + ttl_ms)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    /// Gives up `holder`'s lease `name` (at shutdown, so another instance
    /// need not wait for it to expire).
    pub async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }
}
