//! Group commit for the event log. Event ids are given out in commit order
//! (one writer at a time: SQLite's write lock, PostgreSQL's advisory lock),
//! so each append waits for the commit before it; one append per event
//! would make the log as fast as one fsync after another. Instead one task
//! writes, and every event that arrives while a batch is being written goes
//! into the next one: a lone event is written at once, a busy desk shares
//! each commit among many.

use tokio::sync::{mpsc, oneshot};

use crate::store::{NewSupportEvent, Store, StoreError, StoreResult};

/// Most events in one statement.
const BATCH: usize = 256;

type Request = (NewSupportEvent, oneshot::Sender<StoreResult<i64>>);

/// The sending side; its task ends when every sender is gone.
#[derive(Clone)]
pub struct Appender(mpsc::UnboundedSender<Request>);

impl Appender {
    pub fn start(store: Store) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, rx));
        Self(tx)
    }

    /// Logs one event; answers its id once it is committed.
    pub async fn append(&self, event: NewSupportEvent) -> StoreResult<i64> {
        let (done, answer) = oneshot::channel();
        self.0.send((event, done)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the event log's writer stopped".to_owned())
}

async fn run(store: Store, mut rx: mpsc::UnboundedReceiver<Request>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let (events, waiting): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
        match store.append_support_events(&events).await {
            Ok(ids) => {
                for (id, done) in ids.into_iter().zip(waiting) {
                    let _ = done.send(Ok(id));
                }
            }
            Err(e) => {
                // Nothing of the batch was logged: each of its callers gets the error.
                let detail = e.to_string();
                for done in waiting {
                    let _ = done.send(Err(StoreError::Unavailable(detail.clone())));
                }
            }
        }
    }
}
