//! Google Gemini `streamGenerateContent?alt=sse`. `base_url` is the host
//! root, as in Google's SDKs; the key goes in `x-goog-api-key`. The system
//! prompt is `systemInstruction`; roles are `user` and `model`; every chunk
//! carries the usage so far in `usageMetadata`, the last one counts. Tool
//! calls come whole, as `functionCall` parts without ids (we mint them), and
//! are answered by name in `functionResponse` parts.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{
    ChatEvent, ChatOptions, ChatProvider, ChatRequest, ChatStream, FinishReason, ProviderError, ResponseFormat,
    ToolChoice, Turn, Usage,
    http::Endpoint,
    sse::{self, Decoder, SseEvent},
    system_and_turns, tool_name,
    tools::{ToolCallStream, arguments_object},
};
use crate::domain::context::{ChatMessage, ChatRole};

pub struct GeminiProvider {
    models: Vec<String>,
    endpoint: Endpoint,
}

impl GeminiProvider {
    pub fn new(base_url: &str, keys: Option<&str>, models: Vec<String>, http: reqwest::Client) -> Self {
        let base_url = base_url.trim_end_matches('/').trim_end_matches("/v1beta");
        Self { models, endpoint: Endpoint::new("gemini", base_url, keys, http) }
    }
}

/// A tool's result as the object `functionResponse.response` wants: the
/// result itself when it is a JSON object, else wrapped as `content`.
fn response_object(content: &str) -> Value {
    match serde_json::from_str::<Value>(content) {
        Ok(object @ Value::Object(_)) => object,
        _ => json!({ "content": content }),
    }
}

/// A turn's parts: tool results first, then the text, then tool calls.
/// Results name their call's function, found by id in `messages`.
fn parts(turn: Turn<'_>, messages: &[ChatMessage]) -> Vec<Value> {
    let plain = turn.calls.is_empty() && turn.results.is_empty();
    let results = turn.results.iter().map(|m| {
        let id = m.tool_call_id.as_deref().unwrap_or_default();
        let name = tool_name(messages, id).unwrap_or(id);
        json!({ "functionResponse": { "name": name, "response": response_object(&m.content) } })
    });
    // A turn of text alone keeps its (possibly empty) text part.
    let text = turn.text.filter(|t| plain || !t.is_empty()).map(|t| json!({ "text": t }));
    let calls = turn
        .calls
        .iter()
        .map(|c| json!({ "functionCall": { "name": c.name, "args": arguments_object(&c.arguments) } }));
    results.chain(text).chain(calls).collect()
}

/// `generationConfig`: the options Gemini has, under its names (`None` when
/// nothing is set). JSON Schemas go as `responseJsonSchema`, which takes
/// them as they are; `responseSchema` wants an OpenAPI subset.
fn generation_config(o: &ChatOptions) -> Option<Value> {
    let mut config = Map::new();
    let mut set = |field: &str, value: Value| config.insert(field.to_owned(), value);
    if let Some(t) = o.temperature {
        set("temperature", json!(t));
    }
    if let Some(p) = o.top_p {
        set("topP", json!(p));
    }
    if let Some(n) = o.max_tokens {
        set("maxOutputTokens", json!(n));
    }
    if !o.stop.is_empty() {
        set("stopSequences", json!(o.stop));
    }
    if let Some(seed) = o.seed {
        set("seed", json!(seed));
    }
    match &o.response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => {
            set("responseMimeType", json!("application/json"));
        }
        Some(ResponseFormat::JsonSchema { schema, .. }) => {
            set("responseMimeType", json!("application/json"));
            set("responseJsonSchema", schema.clone());
        }
    }
    (!config.is_empty()).then_some(Value::Object(config))
}

/// `toolConfig`: `Required` is Gemini's `ANY`, a named function `ANY` of one.
fn tool_config(choice: &ToolChoice) -> Value {
    let config = match choice {
        ToolChoice::Auto => json!({ "mode": "AUTO" }),
        ToolChoice::None => json!({ "mode": "NONE" }),
        ToolChoice::Required => json!({ "mode": "ANY" }),
        ToolChoice::Function(name) => json!({ "mode": "ANY", "allowedFunctionNames": [name] }),
    };
    json!({ "functionCallingConfig": config })
}

/// The request body: the system prompt as `systemInstruction`, turns of
/// one side merged (Gemini wants them alternating), and the options Gemini
/// has (`user` and `parallel_tool_calls` it has not).
fn request_body(request: &ChatRequest) -> Value {
    let o = &request.options;
    let (system, turns) = system_and_turns(&request.messages);
    let contents: Vec<Value> = turns
        .into_iter()
        .map(|turn| {
            let role = if turn.role == ChatRole::Assistant { "model" } else { "user" };
            json!({ "role": role, "parts": parts(turn, &request.messages) })
        })
        .collect();
    let mut body = json!({ "contents": contents });
    if let Some(system) = system {
        body["systemInstruction"] = json!({ "parts": [{ "text": system }] });
    }
    if let Some(config) = generation_config(o) {
        body["generationConfig"] = config;
    }
    if !o.tools.is_empty() {
        // JSON Schema as it is (`parametersJsonSchema`): `parameters` wants
        // an OpenAPI subset and refuses e.g. `additionalProperties`, which
        // OpenAI's strict tools always carry.
        let declarations: Vec<Value> = o
            .tools
            .iter()
            .map(|t| {
                let mut declaration = json!({ "name": t.name });
                if let Some(d) = &t.description {
                    declaration["description"] = json!(d);
                }
                if !t.parameters.is_null() {
                    declaration["parametersJsonSchema"] = t.parameters.clone();
                }
                declaration
            })
            .collect();
        body["tools"] = json!([{ "functionDeclarations": declarations }]);
    }
    if let Some(choice) = &o.tool_choice {
        body["toolConfig"] = tool_config(choice);
    }
    body
}

/// Model names go into the URL path: anything beyond the usual characters
/// is escaped so a name cannot reach another endpoint.
fn path_segment(model: &str) -> String {
    model
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[async_trait::async_trait]
impl ChatProvider for GeminiProvider {
    fn name(&self) -> &str {
        "gemini"
    }

    fn models(&self) -> Vec<String> {
        self.models.clone()
    }

    async fn stream_chat(&self, request: ChatRequest) -> Result<ChatStream, ProviderError> {
        let url = format!(
            "{}/v1beta/models/{}:streamGenerateContent?alt=sse",
            self.endpoint.base_url,
            path_segment(&request.model)
        );
        let body = request_body(&request);
        let response = self
            .endpoint
            .send(|http, key| {
                let req = http.post(&url).json(&body);
                match key {
                    Some(k) => req.header("x-goog-api-key", k),
                    None => req,
                }
            })
            .await?;
        Ok(sse::decode(response, GeminiDecoder::default()))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Chunk {
    #[serde(default)]
    candidates: Vec<Candidate>,
    usage_metadata: Option<UsageMetadata>,
    prompt_feedback: Option<PromptFeedback>,
    error: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    content: Option<Content>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Content {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part {
    text: Option<String>,
    /// Thinking models stream their thoughts as parts marked `thought`.
    #[serde(default)]
    thought: bool,
    function_call: Option<FunctionCall>,
}

#[derive(Deserialize)]
struct FunctionCall {
    /// Only some Gemini APIs give one.
    id: Option<String>,
    #[serde(default)]
    name: String,
    args: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: i64,
    #[serde(default)]
    candidates_token_count: i64,
    #[serde(default)]
    thoughts_token_count: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
}

#[derive(Default)]
struct GeminiDecoder {
    usage: Option<Usage>,
    finished: bool,
    /// Keyed by a counter: each `functionCall` part is a whole call.
    calls: ToolCallStream,
    started_calls: usize,
}

impl GeminiDecoder {
    fn finish_reason(&self, reason: &str) -> FinishReason {
        match reason {
            // Gemini says STOP after calling tools too.
            "STOP" if self.calls.seen() => FinishReason::ToolCalls,
            "MAX_TOKENS" => FinishReason::Length,
            "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
                FinishReason::ContentFilter
            }
            _ => FinishReason::Stop,
        }
    }
}

impl Decoder for GeminiDecoder {
    fn on_event(&mut self, event: SseEvent, out: &mut Vec<ChatEvent>) -> Result<bool, ProviderError> {
        if event.data.trim().is_empty() {
            return Ok(false);
        }
        let chunk: Chunk = serde_json::from_str(&event.data)
            .map_err(|e| ProviderError::Protocol(format!("unreadable Gemini chunk: {e}")))?;
        if let Some(error) = chunk.error {
            let status = error.get("code").and_then(Value::as_u64).and_then(|c| u16::try_from(c).ok()).unwrap_or(502);
            let message = error.get("message").and_then(Value::as_str).unwrap_or("unknown error").to_owned();
            return Err(ProviderError::Upstream { status, message });
        }
        if let Some(reason) = chunk.prompt_feedback.and_then(|f| f.block_reason) {
            return Err(ProviderError::Upstream {
                status: 400,
                message: format!("Gemini blocked the prompt ({reason})"),
            });
        }
        for candidate in chunk.candidates.into_iter().take(1) {
            let parts = candidate.content.map(|c| c.parts).unwrap_or_default();
            for part in parts.into_iter().filter(|p| !p.thought) {
                if let Some(text) = part.text.filter(|t| !t.is_empty()) {
                    out.push(ChatEvent::Delta(text));
                }
                if let Some(call) = part.function_call {
                    let key = self.started_calls.to_string();
                    self.started_calls += 1;
                    let arguments = call.args.map_or_else(|| "{}".to_owned(), |a| a.to_string());
                    self.calls.piece(&key, call.id.as_deref(), Some(&call.name), &arguments, out);
                    self.calls.close(&key, out);
                }
            }
            if let Some(reason) = candidate.finish_reason {
                self.finished = true;
                out.push(ChatEvent::Finish(self.finish_reason(&reason)));
            }
        }
        if let Some(u) = chunk.usage_metadata {
            self.usage = Some(Usage {
                prompt_tokens: u.prompt_token_count,
                completion_tokens: u.candidates_token_count + u.thoughts_token_count,
                estimated: false,
            });
        }
        Ok(false)
    }

    fn on_eof(&mut self, out: &mut Vec<ChatEvent>) -> Result<(), ProviderError> {
        if !self.finished {
            return Err(ProviderError::Connect("the provider's stream ended before the reply was complete".into()));
        }
        out.extend(self.usage.take().map(ChatEvent::Usage));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::context::ChatMessage;

    #[test]
    fn system_prompt_and_roles_follow_gemini() {
        let request = ChatRequest {
            model: "gemini-1.5-pro".into(),
            messages: vec![
                ChatMessage::new(ChatRole::System, "be brief"),
                ChatMessage::new(ChatRole::User, "a"),
                ChatMessage::new(ChatRole::User, "b"),
                ChatMessage::new(ChatRole::Assistant, "c"),
            ],
            options: ChatOptions::default(),
        };
        let body = request_body(&request);
        assert_eq!(body["systemInstruction"]["parts"][0]["text"], "be brief");
        assert_eq!(body["contents"][0]["role"], "user");
        assert_eq!(body["contents"][0]["parts"][0]["text"], "a\n\nb");
        assert_eq!(body["contents"][1]["role"], "model");
        assert_eq!(path_segment("gemini-1.5-pro"), "gemini-1.5-pro");
        assert_eq!(path_segment("x/../y?z"), "x%2F..%2Fy%3Fz");
    }

    #[test]
    fn thoughts_are_skipped_and_the_last_usage_counts() {
        let mut d = GeminiDecoder::default();
        let mut out = Vec::new();
        for data in [
            r#"{"candidates":[{"content":{"parts":[{"text":"hm","thought":true},{"text":"Hel"}],"role":"model"}}],"usageMetadata":{"promptTokenCount":4}}"#,
            r#"{"candidates":[{"content":{"parts":[{"text":"lo"}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":2,"thoughtsTokenCount":1}}"#,
        ] {
            assert!(!d.on_event(SseEvent { data: data.into(), ..Default::default() }, &mut out).unwrap());
        }
        d.on_eof(&mut out).unwrap();
        assert_eq!(
            out,
            [
                ChatEvent::Delta("Hel".into()),
                ChatEvent::Delta("lo".into()),
                ChatEvent::Finish(FinishReason::Stop),
                ChatEvent::Usage(Usage { prompt_tokens: 4, completion_tokens: 3, estimated: false })
            ]
        );
    }

    fn feed(events: &[&str]) -> Vec<ChatEvent> {
        let mut d = GeminiDecoder::default();
        let mut out = Vec::new();
        for data in events {
            d.on_event(SseEvent { data: (*data).into(), ..Default::default() }, &mut out).unwrap();
        }
        d.on_eof(&mut out).unwrap();
        out
    }

    #[test]
    fn function_calls_get_minted_ids_and_stop_after_them_means_tool_calls() {
        let out = feed(&[
            r#"{"candidates":[{"content":{"parts":[{"text":"ok"},{"functionCall":{"name":"f","args":{"q":"ü \"x\""}}}]}}]}"#,
            r#"{"candidates":[{"content":{"parts":[{"functionCall":{"name":"g"}}]},"finishReason":"STOP"}]}"#,
        ]);
        assert_eq!(out[0], ChatEvent::Delta("ok".into()));
        let ChatEvent::ToolCallDelta { index: 0, id: Some(a), name: Some(f), arguments } = &out[1] else {
            panic!("{out:?}")
        };
        assert_eq!((f.as_str(), arguments.as_str()), ("f", r#"{"q":"ü \"x\""}"#));
        let ChatEvent::ToolCallDelta { index: 1, id: Some(b), arguments, .. } = &out[2] else { panic!("{out:?}") };
        assert_eq!(arguments, "{}");
        assert!(a.starts_with("call_") && b.starts_with("call_") && a != b);
        assert_eq!(out[3], ChatEvent::Finish(FinishReason::ToolCalls));
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn finish_reasons_map_to_ours() {
        let d = GeminiDecoder::default();
        for (wire, ours) in [
            ("STOP", FinishReason::Stop),
            ("MAX_TOKENS", FinishReason::Length),
            ("SAFETY", FinishReason::ContentFilter),
            ("RECITATION", FinishReason::ContentFilter),
            ("BLOCKLIST", FinishReason::ContentFilter),
            ("PROHIBITED_CONTENT", FinishReason::ContentFilter),
            ("OTHER", FinishReason::Stop),
        ] {
            assert_eq!(d.finish_reason(wire), ours, "{wire}");
        }
    }

    #[test]
    fn tool_results_answer_by_name_and_objects_stay_objects() {
        let call = crate::domain::context::ToolCall { id: "c1".into(), name: "lookup".into(), arguments: "{}".into() };
        let request = ChatRequest {
            model: "gemini".into(),
            messages: vec![
                ChatMessage::new(ChatRole::User, "q"),
                ChatMessage::tool_calls("", vec![call]),
                ChatMessage::tool_result("c1", r#"{"hits":[1]}"#),
            ],
            options: ChatOptions { tool_choice: Some(ToolChoice::Required), ..ChatOptions::default() },
        };
        let body = request_body(&request);
        assert_eq!(
            body["contents"][1],
            json!({"role": "model", "parts": [{"functionCall": {"name": "lookup", "args": {}}}]})
        );
        assert_eq!(
            body["contents"][2],
            json!({"role": "user", "parts": [{"functionResponse": {"name": "lookup", "response": {"hits": [1]}}}]})
        );
        assert_eq!(body["toolConfig"], json!({"functionCallingConfig": {"mode": "ANY"}}));
        assert_eq!(response_object("plain"), json!({"content": "plain"}));
    }
}
