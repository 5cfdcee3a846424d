//! HTTP layer: the router (every route and layer, in one place), shared
//! state, extractors, error mapping and the handlers, one file per area.

pub mod admin;
pub mod auth;
pub mod chat;
pub mod conversations;
pub mod docs;
pub mod error;
pub mod export;
pub mod extract;
pub mod framing;
pub mod keys;
pub mod middleware;
pub mod openai;
pub mod ops;
pub mod responses;
pub mod search;
pub mod send;
pub mod serve;
pub mod socket;
pub mod streaming;
pub mod support;
pub mod support_ws;
pub mod usage;
pub mod users;
pub mod views;
pub mod ws;

pub use crate::state::AppState;

use std::sync::Arc;

use axum::{Router, extract::DefaultBodyLimit};
use docs::{CommonResponses, SecurityAddon, ServerLimits, SupportLinks};
use tower_http::{
    catch_panic::CatchPanicLayer,
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
};
use utoipa::{Modify, OpenApi};
use utoipa_axum::{router::OpenApiRouter, routes};

/// Largest accepted request body (SPEC §1).
pub const BODY_LIMIT: usize = 1024 * 1024;

#[derive(OpenApi)]
#[openapi(
    info(title = "Palaver", description = "Self-hostable AI chatbot backend."),
    components(schemas(views::ErrorBody, crate::domain::support::SupportStatus)),
    modifiers(&SecurityAddon),
    tags(
        (name = "auth", description = "Accounts and login sessions"),
        (name = "users", description = "The current user"),
        (name = "keys", description = "API keys for /v1 and /api"),
        (name = "admin", description = "User management"),
        (name = "conversations", description = "Conversations and messages"),
        (name = "chat", description = "One-call chat and history"),
        (name = "support", description = "Support desk: visitors, the queue and agents"),
        (name = "ops", description = "Health, readiness and metrics"),
    )
)]
pub struct ApiDoc;

/// The API routes with their OpenAPI description.
pub fn api_routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(auth::register))
        .routes(routes!(auth::login))
        .routes(routes!(auth::refresh))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::list_sessions))
        .routes(routes!(auth::revoke_session))
        .routes(routes!(users::me, users::update_me, users::delete_me))
        .routes(routes!(export::export_account))
        .routes(routes!(keys::create, keys::list))
        .routes(routes!(keys::revoke, keys::update))
        .routes(routes!(usage::my_usage))
        .routes(routes!(admin::list_users))
        .routes(routes!(admin::update_user))
        .routes(routes!(usage::user_usage))
        .routes(routes!(conversations::create, conversations::list))
        .routes(routes!(conversations::get_one, conversations::update, conversations::delete))
        .routes(routes!(conversations::list_messages, conversations::post_message))
        .routes(routes!(export::export_conversation))
        .routes(routes!(streaming::resume))
        .routes(routes!(streaming::cancel))
        .routes(routes!(chat::chat))
        .routes(routes!(chat::chat_stream))
        .routes(routes!(ws::chat_socket))
        .routes(routes!(chat::history))
        .routes(routes!(search::search))
        .routes(routes!(chat::models))
        .routes(routes!(support::create_session))
        .routes(routes!(support::get_session))
        .routes(routes!(support::list_messages, support::post_message))
        .routes(routes!(support::handoff))
        .routes(routes!(support::queue))
        .routes(routes!(support::sessions))
        .routes(routes!(support::active))
        .routes(routes!(support::claim))
        .routes(routes!(support::agent_message))
        .routes(routes!(support::release))
        .routes(routes!(support::close))
        .routes(routes!(search::agent_search))
        .routes(routes!(support_ws::client_socket))
        .routes(routes!(support_ws::agent_socket))
        .routes(routes!(ops::health))
        .routes(routes!(ops::ready))
        .routes(routes!(ops::metrics))
}

/// The API routes and their finished document: the statuses every route
/// shares and the limits of this configuration added to what the handlers'
/// annotations say.
pub fn api_parts(limits: &ServerLimits) -> (Router<Arc<AppState>>, utoipa::openapi::OpenApi) {
    let (api, mut openapi) = api_routes().split_for_parts();
    CommonResponses.modify(&mut openapi);
    SupportLinks.modify(&mut openapi);
    limits.modify(&mut openapi);
    (api, openapi)
}

/// The OpenAI-compatible routes. They speak OpenAI's format, not this API's,
/// so OpenAI's reference documents them rather than `/openapi.json`.
fn v1_routes() -> Router<Arc<AppState>> {
    use axum::routing::{get, post};
    Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/responses", post(responses::responses))
}

/// The whole application: API, docs, fallbacks and the layer stack.
pub fn router(state: Arc<AppState>) -> Router {
    let limits = ServerLimits {
        providers: state.providers.provider_names(),
        max_message_chars: state.settings.chat.max_message_chars as usize,
    };
    let (api, openapi) = api_parts(&limits);
    let cors = middleware::cors(&state.settings.server.cors_origins());
    api.merge(docs::routes(openapi))
        .merge(v1_routes())
        .fallback(|| async { error::ApiError::NotFound })
        .method_not_allowed_fallback(|| async { error::ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn(middleware::access_log))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(middleware::reject_large_bodies))
        .layer(CatchPanicLayer::custom(middleware::panic_response))
        .layer(cors)
        .layer(axum::middleware::from_fn(middleware::security_headers))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(axum::middleware::from_fn(middleware::drop_unusable_request_id))
        .with_state(state)
}
