//! /api/support (visitors, authenticated by their session's client token)
//! and /api/agent (agents and admins): the REST half of the support desk.
//! The rules live in `desk`; these handlers extract and map.

use std::sync::Arc;

use axum::{
    Json,
    extract::{FromRequestParts, State},
    http::{HeaderMap, StatusCode, request::Parts},
};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::{
    AppState,
    docs::{IdempotencyKey, MessageText},
    error::{ApiError, ApiResult},
    extract::{ApiJson, AuthUser, ClientIp, Cursor, CursorQuery, PageQuery, Pagination, UuidPath, bearer},
    send::idempotency_key,
    views::{CursorPage, ErrorBody, Items, Page},
};
use crate::{
    desk::{SupportMessageView, SupportSessionView, message_json},
    domain::{
        Validator,
        conversation::MessageContent,
        support::{ClientInfo, SupportStatus},
        user::Role,
    },
    store::SupportSessionRecord,
};

/// Who calls a support route: the visitor (client token) or staff.
pub enum SupportCaller {
    Client(String),
    Staff(AuthUser),
}

impl FromRequestParts<Arc<AppState>> for SupportCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        if let Some(token) = bearer(&parts.headers).filter(|t| t.starts_with("pst_")) {
            return Ok(SupportCaller::Client(token.to_owned()));
        }
        let user = AuthUser::from_request_parts(parts, state).await?;
        user.require(&[Role::Agent, Role::Admin])?;
        Ok(SupportCaller::Staff(user))
    }
}

impl SupportCaller {
    /// The session, if this caller may see it.
    async fn session(&self, state: &AppState, id: &str) -> ApiResult<SupportSessionRecord> {
        match self {
            SupportCaller::Client(token) => Ok(state.desk.session_for_client(id, token).await?),
            SupportCaller::Staff(_) => state.store.support_session(id).await?.ok_or(ApiError::NotFound),
        }
    }

    /// The session, for routes only its visitor may call.
    async fn own_session(&self, state: &AppState, id: &str) -> ApiResult<SupportSessionRecord> {
        match self {
            SupportCaller::Client(token) => Ok(state.desk.session_for_client(id, token).await?),
            SupportCaller::Staff(_) => {
                Err(ApiError::forbidden("client_only", "Only the visitor of this session may do that."))
            }
        }
    }
}

#[derive(ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct SupportSessionCreated {
    #[schema(format = Uuid)]
    session_id: String,
    /// Use as `Authorization: Bearer` on this session's routes and `?token=` on its socket.
    client_token: String,
    status: SupportStatus,
    created_at: String,
}

#[derive(ToSchema)]
#[allow(dead_code, reason = "documentation only")]
pub struct SupportExchange {
    message: SupportMessageView,
    /// The AI's answer; null unless the session is in AI mode.
    reply: Option<SupportMessageView>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ClientInfoBody {
    #[schema(schema_with = super::docs::display_name)]
    pub name: String,
    #[schema(format = Email, max_length = 254)]
    pub email: String,
    /// Digits, spaces and `+-().`, at least 5 digits; blank counts as absent.
    #[schema(schema_with = super::docs::optional_phone)]
    pub phone: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateSessionBody {
    pub client_info: ClientInfoBody,
}

/// Open a support session (anyone); answers the client token to use as Bearer.
#[utoipa::path(post, path = "/api/support/sessions", tag = "support", request_body = CreateSessionBody,
    responses((status = 201, body = SupportSessionCreated),
        (status = 422, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn create_session(
    State(state): State<Arc<AppState>>,
    client: ClientIp,
    ApiJson(body): ApiJson<CreateSessionBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let address = client.key();
    let now = state.clock.now_ms();
    let detail = "Too many support sessions from this address; try again later.";
    state.desk.creations.check(&address, now, "rate_limited", detail).await?;
    let mut v = Validator::new();
    let info = body.client_info;
    let client = ClientInfo::parse(&mut v, info.name, info.email, info.phone);
    v.finish().map_err(ApiError::invalid)?;
    state.desk.creations.record(&address, now).await;
    let (session, token) = state.desk.create_session(client.expect("validated above")).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "session_id": session.id,
            "client_token": token,
            "status": session.status,
            "created_at": crate::clock::rfc3339(session.created_at),
        })),
    ))
}

/// A support session (its visitor, or staff).
#[utoipa::path(get, path = "/api/support/sessions/{id}", tag = "support", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path)),
    responses((status = 200, body = SupportSessionView), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Neither this session's visitor nor an agent or admin"),
        (status = 404, body = ErrorBody)))]
pub async fn get_session(
    State(state): State<Arc<AppState>>,
    caller: SupportCaller,
    id: UuidPath,
) -> ApiResult<Json<SupportSessionView>> {
    let s = caller.session(&state, id.one()).await?;
    Ok(Json(state.desk.session_json(&s).await?))
}

/// The session's messages, oldest first (roles user, assistant, agent).
#[utoipa::path(get, path = "/api/support/sessions/{id}/messages", tag = "support", security(("bearer" = [])),
    operation_id = "support_list_messages",
    params(("id" = uuid::Uuid, Path), CursorQuery),
    responses((status = 200, body = CursorPage<SupportMessageView>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Neither this session's visitor nor an agent or admin"),
        (status = 404, body = ErrorBody)))]
pub async fn list_messages(
    State(state): State<Arc<AppState>>,
    caller: SupportCaller,
    id: UuidPath,
    cursor: Cursor,
) -> ApiResult<Json<Value>> {
    let s = caller.session(&state, id.one()).await?;
    let before =
        match &cursor.before {
            None => None,
            Some(b) => Some(state.store.message(&s.conversation_id, b).await?.ok_or_else(|| {
                ApiError::invalid_field("invalid_cursor", "before", "is not a message of this session")
            })?),
        };
    let (items, has_more) = state.store.list_messages(&s.conversation_id, before.as_ref(), cursor.limit).await?;
    let items: Vec<SupportMessageView> = items.iter().map(|m| message_json(&s.id, m)).collect();
    Ok(Json(json!({ "items": items, "has_more": has_more })))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ContentBody {
    #[schema(value_type = MessageText)]
    pub content: String,
}

fn content(state: &AppState, body: ContentBody) -> ApiResult<MessageContent> {
    super::send::validate_content(state, body.content)
}

/// The visitor writes; in AI mode the AI's reply comes back too.
#[utoipa::path(post, path = "/api/support/sessions/{id}/messages", tag = "support", security(("bearer" = [])),
    operation_id = "support_post_message",
    params(("id" = uuid::Uuid, Path), IdempotencyKey), request_body = ContentBody,
    responses((status = 201, body = SupportExchange),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn post_message(
    State(state): State<Arc<AppState>>,
    caller: SupportCaller,
    id: UuidPath,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ContentBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let s = caller.own_session(&state, id.one()).await?;
    let content = content(&state, body)?;
    let sent = state.desk.client_send(&s, content, idempotency_key(&headers, "support")?).await?;
    let reply = sent.reply.as_ref().map(|m| message_json(&s.id, m));
    Ok((StatusCode::CREATED, Json(json!({ "message": message_json(&s.id, &sent.message), "reply": reply }))))
}

/// The visitor asks for a human: the session joins the queue.
#[utoipa::path(post, path = "/api/support/sessions/{id}/handoff", tag = "support", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path)),
    responses((status = 200, body = SupportSessionView, description = "Session, now queued"),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn handoff(
    State(state): State<Arc<AppState>>,
    caller: SupportCaller,
    id: UuidPath,
) -> ApiResult<Json<SupportSessionView>> {
    let s = caller.own_session(&state, id.one()).await?;
    let s = state.desk.handoff(&s).await?;
    Ok(Json(state.desk.session_json(&s).await?))
}

fn staff(auth: &AuthUser) -> ApiResult<()> {
    auth.require(&[Role::Agent, Role::Admin])
}

async fn sessions_json(state: &AppState, sessions: &[SupportSessionRecord]) -> ApiResult<Vec<SupportSessionView>> {
    let mut items = Vec::with_capacity(sessions.len());
    for s in sessions {
        items.push(state.desk.session_json(s).await?);
    }
    Ok(items)
}

/// Waiting sessions, first come first, with `queue_position` and `waiting_since`.
#[utoipa::path(get, path = "/api/agent/queue", tag = "support", security(("bearer" = [])),
    responses((status = 200, body = Items<SupportSessionView>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub async fn queue(State(state): State<Arc<AppState>>, auth: AuthUser) -> ApiResult<Json<Value>> {
    staff(&auth)?;
    Ok(Json(json!({ "items": state.desk.queue_json().await? })))
}

/// All sessions, newest first, optionally `?status=`.
#[utoipa::path(get, path = "/api/agent/sessions", tag = "support", security(("bearer" = [])),
    params(("status" = Option<SupportStatus>, Query), PageQuery),
    responses((status = 200, body = Page<SupportSessionView>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn sessions(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    page: Pagination,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<Json<Value>> {
    staff(&auth)?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.as_deref().unwrap_or("")).unwrap_or_default();
    let mut v = Validator::new();
    let status = v
        .check_opt("status", pairs.iter().rev().find(|(k, _)| k == "status").map(|(_, s)| s.clone()), |s| {
            s.parse::<SupportStatus>()
        })
        .flatten();
    v.finish().map_err(ApiError::invalid)?;
    let (items, total) = state.store.list_support_sessions(status, page.per_page, page.offset()).await?;
    Ok(Json(json!({
        "items": sessions_json(&state, &items).await?,
        "page": page.page,
        "per_page": page.per_page,
        "total": total,
    })))
}

/// Sessions assigned to the caller.
#[utoipa::path(get, path = "/api/agent/active", tag = "support", security(("bearer" = [])),
    responses((status = 200, body = Items<SupportSessionView>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub async fn active(State(state): State<Arc<AppState>>, auth: AuthUser) -> ApiResult<Json<Value>> {
    staff(&auth)?;
    let mine = state.store.agent_sessions(&auth.user.id).await?;
    Ok(Json(json!({ "items": sessions_json(&state, &mine).await? })))
}

/// Claim a queued session; exactly one of concurrent claimers wins (others 409).
#[utoipa::path(post, path = "/api/agent/sessions/{id}/claim", tag = "support", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path)),
    responses((status = 200, body = SupportSessionView, description = "Session, now `human`"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn claim(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    id: UuidPath,
) -> ApiResult<Json<SupportSessionView>> {
    staff(&auth)?;
    let s = state.desk.claim(&auth.user.id, id.one()).await?;
    Ok(Json(state.desk.session_json(&s).await?))
}

/// The assigned agent writes to the visitor.
#[utoipa::path(post, path = "/api/agent/sessions/{id}/messages", tag = "support", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path)), request_body = ContentBody,
    responses((status = 201, body = SupportMessageView, description = "Message (role `agent`)"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn agent_message(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    id: UuidPath,
    ApiJson(body): ApiJson<ContentBody>,
) -> ApiResult<(StatusCode, Json<SupportMessageView>)> {
    staff(&auth)?;
    let content = content(&state, body)?;
    let m = state.desk.agent_send(&auth.user.id, id.one(), content).await?;
    Ok((StatusCode::CREATED, Json(message_json(id.one(), &m))))
}

/// The assigned agent puts the session back at the head of the queue.
#[utoipa::path(post, path = "/api/agent/sessions/{id}/release", tag = "support", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path)),
    responses((status = 200, body = SupportSessionView, description = "Session, queued again"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn release(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    id: UuidPath,
) -> ApiResult<Json<SupportSessionView>> {
    staff(&auth)?;
    let s = state.desk.release(&auth.user.id, id.one()).await?;
    Ok(Json(state.desk.session_json(&s).await?))
}

/// The assigned agent (or an admin) closes the session; the visitor is told.
#[utoipa::path(post, path = "/api/agent/sessions/{id}/close", tag = "support", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path)),
    responses((status = 200, body = SupportSessionView, description = "Session, closed"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn close(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    id: UuidPath,
) -> ApiResult<Json<SupportSessionView>> {
    staff(&auth)?;
    let s = state.desk.close(&auth.user.id, auth.user.role == Role::Admin, id.one()).await?;
    Ok(Json(state.desk.session_json(&s).await?))
}
