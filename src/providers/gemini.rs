//! Google Gemini `streamGenerateContent?alt=sse`. `base_url` is the host
//! root, as in Google's SDKs; the key goes in `x-goog-api-key`. The system
//! prompt is `systemInstruction`; roles are `user` and `model`; every chunk
//! carries the usage so far in `usageMetadata`, the last one counts.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ChatEvent, ChatProvider, ChatRequest, ChatStream, ProviderError, Usage,
    http::Endpoint,
    sse::{self, Decoder, SseEvent},
    system_and_turns,
};
use crate::domain::context::ChatRole;

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

/// The request body: the system prompt as `systemInstruction`, turns of
/// one role merged (Gemini wants them alternating).
fn request_body(request: &ChatRequest) -> Value {
    let (system, turns) = system_and_turns(&request.messages);
    let contents: Vec<Value> = turns
        .into_iter()
        .map(|(role, text)| {
            let role = if role == ChatRole::Assistant { "model" } else { "user" };
            json!({ "role": role, "parts": [{ "text": text }] })
        })
        .collect();
    let mut body = json!({ "contents": contents });
    if let Some(system) = system {
        body["systemInstruction"] = json!({ "parts": [{ "text": system }] });
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
struct Part {
    text: Option<String>,
    /// Thinking models stream their thoughts as parts marked `thought`.
    #[serde(default)]
    thought: bool,
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
            for text in parts.into_iter().filter(|p| !p.thought).filter_map(|p| p.text) {
                if !text.is_empty() {
                    out.push(ChatEvent::Delta(text));
                }
            }
            self.finished |= candidate.finish_reason.is_some();
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
                ChatEvent::Usage(Usage { prompt_tokens: 4, completion_tokens: 3, estimated: false })
            ]
        );
    }
}
