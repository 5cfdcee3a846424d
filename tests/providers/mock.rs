//! One small axum server speaking the three streaming wire formats (OpenAI
//! chat completions, Gemini streamGenerateContent, Anthropic Messages),
//! chunk by chunk with a controllable delay. It records every request and
//! can be told to fail in the ways real providers do.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};

/// The reply every format streams, one delta per piece.
pub const PIECES: [&str; 4] = ["Hel", "lo, ", "wor", "ld 🌍"];
pub const REPLY: &str = "Hello, world 🌍";

/// Token counts each format reports (distinct, to show each parser reads its own).
pub const OPENAI_USAGE: (i64, i64) = (11, 7);
pub const GEMINI_USAGE: (i64, i64) = (13, 5);
pub const ANTHROPIC_USAGE: (i64, i64) = (17, 3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    OpenAi,
    Gemini,
    Anthropic,
}

/// How the mock answers one request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The whole reply, usage included.
    None,
    /// This HTTP status with an error body.
    Status(u16),
    /// 429 with `Retry-After: <secs>`.
    RateLimited(u64),
    /// Never answers.
    Hang,
    /// Streams this many deltas, then drops the connection.
    DropAfter(usize),
    /// Streams one delta, then goes quiet this long before the rest.
    IdleGap(Duration),
    /// The whole reply but no token counts.
    NoUsage,
}

#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub key: Option<String>,
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Default)]
struct MockState {
    /// Faults for the next requests, in order; then `Fault::None`.
    queue: VecDeque<Fault>,
    /// Every request fails like this (after the queue is used up).
    always: Option<Fault>,
    /// Requests with this key get 401.
    refused_key: Option<String>,
    /// Requests with this key get 429 with this Retry-After.
    limited_key: Option<(String, u64)>,
    chunk_delay: Duration,
    requests: Vec<Recorded>,
}

pub struct MockProvider {
    /// `http://127.0.0.1:port` (OpenAI-style base URLs add `/v1`).
    pub root: String,
    state: Arc<Mutex<MockState>>,
    server: tokio::task::JoinHandle<()>,
}

impl MockProvider {
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(MockState::default()));
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .route("/v1/messages", post(handle))
            .route("/v1beta/models/{*rest}", post(handle))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the mock provider");
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("mock provider crashed");
        });
        Self { root: format!("http://127.0.0.1:{port}"), state, server }
    }

    pub fn then(&self, fault: Fault) -> &Self {
        self.state.lock().unwrap().queue.push_back(fault);
        self
    }

    pub fn always(&self, fault: Fault) {
        self.state.lock().unwrap().always = Some(fault);
    }

    pub fn refuse_key(&self, key: &str) {
        self.state.lock().unwrap().refused_key = Some(key.to_owned());
    }

    pub fn limit_key(&self, key: &str, retry_after_secs: u64) {
        self.state.lock().unwrap().limited_key = Some((key.to_owned(), retry_after_secs));
    }

    pub fn chunk_delay(&self, delay: Duration) {
        self.state.lock().unwrap().chunk_delay = delay;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The key of every request so far, in order.
    pub fn keys(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.key.unwrap_or_default()).collect()
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn handle(State(state): State<Arc<Mutex<MockState>>>, uri: Uri, headers: HeaderMap, body: String) -> Response {
    let path = uri.path().to_owned();
    let format = if path.starts_with("/v1beta/") {
        Format::Gemini
    } else if path == "/v1/messages" {
        Format::Anthropic
    } else {
        Format::OpenAi
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let key = match format {
        Format::OpenAi => header("authorization").map(|a| a.trim_start_matches("Bearer ").to_owned()),
        Format::Gemini => header("x-goog-api-key"),
        Format::Anthropic => header("x-api-key"),
    };
    let (fault, delay) = {
        let mut s = state.lock().unwrap();
        s.requests.push(Recorded {
            path,
            key: key.clone(),
            headers: headers.clone(),
            body: serde_json::from_str(&body).unwrap_or(Value::Null),
        });
        let fault = if key.is_some() && s.refused_key == key {
            Fault::Status(401)
        } else if let Some((_, secs)) = s.limited_key.as_ref().filter(|(k, _)| Some(k) == key.as_ref()) {
            Fault::RateLimited(*secs)
        } else {
            s.queue.pop_front().or_else(|| s.always.clone()).unwrap_or(Fault::None)
        };
        (fault, s.chunk_delay)
    };
    match fault {
        Fault::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap();
            (status, axum::Json(json!({"error": {"message": format!("mock failure {code}"), "type": "x"}})))
                .into_response()
        }
        Fault::RateLimited(secs) => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", secs.to_string())],
            axum::Json(json!({"error": {"message": "slow down"}})),
        )
            .into_response(),
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        fault => stream_reply(format, fault, delay),
    }
}

/// A step of a streamed body: wait, then send bytes or break the connection.
enum Step {
    Send(Duration, String),
    Break,
}

fn stream_reply(format: Format, fault: Fault, delay: Duration) -> Response {
    let with_usage = !matches!(fault, Fault::NoUsage);
    let (deltas, rest) = events(format, with_usage);
    let mut steps: VecDeque<Step> = VecDeque::new();
    let mut sent_deltas = 0;
    for (i, event) in deltas.into_iter().enumerate() {
        if let Fault::DropAfter(n) = fault
            && sent_deltas == n
        {
            steps.push_back(Step::Break);
            break;
        }
        let wait = match &fault {
            _ if i == 0 => Duration::ZERO,
            Fault::IdleGap(gap) if event.1 && sent_deltas == 1 => *gap,
            _ => delay,
        };
        if event.1 {
            sent_deltas += 1;
        }
        steps.push_back(Step::Send(wait, event.0));
    }
    if !matches!(steps.back(), Some(Step::Break)) {
        steps.extend(rest.into_iter().map(|e| Step::Send(delay, e)));
    }
    let body = futures::stream::unfold(steps, |mut steps| async move {
        match steps.pop_front()? {
            Step::Send(wait, text) => {
                tokio::time::sleep(wait).await;
                Some((Ok::<_, std::io::Error>(Bytes::from(text)), steps))
            }
            Step::Break => {
                // Let what was sent reach the client: hyper drops unflushed data on error.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((Err(std::io::Error::other("dropped by the mock")), VecDeque::new()))
            }
        }
    });
    ([("content-type", "text/event-stream")], Body::from_stream(body)).into_response()
}

/// The events of a reply in `format`: the ones up to the last delta
/// (flagged when they carry a delta), then the closing ones.
fn events(format: Format, with_usage: bool) -> (Vec<(String, bool)>, Vec<String>) {
    let data = |v: Value| format!("data: {v}\n\n");
    match format {
        Format::OpenAi => {
            let mut deltas = vec![(data(json!({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})), false)];
            deltas.extend(
                PIECES.iter().map(|p| (data(json!({"choices": [{"index": 0, "delta": {"content": p}}]})), true)),
            );
            let mut rest = vec![data(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))];
            if with_usage {
                let (p, c) = OPENAI_USAGE;
                rest.push(data(json!({"choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})));
            }
            rest.push(": keep-alive comment\n\ndata: [DONE]\n\n".to_owned());
            (deltas, rest)
        }
        Format::Gemini => {
            let (p, c) = GEMINI_USAGE;
            let usage = |done: bool| {
                if !with_usage {
                    Value::Null
                } else if done {
                    json!({"promptTokenCount": p, "candidatesTokenCount": c, "totalTokenCount": p + c})
                } else {
                    json!({"promptTokenCount": p})
                }
            };
            let chunk = |text: &str, done: bool| {
                let mut candidate = json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
                if done {
                    candidate["finishReason"] = json!("STOP");
                }
                format!("data: {}\r\n\r\n", json!({"candidates": [candidate], "usageMetadata": usage(done)}))
            };
            let last = PIECES.len() - 1;
            let deltas = PIECES.iter().enumerate().map(|(i, p)| (chunk(p, i == last), true)).collect();
            (deltas, Vec::new())
        }
        Format::Anthropic => {
            let (p, c) = ANTHROPIC_USAGE;
            let named = |name: &str, v: Value| format!("event: {name}\ndata: {v}\n\n");
            let start_usage = if with_usage { json!({"input_tokens": p, "output_tokens": 1}) } else { json!({}) };
            let mut deltas = vec![(
                named(
                    "message_start",
                    json!({"type": "message_start", "message": {"id": "msg_1", "role": "assistant", "content": [], "usage": start_usage}}),
                ) + &named(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                ),
                false,
            )];
            deltas.extend(PIECES.iter().map(|t| {
                let delta =
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}});
                (named("content_block_delta", delta), true)
            }));
            let end_usage = if with_usage { json!({"output_tokens": c}) } else { json!({}) };
            let rest = vec![
                named("ping", json!({"type": "ping"})),
                named("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
                named(
                    "message_delta",
                    json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": end_usage}),
                ),
                named("message_stop", json!({"type": "message_stop"})),
            ];
            (deltas, rest)
        }
    }
}
