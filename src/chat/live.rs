//! A reply being generated on this instance: its text so far and the
//! channel its followers listen on; and the set of them, with the tasks that
//! run them (so shutdown can wait for them).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::broadcast;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::usage::UsageLedger;
use crate::store::MessageRecord;

/// Events a follower may fall behind before it is resynchronised from the
/// reply's text (which costs nothing: the text is already there).
const FOLLOWER_BUFFER: usize = 256;

/// What a follower sees.
#[derive(Debug, Clone)]
pub enum ReplyEvent {
    /// New text; `offset` is the reply's length in bytes after it.
    Delta { text: String, offset: usize },
    /// The reply starts over from nothing (another instance took it over from
    /// a dead one): what was shown is void, the deltas that follow are the text.
    Reset,
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
    pub(super) cancel: CancellationToken,
}

#[derive(Default)]
struct LiveText {
    text: String,
    finished: Option<Arc<MessageRecord>>,
    /// A follower has asked for the text (not only the end): from then on
    /// the reply cannot start over unseen.
    watched: bool,
}

impl LiveReply {
    pub(super) fn new(message_id: &str, conversation_id: &str, user_id: &str) -> Self {
        Self {
            message_id: message_id.to_owned(),
            conversation_id: conversation_id.to_owned(),
            user_id: user_id.to_owned(),
            text: Mutex::new(LiveText::default()),
            events: broadcast::channel(FOLLOWER_BUFFER).0,
            cancel: CancellationToken::new(),
        }
    }

    /// The text so far, the final message if any, and a receiver for what
    /// comes next — taken together, so nothing falls between them.
    /// `watch` says the follower will show the text.
    pub(super) fn snapshot(
        &self,
        watch: bool,
    ) -> (String, Option<Arc<MessageRecord>>, broadcast::Receiver<ReplyEvent>) {
        let mut guard = self.text.lock().expect("reply lock poisoned");
        guard.watched |= watch;
        (guard.text.clone(), guard.finished.clone(), self.events.subscribe())
    }

    /// Forgets the text so far, for a reply starting over — unless a
    /// follower is showing it (false then: the text stays).
    pub(super) fn start_over(&self) -> bool {
        let mut guard = self.text.lock().expect("reply lock poisoned");
        if guard.watched {
            return false;
        }
        guard.text.clear();
        true
    }

    pub(super) fn push(&self, delta: &str) -> usize {
        let mut guard = self.text.lock().expect("reply lock poisoned");
        guard.text.push_str(delta);
        let offset = guard.text.len();
        let _ = self.events.send(ReplyEvent::Delta { text: delta.to_owned(), offset });
        offset
    }

    pub(super) fn text(&self) -> String {
        self.text.lock().expect("reply lock poisoned").text.clone()
    }

    pub(super) fn finish(&self, message: Arc<MessageRecord>) {
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
    pub(super) live: Mutex<HashMap<String, Arc<LiveReply>>>,
    pub(super) tasks: TaskTracker,
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
