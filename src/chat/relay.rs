//! The gateway's reply: a stateless completion for `/v1` — the caller sends
//! the whole conversation, nothing of it is stored — through the same
//! providers, retries, timeouts and fallback models as every chat. What is
//! kept is the usage, per key, owner, model and day, gathered in memory and
//! written in batches (`flush_gateway_usage`), never on the request's path.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures::Stream;

use super::{Caller, Chat};
use crate::{
    domain::{
        context::{ChatMessage, message_tokens},
        conversation::ModelId,
    },
    providers::{ChatEvent, ChatOptions, Completion, ProviderError, ReplyStream},
    quota::{Admission, QuotaError, Reservation},
    store::{ApiUsageCounts, ApiUsageKey, UsagePeriod},
};

/// Gateway usage not yet written.
#[derive(Default, Clone)]
pub struct GatewayUsage {
    pending: Arc<Mutex<HashMap<ApiUsageKey, ApiUsageCounts>>>,
}

impl GatewayUsage {
    fn add(&self, key: ApiUsageKey, prompt: i64, completion: i64) {
        let mut pending = self.pending.lock().expect("gateway usage lock poisoned");
        let counts = pending.entry(key).or_default();
        counts.requests += 1;
        counts.prompt_tokens += prompt;
        counts.completion_tokens += completion;
    }

    pub fn is_empty(&self) -> bool {
        self.pending.lock().expect("gateway usage lock poisoned").is_empty()
    }
}

impl Chat {
    /// Admits a gateway call against the caller's limits: with a budget, its
    /// worst case (the prompt's estimate plus `max_tokens`, which defaults to
    /// the configured reserve and caps the answer) is reserved.
    pub async fn admit_relay(
        &self,
        caller: &Caller,
        messages: &[ChatMessage],
        options: &mut ChatOptions,
    ) -> Result<Admission, QuotaError> {
        let mut tokens = 0;
        if self.quota.budgeted(caller) {
            let cap = *options.max_tokens.get_or_insert(self.quota.default_reserve());
            tokens = messages.iter().map(message_tokens).sum::<usize>() as i64 + i64::from(cap);
        }
        self.quota.admit(caller, tokens).await
    }

    /// Starts an admitted gateway reply. The stream is the provider layer's
    /// (deltas, tool-call deltas, one `Finish`, one `Usage`); its usage is
    /// counted against the caller, and settles the reservation, when it arrives.
    pub async fn relay(
        self: &Arc<Self>,
        caller: &Caller,
        model: &ModelId,
        messages: Vec<ChatMessage>,
        options: ChatOptions,
        reservation: Reservation,
    ) -> Result<RelayStream, ProviderError> {
        let inner = self.providers.stream_with(model, messages, options).await?;
        Ok(RelayStream {
            inner,
            chat: self.clone(),
            caller: Box::new(caller.clone()),
            reservation: Arc::new(Mutex::new(Some(reservation))),
        })
    }

    /// A whole gateway reply, for a non-stream request: nothing is shown
    /// before the end, so a stream that breaks off starts over as the
    /// provider layer allows (`Providers::restart`).
    pub async fn relay_complete(
        self: &Arc<Self>,
        caller: &Caller,
        model: &ModelId,
        messages: Vec<ChatMessage>,
        options: ChatOptions,
        reservation: Reservation,
    ) -> Result<Completion, ProviderError> {
        let first = self.providers.stream_with(model, messages.clone(), options.clone()).await?;
        // Every try holds the one reservation: the try that reports usage
        // settles it; a try that broke off leaves it to the next.
        let reservation = Arc::new(Mutex::new(Some(reservation)));
        let wrap = |inner| RelayStream {
            inner,
            chat: self.clone(),
            caller: Box::new(caller.clone()),
            reservation: reservation.clone(),
        };
        self.providers.collect_restarting(model, first, &messages, &options, wrap).await
    }

    /// Writes the gateway usage gathered since the last flush (owner totals
    /// included); what fails stays for the next one. True when nothing is left.
    pub async fn flush_gateway_usage(&self) -> bool {
        let batch: Vec<(ApiUsageKey, ApiUsageCounts)> =
            std::mem::take(&mut *self.gateway_usage.pending.lock().expect("gateway usage lock poisoned"))
                .into_iter()
                .collect();
        if !batch.is_empty()
            && let Err(e) = self.store.add_api_usage(&batch).await
        {
            tracing::warn!(error = e.to_string().as_str(), "could not store gateway usage; kept for the next try");
            for (key, c) in batch {
                let mut pending = self.gateway_usage.pending.lock().expect("gateway usage lock poisoned");
                let counts = pending.entry(key).or_default();
                counts.requests += c.requests;
                counts.prompt_tokens += c.prompt_tokens;
                counts.completion_tokens += c.completion_tokens;
            }
        }
        let totals = self.replies.usage.flush(&self.store).await;
        let by_model = self.quota.flush_usage().await;
        totals && by_model && self.gateway_usage.is_empty()
    }
}

/// A gateway reply under way; see `Chat::relay`.
pub struct RelayStream {
    inner: ReplyStream,
    chat: Arc<Chat>,
    caller: Box<Caller>,
    /// Settled by the usage; dropped unsettled (given back) without it. The
    /// tries of one non-stream reply share it.
    reservation: Arc<Mutex<Option<Reservation>>>,
}

impl RelayStream {
    /// The model answering (a fallback model if the one asked for failed).
    pub fn model(&self) -> &ModelId {
        self.inner.model()
    }
}

impl Stream for RelayStream {
    type Item = Result<ChatEvent, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(ChatEvent::Usage(u)))) = &next {
            let now = self.chat.clock.now_ms();
            let key = ApiUsageKey {
                key_id: self.caller.key_id.clone().unwrap_or_default(),
                user_id: self.caller.user_id.clone(),
                model: self.inner.model().to_string(),
                day: UsagePeriod::Day.key(now),
            };
            self.chat.gateway_usage.add(key, u.prompt_tokens, u.completion_tokens);
            self.chat.replies.usage.defer(&self.caller.user_id, now, u.prompt_tokens, u.completion_tokens);
            let model = self.inner.model().to_string();
            let reservation = self.reservation.lock().expect("reservation lock poisoned").take();
            if let Some(r) = reservation {
                r.settle(&model, u.prompt_tokens, u.completion_tokens);
            }
        }
        next
    }
}
