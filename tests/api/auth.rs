//! SPEC §2 accounts and login sessions: register, login (JSON and form),
//! cookies and CSRF, refresh rotation with reuse detection, logout, the
//! session list, and token expiry on the server's clock.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{Fetch, PASSWORD, TestApp, assert_timestamp, assert_user, assert_uuid, db_tests};

db_tests!(
    register_returns_201_with_the_user,
    register_accepts_only_a_username_or_only_an_email,
    register_needs_an_email_or_a_username,
    register_rejects_invalid_fields_naming_them,
    register_counts_lengths_in_unicode_characters,
    register_refuses_a_taken_email_or_username_ignoring_case,
    login_accepts_login_email_username_keys_and_the_oauth2_form,
    login_returns_tokens_and_sets_the_session_cookies,
    login_email_is_case_insensitive,
    login_failures_look_the_same_for_unknown_user_and_wrong_password,
    protected_routes_answer_401_without_valid_credentials,
    protected_routes_answer_401_before_reading_the_body,
    bearer_token_authenticates,
    session_cookie_authenticates_reads_without_csrf,
    cookie_requests_that_change_state_need_the_csrf_header,
    bearer_requests_need_no_csrf_header,
    a_cookie_store_client_stays_logged_in,
    refresh_rotates_tokens,
    reusing_a_refresh_token_revokes_the_whole_login_session,
    unknown_or_missing_refresh_tokens_are_refused,
    logout_ends_only_this_login_session,
    sessions_lists_live_logins_with_exactly_one_current,
    deleting_a_session_revokes_it,
    sessions_of_other_users_cannot_be_deleted,
    access_tokens_expire_on_the_server_clock,
    refresh_tokens_expire_after_the_configured_days,
);

async fn register_returns_201_with_the_user(app: TestApp) {
    let response = app
        .register(json!({
            "email": "Alice@Example.COM",
            "username": "alice_w",
            "password": PASSWORD,
            "display_name": "Alice Wonder"
        }))
        .await;

    response.assert_status(StatusCode::CREATED).assert_json();
    let user = &response.body;
    assert_user(user, "user");
    assert_eq!(user["email"], "alice@example.com", "email is stored lowercased");
    assert_eq!(user["username"], "alice_w");
    assert_eq!(user["display_name"], "Alice Wonder");
}

async fn register_accepts_only_a_username_or_only_an_email(app: TestApp) {
    let by_name = app.register(json!({ "username": "only.name-1", "password": PASSWORD })).await;
    by_name.assert_status(StatusCode::CREATED);
    assert_user(&by_name.body, "user");
    assert_eq!(by_name.body["username"], "only.name-1");
    assert!(by_name.body["email"].is_null());

    let by_email = app.register(json!({ "email": "only@example.com", "password": PASSWORD })).await;
    by_email.assert_status(StatusCode::CREATED);
    assert_eq!(by_email.body["email"], "only@example.com");
    assert!(by_email.body["username"].is_null());

    app.login(json!({ "login": "only.name-1", "password": PASSWORD })).await.assert_status(StatusCode::OK);
    app.login(json!({ "login": "only@example.com", "password": PASSWORD })).await.assert_status(StatusCode::OK);
}

async fn register_needs_an_email_or_a_username(app: TestApp) {
    let response = app.register(json!({ "password": PASSWORD, "display_name": "Nobody" })).await;
    response.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    assert!(response.body["errors"].as_array().is_some_and(|e| !e.is_empty()), "{}", response.text);
}

async fn register_rejects_invalid_fields_naming_them(app: TestApp) {
    // (body, field named in `errors`, is it a rule violation rather than a wrong JSON shape)
    let cases = [
        (json!({ "email": "not-an-email", "password": PASSWORD }), "email", true),
        (json!({ "email": "a@", "password": PASSWORD }), "email", true),
        (json!({ "username": "ab", "password": PASSWORD }), "username", true),
        (json!({ "username": "a".repeat(33), "password": PASSWORD }), "username", true),
        (json!({ "username": "al ice", "password": PASSWORD }), "username", true),
        (json!({ "username": "alice!", "password": PASSWORD }), "username", true),
        (json!({ "username": "alice_ok", "password": "short77" }), "password", true),
        (json!({ "username": "alice_ok", "password": "p".repeat(129) }), "password", true),
        (json!({ "username": "alice_ok" }), "password", false),
        (json!({ "username": "alice_ok", "password": 12345678 }), "password", false),
        (json!({ "username": 42, "password": PASSWORD }), "username", false),
        (json!({ "username": "alice_ok", "password": null }), "password", false),
    ];
    for (body, field, rule) in cases {
        let response = app.register(body.clone()).await;
        assert_eq!(response.status, StatusCode::UNPROCESSABLE_ENTITY, "{body} -> {}", response.text);
        response.assert_invalid(field);
        if rule {
            assert_eq!(response.body["code"], "validation_error", "{body} -> {}", response.text);
        }
    }
    // Nothing was created along the way.
    app.login(json!({ "login": "alice_ok", "password": PASSWORD }))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
}

async fn register_counts_lengths_in_unicode_characters(app: TestApp) {
    // 8 characters, 16 bytes: long enough.
    let accented = "éééééééé";
    app.register(json!({ "username": "uni_ok", "password": accented })).await.assert_status(StatusCode::CREATED);
    app.login(json!({ "login": "uni_ok", "password": accented })).await.assert_status(StatusCode::OK);

    // 7 characters, 28 bytes: too short although it has more than 8 bytes.
    app.register(json!({ "username": "uni_short", "password": "🦀🦀🦀🦀🦀🦀🦀" })).await.assert_invalid("password");

    // 128 characters (512 bytes) is the maximum, 129 is over it.
    app.register(json!({ "username": "uni_max", "password": "🦀".repeat(128) }))
        .await
        .assert_status(StatusCode::CREATED);
    app.register(json!({ "username": "uni_over", "password": "🦀".repeat(129) })).await.assert_invalid("password");

    // Usernames: exactly 3 and 32 characters are fine.
    app.register(json!({ "username": "abc", "password": PASSWORD })).await.assert_status(StatusCode::CREATED);
    app.register(json!({ "username": "a".repeat(32), "password": PASSWORD })).await.assert_status(StatusCode::CREATED);
}

async fn register_refuses_a_taken_email_or_username_ignoring_case(app: TestApp) {
    app.register(json!({ "email": "carol@example.com", "username": "Carol", "password": PASSWORD }))
        .await
        .assert_status(StatusCode::CREATED);

    app.register(json!({ "email": "CAROL@example.com", "password": PASSWORD }))
        .await
        .assert_error(StatusCode::CONFLICT, "email_taken");
    app.register(json!({ "username": "carol", "password": PASSWORD }))
        .await
        .assert_error(StatusCode::CONFLICT, "username_taken");
    app.register(json!({ "email": "other@example.com", "username": "CAROL", "password": PASSWORD }))
        .await
        .assert_error(StatusCode::CONFLICT, "username_taken");

    // The refused attempts created nobody: the free email is still free.
    app.register(json!({ "email": "other@example.com", "password": PASSWORD }))
        .await
        .assert_status(StatusCode::CREATED);
}

async fn login_accepts_login_email_username_keys_and_the_oauth2_form(app: TestApp) {
    let user = app.signup().await;
    let bodies = [
        json!({ "login": user.email, "password": PASSWORD }),
        json!({ "login": user.username, "password": PASSWORD }),
        json!({ "email": user.email, "password": PASSWORD }),
        json!({ "username": user.username, "password": PASSWORD }),
    ];
    for body in bodies {
        let response = app.login(body.clone()).await;
        assert_eq!(response.status, StatusCode::OK, "{body} -> {}", response.text);
        assert_eq!(response.body["user"]["id"], user.id.as_str());
    }

    // OAuth2 password flow, as FastAPI clients send it.
    let form = app
        .post("/api/auth/login")
        .form(&[("username", user.username.as_str()), ("password", PASSWORD), ("grant_type", "password")])
        .fetch()
        .await;
    form.assert_status(StatusCode::OK);
    assert_eq!(form.body["token_type"], "bearer");
    assert_eq!(form.body["user"]["id"], user.id.as_str());
    let token = form.str("access_token");
    app.get("/api/users/me").bearer_auth(token).fetch().await.assert_status(StatusCode::OK);
}

async fn login_returns_tokens_and_sets_the_session_cookies(app: TestApp) {
    let user = app.signup().await;
    let response = app.login(json!({ "login": user.username, "password": PASSWORD })).await;

    response.assert_status(StatusCode::OK).assert_json();
    let tokens = &response.body;
    assert!(!response.str("access_token").is_empty());
    assert!(!response.str("refresh_token").is_empty());
    assert_ne!(tokens["access_token"], tokens["refresh_token"]);
    assert_eq!(tokens["token_type"], "bearer");
    assert_eq!(tokens["expires_in"], 30 * 60, "expires_in is in seconds");
    assert_eq!(tokens["refresh_expires_in"], 14 * 86_400, "refresh_expires_in is in seconds");
    assert_user(&tokens["user"], "user");
    assert_eq!(tokens["user"]["id"], user.id.as_str());
    let csrf = response.str("csrf_token");
    assert!(!csrf.is_empty());

    let session = response.cookie("palaver_session").expect("a palaver_session cookie");
    assert!(!session.value.is_empty());
    assert!(session.has_flag("httponly"), "the session cookie must be HttpOnly: {session:?}");
    assert_eq!(session.attribute("samesite").map(str::to_ascii_lowercase).as_deref(), Some("lax"), "{session:?}");
    assert_eq!(session.attribute("path"), Some("/"), "{session:?}");
    assert!(!session.has_flag("secure"), "a Secure cookie is useless over plain http: {session:?}");

    let csrf_cookie = response.cookie("palaver_csrf").expect("a palaver_csrf cookie");
    assert!(!csrf_cookie.has_flag("httponly"), "scripts must be able to read the CSRF cookie: {csrf_cookie:?}");
    assert_eq!(csrf_cookie.value, csrf, "the CSRF cookie carries the csrf_token");
    assert_eq!(csrf_cookie.attribute("path"), Some("/"));

    // The cookie does not simply contain one of the tokens from the body.
    assert_ne!(session.value, tokens["access_token"].as_str().unwrap());
    assert_ne!(session.value, tokens["refresh_token"].as_str().unwrap());
}

async fn login_email_is_case_insensitive(app: TestApp) {
    let user = app.signup().await;
    let response = app.login(json!({ "login": user.email.to_uppercase(), "password": PASSWORD })).await;
    response.assert_status(StatusCode::OK);
    assert_eq!(response.body["user"]["id"], user.id.as_str());
}

async fn login_failures_look_the_same_for_unknown_user_and_wrong_password(app: TestApp) {
    let user = app.signup().await;

    let wrong_password = app.login(json!({ "login": user.email, "password": "not the password" })).await;
    let unknown_user = app.login(json!({ "login": "nobody@example.com", "password": "not the password" })).await;

    wrong_password.assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    unknown_user.assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    assert_eq!(wrong_password.body, unknown_user.body, "the answers must not tell which one was wrong");
    assert!(wrong_password.cookie("palaver_session").is_none());

    let form = app
        .post("/api/auth/login")
        .form(&[("username", user.username.as_str()), ("password", "not the password")])
        .fetch()
        .await;
    form.assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
}

const PROTECTED: &[(&str, &str)] = &[
    ("GET", "/api/users/me"),
    ("PATCH", "/api/users/me"),
    ("DELETE", "/api/users/me"),
    ("GET", "/api/auth/sessions"),
    ("DELETE", "/api/auth/sessions/00000000-0000-4000-8000-000000000000"),
    ("POST", "/api/auth/logout"),
    ("GET", "/api/conversations"),
    ("POST", "/api/conversations"),
    ("GET", "/api/conversations/00000000-0000-4000-8000-000000000000"),
    ("PATCH", "/api/conversations/00000000-0000-4000-8000-000000000000"),
    ("DELETE", "/api/conversations/00000000-0000-4000-8000-000000000000"),
    ("GET", "/api/conversations/00000000-0000-4000-8000-000000000000/messages"),
    ("POST", "/api/conversations/00000000-0000-4000-8000-000000000000/messages"),
    ("POST", "/api/chat"),
    ("GET", "/api/history"),
    ("GET", "/api/admin/users"),
    ("PATCH", "/api/admin/users/00000000-0000-4000-8000-000000000000"),
];

async fn protected_routes_answer_401_without_valid_credentials(app: TestApp) {
    let user = app.signup().await;
    let credentials: [(&str, Option<String>, Option<String>); 5] = [
        ("no credentials", None, None),
        ("a garbage bearer token", Some("Bearer not-a-token".into()), None),
        ("another scheme", Some(format!("Basic {}", user.token)), None),
        ("a tampered token", Some(format!("Bearer {}x", user.token)), None),
        ("an unknown session cookie", None, Some("palaver_session=pcs_forged".into())),
    ];
    for (method, path) in PROTECTED {
        for (what, authorization, cookie) in &credentials {
            let mut request = app.request(method.parse().unwrap(), path);
            if let Some(a) = authorization {
                request = request.header("authorization", a);
            }
            if let Some(c) = cookie {
                request = request.header("cookie", c);
            }
            let response = request.fetch().await;
            assert_eq!(response.status, StatusCode::UNAUTHORIZED, "{method} {path} with {what}: {}", response.text);
            response.assert_unauthorized();
        }
    }
}

async fn protected_routes_answer_401_before_reading_the_body(app: TestApp) {
    let malformed =
        app.post("/api/conversations").header("content-type", "application/json").body("{not json").fetch().await;
    malformed.assert_unauthorized();

    let wrong_type = app.post("/api/conversations").header("content-type", "text/plain").body("hi").fetch().await;
    wrong_type.assert_unauthorized();

    let bad_id = app.get("/api/conversations/not-a-uuid").fetch().await;
    bad_id.assert_unauthorized();

    let invalid = app.post("/api/chat").json(&json!({ "message": "" })).fetch().await;
    invalid.assert_unauthorized();
}

async fn bearer_token_authenticates(app: TestApp) {
    let user = app.signup().await;
    let response = app.me(&user).await;
    response.assert_status(StatusCode::OK).assert_json();
    assert_user(&response.body, "user");
    assert_eq!(response.body["id"], user.id.as_str());
    assert_eq!(response.body["email"], user.email.as_str());
    assert_eq!(response.body["username"], user.username.as_str());

    // The scheme name is case-insensitive (RFC 7235).
    let lower = app.get("/api/users/me").header("authorization", format!("bearer {}", user.token)).fetch().await;
    lower.assert_status(StatusCode::OK);
}

async fn session_cookie_authenticates_reads_without_csrf(app: TestApp) {
    let user = app.signup().await;
    let response =
        app.get("/api/users/me").header("cookie", format!("palaver_session={}", user.session_cookie)).fetch().await;
    response.assert_status(StatusCode::OK);
    assert_eq!(response.body["id"], user.id.as_str());

    let list = app.get("/api/conversations").header("cookie", user.cookie_header()).fetch().await;
    list.assert_status(StatusCode::OK);
}

async fn cookie_requests_that_change_state_need_the_csrf_header(app: TestApp) {
    let user = app.signup().await;

    let without = app
        .post("/api/conversations")
        .header("cookie", user.cookie_header())
        .json(&json!({ "title": "forged" }))
        .fetch()
        .await;
    without.assert_error(StatusCode::FORBIDDEN, "csrf_failed");

    let wrong = app
        .post("/api/conversations")
        .header("cookie", user.cookie_header())
        .header("x-csrf-token", "definitely-not-it")
        .json(&json!({ "title": "forged" }))
        .fetch()
        .await;
    wrong.assert_error(StatusCode::FORBIDDEN, "csrf_failed");

    // Another session's CSRF token does not fit this session's cookie.
    let other = app.login_as(&user).await;
    let mismatched = app
        .post("/api/conversations")
        .header("cookie", user.cookie_header())
        .header("x-csrf-token", &other.csrf_token)
        .json(&json!({ "title": "forged" }))
        .fetch()
        .await;
    mismatched.assert_error(StatusCode::FORBIDDEN, "csrf_failed");

    // Nothing was created by the refused requests.
    let list = app.get("/api/conversations").bearer_auth(&user.token).fetch().await;
    assert_eq!(list.body["total"], 0, "{}", list.text);

    let created = app
        .post("/api/conversations")
        .header("cookie", user.cookie_header())
        .header("x-csrf-token", &user.csrf_token)
        .json(&json!({ "title": "legit" }))
        .fetch()
        .await;
    created.assert_status(StatusCode::CREATED);
    let id = created.str("id").to_owned();

    let patch_without = app
        .patch("/api/users/me")
        .header("cookie", user.cookie_header())
        .json(&json!({ "display_name": "Forged" }))
        .fetch()
        .await;
    patch_without.assert_error(StatusCode::FORBIDDEN, "csrf_failed");

    let delete_without =
        app.delete(&format!("/api/conversations/{id}")).header("cookie", user.cookie_header()).fetch().await;
    delete_without.assert_error(StatusCode::FORBIDDEN, "csrf_failed");
    app.conversation(&user, &id).await.assert_status(StatusCode::OK);

    let delete_with = app
        .delete(&format!("/api/conversations/{id}"))
        .header("cookie", user.cookie_header())
        .header("x-csrf-token", &user.csrf_token)
        .fetch()
        .await;
    delete_with.assert_status(StatusCode::NO_CONTENT);
    app.conversation(&user, &id).await.assert_error(StatusCode::NOT_FOUND, "not_found");
}

async fn bearer_requests_need_no_csrf_header(app: TestApp) {
    let user = app.signup().await;
    let created = app.post("/api/conversations").bearer_auth(&user.token).json(&json!({})).fetch().await;
    created.assert_status(StatusCode::CREATED);
    let patched =
        app.patch("/api/users/me").bearer_auth(&user.token).json(&json!({ "display_name": "B" })).fetch().await;
    patched.assert_status(StatusCode::OK);
}

async fn a_cookie_store_client_stays_logged_in(app: TestApp) {
    let user = app.signup().await;
    let browser = reqwest::Client::builder().cookie_store(true).build().unwrap();

    let login = browser
        .post(app.url("/api/auth/login"))
        .json(&json!({ "login": user.email, "password": PASSWORD }))
        .fetch()
        .await;
    login.assert_status(StatusCode::OK);
    let csrf = login.str("csrf_token").to_owned();

    let me = browser.get(app.url("/api/users/me")).fetch().await;
    me.assert_status(StatusCode::OK);
    assert_eq!(me.body["id"], user.id.as_str());

    let created = browser
        .post(app.url("/api/conversations"))
        .header("x-csrf-token", &csrf)
        .json(&json!({ "title": "from the browser" }))
        .fetch()
        .await;
    created.assert_status(StatusCode::CREATED);

    let logout = browser.post(app.url("/api/auth/logout")).header("x-csrf-token", &csrf).fetch().await;
    logout.assert_status(StatusCode::NO_CONTENT);
    browser.get(app.url("/api/users/me")).fetch().await.assert_unauthorized();
}

async fn refresh_rotates_tokens(app: TestApp) {
    let user = app.signup().await;

    let response = app.refresh(&user.refresh_token).await;
    response.assert_status(StatusCode::OK).assert_json();
    assert_eq!(response.body["token_type"], "bearer");
    assert_eq!(response.body["expires_in"], 30 * 60);
    assert_eq!(response.body["refresh_expires_in"], 14 * 86_400);
    assert_eq!(response.body["user"]["id"], user.id.as_str());
    let access = response.str("access_token");
    let refresh = response.str("refresh_token");
    assert_ne!(refresh, user.refresh_token, "the refresh token is rotated");

    let me = app.get("/api/users/me").bearer_auth(access).fetch().await;
    me.assert_status(StatusCode::OK);
    assert_eq!(me.body["id"], user.id.as_str());

    // The new refresh token works once more; the session lives on.
    app.refresh(refresh).await.assert_status(StatusCode::OK);
}

async fn reusing_a_refresh_token_revokes_the_whole_login_session(app: TestApp) {
    let user = app.signup().await;
    let other_session = app.login_as(&user).await;

    let rotated = app.refresh(&user.refresh_token).await;
    rotated.assert_status(StatusCode::OK);
    let new_access = rotated.str("access_token").to_owned();
    let new_refresh = rotated.str("refresh_token").to_owned();

    // A thief replays the old refresh token.
    app.refresh(&user.refresh_token).await.assert_unauthorized();

    // Everything of that login session is dead now.
    app.get("/api/users/me").bearer_auth(&new_access).fetch().await.assert_unauthorized();
    app.me(&user).await.assert_unauthorized();
    app.refresh(&new_refresh).await.assert_unauthorized();
    app.get("/api/users/me")
        .header("cookie", format!("palaver_session={}", user.session_cookie))
        .fetch()
        .await
        .assert_unauthorized();

    // The user's other login session is untouched.
    app.me(&other_session).await.assert_status(StatusCode::OK);
    app.refresh(&other_session.refresh_token).await.assert_status(StatusCode::OK);
}

async fn unknown_or_missing_refresh_tokens_are_refused(app: TestApp) {
    app.refresh("prt_this-token-was-never-issued").await.assert_unauthorized();
    app.refresh("").await.assert_status(StatusCode::UNAUTHORIZED);

    let user = app.signup().await;
    // An access token is not a refresh token.
    app.refresh(&user.token).await.assert_unauthorized();

    app.post("/api/auth/refresh").json(&json!({})).fetch().await.assert_invalid("refresh_token");
}

async fn logout_ends_only_this_login_session(app: TestApp) {
    let user = app.signup().await;
    let other_session = app.login_as(&user).await;

    let response = app.post("/api/auth/logout").bearer_auth(&user.token).fetch().await;
    response.assert_status(StatusCode::NO_CONTENT);
    assert!(response.text.is_empty(), "204 has no body: {:?}", response.text);

    app.me(&user).await.assert_unauthorized();
    app.refresh(&user.refresh_token).await.assert_unauthorized();
    app.get("/api/users/me")
        .header("cookie", format!("palaver_session={}", user.session_cookie))
        .fetch()
        .await
        .assert_unauthorized();
    // Logging out twice is not possible with a dead token.
    app.post("/api/auth/logout").bearer_auth(&user.token).fetch().await.assert_unauthorized();

    app.me(&other_session).await.assert_status(StatusCode::OK);
    app.refresh(&other_session.refresh_token).await.assert_status(StatusCode::OK);
}

async fn sessions_lists_live_logins_with_exactly_one_current(app: TestApp) {
    let user = app.signup().await; // this login has no User-Agent
    let phone = app.login_as_with_agent(&user, Some("palaver-tests/phone")).await;
    let laptop = app.login_as_with_agent(&user, Some("palaver-tests/laptop")).await;

    let response = app.get("/api/auth/sessions").bearer_auth(&phone.token).fetch().await;
    response.assert_status(StatusCode::OK).assert_json();
    let items = response.items();
    assert_eq!(items.len(), 3, "three live logins: {}", response.text);
    for s in items {
        assert_uuid(&s["id"]);
        assert_timestamp(&s["created_at"]);
        assert_timestamp(&s["last_used_at"]);
        assert!(s["current"].is_boolean(), "{s}");
    }
    let current: Vec<_> = items.iter().filter(|s| s["current"] == true).collect();
    assert_eq!(current.len(), 1, "exactly one current session: {}", response.text);
    assert_eq!(current[0]["user_agent"], "palaver-tests/phone");
    let agents: Vec<_> = items.iter().map(|s| s["user_agent"].clone()).collect();
    assert!(agents.contains(&json!("palaver-tests/laptop")), "{agents:?}");

    // Seen from the laptop, the laptop is current.
    let from_laptop = app.get("/api/auth/sessions").bearer_auth(&laptop.token).fetch().await;
    let current: Vec<_> = from_laptop.items().iter().filter(|s| s["current"] == true).cloned().collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0]["user_agent"], "palaver-tests/laptop");

    // A logged-out session is not listed.
    app.post("/api/auth/logout").bearer_auth(&laptop.token).fetch().await.assert_status(StatusCode::NO_CONTENT);
    let after = app.get("/api/auth/sessions").bearer_auth(&phone.token).fetch().await;
    assert_eq!(after.items().len(), 2, "{}", after.text);

    // Only the user's own sessions appear.
    let stranger = app.signup().await;
    let theirs = app.get("/api/auth/sessions").bearer_auth(&stranger.token).fetch().await;
    assert_eq!(theirs.items().len(), 1, "{}", theirs.text);
}

async fn deleting_a_session_revokes_it(app: TestApp) {
    let user = app.signup().await;
    let stolen = app.login_as_with_agent(&user, Some("palaver-tests/stolen-phone")).await;

    let list = app.get("/api/auth/sessions").bearer_auth(&user.token).fetch().await;
    let stolen_id = list
        .items()
        .iter()
        .find(|s| s["user_agent"] == "palaver-tests/stolen-phone")
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .expect("the other session is listed");

    let response = app.delete(&format!("/api/auth/sessions/{stolen_id}")).bearer_auth(&user.token).fetch().await;
    response.assert_status(StatusCode::NO_CONTENT);

    app.me(&stolen).await.assert_unauthorized();
    app.refresh(&stolen.refresh_token).await.assert_unauthorized();
    app.get("/api/users/me")
        .header("cookie", format!("palaver_session={}", stolen.session_cookie))
        .fetch()
        .await
        .assert_unauthorized();
    app.me(&user).await.assert_status(StatusCode::OK);

    let list = app.get("/api/auth/sessions").bearer_auth(&user.token).fetch().await;
    assert_eq!(list.items().len(), 1, "{}", list.text);
    assert_eq!(list.items()[0]["current"], true);

    // Already revoked: nothing left to delete.
    app.delete(&format!("/api/auth/sessions/{stolen_id}"))
        .bearer_auth(&user.token)
        .fetch()
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
}

async fn sessions_of_other_users_cannot_be_deleted(app: TestApp) {
    let alice = app.signup().await;
    let mallory = app.signup().await;
    let alice_sessions = app.get("/api/auth/sessions").bearer_auth(&alice.token).fetch().await;
    let alice_session = alice_sessions.items()[0]["id"].as_str().unwrap().to_owned();

    app.delete(&format!("/api/auth/sessions/{alice_session}"))
        .bearer_auth(&mallory.token)
        .fetch()
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    app.me(&alice).await.assert_status(StatusCode::OK);

    app.delete("/api/auth/sessions/00000000-0000-4000-8000-000000000000")
        .bearer_auth(&mallory.token)
        .fetch()
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    app.delete("/api/auth/sessions/not-a-uuid").bearer_auth(&mallory.token).fetch().await.assert_invalid("id");
}

async fn access_tokens_expire_on_the_server_clock(app: TestApp) {
    let user = app.signup().await;

    app.advance(Duration::from_secs(29 * 60));
    app.me(&user).await.assert_status(StatusCode::OK);

    // Past 30 minutes (with room for a minute of leeway).
    app.advance(Duration::from_secs(3 * 60));
    app.me(&user).await.assert_unauthorized();

    // The refresh token outlives the access token.
    let refreshed = app.refresh(&user.refresh_token).await;
    refreshed.assert_status(StatusCode::OK);
    app.get("/api/users/me").bearer_auth(refreshed.str("access_token")).fetch().await.assert_status(StatusCode::OK);

    // The cookie keeps working as long as the login session lives.
    app.get("/api/users/me")
        .header("cookie", format!("palaver_session={}", user.session_cookie))
        .fetch()
        .await
        .assert_status(StatusCode::OK);
}

async fn refresh_tokens_expire_after_the_configured_days(app: TestApp) {
    let user = app.signup().await;

    app.advance(Duration::from_secs(13 * 86_400));
    let refreshed = app.refresh(&user.refresh_token).await;
    refreshed.assert_status(StatusCode::OK);
    let refresh = refreshed.str("refresh_token").to_owned();

    app.advance(Duration::from_secs(15 * 86_400));
    app.refresh(&refresh).await.assert_unauthorized();
    app.get("/api/users/me")
        .header("cookie", format!("palaver_session={}", user.session_cookie))
        .fetch()
        .await
        .assert_unauthorized();
    // A fresh login works again.
    let again = app.login_as(&user).await;
    app.me(&again).await.assert_status(StatusCode::OK);
}
