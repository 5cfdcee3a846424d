//! Issue 16: a reply whose instance is killed (`kill -9`) while it streams is
//! taken over by a surviving instance on the same PostgreSQL and generated
//! again from the start; a follower on the survivor gets `reset`, then the
//! whole new text, and the stored reply ends `complete`. With
//! `PALAVER_REPLY_TAKEOVER=false` it is marked failed (`interrupted`). A
//! support visitor's socket on the survivor gets the same `reset`.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{Db, Fetch, SseStream, TestApp, TestUser, delta_text, spawn_process_app_with};
use crate::mock_llm::Script;
use crate::streaming::until_first_delta;
use crate::support_ws::{client_socket, until};

/// A reply started on `a` (by a user with a daily token `budget`, if any)
/// and followed from `survivor` from its first delta; then `a` is killed.
/// Answers the follower's events and the stored reply.
async fn kill_the_generator(
    a: &mut TestApp,
    survivor: &str,
    script: &Script,
    budget: Option<i64>,
) -> (Vec<crate::helpers::SseEvent>, Value) {
    let user = a.signup().await;
    if let Some(tokens) = budget {
        let admin = a.signup_admin().await;
        let r = a
            .patch(&format!("/api/admin/users/{}", user.id))
            .bearer_auth(&admin.token)
            .json(&serde_json::json!({ "token_budget": tokens, "budget_period": "day" }))
            .fetch()
            .await;
        r.assert_status(StatusCode::OK);
    }
    let conversation = a.new_conversation(&user).await;
    a.provider.stream(script.clone());
    let mut stream = a.post_message_sse(&user, &conversation, "A long story", None).await;
    let first = until_first_delta(&mut stream).await.pop().expect("the first delta");
    let reply_id = first.data["message_id"].as_str().unwrap().to_owned();
    let client = reqwest::Client::new();
    let follow = client
        .get(format!("{survivor}/api/conversations/{conversation}/messages/{reply_id}/stream"))
        .bearer_auth(&user.token)
        .header("Last-Event-ID", first.id.clone().expect("deltas carry ids"));
    let mut follower = SseStream::open(follow).await;
    // The follower is under way on the survivor before its generator dies.
    let mut events = vec![follower.next().await.expect("an event from the follower")];
    a.kill_server().await;
    drop(stream);
    events.extend(follower.rest().await);
    let reply = stored(&client, survivor, &user, &conversation, &reply_id).await;
    if events.iter().any(|e| e.event == "reset") {
        // A client that saw only the old text, and resumes with its id,
        // is told to reset and gets the new text whole.
        let resume = client
            .get(format!("{survivor}/api/conversations/{conversation}/messages/{reply_id}/stream"))
            .bearer_auth(&user.token)
            .header("Last-Event-ID", first.id.clone().expect("deltas carry ids"));
        let again = SseStream::open(resume).await.rest().await;
        assert_eq!(again.first().map(|e| e.event.as_str()), Some("reset"), "{again:?}");
        assert_eq!(again.first().and_then(|e| e.id.as_deref()), Some("0:reset@1"));
        assert_eq!(delta_text(&again[1..]), reply["content"].as_str().unwrap(), "{again:?}");
        // One that saw the new text resumes where it left off.
        let last = events.iter().rev().find(|e| e.event == "delta").expect("a delta of the new text");
        let id = last.id.clone().expect("deltas carry ids");
        assert!(id.ends_with("@1"), "{id}");
        let resume = client
            .get(format!("{survivor}/api/conversations/{conversation}/messages/{reply_id}/stream"))
            .bearer_auth(&user.token)
            .header("Last-Event-ID", id);
        let rest = SseStream::open(resume).await.rest().await;
        assert!(rest.iter().all(|e| e.event != "reset"), "{rest:?}");
        assert_eq!(rest.last().map(|e| e.event.as_str()), Some("done"), "{rest:?}");
    }
    (events, reply)
}

async fn stored(client: &reqwest::Client, address: &str, user: &TestUser, conversation: &str, id: &str) -> Value {
    let r = client
        .get(format!("{address}/api/conversations/{conversation}/messages?limit=100"))
        .bearer_auth(&user.token)
        .fetch()
        .await;
    r.assert_status(StatusCode::OK);
    r.items().iter().find(|m| m["id"] == id).cloned().expect("the reply is stored")
}

async fn two_instances(takeover: bool, test: impl AsyncFnOnce(&mut TestApp, &str)) {
    let Some(mut a) = spawn_process_app_with(Db::Postgres, |s| {
        s.chat.reply_takeover = takeover;
        s.limits.budget_default_reserve = RESERVE;
    })
    .await
    else {
        return;
    };
    let b = a.sibling().await;
    let database = a.database.clone();
    test(&mut a, &b.address).await;
    drop(b);
    database.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_instances_reply_is_taken_over_and_completes() {
    two_instances(true, async |a, survivor| {
        let script = Script::words(60, Duration::from_millis(50));
        let (events, reply) = kill_the_generator(a, survivor, &script, None).await;
        let reset = events.iter().position(|e| e.event == "reset").unwrap_or_else(|| panic!("no reset: {events:?}"));
        let after = &events[reset + 1..];
        let done = after.last().expect("events after the reset");
        assert_eq!(done.event, "done", "{events:?}");
        assert_eq!(delta_text(after), script.text(), "the new text, whole, after the reset");
        assert_eq!(done.data["status"], "complete");
        assert_eq!(done.data["content"], script.text());
        assert_eq!(events.iter().filter(|e| e.event == "reset").count(), 1, "{events:?}");
        assert_eq!((&reply["status"], &reply["content"]), (&Value::from("complete"), &Value::from(script.text())));
    })
    .await;
}

/// What a budgeted send reserves for its answer here.
const RESERVE: u32 = 100;

/// A takeover is admitted against the owner's budget like a send: the dead
/// instance's reservation is still held (it expires later), so a budget that
/// covered one send does not cover generating the reply again, and the reply
/// is marked failed, with what it had, instead of being paid for twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_takeover_the_budget_does_not_cover_is_marked_failed() {
    two_instances(true, async |a, survivor| {
        let script = Script::words(60, Duration::from_millis(50));
        let budget = i64::from(RESERVE) + 40;
        let (events, reply) = kill_the_generator(a, survivor, &script, Some(budget)).await;
        assert!(events.iter().all(|e| e.event != "reset"), "{events:?}");
        let end = events.last().expect("the follower's last event");
        assert_eq!((end.event.as_str(), &end.data["code"]), ("error", &Value::from("interrupted")), "{events:?}");
        assert_eq!(reply["status"], "failed");
        assert!(reply["error"].as_str().is_some_and(|e| e.contains("budget")), "{reply}");
        assert!(reply["content"].as_str().is_some_and(|c| !c.is_empty() && script.text().starts_with(c)));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_takeover_a_killed_instances_reply_is_marked_failed() {
    two_instances(false, async |a, survivor| {
        let script = Script::words(60, Duration::from_millis(50));
        let (events, reply) = kill_the_generator(a, survivor, &script, None).await;
        assert!(events.iter().all(|e| e.event != "reset"), "{events:?}");
        let end = events.last().expect("the follower's last event");
        assert_eq!((end.event.as_str(), &end.data["code"]), ("error", &Value::from("interrupted")), "{events:?}");
        assert_eq!(reply["status"], "failed");
        assert!(reply["content"].as_str().is_some_and(|c| !c.is_empty() && script.text().starts_with(c)));
    })
    .await;
}

/// The support desk's AI reply, generated on the instance that is killed:
/// the visitor's socket on the survivor gets `reset`, the new text and the
/// finished message.
#[tokio::test(flavor = "multi_thread")]
async fn a_support_reply_is_taken_over_and_reaches_the_visitor() {
    two_instances(true, async |a, survivor| {
        let script = Script::words(60, Duration::from_millis(50));
        a.provider.stream(script.clone());
        let v = crate::support::visitor(a, "taken").await;
        let port: u16 = survivor.rsplit(':').next().unwrap().parse().unwrap();
        let mut socket = client_socket(port, &v, None).await;
        let mut log = Vec::new();
        until(&mut socket, &mut log, "the greeting", |f| f["type"] == "status").await;
        let asked = a
            .post(&format!("/api/support/sessions/{}/messages", v.id))
            .bearer_auth(&v.token)
            .json(&serde_json::json!({ "content": "Where is my parcel?" }));
        let pending = tokio::spawn(asked.send());
        while a.provider.chunks_sent() < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a.kill_server().await;
        let _ = pending.await;

        until(&mut socket, &mut log, "the reset", |f| f["type"] == "reset").await;
        let from = log.len();
        let done = until(&mut socket, &mut log, "the reply", |f| {
            f["type"] == "message" && f["message"]["role"] == "assistant"
        })
        .await;
        let text: String =
            log[from..].iter().filter(|f| f["type"] == "delta").filter_map(|f| f["text"].as_str()).collect();
        assert_eq!(text, script.text(), "the new text, whole: {log:#?}");
        assert_eq!(
            (&done["message"]["status"], &done["message"]["content"]),
            (&Value::from("complete"), &Value::from(script.text()))
        );
    })
    .await;
}
