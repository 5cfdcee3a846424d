//! The chat WebSocket `/api/ws` (SPEC §3): `message`, `cancel` and `ping`
//! frames in; `user_message`, `delta`, `reset` (a reply taken over from a dead
//! instance starts again), `done`, `error` and `pong` out, each
//! tagged with the client's `request_id`. Replies run detached (a dropped
//! socket does not stop them); `request_id` is an idempotency key, so a
//! client that resends after reconnecting re-attaches instead of sending
//! twice. One reply generates at a time per socket (another message frame
//! gets a `busy` error), frames are rate limited per socket (a flood is
//! closed with 1008) and an oversized frame is closed with 1009. Every
//! socket has a bounded outgoing queue: a client that does not read is
//! closed with code 4008 and can resume over SSE.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    extract::{
        State,
        ws::{Message, WebSocket, WebSocketUpgrade},
    },
    response::Response,
};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{
    AppState,
    error::ApiError,
    extract::AuthUser,
    send::{key_allows, parse_chat_target, validate_message},
    socket::{
        Admit, CLOSE_POLICY_VIOLATION, FrameBudget, HEARTBEAT, Outbox, SocketUser, close_for_read_error, close_message,
        drain, rate_limited, spawn_writer,
    },
    streaming::reply_failure,
    views::{ErrorBody, MessageView},
};
use crate::{
    chat::{ReplyEvent, SendRequest},
    domain::conversation::MessageStatus,
};

/// Chat over a WebSocket.
#[utoipa::path(get, path = "/api/ws", tag = "chat", security(("bearer" = [])),
    params(("token" = Option<String>, Query, description = "Access token, for clients that cannot set headers")),
    responses((status = 101, description = "Switching to the WebSocket protocol"),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Cookie-authenticated from an origin that is not allowed")))]
pub async fn chat_socket(
    State(state): State<Arc<AppState>>,
    SocketUser(user): SocketUser,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade.max_message_size(super::BODY_LIMIT).on_upgrade(move |socket| run(state, user, socket))
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientFrame {
    Message { request_id: Option<String>, conversation_id: Option<String>, content: Value, model: Option<String> },
    Cancel { request_id: String },
    Ping,
}

async fn run(state: Arc<AppState>, user: AuthUser, socket: WebSocket) {
    metrics::gauge!("palaver_open_sockets", "kind" => "chat").increment(1.0);
    let (sink, mut stream) = socket.split();
    let requests: Arc<Mutex<HashMap<String, String>>> = Default::default();
    let in_flight: Arc<Mutex<InFlight>> = Default::default();
    let closed = CancellationToken::new();
    let (outbox, mut writer) =
        spawn_writer(sink, closed.clone(), "slow consumer: resume with GET .../messages/{id}/stream");
    let mut budget = FrameBudget::new(state.settings.server.socket_frames_per_second);

    let close = loop {
        let next = tokio::select! {
            _ = closed.cancelled() => break None,
            n = tokio::time::timeout(HEARTBEAT * 3, stream.next()) => n,
        };
        let text = match next {
            Ok(Some(Err(e))) => break close_for_read_error(e),
            Err(_) | Ok(None) | Ok(Some(Ok(Message::Close(_)))) => break None,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue, // axum answers pings itself
            Ok(Some(Ok(message))) => match budget.admit() {
                Admit::Close => break Some(close_message(CLOSE_POLICY_VIOLATION, "too many frames")),
                Admit::Refuse => {
                    outbox.error(None, &rate_limited());
                    continue;
                }
                Admit::Yes => match message {
                    Message::Text(t) => t,
                    _ => {
                        outbox.error(None, &ApiError::bad_request("bad_frame", "Frames are JSON text."));
                        continue;
                    }
                },
            },
        };
        let frame: ClientFrame = match serde_json::from_str(text.as_str()) {
            Ok(f) => f,
            Err(e) => {
                let request_id = serde_json::from_str::<Value>(text.as_str())
                    .ok()
                    .and_then(|v| v.get("request_id").and_then(Value::as_str).map(str::to_owned));
                let err = ApiError::bad_request("bad_frame", format!("Unreadable frame: {e}."));
                outbox.error(request_id.as_deref(), &err);
                continue;
            }
        };
        match frame {
            ClientFrame::Ping => {
                outbox.send(json!({ "type": "pong" }));
            }
            ClientFrame::Cancel { request_id } => {
                let message_id = requests.lock().expect("requests lock").get(&request_id).cloned();
                let cancelled = match message_id {
                    Some(id) => state.chat.cancel(&id).await.unwrap_or(false),
                    None => false,
                };
                if !cancelled {
                    let e = ApiError::conflict("not_streaming", "No reply of this request is being generated.");
                    outbox.error(Some(&request_id), &e);
                }
            }
            ClientFrame::Message { request_id, conversation_id, content, model } => {
                let request_id = request_id.filter(|r| !r.is_empty() && r.len() <= 200);
                let Some(slot) = Slot::take(&in_flight, request_id.as_deref()) else {
                    let e = ApiError::conflict("busy", "A reply is being generated on this socket; wait for its end.");
                    outbox.error(request_id.as_deref(), &e);
                    continue;
                };
                let task = handle_message(
                    state.clone(),
                    user.clone(),
                    outbox.clone(),
                    requests.clone(),
                    slot,
                    request_id,
                    conversation_id,
                    content,
                    model,
                );
                tokio::spawn(task);
            }
        }
    };
    if let Some(close) = close {
        // Told why, then let go: the writer ends after sending a close frame.
        outbox.send_message(close);
        let _ = tokio::join!(tokio::time::timeout(Duration::from_secs(5), &mut writer), drain(&mut stream));
    }
    closed.cancel();
    let _ = writer.await;
    metrics::gauge!("palaver_open_sockets", "kind" => "chat").decrement(1.0);
}

/// The message a socket is answering: one at a time, so one socket cannot
/// start a provider call per frame. Resending the same `request_id`
/// re-attaches to its reply (no new call), so that is let through.
#[derive(Default)]
struct InFlight {
    request_id: Option<String>,
    tasks: usize,
}

/// A share of the socket's one reply; given back when dropped.
struct Slot(Option<Arc<Mutex<InFlight>>>);

impl Slot {
    fn take(in_flight: &Arc<Mutex<InFlight>>, request_id: Option<&str>) -> Option<Slot> {
        let mut current = in_flight.lock().expect("in-flight lock");
        if current.tasks > 0 && (request_id.is_none() || current.request_id.as_deref() != request_id) {
            return None;
        }
        current.tasks += 1;
        current.request_id = request_id.map(str::to_owned);
        Some(Slot(Some(in_flight.clone())))
    }

    /// Frees the socket for the next message (before its last frame goes
    /// out, so a client that answers that frame at once is not `busy`).
    fn release(&mut self) {
        if let Some(in_flight) = self.0.take() {
            in_flight.lock().expect("in-flight lock").tasks -= 1;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release();
    }
}

/// Sends one message and forwards its reply's events as frames.
#[allow(clippy::too_many_arguments)]
async fn handle_message(
    state: Arc<AppState>,
    user: AuthUser,
    outbox: Outbox,
    requests: Arc<Mutex<HashMap<String, String>>>,
    mut slot: Slot,
    request_id: Option<String>,
    conversation_id: Option<String>,
    content: Value,
    model: Option<String>,
) {
    let rid = request_id.as_deref();
    let sent = async {
        let (content, model) = validate_message(&state, "content", content, model)?;
        let target = parse_chat_target(&state, &user, conversation_id.as_deref()).await?;
        key_allows(&state, &user, model.as_ref(), &target)?;
        let req = SendRequest {
            payer: user.payer(),
            target,
            content,
            model,
            idempotency_key: request_id.as_ref().map(|r| format!("ws:{r}")),
        };
        state.chat.send(req).await.map_err(ApiError::from)
    }
    .await;
    let sent = match sent {
        Ok(s) => s,
        Err(e) => {
            slot.release();
            outbox.error(rid, &e);
            return;
        }
    };
    let message_id = sent.assistant_message.id.clone();
    if let Some(r) = &request_id {
        requests.lock().expect("requests lock").insert(r.clone(), message_id.clone());
    }
    if !outbox.send(json!({
        "type": "user_message",
        "request_id": rid,
        "message": MessageView::from(&sent.user_message),
        "assistant_message_id": message_id,
    })) {
        return;
    }
    let events = state.chat.follow(sent.assistant_message, 0);
    tokio::pin!(events);
    while let Some(event) = events.next().await {
        if matches!(event, ReplyEvent::Finished(_)) {
            slot.release();
        }
        let ok = match event {
            ReplyEvent::Delta { text, .. } => {
                outbox.send(json!({ "type": "delta", "request_id": rid, "message_id": message_id, "text": text }))
            }
            ReplyEvent::Reset => outbox.send(json!({ "type": "reset", "request_id": rid, "message_id": message_id })),
            ReplyEvent::Finished(m) if m.status == MessageStatus::Failed => {
                outbox.error(rid, &reply_failure(&m, Default::default()))
            }
            ReplyEvent::Finished(m) => {
                outbox.send(json!({ "type": "done", "request_id": rid, "message": MessageView::from(m.as_ref()) }))
            }
        };
        if !ok {
            break;
        }
    }
    if let Some(r) = &request_id {
        requests.lock().expect("requests lock").remove(r);
    }
}
