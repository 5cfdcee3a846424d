//! Issue 16 on three instances (one PostgreSQL, one Redis): a support
//! session's events reach the sockets on every instance in event-id order,
//! the order the log stores them in, and a visitor who keeps reconnecting to
//! another instance with `?since=<last event id seen>` gets every event
//! exactly once, in that order.

use std::collections::HashSet;

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::cluster::with_cluster;
use crate::helpers::{Fetch, TestUser, WsClient};
use crate::support::{Visitor, agent, claim, handoff, visitor};
use crate::support_ws::{agent_socket, client_socket, until};

/// Messages each side sends at once: twice this many events.
const PAIRS: usize = 250;

/// A message frame of the burst: `(event_id, message id)`.
type Delivered = (i64, String);

fn burst_message(frame: &Value) -> Option<Delivered> {
    let content = frame["message"]["content"].as_str()?;
    if frame["type"] != "message" || !content.starts_with("burst ") {
        return None;
    }
    let event_id = frame["event_id"].as_i64().unwrap_or_else(|| panic!("a message frame without event_id: {frame}"));
    Some((event_id, frame["message"]["id"].as_str()?.to_owned()))
}

/// Reads `ws` until it has seen `count` burst messages.
async fn collect(mut ws: WsClient, count: usize) -> Vec<Delivered> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let frame = ws.next().await;
        seen.extend(burst_message(&frame));
    }
    seen
}

/// The visitor's and the agent's messages, all sent at once, spread over
/// the instances' REST endpoints.
async fn send_burst(addresses: &[String], v: &Visitor, alice: &TestUser) {
    let client = reqwest::Client::new();
    let sends = (0..PAIRS * 2).map(|i| {
        let address = &addresses[i % addresses.len()];
        let request = if i % 2 == 0 {
            client.post(format!("{address}/api/support/sessions/{}/messages", v.id)).bearer_auth(&v.token)
        } else {
            client.post(format!("{address}/api/agent/sessions/{}/messages", v.id)).bearer_auth(&alice.token)
        };
        async move {
            request.json(&json!({ "content": format!("burst {i}") })).fetch().await.assert_status(StatusCode::CREATED);
        }
    });
    futures::stream::iter(sends).buffer_unordered(64).collect::<Vec<()>>().await;
}

/// The burst's messages as the log stores them, read through a replay.
async fn logged_order(port: u16, v: &Visitor) -> Vec<Delivered> {
    collect(client_socket(port, v, Some(0)).await, PAIRS * 2).await
}

fn assert_in_id_order(name: &str, seen: &[Delivered], logged: &[Delivered]) {
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "{name}: event ids out of order: {seen:?}");
    assert_eq!(seen, logged, "{name}: delivered in another order than the log's");
}

#[tokio::test(flavor = "multi_thread")]
async fn desk_events_arrive_in_id_order_on_every_instance() {
    with_cluster(|a, b, redis| async move {
        // Moved whole: the processes live as long as the test.
        let (mut a, b, _redis) = (a, b, redis);
        let c = a.sibling().await;
        let ports = [a.port, b.port, c.port];
        let addresses = [a.address.clone(), b.address.clone(), c.address.clone()];
        let v = visitor(&a, "burst").await;
        let alice = agent(&a).await;
        handoff(&a, &v).await;
        claim(&a, &alice, &v).await;

        // Both sides watch on every instance; each socket has greeted first.
        let mut readers = Vec::new();
        for port in ports {
            let mut client = client_socket(port, &v, None).await;
            assert_eq!(client.next().await["type"], "status");
            let mut console = agent_socket(port, &alice, None).await;
            until(&mut console, &mut Vec::new(), "the queue", |f| f["type"] == "queue").await;
            readers.push((format!("visitor on {port}"), tokio::spawn(collect(client, PAIRS * 2))));
            readers.push((format!("agent on {port}"), tokio::spawn(collect(console, PAIRS * 2))));
        }
        send_burst(&addresses, &v, &alice).await;

        let logged = logged_order(c.port, &v).await;
        assert_eq!(logged.iter().map(|(_, id)| id).collect::<HashSet<_>>().len(), PAIRS * 2);
        for (name, reader) in readers {
            assert_in_id_order(&name, &reader.await.expect("the socket reader"), &logged);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnecting_with_since_anywhere_loses_and_repeats_nothing() {
    with_cluster(|a, b, redis| async move {
        // Moved whole: the processes live as long as the test.
        let (mut a, b, _redis) = (a, b, redis);
        let c = a.sibling().await;
        let ports = [a.port, b.port, c.port];
        let addresses = [a.address.clone(), b.address.clone(), c.address.clone()];
        let v = visitor(&a, "hopper").await;
        let alice = agent(&a).await;
        handoff(&a, &v).await;
        claim(&a, &alice, &v).await;

        // The visitor's socket hops: a few frames on one instance, then gone,
        // then back on another with the last event id it saw.
        let seed: u64 = rand::rng().random();
        eprintln!("reconnect points seeded with {seed}");
        let hopper = {
            let v = Visitor { id: v.id.clone(), token: v.token.clone() };
            let mut first = client_socket(ports[0], &v, None).await;
            assert_eq!(first.next().await["type"], "status");
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let (mut seen, mut last, mut socket, mut hops) = (Vec::new(), None::<i64>, Some(first), 0);
                while seen.len() < PAIRS * 2 {
                    let mut ws = match socket.take() {
                        Some(ws) => ws,
                        None => client_socket(ports[rng.random_range(0..ports.len())], &v, last).await,
                    };
                    for _ in 0..rng.random_range(1..40) {
                        let frame = ws.next().await;
                        if let Some(id) = frame["event_id"].as_i64() {
                            last = Some(id);
                        }
                        seen.extend(burst_message(&frame));
                        if seen.len() == PAIRS * 2 {
                            break;
                        }
                    }
                    hops += 1;
                }
                (seen, hops)
            })
        };
        send_burst(&addresses, &v, &alice).await;

        let logged = logged_order(b.port, &v).await;
        let (seen, hops) = hopper.await.expect("the hopping visitor");
        assert!(hops > 10, "the visitor reconnected only {hops} times");
        assert_in_id_order("the reconnecting visitor", &seen, &logged);
    })
    .await;
}
