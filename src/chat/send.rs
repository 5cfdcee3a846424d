//! Sending a message: the one idempotent write that stores it (with its
//! reply's placeholder) and the context a reply to it sees.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::Chat;
use crate::{
    domain::{
        context::{ChatMessage, ChatRole, fit_history, message_tokens},
        conversation::{MessageContent, MessageRole, MessageStatus, ModelId, Title},
    },
    error::Error,
    store::{ConversationRecord, Exchange, ExchangeOutcome, IdempotentSend, MessageRecord, NewMessage, StoreError},
};

/// How far back the context builder reads before the budget trims it.
const HISTORY_SCAN: i64 = 500;
/// Tokens kept free in the context window for the reply.
const REPLY_RESERVE_TOKENS: usize = 1024;

/// Where a message goes.
pub enum Target {
    Existing(ConversationRecord),
    /// `/api/chat` without a conversation: one is created.
    New,
}

pub struct SendRequest {
    /// Who sends (and pays, with their limits).
    pub payer: crate::quota::Payer,
    pub target: Target,
    pub content: MessageContent,
    pub model: Option<ModelId>,
    /// `Idempotency-Key` header or WebSocket `request_id`, with its scope.
    pub idempotency_key: Option<String>,
}

/// The stored user message and the assistant message (streaming or done).
#[derive(Debug, Clone)]
pub struct Sent {
    pub conversation_id: String,
    /// False for a retry that found the original request's messages.
    pub fresh: bool,
    pub user_message: MessageRecord,
    pub assistant_message: MessageRecord,
    /// The sender's limits as the answer tells them.
    pub limits: crate::quota::LimitState,
}

/// One message to store, with or without a reply to generate.
pub struct StoreSend<'a> {
    /// Who owns the conversation (and the idempotency key).
    pub owner: &'a str,
    pub target: &'a Target,
    pub content: &'a str,
    /// What a retry with the same key must repeat (see `send_hash`).
    pub request_hash: String,
    pub idempotency_key: Option<&'a str>,
    /// The model that will answer: a placeholder is stored for its reply.
    pub answer_with: Option<&'a ModelId>,
    /// The model the client named, which a new conversation keeps.
    pub requested_model: Option<&'a ModelId>,
}

/// What `store_send` stored, or found stored by the original request.
pub struct Stored {
    /// False for a retry that found the original request's messages.
    pub fresh: bool,
    pub conversation: ConversationRecord,
    pub user_message: MessageRecord,
    pub assistant: Option<MessageRecord>,
}

impl Chat {
    /// The model that answers a send: the one asked for, else the
    /// conversation's, else the default (a model no longer configured falls
    /// back to the default too).
    pub fn answering_model(&self, requested: Option<&ModelId>, target: &Target) -> ModelId {
        let chosen = requested.cloned().or_else(|| match target {
            Target::Existing(c) => c.model.as_deref().and_then(|m| ModelId::parse(m).ok()),
            Target::New => None,
        });
        match chosen {
            Some(m) if self.providers.validate_model(&m.to_string()).is_ok() => m,
            _ => self.providers.default_model().clone(),
        }
    }

    /// Stores the user message and the reply's placeholder (on disk before this
    /// returns), starts the reply and returns both messages. A retry with the
    /// same idempotency key returns the original messages and starts nothing.
    pub async fn send(self: &Arc<Self>, req: SendRequest) -> Result<Sent, Error> {
        let model = self.answering_model(req.model.as_ref(), &req.target);
        let (admission, max_tokens) = self.admit_send(&req, &model).await?;
        let stored = self
            .store_send(StoreSend {
                owner: &req.payer.user_id,
                target: &req.target,
                content: req.content.as_str(),
                request_hash: request_hash(&req),
                idempotency_key: req.idempotency_key.as_deref(),
                answer_with: Some(&model),
                requested_model: req.model.as_ref(),
            })
            .await?;
        let assistant_message =
            stored.assistant.ok_or_else(|| anyhow::anyhow!("a send stored no reply placeholder"))?;
        if stored.fresh {
            self.start_generation(
                (&assistant_message, 0),
                &req.payer.user_id,
                model,
                stored.conversation,
                stored.user_message.seq,
                (admission.reservation, max_tokens),
            );
        }
        Ok(Sent {
            conversation_id: assistant_message.conversation_id.clone(),
            fresh: stored.fresh,
            user_message: stored.user_message,
            assistant_message,
            limits: admission.state,
        })
    }

    /// Admits a send against the sender's limits. With a budget its worst
    /// case is reserved — the context it will send (history read now, plus
    /// the new message) and the configured reserve, which then caps the answer.
    async fn admit_send(
        &self,
        req: &SendRequest,
        model: &ModelId,
    ) -> Result<(crate::quota::Admission, Option<u32>), Error> {
        // A retry of a stored send starts nothing: it is neither limited nor charged.
        if let Some(key) = &req.idempotency_key
            && self.store.idempotency_key_held(&req.payer.user_id, key, self.clock.now_ms()).await?
        {
            return Ok((self.quota.nothing_to_admit(), None));
        }
        if !self.quota.budgeted(&req.payer) {
            return Ok((self.quota.admit(&req.payer, 0).await?, None));
        }
        let cap = self.quota.default_reserve();
        let history = match &req.target {
            Target::Existing(c) => self.build_context(c, model, i64::MAX).await?,
            Target::New => Vec::new(),
        };
        let prompt: usize = history
            .iter()
            .chain(std::iter::once(&ChatMessage::new(ChatRole::User, req.content.as_str().to_owned())))
            .map(message_tokens)
            .sum();
        let admission = self.quota.admit(&req.payer, prompt as i64 + i64::from(cap)).await?;
        Ok((admission, Some(cap)))
    }

    /// The one idempotent write of every send (chat, socket, support): the key
    /// is claimed in the transaction that stores the messages, so a retry finds
    /// the original's messages at once — or, when their conversation was deleted
    /// since, a 404 — and never waits for a request that no longer runs.
    pub async fn store_send(&self, send: StoreSend<'_>) -> Result<Stored, Error> {
        let now = self.clock.now_ms();
        let conversation = match send.target {
            Target::Existing(c) => c.clone(),
            Target::New => ConversationRecord {
                id: self.ids.random(),
                user_id: send.owner.to_owned(),
                title: None,
                system_prompt: None,
                model: send.requested_model.map(ToString::to_string),
                message_count: 0,
                last_message_at: None,
                created_at: now,
                updated_at: now,
            },
        };
        let ids = IdempotentSend {
            request_hash: send.request_hash,
            conversation_id: conversation.id.clone(),
            user_message_id: self.ids.ordered(),
            assistant_message_id: send.answer_with.map(|_| self.ids.ordered()).unwrap_or_default(),
        };
        let title = conversation.title.is_none().then(|| Title::derive_from(send.content).into_inner());
        let model_name = send.answer_with.map(ToString::to_string);
        let exchange = Exchange {
            idempotency: send.idempotency_key.map(|key| (send.owner, key, &ids)),
            new_conversation: matches!(send.target, Target::New).then_some(&conversation),
            user_message: NewMessage {
                id: &ids.user_message_id,
                conversation_id: &conversation.id,
                role: MessageRole::User,
                content: send.content,
                status: MessageStatus::Complete,
                model: None,
                now,
            },
            assistant: send.answer_with.map(|_| NewMessage {
                id: &ids.assistant_message_id,
                conversation_id: &conversation.id,
                role: MessageRole::Assistant,
                content: "",
                status: MessageStatus::Streaming,
                model: model_name.as_deref(),
                now,
            }),
            title_if_none: title.as_deref(),
        };
        match self.store.insert_exchange(exchange).await? {
            ExchangeOutcome::Stored { user_message, assistant } => {
                Ok(Stored { fresh: true, conversation, user_message: *user_message, assistant: assistant.map(|a| *a) })
            }
            ExchangeOutcome::NoConversation => Err(Error::NotFound),
            ExchangeOutcome::Existing(original) => {
                if original.request_hash != ids.request_hash {
                    return Err(Error::invalid_field(
                        "idempotency_key_reused",
                        "Idempotency-Key",
                        "was already used for a different request",
                    ));
                }
                let user_message = self.store.message(&original.conversation_id, &original.user_message_id).await?;
                let assistant = match original.assistant_message_id.as_str() {
                    "" => None,
                    id => self.store.message(&original.conversation_id, id).await?,
                };
                // The key outlived its messages: their conversation was deleted.
                let Some(user_message) = user_message else { return Err(Error::NotFound) };
                if !original.assistant_message_id.is_empty() && assistant.is_none() {
                    return Err(Error::NotFound);
                }
                Ok(Stored { fresh: false, conversation, user_message, assistant })
            }
        }
    }

    /// The system prompt and as much history up to the message being answered
    /// (`upto_seq`) as fits the model's window; messages stored after it, by
    /// sends running beside this one, are not its history. Failed, cancelled,
    /// unfinished and empty assistant messages are not shown to the model.
    pub(super) async fn build_context(
        &self,
        conversation: &ConversationRecord,
        model: &ModelId,
        upto_seq: i64,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        // What is kept of the history, then what was stored since.
        let (mut turns, known) = self.history.get(&conversation.id, upto_seq);
        let fresh = self.store.messages_between(&conversation.id, known, upto_seq, HISTORY_SCAN).await?;
        if fresh.len() as i64 == HISTORY_SCAN {
            turns.clear();
        }
        // The tail can be kept up to the first message still being written.
        let mut complete_upto = known;
        let mut all_final = true;
        for m in fresh {
            let streaming = m.role == MessageRole::Assistant && m.status == MessageStatus::Streaming;
            all_final &= !streaming;
            if all_final {
                complete_upto = m.seq;
            }
            if m.role == MessageRole::User || (m.status == MessageStatus::Complete && !m.content.is_empty()) {
                let role = match m.role {
                    MessageRole::User => ChatRole::User,
                    MessageRole::Assistant | MessageRole::Agent => ChatRole::Assistant,
                };
                turns.push((m.seq, ChatMessage::new(role, m.content)));
            }
        }
        if complete_upto > known {
            let complete = turns.partition_point(|(seq, _)| *seq <= complete_upto);
            self.history.put(&conversation.id, complete_upto, &turns[..complete], HISTORY_SCAN as usize);
        }
        let history: Vec<ChatMessage> = turns.into_iter().map(|(_, m)| m).collect();
        Ok(fit_history(
            conversation.system_prompt.as_deref(),
            &history,
            self.providers.context_window(model),
            REPLY_RESERVE_TOKENS,
        ))
    }
}

fn request_hash(req: &SendRequest) -> String {
    let target = match &req.target {
        Target::Existing(c) => c.id.as_str(),
        Target::New => "new",
    };
    let model = req.model.as_ref().map(ToString::to_string).unwrap_or_default();
    send_hash(target, &model, req.content.as_str())
}

/// What identifies a keyed send: a retry must repeat target, model and text.
pub fn send_hash(target: &str, model: &str, content: &str) -> String {
    let digest = Sha256::new()
        .chain_update(target.as_bytes())
        .chain_update([0])
        .chain_update(model.as_bytes())
        .chain_update([0])
        .chain_update(content.as_bytes())
        .finalize();
    hex::encode(digest)
}
