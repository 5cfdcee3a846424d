//! The server harness: `spawn_app` starts the real server on port 0 with a
//! fresh database (a SQLite file or a PostgreSQL schema), the mock LLM and a
//! manual clock; `TestApp` owns its lifecycle (restart, kill, siblings).
//! `db_tests!` runs every test once per database engine.

use std::{future::Future, sync::Arc, time::Duration};

use palaver::{
    clock::ManualClock,
    config::{Environment, Secret, Settings},
    startup::Application,
};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use crate::mock_llm::MockLlm;

pub const DEFAULT_MODEL: &str = "openai/gpt-4o-mini";
pub const PROVIDER_KEY: &str = "sk-test-fake-key";
pub const SECRET_KEY: &str = "test-secret-key-that-is-long-enough-0123456789";
pub const PASSWORD: &str = "correct horse battery staple";
/// Seconds a provider may stay silent in tests (a hung mock answers 504).
pub const PROVIDER_TIMEOUT_SECS: u64 = 2;
/// Seconds a whole provider attempt may take in tests.
pub const PROVIDER_ATTEMPT_SECS: u64 = 30;
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

// ---------------------------------------------------------------------------
// Running a test against each database

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// Generates `sqlite::<name>` and `postgres::<name>` tokio tests for every
/// `async fn <name>(app: TestApp)` listed; names after `sqlite_only:` get the
/// SQLite variant only. `db_tests!(process; …)` runs the tests against the
/// real `palaver` binary in a child process instead of an in-process server.
macro_rules! db_tests {
    (process; $($rest:tt)*) => {
        $crate::harness::db_tests!(@with run_process_test; $($rest)*);
    };
    (@with $runner:ident; $($name:ident),* $(,)? $(; sqlite_only: $($lite:ident),* $(,)?)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    $crate::harness::$runner($crate::harness::Db::Sqlite, super::$name).await;
                }
            )*
            $($(
                #[tokio::test(flavor = "multi_thread")]
                async fn $lite() {
                    $crate::harness::$runner($crate::harness::Db::Sqlite, super::$lite).await;
                }
            )*)?
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    $crate::harness::$runner($crate::harness::Db::Postgres, super::$name).await;
                }
            )*
        }
    };
    ($($rest:tt)*) => {
        $crate::harness::db_tests!(@with run_test; $($rest)*);
    };
}
pub(crate) use db_tests;

/// Spawns the app on `db`, runs `test` and then drops the test's PostgreSQL
/// schema (also when the test panics; the panic is passed on).
pub async fn run_test<F, Fut>(db: Db, test: F)
where
    F: FnOnce(TestApp) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(app) = spawn_app(db).await else { return };
    run_spawned(app, test).await;
}

/// `run_test` with the server as a child process (`spawn_process_app`).
pub async fn run_process_test<F, Fut>(db: Db, test: F)
where
    F: FnOnce(TestApp) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(app) = spawn_process_app(db).await else { return };
    run_spawned(app, test).await;
}

async fn run_spawned<F, Fut>(app: TestApp, test: F)
where
    F: FnOnce(TestApp) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let database = app.database.clone();
    let outcome = tokio::spawn(test(app)).await;
    database.drop_schema().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_no_server_panics(&self.settings.server.data_dir);
        }
    }
}

/// Fails the test if a server process logged a panic (a panic in one of
/// its tasks does not stop it, so nothing else would notice).
fn assert_no_server_panics(data_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("server-") && name.ends_with(".log") {
            let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
            assert!(!log.contains("panicked at"), "{name} shows a panic in the server:\n{log}");
        }
    }
}

/// Where a test's data lives.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    /// The URL the server (and the test's direct SQL) uses.
    pub url: String,
    /// PostgreSQL only: the fresh schema and a URL to drop it through.
    pg_schema: Option<(String, String)>,
}

impl TestDatabase {
    fn sqlite(dir: &std::path::Path) -> Self {
        let url = format!("sqlite://{}", dir.join("palaver.db").display());
        // The server may run in a child process, so this one needs the drivers too.
        sqlx::any::install_default_drivers();
        Self { url, pg_schema: None }
    }

    /// A fresh schema in the test PostgreSQL database; `None` (with a note on
    /// stderr) when PostgreSQL cannot be reached outside CI.
    async fn postgres() -> Option<Self> {
        let base = std::env::var("PALAVER_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
        sqlx::any::install_default_drivers();
        let connected = tokio::time::timeout(Duration::from_secs(5), sqlx::AnyConnection::connect(&base)).await;
        let mut conn = match connected {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return postgres_unavailable(&base, &e.to_string()),
            Err(_) => return postgres_unavailable(&base, "connection timed out after 5 s"),
        };
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("cannot create schema {schema} in {base}: {e}"));
        let _ = conn.close().await;
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
        Some(Self { url, pg_schema: Some((schema, base)) })
    }

    pub async fn drop_schema(&self) {
        let Some((schema, base)) = &self.pg_schema else { return };
        if let Ok(mut conn) = sqlx::AnyConnection::connect(base).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE")))
                .execute(&mut conn)
                .await;
            let _ = conn.close().await;
        }
    }

    /// Runs one statement with text parameters (`$1`, `$2`, … on both engines).
    pub async fn execute(&self, sql: &'static str, params: &[&str]) -> u64 {
        let mut conn = sqlx::AnyConnection::connect(&self.url).await.expect("connect to the test database");
        let mut query = sqlx::query(sql);
        for p in params {
            query = query.bind(p.to_string());
        }
        let done = query.execute(&mut conn).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        let _ = conn.close().await;
        done.rows_affected()
    }

    /// Runs a query answering one integer, e.g. `SELECT COUNT(*) …`.
    pub async fn scalar(&self, sql: &'static str, params: &[&str]) -> i64 {
        let mut conn = sqlx::AnyConnection::connect(&self.url).await.expect("connect to the test database");
        let mut query = sqlx::query_scalar::<_, i64>(sql);
        for p in params {
            query = query.bind(p.to_string());
        }
        let value = query.fetch_one(&mut conn).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        let _ = conn.close().await;
        value
    }
}

fn postgres_unavailable(url: &str, reason: &str) -> Option<TestDatabase> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("PostgreSQL at {url} is unreachable ({reason}); with CI=true the postgres tests must run");
    }
    eprintln!("skipping postgres test: PostgreSQL at {url} is unreachable: {reason}");
    None
}

// ---------------------------------------------------------------------------
// The application under test

pub struct TestApp {
    /// `http://127.0.0.1:<port>`
    pub address: String,
    pub port: u16,
    /// A plain client: no cookie store, so tests state every credential.
    pub client: reqwest::Client,
    pub provider: MockLlm,
    pub clock: ManualClock,
    pub settings: Settings,
    pub database: TestDatabase,
    server: Server,
    /// Server processes started after the first (names their logs).
    restarts: usize,
    _data_dir: tempfile::TempDir,
}

/// A second server process on the same database (see `TestApp::sibling`).
pub struct Sibling {
    /// `http://127.0.0.1:<port>`
    pub address: String,
    pub port: u16,
    _server: Server,
}

pub async fn spawn_app(db: Db) -> Option<TestApp> {
    let (settings, data_dir, database, clock, provider) = test_settings(db).await?;
    let server = start_server(settings.clone(), clock.clone()).await;
    Some(TestApp::new(server, settings, data_dir, database, clock, provider))
}

impl TestApp {
    fn new(
        server: Server,
        settings: Settings,
        data_dir: tempfile::TempDir,
        database: TestDatabase,
        clock: ManualClock,
        provider: MockLlm,
    ) -> Self {
        Self {
            address: format!("http://127.0.0.1:{}", server.port),
            port: server.port,
            client: new_client(),
            provider,
            clock,
            settings,
            database,
            server,
            restarts: 0,
            _data_dir: data_dir,
        }
    }
}

/// Like `spawn_app`, but the server is the real `palaver` binary in a child
/// process (configured through its environment, on the system clock), so a
/// test can `kill -9` it and read its memory use. Replies are saved every
/// 100 ms.
pub async fn spawn_process_app(db: Db) -> Option<TestApp> {
    spawn_process_app_with(db, |_| {}).await
}

/// `spawn_process_app` with changed settings (e.g. a `redis_url`).
pub async fn spawn_process_app_with(db: Db, change: impl FnOnce(&mut Settings)) -> Option<TestApp> {
    spawn_limited_process_app(db, None, change).await
}

/// `spawn_process_app_with`, the server started with this open-file limit
/// (soft and hard, so it cannot raise it); a restart drops the limit.
pub async fn spawn_limited_process_app(
    db: Db,
    open_files: Option<u64>,
    change: impl FnOnce(&mut Settings),
) -> Option<TestApp> {
    let (mut settings, data_dir, database, clock, provider) = test_settings(db).await?;
    settings.chat.stream_flush_ms = 100;
    settings.server.log_level = "warn".into();
    change(&mut settings);
    let server = start_process_limited(&settings, 0, open_files).await;
    Some(TestApp::new(server, settings, data_dir, database, clock, provider))
}

async fn test_settings(db: Db) -> Option<(Settings, tempfile::TempDir, TestDatabase, ManualClock, MockLlm)> {
    let data_dir = tempfile::tempdir().expect("create a temporary data dir");
    let database = match db {
        Db::Sqlite => TestDatabase::sqlite(data_dir.path()),
        Db::Postgres => TestDatabase::postgres().await?,
    };
    let clock = ManualClock::starting_now();
    let provider = MockLlm::start(clock.clone()).await;

    let mut settings = Settings::defaults();
    settings.server.environment = Environment::Development;
    settings.server.bind = "127.0.0.1:0".parse().unwrap();
    settings.server.data_dir = data_dir.path().to_path_buf();
    settings.server.database_url = Some(Secret(database.url.clone()));
    settings.server.redis_url = None;
    // Tests run side by side, several instances each, on one PostgreSQL
    // (100 connections): each instance keeps to a few.
    settings.server.database_max_connections = Some(8);
    // Tests share the machine's Redis: each one keeps to its own keys.
    settings.server.redis_prefix = format!("palaver-test-{}", uuid::Uuid::new_v4().simple());
    settings.auth.secret_key = Some(Secret(SECRET_KEY.into()));
    settings.auth.access_token_expire_minutes = 30;
    settings.auth.refresh_token_expire_days = 14;
    settings.server.cors_origins = Vec::new();
    settings.providers.openai_api_key = Some(Secret(PROVIDER_KEY.into()));
    settings.providers.openai_base_url = provider.base_url.clone();
    settings.providers.default_model = Some(DEFAULT_MODEL.into());
    settings.providers.provider_timeout = PROVIDER_ATTEMPT_SECS;
    settings.providers.provider_idle_timeout = PROVIDER_TIMEOUT_SECS;
    settings.chat.max_message_chars = 32_000;
    settings.server.shutdown_grace = 1;
    // Every test registers its users from 127.0.0.1.
    settings.auth.registrations_per_ip = 100_000;
    Some((settings, data_dir, database, clock, provider))
}

/// A running server: its port and how it runs.
struct Server {
    port: u16,
    run: Running,
}

enum Running {
    /// In this process: its task and the token that stops it.
    InProcess { task: tokio::task::JoinHandle<()>, shutdown: CancellationToken },
    /// The `palaver` binary (killed when dropped).
    Process(tokio::process::Child),
}

impl Drop for Server {
    fn drop(&mut self) {
        match &mut self.run {
            Running::InProcess { task, shutdown } => {
                shutdown.cancel();
                task.abort();
            }
            Running::Process(child) => {
                let _ = child.start_kill();
            }
        }
    }
}

async fn start_server(settings: Settings, clock: ManualClock) -> Server {
    let app = Application::build_with_clock(settings, Arc::new(clock))
        .await
        .unwrap_or_else(|e| panic!("the application failed to build: {e:#}"));
    let port = app.port();
    let shutdown = app.shutdown_token();
    let task = tokio::spawn(async move {
        if let Err(e) = app.run_until_stopped().await {
            panic!("the server stopped with an error: {e:#}");
        }
    });
    Server { port, run: Running::InProcess { task, shutdown } }
}

/// Starts `palaver serve` with `settings` as its environment (and nothing
/// else from ours) on a free port, and waits until it answers `/health`.
/// Its log goes to `server-<n>.log` in the data dir.
async fn start_process(settings: &Settings, n: usize) -> Server {
    start_process_limited(settings, n, None).await
}

async fn start_process_limited(settings: &Settings, n: usize, open_files: Option<u64>) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let log_path = settings.server.data_dir.join(format!("server-{n}.log"));
    let log = std::fs::File::create(&log_path).expect("create the server log");
    let secret = |s: &Option<Secret>| s.as_ref().map(|s| s.expose().to_owned()).unwrap_or_default();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_palaver"));
    command.env_clear();
    if let Some(format) = settings.server.log_format {
        command.env("PALAVER_LOG_FORMAT", format!("{format:?}").to_lowercase());
    }
    if let Some(redis) = &settings.server.redis_url {
        command.env("REDIS_URL", redis.expose()).env("PALAVER_REDIS_PREFIX", &settings.server.redis_prefix);
    }
    if let Some(max) = settings.server.max_connections {
        command.env("PALAVER_MAX_CONNECTIONS", max.to_string());
    }
    if let Some(rpm) = settings.limits.rate_limit_rpm {
        command.env("PALAVER_RATE_LIMIT_RPM", rpm.to_string());
    }
    command
        .env("PALAVER_BUDGET_RESERVATION_TTL", settings.limits.budget_reservation_ttl.to_string())
        .env("PALAVER_BUDGET_DEFAULT_RESERVE", settings.limits.budget_default_reserve.to_string());
    if let Some(limit) = open_files {
        // SAFETY: setrlimit is async-signal-safe and touches no memory of ours.
        unsafe {
            command.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, limit, limit));
        }
    }
    let child = command
        .arg("serve")
        .current_dir(&settings.server.data_dir)
        .env("PALAVER_BIND", format!("127.0.0.1:{port}"))
        .env("PALAVER_DATA_DIR", &settings.server.data_dir)
        .env("DATABASE_URL", secret(&settings.server.database_url))
        .env("SECRET_KEY", secret(&settings.auth.secret_key))
        .env("OPENAI_API_KEY", secret(&settings.providers.openai_api_key))
        .env("OPENAI_BASE_URL", &settings.providers.openai_base_url)
        .env("PALAVER_DEFAULT_MODEL", settings.providers.default_model.as_deref().unwrap_or(DEFAULT_MODEL))
        .env("PALAVER_PROVIDER_TIMEOUT", settings.providers.provider_timeout.to_string())
        .env("PALAVER_PROVIDER_IDLE_TIMEOUT", settings.providers.provider_idle_timeout.to_string())
        .env("PALAVER_STREAM_FLUSH_MS", settings.chat.stream_flush_ms.to_string())
        .env("PALAVER_REPLY_TAKEOVER", settings.chat.reply_takeover.to_string())
        .env("PALAVER_SHUTDOWN_GRACE", settings.server.shutdown_grace.to_string())
        .env("PALAVER_HEADER_READ_TIMEOUT", settings.server.header_read_timeout.to_string())
        .env("PALAVER_IDLE_TIMEOUT", settings.server.idle_timeout.to_string())
        .env("PALAVER_REGISTRATIONS_PER_IP", settings.auth.registrations_per_ip.to_string())
        .env("PALAVER_RETENTION_SWEEP_SECS", settings.retention.retention_sweep_secs.to_string())
        .envs(settings.retention.retention_days.map(|d| ("PALAVER_RETENTION_DAYS", d.to_string())))
        .envs(settings.retention.support_retention_days.map(|d| ("PALAVER_SUPPORT_RETENTION_DAYS", d.to_string())))
        .envs(settings.server.database_max_connections.map(|n| ("PALAVER_DATABASE_MAX_CONNECTIONS", n.to_string())))
        .env("RUST_LOG", &settings.server.log_level)
        .stdin(std::process::Stdio::null())
        // Log lines go to stdout, panics to stderr: both into the log.
        .stdout(log.try_clone().expect("share the server log"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start the palaver binary");
    let server = Server { port, run: Running::Process(child) };
    let health = format!("http://127.0.0.1:{port}/health");
    let client = new_client();
    for _ in 0..200 {
        if client.get(&health).send().await.is_ok_and(|r| r.status().is_success()) {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    panic!("the palaver binary did not answer /health within 10 s; its log:\n{log}");
}

fn new_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("build the test HTTP client")
}

impl TestApp {
    /// Stops the server (as SIGTERM would) and starts a new one on the same
    /// database and clock.
    pub async fn restart(&mut self) {
        // Drop keep-alive connections so the old server has nothing to drain.
        self.client = new_client();
        self.server = match &mut self.server.run {
            Running::InProcess { task, shutdown } => {
                shutdown.cancel();
                let stopped = tokio::time::timeout(Duration::from_secs(30), task).await;
                assert!(stopped.is_ok(), "the server did not stop within 30 s of the shutdown request");
                start_server(self.settings.clone(), self.clock.clone()).await
            }
            Running::Process(child) => {
                assert!(
                    child.try_wait().expect("poll the server process").is_some(),
                    "restart a server process only after it died (kill_server)"
                );
                self.restarts += 1;
                start_process(&self.settings, self.restarts).await
            }
        };
        self.port = self.server.port;
        self.address = format!("http://127.0.0.1:{}", self.port);
    }

    /// Another `palaver` process on the same settings and database (another
    /// instance behind the same load balancer); stopped when dropped.
    pub async fn sibling(&mut self) -> Sibling {
        assert!(matches!(self.server.run, Running::Process(_)), "siblings go with spawn_process_app");
        self.restarts += 1;
        let server = start_process(&self.settings, self.restarts).await;
        Sibling { address: format!("http://127.0.0.1:{}", server.port), port: server.port, _server: server }
    }

    /// `kill -9` of a server process: no shutdown, no last writes.
    pub async fn kill_server(&mut self) {
        let Running::Process(child) = &mut self.server.run else { panic!("only a server process can be killed") };
        child.kill().await.expect("SIGKILL the server process");
    }

    /// SIGTERM to the server process; true once it has exited, within `within`.
    pub async fn terminate_server(&mut self, within: Duration) -> bool {
        let Running::Process(child) = &mut self.server.run else { panic!("only a server process gets signals") };
        let pid = child.id().expect("the server process is running");
        let sent = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid} failed");
        tokio::time::timeout(within, child.wait()).await.is_ok()
    }

    /// The server process's id.
    pub fn server_pid(&self) -> u32 {
        let Running::Process(child) = &self.server.run else { panic!("only a server process has a pid of its own") };
        child.id().expect("the server process is running")
    }

    /// The server process's log so far (its log lines and anything it printed).
    pub fn server_log(&self) -> String {
        let path = self.settings.server.data_dir.join(format!("server-{}.log", self.restarts));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// The server process's resident memory in KiB (`VmRSS`).
    pub fn server_rss_kib(&self) -> u64 {
        let Running::Process(child) = &self.server.run else { panic!("only a server process has its own memory") };
        let pid = child.id().expect("the server process is running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// Restarts the server with changed settings (same database).
    pub async fn restart_with(&mut self, change: impl FnOnce(&mut Settings)) {
        change(&mut self.settings);
        self.restart().await;
    }

    /// Lets time pass on the server's clock.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// One second passes: later writes get a later timestamp than earlier ones.
    pub fn tick(&self) {
        self.advance(Duration::from_secs(1));
    }
}

/// The test Redis (`PALAVER_TEST_REDIS_URL`, default the local one), or None
/// with a printed reason when it is unreachable outside CI. In CI a missing
/// Redis fails the test.
pub async fn redis_url() -> Option<String> {
    let url = std::env::var("PALAVER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let addr = url.trim_start_matches("redis://").split('/').next().unwrap_or("127.0.0.1:6379").to_owned();
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(&addr)).await {
        Ok(Ok(_)) => Some(url),
        other => {
            let reason = format!("Redis at {addr} is unreachable: {other:?}");
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{reason} (CI=true requires it)");
            }
            eprintln!("skipping redis part of the test: {reason}");
            None
        }
    }
}
