//! /api/conversations: CRUD, message lists (cursor pages) and sending a
//! message to get the assistant's reply. Every lookup names the caller, so
//! someone else's conversation answers 404 like a missing one.

use std::sync::Arc;

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::Response,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    AppState,
    docs::{IdempotencyKey, MessageText, ModelIdSchema},
    error::{ApiError, ApiResult},
    extract::{ApiJson, AuthUser, Cursor, CursorQuery, PageQuery, Pagination, UuidPath, nullable, owned_conversation},
    send::{self, check_model, invalid},
    views::{ConversationView, CursorPage, ErrorBody, MessageView, Page},
};
use crate::{
    domain::{
        Validator,
        conversation::{SystemPrompt, Title},
    },
    store::{ConversationPatch, ConversationRecord},
};

/// Messages shown with a conversation.
const LATEST_MESSAGES: i64 = 50;

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateConversationBody {
    #[schema(schema_with = super::docs::optional_title)]
    pub title: Option<String>,
    #[schema(schema_with = super::docs::optional_system_prompt)]
    pub system_prompt: Option<String>,
    /// The default model when absent.
    #[schema(value_type = Option<ModelIdSchema>)]
    pub model: Option<String>,
}

/// Start a conversation.
#[utoipa::path(post, path = "/api/conversations", tag = "conversations", security(("bearer" = [])),
    request_body = CreateConversationBody,
    responses((status = 201, body = ConversationView), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    ApiJson(body): ApiJson<CreateConversationBody>,
) -> ApiResult<(StatusCode, Json<ConversationView>)> {
    let mut v = Validator::new();
    let title = v.check_opt("title", body.title, |t| Title::parse(&t)).flatten();
    let system_prompt = v.check_opt("system_prompt", body.system_prompt, |p| SystemPrompt::parse(&p)).flatten();
    let model = check_model(&state, &mut v, body.model);
    v.finish().map_err(invalid)?;
    let now = state.clock.now_ms();
    let record = ConversationRecord {
        id: state.ids.random(),
        user_id: auth.user.id,
        title: title.map(Title::into_inner),
        system_prompt: system_prompt.map(SystemPrompt::into_inner),
        model: model.map(|m| m.to_string()),
        message_count: 0,
        last_message_at: None,
        created_at: now,
        updated_at: now,
    };
    state.store.insert_conversation(&record).await?;
    Ok((StatusCode::CREATED, Json(ConversationView::from(&record))))
}

/// The caller's conversations, newest activity first.
#[utoipa::path(get, path = "/api/conversations", tag = "conversations", security(("bearer" = [])),
    params(PageQuery),
    responses((status = 200, body = Page<ConversationView>), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    page: Pagination,
) -> ApiResult<Json<Page<ConversationView>>> {
    let (items, total) = state.store.list_conversations(&auth.user.id, page.per_page, page.offset()).await?;
    Ok(Json(Page {
        items: items.iter().map(ConversationView::from).collect(),
        page: page.page,
        per_page: page.per_page,
        total,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationWithMessages {
    #[serde(flatten)]
    pub conversation: ConversationView,
    /// The latest 50 messages, oldest first.
    pub messages: Vec<MessageView>,
}

/// A conversation with its latest messages.
#[utoipa::path(get, path = "/api/conversations/{id}", tag = "conversations", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path)),
    responses((status = 200, body = ConversationWithMessages), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    id: UuidPath,
) -> ApiResult<Json<ConversationWithMessages>> {
    let c = owned_conversation(&state, &auth, id.one()).await?;
    let (messages, _) = state.store.list_messages(&c.id, None, LATEST_MESSAGES).await?;
    Ok(Json(ConversationWithMessages {
        conversation: (&c).into(),
        messages: messages.iter().map(MessageView::from).collect(),
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateConversationBody {
    #[serde(default, deserialize_with = "nullable")]
    #[schema(schema_with = super::docs::optional_title)]
    pub title: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(schema_with = super::docs::optional_system_prompt)]
    pub system_prompt: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<ModelIdSchema>)]
    pub model: Option<Option<String>>,
}

/// Rename, change the system prompt or the model (null clears a field).
#[utoipa::path(patch, path = "/api/conversations/{id}", tag = "conversations", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path)), request_body = UpdateConversationBody,
    responses((status = 200, body = ConversationView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn update(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    id: UuidPath,
    ApiJson(body): ApiJson<UpdateConversationBody>,
) -> ApiResult<Json<ConversationView>> {
    let mut v = Validator::new();
    let patch = ConversationPatch {
        title: body.title.and_then(|t| v.check_opt("title", t, |t| Title::parse(&t).map(Title::into_inner))),
        system_prompt: body
            .system_prompt
            .and_then(|p| v.check_opt("system_prompt", p, |p| SystemPrompt::parse(&p).map(SystemPrompt::into_inner))),
        model: body
            .model
            .and_then(|m| v.check_opt("model", m, |m| state.providers.validate_model(&m).map(|m| m.to_string()))),
    };
    v.finish().map_err(invalid)?;
    let c = state
        .store
        .update_conversation(id.one(), &auth.user.id, patch, state.clock.now_ms())
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(ConversationView::from(&c)))
}

/// Delete a conversation and its messages.
#[utoipa::path(delete, path = "/api/conversations/{id}", tag = "conversations", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete(State(state): State<Arc<AppState>>, auth: AuthUser, id: UuidPath) -> ApiResult<StatusCode> {
    if state.store.delete_conversation(id.one(), &auth.user.id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound)
    }
}

/// Messages, oldest first, in pages going back with `before`.
#[utoipa::path(get, path = "/api/conversations/{id}/messages", tag = "conversations", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path), CursorQuery),
    responses((status = 200, body = CursorPage<MessageView>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn list_messages(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    id: UuidPath,
    cursor: Cursor,
) -> ApiResult<Json<CursorPage<MessageView>>> {
    let c = owned_conversation(&state, &auth, id.one()).await?;
    let before = match &cursor.before {
        None => None,
        Some(b) => Some(state.store.message(&c.id, b).await?.ok_or_else(|| {
            ApiError::invalid_field("invalid_cursor", "before", "is not a message of this conversation")
        })?),
    };
    let (items, has_more) = state.store.list_messages(&c.id, before.as_ref(), cursor.limit).await?;
    Ok(Json(CursorPage { items: items.iter().map(MessageView::from).collect(), has_more }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PostMessageBody {
    #[schema(value_type = MessageText)]
    pub content: String,
    /// Overrides the conversation's model for this reply.
    #[schema(value_type = Option<ModelIdSchema>)]
    pub model: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Exchange {
    pub user_message: MessageView,
    pub assistant_message: MessageView,
}

/// Send a message and get the assistant's reply, as JSON (201) or, with
/// `Accept: text/event-stream`, as an SSE stream.
#[utoipa::path(post, path = "/api/conversations/{id}/messages", tag = "conversations", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path), IdempotencyKey), request_body = PostMessageBody,
    responses((status = 201, body = Exchange), (status = 200, content_type = "text/event-stream",
        description = "With `Accept: text/event-stream`: `user_message` → `delta`… → `done` | `error`; a `reset` (then the text again from its start) when another instance took the reply over"),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 502, body = ErrorBody), (status = 504, body = ErrorBody)))]
pub async fn post_message(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    id: UuidPath,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PostMessageBody>,
) -> ApiResult<Response> {
    let sent = send::send_to_conversation(&state, &auth, &headers, id.one(), body.content, body.model).await?;
    let limits = sent.limits;
    Ok(super::error::with_limits(send::post_message_response(state, &headers, sent).await?, &limits))
}
