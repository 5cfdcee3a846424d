//! Several instances (SPEC §5, §6): two `palaver` processes on one
//! PostgreSQL and one Redis — a support conversation with the visitor on one
//! and the agent on the other, a Redis that is restarted in the middle of
//! it, rate limits that count across both, and a reply streamed by one
//! instance that is resumed and cancelled through the other. Each test runs its
//! own `redis-server` on a free port, so restarting it disturbs nobody else.

use std::time::Duration;

use palaver::config::Secret;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Db, Fetch, SseStream, TestApp, TestUser, delta_text, spawn_process_app_with};
use crate::mock_llm::Script;
use crate::streaming::until_first_delta;
use crate::support::Visitor;
use crate::support_ws::{
    agent_socket, assert_closed_politely, client_socket, message_is, queue_is, status_is, stored_messages, until,
};

/// A `redis-server` of the test's own.
pub(crate) struct PrivateRedis {
    port: u16,
    child: Option<tokio::process::Child>,
    dir: tempfile::TempDir,
}

impl PrivateRedis {
    /// `None` (with the reason printed) when `redis-server` is not installed,
    /// outside CI; in CI its absence fails the test.
    pub(crate) async fn start() -> Option<Self> {
        let installed = std::process::Command::new("redis-server")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("redis-server is not installed; with CI=true the multi-instance tests must run");
            }
            eprintln!("skipping a multi-instance test: redis-server is not installed");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let mut redis = Self { port, child: None, dir: tempfile::tempdir().expect("a temporary dir") };
        redis.run().await;
        Some(redis)
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) async fn run(&mut self) {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not listen on port {} within 5 s", self.port);
    }

    /// `kill -9`: every connection to it breaks.
    pub(crate) async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill redis-server");
        }
    }

    async fn restart(&mut self) {
        self.kill().await;
        self.run().await;
    }
}

/// Two instances (`a` is the test app, `b` its sibling) on one PostgreSQL
/// and the private Redis.
async fn two_instances(redis: &PrivateRedis) -> Option<(TestApp, crate::helpers::Sibling)> {
    let url = redis.url();
    let mut a = spawn_process_app_with(Db::Postgres, |s| s.server.redis_url = Some(Secret(url))).await?;
    let b = a.sibling().await;
    Some((a, b))
}

async fn visitor_on(address: &str, name: &str) -> Visitor {
    let r = reqwest::Client::new()
        .post(format!("{address}/api/support/sessions"))
        .json(&json!({ "client_info": { "name": name, "email": format!("{name}@example.com") } }))
        .fetch()
        .await;
    r.assert_status(StatusCode::CREATED);
    Visitor { id: r.str("session_id").to_owned(), token: r.str("client_token").to_owned() }
}

async fn agent_on(app: &TestApp) -> TestUser {
    crate::support::agent(app).await
}

/// Runs `test` and drops the PostgreSQL schema afterwards.
pub(crate) async fn with_cluster<F, Fut>(test: F)
where
    F: FnOnce(TestApp, crate::helpers::Sibling, PrivateRedis) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let Some(redis) = PrivateRedis::start().await else { return };
    let Some((a, b)) = two_instances(&redis).await else { return };
    let database = a.database.clone();
    let outcome = tokio::spawn(test(a, b, redis)).await;
    database.drop_schema().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_visitor_and_an_agent_on_two_instances_hold_a_whole_conversation() {
    with_cluster(|a, b, redis| async move {
        // Moved whole: the processes live as long as the test.
        let (a, b, _redis) = (a, b, redis);
        // Visitors on both instances; one queue.
        let (v1, v2) = (visitor_on(&a.address, "one").await, visitor_on(&b.address, "two").await);
        let (mut c1, mut log1) = (client_socket(a.port, &v1, None).await, Vec::new());
        let (mut c2, mut log2) = (client_socket(b.port, &v2, None).await, Vec::new());
        until(&mut c1, &mut log1, "the greeting", status_is("ai", None)).await;
        until(&mut c2, &mut log2, "the greeting", status_is("ai", None)).await;
        let alice = agent_on(&a).await;
        let (mut console, mut alog) = (agent_socket(b.port, &alice, None).await, Vec::new());
        until(&mut console, &mut alog, "the empty queue", queue_is(vec![])).await;

        // The AI answers first, on the visitor's instance.
        c1.send(json!({ "type": "message", "content": "Hello?" })).await;
        until(&mut c1, &mut log1, "the AI's answer", |f| f["type"] == "message" && f["message"]["role"] == "assistant")
            .await;

        c1.send(json!({ "type": "message", "content": "Can I talk to a real person?" })).await;
        until(&mut c1, &mut log1, "queued at 1", status_is("queued", Some(1))).await;
        c2.send(json!({ "type": "request_human" })).await;
        until(&mut c2, &mut log2, "queued at 2", status_is("queued", Some(2))).await;
        until(&mut console, &mut alog, "both waiting", queue_is(vec![v1.id.clone(), v2.id.clone()])).await;

        // Claimed on instance b; the visitor on a hears of it live.
        console.send(json!({ "type": "claim_session", "session_id": v1.id })).await;
        let human = until(&mut c1, &mut log1, "the claim", status_is("human", None)).await;
        assert_eq!(human["agent"]["id"], alice.id.as_str());
        until(&mut c2, &mut log2, "moved up", status_is("queued", Some(1))).await;

        for round in 0..3 {
            let from_agent = format!("agent says {round}");
            console.send(json!({ "type": "message", "session_id": v1.id, "content": from_agent })).await;
            until(&mut c1, &mut log1, "the agent's message", message_is("agent", &from_agent)).await;
            let from_visitor = format!("visitor says {round}");
            c1.send(json!({ "type": "message", "content": from_visitor })).await;
            until(&mut console, &mut alog, "the visitor's message", message_is("user", &from_visitor)).await;
        }

        console.send(json!({ "type": "close_session", "session_id": v1.id })).await;
        until(&mut c1, &mut log1, "the close", status_is("closed", None)).await;
        assert_closed_politely(&mut c1).await;

        let turns = stored_messages(&b.address, &v1).await;
        let roles: Vec<&str> = turns.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "user", "agent", "user", "agent", "user", "agent", "user"]);
        assert_no_repeats(&log1);
        assert_no_repeats(&alog);
        assert!(log2.iter().all(|f| f["type"] == "status"), "the other visitor saw {log2:#?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_restart_mid_conversation_loses_nothing() {
    with_cluster(|a, b, redis| async move {
        let (a, b, mut redis) = (a, b, redis);
        let v = visitor_on(&a.address, "steady").await;
        let alice = agent_on(&a).await;
        let (mut c, mut clog) = (client_socket(a.port, &v, None).await, Vec::new());
        until(&mut c, &mut clog, "the greeting", status_is("ai", None)).await;
        let (mut console, mut alog) = (agent_socket(b.port, &alice, None).await, Vec::new());
        c.send(json!({ "type": "request_human" })).await;
        until(&mut console, &mut alog, "the waiting visitor", queue_is(vec![v.id.clone()])).await;
        console.send(json!({ "type": "claim_session", "session_id": v.id })).await;
        until(&mut c, &mut clog, "the claim", status_is("human", None)).await;
        console.send(json!({ "type": "message", "session_id": v.id, "content": "before" })).await;
        until(&mut c, &mut clog, "a live message", message_is("agent", "before")).await;

        // Redis dies. Both sides go on writing; every write is acknowledged.
        redis.kill().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = a
            .post(&format!("/api/support/sessions/{}/messages", v.id))
            .bearer_auth(&v.token)
            .json(&json!({ "content": "while redis was down" }))
            .fetch()
            .await;
        sent.assert_status(StatusCode::CREATED);
        let answered = reqwest::Client::new()
            .post(format!("{}/api/agent/sessions/{}/messages", b.address, v.id))
            .bearer_auth(&alice.token)
            .json(&json!({ "content": "agent during the outage" }))
            .fetch()
            .await;
        answered.assert_status(StatusCode::CREATED);

        // Redis is back: the sockets resubscribe and replay what they missed.
        redis.restart().await;
        until(&mut c, &mut clog, "the agent's outage message", message_is("agent", "agent during the outage")).await;
        until(&mut console, &mut alog, "the visitor's outage message", message_is("user", "while redis was down"))
            .await;

        // And live delivery works again, both ways.
        console.send(json!({ "type": "message", "session_id": v.id, "content": "after" })).await;
        until(&mut c, &mut clog, "a live message after the restart", message_is("agent", "after")).await;
        c.send(json!({ "type": "message", "content": "thanks" })).await;
        until(&mut console, &mut alog, "a live message after the restart", message_is("user", "thanks")).await;

        let turns = stored_messages(&a.address, &v).await;
        let contents: Vec<&str> = turns.iter().map(|(_, c)| c.as_str()).collect();
        assert_eq!(contents, ["before", "while redis was down", "agent during the outage", "after", "thanks"]);
        assert_no_repeats(&clog);
        assert_no_repeats(&alog);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limits_count_across_instances() {
    with_cluster(|a, b, redis| async move {
        let (a, b, _redis) = (a, b, redis);
        let user = a.signup().await;
        let client = reqwest::Client::new();
        let login = |address: &str, password: &str| {
            client
                .post(format!("{address}/api/auth/login"))
                .json(&json!({ "login": user.email, "password": password }))
                .fetch()
        };
        // Ten failures for one account, half on each instance...
        for address in [&a.address, &b.address].repeat(5) {
            login(address, "wrong password").await.assert_status(StatusCode::UNAUTHORIZED);
        }
        // ...block it on both, even with the right password.
        for address in [&a.address, &b.address] {
            let refused = login(address, crate::helpers::PASSWORD).await;
            refused.assert_error(StatusCode::TOO_MANY_REQUESTS, "too_many_attempts");
            assert!(refused.header("retry-after").and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s > 0));
        }

        // Support sessions per client address, likewise.
        let limit = a.settings.support.support_sessions_per_ip as usize;
        for i in 0..limit {
            visitor_on(if i % 2 == 0 { &a.address } else { &b.address }, "many").await;
        }
        for address in [&a.address, &b.address] {
            client
                .post(format!("{address}/api/support/sessions"))
                .json(&json!({ "client_info": { "name": "more", "email": "more@example.com" } }))
                .fetch()
                .await
                .assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_resumes_and_is_cancelled_through_another_instance() {
    with_cluster(|a, b, redis| async move {
        let (a, b, _redis) = (a, b, redis);
        let user = a.signup().await;
        let conversation = a.new_conversation(&user).await;
        let script = Script::words(30, Duration::from_millis(40));
        a.provider.stream(script.clone());

        // Started on a; the client is gone after the first delta.
        let mut stream = a.post_message_sse(&user, &conversation, "A long story", None).await;
        let first = until_first_delta(&mut stream).await.pop().expect("the first delta");
        drop(stream);
        let reply_id = first.data["message_id"].as_str().unwrap().to_owned();
        let seen = first.data["text"].as_str().unwrap().to_owned();

        // Resumed on b from its Last-Event-ID: exactly the rest, then done.
        let client = reqwest::Client::new();
        let resume = client
            .get(format!("{}/api/conversations/{conversation}/messages/{reply_id}/stream", b.address))
            .bearer_auth(&user.token)
            .header("Last-Event-ID", first.id.clone().expect("deltas carry ids"));
        let events = SseStream::open(resume).await.rest().await;
        let done = events.last().expect("events after the resume");
        assert_eq!(done.event, "done", "{events:?}");
        assert_eq!(format!("{seen}{}", delta_text(&events)), script.text(), "nothing missed, nothing twice");
        assert_eq!(done.data["content"], script.text());
        assert_eq!(done.data["status"], "complete");

        // A slow reply on a, cancelled through b: a's provider call stops and
        // the stream a's client still reads ends with the cancelled reply.
        a.provider.stream(Script::words(400, Duration::from_millis(25)));
        let mut stream = a.post_message_sse(&user, &conversation, "Go on and on", None).await;
        let first = until_first_delta(&mut stream).await.pop().expect("the first delta");
        let reply_id = first.data["message_id"].as_str().unwrap().to_owned();
        let cancelled = client
            .post(format!("{}/api/conversations/{conversation}/messages/{reply_id}/cancel", b.address))
            .bearer_auth(&user.token)
            .fetch()
            .await;
        cancelled.assert_status(StatusCode::OK);
        assert_eq!(cancelled.body["status"], "cancelled", "{}", cancelled.text);
        let events = stream.rest().await;
        let end = events.last().expect("the stream's end");
        assert_eq!((end.event.as_str(), &end.data["status"]), ("done", &json!("cancelled")), "{events:?}");
        let chunks = a.provider.chunks_sent();
        assert!(chunks < 400, "the provider call was stopped early ({chunks} chunks)");
        let stored = a.stored_message(&user, &conversation, &reply_id).await;
        assert_eq!(stored["status"], "cancelled");
        assert_eq!(stored["content"], end.data["content"]);
    })
    .await;
}

/// Keys are remembered between requests (no database read per request),
/// yet a key revoked, or its owner disabled, on one instance is refused by
/// the other at once: writes are announced through Redis before they are
/// answered. With Redis gone the other instance reads keys from the
/// database again, so a revocation it was not told of still holds.
#[tokio::test(flavor = "multi_thread")]
async fn remembered_keys_are_forgotten_on_every_instance() {
    with_cluster(|a, b, redis| async move {
        let (a, b, mut redis) = (a, b, redis);
        let on = |address: &str, key: &str| {
            reqwest::Client::new()
                .post(format!("{address}/v1/chat/completions"))
                .bearer_auth(key)
                .json(&crate::gateway::hello(false))
        };
        let user = a.signup().await;
        let admin = a.signup_admin().await;
        let key = |name: &'static str| {
            let (a, user) = (&a, &user);
            async move { crate::gateway::create_key(a, user, json!({ "name": name })).await }
        };

        let revoked = key("revoked").await;
        let secret = revoked["key"].as_str().unwrap();
        for _ in 0..3 {
            on(&b.address, secret).fetch().await.assert_status(StatusCode::OK);
        }
        let id = revoked["id"].as_str().unwrap();
        a.delete(&format!("/api/keys/{id}"))
            .bearer_auth(&user.token)
            .fetch()
            .await
            .assert_status(StatusCode::NO_CONTENT);
        on(&b.address, secret).fetch().await.assert_status(StatusCode::UNAUTHORIZED);

        // The owner disabled on a: refused on b at once; enabled again: served.
        let kept = key("kept").await;
        let secret = kept["key"].as_str().unwrap().to_owned();
        for _ in 0..3 {
            on(&b.address, &secret).fetch().await.assert_status(StatusCode::OK);
        }
        let disable = |disabled: bool| {
            a.patch(&format!("/api/admin/users/{}", user.id))
                .bearer_auth(&admin.token)
                .json(&json!({ "disabled": disabled }))
                .fetch()
        };
        disable(true).await.assert_status(StatusCode::OK);
        on(&b.address, &secret).fetch().await.assert_status(StatusCode::UNAUTHORIZED);
        disable(false).await.assert_status(StatusCode::OK);
        on(&b.address, &secret).fetch().await.assert_status(StatusCode::OK);

        // Without Redis nothing is announced, and nothing is remembered.
        redis.kill().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        on(&b.address, &secret).fetch().await.assert_status(StatusCode::OK);
        let id = kept["id"].as_str().unwrap();
        a.delete(&format!("/api/keys/{id}"))
            .bearer_auth(&user.token)
            .fetch()
            .await
            .assert_status(StatusCode::NO_CONTENT);
        on(&b.address, &secret).fetch().await.assert_status(StatusCode::UNAUTHORIZED);

        // Back with Redis: keys are remembered and forgotten as before.
        redis.restart().await;
        let after = key("after").await;
        let secret = after["key"].as_str().unwrap();
        for _ in 0..20 {
            on(&b.address, secret).fetch().await.assert_status(StatusCode::OK);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let id = after["id"].as_str().unwrap();
        a.delete(&format!("/api/keys/{id}"))
            .bearer_auth(&user.token)
            .fetch()
            .await
            .assert_status(StatusCode::NO_CONTENT);
        on(&b.address, secret).fetch().await.assert_status(StatusCode::UNAUTHORIZED);
    })
    .await;
}

/// Login sessions are remembered too, and forgotten on every instance at
/// once: a logout, a revoked session and a reused refresh token on one
/// instance end the access token on the other before they are answered.
#[tokio::test(flavor = "multi_thread")]
async fn remembered_sessions_are_forgotten_on_every_instance() {
    with_cluster(|a, b, redis| async move {
        let (a, b, _redis) = (a, b, redis);
        let me = |address: &str, token: &str| {
            reqwest::Client::new().get(format!("{address}/api/users/me")).bearer_auth(token).fetch()
        };
        let user = a.signup().await;
        let used = |token: String| {
            let address = b.address.clone();
            async move {
                for _ in 0..3 {
                    me(&address, &token).await.assert_status(StatusCode::OK);
                }
            }
        };

        // Logout on a.
        used(user.token.clone()).await;
        a.post("/api/auth/logout").bearer_auth(&user.token).fetch().await.assert_status(StatusCode::NO_CONTENT);
        me(&b.address, &user.token).await.assert_unauthorized();

        // One session revoked from another, on a.
        let (phone, laptop) = (a.login_as(&user).await, a.login_as(&user).await);
        used(phone.token.clone()).await;
        let sessions = a.get("/api/auth/sessions").bearer_auth(&laptop.token).fetch().await;
        let phone_session = sessions
            .items()
            .iter()
            .find(|s| s["current"] != true)
            .and_then(|s| s["id"].as_str())
            .expect("the other session")
            .to_owned();
        a.delete(&format!("/api/auth/sessions/{phone_session}"))
            .bearer_auth(&laptop.token)
            .fetch()
            .await
            .assert_status(StatusCode::NO_CONTENT);
        me(&b.address, &phone.token).await.assert_unauthorized();
        me(&b.address, &laptop.token).await.assert_status(StatusCode::OK);

        // A refresh token presented twice revokes its session everywhere.
        used(laptop.token.clone()).await;
        let refresh = || a.post("/api/auth/refresh").json(&json!({ "refresh_token": laptop.refresh_token })).fetch();
        refresh().await.assert_status(StatusCode::OK);
        refresh().await.assert_unauthorized();
        me(&b.address, &laptop.token).await.assert_unauthorized();
    })
    .await;
}

/// No message frame was delivered twice to one socket.
fn assert_no_repeats(log: &[Value]) {
    let mut ids: Vec<&str> =
        log.iter().filter(|f| f["type"] == "message").filter_map(|f| f["message"]["id"].as_str()).collect();
    let all = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), all, "a message frame came twice: {log:#?}");
}
