//! Anthropic Messages, streamed. `base_url` is the host root, as in
//! Anthropic's SDKs. The system prompt is the top-level `system`; the
//! conversation must start with a user turn and alternate. Input tokens come
//! with `message_start`, output tokens (cumulative) with `message_delta`.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ChatEvent, ChatProvider, ChatRequest, ChatStream, ProviderError, Usage,
    http::Endpoint,
    sse::{self, Decoder, SseEvent},
    system_and_turns,
};
use crate::domain::context::ChatRole;

const API_VERSION: &str = "2023-06-01";

pub struct AnthropicProvider {
    models: Vec<String>,
    max_tokens: u32,
    endpoint: Endpoint,
}

impl AnthropicProvider {
    /// `max_tokens` caps each reply (the API requires a cap).
    pub fn new(
        base_url: &str,
        keys: Option<&str>,
        models: Vec<String>,
        max_tokens: u32,
        http: reqwest::Client,
    ) -> Self {
        let base_url = base_url.trim_end_matches('/').trim_end_matches("/v1");
        Self { models, max_tokens, endpoint: Endpoint::new("anthropic", base_url, keys, http) }
    }
}

/// The request body: the system prompt as `system`, turns of one role
/// merged, and assistant turns before the first user turn dropped (the
/// context budget may have cut that user turn).
fn request_body(request: &ChatRequest, max_tokens: u32) -> Value {
    let (system, turns) = system_and_turns(&request.messages);
    let messages: Vec<Value> = turns
        .into_iter()
        .skip_while(|(role, _)| *role == ChatRole::Assistant)
        .map(|(role, content)| json!({ "role": role, "content": content }))
        .collect();
    let mut body = json!({
        "model": request.model,
        "max_tokens": max_tokens,
        "messages": messages,
        "stream": true,
    });
    if let Some(system) = system {
        body["system"] = Value::String(system);
    }
    body
}

#[async_trait::async_trait]
impl ChatProvider for AnthropicProvider {
    fn name(&self) -> &str {
        "anthropic"
    }

    fn models(&self) -> Vec<String> {
        self.models.clone()
    }

    async fn stream_chat(&self, request: ChatRequest) -> Result<ChatStream, ProviderError> {
        let url = format!("{}/v1/messages", self.endpoint.base_url);
        let body = request_body(&request, self.max_tokens);
        let response = self
            .endpoint
            .send(|http, key| {
                let req = http.post(&url).header("anthropic-version", API_VERSION).json(&body);
                match key {
                    Some(k) => req.header("x-api-key", k),
                    None => req,
                }
            })
            .await?;
        Ok(sse::decode(response, AnthropicDecoder::default()))
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        content_block: Value,
    },
    ContentBlockDelta {
        delta: Value,
    },
    MessageDelta {
        usage: Option<WireUsage>,
    },
    MessageStop,
    Error {
        error: WireError,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct StartMessage {
    usage: Option<WireUsage>,
}

#[derive(Deserialize, Default)]
struct WireUsage {
    input_tokens: Option<i64>,
    cache_creation_input_tokens: Option<i64>,
    cache_read_input_tokens: Option<i64>,
    output_tokens: Option<i64>,
}

impl WireUsage {
    /// Cached prompt tokens are prompt tokens too.
    fn prompt(&self) -> Option<i64> {
        self.input_tokens
            .map(|i| i + self.cache_creation_input_tokens.unwrap_or(0) + self.cache_read_input_tokens.unwrap_or(0))
    }
}

#[derive(Deserialize)]
struct WireError {
    #[serde(rename = "type")]
    kind: String,
    message: String,
}

#[derive(Default)]
struct AnthropicDecoder {
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
}

fn text_of(block: &Value) -> Option<String> {
    let is_text = matches!(block.get("type").and_then(Value::as_str), Some("text" | "text_delta"));
    is_text.then(|| block.get("text").and_then(Value::as_str)).flatten().filter(|t| !t.is_empty()).map(str::to_owned)
}

impl Decoder for AnthropicDecoder {
    fn on_event(&mut self, event: SseEvent, out: &mut Vec<ChatEvent>) -> Result<bool, ProviderError> {
        if event.data.trim().is_empty() {
            return Ok(false);
        }
        let parsed: Event = serde_json::from_str(&event.data)
            .map_err(|e| ProviderError::Protocol(format!("unreadable Anthropic event: {e}")))?;
        match parsed {
            Event::MessageStart { message } => {
                let usage = message.usage.unwrap_or_default();
                self.prompt_tokens = usage.prompt();
                self.completion_tokens = usage.output_tokens;
            }
            Event::ContentBlockStart { content_block } => out.extend(text_of(&content_block).map(ChatEvent::Delta)),
            Event::ContentBlockDelta { delta } => out.extend(text_of(&delta).map(ChatEvent::Delta)),
            Event::MessageDelta { usage } => {
                let usage = usage.unwrap_or_default();
                self.prompt_tokens = usage.prompt().or(self.prompt_tokens);
                self.completion_tokens = usage.output_tokens.or(self.completion_tokens);
            }
            Event::MessageStop => {
                if let (Some(prompt_tokens), Some(completion_tokens)) = (self.prompt_tokens, self.completion_tokens) {
                    out.push(ChatEvent::Usage(Usage { prompt_tokens, completion_tokens, estimated: false }));
                }
                return Ok(true);
            }
            Event::Error { error } => {
                return Err(match error.kind.as_str() {
                    "rate_limit_error" => ProviderError::RateLimited { retry_after: None },
                    "overloaded_error" => ProviderError::Upstream { status: 529, message: error.message },
                    "authentication_error" => ProviderError::Auth(401),
                    "permission_error" => ProviderError::Auth(403),
                    "invalid_request_error" => ProviderError::Upstream { status: 400, message: error.message },
                    _ => ProviderError::Upstream { status: 500, message: error.message },
                });
            }
            Event::Other => {}
        }
        Ok(false)
    }

    fn on_eof(&mut self, _out: &mut Vec<ChatEvent>) -> Result<(), ProviderError> {
        Err(ProviderError::Connect("the provider's stream ended before message_stop".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::context::ChatMessage;

    #[test]
    fn system_is_top_level_and_turns_alternate_from_a_user_turn() {
        let request = ChatRequest {
            model: "claude-3-5-haiku-latest".into(),
            messages: vec![
                ChatMessage::new(ChatRole::System, "be brief"),
                ChatMessage::new(ChatRole::Assistant, "orphan"),
                ChatMessage::new(ChatRole::User, "a"),
                ChatMessage::new(ChatRole::User, "b"),
            ],
        };
        let body = request_body(&request, 100);
        assert_eq!(body["system"], "be brief");
        assert_eq!(body["max_tokens"], 100);
        assert_eq!(body["stream"], true);
        assert_eq!(body["messages"], json!([{ "role": "user", "content": "a\n\nb" }]));
    }

    fn feed(events: &[&str]) -> Result<Vec<ChatEvent>, ProviderError> {
        let mut d = AnthropicDecoder::default();
        let mut out = Vec::new();
        for e in events {
            if d.on_event(SseEvent { data: (*e).into(), ..Default::default() }, &mut out)? {
                return Ok(out);
            }
        }
        d.on_eof(&mut out).map(|()| out)
    }

    #[test]
    fn usage_adds_up_from_start_and_delta() {
        let out = feed(&[
            r#"{"type":"message_start","message":{"usage":{"input_tokens":10,"cache_read_input_tokens":2,"output_tokens":1}}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{"}}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":5}}"#,
            r#"{"type":"message_stop"}"#,
        ])
        .unwrap();
        assert_eq!(
            out,
            [
                ChatEvent::Delta("Hi".into()),
                ChatEvent::Usage(Usage { prompt_tokens: 12, completion_tokens: 5, estimated: false })
            ]
        );
    }

    #[test]
    fn error_events_and_cut_streams_fail() {
        let err = feed(&[r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#]);
        assert!(matches!(err, Err(ProviderError::Upstream { status: 529, .. })));
        assert!(feed(&[r#"{"type":"message_start","message":{}}"#]).is_err());
    }
}
