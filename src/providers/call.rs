//! One model's call, made resilient: a deadline for the whole attempt
//! (PALAVER_PROVIDER_TIMEOUT, first byte to last) and, inside it, the idle
//! timeout between two events (PALAVER_PROVIDER_IDLE_TIMEOUT), retries with
//! backoff before the first delta, the finish reason and the final usage
//! (both supplied when the provider reports none) and the metrics.
//!
//! An attempt counts as started once its first event has arrived; until
//! then any retryable failure (connection, 429, 5xx) tries again, after
//! that every failure ends the reply, since the caller has shown text or
//! passed a tool call on.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use futures::{StreamExt, stream};
use rand::Rng;
use tokio::time::{Instant, timeout_at};

use super::{ChatEvent, ChatOptions, ChatProvider, ChatRequest, ChatStream, FinishReason, ProviderError, Usage};
use crate::domain::{
    context::{ChatMessage, estimate_tokens, message_tokens},
    conversation::ModelId,
};

/// Timeouts and retries for every provider call.
#[derive(Debug, Clone, Copy)]
pub struct CallPolicy {
    /// Longest one attempt may take, first byte to last.
    pub attempt_timeout: Duration,
    /// Longest silence: before the first event and between two events.
    pub idle_timeout: Duration,
    /// Attempts after the first, for retryable failures.
    pub retries: u32,
    /// The first backoff; each further one doubles (with jitter).
    pub backoff: Duration,
}

/// Longest backoff between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Distinct model labels kept in metrics; clients may name any model, and
/// each label set costs memory forever.
const MAX_MODEL_LABELS: usize = 200;

/// Our estimate of a prompt's size, for providers that report none: the
/// messages as the context budget counts them, and the tool specs.
pub fn estimate_prompt_tokens(messages: &[ChatMessage], options: &ChatOptions) -> i64 {
    let tools: usize = options
        .tools
        .iter()
        .map(|t| {
            let description = t.description.as_deref().map_or(0, estimate_tokens);
            estimate_tokens(&t.name) + description + estimate_tokens(&t.parameters.to_string())
        })
        .sum();
    (messages.iter().map(message_tokens).sum::<usize>() + tools) as i64
}

#[derive(Clone)]
struct Labels {
    provider: String,
    model: String,
}

impl Labels {
    fn of(model: &ModelId) -> Self {
        static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
        let mut seen = SEEN.get_or_init(Default::default).lock().expect("labels lock poisoned");
        let id = model.to_string();
        let known = seen.contains(&id) || (seen.len() < MAX_MODEL_LABELS && seen.insert(id));
        let name = if known { model.model().to_owned() } else { "other".to_owned() };
        Self { provider: model.provider().to_owned(), model: name }
    }

    fn pairs(&self) -> [(&'static str, String); 2] {
        [("provider", self.provider.clone()), ("model", self.model.clone())]
    }

    fn call(&self) {
        metrics::counter!("palaver_provider_calls_total", &self.pairs()).increment(1);
    }

    fn error(&self, e: &ProviderError) {
        let [p, m] = self.pairs();
        metrics::counter!("palaver_provider_errors_total", &[p, m, ("kind", error_kind(e).to_owned())]).increment(1);
    }

    fn latency(&self, since: Instant) {
        metrics::histogram!("palaver_provider_latency_seconds", &self.pairs()).record(since.elapsed().as_secs_f64());
    }

    fn first_token(&self, since: Instant) {
        metrics::histogram!("palaver_provider_ttft_seconds", &self.pairs()).record(since.elapsed().as_secs_f64());
    }

    fn tokens(&self, usage: &Usage) {
        for (direction, n) in [("in", usage.prompt_tokens), ("out", usage.completion_tokens)] {
            let [p, m] = self.pairs();
            metrics::counter!("palaver_tokens_total", &[p, m, ("direction", direction.to_owned())])
                .increment(n.max(0) as u64);
        }
    }
}

/// Puts the model's call and token counters on /metrics at 0, so they are
/// there before its first call.
pub fn register_metrics(model: &ModelId) {
    let labels = Labels::of(model);
    metrics::counter!("palaver_provider_calls_total", &labels.pairs()).increment(0);
    for direction in ["in", "out"] {
        let [p, m] = labels.pairs();
        metrics::counter!("palaver_tokens_total", &[p, m, ("direction", direction.to_owned())]).increment(0);
    }
}

/// The `kind` label of `palaver_provider_errors_total`.
pub fn error_kind(e: &ProviderError) -> &'static str {
    match e {
        ProviderError::Timeout => "timeout",
        ProviderError::Connect(_) => "connect",
        ProviderError::Auth(_) => "auth",
        ProviderError::RateLimited { .. } => "rate_limited",
        ProviderError::Upstream { status, .. } if *status >= 500 => "server_error",
        ProviderError::Upstream { .. } => "bad_request",
        ProviderError::Protocol(_) => "protocol",
    }
}

/// How long to wait before trying again after `error`, or `None` when
/// trying again cannot help (or would wait past one attempt's timeout).
pub(super) fn retry_delay(error: &ProviderError, attempt: u32, policy: &CallPolicy) -> Option<Duration> {
    match error {
        ProviderError::Connect(_) | ProviderError::RateLimited { retry_after: None } => Some(backoff(attempt, policy)),
        ProviderError::Upstream { status, .. } if *status >= 500 || *status == 408 => Some(backoff(attempt, policy)),
        ProviderError::RateLimited { retry_after: Some(wait) } => (*wait <= policy.attempt_timeout).then_some(*wait),
        _ => None,
    }
}

/// Exponential backoff with "equal jitter": half the step fixed, half random,
/// so clients that failed together do not come back together.
fn backoff(attempt: u32, policy: &CallPolicy) -> Duration {
    let step = policy.backoff.saturating_mul(2u32.saturating_pow(attempt)).min(MAX_BACKOFF);
    let half = step / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

/// Starts `model` on `adapter`, retrying as the policy allows, and answers
/// once the first event has arrived.
pub async fn start(
    adapter: &Arc<dyn ChatProvider>,
    model: &ModelId,
    messages: &[ChatMessage],
    options: &ChatOptions,
    policy: &CallPolicy,
) -> Result<ChatStream, ProviderError> {
    let labels = Labels::of(model);
    let mut attempt = 0;
    loop {
        let error = match attempt_once(adapter, model, messages, options, policy, &labels).await {
            Ok(stream) => return Ok(stream),
            Err(e) => e,
        };
        let delay = (attempt < policy.retries).then(|| retry_delay(&error, attempt, policy)).flatten();
        let Some(delay) = delay else { return Err(error) };
        tracing::info!(
            provider = model.provider(),
            model = model.model(),
            attempt = attempt + 1,
            wait_ms = delay.as_millis() as u64,
            error = error.to_string().as_str(),
            "provider call failed; retrying"
        );
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

async fn attempt_once(
    adapter: &Arc<dyn ChatProvider>,
    model: &ModelId,
    messages: &[ChatMessage],
    options: &ChatOptions,
    policy: &CallPolicy,
    labels: &Labels,
) -> Result<ChatStream, ProviderError> {
    labels.call();
    let started = Instant::now();
    let deadline = started + policy.attempt_timeout;
    let request =
        ChatRequest { model: model.model().to_owned(), messages: messages.to_vec(), options: options.clone() };
    let opened = async {
        let mut events = adapter.stream_chat(request).await?;
        let first = events.next().await.transpose()?;
        Ok::<_, ProviderError>((events, first))
    };
    // Silence before the first event counts like any other gap.
    let first_wait = deadline.min(started + policy.idle_timeout);
    let (events, first) = match timeout_at(first_wait, opened).await.unwrap_or(Err(ProviderError::Timeout)) {
        Ok(opened) => opened,
        Err(e) => {
            labels.error(&e);
            labels.latency(started);
            return Err(e);
        }
    };
    let guard = Guard {
        events,
        first,
        idle: policy.idle_timeout,
        deadline,
        labels: labels.clone(),
        started,
        saw_output: false,
        saw_tool_call: false,
        completion_chars: 0,
        prompt_estimate: estimate_prompt_tokens(messages, options),
        finish: None,
        usage: None,
        ending: None,
        done: false,
    };
    Ok(Box::pin(stream::unfold(guard, |mut g| async move { g.next().await.map(|e| (e, g)) })))
}

/// A started attempt: applies the idle timeout and the attempt's deadline
/// to what is left, holds the provider's finish reason and usage back until
/// the end and makes sure the stream ends with exactly one of each: the
/// reason derived from what was sent, the usage estimated, if need be.
struct Guard {
    events: ChatStream,
    first: Option<ChatEvent>,
    idle: Duration,
    /// When the whole attempt must be over, however steadily it streams.
    deadline: Instant,
    labels: Labels,
    started: Instant,
    /// A text or tool-call delta went out (the first one is the TTFT).
    saw_output: bool,
    saw_tool_call: bool,
    completion_chars: usize,
    prompt_estimate: i64,
    /// The provider's first finish reason.
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    /// The usage, once the finish reason went out.
    ending: Option<Usage>,
    done: bool,
}

impl Guard {
    async fn next(&mut self) -> Option<Result<ChatEvent, ProviderError>> {
        if let Some(usage) = self.ending.take() {
            return Some(Ok(ChatEvent::Usage(usage)));
        }
        if self.done {
            return None;
        }
        loop {
            let next = match self.first.take() {
                Some(first) => Ok(Some(Ok(first))),
                // A gap longer than the idle timeout is a stalled provider;
                // the attempt as a whole still ends at its deadline.
                None => timeout_at((Instant::now() + self.idle).min(self.deadline), self.events.next()).await,
            };
            match next {
                Ok(Some(Ok(ChatEvent::Delta(text)))) => {
                    if text.is_empty() {
                        continue;
                    }
                    self.output(text.chars().count());
                    return Some(Ok(ChatEvent::Delta(text)));
                }
                Ok(Some(Ok(ChatEvent::ToolCallDelta { index, id, name, arguments }))) => {
                    // The model wrote the name and the arguments; the id is the provider's.
                    self.output(name.as_deref().map_or(0, |n| n.chars().count()) + arguments.chars().count());
                    self.saw_tool_call = true;
                    return Some(Ok(ChatEvent::ToolCallDelta { index, id, name, arguments }));
                }
                Ok(Some(Ok(ChatEvent::Finish(reason)))) => {
                    self.finish.get_or_insert(reason);
                }
                Ok(Some(Ok(ChatEvent::Usage(u)))) => self.usage = Some(u),
                Ok(None) => {
                    self.done = true;
                    let usage = self.usage.unwrap_or(Usage {
                        prompt_tokens: self.prompt_estimate,
                        completion_tokens: self.completion_chars.div_ceil(4) as i64,
                        estimated: true,
                    });
                    self.labels.tokens(&usage);
                    self.labels.latency(self.started);
                    self.ending = Some(usage);
                    let derived = if self.saw_tool_call { FinishReason::ToolCalls } else { FinishReason::Stop };
                    return Some(Ok(ChatEvent::Finish(self.finish.unwrap_or(derived))));
                }
                Ok(Some(Err(e))) => return Some(Err(self.fail(e))),
                Err(_) => return Some(Err(self.fail(ProviderError::Timeout))),
            }
        }
    }

    /// Output went out: `chars` of it.
    fn output(&mut self, chars: usize) {
        if !self.saw_output {
            self.saw_output = true;
            self.labels.first_token(self.started);
        }
        self.completion_chars += chars;
    }

    fn fail(&mut self, e: ProviderError) -> ProviderError {
        self.done = true;
        self.labels.error(&e);
        self.labels.latency(self.started);
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CallPolicy {
        CallPolicy {
            attempt_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5),
            retries: 2,
            backoff: Duration::from_millis(100),
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        for attempt in 0..3 {
            let step = Duration::from_millis(100 * 2u64.pow(attempt));
            for _ in 0..50 {
                let d = backoff(attempt, &policy());
                assert!(d >= step / 2 && d <= step, "{d:?} for attempt {attempt}");
            }
        }
        assert!(backoff(40, &policy()) <= MAX_BACKOFF);
    }

    #[test]
    fn only_transient_failures_are_retried() {
        let p = policy();
        assert!(retry_delay(&ProviderError::Connect("x".into()), 0, &p).is_some());
        assert!(retry_delay(&ProviderError::Upstream { status: 503, message: String::new() }, 0, &p).is_some());
        let wait = Duration::from_secs(3);
        assert_eq!(retry_delay(&ProviderError::RateLimited { retry_after: Some(wait) }, 0, &p), Some(wait));
        let too_long = Duration::from_secs(3600);
        assert_eq!(retry_delay(&ProviderError::RateLimited { retry_after: Some(too_long) }, 0, &p), None);
        assert!(retry_delay(&ProviderError::Upstream { status: 400, message: String::new() }, 0, &p).is_none());
        assert!(retry_delay(&ProviderError::Auth(401), 0, &p).is_none());
        assert!(retry_delay(&ProviderError::Timeout, 0, &p).is_none());
    }
}
