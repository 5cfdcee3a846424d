//! The state every part of the server shares: storage, time, keys,
//! providers, settings, the replies running here, the support desk and the
//! login throttle. Time, providers and storage are injected so tests can
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
    pub providers: Providers,
    pub settings: Arc<Settings>,
    pub metrics: Option<PrometheusHandle>,
    pub replies: crate::chat::Replies,
    pub login_throttle: crate::limits::LoginThrottle,
    /// Set when REDIS_URL is: shared state for several instances.
    pub redis: Option<redis::Client>,
    pub support: crate::desk::SupportDesk,
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
