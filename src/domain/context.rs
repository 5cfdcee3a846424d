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
    /// A tool's result, answering one of the assistant's tool calls.
    Tool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: ChatRole,
    pub content: String,
    /// The tools an assistant turn called (its `content` may be empty then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a `Tool` message: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// One tool call of an assistant turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, exactly as the model wrote them (which
    /// may not parse, for a reply cut short).
    pub arguments: String,
}

impl ChatMessage {
    pub fn new(role: ChatRole, content: impl Into<String>) -> Self {
        Self { role, content: content.into(), tool_calls: Vec::new(), tool_call_id: None }
    }

    /// An assistant turn that called tools (with `content` said first, if any).
    pub fn tool_calls(content: impl Into<String>, calls: Vec<ToolCall>) -> Self {
        Self { tool_calls: calls, ..Self::new(ChatRole::Assistant, content) }
    }

    /// A tool's result for the call `call_id`.
    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self { tool_call_id: Some(call_id.into()), ..Self::new(ChatRole::Tool, content) }
    }
}

/// Per-message overhead of the chat formats (role markers, separators).
const MESSAGE_OVERHEAD_TOKENS: usize = 4;

/// A rough token estimate used where the provider reports none.
pub fn estimate_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4)
}

/// A message's estimated size: its text, the names and arguments of the
/// tools it called, and the format's overhead.
pub fn message_tokens(m: &ChatMessage) -> usize {
    let calls: usize = m.tool_calls.iter().map(|c| estimate_tokens(&c.name) + estimate_tokens(&c.arguments)).sum();
    estimate_tokens(&m.content) + calls + MESSAGE_OVERHEAD_TOKENS
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
/// last message (the one being answered) is always kept. Tool results whose
/// call was cut are dropped too: every format refuses a result without its call.
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
    let orphans = kept.iter().take(kept.len().saturating_sub(1)).take_while(|m| m.role == ChatRole::Tool).count();
    system.into_iter().chain(kept.into_iter().skip(orphans)).collect()
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
    fn tool_calls_count_and_cut_tool_results_go_with_their_call() {
        let call = ToolCall { id: "c1".into(), name: "lookup".into(), arguments: "x".repeat(400) };
        let asked = ChatMessage::tool_calls("", vec![call]);
        assert!(message_tokens(&asked) > 100, "arguments are counted");
        let h = vec![user("q"), asked, ChatMessage::tool_result("c1", "42"), user("and?")];
        let out = fit_history(None, &h, 60, 10);
        assert_eq!(out.len(), 1, "the call did not fit, so neither does its result: {out:?}");
        assert_eq!(out[0].content, "and?");
        let out = fit_history(None, &h, 1000, 10);
        assert_eq!(out, h);
    }

    #[test]
    fn tool_fields_are_left_out_of_plain_messages_in_json() {
        let plain = serde_json::to_value(user("hi")).unwrap();
        assert_eq!(plain, serde_json::json!({"role": "user", "content": "hi"}));
        let back: ChatMessage = serde_json::from_value(plain).unwrap();
        assert_eq!(back, user("hi"));
        let result = serde_json::to_value(ChatMessage::tool_result("c1", "ok")).unwrap();
        assert_eq!(result, serde_json::json!({"role": "tool", "content": "ok", "tool_call_id": "c1"}));
    }

    #[test]
    fn windows_come_from_the_table_with_a_default() {
        assert_eq!(context_window("gpt-4o-mini"), 128_000);
        assert_eq!(context_window("claude-3-5-sonnet"), 200_000);
        assert_eq!(context_window("something-new"), 8_192);
    }
}
