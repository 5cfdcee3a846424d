//! Injected ids: every id the server mints comes from the `Ids` in the
//! state, beside the clock, so tests can fix them. Secrets (tokens) are not
//! ids and stay random (`auth::random_token`).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

pub trait Ids: Send + Sync + 'static {
    /// An id of no particular order: accounts, conversations, sessions.
    fn random(&self) -> String;
    /// An id that sorts by creation time: messages.
    fn ordered(&self) -> String;
}

/// UUIDs: v4 for random ids, v7 for ordered ones.
#[derive(Debug, Default, Clone, Copy)]
pub struct UuidIds;

impl Ids for UuidIds {
    fn random(&self) -> String {
        uuid::Uuid::new_v4().to_string()
    }

    fn ordered(&self) -> String {
        uuid::Uuid::now_v7().to_string()
    }
}

/// Ids a test can predict: UUIDs counting up from 1, both kinds alike.
#[derive(Debug, Default, Clone)]
pub struct SequentialIds(Arc<AtomicU64>);

impl SequentialIds {
    /// The id the `n`th call (counting from 1) answers.
    pub fn nth(n: u64) -> String {
        uuid::Uuid::from_u128(u128::from(n)).to_string()
    }
}

impl Ids for SequentialIds {
    fn random(&self) -> String {
        Self::nth(self.0.fetch_add(1, Ordering::SeqCst) + 1)
    }

    fn ordered(&self) -> String {
        self.random()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_ids_are_uuids_counting_up() {
        let ids = SequentialIds::default();
        assert_eq!(ids.random(), "00000000-0000-0000-0000-000000000001");
        assert_eq!(ids.ordered(), SequentialIds::nth(2));
        assert!(UuidIds.ordered() < UuidIds.ordered(), "v7 ids sort by creation");
    }
}
