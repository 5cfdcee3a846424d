//! The state the web side shares: the reply engine (`chat`) and the support
//! desk (`desk`), each with its own narrow handle, and what the handlers
//! themselves need (storage, time, ids, token keys, settings, the login
//! throttle). Time, ids, providers and storage are injected so tests can
//! control them.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::{
    auth::{PasswordHasher, TokenKeys},
    clock::Clock,
    config::Settings,
    providers::Providers,
    store::Store,
};

/// Everything a request may use.
pub struct AppState {
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    /// Where every minted id comes from.
    pub ids: Arc<dyn crate::ids::Ids>,
    pub keys: TokenKeys,
    pub hasher: PasswordHasher,
    /// Account management (the CLI uses it too).
    pub accounts: crate::accounts::Accounts,
    pub providers: Providers,
    pub settings: Arc<Settings>,
    pub metrics: Option<PrometheusHandle>,
    /// The reply engine.
    pub chat: Arc<crate::chat::Chat>,
    /// The support desk.
    pub desk: Arc<crate::desk::Desk>,
    pub login_throttle: crate::limits::LoginThrottle,
    /// Set when REDIS_URL is: shared state for several instances.
    pub redis: Option<redis::Client>,
    /// Cancelled when the server stops; background tasks end with it.
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl AppState {
    pub fn access_ttl_secs(&self) -> i64 {
        self.settings.auth.access_token_expire_minutes as i64 * 60
    }

    pub fn refresh_ttl_secs(&self) -> i64 {
        self.settings.auth.refresh_token_expire_days as i64 * 86_400
    }
}
