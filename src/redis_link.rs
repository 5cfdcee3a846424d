//! One lazily opened Redis connection with bounded calls, shared by what
//! needs Redis on the side (the support bus's publisher, the rate limits).
//! Redis may be down when the instance starts or at any time after: every
//! call answers within its wait, `None` when Redis did not, and after a
//! failure Redis is left alone for a moment so a dead Redis does not add its
//! timeout to every call.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// How long a failing Redis is left alone.
const REST: Duration = Duration::from_secs(1);

pub struct RedisLink {
    client: redis::Client,
    /// The most one call may take, connecting included.
    wait: Duration,
    /// What the log lines say the calls are for.
    purpose: &'static str,
    manager: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    epoch: Instant,
    /// Milliseconds after `epoch` before which Redis is not tried.
    resting_until_ms: AtomicU64,
}

impl RedisLink {
    pub fn new(client: redis::Client, wait: Duration, purpose: &'static str) -> Self {
        Self {
            client,
            wait,
            purpose,
            manager: tokio::sync::OnceCell::new(),
            epoch: Instant::now(),
            resting_until_ms: AtomicU64::new(0),
        }
    }

    /// Runs `pipe` and answers its result; `None` (and a rest) when Redis is
    /// resting, slow or failing. A connection broken by a Redis restart fails
    /// once before the manager reconnects, so a failed call is tried again
    /// within the same wait.
    pub async fn query<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Option<T> {
        if (self.epoch.elapsed().as_millis() as u64) < self.resting_until_ms.load(Ordering::Relaxed) {
            return None;
        }
        let attempt = async {
            let manager = self
                .manager
                .get_or_try_init(|| async {
                    let config = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(self.wait))
                        .set_response_timeout(Some(self.wait))
                        .set_number_of_retries(1)
                        .set_max_delay(Duration::from_millis(500));
                    redis::aio::ConnectionManager::new_with_config(self.client.clone(), config).await
                })
                .await?;
            let mut conn = manager.clone();
            match pipe.query_async(&mut conn).await {
                Ok(value) => Ok(value),
                Err(_) => pipe.query_async(&mut conn).await,
            }
        };
        match tokio::time::timeout(self.wait, attempt).await {
            Ok(Ok(value)) => Some(value),
            outcome => {
                let error = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                tracing::warn!(
                    error = error.as_str(),
                    purpose = self.purpose,
                    "Redis did not answer; going on without it for now"
                );
                let until = (self.epoch.elapsed() + REST).as_millis() as u64;
                self.resting_until_ms.store(until, Ordering::Relaxed);
                None
            }
        }
    }
}

/// What a subscription to a Redis channel tells its follower.
pub trait Follower: Send + 'static {
    /// Subscribed (again, when `first` is false): whatever was published
    /// while away was missed.
    fn subscribed(&mut self, first: bool);
    /// A message on the channel.
    fn message(&mut self, payload: &str);
    /// The subscription broke; it is being made again.
    fn lost(&mut self) {}
}

/// Follows `channel` until `stop`, subscribing again (with a growing pause,
/// up to 5 s) whenever Redis goes away. `what` names the channel in the logs.
pub async fn follow(
    client: redis::Client,
    channel: String,
    what: &'static str,
    stop: tokio_util::sync::CancellationToken,
    mut follower: impl Follower,
) {
    use futures::StreamExt;
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let attempt = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let subscribed = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(Duration::from_secs(3), attempt) => r,
        };
        match subscribed {
            Ok(Ok(mut pubsub)) => {
                follower.subscribed(first);
                first = false;
                backoff = Duration::from_millis(100);
                let mut messages = pubsub.on_message();
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        m = messages.next() => m,
                    };
                    let Some(msg) = next else { break };
                    if let Ok(text) = msg.get_payload::<String>() {
                        follower.message(&text);
                    }
                }
                follower.lost();
                tracing::warn!(channel = what, "lost the Redis subscription; reconnecting");
            }
            Ok(Err(e)) => {
                tracing::warn!(channel = what, error = e.to_string().as_str(), "cannot subscribe to Redis; retrying")
            }
            Err(_) => tracing::warn!(channel = what, "subscribing to Redis timed out; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
