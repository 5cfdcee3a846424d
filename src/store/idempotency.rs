//! Idempotency keys: claimed atomically (`INSERT … ON CONFLICT DO NOTHING`)
//! in the transaction that stores the send's messages, so of two identical
//! requests arriving together exactly one proceeds, and a claimed key always
//! names messages that exist.

use super::{Store, StoreResult, get, map_err};

/// The ids a keyed request creates, fixed when the key is claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotentSend {
    pub request_hash: String,
    pub conversation_id: String,
    pub user_message_id: String,
    pub assistant_message_id: String,
}

/// Keys are honoured for 24 hours.
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;

/// Claims `key` for `owner` inside a send's transaction: `None` when this
/// request now owns it, else the ids the earlier request stored. A key past
/// its lifetime is taken over.
pub(super) async fn claim(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    owner: &str,
    key: &str,
    send: &IdempotentSend,
    now: i64,
) -> StoreResult<Option<IdempotentSend>> {
    sqlx::query("DELETE FROM idempotency_keys WHERE user_id = $1 AND idem_key = $2 AND created_at < $3")
        .bind(owner)
        .bind(key)
        .bind(now - IDEMPOTENCY_TTL_MS)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys (user_id, idem_key, request_hash, conversation_id, user_message_id, \
         assistant_message_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (user_id, idem_key) DO NOTHING",
    )
    .bind(owner)
    .bind(key)
    .bind(&send.request_hash)
    .bind(&send.conversation_id)
    .bind(&send.user_message_id)
    .bind(&send.assistant_message_id)
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?
    .rows_affected();
    if inserted == 1 {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT request_hash, conversation_id, user_message_id, assistant_message_id FROM idempotency_keys \
         WHERE user_id = $1 AND idem_key = $2",
    )
    .bind(owner)
    .bind(key)
    .fetch_one(&mut **tx)
    .await
    .map_err(map_err)?;
    let existing = (|| -> Result<IdempotentSend, sqlx::Error> {
        Ok(IdempotentSend {
            request_hash: get(&row, "request_hash")?,
            conversation_id: get(&row, "conversation_id")?,
            user_message_id: get(&row, "user_message_id")?,
            assistant_message_id: get(&row, "assistant_message_id")?,
        })
    })()
    .map_err(map_err)?;
    Ok(Some(existing))
}

impl Store {
    /// Whether `owner` holds `key` (within its lifetime): a retry of a send
    /// that was stored, which starts nothing and so is not admitted again.
    pub async fn idempotency_key_held(&self, owner: &str, key: &str, now: i64) -> StoreResult<bool> {
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT created_at FROM idempotency_keys WHERE user_id = $1 AND idem_key = $2 AND created_at >= $3",
        )
        .bind(owner)
        .bind(key)
        .bind(now - IDEMPOTENCY_TTL_MS)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(held.is_some())
    }

    /// Drops keys past their lifetime.
    pub async fn purge_idempotency_keys(&self, now: i64) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(now - IDEMPOTENCY_TTL_MS)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected())
    }
}
