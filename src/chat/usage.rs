//! Token totals that must not be lost when the database is briefly away: a
//! reply's usage that cannot be added at once is kept here, summed per user
//! and day (so memory stays bounded by the users active during an outage),
//! and written by a retry task once the database answers again.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::store::{Store, StoreError, UsagePeriod};

/// The longest pause between two retries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Default, Clone)]
pub struct UsageLedger {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// `(user, UTC day) → totals` not written yet.
    pending: Mutex<HashMap<(String, String), Pending>>,
    retrying: AtomicBool,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    /// A time inside the day (and month) the tokens count for.
    at_ms: i64,
    prompt: i64,
    completion: i64,
}

impl UsageLedger {
    /// Adds a reply's tokens to the user's totals, now or, if the database
    /// does not take them, as soon as it does.
    pub async fn add(&self, store: &Store, user_id: &str, now_ms: i64, prompt: i64, completion: i64) {
        match store.add_usage(user_id, now_ms, prompt, completion).await {
            Ok(()) => {}
            Err(e) if e.is_constraint_violation() => {
                tracing::warn!(error = e.to_string().as_str(), "usage of a user that no longer exists was not counted");
            }
            Err(e) => {
                tracing::warn!(
                    error = e.to_string().as_str(),
                    "could not add to the user's usage totals; kept to retry"
                );
                self.keep(user_id, now_ms, prompt, completion);
                self.retry_in_background(store.clone());
            }
        }
    }

    /// Totals waiting to be written, in tokens.
    /// Counts usage to be written by the next `flush`: for callers that must
    /// not wait for the database (the gateway's hot path).
    pub fn defer(&self, user_id: &str, now_ms: i64, prompt: i64, completion: i64) {
        self.keep(user_id, now_ms, prompt, completion);
    }

    pub fn pending_tokens(&self) -> i64 {
        self.inner.pending.lock().expect("usage lock poisoned").values().map(|p| p.prompt + p.completion).sum()
    }

    fn keep(&self, user_id: &str, at_ms: i64, prompt: i64, completion: i64) {
        let key = (user_id.to_owned(), UsagePeriod::Day.key(at_ms));
        let mut pending = self.inner.pending.lock().expect("usage lock poisoned");
        let entry = pending.entry(key).or_insert(Pending { at_ms, prompt: 0, completion: 0 });
        entry.prompt += prompt;
        entry.completion += completion;
    }

    /// Writes what is pending once; true when nothing is left.
    pub async fn flush(&self, store: &Store) -> bool {
        let batch: Vec<((String, String), Pending)> = {
            let mut pending = self.inner.pending.lock().expect("usage lock poisoned");
            pending.drain().collect()
        };
        for ((user_id, day), p) in batch {
            match store.add_usage(&user_id, p.at_ms, p.prompt, p.completion).await {
                Ok(()) => {}
                Err(e) if e.is_constraint_violation() => {
                    tracing::warn!(
                        error = e.to_string().as_str(),
                        "usage of a user that no longer exists was not counted"
                    );
                }
                Err(_) => {
                    let mut pending = self.inner.pending.lock().expect("usage lock poisoned");
                    let entry = pending.entry((user_id, day)).or_insert(Pending { prompt: 0, completion: 0, ..p });
                    entry.prompt += p.prompt;
                    entry.completion += p.completion;
                }
            }
        }
        self.inner.pending.lock().expect("usage lock poisoned").is_empty()
    }

    fn retry_in_background(&self, store: Store) {
        if self.inner.retrying.swap(true, Ordering::SeqCst) {
            return;
        }
        let ledger = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                tokio::time::sleep(backoff).await;
                if ledger.flush(&store).await {
                    ledger.inner.retrying.store(false, Ordering::SeqCst);
                    tracing::info!("usage totals kept during a database outage are written");
                    // Something kept between the flush and the flag: go on.
                    if ledger.pending_tokens() == 0 || ledger.inner.retrying.swap(true, Ordering::SeqCst) {
                        return;
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
    }
}

impl StoreError {
    /// The database refused the write for good (a foreign key, unique or
    /// check constraint): retrying cannot help.
    pub fn is_constraint_violation(&self) -> bool {
        match self {
            StoreError::Conflict(_) => true,
            StoreError::Sqlx(sqlx::Error::Database(db)) => {
                db.is_foreign_key_violation() || db.is_unique_violation() || db.is_check_violation()
            }
            _ => false,
        }
    }
}
