//! Conversations' recent history, kept between replies so that building a
//! reply's context reads only the messages stored since the last one, not
//! hundreds of rows per message. Only final messages are kept (user and
//! agent messages, finished replies): a message never changes once final,
//! and the store's sequence numbers say what is new — from any instance.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use crate::domain::context::ChatMessage;

/// Bytes of message text kept over all conversations; past it the least
/// recently used conversations are forgotten.
const MAX_BYTES: usize = 32 * 1024 * 1024;

/// A conversation's kept tail: every message with `seq <= upto` is final,
/// and those of them a context shows are here (at most `limit` of them).
struct Tail {
    upto: i64,
    turns: VecDeque<(i64, ChatMessage)>,
    bytes: usize,
    used: u64,
}

#[derive(Default)]
pub struct HistoryCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    tails: HashMap<String, Tail>,
    bytes: usize,
    uses: u64,
}

impl HistoryCache {
    /// The kept turns of a conversation up to `upto_seq` and the sequence
    /// number up to which they are complete (0 when nothing is kept).
    pub(super) fn get(&self, conversation_id: &str, upto_seq: i64) -> (Vec<(i64, ChatMessage)>, i64) {
        let mut inner = self.inner.lock().expect("history lock poisoned");
        inner.uses += 1;
        let uses = inner.uses;
        let Some(tail) = inner.tails.get_mut(conversation_id) else { return (Vec::new(), 0) };
        tail.used = uses;
        let turns = tail.turns.iter().filter(|(seq, _)| *seq <= upto_seq).cloned().collect();
        (turns, tail.upto.min(upto_seq))
    }

    /// Keeps `turns` (in seq order) as the conversation's tail, complete up
    /// to `upto`, at most the newest `limit` of them. A tail known further
    /// already stays.
    pub(super) fn put(&self, conversation_id: &str, upto: i64, turns: &[(i64, ChatMessage)], limit: usize) {
        let mut inner = self.inner.lock().expect("history lock poisoned");
        if inner.tails.get(conversation_id).is_some_and(|t| t.upto >= upto) {
            return;
        }
        let kept: VecDeque<(i64, ChatMessage)> = turns[turns.len().saturating_sub(limit)..].iter().cloned().collect();
        let bytes = kept.iter().map(|(_, m)| m.content.len()).sum::<usize>() + conversation_id.len();
        inner.uses += 1;
        let tail = Tail { upto, turns: kept, bytes, used: inner.uses };
        if let Some(old) = inner.tails.insert(conversation_id.to_owned(), tail) {
            inner.bytes -= old.bytes;
        }
        inner.bytes += bytes;
        while inner.bytes > MAX_BYTES {
            let Some(oldest) = inner.tails.iter().min_by_key(|(_, t)| t.used).map(|(id, _)| id.clone()) else { break };
            if let Some(gone) = inner.tails.remove(&oldest) {
                inner.bytes -= gone.bytes;
            }
        }
    }

    /// Forgets a conversation (deleted, or its messages deleted).
    pub fn forget(&self, conversation_id: &str) {
        let mut inner = self.inner.lock().expect("history lock poisoned");
        if let Some(gone) = inner.tails.remove(conversation_id) {
            inner.bytes -= gone.bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::context::ChatRole;

    fn turn(seq: i64, text: &str) -> (i64, ChatMessage) {
        (seq, ChatMessage::new(ChatRole::User, text))
    }

    #[test]
    fn a_tail_is_read_up_to_the_asked_seq_and_kept_at_its_limit() {
        let cache = HistoryCache::default();
        assert_eq!(cache.get("c", 10), (vec![], 0));
        cache.put("c", 5, &[turn(1, "a"), turn(2, "b"), turn(4, "d"), turn(5, "e")], 3);
        let (turns, upto) = cache.get("c", 10);
        assert_eq!((turns.iter().map(|(s, _)| *s).collect::<Vec<_>>(), upto), (vec![2, 4, 5], 5));
        let (turns, upto) = cache.get("c", 4);
        assert_eq!((turns.len(), upto), (2, 4), "nothing past the asked seq");
        // An older tail does not replace a newer one.
        cache.put("c", 3, &[turn(1, "a")], 3);
        assert_eq!(cache.get("c", 10).1, 5);
        cache.forget("c");
        assert_eq!(cache.get("c", 10), (vec![], 0));
    }

    #[test]
    fn the_least_recently_used_go_past_the_byte_budget() {
        let cache = HistoryCache::default();
        let big = "x".repeat(MAX_BYTES / 4);
        for id in ["a", "b", "c"] {
            cache.put(id, 1, &[turn(1, &big)], 10);
        }
        cache.get("a", 1);
        cache.put("d", 1, &[turn(1, &big)], 10);
        assert_eq!(cache.get("b", 1).1, 0, "b was used least recently");
        assert_eq!((cache.get("a", 1).1, cache.get("c", 1).1, cache.get("d", 1).1), (1, 1, 1));
        assert!(cache.inner.lock().unwrap().bytes <= MAX_BYTES);
    }
}
