//! The test harness: `spawn_app` starts the real server on port 0 with a fresh
//! database (a SQLite file or a PostgreSQL schema), the mock OpenAI provider
//! and a manual clock; `TestApp` offers typed helpers so tests read like the
//! SPEC. `db_tests!` runs every test once per database engine.

use std::{future::Future, sync::Arc, time::Duration};

use palaver::{
    clock::ManualClock,
    config::{Environment, Secret, Settings},
    startup::Application,
};
use reqwest::{Method, RequestBuilder, StatusCode, header::HeaderMap};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use crate::mock_openai::MockOpenAi;

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
        $crate::helpers::db_tests!(@with run_process_test; $($rest)*);
    };
    (@with $runner:ident; $($name:ident),* $(,)? $(; sqlite_only: $($lite:ident),* $(,)?)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    $crate::helpers::$runner($crate::helpers::Db::Sqlite, super::$name).await;
                }
            )*
            $($(
                #[tokio::test(flavor = "multi_thread")]
                async fn $lite() {
                    $crate::helpers::$runner($crate::helpers::Db::Sqlite, super::$lite).await;
                }
            )*)?
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    $crate::helpers::$runner($crate::helpers::Db::Postgres, super::$name).await;
                }
            )*
        }
    };
    ($($rest:tt)*) => {
        $crate::helpers::db_tests!(@with run_test; $($rest)*);
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
            assert_no_server_panics(&self.settings.data_dir);
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
    pub provider: MockOpenAi,
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
    Some(TestApp {
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
    })
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
    settings.stream_flush_ms = 100;
    settings.log_level = "warn".into();
    change(&mut settings);
    let server = start_process_limited(&settings, 0, open_files).await;
    Some(TestApp {
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
    })
}

async fn test_settings(db: Db) -> Option<(Settings, tempfile::TempDir, TestDatabase, ManualClock, MockOpenAi)> {
    let data_dir = tempfile::tempdir().expect("create a temporary data dir");
    let database = match db {
        Db::Sqlite => TestDatabase::sqlite(data_dir.path()),
        Db::Postgres => TestDatabase::postgres().await?,
    };
    let clock = ManualClock::starting_now();
    let provider = MockOpenAi::start(clock.clone()).await;

    let mut settings = Settings::defaults();
    settings.environment = Environment::Development;
    settings.bind = "127.0.0.1:0".parse().unwrap();
    settings.data_dir = data_dir.path().to_path_buf();
    settings.database_url = Some(Secret(database.url.clone()));
    settings.redis_url = None;
    // Tests share the machine's Redis: each one keeps to its own keys.
    settings.redis_prefix = format!("palaver-test-{}", uuid::Uuid::new_v4().simple());
    settings.secret_key = Some(Secret(SECRET_KEY.into()));
    settings.access_token_expire_minutes = 30;
    settings.refresh_token_expire_days = 14;
    settings.cors_origins = Vec::new();
    settings.openai_api_key = Some(Secret(PROVIDER_KEY.into()));
    settings.openai_base_url = provider.base_url.clone();
    settings.default_model = Some(DEFAULT_MODEL.into());
    settings.provider_timeout = PROVIDER_ATTEMPT_SECS;
    settings.provider_idle_timeout = PROVIDER_TIMEOUT_SECS;
    settings.max_message_chars = 32_000;
    settings.shutdown_grace = 1;
    // Every test registers its users from 127.0.0.1.
    settings.registrations_per_ip = 100_000;
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
    let log_path = settings.data_dir.join(format!("server-{n}.log"));
    let log = std::fs::File::create(&log_path).expect("create the server log");
    let secret = |s: &Option<Secret>| s.as_ref().map(|s| s.expose().to_owned()).unwrap_or_default();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_palaver"));
    command.env_clear();
    if let Some(format) = settings.log_format {
        command.env("PALAVER_LOG_FORMAT", format!("{format:?}").to_lowercase());
    }
    if let Some(redis) = &settings.redis_url {
        command.env("REDIS_URL", redis.expose()).env("PALAVER_REDIS_PREFIX", &settings.redis_prefix);
    }
    if let Some(max) = settings.max_connections {
        command.env("PALAVER_MAX_CONNECTIONS", max.to_string());
    }
    if let Some(limit) = open_files {
        // SAFETY: setrlimit is async-signal-safe and touches no memory of ours.
        unsafe {
            command.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, limit, limit));
        }
    }
    let child = command
        .arg("serve")
        .current_dir(&settings.data_dir)
        .env("PALAVER_BIND", format!("127.0.0.1:{port}"))
        .env("PALAVER_DATA_DIR", &settings.data_dir)
        .env("DATABASE_URL", secret(&settings.database_url))
        .env("SECRET_KEY", secret(&settings.secret_key))
        .env("OPENAI_API_KEY", secret(&settings.openai_api_key))
        .env("OPENAI_BASE_URL", &settings.openai_base_url)
        .env("PALAVER_DEFAULT_MODEL", settings.default_model.as_deref().unwrap_or(DEFAULT_MODEL))
        .env("PALAVER_PROVIDER_TIMEOUT", settings.provider_timeout.to_string())
        .env("PALAVER_PROVIDER_IDLE_TIMEOUT", settings.provider_idle_timeout.to_string())
        .env("PALAVER_STREAM_FLUSH_MS", settings.stream_flush_ms.to_string())
        .env("PALAVER_SHUTDOWN_GRACE", settings.shutdown_grace.to_string())
        .env("PALAVER_HEADER_READ_TIMEOUT", settings.header_read_timeout.to_string())
        .env("PALAVER_IDLE_TIMEOUT", settings.idle_timeout.to_string())
        .env("PALAVER_REGISTRATIONS_PER_IP", settings.registrations_per_ip.to_string())
        .env("RUST_LOG", &settings.log_level)
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
        let path = self.settings.data_dir.join(format!("server-{}.log", self.restarts));
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

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.request(Method::GET, path)
    }

    pub fn post(&self, path: &str) -> RequestBuilder {
        self.request(Method::POST, path)
    }

    pub fn patch(&self, path: &str) -> RequestBuilder {
        self.request(Method::PATCH, path)
    }

    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.request(Method::DELETE, path)
    }

    // -- accounts ----------------------------------------------------------

    pub async fn register(&self, body: Value) -> ApiResponse {
        self.post("/api/auth/register").json(&body).fetch().await
    }

    pub async fn login(&self, body: Value) -> ApiResponse {
        self.post("/api/auth/login").json(&body).fetch().await
    }

    pub async fn refresh(&self, refresh_token: &str) -> ApiResponse {
        self.post("/api/auth/refresh").json(&json!({ "refresh_token": refresh_token })).fetch().await
    }

    /// Registers a fresh user and logs them in.
    pub async fn signup(&self) -> TestUser {
        let username = format!("user_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let email = format!("{username}@example.com");
        let registered = self
            .register(
                json!({ "email": email, "username": username, "password": PASSWORD, "display_name": "Test User" }),
            )
            .await;
        registered.assert_status(StatusCode::CREATED);
        let id = registered.body["id"].as_str().expect("user id").to_owned();
        self.login_as(&TestUser::new(id, email, username, PASSWORD)).await
    }

    /// Registers a user, makes them admin directly in the database (the CLI
    /// cannot run in-process) and logs them in again.
    pub async fn signup_admin(&self) -> TestUser {
        let user = self.signup().await;
        self.set_role(&user, "admin").await;
        self.login_as(&user).await
    }

    pub async fn set_role(&self, user: &TestUser, role: &str) {
        let changed = self.database.execute("UPDATE users SET role = $1 WHERE id = $2", &[role, &user.id]).await;
        assert_eq!(changed, 1, "no user row with id {}", user.id);
    }

    /// A new login session for `user` (the returned copy carries its tokens).
    pub async fn login_as(&self, user: &TestUser) -> TestUser {
        self.login_as_with_agent(user, None).await
    }

    pub async fn login_as_with_agent(&self, user: &TestUser, user_agent: Option<&str>) -> TestUser {
        let mut request = self.post("/api/auth/login").json(&json!({ "login": user.email, "password": user.password }));
        if let Some(ua) = user_agent {
            request = request.header(reqwest::header::USER_AGENT, ua);
        }
        let response = request.fetch().await;
        response.assert_status(StatusCode::OK);
        let mut user = user.clone();
        user.token = response.str("access_token").to_owned();
        user.refresh_token = response.str("refresh_token").to_owned();
        user.csrf_token = response.str("csrf_token").to_owned();
        user.session_cookie = response.cookie("palaver_session").map(|c| c.value).unwrap_or_default();
        user
    }

    pub async fn me(&self, user: &TestUser) -> ApiResponse {
        self.get("/api/users/me").bearer_auth(&user.token).fetch().await
    }

    // -- conversations -----------------------------------------------------

    /// Creates a conversation and returns it (asserting 201).
    pub async fn create_conversation(&self, user: &TestUser, body: Value) -> Value {
        let response = self.post("/api/conversations").bearer_auth(&user.token).json(&body).fetch().await;
        response.assert_status(StatusCode::CREATED);
        response.body
    }

    /// Creates an untitled conversation and returns its id.
    pub async fn new_conversation(&self, user: &TestUser) -> String {
        self.create_conversation(user, json!({})).await["id"].as_str().unwrap().to_owned()
    }

    pub async fn post_message(&self, user: &TestUser, conversation_id: &str, body: Value) -> ApiResponse {
        self.post(&format!("/api/conversations/{conversation_id}/messages"))
            .bearer_auth(&user.token)
            .json(&body)
            .fetch()
            .await
    }

    /// Sends `content` and returns `{user_message, assistant_message}` (asserting 201).
    pub async fn say(&self, user: &TestUser, conversation_id: &str, content: &str) -> Value {
        let response = self.post_message(user, conversation_id, json!({ "content": content })).await;
        response.assert_status(StatusCode::CREATED);
        response.body
    }

    pub async fn conversation(&self, user: &TestUser, conversation_id: &str) -> ApiResponse {
        self.get(&format!("/api/conversations/{conversation_id}")).bearer_auth(&user.token).fetch().await
    }

    pub async fn messages(&self, user: &TestUser, conversation_id: &str, query: &str) -> ApiResponse {
        self.get(&format!("/api/conversations/{conversation_id}/messages{query}"))
            .bearer_auth(&user.token)
            .fetch()
            .await
    }

    pub async fn chat(&self, user: &TestUser, body: Value) -> ApiResponse {
        self.post("/api/chat").bearer_auth(&user.token).json(&body).fetch().await
    }
}

/// A registered user and the tokens of one of their login sessions.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: String,
    pub email: String,
    pub username: String,
    pub password: String,
    pub token: String,
    pub refresh_token: String,
    pub csrf_token: String,
    pub session_cookie: String,
}

impl TestUser {
    pub fn new(id: String, email: String, username: String, password: &str) -> Self {
        Self {
            id,
            email,
            username,
            password: password.to_owned(),
            token: String::new(),
            refresh_token: String::new(),
            csrf_token: String::new(),
            session_cookie: String::new(),
        }
    }

    /// The `Cookie` header a browser would send after this login.
    pub fn cookie_header(&self) -> String {
        format!("palaver_session={}; palaver_csrf={}", self.session_cookie, self.csrf_token)
    }
}

// ---------------------------------------------------------------------------
// Responses

/// A response read whole: status, headers, text and (if it parses) JSON.
#[derive(Debug)]
pub struct ApiResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
    pub body: Value,
}

pub trait Fetch {
    fn fetch(self) -> impl Future<Output = ApiResponse> + Send;
}

impl Fetch for RequestBuilder {
    async fn fetch(self) -> ApiResponse {
        let response = self.send().await.unwrap_or_else(|e| panic!("request failed: {e:?}"));
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_else(|e| panic!("reading the body failed: {e:?}"));
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        ApiResponse { status, headers, text, body }
    }
}

#[derive(Debug, Clone)]
pub struct SetCookie {
    pub value: String,
    /// Attribute names and values as sent, e.g. `("samesite", "Lax")`, names lowercased.
    pub attributes: Vec<(String, String)>,
}

impl SetCookie {
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes.iter().find(|(n, _)| n == &name.to_ascii_lowercase()).map(|(_, v)| v.as_str())
    }

    pub fn has_flag(&self, name: &str) -> bool {
        self.attribute(name).is_some()
    }
}

impl ApiResponse {
    fn describe(&self) -> String {
        format!("{} {}", self.status, self.text.chars().take(2000).collect::<String>())
    }

    #[track_caller]
    pub fn assert_status(&self, expected: StatusCode) -> &Self {
        assert_eq!(self.status, expected, "unexpected answer: {}", self.describe());
        self
    }

    /// A string field of the JSON body.
    #[track_caller]
    pub fn str(&self, field: &str) -> &str {
        self.body[field].as_str().unwrap_or_else(|| panic!("no string field {field:?} in {}", self.describe()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    #[track_caller]
    pub fn assert_json(&self) -> &Self {
        let ct = self.header("content-type").unwrap_or_default();
        assert!(ct.starts_with("application/json"), "expected a JSON content type, got {ct:?}: {}", self.describe());
        assert!(!self.body.is_null(), "expected a JSON body: {}", self.describe());
        self
    }

    /// `{detail, code}` with this status and code (SPEC §1).
    #[track_caller]
    pub fn assert_error(&self, status: StatusCode, code: &str) -> &Self {
        self.assert_status(status);
        self.assert_error_shape();
        assert_eq!(self.body["code"], code, "unexpected error code: {}", self.describe());
        self
    }

    /// Any error in the `{detail, code}` format.
    #[track_caller]
    pub fn assert_error_shape(&self) -> &Self {
        self.assert_json();
        let detail = self.body["detail"].as_str().unwrap_or_default();
        assert!(!detail.is_empty(), "error without a detail sentence: {}", self.describe());
        let code = self.body["code"].as_str().unwrap_or_default();
        assert!(
            !code.is_empty() && code.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()),
            "error code is not snake_case: {}",
            self.describe()
        );
        self
    }

    /// 422 whose `errors` name `field` (any code).
    #[track_caller]
    pub fn assert_invalid(&self, field: &str) -> &Self {
        self.assert_status(StatusCode::UNPROCESSABLE_ENTITY);
        self.assert_error_shape();
        let errors =
            self.body["errors"].as_array().unwrap_or_else(|| panic!("422 without errors: {}", self.describe()));
        assert!(
            errors.iter().any(|e| e["field"] == field && e["message"].as_str().is_some_and(|m| !m.is_empty())),
            "expected an error on field {field:?}: {}",
            self.describe()
        );
        self
    }

    /// 422 with this code whose `errors` name `field`.
    #[track_caller]
    pub fn assert_invalid_with(&self, code: &str, field: &str) -> &Self {
        self.assert_invalid(field);
        assert_eq!(self.body["code"], code, "unexpected error code: {}", self.describe());
        self
    }

    /// A 4xx answer in the error format: the server refused politely.
    #[track_caller]
    pub fn assert_client_error(&self) -> &Self {
        assert!(self.status.is_client_error(), "expected a 4xx answer: {}", self.describe());
        self.assert_error_shape();
        self
    }

    /// Tables of hostile requests report every offender at once: `None` for
    /// a 4xx in the error format, else a line saying what `what` got.
    pub fn problem_unless_client_error(&self, what: &str) -> Option<String> {
        let shaped = self.header("content-type").is_some_and(|ct| ct.starts_with("application/json"))
            && self.body["detail"].as_str().is_some_and(|d| !d.is_empty())
            && self.body["code"].as_str().is_some_and(|c| !c.is_empty());
        (!self.status.is_client_error() || !shaped).then(|| format!("{what}: {}", self.describe()))
    }

    /// 401 `unauthorized` with `WWW-Authenticate: Bearer`.
    #[track_caller]
    pub fn assert_unauthorized(&self) -> &Self {
        self.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
        let challenge = self.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer"), "401 without WWW-Authenticate: Bearer (got {challenge:?})");
        self
    }

    /// The `Set-Cookie` for `name`, if any.
    pub fn cookie(&self, name: &str) -> Option<SetCookie> {
        self.headers.get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).find_map(|raw| {
            let mut parts = raw.split(';').map(str::trim);
            let (n, v) = parts.next()?.split_once('=')?;
            (n == name).then(|| SetCookie {
                value: v.trim_matches('"').to_owned(),
                attributes: parts
                    .map(|p| {
                        let (k, v) = p.split_once('=').unwrap_or((p, ""));
                        (k.trim().to_ascii_lowercase(), v.trim().to_owned())
                    })
                    .collect(),
            })
        })
    }

    /// The `items` of a list answer.
    #[track_caller]
    pub fn items(&self) -> &Vec<Value> {
        self.body["items"].as_array().unwrap_or_else(|| panic!("no items array: {}", self.describe()))
    }
}

// ---------------------------------------------------------------------------
// Shapes

/// The value is a UUID string.
#[track_caller]
pub fn assert_uuid(value: &Value) -> uuid::Uuid {
    let s = value.as_str().unwrap_or_else(|| panic!("expected a UUID string, got {value}"));
    uuid::Uuid::parse_str(s).unwrap_or_else(|e| panic!("{s:?} is not a UUID: {e}"))
}

/// The value is an RFC 3339 UTC time ending in `Z`.
#[track_caller]
pub fn assert_timestamp(value: &Value) -> time::OffsetDateTime {
    let s = value.as_str().unwrap_or_else(|| panic!("expected an RFC 3339 time, got {value}"));
    assert!(s.ends_with('Z'), "{s:?} is not UTC with a Z suffix");
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"))
}

/// A User object (SPEC §2) with the given role.
#[track_caller]
pub fn assert_user(value: &Value, role: &str) {
    assert_uuid(&value["id"]);
    assert_timestamp(&value["created_at"]);
    assert_eq!(value["role"], role, "role of {value}");
    for field in ["email", "username", "display_name"] {
        assert!(value.get(field).is_some(), "User lacks {field}: {value}");
    }
    let text = value.to_string().to_lowercase();
    assert!(!text.contains("password") && !text.contains("argon2"), "a User leaks its password hash: {value}");
}

/// A Message object (SPEC §3).
#[track_caller]
pub fn assert_message(value: &Value, conversation_id: &str, role: &str, status: &str) {
    assert_uuid(&value["id"]);
    assert_eq!(value["conversation_id"], conversation_id, "conversation_id of {value}");
    assert_eq!(value["role"], role, "role of {value}");
    assert_eq!(value["status"], status, "status of {value}");
    assert!(value["content"].is_string(), "content of {value}");
    assert_timestamp(&value["created_at"]);
    for field in ["model", "usage", "error"] {
        assert!(value.get(field).is_some(), "Message lacks {field}: {value}");
    }
}

/// A Conversation object (SPEC §3).
#[track_caller]
pub fn assert_conversation(value: &Value) {
    assert_uuid(&value["id"]);
    assert_timestamp(&value["created_at"]);
    assert_timestamp(&value["updated_at"]);
    assert!(value["message_count"].is_i64(), "message_count of {value}");
    for field in ["title", "system_prompt", "model", "last_message_at"] {
        assert!(value.get(field).is_some(), "Conversation lacks {field}: {value}");
    }
    if !value["last_message_at"].is_null() {
        assert_timestamp(&value["last_message_at"]);
    }
}

/// A page answer `{items, page, per_page, total}`.
#[track_caller]
pub fn assert_page(body: &Value, page: i64, per_page: i64, total: i64) {
    assert!(body["items"].is_array(), "page without items: {body}");
    assert_eq!(body["page"], page, "page of {body}");
    assert_eq!(body["per_page"], per_page, "per_page of {body}");
    assert_eq!(body["total"], total, "total of {body}");
}

/// `(role, content)` of a list of Messages.
pub fn turns(messages: &[Value]) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|m| {
            (m["role"].as_str().unwrap_or_default().to_owned(), m["content"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

/// `(role, content)` pairs from literals, for comparisons.
pub fn expected_turns(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(r, c)| (r.to_string(), c.to_string())).collect()
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

// ---------------------------------------------------------------------------
// Streams: server-sent events and the chat WebSocket

/// How long a test waits for the next event or frame before failing.
const STREAM_WAIT: Duration = Duration::from_secs(20);

/// One server-sent event with its JSON data.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: Value,
}

/// An open `text/event-stream` response, read event by event.
pub struct SseStream {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: Vec<u8>,
    ended: bool,
}

impl SseStream {
    /// Sends the request with `Accept: text/event-stream` and asserts a
    /// 200 event stream.
    pub async fn open(request: RequestBuilder) -> Self {
        let response = request
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .unwrap_or_else(|e| panic!("request failed: {e:?}"));
        let status = response.status();
        let headers = response.headers().clone();
        if status != StatusCode::OK {
            let text = response.text().await.unwrap_or_default();
            panic!("expected a 200 event stream, got {status}: {text}");
        }
        let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(ct.starts_with("text/event-stream"), "expected text/event-stream, got {ct:?}");
        Self { body: Box::pin(response.bytes_stream()), buffer: Vec::new(), ended: false }
    }

    /// The next event (comments and keep-alives skipped); `None` once the
    /// stream has ended. Fails the test after `STREAM_WAIT` of silence.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse_sse_block(&String::from_utf8_lossy(&block)) {
                    return Some(event);
                }
                continue;
            }
            if self.ended {
                assert!(self.buffer.iter().all(u8::is_ascii_whitespace), "stream ended inside an event");
                return None;
            }
            match tokio::time::timeout(STREAM_WAIT, futures::StreamExt::next(&mut self.body)).await {
                Err(_) => panic!("no server-sent event within {STREAM_WAIT:?}"),
                Ok(Some(Ok(bytes))) => self.buffer.extend_from_slice(&bytes),
                Ok(Some(Err(e))) => panic!("the event stream broke: {e:?}"),
                Ok(None) => self.ended = true,
            }
        }
    }

    /// The next event, which must exist.
    pub async fn expect(&mut self, name: &str) -> SseEvent {
        let event = self.next().await.unwrap_or_else(|| panic!("the stream ended before a {name:?} event"));
        assert_eq!(event.event, name, "unexpected event: {event:?}");
        event
    }

    /// Every remaining event up to the end of the stream.
    pub async fn rest(mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(e) = self.next().await {
            events.push(e);
        }
        events
    }
}

fn parse_sse_block(block: &str) -> Option<SseEvent> {
    let (mut event, mut id, mut data) = (String::from("message"), None, Vec::new());
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = value.to_owned(),
            "id" => id = Some(value.to_owned()),
            "data" => data.push(value),
            _ => {} // comments (keep-alives) and unknown fields
        }
    }
    if data.is_empty() {
        return None;
    }
    let data = data.join("\n");
    let data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data}"));
    Some(SseEvent { event, id, data })
}

/// The names of some events, for order checks.
pub fn event_names(events: &[SseEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

/// The text of the `delta` events, joined.
pub fn delta_text(events: &[SseEvent]) -> String {
    events.iter().filter(|e| e.event == "delta").filter_map(|e| e.data["text"].as_str()).collect()
}

impl TestApp {
    /// `POST /api/conversations/{id}/messages` asking for an event stream.
    pub async fn post_message_sse(
        &self,
        user: &TestUser,
        conversation_id: &str,
        content: &str,
        idempotency_key: Option<&str>,
    ) -> SseStream {
        let mut request = self
            .post(&format!("/api/conversations/{conversation_id}/messages"))
            .bearer_auth(&user.token)
            .json(&json!({ "content": content }));
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        SseStream::open(request).await
    }

    /// `POST /api/chat/stream`.
    pub async fn chat_stream(&self, user: &TestUser, body: Value) -> SseStream {
        SseStream::open(self.post("/api/chat/stream").bearer_auth(&user.token).json(&body)).await
    }

    /// The resume request for a reply's stream, to send as it is or open.
    pub fn resume_request(
        &self,
        user: &TestUser,
        conversation_id: &str,
        message_id: &str,
        last_event_id: Option<&str>,
    ) -> RequestBuilder {
        let mut request = self
            .get(&format!("/api/conversations/{conversation_id}/messages/{message_id}/stream"))
            .bearer_auth(&user.token);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        request
    }

    /// `GET …/messages/{message_id}/stream` with an optional `Last-Event-ID`.
    pub async fn resume(
        &self,
        user: &TestUser,
        conversation_id: &str,
        message_id: &str,
        last_event_id: Option<&str>,
    ) -> SseStream {
        SseStream::open(self.resume_request(user, conversation_id, message_id, last_event_id)).await
    }

    pub async fn cancel_reply(&self, user: &TestUser, conversation_id: &str, message_id: &str) -> ApiResponse {
        self.post(&format!("/api/conversations/{conversation_id}/messages/{message_id}/cancel"))
            .bearer_auth(&user.token)
            .fetch()
            .await
    }

    /// One stored message of a conversation (asserting it exists).
    pub async fn stored_message(&self, user: &TestUser, conversation_id: &str, message_id: &str) -> Value {
        let list = self.messages(user, conversation_id, "?limit=100").await;
        list.assert_status(StatusCode::OK);
        list.items()
            .iter()
            .find(|m| m["id"] == message_id)
            .cloned()
            .unwrap_or_else(|| panic!("message {message_id} is not stored: {}", list.text))
    }

    /// Polls until the message has left `streaming` (at most `within`) and
    /// returns it.
    pub async fn settled_message(
        &self,
        user: &TestUser,
        conversation_id: &str,
        message_id: &str,
        within: Duration,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let message = self.stored_message(user, conversation_id, message_id).await;
            if message["status"] != "streaming" {
                return message;
            }
            assert!(tokio::time::Instant::now() < deadline, "still streaming after {within:?}: {message}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `ws://…/api/ws?token=<access token>`.
    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://127.0.0.1:{}/api/ws?token={token}", self.port)
    }

    /// Opens the chat socket as `user`.
    pub async fn ws(&self, user: &TestUser) -> WsClient {
        let (socket, _) = tokio_tungstenite::connect_async(self.ws_url(&user.token))
            .await
            .unwrap_or_else(|e| panic!("the WebSocket handshake failed: {e:?}"));
        WsClient { socket }
    }
}

/// A chat WebSocket, read frame by frame.
pub struct WsClient {
    pub socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
}

/// What a socket gave instead of a text frame.
#[derive(Debug)]
pub enum WsEnd {
    /// A close frame with this code.
    Closed(Option<u16>),
    /// The connection ended without a close frame (or broke).
    Gone,
}

impl WsClient {
    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        use futures::SinkExt;
        self.socket
            .send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .unwrap_or_else(|e| panic!("sending a frame failed: {e:?}"));
    }

    /// A `message` frame.
    pub async fn send_message(&mut self, request_id: &str, conversation_id: Option<&str>, content: &str) {
        let frame = json!({
            "type": "message", "request_id": request_id, "conversation_id": conversation_id, "content": content
        });
        self.send(frame).await;
    }

    /// The next JSON text frame, or how the socket ended. Pings and pongs
    /// are skipped. Fails the test after `STREAM_WAIT` of silence.
    pub async fn next_or_end(&mut self) -> Result<Value, WsEnd> {
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let next = tokio::time::timeout(STREAM_WAIT, futures::StreamExt::next(&mut self.socket))
                .await
                .unwrap_or_else(|_| panic!("no WebSocket frame within {STREAM_WAIT:?}"));
            match next {
                Some(Ok(Message::Text(t))) => {
                    return Ok(serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("a frame that is not JSON ({e}): {t}")));
                }
                Some(Ok(Message::Close(frame))) => return Err(WsEnd::Closed(frame.map(|f| u16::from(f.code)))),
                Some(Ok(Message::Binary(b))) => panic!("unexpected binary frame of {} bytes", b.len()),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(WsEnd::Gone),
            }
        }
    }

    /// The next JSON text frame, which must come.
    pub async fn next(&mut self) -> Value {
        self.next_or_end().await.unwrap_or_else(|end| panic!("the socket ended: {end:?}"))
    }

    /// The next frame, which must have this `type`.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let frame = self.next().await;
        assert_eq!(frame["type"], kind, "unexpected frame: {frame}");
        frame
    }

    /// Frames until (and with) the `done` or `error` of `request_id`;
    /// frames of other requests are kept too.
    pub async fn until_finished(&mut self, request_id: &str) -> Vec<Value> {
        let mut frames = Vec::new();
        loop {
            let frame = self.next().await;
            let last = frame["request_id"] == request_id && (frame["type"] == "done" || frame["type"] == "error");
            frames.push(frame);
            if last {
                return frames;
            }
        }
    }
}

/// The `type`s of some frames, for order checks.
pub fn frame_types(frames: &[Value]) -> Vec<&str> {
    frames.iter().map(|f| f["type"].as_str().unwrap_or_default()).collect()
}

/// The text of the `delta` frames, joined.
pub fn frame_text(frames: &[Value]) -> String {
    frames.iter().filter(|f| f["type"] == "delta").filter_map(|f| f["text"].as_str()).collect()
}
