//! Rate limits that hold across instances (SPEC §6): failures or creations
//! counted per key in a fixed window. Counts are kept in this instance's
//! memory and, with REDIS_URL, also in Redis, where every instance adds to
//! and reads the same counter; a key is blocked when either count is past
//! the limit. While Redis does not answer the local count still protects.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::domain::throttle::FailureThrottle;

/// How long one Redis call of a limiter may take before the local count decides.
const REDIS_WAIT: Duration = Duration::from_millis(500);
/// How long a failing Redis is left alone.
const REDIS_REST: Duration = Duration::from_secs(1);

/// The Redis side shared by every limiter of an instance.
pub struct SharedCounters {
    client: redis::Client,
    prefix: String,
    manager: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    epoch: Instant,
    /// Milliseconds after `epoch` before which Redis is not tried.
    resting_until_ms: AtomicU64,
}

impl SharedCounters {
    pub fn new(client: redis::Client, prefix: &str) -> Arc<Self> {
        Arc::new(Self {
            client,
            prefix: prefix.to_owned(),
            manager: tokio::sync::OnceCell::new(),
            epoch: Instant::now(),
            resting_until_ms: AtomicU64::new(0),
        })
    }

    /// Runs `op` on a Redis connection within `REDIS_WAIT`; `None` (and a
    /// rest) when Redis is resting, slow or failing.
    async fn run<T, F, Fut>(&self, op: F) -> Option<T>
    where
        F: FnOnce(redis::aio::ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let now = self.epoch.elapsed().as_millis() as u64;
        if now < self.resting_until_ms.load(Ordering::Relaxed) {
            return None;
        }
        let attempt = async {
            let manager = self
                .manager
                .get_or_try_init(|| async {
                    let config = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(REDIS_WAIT))
                        .set_response_timeout(Some(REDIS_WAIT))
                        .set_number_of_retries(1);
                    redis::aio::ConnectionManager::new_with_config(self.client.clone(), config).await
                })
                .await?;
            op(manager.clone()).await
        };
        match tokio::time::timeout(REDIS_WAIT, attempt).await {
            Ok(Ok(value)) => Some(value),
            outcome => {
                let error = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                tracing::warn!(%error, "Redis did not answer a rate-limit call; counting on this instance only for now");
                let until = (self.epoch.elapsed() + REDIS_REST).as_millis() as u64;
                self.resting_until_ms.store(until, Ordering::Relaxed);
                None
            }
        }
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
        let counted = shared
            .run(|mut conn| async move {
                redis::pipe()
                    .cmd("GET")
                    .arg(&redis_key)
                    .cmd("PTTL")
                    .arg(&redis_key)
                    .query_async::<(Option<u32>, i64)>(&mut conn)
                    .await
            })
            .await;
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
        shared
            .run(|mut conn| async move {
                redis::pipe()
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
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await;
    }

    /// Forgets `key`'s count (e.g. after a successful login).
    pub async fn reset(&self, key: &str) {
        self.local.reset(key);
        let Some(shared) = &self.shared else { return };
        let redis_key = self.redis_key(shared, key);
        shared
            .run(|mut conn| async move { redis::cmd("DEL").arg(&redis_key).query_async::<()>(&mut conn).await })
            .await;
    }
}
