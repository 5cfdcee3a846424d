//! Assistant replies generated detached from the request that asked for
//! them. A reply runs as its own task: a client that disconnects does not
//! stop it, only an explicit cancel does. Followers (the synchronous POST,
//! SSE streams, WebSocket frames, resumers) read the live text and events
//! from the `LiveReply`, or from the database once it is gone, addressing
//! positions by byte offset into the reply so a resume sends exactly what
//! was missed.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::usage::UsageLedger;
use crate::{
    domain::{
        context::{ChatMessage, ChatRole, fit_history},
        conversation::{MessageContent, MessageRole, MessageStatus, ModelId, Title},
    },
    error::Error,
    providers::{ChatEvent, ProviderError, Usage},
    state::AppState,
    store::{
        ConversationRecord, Exchange, ExchangeOutcome, IdempotentSend, MessageRecord, MessageUpdate, NewMessage,
        StoreError,
    },
};

/// How far back the context builder reads before the budget trims it.
const HISTORY_SCAN: i64 = 500;
/// Tokens kept free in the context window for the reply.
const REPLY_RESERVE_TOKENS: usize = 1024;
/// Events a follower may fall behind before it is resynchronised from the
/// reply's text (which costs nothing: the text is already there).
const FOLLOWER_BUFFER: usize = 256;
/// How often a follower of a reply running elsewhere polls the database.
const REMOTE_POLL: Duration = Duration::from_millis(200);

/// What a follower sees.
#[derive(Debug, Clone)]
pub enum ReplyEvent {
    /// New text; `offset` is the reply's length in bytes after it.
    Delta { text: String, offset: usize },
    /// The final message (complete, failed or cancelled); always last.
    Finished(Arc<MessageRecord>),
}

/// A reply being generated on this instance.
pub struct LiveReply {
    pub message_id: String,
    pub conversation_id: String,
    pub user_id: String,
    text: Mutex<LiveText>,
    events: broadcast::Sender<ReplyEvent>,
    cancel: CancellationToken,
}

#[derive(Default)]
struct LiveText {
    text: String,
    finished: Option<Arc<MessageRecord>>,
}

impl LiveReply {
    /// The text so far, the final message if any, and a receiver for what
    /// comes next — taken together, so nothing falls between them.
    fn snapshot(&self) -> (String, Option<Arc<MessageRecord>>, broadcast::Receiver<ReplyEvent>) {
        let guard = self.text.lock().expect("reply lock poisoned");
        (guard.text.clone(), guard.finished.clone(), self.events.subscribe())
    }

    fn push(&self, delta: &str) -> usize {
        let mut guard = self.text.lock().expect("reply lock poisoned");
        guard.text.push_str(delta);
        let offset = guard.text.len();
        let _ = self.events.send(ReplyEvent::Delta { text: delta.to_owned(), offset });
        offset
    }

    fn text(&self) -> String {
        self.text.lock().expect("reply lock poisoned").text.clone()
    }

    fn finish(&self, message: Arc<MessageRecord>) {
        let mut guard = self.text.lock().expect("reply lock poisoned");
        guard.finished = Some(message.clone());
        let _ = self.events.send(ReplyEvent::Finished(message));
    }

    pub fn cancel(&self) {
        self.cancel.cancel();
    }
}

/// The replies running on this instance, and the tasks that run them (so
/// shutdown can wait for them).
#[derive(Default)]
pub struct Replies {
    live: Mutex<HashMap<String, Arc<LiveReply>>>,
    tasks: TaskTracker,
    /// Token totals that could not be written yet (the database was down).
    pub usage: UsageLedger,
}

impl Replies {
    pub fn get(&self, message_id: &str) -> Option<Arc<LiveReply>> {
        self.live.lock().expect("replies lock poisoned").get(message_id).cloned()
    }

    pub fn running(&self) -> usize {
        self.live.lock().expect("replies lock poisoned").len()
    }

    /// Waits until every reply has finished, or `grace` has passed.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}

/// Where a message goes.
pub enum Target {
    Existing(ConversationRecord),
    /// `/api/chat` without a conversation: one is created.
    New,
}

pub struct SendRequest {
    pub user_id: String,
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
}

/// Stores the user message and the reply's placeholder (on disk before this
/// returns), starts the reply and returns both messages. A retry with the
/// same idempotency key returns the original messages and starts nothing.
pub async fn send(state: &Arc<AppState>, req: SendRequest) -> Result<Sent, Error> {
    let model = match req.model.clone().or_else(|| match &req.target {
        Target::Existing(c) => c.model.as_deref().and_then(|m| ModelId::parse(m).ok()),
        Target::New => None,
    }) {
        Some(m) if state.providers.validate_model(&m.to_string()).is_ok() => m,
        _ => state.providers.default_model().clone(),
    };
    let stored = store_send(
        state,
        StoreSend {
            owner: &req.user_id,
            target: &req.target,
            content: req.content.as_str(),
            request_hash: request_hash(&req),
            idempotency_key: req.idempotency_key.as_deref(),
            answer_with: Some(&model),
            requested_model: req.model.as_ref(),
        },
    )
    .await?;
    let assistant_message = stored.assistant.ok_or_else(|| anyhow::anyhow!("a send stored no reply placeholder"))?;
    if stored.fresh {
        start_generation(state, &assistant_message, &req.user_id, model, stored.conversation, stored.user_message.seq);
    }
    Ok(Sent {
        conversation_id: assistant_message.conversation_id.clone(),
        fresh: stored.fresh,
        user_message: stored.user_message,
        assistant_message,
    })
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

/// The one idempotent write of every send (chat, socket, support): the key
/// is claimed in the transaction that stores the messages, so a retry finds
/// the original's messages at once — or, when their conversation was deleted
/// since, a 404 — and never waits for a request that no longer runs.
pub async fn store_send(state: &AppState, send: StoreSend<'_>) -> Result<Stored, Error> {
    let now = state.clock.now_ms();
    let conversation = match send.target {
        Target::Existing(c) => c.clone(),
        Target::New => ConversationRecord {
            id: uuid::Uuid::new_v4().to_string(),
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
        user_message_id: uuid::Uuid::now_v7().to_string(),
        assistant_message_id: send.answer_with.map(|_| uuid::Uuid::now_v7().to_string()).unwrap_or_default(),
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
    match state.store.insert_exchange(exchange).await? {
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
            let user_message = state.store.message(&original.conversation_id, &original.user_message_id).await?;
            let assistant = match original.assistant_message_id.as_str() {
                "" => None,
                id => state.store.message(&original.conversation_id, id).await?,
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

/// The system prompt and as much history up to the message being answered
/// (`upto_seq`) as fits the model's window; messages stored after it, by
/// sends running beside this one, are not its history. Failed, cancelled,
/// unfinished and empty assistant messages are not shown to the model.
async fn build_context(
    state: &AppState,
    conversation: &ConversationRecord,
    model: &ModelId,
    upto_seq: i64,
) -> Result<Vec<ChatMessage>, StoreError> {
    let messages = state.store.messages_upto(&conversation.id, upto_seq, HISTORY_SCAN).await?;
    let history: Vec<ChatMessage> = messages
        .into_iter()
        .filter(|m| m.role == MessageRole::User || (m.status == MessageStatus::Complete && !m.content.is_empty()))
        .map(|m| {
            let role = match m.role {
                MessageRole::User => ChatRole::User,
                MessageRole::Assistant | MessageRole::Agent => ChatRole::Assistant,
            };
            ChatMessage::new(role, m.content)
        })
        .collect();
    Ok(fit_history(
        conversation.system_prompt.as_deref(),
        &history,
        state.providers.context_window(model),
        REPLY_RESERVE_TOKENS,
    ))
}

fn start_generation(
    state: &Arc<AppState>,
    placeholder: &MessageRecord,
    user_id: &str,
    model: ModelId,
    conversation: ConversationRecord,
    upto_seq: i64,
) {
    let (events, _) = broadcast::channel(FOLLOWER_BUFFER);
    let live = Arc::new(LiveReply {
        message_id: placeholder.id.clone(),
        conversation_id: placeholder.conversation_id.clone(),
        user_id: user_id.to_owned(),
        text: Mutex::new(LiveText::default()),
        events,
        cancel: CancellationToken::new(),
    });
    state.replies.live.lock().expect("replies lock poisoned").insert(live.message_id.clone(), live.clone());
    let state = state.clone();
    let base = placeholder.clone();
    state.clone().replies.tasks.spawn(async move {
        let heartbeat = tokio::spawn(keep_alive(state.clone(), live.clone()));
        let (outcome, answered_by) = match build_context(&state, &conversation, &model, upto_seq).await {
            Ok(context) => generate(&state, &live, &model, context).await,
            Err(e) => (
                Outcome::Failed { code: "context_unavailable", error: format!("the history could not be read: {e}") },
                model,
            ),
        };
        heartbeat.abort();
        let message = finalize(&state, &live, base, &answered_by, outcome).await;
        live.finish(Arc::new(message));
        state.replies.live.lock().expect("replies lock poisoned").remove(&live.message_id);
    });
}

enum Outcome {
    Complete(Option<Usage>),
    Cancelled,
    Failed { code: &'static str, error: String },
}

impl Outcome {
    fn failed(e: &ProviderError) -> Self {
        Outcome::Failed { code: provider_error_code(e), error: e.to_string() }
    }
}

/// Runs the provider stream into the live reply. Timeouts, retries and
/// fallback models are the provider layer's; this answers which model replied.
async fn generate(
    state: &AppState,
    live: &LiveReply,
    model: &ModelId,
    context: Vec<ChatMessage>,
) -> (Outcome, ModelId) {
    let stream = tokio::select! {
        _ = live.cancel.cancelled() => return (Outcome::Cancelled, model.clone()),
        started = state.providers.stream(model, context) => match started {
            Err(e) => return (Outcome::failed(&e), model.clone()),
            Ok(s) => s,
        },
    };
    let answered_by = stream.model().clone();
    tokio::pin!(stream);
    let mut usage = None;
    let outcome = loop {
        tokio::select! {
            _ = live.cancel.cancelled() => break Outcome::Cancelled,
            next = stream.next() => match next {
                None => break Outcome::Complete(usage),
                Some(Err(e)) => break Outcome::failed(&e),
                Some(Ok(ChatEvent::Delta(d))) => {
                    if !d.is_empty() {
                        live.push(&d);
                    }
                }
                Some(Ok(ChatEvent::Usage(u))) => usage = Some(u),
            },
        }
    };
    (outcome, answered_by)
}

/// Saves the partial text every flush interval while the reply runs: the
/// most a crash can lose, this generator's heartbeat (kept up while the
/// provider is still thinking), and how a cancel asked on another instance
/// arrives. It runs beside the generator, so a slow database never holds
/// up the text.
async fn keep_alive(state: Arc<AppState>, live: Arc<LiveReply>) {
    let mut flush = tokio::time::interval(Duration::from_millis(state.settings.stream_flush_ms.max(10)));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    flush.tick().await;
    loop {
        flush.tick().await;
        match state.store.save_partial(&live.message_id, &live.text(), state.clock.now_ms()).await {
            Ok(true) => live.cancel(),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not save a reply's partial text"),
        }
    }
}

/// The longest pause between two tries of a reply's final write.
const MAX_FINAL_WRITE_BACKOFF: Duration = Duration::from_secs(5);

/// Writes the reply's final state. Followers are told the reply finished
/// only once it is stored, so the write is retried, with backoff, until the
/// database takes it or the process stops: a reply that stayed `streaming`
/// would later be reported as interrupted although it completed.
async fn finalize(
    state: &AppState,
    live: &LiveReply,
    mut message: MessageRecord,
    model: &ModelId,
    outcome: Outcome,
) -> MessageRecord {
    message.content = live.text();
    match outcome {
        Outcome::Complete(usage) => {
            // The provider layer always ends with usage; this is belt and braces.
            let usage = usage.unwrap_or_else(|| Usage {
                prompt_tokens: 0,
                completion_tokens: crate::domain::context::estimate_tokens(&message.content) as i64,
                estimated: true,
            });
            state
                .replies
                .usage
                .add(&state.store, &live.user_id, state.clock.now_ms(), usage.prompt_tokens, usage.completion_tokens)
                .await;
            message.status = MessageStatus::Complete;
            message.prompt_tokens = Some(usage.prompt_tokens);
            message.completion_tokens = Some(usage.completion_tokens);
            message.usage_estimated = usage.estimated;
        }
        Outcome::Cancelled => message.status = MessageStatus::Cancelled,
        Outcome::Failed { code, error } => {
            message.status = MessageStatus::Failed;
            message.error_code = Some(code.to_owned());
            message.error = Some(error);
        }
    }
    message.model = Some(model.to_string());
    let mut backoff = Duration::from_millis(100);
    for attempt in 1u64.. {
        let update = MessageUpdate {
            content: &message.content,
            status: message.status,
            model: message.model.as_deref(),
            prompt_tokens: message.prompt_tokens,
            completion_tokens: message.completion_tokens,
            usage_estimated: message.usage_estimated,
            error: message.error.as_deref(),
            error_code: message.error_code.as_deref(),
            now: state.clock.now_ms(),
        };
        match state.store.finish_message(&message.id, update).await {
            Ok(()) => {
                if attempt > 1 {
                    tracing::info!(attempt, "stored a finished reply after the database came back");
                }
                break;
            }
            Err(e) => {
                tracing::error!(error = %e, attempt, "could not store a finished reply; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_FINAL_WRITE_BACKOFF);
            }
        }
    }
    message
}

pub fn provider_error_code(e: &ProviderError) -> &'static str {
    match e {
        ProviderError::Timeout => "provider_timeout",
        _ => "provider_error",
    }
}

/// The events of a reply from byte `from` on: what was missed, then the
/// live rest, ending with `Finished`. Works for replies running here, for
/// replies running on another instance (by polling the database) and for
/// finished replies (from the database).
pub fn follow(state: Arc<AppState>, message: MessageRecord, from: usize) -> impl Stream<Item = ReplyEvent> + Send {
    // A small bounded hand-off: a slow reader stalls this task, which then
    // lags on the broadcast and catches up from the text in one piece, so
    // memory per follower stays bounded whatever the reader's speed.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ReplyEvent>(16);
    tokio::spawn(async move {
        let mut sent = from;
        if let Some(live) = state.replies.get(&message.id) {
            let (text, finished, mut events) = live.snapshot();
            if !emit_from(&tx, &text, &mut sent).await {
                return;
            }
            if let Some(done) = finished {
                let _ = tx.send(ReplyEvent::Finished(done)).await;
                return;
            }
            loop {
                match events.recv().await {
                    Ok(ReplyEvent::Delta { text: delta, offset }) => {
                        if offset <= sent {
                            continue;
                        }
                        let start = offset - delta.len();
                        let piece = if start >= sent { delta } else { delta[sent - start..].to_owned() };
                        sent = offset;
                        if tx.send(ReplyEvent::Delta { text: piece, offset }).await.is_err() {
                            return;
                        }
                    }
                    Ok(done @ ReplyEvent::Finished(_)) => {
                        let _ = tx.send(done).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind: send the text missed in one piece.
                        let (text, finished, fresh) = live.snapshot();
                        events = fresh;
                        if !emit_from(&tx, &text, &mut sent).await {
                            return;
                        }
                        if let Some(done) = finished {
                            let _ = tx.send(ReplyEvent::Finished(done)).await;
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        }
        // Not running here (or just finished): read the database until done.
        loop {
            let current = match state.store.message(&message.conversation_id, &message.id).await {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "reading a followed reply failed");
                    tokio::time::sleep(REMOTE_POLL).await;
                    continue;
                }
            };
            if !emit_from(&tx, &current.content, &mut sent).await {
                return;
            }
            if current.status != MessageStatus::Streaming {
                let _ = tx.send(ReplyEvent::Finished(Arc::new(current))).await;
                return;
            }
            tokio::time::sleep(REMOTE_POLL).await;
        }
    });
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Sends `text[sent..]` as one delta if there is any; false when the
/// follower has gone.
async fn emit_from(tx: &tokio::sync::mpsc::Sender<ReplyEvent>, text: &str, sent: &mut usize) -> bool {
    if text.len() > *sent {
        let mut start = *sent;
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        let piece = text[start..].to_owned();
        *sent = text.len();
        return tx.send(ReplyEvent::Delta { text: piece, offset: *sent }).await.is_ok();
    }
    true
}

/// Waits for a reply's final message.
pub async fn finished(state: Arc<AppState>, message: MessageRecord) -> Option<Arc<MessageRecord>> {
    let events = follow(state, message, usize::MAX);
    tokio::pin!(events);
    while let Some(event) = events.next().await {
        if let ReplyEvent::Finished(m) = event {
            return Some(m);
        }
    }
    None
}

/// Cancels a reply: at once when it runs on this instance, else through
/// the database at the generator's next save. False when it is not streaming.
pub async fn cancel(state: &AppState, message_id: &str) -> Result<bool, StoreError> {
    match state.replies.get(message_id) {
        Some(live) => {
            live.cancel();
            Ok(true)
        }
        None => state.store.request_cancel(message_id).await,
    }
}
