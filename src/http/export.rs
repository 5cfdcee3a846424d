//! Downloads: one conversation as JSON or Markdown, and everything Palaver
//! holds about the caller as JSON. Bodies are written by a task in pages of
//! messages through a small channel, so memory stays flat however long the
//! conversation; a database error mid-way cuts the download off rather than
//! ending it as if complete.

use std::{io, sync::Arc};

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::header,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use tokio::sync::mpsc;

use super::{
    AppState,
    conversations::ConversationWithMessages,
    error::ApiResult,
    extract::{AuthUser, ExportQuery, ExportQueryDoc, UuidPath, owned_conversation},
    keys::KeyView,
    views::{ConversationView, ErrorBody, MessageView, UserView},
};
use crate::{
    clock::rfc3339,
    domain::conversation::{ExportFormat, export_file_stem},
    store::{ConversationRecord, Store},
};

/// Messages (and conversations) read per query.
const EXPORT_PAGE: i64 = 500;
/// Bytes gathered before a chunk goes out.
const CHUNK_BYTES: usize = 64 * 1024;

/// Every message of one of the caller's conversations, oldest first, as a
/// download: JSON (the conversation with all its `messages`) or Markdown.
#[utoipa::path(get, path = "/api/conversations/{id}/export", tag = "conversations", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path), ExportQueryDoc),
    responses((status = 200, description = "An attachment: JSON, or with `format=markdown` Markdown",
        content((ConversationWithMessages = "application/json"), (String = "text/markdown"))),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn export_conversation(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    id: UuidPath,
    ExportQuery(format): ExportQuery,
) -> ApiResult<Response> {
    let c = owned_conversation(&state, &auth, id.one()).await?;
    let file = format!("{}.{}", export_file_stem(c.title.as_deref(), &c.id), format.extension());
    let content_type = match format {
        ExportFormat::Json => "application/json",
        ExportFormat::Markdown => "text/markdown; charset=utf-8",
    };
    let store = state.store.clone();
    let body = streamed(move |mut out| async move {
        match format {
            ExportFormat::Json => conversation_json(&store, &c, &mut out).await?,
            ExportFormat::Markdown => conversation_markdown(&store, &c, &mut out).await?,
        }
        out.finish().await
    });
    Ok(attachment(content_type, &file, body))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsagePeriodView {
    /// A UTC day (`2026-11-22`) or month (`2026-11`).
    pub period: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiUsageView {
    /// The API key; empty for calls made with an access token.
    pub key_id: String,
    pub model: String,
    pub day: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageExport {
    /// Chat tokens per day and month.
    pub periods: Vec<UsagePeriodView>,
    /// Gateway (`/v1`) calls per key, model and day.
    pub api: Vec<ApiUsageView>,
}

/// The shape of `/api/users/me/export` (written piece by piece).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AccountExport {
    pub exported_at: String,
    pub user: UserView,
    /// Without their secrets.
    pub api_keys: Vec<KeyView>,
    pub usage: UsageExport,
    pub conversations: Vec<ConversationWithMessages>,
}

/// Everything Palaver holds about the caller, as one JSON download: profile,
/// API keys (without secrets), usage, and every conversation with all its
/// messages.
#[utoipa::path(get, path = "/api/users/me/export", tag = "users", security(("bearer" = [])),
    responses((status = 200, body = AccountExport, description = "An attachment"), (status = 401, body = ErrorBody)))]
pub async fn export_account(State(state): State<Arc<AppState>>, auth: AuthUser) -> ApiResult<Response> {
    let user_id = auth.user.id.clone();
    // Usage this instance has counted but not written yet is written first.
    state.chat.flush_gateway_usage().await;
    let keys: Vec<KeyView> = state.store.list_api_keys(&user_id).await?.iter().map(KeyView::from).collect();
    let usage = UsageExport {
        periods: state
            .store
            .usage_periods(&user_id)
            .await?
            .into_iter()
            .map(|(period, t)| UsagePeriodView {
                period,
                prompt_tokens: t.prompt_tokens,
                completion_tokens: t.completion_tokens,
            })
            .collect(),
        api: state
            .store
            .api_usage_of(&user_id)
            .await?
            .into_iter()
            .map(|(k, c)| ApiUsageView {
                key_id: k.key_id,
                model: k.model,
                day: k.day,
                requests: c.requests,
                prompt_tokens: c.prompt_tokens,
                completion_tokens: c.completion_tokens,
            })
            .collect(),
    };
    let head = serde_json::json!({
        "exported_at": rfc3339(state.clock.now_ms()),
        "user": UserView::from(&auth.user),
        "api_keys": keys,
        "usage": usage,
    });
    let store = state.store.clone();
    let body = streamed(move |mut out| async move {
        let mut head = serde_json::to_vec(&head)?;
        head.pop();
        out.write(&head).await?;
        out.write(b",\"conversations\":[").await?;
        let mut after = String::new();
        let mut first = true;
        loop {
            let page = store.conversations_after(&user_id, &after, EXPORT_PAGE).await?;
            for c in &page {
                if !first {
                    out.write(b",").await?;
                }
                first = false;
                conversation_json(&store, c, &mut out).await?;
            }
            match page.last() {
                Some(c) if page.len() as i64 == EXPORT_PAGE => after = c.id.clone(),
                _ => break,
            }
        }
        out.write(b"]}").await?;
        out.finish().await
    });
    Ok(attachment("application/json", &format!("palaver-export-{}.json", auth.user.id), body))
}

fn attachment(content_type: &'static str, file: &str, body: Body) -> Response {
    let disposition = format!("attachment; filename=\"{file}\"");
    ([(header::CONTENT_TYPE, content_type.to_owned()), (header::CONTENT_DISPOSITION, disposition)], body)
        .into_response()
}

/// `{…the conversation…, "messages": [every message, oldest first]}`.
async fn conversation_json(store: &Store, c: &ConversationRecord, out: &mut Chunks) -> anyhow::Result<()> {
    let mut head = serde_json::to_vec(&ConversationView::from(c))?;
    head.pop(); // the closing brace: the messages follow inside it
    out.write(&head).await?;
    out.write(b",\"messages\":[").await?;
    let mut first = true;
    each_message_page(
        store,
        c,
        |page| {
            let mut bytes = Vec::new();
            for m in page {
                if !first {
                    bytes.push(b',');
                }
                first = false;
                serde_json::to_writer(&mut bytes, &MessageView::from(m))?;
            }
            Ok(bytes)
        },
        out,
    )
    .await?;
    out.write(b"]}").await
}

/// A heading with the title, then each message under its role and time.
async fn conversation_markdown(store: &Store, c: &ConversationRecord, out: &mut Chunks) -> anyhow::Result<()> {
    let title = c.title.clone().unwrap_or_else(|| format!("Conversation {}", c.id));
    let mut head = format!("# {title}\n\n");
    if let Some(prompt) = &c.system_prompt {
        head.push_str(&format!("> System prompt: {}\n\n", prompt.replace('\n', "\n> ")));
    }
    out.write(head.as_bytes()).await?;
    each_message_page(
        store,
        c,
        |page| {
            let mut text = String::new();
            for m in page {
                text.push_str(&format!("## {} · {}\n\n{}\n\n", m.role.as_str(), rfc3339(m.created_at), m.content));
            }
            Ok(text.into_bytes())
        },
        out,
    )
    .await
}

/// Writes what `render` makes of each page of the conversation's messages.
async fn each_message_page(
    store: &Store,
    c: &ConversationRecord,
    mut render: impl FnMut(&[crate::store::MessageRecord]) -> anyhow::Result<Vec<u8>>,
    out: &mut Chunks,
) -> anyhow::Result<()> {
    let mut after = 0;
    loop {
        let page = store.messages_after(&c.id, after, EXPORT_PAGE).await?;
        out.write(&render(&page)?).await?;
        match page.last() {
            Some(m) if page.len() as i64 == EXPORT_PAGE => after = m.seq,
            _ => return Ok(()),
        }
    }
}

/// The writing end of a streamed body: gathers bytes into chunks and waits
/// while the client has not taken the previous ones.
struct Chunks {
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    buf: Vec<u8>,
}

impl Chunks {
    async fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= CHUNK_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx.send(Ok(chunk)).await.map_err(|_| anyhow::anyhow!("the client went away"))
    }

    async fn finish(mut self) -> anyhow::Result<()> {
        self.flush().await
    }
}

/// A body written by `produce` in a task of its own.
fn streamed<F, Fut>(produce: F) -> Body
where
    F: FnOnce(Chunks) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(2);
    let failed = tx.clone();
    let task = produce(Chunks { tx, buf: Vec::with_capacity(CHUNK_BYTES) });
    tokio::spawn(async move {
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "export stopped before its end");
            let _ = failed.send(Err(io::Error::other("export stopped before its end"))).await;
        }
    });
    Body::from_stream(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) }))
}
