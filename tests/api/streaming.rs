//! SPEC §3 SSE and §6 streams: the event order and ids of
//! `POST …/messages` (`Accept: text/event-stream`) and `POST /api/chat/stream`,
//! provider failures mid-stream, replies that outlive their client, resuming
//! with `Last-Event-ID` after each phase, and cancelling.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    Fetch, SseEvent, SseStream, TestApp, TestUser, assert_message, db_tests, delta_text, event_names,
};
use crate::mock_llm::{Fault, MOCK_COMPLETION_TOKENS, MOCK_PROMPT_TOKENS, Script, StreamEnd};

db_tests!(
    message_stream_events_come_in_order_with_byte_offset_ids,
    chat_stream_starts_with_the_conversation,
    a_provider_failure_ends_the_stream_with_an_error_event,
    a_provider_silent_mid_stream_ends_it_with_provider_timeout,
    a_provider_dropping_mid_stream_ends_it_with_provider_error,
    a_plain_answer_that_broke_off_is_started_over,
    a_client_that_disconnects_does_not_stop_the_reply,
    a_resume_after_each_phase_gets_exactly_what_was_missed,
    a_finished_reply_replays_whole,
    a_failed_reply_replays_with_its_error,
    resume_refuses_bad_event_ids_and_other_peoples_replies,
    cancel_stops_the_provider_and_keeps_the_partial_text,
    cancel_reaches_a_reply_whose_client_has_gone,
    cancel_refuses_finished_replies_and_other_peoples,
);

/// A reply streamed slowly enough to act on while it runs.
fn slow_script() -> Script {
    Script::words(30, Duration::from_millis(60))
}

const SETTLE: Duration = Duration::from_secs(15);

fn mock_usage() -> Value {
    json!({
        "prompt_tokens": MOCK_PROMPT_TOKENS,
        "completion_tokens": MOCK_COMPLETION_TOKENS,
        "total_tokens": MOCK_PROMPT_TOKENS + MOCK_COMPLETION_TOKENS
    })
}

/// Every event's `id:` follows SPEC §6: `0` before the reply, the reply's
/// byte length after each delta (counting from `from`), `<len>:end` last.
#[track_caller]
fn assert_event_ids(events: &[SseEvent], from: usize) {
    let mut len = from;
    for (i, e) in events.iter().enumerate() {
        let id = e.id.as_deref().unwrap_or_else(|| panic!("event without an id: {e:?}"));
        match e.event.as_str() {
            "conversation" | "user_message" => assert_eq!(id, "0", "id of {e:?}"),
            "delta" => {
                len += e.data["text"].as_str().expect("delta text").len();
                assert_eq!(id, len.to_string(), "a delta's id is the reply's length in bytes after it: {e:?}");
            }
            "done" | "error" => {
                assert_eq!(i, events.len() - 1, "{} is not the last event: {:?}", e.event, event_names(events));
                assert_eq!(id, format!("{len}:end"), "id of the last event {e:?}");
            }
            other => panic!("unexpected event {other:?}: {e:?}"),
        }
    }
}

/// Reads a stream up to and with its first delta; returns the events.
pub async fn until_first_delta(stream: &mut SseStream) -> Vec<SseEvent> {
    let mut events = Vec::new();
    loop {
        let e = stream.next().await.expect("the stream ended before its first delta");
        let delta = e.event == "delta";
        events.push(e);
        if delta {
            return events;
        }
    }
}

/// The newest assistant message of a conversation (the one streaming).
async fn latest_reply(app: &TestApp, user: &TestUser, conversation_id: &str) -> Value {
    let list = app.messages(user, conversation_id, "?limit=100").await;
    list.assert_status(StatusCode::OK);
    list.items().iter().rev().find(|m| m["role"] == "assistant").cloned().expect("an assistant message")
}

async fn message_stream_events_come_in_order_with_byte_offset_ids(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    let script = Script::words(12, Duration::from_millis(10));
    app.provider.stream(script.clone());

    let events = app.post_message_sse(&user, &conversation, "Tell me a story", None).await.rest().await;

    let names = event_names(&events);
    assert_eq!(names.first(), Some(&"user_message"), "{names:?}");
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    assert!(names[1..names.len() - 1].iter().all(|n| *n == "delta"), "{names:?}");
    assert!(names.len() >= 4, "a streamed reply comes in several deltas, got {names:?}");
    assert_event_ids(&events, 0);

    let question = &events[0].data;
    assert_message(question, &conversation, "user", "complete");
    assert_eq!(question["content"], "Tell me a story");
    let done = &events.last().unwrap().data;
    assert_message(done, &conversation, "assistant", "complete");
    assert_eq!(done["content"], script.text());
    assert_eq!(done["usage"]["total_tokens"], mock_usage()["total_tokens"], "{done}");
    assert_eq!(delta_text(&events), script.text(), "the deltas add up to the reply");
    for delta in events.iter().filter(|e| e.event == "delta") {
        assert_eq!(delta.data["message_id"], done["id"], "{delta:?}");
    }

    let stored = app.stored_message(&user, &conversation, done["id"].as_str().unwrap()).await;
    assert_eq!(stored["status"], "complete");
    assert_eq!(stored["content"], script.text());
    app.stored_message(&user, &conversation, question["id"].as_str().unwrap()).await;
    let request = app.provider.last_request();
    assert_eq!(request.body["stream"], true, "the provider is asked to stream: {}", request.body);
}

async fn chat_stream_starts_with_the_conversation(app: TestApp) {
    let user = app.signup().await;
    let script = Script::words(5, Duration::from_millis(5));
    app.provider.stream(script.clone());

    let events = app.chat_stream(&user, json!({ "message": "Hello there" })).await.rest().await;
    let names = event_names(&events);
    assert_eq!(&names[..2], ["conversation", "user_message"], "{names:?}");
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    assert_event_ids(&events, 0);
    let conversation = events[0].data["id"].as_str().expect("conversation id").to_owned();
    assert_message(&events[1].data, &conversation, "user", "complete");
    assert_eq!(delta_text(&events), script.text());
    app.conversation(&user, &conversation).await.assert_status(StatusCode::OK);

    // Continuing it names the same conversation.
    let events =
        app.chat_stream(&user, json!({ "message": "And again", "conversation_id": conversation })).await.rest().await;
    assert_eq!(events[0].event, "conversation");
    assert_eq!(events[0].data["id"], conversation.as_str());
    assert_message(&events[1].data, &conversation, "user", "complete");
    assert_eq!(events.last().unwrap().event, "done");
    let list = app.messages(&user, &conversation, "").await;
    assert_eq!(list.items().len(), 4, "{}", list.text);
}

async fn a_provider_failure_ends_the_stream_with_an_error_event(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    app.provider.fail_with(400);

    let events = app.post_message_sse(&user, &conversation, "Fail, please", None).await.rest().await;
    assert_eq!(event_names(&events), ["user_message", "error"]);
    assert_event_ids(&events, 0);
    let error = &events[1].data;
    assert_eq!(error["code"], "provider_error", "{error}");
    assert!(error["detail"].as_str().is_some_and(|d| !d.is_empty()), "{error}");

    let list = app.messages(&user, &conversation, "").await;
    let items = list.items();
    assert_eq!(items.len(), 2, "{}", list.text);
    assert_eq!(items[0]["id"], events[0].data["id"], "the question is kept");
    assert_eq!(items[1]["status"], "failed");
}

async fn a_provider_silent_mid_stream_ends_it_with_provider_timeout(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    let script = Script::words(3, Duration::from_millis(10)).ending(StreamEnd::Hang);
    app.provider.stream(script.clone());

    let events = app.post_message_sse(&user, &conversation, "Then go quiet", None).await.rest().await;
    assert_event_ids(&events, 0);
    let last = events.last().unwrap();
    assert_eq!(last.event, "error", "{:?}", event_names(&events));
    assert_eq!(last.data["code"], "provider_timeout", "{:?}", last.data);
    assert_eq!(delta_text(&events), script.text(), "the text before the silence was shown");

    let reply = latest_reply(&app, &user, &conversation).await;
    assert_eq!(reply["status"], "failed", "{reply}");
    assert_eq!(reply["content"], script.text(), "the failed reply keeps what it had: {reply}");
    assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()), "{reply}");
}

async fn a_provider_dropping_mid_stream_ends_it_with_provider_error(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    let script = Script::words(4, Duration::from_millis(10)).ending(StreamEnd::Drop);
    app.provider.stream(script.clone());

    let events = app.post_message_sse(&user, &conversation, "Then hang up", None).await.rest().await;
    assert_event_ids(&events, 0);
    let last = events.last().unwrap();
    assert_eq!(last.event, "error", "{:?}", event_names(&events));
    assert_eq!(last.data["code"], "provider_error", "{:?}", last.data);
    assert_eq!(delta_text(&events), script.text());
    assert_eq!(app.provider.request_count(), 1, "a reply that showed text is not retried");

    let reply = latest_reply(&app, &user, &conversation).await;
    assert_eq!(reply["status"], "failed", "{reply}");
    assert_eq!(reply["content"], script.text(), "{reply}");
}

/// SPEC §6: a JSON send shows nothing before the end, so a stream that
/// breaks off mid-answer is started over (then falls back) like a refused
/// connection, and only a break on every try fails the reply.
async fn a_plain_answer_that_broke_off_is_started_over(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    let script = Script::words(6, Duration::ZERO);
    app.provider.stream(script.clone());
    app.provider.then(Fault::DropAfter(2));
    let sent = app.say(&user, &conversation, "Tell me everything").await;
    let reply = &sent["assistant_message"];
    assert_eq!(reply["status"], "complete", "{sent}");
    assert_eq!(reply["content"], script.text(), "no text of the broken try is kept twice");
    assert_eq!(app.provider.request_count(), 2);
    let stored = latest_reply(&app, &user, &conversation).await;
    assert_eq!((stored["status"].clone(), stored["content"].clone()), (json!("complete"), reply["content"].clone()));

    // Breaking off every time: the first try and the two retries, then failed.
    app.provider.always(Fault::DropAfter(1));
    let r = app
        .post(&format!("/api/conversations/{conversation}/messages"))
        .bearer_auth(&user.token)
        .json(&json!({ "content": "Again" }))
        .fetch()
        .await;
    r.assert_error(StatusCode::BAD_GATEWAY, "provider_error");
    assert_eq!(app.provider.request_count(), 5);
    let stored = latest_reply(&app, &user, &conversation).await;
    assert_eq!(stored["status"], "failed", "{stored}");
    assert_eq!(stored["content"], "wörd 0 ", "the last try's text is kept");
}

async fn a_client_that_disconnects_does_not_stop_the_reply(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    let script = Script::words(20, Duration::from_millis(40));
    app.provider.stream(script.clone());

    let mut stream = app.post_message_sse(&user, &conversation, "Keep going", None).await;
    let events = until_first_delta(&mut stream).await;
    drop(stream);
    let reply_id = events.last().unwrap().data["message_id"].as_str().unwrap().to_owned();

    let reply = app.settled_message(&user, &conversation, &reply_id, SETTLE).await;
    assert_eq!(reply["status"], "complete", "{reply}");
    assert_eq!(reply["content"], script.text());
    assert_eq!(app.provider.chunks_sent(), script.chunks.len(), "the provider stream was read to its end");
    assert_eq!(app.provider.request_count(), 1);
}

async fn a_resume_after_each_phase_gets_exactly_what_was_missed(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    let script = slow_script();
    let full = script.text();
    app.provider.stream(script);

    // Phase 1: gone right after `user_message` (id 0); the reply's id comes
    // from the message list.
    let mut stream = app.post_message_sse(&user, &conversation, "A long story", None).await;
    let question = stream.expect("user_message").await;
    drop(stream);
    let reply = latest_reply(&app, &user, &conversation).await;
    let reply_id = reply["id"].as_str().unwrap().to_owned();
    assert_eq!(reply["status"], "streaming", "the reply should still be running: {reply}");
    let mut seen = String::new();

    // Phase 2: resumed from 0, gone again after two deltas.
    let mut stream = app.resume(&user, &conversation, &reply_id, question.id.as_deref()).await;
    let mut last_id = String::new();
    for _ in 0..2 {
        let delta = stream.expect("delta").await;
        seen.push_str(delta.data["text"].as_str().unwrap());
        assert_eq!(delta.data["message_id"], reply_id.as_str());
        last_id = delta.id.clone().unwrap();
        assert_eq!(last_id, seen.len().to_string(), "{delta:?}");
    }
    drop(stream);
    assert!(full.starts_with(&seen), "{seen:?} is not the start of the reply");

    // Phase 3: resumed mid-reply (still live), read to the end.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stream = app.resume(&user, &conversation, &reply_id, Some(&last_id)).await;
    let events = stream.rest().await;
    assert_event_ids(&events, seen.len());
    assert_eq!(events.last().unwrap().event, "done", "{:?}", event_names(&events));
    seen.push_str(&delta_text(&events));
    assert_eq!(seen, full, "the resumed deltas continue exactly where the client left");
    let done = &events.last().unwrap().data;
    assert_eq!(done["content"], full.as_str());
    assert_eq!(done["status"], "complete");

    // Phase 4: gone after `done`: resuming from its id replays only `done`.
    let end_id = format!("{}:end", full.len());
    let events = app.resume(&user, &conversation, &reply_id, Some(&end_id)).await.rest().await;
    assert_eq!(event_names(&events), ["done"], "{events:?}");
    assert_eq!(events[0].id.as_deref(), Some(end_id.as_str()));

    // And from a delta id of the finished reply: the rest, once.
    let events = app.resume(&user, &conversation, &reply_id, Some(&last_id)).await.rest().await;
    assert_eq!(event_names(&events), ["delta", "done"], "{events:?}");
    assert_event_ids(&events, last_id.parse().unwrap());
    assert_eq!(format!("{}{}", &full[..last_id.parse().unwrap()], delta_text(&events)), full);
    assert_eq!(app.provider.request_count(), 1, "resuming never calls the provider");
}

async fn a_finished_reply_replays_whole(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    let script = Script::words(8, Duration::ZERO);
    app.provider.stream(script.clone());
    let events = app.post_message_sse(&user, &conversation, "Short one", None).await.rest().await;
    let done = events.last().unwrap().data.clone();
    let reply_id = done["id"].as_str().unwrap();

    for last_event_id in [None, Some("0")] {
        let events = app.resume(&user, &conversation, reply_id, last_event_id).await.rest().await;
        assert_eq!(event_names(&events), ["delta", "done"], "Last-Event-ID {last_event_id:?}: {events:?}");
        assert_event_ids(&events, 0);
        assert_eq!(events[0].data["text"], script.text(), "one delta with all the text");
        assert_eq!(events[0].data["message_id"], reply_id);
        assert_eq!(events[1].data, done, "the replayed done is the original");
    }
}

async fn a_failed_reply_replays_with_its_error(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    let script = Script::words(3, Duration::ZERO).ending(StreamEnd::Drop);
    app.provider.stream(script.clone());
    let events = app.post_message_sse(&user, &conversation, "Break", None).await.rest().await;
    let reply_id = events.iter().find(|e| e.event == "delta").unwrap().data["message_id"].as_str().unwrap().to_owned();

    let replay = app.resume(&user, &conversation, &reply_id, None).await.rest().await;
    assert_eq!(event_names(&replay), ["delta", "error"], "{replay:?}");
    assert_event_ids(&replay, 0);
    assert_eq!(replay[0].data["text"], script.text());
    assert_eq!(replay[1].data["code"], "provider_error");
}

async fn resume_refuses_bad_event_ids_and_other_peoples_replies(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    let sent = app.say(&user, &conversation, "Hi").await;
    let reply_id = sent["assistant_message"]["id"].as_str().unwrap();
    let question_id = sent["user_message"]["id"].as_str().unwrap();

    for bad in ["abc", "12x", "-3", "1.5"] {
        let response = app.resume_request(&user, &conversation, reply_id, Some(bad)).fetch().await;
        response.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_event_id");
    }

    let stranger = app.signup().await;
    let theirs = app.new_conversation(&stranger).await;
    app.resume_request(&stranger, &conversation, reply_id, None)
        .fetch()
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    app.resume_request(&stranger, &theirs, reply_id, None)
        .fetch()
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    let unknown = uuid::Uuid::new_v4().to_string();
    app.resume_request(&user, &conversation, &unknown, None)
        .fetch()
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    app.resume_request(&user, &conversation, question_id, None)
        .fetch()
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    app.get(&format!("/api/conversations/{conversation}/messages/{reply_id}/stream"))
        .fetch()
        .await
        .assert_unauthorized();
}

async fn cancel_stops_the_provider_and_keeps_the_partial_text(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    let script = Script::words(100, Duration::from_millis(50));
    let full = script.text();
    app.provider.stream(script);

    let mut stream = app.post_message_sse(&user, &conversation, "Go on and on", None).await;
    let mut events = until_first_delta(&mut stream).await;
    events.push(stream.expect("delta").await);
    let reply_id = events.last().unwrap().data["message_id"].as_str().unwrap().to_owned();

    let cancelled = app.cancel_reply(&user, &conversation, &reply_id).await;
    cancelled.assert_status(StatusCode::OK).assert_json();
    let message = &cancelled.body;
    assert_message(message, &conversation, "assistant", "cancelled");
    let partial = message["content"].as_str().unwrap();
    assert!(partial.len() >= delta_text(&events).len(), "the cancelled reply lost text the client saw: {message}");
    assert!(partial.len() < full.len() && full.starts_with(partial), "not a partial of the reply: {partial:?}");

    // The open stream ends with the cancelled message and carries exactly its text.
    events.extend(stream.rest().await);
    assert_event_ids(&events, 0);
    let last = events.last().unwrap();
    assert_eq!(last.event, "done", "{:?}", event_names(&events));
    assert_eq!(last.data["status"], "cancelled");
    assert_eq!(delta_text(&events), partial);

    // The provider call stopped: its stream was closed and nothing more was sent.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while app.provider.open_streams() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the provider stream is still being read after cancel");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = app.provider.chunks_sent();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.provider.chunks_sent(), sent);
    assert!(sent < 100, "the whole reply was generated despite the cancel");

    let stored = app.stored_message(&user, &conversation, &reply_id).await;
    assert_eq!(stored["status"], "cancelled");
    assert_eq!(stored["content"], partial);
    assert_eq!(app.provider.request_count(), 1);
}

async fn cancel_reaches_a_reply_whose_client_has_gone(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    app.provider.stream(Script::words(100, Duration::from_millis(50)));
    let mut stream = app.post_message_sse(&user, &conversation, "Go on", None).await;
    let events = until_first_delta(&mut stream).await;
    drop(stream);
    let reply_id = events.last().unwrap().data["message_id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let cancelled = app.cancel_reply(&user, &conversation, &reply_id).await;
    cancelled.assert_status(StatusCode::OK);
    assert_eq!(cancelled.body["status"], "cancelled");
    assert!(!cancelled.body["content"].as_str().unwrap().is_empty(), "{}", cancelled.text);
    let stored = app.stored_message(&user, &conversation, &reply_id).await;
    assert_eq!(stored["status"], "cancelled");
    assert_eq!(stored["content"], cancelled.body["content"]);
}

async fn cancel_refuses_finished_replies_and_other_peoples(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    let sent = app.say(&user, &conversation, "Hi").await;
    let reply_id = sent["assistant_message"]["id"].as_str().unwrap();

    app.cancel_reply(&user, &conversation, reply_id).await.assert_error(StatusCode::CONFLICT, "not_streaming");
    let stored = app.stored_message(&user, &conversation, reply_id).await;
    assert_eq!(stored["status"], "complete", "a refused cancel changes nothing");

    app.provider.stream(Script::words(60, Duration::from_millis(50)));
    let mut stream = app.post_message_sse(&user, &conversation, "Long", None).await;
    let events = until_first_delta(&mut stream).await;
    let live_id = events.last().unwrap().data["message_id"].as_str().unwrap().to_owned();
    let stranger = app.signup().await;
    app.cancel_reply(&stranger, &conversation, &live_id).await.assert_error(StatusCode::NOT_FOUND, "not_found");
    let question_id = events[0].data["id"].as_str().unwrap();
    app.cancel_reply(&user, &conversation, question_id).await.assert_error(StatusCode::NOT_FOUND, "not_found");
    let rest = stream.rest().await;
    assert_eq!(rest.last().unwrap().data["status"], "complete", "a refused cancel does not stop the reply");
}
