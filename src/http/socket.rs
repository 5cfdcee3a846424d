//! What every WebSocket shares (the chat socket and the support desk's):
//! who may open one, its bounded outgoing queue and writer with heartbeat,
//! the per-socket frame budget, and the close frames (1008, 1009, 4008).

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{
        FromRequestParts,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket},
    },
    http::{HeaderMap, header, request::Parts},
};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    AppState,
    error::ApiError,
    extract::{AuthUser, authenticate_token},
};

/// Frames queued for one socket before it counts as a slow consumer.
const OUTGOING_QUEUE: usize = 256;
/// Server heartbeat: a ping this often; no frame from the client for
/// three intervals closes the socket.
pub(super) const HEARTBEAT: Duration = Duration::from_secs(20);
/// Close code for a client that does not read its frames.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code for a client that keeps sending past its frame budget.
pub const CLOSE_POLICY_VIOLATION: u16 = 1008;
/// Close code for a frame over the size limit.
pub const CLOSE_TOO_BIG: u16 = 1009;

/// A socket's frame budget: a token bucket. Hand-written because it is one
/// counter owned by one task; a limiter crate's keyed, shared state would be
/// machinery without a use here.
pub(super) struct FrameBudget {
    per_second: f64,
    /// The bucket's size: three seconds' worth.
    burst: f64,
    tokens: f64,
    last: tokio::time::Instant,
    /// Frames refused since the client last let the bucket fill up.
    refused: u32,
}

/// What to do with a frame the client sent.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admit {
    Yes,
    /// Answer `rate_limited` and drop the frame.
    Refuse,
    /// The client keeps flooding: close the socket (1008).
    Close,
}

impl FrameBudget {
    pub(super) fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second.max(1));
        let burst = per_second * 3.0;
        Self { per_second, burst, tokens: burst, last: tokio::time::Instant::now(), refused: 0 }
    }

    pub(super) fn admit(&mut self) -> Admit {
        self.admit_at(tokio::time::Instant::now())
    }

    fn admit_at(&mut self, now: tokio::time::Instant) -> Admit {
        let earned = now.duration_since(self.last).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.last = now;
        if self.tokens >= self.burst {
            self.refused = 0;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Admit::Yes;
        }
        self.refused += 1;
        // Another burst's worth of refused frames: not a client that slipped.
        if f64::from(self.refused) > self.burst { Admit::Close } else { Admit::Refuse }
    }
}

pub(super) fn rate_limited() -> ApiError {
    crate::error::Error::rate_limited("rate_limited", "Too many frames on this socket; slow down.", 1000).into()
}

/// The close frame for a read error: 1009 for a frame over the size limit
/// (tungstenite reports it as a capacity error), none for a broken socket.
pub(super) fn close_for_read_error(e: axum::Error) -> Option<Message> {
    let inner = e.into_inner();
    let too_big = matches!(inner.downcast_ref::<tungstenite::Error>(), Some(tungstenite::Error::Capacity(_)));
    too_big.then(|| close_message(CLOSE_TOO_BIG, "frame too large: the limit is 1 MiB"))
}

/// Reads and drops what the client still sends after we closed, until its
/// close frame (or two seconds): a connection closed with unread data is
/// reset, and the client would never see our close frame.
pub(super) async fn drain(stream: &mut futures::stream::SplitStream<WebSocket>) {
    let rest = async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), rest).await;
}

pub(super) fn close_message(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) }))
}

/// Authentication for sockets: `?token=<access_token>`, a Bearer header, or
/// the session cookie (then only from an allowed origin: a cookie rides
/// along on cross-site socket handshakes too).
pub struct SocketUser(pub AuthUser);

impl FromRequestParts<Arc<AppState>> for SocketUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let query: Vec<(String, String)> =
            serde_urlencoded::from_str(parts.uri.query().unwrap_or("")).unwrap_or_default();
        if let Some((_, token)) = query.iter().find(|(k, _)| k == "token") {
            return authenticate_token(state, token).await.map(SocketUser);
        }
        let user = AuthUser::from_request_parts(parts, state).await?;
        if user.via_cookie && !origin_allowed(&parts.headers, state) {
            return Err(ApiError::forbidden(
                "origin_not_allowed",
                "This origin may not open sockets with the session cookie.",
            ));
        }
        Ok(SocketUser(user))
    }
}

fn origin_allowed(headers: &HeaderMap, state: &AppState) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else { return true };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let same_host = origin.split("://").nth(1).is_some_and(|h| h.eq_ignore_ascii_case(host));
    same_host || state.settings.server.cors_origins().iter().any(|o| o == origin)
}

/// The sending half of a socket, shared by the tasks that feed it (also
/// by the support desk's sockets).
#[derive(Clone)]
pub(super) struct Outbox {
    tx: mpsc::Sender<Message>,
    /// Set when the queue overflowed: the socket is closed as slow.
    overflow: CancellationToken,
}

impl Outbox {
    /// Queues a frame; false when the socket is gone or too far behind.
    pub(super) fn send(&self, frame: Value) -> bool {
        self.send_message(Message::Text(Utf8Bytes::from(frame.to_string())))
    }

    pub(super) fn send_message(&self, message: Message) -> bool {
        match self.tx.try_send(message) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflow.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Waits (a heartbeat at most) until the queue has room for a frame: a
    /// replay from the log may be longer than the queue, and a client that
    /// reads is not slow. False when the socket is gone or stays full.
    pub(super) async fn room(&self) -> bool {
        match tokio::time::timeout(HEARTBEAT, self.tx.reserve()).await {
            Ok(Ok(_permit)) => true,
            Ok(Err(_)) => false,
            Err(_) => {
                self.overflow.cancel();
                false
            }
        }
    }

    pub(super) fn error(&self, request_id: Option<&str>, e: &ApiError) -> bool {
        self.send(json!({ "type": "error", "request_id": request_id, "detail": e.detail(), "code": e.code() }))
    }
}

/// Starts the task that writes a socket's queued frames, with a ping every
/// heartbeat. A client too slow to empty the bounded queue is closed with
/// 4008 and `slow_reason`; a queued close frame ends the socket. `closed` is
/// cancelled when the writer ends, and ends it when cancelled by the reader.
pub(super) fn spawn_writer(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    closed: CancellationToken,
    slow_reason: &'static str,
) -> (Outbox, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Message>(OUTGOING_QUEUE);
    let outbox = Outbox { tx, overflow: CancellationToken::new() };
    let overflow = outbox.overflow.clone();
    let writer = tokio::spawn(async move {
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        loop {
            tokio::select! {
                _ = overflow.cancelled() => break,
                _ = closed.cancelled() => break,
                _ = heartbeat.tick() => {
                    if sink.send(Message::Ping(Default::default())).await.is_err() { break; }
                }
                msg = rx.recv() => match msg {
                    // A client that stops reading blocks this send; the
                    // overflow signal must still reach the socket.
                    Some(m) => {
                        let closing = matches!(m, Message::Close(_));
                        tokio::select! {
                            sent = sink.send(m) => if sent.is_err() || closing { break },
                            _ = overflow.cancelled() => break,
                            _ = closed.cancelled() => break,
                        }
                    }
                    None => break,
                },
            }
        }
        if overflow.is_cancelled() {
            // Told once the client reads again; given up on after a while.
            let reason = Utf8Bytes::from_static(slow_reason);
            let close = Message::Close(Some(CloseFrame { code: CLOSE_SLOW_CONSUMER, reason }));
            let _ = tokio::time::timeout(HEARTBEAT, sink.send(close)).await;
        }
        closed.cancel();
    });
    (outbox, writer)
}

#[cfg(test)]
mod tests {
    use super::{Admit, FrameBudget};

    #[test]
    fn a_burst_passes_a_flood_is_refused_then_closed() {
        let start = tokio::time::Instant::now();
        let mut budget = FrameBudget::new(10);
        assert!((0..30).all(|_| budget.admit_at(start) == Admit::Yes), "a burst of three seconds' worth");
        assert!((0..30).all(|_| budget.admit_at(start) == Admit::Refuse));
        assert_eq!(budget.admit_at(start), Admit::Close, "a client that keeps flooding");

        let mut budget = FrameBudget::new(10);
        let ms = |n: u64| start + std::time::Duration::from_millis(n);
        // Ten a second, for ever: always within budget.
        assert!((1..=100).all(|i| budget.admit_at(ms(i * 100)) == Admit::Yes));
        for _ in 0..40 {
            budget.admit_at(ms(10_000));
        }
        let calm = ms(13_000);
        assert_eq!(budget.admit_at(calm), Admit::Yes, "a calm client starts afresh");
        assert!((0..29).all(|_| budget.admit_at(calm) == Admit::Yes));
        assert_eq!(budget.admit_at(calm), Admit::Refuse, "refusals were forgotten, the budget was not");
    }
}
