//! Command line and environment configuration.
//!
//! Every setting is a CLI flag with a conventional environment variable behind
//! it (SPEC §0); a `.env` file is read before parsing. Secrets never appear in
//! `--help` output (`hide_env_values`) nor in `Debug` output.

use std::{fmt, net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "palaver",
    version,
    about = "Self-hostable AI chatbot backend: accounts, conversations, streamed LLM answers and a support desk.",
    long_about = "Self-hostable AI chatbot backend.\n\nWith no configuration at all, `palaver serve` keeps its data in ./data (SQLite), \
generates a development secret there and answers with the offline provider. Every flag can also be set \
through the environment variable shown next to it, or in a .env file."
)]
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (applies pending migrations first).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Administrative tasks.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Print the OpenAPI document as JSON.
    Openapi,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create an admin account; the password is read from standard input.
    Create {
        /// Email address of the new admin.
        #[arg(long)]
        email: String,
        /// Username of the new admin (optional).
        #[arg(long)]
        username: Option<String>,
        /// Read the password from the first line of standard input.
        #[arg(long, required = true)]
        password_stdin: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Environment {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable `key=value` lines.
    Text,
}

/// A secret string: never printed by `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Every setting, in groups: each part of the server is handed only its own.
/// The env var names and flags are those of the fields (clap flattens them).
#[derive(Debug, Clone, Args)]
pub struct Settings {
    #[command(flatten)]
    pub server: ServerSettings,

    #[command(flatten)]
    pub auth: AuthSettings,

    #[command(flatten)]
    pub providers: ProviderSettings,

    #[command(flatten)]
    pub chat: ChatSettings,

    #[command(flatten)]
    pub support: SupportSettings,

    #[command(flatten)]
    pub retention: RetentionSettings,

    #[command(flatten)]
    pub limits: LimitSettings,
}

/// The server itself: where it listens and keeps its data, the database and
/// Redis, connections, logs and shutdown.
#[derive(Debug, Clone, Args)]
pub struct ServerSettings {
    /// `development` or `production`; production refuses weak secrets and wildcard CORS.
    #[arg(long = "env", env = "PALAVER_ENV", value_enum, default_value = "development", global = true)]
    pub environment: Environment,

    /// How often an event stream (SSE) that has nothing to send sends a
    /// keep-alive comment, in seconds, so reverse proxies do not cut a slow
    /// answer; before the first token too.
    #[arg(long, env = "PALAVER_SSE_KEEPALIVE_SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=300), global = true)]
    pub sse_keepalive_secs: u64,

    /// Address to listen on.
    #[arg(long, env = "PALAVER_BIND", default_value = "127.0.0.1:8000", global = true)]
    pub bind: SocketAddr,

    /// Directory for the SQLite database and the generated development secret.
    #[arg(long, env = "PALAVER_DATA_DIR", default_value = "./data", global = true)]
    pub data_dir: PathBuf,

    /// `sqlite://path` or `postgres://user@host/db`; defaults to SQLite in the data directory.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<Secret>,

    /// Seconds a request waits for a database connection (and, on SQLite, for
    /// the write lock) before it answers 503.
    #[arg(long, env = "PALAVER_DATABASE_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600), global = true)]
    pub database_timeout: u64,

    /// Database connections this instance opens at most; default 20 on
    /// PostgreSQL (mind its `max_connections` across instances), 8 on SQLite.
    #[arg(long, env = "PALAVER_DATABASE_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..=1000), global = true)]
    pub database_max_connections: Option<u32>,

    /// Redis for running several instances: the support desk's live events and
    /// the rate limits are shared through it. A single instance needs none.
    #[arg(long, env = "REDIS_URL", hide_env_values = true, global = true)]
    pub redis_url: Option<Secret>,

    /// Prefix of the Redis keys and channel Palaver uses (deployments sharing one Redis need different ones).
    #[arg(long, env = "PALAVER_REDIS_PREFIX", default_value = "palaver", global = true)]
    pub redis_prefix: String,

    /// Comma-separated addresses or CIDR ranges of reverse proxies whose
    /// X-Forwarded-For names the client (for rate limits and logs), e.g. `10.0.0.0/8`.
    #[arg(long, env = "PALAVER_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_proxy, global = true)]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Comma-separated origins allowed to call the API from a browser (credentials allowed).
    #[arg(long, env = "CORS_ORIGINS", value_delimiter = ',', global = true)]
    pub cors_origins: Vec<String>,

    /// Seconds a client has to send a whole request head, counted from when
    /// the server starts waiting for one: on a new connection and after each
    /// response, so this is also how long an idle keep-alive connection stays open.
    #[arg(long, env = "PALAVER_HEADER_READ_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600), global = true)]
    pub header_read_timeout: u64,

    /// Seconds without a byte in either direction after which a connection is
    /// closed, unless a handler is still working on its request (a stalled
    /// upload, a client that stopped reading its answer). Keep it above the
    /// 15 s SSE keep-alive so quiet streams stay open.
    #[arg(long, env = "PALAVER_IDLE_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400), global = true)]
    pub idle_timeout: u64,

    /// Most connections served at once; more wait in the listen backlog until
    /// one closes. Default: the open-file limit less a reserve for the
    /// database, files and connections to the LLM providers.
    #[arg(long, env = "PALAVER_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub max_connections: Option<u64>,

    /// Frames a client may send per second on one WebSocket, with bursts of
    /// three times as many; past it frames are refused (`rate_limited`), and
    /// a client that keeps on is disconnected (close code 1008).
    #[arg(long, env = "PALAVER_SOCKET_FRAMES_PER_SECOND", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub socket_frames_per_second: u32,

    /// Log line format; defaults to json in production and text otherwise.
    #[arg(long, env = "PALAVER_LOG_FORMAT", value_enum, global = true)]
    pub log_format: Option<LogFormat>,

    /// Log filter, e.g. `info` or `palaver=debug,tower_http=info`.
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true)]
    pub log_level: String,

    /// Seconds that open requests get to finish after SIGTERM.
    #[arg(long, env = "PALAVER_SHUTDOWN_GRACE", default_value_t = 30, global = true)]
    pub shutdown_grace: u64,
}

/// Accounts and credentials.
#[derive(Debug, Clone, Args)]
pub struct AuthSettings {
    /// Signing secret for tokens, at least 32 characters in production.
    #[arg(long, env = "SECRET_KEY", hide_env_values = true, global = true)]
    pub secret_key: Option<Secret>,

    /// Lifetime of access tokens, in minutes.
    #[arg(long, env = "ACCESS_TOKEN_EXPIRE_MINUTES", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=525_600), global = true)]
    pub access_token_expire_minutes: u64,

    /// Lifetime of refresh tokens and login sessions, in days.
    #[arg(long, env = "REFRESH_TOKEN_EXPIRE_DAYS", default_value_t = 14, value_parser = clap::value_parser!(u64).range(1..=3650), global = true)]
    pub refresh_token_expire_days: u64,

    /// Accounts one client address may register per hour (shared across
    /// instances with REDIS_URL).
    #[arg(long, env = "PALAVER_REGISTRATIONS_PER_IP", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub registrations_per_ip: u32,
}

/// The LLM providers, their keys, models and call policy.
#[derive(Debug, Clone, Args)]
pub struct ProviderSettings {
    /// OpenAI API key(s), comma-separated.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true, global = true)]
    pub openai_api_key: Option<Secret>,

    /// OpenAI-compatible base URL, including `/v1`.
    #[arg(long, env = "OPENAI_BASE_URL", default_value = "https://api.openai.com/v1", global = true)]
    pub openai_base_url: String,

    /// Google Gemini API key(s), comma-separated.
    #[arg(long, env = "GEMINI_API_KEY", hide_env_values = true, global = true)]
    pub gemini_api_key: Option<Secret>,

    /// Gemini API host root (without `/v1beta`).
    #[arg(long, env = "GEMINI_BASE_URL", default_value = "https://generativelanguage.googleapis.com", global = true)]
    pub gemini_base_url: String,

    /// Anthropic API key(s), comma-separated.
    #[arg(long, env = "ANTHROPIC_API_KEY", hide_env_values = true, global = true)]
    pub anthropic_api_key: Option<Secret>,

    /// Anthropic API host root (without `/v1`).
    #[arg(long, env = "ANTHROPIC_BASE_URL", default_value = "https://api.anthropic.com", global = true)]
    pub anthropic_base_url: String,

    /// Longest Anthropic reply, in tokens (the Messages API requires a cap).
    #[arg(long, env = "ANTHROPIC_MAX_TOKENS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub anthropic_max_tokens: u32,

    /// OpenRouter API key(s), comma-separated.
    #[arg(long, env = "OPENROUTER_API_KEY", hide_env_values = true, global = true)]
    pub openrouter_api_key: Option<Secret>,

    /// OpenRouter base URL, including `/v1`.
    #[arg(long, env = "OPENROUTER_BASE_URL", default_value = "https://openrouter.ai/api/v1", global = true)]
    pub openrouter_base_url: String,

    /// Groq API key(s), comma-separated.
    #[arg(long, env = "GROQ_API_KEY", hide_env_values = true, global = true)]
    pub groq_api_key: Option<Secret>,

    /// Groq base URL, including `/v1`.
    #[arg(long, env = "GROQ_BASE_URL", default_value = "https://api.groq.com/openai/v1", global = true)]
    pub groq_base_url: String,

    /// Ollama server, e.g. `http://127.0.0.1:11434`; Ollama is used only when this is set.
    #[arg(long, env = "OLLAMA_BASE_URL", global = true)]
    pub ollama_base_url: Option<String>,

    /// Comma-separated model ids tried in order when the chosen model fails after its retries.
    #[arg(long, env = "PALAVER_FALLBACK_MODELS", value_delimiter = ',', global = true)]
    pub fallback_models: Vec<String>,

    /// Seconds a provider may stay silent, before its first token or between two chunks
    /// (within the attempt's PALAVER_PROVIDER_TIMEOUT).
    #[arg(long, env = "PALAVER_PROVIDER_IDLE_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600), global = true)]
    pub provider_idle_timeout: u64,

    /// Retries of a provider call that failed before its first token (connection errors, 429, 5xx).
    #[arg(long, env = "PALAVER_PROVIDER_RETRIES", default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=10), global = true)]
    pub provider_retries: u32,

    /// First retry backoff in milliseconds; each further retry doubles it (with jitter).
    #[arg(long, env = "PALAVER_PROVIDER_BACKOFF_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=60_000), global = true)]
    pub provider_backoff_ms: u64,

    /// Context-window overrides in tokens, e.g. `openai/gpt-4o=128000,ollama/llama3=8192`
    /// (an entry applies to every model id it starts).
    #[arg(long, env = "PALAVER_CONTEXT_WINDOWS", value_delimiter = ',', global = true)]
    pub context_windows: Vec<String>,

    /// Model used when a conversation names none (`provider/model`).
    #[arg(long, env = "PALAVER_DEFAULT_MODEL", global = true)]
    pub default_model: Option<String>,

    /// Seconds one provider attempt may take, first byte to last (a hung or
    /// stalled provider answers 504); PALAVER_PROVIDER_IDLE_TIMEOUT bounds the gaps inside it.
    #[arg(long, env = "PALAVER_PROVIDER_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600), global = true)]
    pub provider_timeout: u64,
}

/// The reply engine.
#[derive(Debug, Clone, Args)]
pub struct ChatSettings {
    /// Longest accepted chat message, in Unicode characters.
    #[arg(long, env = "PALAVER_MAX_MESSAGE_CHARS", default_value_t = 32_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000), global = true)]
    pub max_message_chars: u64,

    /// How often a streaming reply's partial text is saved, in milliseconds
    /// (at most this much is lost if the process is killed).
    #[arg(long, env = "PALAVER_STREAM_FLUSH_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60_000), global = true)]
    pub stream_flush_ms: u64,

    /// A reply whose instance died is regenerated from the start by a
    /// surviving one (once; the provider is paid again). Off: it is marked
    /// failed (`interrupted`).
    #[arg(long, env = "PALAVER_REPLY_TAKEOVER", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub reply_takeover: bool,
}

/// The support desk.
#[derive(Debug, Clone, Args)]
pub struct SupportSettings {
    /// System prompt of the support desk's AI.
    #[arg(
        long,
        env = "PALAVER_SUPPORT_SYSTEM_PROMPT",
        default_value = "You are the first-line support assistant of this website. Answer briefly and politely. \
If you cannot help, tell the visitor they can ask to talk to a human agent.",
        global = true
    )]
    pub support_system_prompt: String,

    /// Comma-separated phrases that hand a support visitor to a human when
    /// they appear as whole words (the built-in list when unset).
    #[arg(long, env = "PALAVER_SUPPORT_HANDOFF_PHRASES", value_delimiter = ',', global = true)]
    pub support_handoff_phrases: Vec<String>,

    /// Support sessions one client address may open per 10 minutes.
    #[arg(long, env = "PALAVER_SUPPORT_SESSIONS_PER_IP", default_value_t = 20, global = true)]
    pub support_sessions_per_ip: u32,
}

/// Deleting old data (off by default).
#[derive(Debug, Clone, Args)]
pub struct RetentionSettings {
    /// Days a conversation is kept after its last activity; unset keeps
    /// them forever (users may still set a retention of their own).
    #[arg(long, env = "PALAVER_RETENTION_DAYS", value_parser = clap::value_parser!(i64).range(1..=crate::domain::user::MAX_RETENTION_DAYS), global = true)]
    pub retention_days: Option<i64>,

    /// Days a closed support session (transcript and events) is kept; unset keeps them forever.
    #[arg(long, env = "PALAVER_SUPPORT_RETENTION_DAYS", value_parser = clap::value_parser!(i64).range(1..=crate::domain::user::MAX_RETENTION_DAYS), global = true)]
    pub support_retention_days: Option<i64>,

    /// Seconds between two sweeps for data past its retention.
    #[arg(long, env = "PALAVER_RETENTION_SWEEP_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400), global = true)]
    pub retention_sweep_secs: u64,
}

/// Rate limits and token budgets (SPEC §6).
#[derive(Debug, Clone, Args)]
pub struct LimitSettings {
    /// Requests per minute one user may make to the chat paths (`/api`
    /// sends, `/v1`); unset: no limit. A key's own `rpm` applies as well.
    #[arg(long, env = "PALAVER_RATE_LIMIT_RPM", value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub rate_limit_rpm: Option<u32>,

    /// Tokens reserved for the answer of a budgeted request that names no
    /// `max_tokens` (its answer is capped to it); the prompt's estimate is
    /// reserved on top.
    #[arg(long, env = "PALAVER_BUDGET_DEFAULT_RESERVE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub budget_default_reserve: u32,

    /// How long a reservation lives if its request never settles it (a
    /// crashed instance), in seconds. Keep it above the longest answer.
    #[arg(long, env = "PALAVER_BUDGET_RESERVATION_TTL", default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..=86_400), global = true)]
    pub budget_reservation_ttl: u64,

    /// Tokens per UTC day the support desk's AI may spend; unset: no limit.
    #[arg(long, env = "PALAVER_SUPPORT_TOKEN_BUDGET", value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub support_token_budget: Option<u64>,
}

/// A proxy address (`10.1.2.3`, `::1`) or range (`10.0.0.0/8`).
fn parse_proxy(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is neither an IP address nor a CIDR range such as 10.0.0.0/8"))
}

impl Settings {
    /// Defaults as `palaver serve` would use them with an empty environment.
    pub fn defaults() -> Self {
        Cli::parse_from(["palaver", "serve"]).settings
    }
}

impl ServerSettings {
    pub fn log_format(&self) -> LogFormat {
        self.log_format.unwrap_or(match self.environment {
            Environment::Production => LogFormat::Json,
            Environment::Development => LogFormat::Text,
        })
    }

    pub fn cors_origins(&self) -> Vec<String> {
        self.cors_origins.iter().map(|o| o.trim().trim_end_matches('/').to_owned()).filter(|o| !o.is_empty()).collect()
    }
}
