//! Literal search over messages. A search checks the owner's newest
//! messages first; the trigram indexes of 0007 (SQLite FTS5, PostgreSQL
//! pg_trgm) find the candidates of a rarer term in a longer history. Either
//! way the match is decided exactly — by the database for ASCII text, here
//! (`SearchTerm::matches`) for the rest — so the index's own notion of a
//! match never decides. On SQLite a term found in most messages costs the
//! index far more than reading the newest messages.

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

impl SearchScope<'_> {
    /// The user whose conversations are searched.
    fn owner(&self) -> &str {
        match self {
            SearchScope::Owner(user_id) => user_id,
            SearchScope::SupportDesk => SUPPORT_USER_ID,
        }
    }
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

/// Where a search pass takes its candidates from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Candidates {
    /// The owner's newest messages.
    Newest,
    /// The trigram index's matches, newest first.
    Indexed,
}

impl Store {
    /// The page (`limit` from `offset`) of messages in `scope` that contain
    /// `term`, newest first, and how many of the checked candidates match.
    ///
    /// The owner's newest `SEARCH_CANDIDATES` messages are checked first;
    /// when they fill the page, or are all the owner has, that is the
    /// answer. Otherwise (a rarer term in a long history) the index finds
    /// the candidates among all of them.
    pub async fn search_messages(
        &self,
        scope: SearchScope<'_>,
        term: &SearchTerm,
        limit: i64,
        offset: i64,
    ) -> StoreResult<(Vec<SearchHit>, i64)> {
        if self.engine == Engine::Postgres {
            // PostgreSQL answers the index's candidates quickly whatever the
            // term, so an owner with a long history goes to the index at once.
            let from = match term.is_indexable() && self.long_history(scope).await? {
                true => Candidates::Indexed,
                false => Candidates::Newest,
            };
            return self.search_pass(from, scope, term, limit, offset).await;
        }
        let newest = self.search_pass(Candidates::Newest, scope, term, limit, offset).await?;
        if newest.0.len() as i64 >= limit || !term.is_indexable() || !self.long_history(scope).await? {
            return Ok(newest);
        }
        self.search_pass(Candidates::Indexed, scope, term, limit, offset).await
    }

    /// One pass over at most `SEARCH_CANDIDATES` candidates, newest first.
    /// The database matches the candidates whose text is ASCII itself
    /// (ASCII folds to ASCII lowercase, so that is exact) and counts them;
    /// the others are checked here. Rows stream by, and once the page is
    /// full and only counted matches are left, the rest is not read.
    async fn search_pass(
        &self,
        from: Candidates,
        scope: SearchScope<'_>,
        term: &SearchTerm,
        limit: i64,
        offset: i64,
    ) -> StoreResult<(Vec<SearchHit>, i64)> {
        let (session_col, session_join) = match scope {
            SearchScope::Owner(_) => ("NULL", ""),
            SearchScope::SupportDesk => ("s.id", "JOIN support_sessions s ON s.conversation_id = c.id"),
        };
        let columns =
            format!("m.id, m.conversation_id, m.role, m.content, m.created_at, c.title, {session_col} AS session_id");
        let joined = format!("JOIN conversations c ON c.id = m.conversation_id {session_join}");
        let query = match self.engine {
            Engine::Sqlite => sqlite_pass(from, &columns, &joined, term, scope.owner()),
            Engine::Postgres => postgres_pass(from, &columns, &joined, term, scope.owner()),
        };
        let mut rows = query.fetch(&self.pool);
        let (mut hits, mut matched, mut exact_total) = (Vec::new(), 0i64, 0i64);
        let (mut unchecked_left, mut checked_here, mut first) = (0i64, 0i64, true);
        while let Some(row) = rows.try_next().await.map_err(map_err)? {
            let exact = get::<i64>(&row, "exact").map_err(map_err)? == 1;
            if std::mem::take(&mut first) {
                exact_total = get(&row, "exact_total").map_err(map_err)?;
                unchecked_left = get(&row, "unchecked_total").map_err(map_err)?;
            }
            if hits.len() as i64 >= limit && unchecked_left == 0 {
                // The page is full and the database counted every match left
                // (never on PostgreSQL, whose `unchecked_total` is -1).
                break;
            }
            if exact && hits.len() as i64 >= limit {
                continue;
            }
            let content: String = get(&row, "content").map_err(map_err)?;
            if !exact {
                unchecked_left -= 1;
                if !term.matches(&content) {
                    continue;
                }
                checked_here += 1;
            }
            matched += 1;
            if matched <= offset || hits.len() as i64 >= limit {
                continue;
            }
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
                snippet: term.snippet(&content).unwrap_or_default(),
            });
        }
        Ok((hits, exact_total + checked_here))
    }

    /// Whether the searched conversations hold more than one pass checks.
    async fn long_history(&self, scope: SearchScope<'_>) -> StoreResult<bool> {
        Ok(self.message_total(scope.owner()).await? > SEARCH_CANDIDATES)
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

/// A search pass on SQLite. Candidates are picked by key first (sorting
/// keys, not texts), then read; the database matches and counts the ASCII
/// ones (`exact`), and says how many it left to check (`unchecked_total`).
fn sqlite_pass<'q>(
    from: Candidates,
    columns: &str,
    joined: &str,
    term: &'q SearchTerm,
    owner: &'q str,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    let picked = match from {
        Candidates::Newest => format!(
            "SELECT m.rowid AS pick, m.created_at AS at, m.seq AS n, m.id AS tie FROM messages m \
             JOIN conversations c ON c.id = m.conversation_id WHERE c.user_id = $1 {NEWEST_FIRST} LIMIT $3"
        ),
        // CROSS JOIN keeps SQLite on this order: from the index's matches
        // to their rows. The other order probes the index once per message.
        Candidates::Indexed => format!(
            "SELECT m.rowid AS pick, m.created_at AS at, m.seq AS n, m.id AS tie \
             FROM messages_fts CROSS JOIN messages m ON m.rowid = messages_fts.rowid \
             CROSS JOIN conversations c ON c.id = m.conversation_id \
             WHERE messages_fts MATCH $4 AND c.user_id = $1 {NEWEST_FIRST} LIMIT $3"
        ),
    };
    // ASCII text folds to ASCII lowercase, which is what lower() does here.
    let sql = format!(
        "WITH picked AS ({picked}), \
         candidates AS (SELECT {columns}, picked.at, picked.n, picked.tie, \
                        CASE WHEN length(CAST(m.content AS BLOB)) = length(m.content) THEN 1 ELSE 0 END AS exact \
                        FROM picked JOIN messages m ON m.rowid = picked.pick {joined}), \
         kept AS (SELECT * FROM candidates WHERE exact = 0 OR instr(lower(content), $2) > 0) \
         SELECT *, CAST(SUM(exact) OVER () AS BIGINT) AS exact_total, \
                CAST(SUM(1 - exact) OVER () AS BIGINT) AS unchecked_total FROM kept \
         ORDER BY at DESC, n DESC, tie DESC"
    );
    let query = sqlx::query(AssertSqlSafe(sql)).bind(owner).bind(term.folded()).bind(SEARCH_CANDIDATES);
    match from {
        Candidates::Indexed => query.bind(term.fts5_phrase()),
        Candidates::Newest => query,
    }
}

/// A search pass on PostgreSQL: every candidate is checked here.
fn postgres_pass<'q>(
    from: Candidates,
    columns: &str,
    joined: &str,
    term: &'q SearchTerm,
    owner: &'q str,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    let matching = match from {
        Candidates::Newest => "",
        Candidates::Indexed => "AND lower(m.content) LIKE '%' || lower($3) || '%' ESCAPE '\\'",
    };
    let sql = format!(
        "SELECT {columns}, CAST(0 AS BIGINT) AS exact, CAST(0 AS BIGINT) AS exact_total, CAST(-1 AS BIGINT) AS unchecked_total \
         FROM messages m {joined} WHERE c.user_id = $1 {matching} {NEWEST_FIRST} LIMIT $2"
    );
    let query = sqlx::query(AssertSqlSafe(sql)).bind(owner).bind(SEARCH_CANDIDATES);
    match from {
        Candidates::Indexed => query.bind(term.like_escaped()),
        Candidates::Newest => query,
    }
}
