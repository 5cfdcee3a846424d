//! Hostile and careless input (SPEC §1): malformed JSON, wrong content types,
//! oversized bodies, absurd numbers, wrong shapes, NUL bytes — every one gets
//! a 4xx in the `{detail, code}` format, never a 5xx — and a burst of ten
//! thousand concurrent requests that must all be answered.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use reqwest::{StatusCode, header::HeaderValue};
use serde_json::json;

use crate::helpers::{ApiResponse, Fetch, PASSWORD, TestApp, TestUser, db_tests};

db_tests!(
    malformed_json_is_400,
    non_json_content_types_are_415,
    json_with_parameters_in_the_content_type_is_accepted,
    empty_bodies_are_client_errors,
    bodies_over_one_mebibyte_are_413,
    streamed_bodies_over_one_mebibyte_are_413,
    hostile_json_gets_4xx_never_5xx,
    hostile_query_strings_and_paths_get_4xx_never_5xx,
    hostile_headers_get_4xx_never_5xx,
    nul_bytes_in_strings_are_refused,
    only_json_objects_are_bodies,
    validation_errors_never_name_rust_types;
    sqlite_only: ten_thousand_concurrent_requests_are_all_answered,
);

const JSON: &str = "application/json";

/// POSTs (or PATCHes) a raw body with a content type, as `user` if given.
async fn send_raw(
    app: &TestApp,
    method: &str,
    path: &str,
    user: Option<&TestUser>,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> ApiResponse {
    let mut request = app.request(method.parse().unwrap(), path).body(body);
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    if let Some(u) = user {
        request = request.bearer_auth(&u.token);
    }
    request.fetch().await
}

async fn malformed_json_is_400(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    let targets = [
        ("POST", "/api/auth/register".to_owned(), None),
        ("POST", "/api/auth/login".to_owned(), None),
        ("POST", "/api/auth/refresh".to_owned(), None),
        ("POST", "/api/conversations".to_owned(), Some(&user)),
        ("PATCH", format!("/api/conversations/{id}"), Some(&user)),
        ("POST", format!("/api/conversations/{id}/messages"), Some(&user)),
        ("POST", "/api/chat".to_owned(), Some(&user)),
        ("PATCH", "/api/users/me".to_owned(), Some(&user)),
    ];
    for (method, path, caller) in &targets {
        for body in ["{", "{\"content\": }", "{'single': 'quotes'}", "{\"a\":1,}", "nul\u{0}l"] {
            let response = send_raw(&app, method, path, *caller, Some(JSON), body).await;
            assert_eq!(response.status, StatusCode::BAD_REQUEST, "{method} {path} with {body:?}: {}", response.text);
            response.assert_error(StatusCode::BAD_REQUEST, "malformed_json");
        }
    }
    assert_eq!(app.provider.request_count(), 0);
}

async fn non_json_content_types_are_415(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    let body =
        json!({ "email": "x@example.com", "password": PASSWORD, "content": "hi", "title": "t", "message": "hi" })
            .to_string();
    let targets = [
        ("POST", "/api/auth/register".to_owned(), None),
        ("POST", "/api/conversations".to_owned(), Some(&user)),
        ("POST", format!("/api/conversations/{id}/messages"), Some(&user)),
        ("POST", "/api/chat".to_owned(), Some(&user)),
        ("PATCH", "/api/users/me".to_owned(), Some(&user)),
    ];
    for (method, path, caller) in &targets {
        for ct in
            ["text/plain", "application/xml", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
        {
            let response = send_raw(&app, method, path, *caller, Some(ct), body.clone()).await;
            assert_eq!(
                response.status,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{method} {path} as {ct}: {}",
                response.text
            );
            response.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
        }
        // A JSON body without any content type is not JSON either.
        let response = send_raw(&app, method, path, *caller, None, body.clone()).await;
        response.assert_client_error();
    }
    // Login speaks JSON and forms, nothing else.
    send_raw(&app, "POST", "/api/auth/login", None, Some("text/plain"), body.clone())
        .await
        .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");

    let list = app.get("/api/conversations").bearer_auth(&user.token).fetch().await;
    assert_eq!(list.body["total"], 1, "nothing was created: {}", list.text);
}

async fn json_with_parameters_in_the_content_type_is_accepted(app: TestApp) {
    let user = app.signup().await;
    let body = json!({ "title": "charset" }).to_string();
    for ct in ["application/json; charset=utf-8", "application/json;charset=UTF-8", "Application/JSON"] {
        let response = send_raw(&app, "POST", "/api/conversations", Some(&user), Some(ct), body.clone()).await;
        assert_eq!(response.status, StatusCode::CREATED, "{ct}: {}", response.text);
    }
}

async fn empty_bodies_are_client_errors(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    let targets = [
        ("POST", "/api/auth/register".to_owned(), None),
        ("POST", "/api/auth/refresh".to_owned(), None),
        ("POST", format!("/api/conversations/{id}/messages"), Some(&user)),
        ("POST", "/api/chat".to_owned(), Some(&user)),
    ];
    for (method, path, caller) in &targets {
        for ct in [Some(JSON), None] {
            let response = send_raw(&app, method, path, *caller, ct, "").await;
            assert!(
                [StatusCode::BAD_REQUEST, StatusCode::UNPROCESSABLE_ENTITY].contains(&response.status),
                "{method} {path} with an empty body ({ct:?}): {} {}",
                response.status,
                response.text
            );
            response.assert_error_shape();
        }
    }
    assert_eq!(app.provider.request_count(), 0);
}

fn big_json(bytes: usize) -> String {
    json!({ "content": "a".repeat(bytes), "email": "big@example.com", "password": PASSWORD }).to_string()
}

async fn bodies_over_one_mebibyte_are_413(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    let body = big_json(1024 * 1024 + 1024);
    let targets = [
        ("/api/auth/register".to_owned(), None),
        ("/api/auth/login".to_owned(), None),
        ("/api/conversations".to_owned(), Some(&user)),
        (format!("/api/conversations/{id}/messages"), Some(&user)),
    ];
    for (path, caller) in &targets {
        let response = send_raw(&app, "POST", path, *caller, Some(JSON), body.clone()).await;
        assert_eq!(response.status, StatusCode::PAYLOAD_TOO_LARGE, "{path}: {}", response.text);
        response.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    }
    // Just under the limit is read (and then judged on its content).
    let under = send_raw(
        &app,
        "POST",
        &format!("/api/conversations/{id}/messages"),
        Some(&user),
        Some(JSON),
        big_json(1024 * 1000),
    )
    .await;
    under.assert_invalid("content");
    assert_eq!(app.provider.request_count(), 0);
}

async fn streamed_bodies_over_one_mebibyte_are_413(app: TestApp) {
    let user = app.signup().await;
    // Chunked, without Content-Length: the server cannot know the size up front.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        std::iter::once(Ok(b"{\"title\": \"".to_vec())).chain((0..40).map(|_| Ok(vec![b'a'; 32 * 1024]))).collect();
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let response = send_raw(&app, "POST", "/api/conversations", Some(&user), Some(JSON), body).await;
    response.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    let list = app.get("/api/conversations").bearer_auth(&user.token).fetch().await;
    assert_eq!(list.body["total"], 0);
}

/// Bodies no endpoint can accept, aimed at its main string `field`; the
/// `null` cases only when that field is required.
pub fn hostile_bodies(field: &str, required: bool) -> Vec<(String, Vec<u8>)> {
    let with = |value: &str| format!("{{\"{field}\": {value}}}").into_bytes();
    let mut invalid_utf8 = format!("{{\"{field}\": \"").into_bytes();
    invalid_utf8.extend_from_slice(b"\xff\xfe\xfd\"}");
    let mut bodies = vec![
        (format!("{field} is a number"), with("5")),
        (format!("{field} is true"), with("true")),
        (format!("{field} is an object"), with(r#"{"$ne": null}"#)),
        (format!("{field} is an array"), with(r#"["a", "b"]"#)),
        (format!("{field} is a huge number"), with("1e999")),
        (format!("{field} is a 5000-digit integer"), with(&"9".repeat(5000))),
        (
            format!("{field} is 100,000 nested arrays"),
            with(&format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000))),
        ),
        (
            format!("{field} is 100,000 nested objects"),
            with(&format!("{}1{}", "{\"a\":".repeat(100_000), "}".repeat(100_000))),
        ),
        (format!("{field} holds a lone surrogate"), with(r#""\ud800""#)),
        (format!("{field} holds invalid UTF-8"), invalid_utf8),
        ("an empty array".to_owned(), b"[]".to_vec()),
        ("an array of objects".to_owned(), format!("[{{\"{field}\": \"hi\"}}]").into_bytes()),
        ("a bare string".to_owned(), b"\"hello\"".to_vec()),
        ("a bare number".to_owned(), b"42".to_vec()),
        ("a bare null".to_owned(), b"null".to_vec()),
        ("a BOM and an unclosed object".to_owned(), b"\xef\xbb\xbf{\"a\": \"hi\"".to_vec()),
    ];
    if required {
        bodies.push((format!("{field} is null"), with("null")));
        bodies.push((format!("{field} is missing"), b"{}".to_vec()));
    }
    bodies
}

async fn hostile_json_gets_4xx_never_5xx(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    let messages = format!("/api/conversations/{id}/messages");
    let targets = [
        ("POST", messages.as_str(), "content", true, true),
        ("POST", "/api/chat", "message", true, true),
        ("POST", "/api/conversations", "title", false, true),
        ("PATCH", "/api/users/me", "display_name", false, true),
        ("POST", "/api/auth/register", "password", true, false),
        ("POST", "/api/auth/login", "password", true, false),
        ("POST", "/api/auth/refresh", "refresh_token", true, false),
    ];
    let mut problems = Vec::new();
    for (method, path, field, required, authed) in targets {
        for (what, body) in hostile_bodies(field, required) {
            let caller = if authed { Some(&user) } else { None };
            let response = send_raw(&app, method, path, caller, Some(JSON), body).await;
            problems.extend(response.problem_unless_client_error(&format!("{method} {path} with {what}")));
        }
    }
    assert!(problems.is_empty(), "hostile JSON not refused with a 4xx:\n{}", problems.join("\n"));
    for body in [json!({ "content": "hi", "model": { "a": 1 } }), json!({ "content": "hi", "model": 7 })] {
        app.post_message(&user, &id, body).await.assert_invalid("model");
    }
    app.me(&user).await.assert_status(StatusCode::OK);
    assert_eq!(app.conversation(&user, &id).await.body["message_count"], 0);
    assert_eq!(app.provider.request_count(), 0);
}

async fn hostile_query_strings_and_paths_get_4xx_never_5xx(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    let long_id = "a".repeat(10_000);
    let paths = [
        "/api/conversations?per_page=99999999999999999999".to_owned(),
        "/api/conversations?page=-9223372036854775808".to_owned(),
        "/api/conversations?page=9223372036854775807&per_page=100".to_owned(),
        "/api/conversations?page=abc".to_owned(),
        "/api/conversations?page=%00".to_owned(),
        "/api/conversations?per_page=1e3".to_owned(),
        "/api/conversations?page=%F0%28%8C%BC".to_owned(),
        "/api/history?per_page=-1".to_owned(),
        "/api/admin/users?page=0".to_owned(),
        format!("/api/conversations/{id}/messages?limit=-1"),
        format!("/api/conversations/{id}/messages?limit=18446744073709551616"),
        format!("/api/conversations/{id}/messages?before=%00"),
        format!("/api/conversations/{id}/messages?before={long_id}"),
        "/api/conversations/%00".to_owned(),
        "/api/conversations/%FF%FE".to_owned(),
        format!("/api/conversations/{long_id}"),
        "/api/conversations/..%2F..%2Fetc%2Fpasswd".to_owned(),
        "/api/auth/sessions/%00".to_owned(),
    ];
    let mut problems = Vec::new();
    for path in &paths {
        let response = app.get(path).bearer_auth(&user.token).fetch().await;
        if path.contains("page=9223372036854775807") {
            // A far page is a valid (empty) page or a validation error; never an overflow.
            if response.status != StatusCode::OK && response.status != StatusCode::UNPROCESSABLE_ENTITY {
                problems.push(format!("GET {path}: {} {}", response.status, response.text));
            }
            continue;
        }
        problems.extend(response.problem_unless_client_error(&format!("GET {path}")));
    }
    let delete = app.delete("/api/auth/sessions/%00").bearer_auth(&user.token).fetch().await;
    problems.extend(delete.problem_unless_client_error("DELETE /api/auth/sessions/%00"));
    assert!(problems.is_empty(), "hostile URLs not refused with a 4xx:\n{}", problems.join("\n"));
}

async fn hostile_headers_get_4xx_never_5xx(app: TestApp) {
    let user = app.signup().await;
    let cases: Vec<(&str, HeaderValue)> = vec![
        ("a long token", HeaderValue::from_str(&format!("Bearer {}", "x".repeat(8_000))).unwrap()),
        ("non-UTF-8 bytes", HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap()),
        ("an empty bearer", HeaderValue::from_static("Bearer ")),
        ("only the scheme", HeaderValue::from_static("Bearer")),
        ("three dots", HeaderValue::from_static("Bearer a.b.c")),
        ("an unsigned JWT", HeaderValue::from_static("Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.")),
    ];
    for (what, value) in cases {
        let response = app.get("/api/users/me").header("authorization", value).fetch().await;
        assert_eq!(response.status, StatusCode::UNAUTHORIZED, "{what}: {}", response.text);
        response.assert_unauthorized();
    }
    let cookies = [
        format!("palaver_session={}", "y".repeat(4_000)),
        "palaver_session=".to_owned(),
        "palaver_session=%00; palaver_csrf=%00".to_owned(),
        format!("palaver_session=\"{}\"", user.session_cookie),
    ];
    for cookie in cookies {
        let response = app.get("/api/users/me").header("cookie", &cookie).fetch().await;
        assert!(response.status.is_client_error(), "cookie {cookie:.40}: {}", response.text);
        response.assert_error_shape();
    }
    let csrf = app
        .post("/api/conversations")
        .header("cookie", user.cookie_header())
        .header("x-csrf-token", HeaderValue::from_bytes(b"\xff").unwrap())
        .json(&json!({}))
        .fetch()
        .await;
    csrf.assert_error(StatusCode::FORBIDDEN, "csrf_failed");
    let request_id = app.get("/health").header("x-request-id", "x".repeat(2_000)).fetch().await;
    assert_eq!(request_id.status, StatusCode::OK);
}

async fn nul_bytes_in_strings_are_refused(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    let nul = "before\u{0}after";
    let authed = [
        ("POST", "/api/conversations".to_owned(), json!({ "title": nul })),
        ("POST", "/api/conversations".to_owned(), json!({ "system_prompt": nul })),
        ("POST", "/api/conversations".to_owned(), json!({ "model": "openai/gpt\u{0}4" })),
        ("PATCH", format!("/api/conversations/{id}"), json!({ "title": nul })),
        ("POST", format!("/api/conversations/{id}/messages"), json!({ "content": nul })),
        ("POST", "/api/chat".to_owned(), json!({ "message": nul })),
        ("PATCH", "/api/users/me".to_owned(), json!({ "display_name": nul })),
    ];
    let mut problems = Vec::new();
    for (method, path, body) in &authed {
        let response = app.request(method.parse().unwrap(), path).bearer_auth(&user.token).json(body).fetch().await;
        problems.extend(response.problem_unless_client_error(&format!("{method} {path} {body}")));
    }
    let anonymous = [
        ("/api/auth/register", json!({ "username": "nul\u{0}user", "password": PASSWORD })),
        ("/api/auth/register", json!({ "email": "nul\u{0}@example.com", "password": PASSWORD })),
        ("/api/auth/register", json!({ "username": "nul_display", "display_name": nul, "password": PASSWORD })),
        ("/api/auth/login", json!({ "login": nul, "password": nul })),
        ("/api/auth/login", json!({ "login": format!("{}\u{0}", user.email), "password": PASSWORD })),
        ("/api/auth/refresh", json!({ "refresh_token": nul })),
    ];
    for (path, body) in &anonymous {
        let response = app.post(path).json(body).fetch().await;
        problems.extend(response.problem_unless_client_error(&format!("POST {path} {body}")));
    }
    let form = app.post("/api/auth/login").form(&[("username", nul), ("password", nul)]).fetch().await;
    problems.extend(form.problem_unless_client_error("form login with NUL"));
    assert!(problems.is_empty(), "NUL bytes not refused with a 4xx:\n{}", problems.join("\n"));

    // Nothing was stored, and the account still works.
    let list = app.get("/api/conversations").bearer_auth(&user.token).fetch().await;
    assert_eq!(list.body["total"], 1, "{}", list.text);
    assert_eq!(app.conversation(&user, &id).await.body["message_count"], 0);
    assert_eq!(app.me(&user).await.body["display_name"], "Test User");
    assert_eq!(app.provider.request_count(), 0);
}

/// How many connections this process can hold open at once: it plays both
/// client and server, so each connection costs two file descriptors.
fn connection_budget() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|n| n.parse::<usize>().ok())
        })
        .unwrap_or(1024);
    (soft.saturating_sub(2_000) / 2).clamp(64, 5_000)
}

async fn ten_thousand_concurrent_requests_are_all_answered(app: TestApp) {
    const REQUESTS: usize = 10_000;
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let connections = Arc::new(tokio::sync::Semaphore::new(connection_budget()));

    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let (client, connections, token) = (client.clone(), connections.clone(), user.token.clone());
            let (url, authed) = match i % 4 {
                0 => (app.url("/health"), false),
                1 => (app.url("/api/users/me"), true),
                2 => (app.url("/api/conversations?per_page=5"), true),
                _ => (app.url(&format!("/api/conversations/{conversation}")), true),
            };
            tokio::spawn(async move {
                let _slot = connections.acquire_owned().await.unwrap();
                let mut request = client.get(&url);
                if authed {
                    request = request.bearer_auth(token);
                }
                match request.send().await {
                    Ok(response) => {
                        let status = response.status();
                        let body = response.text().await.map_err(|e| format!("{url}: reading: {e}"))?;
                        Ok((status, body))
                    }
                    Err(e) => Err(format!("{url}: {e:?}")),
                }
            })
        })
        .collect();
    let results = futures::future::join_all(tasks).await;
    let elapsed = started.elapsed();

    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for result in results {
        match result.expect("request task panicked") {
            Ok((status, body)) => {
                *statuses.entry(status.as_u16()).or_default() += 1;
                if status.is_server_error() && failures.len() < 5 {
                    failures.push(format!("{status}: {body}"));
                }
            }
            Err(e) => {
                *statuses.entry(0).or_default() += 1;
                if failures.len() < 5 {
                    failures.push(e);
                }
            }
        }
    }
    eprintln!("{REQUESTS} requests in {elapsed:?}: {statuses:?} (0 = no answer)");
    assert!(!statuses.contains_key(&0), "requests went unanswered: {statuses:?}; e.g. {failures:#?}");
    assert!(statuses.keys().all(|s| *s < 500), "5xx answers: {statuses:?}; e.g. {failures:#?}");
    assert!(statuses.keys().all(|s| *s == 200 || *s == 429), "unexpected answers: {statuses:?}");
    assert!(statuses.get(&200).copied().unwrap_or(0) > REQUESTS / 2, "most requests succeed: {statuses:?}");

    app.get("/health").fetch().await.assert_status(StatusCode::OK);
    app.me(&user).await.assert_status(StatusCode::OK);
}

/// Issue #8 (item 14): serde fills a struct from a JSON array too, so
/// `[null, null]` used to be a PATCH clearing the title and system prompt.
async fn only_json_objects_are_bodies(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.create_conversation(&user, json!({ "title": "Kept", "system_prompt": "Be brief." })).await;
    let id = conversation["id"].as_str().unwrap();
    let targets = [
        ("PATCH", format!("/api/conversations/{id}"), Some(&user)),
        ("POST", "/api/conversations".to_owned(), Some(&user)),
        ("POST", format!("/api/conversations/{id}/messages"), Some(&user)),
        ("POST", "/api/auth/login".to_owned(), None),
        ("POST", "/api/auth/register".to_owned(), None),
        ("POST", "/api/support/sessions".to_owned(), None),
    ];
    for (method, path, caller) in &targets {
        for body in ["[null,null]", "[\"t\", \"s\", null]", "[]", "7", "\"x\"", "null"] {
            let response = send_raw(&app, method, path, *caller, Some(JSON), body).await;
            response.assert_invalid("body");
            let message = response.body["errors"][0]["message"].as_str().unwrap_or_default();
            assert_eq!(message, "must be a JSON object", "{method} {path} with {body}: {}", response.text);
        }
    }
    let kept = app.conversation(&user, id).await;
    assert_eq!((&kept.body["title"], &kept.body["system_prompt"]), (&json!("Kept"), &json!("Be brief.")));
    assert_eq!(app.provider.request_count(), 0);
}

async fn validation_errors_never_name_rust_types(app: TestApp) {
    let user = app.signup().await;
    let id = app.new_conversation(&user).await;
    let cases = [
        ("/api/support/sessions", None, json!({ "client_info": "me" }), "client_info"),
        ("/api/support/sessions", None, json!({ "client_info": 7 }), "client_info"),
        ("/api/support/sessions", None, json!({ "client_info": { "name": 1, "email": "a@b.co" } }), "client_info.name"),
        ("/api/conversations", Some(&user), json!({ "title": { "a": 1 } }), "title"),
        ("/api/conversations", Some(&user), json!({ "title": [1] }), "title"),
        ("/api/auth/login", None, json!({ "login": true, "password": "x" }), "login"),
    ];
    for (path, caller, body, field) in cases {
        let response = send_raw(&app, "POST", path, caller, Some(JSON), body.to_string()).await;
        response.assert_invalid(field);
        for rust in ["struct", "Body", "ClientInfo", "String", "Option", "u32", "i64"] {
            assert!(!response.text.contains(rust), "{path} with {body}: {} names {rust}", response.text);
        }
    }
    let patch = send_raw(&app, "PATCH", &format!("/api/conversations/{id}"), Some(&user), Some(JSON), "[1]").await;
    assert!(!patch.text.contains("struct"), "{}", patch.text);
}
