//! A stand-in for the OpenAI chat completions API, speaking the real wire
//! format on a random port. It records every request it gets and can be told
//! to answer with a given text, an HTTP error, not at all (hang), or a
//! scripted stream: N chunks at a fixed pace that finishes, hangs or drops
//! the connection. It counts the chunks it sent and the streams still open,
//! so tests see when the server stopped reading.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use palaver::clock::ManualClock;
use serde_json::{Value, json};

/// Token counts the mock reports for every reply.
pub const MOCK_PROMPT_TOKENS: i64 = 11;
pub const MOCK_COMPLETION_TOKENS: i64 = 7;

/// How long a hung mock waits before answering: far beyond any test's
/// `provider_timeout`.
const HANG_FOR: Duration = Duration::from_secs(120);

/// Time that passes on the test clock while the mock "thinks": real providers
/// take a while, so a reply is never stamped with the same instant as the
/// question.
const SIMULATED_LATENCY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Answers `mock reply to: <last user content>`.
    Echo,
    /// Answers with this text.
    Reply(String),
    /// Answers this HTTP status with an OpenAI-style error body.
    Fail(u16),
    /// Never answers (within any sensible timeout).
    Hang,
    /// Streams these chunks (also for `stream: false`, which the server no
    /// longer asks for).
    Stream(Script),
}

/// A streamed reply: after `start`, `chunks` with a pause of `every` before
/// each one, then `end`.
#[derive(Debug, Clone)]
pub struct Script {
    pub chunks: Vec<String>,
    pub start: Duration,
    pub every: Duration,
    pub end: StreamEnd,
}

/// How a scripted stream ends after its last chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// `finish_reason`, the usage chunk and `[DONE]`.
    Finish,
    /// Keeps the connection open and sends nothing more.
    Hang,
    /// Breaks the connection without finishing the response.
    Drop,
}

impl Script {
    /// `n` chunks of a few words with multi-byte characters in them (so byte
    /// and character offsets differ), one every `every`.
    pub fn words(n: usize, every: Duration) -> Self {
        let chunks =
            (0..n).map(|i| if i % 5 == 4 { format!("ünïcode {i} 🎉 ") } else { format!("wörd {i} ") }).collect();
        Self { chunks, start: Duration::ZERO, every, end: StreamEnd::Finish }
    }

    /// `n` chunks of `size` ASCII bytes each, sent as fast as they are read.
    pub fn bulk(n: usize, size: usize) -> Self {
        let chunks = (0..n).map(|i| format!("{i:0>size$}")).collect();
        Self { chunks, start: Duration::ZERO, every: Duration::ZERO, end: StreamEnd::Finish }
    }

    pub fn ending(mut self, end: StreamEnd) -> Self {
        self.end = end;
        self
    }

    /// Everything the script says, joined.
    pub fn text(&self) -> String {
        self.chunks.concat()
    }
}

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub authorization: Option<String>,
    pub body: Value,
}

impl RecordedRequest {
    pub fn model(&self) -> &str {
        self.body["model"].as_str().unwrap_or_default()
    }

    /// `(role, content)` of every message sent, in order.
    pub fn messages(&self) -> Vec<(String, String)> {
        self.body["messages"]
            .as_array()
            .map(|messages| {
                messages
                    .iter()
                    .map(|m| {
                        (
                            m["role"].as_str().unwrap_or_default().to_owned(),
                            m["content"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

struct MockState {
    behaviour: Behaviour,
    requests: Vec<RecordedRequest>,
}

/// What the scripted streams did.
#[derive(Default)]
struct StreamStats {
    /// Text chunks written, over all scripted streams.
    chunks_sent: AtomicUsize,
    /// Scripted response bodies the server has not finished or dropped.
    open: AtomicUsize,
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<MockState>>,
    stats: Arc<StreamStats>,
    clock: ManualClock,
}

pub struct MockOpenAi {
    /// Base URL including `/v1`, as `OPENAI_BASE_URL` wants it.
    pub base_url: String,
    state: Arc<Mutex<MockState>>,
    stats: Arc<StreamStats>,
    server: tokio::task::JoinHandle<()>,
}

impl MockOpenAi {
    pub async fn start(clock: ManualClock) -> Self {
        let state = Arc::new(Mutex::new(MockState { behaviour: Behaviour::Echo, requests: Vec::new() }));
        let stats = Arc::new(StreamStats::default());
        let shared = Shared { state: state.clone(), stats: stats.clone(), clock };
        let app = Router::new().route("/v1/chat/completions", post(chat_completions)).with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the mock provider");
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("mock provider crashed");
        });
        Self { base_url: format!("http://127.0.0.1:{port}/v1"), state, stats, server }
    }

    /// Answers every request with this scripted stream.
    pub fn stream(&self, script: Script) {
        self.set_behaviour(Behaviour::Stream(script));
    }

    /// Text chunks sent so far by scripted streams.
    pub fn chunks_sent(&self) -> usize {
        self.stats.chunks_sent.load(Ordering::SeqCst)
    }

    /// Scripted streams still being sent (not finished, not dropped by the
    /// server).
    pub fn open_streams(&self) -> usize {
        self.stats.open.load(Ordering::SeqCst)
    }

    pub fn set_behaviour(&self, behaviour: Behaviour) {
        self.state.lock().unwrap().behaviour = behaviour;
    }

    pub fn reply_with(&self, text: &str) {
        self.set_behaviour(Behaviour::Reply(text.to_owned()));
    }

    pub fn fail_with(&self, status: u16) {
        self.set_behaviour(Behaviour::Fail(status));
    }

    pub fn hang(&self) {
        self.set_behaviour(Behaviour::Hang);
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }

    pub fn last_request(&self) -> RecordedRequest {
        self.requests().pop().expect("the provider received no request")
    }
}

impl Drop for MockOpenAi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The reply the mock gives by default to a conversation ending in `content`.
pub fn echo_of(content: &str) -> String {
    format!("mock reply to: {content}")
}

async fn chat_completions(State(shared): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let Shared { state, stats, clock } = shared;
    let body: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, Json(json!({"error": {"message": format!("bad json: {e}")}})))
                .into_response();
        }
    };
    let behaviour = {
        let mut s = state.lock().unwrap();
        s.requests.push(RecordedRequest {
            authorization: headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned),
            body: body.clone(),
        });
        s.behaviour.clone()
    };
    clock.advance(SIMULATED_LATENCY);
    let text = match behaviour {
        Behaviour::Echo => {
            let last_user = body["messages"]
                .as_array()
                .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
                .and_then(|m| m["content"].as_str())
                .unwrap_or_default()
                .to_owned();
            echo_of(&last_user)
        }
        Behaviour::Reply(text) => text,
        Behaviour::Fail(status) => {
            let status = StatusCode::from_u16(status).unwrap();
            let error = json!({"error": {"message": "mock failure", "type": "server_error", "code": null}});
            return (status, Json(error)).into_response();
        }
        Behaviour::Hang => {
            tokio::time::sleep(HANG_FOR).await;
            "too late".to_owned()
        }
        Behaviour::Stream(script) => {
            let model = body["model"].as_str().unwrap_or_default();
            return scripted(model, script, stats);
        }
    };
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    if body["stream"] == true {
        return streamed(&model, &text);
    }
    Json(json!({
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": MOCK_PROMPT_TOKENS,
            "completion_tokens": MOCK_COMPLETION_TOKENS,
            "total_tokens": MOCK_PROMPT_TOKENS + MOCK_COMPLETION_TOKENS
        }
    }))
    .into_response()
}

/// `stream: true` answers as server-sent events, in two deltas, then a usage
/// chunk and `[DONE]`, as OpenAI does with `stream_options.include_usage`.
fn streamed(model: &str, text: &str) -> Response {
    let split = text.char_indices().nth(text.chars().count() / 2).map_or(text.len(), |(i, _)| i);
    let (a, b) = text.split_at(split);
    let mut out = sse_chunk(model, json!({"role": "assistant", "content": a}), Value::Null);
    out.push_str(&sse_chunk(model, json!({"content": b}), Value::Null));
    out.push_str(&sse_ending(model));
    ([(header::CONTENT_TYPE, "text/event-stream")], out).into_response()
}

/// One `chat.completion.chunk` event.
fn sse_chunk(model: &str, delta: Value, finish: Value) -> String {
    let chunk = json!({
        "id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
    });
    format!("data: {chunk}\n\n")
}

/// `finish_reason`, the usage chunk and `[DONE]`.
fn sse_ending(model: &str) -> String {
    let usage = json!({
        "id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [],
        "usage": {
            "prompt_tokens": MOCK_PROMPT_TOKENS,
            "completion_tokens": MOCK_COMPLETION_TOKENS,
            "total_tokens": MOCK_PROMPT_TOKENS + MOCK_COMPLETION_TOKENS
        }
    });
    format!("{}data: {usage}\n\ndata: [DONE]\n\n", sse_chunk(model, json!({}), json!("stop")))
}

/// A scripted stream, written chunk by chunk as the server reads it.
fn scripted(model: &str, script: Script, stats: Arc<StreamStats>) -> Response {
    stats.open.fetch_add(1, Ordering::SeqCst);
    let feed = Feed {
        chunks: script.chunks.iter().map(|c| sse_chunk(model, json!({"content": c}), Value::Null)).collect(),
        ending: Some(sse_ending(model)),
        start: script.start,
        every: script.every,
        end: script.end,
        stats,
    };
    let body = futures::stream::unfold(feed, |mut feed| async move {
        if !feed.start.is_zero() {
            tokio::time::sleep(std::mem::take(&mut feed.start)).await;
        }
        if let Some(chunk) = feed.chunks.pop_front() {
            if !feed.every.is_zero() {
                tokio::time::sleep(feed.every).await;
            }
            feed.stats.chunks_sent.fetch_add(1, Ordering::SeqCst);
            return Some((Ok(bytes::Bytes::from(chunk)), feed));
        }
        match feed.end {
            StreamEnd::Finish => feed.ending.take().map(|e| (Ok(bytes::Bytes::from(e)), feed)),
            StreamEnd::Hang => {
                tokio::time::sleep(HANG_FOR).await;
                None
            }
            StreamEnd::Drop => {
                // Let the chunks so far reach the server before breaking off.
                tokio::time::sleep(Duration::from_millis(50)).await;
                feed.end = StreamEnd::Finish;
                feed.ending = None;
                Some((Err(std::io::Error::other("mock drops the connection")), feed))
            }
        }
    });
    ([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(body)).into_response()
}

/// The rest of a scripted stream; dropping it (the response finished or the
/// server went away) closes the stream in the stats.
struct Feed {
    chunks: VecDeque<String>,
    ending: Option<String>,
    start: Duration,
    every: Duration,
    end: StreamEnd,
    stats: Arc<StreamStats>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::SeqCst);
    }
}
