//! SPEC §7 operations: /health, /ready, /openapi.json, the documentation pages
//! (assets served by the binary, no CDN), request ids, restarts, and JSON
//! answers for unknown routes and methods.

use palaver::config::Secret;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{Fetch, PASSWORD, TestApp, db_tests, expected_turns, turns};
use crate::mock_llm::echo_of;

db_tests!(
    health_answers_ok,
    ready_answers_200_when_the_database_answers,
    ready_checks_redis_when_it_is_configured,
    every_response_carries_a_request_id,
    a_client_request_id_is_echoed,
    openapi_describes_the_api,
    swagger_ui_is_served_with_its_own_assets,
    redoc_is_served_with_its_own_script,
    unknown_routes_are_json_404,
    wrong_methods_are_json_405,
    data_survives_a_restart;
    sqlite_only:
    openapi_lists_the_same_paths,
    openapi_states_the_statuses_every_route_shares,
    openapi_states_the_limits_the_server_enforces,
    documented_statuses_are_the_ones_answered,
);

async fn health_answers_ok(app: TestApp) {
    let response = app.get("/health").fetch().await;
    response.assert_status(StatusCode::OK).assert_json();
    assert_eq!(response.body, json!({ "status": "ok" }));
}

async fn ready_answers_200_when_the_database_answers(app: TestApp) {
    let response = app.get("/ready").fetch().await;
    response.assert_status(StatusCode::OK);
}

async fn ready_checks_redis_when_it_is_configured(mut app: TestApp) {
    let body = app.get("/ready").fetch().await.body;
    assert_eq!(body["database"], "ok");
    assert!(body.get("redis").is_none(), "no Redis configured: {body}");

    // A Redis nobody listens on: 503 naming it.
    app.restart_with(|s| s.server.redis_url = Some(Secret("redis://127.0.0.1:1".into()))).await;
    let response = app.get("/ready").fetch().await;
    response.assert_error(StatusCode::SERVICE_UNAVAILABLE, "not_ready");
    assert_eq!(response.body["down"], json!(["redis"]));
    assert_eq!(response.body["database"], "ok");

    // The machine's Redis: ready.
    let Some(url) = crate::helpers::redis_url().await else { return };
    app.restart_with(|s| s.server.redis_url = Some(Secret(url))).await;
    let response = app.get("/ready").fetch().await;
    response.assert_status(StatusCode::OK);
    assert_eq!(response.body["redis"], "ok");
}

async fn every_response_carries_a_request_id(app: TestApp) {
    let user = app.signup().await;
    let responses = [
        ("health", app.get("/health").fetch().await),
        ("404", app.get("/no/such/route").fetch().await),
        ("401", app.get("/api/users/me").fetch().await),
        ("200", app.me(&user).await),
        ("422", app.post("/api/auth/register").json(&json!({})).fetch().await),
        ("400", app.post("/api/auth/register").header("content-type", "application/json").body("{").fetch().await),
        ("openapi", app.get("/openapi.json").fetch().await),
    ];
    let mut ids = Vec::new();
    for (what, response) in responses {
        let id = response.header("x-request-id").unwrap_or_else(|| panic!("{what} answer without X-Request-Id"));
        assert!(!id.is_empty(), "{what}: empty X-Request-Id");
        ids.push(id.to_owned());
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "request ids are unique: {ids:?}");
}

async fn a_client_request_id_is_echoed(app: TestApp) {
    let ok = app.get("/health").header("x-request-id", "abc-123").fetch().await;
    assert_eq!(ok.header("x-request-id"), Some("abc-123"));
    let error = app.get("/api/users/me").header("x-request-id", "abc-124").fetch().await;
    error.assert_status(StatusCode::UNAUTHORIZED);
    assert_eq!(error.header("x-request-id"), Some("abc-124"));
    let not_found = app.get("/nowhere").header("x-request-id", "abc-125").fetch().await;
    assert_eq!(not_found.header("x-request-id"), Some("abc-125"));
}

async fn openapi_describes_the_api(app: TestApp) {
    let response = app.get("/openapi.json").fetch().await;
    response.assert_status(StatusCode::OK).assert_json();
    let doc = &response.body;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with('3')), "openapi version: {}", doc["openapi"]);
    let paths = doc["paths"].as_object().expect("paths");
    for path in [
        "/api/auth/register",
        "/api/auth/login",
        "/api/auth/refresh",
        "/api/auth/logout",
        "/api/auth/sessions",
        "/api/users/me",
        "/api/conversations",
        "/api/conversations/{id}",
        "/api/conversations/{id}/messages",
        "/api/chat",
        "/api/history",
        "/api/search",
        "/api/agent/search",
        "/api/models",
        "/api/admin/users",
        "/health",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} is not documented; documented: {:?}",
            paths.keys().collect::<Vec<_>>()
        );
    }
    assert!(paths["/api/auth/register"]["post"].is_object());
    let mut refs = Vec::new();
    collect_refs(doc, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("{r} points outside the document"));
        assert!(doc.pointer(pointer).is_some(), "{r} refers to nothing in the document");
    }
    let export = &paths["/api/conversations/{id}/export"]["get"]["responses"]["200"]["content"];
    assert!(export["text/markdown"].is_object() && export["application/json"].is_object(), "{export}");
}

/// Every `$ref` in a JSON document.
fn collect_refs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(r)) = map.get("$ref") {
                out.push(r.clone());
            }
            map.values().for_each(|v| collect_refs(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// `src`/`href` values in an HTML page.
fn references(html: &str) -> Vec<String> {
    let mut found = Vec::new();
    for attr in ["src=", "href="] {
        let mut rest = html;
        while let Some(i) = rest.find(attr) {
            rest = &rest[i + attr.len()..];
            let quote = rest.chars().next().unwrap_or(' ');
            if (quote == '"' || quote == '\'')
                && let Some(end) = rest[1..].find(quote)
            {
                found.push(rest[1..1 + end].to_owned());
            }
        }
    }
    found
}

fn mentions_a_cdn(html: &str) -> bool {
    let lower = html.to_lowercase();
    ["cdn", "unpkg.com", "jsdelivr", "googleapis.com"].iter().any(|c| lower.contains(c))
}

async fn swagger_ui_is_served_with_its_own_assets(app: TestApp) {
    let response = app.client.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let page_url = response.url().clone();
    let ct = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/html"), "content type {ct}");
    let html = response.text().await.unwrap();
    assert!(html.to_lowercase().contains("swagger"), "not a Swagger UI page");
    assert!(!mentions_a_cdn(&html), "the docs page loads from a CDN:\n{html}");

    let assets: Vec<_> = references(&html)
        .into_iter()
        .filter(|r| !r.starts_with('#') && !r.starts_with("data:"))
        .map(|r| page_url.join(&r).unwrap())
        .collect();
    assert!(assets.iter().any(|u| u.path().ends_with(".css")), "no stylesheet in {assets:?}");
    assert!(assets.iter().any(|u| u.path().ends_with(".js")), "no script in {assets:?}");
    for url in &assets {
        assert_eq!(url.host_str(), Some("127.0.0.1"), "{url} is not served by Palaver");
        let asset = app.client.get(url.clone()).send().await.unwrap();
        assert_eq!(asset.status(), StatusCode::OK, "{url}");
        assert!(!asset.bytes().await.unwrap().is_empty(), "{url} is empty");
    }

    for asset in ["/docs/swagger-ui.css", "/docs/swagger-ui-bundle.js"] {
        let response = app.get(asset).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{asset}");
    }
}

async fn redoc_is_served_with_its_own_script(app: TestApp) {
    let response = app.client.get(app.url("/redoc")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let page_url = response.url().clone();
    let ct = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/html"), "content type {ct}");
    let html = response.text().await.unwrap();
    assert!(html.to_lowercase().contains("redoc"), "not a ReDoc page");
    assert!(!mentions_a_cdn(&html), "the ReDoc page loads from a CDN:\n{html}");

    let scripts: Vec<_> = references(&html).into_iter().filter(|r| r.ends_with(".js") || r.contains(".js?")).collect();
    assert!(!scripts.is_empty(), "ReDoc without a script src:\n{html}");
    for script in scripts {
        let url = page_url.join(&script).unwrap();
        assert_eq!(url.host_str(), Some("127.0.0.1"), "{url} is not served by Palaver");
        let asset = app.client.get(url.clone()).send().await.unwrap();
        assert_eq!(asset.status(), StatusCode::OK, "{url}");
        let ct = asset.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert!(ct.contains("javascript"), "{url} served as {ct:?}");
        assert!(asset.bytes().await.unwrap().len() > 1000, "{url} is not the ReDoc bundle");
    }
}

async fn unknown_routes_are_json_404(app: TestApp) {
    for path in ["/nope", "/api/nope", "/api/conversations/00000000-0000-4000-8000-000000000000/nope"] {
        let response = app.get(path).fetch().await;
        // Unknown nested paths may also be authenticated first; either way JSON.
        if response.status == StatusCode::UNAUTHORIZED {
            response.assert_unauthorized();
        } else {
            response.assert_error(StatusCode::NOT_FOUND, "not_found");
        }
    }
    app.get("/nope").fetch().await.assert_error(StatusCode::NOT_FOUND, "not_found");
    app.post("/api/nope").json(&json!({})).fetch().await.assert_error(StatusCode::NOT_FOUND, "not_found");
}

async fn wrong_methods_are_json_405(app: TestApp) {
    for (method, path) in
        [("DELETE", "/health"), ("PUT", "/api/auth/register"), ("GET", "/api/auth/login"), ("POST", "/api/models")]
    {
        let response = app.request(method.parse().unwrap(), path).fetch().await;
        assert_eq!(response.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}: {}", response.text);
        response.assert_error_shape();
    }
}

async fn data_survives_a_restart(mut app: TestApp) {
    let user = app.signup().await;
    let c = app.create_conversation(&user, json!({ "title": "Keep me", "system_prompt": "Remember." })).await;
    let id = c["id"].as_str().unwrap().to_owned();
    app.say(&user, &id, "first").await;
    app.tick();
    app.say(&user, &id, "second").await;

    app.restart().await;

    app.get("/ready").fetch().await.assert_status(StatusCode::OK);
    // Tokens issued before the restart stay valid: the secret is the same.
    app.me(&user).await.assert_status(StatusCode::OK);
    let again = app.login(json!({ "login": user.email, "password": PASSWORD })).await;
    again.assert_status(StatusCode::OK);
    assert_eq!(again.body["user"]["id"], user.id.as_str());
    let mut user = user.clone();
    user.token = again.str("access_token").to_owned();

    let list = app.get("/api/conversations").bearer_auth(&user.token).fetch().await;
    list.assert_status(StatusCode::OK);
    assert_eq!(list.body["total"], 1);
    let restored = app.conversation(&user, &id).await;
    restored.assert_status(StatusCode::OK);
    assert_eq!(restored.body["title"], "Keep me");
    assert_eq!(restored.body["system_prompt"], "Remember.");
    assert_eq!(restored.body["message_count"], 4);
    assert_eq!(
        turns(restored.body["messages"].as_array().unwrap()),
        expected_turns(&[
            ("user", "first"),
            ("assistant", &echo_of("first")),
            ("user", "second"),
            ("assistant", &echo_of("second")),
        ])
    );

    // The conversation carries on after the restart, with its history.
    app.tick();
    app.say(&user, &id, "third").await;
    assert_eq!(app.provider.last_request().messages().len(), 6);
}

/// Every path of the document, so a route cannot vanish from it unnoticed.
const DOCUMENTED_PATHS: &[&str] = &[
    "/api/admin/users",
    "/api/admin/users/{id}",
    "/api/admin/users/{id}/usage",
    "/api/agent/active",
    "/api/agent/queue",
    "/api/agent/search",
    "/api/agent/sessions",
    "/api/agent/sessions/{id}/claim",
    "/api/agent/sessions/{id}/close",
    "/api/agent/sessions/{id}/messages",
    "/api/agent/sessions/{id}/release",
    "/api/auth/login",
    "/api/auth/logout",
    "/api/auth/refresh",
    "/api/auth/register",
    "/api/auth/sessions",
    "/api/auth/sessions/{id}",
    "/api/chat",
    "/api/chat/stream",
    "/api/conversations",
    "/api/conversations/{id}",
    "/api/conversations/{id}/export",
    "/api/conversations/{id}/messages",
    "/api/conversations/{id}/messages/{message_id}/cancel",
    "/api/conversations/{id}/messages/{message_id}/stream",
    "/api/history",
    "/api/keys",
    "/api/keys/{id}",
    "/api/models",
    "/api/search",
    "/api/support/sessions",
    "/api/support/sessions/{id}",
    "/api/support/sessions/{id}/handoff",
    "/api/support/sessions/{id}/messages",
    "/api/users/me",
    "/api/users/me/export",
    "/api/users/me/usage",
    "/api/ws",
    "/health",
    "/metrics",
    "/ready",
    "/ws/agent",
    "/ws/support/{session_id}",
];

/// `(path, method, operation)` for every operation of the document.
fn operations(doc: &serde_json::Value) -> Vec<(String, String, serde_json::Value)> {
    let mut found = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            found.push((path.clone(), method.clone(), op.clone()));
        }
    }
    found
}

fn statuses(op: &serde_json::Value) -> Vec<String> {
    op["responses"].as_object().expect("responses").keys().cloned().collect()
}

/// Resolves a `$ref` to a component schema; other schemas as they are.
fn resolve<'a>(doc: &'a serde_json::Value, schema: &'a serde_json::Value) -> &'a serde_json::Value {
    match schema["$ref"].as_str().and_then(|r| r.strip_prefix("#/components/schemas/")) {
        Some(name) => &doc["components"]["schemas"][name],
        None => schema,
    }
}

async fn openapi_lists_the_same_paths(app: TestApp) {
    let doc = app.get("/openapi.json").fetch().await.body;
    let paths: Vec<&str> = doc["paths"].as_object().expect("paths").keys().map(String::as_str).collect();
    assert_eq!(paths, DOCUMENTED_PATHS);
}

async fn openapi_states_the_statuses_every_route_shares(app: TestApp) {
    let doc = app.get("/openapi.json").fetch().await.body;
    for (path, method, op) in operations(&doc) {
        let what = format!("{} {path}", method.to_uppercase());
        let has = statuses(&op);
        let expect = |status: &str, why: &str| {
            assert!(has.iter().any(|s| s == status), "{what} lacks {status} ({why}): {has:?}")
        };
        expect("400", "malformed requests");
        let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
        if secured {
            expect("401", "it needs credentials");
            if method != "get" {
                expect("403", "cookie requests need the CSRF header");
            }
        }
        if !op["requestBody"].is_null() {
            for (status, why) in [("413", "a body"), ("415", "a JSON body"), ("422", "a validated body")] {
                expect(status, why);
            }
        }
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        for p in params.iter().filter(|p| p["in"] == "path") {
            expect("404", "a path id");
            if !path.starts_with("/ws/") {
                expect("422", "a path id that is not a UUID");
            }
            assert_eq!(p["schema"]["format"], "uuid", "{what}: path parameter {}", p["name"]);
        }
        if path.contains("ws") {
            let no_upgrade = &op["responses"]["400"]["content"];
            assert!(
                no_upgrade.get("text/plain").is_some(),
                "{what}: 400 without an upgrade is plain text: {no_upgrade}"
            );
        }
        if !path.starts_with("/health") && !path.starts_with("/metrics") && !path.starts_with("/ready") {
            expect("503", "the database may be down");
        }
    }
    let mut ids: Vec<String> = operations(&doc).iter().map(|(_, _, op)| op["operationId"].to_string()).collect();
    let all = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), all, "operation ids are unique");
    let register = statuses(&doc["paths"]["/api/auth/register"]["post"]);
    assert!(register.contains(&"429".to_owned()), "registrations are rate limited: {register:?}");
}

async fn openapi_states_the_limits_the_server_enforces(mut app: TestApp) {
    let doc = app.get("/openapi.json").fetch().await.body;
    let schemas = &doc["components"]["schemas"];
    let param = |path: &str, name: &str| -> serde_json::Value {
        let params = doc["paths"][path]["get"]["parameters"].as_array().expect("parameters").clone();
        params.into_iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("{path} has no {name}"))["schema"]
            .clone()
    };
    for path in ["/api/conversations", "/api/history", "/api/admin/users", "/api/agent/sessions"] {
        assert_eq!(
            (param(path, "page")["minimum"].clone(), param(path, "page")["maximum"].clone()),
            (json!(1), json!(1_000_000))
        );
        assert_eq!(
            (param(path, "per_page")["minimum"].clone(), param(path, "per_page")["maximum"].clone()),
            (json!(1), json!(100))
        );
    }
    let limit = param("/api/conversations/{id}/messages", "limit");
    assert_eq!((limit["minimum"].clone(), limit["maximum"].clone()), (json!(1), json!(100)));
    let register = &schemas["RegisterBody"]["properties"];
    assert_eq!(
        (register["password"]["minLength"].clone(), register["password"]["maxLength"].clone()),
        (json!(8), json!(128))
    );
    assert!(register["username"].to_string().contains(r"^[A-Za-z0-9_.-]{3,32}$"), "username: {}", register["username"]);
    assert!(register["email"].to_string().contains(r#""format":"email""#), "email: {}", register["email"]);
    assert!(schemas["RegisterBody"]["anyOf"].is_array(), "an email or a username is required");
    let content = resolve(&doc, &schemas["PostMessageBody"]["properties"]["content"]);
    assert_eq!((content["minLength"].clone(), content["maxLength"].clone()), (json!(1), json!(32_000)));
    let model = resolve(&doc, &schemas["ModelId"]);
    let pattern = model["pattern"].as_str().expect("model id pattern");
    assert!(pattern.contains("openai") && !pattern.contains("gemini"), "only configured providers: {pattern}");

    // The limits follow the configuration, and the server holds to them.
    app.restart_with(|s| s.chat.max_message_chars = 10).await;
    let doc = app.get("/openapi.json").fetch().await.body;
    assert_eq!(doc["components"]["schemas"]["MessageText"]["maxLength"], 10);
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    app.post_message(&user, &conversation, json!({ "content": "x".repeat(11) })).await.assert_invalid("content");
    app.post_message(&user, &conversation, json!({ "content": "x".repeat(10) }))
        .await
        .assert_status(StatusCode::CREATED);
}

/// Sends each operation a request with a bad path id (or none), a valid
/// token and an empty JSON object, and checks the answer is one its
/// document lists.
async fn documented_statuses_are_the_ones_answered(app: TestApp) {
    let doc = app.get("/openapi.json").fetch().await.body;
    let user = app.signup().await;
    let ending = ["/api/auth/logout", "/api/users/me", "/api/auth/sessions/{id}"];
    for (path, method, op) in operations(&doc) {
        if ending.contains(&path.as_str()) && method != "get" {
            continue;
        }
        let concrete: String = path
            .split('/')
            .map(|part| if part.starts_with('{') { "not-a-uuid" } else { part })
            .collect::<Vec<_>>()
            .join("/");
        let mut request = app
            .request(method.to_uppercase().parse().expect("method"), &concrete)
            .header("authorization", format!("Bearer {}", user.token));
        if !op["requestBody"].is_null() {
            request = request.json(&json!({}));
        }
        let response = request.fetch().await;
        let status = response.status.as_u16().to_string();
        assert!(
            statuses(&op).contains(&status),
            "{} {concrete} answered {status}, which its document does not list: {}",
            method.to_uppercase(),
            response.text
        );
    }
}
