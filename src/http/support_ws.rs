//! The support desk's sockets. `GET /ws/support/{session_id}` for the
//! visitor (its client token as `?token=` or Bearer) and `GET /ws/agent` for
//! agents (an access token, as on the chat socket). Both take `?since=<event id>` and first replay what the event log
//! holds after it, then deliver live events from the bus; a bus resync
//! re-reads the log, so nothing is missed or doubled. Frames in are rate
//! limited like the chat socket's.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{
        Path, State,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade},
    },
    http::{HeaderMap, Uri},
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{
    AppState,
    error::ApiError,
    extract::{bearer, parse_uuid},
    socket::{
        Admit, CLOSE_POLICY_VIOLATION, FrameBudget, Outbox, SocketUser, close_for_read_error, close_message, drain,
        rate_limited, spawn_writer,
    },
    views::ErrorBody,
};
use crate::{
    desk::{
        SupportSessionView,
        bus::{BusEvent, BusMessage},
    },
    domain::{conversation::MessageContent, support::SupportStatus, user::Role},
    store::SupportEventRecord,
};

const HEARTBEAT: Duration = Duration::from_secs(20);

/// `?token=` and `?since=`, read leniently (the last of repeated keys wins)
/// so no query string gets a rejection outside our error format.
#[derive(Debug, Default)]
pub struct SocketQuery {
    token: Option<String>,
    since: Option<String>,
}

impl SocketQuery {
    fn parse(uri: &axum::http::Uri) -> Self {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(uri.query().unwrap_or("")).unwrap_or_default();
        let last = |key: &str| pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        Self { token: last("token"), since: last("since") }
    }
}

fn since(q: &SocketQuery) -> Result<i64, ApiError> {
    match q.since.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(0),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::invalid_field("invalid_event_id", "since", "must be an event id")),
    }
}

/// The visitor's socket.
#[utoipa::path(get, path = "/ws/support/{session_id}", tag = "support", security((), ("bearer" = [])),
    params(("session_id" = uuid::Uuid, Path),
        ("token" = Option<String>, Query, description = "The session's client token, if not sent as Bearer"),
        ("since" = Option<i64>, Query, minimum = 0, description = "Replay events after this event id")),
    responses((status = 101, description = "WebSocket"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn client_socket(
    State(state): State<Arc<AppState>>,
    Path(session_id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let q = SocketQuery::parse(&uri);
    let opened = async {
        let id = parse_uuid(&session_id).ok_or(ApiError::NotFound)?;
        // SPEC §1: a Bearer header works wherever `?token=` does.
        let token = q.token.as_deref().or_else(|| bearer(&headers)).ok_or(ApiError::Unauthorized)?;
        let s = state.desk.session_for_client(&id, token).await?;
        Ok::<_, ApiError>((s, since(&q)?))
    };
    match opened.await {
        Err(e) => e.into_response(),
        Ok((s, since)) => upgrade
            .max_message_size(super::BODY_LIMIT)
            .on_upgrade(move |socket| run(state, Side::Client { session_id: s.id }, socket, since)),
    }
}

/// The agent console's socket: authenticated like the chat socket (an
/// access token as `?token=` or Bearer, or the session cookie).
#[utoipa::path(get, path = "/ws/agent", tag = "support",
    security((), ("bearer" = [])),
    params(("token" = Option<String>, Query, description = "Access token of an agent or admin, if not sent as Bearer"),
        ("since" = Option<i64>, Query, minimum = 0, description = "Replay events after this event id")),
    responses((status = 101, description = "WebSocket"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn agent_socket(
    State(state): State<Arc<AppState>>,
    uri: Uri,
    user: Result<SocketUser, ApiError>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let opened = async {
        let SocketUser(user) = user?;
        user.require(&[Role::Agent, Role::Admin])?;
        Ok::<_, ApiError>((user, since(&SocketQuery::parse(&uri))?))
    };
    match opened.await {
        Err(e) => e.into_response(),
        Ok((user, since)) => upgrade.max_message_size(super::BODY_LIMIT).on_upgrade(move |socket| {
            run(state, Side::Agent { id: user.user.id, admin: user.user.role == Role::Admin }, socket, since)
        }),
    }
}

/// What the socket's reader hands the loop: a frame within budget, or why not.
enum Incoming {
    Text(Utf8Bytes),
    Binary,
    /// Over the frame budget: answered `rate_limited`.
    Refused,
    /// The socket ends with this close frame (a flood, an oversized frame).
    Close(Message),
}

#[derive(Debug, Clone)]
enum Side {
    Client { session_id: String },
    Agent { id: String, admin: bool },
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Frame {
    Message {
        content: Value,
        session_id: Option<String>,
    },
    RequestHuman,
    ClaimSession {
        session_id: String,
    },
    /// Not in the SPEC's list: the socket twin of `POST …/release`.
    ReleaseSession {
        session_id: String,
    },
    CloseSession {
        session_id: String,
    },
    Ping,
}

/// The socket's bounded outgoing queue (a client who stops reading is
/// closed with 4008 and can reconnect with `?since=`), and the last status a
/// visitor was told, so queue changes that leave their place as it was send
/// nothing.
#[derive(Clone)]
struct Out {
    outbox: Outbox,
    last_status: Arc<std::sync::Mutex<Value>>,
}

impl Out {
    fn last_status_was(&self, status: &str) -> bool {
        self.last_status.lock().unwrap_or_else(|e| e.into_inner())[0] == status
    }

    /// True when this status differs from the last one sent (and records it).
    fn status_is_news(&self, frame: &Value) -> bool {
        let key = json!([frame["status"], frame["queue_position"], frame["estimated_wait_seconds"], frame["agent"]]);
        let mut last = self.last_status.lock().unwrap_or_else(|e| e.into_inner());
        if *last == key {
            return false;
        }
        *last = key;
        true
    }
}

fn send(out: &Out, frame: Value) -> bool {
    out.outbox.send(frame)
}

/// A visitor's status frame: logged ones always go out, derived ones
/// (greeting, queue moves) only when something changed.
fn send_status(out: &Out, frame: Value, logged: bool) -> bool {
    if out.status_is_news(&frame) || logged { send(out, frame) } else { true }
}

fn send_error(out: &Out, e: &ApiError) {
    send(out, json!({ "type": "error", "detail": e.detail(), "code": e.code() }));
}

async fn run(state: Arc<AppState>, side: Side, socket: WebSocket, since: i64) {
    let kind = if matches!(side, Side::Client { .. }) { "support_client" } else { "support_agent" };
    metrics::gauge!("palaver_open_sockets", "kind" => kind).increment(1.0);
    let (sink, mut stream) = socket.split();
    let closed = CancellationToken::new();
    let (outbox, mut writer) =
        spawn_writer(sink, closed.clone(), "slow consumer: reconnect with ?since=<last event_id>");
    let out = Out { outbox, last_status: Default::default() };
    // Subscribe before replaying, so nothing falls between the two.
    let mut bus = match &side {
        Side::Client { session_id } => state.desk.bus.subscribe_client(session_id),
        Side::Agent { id, .. } => state.desk.bus.subscribe_agent(id),
    };

    // The socket is read in a task of its own: the loop below wakes for bus
    // events, and polling the socket each time would cost a read attempt
    // (and its buffer set-up) per event.
    let (frames_tx, mut frames) = tokio::sync::mpsc::channel::<Incoming>(16);
    let mut budget = FrameBudget::new(state.settings.server.socket_frames_per_second);
    let mut reader = tokio::spawn(async move {
        loop {
            let frame = match tokio::time::timeout(HEARTBEAT * 3, stream.next()).await {
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Err(_) => break,
                Ok(Some(Err(e))) => match close_for_read_error(e) {
                    Some(close) => Incoming::Close(close),
                    None => break,
                },
                Ok(Some(Ok(message))) => match (budget.admit(), message) {
                    (Admit::Close, _) => Incoming::Close(close_message(CLOSE_POLICY_VIOLATION, "too many frames")),
                    (Admit::Refuse, _) => Incoming::Refused,
                    (Admit::Yes, Message::Text(t)) => Incoming::Text(t),
                    (Admit::Yes, _) => Incoming::Binary,
                },
            };
            let last = matches!(frame, Incoming::Close(_));
            if frames_tx.send(frame).await.is_err() {
                break;
            }
            if last {
                drain(&mut stream).await;
                break;
            }
        }
    });

    let mut seen = Seen::starting_at(since);
    let mut alive = replay(&state, &side, &out, &mut seen).await && greet(&state, &side, &out).await;
    while alive {
        tokio::select! {
            _ = closed.cancelled() => break,
            incoming = frames.recv() => match incoming {
                Some(Incoming::Text(text)) => match serde_json::from_str::<Frame>(text.as_str()) {
                    Ok(frame) => handle(&state, &side, &out, frame),
                    Err(e) => send_error(&out, &ApiError::bad_request("bad_frame", format!("Unreadable frame: {e}."))),
                },
                Some(Incoming::Binary) => send_error(&out, &ApiError::bad_request("bad_frame", "Frames are JSON text.")),
                Some(Incoming::Refused) => send_error(&out, &rate_limited()),
                Some(Incoming::Close(close)) => {
                    out.outbox.send_message(close);
                    break;
                }
                None => break,
            },
            msg = bus.recv() => {
                alive = match msg {
                    Some(BusMessage::Event(e)) => deliver(&state, &side, &out, e, &mut seen).await,
                    // Events may have been missed (Redis came back, or this
                    // socket fell behind): the log has the lasting ones, and
                    // the queue is read afresh.
                    Some(BusMessage::Resync) => {
                        replay(&state, &side, &out, &mut seen).await && queue_update(&state, &side, &out).await
                    }
                    None => false,
                };
            }
        }
    }
    // Let the writer send what is queued (a closed session's last status and
    // its close frame), then stop it (and the reader, which may be draining).
    drop(out);
    if tokio::time::timeout(Duration::from_secs(5), &mut writer).await.is_err() {
        closed.cancel();
        let _ = writer.await;
    }
    // A reader draining after our close frame ends by itself within seconds.
    if tokio::time::timeout(Duration::from_secs(3), &mut reader).await.is_err() {
        reader.abort();
    }
    metrics::gauge!("palaver_open_sockets", "kind" => kind).decrement(1.0);
}

/// The last logged event a socket has been sent. Event ids are given out in
/// commit order and the bus delivers them in that order, so one high-water
/// mark says what is new: a replay from the log after it misses nothing.
struct Seen {
    high: i64,
}

impl Seen {
    fn starting_at(since: i64) -> Self {
        Self { high: since }
    }

    /// Records `seq`; false if it was delivered before.
    fn first_time(&mut self, seq: i64) -> bool {
        if seq <= self.high {
            return false;
        }
        self.high = seq;
        true
    }
}

/// Sends the log's events after the last one delivered that concern this
/// side, all of them (in batches).
async fn replay(state: &AppState, side: &Side, out: &Out, seen: &mut Seen) -> bool {
    loop {
        let events = match side {
            Side::Client { session_id } => state.store.support_events_since(Some(session_id), None, seen.high).await,
            Side::Agent { id, .. } => state.store.support_events_since(None, Some(id), seen.high).await,
        };
        let Ok(events) = events else { return true };
        for e in &events {
            if !out.outbox.room().await || (seen.first_time(e.seq) && !send_logged(state, side, out, e).await) {
                return false;
            }
        }
        if events.len() < crate::store::REPLAY_LIMIT as usize {
            return true;
        }
    }
}

/// A logged event as this side's frame; false when the socket should end.
async fn send_logged(state: &AppState, side: &Side, out: &Out, e: &SupportEventRecord) -> bool {
    match BusEvent::from_record(e) {
        Some(event) => frame_for(state, side, out, &event).await,
        None => true,
    }
}

async fn frame_for(state: &AppState, side: &Side, out: &Out, event: &BusEvent) -> bool {
    match (side, event) {
        (Side::Client { .. }, BusEvent::Message { message, seq, .. }) => {
            send(out, json!({ "type": "message", "message": message, "event_id": seq }))
        }
        (Side::Client { .. }, BusEvent::Delta { message_id, text, .. }) => {
            send(out, json!({ "type": "delta", "message_id": message_id, "text": text }))
        }
        (Side::Client { .. }, BusEvent::Status { session, seq, .. }) => client_status(out, session, Some(*seq)),
        (Side::Agent { .. }, BusEvent::Message { session_id, message, seq, .. }) => {
            send(out, json!({ "type": "message", "session_id": session_id, "message": message, "event_id": seq }))
        }
        (Side::Agent { .. }, BusEvent::Status { session, seq, .. }) => {
            send(out, json!({ "type": "session", "session": session, "event_id": seq }))
        }
        // Consoles see a reply once it is finished.
        (Side::Client { .. }, BusEvent::Reset { message_id, .. }) => {
            send(out, json!({ "type": "reset", "message_id": message_id }))
        }
        (Side::Agent { .. }, BusEvent::Delta { .. } | BusEvent::Reset { .. }) => true,
        (_, BusEvent::Queue) => queue_update(state, side, out).await,
        // The bus hands these to its subscribers as `BusMessage::Resync`.
        (_, BusEvent::Resync) => true,
    }
}

/// A visitor's status frame; a closed session's socket ends with it.
fn client_status(out: &Out, session: &SupportSessionView, seq: Option<i64>) -> bool {
    let ok = send_status(out, status_frame(session, seq), seq.is_some());
    if session.status == SupportStatus::Closed {
        let reason = Utf8Bytes::from_static("support session closed");
        out.outbox.send_message(Message::Close(Some(CloseFrame { code: 1000, reason })));
        return false;
    }
    ok
}

/// The visitor's `status` frame, from the session.
fn status_frame(session: &SupportSessionView, seq: Option<i64>) -> Value {
    json!({
        "type": "status",
        "status": session.status,
        "queue_position": session.queue_position,
        "estimated_wait_seconds": session.estimated_wait_seconds,
        "agent": session.assigned_agent,
        "event_id": seq,
    })
}

/// Delivers a live bus event that concerns this side, once. The bus loses
/// nothing without saying so (a lagging socket, a Redis reconnect or a
/// failed publish all end in a resync from the log), so a live event costs
/// no database read; gaps in the ids are other sessions' events.
async fn deliver(state: &AppState, side: &Side, out: &Out, e: Arc<BusEvent>, seen: &mut Seen) -> bool {
    let concerns_me = match (side, e.as_ref()) {
        (_, BusEvent::Queue) => true,
        (Side::Client { session_id }, e) => e.session_id() == Some(session_id.as_str()),
        (Side::Agent { .. }, BusEvent::Status { .. }) => true,
        (Side::Agent { id, .. }, BusEvent::Message { agent_id, .. }) => agent_id.as_deref() == Some(id.as_str()),
        (Side::Agent { .. }, BusEvent::Delta { .. } | BusEvent::Reset { .. } | BusEvent::Resync) => false,
    };
    if !concerns_me {
        return true;
    }
    if let Some(seq) = e.seq()
        && !seen.first_time(seq)
    {
        return true;
    }
    frame_for(state, side, out, &e).await
}

/// On connect: the client's current status, or the agent's queue snapshot.
async fn greet(state: &AppState, side: &Side, out: &Out) -> bool {
    match side {
        Side::Client { session_id } => match state.store.support_session(session_id).await {
            Ok(Some(s)) => {
                let Ok(payload) = state.desk.session_json(&s).await else { return true };
                client_status(out, &payload, None)
            }
            _ => false,
        },
        Side::Agent { .. } => queue_update(state, side, out).await,
    }
}

/// The queue changed: agents get a snapshot, a queued visitor their position.
async fn queue_update(state: &AppState, side: &Side, out: &Out) -> bool {
    match side {
        Side::Agent { .. } => match state.desk.shared_queue_json().await {
            Ok(items) => send(out, json!({ "type": "queue", "items": *items })),
            Err(_) => true,
        },
        // Only a waiting visitor has a place that can move.
        Side::Client { .. } if !out.last_status_was("queued") => true,
        Side::Client { session_id } => match state.store.support_session(session_id).await {
            Ok(Some(s)) if s.status == SupportStatus::Queued => {
                let Ok(payload) = state.desk.session_json(&s).await else { return true };
                send_status(out, status_frame(&payload, None), false)
            }
            _ => true,
        },
    }
}

/// Acts on a frame from the socket in its own task (an AI reply may take a
/// while); results reach the socket through the bus like everyone else's.
fn handle(state: &Arc<AppState>, side: &Side, out: &Out, frame: Frame) {
    let (state, side, out) = (state.clone(), side.clone(), out.clone());
    tokio::spawn(async move {
        let result = match (&side, frame) {
            (_, Frame::Ping) => {
                send(&out, json!({ "type": "pong" }));
                Ok(())
            }
            (Side::Client { session_id }, Frame::Message { content, .. }) => {
                client_message(&state, session_id, content).await
            }
            (Side::Client { session_id }, Frame::RequestHuman) => match state.store.support_session(session_id).await {
                Ok(Some(s)) => state.desk.handoff(&s).await.map(|_| ()).map_err(ApiError::from),
                Ok(None) => Err(ApiError::NotFound),
                Err(e) => Err(e.into()),
            },
            (Side::Agent { id, .. }, Frame::ClaimSession { session_id }) => {
                state.desk.claim(id, &session_id).await.map(|_| ()).map_err(ApiError::from)
            }
            (Side::Agent { id, .. }, Frame::Message { content, session_id: Some(session_id) }) => {
                match parse_content(&state, content) {
                    Ok(c) => state.desk.agent_send(id, &session_id, c).await.map(|_| ()).map_err(ApiError::from),
                    Err(e) => Err(e),
                }
            }
            (Side::Agent { id, .. }, Frame::ReleaseSession { session_id }) => {
                state.desk.release(id, &session_id).await.map(|_| ()).map_err(ApiError::from)
            }
            (Side::Agent { id, admin }, Frame::CloseSession { session_id }) => {
                state.desk.close(id, *admin, &session_id).await.map(|_| ()).map_err(ApiError::from)
            }
            _ => Err(ApiError::bad_request("bad_frame", "This frame is not for this socket.")),
        };
        if let Err(e) = result {
            send_error(&out, &e);
        }
    });
}

fn parse_content(state: &AppState, content: Value) -> Result<MessageContent, ApiError> {
    super::send::validate_content(state, content)
}

async fn client_message(state: &Arc<AppState>, session_id: &str, content: Value) -> Result<(), ApiError> {
    let content = parse_content(state, content)?;
    let s = state.store.support_session(session_id).await?.ok_or(ApiError::NotFound)?;
    state.desk.client_send(&s, content, None).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Seen;

    #[test]
    fn an_event_is_delivered_once_and_only_after_the_last_one() {
        let mut seen = Seen::starting_at(10);
        assert!(!seen.first_time(10), "since= is the last id the client saw");
        assert!(seen.first_time(12));
        assert!(!seen.first_time(11), "ids arrive in order: a lower one was delivered or never was");
        assert!(!seen.first_time(12));
        assert_eq!(seen.high, 12);
    }
}
