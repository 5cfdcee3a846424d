//! One-call chat (`/api/chat`), the history overview and the model list.

use std::sync::Arc;

use axum::{
    Json,
    extract::State,
    http::HeaderMap,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

use super::{
    AppState,
    docs::IdempotencyKey,
    error::{ApiResult, with_limits},
    extract::{ApiJson, AuthUser, PageQuery, Pagination},
    send::{self, ChatBody},
    streaming,
    views::{ErrorBody, Items, MessageView, Page, UsageView},
};
use crate::clock::rfc3339;

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatReply {
    #[schema(format = Uuid)]
    pub conversation_id: String,
    /// The assistant message's id.
    #[schema(format = Uuid)]
    pub message_id: String,
    pub reply: String,
    pub model: Option<String>,
    pub usage: Option<UsageView>,
    pub created_at: String,
}

/// Send one message, get the reply.
#[utoipa::path(post, path = "/api/chat", tag = "chat", security(("bearer" = [])), request_body = ChatBody,
    params(IdempotencyKey),
    responses((status = 200, body = ChatReply), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 502, body = ErrorBody), (status = 504, body = ErrorBody)))]
pub async fn chat(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ChatBody>,
) -> ApiResult<Response> {
    let sent = send::send_chat(&state, &auth, &headers, body).await?;
    let assistant = send::await_reply(&state, &sent).await?;
    let view = MessageView::from(&assistant);
    let reply = Json(ChatReply {
        conversation_id: sent.conversation_id,
        message_id: view.id,
        reply: view.content,
        model: view.model,
        usage: view.usage,
        created_at: view.created_at,
    });
    Ok(with_limits(reply.into_response(), &sent.limits))
}

/// The same, framed for `POST /api/chat/stream`.
#[utoipa::path(post, path = "/api/chat/stream", tag = "chat", security(("bearer" = [])), request_body = ChatBody,
    params(IdempotencyKey),
    responses((status = 200, content_type = "text/event-stream",
        description = "`conversation` → `user_message` → `delta`… → `done` | `error`; a `reset` (then the text again from its start) when another instance took the reply over"),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn chat_stream(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ChatBody>,
) -> ApiResult<Response> {
    let sent = send::send_chat(&state, &auth, &headers, body).await?;
    let limits = sent.limits;
    Ok(with_limits(streaming::send_events(state, sent, true), &limits))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryView {
    #[schema(format = Uuid)]
    pub conversation_id: String,
    pub title: Option<String>,
    /// Text of the latest message.
    pub last_message: Option<String>,
    pub updated_at: String,
}

/// Conversations with their latest message, newest activity first.
#[utoipa::path(get, path = "/api/history", tag = "chat", security(("bearer" = [])),
    params(PageQuery),
    responses((status = 200, body = Page<HistoryView>), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn history(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    page: Pagination,
) -> ApiResult<Json<Page<HistoryView>>> {
    let (items, total) = state.store.history(&auth.user.id, page.per_page, page.offset()).await?;
    Ok(Json(Page {
        items: items
            .into_iter()
            .map(|h| HistoryView {
                conversation_id: h.conversation_id,
                title: h.title,
                last_message: h.last_message,
                updated_at: rfc3339(h.updated_at),
            })
            .collect(),
        page: page.page,
        per_page: page.per_page,
        total,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelView {
    /// `provider/model`.
    pub id: String,
    pub provider: String,
    pub default: bool,
}

/// The models of the configured providers.
#[utoipa::path(get, path = "/api/models", tag = "chat", security(("bearer" = [])),
    responses((status = 200, body = Items<ModelView>), (status = 401, body = ErrorBody)))]
pub async fn models(State(state): State<Arc<AppState>>, _auth: AuthUser) -> Json<Items<ModelView>> {
    let items = state
        .providers
        .models()
        .into_iter()
        .map(|m| ModelView { id: m.id, provider: m.provider, default: m.default })
        .collect();
    Json(Items { items })
}
