//! SPEC §6 against the real `palaver` binary in a child process: `kill -9`
//! mid-stream loses at most the flush window (the reply is `failed` with its
//! partial text, the question intact), and readers that stall do not make
//! the server's memory grow with the reply.

use std::time::Duration;

use reqwest::StatusCode;
use tokio::io::AsyncWriteExt;

use crate::helpers::{TestApp, TestUser, assert_message, db_tests, delta_text, event_names};
use crate::mock_llm::Script;

db_tests!(process;
    a_reply_killed_mid_stream_is_failed_with_its_partial_text;
    sqlite_only: stalled_readers_do_not_grow_server_memory,
);

async fn a_reply_killed_mid_stream_is_failed_with_its_partial_text(mut app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    let script = Script::words(200, Duration::from_millis(30));
    let full = script.text();
    app.provider.stream(script);

    let mut stream = app.post_message_sse(&user, &conversation, "Survive this", None).await;
    let question = stream.expect("user_message").await.data;
    let mut events = vec![stream.expect("delta").await];
    // Past a few flush intervals (100 ms) with text flowing.
    let until = tokio::time::Instant::now() + Duration::from_millis(450);
    while tokio::time::Instant::now() < until {
        events.push(stream.expect("delta").await);
    }
    let seen = delta_text(&events);
    let reply_id = events[0].data["message_id"].as_str().unwrap().to_owned();
    app.kill_server().await;
    drop(stream);

    // Without takeover (tests/api/takeover.rs has it on), the reply is failed.
    app.restart_with(|s| s.chat.reply_takeover = false).await;
    let user = app.login_as(&user).await;
    // PostgreSQL fails a reply only once its heartbeat is 10 s old.
    let reply = app.settled_message(&user, &conversation, &reply_id, Duration::from_secs(25)).await;
    assert_message(&reply, &conversation, "assistant", "failed");
    let partial = reply["content"].as_str().unwrap();
    assert!(!partial.is_empty(), "the partial text saved before the kill was lost");
    assert!(full.starts_with(partial), "the kept text is not a prefix of the reply: {partial:?}");
    assert!(partial.len() < full.len(), "the reply cannot have finished");
    assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()), "{reply}");
    // At most the flush window (and what was in flight) is lost: the text
    // saved reaches well into what the client was shown.
    assert!(partial.len() * 2 >= seen.len(), "kept {} bytes of the {} shown", partial.len(), seen.len());

    let stored_question = app.stored_message(&user, &conversation, question["id"].as_str().unwrap()).await;
    assert_eq!(stored_question["status"], "complete");
    assert_eq!(stored_question["content"], "Survive this");

    // The failed reply replays as such, and the conversation goes on.
    let replay = app.resume(&user, &conversation, &reply_id, None).await.rest().await;
    assert_eq!(event_names(&replay), ["delta", "error"], "{replay:?}");
    assert_eq!(replay[0].data["text"], partial);
    app.provider.reply_with("Back again.");
    let next = app.say(&user, &conversation, "Still there?").await;
    assert_eq!(next["assistant_message"]["content"], "Back again.");
}

/// Opens an HTTP request on a socket with a tiny receive buffer and never
/// reads the answer.
async fn stalled_request(port: u16, head: &str, body: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(format!("127.0.0.1:{port}").parse().unwrap()).await.unwrap();
    let request = format!("{head}Host: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    tcp.write_all(request.as_bytes()).await.unwrap();
    tcp
}

/// Streams an 8 MiB reply to `readers` stalled SSE readers (the POST and
/// resumes of it) and waits until it is stored complete; answers the
/// server's peak RSS meanwhile, and the sockets (still unread).
async fn stalled_reply(app: &TestApp, user: &TestUser, readers: usize) -> (u64, Vec<tokio::net::TcpStream>) {
    const CHUNKS: usize = 4096;
    let conversation = app.new_conversation(user).await;
    let mut script = Script::bulk(CHUNKS, 2048);
    // Text starts after the readers are attached, so none needs a catch-up.
    script.start = Duration::from_millis(800);
    script.every = Duration::from_millis(1);
    let reply_len = script.text().len();
    app.provider.stream(script);
    let sent_before = app.provider.chunks_sent();

    let auth = format!("Authorization: Bearer {}\r\nAccept: text/event-stream\r\n", user.token);
    let post =
        format!("POST /api/conversations/{conversation}/messages HTTP/1.1\r\n{auth}Content-Type: application/json\r\n");
    let mut sockets = vec![stalled_request(app.port, &post, r#"{"content":"Flood me"}"#).await];
    let reply_id = loop {
        let list = app.messages(user, &conversation, "").await;
        if let Some(id) = list.items().iter().find(|m| m["role"] == "assistant").and_then(|m| m["id"].as_str()) {
            break id.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let resume = format!(
        "GET /api/conversations/{conversation}/messages/{reply_id}/stream HTTP/1.1\r\n{auth}Last-Event-ID: 0\r\n"
    );
    for _ in 1..readers {
        sockets.push(stalled_request(app.port, &resume, "").await);
    }

    // Polled in the database: listing an 8 MiB message would cost memory too.
    let streaming = "SELECT COUNT(*) FROM messages WHERE id = $1 AND status = 'streaming'";
    let mut peak = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while app.database.scalar(streaming, &[&reply_id]).await > 0 {
        peak = peak.max(app.server_rss_kib());
        assert!(tokio::time::Instant::now() < deadline, "the reply did not finish while its readers were stalled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peak = peak.max(app.server_rss_kib());
    let reply = app.stored_message(user, &conversation, &reply_id).await;
    assert_eq!(reply["status"], "complete", "{}", reply["error"]);
    assert_eq!(reply["content"].as_str().unwrap().len(), reply_len);
    assert_eq!(app.provider.chunks_sent() - sent_before, CHUNKS);
    (peak, sockets)
}

async fn stalled_readers_do_not_grow_server_memory(mut app: TestApp) {
    const READERS: usize = 32;
    const REPLY_MIB: u64 = 8;
    // Saving 8 MiB ten times a second churns the allocator enough to hide
    // what is measured here; once a second is the production default.
    app.kill_server().await;
    app.restart_with(|s| s.chat.stream_flush_ms = 1000).await;
    let user = app.signup().await;

    // The cost of an 8 MiB reply itself, with one stalled reader…
    let baseline = app.server_rss_kib();
    let (one, _first) = stalled_reply(&app, &user, 1).await;
    // …and of another one with 32: buffering the reply per reader would
    // take 32 × 8 MiB more (plus framing). Measured in a debug build: about
    // 3 MiB per stalled reader, and a second reply with one reader grows
    // ~24 MiB by itself (allocator), hence the loose bound.
    let (many, _rest) = stalled_reply(&app, &user, READERS).await;
    let extra_mib = many.saturating_sub(one) / 1024;
    eprintln!(
        "server RSS: {baseline} KiB at rest, {one} KiB peak with 1 stalled reader, {many} KiB with {READERS} \
         ({extra_mib} MiB more)"
    );
    assert!(
        extra_mib < READERS as u64 * REPLY_MIB * 3 / 4,
        "{READERS} stalled readers of an {REPLY_MIB} MiB reply cost {extra_mib} MiB more than one"
    );

    // The server still answers everyone else.
    let health = app.get("/health").send().await.expect("health");
    assert_eq!(health.status(), StatusCode::OK);
}
