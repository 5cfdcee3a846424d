//! The one limiter of the server (SPEC §6): failures or creations counted
//! per key in a fixed window — failed logins per address and per account,
//! support sessions per address. Counts are kept in this instance's memory
//! and, with REDIS_URL, also in Redis, where every instance adds to and
//! reads the same counter; a key is blocked when either count is past the
//! limit. While Redis does not answer the local count still protects.

use std::{collections::HashMap, sync::Arc, sync::Mutex, time::Duration};

use crate::{error::Error, redis_link::RedisLink};

/// A blocked limit as an answer (`Error::rate_limited`); `Ok` when free.
pub fn refuse(blocked_for_ms: Option<i64>, code: &'static str, detail: &str) -> Result<(), Error> {
    blocked_for_ms.map_or(Ok(()), |ms| Err(Error::rate_limited(code, detail, ms)))
}

/// Failed logins counted per client address and per account (SPEC §6),
/// and registrations per client address, across instances when Redis is
/// configured.
pub struct LoginThrottle {
    pub per_address: Limiter,
    pub per_account: Limiter,
    /// Registrations per client address and hour (`PALAVER_REGISTRATIONS_PER_IP`).
    pub registrations: Limiter,
}

impl LoginThrottle {
    pub fn new(shared: Option<Arc<SharedCounters>>, registrations_per_hour: u32) -> Self {
        const WINDOW_MS: i64 = 15 * 60 * 1000;
        Self {
            per_address: Limiter::new("login-address", 30, WINDOW_MS, shared.clone()),
            per_account: Limiter::new("login-account", 10, WINDOW_MS, shared.clone()),
            registrations: Limiter::new("registrations", registrations_per_hour, 60 * 60 * 1000, shared),
        }
    }
}

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
    local: LocalCounts,
    shared: Option<Arc<SharedCounters>>,
}

impl Limiter {
    pub fn new(name: &'static str, limit: u32, window_ms: i64, shared: Option<Arc<SharedCounters>>) -> Self {
        Self { name, limit, window_ms, local: LocalCounts::new(limit, window_ms), shared }
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

    /// `Err(RateLimited)` saying `detail` while `key` is blocked.
    pub async fn check(&self, key: &str, now: i64, code: &'static str, detail: &str) -> Result<(), Error> {
        refuse(self.blocked_for(key, now).await, code, detail)
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

/// This instance's own counts (the limit while Redis is away).
struct LocalCounts {
    limit: u32,
    window_ms: i64,
    entries: Mutex<HashMap<String, (u32, i64)>>,
}

/// Entries kept at most; beyond it, expired windows are swept first.
const MAX_ENTRIES: usize = 100_000;

impl LocalCounts {
    fn new(limit: u32, window_ms: i64) -> Self {
        Self { limit, window_ms, entries: Mutex::new(HashMap::new()) }
    }

    /// Milliseconds until `key` may try again, if it is blocked now.
    fn blocked_for(&self, key: &str, now: i64) -> Option<i64> {
        let entries = self.entries.lock().expect("throttle lock poisoned");
        let &(count, start) = entries.get(key)?;
        let ends = start + self.window_ms;
        (count >= self.limit && ends > now).then_some(ends - now)
    }

    fn record_failure(&self, key: &str, now: i64) {
        let mut entries = self.entries.lock().expect("throttle lock poisoned");
        if entries.len() >= MAX_ENTRIES {
            let window = self.window_ms;
            entries.retain(|_, &mut (_, start)| start + window > now);
        }
        let entry = entries.entry(key.to_owned()).or_insert((0, now));
        if entry.1 + self.window_ms <= now {
            *entry = (0, now);
        }
        entry.0 += 1;
    }

    fn reset(&self, key: &str) {
        self.entries.lock().expect("throttle lock poisoned").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_until_the_window_ends() {
        let t = LocalCounts::new(3, 1000);
        for _ in 0..2 {
            t.record_failure("a", 0);
        }
        assert_eq!(t.blocked_for("a", 10), None);
        t.record_failure("a", 10);
        assert_eq!(t.blocked_for("a", 10), Some(990));
        assert_eq!(t.blocked_for("b", 10), None);
        assert_eq!(t.blocked_for("a", 1000), None);
        t.record_failure("a", 1000);
        assert_eq!(t.blocked_for("a", 1000), None, "a new window starts empty");
        t.reset("a");
        assert_eq!(t.blocked_for("a", 1000), None);
    }
}
