//! The JSON shapes the API answers with (SPEC §2, §3), built from store
//! records. Times become RFC 3339 UTC strings here and nowhere else.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    clock::rfc3339,
    domain::{
        conversation::{MessageRole, MessageStatus},
        user::Role,
    },
    store::{ConversationRecord, MessageRecord, UsagePeriod, UserRecord},
};

#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    #[schema(format = Uuid)]
    pub id: String,
    pub email: Option<String>,
    pub username: Option<String>,
    pub display_name: Option<String>,
    pub role: Role,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// The user's own retention in days (`PATCH /api/users/me`), null for none.
    pub retention_days: Option<i64>,
}

impl From<&UserRecord> for UserView {
    fn from(u: &UserRecord) -> Self {
        Self {
            id: u.id.clone(),
            email: u.email.clone(),
            username: u.username.clone(),
            display_name: u.display_name.clone(),
            role: u.role,
            created_at: rfc3339(u.created_at),
            retention_days: u.retention_days,
        }
    }
}

/// A user as admins see it: with the disabled flag.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminUserView {
    #[serde(flatten)]
    pub user: UserView,
    pub disabled: bool,
    /// Tokens the user may spend per `budget_period`; null for no budget.
    pub token_budget: Option<i64>,
    pub budget_period: Option<BudgetPeriod>,
}

impl From<&UserRecord> for AdminUserView {
    fn from(u: &UserRecord) -> Self {
        Self {
            user: u.into(),
            disabled: u.is_disabled(),
            token_budget: u.token_budget.map(|b| b.tokens),
            budget_period: u.token_budget.map(|b| b.period.into()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    /// True when the provider reported no counts and these are estimates.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub estimated: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessageView {
    #[schema(format = Uuid)]
    pub id: String,
    #[schema(format = Uuid)]
    pub conversation_id: String,
    pub role: MessageRole,
    pub content: String,
    pub status: MessageStatus,
    pub model: Option<String>,
    pub usage: Option<UsageView>,
    pub error: Option<String>,
    pub created_at: String,
}

impl MessageView {
    pub fn usage_of(m: &MessageRecord) -> Option<UsageView> {
        match (m.prompt_tokens, m.completion_tokens) {
            (Some(p), Some(c)) => Some(UsageView {
                prompt_tokens: p,
                completion_tokens: c,
                total_tokens: p + c,
                estimated: m.usage_estimated,
            }),
            _ => None,
        }
    }
}

impl From<&MessageRecord> for MessageView {
    fn from(m: &MessageRecord) -> Self {
        Self {
            id: m.id.clone(),
            conversation_id: m.conversation_id.clone(),
            role: m.role,
            content: m.content.clone(),
            status: m.status,
            model: m.model.clone(),
            usage: Self::usage_of(m),
            error: m.error.clone(),
            created_at: rfc3339(m.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationView {
    #[schema(format = Uuid)]
    pub id: String,
    pub title: Option<String>,
    pub system_prompt: Option<String>,
    pub model: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub message_count: i64,
    pub last_message_at: Option<String>,
}

impl From<&ConversationRecord> for ConversationView {
    fn from(c: &ConversationRecord) -> Self {
        Self {
            id: c.id.clone(),
            title: c.title.clone(),
            system_prompt: c.system_prompt.clone(),
            model: c.model.clone(),
            created_at: rfc3339(c.created_at),
            updated_at: rfc3339(c.updated_at),
            message_count: c.message_count,
            last_message_at: c.last_message_at.map(rfc3339),
        }
    }
}

/// `{items, page, per_page, total}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T: ToSchema> {
    pub items: Vec<T>,
    pub page: i64,
    pub per_page: i64,
    pub total: i64,
}

/// `{items}` for short lists that are not paged.
#[derive(Debug, Serialize, ToSchema)]
pub struct Items<T: ToSchema> {
    pub items: Vec<T>,
}

/// `{items, has_more}`, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct CursorPage<T: ToSchema> {
    pub items: Vec<T>,
    pub has_more: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub detail: String,
    pub code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<crate::domain::FieldError>>,
}

/// A budget's period: a UTC day or month.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    Day,
    Month,
}

impl From<BudgetPeriod> for UsagePeriod {
    fn from(p: BudgetPeriod) -> Self {
        match p {
            BudgetPeriod::Day => UsagePeriod::Day,
            BudgetPeriod::Month => UsagePeriod::Month,
        }
    }
}

impl From<UsagePeriod> for BudgetPeriod {
    fn from(p: UsagePeriod) -> Self {
        match p {
            UsagePeriod::Day => BudgetPeriod::Day,
            UsagePeriod::Month => BudgetPeriod::Month,
        }
    }
}
