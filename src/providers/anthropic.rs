//! Anthropic Messages, streamed. `base_url` is the host root, as in
//! Anthropic's SDKs. The system prompt is the top-level `system`; the
//! conversation must start with a user turn and alternate. Input tokens come
//! with `message_start`, output tokens (cumulative) with `message_delta`.
//! Tool calls are `tool_use` content blocks, their results `tool_result`
//! blocks of the next user turn; a call's input streams as
//! `input_json_delta` pieces of its block.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ChatEvent, ChatOptions, ChatProvider, ChatRequest, ChatStream, FinishReason, ProviderError, ResponseFormat,
    ToolChoice, Turn, Usage,
    http::{Endpoint, Target},
    sse::{self, Decoder, SseEvent},
    system_and_turns,
    tools::{ToolCallStream, arguments_object},
};
use crate::domain::context::ChatRole;

const API_VERSION: &str = "2023-06-01";

pub struct AnthropicProvider {
    models: Vec<String>,
    max_tokens: u32,
    endpoint: Endpoint,
    messages: Target,
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
        let endpoint = Endpoint::new("anthropic", base_url, keys, http);
        let messages = Target::new(&endpoint, "/v1/messages");
        Self { models, max_tokens, endpoint, messages }
    }
}

/// A turn's content: plain text as a string, as before tools; else blocks,
/// tool results first in a user turn (Anthropic requires it) and tool calls
/// after the text in an assistant turn.
fn content(turn: Turn<'_>) -> Value {
    if turn.calls.is_empty() && turn.results.is_empty() {
        return Value::String(turn.text.unwrap_or_default());
    }
    let results = turn.results.iter().map(|m| {
        let id = m.tool_call_id.as_deref().unwrap_or_default();
        json!({"type": "tool_result", "tool_use_id": id, "content": m.content})
    });
    // Anthropic refuses empty text blocks.
    let text = turn.text.filter(|t| !t.is_empty()).map(|t| json!({"type": "text", "text": t}));
    let calls = turn
        .calls
        .iter()
        .map(|c| json!({"type": "tool_use", "id": c.id, "name": c.name, "input": arguments_object(&c.arguments)}));
    Value::Array(results.chain(text).chain(calls).collect())
}

/// The system prompt, with what stands in for `response_format`: Anthropic
/// has no JSON mode, so the model is asked for JSON in words.
fn system_prompt(system: Option<String>, options: &ChatOptions) -> Option<String> {
    let ask = match &options.response_format {
        None | Some(ResponseFormat::Text) => return system,
        Some(ResponseFormat::JsonObject) => "Answer with one JSON object and nothing else.".to_owned(),
        Some(ResponseFormat::JsonSchema { schema, .. }) => {
            format!("Answer with one JSON object that conforms to this JSON Schema, and nothing else: {schema}")
        }
    };
    Some(match system {
        Some(system) => format!("{system}\n\n{ask}"),
        None => ask,
    })
}

/// `tool_choice`, with `parallel_tool_calls: false` folded in (Anthropic
/// says it as `disable_parallel_tool_use` on the choice).
fn tool_choice(options: &ChatOptions) -> Option<Value> {
    let single = options.parallel_tool_calls == Some(false);
    let mut choice = match &options.tool_choice {
        Some(ToolChoice::None) => return Some(json!({"type": "none"})),
        Some(ToolChoice::Auto) => json!({"type": "auto"}),
        Some(ToolChoice::Required) => json!({"type": "any"}),
        Some(ToolChoice::Function(name)) => json!({"type": "tool", "name": name}),
        None if single && !options.tools.is_empty() => json!({"type": "auto"}),
        None => return None,
    };
    if single {
        choice["disable_parallel_tool_use"] = json!(true);
    }
    Some(choice)
}

/// The request body: the system prompt as `system`, turns of one side
/// merged, assistant turns before the first user turn dropped (the
/// context budget may have cut that user turn), and the options Anthropic
/// has (`seed` it has not).
fn request_body(request: &ChatRequest, max_tokens: u32) -> Value {
    let o = &request.options;
    let (system, turns) = system_and_turns(&request.messages);
    let messages: Vec<Value> = turns
        .into_iter()
        .skip_while(|turn| turn.role == ChatRole::Assistant)
        .map(|turn| json!({ "role": turn.role, "content": content(turn) }))
        .collect();
    let mut body = json!({
        "model": request.model,
        "max_tokens": o.max_tokens.unwrap_or(max_tokens),
        "messages": messages,
        "stream": true,
    });
    if let Some(system) = system_prompt(system, o) {
        body["system"] = Value::String(system);
    }
    if let Some(t) = o.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(p) = o.top_p {
        body["top_p"] = json!(p);
    }
    if !o.stop.is_empty() {
        body["stop_sequences"] = json!(o.stop);
    }
    if let Some(user) = &o.user {
        body["metadata"] = json!({"user_id": user});
    }
    if !o.tools.is_empty() {
        let tools: Vec<Value> = o
            .tools
            .iter()
            .map(|t| {
                // The API requires a schema; a tool without parameters takes an empty object.
                let schema = if t.parameters.is_null() {
                    json!({"type": "object", "properties": {}})
                } else {
                    t.parameters.clone()
                };
                let mut tool = json!({"name": t.name, "input_schema": schema});
                if let Some(d) = &t.description {
                    tool["description"] = json!(d);
                }
                tool
            })
            .collect();
        body["tools"] = Value::Array(tools);
    }
    if let Some(choice) = tool_choice(o) {
        body["tool_choice"] = choice;
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
        let body = request_body(&request, self.max_tokens);
        let response = self
            .endpoint
            .send(|http, key| {
                let req = self.messages.post(http).header("anthropic-version", API_VERSION).json(&body);
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
        index: u64,
        content_block: Value,
    },
    ContentBlockDelta {
        index: u64,
        delta: Value,
    },
    ContentBlockStop {
        index: u64,
    },
    MessageDelta {
        delta: Option<MessageDeltaBody>,
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
struct MessageDeltaBody {
    stop_reason: Option<String>,
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
    /// Keyed by content block index: blocks are numbered over text and tool
    /// blocks alike, our indices count tool calls only.
    calls: ToolCallStream,
}

fn stop_reason(reason: &str) -> FinishReason {
    match reason {
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "refusal" => FinishReason::ContentFilter,
        // end_turn, stop_sequence, pause_turn
        _ => FinishReason::Stop,
    }
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
            Event::ContentBlockStart { index, content_block } => {
                if content_block.get("type").and_then(Value::as_str) == Some("tool_use") {
                    let field = |name: &str| content_block.get(name).and_then(Value::as_str);
                    // The input is `{}` here and streams after; a proxy may send it whole instead.
                    let input = content_block
                        .get("input")
                        .filter(|i| i.as_object().is_some_and(|o| !o.is_empty()))
                        .map(Value::to_string)
                        .unwrap_or_default();
                    self.calls.piece(&index.to_string(), field("id"), field("name"), &input, out);
                } else {
                    out.extend(text_of(&content_block).map(ChatEvent::Delta));
                }
            }
            Event::ContentBlockDelta { index, delta } => {
                let partial = delta.get("partial_json").and_then(Value::as_str);
                match partial {
                    Some(json) if self.calls.knows(&index.to_string()) => {
                        self.calls.piece(&index.to_string(), None, None, json, out);
                    }
                    _ => out.extend(text_of(&delta).map(ChatEvent::Delta)),
                }
            }
            Event::ContentBlockStop { index } => self.calls.close(&index.to_string(), out),
            Event::MessageDelta { delta, usage } => {
                let usage = usage.unwrap_or_default();
                self.prompt_tokens = usage.prompt().or(self.prompt_tokens);
                self.completion_tokens = usage.output_tokens.or(self.completion_tokens);
                if let Some(reason) = delta.and_then(|d| d.stop_reason) {
                    self.calls.close_all(out);
                    out.push(ChatEvent::Finish(stop_reason(&reason)));
                }
            }
            Event::MessageStop => {
                self.calls.close_all(out);
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
            options: ChatOptions::default(),
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
                ChatEvent::Finish(FinishReason::Stop),
                ChatEvent::Usage(Usage { prompt_tokens: 12, completion_tokens: 5, estimated: false })
            ]
        );
    }

    #[test]
    fn text_and_tool_blocks_interleave_and_block_indices_become_tool_indices() {
        let out = feed(&[
            r#"{"type":"message_start","message":{"usage":{"input_tokens":3,"output_tokens":1}}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Let me"}}"#,
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_a","name":"f","input":{}}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"q\":\"\\\""}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" see"}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"\"}"}}"#,
            r#"{"type":"content_block_stop","index":1}"#,
            r#"{"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_b","name":"g","input":{}}}"#,
            r#"{"type":"content_block_stop","index":2}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":9}}"#,
            r#"{"type":"message_stop"}"#,
        ])
        .unwrap();
        assert_eq!(
            out,
            [
                ChatEvent::Delta("Let me".into()),
                ChatEvent::tool_delta(0, Some("toolu_a"), Some("f"), ""),
                ChatEvent::tool_delta(0, None, None, r#"{"q":"\""#),
                ChatEvent::Delta(" see".into()),
                ChatEvent::tool_delta(0, None, None, "\"}"),
                ChatEvent::tool_delta(1, Some("toolu_b"), Some("g"), ""),
                ChatEvent::tool_delta(1, None, None, "{}"),
                ChatEvent::Finish(FinishReason::ToolCalls),
                ChatEvent::Usage(Usage { prompt_tokens: 3, completion_tokens: 9, estimated: false }),
            ]
        );
    }

    #[test]
    fn stop_reasons_map_to_ours() {
        for (wire, ours) in [
            ("end_turn", FinishReason::Stop),
            ("stop_sequence", FinishReason::Stop),
            ("max_tokens", FinishReason::Length),
            ("tool_use", FinishReason::ToolCalls),
            ("refusal", FinishReason::ContentFilter),
        ] {
            assert_eq!(stop_reason(wire), ours, "{wire}");
        }
    }

    #[test]
    fn tool_results_merge_into_one_user_turn_with_the_next_user_message() {
        let call = |id: &str| crate::domain::context::ToolCall {
            id: id.into(),
            name: "f".into(),
            arguments: "not json".into(),
        };
        let request = ChatRequest {
            model: "claude".into(),
            messages: vec![
                ChatMessage::new(ChatRole::User, "q"),
                ChatMessage::tool_calls("", vec![call("a"), call("b")]),
                ChatMessage::tool_result("a", "1"),
                ChatMessage::tool_result("b", "2"),
                ChatMessage::new(ChatRole::User, "next"),
            ],
            options: ChatOptions { parallel_tool_calls: Some(false), ..ChatOptions::default() },
        };
        let body = request_body(&request, 100);
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "a", "name": "f", "input": {}},
                    {"type": "tool_use", "id": "b", "name": "f", "input": {}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "a", "content": "1"},
                    {"type": "tool_result", "tool_use_id": "b", "content": "2"},
                    {"type": "text", "text": "next"}
                ]}
            ]),
            "unparsable arguments are sent as an empty input"
        );
        assert!(body.get("tool_choice").is_none(), "no tools, no choice");
    }

    #[test]
    fn error_events_and_cut_streams_fail() {
        let err = feed(&[r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#]);
        assert!(matches!(err, Err(ProviderError::Upstream { status: 529, .. })));
        assert!(feed(&[r#"{"type":"message_start","message":{}}"#]).is_err());
    }
}
