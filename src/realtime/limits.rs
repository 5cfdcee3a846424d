//! Rate limits that hold across instances (SPEC §6): failures or creations
//! counted per key in a fixed window. Counts are kept in this instance's
//! memory and, with REDIS_URL, also in Redis, where every instance adds to
//! and reads the same counter; a key is blocked when either count is past
//! the limit. While Redis does not answer the local count still protects.

use std::{sync::Arc, time::Duration};

use super::redis_link::RedisLink;
use crate::domain::throttle::FailureThrottle;

/// How long one Redis call of a limiter may take before the local count decides.
const REDIS_WAIT: Duration = Duration::from_millis(500);

/// The Redis side shared by every limiter of an instance.
pub struct SharedCounters {
    link: RedisLink,
    prefix: String,
}

impl SharedCounters {
    pub fn new(client: redis::Client, prefix: &str) -> Arc<Self> {
        Arc::new(Self { link: RedisLink::new(client, REDIS_WAIT, "rate limits"), prefix: prefix.to_owned() })
    }
}

/// One named limit: at most `limit` counts per key in a window.
pub struct Limiter {
    name: &'static str,
    limit: u32,
    window_ms: i64,
    local: FailureThrottle,
    shared: Option<Arc<SharedCounters>>,
}

impl Limiter {
    pub fn new(name: &'static str, limit: u32, window_ms: i64, shared: Option<Arc<SharedCounters>>) -> Self {
        Self { name, limit, window_ms, local: FailureThrottle::new(limit, window_ms), shared }
    }

    fn redis_key(&self, shared: &SharedCounters, key: &str) -> String {
        format!("{}:limit:{}:{key}", shared.prefix, self.name)
    }

    /// Milliseconds until `key` may go on, if it is blocked now.
    pub async fn blocked_for(&self, key: &str, now: i64) -> Option<i64> {
        let local = self.local.blocked_for(key, now);
        let Some(shared) = &self.shared else { return local };
        let redis_key = self.redis_key(shared, key);
        let counted: Option<(Option<u32>, i64)> =
            shared.link.query(redis::pipe().cmd("GET").arg(&redis_key).cmd("PTTL").arg(&redis_key)).await;
        let remote = match counted {
            Some((Some(count), ttl)) if count >= self.limit && ttl > 0 => Some(ttl),
            _ => None,
        };
        local.max(remote)
    }

    /// Counts one for `key`.
    pub async fn record(&self, key: &str, now: i64) {
        self.local.record_failure(key, now);
        let Some(shared) = &self.shared else { return };
        let redis_key = self.redis_key(shared, key);
        let window = self.window_ms;
        // The window starts with the first count (SET … NX keeps an existing
        // one and its expiry); INCR leaves the expiry alone.
        let count = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(&redis_key)
            .arg(0)
            .arg("PX")
            .arg(window)
            .arg("NX")
            .ignore()
            .cmd("INCR")
            .arg(&redis_key)
            .ignore()
            .clone();
        shared.link.query::<()>(&count).await;
    }

    /// Forgets `key`'s count (e.g. after a successful login).
    pub async fn reset(&self, key: &str) {
        self.local.reset(key);
        let Some(shared) = &self.shared else { return };
        let redis_key = self.redis_key(shared, key);
        shared.link.query::<()>(redis::pipe().cmd("DEL").arg(&redis_key).ignore()).await;
    }
}
