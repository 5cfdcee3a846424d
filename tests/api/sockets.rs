//! The streaming side of the harness: server-sent event streams (`SseStream`)
//! and the chat WebSocket (`WsClient`), read event by event with a deadline
//! so a silent server fails the test instead of hanging it.

use std::time::Duration;

use reqwest::{RequestBuilder, StatusCode};
use serde_json::{Value, json};

use crate::{
    client::{ApiResponse, Fetch, TestUser},
    harness::TestApp,
};

/// How long a test waits for the next event or frame before failing.
const STREAM_WAIT: Duration = Duration::from_secs(20);

/// One server-sent event with its JSON data.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: Value,
}

/// An open `text/event-stream` response, read event by event.
pub struct SseStream {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: Vec<u8>,
    ended: bool,
}

impl SseStream {
    /// Sends the request with `Accept: text/event-stream` and asserts a
    /// 200 event stream.
    pub async fn open(request: RequestBuilder) -> Self {
        let response = request
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .unwrap_or_else(|e| panic!("request failed: {e:?}"));
        let status = response.status();
        let headers = response.headers().clone();
        if status != StatusCode::OK {
            let text = response.text().await.unwrap_or_default();
            panic!("expected a 200 event stream, got {status}: {text}");
        }
        let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(ct.starts_with("text/event-stream"), "expected text/event-stream, got {ct:?}");
        Self { body: Box::pin(response.bytes_stream()), buffer: Vec::new(), ended: false }
    }

    /// The next event (comments and keep-alives skipped); `None` once the
    /// stream has ended. Fails the test after `STREAM_WAIT` of silence.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse_sse_block(&String::from_utf8_lossy(&block)) {
                    return Some(event);
                }
                continue;
            }
            if self.ended {
                assert!(self.buffer.iter().all(u8::is_ascii_whitespace), "stream ended inside an event");
                return None;
            }
            match tokio::time::timeout(STREAM_WAIT, futures::StreamExt::next(&mut self.body)).await {
                Err(_) => panic!("no server-sent event within {STREAM_WAIT:?}"),
                Ok(Some(Ok(bytes))) => self.buffer.extend_from_slice(&bytes),
                Ok(Some(Err(e))) => panic!("the event stream broke: {e:?}"),
                Ok(None) => self.ended = true,
            }
        }
    }

    /// The next event, which must exist.
    pub async fn expect(&mut self, name: &str) -> SseEvent {
        let event = self.next().await.unwrap_or_else(|| panic!("the stream ended before a {name:?} event"));
        assert_eq!(event.event, name, "unexpected event: {event:?}");
        event
    }

    /// Every remaining event up to the end of the stream.
    pub async fn rest(mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(e) = self.next().await {
            events.push(e);
        }
        events
    }
}

fn parse_sse_block(block: &str) -> Option<SseEvent> {
    let (mut event, mut id, mut data) = (String::from("message"), None, Vec::new());
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = value.to_owned(),
            "id" => id = Some(value.to_owned()),
            "data" => data.push(value),
            _ => {} // comments (keep-alives) and unknown fields
        }
    }
    if data.is_empty() {
        return None;
    }
    let data = data.join("\n");
    let data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data}"));
    Some(SseEvent { event, id, data })
}

/// The names of some events, for order checks.
pub fn event_names(events: &[SseEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

/// The text of the `delta` events, joined.
pub fn delta_text(events: &[SseEvent]) -> String {
    events.iter().filter(|e| e.event == "delta").filter_map(|e| e.data["text"].as_str()).collect()
}

impl TestApp {
    /// `POST /api/conversations/{id}/messages` asking for an event stream.
    pub async fn post_message_sse(
        &self,
        user: &TestUser,
        conversation_id: &str,
        content: &str,
        idempotency_key: Option<&str>,
    ) -> SseStream {
        let mut request = self
            .post(&format!("/api/conversations/{conversation_id}/messages"))
            .bearer_auth(&user.token)
            .json(&json!({ "content": content }));
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        SseStream::open(request).await
    }

    /// `POST /api/chat/stream`.
    pub async fn chat_stream(&self, user: &TestUser, body: Value) -> SseStream {
        SseStream::open(self.post("/api/chat/stream").bearer_auth(&user.token).json(&body)).await
    }

    /// The resume request for a reply's stream, to send as it is or open.
    pub fn resume_request(
        &self,
        user: &TestUser,
        conversation_id: &str,
        message_id: &str,
        last_event_id: Option<&str>,
    ) -> RequestBuilder {
        let mut request = self
            .get(&format!("/api/conversations/{conversation_id}/messages/{message_id}/stream"))
            .bearer_auth(&user.token);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        request
    }

    /// `GET …/messages/{message_id}/stream` with an optional `Last-Event-ID`.
    pub async fn resume(
        &self,
        user: &TestUser,
        conversation_id: &str,
        message_id: &str,
        last_event_id: Option<&str>,
    ) -> SseStream {
        SseStream::open(self.resume_request(user, conversation_id, message_id, last_event_id)).await
    }

    pub async fn cancel_reply(&self, user: &TestUser, conversation_id: &str, message_id: &str) -> ApiResponse {
        self.post(&format!("/api/conversations/{conversation_id}/messages/{message_id}/cancel"))
            .bearer_auth(&user.token)
            .fetch()
            .await
    }

    /// One stored message of a conversation (asserting it exists).
    pub async fn stored_message(&self, user: &TestUser, conversation_id: &str, message_id: &str) -> Value {
        let list = self.messages(user, conversation_id, "?limit=100").await;
        list.assert_status(StatusCode::OK);
        list.items()
            .iter()
            .find(|m| m["id"] == message_id)
            .cloned()
            .unwrap_or_else(|| panic!("message {message_id} is not stored: {}", list.text))
    }

    /// Polls until the message has left `streaming` (at most `within`) and
    /// returns it.
    pub async fn settled_message(
        &self,
        user: &TestUser,
        conversation_id: &str,
        message_id: &str,
        within: Duration,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let message = self.stored_message(user, conversation_id, message_id).await;
            if message["status"] != "streaming" {
                return message;
            }
            assert!(tokio::time::Instant::now() < deadline, "still streaming after {within:?}: {message}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `ws://…/api/ws?token=<access token>`.
    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://127.0.0.1:{}/api/ws?token={token}", self.port)
    }

    /// Opens the chat socket as `user`.
    pub async fn ws(&self, user: &TestUser) -> WsClient {
        let (socket, _) = tokio_tungstenite::connect_async(self.ws_url(&user.token))
            .await
            .unwrap_or_else(|e| panic!("the WebSocket handshake failed: {e:?}"));
        WsClient { socket }
    }
}

/// A chat WebSocket, read frame by frame.
pub struct WsClient {
    pub socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
}

/// What a socket gave instead of a text frame.
#[derive(Debug)]
pub enum WsEnd {
    /// A close frame with this code.
    Closed(Option<u16>),
    /// The connection ended without a close frame (or broke).
    Gone,
}

impl WsClient {
    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        use futures::SinkExt;
        self.socket
            .send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .unwrap_or_else(|e| panic!("sending a frame failed: {e:?}"));
    }

    /// A `message` frame.
    pub async fn send_message(&mut self, request_id: &str, conversation_id: Option<&str>, content: &str) {
        let frame = json!({
            "type": "message", "request_id": request_id, "conversation_id": conversation_id, "content": content
        });
        self.send(frame).await;
    }

    /// The next JSON text frame, or how the socket ended. Pings and pongs
    /// are skipped. Fails the test after `STREAM_WAIT` of silence.
    pub async fn next_or_end(&mut self) -> Result<Value, WsEnd> {
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let next = tokio::time::timeout(STREAM_WAIT, futures::StreamExt::next(&mut self.socket))
                .await
                .unwrap_or_else(|_| panic!("no WebSocket frame within {STREAM_WAIT:?}"));
            match next {
                Some(Ok(Message::Text(t))) => {
                    return Ok(serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("a frame that is not JSON ({e}): {t}")));
                }
                Some(Ok(Message::Close(frame))) => return Err(WsEnd::Closed(frame.map(|f| u16::from(f.code)))),
                Some(Ok(Message::Binary(b))) => panic!("unexpected binary frame of {} bytes", b.len()),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(WsEnd::Gone),
            }
        }
    }

    /// The next JSON text frame, which must come.
    pub async fn next(&mut self) -> Value {
        self.next_or_end().await.unwrap_or_else(|end| panic!("the socket ended: {end:?}"))
    }

    /// The next frame, which must have this `type`.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let frame = self.next().await;
        assert_eq!(frame["type"], kind, "unexpected frame: {frame}");
        frame
    }

    /// Frames until (and with) the `done` or `error` of `request_id`;
    /// frames of other requests are kept too.
    pub async fn until_finished(&mut self, request_id: &str) -> Vec<Value> {
        let mut frames = Vec::new();
        loop {
            let frame = self.next().await;
            let last = frame["request_id"] == request_id && (frame["type"] == "done" || frame["type"] == "error");
            frames.push(frame);
            if last {
                return frames;
            }
        }
    }
}

/// The `type`s of some frames, for order checks.
pub fn frame_types(frames: &[Value]) -> Vec<&str> {
    frames.iter().map(|f| f["type"].as_str().unwrap_or_default()).collect()
}

/// The text of the `delta` frames, joined.
pub fn frame_text(frames: &[Value]) -> String {
    frames.iter().filter(|f| f["type"] == "delta").filter_map(|f| f["text"].as_str()).collect()
}
