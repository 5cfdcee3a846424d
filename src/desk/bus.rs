//! The event bus of the support desk. Without Redis it is one in-process
//! broadcast channel. With REDIS_URL every event is published to a Redis
//! channel and every instance (this one included) delivers what it receives
//! to its local sockets, so a visitor on one instance and their agent on
//! another see each other live. Losing Redis loses no event: every lasting
//! event is also in the database log. After this instance resubscribes, or
//! when another instance announces (with a `resync` event on the channel)
//! that it could not publish something, the bus tells its sockets to
//! `Resync` from the log.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

pub use super::events::{BusEvent, BusMessage};
use super::order::{EventLog, Sequencer};
use crate::redis_link::RedisLink;

/// Events a slow socket may fall behind before it resynchronises from the log.
const LOCAL_BUFFER: usize = 4096;

pub struct SupportBus {
    local: Local,
    /// Where every event for this instance's sockets goes first: it hands
    /// them to `local` in log order.
    order: Sequencer,
    /// With Redis: events waiting for the publisher task, in order.
    outbox: Option<mpsc::Sender<BusEvent>>,
    /// Set when an event reached only this instance: the publisher task then
    /// asks every instance to resync once Redis takes events again.
    owes_resync: Arc<AtomicBool>,
}

/// Events that may wait for Redis before they are delivered locally instead.
const OUTBOX: usize = 16_384;
/// The most one publish may take before the event is delivered locally.
const PUBLISH_WAIT: Duration = Duration::from_secs(2);

impl SupportBus {
    /// An in-process bus; with a Redis client, also the subscriber task that
    /// feeds it from Redis and the publisher task that feeds Redis (both
    /// reconnecting until `stop`). `log` fills what did not come round.
    /// Events go through the Redis channel `<prefix>:support`.
    pub async fn start(
        redis: Option<&redis::Client>,
        prefix: &str,
        log: Arc<dyn EventLog>,
        stop: CancellationToken,
    ) -> Self {
        let local = Local {
            agents: broadcast::channel(LOCAL_BUFFER).0,
            clients: broadcast::channel(LOCAL_BUFFER).0,
            topics: Default::default(),
            queue_generation: Default::default(),
        };
        let owes_resync = Arc::new(AtomicBool::new(false));
        let to_sockets = local.clone();
        let order = Sequencer::start(log, move |m| to_sockets.send(m), stop.clone());
        let Some(client) = redis else { return Self { local, order, outbox: None, owes_resync } };
        let channel = format!("{prefix}:support");
        let subscriber = Subscriber(order.clone());
        tokio::spawn(crate::redis_link::follow(client.clone(), channel.clone(), "support", stop.clone(), subscriber));
        let (outbox, pending) = mpsc::channel(OUTBOX);
        tokio::spawn(publish_loop(client.clone(), channel, pending, order.clone(), owes_resync.clone(), stop));
        Self { local, order, outbox: Some(outbox), owes_resync }
    }

    /// What a visitor's socket needs: its session's events, queue changes
    /// and resyncs.
    pub fn subscribe_client(&self, session_id: &str) -> Subscription {
        self.local.subscription(self.local.clients.subscribe(), format!("session:{session_id}"))
    }

    /// What an agent console needs: the events of the sessions it holds,
    /// every status and queue change, and resyncs.
    pub fn subscribe_agent(&self, agent_id: &str) -> Subscription {
        self.local.subscription(self.local.agents.subscribe(), format!("agent:{agent_id}"))
    }

    /// Counts the queue changes (and resyncs) delivered on this instance, so
    /// a queue read at the current generation is fresh for every socket.
    pub fn queue_generation(&self) -> u64 {
        self.local.queue_generation.load(Ordering::SeqCst)
    }

    /// Sends an event to every socket on every instance, without waiting for
    /// Redis: the publisher task sends events in order, and whatever Redis
    /// cannot take reaches this instance's sockets directly and the other
    /// instances through the log (see `publish_loop`).
    pub fn publish(&self, event: BusEvent) {
        let event = match &self.outbox {
            None => event,
            Some(outbox) => match outbox.try_send(event) {
                Ok(()) => return,
                // Only when Redis is far behind.
                Err(e) => {
                    tracing::warn!("the Redis outbox is full; delivering a support event locally");
                    self.owes_resync.store(true, Ordering::SeqCst);
                    e.into_inner()
                }
            },
        };
        self.order.send(BusMessage::Event(Arc::new(event)));
    }
}

/// Events a topic (one session's or one agent's) may hold for a slow socket.
const TOPIC_BUFFER: usize = 256;

/// This instance's side of the bus. Events are routed, so that a message
/// wakes only the sockets it is for, not every socket of the instance: a
/// session's events go to its topic (the visitor's socket), and the events of
/// a held session also to its agent's topic; status changes go to every
/// agent console, queue changes and resyncs to every socket.
#[derive(Clone)]
struct Local {
    agents: broadcast::Sender<BusMessage>,
    clients: broadcast::Sender<BusMessage>,
    topics: Arc<std::sync::Mutex<std::collections::HashMap<String, broadcast::Sender<BusMessage>>>>,
    queue_generation: Arc<AtomicU64>,
}

impl Local {
    fn send(&self, message: BusMessage) {
        let everyone = |message: BusMessage| {
            // Before the sockets hear of it, so none reads a stale queue snapshot.
            self.queue_generation.fetch_add(1, Ordering::SeqCst);
            let _ = self.agents.send(message.clone());
            let _ = self.clients.send(message);
        };
        let event = match &message {
            BusMessage::Resync => return everyone(message),
            BusMessage::Event(e) => e.clone(),
        };
        let topics = || self.topics.lock().unwrap_or_else(|e| e.into_inner());
        let to_session = |topics: &std::collections::HashMap<String, broadcast::Sender<BusMessage>>, id: &str| {
            if let Some(topic) = topics.get(&format!("session:{id}")) {
                let _ = topic.send(message.clone());
            }
        };
        match event.as_ref() {
            BusEvent::Queue => everyone(message),
            BusEvent::Resync => everyone(BusMessage::Resync),
            // Every agent console shows every session's status.
            BusEvent::Status { session_id, .. } => {
                let _ = self.agents.send(message.clone());
                to_session(&topics(), session_id);
            }
            BusEvent::Message { session_id, agent_id, .. } => {
                let topics = topics();
                to_session(&topics, session_id);
                if let Some(topic) = agent_id.as_ref().and_then(|a| topics.get(&format!("agent:{a}"))) {
                    let _ = topic.send(message.clone());
                }
            }
            BusEvent::Delta { session_id, .. } | BusEvent::Reset { session_id, .. } => {
                to_session(&topics(), session_id)
            }
        }
    }

    fn subscription(&self, shared: broadcast::Receiver<BusMessage>, topic: String) -> Subscription {
        let own = {
            let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
            topics.entry(topic.clone()).or_insert_with(|| broadcast::channel(TOPIC_BUFFER).0).subscribe()
        };
        Subscription { shared, own: Some(own), topic, topics: self.topics.clone() }
    }
}

/// A socket's view of the bus: its own topic and what all its kind share.
/// Dropping it removes the topic once nobody else listens to it.
pub struct Subscription {
    shared: broadcast::Receiver<BusMessage>,
    own: Option<broadcast::Receiver<BusMessage>>,
    topic: String,
    topics: Arc<std::sync::Mutex<std::collections::HashMap<String, broadcast::Sender<BusMessage>>>>,
}

impl Subscription {
    /// The next message from either source; a receiver that fell behind
    /// answers `Resync` (the log has what it missed).
    pub async fn recv(&mut self) -> Option<BusMessage> {
        let own = self.own.as_mut().expect("held until drop");
        let received = tokio::select! {
            m = own.recv() => m,
            m = self.shared.recv() => m,
        };
        match received {
            Ok(m) => Some(m),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(BusMessage::Resync),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.own.take());
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        if topics.get(&self.topic).is_some_and(|t| t.receiver_count() == 0) {
            topics.remove(&self.topic);
        }
    }
}

/// Publishes the outbox to Redis. An event Redis does not take is delivered
/// to this instance's sockets instead, and once Redis answers again every
/// instance is told (a `resync` event) to re-read the log: their
/// subscriptions may never have broken, so they would not resync on their own.
async fn publish_loop(
    client: redis::Client,
    channel: String,
    mut pending: mpsc::Receiver<BusEvent>,
    local: Sequencer,
    owes_resync: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let link = RedisLink::new(client, PUBLISH_WAIT, "support events");
    let resync = serde_json::to_string(&BusEvent::Resync).unwrap_or_default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => None,
            e = pending.recv() => match e {
                Some(e) => Some(e),
                None => return,
            },
        };
        let payload = match &event {
            Some(e) => serde_json::to_string(e).unwrap_or_default(),
            None if owes_resync.swap(false, Ordering::SeqCst) => resync.clone(),
            None => continue,
        };
        let sent = link.query::<()>(redis::pipe().cmd("PUBLISH").arg(&channel).arg(payload).ignore()).await.is_some();
        match (event, sent) {
            (None, true) => tracing::info!("Redis is back; asked every instance to resynchronise from the event log"),
            (None, false) => owes_resync.store(true, Ordering::SeqCst),
            (Some(_), true) => {}
            (Some(event), false) => {
                owes_resync.store(true, Ordering::SeqCst);
                local.send(BusMessage::Event(Arc::new(event)));
            }
        }
    }
}

/// Feeds this instance's sockets from the Redis channel; every
/// (re)subscription resyncs them, as events may have been missed.
struct Subscriber(Sequencer);

impl crate::redis_link::Follower for Subscriber {
    fn subscribed(&mut self, first: bool) {
        if !first {
            tracing::info!("resubscribed to Redis; sockets resynchronise from the event log");
        }
        // Whatever was published while we were away is in the log.
        self.0.send(BusMessage::Resync);
    }

    fn message(&mut self, payload: &str) {
        match serde_json::from_str::<BusEvent>(payload) {
            Ok(BusEvent::Resync) => self.0.send(BusMessage::Resync),
            Ok(event) => self.0.send(BusMessage::Event(Arc::new(event))),
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        desk::views::{SupportMessageView, SupportSessionView},
        store::SupportEventRecord,
    };

    thread_local! {
        /// Ids in order, as the log gives them out (each test has a thread).
        static NEXT_SEQ: std::cell::Cell<i64> = const { std::cell::Cell::new(1) };
    }

    fn event(kind: &str, session: &str, agent: Option<&str>) -> BusEvent {
        let (session_id, agent_id) = (session.to_owned(), agent.map(str::to_owned));
        let seq = NEXT_SEQ.replace(NEXT_SEQ.get() + 1);
        match kind {
            "message" => BusEvent::Message { session_id, seq, agent_id, message: message(session) },
            "status" => BusEvent::Status { session_id, seq, agent_id, session: status(session) },
            "queue" => BusEvent::Queue,
            other => panic!("no test event of kind {other}"),
        }
    }

    fn message(session: &str) -> SupportMessageView {
        SupportMessageView {
            id: "m1".into(),
            session_id: session.into(),
            role: crate::domain::conversation::MessageRole::User,
            content: "hello".into(),
            status: crate::domain::conversation::MessageStatus::Complete,
            created_at: "2026-12-01T00:00:00Z".into(),
        }
    }

    fn status(session: &str) -> SupportSessionView {
        SupportSessionView {
            session_id: session.into(),
            status: crate::domain::support::SupportStatus::Queued,
            client_info: super::super::views::ClientInfoView {
                name: "Ann".into(),
                email: "ann@example.com".into(),
                phone: None,
            },
            queue_position: Some(1),
            estimated_wait_seconds: Some(120),
            assigned_agent: None,
            waiting_since: Some("2026-12-01T00:00:00Z".into()),
            created_at: "2026-12-01T00:00:00Z".into(),
            updated_at: "2026-12-01T00:00:00Z".into(),
        }
    }

    fn kind(e: &BusEvent) -> &'static str {
        match e {
            BusEvent::Message { .. } => "message",
            BusEvent::Status { .. } => "status",
            BusEvent::Delta { .. } => "delta",
            BusEvent::Reset { .. } => "reset",
            BusEvent::Queue => "queue",
            BusEvent::Resync => "resync",
        }
    }

    #[test]
    fn events_travel_tagged_by_kind_and_come_back_from_the_log() {
        let e = event("message", "s1", Some("a1"));
        let wire = serde_json::to_value(&e).unwrap();
        assert_eq!(wire["kind"], "message");
        assert_eq!(serde_json::from_value::<BusEvent>(wire).unwrap(), e);
        let (kind, payload) = e.to_log().unwrap();
        let record = |kind: &str, payload: &str| SupportEventRecord {
            seq: e.seq().unwrap(),
            session_id: "s1".into(),
            agent_id: Some("a1".into()),
            kind: kind.into(),
            payload: payload.into(),
        };
        assert_eq!(BusEvent::from_record(&record(kind, &payload)).unwrap(), e, "routed like the live event");
        assert!(BusEvent::Queue.to_log().is_none());
        assert!(BusEvent::from_record(&record("from-a-newer-version", "{}")).is_none());
    }

    /// A log with nothing in it: tests publish every id in order.
    struct NoLog;

    #[async_trait::async_trait]
    impl EventLog for NoLog {
        async fn between(&self, _: i64, _: i64) -> crate::store::StoreResult<Vec<SupportEventRecord>> {
            Ok(Vec::new())
        }

        async fn last(&self) -> crate::store::StoreResult<i64> {
            Ok(0)
        }
    }

    /// The next message within a moment, if any.
    async fn next(sub: &mut Subscription) -> Option<String> {
        let m = tokio::time::timeout(Duration::from_millis(50), sub.recv()).await.ok().flatten()?;
        Some(match m {
            BusMessage::Event(e) => format!("{} {}", kind(&e), e.session_id().unwrap_or_default()),
            BusMessage::Resync => "resync".into(),
        })
    }

    #[tokio::test]
    async fn events_reach_only_the_sockets_they_are_for() {
        let bus = SupportBus::start(None, "test", Arc::new(NoLog), CancellationToken::new()).await;
        let (mut a, mut b) = (bus.subscribe_client("a"), bus.subscribe_client("b"));
        let mut alice = bus.subscribe_agent("alice");
        let mut bob = bus.subscribe_agent("bob");

        bus.publish(event("message", "a", Some("alice")));
        assert_eq!(next(&mut a).await.as_deref(), Some("message a"));
        assert_eq!(next(&mut alice).await.as_deref(), Some("message a"));
        assert_eq!((next(&mut b).await, next(&mut bob).await), (None, None));

        // Status changes: the session's visitor and every agent.
        bus.publish(event("status", "b", None));
        assert_eq!(next(&mut b).await.as_deref(), Some("status b"));
        assert_eq!(next(&mut alice).await.as_deref(), Some("status b"));
        assert_eq!(next(&mut bob).await.as_deref(), Some("status b"));
        assert_eq!(next(&mut a).await, None);

        // Queue changes: everyone, and the queue generation moves first.
        let generation = bus.queue_generation();
        bus.publish(event("queue", "", None));
        for sub in [&mut a, &mut b, &mut alice, &mut bob] {
            assert_eq!(next(sub).await.as_deref(), Some("queue "));
            assert_eq!(bus.queue_generation(), generation + 1);
        }
    }

    #[tokio::test]
    async fn a_topic_lives_as_long_as_its_last_socket() {
        let bus = SupportBus::start(None, "test", Arc::new(NoLog), CancellationToken::new()).await;
        let topics = || bus.local.topics.lock().unwrap().len();
        let first = bus.subscribe_client("a");
        let mut second = bus.subscribe_client("a");
        assert_eq!(topics(), 1);
        drop(first);
        assert_eq!(topics(), 1, "another socket of the session still listens");
        bus.publish(event("message", "a", None));
        assert_eq!(next(&mut second).await.as_deref(), Some("message a"));
        drop(second);
        assert_eq!(topics(), 0);
        // Events for a session nobody watches go nowhere, quietly.
        bus.publish(event("message", "a", None));
    }

    #[tokio::test]
    async fn a_socket_that_falls_behind_is_told_to_resync() {
        let bus = SupportBus::start(None, "test", Arc::new(NoLog), CancellationToken::new()).await;
        let mut slow = bus.subscribe_client("a");
        for _ in 0..TOPIC_BUFFER + 10 {
            bus.publish(event("message", "a", None));
        }
        // The socket reads only once the bus has handed everything on.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(next(&mut slow).await.as_deref(), Some("resync"));
    }
}
