//! Support sessions, their queue and their event log. Claims are a single
//! conditional UPDATE, so of any number of concurrent claimers, on any
//! instance, exactly one wins.

use sqlx::{AssertSqlSafe, any::AnyRow};

use super::{ConversationRecord, Engine, Store, StoreError, StoreResult, get, map_err, parse_col};
use crate::domain::support::SupportStatus;

/// The built-in account that owns support conversations (created by the
/// 0004 migration; disabled, so nobody can log in as it).
pub const SUPPORT_USER_ID: &str = "00000000-0000-0000-0000-00000000500a";

#[derive(Debug, Clone)]
pub struct SupportSessionRecord {
    pub id: String,
    pub conversation_id: String,
    pub client_name: String,
    pub client_email: String,
    pub client_phone: Option<String>,
    pub status: SupportStatus,
    pub queued_at: Option<i64>,
    pub assigned_agent: Option<String>,
    pub assigned_agent_name: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl SupportSessionRecord {
    fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: get(row, "id")?,
            conversation_id: get(row, "conversation_id")?,
            client_name: get(row, "client_name")?,
            client_email: get(row, "client_email")?,
            client_phone: get(row, "client_phone")?,
            status: parse_col(row, "status")?,
            queued_at: get(row, "queued_at")?,
            assigned_agent: get(row, "assigned_agent")?,
            assigned_agent_name: get(row, "agent_name")?,
            created_at: get(row, "created_at")?,
            updated_at: get(row, "updated_at")?,
        })
    }
}

/// An event to log.
#[derive(Debug, Clone)]
pub struct NewSupportEvent {
    pub session_id: String,
    pub agent_id: Option<String>,
    pub kind: &'static str,
    pub payload: String,
    pub created_at: i64,
}

/// One entry of a session's event log.
#[derive(Debug, Clone)]
pub struct SupportEventRecord {
    pub seq: i64,
    pub session_id: String,
    pub agent_id: Option<String>,
    pub kind: String,
    pub payload: String,
}

const SESSION_COLUMNS: &str = "s.id, s.conversation_id, s.client_name, s.client_email, s.client_phone, s.status, \
     s.queued_at, s.assigned_agent, COALESCE(a.display_name, a.username, a.email) AS agent_name, s.created_at, s.updated_at";
const SESSION_FROM: &str = "support_sessions s LEFT JOIN users a ON a.id = s.assigned_agent";
/// Most events replayed at once; a client further behind reloads messages.
pub const REPLAY_LIMIT: i64 = 1000;

impl Store {
    /// Creates a session and its conversation in one transaction.
    pub async fn create_support_session(
        &self,
        s: &SupportSessionRecord,
        conversation: &ConversationRecord,
        token_hash: &str,
    ) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        super::conversations::insert_conversation(&mut tx, conversation).await?;
        sqlx::query(
            "INSERT INTO support_sessions (id, conversation_id, client_name, client_email, client_phone, \
             client_token_hash, status, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
        )
        .bind(&s.id)
        .bind(&s.conversation_id)
        .bind(&s.client_name)
        .bind(&s.client_email)
        .bind(&s.client_phone)
        .bind(token_hash)
        .bind(s.status.as_str())
        .bind(s.created_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(())
    }

    async fn support_session_where(&self, clause: &str, value: &str) -> StoreResult<Option<SupportSessionRecord>> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM {SESSION_FROM} WHERE {clause}");
        let row = sqlx::query(AssertSqlSafe(sql)).bind(value).fetch_optional(&self.pool).await.map_err(map_err)?;
        row.map(|r| SupportSessionRecord::from_row(&r)).transpose().map_err(map_err)
    }

    pub async fn support_session(&self, id: &str) -> StoreResult<Option<SupportSessionRecord>> {
        self.support_session_where("s.id = $1", id).await
    }

    pub async fn support_session_by_token(&self, token_hash: &str) -> StoreResult<Option<SupportSessionRecord>> {
        self.support_session_where("s.client_token_hash = $1", token_hash).await
    }

    pub async fn support_session_by_conversation(&self, id: &str) -> StoreResult<Option<SupportSessionRecord>> {
        self.support_session_where("s.conversation_id = $1", id).await
    }

    /// 1-based place in the queue, for a queued session.
    pub async fn queue_position(&self, s: &SupportSessionRecord) -> StoreResult<Option<i64>> {
        let Some(queued_at) = s.queued_at.filter(|_| s.status == SupportStatus::Queued) else { return Ok(None) };
        let ahead: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM support_sessions WHERE status = 'queued' \
             AND (queued_at < $1 OR (queued_at = $1 AND id < $2))",
        )
        .bind(queued_at)
        .bind(&s.id)
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(Some(ahead + 1))
    }

    /// The waiting sessions, first come first.
    pub async fn support_queue(&self) -> StoreResult<Vec<SupportSessionRecord>> {
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM {SESSION_FROM} WHERE s.status = 'queued' ORDER BY s.queued_at, s.id LIMIT 500"
        );
        let rows = sqlx::query(AssertSqlSafe(sql)).fetch_all(&self.pool).await.map_err(map_err)?;
        rows.iter().map(SupportSessionRecord::from_row).collect::<Result<_, _>>().map_err(map_err)
    }

    /// Sessions, newest first, optionally of one status.
    pub async fn list_support_sessions(
        &self,
        status: Option<SupportStatus>,
        limit: i64,
        offset: i64,
    ) -> StoreResult<(Vec<SupportSessionRecord>, i64)> {
        let filter = status.map(SupportStatus::as_str).unwrap_or("");
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM {SESSION_FROM} WHERE ($1 = '' OR s.status = $1) \
             ORDER BY s.created_at DESC, s.id DESC LIMIT $2 OFFSET $3"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(filter)
            .bind(limit)
            .bind(offset)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        let items = rows.iter().map(SupportSessionRecord::from_row).collect::<Result<Vec<_>, _>>().map_err(map_err)?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM support_sessions WHERE ($1 = '' OR status = $1)")
            .bind(filter)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        Ok((items, total))
    }

    /// Open sessions assigned to the agent.
    pub async fn agent_sessions(&self, agent_id: &str) -> StoreResult<Vec<SupportSessionRecord>> {
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM {SESSION_FROM} WHERE s.assigned_agent = $1 AND s.status = 'human' \
             ORDER BY s.updated_at DESC"
        );
        let rows = sqlx::query(AssertSqlSafe(sql)).bind(agent_id).fetch_all(&self.pool).await.map_err(map_err)?;
        rows.iter().map(SupportSessionRecord::from_row).collect::<Result<_, _>>().map_err(map_err)
    }

    /// `ai` → `queued` at the tail; false when the session is not in AI mode.
    ///
    /// `queued_at` orders the queue, so it is kept strictly after every session
    /// already waiting: two handoffs within one millisecond still queue in the
    /// order they arrived (ties would otherwise fall back to the random id).
    pub async fn enqueue_support_session(&self, id: &str, now: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE support_sessions SET status = 'queued', updated_at = $1, \
             queued_at = (SELECT CASE WHEN MAX(q.queued_at) >= $1 THEN MAX(q.queued_at) + 1 ELSE $1 END \
                          FROM support_sessions q WHERE q.status = 'queued') \
             WHERE id = $2 AND status = 'ai'",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() == 1)
    }

    /// `queued` → `human` for `agent_id`; true for exactly one claimer.
    pub async fn claim_support_session(&self, id: &str, agent_id: &str, now: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE support_sessions SET status = 'human', assigned_agent = $1, claimed_at = $2, \
             last_wait_ms = $2 - queued_at, updated_at = $2 WHERE id = $3 AND status = 'queued'",
        )
        .bind(agent_id)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() == 1)
    }

    /// `human` → `queued` at the head of the queue; only by the assigned agent.
    pub async fn release_support_session(&self, id: &str, agent_id: &str, now: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE support_sessions SET status = 'queued', assigned_agent = NULL, updated_at = $1, \
             queued_at = (SELECT COALESCE(MIN(q.queued_at), $1) FROM support_sessions q WHERE q.status = 'queued') - 1 \
             WHERE id = $2 AND status = 'human' AND assigned_agent = $3",
        )
        .bind(now)
        .bind(id)
        .bind(agent_id)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() == 1)
    }

    /// Any open status → `closed`; false when already closed.
    pub async fn close_support_session(&self, id: &str, now: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE support_sessions SET status = 'closed', closed_at = $1, updated_at = $1 WHERE id = $2 AND status <> 'closed'",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() == 1)
    }

    /// Mean wait of the last 20 claimed sessions, in milliseconds (rounded
    /// here: the engines round integer averages differently).
    pub async fn recent_support_wait_ms(&self) -> StoreResult<Option<i64>> {
        let (total, count): (Option<i64>, i64) = sqlx::query_as(
            "SELECT CAST(SUM(w.last_wait_ms) AS BIGINT), COUNT(*) FROM (SELECT last_wait_ms FROM support_sessions \
             WHERE last_wait_ms IS NOT NULL ORDER BY claimed_at DESC LIMIT 20) w",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(total.filter(|_| count > 0).map(|total| (total + count / 2) / count))
    }

    /// Appends events to the log in one statement; answers their ids, in
    /// the order given (a batch is one commit, however many events: the
    /// desk's appender gathers what arrives while the previous batch writes).
    ///
    /// Ids are given out in commit order: on SQLite the one writer does it,
    /// on PostgreSQL an advisory lock held until the insert commits. So once
    /// an event is visible, every lower id is committed or was abandoned, and
    /// nobody reading the log after `since` can miss one that commits later.
    pub async fn append_support_events(&self, events: &[NewSupportEvent]) -> StoreResult<Vec<i64>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // Rows are inserted in the order of `ord`, so ids rise with it; the
        // answer is sorted rather than trusting RETURNING's order.
        let rows = (0..events.len())
            .map(|i| {
                let p = 2 + i * 6;
                format!(
                    "(CAST(${p} AS BIGINT), ${}, ${}, ${}, ${}, CAST(${} AS BIGINT))",
                    p + 1,
                    p + 2,
                    p + 3,
                    p + 4,
                    p + 5
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let turn = match self.engine() {
            Engine::Sqlite => "turn AS (SELECT $1 AS held)",
            Engine::Postgres => "turn AS (SELECT pg_advisory_xact_lock($1) AS held)",
        };
        let sql = format!(
            "WITH {turn}, input (ord, session_id, agent_id, kind, payload, created_at) AS (VALUES {rows}) \
             INSERT INTO support_events (session_id, agent_id, kind, payload, created_at) \
             SELECT i.session_id, i.agent_id, i.kind, i.payload, i.created_at FROM input i, turn ORDER BY i.ord \
             RETURNING seq"
        );
        let mut query = sqlx::query_scalar(AssertSqlSafe(sql)).bind(EVENT_ORDER_LOCK);
        for (i, e) in events.iter().enumerate() {
            query = query
                .bind(i as i64)
                .bind(&e.session_id)
                .bind(&e.agent_id)
                .bind(e.kind)
                .bind(&e.payload)
                .bind(e.created_at);
        }
        let mut ids: Vec<i64> = query.fetch_all(&self.pool).await.map_err(map_err)?;
        if ids.len() != events.len() {
            return Err(StoreError::Unavailable(format!("{} of {} events logged", ids.len(), events.len())));
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Events after `since` of one session (a client), or of the sessions an
    /// agent holds (`agent_id`), oldest first.
    pub async fn support_events_since(
        &self,
        session_id: Option<&str>,
        agent_id: Option<&str>,
        since: i64,
    ) -> StoreResult<Vec<SupportEventRecord>> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM support_events WHERE seq > $1 AND \
             (session_id = $2 OR session_id IN (SELECT id FROM support_sessions WHERE assigned_agent = $3)) \
             ORDER BY seq LIMIT $4"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(since)
            .bind(session_id.unwrap_or(""))
            .bind(agent_id.unwrap_or(""))
            .bind(REPLAY_LIMIT)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        event_records(&rows)
    }

    /// Every session's events with `after < seq < before`, oldest first: the
    /// ones an instance has not heard of when a later one reached it.
    pub async fn support_events_between(&self, after: i64, before: i64) -> StoreResult<Vec<SupportEventRecord>> {
        let sql =
            format!("SELECT {EVENT_COLUMNS} FROM support_events WHERE seq > $1 AND seq < $2 ORDER BY seq LIMIT $3");
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(after)
            .bind(before)
            .bind(REPLAY_LIMIT)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        event_records(&rows)
    }

    /// The id of the last event logged (0 for none).
    pub async fn last_support_event(&self) -> StoreResult<i64> {
        let last: Option<i64> =
            sqlx::query_scalar("SELECT MAX(seq) FROM support_events").fetch_one(&self.pool).await.map_err(map_err)?;
        Ok(last.unwrap_or(0))
    }
}

/// The advisory lock that orders support events on PostgreSQL.
const EVENT_ORDER_LOCK: i64 = 0x5041_4c56_0016;
const EVENT_COLUMNS: &str = "seq, session_id, agent_id, kind, payload";

fn event_records(rows: &[AnyRow]) -> StoreResult<Vec<SupportEventRecord>> {
    rows.iter()
        .map(|r| {
            Ok(SupportEventRecord {
                seq: get(r, "seq")?,
                session_id: get(r, "session_id")?,
                agent_id: get(r, "agent_id")?,
                kind: get(r, "kind")?,
                payload: get(r, "payload")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(map_err)
}
