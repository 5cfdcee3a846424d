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

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::views::{SupportMessageView, SupportSessionView};
use crate::redis_link::RedisLink;

/// Events a slow socket may fall behind before it resynchronises from the log.
const LOCAL_BUFFER: usize = 4096;

/// What happened at the desk, as the bus carries it (and Redis, as JSON
/// tagged by `kind`). `seq` is the event's place in the session's log;
/// `agent_id` the agent holding the session when it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BusEvent {
    /// A message of a session (logged).
    Message { session_id: String, seq: i64, agent_id: Option<String>, message: SupportMessageView },
    /// A session's status changed (logged).
    Status { session_id: String, seq: i64, agent_id: Option<String>, session: SupportSessionView },
    /// Text of an AI reply as it is written (not logged: the reply's
    /// message is, once it is finished).
    Delta { session_id: String, message_id: String, text: String },
    /// Queue positions and the agents' queue view changed.
    Queue,
    /// Asks every instance to re-read the log: events may have been missed.
    Resync,
}

impl BusEvent {
    /// A logged event as the log holds it: `(kind, payload)`.
    pub fn to_log(&self) -> Option<(&'static str, String)> {
        match self {
            BusEvent::Message { message, .. } => Some(("message", serde_json::to_string(message).ok()?)),
            BusEvent::Status { session, .. } => Some(("status", serde_json::to_string(session).ok()?)),
            BusEvent::Delta { .. } | BusEvent::Queue | BusEvent::Resync => None,
        }
    }

    /// A logged event read back from the log; `None` for a kind (or a
    /// payload) this version does not know.
    pub fn from_log(seq: i64, session_id: &str, kind: &str, payload: &str) -> Option<Self> {
        let session_id = session_id.to_owned();
        match kind {
            "message" => {
                let message = serde_json::from_str(payload).ok()?;
                Some(BusEvent::Message { session_id, seq, agent_id: None, message })
            }
            "status" => {
                let session = serde_json::from_str(payload).ok()?;
                Some(BusEvent::Status { session_id, seq, agent_id: None, session })
            }
            _ => None,
        }
    }

    pub fn session_id(&self) -> Option<&str> {
        match self {
            BusEvent::Message { session_id, .. }
            | BusEvent::Status { session_id, .. }
            | BusEvent::Delta { session_id, .. } => Some(session_id),
            BusEvent::Queue | BusEvent::Resync => None,
        }
    }

    /// The event's place in the log, for logged events.
    pub fn seq(&self) -> Option<i64> {
        match self {
            BusEvent::Message { seq, .. } | BusEvent::Status { seq, .. } => Some(*seq),
            BusEvent::Delta { .. } | BusEvent::Queue | BusEvent::Resync => None,
        }
    }
}

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum BusMessage {
    /// Shared: every socket of the instance receives the same event.
    Event(Arc<BusEvent>),
    /// Events may have been missed: re-read the log.
    Resync,
}

pub struct SupportBus {
    local: Local,
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
    /// reconnecting until `stop`).
    /// Events go through the Redis channel `<prefix>:support`.
    pub async fn start(redis: Option<&redis::Client>, prefix: &str, stop: CancellationToken) -> Self {
        let local = Local {
            agents: broadcast::channel(LOCAL_BUFFER).0,
            clients: broadcast::channel(LOCAL_BUFFER).0,
            topics: Default::default(),
            queue_generation: Default::default(),
        };
        let owes_resync = Arc::new(AtomicBool::new(false));
        let Some(client) = redis else { return Self { local, outbox: None, owes_resync } };
        let channel = format!("{prefix}:support");
        let subscriber = Subscriber(local.clone());
        tokio::spawn(crate::redis_link::follow(client.clone(), channel.clone(), "support", stop.clone(), subscriber));
        let (outbox, pending) = mpsc::channel(OUTBOX);
        tokio::spawn(publish_loop(client.clone(), channel, pending, local.clone(), owes_resync.clone(), stop));
        Self { local, outbox: Some(outbox), owes_resync }
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
        self.local.send(BusMessage::Event(Arc::new(event)));
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
            BusEvent::Delta { session_id, .. } => to_session(&topics(), session_id),
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
    local: Local,
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
struct Subscriber(Local);

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

    fn event(kind: &str, session: &str, agent: Option<&str>) -> BusEvent {
        let (session_id, agent_id) = (session.to_owned(), agent.map(str::to_owned));
        match kind {
            "message" => BusEvent::Message { session_id, seq: 1, agent_id, message: message(session) },
            "status" => BusEvent::Status { session_id, seq: 1, agent_id, session: status(session) },
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
        let back = BusEvent::from_log(1, "s1", kind, &payload).unwrap();
        assert_eq!((back.seq(), back.session_id()), (Some(1), Some("s1")));
        assert!(BusEvent::Queue.to_log().is_none());
        assert!(BusEvent::from_log(2, "s1", "from-a-newer-version", "{}").is_none());
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
        let bus = SupportBus::start(None, "test", CancellationToken::new()).await;
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
        assert_eq!(bus.queue_generation(), generation + 1);
        for sub in [&mut a, &mut b, &mut alice, &mut bob] {
            assert_eq!(next(sub).await.as_deref(), Some("queue "));
        }
    }

    #[tokio::test]
    async fn a_topic_lives_as_long_as_its_last_socket() {
        let bus = SupportBus::start(None, "test", CancellationToken::new()).await;
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
        let bus = SupportBus::start(None, "test", CancellationToken::new()).await;
        let mut slow = bus.subscribe_client("a");
        for _ in 0..TOPIC_BUFFER + 10 {
            bus.publish(event("message", "a", None));
        }
        assert_eq!(next(&mut slow).await.as_deref(), Some("resync"));
    }
}
