//! OpenAI chat completions, streamed: the wire format also spoken by
//! OpenRouter, Groq, Ollama and vLLM. `base_url` includes `/v1`, as in the
//! OpenAI SDKs. Usage arrives in a last chunk thanks to
//! `stream_options.include_usage` (Groq also puts it under `x_groq`). Tool
//! calls stream as `delta.tool_calls[]` pieces told apart by `index`.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ChatEvent, ChatProvider, ChatRequest, ChatStream, FinishReason, ProviderError, ResponseFormat, ToolChoice, Usage,
    http::{Endpoint, Target},
    sse::{self, Decoder, SseEvent},
    tools::ToolCallStream,
};
use crate::domain::context::{ChatMessage, ChatRole};

pub struct OpenAiProvider {
    name: String,
    models: Vec<String>,
    endpoint: Endpoint,
    chat: Target,
}

impl OpenAiProvider {
    /// `keys` may hold several comma-separated keys; none for Ollama or vLLM.
    pub fn new(name: &str, base_url: &str, keys: Option<&str>, models: Vec<String>, http: reqwest::Client) -> Self {
        let endpoint = Endpoint::new(name, base_url, keys, http);
        let chat = Target::new(&endpoint, "/chat/completions");
        Self { name: name.to_owned(), models, endpoint, chat }
    }
}

#[async_trait::async_trait]
impl ChatProvider for OpenAiProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn models(&self) -> Vec<String> {
        self.models.clone()
    }

    async fn stream_chat(&self, request: ChatRequest) -> Result<ChatStream, ProviderError> {
        let body = request_body(&self.name, &request);
        let response = self
            .endpoint
            .send(|http, key| {
                let req = self.chat.post(http).json(&body);
                match key {
                    Some(k) => req.bearer_auth(k),
                    None => req,
                }
            })
            .await?;
        Ok(sse::decode(response, OpenAiDecoder::default()))
    }
}

/// OpenAI's reasoning models refuse `max_tokens` and want
/// `max_completion_tokens`, which other servers of the format may not know:
/// the newer name goes to OpenAI's reasoning models only.
fn max_tokens_field(provider: &str, model: &str) -> &'static str {
    let reasoning = ["o1", "o3", "o4", "gpt-5"].iter().any(|p| model.starts_with(p));
    if provider == "openai" && reasoning { "max_completion_tokens" } else { "max_tokens" }
}

fn message(m: &ChatMessage) -> Value {
    match m.role {
        ChatRole::Assistant if !m.tool_calls.is_empty() => {
            let calls: Vec<Value> = m
                .tool_calls
                .iter()
                .map(
                    |c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}),
                )
                .collect();
            let content = if m.content.is_empty() { Value::Null } else { Value::String(m.content.clone()) };
            json!({"role": "assistant", "content": content, "tool_calls": calls})
        }
        ChatRole::Tool => {
            json!({"role": "tool", "tool_call_id": m.tool_call_id.as_deref().unwrap_or_default(), "content": m.content})
        }
        _ => json!({"role": m.role, "content": m.content}),
    }
}

/// The request body: the messages, and of the options only what is set.
fn request_body(provider: &str, request: &ChatRequest) -> Value {
    let o = &request.options;
    let mut body = json!({
        "model": request.model,
        "messages": request.messages.iter().map(message).collect::<Vec<_>>(),
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    let mut set = |field: &str, value: Value| body[field] = value;
    if let Some(t) = o.temperature {
        set("temperature", json!(t));
    }
    if let Some(p) = o.top_p {
        set("top_p", json!(p));
    }
    if let Some(n) = o.max_tokens {
        set(max_tokens_field(provider, &request.model), json!(n));
    }
    if !o.stop.is_empty() {
        set("stop", json!(o.stop));
    }
    if let Some(seed) = o.seed {
        set("seed", json!(seed));
    }
    if let Some(format) = &o.response_format {
        set(
            "response_format",
            match format {
                ResponseFormat::Text => json!({"type": "text"}),
                ResponseFormat::JsonObject => json!({"type": "json_object"}),
                ResponseFormat::JsonSchema { name, schema, strict } => {
                    let mut spec = json!({"name": name, "schema": schema});
                    if let Some(strict) = strict {
                        spec["strict"] = json!(strict);
                    }
                    json!({"type": "json_schema", "json_schema": spec})
                }
            },
        );
    }
    if !o.tools.is_empty() {
        let tools: Vec<Value> = o
            .tools
            .iter()
            .map(|t| {
                let mut function = json!({"name": t.name});
                if let Some(d) = &t.description {
                    function["description"] = json!(d);
                }
                if !t.parameters.is_null() {
                    function["parameters"] = t.parameters.clone();
                }
                json!({"type": "function", "function": function})
            })
            .collect();
        set("tools", Value::Array(tools));
    }
    if let Some(choice) = &o.tool_choice {
        set(
            "tool_choice",
            match choice {
                ToolChoice::Auto => json!("auto"),
                ToolChoice::None => json!("none"),
                ToolChoice::Required => json!("required"),
                ToolChoice::Function(name) => json!({"type": "function", "function": {"name": name}}),
            },
        );
    }
    if let Some(parallel) = o.parallel_tool_calls {
        set("parallel_tool_calls", json!(parallel));
    }
    if let Some(user) = &o.user {
        set("user", json!(user));
    }
    body
}

fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "length" => FinishReason::Length,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        "content_filter" => FinishReason::ContentFilter,
        _ => FinishReason::Stop,
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<WireUsage>,
    x_groq: Option<GroqExtra>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<ToolCallPiece>,
    /// The older single-function form (`functions`), from servers that still use it.
    function_call: Option<FunctionPiece>,
}

#[derive(Deserialize)]
struct ToolCallPiece {
    /// Some servers leave it out; their calls are told apart by id.
    index: Option<u64>,
    id: Option<String>,
    function: Option<FunctionPiece>,
}

#[derive(Deserialize)]
struct FunctionPiece {
    name: Option<String>,
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct GroqExtra {
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireUsage {
    prompt_tokens: i64,
    completion_tokens: i64,
}

#[derive(Default)]
struct OpenAiDecoder {
    finish_reason_seen: bool,
    calls: ToolCallStream,
}

impl OpenAiDecoder {
    fn tool_call(&mut self, piece: ToolCallPiece, out: &mut Vec<ChatEvent>) {
        let key = match (piece.index, &piece.id) {
            (Some(index), _) => index.to_string(),
            (None, Some(id)) => format!("id:{id}"),
            (None, None) => self.calls.last_key().unwrap_or("0").to_owned(),
        };
        let (name, arguments) = piece.function.map_or((None, None), |f| (f.name, f.arguments));
        self.calls.piece(&key, piece.id.as_deref(), name.as_deref(), arguments.as_deref().unwrap_or_default(), out);
    }
}

impl Decoder for OpenAiDecoder {
    fn on_event(&mut self, event: SseEvent, out: &mut Vec<ChatEvent>) -> Result<bool, ProviderError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            self.calls.close_all(out);
            return Ok(true);
        }
        if data.is_empty() {
            return Ok(false);
        }
        let chunk: Chunk = serde_json::from_str(data)
            .map_err(|e| ProviderError::Protocol(format!("unreadable chat completion chunk: {e}")))?;
        if let Some(error) = chunk.error {
            // OpenRouter reports failures after the 200 as an error chunk.
            let status = error.get("code").and_then(serde_json::Value::as_u64).unwrap_or(502);
            let message = error.get("message").and_then(|m| m.as_str()).unwrap_or("unknown error").to_owned();
            return Err(ProviderError::Upstream { status: u16::try_from(status).unwrap_or(502), message });
        }
        for choice in chunk.choices {
            if let Some(delta) = choice.delta {
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    out.push(ChatEvent::Delta(text));
                }
                for piece in delta.tool_calls {
                    self.tool_call(piece, out);
                }
                if let Some(function) = delta.function_call {
                    let piece = ToolCallPiece { index: Some(0), id: None, function: Some(function) };
                    self.tool_call(piece, out);
                }
            }
            if let Some(reason) = choice.finish_reason {
                self.finish_reason_seen = true;
                self.calls.close_all(out);
                out.push(ChatEvent::Finish(finish_reason(&reason)));
            }
        }
        if let Some(u) = chunk.usage.or(chunk.x_groq.and_then(|x| x.usage)) {
            out.push(ChatEvent::Usage(Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                estimated: false,
            }));
        }
        Ok(false)
    }

    fn on_eof(&mut self, out: &mut Vec<ChatEvent>) -> Result<(), ProviderError> {
        // Servers that skip `[DONE]` still say why the reply ended.
        if self.finish_reason_seen {
            self.calls.close_all(out);
            Ok(())
        } else {
            Err(ProviderError::Connect("the provider's stream ended before the reply was complete".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(events: &[&str]) -> Result<Vec<ChatEvent>, ProviderError> {
        let mut d = OpenAiDecoder::default();
        let mut out = Vec::new();
        for e in events {
            if d.on_event(SseEvent { data: (*e).into(), ..Default::default() }, &mut out)? {
                return Ok(out);
            }
        }
        d.on_eof(&mut out)?;
        Ok(out)
    }

    #[test]
    fn deltas_then_usage() {
        let out = run(&[
            r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"delta":{"content":"Hi"},"finish_reason":null}],"usage":null}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#,
            "[DONE]",
        ])
        .unwrap();
        assert_eq!(
            out,
            [
                ChatEvent::Delta("Hi".into()),
                ChatEvent::Finish(FinishReason::Stop),
                ChatEvent::Usage(Usage { prompt_tokens: 5, completion_tokens: 1, estimated: false })
            ]
        );
    }

    #[test]
    fn groq_usage_and_error_chunks() {
        let out = run(&[
            r#"{"choices":[{"delta":{"content":"x"},"finish_reason":"stop"}],"x_groq":{"usage":{"prompt_tokens":2,"completion_tokens":3}}}"#,
        ])
        .unwrap();
        assert_eq!(out[2], ChatEvent::Usage(Usage { prompt_tokens: 2, completion_tokens: 3, estimated: false }));
        let err = run(&[r#"{"error":{"code":503,"message":"overloaded"}}"#]).unwrap_err();
        assert!(matches!(err, ProviderError::Upstream { status: 503, .. }), "{err:?}");
    }

    #[test]
    fn tool_call_arguments_split_across_chunks_and_calls_interleave() {
        let out = run(&[
            r#"{"choices":[{"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"q\":\"a\\"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"id":"call_2","function":{"name":"g","arguments":"{}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"call_1","function":{"arguments":"\"ü\"}"}}]}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
            "[DONE]",
        ])
        .unwrap();
        assert_eq!(
            out,
            [
                ChatEvent::tool_delta(0, Some("call_1"), Some("f"), ""),
                ChatEvent::tool_delta(0, None, None, r#"{"q":"a\"#),
                ChatEvent::tool_delta(1, Some("call_2"), Some("g"), "{}"),
                ChatEvent::tool_delta(0, None, None, r#""ü"}"#),
                ChatEvent::Finish(FinishReason::ToolCalls),
            ]
        );
    }

    #[test]
    fn calls_without_index_are_told_apart_by_id_and_empty_arguments_become_an_object() {
        let out = run(&[
            r#"{"choices":[{"delta":{"tool_calls":[{"id":"a","function":{"name":"f"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"id":"b","function":{"name":"g","arguments":"{\"x\":1}"}}]}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"function_call"}]}"#,
        ])
        .unwrap();
        assert_eq!(
            out,
            [
                ChatEvent::tool_delta(0, Some("a"), Some("f"), ""),
                ChatEvent::tool_delta(1, Some("b"), Some("g"), r#"{"x":1}"#),
                ChatEvent::tool_delta(0, None, None, "{}"),
                ChatEvent::Finish(FinishReason::ToolCalls),
            ]
        );
    }

    #[test]
    fn finish_reasons_map_to_ours() {
        for (wire, ours) in [
            ("stop", FinishReason::Stop),
            ("length", FinishReason::Length),
            ("tool_calls", FinishReason::ToolCalls),
            ("function_call", FinishReason::ToolCalls),
            ("content_filter", FinishReason::ContentFilter),
            ("eos", FinishReason::Stop),
        ] {
            assert_eq!(finish_reason(wire), ours, "{wire}");
            assert!(wire == "function_call" || wire == "eos" || ours.as_openai() == wire);
        }
    }

    #[test]
    fn reasoning_models_get_max_completion_tokens() {
        assert_eq!(max_tokens_field("openai", "gpt-4o-mini"), "max_tokens");
        assert_eq!(max_tokens_field("openai", "o3-mini"), "max_completion_tokens");
        assert_eq!(max_tokens_field("openai", "gpt-5"), "max_completion_tokens");
        assert_eq!(max_tokens_field("groq", "o3-mini"), "max_tokens");
    }

    #[test]
    fn a_cut_stream_is_an_error() {
        assert!(run(&[r#"{"choices":[{"delta":{"content":"par"}}]}"#]).is_err());
    }
}
