//! What the desk answers, typed: one shape for REST answers, socket frames,
//! the event log and the bus, and for the OpenAPI document (`ToSchema`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    clock::rfc3339,
    domain::{
        conversation::{MessageRole, MessageStatus},
        support::{SupportStatus, estimated_wait_seconds},
    },
    store::{MessageRecord, SupportSessionRecord},
};

/// A support session as visitors and agents see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SupportSessionView {
    #[schema(format = Uuid)]
    pub session_id: String,
    pub status: SupportStatus,
    pub client_info: ClientInfoView,
    /// 1 for the head of the queue; null unless queued.
    pub queue_position: Option<i64>,
    pub estimated_wait_seconds: Option<i64>,
    pub assigned_agent: Option<AssignedAgentView>,
    /// Set while queued.
    pub waiting_since: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClientInfoView {
    pub name: String,
    pub email: String,
    pub phone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AssignedAgentView {
    #[schema(format = Uuid)]
    pub id: String,
    pub name: Option<String>,
}

/// A message of a support session (roles `user`, `assistant`, `agent`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SupportMessageView {
    #[schema(format = Uuid)]
    pub id: String,
    #[schema(format = Uuid)]
    pub session_id: String,
    pub role: MessageRole,
    pub content: String,
    pub status: MessageStatus,
    pub created_at: String,
}

impl SupportSessionView {
    /// `position` in the queue when queued; the wait is estimated from the
    /// mean of recent waits.
    pub fn new(s: &SupportSessionRecord, position: Option<i64>, recent_wait_ms: Option<i64>) -> Self {
        Self {
            session_id: s.id.clone(),
            status: s.status,
            client_info: ClientInfoView {
                name: s.client_name.clone(),
                email: s.client_email.clone(),
                phone: s.client_phone.clone(),
            },
            queue_position: position,
            estimated_wait_seconds: position.map(|p| estimated_wait_seconds(p, recent_wait_ms)),
            assigned_agent: s
                .assigned_agent
                .as_ref()
                .map(|id| AssignedAgentView { id: id.clone(), name: s.assigned_agent_name.clone() }),
            waiting_since: s.queued_at.filter(|_| s.status == SupportStatus::Queued).map(rfc3339),
            created_at: rfc3339(s.created_at),
            updated_at: rfc3339(s.updated_at),
        }
    }
}

impl SupportMessageView {
    pub fn new(session_id: &str, m: &MessageRecord) -> Self {
        Self {
            id: m.id.clone(),
            session_id: session_id.to_owned(),
            role: m.role,
            content: m.content.clone(),
            status: m.status,
            created_at: rfc3339(m.created_at),
        }
    }
}
