//! `/metrics` (SPEC §7): the gauges and each configured model's counters are
//! there at 0 on a fresh instance, before their first use, and they move.
//! Each test runs its own `palaver` process: the recorder is per process.

use std::time::Duration;

use reqwest::StatusCode;

use crate::helpers::{Db, Fetch, TestApp, spawn_process_app};
use crate::mock_llm::Script;
use crate::streaming::until_first_delta;

/// The value of one series (`name{labels}` exactly as rendered), if present.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn metrics(app: &TestApp) -> String {
    let r = app.get("/metrics").fetch().await;
    r.assert_status(StatusCode::OK);
    r.text.clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_instance_shows_every_gauge_at_zero() {
    let Some(app) = spawn_process_app(Db::Sqlite).await else { return };
    let text = metrics(&app).await;
    for name in [
        r#"palaver_open_sockets{kind="chat"}"#,
        r#"palaver_open_sockets{kind="support_client"}"#,
        r#"palaver_open_sockets{kind="support_agent"}"#,
        "palaver_support_queue_length",
        "palaver_replies_in_flight",
        r#"palaver_retention_deleted_total{kind="conversation"}"#,
        r#"palaver_retention_deleted_total{kind="support_session"}"#,
        r#"palaver_budget_refusals_total{outcome="budget_exceeded"}"#,
        r#"palaver_budget_refusals_total{outcome="limits_unavailable"}"#,
        r#"palaver_rate_limited_total{outcome="rate_limited"}"#,
    ] {
        assert_eq!(series(&text, name), Some(0.0), "{name} missing or not 0 in:\n{text}");
    }
    assert!(
        text.lines().any(|l| l.starts_with("palaver_provider_calls_total{") && l.ends_with(" 0")),
        "the configured models' call counters are there at 0:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sockets_and_replies_in_flight_are_counted() {
    let Some(app) = spawn_process_app(Db::Sqlite).await else { return };
    let user = app.signup().await;
    let chat = r#"palaver_open_sockets{kind="chat"}"#;

    // The socket is counted once its task runs, just after the handshake.
    let socket = app.ws(&user).await;
    until(&app, "the open socket counted", |m| series(m, chat) == Some(1.0)).await;

    let conversation = app.new_conversation(&user).await;
    app.provider.stream(Script::words(200, Duration::from_millis(20)));
    let mut stream = app.post_message_sse(&user, &conversation, "A long story", None).await;
    until_first_delta(&mut stream).await;
    assert_eq!(series(&metrics(&app).await, "palaver_replies_in_flight"), Some(1.0));
    stream.rest().await;

    drop(socket);
    until(&app, "the socket and the reply no longer counted", |m| {
        series(m, chat) == Some(0.0) && series(m, "palaver_replies_in_flight") == Some(0.0)
    })
    .await;
}

/// Waits (up to 5 s) for /metrics to satisfy `done`.
async fn until(app: &TestApp, what: &str, done: impl Fn(&str) -> bool) {
    let mut last = String::new();
    for _ in 0..50 {
        last = metrics(app).await;
        if done(&last) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within 5 s in\n{last}");
}

/// Budget refusals and settled tokens are counted by outcome and model, and
/// no series names a user.
#[tokio::test(flavor = "multi_thread")]
async fn budget_refusals_and_tokens_are_counted_without_user_labels() {
    let Some(app) = spawn_process_app(Db::Sqlite).await else { return };
    let admin = app.signup_admin().await;
    let user = app.signup().await;
    let budget = 5 + i64::from(app.settings.limits.budget_default_reserve);
    app.patch(&format!("/api/admin/users/{}", user.id))
        .bearer_auth(&admin.token)
        .json(&serde_json::json!({ "token_budget": budget }))
        .fetch()
        .await
        .assert_status(StatusCode::OK);
    let send = || app.post("/api/chat").bearer_auth(&user.token).json(&serde_json::json!({ "message": "four" }));
    send().fetch().await.assert_status(StatusCode::OK);
    let refused = r#"palaver_budget_refusals_total{outcome="budget_exceeded"}"#;
    until(&app, "the settled tokens counted", |m| {
        m.lines().any(|l| l.starts_with("palaver_budget_tokens_total{") && l.contains(r#"outcome="settled""#))
    })
    .await;
    // Settled: the next send no longer fits what is left.
    for _ in 0..100 {
        if send().fetch().await.status == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = metrics(&app).await;
    assert!(series(&text, refused).is_some_and(|n| n >= 1.0), "{refused} in:\n{text}");
    assert!(!text.contains(&user.id), "a user id in a label:\n{text}");
}
