//! SPEC §3 conversations: create, list (newest activity first, paged), get
//! with the latest messages, patch, delete, the message cursor, and "404 for
//! anything that is not yours".

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    ApiResponse, DEFAULT_MODEL, Fetch, TestApp, assert_conversation, assert_message, assert_page, db_tests,
    expected_turns, turns,
};
use crate::mock_llm::echo_of;

db_tests!(
    creating_a_conversation_returns_201_with_defaults,
    creating_a_conversation_keeps_the_given_fields,
    conversation_fields_are_validated,
    models_must_name_a_configured_provider,
    conversations_are_listed_newest_activity_first,
    the_conversation_list_is_paged,
    pagination_parameters_are_validated,
    a_conversation_comes_with_its_messages_oldest_first,
    a_conversation_shows_only_its_latest_50_messages,
    messages_are_paged_with_a_cursor,
    message_cursor_parameters_are_validated,
    conversations_can_be_patched,
    patches_are_validated,
    deleting_a_conversation_deletes_its_messages,
    other_users_conversations_are_404_everywhere,
    unknown_and_malformed_ids,
);

const UNKNOWN_ID: &str = "00000000-0000-4000-8000-000000000000";

async fn creating_a_conversation_returns_201_with_defaults(app: TestApp) {
    let user = app.signup().await;
    let response = app.post("/api/conversations").bearer_auth(&user.token).json(&json!({})).fetch().await;

    response.assert_status(StatusCode::CREATED).assert_json();
    let c = &response.body;
    assert_conversation(c);
    assert!(c["title"].is_null(), "{c}");
    assert!(c["model"].is_null(), "{c}");
    assert!(c["system_prompt"].is_null(), "{c}");
    assert_eq!(c["message_count"], 0);
    assert!(c["last_message_at"].is_null(), "{c}");

    let fetched = app.conversation(&user, c["id"].as_str().unwrap()).await;
    fetched.assert_status(StatusCode::OK);
    assert_eq!(fetched.body["id"], c["id"]);
    assert_eq!(fetched.body["messages"], json!([]));
}

async fn creating_a_conversation_keeps_the_given_fields(app: TestApp) {
    let user = app.signup().await;
    let c = app
        .create_conversation(
            &user,
            json!({ "title": "Trip to Lisbon 🇵🇹", "system_prompt": "You are a travel agent.", "model": "openai/gpt-4o" }),
        )
        .await;
    assert_conversation(&c);
    assert_eq!(c["title"], "Trip to Lisbon 🇵🇹");
    assert_eq!(c["system_prompt"], "You are a travel agent.");
    assert_eq!(c["model"], "openai/gpt-4o");

    let fetched = app.conversation(&user, c["id"].as_str().unwrap()).await;
    for field in ["title", "system_prompt", "model", "created_at"] {
        assert_eq!(fetched.body[field], c[field], "{field} as stored");
    }
}

async fn conversation_fields_are_validated(app: TestApp) {
    let user = app.signup().await;
    let create = |body: Value| {
        let request = app.post("/api/conversations").bearer_auth(&user.token).json(&body);
        async move { request.fetch().await }
    };

    // Lengths count characters: 200 two-byte characters is a fine title.
    create(json!({ "title": "é".repeat(200) })).await.assert_status(StatusCode::CREATED);
    create(json!({ "title": "é".repeat(201) })).await.assert_invalid_with("validation_error", "title");
    create(json!({ "system_prompt": "🦀".repeat(32_000) })).await.assert_status(StatusCode::CREATED);
    create(json!({ "system_prompt": "s".repeat(32_001) }))
        .await
        .assert_invalid_with("validation_error", "system_prompt");
    create(json!({ "title": 5 })).await.assert_invalid("title");
    create(json!({ "system_prompt": ["a"] })).await.assert_invalid("system_prompt");

    let list = app.get("/api/conversations").bearer_auth(&user.token).fetch().await;
    assert_eq!(list.body["total"], 2, "only the valid ones were created: {}", list.text);
}

async fn models_must_name_a_configured_provider(app: TestApp) {
    let user = app.signup().await;
    let create = |model: &str| {
        let request = app.post("/api/conversations").bearer_auth(&user.token).json(&json!({ "model": model }));
        async move { request.fetch().await }
    };

    for unconfigured in ["anthropic/claude-3-5-sonnet", "gemini/gemini-1.5-pro", "nosuch/model"] {
        create(unconfigured).await.assert_invalid_with("unknown_model", "model");
    }
    for malformed in ["gpt-4o", "", "/gpt-4o", "openai/"] {
        let response = create(malformed).await;
        assert_eq!(response.status, StatusCode::UNPROCESSABLE_ENTITY, "model {malformed:?}: {}", response.text);
        response.assert_invalid("model");
    }
    // Unknown model names of a configured provider are accepted (SPEC §0).
    let future = create("openai/gpt-7-preview").await;
    future.assert_status(StatusCode::CREATED);
    assert_eq!(future.body["model"], "openai/gpt-7-preview");
    create("offline/echo").await.assert_status(StatusCode::CREATED);
}

async fn conversations_are_listed_newest_activity_first(app: TestApp) {
    let user = app.signup().await;
    let a = app.create_conversation(&user, json!({ "title": "A" })).await["id"].clone();
    app.tick();
    let b = app.create_conversation(&user, json!({ "title": "B" })).await["id"].clone();
    app.tick();
    let c = app.create_conversation(&user, json!({ "title": "C" })).await["id"].clone();
    app.tick();

    let ids = |r: &ApiResponse| r.items().iter().map(|c| c["id"].clone()).collect::<Vec<_>>();
    let list = app.get("/api/conversations").bearer_auth(&user.token).fetch().await;
    list.assert_status(StatusCode::OK).assert_json();
    assert_page(&list.body, 1, 20, 3);
    assert_eq!(ids(&list), vec![c.clone(), b.clone(), a.clone()]);
    for item in list.items() {
        assert_conversation(item);
    }

    // A new message moves a conversation to the top.
    app.say(&user, a.as_str().unwrap(), "bump").await;
    let list = app.get("/api/conversations").bearer_auth(&user.token).fetch().await;
    assert_eq!(ids(&list), vec![a.clone(), c.clone(), b.clone()]);
    let top = &list.items()[0];
    assert_eq!(top["message_count"], 2);
    assert!(!top["last_message_at"].is_null());

    // Other users' conversations are not listed.
    let stranger = app.signup().await;
    let theirs = app.get("/api/conversations").bearer_auth(&stranger.token).fetch().await;
    assert_page(&theirs.body, 1, 20, 0);
}

async fn the_conversation_list_is_paged(app: TestApp) {
    let user = app.signup().await;
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(app.create_conversation(&user, json!({ "title": format!("c{i}") })).await["id"].clone());
        app.tick();
    }
    created.reverse(); // newest first

    let mut seen = Vec::new();
    for page in 1..=3 {
        let response =
            app.get(&format!("/api/conversations?page={page}&per_page=2")).bearer_auth(&user.token).fetch().await;
        response.assert_status(StatusCode::OK);
        assert_page(&response.body, page, 2, 5);
        seen.extend(response.items().iter().map(|c| c["id"].clone()));
    }
    assert_eq!(seen, created);

    let all = app.get("/api/conversations?per_page=100").bearer_auth(&user.token).fetch().await;
    all.assert_status(StatusCode::OK);
    assert_page(&all.body, 1, 100, 5);
}

async fn pagination_parameters_are_validated(app: TestApp) {
    let user = app.signup().await;
    for path in ["/api/conversations", "/api/history"] {
        for query in [
            "page=0",
            "page=-1",
            "per_page=0",
            "per_page=101",
            "per_page=-5",
            "page=abc",
            "per_page=ten",
            "page=1.5",
            "per_page=99999999999999999999",
            "page=99999999999999999999",
        ] {
            let response = app.get(&format!("{path}?{query}")).bearer_auth(&user.token).fetch().await;
            assert_eq!(response.status, StatusCode::UNPROCESSABLE_ENTITY, "{path}?{query}: {}", response.text);
            let field = query.split('=').next().unwrap();
            response.assert_invalid(field);
        }
    }
}

async fn a_conversation_comes_with_its_messages_oldest_first(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    app.say(&user, &id, "first question").await;
    app.tick();
    app.say(&user, &id, "second question").await;

    let response = app.conversation(&user, &id).await;
    response.assert_status(StatusCode::OK).assert_json();
    let c = &response.body;
    assert_conversation(c);
    assert_eq!(c["message_count"], 4);
    assert!(!c["last_message_at"].is_null());
    let messages = c["messages"].as_array().expect("messages");
    assert_eq!(
        turns(messages),
        expected_turns(&[
            ("user", "first question"),
            ("assistant", &echo_of("first question")),
            ("user", "second question"),
            ("assistant", &echo_of("second question")),
        ])
    );
    for m in messages {
        assert_message(m, &id, m["role"].as_str().unwrap(), "complete");
    }
    assert_eq!(messages[1]["model"], DEFAULT_MODEL);
}

/// Posts `exchanges` questions, a second apart, returning the user messages' contents.
async fn fill(app: &TestApp, user: &crate::helpers::TestUser, id: &str, exchanges: usize) -> Vec<String> {
    let mut questions = Vec::new();
    for i in 0..exchanges {
        let q = format!("question {i:02}");
        app.say(user, id, &q).await;
        app.tick();
        questions.push(q);
    }
    questions
}

async fn a_conversation_shows_only_its_latest_50_messages(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    fill(&app, &user, &id, 26).await; // 52 messages

    let response = app.conversation(&user, &id).await;
    response.assert_status(StatusCode::OK);
    assert_eq!(response.body["message_count"], 52);
    let messages = response.body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 50);
    // The first exchange (question 00 and its answer) is left out.
    assert_eq!(messages[0]["content"], "question 01");
    assert_eq!(messages[49]["content"], echo_of("question 25"));
}

async fn messages_are_paged_with_a_cursor(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    fill(&app, &user, &id, 26).await;

    let latest = app.messages(&user, &id, "").await;
    latest.assert_status(StatusCode::OK).assert_json();
    assert_eq!(latest.body["has_more"], true);
    let items = latest.items();
    assert_eq!(items.len(), 50, "the default limit is 50");
    assert_eq!(items[0]["content"], "question 01");
    assert_eq!(items[49]["content"], echo_of("question 25"));
    for m in items {
        assert_message(m, &id, m["role"].as_str().unwrap(), "complete");
    }

    let before = items[0]["id"].as_str().unwrap();
    let older = app.messages(&user, &id, &format!("?before={before}")).await;
    older.assert_status(StatusCode::OK);
    assert_eq!(older.body["has_more"], false);
    assert_eq!(
        turns(older.items()),
        expected_turns(&[("user", "question 00"), ("assistant", &echo_of("question 00"))])
    );

    // Walk back four at a time and get all 52, in order, without overlap.
    let mut all: Vec<Value> = Vec::new();
    let mut query = "?limit=4".to_owned();
    loop {
        let page = app.messages(&user, &id, &query).await;
        page.assert_status(StatusCode::OK);
        let mut items = page.items().clone();
        assert!(items.len() <= 4);
        items.extend(all);
        all = items;
        if page.body["has_more"] == false {
            break;
        }
        query = format!("?limit=4&before={}", all[0]["id"].as_str().unwrap());
    }
    assert_eq!(all.len(), 52);
    for (i, pair) in all.chunks(2).enumerate() {
        assert_eq!(pair[0]["content"], format!("question {i:02}"));
        assert_eq!(pair[1]["content"], echo_of(&format!("question {i:02}")));
    }

    let exact = app.messages(&user, &id, "?limit=100").await;
    assert_eq!(exact.items().len(), 52);
    assert_eq!(exact.body["has_more"], false);
}

async fn message_cursor_parameters_are_validated(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    let other = app.new_conversation(&user).await;
    let elsewhere = app.say(&user, &other, "elsewhere").await;
    let elsewhere_id = elsewhere["user_message"]["id"].as_str().unwrap();
    app.say(&user, &id, "here").await;

    for query in ["?limit=0", "?limit=101", "?limit=-1", "?limit=abc", "?limit=99999999999999999999"] {
        let response = app.messages(&user, &id, query).await;
        assert_eq!(response.status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {}", response.text);
        response.assert_invalid("limit");
    }
    for before in [UNKNOWN_ID, elsewhere_id, "not-a-uuid"] {
        let response = app.messages(&user, &id, &format!("?before={before}")).await;
        assert_eq!(response.status, StatusCode::UNPROCESSABLE_ENTITY, "before={before}: {}", response.text);
        response.assert_invalid_with("invalid_cursor", "before");
    }
    let ok = app.messages(&user, &id, "?limit=1").await;
    ok.assert_status(StatusCode::OK);
    assert_eq!(ok.items().len(), 1);
    assert_eq!(ok.items()[0]["role"], "assistant");
    assert_eq!(ok.body["has_more"], true);
}

async fn conversations_can_be_patched(app: TestApp) {
    let user = app.signup().await;
    let c = app.create_conversation(&user, json!({ "title": "Old", "system_prompt": "Be brief." })).await;
    let id = c["id"].as_str().unwrap();
    app.tick();

    let response = app
        .patch(&format!("/api/conversations/{id}"))
        .bearer_auth(&user.token)
        .json(&json!({ "title": "New title", "model": "offline/echo" }))
        .fetch()
        .await;
    response.assert_status(StatusCode::OK).assert_json();
    let patched = &response.body;
    assert_conversation(patched);
    assert_eq!(patched["title"], "New title");
    assert_eq!(patched["model"], "offline/echo");
    assert_eq!(patched["system_prompt"], "Be brief.", "fields not in the patch stay");
    assert_eq!(patched["created_at"], c["created_at"]);

    let prompt = app
        .patch(&format!("/api/conversations/{id}"))
        .bearer_auth(&user.token)
        .json(&json!({ "system_prompt": "Be verbose." }))
        .fetch()
        .await;
    prompt.assert_status(StatusCode::OK);
    assert_eq!(prompt.body["system_prompt"], "Be verbose.");
    assert_eq!(prompt.body["title"], "New title");

    let fetched = app.conversation(&user, id).await;
    assert_eq!(fetched.body["title"], "New title");
    assert_eq!(fetched.body["system_prompt"], "Be verbose.");
    assert_eq!(fetched.body["model"], "offline/echo");
}

async fn patches_are_validated(app: TestApp) {
    let user = app.signup().await;
    let id = app.create_conversation(&user, json!({ "title": "Keep" })).await["id"].as_str().unwrap().to_owned();
    let patch = |body: Value| {
        let request = app.patch(&format!("/api/conversations/{id}")).bearer_auth(&user.token).json(&body);
        async move { request.fetch().await }
    };
    patch(json!({ "title": "t".repeat(201) })).await.assert_invalid("title");
    patch(json!({ "system_prompt": "s".repeat(32_001) })).await.assert_invalid("system_prompt");
    patch(json!({ "model": "anthropic/claude" })).await.assert_invalid_with("unknown_model", "model");
    patch(json!({ "title": 3 })).await.assert_invalid("title");
    assert_eq!(app.conversation(&user, &id).await.body["title"], "Keep");
}

async fn deleting_a_conversation_deletes_its_messages(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    let keep = app.new_conversation(&user).await;
    app.say(&user, &id, "doomed").await;

    let response = app.delete(&format!("/api/conversations/{id}")).bearer_auth(&user.token).fetch().await;
    response.assert_status(StatusCode::NO_CONTENT);
    assert!(response.text.is_empty());

    app.conversation(&user, &id).await.assert_error(StatusCode::NOT_FOUND, "not_found");
    app.messages(&user, &id, "").await.assert_error(StatusCode::NOT_FOUND, "not_found");
    app.delete(&format!("/api/conversations/{id}"))
        .bearer_auth(&user.token)
        .fetch()
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    app.post_message(&user, &id, json!({ "content": "anyone?" }))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    let list = app.get("/api/conversations").bearer_auth(&user.token).fetch().await;
    assert_page(&list.body, 1, 20, 1);
    assert_eq!(list.items()[0]["id"], keep.as_str());
    assert_eq!(app.database.scalar("SELECT COUNT(*) FROM messages WHERE conversation_id = $1", &[&id]).await, 0);
}

async fn other_users_conversations_are_404_everywhere(app: TestApp) {
    let alice = app.signup().await;
    let mallory = app.signup().await;
    let c = app.create_conversation(&alice, json!({ "title": "Private", "system_prompt": "secret" })).await;
    let id = c["id"].as_str().unwrap();
    app.say(&alice, id, "my secret").await;
    let calls_before = app.provider.request_count();

    let not_found = |r: ApiResponse, what: &str| {
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{what}: {}", r.text);
        r.assert_error(StatusCode::NOT_FOUND, "not_found");
        assert!(!r.text.contains("secret") && !r.text.contains("Private"), "{what} leaks: {}", r.text);
    };
    not_found(app.conversation(&mallory, id).await, "GET");
    not_found(
        app.patch(&format!("/api/conversations/{id}"))
            .bearer_auth(&mallory.token)
            .json(&json!({ "title": "pwned" }))
            .fetch()
            .await,
        "PATCH",
    );
    not_found(app.delete(&format!("/api/conversations/{id}")).bearer_auth(&mallory.token).fetch().await, "DELETE");
    not_found(app.messages(&mallory, id, "").await, "GET messages");
    not_found(app.post_message(&mallory, id, json!({ "content": "hi" })).await, "POST messages");
    not_found(app.chat(&mallory, json!({ "message": "hi", "conversation_id": id })).await, "POST /api/chat");

    // The answers are the same as for a conversation that does not exist.
    let missing = app.conversation(&mallory, UNKNOWN_ID).await;
    let theirs = app.conversation(&mallory, id).await;
    assert_eq!(missing.body, theirs.body);

    // Alice's conversation is untouched and the provider was not called.
    let mine = app.conversation(&alice, id).await;
    mine.assert_status(StatusCode::OK);
    assert_eq!(mine.body["title"], "Private");
    assert_eq!(mine.body["message_count"], 2);
    assert_eq!(app.provider.request_count(), calls_before);
}

async fn unknown_and_malformed_ids(app: TestApp) {
    let user = app.signup().await;
    app.conversation(&user, UNKNOWN_ID).await.assert_error(StatusCode::NOT_FOUND, "not_found");
    app.messages(&user, UNKNOWN_ID, "").await.assert_error(StatusCode::NOT_FOUND, "not_found");
    // Malformed ids are refused as invalid input once the caller is known.
    for bad in ["not-a-uuid", "12345", "00000000-0000-4000-8000-00000000000g", "%00"] {
        let routes = [
            ("GET", format!("/api/conversations/{bad}")),
            ("PATCH", format!("/api/conversations/{bad}")),
            ("DELETE", format!("/api/conversations/{bad}")),
            ("GET", format!("/api/conversations/{bad}/messages")),
            ("POST", format!("/api/conversations/{bad}/messages")),
        ];
        for (method, path) in routes {
            let response = app
                .request(method.parse().unwrap(), &path)
                .bearer_auth(&user.token)
                .json(&json!({ "content": "hello", "title": "t" }))
                .fetch()
                .await;
            assert_eq!(response.status, StatusCode::UNPROCESSABLE_ENTITY, "{method} {path}: {}", response.text);
            response.assert_invalid("id");
        }
    }
    assert_eq!(app.provider.request_count(), 0);
}
