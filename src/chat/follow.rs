//! Following a reply from any byte offset, waiting for its end, and
//! cancelling it — here or through the database on another instance.

use std::{sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use tokio::sync::broadcast;

use super::{Chat, live::ReplyEvent};
use crate::{
    domain::conversation::MessageStatus,
    store::{MessageRecord, StoreError},
};

/// How often a follower of a reply running elsewhere polls the database.
const REMOTE_POLL: Duration = Duration::from_millis(200);

/// The events of a reply from byte `from` on: what was missed, then the
/// live rest, ending with `Finished`. Works for replies running here, for
/// replies running on another instance (by polling the database) and for
/// finished replies (from the database).
impl Chat {
    pub fn follow(
        self: &Arc<Self>,
        message: MessageRecord,
        from: usize,
    ) -> impl Stream<Item = ReplyEvent> + Send + use<> {
        let chat = self.clone();
        // A small bounded hand-off: a slow reader stalls this task, which then
        // lags on the broadcast and catches up from the text in one piece, so
        // memory per follower stays bounded whatever the reader's speed.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<ReplyEvent>(16);
        tokio::spawn(async move {
            let mut sent = from;
            if let Some(live) = chat.replies.get(&message.id) {
                // `usize::MAX` asks for the end alone (a plain JSON answer).
                let (text, finished, mut events) = live.snapshot(from != usize::MAX);
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
                        Ok(ReplyEvent::Reset) => {
                            sent = 0;
                            if tx.send(ReplyEvent::Reset).await.is_err() {
                                return;
                            }
                        }
                        Ok(done @ ReplyEvent::Finished(_)) => {
                            let _ = tx.send(done).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            // Fell behind: send the text missed in one piece.
                            let (text, finished, fresh) = live.snapshot(from != usize::MAX);
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
            // Not running here (or just finished): read the database until
            // done. A reply that started over (taken over from a dead
            // instance, or its stream broke off while nobody watched it on its
            // own instance) no longer begins with what was sent: the follower
            // is told to reset and gets the new text from its start.
            let mut seen = String::new();
            loop {
                let current = match chat.store.message(&message.conversation_id, &message.id).await {
                    Ok(Some(m)) => m,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(error = e.to_string().as_str(), "reading a followed reply failed");
                        tokio::time::sleep(REMOTE_POLL).await;
                        continue;
                    }
                };
                if sent < usize::MAX && !current.content.starts_with(seen.as_str()) {
                    if tx.send(ReplyEvent::Reset).await.is_err() {
                        return;
                    }
                    (sent, seen) = (0, String::new());
                }
                if !emit_from(&tx, &current.content, &mut sent).await {
                    return;
                }
                if sent < usize::MAX {
                    seen.clone_from(&current.content);
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

    /// Waits for a reply's final message.
    pub async fn finished(self: &Arc<Self>, message: MessageRecord) -> Option<Arc<MessageRecord>> {
        let events = self.follow(message, usize::MAX);
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
    pub async fn cancel(&self, message_id: &str) -> Result<bool, StoreError> {
        match self.replies.get(message_id) {
            Some(live) => {
                live.cancel();
                Ok(true)
            }
            None => self.store.request_cancel(message_id).await,
        }
    }
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
