//! SPEC §5 over REST: visitor sessions and their tokens, AI first, handoff
//! by words or endpoint, the FIFO queue with positions, atomic claims, the
//! assigned agent's rights, release to the head of the queue, close.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Fetch, TestApp, TestUser, db_tests};

db_tests!(
    a_visitor_opens_a_session_and_the_ai_answers,
    session_creation_validates_client_info,
    the_whole_desk_flow_over_rest,
    exactly_one_of_ten_concurrent_claims_wins,
    agent_routes_are_for_agents_and_admins_only,
    a_client_token_opens_only_its_own_session,
    session_creation_is_rate_limited_per_client_address,
    behind_a_trusted_proxy_the_forwarded_address_counts,
    the_estimated_wait_comes_from_recent_claims,
    hostile_input_to_the_desk_gets_4xx_never_5xx,
);

pub struct Visitor {
    pub id: String,
    pub token: String,
}

/// A new support session in AI mode.
pub async fn visitor(app: &TestApp, name: &str) -> Visitor {
    let r = app
        .post("/api/support/sessions")
        .json(&json!({ "client_info": { "name": name, "email": format!("{name}@example.com") } }))
        .fetch()
        .await;
    r.assert_status(StatusCode::CREATED);
    assert_eq!(r.body["status"], "ai");
    assert!(r.str("client_token").starts_with("pst_"));
    Visitor { id: r.str("session_id").to_owned(), token: r.str("client_token").to_owned() }
}

async fn say(app: &TestApp, v: &Visitor, content: &str) -> Value {
    let r = app
        .post(&format!("/api/support/sessions/{}/messages", v.id))
        .bearer_auth(&v.token)
        .json(&json!({ "content": content }))
        .fetch()
        .await;
    r.assert_status(StatusCode::CREATED);
    r.body
}

async fn session(app: &TestApp, v: &Visitor) -> Value {
    let r = app.get(&format!("/api/support/sessions/{}", v.id)).bearer_auth(&v.token).fetch().await;
    r.assert_status(StatusCode::OK);
    r.body
}

/// Puts a visitor in the queue (asserting it worked).
pub async fn handoff(app: &TestApp, v: &Visitor) {
    let r = app.post(&format!("/api/support/sessions/{}/handoff", v.id)).bearer_auth(&v.token).fetch().await;
    r.assert_status(StatusCode::OK);
}

/// `agent` claims a queued visitor (asserting it won).
pub async fn claim(app: &TestApp, agent: &TestUser, v: &Visitor) {
    let r = app.post(&format!("/api/agent/sessions/{}/claim", v.id)).bearer_auth(&agent.token).fetch().await;
    r.assert_status(StatusCode::OK);
}

/// A new user with the agent role.
pub async fn agent(app: &TestApp) -> TestUser {
    let user = app.signup().await;
    app.set_role(&user, "agent").await;
    user
}

async fn a_visitor_opens_a_session_and_the_ai_answers(app: TestApp) {
    let v = visitor(&app, "ann").await;
    let body = say(&app, &v, "Where is my parcel?").await;
    assert_eq!(body["message"]["role"], "user");
    assert_eq!(body["reply"]["role"], "assistant");
    assert_eq!(body["reply"]["status"], "complete");
    // The support desk's own system prompt goes first.
    let sent = app.provider.last_request().messages();
    assert_eq!(sent.first().map(|(role, _)| role.as_str()), Some("system"));
    assert_eq!(sent[0].1, app.settings.support.support_system_prompt);
    assert_eq!(sent.last().unwrap(), &("user".to_owned(), "Where is my parcel?".to_owned()));
    assert!(!body["reply"]["content"].as_str().unwrap().is_empty());
    let s = session(&app, &v).await;
    assert_eq!(s["status"], "ai");
    assert_eq!(s["client_info"]["email"], "ann@example.com");
    assert!(s["queue_position"].is_null());
    let messages = app.get(&format!("/api/support/sessions/{}/messages", v.id)).bearer_auth(&v.token).fetch().await;
    let roles: Vec<&str> = messages.items().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant"]);
}

async fn session_creation_validates_client_info(app: TestApp) {
    let r = app
        .post("/api/support/sessions")
        .json(&json!({ "client_info": { "name": "", "email": "nope", "phone": "call me" } }))
        .fetch()
        .await;
    r.assert_status(StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<&str> = r.body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["client_info.name", "client_info.email", "client_info.phone"]);
    app.post("/api/support/sessions").json(&json!({})).fetch().await.assert_invalid("client_info");
}

async fn the_whole_desk_flow_over_rest(app: TestApp) {
    let (v1, v2, v3) = (visitor(&app, "v1").await, visitor(&app, "v2").await, visitor(&app, "v3").await);

    // Words that ask for a human queue the session; the AI stays silent.
    let body = say(&app, &v1, "I want to speak to a human").await;
    assert!(body["reply"].is_null());
    // "humanity" is not such a word.
    assert_eq!(say(&app, &v2, "What about humanity?").await["reply"]["role"], "assistant");
    let handed = app.post(&format!("/api/support/sessions/{}/handoff", v2.id)).bearer_auth(&v2.token).fetch().await;
    handed.assert_status(StatusCode::OK);
    assert_eq!(handed.body["status"], "queued");
    handoff(&app, &v3).await;

    for (v, position) in [(&v1, 1), (&v2, 2), (&v3, 3)] {
        let s = session(&app, v).await;
        assert_eq!((s["status"].as_str(), s["queue_position"].as_i64()), (Some("queued"), Some(position)));
        assert!(s["estimated_wait_seconds"].as_i64().unwrap() > 0);
    }
    // While queued the AI says nothing.
    assert!(say(&app, &v1, "hello?").await["reply"].is_null());

    let alice = agent(&app).await;
    let bob = agent(&app).await;
    let queue = app.get("/api/agent/queue").bearer_auth(&alice.token).fetch().await;
    let ids: Vec<&str> = queue.items().iter().map(|s| s["session_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [v1.id.as_str(), v2.id.as_str(), v3.id.as_str()]);
    let positions: Vec<i64> = queue.items().iter().map(|s| s["queue_position"].as_i64().unwrap()).collect();
    assert_eq!(positions, [1, 2, 3]);

    let claimed = app.post(&format!("/api/agent/sessions/{}/claim", v1.id)).bearer_auth(&alice.token).fetch().await;
    claimed.assert_status(StatusCode::OK);
    assert_eq!(claimed.body["status"], "human");
    assert_eq!(claimed.body["assigned_agent"]["id"], alice.id.as_str());
    assert_eq!(session(&app, &v2).await["queue_position"], 1);
    let active = app.get("/api/agent/active").bearer_auth(&alice.token).fetch().await;
    assert_eq!(active.items().len(), 1);

    // Only the assigned agent speaks.
    let m = app
        .post(&format!("/api/agent/sessions/{}/messages", v1.id))
        .bearer_auth(&alice.token)
        .json(&json!({ "content": "Hi, Alice here." }))
        .fetch()
        .await;
    m.assert_status(StatusCode::CREATED);
    assert_eq!(m.body["role"], "agent");
    app.post(&format!("/api/agent/sessions/{}/messages", v1.id))
        .bearer_auth(&bob.token)
        .json(&json!({ "content": "me too" }))
        .fetch()
        .await
        .assert_error(StatusCode::FORBIDDEN, "not_assigned");
    assert!(say(&app, &v1, "Thanks Alice").await["reply"].is_null());
    let messages = app.get(&format!("/api/support/sessions/{}/messages", v1.id)).bearer_auth(&v1.token).fetch().await;
    let roles: Vec<&str> = messages.items().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "user", "agent", "user"], "no AI reply after the handoff");

    // Release: back to the head of the queue.
    app.post(&format!("/api/agent/sessions/{}/release", v1.id))
        .bearer_auth(&bob.token)
        .fetch()
        .await
        .assert_error(StatusCode::FORBIDDEN, "not_assigned");
    let released = app.post(&format!("/api/agent/sessions/{}/release", v1.id)).bearer_auth(&alice.token).fetch().await;
    released.assert_status(StatusCode::OK);
    assert_eq!((released.body["status"].as_str(), released.body["queue_position"].as_i64()), (Some("queued"), Some(1)));
    assert_eq!(session(&app, &v2).await["queue_position"], 2);

    // Claim again, then close; the closed session takes no more messages.
    claim(&app, &bob, &v1).await;
    app.post(&format!("/api/agent/sessions/{}/close", v1.id))
        .bearer_auth(&alice.token)
        .fetch()
        .await
        .assert_error(StatusCode::FORBIDDEN, "not_assigned");
    let closed = app.post(&format!("/api/agent/sessions/{}/close", v1.id)).bearer_auth(&bob.token).fetch().await;
    closed.assert_status(StatusCode::OK);
    assert_eq!(closed.body["status"], "closed");
    app.post(&format!("/api/support/sessions/{}/messages", v1.id))
        .bearer_auth(&v1.token)
        .json(&json!({ "content": "still there?" }))
        .fetch()
        .await
        .assert_error(StatusCode::CONFLICT, "session_closed");
    let listed = app.get("/api/agent/sessions?status=closed").bearer_auth(&alice.token).fetch().await;
    assert_eq!(listed.body["total"], 1);
    app.get("/api/agent/sessions?status=bogus").bearer_auth(&alice.token).fetch().await.assert_invalid("status");
}

async fn exactly_one_of_ten_concurrent_claims_wins(app: TestApp) {
    let v = visitor(&app, "solo").await;
    handoff(&app, &v).await;
    let mut agents = Vec::new();
    for _ in 0..10 {
        agents.push(agent(&app).await);
    }
    let claims =
        agents.iter().map(|a| app.post(&format!("/api/agent/sessions/{}/claim", v.id)).bearer_auth(&a.token).fetch());
    let answers = futures::future::join_all(claims).await;
    let wins: Vec<&crate::helpers::ApiResponse> = answers.iter().filter(|r| r.status == StatusCode::OK).collect();
    assert_eq!(wins.len(), 1, "statuses: {:?}", answers.iter().map(|r| r.status).collect::<Vec<_>>());
    for r in answers.iter().filter(|r| r.status != StatusCode::OK) {
        r.assert_error(StatusCode::CONFLICT, "not_queued");
    }
    let winner = wins[0].body["assigned_agent"]["id"].clone();
    assert_eq!(session(&app, &v).await["assigned_agent"]["id"], winner);
}

async fn agent_routes_are_for_agents_and_admins_only(app: TestApp) {
    let v = visitor(&app, "x").await;
    let user = app.signup().await;
    let routes: Vec<(reqwest::Method, String)> = vec![
        (reqwest::Method::GET, "/api/agent/queue".into()),
        (reqwest::Method::GET, "/api/agent/sessions".into()),
        (reqwest::Method::GET, "/api/agent/active".into()),
        (reqwest::Method::POST, format!("/api/agent/sessions/{}/claim", v.id)),
        (reqwest::Method::POST, format!("/api/agent/sessions/{}/release", v.id)),
        (reqwest::Method::POST, format!("/api/agent/sessions/{}/close", v.id)),
    ];
    for (method, path) in &routes {
        app.request(method.clone(), path)
            .bearer_auth(&user.token)
            .fetch()
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
        app.request(method.clone(), path).fetch().await.assert_unauthorized();
        // A visitor's client token is no agent either.
        app.request(method.clone(), path).bearer_auth(&v.token).fetch().await.assert_unauthorized();
    }
    app.post(&format!("/api/agent/sessions/{}/messages", v.id))
        .bearer_auth(&user.token)
        .json(&json!({ "content": "hi" }))
        .fetch()
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    // Plain users cannot read support sessions either.
    app.get(&format!("/api/support/sessions/{}", v.id))
        .bearer_auth(&user.token)
        .fetch()
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    // An admin may, and may see the queue.
    let admin = app.signup_admin().await;
    app.get("/api/agent/queue").bearer_auth(&admin.token).fetch().await.assert_status(StatusCode::OK);
    app.get(&format!("/api/support/sessions/{}", v.id))
        .bearer_auth(&admin.token)
        .fetch()
        .await
        .assert_status(StatusCode::OK);
}

async fn a_client_token_opens_only_its_own_session(app: TestApp) {
    let (a, b) = (visitor(&app, "a").await, visitor(&app, "b").await);
    for path in [format!("/api/support/sessions/{}", b.id), format!("/api/support/sessions/{}/messages", b.id)] {
        app.get(&path).bearer_auth(&a.token).fetch().await.assert_error(StatusCode::NOT_FOUND, "not_found");
    }
    app.post(&format!("/api/support/sessions/{}/handoff", b.id))
        .bearer_auth(&a.token)
        .fetch()
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    app.get(&format!("/api/support/sessions/{}", a.id)).bearer_auth("pst_forged").fetch().await.assert_unauthorized();
    app.get(&format!("/api/support/sessions/{}", a.id)).fetch().await.assert_unauthorized();
    // Sockets likewise.
    let url = format!("ws://127.0.0.1:{}/ws/support/{}?token={}", app.port, b.id, a.token);
    let refused = tokio_tungstenite::connect_async(url).await;
    assert!(refused.is_err(), "another session's token opened its socket");
    // Staff-only routes refuse a client token's own session too.
    app.post(&format!("/api/agent/sessions/{}/claim", a.id)).bearer_auth(&a.token).fetch().await.assert_unauthorized();
    assert_eq!(session(&app, &a).await["status"], "ai");
}

async fn session_creation_is_rate_limited_per_client_address(app: TestApp) {
    let limit = app.settings.support.support_sessions_per_ip;
    for _ in 0..limit {
        visitor(&app, "many").await;
    }
    let create = || {
        app.post("/api/support/sessions")
            .json(&json!({ "client_info": { "name": "more", "email": "more@example.com" } }))
            .fetch()
    };
    let refused = create().await;
    refused.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry_after: u64 = refused.header("retry-after").expect("a Retry-After header").parse().unwrap();
    assert!((1..=600).contains(&retry_after), "{retry_after}");
    // Invalid requests are answered 422 without using up the allowance...
    app.advance(std::time::Duration::from_secs(retry_after));
    app.post("/api/support/sessions")
        .json(&json!({ "client_info": {} }))
        .fetch()
        .await
        .assert_status(StatusCode::UNPROCESSABLE_ENTITY);
    // ...and once the window has passed, sessions open again.
    create().await.assert_status(StatusCode::CREATED);
}

async fn behind_a_trusted_proxy_the_forwarded_address_counts(mut app: TestApp) {
    let create = |forwarded: &'static str| {
        app.post("/api/support/sessions")
            .header("x-forwarded-for", forwarded)
            .json(&json!({ "client_info": { "name": "proxied", "email": "proxied@example.com" } }))
            .fetch()
    };
    // From an untrusted peer the header is the client's word and changes nothing.
    let limit = app.settings.support.support_sessions_per_ip;
    for i in 0..limit {
        create(["198.51.100.1", "198.51.100.2"][i as usize % 2]).await.assert_status(StatusCode::CREATED);
    }
    create("198.51.100.3").await.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");

    // Behind a trusted proxy, each forwarded client has its own allowance;
    // only the rightmost untrusted hop counts (the rest is client-supplied).
    app.restart_with(|s| s.server.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()]).await;
    let create = |forwarded: &'static str| {
        app.post("/api/support/sessions")
            .header("x-forwarded-for", forwarded)
            .json(&json!({ "client_info": { "name": "proxied", "email": "proxied@example.com" } }))
            .fetch()
    };
    for i in 0..limit {
        let spoofed = if i % 2 == 0 { "1.1.1.1, 203.0.113.7" } else { "2.2.2.2, 203.0.113.7, 127.0.0.1" };
        create(spoofed).await.assert_status(StatusCode::CREATED);
    }
    create("9.9.9.9, 203.0.113.7").await.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    create("203.0.113.8").await.assert_status(StatusCode::CREATED);
}

async fn the_estimated_wait_comes_from_recent_claims(app: TestApp) {
    let (v1, v2, v3) = (visitor(&app, "w1").await, visitor(&app, "w2").await, visitor(&app, "w3").await);
    for v in [&v1, &v2, &v3] {
        handoff(&app, v).await;
    }
    // No claims yet: two minutes per place in the queue.
    assert_eq!(session(&app, &v1).await["estimated_wait_seconds"], 120);
    assert_eq!(session(&app, &v3).await["estimated_wait_seconds"], 360);

    // The first visitor waited 45 s; the next ones are told so, per place.
    app.advance(std::time::Duration::from_secs(45));
    let alice = agent(&app).await;
    claim(&app, &alice, &v1).await;
    let s2 = session(&app, &v2).await;
    assert_eq!((s2["queue_position"].as_i64(), s2["estimated_wait_seconds"].as_i64()), (Some(1), Some(45)));
    assert_eq!(session(&app, &v3).await["estimated_wait_seconds"], 90);
    assert!(session(&app, &v1).await["estimated_wait_seconds"].is_null(), "no estimate once claimed");

    // The second waited 105 s: the average of recent waits is 75 s.
    app.advance(std::time::Duration::from_secs(60));
    claim(&app, &alice, &v2).await;
    assert_eq!(session(&app, &v3).await["estimated_wait_seconds"], 75);
}

async fn hostile_input_to_the_desk_gets_4xx_never_5xx(app: TestApp) {
    let v = visitor(&app, "hostile").await;
    let alice = agent(&app).await;
    handoff(&app, &v).await;
    claim(&app, &alice, &v).await;
    let (client_messages, agent_messages) =
        (format!("/api/support/sessions/{}/messages", v.id), format!("/api/agent/sessions/{}/messages", v.id));
    let targets = [
        ("/api/support/sessions", "client_info", None),
        (client_messages.as_str(), "content", Some(v.token.as_str())),
        (agent_messages.as_str(), "content", Some(alice.token.as_str())),
    ];
    let mut problems = Vec::new();
    for (path, field, token) in targets {
        for (what, body) in crate::robustness::hostile_bodies(field, true) {
            let mut request = app.post(path).header("content-type", "application/json").body(body);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            problems.extend(request.fetch().await.problem_unless_client_error(&format!("POST {path} with {what}")));
        }
    }
    let long = "a".repeat(10_000);
    let gets = [
        (format!("/api/support/sessions/{}/messages?limit=-1", v.id), v.token.as_str()),
        (format!("/api/support/sessions/{}/messages?before=%00", v.id), v.token.as_str()),
        (format!("/api/support/sessions/{}/messages?before={long}", v.id), v.token.as_str()),
        (format!("/api/support/sessions/{long}"), v.token.as_str()),
        ("/api/support/sessions/%00".to_owned(), v.token.as_str()),
        ("/api/agent/sessions?status=%00".to_owned(), alice.token.as_str()),
        ("/api/agent/sessions?page=0&per_page=99999999999999999999".to_owned(), alice.token.as_str()),
    ];
    for (path, token) in &gets {
        problems
            .extend(app.get(path).bearer_auth(token).fetch().await.problem_unless_client_error(&format!("GET {path}")));
    }
    for action in ["claim", "release", "close"] {
        for id in ["%00", "not-a-uuid", long.as_str()] {
            let path = format!("/api/agent/sessions/{id}/{action}");
            let response = app.post(&path).bearer_auth(&alice.token).fetch().await;
            problems.extend(response.problem_unless_client_error(&format!("POST {path}")));
        }
    }
    assert!(problems.is_empty(), "hostile input not refused with a 4xx:\n{}", problems.join("\n"));
    // Nothing was stored by any of it.
    assert_eq!(app.get(&client_messages).bearer_auth(&v.token).fetch().await.items().len(), 0);
}
