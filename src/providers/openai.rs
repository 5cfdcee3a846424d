//! OpenAI chat completions, streamed: the wire format also spoken by
//! OpenRouter, Groq, Ollama and vLLM. `base_url` includes `/v1`, as in the
//! OpenAI SDKs. Usage arrives in a last chunk thanks to
//! `stream_options.include_usage` (Groq also puts it under `x_groq`).

use serde::Deserialize;
use serde_json::json;

use super::{
    ChatEvent, ChatProvider, ChatRequest, ChatStream, ProviderError, Usage,
    http::Endpoint,
    sse::{self, Decoder, SseEvent},
};

pub struct OpenAiProvider {
    name: String,
    models: Vec<String>,
    endpoint: Endpoint,
}

impl OpenAiProvider {
    /// `keys` may hold several comma-separated keys; none for Ollama or vLLM.
    pub fn new(name: &str, base_url: &str, keys: Option<&str>, models: Vec<String>, http: reqwest::Client) -> Self {
        Self { name: name.to_owned(), models, endpoint: Endpoint::new(name, base_url, keys, http) }
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
        let url = format!("{}/chat/completions", self.endpoint.base_url);
        let body = json!({
            "model": request.model,
            "messages": request.messages,
            "stream": true,
            "stream_options": { "include_usage": true },
        });
        let response = self
            .endpoint
            .send(|http, key| {
                let req = http.post(&url).json(&body);
                match key {
                    Some(k) => req.bearer_auth(k),
                    None => req,
                }
            })
            .await?;
        Ok(sse::decode(response, OpenAiDecoder::default()))
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
}

impl Decoder for OpenAiDecoder {
    fn on_event(&mut self, event: SseEvent, out: &mut Vec<ChatEvent>) -> Result<bool, ProviderError> {
        let data = event.data.trim();
        if data == "[DONE]" {
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
            if let Some(text) = choice.delta.and_then(|d| d.content).filter(|t| !t.is_empty()) {
                out.push(ChatEvent::Delta(text));
            }
            self.finish_reason_seen |= choice.finish_reason.is_some();
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

    fn on_eof(&mut self, _out: &mut Vec<ChatEvent>) -> Result<(), ProviderError> {
        // Servers that skip `[DONE]` still say why the reply ended.
        if self.finish_reason_seen {
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
        assert_eq!(out[1], ChatEvent::Usage(Usage { prompt_tokens: 2, completion_tokens: 3, estimated: false }));
        let err = run(&[r#"{"error":{"code":503,"message":"overloaded"}}"#]).unwrap_err();
        assert!(matches!(err, ProviderError::Upstream { status: 503, .. }), "{err:?}");
    }

    #[test]
    fn a_cut_stream_is_an_error() {
        assert!(run(&[r#"{"choices":[{"delta":{"content":"par"}}]}"#]).is_err());
    }
}
