//! The event bus of the support desk. Without Redis it is one in-process
//! broadcast channel. With REDIS_URL every event is published to a Redis
//! channel and every instance (this one included) delivers what it receives
//! to its local sockets, so a visitor on one instance and their agent on
//! another see each other live. Losing Redis loses no event: every lasting
//! event is also in the database log, and after a reconnect the bus tells
//! its sockets to `Resync` from the log.

use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

const CHANNEL: &str = "palaver:support";
/// Events a slow socket may fall behind before it resynchronises from the log.
const LOCAL_BUFFER: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BusEvent {
    pub session_id: String,
    /// Position in the event log; `None` for ephemeral events (deltas,
    /// queue changes) that are not replayed.
    pub seq: Option<i64>,
    /// `message`, `status`, `delta` or `queue`.
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
    redis: Option<redis::aio::ConnectionManager>,
}

impl SupportBus {
    /// An in-process bus; with a Redis client, also the subscriber task that
    /// feeds it from Redis (reconnecting until `stop`).
    pub async fn start(redis: Option<&redis::Client>, stop: CancellationToken) -> Self {
        let (local, _) = broadcast::channel(LOCAL_BUFFER);
        let Some(client) = redis else { return Self { local, redis: None } };
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let publisher = match redis::aio::ConnectionManager::new_with_config(client.clone(), config).await {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "Redis is not answering; support events stay on this instance until it does");
                None
            }
        };
        tokio::spawn(subscribe_loop(client.clone(), local.clone(), stop));
        Self { local, redis: publisher }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<BusMessage> {
        self.local.subscribe()
    }

    /// Sends an event to every socket on every instance. If Redis cannot
    /// take it, this instance's sockets still get it, and the others read
    /// it from the log when they resync.
    pub async fn publish(&self, event: BusEvent) {
        if let Some(manager) = &self.redis {
            let mut conn = manager.clone();
            let payload = serde_json::to_string(&event).unwrap_or_default();
            let sent: redis::RedisResult<i64> =
                redis::cmd("PUBLISH").arg(CHANNEL).arg(payload).query_async(&mut conn).await;
            match sent {
                Ok(_) => return,
                Err(e) => tracing::warn!(error = %e, "publishing a support event to Redis failed; delivering locally"),
            }
        }
        let _ = self.local.send(BusMessage::Event(event));
    }
}

async fn subscribe_loop(client: redis::Client, local: broadcast::Sender<BusMessage>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let attempt = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(CHANNEL).await?;
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
                    if let Ok(event) = serde_json::from_str::<BusEvent>(&text) {
                        let _ = local.send(BusMessage::Event(event));
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
