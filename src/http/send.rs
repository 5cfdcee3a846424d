//! The web's side of sending a message, whatever the route or socket: the
//! checks of its text and model, its idempotency key, its target, and the
//! answer (JSON, or the SSE stream), including a failed reply's 502/504.
//! The sending itself is `chat::send`.

use std::sync::Arc;

use axum::{
    Json,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::{Map, json};
use utoipa::ToSchema;

use super::{
    AppState,
    docs::{MessageText, ModelIdSchema},
    error::{ApiError, ApiResult},
    extract::{AuthUser, owned_conversation, parse_uuid},
    streaming::{reply_failure, send_events, wants_sse},
    views::MessageView,
};
use crate::{
    chat::{self as replies, Sent, Target},
    domain::{
        Validator,
        conversation::{MessageContent, MessageStatus, ModelId},
    },
    store::MessageRecord,
};

/// The body of `/api/chat` and `/api/chat/stream`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatBody {
    #[schema(value_type = MessageText)]
    pub message: String,
    /// Continue this conversation; a new one is started when absent.
    #[schema(schema_with = super::docs::optional_uuid)]
    pub conversation_id: Option<String>,
    #[schema(value_type = Option<ModelIdSchema>)]
    pub model: Option<String>,
}

/// Validates an optional model id against the configured providers; an
/// unknown one is a 422 with code `unknown_model`.
pub fn check_model(state: &AppState, v: &mut Validator, model: Option<String>) -> Option<ModelId> {
    v.check_opt("model", model, |m| state.providers.validate_model(&m)).flatten()
}

pub fn invalid(errors: Vec<crate::domain::FieldError>) -> ApiError {
    let code = if errors.iter().any(|e| e.field == "model") { "unknown_model" } else { "validation_error" };
    ApiError::Validation { code, errors }
}

/// The one check of a message's text, for REST bodies and both kinds of
/// socket frames alike.
pub fn validate_message(
    state: &AppState,
    field: &str,
    content: impl Into<serde_json::Value>,
    model: Option<String>,
) -> ApiResult<(MessageContent, Option<ModelId>)> {
    let mut v = Validator::new();
    let content =
        v.check(field, MessageContent::from_json(content.into(), state.settings.chat.max_message_chars as usize));
    let model = check_model(state, &mut v, model);
    v.finish().map_err(invalid)?;
    Ok((content.expect("validated above"), model))
}

/// `validate_message` for a text without a model override.
pub fn validate_content(state: &AppState, content: impl Into<serde_json::Value>) -> ApiResult<MessageContent> {
    validate_message(state, "content", content, None).map(|(content, _)| content)
}

/// The `Idempotency-Key` header, scoped to the route family it was sent to.
pub fn idempotency_key(headers: &HeaderMap, scope: &str) -> ApiResult<Option<String>> {
    let Some(raw) = headers.get("idempotency-key") else { return Ok(None) };
    let key = raw.to_str().ok().map(str::trim).filter(|k| !k.is_empty() && k.len() <= 200).ok_or_else(|| {
        ApiError::invalid_field("validation_error", "Idempotency-Key", "must be 1 to 200 visible ASCII characters")
    })?;
    Ok(Some(format!("{scope}:{key}")))
}

/// Waits for the reply of a send and answers as the synchronous API does.
pub async fn await_reply(state: &Arc<AppState>, sent: &Sent) -> ApiResult<MessageRecord> {
    let done = state
        .chat
        .finished(sent.assistant_message.clone())
        .await
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("the reply vanished")))?;
    if done.status == MessageStatus::Failed {
        let mut extra = Map::new();
        extra.insert("user_message".into(), json!(MessageView::from(&sent.user_message)));
        extra.insert("assistant_message".into(), json!(MessageView::from(done.as_ref())));
        return Err(reply_failure(&done, extra));
    }
    Ok(done.as_ref().clone())
}

/// `201 {user_message, assistant_message}` or the SSE stream.
pub async fn post_message_response(state: Arc<AppState>, headers: &HeaderMap, sent: Sent) -> ApiResult<Response> {
    if wants_sse(headers) {
        return Ok(send_events(state, sent, false));
    }
    let assistant = await_reply(&state, &sent).await?;
    let body = json!({
        "user_message": MessageView::from(&sent.user_message),
        "assistant_message": MessageView::from(&assistant),
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Checks a chat body and sends it (creating the conversation if needed).
pub async fn parse_chat_target(state: &AppState, auth: &AuthUser, conversation_id: Option<&str>) -> ApiResult<Target> {
    match conversation_id {
        None => Ok(Target::New),
        Some(id) => {
            let id = parse_uuid(id).ok_or_else(|| {
                ApiError::invalid(vec![crate::domain::FieldError::new("conversation_id", "must be a UUID")])
            })?;
            Ok(Target::Existing(owned_conversation(state, auth, &id).await?))
        }
    }
}

/// An API key limited to some models may not have others answer it.
pub fn key_allows(state: &AppState, auth: &AuthUser, model: Option<&ModelId>, target: &Target) -> ApiResult<()> {
    let Some(key) = &auth.key else { return Ok(()) };
    let model = state.chat.answering_model(model, target);
    if key.allows(&model.to_string()) {
        Ok(())
    } else {
        Err(ApiError::forbidden("model_not_allowed", format!("This API key may not use the model `{model}`.")))
    }
}

/// Validates and sends a message body for the conversation routes.
pub async fn send_to_conversation(
    state: &Arc<AppState>,
    auth: &AuthUser,
    headers: &HeaderMap,
    conversation_id: &str,
    content: String,
    model: Option<String>,
) -> ApiResult<Sent> {
    let conversation = owned_conversation(state, auth, conversation_id).await?;
    let (content, model) = validate_message(state, "content", content, model)?;
    let target = Target::Existing(conversation);
    key_allows(state, auth, model.as_ref(), &target)?;
    state
        .chat
        .send(replies::SendRequest {
            payer: auth.payer(),
            target,
            content,
            model,
            idempotency_key: idempotency_key(headers, "messages")?,
        })
        .await
        .map_err(Into::into)
}

/// Validates a chat body and sends it; shared by /api/chat and /api/chat/stream.
pub async fn send_chat(state: &Arc<AppState>, auth: &AuthUser, headers: &HeaderMap, body: ChatBody) -> ApiResult<Sent> {
    let (content, model) = validate_message(state, "message", body.message, body.model)?;
    let target = parse_chat_target(state, auth, body.conversation_id.as_deref()).await?;
    key_allows(state, auth, model.as_ref(), &target)?;
    state
        .chat
        .send(replies::SendRequest {
            payer: auth.payer(),
            target,
            content,
            model,
            idempotency_key: idempotency_key(headers, "chat")?,
        })
        .await
        .map_err(Into::into)
}
