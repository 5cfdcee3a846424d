//! Delivery in log order. Every logged event reaches this instance's sockets
//! through one `Sequencer`, which hands them on in id order: an event whose
//! predecessor has not arrived is held back until it does or, after a
//! moment, until the log says what lies between (event ids are given out in
//! commit order, so once an id is visible every lower one is committed or
//! abandoned). Events that are not logged (deltas, queue changes) pass at once.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use super::events::{BusEvent, BusMessage};
use crate::store::{Store, StoreResult, SupportEventRecord};

/// How long an event waits for a missing predecessor still on its way
/// (published by another instance a moment later) before the log is asked.
const HOLD: Duration = Duration::from_millis(40);
/// The longest an event is held while the log cannot be read: then it is
/// delivered, and the sockets told to re-read the log once it answers.
const GIVE_UP: Duration = Duration::from_secs(5);
/// Rows per read of the log.
const BATCH: usize = 1000;

/// Where the sequencer learns what it missed: the support event log.
#[async_trait::async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Events with `after < id < before`, oldest first (at most `BATCH`).
    async fn between(&self, after: i64, before: i64) -> StoreResult<Vec<SupportEventRecord>>;
    /// The highest id logged.
    async fn last(&self) -> StoreResult<i64>;
}

#[async_trait::async_trait]
impl EventLog for Store {
    async fn between(&self, after: i64, before: i64) -> StoreResult<Vec<SupportEventRecord>> {
        self.support_events_between(after, before).await
    }

    async fn last(&self) -> StoreResult<i64> {
        self.last_support_event().await
    }
}

/// The sending side; the sequencer task runs until `stop` or until every
/// sender is gone.
#[derive(Clone)]
pub struct Sequencer(mpsc::UnboundedSender<BusMessage>);

impl Sequencer {
    /// Starts the task that delivers to `deliver` in order.
    pub fn start(
        log: Arc<dyn EventLog>,
        deliver: impl Fn(BusMessage) + Send + 'static,
        stop: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(log, rx, deliver, stop));
        Self(tx)
    }

    pub fn send(&self, message: BusMessage) {
        let _ = self.0.send(message);
    }
}

struct Order<F> {
    log: Arc<dyn EventLog>,
    deliver: F,
    /// Every id up to this one is delivered or known not to exist; `None`
    /// until the log (or the first event) says where the log stands.
    done: Option<i64>,
    held: BTreeMap<i64, Arc<BusEvent>>,
    /// When the oldest event held started waiting.
    waiting_since: Option<Instant>,
}

async fn run<F: Fn(BusMessage)>(
    log: Arc<dyn EventLog>,
    mut rx: mpsc::UnboundedReceiver<BusMessage>,
    deliver: F,
    stop: CancellationToken,
) {
    let done = log.last().await.ok();
    let mut order = Order { log, deliver, done, held: BTreeMap::new(), waiting_since: None };
    loop {
        let deadline = order.waiting_since.map(|since| since + HOLD);
        tokio::select! {
            _ = stop.cancelled() => return,
            message = rx.recv() => match message {
                Some(m) => order.receive(m).await,
                None => return,
            },
            _ = sleep_until(deadline) => order.fill_gap().await,
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl<F: Fn(BusMessage)> Order<F> {
    async fn receive(&mut self, message: BusMessage) {
        let event = match message {
            BusMessage::Resync => return self.catch_up().await,
            BusMessage::Event(e) if matches!(e.as_ref(), BusEvent::Resync) => return self.catch_up().await,
            BusMessage::Event(e) => e,
        };
        let Some(seq) = event.seq() else { return (self.deliver)(BusMessage::Event(event)) };
        let done = *self.done.get_or_insert(seq - 1);
        if seq <= done {
            return; // delivered already (read from the log, or published twice)
        }
        self.held.insert(seq, event);
        self.flush();
    }

    /// Hands on the events that follow without a gap.
    fn flush(&mut self) {
        while let Some(entry) = self.held.first_entry() {
            let seq = *entry.key();
            if self.done.is_some_and(|done| seq != done + 1) {
                break;
            }
            let event = entry.remove();
            self.done = Some(seq);
            (self.deliver)(BusMessage::Event(event));
        }
        self.waiting_since = match (self.held.is_empty(), self.waiting_since) {
            (true, _) => None,
            (false, Some(since)) => Some(since),
            (false, None) => Some(Instant::now()),
        };
    }

    /// The oldest held event waited long enough: what lies before it is in
    /// the log (or never will be).
    async fn fill_gap(&mut self) {
        let (Some(done), Some(&first)) = (self.done, self.held.keys().next()) else { return };
        if self.read_until(done, first).await {
            self.done = Some(self.done.unwrap_or(done).max(first - 1));
        } else if self.waiting_since.is_some_and(|since| since.elapsed() >= GIVE_UP) {
            tracing::warn!("the support event log cannot be read; delivering held events, sockets will resync");
            self.done = Some(first - 1);
            self.flush();
            (self.deliver)(BusMessage::Resync);
            return;
        } else {
            // Try again after another hold.
            self.waiting_since = Some(Instant::now());
            return;
        }
        self.waiting_since = None;
        self.flush();
    }

    /// Delivers the logged events with `after < id < before` not yet
    /// delivered, advancing `done` past each; false when the log failed.
    async fn read_until(&mut self, after: i64, before: i64) -> bool {
        let mut after = after;
        loop {
            let records = match self.log.between(after, before).await {
                Ok(records) => records,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the support event log failed");
                    return false;
                }
            };
            let full = records.len() >= BATCH;
            for record in records {
                after = after.max(record.seq);
                self.held.remove(&record.seq);
                if self.done.is_some_and(|done| record.seq <= done) {
                    continue;
                }
                self.done = Some(record.seq);
                if let Some(event) = BusEvent::from_record(&record) {
                    (self.deliver)(BusMessage::Event(Arc::new(event)));
                }
            }
            if !full {
                return true;
            }
        }
    }

    /// Events may have been missed (Redis came back, another instance could
    /// not publish): deliver what the log has beyond `done`, then tell the
    /// sockets to resync (they re-read the queue, and what they skipped).
    async fn catch_up(&mut self) {
        if let Some(done) = self.done
            && self.read_until(done, i64::MAX).await
        {
            self.flush();
        }
        (self.deliver)(BusMessage::Resync);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::desk::views::SupportMessageView;

    /// A log holding the events with the given ids.
    struct FakeLog(Mutex<Vec<i64>>);

    #[async_trait::async_trait]
    impl EventLog for FakeLog {
        async fn between(&self, after: i64, before: i64) -> StoreResult<Vec<SupportEventRecord>> {
            let ids = self.0.lock().unwrap().clone();
            Ok(ids.into_iter().filter(|id| *id > after && *id < before).map(record).collect())
        }

        async fn last(&self) -> StoreResult<i64> {
            Ok(self.0.lock().unwrap().iter().copied().max().unwrap_or(0))
        }
    }

    fn message(seq: i64) -> SupportMessageView {
        SupportMessageView {
            id: format!("m{seq}"),
            session_id: "s".into(),
            role: crate::domain::conversation::MessageRole::User,
            content: "hello".into(),
            status: crate::domain::conversation::MessageStatus::Complete,
            created_at: "2026-12-01T00:00:00Z".into(),
        }
    }

    fn record(seq: i64) -> SupportEventRecord {
        SupportEventRecord {
            seq,
            session_id: "s".into(),
            agent_id: None,
            kind: "message".into(),
            payload: serde_json::to_string(&message(seq)).unwrap(),
        }
    }

    fn event(seq: i64) -> BusMessage {
        BusMessage::Event(Arc::new(BusEvent::Message {
            session_id: "s".into(),
            seq,
            agent_id: None,
            message: message(seq),
        }))
    }

    /// A sequencer on a log of `logged`, once it has read where the log stands.
    async fn start(logged: &[i64]) -> (Sequencer, mpsc::UnboundedReceiver<i64>, Arc<FakeLog>) {
        let log = Arc::new(FakeLog(Mutex::new(logged.to_vec())));
        let (tx, rx) = mpsc::unbounded_channel();
        let deliver = move |m: BusMessage| {
            let seq = match m {
                BusMessage::Event(e) => e.seq().unwrap_or(-1),
                BusMessage::Resync => 0,
            };
            let _ = tx.send(seq);
        };
        let order = Sequencer::start(log.clone(), deliver, CancellationToken::new());
        tokio::time::sleep(Duration::from_millis(20)).await;
        (order, rx, log)
    }

    async fn received(rx: &mut mpsc::UnboundedReceiver<i64>, within: Duration) -> Vec<i64> {
        let mut seen = Vec::new();
        while let Ok(Some(seq)) = tokio::time::timeout(within, rx.recv()).await {
            seen.push(seq);
        }
        seen
    }

    #[tokio::test]
    async fn a_late_predecessor_is_waited_for_and_nothing_comes_twice() {
        let (order, mut rx, log) = start(&[1, 2]).await;
        *log.0.lock().unwrap() = vec![1, 2, 3, 4, 5];
        for seq in [4, 5, 3, 4, 2] {
            order.send(event(seq));
        }
        assert_eq!(received(&mut rx, Duration::from_millis(200)).await, [3, 4, 5]);
    }

    #[tokio::test]
    async fn a_predecessor_that_never_arrives_is_read_from_the_log_or_skipped() {
        // 4 is in the log but was never published here; 6 was abandoned.
        let (order, mut rx, log) = start(&[1, 2, 3]).await;
        *log.0.lock().unwrap() = vec![1, 2, 3, 4, 5, 7];
        order.send(event(5));
        order.send(event(7));
        assert_eq!(received(&mut rx, Duration::from_millis(300)).await, [4, 5, 7]);
    }

    #[tokio::test]
    async fn a_resync_delivers_what_the_log_has_first() {
        let (order, mut rx, log) = start(&[1]).await;
        *log.0.lock().unwrap() = vec![1, 2, 3];
        order.send(BusMessage::Resync);
        order.send(event(3));
        order.send(event(4));
        assert_eq!(received(&mut rx, Duration::from_millis(200)).await, [2, 3, 0, 4]);
    }
}
