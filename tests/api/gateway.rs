//! The OpenAI-compatible gateway: API keys (SPEC §2) and `/v1` (SPEC §4) —
//! keys' lifecycle, chat completions JSON and streamed, tool calls through
//! the OpenAI, Anthropic and Gemini wire formats, usage, and errors in
//! OpenAI's shape.

use std::time::Duration;

use palaver::config::Secret;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    helpers::{DEFAULT_MODEL, Fetch, TestApp, TestUser, db_tests},
    mock_llm::{Fault, REPLY, Script, ToolReply},
};

db_tests!(
    keys_are_created_listed_and_revoked,
    key_names_expiry_and_models_are_validated,
    a_key_authenticates_api_routes,
    revoked_expired_and_disabled_keys_are_refused,
    models_are_listed_in_openai_shape,
    a_key_limited_to_models_is_refused_others,
    non_stream_completion_answers_text_and_usage,
    streamed_completion_sends_chunks_usage_and_done,
    usage_is_recorded_per_key_and_model,
    tool_calls_survive_every_wire_format,
    bad_requests_get_openai_errors,
    provider_failures_map_to_gateway_statuses,
    responses_answer_text_and_stream_events,
    responses_carry_tool_calls_as_function_call_items,
    a_non_stream_answer_that_broke_off_is_started_over;
    sqlite_only: a_slow_start_is_pinged_then_streamed, every_stream_keeps_alive_between_slow_tokens,
);

impl TestApp {
    async fn chat_with_key(&self, key: &str, body: Value) -> crate::helpers::ApiResponse {
        self.post("/api/chat").bearer_auth(key).json(&body).fetch().await
    }
}

pub(crate) async fn create_key(app: &TestApp, user: &TestUser, body: Value) -> Value {
    let r = app.post("/api/keys").bearer_auth(&user.token).json(&body).fetch().await;
    r.assert_status(StatusCode::CREATED);
    r.body.clone()
}

async fn key_for(app: &TestApp) -> (TestUser, String) {
    let user = app.signup().await;
    let key = create_key(app, &user, json!({ "name": "test" })).await;
    (user, key["key"].as_str().unwrap().to_owned())
}

async fn complete(app: &TestApp, key: &str, body: Value) -> crate::helpers::ApiResponse {
    app.post("/v1/chat/completions").bearer_auth(key).json(&body).fetch().await
}

pub(crate) fn hello(stream: bool) -> Value {
    json!({ "model": DEFAULT_MODEL, "messages": [{ "role": "user", "content": "hello" }], "stream": stream })
}

/// The `data:` payloads of an SSE answer, `[DONE]` included.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|frame| frame.lines().find_map(|l| l.strip_prefix("data: ")).map(str::to_owned))
        .collect()
}

async fn keys_are_created_listed_and_revoked(app: TestApp) {
    let user = app.signup().await;
    let created = create_key(&app, &user, json!({ "name": "laptop" })).await;
    let key = created["key"].as_str().unwrap();
    assert!(key.starts_with("pk_") && key.len() >= 3 + 43, "{key}");
    assert_eq!(created["name"], "laptop");
    assert!(key.starts_with(created["prefix"].as_str().unwrap()));
    assert_eq!(created["expires_at"], Value::Null);
    assert_eq!(created["models"], Value::Null);
    // Only a hash is stored.
    assert_eq!(app.database.scalar("SELECT COUNT(*) FROM api_keys WHERE key_hash = $1", &[key]).await, 0);

    let list = app.get("/api/keys").bearer_auth(&user.token).fetch().await;
    list.assert_status(StatusCode::OK);
    let items = list.items();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], created["id"]);
    assert!(items[0].get("key").is_none(), "a listed key shows no secret");
    assert_eq!(items[0]["last_used_at"], Value::Null);

    complete(&app, key, hello(false)).await.assert_status(StatusCode::OK);
    let list = app.get("/api/keys").bearer_auth(&user.token).fetch().await;
    assert!(list.items()[0]["last_used_at"].is_string(), "{}", list.text);

    // Someone else's key is not found.
    let other = app.signup().await;
    let id = created["id"].as_str().unwrap();
    app.delete(&format!("/api/keys/{id}")).bearer_auth(&other.token).fetch().await.assert_status(StatusCode::NOT_FOUND);
    app.delete(&format!("/api/keys/{id}")).bearer_auth(&user.token).fetch().await.assert_status(StatusCode::NO_CONTENT);
    complete(&app, key, hello(false)).await.assert_status(StatusCode::UNAUTHORIZED);
    assert!(app.get("/api/keys").bearer_auth(&user.token).fetch().await.items().is_empty());
}

async fn key_names_expiry_and_models_are_validated(app: TestApp) {
    let user = app.signup().await;
    for (body, field) in [
        (json!({}), "name"),
        (json!({ "name": "" }), "name"),
        (json!({ "name": "x".repeat(101) }), "name"),
        (json!({ "name": "k", "expires_at": "tomorrow" }), "expires_at"),
        (json!({ "name": "k", "expires_at": "2000-01-01T00:00:00Z" }), "expires_at"),
        (json!({ "name": "k", "models": [] }), "models"),
        (json!({ "name": "k", "models": ["nope/x"] }), "models"),
    ] {
        let r = app.post("/api/keys").bearer_auth(&user.token).json(&body).fetch().await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {}", r.text);
        assert!(r.text.contains(field), "{body}: {}", r.text);
    }
    app.post("/api/keys").json(&json!({ "name": "k" })).fetch().await.assert_unauthorized();
    let ok = create_key(&app, &user, json!({ "name": "x".repeat(100), "expires_at": "2099-01-01T00:00:00Z" })).await;
    assert_eq!(ok["expires_at"], "2099-01-01T00:00:00Z");
}

async fn a_key_authenticates_api_routes(app: TestApp) {
    let (user, key) = key_for(&app).await;
    let me = app.get("/api/users/me").bearer_auth(&key).fetch().await;
    me.assert_status(StatusCode::OK);
    assert_eq!(me.body["id"], user.id.as_str());
    app.get("/api/users/me").bearer_auth("pk_not-a-real-key").fetch().await.assert_unauthorized();
}

async fn revoked_expired_and_disabled_keys_are_refused(app: TestApp) {
    let user = app.signup().await;
    let soon = palaver::clock::rfc3339(palaver::clock::Clock::now_ms(&app.clock) + 60_000);
    let expiring = create_key(&app, &user, json!({ "name": "soon", "expires_at": soon })).await;
    let key = expiring["key"].as_str().unwrap();
    complete(&app, key, hello(false)).await.assert_status(StatusCode::OK);
    app.advance(Duration::from_secs(61));
    let r = complete(&app, key, hello(false)).await;
    r.assert_status(StatusCode::UNAUTHORIZED);
    assert_eq!(r.body["error"]["code"], "invalid_api_key");
    assert_eq!(r.header("x-should-retry"), Some("false"));

    // A disabled owner's keys stop at once.
    let (owner, key) = key_for(&app).await;
    let admin = app.signup_admin().await;
    let r = app
        .patch(&format!("/api/admin/users/{}", owner.id))
        .bearer_auth(&admin.token)
        .json(&json!({ "disabled": true }))
        .fetch()
        .await;
    r.assert_status(StatusCode::OK);
    complete(&app, &key, hello(false)).await.assert_status(StatusCode::UNAUTHORIZED);

    // A deleted owner's keys too.
    let (owner, key) = key_for(&app).await;
    let r = app
        .delete("/api/users/me")
        .bearer_auth(&owner.token)
        .json(&json!({ "password": crate::helpers::PASSWORD }))
        .fetch()
        .await;
    r.assert_status(StatusCode::NO_CONTENT);
    complete(&app, &key, hello(false)).await.assert_status(StatusCode::UNAUTHORIZED);
}

async fn models_are_listed_in_openai_shape(app: TestApp) {
    let (user, key) = key_for(&app).await;
    for credential in [key.as_str(), user.token.as_str()] {
        let r = app.get("/v1/models").bearer_auth(credential).fetch().await;
        r.assert_status(StatusCode::OK);
        assert_eq!(r.body["object"], "list");
        let data = r.body["data"].as_array().unwrap();
        let m = data.iter().find(|m| m["id"] == DEFAULT_MODEL).unwrap_or_else(|| panic!("{}", r.text));
        assert_eq!(m["object"], "model");
        assert!(m["created"].is_i64());
        assert_eq!(m["owned_by"], "openai");
    }
    let r = app.get("/v1/models").fetch().await;
    r.assert_status(StatusCode::UNAUTHORIZED);
    assert_eq!(r.body["error"]["code"], "invalid_api_key");
    assert_eq!(r.body["error"]["type"], "invalid_request_error");
}

async fn a_key_limited_to_models_is_refused_others(app: TestApp) {
    let user = app.signup().await;
    let created = create_key(&app, &user, json!({ "name": "one", "models": [DEFAULT_MODEL] })).await;
    let key = created["key"].as_str().unwrap();
    complete(&app, key, hello(false)).await.assert_status(StatusCode::OK);
    let r = complete(
        &app,
        key,
        json!({ "model": "offline/palaver-offline", "messages": [{ "role": "user", "content": "x" }] }),
    )
    .await;
    r.assert_status(StatusCode::FORBIDDEN);
    assert_eq!(r.body["error"]["code"], "model_not_allowed");
    // The same limit holds on /api.
    let r = app.chat_with_key(key, json!({ "message": "x", "model": "offline/palaver-offline" })).await;
    r.assert_error(StatusCode::FORBIDDEN, "model_not_allowed");
    app.chat_with_key(key, json!({ "message": "x" })).await.assert_status(StatusCode::OK);
    let listed = app.get("/v1/models").bearer_auth(key).fetch().await;
    let ids: Vec<&str> = listed.body["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [DEFAULT_MODEL]);
}

async fn non_stream_completion_answers_text_and_usage(app: TestApp) {
    let (_, key) = key_for(&app).await;
    app.provider.reply_with(REPLY);
    let body = json!({
        "model": DEFAULT_MODEL,
        "messages": [
            { "role": "developer", "content": "Be brief." },
            { "role": "user", "content": [{ "type": "text", "text": "hi" }] },
        ],
        "temperature": 0.5, "top_p": 0.9, "max_completion_tokens": 50, "stop": "END", "seed": 7,
        "stream_options": { "include_usage": true },
        "user": "end-user-1",
        "some_unknown_field": { "sent": "by LangChain" },
    });
    let r = complete(&app, &key, body).await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.body["object"], "chat.completion");
    assert!(r.body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(r.body["model"], DEFAULT_MODEL);
    let choice = &r.body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], REPLY);
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(r.body["usage"]["prompt_tokens"], crate::mock_llm::MOCK_PROMPT_TOKENS);
    assert_eq!(r.body["usage"]["completion_tokens"], crate::mock_llm::MOCK_COMPLETION_TOKENS);
    assert_eq!(
        r.body["usage"]["total_tokens"],
        crate::mock_llm::MOCK_PROMPT_TOKENS + crate::mock_llm::MOCK_COMPLETION_TOKENS
    );
    let sent = app.provider.last_request().body;
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert_eq!(sent["messages"][0], json!({ "role": "system", "content": "Be brief." }));
    assert_eq!(sent["messages"][1]["content"], "hi");
    assert_eq!(sent["temperature"], 0.5);
    assert_eq!(sent["top_p"], 0.9);
    assert_eq!(sent["max_tokens"], 50);
    assert_eq!(sent["stop"], json!(["END"]));
    assert_eq!(sent["seed"], 7);
    assert_eq!(sent["user"], "end-user-1");
    assert!(sent.get("some_unknown_field").is_none());
}

async fn streamed_completion_sends_chunks_usage_and_done(app: TestApp) {
    let (_, key) = key_for(&app).await;
    app.provider.reply_with(REPLY);
    let mut body = hello(true);
    body["stream_options"] = json!({ "include_usage": true });
    let r = complete(&app, &key, body).await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.header("x-accel-buffering"), Some("no"));
    let frames = sse_data(&r.text);
    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"), "{}", r.text);
    let chunks: Vec<Value> = frames[..frames.len() - 1].iter().map(|f| serde_json::from_str(f).unwrap()).collect();
    let ids: std::collections::HashSet<&str> = chunks.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "one id for every chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(text, REPLY);
    let finishes: Vec<&Value> =
        chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finishes, [&json!("stop")]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], crate::mock_llm::MOCK_PROMPT_TOKENS);

    // Without include_usage there is no usage chunk.
    let r = complete(&app, &key, hello(true)).await;
    assert!(!r.text.contains("\"usage\""), "{}", r.text);
}

async fn usage_is_recorded_per_key_and_model(app: TestApp) {
    let (user, key) = key_for(&app).await;
    let created = app.get("/api/keys").bearer_auth(&user.token).fetch().await;
    let key_id = created.items()[0]["id"].as_str().unwrap().to_owned();
    for stream in [false, true] {
        complete(&app, &key, hello(stream)).await.assert_status(StatusCode::OK);
    }
    let mut requests = 0;
    for _ in 0..50 {
        requests = app
            .database
            .scalar(
                "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) FROM api_usage WHERE key_id = $1",
                &[key_id.as_str()],
            )
            .await;
        if requests == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(requests, 2, "usage is flushed in batches within seconds");
    let prompt = app
        .database
        .scalar(
            "SELECT CAST(SUM(prompt_tokens) AS BIGINT) FROM api_usage WHERE key_id = $1 AND model = $2",
            &[&key_id, DEFAULT_MODEL],
        )
        .await;
    assert_eq!(prompt, 2 * crate::mock_llm::MOCK_PROMPT_TOKENS);
    // The owner's totals count it too.
    let total = app
        .database
        .scalar(
            "SELECT CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT) FROM user_usage WHERE user_id = $1",
            &[&user.id],
        )
        .await;
    assert!(total >= 2 * crate::mock_llm::MOCK_PROMPT_TOKENS, "{total}");
}

/// Two parallel calls, with quotes, a backslash and unicode in the arguments.
const CALLS: [(&str, &str); 2] =
    [("get_weather", r#"{"city":"Zürich \"Altstadt\"","unit":"c"}"#), ("lookup", r#"{"path":"C:\\tmp","emoji":"🌍"}"#)];

fn tool_request(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "stream": stream,
        "messages": [
            { "role": "user", "content": "weather?" },
            { "role": "assistant", "content": null, "tool_calls": [
                { "id": "call_prev", "type": "function", "function": { "name": "get_weather", "arguments": "{\"city\":\"Bern\"}" } }
            ]},
            { "role": "tool", "tool_call_id": "call_prev", "content": "{\"temp\":3}" },
            { "role": "user", "content": "and now?" },
        ],
        "tools": [
            { "type": "function", "function": { "name": "get_weather", "description": "Weather", "parameters": { "type": "object", "properties": { "city": { "type": "string" } } } } },
            { "type": "function", "function": { "name": "lookup", "parameters": { "type": "object" } } },
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": true,
    })
}

/// The calls of a non-stream answer or reassembled from stream chunks by index.
fn calls_of(r: &crate::helpers::ApiResponse, stream: bool) -> (Vec<(String, String, String)>, String) {
    if !stream {
        let choice = &r.body["choices"][0];
        let calls = choice["message"]["tool_calls"].as_array().unwrap_or_else(|| panic!("{}", r.text));
        let calls = calls
            .iter()
            .map(|c| {
                assert_eq!(c["type"], "function");
                (
                    c["id"].as_str().unwrap().to_owned(),
                    c["function"]["name"].as_str().unwrap().to_owned(),
                    c["function"]["arguments"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        return (calls, choice["finish_reason"].as_str().unwrap().to_owned());
    }
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = String::new();
    for frame in sse_data(&r.text).iter().filter(|f| *f != "[DONE]") {
        let chunk: Value = serde_json::from_str(frame).unwrap();
        let choice = &chunk["choices"][0];
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_owned();
        }
        for d in choice["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = d["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                let id = d["id"].as_str().unwrap_or_else(|| panic!("the first piece carries the id: {d}"));
                let name = d["function"]["name"].as_str().expect("the first piece carries the name");
                calls.push((id.to_owned(), name.to_owned(), String::new()));
            } else {
                assert!(d.get("id").is_none_or(|id| id.as_str() == Some(calls[i].0.as_str())), "ids are stable");
            }
            calls[i].2.push_str(d["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    (calls, finish)
}

async fn tool_calls_survive_every_wire_format(mut app: TestApp) {
    let root = app.provider.base_url.trim_end_matches("/v1").to_owned();
    app.restart_with(|s| {
        s.providers.anthropic_api_key = Some(Secret("sk-ant-test-fake".into()));
        s.providers.anthropic_base_url = root.clone();
        s.providers.gemini_api_key = Some(Secret("gemini-test-fake".into()));
        s.providers.gemini_base_url = root.clone();
    })
    .await;
    let (_, key) = key_for(&app).await;
    app.provider.call_tools(ToolReply::calls(&CALLS));
    for model in [DEFAULT_MODEL, "anthropic/claude-3-5-haiku-latest", "gemini/gemini-1.5-flash"] {
        for stream in [false, true] {
            let r = complete(&app, &key, tool_request(model, stream)).await;
            assert_eq!(r.status, StatusCode::OK, "{model} stream={stream}: {}", r.text);
            let (calls, finish) = calls_of(&r, stream);
            assert_eq!(finish, "tool_calls", "{model} stream={stream}");
            assert_eq!(calls.len(), 2, "{model} stream={stream}: {}", r.text);
            for ((id, name, args), (want_name, want_args)) in calls.iter().zip(CALLS) {
                assert!(!id.is_empty());
                assert_eq!(name, want_name, "{model} stream={stream}");
                let got: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{model}: {args}: {e}"));
                assert_eq!(got, serde_json::from_str::<Value>(want_args).unwrap(), "{model} stream={stream}");
            }
            assert_ne!(calls[0].0, calls[1].0);
            // The earlier call and its result reached the provider in its format.
            let sent = app.provider.last_request().body.to_string();
            assert!(sent.contains("Bern") && sent.contains("temp"), "{model}: {sent}");
            assert!(sent.contains("get_weather") && sent.contains("lookup"), "{model}: tools sent: {sent}");
        }
    }
}

async fn bad_requests_get_openai_errors(app: TestApp) {
    let (_, key) = key_for(&app).await;
    let cases = [
        (json!({ "messages": [{ "role": "user", "content": "x" }] }), StatusCode::BAD_REQUEST, "model"),
        (json!({ "model": DEFAULT_MODEL }), StatusCode::BAD_REQUEST, "messages"),
        (json!({ "model": DEFAULT_MODEL, "messages": [] }), StatusCode::BAD_REQUEST, "messages"),
        (
            json!({ "model": DEFAULT_MODEL, "messages": [{ "role": "wizard", "content": "x" }] }),
            StatusCode::BAD_REQUEST,
            "messages[0].role",
        ),
        (
            json!({ "model": DEFAULT_MODEL, "messages": [{ "role": "tool", "content": "x" }] }),
            StatusCode::BAD_REQUEST,
            "messages[0].tool_call_id",
        ),
        (
            json!({ "model": DEFAULT_MODEL, "messages": [{ "role": "user", "content": [{ "type": "image_url" }] }] }),
            StatusCode::BAD_REQUEST,
            "messages[0].content[0]",
        ),
        (
            json!({ "model": DEFAULT_MODEL, "messages": [{ "role": "user", "content": "x" }], "temperature": 9 }),
            StatusCode::BAD_REQUEST,
            "temperature",
        ),
        (
            json!({ "model": DEFAULT_MODEL, "messages": [{ "role": "user", "content": "x" }], "tools": [{ "type": "function", "function": { "name": "bad name!" } }] }),
            StatusCode::BAD_REQUEST,
            "tools[0].function.name",
        ),
        (
            json!({ "model": "nope/model", "messages": [{ "role": "user", "content": "x" }] }),
            StatusCode::NOT_FOUND,
            "model",
        ),
    ];
    for (body, status, param) in cases {
        let r = complete(&app, &key, body.clone()).await;
        assert_eq!(r.status, status, "{body}: {}", r.text);
        assert_eq!(r.body["error"]["param"], param, "{body}: {}", r.text);
        assert!(r.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(r.header("x-should-retry"), Some("false"));
    }
    let r =
        complete(&app, &key, json!({ "model": "nope/model", "messages": [{ "role": "user", "content": "x" }] })).await;
    assert_eq!(r.body["error"]["code"], "model_not_found");
    let r = app.post("/v1/chat/completions").bearer_auth(&key).body("{not json").fetch().await;
    r.assert_status(StatusCode::BAD_REQUEST);
    assert_eq!(r.body["error"]["type"], "invalid_request_error");
    let r = app.post("/v1/chat/completions").bearer_auth("pk_wrong").json(&hello(false)).fetch().await;
    r.assert_status(StatusCode::UNAUTHORIZED);
    assert_eq!(r.body["error"]["code"], "invalid_api_key");
}

async fn provider_failures_map_to_gateway_statuses(app: TestApp) {
    let (_, key) = key_for(&app).await;
    app.provider.fail_with(500);
    let r = complete(&app, &key, hello(false)).await;
    r.assert_status(StatusCode::BAD_GATEWAY);
    assert_eq!(r.body["error"]["type"], "api_error");
    assert_eq!(r.header("x-should-retry"), Some("true"));
    let r = complete(&app, &key, hello(true)).await;
    r.assert_status(StatusCode::BAD_GATEWAY);
    app.provider.hang();
    let r = complete(&app, &key, hello(false)).await;
    r.assert_status(StatusCode::GATEWAY_TIMEOUT);
}

async fn a_non_stream_answer_that_broke_off_is_started_over(app: TestApp) {
    let (_, key) = key_for(&app).await;
    let script = Script::words(6, Duration::ZERO);
    app.provider.stream(script.clone());
    app.provider.then(Fault::DropAfter(2));
    let r = complete(&app, &key, hello(false)).await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.body["choices"][0]["message"]["content"], script.text(), "{}", r.text);
    assert_eq!(app.provider.request_count(), 2);

    app.provider.then(Fault::DropAfter(1));
    let body = json!({ "model": DEFAULT_MODEL, "input": "hello" });
    let r = app.post("/v1/responses").bearer_auth(&key).json(&body).fetch().await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.body["output"][0]["content"][0]["text"], script.text(), "{}", r.text);
    assert_eq!(app.provider.request_count(), 4);

    // Streamed, the text already went out: a break ends the stream.
    app.provider.then(Fault::DropAfter(2));
    let r = complete(&app, &key, hello(true)).await;
    assert!(r.text.contains("\"error\""), "{}", r.text);
    assert_eq!(app.provider.request_count(), 5);
}

async fn responses_answer_text_and_stream_events(app: TestApp) {
    let (_, key) = key_for(&app).await;
    app.provider.reply_with(REPLY);
    let body = json!({ "model": DEFAULT_MODEL, "instructions": "Be brief.", "input": "hello" });
    let r = app.post("/v1/responses").bearer_auth(&key).json(&body).fetch().await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.body["object"], "response");
    assert_eq!(r.body["status"], "completed");
    assert_eq!(r.body["output"][0]["type"], "message");
    assert_eq!(r.body["output"][0]["content"][0]["text"], REPLY);
    assert_eq!(r.body["usage"]["input_tokens"], crate::mock_llm::MOCK_PROMPT_TOKENS);
    let sent = app.provider.last_request().body;
    assert_eq!(sent["messages"][0], json!({ "role": "system", "content": "Be brief." }));

    let mut body = body;
    body["stream"] = json!(true);
    let r = app.post("/v1/responses").bearer_auth(&key).json(&body).fetch().await;
    r.assert_status(StatusCode::OK);
    let events: Vec<Value> = sse_data(&r.text).iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"response.created"));
    assert_eq!(kinds.last(), Some(&"response.completed"), "{kinds:?}");
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, REPLY);
    let seqs: Vec<u64> = events.iter().map(|e| e["sequence_number"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let done = events.last().unwrap();
    assert_eq!(done["response"]["output"][0]["content"][0]["text"], REPLY);

    let r = app
        .post("/v1/responses")
        .bearer_auth(&key)
        .json(&json!({ "model": DEFAULT_MODEL, "input": "x", "previous_response_id": "resp_1" }))
        .fetch()
        .await;
    r.assert_status(StatusCode::BAD_REQUEST);
    assert_eq!(r.body["error"]["param"], "previous_response_id");
}

async fn responses_carry_tool_calls_as_function_call_items(app: TestApp) {
    let (_, key) = key_for(&app).await;
    app.provider.call_tools(ToolReply::calls(&CALLS));
    let body = json!({
        "model": DEFAULT_MODEL,
        "input": [
            { "role": "user", "content": "weather?" },
            { "type": "function_call", "call_id": "call_prev", "name": "get_weather", "arguments": "{\"city\":\"Bern\"}" },
            { "type": "function_call_output", "call_id": "call_prev", "output": "{\"temp\":3}" },
        ],
        "tools": [
            { "type": "function", "name": "get_weather", "parameters": { "type": "object" } },
            { "type": "function", "name": "lookup", "parameters": { "type": "object" } },
        ],
    });
    for stream in [false, true] {
        let mut body = body.clone();
        body["stream"] = json!(stream);
        let r = app.post("/v1/responses").bearer_auth(&key).json(&body).fetch().await;
        r.assert_status(StatusCode::OK);
        let response = if stream {
            let events: Vec<Value> = sse_data(&r.text).iter().map(|d| serde_json::from_str(d).unwrap()).collect();
            events.last().unwrap()["response"].clone()
        } else {
            r.body.clone()
        };
        let calls: Vec<&Value> =
            response["output"].as_array().unwrap().iter().filter(|i| i["type"] == "function_call").collect();
        assert_eq!(calls.len(), 2, "stream={stream}: {response}");
        for (item, (name, args)) in calls.iter().zip(CALLS) {
            assert_eq!(item["name"], name);
            assert!(item["call_id"].as_str().is_some_and(|c| !c.is_empty()));
            let got: Value = serde_json::from_str(item["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(got, serde_json::from_str::<Value>(args).unwrap());
        }
        let sent = app.provider.last_request().body;
        assert_eq!(sent["messages"][1]["tool_calls"][0]["id"], "call_prev");
        assert_eq!(sent["messages"][2]["tool_call_id"], "call_prev");
    }
}

/// Two `palaver` processes on one PostgreSQL: a key revoked, or expired, on
/// one instance is refused by the other at once.
#[tokio::test(flavor = "multi_thread")]
async fn keys_are_revoked_and_expire_on_every_instance() {
    let Some(mut a) = crate::helpers::spawn_process_app(crate::helpers::Db::Postgres).await else { return };
    let b = a.sibling().await;
    let user = a.signup().await;
    let on = |address: &str, key: &str| {
        reqwest::Client::new().post(format!("{address}/v1/chat/completions")).bearer_auth(key).json(&hello(false))
    };
    let revoked = create_key(&a, &user, json!({ "name": "revoked" })).await;
    let key = revoked["key"].as_str().unwrap();
    on(&b.address, key).fetch().await.assert_status(StatusCode::OK);
    let id = revoked["id"].as_str().unwrap();
    a.delete(&format!("/api/keys/{id}")).bearer_auth(&user.token).fetch().await.assert_status(StatusCode::NO_CONTENT);
    on(&b.address, key).fetch().await.assert_status(StatusCode::UNAUTHORIZED);
    on(&a.address, key).fetch().await.assert_status(StatusCode::UNAUTHORIZED);

    // The processes run on the real clock: a key that expires in 3 seconds.
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let soon = palaver::clock::rfc3339(now_ms + 3_000);
    let expiring = create_key(&a, &user, json!({ "name": "soon", "expires_at": soon })).await;
    let key = expiring["key"].as_str().unwrap();
    on(&a.address, key).fetch().await.assert_status(StatusCode::OK);
    on(&b.address, key).fetch().await.assert_status(StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    for address in [&a.address, &b.address] {
        let r = on(address, key).fetch().await;
        r.assert_status(StatusCode::UNAUTHORIZED);
        assert_eq!(r.body["error"]["code"], "invalid_api_key");
    }
}

/// A provider slow to start: the stream commits to 200 and pings, then answers.
async fn a_slow_start_is_pinged_then_streamed(mut app: TestApp) {
    app.restart_with(|s| s.providers.provider_idle_timeout = 20).await;
    let (_, key) = key_for(&app).await;
    app.provider.stream(Script { start: Duration::from_millis(3_000), ..Script::pieces() });
    let r = complete(&app, &key, hello(true)).await;
    r.assert_status(StatusCode::OK);
    assert!(r.text.starts_with(": ping\n\n"), "{}", r.text);
    assert!(r.text.trim_end().ends_with("data: [DONE]"), "{}", r.text);
}

/// `PALAVER_SSE_KEEPALIVE_SECS` apart, every event stream with nothing to
/// send sends a comment: `/v1` chat completions and responses, and `/api`'s
/// own streams, mid-answer and not only before the first token.
async fn every_stream_keeps_alive_between_slow_tokens(mut app: TestApp) {
    app.restart_with(|s| {
        s.server.sse_keepalive_secs = 1;
        s.providers.provider_idle_timeout = 20;
    })
    .await;
    let (user, key) = key_for(&app).await;
    let slow = || Script::words(2, Duration::from_millis(2_600));
    let after_first_token = |text: &str, comment: &str| {
        let start = text.find("data: ").expect("a data frame");
        text[start..].contains(comment)
    };

    app.provider.stream(slow());
    let r = complete(&app, &key, hello(true)).await;
    r.assert_status(StatusCode::OK);
    assert!(after_first_token(&r.text, "\n: ping\n\n"), "{}", r.text);
    assert!(r.text.trim_end().ends_with("data: [DONE]"), "{}", r.text);

    app.provider.stream(slow());
    let body = json!({ "model": DEFAULT_MODEL, "input": "hello", "stream": true });
    let r = app.post("/v1/responses").bearer_auth(&key).json(&body).fetch().await;
    r.assert_status(StatusCode::OK);
    assert!(after_first_token(&r.text, "\n: ping\n\n"), "{}", r.text);
    assert!(r.text.contains("response.completed"), "{}", r.text);

    app.provider.stream(slow());
    let conversation = app.new_conversation(&user).await;
    let r = app
        .post(&format!("/api/conversations/{conversation}/messages"))
        .bearer_auth(&user.token)
        .header("Accept", "text/event-stream")
        .json(&json!({ "content": "hello" }))
        .fetch()
        .await;
    r.assert_status(StatusCode::OK);
    let delta = r.text.find("event: delta").expect("a delta");
    assert!(r.text[delta..].contains("\n:\n\n") || r.text[delta..].contains("\n: \n\n"), "{}", r.text);
}
