//! SPEC §3 AI replies: POST /api/conversations/{id}/messages, POST /api/chat,
//! GET /api/history and GET /api/models, against the mock OpenAI provider
//! (what it receives, and what happens when it fails, refuses or hangs) and
//! the offline provider.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    ApiResponse, DEFAULT_MODEL, Fetch, PROVIDER_KEY, TestApp, assert_conversation, assert_message, assert_page,
    assert_timestamp, assert_uuid, db_tests, expected_turns, turns,
};
use crate::mock_llm::{MOCK_COMPLETION_TOKENS, MOCK_PROMPT_TOKENS, echo_of};

db_tests!(
    posting_a_message_returns_both_messages,
    the_provider_gets_the_key_and_the_bare_model_name,
    the_provider_sees_the_system_prompt_and_the_history,
    an_untitled_conversation_is_titled_from_its_first_message,
    the_conversation_model_and_a_per_message_model_are_used,
    message_content_is_validated_in_unicode_characters,
    a_failing_provider_answers_502_and_keeps_the_user_message,
    a_provider_refusing_the_key_answers_502,
    a_hung_provider_answers_504_and_keeps_the_user_message,
    failed_replies_are_not_sent_to_the_provider_again,
    chat_without_a_conversation_starts_one,
    chat_continues_a_conversation,
    chat_body_is_validated,
    history_lists_conversations_with_their_last_message,
    models_lists_the_configured_models_with_one_default,
    the_offline_model_can_be_chosen_next_to_a_real_provider,
    without_a_provider_the_offline_model_answers_deterministically,
    concurrent_sends_to_one_conversation_each_get_their_own_answer,
    a_stream_that_stalls_after_some_text_times_out_with_the_attempt,
    every_reply_sees_the_whole_history_including_what_another_writer_stored,
);

fn usage() -> Value {
    json!({
        "prompt_tokens": MOCK_PROMPT_TOKENS,
        "completion_tokens": MOCK_COMPLETION_TOKENS,
        "total_tokens": MOCK_PROMPT_TOKENS + MOCK_COMPLETION_TOKENS
    })
}

/// The `usage` of a message, without an `estimated` flag if the server adds one.
fn usage_of(message: &Value) -> Value {
    let mut u = message["usage"].clone();
    if let Some(o) = u.as_object_mut() {
        o.remove("estimated");
    }
    u
}

async fn posting_a_message_returns_both_messages(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    app.provider.reply_with("Lisbon is lovely in spring.");

    let response = app.post_message(&user, &id, json!({ "content": "Where should I travel?" })).await;
    response.assert_status(StatusCode::CREATED).assert_json();

    let question = &response.body["user_message"];
    assert_message(question, &id, "user", "complete");
    assert_eq!(question["content"], "Where should I travel?");
    assert!(question["error"].is_null());

    let answer = &response.body["assistant_message"];
    assert_message(answer, &id, "assistant", "complete");
    assert_eq!(answer["content"], "Lisbon is lovely in spring.");
    assert_eq!(answer["model"], DEFAULT_MODEL);
    assert_eq!(usage_of(answer), usage());
    assert!(answer["error"].is_null());
    assert_ne!(question["id"], answer["id"]);

    let listed = app.messages(&user, &id, "").await;
    listed.assert_status(StatusCode::OK);
    assert_eq!(listed.items().len(), 2);
    assert_eq!(listed.items()[0], *question, "the stored question is what was answered");
    assert_eq!(listed.items()[1], *answer, "the stored reply is what was answered");
    assert_eq!(listed.body["has_more"], false);

    let c = app.conversation(&user, &id).await;
    assert_eq!(c.body["message_count"], 2);
    assert_eq!(assert_timestamp(&c.body["last_message_at"]), assert_timestamp(&answer["created_at"]));
}

async fn the_provider_gets_the_key_and_the_bare_model_name(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    app.say(&user, &id, "hello").await;

    let requests = app.provider.requests();
    assert_eq!(requests.len(), 1, "one provider call per message");
    let sent = &requests[0];
    assert_eq!(sent.authorization.as_deref(), Some(format!("Bearer {PROVIDER_KEY}").as_str()));
    assert_eq!(sent.model(), "gpt-4o-mini", "the provider gets the model without the `openai/` prefix");
    assert_eq!(sent.messages(), expected_turns(&[("user", "hello")]));
}

async fn the_provider_sees_the_system_prompt_and_the_history(app: TestApp) {
    let user = app.signup().await;
    let c = app.create_conversation(&user, json!({ "system_prompt": "You are a pirate." })).await;
    let id = c["id"].as_str().unwrap();

    app.say(&user, id, "Ahoy?").await;
    app.tick();
    app.say(&user, id, "Where is the treasure?").await;

    let first = &app.provider.requests()[0];
    assert_eq!(first.messages(), expected_turns(&[("system", "You are a pirate."), ("user", "Ahoy?")]));
    let second = app.provider.last_request();
    assert_eq!(
        second.messages(),
        expected_turns(&[
            ("system", "You are a pirate."),
            ("user", "Ahoy?"),
            ("assistant", &echo_of("Ahoy?")),
            ("user", "Where is the treasure?"),
        ])
    );

    // A changed system prompt applies to the next reply.
    app.patch(&format!("/api/conversations/{id}"))
        .bearer_auth(&user.token)
        .json(&json!({ "system_prompt": "You are a poet." }))
        .fetch()
        .await
        .assert_status(StatusCode::OK);
    app.say(&user, id, "Again").await;
    let third = app.provider.last_request();
    assert_eq!(third.messages()[0], ("system".to_owned(), "You are a poet.".to_owned()));
    assert_eq!(third.messages().len(), 6);

    // Without a system prompt, no system message is sent.
    let plain = app.new_conversation(&user).await;
    app.say(&user, &plain, "no prompt").await;
    assert_eq!(app.provider.last_request().messages(), expected_turns(&[("user", "no prompt")]));
}

async fn an_untitled_conversation_is_titled_from_its_first_message(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    let first = "Plan a weekend in Lisbon";
    app.say(&user, &id, first).await;

    let c = app.conversation(&user, &id).await;
    let title = c.body["title"].as_str().unwrap_or_else(|| panic!("the conversation got no title: {}", c.text));
    assert!(!title.trim().is_empty() && title.chars().count() <= 200, "title {title:?}");
    assert!(title.contains("Lisbon") || title.contains("Plan"), "the title {title:?} is not derived from {first:?}");

    // The second message does not rename it.
    app.say(&user, &id, "Actually, make it Porto").await;
    assert_eq!(app.conversation(&user, &id).await.body["title"], title);

    // A long first message gives a title of at most 200 characters.
    let long = app.new_conversation(&user).await;
    app.say(&user, &long, &"word ".repeat(2000)).await;
    let title = app.conversation(&user, &long).await.body["title"].as_str().unwrap().to_owned();
    assert!(!title.is_empty() && title.chars().count() <= 200, "title of {} characters", title.chars().count());

    // A given title is kept.
    let named = app.create_conversation(&user, json!({ "title": "Mine" })).await;
    let named_id = named["id"].as_str().unwrap();
    app.say(&user, named_id, "Plan a weekend in Rome").await;
    assert_eq!(app.conversation(&user, named_id).await.body["title"], "Mine");
}

async fn the_conversation_model_and_a_per_message_model_are_used(app: TestApp) {
    let user = app.signup().await;
    let c = app.create_conversation(&user, json!({ "model": "openai/gpt-4o" })).await;
    let id = c["id"].as_str().unwrap();

    let reply = app.say(&user, id, "which model?").await;
    assert_eq!(reply["assistant_message"]["model"], "openai/gpt-4o");
    assert_eq!(app.provider.last_request().model(), "gpt-4o");

    let response = app.post_message(&user, id, json!({ "content": "and now?", "model": "openai/o1-preview" })).await;
    response.assert_status(StatusCode::CREATED);
    assert_eq!(response.body["assistant_message"]["model"], "openai/o1-preview");
    assert_eq!(app.provider.last_request().model(), "o1-preview");

    let calls = app.provider.request_count();
    app.post_message(&user, id, json!({ "content": "x", "model": "anthropic/claude" }))
        .await
        .assert_invalid_with("unknown_model", "model");
    app.post_message(&user, id, json!({ "content": "x", "model": "no-slash" })).await.assert_invalid("model");
    assert_eq!(app.provider.request_count(), calls, "refused requests never reach the provider");
    assert_eq!(app.conversation(&user, id).await.body["message_count"], 4);
}

async fn message_content_is_validated_in_unicode_characters(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;

    // Exactly at the limit: 32,000 characters, 128,000 bytes.
    let at_limit = "🦀".repeat(32_000);
    let ok = app.post_message(&user, &id, json!({ "content": at_limit })).await;
    ok.assert_status(StatusCode::CREATED);
    assert_eq!(ok.body["user_message"]["content"].as_str().unwrap().chars().count(), 32_000);
    assert_eq!(app.provider.last_request().messages().last().unwrap().1, at_limit);

    let calls = app.provider.request_count();
    let over = app.post_message(&user, &id, json!({ "content": "🦀".repeat(32_001) })).await;
    over.assert_invalid_with("validation_error", "content");
    app.post_message(&user, &id, json!({ "content": "" })).await.assert_invalid("content");
    app.post_message(&user, &id, json!({})).await.assert_invalid("content");
    app.post_message(&user, &id, json!({ "content": 5 })).await.assert_invalid("content");
    app.post_message(&user, &id, json!({ "content": null })).await.assert_invalid("content");
    app.post_message(&user, &id, json!({ "content": ["hi"] })).await.assert_invalid("content");
    assert_eq!(app.provider.request_count(), calls);
    assert_eq!(app.conversation(&user, &id).await.body["message_count"], 2);
}

/// After a provider failure: the answer carries the stored question, and the
/// conversation holds it plus a `failed` assistant message with an error.
async fn assert_failure_kept_the_question(
    app: &TestApp,
    user: &crate::helpers::TestUser,
    id: &str,
    response: &ApiResponse,
    content: &str,
) {
    let question = &response.body["user_message"];
    assert_message(question, id, "user", "complete");
    assert_eq!(question["content"], content);

    let listed = app.messages(user, id, "").await;
    listed.assert_status(StatusCode::OK);
    let items = listed.items();
    assert_eq!(items[0]["id"], question["id"], "the question is stored: {}", listed.text);
    assert_eq!(items[0]["content"], content);
    assert_eq!(items.len(), 2, "the question and a failed reply: {}", listed.text);
    let failed = &items[1];
    assert_message(failed, id, "assistant", "failed");
    assert!(failed["error"].as_str().is_some_and(|e| !e.is_empty()), "a failed reply says why: {failed}");
    let c = app.conversation(user, id).await;
    assert_eq!(c.body["messages"].as_array().unwrap().len(), 2);
}

async fn a_failing_provider_answers_502_and_keeps_the_user_message(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    app.provider.fail_with(500);

    let response = app.post_message(&user, &id, json!({ "content": "are you there?" })).await;
    response.assert_error(StatusCode::BAD_GATEWAY, "provider_error");
    assert!(!response.text.contains(PROVIDER_KEY), "the provider key leaks: {}", response.text);
    assert_failure_kept_the_question(&app, &user, &id, &response, "are you there?").await;

    // The provider recovers; the conversation carries on.
    app.provider.reply_with("I am back.");
    let next = app.say(&user, &id, "now?").await;
    assert_eq!(next["assistant_message"]["content"], "I am back.");
}

async fn a_provider_refusing_the_key_answers_502(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    app.provider.fail_with(401);

    let response = app.post_message(&user, &id, json!({ "content": "hello?" })).await;
    response.assert_error(StatusCode::BAD_GATEWAY, "provider_error");
    assert!(!response.text.contains(PROVIDER_KEY), "the provider key leaks: {}", response.text);
    assert_failure_kept_the_question(&app, &user, &id, &response, "hello?").await;
    // Our own user is still logged in: a provider 401 is not a client 401.
    app.me(&user).await.assert_status(StatusCode::OK);

    let chat = app.chat(&user, json!({ "message": "hello?" })).await;
    chat.assert_error(StatusCode::BAD_GATEWAY, "provider_error");
}

async fn a_hung_provider_answers_504_and_keeps_the_user_message(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    app.provider.hang();

    let started = std::time::Instant::now();
    let response = app.post_message(&user, &id, json!({ "content": "slow?" })).await;
    response.assert_error(StatusCode::GATEWAY_TIMEOUT, "provider_timeout");
    assert!(started.elapsed() < std::time::Duration::from_secs(45), "took {:?}", started.elapsed());
    assert_failure_kept_the_question(&app, &user, &id, &response, "slow?").await;
}

async fn failed_replies_are_not_sent_to_the_provider_again(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    app.say(&user, &id, "one").await;
    app.tick();
    app.provider.fail_with(500);
    app.post_message(&user, &id, json!({ "content": "two" })).await.assert_status(StatusCode::BAD_GATEWAY);
    app.tick();
    app.provider.reply_with("fine");
    app.say(&user, &id, "three").await;

    assert_eq!(
        app.provider.last_request().messages(),
        expected_turns(&[("user", "one"), ("assistant", &echo_of("one")), ("user", "two"), ("user", "three")])
    );
    let listed = app.messages(&user, &id, "").await;
    let statuses: Vec<_> = listed.items().iter().map(|m| m["status"].as_str().unwrap().to_owned()).collect();
    assert_eq!(statuses, ["complete", "complete", "complete", "failed", "complete", "complete"]);
}

async fn chat_without_a_conversation_starts_one(app: TestApp) {
    let user = app.signup().await;
    app.provider.reply_with("Hi there!");

    let response = app.chat(&user, json!({ "message": "Hello bot" })).await;
    response.assert_status(StatusCode::OK).assert_json();
    let body = &response.body;
    assert_uuid(&body["conversation_id"]);
    assert_uuid(&body["message_id"]);
    assert_eq!(body["reply"], "Hi there!");
    assert_eq!(body["model"], DEFAULT_MODEL);
    assert_eq!(usage_of(body), usage());
    assert_timestamp(&body["created_at"]);

    let id = body["conversation_id"].as_str().unwrap();
    let c = app.conversation(&user, id).await;
    c.assert_status(StatusCode::OK);
    assert_conversation(&c.body);
    assert_eq!(c.body["message_count"], 2);
    let messages = c.body["messages"].as_array().unwrap();
    assert_eq!(turns(messages), expected_turns(&[("user", "Hello bot"), ("assistant", "Hi there!")]));
    assert_eq!(messages[1]["id"], body["message_id"], "message_id is the reply's id");
    assert_eq!(messages[1]["created_at"], body["created_at"]);

    let list = app.get("/api/conversations").bearer_auth(&user.token).fetch().await;
    assert_page(&list.body, 1, 20, 1);
}

async fn chat_continues_a_conversation(app: TestApp) {
    let user = app.signup().await;
    let first = app.chat(&user, json!({ "message": "My name is Ada." })).await;
    first.assert_status(StatusCode::OK);
    let id = first.str("conversation_id").to_owned();
    app.tick();

    let second = app.chat(&user, json!({ "message": "What is my name?", "conversation_id": id })).await;
    second.assert_status(StatusCode::OK);
    assert_eq!(second.body["conversation_id"], id.as_str());
    assert_eq!(second.body["reply"], echo_of("What is my name?"));
    assert_eq!(
        app.provider.last_request().messages(),
        expected_turns(&[
            ("user", "My name is Ada."),
            ("assistant", &echo_of("My name is Ada.")),
            ("user", "What is my name?"),
        ])
    );
    assert_eq!(app.conversation(&user, &id).await.body["message_count"], 4);

    let with_model =
        app.chat(&user, json!({ "message": "again", "conversation_id": id, "model": "openai/gpt-4o" })).await;
    with_model.assert_status(StatusCode::OK);
    assert_eq!(with_model.body["model"], "openai/gpt-4o");
    assert_eq!(app.provider.last_request().model(), "gpt-4o");

    app.chat(&user, json!({ "message": "lost", "conversation_id": "00000000-0000-4000-8000-000000000000" }))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    let list = app.get("/api/conversations").bearer_auth(&user.token).fetch().await;
    assert_eq!(list.body["total"], 1, "a 404 chat does not start a conversation: {}", list.text);
}

async fn chat_body_is_validated(app: TestApp) {
    let user = app.signup().await;
    app.chat(&user, json!({})).await.assert_invalid("message");
    app.chat(&user, json!({ "message": "" })).await.assert_invalid("message");
    app.chat(&user, json!({ "message": 1 })).await.assert_invalid("message");
    app.chat(&user, json!({ "message": "x".repeat(32_001) })).await.assert_invalid("message");
    app.chat(&user, json!({ "message": "hi", "model": "anthropic/claude" }))
        .await
        .assert_invalid_with("unknown_model", "model");
    app.chat(&user, json!({ "message": "hi", "conversation_id": "nope" })).await.assert_invalid("conversation_id");
    assert_eq!(app.provider.request_count(), 0);
    let list = app.get("/api/conversations").bearer_auth(&user.token).fetch().await;
    assert_eq!(list.body["total"], 0, "{}", list.text);
}

async fn history_lists_conversations_with_their_last_message(app: TestApp) {
    let user = app.signup().await;
    let empty = app.create_conversation(&user, json!({ "title": "Empty" })).await;
    app.tick();
    app.provider.reply_with("Paris.");
    let chatted = app.chat(&user, json!({ "message": "Capital of France?" })).await;
    let chatted_id = chatted.str("conversation_id").to_owned();

    let response = app.get("/api/history").bearer_auth(&user.token).fetch().await;
    response.assert_status(StatusCode::OK).assert_json();
    assert_page(&response.body, 1, 20, 2);
    let items = response.items();
    assert_eq!(items[0]["conversation_id"], chatted_id.as_str(), "newest activity first");
    assert_eq!(items[0]["last_message"], "Paris.");
    assert!(items[0]["title"].is_string(), "a chat gets a title: {}", items[0]);
    assert_timestamp(&items[0]["updated_at"]);
    assert_eq!(items[1]["conversation_id"], empty["id"]);
    assert_eq!(items[1]["title"], "Empty");
    assert!(items[1]["last_message"].is_null());
    assert_timestamp(&items[1]["updated_at"]);

    let paged = app.get("/api/history?page=2&per_page=1").bearer_auth(&user.token).fetch().await;
    paged.assert_status(StatusCode::OK);
    assert_page(&paged.body, 2, 1, 2);
    assert_eq!(paged.items()[0]["conversation_id"], empty["id"]);

    let stranger = app.signup().await;
    let theirs = app.get("/api/history").bearer_auth(&stranger.token).fetch().await;
    assert_page(&theirs.body, 1, 20, 0);
}

async fn models_lists_the_configured_models_with_one_default(app: TestApp) {
    let user = app.signup().await;
    let response = app.get("/api/models").bearer_auth(&user.token).fetch().await;
    response.assert_status(StatusCode::OK).assert_json();
    let items = response.items();
    for m in items {
        let id = m["id"].as_str().expect("model id");
        let (provider, name) = id.split_once('/').unwrap_or_else(|| panic!("{id} is not provider/model"));
        assert!(!name.is_empty());
        assert_eq!(m["provider"], provider, "{m}");
        assert!(m["default"].is_boolean(), "{m}");
    }
    let defaults: Vec<_> = items.iter().filter(|m| m["default"] == true).collect();
    assert_eq!(defaults.len(), 1, "exactly one default: {}", response.text);
    assert_eq!(defaults[0]["id"], DEFAULT_MODEL);
    assert_eq!(defaults[0]["provider"], "openai");
    assert!(
        items.iter().any(|m| m["provider"] == "offline"),
        "the offline provider is always there: {}",
        response.text
    );
    assert!(
        items.iter().all(|m| m["provider"] == "openai" || m["provider"] == "offline"),
        "only configured providers: {}",
        response.text
    );
}

fn offline_model(models: &ApiResponse) -> String {
    models
        .items()
        .iter()
        .find(|m| m["provider"] == "offline")
        .and_then(|m| m["id"].as_str())
        .expect("an offline model")
        .to_owned()
}

async fn the_offline_model_can_be_chosen_next_to_a_real_provider(app: TestApp) {
    let user = app.signup().await;
    let models = app.get("/api/models").bearer_auth(&user.token).fetch().await;
    let offline = offline_model(&models);

    let c = app.create_conversation(&user, json!({ "model": offline })).await;
    let reply = app.say(&user, c["id"].as_str().unwrap(), "hello offline").await;
    assert_eq!(reply["assistant_message"]["model"], offline.as_str());
    assert_eq!(reply["assistant_message"]["status"], "complete");
    assert!(!reply["assistant_message"]["content"].as_str().unwrap().is_empty());
    assert_eq!(app.provider.request_count(), 0, "the offline model never calls the real provider");
}

async fn without_a_provider_the_offline_model_answers_deterministically(mut app: TestApp) {
    app.restart_with(|s| {
        s.providers.openai_api_key = None;
        s.providers.default_model = None;
    })
    .await;
    let user = app.signup().await;

    let models = app.get("/api/models").bearer_auth(&user.token).fetch().await;
    models.assert_status(StatusCode::OK);
    let defaults: Vec<_> = models.items().iter().filter(|m| m["default"] == true).cloned().collect();
    assert_eq!(defaults.len(), 1, "{}", models.text);
    assert_eq!(defaults[0]["provider"], "offline");
    assert!(defaults[0]["id"].as_str().unwrap().starts_with("offline/"));
    assert!(models.items().iter().all(|m| m["provider"] != "openai"), "openai is not configured: {}", models.text);

    let first = app.chat(&user, json!({ "message": "Tell me something" })).await;
    first.assert_status(StatusCode::OK);
    assert!(first.str("model").starts_with("offline/"), "{}", first.text);
    assert!(!first.str("reply").is_empty());
    assert!(first.body["usage"].is_object(), "usage is reported (estimated if need be): {}", first.text);

    let second = app.chat(&user, json!({ "message": "Tell me something" })).await;
    second.assert_status(StatusCode::OK);
    assert_ne!(second.body["conversation_id"], first.body["conversation_id"]);
    assert_eq!(second.body["reply"], first.body["reply"], "same input, same reply");

    // The question comes before its instant answer.
    let c = app.conversation(&user, first.str("conversation_id")).await;
    let roles: Vec<_> = c.body["messages"].as_array().unwrap().iter().map(|m| m["role"].clone()).collect();
    assert_eq!(roles, vec![json!("user"), json!("assistant")]);

    app.post("/api/conversations")
        .bearer_auth(&user.token)
        .json(&json!({ "model": "openai/gpt-4o-mini" }))
        .fetch()
        .await
        .assert_invalid_with("unknown_model", "model");
    assert_eq!(app.provider.request_count(), 0);
}

/// Hardening #8.1: sends racing into one conversation. Each reply's context
/// ends at the message it answers, and the stored order of turns is the
/// order every context saw them in.
async fn concurrent_sends_to_one_conversation_each_get_their_own_answer(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    for round in 0..3 {
        let sends = (0..5).map(|i| {
            let (app, user, id) = (&app, &user, &id);
            async move {
                let question = format!("question {round}.{i}");
                let body = app.say(user, id, &question).await;
                (question, body)
            }
        });
        for (question, body) in futures::future::join_all(sends).await {
            assert_eq!(body["user_message"]["content"], question.as_str());
            assert_eq!(body["assistant_message"]["content"], echo_of(&question), "the reply to {question:?}");
        }
    }
    let stored = app.messages(&user, &id, "?limit=100").await;
    let stored = turns(stored.items());
    assert_eq!(stored.len(), 30);
    // Every question is followed by its own answer.
    for pair in stored.chunks(2) {
        assert_eq!(pair[0].0, "user");
        assert_eq!(pair[1], ("assistant".to_owned(), echo_of(&pair[0].1)), "stored order: {stored:?}");
    }
    // Each context is the stored history up to its own question, in the stored order.
    for request in app.provider.requests() {
        let seen: Vec<(String, String)> = request.messages();
        let asked = seen.last().expect("a context").clone();
        assert_eq!(asked.0, "user");
        let at = stored.iter().position(|t| *t == asked).expect("the question is stored");
        let before: Vec<&(String, String)> = stored[..=at].iter().filter(|t| seen.contains(t)).collect();
        assert_eq!(before.len(), seen.len(), "the context {seen:?} holds only turns stored before {asked:?}");
        assert!(before.iter().zip(&seen).all(|(a, b)| *a == b), "context order {seen:?} vs stored {stored:?}");
    }
}

/// Hardening #8.5: PALAVER_PROVIDER_TIMEOUT bounds the whole attempt, not
/// only the wait for its first token; the idle timeout is a second bound.
async fn a_stream_that_stalls_after_some_text_times_out_with_the_attempt(mut app: TestApp) {
    app.restart_with(|s| {
        s.providers.provider_timeout = 2;
        s.providers.provider_idle_timeout = 60;
    })
    .await;
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    app.provider.stream(
        crate::mock_llm::Script::words(2, std::time::Duration::from_millis(50))
            .ending(crate::mock_llm::StreamEnd::Hang),
    );
    let started = std::time::Instant::now();
    let response = app.post_message(&user, &id, json!({ "content": "then silence" })).await;
    response.assert_status(StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(response.body["code"], "provider_timeout");
    let waited = started.elapsed();
    assert!(waited < std::time::Duration::from_secs(20), "answered after {waited:?}, not within the attempt's 2 s");
    let reply = &response.body["assistant_message"];
    assert_eq!(reply["status"], "failed");
    assert!(reply["content"].as_str().unwrap().starts_with("wörd 0"), "the text so far is kept: {reply}");
}

/// The context a reply sees is the whole history up to its question, in
/// order — with the history kept between replies, also what was stored
/// since by someone else (another instance; here straight in the database),
/// and without the replies that failed.
async fn every_reply_sees_the_whole_history_including_what_another_writer_stored(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    let mut expected: Vec<(String, String)> = Vec::new();
    for i in 0..6 {
        let question = format!("question {i}");
        let sent = app.say(&user, &id, &question).await;
        expected.push(("user".into(), question));
        assert_eq!(app.provider.last_request().messages(), expected, "reply {i}");
        expected.push(("assistant".into(), sent["assistant_message"]["content"].as_str().unwrap().to_owned()));
    }
    // Another writer adds a user message with the next sequence number.
    app.database
        .execute(
            "INSERT INTO messages (id, conversation_id, role, content, status, usage_estimated, created_at, updated_at, seq) \
             SELECT $2, $1, 'user', 'written elsewhere', 'complete', 0, 1, 1, last_seq + 1 FROM conversations WHERE id = $1",
            &[&id, "00000000-0000-0000-0000-0000000e1se1"],
        )
        .await;
    app.database.execute("UPDATE conversations SET last_seq = last_seq + 1 WHERE id = $1", &[&id]).await;
    expected.push(("user".into(), "written elsewhere".into()));
    // A failed reply is not part of any later context.
    app.provider.then(crate::mock_llm::Fault::Status(400));
    app.post_message(&user, &id, json!({ "content": "this one fails" })).await.assert_status(StatusCode::BAD_GATEWAY);
    expected.push(("user".into(), "this one fails".into()));
    app.say(&user, &id, "last one").await;
    expected.push(("user".into(), "last one".into()));
    assert_eq!(app.provider.last_request().messages(), expected);
}
