//! What the support desk's bus carries: its events (as Redis and the log
//! hold them) and what a subscriber receives.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::views::{SupportMessageView, SupportSessionView};
use crate::store::SupportEventRecord;

/// What happened at the desk, as the bus carries it (and Redis, as JSON
/// tagged by `kind`). `seq` is the event's place in the session's log;
/// `agent_id` the agent holding the session when it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BusEvent {
    /// A message of a session (logged).
    Message { session_id: String, seq: i64, agent_id: Option<String>, message: SupportMessageView },
    /// A session's status changed (logged).
    Status { session_id: String, seq: i64, agent_id: Option<String>, session: SupportSessionView },
    /// Text of an AI reply as it is written (not logged: the reply's
    /// message is, once it is finished).
    Delta { session_id: String, message_id: String, text: String },
    /// An AI reply starts again from nothing (taken over from a dead
    /// instance); the deltas that follow are its text (not logged).
    Reset { session_id: String, message_id: String },
    /// Queue positions and the agents' queue view changed.
    Queue,
    /// Asks every instance to re-read the log: events may have been missed.
    Resync,
}

impl BusEvent {
    /// A logged event as the log holds it: `(kind, payload)`.
    pub fn to_log(&self) -> Option<(&'static str, String)> {
        match self {
            BusEvent::Message { message, .. } => Some(("message", serde_json::to_string(message).ok()?)),
            BusEvent::Status { session, .. } => Some(("status", serde_json::to_string(session).ok()?)),
            BusEvent::Delta { .. } | BusEvent::Reset { .. } | BusEvent::Queue | BusEvent::Resync => None,
        }
    }

    /// A logged event read back from the log; `None` for a kind (or a
    /// payload) this version does not know.
    pub fn from_record(e: &SupportEventRecord) -> Option<Self> {
        let (seq, session_id, agent_id) = (e.seq, e.session_id.clone(), e.agent_id.clone());
        match e.kind.as_str() {
            "message" => {
                let message = serde_json::from_str(&e.payload).ok()?;
                Some(BusEvent::Message { session_id, seq, agent_id, message })
            }
            "status" => {
                let session = serde_json::from_str(&e.payload).ok()?;
                Some(BusEvent::Status { session_id, seq, agent_id, session })
            }
            _ => None,
        }
    }

    pub fn session_id(&self) -> Option<&str> {
        match self {
            BusEvent::Message { session_id, .. }
            | BusEvent::Status { session_id, .. }
            | BusEvent::Delta { session_id, .. }
            | BusEvent::Reset { session_id, .. } => Some(session_id),
            BusEvent::Queue | BusEvent::Resync => None,
        }
    }

    /// The event's place in the log, for logged events.
    pub fn seq(&self) -> Option<i64> {
        match self {
            BusEvent::Message { seq, .. } | BusEvent::Status { seq, .. } => Some(*seq),
            BusEvent::Delta { .. } | BusEvent::Reset { .. } | BusEvent::Queue | BusEvent::Resync => None,
        }
    }
}

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum BusMessage {
    /// Shared: every socket of the instance receives the same event.
    Event(Arc<BusEvent>),
    /// Events may have been missed: re-read the log.
    Resync,
}
