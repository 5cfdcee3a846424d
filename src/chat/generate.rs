//! Generating a reply: the provider stream into the live reply, the
//! heartbeat that saves it as it goes, and the final write.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;

use super::{Chat, live::LiveReply};
use crate::{
    domain::{
        context::ChatMessage,
        conversation::{MessageStatus, ModelId},
    },
    error::Error,
    providers::{ChatEvent, ChatOptions, ProviderError, ReplyStream, Restarts, Usage},
    quota::{Payer, QuotaError},
    store::{ConversationRecord, MessageRecord, MessageUpdate, SUPPORT_USER_ID, StaleReply},
};

impl Chat {
    /// Runs a reply detached from the request that asked for it (`takeovers`:
    /// how often it was taken over from a dead instance before).
    pub(super) fn start_generation(
        self: &Arc<Self>,
        (placeholder, takeovers): (&MessageRecord, i64),
        user_id: &str,
        model: ModelId,
        conversation: ConversationRecord,
        upto_seq: i64,
        (reservation, max_tokens): (crate::quota::Reservation, Option<u32>),
    ) {
        let live = Arc::new(LiveReply::new(&placeholder.id, &placeholder.conversation_id, user_id));
        self.replies.live.lock().expect("replies lock poisoned").insert(live.message_id.clone(), live.clone());
        let chat = self.clone();
        let base = placeholder.clone();
        let counted = InFlight::count();
        self.replies.tasks.spawn(async move {
            let _counted = counted;
            let heartbeat = tokio::spawn(chat.clone().keep_alive(live.clone(), takeovers));
            let (outcome, answered_by) = match chat.build_context(&conversation, &model, upto_seq).await {
                Ok(context) => chat.generate(&live, &model, context, max_tokens).await,
                Err(e) => (
                    Outcome::Failed {
                        code: "context_unavailable",
                        error: format!("the history could not be read: {e}"),
                    },
                    model,
                ),
            };
            heartbeat.abort();
            let message = chat.finalize(&live, (base, takeovers), &answered_by, outcome).await;
            // A reply that ended without usage spent about what it wrote.
            let completion = message
                .completion_tokens
                .unwrap_or_else(|| crate::domain::context::estimate_tokens(&message.content) as i64);
            reservation.settle(&answered_by.to_string(), message.prompt_tokens.unwrap_or(0), completion);
            live.finish(Arc::new(message));
            chat.replies.live.lock().expect("replies lock poisoned").remove(&live.message_id);
        });
    }
}

/// What became of a stale reply offered to this instance for takeover.
pub enum TakeOver {
    /// Claimed: regenerating here, from the start.
    Taken(MessageRecord),
    /// Not to be generated again (and so to be marked failed): why.
    Refused(&'static str),
    /// Gone, or claimed before (by this or another instance).
    Lost,
}

impl Chat {
    /// Regenerates, from the start, a reply whose instance died: same
    /// context, same model, once per reply (`Store::take_over_reply`). It is
    /// admitted against its owner's budget as a send is — the context and
    /// the reserve, which then caps the answer — and refused when its owner
    /// is disabled or the budget left does not cover it. Its followers see
    /// the text shrink and are told to `reset`.
    pub async fn take_over(
        self: &Arc<Self>,
        stale: &StaleReply,
        stale_before: i64,
        now: i64,
    ) -> Result<TakeOver, Error> {
        let payer = if stale.owner == SUPPORT_USER_ID {
            Payer { user_id: stale.owner.clone(), ..Default::default() }
        } else {
            match self.store.user_by_id(&stale.owner).await? {
                Some(u) if !u.is_disabled() => {
                    Payer { user_id: u.id, user_budget: u.token_budget, ..Default::default() }
                }
                _ => return Ok(TakeOver::Refused("its owner's account is disabled")),
            }
        };
        let (Some(reply), Some(conversation)) = (
            self.store.message(&stale.conversation_id, &stale.id).await?,
            self.store.conversation(&stale.conversation_id, &stale.owner).await?,
        ) else {
            return Ok(TakeOver::Lost);
        };
        let model = reply
            .model
            .as_deref()
            .and_then(|m| ModelId::parse(m).ok())
            .filter(|m| self.providers.validate_model(&m.to_string()).is_ok())
            .unwrap_or_else(|| self.providers.default_model().clone());
        // The placeholder is stored right after the message it answers.
        let upto_seq = reply.seq - 1;
        let (admission, cap) = if self.quota.budgeted(&payer) {
            let cap = self.quota.default_reserve();
            let context = self.build_context(&conversation, &model, upto_seq).await?;
            let prompt: i64 = context.iter().map(|m| crate::domain::context::message_tokens(m) as i64).sum();
            match self.quota.admit_budgets(&payer, prompt + i64::from(cap)).await {
                Ok(admission) => (admission, Some(cap)),
                Err(QuotaError::BudgetExceeded { .. }) => {
                    return Ok(TakeOver::Refused("the budget left does not cover generating it again"));
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            (self.quota.admit_budgets(&payer, 0).await?, None)
        };
        let Some((reply, conversation)) = self.store.take_over_reply(&stale.id, stale_before, now).await? else {
            // `admission` gives its holds back.
            return Ok(TakeOver::Lost);
        };
        // Taken over once: `take_over_reply` counted it.
        let user_id = conversation.user_id.clone();
        self.start_generation((&reply, 1), &user_id, model, conversation, upto_seq, (admission.reservation, cap));
        Ok(TakeOver::Taken(reply))
    }
}

/// One reply counted in `palaver_replies_in_flight` while it lives (a
/// panicking reply task included).
struct InFlight;

impl InFlight {
    fn count() -> Self {
        metrics::gauge!("palaver_replies_in_flight").increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("palaver_replies_in_flight").decrement(1.0);
    }
}

/// The longest pause between two tries of a reply's final write.
const MAX_FINAL_WRITE_BACKOFF: Duration = Duration::from_secs(5);

enum Outcome {
    Complete(Option<Usage>),
    Cancelled,
    Failed { code: &'static str, error: String },
}

impl Outcome {
    fn failed(e: &ProviderError) -> Self {
        Outcome::Failed { code: provider_error_code(e), error: e.to_string() }
    }
}

impl Chat {
    /// Runs the provider stream into the live reply. Timeouts, retries and
    /// fallback models are the provider layer's; this answers which model
    /// replied. A stream that breaks off while no follower shows the text (a
    /// plain JSON request) starts over as the provider layer allows.
    async fn generate(
        &self,
        live: &LiveReply,
        model: &ModelId,
        context: Vec<ChatMessage>,
        max_tokens: Option<u32>,
    ) -> (Outcome, ModelId) {
        let options = ChatOptions { max_tokens, ..Default::default() };
        let mut restarts = Restarts::new(model);
        let mut restart_after: Option<Duration> = None;
        loop {
            let start = async {
                match restart_after.take() {
                    None => self.providers.stream_with(model, context.clone(), options.clone()).await,
                    Some(wait) => self.providers.restart(&restarts, wait, &context, &options).await,
                }
            };
            let stream = tokio::select! {
                _ = live.cancel.cancelled() => return (Outcome::Cancelled, model.clone()),
                started = start => match started {
                    Err(e) => return (Outcome::failed(&e), model.clone()),
                    Ok(s) => s,
                },
            };
            let answered_by = stream.model().clone();
            match self.run_stream(live, stream).await {
                Ok(outcome) => return (outcome, answered_by),
                Err(e) => match self.providers.may_restart(&mut restarts, &answered_by, &e) {
                    Some(wait) if live.start_over() => restart_after = Some(wait),
                    _ => return (Outcome::failed(&e), answered_by),
                },
            }
        }
    }

    /// One provider stream into the live reply, until it ends, breaks off
    /// (`Err`) or the reply is cancelled.
    async fn run_stream(&self, live: &LiveReply, stream: ReplyStream) -> Result<Outcome, ProviderError> {
        tokio::pin!(stream);
        let mut usage = None;
        loop {
            tokio::select! {
                _ = live.cancel.cancelled() => return Ok(Outcome::Cancelled),
                next = stream.next() => match next {
                    None => return Ok(Outcome::Complete(usage)),
                    Some(Err(e)) => return Err(e),
                    Some(Ok(ChatEvent::Delta(d))) => {
                        if !d.is_empty() {
                            live.push(&d);
                        }
                    }
                    Some(Ok(ChatEvent::Usage(u))) => usage = Some(u),
                    // Chat asks for no tools; the reason is implied by the outcome.
                    Some(Ok(ChatEvent::ToolCallDelta { .. } | ChatEvent::Finish(_))) => {}
                },
            }
        }
    }

    /// Saves the partial text every flush interval while the reply runs: the
    /// most a crash can lose, this generator's heartbeat (kept up while the
    /// provider is still thinking), and how a cancel asked on another instance
    /// arrives. It runs beside the generator, so a slow database never holds
    /// up the text.
    async fn keep_alive(self: Arc<Self>, live: Arc<LiveReply>, takeovers: i64) {
        let mut flush = tokio::time::interval(Duration::from_millis(self.settings.stream_flush_ms.max(10)));
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        flush.tick().await;
        loop {
            flush.tick().await;
            match self.store.save_partial(&live.message_id, &live.text(), self.clock.now_ms(), takeovers).await {
                Ok(true) => live.cancel(),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = e.to_string().as_str(), "could not save a reply's partial text"),
            }
        }
    }

    /// Writes the reply's final self. Followers are told the reply finished
    /// only once it is stored, so the write is retried, with backoff, until the
    /// database takes it or the process stops: a reply that stayed `streaming`
    /// would later be reported as interrupted although it completed.
    async fn finalize(
        &self,
        live: &LiveReply,
        (mut message, takeovers): (MessageRecord, i64),
        model: &ModelId,
        outcome: Outcome,
    ) -> MessageRecord {
        message.content = live.text();
        match outcome {
            Outcome::Complete(usage) => {
                // The provider layer always ends with usage; this is belt and braces.
                let usage = usage.unwrap_or_else(|| Usage {
                    prompt_tokens: 0,
                    completion_tokens: crate::domain::context::estimate_tokens(&message.content) as i64,
                    estimated: true,
                });
                // Written with the next batch (`flush_gateway_usage`), not here.
                self.replies.usage.defer(
                    &live.user_id,
                    self.clock.now_ms(),
                    usage.prompt_tokens,
                    usage.completion_tokens,
                );
                message.status = MessageStatus::Complete;
                message.prompt_tokens = Some(usage.prompt_tokens);
                message.completion_tokens = Some(usage.completion_tokens);
                message.usage_estimated = usage.estimated;
            }
            Outcome::Cancelled => message.status = MessageStatus::Cancelled,
            Outcome::Failed { code, error } => {
                message.status = MessageStatus::Failed;
                message.error_code = Some(code.to_owned());
                message.error = Some(error);
            }
        }
        message.model = Some(model.to_string());
        let mut backoff = Duration::from_millis(100);
        for attempt in 1u64.. {
            let update = MessageUpdate {
                content: &message.content,
                status: message.status,
                model: message.model.as_deref(),
                prompt_tokens: message.prompt_tokens,
                completion_tokens: message.completion_tokens,
                usage_estimated: message.usage_estimated,
                error: message.error.as_deref(),
                error_code: message.error_code.as_deref(),
                now: self.clock.now_ms(),
                takeovers,
            };
            match self.store.finish_message(&message.id, update).await {
                Ok(()) => {
                    if attempt > 1 {
                        tracing::info!(attempt, "stored a finished reply after the database came back");
                    }
                    break;
                }
                Err(e) => {
                    tracing::error!(
                        error = e.to_string().as_str(),
                        attempt,
                        "could not store a finished reply; retrying"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_FINAL_WRITE_BACKOFF);
                }
            }
        }
        message
    }
}

pub fn provider_error_code(e: &ProviderError) -> &'static str {
    match e {
        ProviderError::Timeout => "provider_timeout",
        _ => "provider_error",
    }
}
