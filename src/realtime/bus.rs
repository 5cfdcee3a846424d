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
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// Events a slow socket may fall behind before it resynchronises from the log.
const LOCAL_BUFFER: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BusEvent {
    pub session_id: String,
    /// Position in the event log; `None` for ephemeral events (deltas,
    /// queue changes) that are not replayed.
    pub seq: Option<i64>,
    /// `message`, `status`, `delta` or `queue`; `resync` asks every
    /// instance to re-read the log.
    pub kind: String,
    pub payload: Value,
    /// The agent holding the session when the event happened.
    pub agent_id: Option<String>,
}

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum BusMessage {
    Event(BusEvent),
    /// Events may have been missed: re-read the log.
    Resync,
}

pub struct SupportBus {
    local: broadcast::Sender<BusMessage>,
    /// With Redis: events waiting for the publisher task, in order.
    outbox: Option<mpsc::Sender<BusEvent>>,
    /// Set when an event reached only this instance: the publisher task then
    /// asks every instance to resync once Redis takes events again.
    owes_resync: Arc<AtomicBool>,
}

/// Events that may wait for Redis before they are delivered locally instead.
const OUTBOX: usize = 16_384;
/// How long a failing Redis is left alone before the next try.
const PUBLISH_REST: Duration = Duration::from_secs(1);

impl SupportBus {
    /// An in-process bus; with a Redis client, also the subscriber task that
    /// feeds it from Redis and the publisher task that feeds Redis (both
    /// reconnecting until `stop`).
    /// Events go through the Redis channel `<prefix>:support`.
    pub async fn start(redis: Option<&redis::Client>, prefix: &str, stop: CancellationToken) -> Self {
        let (local, _) = broadcast::channel(LOCAL_BUFFER);
        let owes_resync = Arc::new(AtomicBool::new(false));
        let Some(client) = redis else { return Self { local, outbox: None, owes_resync } };
        let channel = format!("{prefix}:support");
        tokio::spawn(subscribe_loop(client.clone(), channel.clone(), local.clone(), stop.clone()));
        let (outbox, pending) = mpsc::channel(OUTBOX);
        tokio::spawn(publish_loop(client.clone(), channel, pending, local.clone(), owes_resync.clone(), stop));
        Self { local, outbox: Some(outbox), owes_resync }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<BusMessage> {
        self.local.subscribe()
    }

    /// Sends an event to every socket on every instance, without waiting for
    /// Redis: the publisher task sends events in order, and whatever Redis
    /// cannot take reaches this instance's sockets directly and the other
    /// instances through the log (see `publish_loop`).
    pub async fn publish(&self, event: BusEvent) {
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
        let _ = self.local.send(BusMessage::Event(event));
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
    local: broadcast::Sender<BusMessage>,
    owes_resync: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    let mut manager: Option<redis::aio::ConnectionManager> = None;
    let mut resting_until = tokio::time::Instant::now();
    let resync =
        BusEvent { session_id: String::new(), seq: None, kind: "resync".into(), payload: Value::Null, agent_id: None };
    let resync = serde_json::to_string(&resync).unwrap_or_default();
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
        let mut sent = false;
        if tokio::time::Instant::now() >= resting_until {
            // A connection broken by a Redis restart fails once, then the
            // manager reconnects: one retry covers that.
            for _ in 0..2 {
                match publish(&client, &config, &mut manager, &channel, &payload).await {
                    Ok(()) => {
                        sent = true;
                        break;
                    }
                    Err(e) => tracing::debug!(error = %e, "publishing to Redis failed"),
                }
            }
            if !sent {
                resting_until = tokio::time::Instant::now() + PUBLISH_REST;
                tracing::warn!("Redis does not take support events; delivering them locally until it does");
            }
        }
        match (event, sent) {
            (None, true) => tracing::info!("Redis is back; asked every instance to resynchronise from the event log"),
            (None, false) => owes_resync.store(true, Ordering::SeqCst),
            (Some(_), true) => {}
            (Some(event), false) => {
                owes_resync.store(true, Ordering::SeqCst);
                let _ = local.send(BusMessage::Event(event));
            }
        }
    }
}

async fn publish(
    client: &redis::Client,
    config: &redis::aio::ConnectionManagerConfig,
    manager: &mut Option<redis::aio::ConnectionManager>,
    channel: &str,
    payload: &str,
) -> redis::RedisResult<()> {
    if manager.is_none() {
        *manager = Some(redis::aio::ConnectionManager::new_with_config(client.clone(), config.clone()).await?);
    }
    let mut conn = manager.clone().expect("connected above");
    redis::cmd("PUBLISH").arg(channel).arg(payload).query_async::<i64>(&mut conn).await.map(|_| ())
}

async fn subscribe_loop(
    client: redis::Client,
    channel: String,
    local: broadcast::Sender<BusMessage>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let attempt = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(Duration::from_secs(3), attempt) => r,
        };
        match pubsub {
            Ok(Ok(mut pubsub)) => {
                if !first {
                    tracing::info!("resubscribed to Redis; sockets resynchronise from the event log");
                }
                // Whatever was published while we were away is in the log.
                let _ = local.send(BusMessage::Resync);
                first = false;
                backoff = Duration::from_millis(100);
                let mut messages = pubsub.on_message();
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        m = messages.next() => m,
                    };
                    let Some(msg) = next else { break };
                    let Ok(text) = msg.get_payload::<String>() else { continue };
                    match serde_json::from_str::<BusEvent>(&text) {
                        Ok(event) if event.kind == "resync" => drop(local.send(BusMessage::Resync)),
                        Ok(event) => drop(local.send(BusMessage::Event(event))),
                        Err(_) => {}
                    }
                }
                tracing::warn!("lost the Redis subscription; reconnecting");
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot subscribe to Redis; retrying"),
            Err(_) => tracing::warn!("subscribing to Redis timed out; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
