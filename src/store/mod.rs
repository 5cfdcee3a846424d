//! The one place SQL lives. `Store` runs the same `$1`-style SQL on SQLite and
//! PostgreSQL through sqlx's Any driver; ids are TEXT and times are integer
//! milliseconds so both engines carry them alike. Migrations are per engine.
//! The few SQL strings built with `format!` only splice our own column-list
//! constants (hence `AssertSqlSafe`); every value is a bound parameter.

mod api_keys;
mod conversations;
mod idempotency;
mod quota;
mod retention;
mod search;
mod sessions;
mod support;
mod usage;
mod users;

use std::{
    path::Path,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sqlx::{
    AnyPool, Executor,
    any::{AnyPoolOptions, AnyRow},
};

pub use api_keys::{ApiKeyRecord, ApiUsageCounts, ApiUsageKey, NewApiKey};
pub use conversations::{
    ConversationPatch, ConversationRecord, Exchange, ExchangeOutcome, HistoryItem, MessageRecord, MessageUpdate,
    NewMessage, StaleReply,
};
pub use idempotency::{IDEMPOTENCY_TTL_MS, IdempotentSend};
pub use quota::{Reserved, SubjectUsage, SubjectUsageKey};
pub use retention::DueConversation;
pub use search::{SEARCH_CANDIDATES, SearchHit, SearchScope};
pub use sessions::{LoginSessionRecord, NewLoginSession, RefreshOutcome, SessionAuth};
pub use support::{NewSupportEvent, REPLAY_LIMIT, SUPPORT_USER_ID, SupportEventRecord, SupportSessionRecord};
pub use usage::{TokenBudget, UsagePeriod, UsageTotals};
pub use users::{NewUser, UserRecord};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint on the named column refused the write.
    #[error("unique constraint on {0}")]
    Conflict(&'static str),
    /// The database did not hand out a connection in time.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
}

impl StoreError {
    /// Classifies a database error: unique violations on `columns` become
    /// `Conflict`, pool exhaustion becomes `Unavailable`.
    fn classify(err: sqlx::Error, columns: &[&'static str]) -> Self {
        if let sqlx::Error::Database(db) = &err
            && db.is_unique_violation()
        {
            let text = format!("{} {}", db.message(), db.constraint().unwrap_or_default());
            if let Some(col) = columns.iter().find(|c| text.contains(*c)) {
                return StoreError::Conflict(col);
            }
        }
        match err {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => StoreError::Unavailable(err.to_string()),
            sqlx::Error::Io(_) => StoreError::Unavailable(err.to_string()),
            other => StoreError::Sqlx(other),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

fn map_err(e: sqlx::Error) -> StoreError {
    StoreError::classify(e, &[])
}

/// How long a query waits for a connection unless configured otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    pub fn of_url(url: &str) -> Option<Engine> {
        if url.starts_with("sqlite:") {
            Some(Engine::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Some(Engine::Postgres)
        } else {
            None
        }
    }
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    engine: Engine,
    /// Counts the changes to users and API keys, bumped after each is
    /// written (see `accounts_epoch`).
    accounts_epoch: Arc<AtomicU64>,
}

impl Store {
    /// Connects to `url`, creating the SQLite file (and its folder) if needed.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        Self::connect_with_timeout(url, DEFAULT_TIMEOUT).await
    }

    /// `connect`, with `timeout` as the longest a query waits for a
    /// connection (and, on SQLite, for the write lock) before it fails.
    pub async fn connect_with_timeout(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        Self::connect_with_pool(url, timeout, None).await
    }

    /// `connect_with_timeout`, with at most `max_connections` connections
    /// (default: 8 on SQLite, 20 on PostgreSQL).
    pub async fn connect_with_pool(url: &str, timeout: Duration, max_connections: Option<u32>) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let engine = Engine::of_url(url)
            .ok_or_else(|| anyhow::anyhow!("DATABASE_URL must start with sqlite:// or postgres://"))?;
        let url = match engine {
            Engine::Sqlite => prepare_sqlite_url(url)?,
            Engine::Postgres => url.to_owned(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.unwrap_or(match engine {
                Engine::Sqlite => 8,
                Engine::Postgres => 20,
            }))
            .min_connections(1)
            .acquire_timeout(timeout)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if engine == Engine::Sqlite {
                        // WAL lets readers run beside the writer; NORMAL sync
                        // still survives a killed process (only power loss
                        // can drop the last commits); the busy timeout turns
                        // writer contention into waiting instead of errors.
                        let pragmas = format!(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                             PRAGMA foreign_keys = ON; PRAGMA busy_timeout = {};",
                            timeout.as_millis()
                        );
                        conn.execute(sqlx::AssertSqlSafe(pragmas)).await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        Ok(Self { pool, engine, accounts_epoch: Default::default() })
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Changes as often as a user or an API key is changed through this
    /// store, or `accounts_changed` is called: what was read of them at an
    /// older epoch may be stale. Bumped after the write, so a read that
    /// began at the new epoch sees it.
    pub fn accounts_epoch(&self) -> u64 {
        self.accounts_epoch.load(Ordering::SeqCst)
    }

    /// Marks what was read of users and keys as possibly stale: done by
    /// every write to them here, and when another instance announces one.
    pub fn accounts_changed(&self) {
        self.accounts_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Applies the migrations of this engine that are not applied yet.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let migrator = match self.engine {
            Engine::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Engine::Postgres => sqlx::migrate!("./migrations/postgres"),
        };
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// Answers when the database does.
    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(map_err)?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A transaction that will write. On SQLite it takes the write lock up
    /// front (`BEGIN IMMEDIATE`): a deferred transaction that reads first
    /// and writes later cannot wait for a concurrent writer and fails with
    /// "database is locked" instead.
    async fn begin_write(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Any>> {
        match self.engine {
            Engine::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Engine::Postgres => self.pool.begin().await,
        }
        .map_err(map_err)
    }
}

/// Makes sure the folder of a SQLite file exists and asks sqlx to create the
/// file (`mode=rwc`).
fn prepare_sqlite_url(url: &str) -> anyhow::Result<String> {
    let rest = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" {
        anyhow::bail!("an in-memory SQLite database would lose every message; give DATABASE_URL a file path");
    }
    if let Some(parent) = Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .map_err(|e| anyhow::anyhow!("cannot create database folder {}: {e}", parent.display()))?;
    }
    let query = if query.contains("mode=") {
        query.to_owned()
    } else if query.is_empty() {
        "mode=rwc".to_owned()
    } else {
        format!("{query}&mode=rwc")
    };
    Ok(format!("sqlite://{path}?{query}"))
}

// Row helpers shared by the query modules.

fn get<'r, T>(row: &'r AnyRow, col: &str) -> Result<T, sqlx::Error>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    use sqlx::Row;
    row.try_get(col)
}

fn parse_col<T: FromStr<Err = String>>(row: &AnyRow, col: &str) -> Result<T, sqlx::Error> {
    let s: String = get(row, col)?;
    s.parse().map_err(|e: String| sqlx::Error::Decode(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_get_create_mode() {
        assert_eq!(prepare_sqlite_url("sqlite:///tmp/x/p.db").unwrap(), "sqlite:///tmp/x/p.db?mode=rwc");
        assert_eq!(
            prepare_sqlite_url("sqlite:///tmp/p.db?cache=shared").unwrap(),
            "sqlite:///tmp/p.db?cache=shared&mode=rwc"
        );
        assert!(prepare_sqlite_url("sqlite::memory:").is_err());
    }

    #[test]
    fn engines_by_scheme() {
        assert_eq!(Engine::of_url("postgresql://x/y"), Some(Engine::Postgres));
        assert_eq!(Engine::of_url("mysql://x"), None);
    }
}
