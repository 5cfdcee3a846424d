//! Idempotency keys: claimed atomically (`INSERT … ON CONFLICT DO NOTHING`),
//! so of two identical requests arriving together exactly one proceeds.

use super::{Store, StoreResult, get, map_err};

/// The ids a keyed request creates, fixed when the key is claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotentSend {
    pub request_hash: String,
    pub conversation_id: String,
    pub user_message_id: String,
    pub assistant_message_id: String,
}

#[derive(Debug)]
pub enum IdempotencyClaim {
    /// This request owns the key and must create the messages.
    Claimed,
    /// An earlier request with this key exists (maybe still running).
    Existing(IdempotentSend),
}

/// Keys are honoured for 24 hours.
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;

impl Store {
    pub async fn claim_idempotency_key(
        &self,
        user_id: &str,
        key: &str,
        send: &IdempotentSend,
        now: i64,
    ) -> StoreResult<IdempotencyClaim> {
        sqlx::query("DELETE FROM idempotency_keys WHERE user_id = $1 AND idem_key = $2 AND created_at < $3")
            .bind(user_id)
            .bind(key)
            .bind(now - IDEMPOTENCY_TTL_MS)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (user_id, idem_key, request_hash, conversation_id, user_message_id, \
             assistant_message_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (user_id, idem_key) DO NOTHING",
        )
        .bind(user_id)
        .bind(key)
        .bind(&send.request_hash)
        .bind(&send.conversation_id)
        .bind(&send.user_message_id)
        .bind(&send.assistant_message_id)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(map_err)?
        .rows_affected();
        if inserted == 1 {
            return Ok(IdempotencyClaim::Claimed);
        }
        let row = sqlx::query(
            "SELECT request_hash, conversation_id, user_message_id, assistant_message_id FROM idempotency_keys \
             WHERE user_id = $1 AND idem_key = $2",
        )
        .bind(user_id)
        .bind(key)
        .fetch_one(&self.pool)
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
        Ok(IdempotencyClaim::Existing(existing))
    }

    /// Forgets a claim whose request failed before it stored anything, so a
    /// retry can proceed.
    pub async fn release_idempotency_key(&self, user_id: &str, key: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM idempotency_keys WHERE user_id = $1 AND idem_key = $2")
            .bind(user_id)
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
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
