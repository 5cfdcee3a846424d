//! SPEC §6 idempotency: `Idempotency-Key` on `POST …/messages` (JSON and
//! SSE) and `POST /api/chat(/stream)`. A retry returns the original result
//! or re-attaches to the live reply; sequential or simultaneous, there is
//! exactly one user message and one provider call (counted at the mock).

use std::time::Duration;

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{ApiResponse, Fetch, TestApp, TestUser, db_tests, delta_text, event_names};
use crate::mock_llm::Script;

db_tests!(
    a_retried_post_returns_the_original_messages,
    a_retried_stream_reattaches_to_the_live_reply,
    simultaneous_identical_posts_make_one_message_and_one_provider_call,
    simultaneous_identical_chats_start_one_conversation,
    a_retried_chat_stream_names_the_original_conversation,
    a_key_reused_for_another_body_is_422,
    a_retry_of_a_failed_send_returns_the_failure_without_calling_again,
    keys_belong_to_their_user_and_expire_after_a_day,
    a_key_whose_conversation_was_deleted_answers_at_once,
);

async fn post_keyed(app: &TestApp, user: &TestUser, conversation_id: &str, content: &str, key: &str) -> ApiResponse {
    app.post(&format!("/api/conversations/{conversation_id}/messages"))
        .bearer_auth(&user.token)
        .header("Idempotency-Key", key)
        .json(&json!({ "content": content }))
        .fetch()
        .await
}

async fn chat_keyed(app: &TestApp, user: &TestUser, body: Value, key: &str) -> ApiResponse {
    app.post("/api/chat").bearer_auth(&user.token).header("Idempotency-Key", key).json(&body).fetch().await
}

/// Exactly these many messages in the conversation.
async fn assert_message_count(app: &TestApp, user: &TestUser, conversation_id: &str, expected: usize) {
    let list = app.messages(user, conversation_id, "?limit=100").await;
    assert_eq!(list.items().len(), expected, "{}", list.text);
}

async fn a_retried_post_returns_the_original_messages(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;

    let first = post_keyed(&app, &user, &conversation, "Book a table", "key-1").await;
    first.assert_status(StatusCode::CREATED);
    let retry = post_keyed(&app, &user, &conversation, "Book a table", "key-1").await;
    retry.assert_status(StatusCode::CREATED);
    assert_eq!(retry.body["user_message"]["id"], first.body["user_message"]["id"]);
    assert_eq!(retry.body["assistant_message"]["id"], first.body["assistant_message"]["id"]);
    assert_eq!(retry.body["assistant_message"]["content"], first.body["assistant_message"]["content"]);

    assert_eq!(app.provider.request_count(), 1, "one provider call");
    assert_message_count(&app, &user, &conversation, 2).await;

    // A new key is a new message.
    post_keyed(&app, &user, &conversation, "Book a table", "key-2").await.assert_status(StatusCode::CREATED);
    assert_eq!(app.provider.request_count(), 2);
    assert_message_count(&app, &user, &conversation, 4).await;
}

async fn a_retried_stream_reattaches_to_the_live_reply(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    let script = Script::words(25, Duration::from_millis(40));
    let full = script.text();
    app.provider.stream(script);

    let mut first = app.post_message_sse(&user, &conversation, "Tell me", Some("sse-key")).await;
    let question = first.expect("user_message").await;
    let delta = first.expect("delta").await;
    drop(first);

    // The retry re-attaches while the reply is still running.
    let events = app.post_message_sse(&user, &conversation, "Tell me", Some("sse-key")).await.rest().await;
    assert_eq!(events[0].event, "user_message", "{:?}", event_names(&events));
    assert_eq!(events[0].data["id"], question.data["id"], "the original question, not a second one");
    assert_eq!(events[1].data["message_id"], delta.data["message_id"], "the original reply");
    assert_eq!(delta_text(&events), full, "the retry gets the whole reply");
    assert_eq!(events.last().unwrap().event, "done");

    // A JSON retry with the same key gets the finished original.
    let json = app
        .post(&format!("/api/conversations/{conversation}/messages"))
        .bearer_auth(&user.token)
        .header("Idempotency-Key", "sse-key")
        .json(&json!({ "content": "Tell me" }))
        .fetch()
        .await;
    json.assert_status(StatusCode::CREATED);
    assert_eq!(json.body["user_message"]["id"], question.data["id"]);
    assert_eq!(json.body["assistant_message"]["content"], full.as_str());

    assert_eq!(app.provider.request_count(), 1, "one provider call");
    assert_message_count(&app, &user, &conversation, 2).await;
}

async fn simultaneous_identical_posts_make_one_message_and_one_provider_call(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    app.provider.stream(Script::words(10, Duration::from_millis(20)));

    let posts = (0..8).map(|_| post_keyed(&app, &user, &conversation, "Exactly once", "same-moment"));
    let streams = (0..4).map(|_| app.post_message_sse(&user, &conversation, "Exactly once", Some("same-moment")));
    let (answers, streams) = tokio::join!(join_all(posts), join_all(streams));

    let first = &answers[0];
    for answer in &answers {
        answer.assert_status(StatusCode::CREATED);
        assert_eq!(answer.body["user_message"]["id"], first.body["user_message"]["id"]);
        assert_eq!(answer.body["assistant_message"]["id"], first.body["assistant_message"]["id"]);
    }
    for stream in streams {
        let events = stream.rest().await;
        assert_eq!(events[0].data["id"], first.body["user_message"]["id"], "{events:?}");
        assert_eq!(events.last().unwrap().data["id"], first.body["assistant_message"]["id"]);
        assert_eq!(delta_text(&events), first.body["assistant_message"]["content"].as_str().unwrap());
    }
    assert_eq!(app.provider.request_count(), 1, "one provider call for twelve identical requests");
    assert_message_count(&app, &user, &conversation, 2).await;
}

async fn simultaneous_identical_chats_start_one_conversation(app: TestApp) {
    let user = app.signup().await;
    app.provider.stream(Script::words(5, Duration::from_millis(20)));

    let body = json!({ "message": "Start something" });
    let answers = join_all((0..8).map(|_| chat_keyed(&app, &user, body.clone(), "chat-key"))).await;
    for answer in &answers {
        answer.assert_status(StatusCode::OK);
        assert_eq!(answer.body["conversation_id"], answers[0].body["conversation_id"]);
        assert_eq!(answer.body["message_id"], answers[0].body["message_id"]);
        assert_eq!(answer.body["reply"], answers[0].body["reply"]);
    }
    assert_eq!(app.provider.request_count(), 1);
    let conversations = app.get("/api/conversations").bearer_auth(&user.token).fetch().await;
    assert_eq!(conversations.body["total"], 1, "{}", conversations.text);
    assert_message_count(&app, &user, answers[0].str("conversation_id"), 2).await;
}

async fn a_retried_chat_stream_names_the_original_conversation(app: TestApp) {
    let user = app.signup().await;
    let script = Script::words(20, Duration::from_millis(30));
    let full = script.text();
    app.provider.stream(script);
    let open = || {
        crate::helpers::SseStream::open(
            app.post("/api/chat/stream")
                .bearer_auth(&user.token)
                .header("Idempotency-Key", "stream-key")
                .json(&json!({ "message": "Stream it" })),
        )
    };

    let mut first = open().await;
    let conversation = first.expect("conversation").await;
    let question = first.expect("user_message").await;
    drop(first);
    let events = open().await.rest().await;
    assert_eq!(event_names(&events)[..2], ["conversation", "user_message"]);
    assert_eq!(events[0].data["id"], conversation.data["id"]);
    assert_eq!(events[1].data["id"], question.data["id"]);
    assert_eq!(delta_text(&events), full);
    assert_eq!(app.provider.request_count(), 1);
    let conversations = app.get("/api/conversations").bearer_auth(&user.token).fetch().await;
    assert_eq!(conversations.body["total"], 1, "{}", conversations.text);
}

async fn a_key_reused_for_another_body_is_422(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    let other = app.new_conversation(&user).await;
    post_keyed(&app, &user, &conversation, "First", "k").await.assert_status(StatusCode::CREATED);

    post_keyed(&app, &user, &conversation, "Second", "k")
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    post_keyed(&app, &user, &other, "First", "k")
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    let as_stream = app
        .post(&format!("/api/conversations/{conversation}/messages"))
        .bearer_auth(&user.token)
        .header("Idempotency-Key", "k")
        .header("Accept", "text/event-stream")
        .json(&json!({ "content": "Second" }))
        .fetch()
        .await;
    as_stream.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");

    chat_keyed(&app, &user, json!({ "message": "One" }), "c").await.assert_status(StatusCode::OK);
    chat_keyed(&app, &user, json!({ "message": "Two" }), "c")
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");

    assert_eq!(app.provider.request_count(), 2, "refused retries call nobody");
    assert_message_count(&app, &user, &conversation, 2).await;
    assert_message_count(&app, &user, &other, 0).await;
}

async fn a_retry_of_a_failed_send_returns_the_failure_without_calling_again(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    app.provider.fail_with(400);

    let first = post_keyed(&app, &user, &conversation, "Try", "fail-key").await;
    first.assert_error(StatusCode::BAD_GATEWAY, "provider_error");
    app.provider.reply_with("would be a second call");
    let retry = post_keyed(&app, &user, &conversation, "Try", "fail-key").await;
    retry.assert_error(StatusCode::BAD_GATEWAY, "provider_error");
    assert_eq!(retry.body["user_message"]["id"], first.body["user_message"]["id"], "{}", retry.text);
    assert_eq!(app.provider.request_count(), 1);
    assert_message_count(&app, &user, &conversation, 2).await;
}

async fn keys_belong_to_their_user_and_expire_after_a_day(app: TestApp) {
    let alice = app.signup().await;
    let bob = app.signup().await;
    let hers = app.new_conversation(&alice).await;
    let his = app.new_conversation(&bob).await;

    let a = post_keyed(&app, &alice, &hers, "Hello", "shared").await;
    a.assert_status(StatusCode::CREATED);
    let b = post_keyed(&app, &bob, &his, "Hello", "shared").await;
    b.assert_status(StatusCode::CREATED);
    assert_ne!(a.body["user_message"]["id"], b.body["user_message"]["id"], "another user's key is not mine");
    assert_eq!(app.provider.request_count(), 2);

    app.advance(Duration::from_secs(25 * 3600));
    let alice = app.login_as(&alice).await;
    let later = post_keyed(&app, &alice, &hers, "Hello", "shared").await;
    later.assert_status(StatusCode::CREATED);
    assert_ne!(later.body["user_message"]["id"], a.body["user_message"]["id"], "a key is honoured for 24 h only");
    assert_eq!(app.provider.request_count(), 3);
}

/// Hardening #8.4: a retry whose original's conversation is gone is told so
/// at once instead of waiting for messages that will never appear.
async fn a_key_whose_conversation_was_deleted_answers_at_once(app: TestApp) {
    let user = app.signup().await;
    let first = chat_keyed(&app, &user, json!({ "message": "start something" }), "gone-key").await;
    first.assert_status(StatusCode::OK);
    let conversation = first.str("conversation_id").to_owned();
    app.delete(&format!("/api/conversations/{conversation}"))
        .bearer_auth(&user.token)
        .fetch()
        .await
        .assert_status(StatusCode::NO_CONTENT);

    let started = std::time::Instant::now();
    let retry = chat_keyed(&app, &user, json!({ "message": "start something" }), "gone-key").await;
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "the retry waited {:?}", started.elapsed());
    retry.assert_status(StatusCode::NOT_FOUND);
    let stream = app
        .post("/api/chat/stream")
        .bearer_auth(&user.token)
        .header("Idempotency-Key", "gone-key")
        .json(&json!({ "message": "start something" }))
        .fetch()
        .await;
    stream.assert_status(StatusCode::NOT_FOUND);
    assert_eq!(app.provider.request_count(), 1, "no second provider call");
}
