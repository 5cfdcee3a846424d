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

use crate::{
    domain::{
        context::{ChatMessage, ChatRole, fit_history},
        conversation::{MessageContent, MessageRole, MessageStatus, ModelId, Title},
    },
    http::{AppState, error::ApiError},
    providers::{ChatEvent, ProviderError, Usage},
    store::{
        ConversationRecord, IdempotencyClaim, IdempotentSend, MessageRecord, MessageUpdate, NewMessage, StoreError,
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

/// Stores the user message (on disk before this returns), starts the reply
/// and returns both messages. A retry with the same idempotency key returns
/// the original messages and starts nothing.
pub async fn send(state: &Arc<AppState>, req: SendRequest) -> Result<Sent, ApiError> {
    let new_conversation_id = uuid::Uuid::new_v4().to_string();
    let conversation_id = match &req.target {
        Target::Existing(c) => c.id.clone(),
        Target::New => new_conversation_id,
    };
    let ids = IdempotentSend {
        request_hash: request_hash(&req, &conversation_id),
        conversation_id,
        user_message_id: uuid::Uuid::now_v7().to_string(),
        assistant_message_id: uuid::Uuid::now_v7().to_string(),
    };
    if let Some(key) = &req.idempotency_key {
        let now = state.clock.now_ms();
        if let IdempotencyClaim::Existing(original) =
            state.store.claim_idempotency_key(&req.user_id, key, &ids, now).await?
        {
            if original.request_hash != ids.request_hash {
                return Err(ApiError::invalid_field(
                    "idempotency_key_reused",
                    "Idempotency-Key",
                    "was already used for a different request",
                ));
            }
            return attach_to_original(state, original).await;
        }
    }
    let result = create_and_start(state, &req, &ids).await;
    if let (Err(_), Some(key)) = (&result, &req.idempotency_key) {
        // Nothing was stored under the key's ids: let a retry try afresh.
        if state.store.message(&ids.conversation_id, &ids.user_message_id).await.ok().flatten().is_none() {
            let _ = state.store.release_idempotency_key(&req.user_id, key).await;
        }
    }
    result
}

fn request_hash(req: &SendRequest, conversation_id: &str) -> String {
    let target = match req.target {
        Target::Existing(_) => conversation_id,
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

/// A retried send: the original's messages, once they exist. The original
/// request inserts them right after claiming the key, so this waits briefly.
async fn attach_to_original(state: &Arc<AppState>, original: IdempotentSend) -> Result<Sent, ApiError> {
    for _ in 0..100 {
        let user = state.store.message(&original.conversation_id, &original.user_message_id).await?;
        let assistant = state.store.message(&original.conversation_id, &original.assistant_message_id).await?;
        if let (Some(user_message), Some(assistant_message)) = (user, assistant) {
            return Ok(Sent {
                conversation_id: original.conversation_id,
                fresh: false,
                user_message,
                assistant_message,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(ApiError::conflict(
        "request_in_progress",
        "The original request with this Idempotency-Key has not stored its message yet; retry shortly.",
    ))
}

async fn create_and_start(state: &Arc<AppState>, req: &SendRequest, ids: &IdempotentSend) -> Result<Sent, ApiError> {
    let now = state.clock.now_ms();
    let conversation = match &req.target {
        Target::Existing(c) => c.clone(),
        Target::New => {
            let record = ConversationRecord {
                id: ids.conversation_id.clone(),
                user_id: req.user_id.clone(),
                title: None,
                system_prompt: None,
                model: req.model.as_ref().map(ToString::to_string),
                message_count: 0,
                last_message_at: None,
                created_at: now,
                updated_at: now,
            };
            state.store.insert_conversation(&record).await?;
            record
        }
    };
    let model = match req.model.clone().or_else(|| conversation.model.as_deref().and_then(|m| ModelId::parse(m).ok())) {
        Some(m) if state.providers.validate_model(&m.to_string()).is_ok() => m,
        _ => state.providers.default_model().clone(),
    };
    let title = conversation.title.is_none().then(|| Title::derive_from(req.content.as_str()).into_inner());
    let user_message = state
        .store
        .insert_message(
            NewMessage {
                id: &ids.user_message_id,
                conversation_id: &conversation.id,
                role: MessageRole::User,
                content: req.content.as_str(),
                status: MessageStatus::Complete,
                model: None,
                now,
            },
            title.as_deref(),
        )
        .await?;
    let context = build_context(state, &conversation, &model).await?;
    let model_name = model.to_string();
    let assistant_message = state
        .store
        .insert_message(
            NewMessage {
                id: &ids.assistant_message_id,
                conversation_id: &conversation.id,
                role: MessageRole::Assistant,
                content: "",
                status: MessageStatus::Streaming,
                model: Some(&model_name),
                now: state.clock.now_ms(),
            },
            None,
        )
        .await?;
    start_generation(state, &assistant_message, &req.user_id, model, context);
    Ok(Sent { conversation_id: conversation.id, fresh: true, user_message, assistant_message })
}

/// The system prompt and as much recent history as fits the model's window.
/// Failed, cancelled and empty assistant messages are not shown to the model.
async fn build_context(
    state: &AppState,
    conversation: &ConversationRecord,
    model: &ModelId,
) -> Result<Vec<ChatMessage>, StoreError> {
    let (messages, _) = state.store.list_messages(&conversation.id, None, HISTORY_SCAN).await?;
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
    context: Vec<ChatMessage>,
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
        let (outcome, answered_by) = generate(&state, &live, &model, context).await;
        let message = finalize(&state, &live, base, &answered_by, outcome).await;
        live.finish(Arc::new(message));
        state.replies.live.lock().expect("replies lock poisoned").remove(&live.message_id);
    });
}

enum Outcome {
    Complete(Option<Usage>),
    Cancelled,
    Failed(ProviderError),
}

/// Runs the provider stream into the live reply, saving the partial text
/// every flush interval. The save is also this generator's heartbeat (kept
/// up while the provider is still thinking) and how a cancel asked on
/// another instance arrives. Timeouts, retries and fallback models are the
/// provider layer's; this answers which model replied.
async fn generate(
    state: &AppState,
    live: &LiveReply,
    model: &ModelId,
    context: Vec<ChatMessage>,
) -> (Outcome, ModelId) {
    let mut flush = tokio::time::interval(Duration::from_millis(state.settings.stream_flush_ms.max(10)));
    flush.tick().await;
    let start = state.providers.stream(model, context);
    tokio::pin!(start);
    let stream = loop {
        tokio::select! {
            _ = live.cancel.cancelled() => return (Outcome::Cancelled, model.clone()),
            _ = flush.tick() => if heartbeat(state, live).await { return (Outcome::Cancelled, model.clone()) },
            started = &mut start => match started {
                Err(e) => return (Outcome::Failed(e), model.clone()),
                Ok(s) => break s,
            },
        }
    };
    let answered_by = stream.model().clone();
    tokio::pin!(stream);
    let mut usage = None;
    let outcome = loop {
        tokio::select! {
            _ = live.cancel.cancelled() => break Outcome::Cancelled,
            _ = flush.tick() => if heartbeat(state, live).await { break Outcome::Cancelled },
            next = stream.next() => match next {
                None => break Outcome::Complete(usage),
                Some(Err(e)) => break Outcome::Failed(e),
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

/// Saves the partial text; true when a cancel was asked for elsewhere.
async fn heartbeat(state: &AppState, live: &LiveReply) -> bool {
    match state.store.save_partial(&live.message_id, &live.text(), state.clock.now_ms()).await {
        Ok(cancel) => cancel,
        Err(e) => {
            tracing::warn!(error = %e, "could not save a reply's partial text");
            false
        }
    }
}

/// Writes the reply's final state; retried a few times because a reply that
/// stays `streaming` would later be reported as interrupted.
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
            let now = state.clock.now_ms();
            if let Err(e) =
                state.store.add_usage(&live.user_id, now, usage.prompt_tokens, usage.completion_tokens).await
            {
                tracing::warn!(error = %e, "could not add to the user's usage totals");
            }
            message.status = MessageStatus::Complete;
            message.prompt_tokens = Some(usage.prompt_tokens);
            message.completion_tokens = Some(usage.completion_tokens);
            message.usage_estimated = usage.estimated;
        }
        Outcome::Cancelled => message.status = MessageStatus::Cancelled,
        Outcome::Failed(e) => {
            message.status = MessageStatus::Failed;
            message.error_code = Some(provider_error_code(&e).to_owned());
            message.error = Some(e.to_string());
        }
    }
    message.model = Some(model.to_string());
    for attempt in 0..5u64 {
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
            Ok(()) => break,
            Err(e) => {
                tracing::error!(error = %e, attempt, "could not store a finished reply");
                tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
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
