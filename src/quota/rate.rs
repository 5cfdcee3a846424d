//! Requests per minute as a GCRA (generic cell rate algorithm): each
//! subject has a theoretical arrival time that every admitted request
//! pushes on by `60 s / rpm`; a request is refused while that time is more
//! than a minute ahead. The same rule runs here (no Redis, or Redis away)
//! and as a Redis script (`shared.rs`).

use std::{collections::HashMap, sync::Mutex};

/// What one rate check answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Milliseconds to wait; 0 when admitted.
    pub wait_ms: i64,
    pub remaining: i64,
    pub reset_ms: i64,
}

/// The GCRA step: `tat` is the stored arrival time (if any); answers the
/// verdict and the new arrival time to store when admitted.
pub fn gcra(tat: Option<i64>, rpm: i64, now: i64) -> (Verdict, Option<i64>) {
    let interval = 60_000 / rpm.max(1);
    let burst = interval * rpm.max(1);
    let tat = tat.unwrap_or(now).max(now);
    let next = tat + interval;
    let allow_at = next - burst;
    if now < allow_at {
        let remaining = 0;
        return (Verdict { wait_ms: allow_at - now, remaining, reset_ms: tat - now }, None);
    }
    let remaining = (burst - (next - now)) / interval;
    (Verdict { wait_ms: 0, remaining, reset_ms: next - now }, Some(next))
}

/// Entries kept at most; past that, finished ones are swept.
const MAX_ENTRIES: usize = 100_000;

#[derive(Default)]
pub struct LocalRates {
    tats: Mutex<HashMap<String, i64>>,
}

impl LocalRates {
    pub fn check(&self, subject: &str, rpm: i64, now: i64) -> Verdict {
        let mut tats = self.tats.lock().expect("rates lock poisoned");
        if tats.len() >= MAX_ENTRIES {
            tats.retain(|_, tat| *tat > now);
        }
        let (verdict, next) = gcra(tats.get(subject).copied(), rpm, now);
        if let Some(next) = next {
            tats.insert(subject.to_owned(), next);
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_rpm_a_minute_then_waits_for_the_next_slot() {
        let rates = LocalRates::default();
        for i in 0..3 {
            let v = rates.check("a", 3, 0);
            assert_eq!(v.wait_ms, 0, "request {i}");
            assert_eq!(v.remaining, 2 - i);
        }
        let refused = rates.check("a", 3, 0);
        assert_eq!(refused.wait_ms, 20_000);
        assert_eq!(rates.check("b", 3, 0).wait_ms, 0, "subjects are apart");
        assert_eq!(rates.check("a", 3, 20_000).wait_ms, 0);
    }
}
