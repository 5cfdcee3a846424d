//! The support desk's actions, shared by its REST routes and its sockets:
//! each one changes the database, appends to the session's event log and
//! publishes on the bus. AI replies use the same detached, resumable reply
//! machinery as chats (a session's messages live in a conversation owned by
//! the built-in support account).

use std::sync::Arc;

mod append;
pub mod bus;
pub mod events;
pub mod order;
pub mod views;

use bus::{BusEvent, SupportBus};
pub use views::{SupportMessageView, SupportSessionView};

use crate::{
    auth::{hash_token, random_token},
    clock::Clock,
    config::SupportSettings,
    domain::{
        conversation::{MessageContent, MessageRole, MessageStatus},
        support::{ClientInfo, HandoffPhrases, SupportStatus},
    },
    error::Error,
    ids::Ids,
    store::Store,
    store::{ConversationRecord, MessageRecord, NewMessage, NewSupportEvent, SUPPORT_USER_ID, SupportSessionRecord},
};
use crate::{
    chat::{self, Chat, ReplyEvent, SendRequest, StoreSend, Target},
    limits::{Limiter, SharedCounters},
};

/// The desk's handle: the reply engine its AI answers with, storage, time,
/// ids, its bus and its rules.
pub struct Desk {
    pub chat: Arc<Chat>,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub ids: Arc<dyn Ids>,
    pub bus: SupportBus,
    /// What the AI is told at the start of every session.
    pub system_prompt: String,
    pub phrases: HandoffPhrases,
    /// Session creations per client address.
    pub creations: Limiter,
    /// The queue as last read, and the bus's queue generation it was read at.
    pub queue_cache: tokio::sync::Mutex<Option<(u64, Arc<Vec<SupportSessionView>>)>>,
    /// Writes the event log, many events to a commit.
    appender: append::Appender,
}

pub fn message_json(session_id: &str, m: &MessageRecord) -> SupportMessageView {
    SupportMessageView::new(session_id, m)
}

/// What lasts of a session: its messages and its status changes.
enum Lasting {
    Message(SupportMessageView),
    Status(SupportSessionView),
}

/// What a client's message led to.
pub struct ClientSend {
    pub message: MessageRecord,
    /// The AI's reply, while the session is in AI mode.
    pub reply: Option<MessageRecord>,
}

impl Desk {
    pub fn new(
        chat: Arc<Chat>,
        bus: SupportBus,
        settings: &SupportSettings,
        shared: Option<Arc<SharedCounters>>,
    ) -> Self {
        let phrases = &settings.support_handoff_phrases;
        let phrases = if phrases.iter().all(|p| p.trim().is_empty()) {
            HandoffPhrases::default()
        } else {
            HandoffPhrases::new(phrases)
        };
        let creations = Limiter::new("support-sessions", settings.support_sessions_per_ip, 10 * 60 * 1000, shared);
        Self {
            appender: append::Appender::start(chat.store.clone()),
            store: chat.store.clone(),
            clock: chat.clock.clone(),
            ids: chat.ids.clone(),
            chat,
            bus,
            system_prompt: settings.support_system_prompt.clone(),
            phrases,
            creations,
            queue_cache: Default::default(),
        }
    }

    /// The JSON of a session as clients and agents see it.
    pub async fn session_json(&self, s: &SupportSessionRecord) -> Result<SupportSessionView, Error> {
        let position = self.store.queue_position(s).await?;
        let recent_wait_ms = match position {
            Some(_) => self.store.recent_support_wait_ms().await?,
            None => None,
        };
        Ok(SupportSessionView::new(s, position, recent_wait_ms))
    }

    /// The waiting sessions, first come first, as JSON: two queries whatever
    /// the queue's length.
    pub async fn queue_json(&self) -> Result<Vec<SupportSessionView>, Error> {
        let queue = self.store.support_queue().await?;
        let recent_wait_ms = self.store.recent_support_wait_ms().await?;
        Ok(queue
            .iter()
            .zip(1..)
            .map(|(s, position)| SupportSessionView::new(s, Some(position), recent_wait_ms))
            .collect())
    }

    /// `queue_json` for the sockets: one read per queue change on this
    /// instance, shared by all its agent consoles. (The bus bumps the generation
    /// before it tells the sockets, so a snapshot of the current generation is
    /// never older than the change a socket was told about. REST reads stay
    /// fresh: with Redis, their own change may not have come round yet.)
    pub async fn shared_queue_json(&self) -> Result<Arc<Vec<SupportSessionView>>, Error> {
        let generation = self.bus.queue_generation();
        let mut cached = self.queue_cache.lock().await;
        if let Some((at, items)) = cached.as_ref()
            && *at == generation
        {
            return Ok(items.clone());
        }
        let items = Arc::new(self.queue_json().await?);
        *cached = Some((generation, items.clone()));
        Ok(items)
    }

    /// Logs and publishes a lasting event of a session.
    async fn record(&self, s: &SupportSessionRecord, what: Lasting) -> Result<(), Error> {
        let (kind, payload) = match &what {
            Lasting::Message(v) => ("message", serde_json::to_string(v)),
            Lasting::Status(v) => ("status", serde_json::to_string(v)),
        };
        let payload = payload.map_err(anyhow::Error::from)?;
        let event = NewSupportEvent {
            session_id: s.id.clone(),
            agent_id: s.assigned_agent.clone(),
            kind,
            payload,
            created_at: self.clock.now_ms(),
        };
        let seq = self.appender.append(event).await?;
        let (session_id, agent_id) = (s.id.clone(), s.assigned_agent.clone());
        let event = match what {
            Lasting::Message(message) => BusEvent::Message { session_id, seq, agent_id, message },
            Lasting::Status(session) => BusEvent::Status { session_id, seq, agent_id, session },
        };
        self.bus.publish(event);
        Ok(())
    }

    /// A status change: logged for the session, and the queue changed too.
    async fn status_changed(&self, id: &str) -> Result<SupportSessionRecord, Error> {
        let s = self.store.support_session(id).await?.ok_or(Error::NotFound)?;
        let session = self.session_json(&s).await?;
        self.record(&s, Lasting::Status(session)).await?;
        self.queue_changed().await;
        Ok(s)
    }

    /// Tells every instance that queue positions and the agents' queue view changed.
    pub async fn queue_changed(&self) {
        self.bus.publish(BusEvent::Queue);
        metrics::gauge!("palaver_support_queue_length")
            .set(self.store.support_queue().await.map_or(0, |q| q.len()) as f64);
    }

    /// A new session in AI mode; answers it and its client token.
    pub async fn create_session(&self, client: ClientInfo) -> Result<(SupportSessionRecord, String), Error> {
        let now = self.clock.now_ms();
        let conversation = ConversationRecord {
            id: self.ids.random(),
            user_id: SUPPORT_USER_ID.to_owned(),
            title: Some(format!("Support: {}", client.name)),
            system_prompt: Some(self.system_prompt.clone()),
            model: None,
            message_count: 0,
            last_message_at: None,
            created_at: now,
            updated_at: now,
        };
        let session = SupportSessionRecord {
            id: self.ids.random(),
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
        self.store.create_support_session(&session, &conversation, &hash_token(&token)).await?;
        Ok((session, token))
    }

    /// The session a client token opens (and only that one).
    pub async fn session_for_client(&self, id: &str, token: &str) -> Result<SupportSessionRecord, Error> {
        let s = self.store.support_session_by_token(&hash_token(token)).await?.ok_or(Error::Unauthorized)?;
        if s.id != id {
            return Err(Error::NotFound);
        }
        Ok(s)
    }

    /// Stores a client's message. In AI mode the AI answers (streamed to the
    /// client's sockets as it is written), unless the words ask for a human,
    /// which queues the session instead. While queued or with a human, the AI
    /// stays silent.
    pub async fn client_send(
        self: &Arc<Self>,
        s: &SupportSessionRecord,
        content: MessageContent,
        idempotency_key: Option<String>,
    ) -> Result<ClientSend, Error> {
        if s.status == SupportStatus::Closed {
            return Err(Error::conflict("session_closed", "This support session is closed."));
        }
        let key = idempotency_key.map(|k| format!("support:{}:{k}", s.id));
        let wants_human = s.status == SupportStatus::Ai && self.phrases.asks_for_human(content.as_str());
        if s.status != SupportStatus::Ai || wants_human {
            // Nobody answers this one: stored (idempotently) like any send, without a reply.
            let target = Target::Existing(self.support_conversation(s).await?);
            let stored = self
                .chat
                .store_send(StoreSend {
                    owner: SUPPORT_USER_ID,
                    target: &target,
                    content: content.as_str(),
                    request_hash: chat::send_hash(&s.conversation_id, "", content.as_str()),
                    idempotency_key: key.as_deref(),
                    answer_with: None,
                    requested_model: None,
                })
                .await?;
            if !stored.fresh {
                let reply = match stored.assistant {
                    Some(m) if m.status == MessageStatus::Streaming => {
                        self.chat.finished(m).await.map(|m| m.as_ref().clone())
                    }
                    other => other,
                };
                return Ok(ClientSend { message: stored.user_message, reply });
            }
            self.record(s, Lasting::Message(message_json(&s.id, &stored.user_message))).await?;
            if wants_human {
                self.handoff(s).await?;
            }
            return Ok(ClientSend { message: stored.user_message, reply: None });
        }
        let conversation = self.support_conversation(s).await?;
        let sent = self
            .chat
            .send(SendRequest {
                payer: crate::quota::Payer { user_id: SUPPORT_USER_ID.to_owned(), ..Default::default() },
                target: Target::Existing(conversation),
                content,
                model: None,
                idempotency_key: key,
            })
            .await?;
        if !sent.fresh {
            // A retry: the original request logged both messages.
            let reply = self.chat.finished(sent.assistant_message).await.map(|m| m.as_ref().clone());
            return Ok(ClientSend { message: sent.user_message, reply });
        }
        self.record(s, Lasting::Message(message_json(&s.id, &sent.user_message))).await?;
        // Detached, so the reply is streamed and logged even if this request's
        // client goes away.
        let forwarding = tokio::spawn(self.clone().forward_reply(s.clone(), sent.assistant_message));
        let reply = forwarding.await.ok().flatten();
        Ok(ClientSend { message: sent.user_message, reply })
    }

    /// A reply of a session taken over from a dead instance (and now
    /// generated here): the visitor is told it starts again, then gets it
    /// like any other, and its final message is logged.
    pub async fn forward_taken_over(self: Arc<Self>, reply: MessageRecord) -> Result<(), Error> {
        let Some(s) = self.store.support_session_by_conversation(&reply.conversation_id).await? else { return Ok(()) };
        self.bus.publish(BusEvent::Reset { session_id: s.id.clone(), message_id: reply.id.clone() });
        tokio::spawn(self.forward_reply(s, reply));
        Ok(())
    }

    /// Streams an AI reply's deltas to the session's sockets, then logs the
    /// final message. Answers the final message.
    async fn forward_reply(
        self: Arc<Self>,
        s: SupportSessionRecord,
        assistant: MessageRecord,
    ) -> Option<MessageRecord> {
        use futures::StreamExt;
        let message_id = assistant.id.clone();
        let events = self.chat.follow(assistant, 0);
        tokio::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                ReplyEvent::Delta { text, .. } => {
                    let event = BusEvent::Delta { session_id: s.id.clone(), message_id: message_id.clone(), text };
                    self.bus.publish(event);
                }
                ReplyEvent::Reset => {
                    self.bus.publish(BusEvent::Reset { session_id: s.id.clone(), message_id: message_id.clone() });
                }
                ReplyEvent::Finished(m) => {
                    if let Err(e) = self.record(&s, Lasting::Message(message_json(&s.id, &m))).await {
                        tracing::warn!(error = e.to_string().as_str(), "could not log a support reply");
                    }
                    return Some(m.as_ref().clone());
                }
            }
        }
        None
    }

    async fn support_conversation(&self, s: &SupportSessionRecord) -> Result<ConversationRecord, Error> {
        self.store
            .conversation(&s.conversation_id, SUPPORT_USER_ID)
            .await?
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("support conversation missing")))
    }

    async fn insert(
        &self,
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
            now: self.clock.now_ms(),
        };
        Ok(self.store.insert_message(message).await?)
    }

    /// `ai` → `queued`. Asking again while queued or with a human changes nothing.
    pub async fn handoff(&self, s: &SupportSessionRecord) -> Result<SupportSessionRecord, Error> {
        match s.status {
            SupportStatus::Closed => Err(Error::conflict("session_closed", "This support session is closed.")),
            SupportStatus::Queued | SupportStatus::Human => Ok(s.clone()),
            SupportStatus::Ai => {
                if self.store.enqueue_support_session(&s.id, self.clock.now_ms()).await? {
                    self.status_changed(&s.id).await
                } else {
                    Ok(self.store.support_session(&s.id).await?.ok_or(Error::NotFound)?)
                }
            }
        }
    }

    /// An agent takes a queued session; 409 unless it is queued (exactly one
    /// of concurrent claimers wins).
    pub async fn claim(&self, agent_id: &str, id: &str) -> Result<SupportSessionRecord, Error> {
        self.store.support_session(id).await?.ok_or(Error::NotFound)?;
        if !self.store.claim_support_session(id, agent_id, self.clock.now_ms()).await? {
            return Err(Error::conflict("not_queued", "This session is not waiting in the queue (already claimed?)."));
        }
        self.status_changed(id).await
    }

    /// The session, if `agent_id` holds it; 403 otherwise (404 if none).
    pub async fn held_by(&self, agent_id: &str, id: &str) -> Result<SupportSessionRecord, Error> {
        let s = self.store.support_session(id).await?.ok_or(Error::NotFound)?;
        if s.status != SupportStatus::Human || s.assigned_agent.as_deref() != Some(agent_id) {
            return Err(Error::forbidden("not_assigned", "Only the agent this session is assigned to may do that."));
        }
        Ok(s)
    }

    pub async fn agent_send(&self, agent_id: &str, id: &str, content: MessageContent) -> Result<MessageRecord, Error> {
        let s = self.held_by(agent_id, id).await?;
        let message = self.insert(&s, &self.ids.ordered(), MessageRole::Agent, content.as_str()).await?;
        self.record(&s, Lasting::Message(message_json(&s.id, &message))).await?;
        Ok(message)
    }

    /// Back to the head of the queue.
    pub async fn release(&self, agent_id: &str, id: &str) -> Result<SupportSessionRecord, Error> {
        self.held_by(agent_id, id).await?;
        if !self.store.release_support_session(id, agent_id, self.clock.now_ms()).await? {
            return Err(Error::conflict("not_assigned", "The session changed meanwhile."));
        }
        self.status_changed(id).await
    }

    /// Closes a session (its agent, or an admin for any open session).
    pub async fn close(&self, agent_id: &str, is_admin: bool, id: &str) -> Result<SupportSessionRecord, Error> {
        let s = self.store.support_session(id).await?.ok_or(Error::NotFound)?;
        if !is_admin {
            self.held_by(agent_id, id).await?;
        }
        if s.status == SupportStatus::Closed {
            return Err(Error::conflict("session_closed", "This support session is already closed."));
        }
        self.store.close_support_session(id, self.clock.now_ms()).await?;
        self.status_changed(id).await
    }
}
