//! SPEC §5 and §6 over real sockets: the visitor's `/ws/support/{id}` and
//! the agent console's `/ws/agent` through a whole support conversation,
//! replay with `?since=`, and what each socket refuses.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

use crate::helpers::{Fetch, TestApp, TestUser, WsClient, WsEnd, db_tests};
use crate::mock_llm::{Script, StreamEnd};
use crate::support::{Visitor, agent, claim, handoff, visitor};

db_tests!(
    the_whole_desk_flow_over_sockets,
    both_sockets_replay_what_they_missed_since_an_event_id,
    sockets_check_their_credentials_before_the_upgrade,
    bad_frames_get_error_frames_and_the_socket_stays_open,
    a_visitor_who_does_not_read_is_closed_with_4008_and_catches_up,
    both_sockets_take_a_bearer_header,
    floods_and_oversized_frames_close_support_sockets,
);

// ---------------------------------------------------------------------------
// Socket helpers, shared with the multi-instance tests

/// The visitor's socket on the server at `port`.
pub async fn client_socket(port: u16, v: &Visitor, since: Option<i64>) -> WsClient {
    let since = since.map(|s| format!("&since={s}")).unwrap_or_default();
    connect(&format!("ws://127.0.0.1:{port}/ws/support/{}?token={}{since}", v.id, v.token)).await
}

/// The agent console's socket on the server at `port`.
pub async fn agent_socket(port: u16, agent: &TestUser, since: Option<i64>) -> WsClient {
    let since = since.map(|s| format!("&since={s}")).unwrap_or_default();
    connect(&format!("ws://127.0.0.1:{port}/ws/agent?token={}{since}", agent.token)).await
}

async fn connect(url: &str) -> WsClient {
    let (socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("the handshake with {url} failed: {e:?}"));
    WsClient { socket }
}

/// Reads frames until one satisfies `wanted` and returns it; every frame
/// read (the wanted one included) is appended to `log`.
pub async fn until(ws: &mut WsClient, log: &mut Vec<Value>, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..500 {
        let frame =
            ws.next_or_end().await.unwrap_or_else(|end| panic!("the socket ended ({end:?}) before {what}: {log:#?}"));
        log.push(frame.clone());
        if wanted(&frame) {
            return frame;
        }
    }
    panic!("no {what} in 500 frames");
}

/// A visitor's status frame with this status and queue position.
pub fn status_is(status: &'static str, position: Option<i64>) -> impl Fn(&Value) -> bool {
    move |f| f["type"] == "status" && f["status"] == status && f["queue_position"].as_i64() == position
}

/// A message frame (either socket) with this role and content.
pub fn message_is(role: &'static str, content: &str) -> impl Fn(&Value) -> bool {
    let content = content.to_owned();
    move |f| f["type"] == "message" && f["message"]["role"] == role && f["message"]["content"] == content.as_str()
}

/// The agent's queue frame listing exactly these sessions, in this order.
pub fn queue_is(ids: Vec<String>) -> impl Fn(&Value) -> bool {
    move |f| {
        f["type"] == "queue"
            && f["items"].as_array().is_some_and(|items| {
                items.iter().map(|s| s["session_id"].as_str().unwrap_or_default()).eq(ids.iter().map(String::as_str))
            })
    }
}

/// After `status: closed`, the socket ends with a normal close (1000).
pub async fn assert_closed_politely(ws: &mut WsClient) {
    match ws.next_or_end().await {
        Err(WsEnd::Closed(code)) => assert_eq!(code, Some(1000)),
        other => panic!("expected a close frame with 1000, got {other:?}"),
    }
}

/// The roles and contents of a session's stored messages.
pub async fn stored_messages(address: &str, v: &Visitor) -> Vec<(String, String)> {
    let r = reqwest::Client::new()
        .get(format!("{address}/api/support/sessions/{}/messages?limit=100", v.id))
        .bearer_auth(&v.token)
        .fetch()
        .await;
    r.assert_status(StatusCode::OK);
    r.items()
        .iter()
        .map(|m| (m["role"].as_str().unwrap().to_owned(), m["content"].as_str().unwrap().to_owned()))
        .collect()
}

// ---------------------------------------------------------------------------

async fn the_whole_desk_flow_over_sockets(app: TestApp) {
    let script = Script::words(6, Duration::from_millis(5));
    app.provider.stream(script.clone());
    let (v1, v2, v3) = (visitor(&app, "v1").await, visitor(&app, "v2").await, visitor(&app, "v3").await);
    let (mut c1, mut c2, mut c3) = (
        client_socket(app.port, &v1, None).await,
        client_socket(app.port, &v2, None).await,
        client_socket(app.port, &v3, None).await,
    );
    let (mut log1, mut log2, mut log3) = (Vec::new(), Vec::new(), Vec::new());
    // Each socket starts with its session's status.
    for (c, log) in [(&mut c1, &mut log1), (&mut c2, &mut log2), (&mut c3, &mut log3)] {
        until(c, log, "the greeting", status_is("ai", None)).await;
    }
    let (alice, bob) = (agent(&app).await, agent(&app).await);
    let (mut a, mut alog) = (agent_socket(app.port, &alice, None).await, Vec::new());
    until(&mut a, &mut alog, "the empty queue", queue_is(vec![])).await;

    // AI mode: the visitor's message, the reply streamed in deltas, then the reply.
    c1.send(json!({ "type": "message", "content": "Where is my parcel?" })).await;
    let mine = c1.expect("message").await;
    assert_eq!(
        (&mine["message"]["role"], &mine["message"]["content"]),
        (&json!("user"), &json!("Where is my parcel?"))
    );
    assert!(mine["event_id"].is_i64(), "{mine}");
    let mut streamed = String::new();
    let reply = loop {
        let f = c1.next().await;
        match f["type"].as_str() {
            Some("delta") => streamed.push_str(f["text"].as_str().unwrap()),
            Some("message") => break f,
            _ => panic!("unexpected frame while the AI answers: {f}"),
        }
    };
    assert_eq!(reply["message"]["role"], "assistant");
    assert_eq!(reply["message"]["content"], script.text());
    assert_eq!(streamed, script.text(), "the deltas add up to the reply");
    assert_eq!(app.provider.request_count(), 1);

    // Handoff in words, then by frame: one FIFO queue with live positions.
    c1.send(json!({ "type": "message", "content": "I want to speak to a human, please" })).await;
    until(&mut c1, &mut log1, "the handoff message", message_is("user", "I want to speak to a human, please")).await;
    let queued = until(&mut c1, &mut log1, "queued at 1", status_is("queued", Some(1))).await;
    assert!(queued["estimated_wait_seconds"].as_i64().unwrap() > 0, "{queued}");
    c2.send(json!({ "type": "request_human" })).await;
    until(&mut c2, &mut log2, "queued at 2", status_is("queued", Some(2))).await;
    c3.send(json!({ "type": "request_human" })).await;
    until(&mut c3, &mut log3, "queued at 3", status_is("queued", Some(3))).await;
    let queue =
        until(&mut a, &mut alog, "three waiting", queue_is(vec![v1.id.clone(), v2.id.clone(), v3.id.clone()])).await;
    let positions: Vec<i64> =
        queue["items"].as_array().unwrap().iter().map(|s| s["queue_position"].as_i64().unwrap()).collect();
    assert_eq!(positions, [1, 2, 3]);
    assert!(queue["items"][0]["waiting_since"].is_string(), "{queue}");

    // Alice claims the first; everyone behind moves up; Bob is too late.
    a.send(json!({ "type": "claim_session", "session_id": v1.id })).await;
    let human = until(&mut c1, &mut log1, "the claim", status_is("human", None)).await;
    assert_eq!(human["agent"]["id"], alice.id.as_str());
    until(&mut c2, &mut log2, "moved up to 1", status_is("queued", Some(1))).await;
    until(&mut c3, &mut log3, "moved up to 2", status_is("queued", Some(2))).await;
    until(&mut a, &mut alog, "the claimed session", |f| {
        f["type"] == "session" && f["session"]["session_id"] == v1.id.as_str() && f["session"]["status"] == "human"
    })
    .await;
    until(&mut a, &mut alog, "two waiting", queue_is(vec![v2.id.clone(), v3.id.clone()])).await;
    let (mut b, mut blog) = (agent_socket(app.port, &bob, None).await, Vec::new());
    until(&mut b, &mut blog, "bob's queue", queue_is(vec![v2.id.clone(), v3.id.clone()])).await;
    b.send(json!({ "type": "claim_session", "session_id": v1.id })).await;
    let refused = until(&mut b, &mut blog, "the refused claim", |f| f["type"] == "error").await;
    assert_eq!(refused["code"], "not_queued");

    // Messages both ways; only the assigned agent speaks; the AI is silent.
    a.send(json!({ "type": "message", "session_id": v1.id, "content": "Hi, Alice here." })).await;
    let heard = until(&mut c1, &mut log1, "the agent's message", message_is("agent", "Hi, Alice here.")).await;
    assert_eq!(heard["message"]["session_id"], v1.id.as_str());
    until(&mut a, &mut alog, "her own message", message_is("agent", "Hi, Alice here.")).await;
    b.send(json!({ "type": "message", "session_id": v1.id, "content": "Bob butts in" })).await;
    assert_eq!(until(&mut b, &mut blog, "the refusal", |f| f["type"] == "error").await["code"], "not_assigned");
    c1.send(json!({ "type": "message", "content": "Thanks Alice" })).await;
    let told = until(&mut a, &mut alog, "the visitor's message", message_is("user", "Thanks Alice")).await;
    assert_eq!(told["session_id"], v1.id.as_str());
    until(&mut c1, &mut log1, "the visitor's own message", message_is("user", "Thanks Alice")).await;

    // Release: back to the head of the queue, ahead of the others.
    a.send(json!({ "type": "release_session", "session_id": v1.id })).await;
    until(&mut c1, &mut log1, "back at the head", status_is("queued", Some(1))).await;
    until(&mut c2, &mut log2, "pushed back to 2", status_is("queued", Some(2))).await;
    until(&mut a, &mut alog, "the queue after release", queue_is(vec![v1.id.clone(), v2.id.clone(), v3.id.clone()]))
        .await;

    // Bob claims it, then closes: the visitor is told and the socket ends politely.
    b.send(json!({ "type": "claim_session", "session_id": v1.id })).await;
    let bobs = until(&mut c1, &mut log1, "bob's claim", status_is("human", None)).await;
    assert_eq!(bobs["agent"]["id"], bob.id.as_str());
    a.send(json!({ "type": "close_session", "session_id": v1.id })).await;
    assert_eq!(until(&mut a, &mut alog, "alice may not close", |f| f["type"] == "error").await["code"], "not_assigned");
    b.send(json!({ "type": "close_session", "session_id": v1.id })).await;
    until(&mut c1, &mut log1, "the close", status_is("closed", None)).await;
    assert_closed_politely(&mut c1).await;
    until(&mut b, &mut blog, "the closed session", |f| f["type"] == "session" && f["session"]["status"] == "closed")
        .await;

    // Everything is stored, once, and nothing reached the other visitors.
    let turns = stored_messages(&app.address, &v1).await;
    let expected = [
        ("user", "Where is my parcel?"),
        ("assistant", script.text().as_str()),
        ("user", "I want to speak to a human, please"),
        ("agent", "Hi, Alice here."),
        ("user", "Thanks Alice"),
    ]
    .map(|(r, c)| (r.to_owned(), c.to_owned()));
    assert_eq!(turns, expected);
    assert_eq!(app.provider.request_count(), 1, "the AI said nothing after the handoff");
    for f in log2.iter().chain(&log3) {
        assert!(f["type"] == "status", "another visitor's socket got {f}");
    }
}

async fn both_sockets_replay_what_they_missed_since_an_event_id(app: TestApp) {
    let v = visitor(&app, "replay").await;
    let alice = agent(&app).await;
    handoff(&app, &v).await;
    claim(&app, &alice, &v).await;

    // A fresh client socket replays the session's log, then its status.
    let mut c = client_socket(app.port, &v, None).await;
    let queued = c.expect("status").await;
    assert_eq!(queued["status"], "queued");
    let human = c.expect("status").await;
    assert_eq!(human["status"], "human");
    let since = human["event_id"].as_i64().expect("logged events carry their id");
    assert!(since > queued["event_id"].as_i64().unwrap());
    drop(c);

    // Away: the agent writes twice. Back with ?since=: exactly those, in order.
    for text in ["one", "two"] {
        app.post(&format!("/api/agent/sessions/{}/messages", v.id))
            .bearer_auth(&alice.token)
            .json(&json!({ "content": text }))
            .fetch()
            .await
            .assert_status(StatusCode::CREATED);
    }
    let mut c = client_socket(app.port, &v, Some(since)).await;
    let (one, two) = (c.expect("message").await, c.expect("message").await);
    assert_eq!((&one["message"]["content"], &two["message"]["content"]), (&json!("one"), &json!("two")));
    assert!(one["event_id"].as_i64().unwrap() > since && two["event_id"].as_i64() > one["event_id"].as_i64());
    let status = c.expect("status").await;
    assert_eq!((&status["status"], &status["agent"]["id"]), (&json!("human"), &json!(alice.id)));
    let last = two["event_id"].as_i64().unwrap();

    // The agent console: away while the visitor writes, then replayed.
    let mut a = agent_socket(app.port, &alice, Some(last)).await;
    a.expect("queue").await;
    drop(a);
    c.send(json!({ "type": "message", "content": "three" })).await;
    let three = until(&mut c, &mut Vec::new(), "the visitor's message", message_is("user", "three")).await;
    let mut a = agent_socket(app.port, &alice, Some(last)).await;
    let replayed = a.expect("message").await;
    assert_eq!((&replayed["session_id"], &replayed["message"]["content"]), (&json!(v.id), &json!("three")));
    assert_eq!(replayed["event_id"], three["event_id"]);
    a.expect("queue").await;

    // Nothing is sent twice: a ping answers with just its pong.
    a.send(json!({ "type": "ping" })).await;
    a.expect("pong").await;
    c.send(json!({ "type": "ping" })).await;
    c.expect("pong").await;
}

async fn sockets_check_their_credentials_before_the_upgrade(app: TestApp) {
    let (v1, v2) = (visitor(&app, "one").await, visitor(&app, "two").await);
    let user = app.signup().await;
    let alice = agent(&app).await;
    let base = format!("ws://127.0.0.1:{}", app.port);
    let refused = [
        (format!("{base}/ws/support/{}", v1.id), StatusCode::UNAUTHORIZED),
        (format!("{base}/ws/support/{}?token=pst_wrong", v1.id), StatusCode::UNAUTHORIZED),
        // A token opens its own session only.
        (format!("{base}/ws/support/{}?token={}", v1.id, v2.token), StatusCode::NOT_FOUND),
        (format!("{base}/ws/support/not-a-uuid?token={}", v1.token), StatusCode::NOT_FOUND),
        (format!("{base}/ws/support/{}?token={}&since=yesterday", v1.id, v1.token), StatusCode::UNPROCESSABLE_ENTITY),
        (format!("{base}/ws/support/{}?token={}&since=-4", v1.id, v1.token), StatusCode::UNPROCESSABLE_ENTITY),
        (format!("{base}/ws/agent"), StatusCode::UNAUTHORIZED),
        (format!("{base}/ws/agent?token={}", v1.token), StatusCode::UNAUTHORIZED),
        (format!("{base}/ws/agent?token={}", user.token), StatusCode::FORBIDDEN),
        (format!("{base}/ws/agent?token={}&since=x", alice.token), StatusCode::UNPROCESSABLE_ENTITY),
    ];
    for (url, status) in refused {
        match tokio_tungstenite::connect_async(&url).await {
            Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), status, "{url}"),
            other => panic!("{url}: expected {status} before the upgrade, got {:?}", other.map(|(_, r)| r.status())),
        }
    }
    // An agent's socket does not show other agents' conversations.
    let bob = agent(&app).await;
    handoff(&app, &v1).await;
    claim(&app, &alice, &v1).await;
    app.post(&format!("/api/agent/sessions/{}/messages", v1.id))
        .bearer_auth(&alice.token)
        .json(&json!({ "content": "private" }))
        .fetch()
        .await
        .assert_status(StatusCode::CREATED);
    let mut b = agent_socket(app.port, &bob, None).await;
    let mut log = Vec::new();
    until(&mut b, &mut log, "bob's queue", |f| f["type"] == "queue").await;
    b.send(json!({ "type": "ping" })).await;
    until(&mut b, &mut log, "the pong", |f| f["type"] == "pong").await;
    assert!(log.iter().all(|f| f["type"] != "message"), "{log:#?}");
}

async fn bad_frames_get_error_frames_and_the_socket_stays_open(app: TestApp) {
    let v = visitor(&app, "frames").await;
    let alice = agent(&app).await;
    let mut c = client_socket(app.port, &v, None).await;
    c.expect("status").await;
    let mut a = agent_socket(app.port, &alice, None).await;
    a.expect("queue").await;
    let bad_client = [
        "not json".to_owned(),
        json!({ "type": "teleport" }).to_string(),
        json!({ "type": "message" }).to_string(),
        json!({ "type": "message", "content": 42 }).to_string(),
        json!({ "type": "message", "content": "   " }).to_string(),
        json!({ "type": "claim_session", "session_id": v.id }).to_string(),
    ];
    for text in &bad_client {
        c.send_text(text).await;
        let e = c.expect("error").await;
        assert!(e["code"].is_string() && e["detail"].is_string(), "{text}: {e}");
    }
    let bad_agent = [
        json!({ "type": "claim_session" }),
        json!({ "type": "claim_session", "session_id": "nope" }),
        json!({ "type": "claim_session", "session_id": v.id }),
        json!({ "type": "message", "session_id": v.id, "content": "not mine" }),
        json!({ "type": "request_human" }),
        json!({ "type": "close_session", "session_id": uuid::Uuid::new_v4() }),
    ];
    for frame in &bad_agent {
        a.send(frame.clone()).await;
        let e = until(&mut a, &mut Vec::new(), "an error", |f| f["type"] == "error").await;
        assert!(e["code"].is_string(), "{frame}: {e}");
    }
    // Both sockets still work.
    c.send(json!({ "type": "ping" })).await;
    c.expect("pong").await;
    a.send(json!({ "type": "ping" })).await;
    until(&mut a, &mut Vec::new(), "the pong", |f| f["type"] == "pong").await;
}

async fn a_visitor_who_does_not_read_is_closed_with_4008_and_catches_up(app: TestApp) {
    // Far more than the kernel's socket buffers hold, so the queue fills.
    let script = Script::bulk(3000, 4096);
    app.provider.stream(script.clone().ending(StreamEnd::Finish));
    let v = visitor(&app, "slow").await;
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(4096).unwrap();
    let tcp = tcp.connect(format!("127.0.0.1:{}", app.port).parse().unwrap()).await.unwrap();
    let url = format!("ws://127.0.0.1:{}/ws/support/{}?token={}", app.port, v.id, v.token);
    let (socket, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(tcp)).await.expect("upgrade");
    let mut ws = WsClient { socket };
    ws.send(json!({ "type": "message", "content": "Flood me" })).await;

    // Not reading; the reply completes and is stored all the same.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stored_messages(&app.address, &v).await.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the reply did not finish while its socket was stalled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Reading now: some frames, then the slow-consumer close, not the whole reply.
    let mut log = Vec::new();
    let end = loop {
        match ws.next_or_end().await {
            Ok(frame) => {
                assert!(
                    !message_is("assistant", &script.text())(&frame),
                    "a stalled socket got the whole reply queued"
                );
                log.push(frame);
            }
            Err(end) => break end,
        }
    };
    assert!(matches!(end, WsEnd::Closed(Some(4008))), "expected close code 4008, got {end:?}");

    // Reconnecting with the last event id it saw replays what it missed.
    let since = log.iter().filter_map(|f| f["event_id"].as_i64()).max();
    let mut ws = client_socket(app.port, &v, since).await;
    until(&mut ws, &mut Vec::new(), "the whole reply", message_is("assistant", &script.text())).await;
}

/// Opens `url` with `Authorization: Bearer <token>`; the handshake's status.
async fn connect_with_bearer(url: &str, token: &str) -> Result<WsClient, StatusCode> {
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(WsClient { socket }),
        Err(tungstenite::Error::Http(response)) => Err(response.status()),
        Err(e) => panic!("{url}: the handshake broke: {e:?}"),
    }
}

/// Issue #8 (item 13): SPEC §1 has Bearer work everywhere, `?token=` being
/// the alternative; both support sockets ignored the header.
async fn both_sockets_take_a_bearer_header(app: TestApp) {
    let (v, other) = (visitor(&app, "bearer").await, visitor(&app, "other").await);
    let alice = agent(&app).await;
    let user = app.signup().await;
    let base = format!("ws://127.0.0.1:{}", app.port);

    let mut c = connect_with_bearer(&format!("{base}/ws/support/{}", v.id), &v.token).await.expect("visitor");
    c.expect("status").await;
    c.send(json!({ "type": "ping" })).await;
    c.expect("pong").await;
    let mut a = connect_with_bearer(&format!("{base}/ws/agent"), &alice.token).await.expect("agent");
    a.expect("queue").await;
    a.send(json!({ "type": "ping" })).await;
    until(&mut a, &mut Vec::new(), "the pong", |f| f["type"] == "pong").await;

    // The header is checked as strictly as the query.
    let refused = [
        (format!("{base}/ws/support/{}", v.id), other.token.clone(), StatusCode::NOT_FOUND),
        (format!("{base}/ws/support/{}", v.id), "pst_wrong".to_owned(), StatusCode::UNAUTHORIZED),
        (format!("{base}/ws/agent"), v.token.clone(), StatusCode::UNAUTHORIZED),
        (format!("{base}/ws/agent"), "not-a-token".to_owned(), StatusCode::UNAUTHORIZED),
        (format!("{base}/ws/agent"), user.token.clone(), StatusCode::FORBIDDEN),
    ];
    for (url, token, status) in refused {
        let got = connect_with_bearer(&url, &token).await.err();
        assert_eq!(got, Some(status), "{url} with Bearer {token}");
    }
}

/// Issue #8 (item 8): the support sockets have the chat socket's frame
/// budget and size limit.
async fn floods_and_oversized_frames_close_support_sockets(app: TestApp) {
    use crate::websocket::{assert_floods_are_cut_off, assert_oversized_frames_are_closed_with_1009};
    let v = visitor(&app, "flood").await;
    let alice = agent(&app).await;
    let mut c = client_socket(app.port, &v, None).await;
    c.expect("status").await;
    assert_floods_are_cut_off(c, json!({ "type": "ping" })).await;
    let mut a = agent_socket(app.port, &alice, None).await;
    a.expect("queue").await;
    assert_floods_are_cut_off(a, json!({ "type": "ping" })).await;

    let mut c = client_socket(app.port, &v, None).await;
    c.expect("status").await;
    assert_oversized_frames_are_closed_with_1009(c).await;
    let mut a = agent_socket(app.port, &alice, None).await;
    a.expect("queue").await;
    assert_oversized_frames_are_closed_with_1009(a).await;
}
