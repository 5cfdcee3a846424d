//! SPEC §2 the current user: GET/PATCH/DELETE /api/users/me, password change
//! and account deletion.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{Fetch, PASSWORD, TestApp, assert_user, db_tests};

db_tests!(
    me_returns_the_current_user,
    display_name_can_be_changed,
    nobody_can_make_themselves_admin_through_me,
    password_change_needs_the_current_password,
    password_change_revokes_the_other_sessions_only,
    new_password_is_validated,
    deleting_the_account_needs_the_password,
    deleting_the_account_removes_the_user_and_their_data,
);

async fn me_returns_the_current_user(app: TestApp) {
    let user = app.signup().await;
    let response = app.me(&user).await;
    response.assert_status(StatusCode::OK).assert_json();
    assert_user(&response.body, "user");
    assert_eq!(response.body["id"], user.id.as_str());
    assert_eq!(response.body["email"], user.email.as_str());
    assert_eq!(response.body["username"], user.username.as_str());
    assert_eq!(response.body["display_name"], "Test User");
}

async fn display_name_can_be_changed(app: TestApp) {
    let user = app.signup().await;
    let response = app
        .patch("/api/users/me")
        .bearer_auth(&user.token)
        .json(&json!({ "display_name": "Zoë Ünicode" }))
        .fetch()
        .await;
    response.assert_status(StatusCode::OK);
    assert_user(&response.body, "user");
    assert_eq!(response.body["display_name"], "Zoë Ünicode");
    assert_eq!(response.body["email"], user.email.as_str(), "untouched fields stay");

    let me = app.me(&user).await;
    assert_eq!(me.body["display_name"], "Zoë Ünicode");

    // An empty patch changes nothing.
    let empty = app.patch("/api/users/me").bearer_auth(&user.token).json(&json!({})).fetch().await;
    empty.assert_status(StatusCode::OK);
    assert_eq!(empty.body["display_name"], "Zoë Ünicode");

    // Wrong types are refused, naming the field.
    app.patch("/api/users/me")
        .bearer_auth(&user.token)
        .json(&json!({ "display_name": 7 }))
        .fetch()
        .await
        .assert_invalid("display_name");
}

async fn nobody_can_make_themselves_admin_through_me(app: TestApp) {
    let user = app.signup().await;
    let response = app
        .patch("/api/users/me")
        .bearer_auth(&user.token)
        .json(&json!({ "role": "admin", "display_name": "Sneaky" }))
        .fetch()
        .await;
    response.assert_status(StatusCode::OK);
    assert_eq!(response.body["role"], "user");
    assert_eq!(response.body["display_name"], "Sneaky");

    let me = app.me(&user).await;
    assert_eq!(me.body["role"], "user");
    app.get("/api/admin/users").bearer_auth(&user.token).fetch().await.assert_error(StatusCode::FORBIDDEN, "forbidden");
    // Not after a fresh login either.
    let again = app.login_as(&user).await;
    app.get("/api/admin/users")
        .bearer_auth(&again.token)
        .fetch()
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
}

async fn password_change_needs_the_current_password(app: TestApp) {
    let user = app.signup().await;
    let new_password = "a brand new passphrase";

    app.patch("/api/users/me")
        .bearer_auth(&user.token)
        .json(&json!({ "password": new_password }))
        .fetch()
        .await
        .assert_invalid("current_password");

    app.patch("/api/users/me")
        .bearer_auth(&user.token)
        .json(&json!({ "password": new_password, "current_password": "not my password" }))
        .fetch()
        .await
        .assert_error(StatusCode::FORBIDDEN, "wrong_password");

    // Neither attempt changed anything.
    app.login(json!({ "login": user.email, "password": PASSWORD })).await.assert_status(StatusCode::OK);
    app.login(json!({ "login": user.email, "password": new_password }))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
}

async fn password_change_revokes_the_other_sessions_only(app: TestApp) {
    let user = app.signup().await;
    let other = app.login_as(&user).await;
    let new_password = "a brand new passphrase";

    let response = app
        .patch("/api/users/me")
        .bearer_auth(&user.token)
        .json(&json!({ "password": new_password, "current_password": PASSWORD }))
        .fetch()
        .await;
    response.assert_status(StatusCode::OK);
    assert_user(&response.body, "user");
    assert_eq!(response.body["id"], user.id.as_str());

    // The session that changed the password keeps working...
    app.me(&user).await.assert_status(StatusCode::OK);
    app.refresh(&user.refresh_token).await.assert_status(StatusCode::OK);
    // ...every other one is gone.
    app.me(&other).await.assert_unauthorized();
    app.refresh(&other.refresh_token).await.assert_unauthorized();
    app.get("/api/users/me")
        .header("cookie", format!("palaver_session={}", other.session_cookie))
        .fetch()
        .await
        .assert_unauthorized();

    app.login(json!({ "login": user.email, "password": new_password })).await.assert_status(StatusCode::OK);
    app.login(json!({ "login": user.email, "password": PASSWORD }))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
}

async fn new_password_is_validated(app: TestApp) {
    let user = app.signup().await;
    app.patch("/api/users/me")
        .bearer_auth(&user.token)
        .json(&json!({ "password": "short", "current_password": PASSWORD }))
        .fetch()
        .await
        .assert_invalid("password");
    app.login(json!({ "login": user.email, "password": PASSWORD })).await.assert_status(StatusCode::OK);
}

async fn deleting_the_account_needs_the_password(app: TestApp) {
    let user = app.signup().await;

    app.delete("/api/users/me")
        .bearer_auth(&user.token)
        .json(&json!({ "password": "not my password" }))
        .fetch()
        .await
        .assert_error(StatusCode::FORBIDDEN, "wrong_password");
    app.delete("/api/users/me").bearer_auth(&user.token).json(&json!({})).fetch().await.assert_invalid("password");

    app.me(&user).await.assert_status(StatusCode::OK);
}

async fn deleting_the_account_removes_the_user_and_their_data(app: TestApp) {
    let user = app.signup().await;
    let conversation = app.new_conversation(&user).await;
    app.say(&user, &conversation, "remember me").await;

    let response =
        app.delete("/api/users/me").bearer_auth(&user.token).json(&json!({ "password": PASSWORD })).fetch().await;
    response.assert_status(StatusCode::NO_CONTENT);

    app.me(&user).await.assert_unauthorized();
    app.refresh(&user.refresh_token).await.assert_unauthorized();
    app.login(json!({ "login": user.email, "password": PASSWORD }))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");

    // The email and username are free again, and the new account starts empty.
    let again = app.register(json!({ "email": user.email, "username": user.username, "password": PASSWORD })).await;
    again.assert_status(StatusCode::CREATED);
    assert_ne!(again.body["id"], user.id.as_str(), "a new account, not the old one revived");
    let mut newcomer = user.clone();
    newcomer.id = again.str("id").to_owned();
    let newcomer = app.login_as(&newcomer).await;

    let list = app.get("/api/conversations").bearer_auth(&newcomer.token).fetch().await;
    list.assert_status(StatusCode::OK);
    assert_eq!(list.body["total"], 0, "{}", list.text);
    assert!(list.items().is_empty());
    app.conversation(&newcomer, &conversation).await.assert_error(StatusCode::NOT_FOUND, "not_found");
    let history = app.get("/api/history").bearer_auth(&newcomer.token).fetch().await;
    assert_eq!(history.body["total"], 0, "{}", history.text);

    // And the rows are really gone, not just hidden.
    let db = &app.database;
    assert_eq!(db.scalar("SELECT COUNT(*) FROM users WHERE id = $1", &[&user.id]).await, 0);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM conversations WHERE id = $1", &[&conversation]).await, 0);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM messages WHERE conversation_id = $1", &[&conversation]).await, 0);
}
