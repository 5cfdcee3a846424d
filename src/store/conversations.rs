//! Conversations and their messages. Every query names the owner, so a
//! conversation of another user is simply not found.

use sqlx::{AssertSqlSafe, any::AnyRow};

use super::{IdempotentSend, Store, StoreError, StoreResult, get, idempotency, map_err, parse_col};
use crate::domain::conversation::{MessageRole, MessageStatus};

#[derive(Debug, Clone)]
pub struct ConversationRecord {
    pub id: String,
    pub user_id: String,
    pub title: Option<String>,
    pub system_prompt: Option<String>,
    pub model: Option<String>,
    pub message_count: i64,
    pub last_message_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl ConversationRecord {
    fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: get(row, "id")?,
            user_id: get(row, "user_id")?,
            title: get(row, "title")?,
            system_prompt: get(row, "system_prompt")?,
            model: get(row, "model")?,
            message_count: get(row, "message_count")?,
            last_message_at: get(row, "last_message_at")?,
            created_at: get(row, "created_at")?,
            updated_at: get(row, "updated_at")?,
        })
    }
}

/// New values for a conversation's editable fields (`None` keeps the old one).
#[derive(Debug, Default)]
pub struct ConversationPatch {
    pub title: Option<Option<String>>,
    pub system_prompt: Option<Option<String>>,
    pub model: Option<Option<String>>,
}

/// A `streaming` reply whose heartbeat stopped, and whose it is.
#[derive(Debug, Clone)]
pub struct StaleReply {
    pub id: String,
    pub conversation_id: String,
    pub owner: String,
}

#[derive(Debug, Clone)]
pub struct MessageRecord {
    pub id: String,
    pub conversation_id: String,
    pub role: MessageRole,
    pub content: String,
    pub status: MessageStatus,
    pub model: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub usage_estimated: bool,
    pub error: Option<String>,
    /// Machine-readable reason of a failure (`provider_timeout`, …).
    pub error_code: Option<String>,
    pub created_at: i64,
    /// Place in its conversation: the order messages were stored in.
    pub seq: i64,
}

impl MessageRecord {
    fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: get(row, "id")?,
            conversation_id: get(row, "conversation_id")?,
            role: parse_col(row, "role")?,
            content: get(row, "content")?,
            status: parse_col(row, "status")?,
            model: get(row, "model")?,
            prompt_tokens: get(row, "prompt_tokens")?,
            completion_tokens: get(row, "completion_tokens")?,
            usage_estimated: get::<i64>(row, "usage_estimated")? != 0,
            error: get(row, "error")?,
            error_code: get(row, "error_code")?,
            created_at: get(row, "created_at")?,
            seq: get(row, "seq")?,
        })
    }
}

pub struct NewMessage<'a> {
    pub id: &'a str,
    pub conversation_id: &'a str,
    pub role: MessageRole,
    pub content: &'a str,
    pub status: MessageStatus,
    pub model: Option<&'a str>,
    pub now: i64,
}

/// The final state of an assistant message.
pub struct MessageUpdate<'a> {
    pub content: &'a str,
    pub status: MessageStatus,
    pub model: Option<&'a str>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub usage_estimated: bool,
    pub error: Option<&'a str>,
    pub error_code: Option<&'a str>,
    pub now: i64,
    /// How often the reply had been taken over when this generator started:
    /// a generator that lost its reply to another instance writes nothing.
    pub takeovers: i64,
}

#[derive(Debug, Clone)]
pub struct HistoryItem {
    pub conversation_id: String,
    pub title: Option<String>,
    pub last_message: Option<String>,
    pub updated_at: i64,
}

/// `error_code` of a streaming message whose cancel was asked for elsewhere.
const CANCEL_REQUESTED: &str = "cancel_requested";

const CONVERSATION_COLUMNS: &str =
    "id, user_id, title, system_prompt, model, message_count, last_message_at, created_at, updated_at";
const MESSAGE_COLUMNS: &str = "id, conversation_id, role, content, status, model, prompt_tokens, \
     completion_tokens, usage_estimated, error, error_code, created_at, seq";

/// What one send stores, in one transaction: its idempotency key (if any),
/// the conversation when it is new, the user's message and, when an answer
/// will be generated, the assistant's placeholder right after it.
pub struct Exchange<'a> {
    /// `(owner, key, the ids and request hash to remember)`.
    pub idempotency: Option<(&'a str, &'a str, &'a IdempotentSend)>,
    pub new_conversation: Option<&'a ConversationRecord>,
    pub user_message: NewMessage<'a>,
    pub assistant: Option<NewMessage<'a>>,
    /// An untitled conversation takes this title.
    pub title_if_none: Option<&'a str>,
}

pub enum ExchangeOutcome {
    Stored {
        user_message: Box<MessageRecord>,
        assistant: Option<Box<MessageRecord>>,
    },
    /// The key was used before: nothing was stored; the original's ids.
    Existing(IdempotentSend),
    /// The conversation does not exist (any more).
    NoConversation,
}

impl Store {
    pub async fn insert_conversation(&self, c: &ConversationRecord) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        insert_conversation(&mut conn, c).await
    }

    pub async fn conversation(&self, id: &str, user_id: &str) -> StoreResult<Option<ConversationRecord>> {
        let sql = format!("SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = $1 AND user_id = $2");
        let row =
            sqlx::query(AssertSqlSafe(sql)).bind(id).bind(user_id).fetch_optional(&self.pool).await.map_err(map_err)?;
        row.map(|r| ConversationRecord::from_row(&r)).transpose().map_err(map_err)
    }

    /// A page of the user's conversations, newest activity first.
    pub async fn list_conversations(
        &self,
        user_id: &str,
        limit: i64,
        offset: i64,
    ) -> StoreResult<(Vec<ConversationRecord>, i64)> {
        let sql = format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE user_id = $1 \
             ORDER BY updated_at DESC, id DESC LIMIT $2 OFFSET $3"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(user_id)
            .bind(limit)
            .bind(offset)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        let items = rows.iter().map(ConversationRecord::from_row).collect::<Result<Vec<_>, _>>().map_err(map_err)?;
        Ok((items, self.count_conversations(user_id).await?))
    }

    async fn count_conversations(&self, user_id: &str) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM conversations WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)
    }

    /// A page of the user's conversations with the text of their latest message.
    pub async fn history(&self, user_id: &str, limit: i64, offset: i64) -> StoreResult<(Vec<HistoryItem>, i64)> {
        let rows = sqlx::query(
            "SELECT c.id, c.title, c.updated_at, \
               (SELECT m.content FROM messages m WHERE m.conversation_id = c.id \
                ORDER BY m.seq DESC LIMIT 1) AS last_message \
             FROM conversations c WHERE c.user_id = $1 ORDER BY c.updated_at DESC, c.id DESC LIMIT $2 OFFSET $3",
        )
        .bind(user_id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let items = rows
            .iter()
            .map(|r| {
                Ok(HistoryItem {
                    conversation_id: get(r, "id")?,
                    title: get(r, "title")?,
                    last_message: get(r, "last_message")?,
                    updated_at: get(r, "updated_at")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(map_err)?;
        Ok((items, self.count_conversations(user_id).await?))
    }

    pub async fn update_conversation(
        &self,
        id: &str,
        user_id: &str,
        patch: ConversationPatch,
        now: i64,
    ) -> StoreResult<Option<ConversationRecord>> {
        let Some(mut c) = self.conversation(id, user_id).await? else { return Ok(None) };
        if let Some(t) = patch.title {
            c.title = t;
        }
        if let Some(p) = patch.system_prompt {
            c.system_prompt = p;
        }
        if let Some(m) = patch.model {
            c.model = m;
        }
        c.updated_at = now;
        sqlx::query(
            "UPDATE conversations SET title = $1, system_prompt = $2, model = $3, updated_at = $4 \
             WHERE id = $5 AND user_id = $6",
        )
        .bind(&c.title)
        .bind(&c.system_prompt)
        .bind(&c.model)
        .bind(now)
        .bind(id)
        .bind(user_id)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(Some(c))
    }

    pub async fn delete_conversation(&self, id: &str, user_id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM conversations WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(user_id)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    /// Stores one message (a support agent's, say) at the end of its conversation.
    pub async fn insert_message(&self, m: NewMessage<'_>) -> StoreResult<MessageRecord> {
        let exchange = Exchange {
            idempotency: None,
            new_conversation: None,
            user_message: m,
            assistant: None,
            title_if_none: None,
        };
        match self.insert_exchange(exchange).await? {
            ExchangeOutcome::Stored { user_message, .. } => Ok(*user_message),
            ExchangeOutcome::NoConversation | ExchangeOutcome::Existing(_) => {
                Err(StoreError::Sqlx(sqlx::Error::RowNotFound))
            }
        }
    }

    /// Stores a send atomically. The idempotency key is claimed in the same
    /// transaction as the messages it names, so a key that exists always has
    /// its messages (until their conversation is deleted): a retry never
    /// waits for an original that is still writing or that died.
    pub async fn insert_exchange(&self, e: Exchange<'_>) -> StoreResult<ExchangeOutcome> {
        let mut tx = self.begin_write().await?;
        if let Some((owner, key, send)) = e.idempotency
            && let Some(existing) = idempotency::claim(&mut tx, owner, key, send, e.user_message.now).await?
        {
            return Ok(ExchangeOutcome::Existing(existing));
        }
        if let Some(c) = e.new_conversation {
            insert_conversation(&mut tx, c).await?;
        }
        let count = 1 + i64::from(e.assistant.is_some());
        let last = e.assistant.as_ref().map_or(e.user_message.now, |a| a.now);
        // The conversation's row hands out the sequence numbers: writers of
        // one conversation queue on it, and the order of commits is the order.
        let seq: Option<i64> = sqlx::query_scalar(
            "UPDATE conversations SET last_seq = last_seq + $1, message_count = message_count + $1, \
             last_message_at = $2, updated_at = $2, title = COALESCE(title, $3) WHERE id = $4 RETURNING last_seq",
        )
        .bind(count)
        .bind(last)
        .bind(e.title_if_none)
        .bind(e.user_message.conversation_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(last_seq) = seq else { return Ok(ExchangeOutcome::NoConversation) };
        let user_message = Box::new(insert_one(&mut tx, &e.user_message, last_seq - count + 1).await?);
        let assistant = match &e.assistant {
            Some(a) => Some(Box::new(insert_one(&mut tx, a, last_seq).await?)),
            None => None,
        };
        tx.commit().await.map_err(map_err)?;
        Ok(ExchangeOutcome::Stored { user_message, assistant })
    }

    /// Writes an assistant message's final text, status and usage.
    pub async fn finish_message(&self, id: &str, u: MessageUpdate<'_>) -> StoreResult<()> {
        sqlx::query(
            "UPDATE messages SET content = $1, status = $2, model = COALESCE($3, model), prompt_tokens = $4, \
             completion_tokens = $5, usage_estimated = $6, error = $7, updated_at = $8, error_code = $10 \
             WHERE id = $9 AND takeovers = $11",
        )
        .bind(u.content)
        .bind(u.status.as_str())
        .bind(u.model)
        .bind(u.prompt_tokens)
        .bind(u.completion_tokens)
        .bind(i64::from(u.usage_estimated))
        .bind(u.error)
        .bind(u.now)
        .bind(id)
        .bind(u.error_code)
        .bind(u.takeovers)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    /// Marks `streaming` messages not written since `stale_before` failed,
    /// keeping their partial text: their generator is gone.
    pub async fn fail_stale_streaming(&self, error: &str, stale_before: i64, now: i64) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE messages SET status = 'failed', error = $1, error_code = 'interrupted', updated_at = $2 \
             WHERE status = 'streaming' AND updated_at < $3",
        )
        .bind(error)
        .bind(now)
        .bind(stale_before)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected())
    }

    /// `streaming` messages not written since `stale_before` (at most
    /// `limit`): replies whose generator may be gone.
    pub async fn stale_streaming(&self, stale_before: i64, limit: i64) -> StoreResult<Vec<StaleReply>> {
        let rows = sqlx::query(
            "SELECT m.id, m.conversation_id, c.user_id FROM messages m JOIN conversations c ON c.id = m.conversation_id \
             WHERE m.status = 'streaming' AND m.updated_at < $1 LIMIT $2",
        )
        .bind(stale_before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                Ok(StaleReply {
                    id: get(r, "id")?,
                    conversation_id: get(r, "conversation_id")?,
                    owner: get(r, "user_id")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(map_err)
    }

    /// Claims a stale `streaming` reply for regeneration here: its text is
    /// emptied and its heartbeat renewed, once per reply (a reply taken over
    /// before is not). Answers the reply and its conversation when this
    /// instance won it.
    pub async fn take_over_reply(
        &self,
        id: &str,
        stale_before: i64,
        now: i64,
    ) -> StoreResult<Option<(MessageRecord, ConversationRecord)>> {
        let done = sqlx::query(
            "UPDATE messages SET takeovers = takeovers + 1, content = '', updated_at = $1 \
             WHERE id = $2 AND status = 'streaming' AND updated_at < $3 AND takeovers = 0",
        )
        .bind(now)
        .bind(id)
        .bind(stale_before)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        if done.rows_affected() != 1 {
            return Ok(None);
        }
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1");
        let row = sqlx::query(AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await.map_err(map_err)?;
        let Some(reply) = row.map(|r| MessageRecord::from_row(&r)).transpose().map_err(map_err)? else {
            return Ok(None);
        };
        let sql = format!("SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = $1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(&reply.conversation_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        let conversation = row.map(|r| ConversationRecord::from_row(&r)).transpose().map_err(map_err)?;
        Ok(conversation.map(|c| (reply, c)))
    }

    /// How often a reply has been taken over (its text's generation: event
    /// ids of a resumed stream name it); 0 for an unknown id.
    pub async fn reply_takeovers(&self, id: &str) -> StoreResult<i64> {
        let n: Option<i64> = sqlx::query_scalar("SELECT takeovers FROM messages WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(n.unwrap_or(0))
    }

    /// Marks one stale `streaming` message failed (if it still is); true when it was.
    pub async fn fail_streaming(&self, id: &str, error: &str, stale_before: i64, now: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE messages SET status = 'failed', error = $1, error_code = 'interrupted', updated_at = $2 \
             WHERE id = $3 AND status = 'streaming' AND updated_at < $4",
        )
        .bind(error)
        .bind(now)
        .bind(id)
        .bind(stale_before)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() == 1)
    }

    /// Saves the text a reply has so far; also proves its generator alive
    /// (the one that started after `takeovers` takeovers: one that lost the
    /// reply to another instance writes nothing). Answers whether another
    /// instance asked for the reply to be cancelled.
    pub async fn save_partial(&self, id: &str, content: &str, now: i64, takeovers: i64) -> StoreResult<bool> {
        let row = sqlx::query(
            "UPDATE messages SET content = $1, updated_at = $2 WHERE id = $3 AND status = 'streaming' \
             AND takeovers = $4 RETURNING error_code",
        )
        .bind(content)
        .bind(now)
        .bind(id)
        .bind(takeovers)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        let code: Option<String> = match row {
            Some(r) => get(&r, "error_code").map_err(map_err)?,
            None => None,
        };
        Ok(code.as_deref() == Some(CANCEL_REQUESTED))
    }

    /// Asks the instance generating a reply to cancel it (it sees the
    /// request at its next save); false when the reply is not streaming.
    pub async fn request_cancel(&self, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE messages SET error_code = $1 WHERE id = $2 AND status = 'streaming'")
            .bind(CANCEL_REQUESTED)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn message(&self, conversation_id: &str, id: &str) -> StoreResult<Option<MessageRecord>> {
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1 AND conversation_id = $2");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .bind(conversation_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.map(|r| MessageRecord::from_row(&r)).transpose().map_err(map_err)
    }

    /// Up to `limit` messages before the cursor message (or the newest ones),
    /// oldest first, and whether older ones exist.
    pub async fn list_messages(
        &self,
        conversation_id: &str,
        before: Option<&MessageRecord>,
        limit: i64,
    ) -> StoreResult<(Vec<MessageRecord>, bool)> {
        let rows = match before {
            Some(b) => {
                let sql = format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND seq < $2 \
                     ORDER BY seq DESC LIMIT $3"
                );
                sqlx::query(AssertSqlSafe(sql))
                    .bind(conversation_id)
                    .bind(b.seq)
                    .bind(limit + 1)
                    .fetch_all(&self.pool)
                    .await
            }
            None => {
                let sql = format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 ORDER BY seq DESC LIMIT $2"
                );
                sqlx::query(AssertSqlSafe(sql)).bind(conversation_id).bind(limit + 1).fetch_all(&self.pool).await
            }
        }
        .map_err(map_err)?;
        let mut items = rows.iter().map(MessageRecord::from_row).collect::<Result<Vec<_>, _>>().map_err(map_err)?;
        let has_more = items.len() as i64 > limit;
        items.truncate(limit as usize);
        items.reverse();
        Ok((items, has_more))
    }

    /// Up to `limit` messages of a conversation after the one at `after_seq`
    /// (0: from the first), oldest first: exports walk a conversation with it.
    pub async fn messages_after(
        &self,
        conversation_id: &str,
        after_seq: i64,
        limit: i64,
    ) -> StoreResult<Vec<MessageRecord>> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(conversation_id)
            .bind(after_seq)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(MessageRecord::from_row).collect::<Result<Vec<_>, _>>().map_err(map_err)
    }

    /// Up to `limit` of the user's conversations with ids after `after_id`
    /// (`""`: from the first), by id: a walk that changes in activity cannot
    /// reorder.
    pub async fn conversations_after(
        &self,
        user_id: &str,
        after_id: &str,
        limit: i64,
    ) -> StoreResult<Vec<ConversationRecord>> {
        let sql = format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE user_id = $1 AND id > $2 ORDER BY id LIMIT $3"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(user_id)
            .bind(after_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(ConversationRecord::from_row).collect::<Result<Vec<_>, _>>().map_err(map_err)
    }

    /// Up to `limit` messages of a conversation up to and including the one
    /// at `upto_seq`, oldest first: the history a reply to it may see.
    pub async fn messages_upto(
        &self,
        conversation_id: &str,
        upto_seq: i64,
        limit: i64,
    ) -> StoreResult<Vec<MessageRecord>> {
        self.messages_between(conversation_id, 0, upto_seq, limit).await
    }

    /// The newest `limit` messages with `after_seq < seq <= upto_seq`, in order.
    pub async fn messages_between(
        &self,
        conversation_id: &str,
        after_seq: i64,
        upto_seq: i64,
        limit: i64,
    ) -> StoreResult<Vec<MessageRecord>> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND seq > $4 AND seq <= $2 \
             ORDER BY seq DESC LIMIT $3"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(conversation_id)
            .bind(upto_seq)
            .bind(limit)
            .bind(after_seq)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        let mut items = rows.iter().map(MessageRecord::from_row).collect::<Result<Vec<_>, _>>().map_err(map_err)?;
        items.reverse();
        Ok(items)
    }
}

pub(super) async fn insert_conversation(conn: &mut sqlx::AnyConnection, c: &ConversationRecord) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO conversations (id, user_id, title, system_prompt, model, message_count, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, 0, $6, $6)",
    )
    .bind(&c.id)
    .bind(&c.user_id)
    .bind(&c.title)
    .bind(&c.system_prompt)
    .bind(&c.model)
    .bind(c.created_at)
    .execute(conn)
    .await
    .map_err(map_err)?;
    Ok(())
}

async fn insert_one(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    m: &NewMessage<'_>,
    seq: i64,
) -> StoreResult<MessageRecord> {
    sqlx::query(
        "INSERT INTO messages (id, conversation_id, role, content, status, model, usage_estimated, created_at, \
         updated_at, seq) VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $7, $8)",
    )
    .bind(m.id)
    .bind(m.conversation_id)
    .bind(m.role.as_str())
    .bind(m.content)
    .bind(m.status.as_str())
    .bind(m.model)
    .bind(m.now)
    .bind(seq)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(MessageRecord {
        id: m.id.to_owned(),
        conversation_id: m.conversation_id.to_owned(),
        role: m.role,
        content: m.content.to_owned(),
        status: m.status,
        model: m.model.map(str::to_owned),
        prompt_tokens: None,
        completion_tokens: None,
        usage_estimated: false,
        error: None,
        error_code: None,
        created_at: m.now,
        seq,
    })
}
