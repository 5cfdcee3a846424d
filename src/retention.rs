//! The retention sweeper: every PALAVER_RETENTION_SWEEP_SECS it deletes the
//! conversations idle past their retention (the server's or their owner's,
//! whichever is shorter) and the support sessions closed past theirs, in
//! small batches. When several instances share a database, the one holding
//! the `retention` lease sweeps; the others wait their turn.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    clock::Clock,
    config::RetentionSettings,
    store::{Store, StoreError},
};

const LEASE: &str = "retention";
/// Rows deleted per statement.
const ROW_BATCH: i64 = 500;
/// Conversations or sessions looked up per query.
const DUE_BATCH: i64 = 100;
/// A pause between two batches of conversations, so other writers get the database.
const PAUSE: Duration = Duration::from_millis(5);
const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// What one sweep deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub conversations: u64,
    pub support_sessions: u64,
}

pub struct Sweeper {
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub settings: RetentionSettings,
    /// This instance's name on the lease.
    pub holder: String,
}

/// Puts the sweeper's counters on /metrics at 0.
pub fn register_metrics() {
    for kind in ["conversation", "support_session"] {
        metrics::counter!("palaver_retention_deleted_total", "kind" => kind).increment(0);
    }
}

impl Sweeper {
    /// How long the lease lasts: a few sweeps, so a holder that died is
    /// replaced soon, and one that is sweeping renews it between batches.
    fn lease_ms(&self) -> i64 {
        (self.settings.retention_sweep_secs as i64 * 3 * 1000).max(30_000)
    }

    /// Sweeps every interval until `stop`, then gives the lease up.
    pub fn spawn(self, stop: CancellationToken) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(self.settings.retention_sweep_secs));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    swept = self.sweep() => match swept {
                        Ok(Some(n)) if n != Swept::default() => tracing::info!(
                            conversations = n.conversations,
                            support_sessions = n.support_sessions,
                            "deleted data past its retention"
                        ),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = e.to_string().as_str(), "the retention sweep failed"),
                    },
                }
            }
            let _ = self.store.release_lease(LEASE, &self.holder).await;
        });
    }

    /// One sweep, if this instance holds the lease (`None` when another does).
    pub async fn sweep(&self) -> Result<Option<Swept>, StoreError> {
        if !self.renew().await? {
            return Ok(None);
        }
        let mut swept = Swept::default();
        loop {
            let due =
                self.store.conversations_due(self.settings.retention_days, self.clock.now_ms(), DUE_BATCH).await?;
            for conversation in &due {
                if self.store.delete_due_conversation(conversation, ROW_BATCH).await? {
                    swept.conversations += 1;
                    metrics::counter!("palaver_retention_deleted_total", "kind" => "conversation").increment(1);
                }
            }
            // A conversation that became active again stays in no later batch.
            if (due.len() as i64) < DUE_BATCH || !self.pause_and_renew().await? {
                break;
            }
        }
        if let Some(days) = self.settings.support_retention_days {
            loop {
                let cutoff = self.clock.now_ms() - days * DAY_MS;
                let due = self.store.support_sessions_due(cutoff, DUE_BATCH).await?;
                for (session, conversation) in &due {
                    if self.store.delete_support_session(session, conversation, ROW_BATCH).await? {
                        swept.support_sessions += 1;
                        metrics::counter!("palaver_retention_deleted_total", "kind" => "support_session").increment(1);
                    }
                }
                if (due.len() as i64) < DUE_BATCH || !self.pause_and_renew().await? {
                    break;
                }
            }
        }
        Ok(Some(swept))
    }

    async fn renew(&self) -> Result<bool, StoreError> {
        self.store.take_lease(LEASE, &self.holder, self.clock.now_ms(), self.lease_ms()).await
    }

    async fn pause_and_renew(&self) -> Result<bool, StoreError> {
        tokio::time::sleep(PAUSE).await;
        self.renew().await
    }
}
