//! Building and running the application: configuration checks, the secret,
//! the database (migrated), the providers, and the HTTP server with graceful
//! shutdown. `Application::build` binds first, so port 0 works for tests.

use std::{
    io::Write,
    path::Path,
    sync::{Arc, OnceLock},
    time::Duration,
};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{PasswordHasher, TokenKeys},
    chat::TakeOver,
    clock::{Clock, SystemClock},
    config::{Environment, Settings},
    http::{self, AppState},
    ids::{Ids, UuidIds},
    providers::Providers,
    store::Store,
};

/// Shortest secret accepted in production.
pub const MIN_SECRET_LEN: usize = 32;
const SECRET_FILE: &str = "secret_key";

/// A problem with the configuration: reported in one line, exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

pub struct Application {
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with_clock(settings, Arc::new(SystemClock)).await
    }

    pub async fn build_with_clock(settings: Settings, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        Self::build_with(settings, clock, Arc::new(UuidIds)).await
    }

    /// With the clock and the source of ids injected (tests may fix both).
    pub async fn build_with(settings: Settings, clock: Arc<dyn Clock>, ids: Arc<dyn Ids>) -> anyhow::Result<Self> {
        let state = Arc::new(build_state(settings, clock, ids).await?);
        let listener = TcpListener::bind(state.settings.server.bind)
            .await
            .map_err(|e| ConfigError(format!("cannot listen on {}: {e}", state.settings.server.bind)))?;
        let shutdown = state.shutdown.clone();
        Ok(Self { listener, state, shutdown })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Cancelling this token stops the server as SIGTERM would.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until SIGTERM/Ctrl-C or the shutdown token; open requests get
    /// the configured grace period to finish.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let grace = Duration::from_secs(self.state.settings.server.shutdown_grace);
        let router = http::router(self.state.clone());
        spawn_sweeper(self.state.clone(), self.shutdown.clone());
        spawn_flusher(self.state.clone(), self.shutdown.clone());
        crate::retention::Sweeper {
            store: self.state.store.clone(),
            clock: self.state.clock.clone(),
            settings: self.state.settings.retention.clone(),
            // Unique per process even where tests inject counting ids.
            holder: uuid::Uuid::new_v4().to_string(),
        }
        .spawn(self.shutdown.clone());
        let token = self.shutdown.clone();
        let signal = async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = termination_signal() => tracing::info!("shutdown requested; draining open requests"),
            }
        };
        let limits = http::serve::Limits::from_settings(&self.state.settings.server);
        http::serve::serve(self.listener, router, limits, signal, grace).await;
        if !self.state.chat.replies.drain(grace).await {
            tracing::warn!(
                running = self.state.chat.replies.running(),
                "replies still generating at exit; the next start marks them failed"
            );
        }
        self.state.accounts.flush_key_uses().await;
        if !self.state.chat.flush_gateway_usage().await {
            tracing::warn!(
                tokens = self.state.chat.replies.usage.pending_tokens(),
                "usage totals could not be written before exit"
            );
        }
        self.shutdown.cancel();
        self.state.store.close().await;
        Ok(())
    }
}

async fn termination_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Everything the handlers share, after the configuration has been checked.
pub async fn build_state(settings: Settings, clock: Arc<dyn Clock>, ids: Arc<dyn Ids>) -> anyhow::Result<AppState> {
    check_cors(&settings)?;
    let secret = resolve_secret(&settings)?;
    let providers = Providers::from_settings(&settings.providers).map_err(|e| ConfigError(e.to_string()))?;
    if !providers.has_real_provider() {
        tracing::warn!(
            "no LLM provider is configured: answering with the offline provider. Set OPENAI_API_KEY \
             (OPENAI_BASE_URL for other OpenAI-compatible servers such as vLLM), GEMINI_API_KEY, ANTHROPIC_API_KEY, \
             OPENROUTER_API_KEY, GROQ_API_KEY or OLLAMA_BASE_URL for real answers"
        );
    }
    let redis = match &settings.server.redis_url {
        Some(url) => {
            Some(redis::Client::open(url.expose()).map_err(|e| ConfigError(format!("REDIS_URL is not usable: {e}")))?)
        }
        None => None,
    };
    let store = connect_store(&settings).await?;
    store.migrate().await?;
    let shutdown = CancellationToken::new();
    recover_interrupted_replies(&store, clock.as_ref(), &settings).await?;
    let metrics = metrics_handle();
    register_metrics(&providers);
    metrics::gauge!("palaver_support_queue_length").set(store.support_queue().await?.len() as f64);
    let counters =
        redis.clone().map(|client| crate::limits::SharedCounters::new(client, &settings.server.redis_prefix));
    let hasher = PasswordHasher::new();
    let accounts = crate::accounts::Accounts {
        store: store.clone(),
        clock: clock.clone(),
        ids: ids.clone(),
        hasher: hasher.clone(),
        key_uses: Default::default(),
        key_cache: crate::accounts::key_cache::KeyCache::start(
            &store,
            redis.as_ref(),
            &settings.server.redis_prefix,
            shutdown.clone(),
        ),
    };
    let chat = Arc::new(crate::chat::Chat {
        store: store.clone(),
        providers: providers.clone(),
        clock: clock.clone(),
        ids: ids.clone(),
        replies: Default::default(),
        settings: settings.chat.clone(),
        gateway_usage: Default::default(),
        history: Default::default(),
        quota: crate::quota::Quota::new(
            store.clone(),
            clock.clone(),
            ids.clone(),
            settings.limits.clone(),
            redis.clone().map(|client| crate::quota::SharedBudgets::new(client, &settings.server.redis_prefix)),
        ),
    });
    let desk = Arc::new(crate::desk::Desk::new(
        chat.clone(),
        crate::desk::bus::SupportBus::start(
            redis.as_ref(),
            &settings.server.redis_prefix,
            Arc::new(store.clone()),
            shutdown.clone(),
        )
        .await,
        &settings.support,
        counters.clone(),
    ));
    let login_throttle = crate::limits::LoginThrottle::new(counters, settings.auth.registrations_per_ip);
    Ok(AppState {
        store,
        clock,
        ids,
        keys: TokenKeys::new(&secret),
        hasher,
        accounts,
        providers,
        settings: Arc::new(settings),
        metrics: Some(metrics),
        chat,
        desk,
        login_throttle,
        redis,
        shutdown,
    })
}

const INTERRUPTED: &str = "interrupted: the server stopped while generating this reply";

/// How long a streaming reply may go without a heartbeat (its generator
/// saves it every `PALAVER_STREAM_FLUSH_MS`) before it counts as abandoned by
/// a dead instance. A reply that will be taken over gets a short lease, so its
/// followers wait at most a few seconds; one that will only be marked failed
/// is given longer.
fn stream_lease_ms(settings: &Settings) -> i64 {
    let flush = settings.chat.stream_flush_ms as i64;
    if settings.chat.reply_takeover { (flush * 4).max(4_000) } else { (flush * 5).max(10_000) }
}

/// Replies left `streaming` by a process that died are marked failed, so
/// nothing stays `streaming` forever. A SQLite file has one server, so all
/// of them are dead; on PostgreSQL other instances may be generating, so
/// only replies whose heartbeat has stopped are.
async fn recover_interrupted_replies(store: &Store, clock: &dyn Clock, settings: &Settings) -> anyhow::Result<()> {
    let now = clock.now_ms();
    let stale_before = match store.engine() {
        crate::store::Engine::Sqlite => i64::MAX,
        // The sweeper takes them over.
        crate::store::Engine::Postgres if settings.chat.reply_takeover => return Ok(()),
        crate::store::Engine::Postgres => now - stream_lease_ms(settings),
    };
    let n = store.fail_stale_streaming(INTERRUPTED, stale_before, now).await?;
    if n > 0 {
        tracing::warn!(count = n, "marked replies interrupted by a previous shutdown as failed");
    }
    Ok(())
}

/// Every few seconds: replies whose instance died are marked failed, and
/// idempotency keys past their lifetime are dropped.
fn spawn_sweeper(state: Arc<AppState>, stop: CancellationToken) {
    tokio::spawn(async move {
        let lease = stream_lease_ms(&state.settings);
        let mut tick = tokio::time::interval(Duration::from_millis((lease / 2) as u64));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = state.clock.now_ms();
            if let Err(e) = sweep_abandoned_replies(&state, now - lease, now).await {
                tracing::warn!(error = e.to_string().as_str(), "sweeping abandoned replies failed");
            }
            if let Err(e) = state.store.purge_idempotency_keys(now).await {
                tracing::warn!(error = e.to_string().as_str(), "purging idempotency keys failed");
            }
        }
    });
}

/// How often batched writes (gateway usage, keys' last use) are flushed.
const FLUSH_EVERY: Duration = Duration::from_secs(2);

/// Writes what the gateway's hot path only counted in memory.
fn spawn_flusher(state: Arc<AppState>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            state.accounts.flush_key_uses().await;
            state.chat.flush_gateway_usage().await;
        }
    });
}

/// Replies whose heartbeat stopped, except those running here (one of ours
/// may look stale only because the database was away, and it will store its
/// own final state): taken over and regenerated here, once per reply, when
/// `PALAVER_REPLY_TAKEOVER` allows; else, or the second time, marked failed.
async fn sweep_abandoned_replies(
    state: &AppState,
    stale_before: i64,
    now: i64,
) -> Result<(), crate::store::StoreError> {
    let (mut failed, mut taken) = (0, 0);
    for stale in state.store.stale_streaming(stale_before, 500).await? {
        if state.chat.replies.get(&stale.id).is_some() {
            continue;
        }
        let why = if state.settings.chat.reply_takeover {
            match state.chat.take_over(&stale, stale_before, now).await {
                Ok(TakeOver::Taken(reply)) => {
                    if stale.owner == crate::store::SUPPORT_USER_ID
                        && let Err(e) = state.desk.clone().forward_taken_over(reply).await
                    {
                        tracing::warn!(error = e.to_string().as_str(), "could not forward a taken-over support reply");
                    }
                    taken += 1;
                    continue;
                }
                Ok(TakeOver::Refused(why)) => Some(why),
                Ok(TakeOver::Lost) => None,
                Err(e) => {
                    tracing::warn!(error = e.to_string().as_str(), "could not take over a reply");
                    continue;
                }
            }
        } else {
            None
        };
        let error = match why {
            Some(why) => format!("{INTERRUPTED}; not generated again: {why}"),
            None => INTERRUPTED.to_owned(),
        };
        // Taken over before (or by another instance just now, which renewed it): then nothing changes.
        if state.store.fail_streaming(&stale.id, &error, stale_before, now).await? {
            failed += 1;
        }
    }
    if taken > 0 {
        tracing::warn!(count = taken, "took over replies whose instance stopped; regenerating them here");
    }
    if failed > 0 {
        tracing::warn!(count = failed, "marked replies whose instance stopped as failed");
    }
    Ok(())
}

/// The database named by DATABASE_URL, or SQLite in the data directory.
pub async fn connect_store(settings: &Settings) -> anyhow::Result<Store> {
    let url = match &settings.server.database_url {
        Some(u) => u.expose().to_owned(),
        None => format!("sqlite://{}", settings.server.data_dir.join("palaver.db").display()),
    };
    let timeout = Duration::from_secs(settings.server.database_timeout);
    Store::connect_with_pool(&url, timeout, settings.server.database_max_connections)
        .await
        .map_err(|e| ConfigError(format!("cannot open the database: {e}")).into())
}

fn check_cors(settings: &Settings) -> Result<(), ConfigError> {
    let wildcard = settings.server.cors_origins().iter().any(|o| o == "*");
    if wildcard && settings.server.environment == Environment::Production {
        return Err(ConfigError(
            "CORS_ORIGINS=* with credentials is refused in production: list the allowed origins".into(),
        ));
    }
    if wildcard {
        tracing::warn!(
            "CORS_ORIGINS=* lets every website call this server with the user's cookie; production refuses it"
        );
    }
    Ok(())
}

/// SECRET_KEY, or in development a generated one kept in the data directory.
fn resolve_secret(settings: &Settings) -> Result<String, ConfigError> {
    let production = settings.server.environment == Environment::Production;
    match &settings.auth.secret_key {
        Some(s) if s.expose().chars().count() >= MIN_SECRET_LEN => Ok(s.expose().to_owned()),
        Some(_) if production => {
            Err(ConfigError(format!("SECRET_KEY is too weak: production needs at least {MIN_SECRET_LEN} characters")))
        }
        Some(s) => {
            tracing::warn!("SECRET_KEY is shorter than {MIN_SECRET_LEN} characters; production would refuse it");
            Ok(s.expose().to_owned())
        }
        None if production => {
            Err(ConfigError("SECRET_KEY is not set: production needs a secret of at least 32 characters".into()))
        }
        None => {
            dev_secret(&settings.server.data_dir).map_err(|e| ConfigError(format!("cannot keep the dev secret: {e}")))
        }
    }
}

fn dev_secret(dir: &Path) -> std::io::Result<String> {
    let path = dir.join(SECRET_FILE);
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let existing = existing.trim().to_owned();
        if existing.len() >= MIN_SECRET_LEN {
            tracing::warn!(path = %path.display(), "using the development secret from the data directory; set SECRET_KEY in production");
            return Ok(existing);
        }
    }
    std::fs::create_dir_all(dir)?;
    let secret = crate::auth::random_token("");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&path)?;
    file.write_all(secret.as_bytes())?;
    tracing::warn!(path = %path.display(), "generated a development secret; set SECRET_KEY in production");
    Ok(secret)
}

/// The process-wide Prometheus recorder (installed once).
/// Every series a dashboard or an alert is likely to watch, present (at 0)
/// from the start rather than after its first use: the gauges, and the
/// provider call and token counters of each configured model. Added to by
/// nothing, so a second state in one process (tests) changes no value.
fn register_metrics(providers: &Providers) {
    for kind in ["chat", "support_client", "support_agent"] {
        metrics::gauge!("palaver_open_sockets", "kind" => kind).increment(0.0);
    }
    metrics::gauge!("palaver_support_queue_length").set(0.0);
    metrics::gauge!("palaver_replies_in_flight").increment(0.0);
    providers.register_metrics();
    crate::retention::register_metrics();
    crate::quota::register_metrics();
}

pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(&[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])
                .expect("static buckets are valid");
            match builder.install_recorder() {
                Ok(h) => h,
                // Another recorder is installed (embedding program): render ours unattached.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}
