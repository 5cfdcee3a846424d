//! SPEC §3 WebSocket `/api/ws`: authentication before the upgrade, frame
//! order, ping/pong, bad frames answered with `error` frames on a socket
//! that stays open, cancel, replies that outlive their socket, re-attaching
//! by `request_id`, and the slow-consumer close (4008).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

use crate::helpers::{TestApp, WsClient, WsEnd, assert_message, db_tests, frame_text, frame_types};
use crate::mock_llm::{Script, StreamEnd};

db_tests!(
    the_socket_needs_credentials_before_the_upgrade,
    frames_come_in_order_for_a_new_and_an_existing_conversation,
    ping_gets_pong,
    bad_frames_get_an_error_frame_and_the_socket_stays_open,
    a_provider_failure_is_an_error_frame_after_the_user_message,
    cancel_frame_stops_the_reply_and_keeps_the_partial_text,
    a_closed_socket_does_not_stop_the_reply,
    resending_a_request_id_reattaches_instead_of_sending_again,
    a_socket_that_does_not_read_is_closed_with_4008_and_the_reply_completes,
    a_socket_generates_one_reply_at_a_time,
    a_flooding_socket_is_refused_then_closed_with_1008,
    an_oversized_frame_is_closed_with_1009,
);

const SETTLE: Duration = Duration::from_secs(15);

async fn the_socket_needs_credentials_before_the_upgrade(app: TestApp) {
    let url = format!("ws://127.0.0.1:{}/api/ws", app.port);
    for target in [url.clone(), format!("{url}?token=not-a-token")] {
        match tokio_tungstenite::connect_async(&target).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{target}");
            }
            other => panic!("{target}: expected a 401 before the upgrade, got {:?}", other.map(|(_, r)| r.status())),
        }
    }

    // A Bearer header works as well as ?token=.
    let user = app.signup().await;
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", user.token).parse().unwrap());
    let (socket, _) = tokio_tungstenite::connect_async(request).await.expect("upgrade with a Bearer header");
    let mut ws = WsClient { socket };
    ws.send(json!({ "type": "ping" })).await;
    ws.expect("pong").await;
}

async fn frames_come_in_order_for_a_new_and_an_existing_conversation(app: TestApp) {
    let user = app.signup().await;
    let script = Script::words(10, Duration::from_millis(10));
    app.provider.stream(script.clone());
    let mut ws = app.ws(&user).await;

    ws.send_message("r1", None, "Hello socket").await;
    let frames = ws.until_finished("r1").await;
    let types = frame_types(&frames);
    assert_eq!(types.first(), Some(&"user_message"), "{types:?}");
    assert_eq!(types.last(), Some(&"done"), "{types:?}");
    assert!(types[1..types.len() - 1].iter().all(|t| *t == "delta"), "{types:?}");
    assert!(types.len() >= 4, "a streamed reply comes in several deltas: {types:?}");
    assert!(frames.iter().all(|f| f["request_id"] == "r1"), "{frames:?}");

    let question = &frames[0]["message"];
    let conversation = question["conversation_id"].as_str().expect("a new conversation").to_owned();
    assert_message(question, &conversation, "user", "complete");
    assert_eq!(question["content"], "Hello socket");
    let done = &frames.last().unwrap()["message"];
    assert_message(done, &conversation, "assistant", "complete");
    assert_eq!(done["content"], script.text());
    assert!(done["usage"]["total_tokens"].is_i64(), "{done}");
    assert_eq!(frame_text(&frames), script.text());
    assert!(frames[1..frames.len() - 1].iter().all(|f| f["message_id"] == done["id"]), "{frames:?}");

    ws.send_message("r2", Some(&conversation), "And more").await;
    let frames = ws.until_finished("r2").await;
    assert_eq!(frames[0]["message"]["conversation_id"], conversation.as_str());
    assert_eq!(frames.last().unwrap()["type"], "done");
    let list = app.messages(&user, &conversation, "").await;
    assert_eq!(list.items().len(), 4, "{}", list.text);
    let history = app.provider.last_request().messages();
    assert!(history.iter().any(|(_, c)| c == "Hello socket"), "the provider sees the history: {history:?}");
}

async fn ping_gets_pong(app: TestApp) {
    let user = app.signup().await;
    let mut ws = app.ws(&user).await;
    for _ in 0..3 {
        ws.send(json!({ "type": "ping" })).await;
        assert_eq!(ws.next().await, json!({ "type": "pong" }));
    }
}

async fn bad_frames_get_an_error_frame_and_the_socket_stays_open(app: TestApp) {
    let user = app.signup().await;
    let stranger = app.signup().await;
    let theirs = app.new_conversation(&stranger).await;
    let mut ws = app.ws(&user).await;
    let bad: Vec<(String, Option<&str>)> = vec![
        ("not json at all".into(), None),
        ("[1, 2, 3]".into(), None),
        (json!({ "type": "bogus" }).to_string(), None),
        (json!({ "no_type": true }).to_string(), None),
        (
            json!({ "type": "message", "request_id": "b1", "conversation_id": null, "content": 42 }).to_string(),
            Some("b1"),
        ),
        (
            json!({ "type": "message", "request_id": "b2", "conversation_id": null, "content": "" }).to_string(),
            Some("b2"),
        ),
        (
            json!({ "type": "message", "request_id": "b3", "conversation_id": null, "content": "   " }).to_string(),
            Some("b3"),
        ),
        (json!({ "type": "message", "request_id": "b4", "conversation_id": null }).to_string(), Some("b4")),
        (
            json!({ "type": "message", "request_id": "b5", "conversation_id": "nope", "content": "hi" }).to_string(),
            Some("b5"),
        ),
        (
            json!({ "type": "message", "request_id": "b6", "conversation_id": theirs, "content": "hi" }).to_string(),
            Some("b6"),
        ),
        (
            json!({ "type": "message", "request_id": "b7", "conversation_id": null, "content": "x".repeat(32_001) })
                .to_string(),
            Some("b7"),
        ),
        (json!({ "type": "cancel", "request_id": "never-sent" }).to_string(), Some("never-sent")),
        (json!({ "type": "cancel" }).to_string(), None),
    ];
    for (frame, request_id) in &bad {
        ws.send_text(frame).await;
        let answer = ws.next().await;
        let shown: String = frame.chars().take(80).collect();
        assert_eq!(answer["type"], "error", "{shown} got {answer}");
        assert!(answer["detail"].as_str().is_some_and(|d| !d.is_empty()), "{shown} got {answer}");
        assert!(answer["code"].as_str().is_some_and(|c| !c.is_empty()), "{shown} got {answer}");
        if let Some(id) = request_id {
            assert_eq!(answer["request_id"], *id, "{shown} got {answer}");
        }
        ws.send(json!({ "type": "ping" })).await;
        assert_eq!(ws.next().await["type"], "pong", "the socket stays usable after {shown}");
    }
    {
        use futures::SinkExt;
        ws.socket.send(tungstenite::Message::binary(vec![1u8, 2, 3])).await.unwrap();
    }
    assert_eq!(ws.next().await["type"], "error", "a binary frame gets an error frame");
    ws.send(json!({ "type": "ping" })).await;
    ws.expect("pong").await;

    assert_eq!(app.provider.request_count(), 0, "no bad frame reached the provider");
    let list = app.get("/api/conversations").bearer_auth(&user.token).send().await.unwrap();
    let body: Value = list.json().await.unwrap();
    assert_eq!(body["total"], 0, "no bad frame created a conversation: {body}");
}

async fn a_provider_failure_is_an_error_frame_after_the_user_message(app: TestApp) {
    let user = app.signup().await;
    app.provider.fail_with(400);
    let mut ws = app.ws(&user).await;
    ws.send_message("f1", None, "Fail").await;
    let frames = ws.until_finished("f1").await;
    assert_eq!(frame_types(&frames), ["user_message", "error"], "{frames:?}");
    assert_eq!(frames[1]["request_id"], "f1");
    assert_eq!(frames[1]["code"], "provider_error");
    let conversation = frames[0]["message"]["conversation_id"].as_str().unwrap();
    let list = app.messages(&user, conversation, "").await;
    assert_eq!(list.items().len(), 2, "the question is kept: {}", list.text);
}

async fn cancel_frame_stops_the_reply_and_keeps_the_partial_text(app: TestApp) {
    let user = app.signup().await;
    let script = Script::words(100, Duration::from_millis(50));
    let full = script.text();
    app.provider.stream(script);
    let mut ws = app.ws(&user).await;

    ws.send_message("c1", None, "Go on and on").await;
    let mut frames = vec![ws.expect("user_message").await, ws.expect("delta").await, ws.expect("delta").await];
    ws.send(json!({ "type": "cancel", "request_id": "c1" })).await;
    frames.extend(ws.until_finished("c1").await);

    let done = &frames.last().unwrap();
    assert_eq!(done["type"], "done", "{frames:?}");
    let message = &done["message"];
    assert_eq!(message["status"], "cancelled", "{message}");
    let partial = message["content"].as_str().unwrap();
    assert!(!partial.is_empty() && partial.len() < full.len() && full.starts_with(partial), "{partial:?}");
    assert_eq!(frame_text(&frames), partial, "the deltas are exactly the kept text");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while app.provider.open_streams() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the provider stream is still read after the cancel");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(app.provider.chunks_sent() < 100);
    let conversation = message["conversation_id"].as_str().unwrap();
    let stored = app.stored_message(&user, conversation, message["id"].as_str().unwrap()).await;
    assert_eq!(stored["status"], "cancelled");
    assert_eq!(stored["content"], partial);

    // The request is over: cancelling it again is an error frame, and the socket lives on.
    ws.send(json!({ "type": "cancel", "request_id": "c1" })).await;
    let again = ws.expect("error").await;
    assert_eq!(again["request_id"], "c1");
    ws.send(json!({ "type": "ping" })).await;
    ws.expect("pong").await;
}

async fn a_closed_socket_does_not_stop_the_reply(app: TestApp) {
    let user = app.signup().await;
    let script = Script::words(20, Duration::from_millis(40));
    app.provider.stream(script.clone());
    let mut ws = app.ws(&user).await;
    ws.send_message("d1", None, "Keep going").await;
    let question = ws.expect("user_message").await;
    let delta = ws.expect("delta").await;
    drop(ws);

    let conversation = question["message"]["conversation_id"].as_str().unwrap();
    let reply_id = delta["message_id"].as_str().unwrap();
    let reply = app.settled_message(&user, conversation, reply_id, SETTLE).await;
    assert_eq!(reply["status"], "complete", "{reply}");
    assert_eq!(reply["content"], script.text());
}

async fn resending_a_request_id_reattaches_instead_of_sending_again(app: TestApp) {
    let user = app.signup().await;
    let script = Script::words(25, Duration::from_millis(40));
    let full = script.text();
    app.provider.stream(script);

    let mut first = app.ws(&user).await;
    first.send_message("same", None, "Only once").await;
    let question = first.expect("user_message").await["message"].clone();
    first.expect("delta").await;
    drop(first);

    // A new socket resends the frame while the reply is still running.
    let mut second = app.ws(&user).await;
    second.send_message("same", None, "Only once").await;
    let frames = second.until_finished("same").await;
    assert_eq!(frames[0]["type"], "user_message", "{frames:?}");
    assert_eq!(frames[0]["message"]["id"], question["id"], "the original message, not a new one");
    assert_eq!(frame_text(&frames), full, "re-attached from the start of the reply");
    assert_eq!(frames.last().unwrap()["message"]["content"], full.as_str());

    // After the end, once more on the same socket: the whole reply again.
    second.send_message("same", None, "Only once").await;
    let frames = second.until_finished("same").await;
    assert_eq!(frames[0]["message"]["id"], question["id"]);
    assert_eq!(frame_text(&frames), full);

    // The same request_id with other content is refused.
    second.send_message("same", None, "Something else").await;
    let refused = second.expect("error").await;
    assert_eq!(refused["request_id"], "same");
    assert_eq!(refused["code"], "idempotency_key_reused", "{refused}");

    assert_eq!(app.provider.request_count(), 1, "one provider call");
    let conversation = question["conversation_id"].as_str().unwrap();
    let list = app.messages(&user, conversation, "").await;
    assert_eq!(list.items().len(), 2, "one question, one reply: {}", list.text);
    let conversations = app.get("/api/conversations").bearer_auth(&user.token).send().await.unwrap();
    assert_eq!(conversations.json::<Value>().await.unwrap()["total"], 1);
}

/// A socket whose client stopped reading: the server queues at most 256
/// frames, then closes it with 4008 instead of buffering the reply; the
/// reply is generated and stored regardless.
async fn a_socket_that_does_not_read_is_closed_with_4008_and_the_reply_completes(app: TestApp) {
    let user = app.signup().await;
    // Far more than the kernel's socket buffers hold, so the queue fills.
    let script = Script::bulk(3000, 4096);
    let full_len = script.text().len();
    app.provider.stream(script.clone().ending(StreamEnd::Finish));

    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(4096).unwrap();
    let tcp = tcp.connect(format!("127.0.0.1:{}", app.port).parse().unwrap()).await.unwrap();
    let tcp = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
    let (socket, _) = tokio_tungstenite::client_async(app.ws_url(&user.token), tcp).await.expect("upgrade");
    let mut ws = WsClient { socket };
    ws.send_message("slow", None, "Flood me").await;

    // Not reading; the reply still completes and is stored.
    let conversation = loop {
        let list = app.get("/api/conversations").bearer_auth(&user.token).send().await.unwrap();
        let body: Value = list.json().await.unwrap();
        if let Some(id) = body["items"][0]["id"].as_str() {
            break id.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let deadline = tokio::time::Instant::now() + SETTLE;
    let reply = loop {
        let list = app.messages(&user, &conversation, "").await;
        let reply = list.items().iter().find(|m| m["role"] == "assistant").cloned();
        if let Some(r) = reply.filter(|r| r["status"] != "streaming") {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "the reply did not finish while its socket was stalled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reply["status"], "complete");
    assert_eq!(reply["content"].as_str().unwrap().len(), full_len);

    // Reading now: some frames, then the slow-consumer close, not the whole reply.
    let mut text_len = 0;
    let end = loop {
        match ws.next_or_end().await {
            Ok(frame) => {
                assert_ne!(frame["type"], "done", "a stalled socket got the whole reply queued");
                text_len += frame["text"].as_str().map_or(0, str::len);
            }
            Err(end) => break end,
        }
    };
    assert!(matches!(end, WsEnd::Closed(Some(4008))), "expected close code 4008, got {end:?}");
    assert!(text_len < full_len, "the whole reply was buffered for a socket that did not read");

    // The client resumes over SSE and gets everything.
    let reply_id = reply["id"].as_str().unwrap();
    let events = app.resume(&user, &conversation, reply_id, Some(&text_len.to_string())).await.rest().await;
    assert_eq!(events.last().unwrap().event, "done");
    assert_eq!(text_len + crate::helpers::delta_text(&events).len(), full_len);
}

/// Issue #8 (item 8): 300 message frames on one socket started 300 provider
/// calls. One reply generates at a time; other messages get `busy`.
async fn a_socket_generates_one_reply_at_a_time(app: TestApp) {
    let user = app.signup().await;
    let script = Script::words(20, Duration::from_millis(50));
    app.provider.stream(script.clone());
    let mut ws = app.ws(&user).await;
    ws.send_message("first", None, "Take your time").await;
    let question = ws.expect("user_message").await;
    for i in 0..20 {
        ws.send_message(&format!("more-{i}"), None, "And this too").await;
    }
    // The same request again re-attaches to its reply: no `busy` for it.
    ws.send_message("first", None, "Take your time").await;
    let mut frames = Vec::new();
    let mut finished = 0;
    while finished < 2 {
        let frame = ws.next().await;
        if frame["request_id"] == "first" && frame["type"] == "done" {
            finished += 1;
        }
        frames.push(frame);
    }
    let busy: Vec<&Value> = frames.iter().filter(|f| f["code"] == "busy").collect();
    assert_eq!(busy.len(), 20, "every other message is refused: {frames:#?}");
    for (i, frame) in busy.iter().enumerate() {
        assert_eq!(frame["type"], "error");
        assert_eq!(frame["request_id"], format!("more-{i}"), "{frame}");
        assert!(frame["detail"].as_str().is_some_and(|d| !d.is_empty()), "{frame}");
    }
    let reattached: Vec<&Value> =
        frames.iter().filter(|f| f["type"] == "user_message" && f["request_id"] == "first").collect();
    assert_eq!(reattached.len(), 1, "{frames:#?}");
    assert_eq!(reattached[0]["message"]["id"], question["message"]["id"]);
    assert_eq!(app.provider.request_count(), 1, "one provider call for 22 message frames");

    // Once the reply is done, the next message goes through at once.
    app.provider.stream(Script::words(3, Duration::from_millis(1)));
    ws.send_message("next", None, "Now me").await;
    let frames = ws.until_finished("next").await;
    assert_eq!(frames.last().unwrap()["type"], "done", "{frames:?}");
    assert_eq!(app.provider.request_count(), 2);
}

/// Frames past the socket's budget (30 at once, then 10 a second) are
/// refused with `rate_limited`; a client that keeps on is closed with 1008.
async fn a_flooding_socket_is_refused_then_closed_with_1008(app: TestApp) {
    let user = app.signup().await;
    let ws = app.ws(&user).await;
    assert_floods_are_cut_off(ws, json!({ "type": "ping" })).await;
    assert_eq!(app.provider.request_count(), 0);
}

/// Sends 300 `frame`s as fast as possible and checks what came back: some
/// answers, then `rate_limited` errors, then close code 1008.
pub async fn assert_floods_are_cut_off(mut ws: WsClient, frame: Value) {
    use futures::SinkExt;
    for _ in 0..300 {
        // The server may close the socket while we are still sending.
        if ws.socket.send(tungstenite::Message::text(frame.to_string())).await.is_err() {
            break;
        }
    }
    let (mut answered, mut limited) = (0, 0);
    let end = loop {
        match ws.next_or_end().await {
            Ok(f) if f["code"] == "rate_limited" => {
                assert_eq!(f["type"], "error", "{f}");
                limited += 1;
            }
            Ok(f) if f["type"] == "error" => panic!("unexpected error frame: {f}"),
            Ok(_) => answered += 1,
            Err(end) => break end,
        }
    };
    assert!(
        matches!(end, WsEnd::Closed(Some(1008))),
        "expected close code 1008, got {end:?} after {answered} answers and {limited} refusals"
    );
    // The chat socket answers pings in order; the support sockets answer
    // from tasks of their own, which the close may overtake.
    assert!((1..=40).contains(&answered), "a burst of at most about 30 frames is answered: {answered}");
    assert!(limited > 0, "refused frames are told so before the close");
}

/// A frame over the 1 MiB limit ends the socket with close code 1009, not
/// a dropped connection.
async fn an_oversized_frame_is_closed_with_1009(app: TestApp) {
    let user = app.signup().await;
    let ws = app.ws(&user).await;
    assert_oversized_frames_are_closed_with_1009(ws).await;
}

pub async fn assert_oversized_frames_are_closed_with_1009(mut ws: WsClient) {
    use futures::SinkExt;
    let content = "x".repeat(1024 * 1024 + 1024);
    let frame = json!({ "type": "message", "request_id": "big", "content": content }).to_string();
    let _ = ws.socket.send(tungstenite::Message::text(frame)).await;
    let end = loop {
        match ws.next_or_end().await {
            Ok(frame) => assert_ne!(frame["type"], "user_message", "an oversized frame was accepted"),
            Err(end) => break end,
        }
    };
    assert!(matches!(end, WsEnd::Closed(Some(1009))), "expected close code 1009, got {end:?}");
}
