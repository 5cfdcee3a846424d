//! Server-sent events for replies: the SSE framing of `POST …/messages`
//! (with `Accept: text/event-stream`) and `POST /api/chat/stream`, resuming
//! with `Last-Event-ID`, and cancelling. Event ids are byte offsets into the
//! reply (`"0"` before any text, `"<n>:end"` on the last event), so a resume
//! gets exactly the text it missed, live or from the database.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures::{Stream, StreamExt, stream};
use serde_json::{Map, Value, json};

use super::{
    AppState,
    docs::LastEventId,
    error::{ApiError, ApiResult},
    extract::{AuthUser, UuidPath, owned_conversation},
    views::{ErrorBody, MessageView},
};
use crate::{
    chat::{ReplyEvent, Sent},
    domain::conversation::{MessageRole, MessageStatus},
    store::MessageRecord,
};

/// True when the client asked for an event stream.
pub fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("text/event-stream"))
}

/// The error a failed reply answers with: 504 for a timeout, else 502.
pub fn reply_failure(message: &MessageRecord, extra: Map<String, Value>) -> ApiError {
    let code = message.error_code.clone().unwrap_or_else(|| "provider_error".into());
    let detail = match code.as_str() {
        "provider_timeout" => "The AI provider did not answer in time.".to_owned(),
        "interrupted" => "The reply was interrupted because the server stopped.".to_owned(),
        _ => format!("The AI provider failed: {}.", message.error.as_deref().unwrap_or("unknown error")),
    };
    ApiError::ReplyFailed { code, detail, extra }
}

fn event(name: &str, id: String, data: Value) -> Event {
    Event::default().event(name).id(id).data(data.to_string())
}

/// The SSE events of a reply from byte `from` of its text's generation
/// `generation` (how often it had been taken over): deltas (after a `reset`,
/// the taken-over reply's text from its start), then `done` (or `error` for
/// a failed reply). Ids are the byte offset (`123`, `123:end`), with `@<n>`
/// once the text is the n-th generation's, so a resume names the text it
/// saw.
fn reply_events(
    state: Arc<AppState>,
    assistant: MessageRecord,
    from: usize,
    generation: i64,
) -> impl Stream<Item = Event> + Send {
    let message_id = assistant.id.clone();
    let mut generation = generation;
    let id = move |offset: String, generation: i64| {
        if generation == 0 { offset } else { format!("{offset}@{generation}") }
    };
    state.chat.follow(assistant, from).map(move |e| match e {
        ReplyEvent::Delta { text, offset } => {
            event("delta", id(offset.to_string(), generation), json!({ "message_id": message_id, "text": text }))
        }
        ReplyEvent::Reset => {
            generation += 1;
            event("reset", id("0:reset".to_owned(), generation), json!({ "message_id": message_id }))
        }
        ReplyEvent::Finished(m) => {
            let end = id(format!("{}:end", m.content.len()), generation);
            if m.status == MessageStatus::Failed {
                let e = reply_failure(&m, Map::new());
                event("error", end, json!({ "detail": e.detail(), "code": e.code() }))
            } else {
                event("done", end, json!(MessageView::from(m.as_ref())))
            }
        }
    })
}

/// How often a stream with nothing to send sends a keep-alive comment.
pub(super) fn keepalive_every(state: &AppState) -> Duration {
    Duration::from_secs(state.settings.server.sse_keepalive_secs)
}

fn sse(every: Duration, events: impl Stream<Item = Event> + Send + 'static) -> Response {
    let body = events.map(Ok::<_, Infallible>);
    let mut response = Sse::new(body).keep_alive(KeepAlive::new().interval(every)).into_response();
    // Proxies (nginx) must not buffer the stream.
    response.headers_mut().insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    response
}

/// `conversation` (optional) → `user_message` → `delta`… → `done` | `error`.
pub fn send_events(state: Arc<AppState>, sent: Sent, with_conversation: bool) -> Response {
    let mut head = Vec::new();
    if with_conversation {
        head.push(event("conversation", "0".into(), json!({ "id": sent.conversation_id })));
    }
    // The reply's id rides along, so a client that drops right away can
    // resume it without listing the messages.
    let mut user_message = json!(MessageView::from(&sent.user_message));
    user_message["assistant_message_id"] = json!(sent.assistant_message.id);
    head.push(event("user_message", "0".into(), user_message));
    sse(keepalive_every(&state), stream::iter(head).chain(reply_events(state, sent.assistant_message, 0, 0)))
}

/// The byte offset and the text's generation named by a `Last-Event-ID`
/// (`"123"`, `"123:end"`, `"123@1"`, `"0:reset@1"`).
fn resume_offset(headers: &HeaderMap) -> ApiResult<Option<(usize, i64)>> {
    let Some(raw) = headers.get("last-event-id") else { return Ok(None) };
    let text = raw.to_str().unwrap_or("").trim();
    let (offset, generation) = text.split_once('@').unwrap_or((text, "0"));
    let digits = offset.split(':').next().unwrap_or("");
    match (digits.parse::<usize>(), generation.parse::<i64>()) {
        (Ok(offset), Ok(generation)) if generation >= 0 => Ok(Some((offset, generation))),
        _ => Err(ApiError::invalid_field("invalid_event_id", "Last-Event-ID", "is not an event id of this stream")),
    }
}

/// Resume a reply's stream: the events after `Last-Event-ID`, then the live
/// rest; a finished reply replays whole.
#[utoipa::path(get, path = "/api/conversations/{id}/messages/{message_id}/stream", tag = "conversations",
    security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path), ("message_id" = uuid::Uuid, Path), LastEventId),
    responses((status = 200, content_type = "text/event-stream", description = "`delta`… → `done` | `error`; a `reset` (then the text again from its start) when another instance took the reply over"),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn resume(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    ids: UuidPath,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let message = assistant_message(&state, &auth, &ids).await?;
    let (from, seen) = resume_offset(&headers)?.unwrap_or((0, 0));
    let generation = state.store.reply_takeovers(&message.id).await?;
    if seen == generation {
        return Ok(sse(keepalive_every(&state), reply_events(state, message, from, generation)));
    }
    // The client saw a text that was since replaced: it starts over.
    let reset = event("reset", format!("0:reset@{generation}"), json!({ "message_id": message.id }));
    let every = keepalive_every(&state);
    Ok(sse(every, stream::once(async move { reset }).chain(reply_events(state, message, 0, generation))))
}

async fn assistant_message(state: &AppState, auth: &AuthUser, ids: &UuidPath) -> ApiResult<MessageRecord> {
    let conversation = owned_conversation(state, auth, &ids.0[0]).await?;
    match state.store.message(&conversation.id, &ids.0[1]).await? {
        Some(m) if m.role == MessageRole::Assistant => Ok(m),
        _ => Err(ApiError::NotFound),
    }
}

/// Stop a reply that is being generated; it is stored as `cancelled` with
/// the text it had. A finished reply answers 409.
#[utoipa::path(post, path = "/api/conversations/{id}/messages/{message_id}/cancel", tag = "conversations",
    security(("bearer" = [])), params(("id" = uuid::Uuid, Path), ("message_id" = uuid::Uuid, Path)),
    responses((status = 200, body = MessageView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn cancel(State(state): State<Arc<AppState>>, auth: AuthUser, ids: UuidPath) -> ApiResult<Json<MessageView>> {
    let message = assistant_message(&state, &auth, &ids).await?;
    if message.status != MessageStatus::Streaming || !state.chat.cancel(&message.id).await? {
        return Err(ApiError::conflict("not_streaming", "This reply is not being generated any more."));
    }
    let done =
        state.chat.finished(message).await.ok_or_else(|| ApiError::Internal(anyhow::anyhow!("the reply vanished")))?;
    Ok(Json(MessageView::from(done.as_ref())))
}
