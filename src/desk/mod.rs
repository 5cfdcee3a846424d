//! The support desk's actions, shared by its REST routes and its sockets:
//! each one changes the database, appends to the session's event log and
//! publishes on the bus. AI replies use the same detached, resumable reply
//! machinery as chats (a session's messages live in a conversation owned by
//! the built-in support account).

use std::sync::Arc;

pub mod bus;
pub mod views;

use bus::{BusEvent, SupportBus};
pub use views::{SupportMessageView, SupportSessionView};

use crate::{
    auth::{hash_token, random_token},
    domain::{
        conversation::{MessageContent, MessageRole, MessageStatus},
        support::{ClientInfo, HandoffPhrases, SupportStatus},
    },
    error::Error,
    state::AppState,
    store::{ConversationRecord, MessageRecord, NewMessage, SUPPORT_USER_ID, SupportSessionRecord},
};
use crate::{
    chat::{self as replies, ReplyEvent, SendRequest, StoreSend, Target},
    limits::{Limiter, SharedCounters},
};

pub struct SupportDesk {
    pub bus: SupportBus,
    pub phrases: HandoffPhrases,
    /// Session creations per client address.
    pub creations: Limiter,
    /// The queue as last read, and the bus's queue generation it was read at.
    pub queue_cache: tokio::sync::Mutex<Option<(u64, Arc<Vec<SupportSessionView>>)>>,
}

impl SupportDesk {
    pub fn new(bus: SupportBus, phrases: &[String], per_address: u32, shared: Option<Arc<SharedCounters>>) -> Self {
        let phrases = if phrases.iter().all(|p| p.trim().is_empty()) {
            HandoffPhrases::default()
        } else {
            HandoffPhrases::new(phrases)
        };
        let creations = Limiter::new("support-sessions", per_address, 10 * 60 * 1000, shared);
        Self { bus, phrases, creations, queue_cache: Default::default() }
    }
}

/// The JSON of a session as clients and agents see it.
pub async fn session_json(state: &AppState, s: &SupportSessionRecord) -> Result<SupportSessionView, Error> {
    let position = state.store.queue_position(s).await?;
    let recent_wait_ms = match position {
        Some(_) => state.store.recent_support_wait_ms().await?,
        None => None,
    };
    Ok(SupportSessionView::new(s, position, recent_wait_ms))
}

/// The waiting sessions, first come first, as JSON: two queries whatever
/// the queue's length.
pub async fn queue_json(state: &AppState) -> Result<Vec<SupportSessionView>, Error> {
    let queue = state.store.support_queue().await?;
    let recent_wait_ms = state.store.recent_support_wait_ms().await?;
    Ok(queue.iter().zip(1..).map(|(s, position)| SupportSessionView::new(s, Some(position), recent_wait_ms)).collect())
}

/// `queue_json` for the sockets: one read per queue change on this
/// instance, shared by all its agent consoles. (The bus bumps the generation
/// before it tells the sockets, so a snapshot of the current generation is
/// never older than the change a socket was told about. REST reads stay
/// fresh: with Redis, their own change may not have come round yet.)
pub async fn shared_queue_json(state: &AppState) -> Result<Arc<Vec<SupportSessionView>>, Error> {
    let generation = state.support.bus.queue_generation();
    let mut cached = state.support.queue_cache.lock().await;
    if let Some((at, items)) = cached.as_ref()
        && *at == generation
    {
        return Ok(items.clone());
    }
    let items = Arc::new(queue_json(state).await?);
    *cached = Some((generation, items.clone()));
    Ok(items)
}

pub fn message_json(session_id: &str, m: &MessageRecord) -> SupportMessageView {
    SupportMessageView::new(session_id, m)
}

/// What lasts of a session: its messages and its status changes.
enum Lasting {
    Message(SupportMessageView),
    Status(SupportSessionView),
}

/// Logs and publishes a lasting event of a session.
async fn record(state: &AppState, s: &SupportSessionRecord, what: Lasting) -> Result<(), Error> {
    let (kind, payload) = match &what {
        Lasting::Message(v) => ("message", serde_json::to_string(v)),
        Lasting::Status(v) => ("status", serde_json::to_string(v)),
    };
    let payload = payload.map_err(anyhow::Error::from)?;
    let seq = state.store.append_support_event(&s.id, kind, &payload, state.clock.now_ms()).await?;
    let (session_id, agent_id) = (s.id.clone(), s.assigned_agent.clone());
    let event = match what {
        Lasting::Message(message) => BusEvent::Message { session_id, seq, agent_id, message },
        Lasting::Status(session) => BusEvent::Status { session_id, seq, agent_id, session },
    };
    state.support.bus.publish(event);
    Ok(())
}

/// A status change: logged for the session, and the queue changed too.
async fn status_changed(state: &AppState, id: &str) -> Result<SupportSessionRecord, Error> {
    let s = state.store.support_session(id).await?.ok_or(Error::NotFound)?;
    let session = session_json(state, &s).await?;
    record(state, &s, Lasting::Status(session)).await?;
    queue_changed(state).await;
    Ok(s)
}

/// Tells every instance that queue positions and the agents' queue view changed.
pub async fn queue_changed(state: &AppState) {
    state.support.bus.publish(BusEvent::Queue);
    metrics::gauge!("palaver_support_queue_length")
        .set(state.store.support_queue().await.map_or(0, |q| q.len()) as f64);
}

/// A new session in AI mode; answers it and its client token.
pub async fn create_session(state: &AppState, client: ClientInfo) -> Result<(SupportSessionRecord, String), Error> {
    let now = state.clock.now_ms();
    let conversation = ConversationRecord {
        id: state.ids.random(),
        user_id: SUPPORT_USER_ID.to_owned(),
        title: Some(format!("Support: {}", client.name)),
        system_prompt: Some(state.settings.support.support_system_prompt.clone()),
        model: None,
        message_count: 0,
        last_message_at: None,
        created_at: now,
        updated_at: now,
    };
    let session = SupportSessionRecord {
        id: state.ids.random(),
        conversation_id: conversation.id.clone(),
        client_name: client.name,
        client_email: client.email,
        client_phone: client.phone,
        status: SupportStatus::Ai,
        queued_at: None,
        assigned_agent: None,
        assigned_agent_name: None,
        created_at: now,
        updated_at: now,
    };
    let token = random_token("pst_");
    state.store.create_support_session(&session, &conversation, &hash_token(&token)).await?;
    Ok((session, token))
}

/// The session a client token opens (and only that one).
pub async fn session_for_client(state: &AppState, id: &str, token: &str) -> Result<SupportSessionRecord, Error> {
    let s = state.store.support_session_by_token(&hash_token(token)).await?.ok_or(Error::Unauthorized)?;
    if s.id != id {
        return Err(Error::NotFound);
    }
    Ok(s)
}

/// What a client's message led to.
pub struct ClientSend {
    pub message: MessageRecord,
    /// The AI's reply, while the session is in AI mode.
    pub reply: Option<MessageRecord>,
}

/// Stores a client's message. In AI mode the AI answers (streamed to the
/// client's sockets as it is written), unless the words ask for a human,
/// which queues the session instead. While queued or with a human, the AI
/// stays silent.
pub async fn client_send(
    state: &Arc<AppState>,
    s: &SupportSessionRecord,
    content: MessageContent,
    idempotency_key: Option<String>,
) -> Result<ClientSend, Error> {
    if s.status == SupportStatus::Closed {
        return Err(Error::conflict("session_closed", "This support session is closed."));
    }
    let key = idempotency_key.map(|k| format!("support:{}:{k}", s.id));
    let wants_human = s.status == SupportStatus::Ai && state.support.phrases.asks_for_human(content.as_str());
    if s.status != SupportStatus::Ai || wants_human {
        // Nobody answers this one: stored (idempotently) like any send, without a reply.
        let target = Target::Existing(support_conversation(state, s).await?);
        let stored = replies::store_send(
            state,
            StoreSend {
                owner: SUPPORT_USER_ID,
                target: &target,
                content: content.as_str(),
                request_hash: replies::send_hash(&s.conversation_id, "", content.as_str()),
                idempotency_key: key.as_deref(),
                answer_with: None,
                requested_model: None,
            },
        )
        .await?;
        if !stored.fresh {
            let reply = match stored.assistant {
                Some(m) if m.status == MessageStatus::Streaming => {
                    replies::finished(state.clone(), m).await.map(|m| m.as_ref().clone())
                }
                other => other,
            };
            return Ok(ClientSend { message: stored.user_message, reply });
        }
        record(state, s, Lasting::Message(message_json(&s.id, &stored.user_message))).await?;
        if wants_human {
            handoff(state, s).await?;
        }
        return Ok(ClientSend { message: stored.user_message, reply: None });
    }
    let conversation = support_conversation(state, s).await?;
    let sent = replies::send(
        state,
        SendRequest {
            user_id: SUPPORT_USER_ID.to_owned(),
            target: Target::Existing(conversation),
            content,
            model: None,
            idempotency_key: key,
        },
    )
    .await?;
    if !sent.fresh {
        // A retry: the original request logged both messages.
        let reply = replies::finished(state.clone(), sent.assistant_message).await.map(|m| m.as_ref().clone());
        return Ok(ClientSend { message: sent.user_message, reply });
    }
    record(state, s, Lasting::Message(message_json(&s.id, &sent.user_message))).await?;
    // Detached, so the reply is streamed and logged even if this request's
    // client goes away.
    let forwarding = tokio::spawn(forward_reply(state.clone(), s.clone(), sent.assistant_message));
    let reply = forwarding.await.ok().flatten();
    Ok(ClientSend { message: sent.user_message, reply })
}

/// Streams an AI reply's deltas to the session's sockets, then logs the
/// final message. Answers the final message.
async fn forward_reply(
    state: Arc<AppState>,
    s: SupportSessionRecord,
    assistant: MessageRecord,
) -> Option<MessageRecord> {
    use futures::StreamExt;
    let message_id = assistant.id.clone();
    let events = replies::follow(state.clone(), assistant, 0);
    tokio::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            ReplyEvent::Delta { text, .. } => {
                let event = BusEvent::Delta { session_id: s.id.clone(), message_id: message_id.clone(), text };
                state.support.bus.publish(event);
            }
            ReplyEvent::Finished(m) => {
                if let Err(e) = record(&state, &s, Lasting::Message(message_json(&s.id, &m))).await {
                    tracing::warn!(error = e.to_string().as_str(), "could not log a support reply");
                }
                return Some(m.as_ref().clone());
            }
        }
    }
    None
}

async fn support_conversation(state: &AppState, s: &SupportSessionRecord) -> Result<ConversationRecord, Error> {
    state
        .store
        .conversation(&s.conversation_id, SUPPORT_USER_ID)
        .await?
        .ok_or_else(|| Error::Internal(anyhow::anyhow!("support conversation missing")))
}

async fn insert(
    state: &AppState,
    s: &SupportSessionRecord,
    id: &str,
    role: MessageRole,
    content: &str,
) -> Result<MessageRecord, Error> {
    let message = NewMessage {
        id,
        conversation_id: &s.conversation_id,
        role,
        content,
        status: MessageStatus::Complete,
        model: None,
        now: state.clock.now_ms(),
    };
    Ok(state.store.insert_message(message).await?)
}

/// `ai` → `queued`. Asking again while queued or with a human changes nothing.
pub async fn handoff(state: &AppState, s: &SupportSessionRecord) -> Result<SupportSessionRecord, Error> {
    match s.status {
        SupportStatus::Closed => Err(Error::conflict("session_closed", "This support session is closed.")),
        SupportStatus::Queued | SupportStatus::Human => Ok(s.clone()),
        SupportStatus::Ai => {
            if state.store.enqueue_support_session(&s.id, state.clock.now_ms()).await? {
                status_changed(state, &s.id).await
            } else {
                Ok(state.store.support_session(&s.id).await?.ok_or(Error::NotFound)?)
            }
        }
    }
}

/// An agent takes a queued session; 409 unless it is queued (exactly one
/// of concurrent claimers wins).
pub async fn claim(state: &AppState, agent_id: &str, id: &str) -> Result<SupportSessionRecord, Error> {
    state.store.support_session(id).await?.ok_or(Error::NotFound)?;
    if !state.store.claim_support_session(id, agent_id, state.clock.now_ms()).await? {
        return Err(Error::conflict("not_queued", "This session is not waiting in the queue (already claimed?)."));
    }
    status_changed(state, id).await
}

/// The session, if `agent_id` holds it; 403 otherwise (404 if none).
pub async fn held_by(state: &AppState, agent_id: &str, id: &str) -> Result<SupportSessionRecord, Error> {
    let s = state.store.support_session(id).await?.ok_or(Error::NotFound)?;
    if s.status != SupportStatus::Human || s.assigned_agent.as_deref() != Some(agent_id) {
        return Err(Error::forbidden("not_assigned", "Only the agent this session is assigned to may do that."));
    }
    Ok(s)
}

pub async fn agent_send(
    state: &AppState,
    agent_id: &str,
    id: &str,
    content: MessageContent,
) -> Result<MessageRecord, Error> {
    let s = held_by(state, agent_id, id).await?;
    let message = insert(state, &s, &state.ids.ordered(), MessageRole::Agent, content.as_str()).await?;
    record(state, &s, Lasting::Message(message_json(&s.id, &message))).await?;
    Ok(message)
}

/// Back to the head of the queue.
pub async fn release(state: &AppState, agent_id: &str, id: &str) -> Result<SupportSessionRecord, Error> {
    held_by(state, agent_id, id).await?;
    if !state.store.release_support_session(id, agent_id, state.clock.now_ms()).await? {
        return Err(Error::conflict("not_assigned", "The session changed meanwhile."));
    }
    status_changed(state, id).await
}

/// Closes a session (its agent, or an admin for any open session).
pub async fn close(state: &AppState, agent_id: &str, is_admin: bool, id: &str) -> Result<SupportSessionRecord, Error> {
    let s = state.store.support_session(id).await?.ok_or(Error::NotFound)?;
    if !is_admin {
        held_by(state, agent_id, id).await?;
    }
    if s.status == SupportStatus::Closed {
        return Err(Error::conflict("session_closed", "This support session is already closed."));
    }
    state.store.close_support_session(id, state.clock.now_ms()).await?;
    status_changed(state, id).await
}
