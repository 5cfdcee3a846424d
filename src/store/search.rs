//! Literal search over messages. The trigram indexes of 0007 (SQLite FTS5,
//! PostgreSQL pg_trgm) find candidates; each is checked exactly here
//! (`SearchTerm::snippet`), so the index's own notion of a match never
//! decides. Terms too short for trigrams, and owners with no more messages
//! than one search checks, scan the newest messages instead: on SQLite a
//! term found in most messages costs the index far more than such a scan.

use futures::TryStreamExt;
use sqlx::AssertSqlSafe;

use super::{Engine, SUPPORT_USER_ID, Store, StoreResult, get, map_err, parse_col};
use crate::domain::{conversation::MessageRole, search::SearchTerm};

/// Most candidates one search checks, newest first: bounds the work (and the
/// `total`) of terms that are everywhere and of short terms that scan.
pub const SEARCH_CANDIDATES: i64 = 5_000;

/// Whose messages a search looks through.
#[derive(Debug, Clone, Copy)]
pub enum SearchScope<'a> {
    /// The conversations of this user.
    Owner(&'a str),
    /// Support desk transcripts (every session's messages).
    SupportDesk,
}

#[derive(Debug, Clone)]
pub struct SearchHit {
    pub message_id: String,
    pub conversation_id: String,
    pub conversation_title: Option<String>,
    /// The support session (`SupportDesk` searches only).
    pub session_id: Option<String>,
    pub role: MessageRole,
    pub created_at: i64,
    pub snippet: String,
}

const NEWEST_FIRST: &str = "ORDER BY m.created_at DESC, m.seq DESC, m.id DESC";

impl Store {
    /// The page (`limit` from `offset`) of messages in `scope` that contain
    /// `term`, newest first, and how many of the checked candidates match.
    pub async fn search_messages(
        &self,
        scope: SearchScope<'_>,
        term: &SearchTerm,
        limit: i64,
        offset: i64,
    ) -> StoreResult<(Vec<SearchHit>, i64)> {
        let (owner, session_col, session_join) = match scope {
            SearchScope::Owner(user_id) => (user_id, "NULL", ""),
            SearchScope::SupportDesk => {
                (SUPPORT_USER_ID, "s.id", "JOIN support_sessions s ON s.conversation_id = c.id")
            }
        };
        let columns =
            format!("m.id, m.conversation_id, m.role, m.content, m.created_at, c.title, {session_col} AS session_id");
        let joined = format!("JOIN conversations c ON c.id = m.conversation_id {session_join}");
        // An owner with few messages is searched fastest by reading them all
        // (and exactly: none is left out); the index serves the others.
        let indexed = term.is_indexable() && self.message_total(owner).await? > SEARCH_CANDIDATES;
        let sql = match (indexed, self.engine) {
            // CROSS JOIN keeps SQLite on this order: from the index's matches
            // to their rows. The other order probes the index once per message.
            (true, Engine::Sqlite) => format!(
                "SELECT {columns} FROM messages_fts CROSS JOIN messages m ON m.rowid = messages_fts.rowid \
                 CROSS {joined} \
                 WHERE messages_fts MATCH $2 AND c.user_id = $1 {NEWEST_FIRST} LIMIT $3"
            ),
            (true, Engine::Postgres) => format!(
                "SELECT {columns} FROM messages m {joined} \
                 WHERE c.user_id = $1 AND lower(m.content) LIKE '%' || lower($2) || '%' ESCAPE '\\' \
                 {NEWEST_FIRST} LIMIT $3"
            ),
            (false, _) => {
                format!("SELECT {columns} FROM messages m {joined} WHERE c.user_id = $1 {NEWEST_FIRST} LIMIT $2")
            }
        };
        let mut query = sqlx::query(AssertSqlSafe(sql)).bind(owner);
        if indexed {
            query = query.bind(match self.engine {
                Engine::Sqlite => term.fts5_phrase(),
                Engine::Postgres => term.like_escaped(),
            });
        }
        let mut rows = query.bind(SEARCH_CANDIDATES).fetch(&self.pool);
        let (mut hits, mut total) = (Vec::new(), 0i64);
        // Rows stream by: only the page's hits are kept, whatever the candidates weigh.
        while let Some(row) = rows.try_next().await.map_err(map_err)? {
            let content: String = get(&row, "content").map_err(map_err)?;
            if !term.matches(&content) {
                continue;
            }
            total += 1;
            if total <= offset || hits.len() as i64 >= limit {
                continue;
            }
            let snippet = term.snippet(&content).unwrap_or_default();
            let session_id = match scope {
                SearchScope::Owner(_) => None,
                SearchScope::SupportDesk => Some(get(&row, "session_id").map_err(map_err)?),
            };
            hits.push(SearchHit {
                message_id: get(&row, "id").map_err(map_err)?,
                conversation_id: get(&row, "conversation_id").map_err(map_err)?,
                conversation_title: get(&row, "title").map_err(map_err)?,
                session_id,
                role: parse_col(&row, "role").map_err(map_err)?,
                created_at: get(&row, "created_at").map_err(map_err)?,
                snippet,
            });
        }
        Ok((hits, total))
    }

    /// How many messages the user's conversations hold.
    async fn message_total(&self, user_id: &str) -> StoreResult<i64> {
        sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(message_count), 0) AS BIGINT) FROM conversations WHERE user_id = $1",
        )
        .bind(user_id)
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)
    }
}
