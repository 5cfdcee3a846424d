//! Retention (SPEC §3): PALAVER_RETENTION_DAYS deletes conversations idle
//! that long, a user's own `retention_days` does the same for theirs
//! sooner, PALAVER_SUPPORT_RETENTION_DAYS deletes closed support sessions;
//! the sweeper deletes in batches, only what is due, on one instance of
//! several, and counts it on /metrics.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::gateway::create_key;
use crate::helpers::{Db, Fetch, TestApp, TestUser, db_tests, spawn_process_app_with};
use crate::support::{agent, claim, handoff, visitor};

db_tests!(
    idle_conversations_are_deleted_after_the_retention,
    a_users_own_retention_applies_to_their_conversations_only,
    retention_days_is_validated,
    closed_support_sessions_are_deleted_after_their_retention,
);

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

async fn with_retention(app: &mut TestApp, days: Option<i64>, support_days: Option<i64>) {
    app.restart_with(|s| {
        s.retention.retention_days = days;
        s.retention.support_retention_days = support_days;
        s.retention.retention_sweep_secs = 1;
    })
    .await;
}

/// `user` with an API key for a token: it outlives the days the tests
/// move the clock on by (access tokens last minutes).
async fn lasting(app: &TestApp, user: TestUser) -> TestUser {
    let key = create_key(app, &user, json!({ "name": "retention test" })).await;
    TestUser { token: key["key"].as_str().unwrap().to_owned(), ..user }
}

async fn status_of(app: &TestApp, user: &TestUser, conversation: &str) -> StatusCode {
    app.get(&format!("/api/conversations/{conversation}")).bearer_auth(&user.token).fetch().await.status
}

/// Waits (up to 15 s; the sweeper runs every second) until `done` holds.
async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..150 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not happen within 15 s");
}

async fn messages_of(app: &TestApp, conversation: &str) -> i64 {
    app.database.scalar("SELECT COUNT(*) FROM messages WHERE conversation_id = $1", &[conversation]).await
}

/// Adds `n` messages to a conversation straight in the database (a long
/// history the sweeper must delete in several batches).
async fn bulk_messages(app: &TestApp, conversation: &str, n: usize) {
    app.database
        .execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < CAST($2 AS INTEGER)) \
             INSERT INTO messages (id, conversation_id, role, content, status, created_at, updated_at, seq) \
             SELECT $1 || '-bulk-' || i, $1, 'user', 'old words ' || i, 'complete', 1, 1, 1000 + i FROM n",
            &[conversation, &n.to_string()],
        )
        .await;
}

async fn idle_conversations_are_deleted_after_the_retention(mut app: TestApp) {
    with_retention(&mut app, Some(90), None).await;
    let (ann, bob) = (app.signup().await, app.signup().await);
    let (ann, bob) = (lasting(&app, ann).await, lasting(&app, bob).await);
    let old = app.new_conversation(&ann).await;
    app.say(&ann, &old, "the pelican sleeps").await;
    bulk_messages(&app, &old, 1_200).await;
    let bobs_old = app.new_conversation(&bob).await;
    app.say(&bob, &bobs_old, "an old note").await;
    let revived = app.new_conversation(&ann).await;
    app.say(&ann, &revived, "first words").await;

    app.advance(89 * DAY);
    app.say(&ann, &revived, "still talking").await;
    app.advance(2 * DAY);
    let fresh = app.new_conversation(&ann).await;

    eventually("the idle conversations' deletion", || async {
        status_of(&app, &ann, &old).await == StatusCode::NOT_FOUND
            && status_of(&app, &bob, &bobs_old).await == StatusCode::NOT_FOUND
    })
    .await;
    assert_eq!(messages_of(&app, &old).await, 0, "every message of a deleted conversation goes");
    assert_eq!(status_of(&app, &ann, &revived).await, StatusCode::OK, "activity 2 days ago keeps it");
    assert_eq!(messages_of(&app, &revived).await, 4, "and all its messages");
    assert_eq!(status_of(&app, &ann, &fresh).await, StatusCode::OK);
    let found = app.get("/api/search").query(&[("q", "pelican")]).bearer_auth(&ann.token).fetch().await;
    found.assert_status(StatusCode::OK);
    assert_eq!(found.body["total"], 0, "the search index forgets them too: {}", found.text);
    let listed = app.get("/api/conversations").bearer_auth(&ann.token).fetch().await;
    assert_eq!(listed.body["total"], 2, "{}", listed.text);
}

async fn a_users_own_retention_applies_to_their_conversations_only(mut app: TestApp) {
    with_retention(&mut app, None, None).await;
    let (ann, bob) = (app.signup().await, app.signup().await);
    let (ann, bob) = (lasting(&app, ann).await, lasting(&app, bob).await);
    let r = app.patch("/api/users/me").bearer_auth(&ann.token).json(&json!({ "retention_days": 7 })).fetch().await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.body["retention_days"], 7);
    let me = app.get("/api/users/me").bearer_auth(&ann.token).fetch().await;
    assert_eq!(me.body["retention_days"], 7);
    let bobs = app.get("/api/users/me").bearer_auth(&bob.token).fetch().await;
    assert!(bobs.body["retention_days"].is_null(), "{}", bobs.text);

    let (anns, bobs) = (app.new_conversation(&ann).await, app.new_conversation(&bob).await);
    app.say(&ann, &anns, "short-lived").await;
    app.say(&bob, &bobs, "kept forever").await;
    app.advance(6 * DAY);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(status_of(&app, &ann, &anns).await, StatusCode::OK, "6 days idle is not yet 7");

    app.advance(2 * DAY);
    eventually("the deletion of ann's conversation", || async {
        status_of(&app, &ann, &anns).await == StatusCode::NOT_FOUND
    })
    .await;
    assert_eq!(status_of(&app, &bob, &bobs).await, StatusCode::OK, "bob set no retention and the server none");

    // Cleared, it no longer applies.
    let r = app.patch("/api/users/me").bearer_auth(&ann.token).json(&json!({ "retention_days": null })).fetch().await;
    r.assert_status(StatusCode::OK);
    assert!(r.body["retention_days"].is_null());
    let kept = app.new_conversation(&ann).await;
    app.advance(30 * DAY);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(status_of(&app, &ann, &kept).await, StatusCode::OK);
}

async fn retention_days_is_validated(app: TestApp) {
    let ann = app.signup().await;
    for bad in [json!(0), json!(-3), json!(36_501), json!("7"), json!(1.5), json!(true)] {
        let r =
            app.patch("/api/users/me").bearer_auth(&ann.token).json(&json!({ "retention_days": bad })).fetch().await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {}", r.text);
        assert_eq!(r.body["code"], "validation_error", "{bad}: {}", r.text);
    }
    let me = app.get("/api/users/me").bearer_auth(&ann.token).fetch().await;
    assert!(me.body["retention_days"].is_null(), "nothing was stored: {}", me.text);
    let r = app.patch("/api/users/me").bearer_auth(&ann.token).json(&json!({ "retention_days": 36_500 })).fetch().await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.body["retention_days"], 36_500);
    // JSON Schema counts 30.0 as an integer, and so do we.
    let r = app.patch("/api/users/me").bearer_auth(&ann.token).json(&json!({ "retention_days": 30.0 })).fetch().await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.body["retention_days"], 30);
}

async fn closed_support_sessions_are_deleted_after_their_retention(mut app: TestApp) {
    // The users' retention is shorter, and must not touch the desk's conversations.
    with_retention(&mut app, Some(1), Some(30)).await;
    let bob = agent(&app).await;
    let (closed, open) = (visitor(&app, "cara").await, visitor(&app, "dan").await);
    for v in [&closed, &open] {
        app.post(&format!("/api/support/sessions/{}/messages", v.id))
            .bearer_auth(&v.token)
            .json(&json!({ "content": "my order is late" }))
            .fetch()
            .await
            .assert_status(StatusCode::CREATED);
    }
    handoff(&app, &closed).await;
    claim(&app, &bob, &closed).await;
    app.post(&format!("/api/agent/sessions/{}/close", closed.id))
        .bearer_auth(&bob.token)
        .fetch()
        .await
        .assert_status(StatusCode::OK);
    let sessions = "SELECT COUNT(*) FROM support_sessions WHERE id = $1";
    let events = "SELECT COUNT(*) FROM support_events WHERE session_id = $1";
    assert!(app.database.scalar(events, &[&closed.id]).await > 0);

    app.advance(29 * DAY);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(app.database.scalar(sessions, &[&closed.id]).await, 1, "closed 29 days ago: kept");

    app.advance(2 * DAY);
    eventually("the closed session's deletion", || async { app.database.scalar(sessions, &[&closed.id]).await == 0 })
        .await;
    assert_eq!(app.database.scalar(events, &[&closed.id]).await, 0, "its event log goes too");
    let transcript = app.get(&format!("/api/support/sessions/{}", closed.id)).bearer_auth(&closed.token).fetch().await;
    assert_eq!(transcript.status, StatusCode::UNAUTHORIZED, "{}", transcript.text);
    assert_eq!(app.database.scalar(sessions, &[&open.id]).await, 1, "an open session stays, however old");
    let still = app.get(&format!("/api/support/sessions/{}", open.id)).bearer_auth(&open.token).fetch().await;
    still.assert_status(StatusCode::OK);
}

/// Two instances on one PostgreSQL: one of them sweeps (the lease), the
/// deleted count over both is exactly what was due, and what was not due stays.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_delete_exactly_what_is_due_once() {
    let Some(mut app) = spawn_process_app_with(Db::Postgres, |s| {
        s.retention.retention_days = Some(30);
        s.retention.retention_sweep_secs = 1;
    })
    .await
    else {
        return;
    };
    let sibling = app.sibling().await;
    let (ann, bob) = (app.signup().await, app.signup().await);
    let mut due = Vec::new();
    let mut kept = Vec::new();
    for i in 0..24 {
        let user = if i % 2 == 0 { &ann } else { &bob };
        let conversation = app.new_conversation(user).await;
        app.say(user, &conversation, &format!("note {i}")).await;
        if i % 3 == 0 {
            kept.push((user.clone(), conversation));
        } else {
            due.push((user.clone(), conversation));
        }
    }
    bulk_messages(&app, &due[0].1, 1_100).await;
    for (_, conversation) in &due {
        app.database.execute("UPDATE conversations SET updated_at = 0 WHERE id = $1", &[conversation]).await;
    }

    eventually("the due conversations' deletion", || async {
        app.database.scalar("SELECT COUNT(*) FROM conversations WHERE updated_at = 0", &[]).await == 0
    })
    .await;
    for (user, conversation) in &due {
        assert_eq!(status_of(&app, user, conversation).await, StatusCode::NOT_FOUND);
    }
    for (user, conversation) in &kept {
        assert_eq!(status_of(&app, user, conversation).await, StatusCode::OK);
        assert_eq!(messages_of(&app, conversation).await, 2);
    }
    let mut counted = Vec::new();
    for address in [&app.address, &sibling.address] {
        let text = app.client.get(format!("{address}/metrics")).send().await.unwrap().text().await.unwrap();
        let line = r#"palaver_retention_deleted_total{kind="conversation"} "#;
        counted.push(
            text.lines()
                .find_map(|l| l.strip_prefix(line)?.trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{line} missing in:\n{text}")),
        );
    }
    counted.sort_by(f64::total_cmp);
    assert_eq!(counted, [0.0, due.len() as f64], "one instance (the lease's holder) deleted each due one once");
    assert_eq!(app.database.scalar("SELECT COUNT(*) FROM leases", &[]).await, 1);
}
