//! Failed-login throttling: counts failures per key (client address, and
//! account) in a fixed window. Past the limit, logins for that key are
//! refused until the window ends — long before a password could be guessed,
//! while ordinary use never comes near it. Kept in memory per instance.

use std::{collections::HashMap, sync::Mutex};

pub struct FailureThrottle {
    limit: u32,
    window_ms: i64,
    entries: Mutex<HashMap<String, (u32, i64)>>,
}

/// Entries kept at most; beyond it, expired windows are swept first.
const MAX_ENTRIES: usize = 100_000;

impl FailureThrottle {
    pub fn new(limit: u32, window_ms: i64) -> Self {
        Self { limit, window_ms, entries: Mutex::new(HashMap::new()) }
    }

    /// Milliseconds until `key` may try again, if it is blocked now.
    pub fn blocked_for(&self, key: &str, now: i64) -> Option<i64> {
        let entries = self.entries.lock().expect("throttle lock poisoned");
        let &(count, start) = entries.get(key)?;
        let ends = start + self.window_ms;
        (count >= self.limit && ends > now).then_some(ends - now)
    }

    pub fn record_failure(&self, key: &str, now: i64) {
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

    pub fn reset(&self, key: &str) {
        self.entries.lock().expect("throttle lock poisoned").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_until_the_window_ends() {
        let t = FailureThrottle::new(3, 1000);
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
