//! /api/search (the caller's messages) and /api/agent/search (support
//! transcripts, agents and admins): literal, case-insensitive search,
//! newest first, a page of hits with a snippet around each match.

use std::sync::Arc;

use axum::{Json, extract::State};
use serde::Serialize;
use utoipa::ToSchema;

use super::{
    AppState,
    error::ApiResult,
    extract::{AuthUser, PageQuery, Pagination, SearchQuery, SearchQueryDoc},
    views::{ErrorBody, Page},
};
use crate::{
    clock::rfc3339,
    domain::{conversation::MessageRole, user::Role},
    store::{SearchHit, SearchScope},
};

#[derive(Debug, Serialize, ToSchema)]
pub struct SearchHitView {
    #[schema(format = Uuid)]
    pub conversation_id: String,
    pub conversation_title: Option<String>,
    #[schema(format = Uuid)]
    pub message_id: String,
    pub role: MessageRole,
    pub created_at: String,
    /// The message's text around the first match.
    pub snippet: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentSearchHitView {
    #[schema(format = Uuid)]
    pub session_id: String,
    #[schema(format = Uuid)]
    pub message_id: String,
    pub role: MessageRole,
    pub created_at: String,
    pub snippet: String,
}

/// The caller's messages containing `q`, newest first. `total` counts the
/// matches among the newest 5,000 candidates.
#[utoipa::path(get, path = "/api/search", tag = "conversations", security(("bearer" = [])),
    params(SearchQueryDoc, PageQuery),
    responses((status = 200, body = Page<SearchHitView>), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn search(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    SearchQuery(term): SearchQuery,
    page: Pagination,
) -> ApiResult<Json<Page<SearchHitView>>> {
    let scope = SearchScope::Owner(&auth.user.id);
    let (hits, total) = state.store.search_messages(scope, &term, page.per_page, page.offset()).await?;
    let items = hits
        .into_iter()
        .map(|h| SearchHitView {
            created_at: rfc3339(h.created_at),
            conversation_id: h.conversation_id,
            conversation_title: h.conversation_title,
            message_id: h.message_id,
            role: h.role,
            snippet: h.snippet,
        })
        .collect();
    Ok(Json(Page { items, page: page.page, per_page: page.per_page, total }))
}

/// Support transcripts containing `q`, newest first (agents and admins).
#[utoipa::path(get, path = "/api/agent/search", tag = "support", security(("bearer" = [])),
    params(SearchQueryDoc, PageQuery),
    responses((status = 200, body = Page<AgentSearchHitView>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Neither an agent nor an admin"), (status = 422, body = ErrorBody)))]
pub async fn agent_search(
    State(state): State<Arc<AppState>>,
    auth: AuthUser,
    SearchQuery(term): SearchQuery,
    page: Pagination,
) -> ApiResult<Json<Page<AgentSearchHitView>>> {
    auth.require(&[Role::Agent, Role::Admin])?;
    let (hits, total) =
        state.store.search_messages(SearchScope::SupportDesk, &term, page.per_page, page.offset()).await?;
    let items = hits.into_iter().map(agent_hit).collect();
    Ok(Json(Page { items, page: page.page, per_page: page.per_page, total }))
}

fn agent_hit(h: SearchHit) -> AgentSearchHitView {
    AgentSearchHitView {
        created_at: rfc3339(h.created_at),
        session_id: h.session_id.unwrap_or_default(),
        message_id: h.message_id,
        role: h.role,
        snippet: h.snippet,
    }
}
