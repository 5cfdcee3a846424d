//! HTTP layer: the router (every route and layer, in one place), shared
//! state, extractors, error mapping and the handlers, one file per area.

pub mod admin;
pub mod auth;
pub mod chat;
pub mod conversations;
pub mod docs;
pub mod error;
pub mod extract;
pub mod middleware;
pub mod ops;
pub mod streaming;
pub mod support;
pub mod support_ws;
pub mod users;
pub mod views;
pub mod ws;

use std::sync::Arc;

use axum::{Router, extract::DefaultBodyLimit};
use docs::SecurityAddon;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::{
    catch_panic::CatchPanicLayer,
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
};
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::{PasswordHasher, TokenKeys},
    clock::Clock,
    config::Settings,
    providers::Providers,
    store::Store,
};

/// Largest accepted request body (SPEC §1).
pub const BODY_LIMIT: usize = 1024 * 1024;

/// Everything a handler may use; time, providers and storage are injected so
/// tests can control them.
pub struct AppState {
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub keys: TokenKeys,
    pub hasher: PasswordHasher,
    pub providers: Providers,
    pub settings: Arc<Settings>,
    pub metrics: Option<PrometheusHandle>,
    pub replies: crate::realtime::Replies,
    pub login_throttle: LoginThrottle,
    /// Set when REDIS_URL is: shared state for several instances.
    pub redis: Option<redis::Client>,
    pub support: crate::realtime::support::SupportDesk,
    /// Cancelled when the server stops; background tasks end with it.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// Failed logins counted per client address and per account (SPEC §6),
/// and registrations per client address, across instances when Redis is
/// configured.
pub struct LoginThrottle {
    pub per_address: crate::realtime::limits::Limiter,
    pub per_account: crate::realtime::limits::Limiter,
    /// Built on first use, from the limit in the settings (this is made
    /// before the settings reach the state).
    registrations: std::sync::OnceLock<crate::realtime::limits::Limiter>,
    shared: Option<Arc<crate::realtime::limits::SharedCounters>>,
}

impl LoginThrottle {
    pub fn new(shared: Option<Arc<crate::realtime::limits::SharedCounters>>) -> Self {
        use crate::realtime::limits::Limiter;
        const WINDOW_MS: i64 = 15 * 60 * 1000;
        Self {
            per_address: Limiter::new("login-address", 30, WINDOW_MS, shared.clone()),
            per_account: Limiter::new("login-account", 10, WINDOW_MS, shared.clone()),
            registrations: Default::default(),
            shared,
        }
    }

    /// Registrations per client address and hour (`PALAVER_REGISTRATIONS_PER_IP`).
    pub fn registrations(&self, per_hour: u32) -> &crate::realtime::limits::Limiter {
        self.registrations.get_or_init(|| {
            crate::realtime::limits::Limiter::new("registrations", per_hour, 60 * 60 * 1000, self.shared.clone())
        })
    }
}

impl AppState {
    pub fn access_ttl_secs(&self) -> i64 {
        self.settings.access_token_expire_minutes as i64 * 60
    }

    pub fn refresh_ttl_secs(&self) -> i64 {
        self.settings.refresh_token_expire_days as i64 * 86_400
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Palaver", description = "Self-hostable AI chatbot backend."),
    components(schemas(views::ErrorBody)),
    modifiers(&SecurityAddon),
    tags(
        (name = "auth", description = "Accounts and login sessions"),
        (name = "users", description = "The current user"),
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
        .routes(routes!(admin::list_users))
        .routes(routes!(admin::update_user))
        .routes(routes!(conversations::create, conversations::list))
        .routes(routes!(conversations::get_one, conversations::update, conversations::delete))
        .routes(routes!(conversations::list_messages, conversations::post_message))
        .routes(routes!(streaming::resume))
        .routes(routes!(streaming::cancel))
        .routes(routes!(chat::chat))
        .routes(routes!(streaming::chat_stream))
        .routes(routes!(ws::chat_socket))
        .routes(routes!(chat::history))
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
        .routes(routes!(support_ws::client_socket))
        .routes(routes!(support_ws::agent_socket))
        .routes(routes!(ops::health))
        .routes(routes!(ops::ready))
        .routes(routes!(ops::metrics))
}

/// The whole application: API, docs, fallbacks and the layer stack.
pub fn router(state: Arc<AppState>) -> Router {
    let (api, openapi) = api_routes().split_for_parts();
    let cors = middleware::cors(&state.settings.cors_origins());
    api.merge(docs::routes(openapi))
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
