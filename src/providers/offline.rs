//! The offline provider: answers without any network, deterministically, so
//! a fresh install works and tests are repeatable. Its replies say what it is.

use futures::stream;

use super::{ChatEvent, ChatProvider, ChatRequest, ChatStream, ProviderError, Usage};
use crate::domain::context::{ChatRole, estimate_tokens};

pub const MODEL_ID: &str = "offline/palaver-offline";

pub struct OfflineProvider;

impl OfflineProvider {
    fn reply_to(request: &ChatRequest) -> String {
        let last = request.messages.iter().rev().find(|m| m.role == ChatRole::User).map_or("", |m| m.content.as_str());
        let quoted: String = last.chars().take(200).collect();
        let ellipsis = if last.chars().count() > 200 { "…" } else { "" };
        let earlier = request.messages.len().saturating_sub(1);
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        let chars = last.chars().count();
        format!(
            "[offline] No LLM provider is configured, so this is a canned answer. \
             You said: \"{quoted}{ellipsis}\" ({chars} character{}, {earlier} earlier message{} in context). \
             Set OPENAI_API_KEY (or another provider's key) to get real answers.",
            plural(chars),
            plural(earlier),
        )
    }
}

#[async_trait::async_trait]
impl ChatProvider for OfflineProvider {
    fn name(&self) -> &str {
        "offline"
    }

    fn models(&self) -> Vec<String> {
        vec![MODEL_ID.trim_start_matches("offline/").to_owned()]
    }

    async fn stream_chat(&self, request: ChatRequest) -> Result<ChatStream, ProviderError> {
        let text = Self::reply_to(&request);
        let usage = Usage {
            prompt_tokens: request.messages.iter().map(|m| estimate_tokens(&m.content) as i64).sum(),
            completion_tokens: estimate_tokens(&text) as i64,
            estimated: true,
        };
        // Word-sized deltas, like a real model's stream.
        let mut events: Vec<Result<ChatEvent, ProviderError>> =
            text.split_inclusive(' ').map(|w| Ok(ChatEvent::Delta(w.to_owned()))).collect();
        events.push(Ok(ChatEvent::Usage(usage)));
        Ok(Box::pin(stream::iter(events)))
    }
}
