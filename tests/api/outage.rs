//! Hardening #8.3: the database goes away while a reply is being written.
//! PostgreSQL is reached through a TCP proxy the test can cut, so the outage
//! is real for the server and touches nothing else on the machine. A reply
//! that finished during the outage is stored once the database is back, and
//! its usage is counted: neither is given up after a few tries.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use palaver::config::Secret;
use tokio::net::{TcpListener, TcpStream};

use crate::{
    helpers::{Db, delta_text, spawn_app},
    mock_llm::{MOCK_COMPLETION_TOKENS, MOCK_PROMPT_TOKENS, Script},
};

/// A TCP proxy to PostgreSQL that can be cut (every connection dropped,
/// new ones refused) and restored.
struct DbProxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl DbProxy {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
        let accept = tokio::spawn({
            let (up, connections) = (up.clone(), connections.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the server sees the connection fail
                    }
                    let target = target.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(&target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    connections.lock().unwrap().push(task.abort_handle());
                }
            }
        });
        Self { addr, up, connections, accept }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// The parts of `postgres://user@host:port/db?…`: the URL before and after
/// `host:port`, and `host:port` itself (the port defaulting to 5432).
fn split_host(url: &str) -> (String, String, String) {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (authority, path) = rest.split_once('/').expect("a database path");
    let (user, host) = authority.rsplit_once('@').map_or(("", authority), |(u, h)| (u, h));
    let host = if host.contains(':') { host.to_owned() } else { format!("{host}:5432") };
    let at = if user.is_empty() { String::new() } else { format!("{user}@") };
    (format!("{scheme}://{at}"), host, format!("/{path}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_finished_during_a_database_outage_is_stored_with_its_usage() {
    let Some(mut app) = spawn_app(Db::Postgres).await else { return };
    let (before, target, after) = split_host(&app.database.url);
    let proxy = DbProxy::start(target).await;
    let proxied = format!("{before}{}{after}", proxy.addr);
    app.restart_with(|s| {
        s.server.database_url = Some(Secret(proxied));
        s.server.database_timeout = 1;
        s.chat.stream_flush_ms = 100;
    })
    .await;
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    let script = Script::words(20, Duration::from_millis(100));
    app.provider.stream(script.clone());

    let mut stream = app.post_message_sse(&user, &conversation, "write through the outage", None).await;
    let asked = stream.expect("user_message").await;
    let reply_id = asked.data["assistant_message_id"].as_str().unwrap().to_owned();
    let first = stream.expect("delta").await;
    proxy.cut();
    // The provider finishes while the database is away, and for longer
    // than a few retries of the final write would last.
    for _ in 0..100 {
        if app.provider.chunks_sent() == 20 && app.provider.open_streams() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.provider.chunks_sent(), 20, "the provider finished its reply");
    tokio::time::sleep(Duration::from_secs(12)).await;
    proxy.restore();
    // Its heartbeat stopped during the outage, but it runs here: the
    // sweeper must not fail it before it stores its own final state.
    let watcher = {
        let database = app.database.clone();
        let reply_id = reply_id.clone();
        tokio::spawn(async move {
            let failed = "SELECT COUNT(*) FROM messages WHERE id = $1 AND status = 'failed'";
            for _ in 0..80 {
                if database.scalar(failed, &[&reply_id]).await > 0 {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        })
    };

    let rest = stream.rest().await;
    let done = rest.last().expect("the stream ends with an event");
    assert_eq!(done.event, "done", "{rest:?}");
    assert_eq!(done.data["status"], "complete");
    assert_eq!(format!("{}{}", first.data["text"].as_str().unwrap(), delta_text(&rest)), script.text());

    let stored = app.settled_message(&user, &conversation, &reply_id, Duration::from_secs(10)).await;
    assert_eq!(stored["status"], "complete", "{stored}");
    assert_eq!(stored["content"], script.text().as_str());
    assert!(!watcher.await.unwrap(), "the reply was marked failed while it was still being stored");

    // Day and month totals: both hold the reply's tokens.
    let expected = 2 * (MOCK_PROMPT_TOKENS + MOCK_COMPLETION_TOKENS);
    let mut counted = 0;
    for _ in 0..100 {
        counted = app
            .database
            .scalar(
                "SELECT CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) FROM user_usage WHERE user_id = $1",
                &[&user.id],
            )
            .await;
        if counted == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counted, expected, "usage counted during the outage is written once the database is back");
}
