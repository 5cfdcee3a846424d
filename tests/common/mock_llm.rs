//! One stand-in LLM for every test binary: a small axum server on a random
//! port speaking the three streaming wire formats (OpenAI chat completions,
//! Gemini streamGenerateContent, Anthropic Messages). It records every
//! request; a `Behaviour` says what it answers (an echo, a text, tool calls,
//! an error, a hang or a paced script that finishes, hangs or drops), and
//! `Fault`s queued
//! on top fail single requests the ways real providers do. It counts the
//! scripted chunks it sent and the scripted streams still open, so tests see
//! when the server stopped reading.

// Included by `tests/api` and `tests/providers.rs`; each uses part of it.
#![allow(dead_code)]

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
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::post,
};
use palaver::clock::ManualClock;
use serde_json::{Value, json};

/// Token counts each format reports (distinct, to show each parser reads its own).
pub const OPENAI_USAGE: (i64, i64) = (11, 7);
pub const GEMINI_USAGE: (i64, i64) = (13, 5);
pub const ANTHROPIC_USAGE: (i64, i64) = (17, 3);
/// The OpenAI counts, as the API tests name them.
pub const MOCK_PROMPT_TOKENS: i64 = OPENAI_USAGE.0;
pub const MOCK_COMPLETION_TOKENS: i64 = OPENAI_USAGE.1;

/// The reply of `MockLlm::start_pieces`, one delta per piece.
pub const PIECES: [&str; 4] = ["Hel", "lo, ", "wor", "ld 🌍"];
pub const REPLY: &str = "Hello, world 🌍";

/// Tool-call arguments stream in pieces of this many characters (so pieces
/// end inside JSON strings, escapes and multi-byte characters).
pub const TOOL_PIECE_CHARS: usize = 4;

/// How long a hung mock waits before answering: far beyond any test's
/// provider timeout.
const HANG_FOR: Duration = Duration::from_secs(120);

/// Time that passes on the test clock while the mock "thinks": real providers
/// take a while, so a reply is never stamped with the same instant as the
/// question.
const SIMULATED_LATENCY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    OpenAi,
    Gemini,
    Anthropic,
}

/// What the mock answers when no fault is queued.
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
    /// Calls tools, in each format's real shape and finish reason.
    ToolCalls(ToolReply),
}

/// A reply that calls tools: `text` first (if any), then each call, its
/// arguments streamed in `TOOL_PIECE_CHARS` pieces (OpenAI, Anthropic) or
/// whole (Gemini, which sends all calls in its last chunk). Call `i` has id
/// `call_mock_<i>` (OpenAI) or `toolu_mock_<i>` (Anthropic); Gemini gives none.
#[derive(Debug, Clone)]
pub struct ToolReply {
    pub text: String,
    /// `(name, arguments as JSON text)`.
    pub calls: Vec<(String, String)>,
}

impl ToolReply {
    pub fn calls(calls: &[(&str, &str)]) -> Self {
        let calls = calls.iter().map(|(n, a)| ((*n).to_owned(), (*a).to_owned())).collect();
        Self { text: String::new(), calls }
    }

    pub fn after_text(mut self, text: &str) -> Self {
        self.text = text.to_owned();
        self
    }
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
    /// The format's finish (usage included) and end of stream.
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
        Self::of(chunks, every)
    }

    /// `n` chunks of `size` ASCII bytes each, sent as fast as they are read.
    pub fn bulk(n: usize, size: usize) -> Self {
        Self::of((0..n).map(|i| format!("{i:0>size$}")).collect(), Duration::ZERO)
    }

    /// `PIECES`, sent as fast as they are read.
    pub fn pieces() -> Self {
        Self::of(PIECES.iter().map(|p| p.to_string()).collect(), Duration::ZERO)
    }

    fn of(chunks: Vec<String>, every: Duration) -> Self {
        Self { chunks, start: Duration::ZERO, every, end: StreamEnd::Finish }
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

/// How the mock answers one request, overriding the behaviour.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The behaviour's answer as it is.
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

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub path: String,
    /// The API key, from whichever header the format carries it in.
    pub key: Option<String>,
    /// The `Authorization` header as sent.
    pub authorization: Option<String>,
    pub headers: HeaderMap,
    pub body: Value,
}

impl RecordedRequest {
    pub fn model(&self) -> &str {
        self.body["model"].as_str().unwrap_or_default()
    }

    /// `(role, content)` of every message sent, in order (OpenAI format).
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
    /// Faults for the next requests, in order; then `always`, then none.
    queue: VecDeque<Fault>,
    /// Every request fails like this (after the queue is used up).
    always: Option<Fault>,
    /// Requests with this key get 401.
    refused_key: Option<String>,
    /// Requests with this key get 429 with this Retry-After.
    limited_key: Option<(String, u64)>,
    /// An extra pause before every streamed event but the first.
    chunk_delay: Duration,
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
    clock: Option<ManualClock>,
}

pub struct MockLlm {
    /// `http://127.0.0.1:<port>`, as the Gemini and Anthropic base URLs want it.
    pub root: String,
    /// `root` with `/v1`, as `OPENAI_BASE_URL` wants it.
    pub base_url: String,
    state: Arc<Mutex<MockState>>,
    stats: Arc<StreamStats>,
    server: tokio::task::JoinHandle<()>,
}

impl MockLlm {
    /// A mock that echoes the last user message and moves `clock` on by a
    /// little for every request.
    pub async fn start(clock: ManualClock) -> Self {
        Self::launch(Some(clock), Behaviour::Echo).await
    }

    /// A mock that streams `PIECES` to every request, on no clock.
    pub async fn start_pieces() -> Self {
        Self::launch(None, Behaviour::Stream(Script::pieces())).await
    }

    async fn launch(clock: Option<ManualClock>, behaviour: Behaviour) -> Self {
        let state = Arc::new(Mutex::new(MockState {
            behaviour,
            queue: VecDeque::new(),
            always: None,
            refused_key: None,
            limited_key: None,
            chunk_delay: Duration::ZERO,
            requests: Vec::new(),
        }));
        let stats = Arc::new(StreamStats::default());
        let shared = Shared { state: state.clone(), stats: stats.clone(), clock };
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .route("/v1/messages", post(handle))
            .route("/v1beta/models/{*rest}", post(handle))
            .with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the mock provider");
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("mock provider crashed");
        });
        let root = format!("http://127.0.0.1:{port}");
        Self { base_url: format!("{root}/v1"), root, state, stats, server }
    }

    pub fn set_behaviour(&self, behaviour: Behaviour) {
        self.state.lock().unwrap().behaviour = behaviour;
    }

    /// Answers every request with this scripted stream.
    pub fn stream(&self, script: Script) {
        self.set_behaviour(Behaviour::Stream(script));
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

    /// Answers every request by calling these tools.
    pub fn call_tools(&self, reply: ToolReply) {
        self.set_behaviour(Behaviour::ToolCalls(reply));
    }

    /// The next request (after those already queued) fails like this.
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

    /// Text chunks sent so far by scripted streams.
    pub fn chunks_sent(&self) -> usize {
        self.stats.chunks_sent.load(Ordering::SeqCst)
    }

    /// Scripted streams still being sent (not finished, not dropped by the
    /// server).
    pub fn open_streams(&self) -> usize {
        self.stats.open.load(Ordering::SeqCst)
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

    /// The key of every request so far, in order.
    pub fn keys(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.key.unwrap_or_default()).collect()
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The reply the mock gives by default to a conversation ending in `content`.
pub fn echo_of(content: &str) -> String {
    format!("mock reply to: {content}")
}

async fn handle(State(shared): State<Shared>, uri: Uri, headers: HeaderMap, body: String) -> Response {
    let Shared { state, stats, clock } = shared;
    let path = uri.path().to_owned();
    let format = if path.starts_with("/v1beta/") {
        Format::Gemini
    } else if path == "/v1/messages" {
        Format::Anthropic
    } else {
        Format::OpenAi
    };
    let body: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, Json(json!({"error": {"message": format!("bad json: {e}")}})))
                .into_response();
        }
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let authorization = header(header::AUTHORIZATION.as_str());
    let key = match format {
        Format::OpenAi => authorization.as_ref().map(|a| a.trim_start_matches("Bearer ").to_owned()),
        Format::Gemini => header("x-goog-api-key"),
        Format::Anthropic => header("x-api-key"),
    };
    let (behaviour, fault, delay) = {
        let mut s = state.lock().unwrap();
        s.requests.push(RecordedRequest {
            path,
            key: key.clone(),
            authorization,
            headers: headers.clone(),
            body: body.clone(),
        });
        let fault = if key.is_some() && s.refused_key == key {
            Fault::Status(401)
        } else if let Some((_, secs)) = s.limited_key.as_ref().filter(|(k, _)| Some(k) == key.as_ref()) {
            Fault::RateLimited(*secs)
        } else {
            s.queue.pop_front().or_else(|| s.always.clone()).unwrap_or(Fault::None)
        };
        (s.behaviour.clone(), fault, s.chunk_delay)
    };
    if let Some(clock) = &clock {
        clock.advance(SIMULATED_LATENCY);
    }
    let fault = match (&behaviour, fault) {
        (Behaviour::Fail(status), Fault::None) => Fault::Status(*status),
        (Behaviour::Hang, Fault::None) => Fault::Hang,
        (_, fault) => fault,
    };
    match fault {
        Fault::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap();
            let error =
                json!({"error": {"message": format!("mock failure {code}"), "type": "server_error", "code": null}});
            return (status, Json(error)).into_response();
        }
        Fault::RateLimited(secs) => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, secs.to_string())],
                Json(json!({"error": {"message": "slow down"}})),
            )
                .into_response();
        }
        Fault::Hang => {
            tokio::time::sleep(HANG_FOR).await;
            return StatusCode::GATEWAY_TIMEOUT.into_response();
        }
        _ => {}
    }
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let (script, calls, scripted) = match behaviour {
        Behaviour::Stream(script) => (script, Vec::new(), true),
        Behaviour::Echo | Behaviour::Reply(_) => {
            let text = match behaviour {
                Behaviour::Reply(text) => text,
                _ => echo_of(&last_user_text(&body)),
            };
            if format == Format::OpenAi && body["stream"] != true {
                return completion(&model, &text, &[]);
            }
            (Script::of(halves(&text), Duration::ZERO), Vec::new(), false)
        }
        Behaviour::ToolCalls(reply) => {
            if format == Format::OpenAi && body["stream"] != true {
                return completion(&model, &reply.text, &reply.calls);
            }
            let pieces = if reply.text.is_empty() { Vec::new() } else { halves(&reply.text) };
            (Script::of(pieces, Duration::ZERO), reply.calls, false)
        }
        Behaviour::Fail(_) | Behaviour::Hang => unreachable!("turned into a fault above"),
    };
    stream_reply(format, &model, script, &calls, fault, delay, scripted.then_some(stats))
}

/// The last user message's text, in OpenAI/Anthropic (`messages`, content
/// a string or blocks) or Gemini (`contents`) form.
fn last_user_text(body: &Value) -> String {
    let openai = body["messages"].as_array().and_then(|m| m.iter().rev().find(|m| m["role"] == "user"));
    let gemini = || body["contents"].as_array().and_then(|c| c.iter().rev().find(|c| c["role"] == "user"));
    let text_in = |items: &Value| {
        let items = items.as_array().map(Vec::as_slice).unwrap_or_default();
        items.iter().find_map(|i| i["text"].as_str()).unwrap_or_default().to_owned()
    };
    match (openai, gemini()) {
        (Some(m), _) => m["content"].as_str().map_or_else(|| text_in(&m["content"]), str::to_owned),
        (None, Some(c)) => text_in(&c["parts"]),
        (None, None) => String::new(),
    }
}

/// `text` in pieces of `TOOL_PIECE_CHARS` characters.
fn small_pieces(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars.chunks(TOOL_PIECE_CHARS).map(|c| c.iter().collect()).collect()
}

/// A text in two deltas, split at a character boundary.
fn halves(text: &str) -> Vec<String> {
    let split = text.char_indices().nth(text.chars().count() / 2).map_or(text.len(), |(i, _)| i);
    let (a, b) = text.split_at(split);
    vec![a.to_owned(), b.to_owned()]
}

/// A `stream: false` OpenAI answer (calling `calls`, if any).
fn completion(model: &str, text: &str, calls: &[(String, String)]) -> Response {
    let (p, c) = OPENAI_USAGE;
    let mut message = json!({"role": "assistant", "content": text});
    let mut finish_reason = "stop";
    if !calls.is_empty() {
        let calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, (name, arguments))| {
                json!({"id": format!("call_mock_{i}"), "type": "function", "function": {"name": name, "arguments": arguments}})
            })
            .collect();
        message["tool_calls"] = Value::Array(calls);
        if text.is_empty() {
            message["content"] = Value::Null;
        }
        finish_reason = "tool_calls";
    }
    Json(json!({
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    }))
    .into_response()
}

/// One event of a streamed body and the pause before it.
struct Step {
    wait: Duration,
    text: String,
    /// A text delta (counted in the stats).
    delta: bool,
}

/// How a streamed body goes on after its steps.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tail {
    Done,
    Hang,
    Break,
}

/// `script` in `format`, changed by `fault`; `chunk_delay` is added before
/// every event but the first. `stats` counts scripted streams only.
fn stream_reply(
    format: Format,
    model: &str,
    script: Script,
    calls: &[(String, String)],
    fault: Fault,
    chunk_delay: Duration,
    stats: Option<Arc<StreamStats>>,
) -> Response {
    let with_usage = !matches!(fault, Fault::NoUsage);
    let (deltas, rest) = events(format, model, &script.chunks, calls, with_usage);
    let mut steps = VecDeque::new();
    let mut tail = match script.end {
        StreamEnd::Finish => Tail::Done,
        StreamEnd::Hang => Tail::Hang,
        StreamEnd::Drop => Tail::Break,
    };
    let mut sent_deltas = 0;
    for (i, (text, delta)) in deltas.into_iter().enumerate() {
        if let Fault::DropAfter(n) = fault
            && sent_deltas == n
        {
            tail = Tail::Break;
            break;
        }
        let wait = match &fault {
            _ if i == 0 => script.start + if delta { script.every } else { Duration::ZERO },
            Fault::IdleGap(gap) if delta && sent_deltas == 1 => *gap,
            _ if delta => script.every + chunk_delay,
            _ => chunk_delay,
        };
        sent_deltas += usize::from(delta);
        steps.push_back(Step { wait, text, delta });
    }
    if tail == Tail::Done {
        steps.extend(rest.into_iter().map(|text| Step { wait: chunk_delay, text, delta: false }));
    }
    if let Some(stats) = &stats {
        stats.open.fetch_add(1, Ordering::SeqCst);
    }
    let feed = Feed { steps, tail, stats };
    let body = futures::stream::unfold(feed, |mut feed| async move {
        if let Some(step) = feed.steps.pop_front() {
            if !step.wait.is_zero() {
                tokio::time::sleep(step.wait).await;
            }
            if let (true, Some(stats)) = (step.delta, &feed.stats) {
                stats.chunks_sent.fetch_add(1, Ordering::SeqCst);
            }
            return Some((Ok(Bytes::from(step.text)), feed));
        }
        match std::mem::replace(&mut feed.tail, Tail::Done) {
            Tail::Done => None,
            Tail::Hang => {
                tokio::time::sleep(HANG_FOR).await;
                None
            }
            Tail::Break => {
                // Let what was sent reach the client: hyper drops unflushed data on error.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((Err(std::io::Error::other("the mock drops the connection")), feed))
            }
        }
    });
    ([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(body)).into_response()
}

/// The rest of a streamed body; dropping it (the response finished or the
/// server went away) closes a scripted stream in the stats.
struct Feed {
    steps: VecDeque<Step>,
    tail: Tail,
    stats: Option<Arc<StreamStats>>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        if let Some(stats) = &self.stats {
            stats.open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The events of a reply of `pieces`, then `calls`, in `format`: the ones up
/// to the last delta (flagged when they carry a delta or a piece of a call),
/// then the closing ones.
fn events(
    format: Format,
    model: &str,
    pieces: &[String],
    calls: &[(String, String)],
    with_usage: bool,
) -> (Vec<(String, bool)>, Vec<String>) {
    let data = |v: Value| format!("data: {v}\n\n");
    match format {
        Format::OpenAi => {
            let chunk = |choices: Value| {
                data(json!({
                    "id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": choices
                }))
            };
            let mut deltas = vec![(chunk(json!([{"index": 0, "delta": {"role": "assistant"}}])), false)];
            deltas.extend(pieces.iter().map(|p| (chunk(json!([{"index": 0, "delta": {"content": p}}])), true)));
            for (i, (name, arguments)) in calls.iter().enumerate() {
                let call = |v: Value| chunk(json!([{"index": 0, "delta": {"tool_calls": [v]}}]));
                let first = json!({
                    "index": i, "id": format!("call_mock_{i}"), "type": "function",
                    "function": {"name": name, "arguments": ""}
                });
                deltas.push((call(first), true));
                deltas.extend(
                    small_pieces(arguments)
                        .into_iter()
                        .map(|p| (call(json!({"index": i, "function": {"arguments": p}})), true)),
                );
            }
            let finish_reason = if calls.is_empty() { "stop" } else { "tool_calls" };
            let mut rest = vec![chunk(json!([{"index": 0, "delta": {}, "finish_reason": finish_reason}]))];
            if with_usage {
                let (p, c) = OPENAI_USAGE;
                rest.push(data(json!({
                    "id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
                })));
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
            let chunk = |parts: Value, done: bool| {
                let mut candidate = json!({"content": {"parts": parts, "role": "model"}, "index": 0});
                if done {
                    candidate["finishReason"] = json!("STOP");
                }
                format!("data: {}\r\n\r\n", json!({"candidates": [candidate], "usageMetadata": usage(done)}))
            };
            let last = pieces.len().saturating_sub(1);
            let mut deltas: Vec<(String, bool)> = pieces
                .iter()
                .enumerate()
                .map(|(i, p)| (chunk(json!([{"text": p}]), i == last && calls.is_empty()), true))
                .collect();
            if !calls.is_empty() {
                // Gemini sends calls whole, parallel ones as parts of one chunk.
                let parts: Vec<Value> = calls
                    .iter()
                    .map(|(name, arguments)| {
                        let args: Value = serde_json::from_str(arguments).expect("scripted arguments are JSON");
                        json!({"functionCall": {"name": name, "args": args}})
                    })
                    .collect();
                deltas.push((chunk(Value::Array(parts), true), true));
            }
            (deltas, Vec::new())
        }
        Format::Anthropic => {
            let (p, c) = ANTHROPIC_USAGE;
            let named = |name: &str, v: Value| format!("event: {name}\ndata: {v}\n\n");
            let block_stop =
                |index: usize| named("content_block_stop", json!({"type": "content_block_stop", "index": index}));
            let start_usage = if with_usage { json!({"input_tokens": p, "output_tokens": 1}) } else { json!({}) };
            let mut opening = named(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_1", "role": "assistant", "content": [], "usage": start_usage}}),
            );
            let text_block = calls.is_empty() || !pieces.is_empty();
            if text_block {
                opening += &named(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                );
            }
            let mut deltas = vec![(opening, false)];
            deltas.extend(pieces.iter().map(|t| {
                let delta =
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}});
                (named("content_block_delta", delta), true)
            }));
            if !calls.is_empty() && text_block {
                deltas.push((block_stop(0), false));
            }
            let first_tool_block = usize::from(text_block);
            for (i, (name, arguments)) in calls.iter().enumerate() {
                let index = first_tool_block + i;
                let input_delta = |json: &str| {
                    let delta = json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": json}});
                    named("content_block_delta", delta)
                };
                let start = named(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": index,
                        "content_block": {"type": "tool_use", "id": format!("toolu_mock_{i}"), "name": name, "input": {}}}),
                );
                // Anthropic's first input delta is empty.
                deltas.push((start + &input_delta(""), false));
                deltas.extend(small_pieces(arguments).iter().map(|p| (input_delta(p), true)));
                deltas.push((block_stop(index), false));
            }
            let end_usage = if with_usage { json!({"output_tokens": c}) } else { json!({}) };
            let stop_reason = if calls.is_empty() { "end_turn" } else { "tool_use" };
            let mut rest = vec![named("ping", json!({"type": "ping"}))];
            if calls.is_empty() {
                rest.push(block_stop(0));
            }
            rest.push(named(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": stop_reason}, "usage": end_usage}),
            ));
            rest.push(named("message_stop", json!({"type": "message_stop"})));
            (deltas, rest)
        }
    }
}
