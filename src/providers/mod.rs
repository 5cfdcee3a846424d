//! LLM providers behind one trait. Each wire format lives in its own file
//! (`openai`, `gemini`, `anthropic`, `offline`); `Providers` maps the
//! `provider/` part of a model id to an adapter and, in `call`, applies the
//! timeouts, retries, usage accounting and metrics, then the fallback
//! models, so every chat path gets the same behaviour.

mod anthropic;
mod call;
mod gemini;
mod http;
mod offline;
mod openai;
pub mod sse;
mod tools;

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

pub use anthropic::AnthropicProvider;
pub use call::{CallPolicy, error_kind, estimate_prompt_tokens};
pub use gemini::GeminiProvider;
pub use offline::OfflineProvider;
pub use openai::OpenAiProvider;

use crate::{
    config::{ProviderSettings, Secret},
    domain::{
        context::{ChatMessage, ChatRole, ToolCall, context_window},
        conversation::ModelId,
    },
};

#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The model name as the provider knows it (no `provider/` prefix).
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub options: ChatOptions,
}

/// How to generate, beyond the messages: each format sends what it can of
/// what is set and leaves the rest to the provider's defaults.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatOptions {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// The reply's length cap (OpenAI's `max_tokens` / `max_completion_tokens`).
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub seed: Option<i64>,
    pub response_format: Option<ResponseFormat>,
    pub tools: Vec<ToolSpec>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    /// The end user, for the provider's abuse monitoring.
    pub user: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { name: String, schema: serde_json::Value, strict: Option<bool> },
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    /// A JSON Schema of the arguments object (`Null` when it takes none).
    pub parameters: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    None,
    /// Some tool must be called.
    Required,
    /// This tool must be called.
    Function(String),
}

/// Why a reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
    ContentFilter,
}

impl FinishReason {
    /// The `finish_reason` of OpenAI's chat completions.
    pub fn as_openai(&self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
            Self::ContentFilter => "content_filter",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// True when the provider reported nothing and these are our estimates.
    pub estimated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatEvent {
    Delta(String),
    /// A piece of a tool call. The first piece of each `index` (0, 1, 2… in
    /// the order the model started them, counting tool calls only) carries
    /// `id` and `name`; later pieces carry only argument text. Concatenating
    /// the `arguments` of one index gives the call's full JSON arguments.
    ToolCallDelta {
        index: usize,
        id: Option<String>,
        name: Option<String>,
        arguments: String,
    },
    /// Why the reply ended: once, before `Usage`.
    Finish(FinishReason),
    Usage(Usage),
}

#[cfg(test)]
impl ChatEvent {
    /// A tool-call piece, as the decoders' tests expect them.
    pub(crate) fn tool_delta(index: usize, id: Option<&str>, name: Option<&str>, arguments: &str) -> Self {
        ChatEvent::ToolCallDelta {
            index,
            id: id.map(Into::into),
            name: name.map(Into::into),
            arguments: arguments.into(),
        }
    }
}

pub type ChatStream = Pin<Box<dyn Stream<Item = Result<ChatEvent, ProviderError>> + Send>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("the provider did not answer in time")]
    Timeout,
    #[error("could not reach the provider: {0}")]
    Connect(String),
    #[error("the provider refused the API key (HTTP {0})")]
    Auth(u16),
    #[error("the provider is rate limiting us")]
    RateLimited { retry_after: Option<Duration> },
    #[error("the provider answered HTTP {status}: {message}")]
    Upstream { status: u16, message: String },
    #[error("the provider sent something we cannot read: {0}")]
    Protocol(String),
}

/// One wire format. `stream_chat` is a single attempt: retries, timeouts
/// and usage estimates are applied around it by `Providers`.
#[async_trait::async_trait]
pub trait ChatProvider: Send + Sync {
    /// The `provider` part of model ids served by this adapter.
    fn name(&self) -> &str;
    /// Models to advertise in /api/models (others are accepted too).
    fn models(&self) -> Vec<String>;
    /// Starts a reply; the stream yields text and tool-call deltas, the
    /// finish reason and the usage when the provider reports them.
    async fn stream_chat(&self, request: ChatRequest) -> Result<ChatStream, ProviderError>;
}

/// A reply under way: its text and tool-call deltas, then exactly one
/// `Finish` and one `Usage` (estimated when the provider reported none) — or
/// an error, which ends it.
/// `model()` is the model that is answering, a fallback model if the one
/// asked for failed.
pub struct ReplyStream {
    model: ModelId,
    events: ChatStream,
}

impl ReplyStream {
    pub fn model(&self) -> &ModelId {
        &self.model
    }
}

impl Stream for ReplyStream {
    type Item = Result<ChatEvent, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.as_mut().poll_next(cx)
    }
}

/// What a reply that broke off has used of its retries and fallbacks.
#[derive(Debug, Clone)]
pub struct Restarts {
    asked: ModelId,
    skip: Vec<ModelId>,
    last: Option<ModelId>,
    breaks: u32,
}

impl Restarts {
    /// For a reply that asked for `model`.
    pub fn new(model: &ModelId) -> Self {
        Self { asked: model.clone(), skip: Vec::new(), last: None, breaks: 0 }
    }
}

/// A whole reply, collected from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub text: String,
    /// The tools the model called, in the order it called them.
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    /// The model that answered (a fallback model if the one asked for failed).
    pub model: ModelId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub id: String,
    pub provider: String,
    pub default: bool,
}

impl Completion {
    /// Gathers a reply stream (deltas, tool-call pieces by index, the finish
    /// reason, usage) into the whole reply `model` gave.
    pub async fn collect(
        model: ModelId,
        stream: impl Stream<Item = Result<ChatEvent, ProviderError>>,
    ) -> Result<Completion, ProviderError> {
        tokio::pin!(stream);
        let mut text = String::new();
        let mut tool_calls: Vec<ToolCall> = Vec::new();
        let mut finish_reason = FinishReason::Stop;
        let mut usage = Usage::default();
        while let Some(event) = stream.next().await {
            match event? {
                ChatEvent::Delta(d) => text.push_str(&d),
                ChatEvent::ToolCallDelta { index, id, name, arguments } => match tool_calls.get_mut(index) {
                    Some(call) => call.arguments.push_str(&arguments),
                    None => tool_calls.push(ToolCall {
                        id: id.unwrap_or_default(),
                        name: name.unwrap_or_default(),
                        arguments,
                    }),
                },
                ChatEvent::Finish(reason) => finish_reason = reason,
                ChatEvent::Usage(u) => usage = u,
            }
        }
        Ok(Completion { text, tool_calls, finish_reason, usage, model })
    }
}

/// The configured providers, the default and fallback models, and the call
/// policy.
#[derive(Clone)]
pub struct Providers {
    adapters: BTreeMap<String, Arc<dyn ChatProvider>>,
    default_model: ModelId,
    fallbacks: Vec<ModelId>,
    policy: CallPolicy,
    context_windows: Vec<(String, usize)>,
}

/// One turn of a format that wants user and assistant turns alternating
/// (Anthropic, Gemini): consecutive messages of one side merged. Tool
/// results are the user's side.
#[derive(Debug, PartialEq)]
struct Turn<'a> {
    /// `User` or `Assistant`.
    role: ChatRole,
    /// The texts of the turn's messages, joined (`None` when all were empty).
    text: Option<String>,
    /// The assistant's tool calls.
    calls: Vec<&'a ToolCall>,
    /// The tool results (role `Tool`) of a user turn.
    results: Vec<&'a ChatMessage>,
}

/// For formats that take the system prompt apart and want the turns to
/// alternate: the system messages joined, and the other messages as turns.
fn system_and_turns(messages: &[ChatMessage]) -> (Option<String>, Vec<Turn<'_>>) {
    let system: Vec<&str> =
        messages.iter().filter(|m| m.role == ChatRole::System).map(|m| m.content.as_str()).collect();
    let mut turns: Vec<Turn<'_>> = Vec::new();
    for m in messages.iter().filter(|m| m.role != ChatRole::System) {
        let side = if m.role == ChatRole::Assistant { ChatRole::Assistant } else { ChatRole::User };
        if turns.last().is_none_or(|t| t.role != side) {
            turns.push(Turn { role: side, text: None, calls: Vec::new(), results: Vec::new() });
        }
        let turn = turns.last_mut().expect("pushed above");
        if m.role == ChatRole::Tool {
            turn.results.push(m);
            continue;
        }
        turn.calls.extend(&m.tool_calls);
        // A tool-calling turn often says nothing; that is no text to join.
        if m.content.is_empty() && !m.tool_calls.is_empty() {
            continue;
        }
        match &mut turn.text {
            Some(text) => {
                text.push_str("\n\n");
                text.push_str(&m.content);
            }
            None => turn.text = Some(m.content.clone()),
        }
    }
    ((!system.is_empty()).then(|| system.join("\n\n")), turns)
}

/// The name of the tool call `id`, from the assistant turns of `messages`
/// (for formats that answer a call by name).
fn tool_name<'a>(messages: &'a [ChatMessage], id: &str) -> Option<&'a str> {
    messages.iter().flat_map(|m| &m.tool_calls).find(|c| c.id == id).map(|c| c.name.as_str())
}

/// A key setting counts when it holds a non-blank value (`OPENAI_API_KEY=`
/// in a `.env` template configures nothing).
fn key(secret: &Option<Secret>) -> Option<&str> {
    secret.as_ref().map(Secret::expose).filter(|k| !k.trim().is_empty())
}

fn names(models: &[&str]) -> Vec<String> {
    models.iter().map(|m| (*m).to_owned()).collect()
}

impl Providers {
    /// Builds the adapters named by the settings; the offline provider is
    /// always there and is the default when nothing else is configured.
    pub fn from_settings(settings: &ProviderSettings) -> anyhow::Result<Self> {
        let policy = CallPolicy {
            attempt_timeout: Duration::from_secs(settings.provider_timeout),
            idle_timeout: Duration::from_secs(settings.provider_idle_timeout),
            retries: settings.provider_retries,
            backoff: Duration::from_millis(settings.provider_backoff_ms),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10).min(policy.attempt_timeout))
            .user_agent(concat!("palaver/", env!("CARGO_PKG_VERSION")))
            // A provider that redirects a POST is misconfigured: its 3xx is
            // reported like any other refusal. (Following redirects also
            // parsed every response's URL: a visible share of a gateway
            // request's CPU.)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let mut adapters: BTreeMap<String, Arc<dyn ChatProvider>> = BTreeMap::new();
        // Each provider's usual model, in order of preference for the default.
        let mut defaults: Vec<&'static str> = Vec::new();
        let mut add = |adapter: Arc<dyn ChatProvider>, default: &'static str| {
            defaults.push(default);
            adapters.insert(adapter.name().to_owned(), adapter);
        };
        if let Some(keys) = key(&settings.openai_api_key) {
            let models = names(&["gpt-4o-mini", "gpt-4o"]);
            let p = OpenAiProvider::new("openai", &settings.openai_base_url, Some(keys), models, http.clone());
            add(Arc::new(p), "openai/gpt-4o-mini");
        }
        if let Some(keys) = key(&settings.anthropic_api_key) {
            let models = names(&["claude-3-5-sonnet-latest", "claude-3-5-haiku-latest"]);
            let p = AnthropicProvider::new(
                &settings.anthropic_base_url,
                Some(keys),
                models,
                settings.anthropic_max_tokens,
                http.clone(),
            );
            add(Arc::new(p), "anthropic/claude-3-5-haiku-latest");
        }
        if let Some(keys) = key(&settings.gemini_api_key) {
            let models = names(&["gemini-1.5-flash", "gemini-1.5-pro"]);
            add(
                Arc::new(GeminiProvider::new(&settings.gemini_base_url, Some(keys), models, http.clone())),
                "gemini/gemini-1.5-flash",
            );
        }
        if let Some(keys) = key(&settings.openrouter_api_key) {
            let models = names(&["openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet"]);
            let p = OpenAiProvider::new("openrouter", &settings.openrouter_base_url, Some(keys), models, http.clone());
            add(Arc::new(p), "openrouter/openai/gpt-4o-mini");
        }
        if let Some(keys) = key(&settings.groq_api_key) {
            let models = names(&["llama-3.3-70b-versatile", "llama-3.1-8b-instant"]);
            let p = OpenAiProvider::new("groq", &settings.groq_base_url, Some(keys), models, http.clone());
            add(Arc::new(p), "groq/llama-3.3-70b-versatile");
        }
        if let Some(base) = settings.ollama_base_url.as_deref().map(str::trim).filter(|b| !b.is_empty()) {
            let base = base.trim_end_matches('/');
            let base = if base.ends_with("/v1") { base.to_owned() } else { format!("{base}/v1") };
            let p = OpenAiProvider::new("ollama", &base, None, names(&["llama3"]), http.clone());
            add(Arc::new(p), "ollama/llama3");
        }
        add(Arc::new(OfflineProvider), offline::MODEL_ID);

        let default_model = match &settings.default_model {
            Some(m) => ModelId::parse(m).map_err(|e| anyhow::anyhow!("PALAVER_DEFAULT_MODEL {e}"))?,
            None => ModelId::parse(defaults[0]).expect("valid id"),
        };
        let configured = |m: &ModelId, var: &str| {
            if adapters.contains_key(m.provider()) {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{var} names provider {:?}, which is not configured", m.provider()))
            }
        };
        configured(&default_model, "PALAVER_DEFAULT_MODEL")?;
        let mut fallbacks = Vec::new();
        for raw in settings.fallback_models.iter().map(|m| m.trim()).filter(|m| !m.is_empty()) {
            let m = ModelId::parse(raw).map_err(|e| anyhow::anyhow!("PALAVER_FALLBACK_MODELS: {raw:?} {e}"))?;
            configured(&m, "PALAVER_FALLBACK_MODELS")?;
            fallbacks.push(m);
        }
        let mut context_windows = Vec::new();
        for entry in settings.context_windows.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let parsed = entry.split_once('=').and_then(|(id, n)| Some((id.trim().to_owned(), n.trim().parse().ok()?)));
            match parsed {
                Some((id, n)) if !id.is_empty() && n > 0 => context_windows.push((id, n)),
                _ => anyhow::bail!("PALAVER_CONTEXT_WINDOWS: {entry:?} must look like provider/model=tokens"),
            }
        }
        Ok(Self { adapters, default_model, fallbacks, policy, context_windows })
    }

    /// Providers other than the offline one.
    pub fn has_real_provider(&self) -> bool {
        self.adapters.keys().any(|k| k != "offline")
    }

    pub fn default_model(&self) -> &ModelId {
        &self.default_model
    }

    pub fn fallback_models(&self) -> &[ModelId] {
        &self.fallbacks
    }

    /// Checks a model id a client asked for: well-formed, configured provider.
    pub fn validate_model(&self, id: &str) -> Result<ModelId, String> {
        let m = ModelId::parse(id)?;
        if !self.adapters.contains_key(m.provider()) {
            let known: Vec<&str> = self.adapters.keys().map(String::as_str).collect();
            return Err(format!("provider {:?} is not configured (configured: {})", m.provider(), known.join(", ")));
        }
        Ok(m)
    }

    /// The context window of a model, in tokens: the longest matching
    /// `PALAVER_CONTEXT_WINDOWS` entry, else the built-in table.
    pub fn context_window(&self, model: &ModelId) -> usize {
        let id = model.to_string();
        self.context_windows
            .iter()
            .filter(|(prefix, _)| id.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or_else(|| context_window(model.model()), |&(_, n)| n)
    }

    /// The configured providers, as model ids name them.
    pub fn provider_names(&self) -> Vec<String> {
        self.adapters.keys().cloned().collect()
    }

    /// Puts every configured model's counters on /metrics at 0.
    pub fn register_metrics(&self) {
        for m in self.models() {
            if let Ok(id) = ModelId::parse(&m.id) {
                call::register_metrics(&id);
            }
        }
    }

    pub fn models(&self) -> Vec<ModelInfo> {
        let default = self.default_model.to_string();
        let mut items: Vec<ModelInfo> = self
            .adapters
            .iter()
            .flat_map(|(name, p)| {
                p.models().into_iter().map(move |m| ModelInfo {
                    id: format!("{name}/{m}"),
                    provider: name.clone(),
                    default: false,
                })
            })
            .collect();
        for m in std::iter::once(&self.default_model).chain(&self.fallbacks) {
            if !items.iter().any(|i| i.id == m.to_string()) {
                items.push(ModelInfo { id: m.to_string(), provider: m.provider().to_owned(), default: false });
            }
        }
        for m in &mut items {
            m.default = m.id == default;
        }
        items
    }

    /// Starts a reply with the provider's default options (see `stream_with`).
    pub async fn stream(&self, model: &ModelId, messages: Vec<ChatMessage>) -> Result<ReplyStream, ProviderError> {
        self.stream_with(model, messages, ChatOptions::default()).await
    }

    /// Starts a reply: `model` first, then each fallback model, each with
    /// its retries. Answers once the first event has arrived, so a failure
    /// before any output is retried or falls back, and one after it ends the
    /// stream (the caller has shown text or tool calls by then, or may start
    /// over with `restart`). Timeouts apply inside.
    pub async fn stream_with(
        &self,
        model: &ModelId,
        messages: Vec<ChatMessage>,
        options: ChatOptions,
    ) -> Result<ReplyStream, ProviderError> {
        self.stream_from(model, &[], &messages, &options).await
    }

    /// `model` and the fallback models, in order, except those in `skip`.
    fn candidates<'a>(&'a self, model: &'a ModelId, skip: &'a [ModelId]) -> impl Iterator<Item = &'a ModelId> {
        std::iter::once(model).chain(self.fallbacks.iter().filter(move |f| *f != model)).filter(|m| !skip.contains(m))
    }

    async fn stream_from(
        &self,
        model: &ModelId,
        skip: &[ModelId],
        messages: &[ChatMessage],
        options: &ChatOptions,
    ) -> Result<ReplyStream, ProviderError> {
        let mut first_error = None;
        for candidate in self.candidates(model, skip) {
            let Some(adapter) = self.adapters.get(candidate.provider()) else {
                first_error.get_or_insert(ProviderError::Connect(format!(
                    "provider {} is not configured",
                    candidate.provider()
                )));
                continue;
            };
            if first_error.is_some() || candidate != model {
                tracing::warn!(
                    model = model.to_string().as_str(),
                    fallback = candidate.to_string().as_str(),
                    "trying a fallback model"
                );
            }
            match call::start(adapter, candidate, messages, options, &self.policy).await {
                Ok(events) => return Ok(ReplyStream { model: candidate.clone(), events }),
                Err(e) => {
                    let (model, error) = (candidate.to_string(), e.to_string());
                    // Model names and provider errors may hold client text: logged escaped.
                    tracing::warn!(
                        model = model.as_str(),
                        kind = error_kind(&e),
                        error = error.as_str(),
                        "provider call failed"
                    );
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(ProviderError::Connect("no model is left to try".into())))
    }

    /// Whether a reply whose stream broke off with `error` may start over —
    /// for a caller that has shown nothing of it yet — and after what pause.
    /// As for a failure to connect: the model that broke off is tried again
    /// while its retries last (for the errors a retry can help), then the
    /// fallback models after it. Counts the try in `restarts`.
    pub fn may_restart(&self, restarts: &mut Restarts, broken: &ModelId, error: &ProviderError) -> Option<Duration> {
        if restarts.last.as_ref() != Some(broken) {
            restarts.last = Some(broken.clone());
            restarts.breaks = 0;
        }
        let delay =
            call::retry_delay(error, restarts.breaks, &self.policy).filter(|_| restarts.breaks < self.policy.retries);
        restarts.breaks += 1;
        if delay.is_none() {
            restarts.skip.push(broken.clone());
        }
        self.candidates(&restarts.asked, &restarts.skip).next()?;
        tracing::info!(
            model = broken.to_string().as_str(),
            kind = error_kind(error),
            "the provider's stream broke off; starting the reply over"
        );
        Some(delay.unwrap_or_default())
    }

    /// Starts a reply over, after `wait`, once `may_restart` allowed it.
    pub async fn restart(
        &self,
        restarts: &Restarts,
        wait: Duration,
        messages: &[ChatMessage],
        options: &ChatOptions,
    ) -> Result<ReplyStream, ProviderError> {
        tokio::time::sleep(wait).await;
        self.stream_from(&restarts.asked, &restarts.skip, messages, options).await
    }

    /// Runs a whole reply with the provider's default options.
    pub async fn complete(&self, model: &ModelId, messages: Vec<ChatMessage>) -> Result<Completion, ProviderError> {
        self.complete_with(model, messages, ChatOptions::default()).await
    }

    /// Runs a whole reply (with retries, fallback and timeouts, as
    /// `stream_with`) and collects it; nothing is shown before the end, so
    /// a stream that breaks off starts over (`restart`).
    pub async fn complete_with(
        &self,
        model: &ModelId,
        messages: Vec<ChatMessage>,
        options: ChatOptions,
    ) -> Result<Completion, ProviderError> {
        let first = self.stream_with(model, messages.clone(), options.clone()).await?;
        self.collect_restarting(model, first, &messages, &options, |s| s).await
    }

    /// Collects a reply that started as `first`, starting it over (`restart`)
    /// whenever its stream breaks off; `wrap` turns each provider stream into
    /// the one collected (a counting wrapper, say).
    pub async fn collect_restarting<S>(
        &self,
        model: &ModelId,
        first: ReplyStream,
        messages: &[ChatMessage],
        options: &ChatOptions,
        wrap: impl Fn(ReplyStream) -> S,
    ) -> Result<Completion, ProviderError>
    where
        S: Stream<Item = Result<ChatEvent, ProviderError>>,
    {
        let mut restarts = Restarts::new(model);
        let mut stream = first;
        loop {
            let answered_by = stream.model().clone();
            match Completion::collect(answered_by.clone(), wrap(stream)).await {
                Ok(done) => return Ok(done),
                Err(e) => match self.may_restart(&mut restarts, &answered_by, &e) {
                    Some(wait) => stream = self.restart(&restarts, wait, messages, options).await?,
                    None => return Err(e),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[tokio::test]
    async fn offline_is_the_default_without_configuration() {
        let mut s = Settings::defaults();
        s.providers.openai_api_key = None;
        s.providers.default_model = None;
        let p = Providers::from_settings(&s.providers).unwrap();
        assert!(!p.has_real_provider());
        assert_eq!(p.default_model().provider(), "offline");
        let models = p.models();
        assert_eq!(models.iter().filter(|m| m.default).count(), 1);
        let msgs = vec![ChatMessage::new(ChatRole::User, "hello")];
        let a = p.complete(p.default_model(), msgs.clone()).await.unwrap();
        let b = p.complete(p.default_model(), msgs).await.unwrap();
        assert_eq!(a, b, "offline replies are deterministic");
        assert_eq!(a.model, *p.default_model());
        assert!(p.validate_model("openai/gpt-4o").is_err());
        assert!(p.validate_model("offline/anything").is_ok());
    }

    #[test]
    fn presets_are_configured_by_their_keys_and_ollama_by_its_url() {
        let mut s = Settings::defaults();
        s.providers.openai_api_key = Some(Secret(" ".into()));
        s.providers.groq_api_key = Some(Secret("g1,g2".into()));
        s.providers.openrouter_api_key = Some(Secret("o".into()));
        s.providers.gemini_api_key = Some(Secret("ge".into()));
        s.providers.anthropic_api_key = Some(Secret("a".into()));
        s.providers.default_model = None;
        let p = Providers::from_settings(&s.providers).unwrap();
        let providers: Vec<&str> = p.adapters.keys().map(String::as_str).collect();
        assert_eq!(
            providers,
            ["anthropic", "gemini", "groq", "offline", "openrouter"],
            "a blank key configures nothing"
        );
        assert_eq!(p.default_model().to_string(), "anthropic/claude-3-5-haiku-latest");
        assert!(p.validate_model("openrouter/meta-llama/llama-3-8b").is_ok());
        assert!(p.validate_model("ollama/llama3").is_err(), "Ollama only when OLLAMA_BASE_URL is set");

        s.providers.ollama_base_url = Some("http://localhost:11434".into());
        let p = Providers::from_settings(&s.providers).unwrap();
        assert!(p.models().iter().any(|m| m.id == "ollama/llama3"));
    }

    #[test]
    fn fallbacks_and_context_windows_are_checked_at_startup() {
        let mut s = Settings::defaults();
        s.providers.default_model = None;
        s.providers.fallback_models = vec!["offline/second".into()];
        s.providers.context_windows = vec!["offline/palaver=1000".into(), "offline/palaver-off=2000".into()];
        let p = Providers::from_settings(&s.providers).unwrap();
        assert_eq!(p.fallback_models()[0].to_string(), "offline/second");
        assert_eq!(p.context_window(p.default_model()), 2000, "the longest matching entry wins");
        assert_eq!(p.context_window(&ModelId::parse("offline/x").unwrap()), context_window("x"));

        s.providers.fallback_models = vec!["gemini/gemini-1.5-pro".into()];
        assert!(Providers::from_settings(&s.providers).is_err(), "an unconfigured fallback is a startup error");
        s.providers.fallback_models = vec![];
        s.providers.context_windows = vec!["offline/x".into()];
        assert!(Providers::from_settings(&s.providers).is_err());
    }
}
