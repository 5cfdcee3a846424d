//! The context budget: what part of a conversation a model gets to see.
//!
//! The system prompt is always kept, room is reserved for the reply, and the
//! oldest turns are dropped first until the rest fits the model's window.
//! Token counts are estimated (about four characters a token), which is what
//! every provider-agnostic client does before it has the provider's tokenizer.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatRole {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: ChatRole,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: ChatRole, content: impl Into<String>) -> Self {
        Self { role, content: content.into() }
    }
}

/// Per-message overhead of the chat formats (role markers, separators).
const MESSAGE_OVERHEAD_TOKENS: usize = 4;

/// A rough token estimate used where the provider reports none.
pub fn estimate_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4)
}

fn message_tokens(m: &ChatMessage) -> usize {
    estimate_tokens(&m.content) + MESSAGE_OVERHEAD_TOKENS
}

/// The size of a model's context window, in tokens.
pub fn context_window(model: &str) -> usize {
    let m = model.to_ascii_lowercase();
    let table: &[(&str, usize)] = &[
        ("gpt-4o", 128_000),
        ("gpt-4.1", 1_000_000),
        ("gpt-4-turbo", 128_000),
        ("gpt-4", 8_192),
        ("gpt-3.5", 16_385),
        ("o1", 200_000),
        ("o3", 200_000),
        ("o4", 200_000),
        ("gemini-1.5", 1_000_000),
        ("gemini-2", 1_000_000),
        ("gemini", 32_000),
        ("claude", 200_000),
        ("llama-3.1", 128_000),
        ("llama-3.3", 128_000),
        ("llama3", 8_192),
        ("mixtral", 32_768),
        ("offline", 8_192),
    ];
    table.iter().find(|(prefix, _)| m.contains(prefix)).map_or(8_192, |&(_, n)| n)
}

/// Picks the messages sent to the model: the system prompt (if any), then the
/// newest turns of `history` that fit in `window - reply_reserve` tokens. The
/// last message (the one being answered) is always kept.
pub fn fit_history(
    system_prompt: Option<&str>,
    history: &[ChatMessage],
    window: usize,
    reply_reserve: usize,
) -> Vec<ChatMessage> {
    let system = system_prompt.filter(|p| !p.trim().is_empty()).map(|p| ChatMessage::new(ChatRole::System, p));
    let mut budget = window.saturating_sub(reply_reserve);
    budget = budget.saturating_sub(system.as_ref().map_or(0, message_tokens));

    let mut kept = Vec::new();
    for (i, m) in history.iter().enumerate().rev() {
        let cost = message_tokens(m);
        let is_last = i + 1 == history.len();
        if cost > budget && !is_last {
            break;
        }
        budget = budget.saturating_sub(cost);
        kept.push(m.clone());
    }
    kept.reverse();
    system.into_iter().chain(kept).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> ChatMessage {
        ChatMessage::new(ChatRole::User, s)
    }

    #[test]
    fn keeps_everything_that_fits() {
        let h = vec![user("a"), ChatMessage::new(ChatRole::Assistant, "b"), user("c")];
        let out = fit_history(Some("sys"), &h, 1000, 100);
        assert_eq!(out.len(), 4);
        assert_eq!(out[0].role, ChatRole::System);
        assert_eq!(out[3].content, "c");
    }

    #[test]
    fn drops_oldest_first_and_keeps_system_prompt() {
        let big = "x".repeat(400); // 100 tokens + overhead
        let h = vec![user(&big), user(&big), user(&big), user("last")];
        let out = fit_history(Some("be nice"), &h, 250, 50);
        assert_eq!(out[0].content, "be nice");
        assert_eq!(out.last().unwrap().content, "last");
        assert_eq!(out.len(), 3, "system + one big + last");
    }

    #[test]
    fn the_new_message_is_kept_even_when_too_big() {
        let out = fit_history(None, &[user(&"y".repeat(10_000))], 100, 50);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn empty_system_prompt_is_not_sent() {
        assert_eq!(fit_history(Some("  "), &[user("hi")], 100, 10).len(), 1);
    }

    #[test]
    fn windows_come_from_the_table_with_a_default() {
        assert_eq!(context_window("gpt-4o-mini"), 128_000);
        assert_eq!(context_window("claude-3-5-sonnet"), 200_000);
        assert_eq!(context_window("something-new"), 8_192);
    }
}
