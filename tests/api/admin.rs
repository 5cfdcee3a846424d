//! SPEC §5 user management: GET /api/admin/users and PATCH
//! /api/admin/users/{id} `{role?, disabled?}`, for admins only.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Fetch, PASSWORD, TestApp, TestUser, assert_page, assert_user, db_tests};

db_tests!(
    admins_list_users_with_their_disabled_flag,
    the_user_list_is_paged,
    users_and_agents_cannot_manage_users,
    admins_change_roles,
    roles_are_validated,
    unknown_users_are_404,
    admins_cannot_change_their_own_role_or_disable_themselves,
    disabling_a_user_kills_their_tokens_at_once_and_blocks_login,
    an_admin_can_make_another_admin,
);

async fn patch_user(app: &TestApp, admin: &TestUser, id: &str, body: Value) -> crate::helpers::ApiResponse {
    app.patch(&format!("/api/admin/users/{id}")).bearer_auth(&admin.token).json(&body).fetch().await
}

async fn admins_list_users_with_their_disabled_flag(app: TestApp) {
    let admin = app.signup_admin().await;
    let alice = app.signup().await;

    let response = app.get("/api/admin/users").bearer_auth(&admin.token).fetch().await;
    response.assert_status(StatusCode::OK).assert_json();
    assert_page(&response.body, 1, 20, 2);
    let items = response.items();
    assert_eq!(items.len(), 2);
    let listed_alice = items.iter().find(|u| u["id"] == alice.id.as_str()).expect("alice is listed");
    assert_user(listed_alice, "user");
    assert_eq!(listed_alice["email"], alice.email.as_str());
    assert_eq!(listed_alice["disabled"], false);
    let listed_admin = items.iter().find(|u| u["id"] == admin.id.as_str()).expect("the admin is listed");
    assert_user(listed_admin, "admin");
    assert_eq!(listed_admin["disabled"], false);

    let me = app.me(&admin).await;
    assert_eq!(me.body["role"], "admin");
}

async fn the_user_list_is_paged(app: TestApp) {
    let admin = app.signup_admin().await;
    let _alice = app.signup().await;
    let _bob = app.signup().await;

    let first = app.get("/api/admin/users?page=1&per_page=2").bearer_auth(&admin.token).fetch().await;
    first.assert_status(StatusCode::OK);
    assert_page(&first.body, 1, 2, 3);
    assert_eq!(first.items().len(), 2);

    let second = app.get("/api/admin/users?page=2&per_page=2").bearer_auth(&admin.token).fetch().await;
    second.assert_status(StatusCode::OK);
    assert_page(&second.body, 2, 2, 3);
    assert_eq!(second.items().len(), 1);

    let mut ids: Vec<Value> = first.items().iter().chain(second.items()).map(|u| u["id"].clone()).collect();
    ids.sort_by_key(|v| v.to_string());
    ids.dedup();
    assert_eq!(ids.len(), 3, "pages neither overlap nor skip users");

    let beyond = app.get("/api/admin/users?page=9&per_page=2").bearer_auth(&admin.token).fetch().await;
    beyond.assert_status(StatusCode::OK);
    assert_page(&beyond.body, 9, 2, 3);
    assert!(beyond.items().is_empty());

    for query in ["page=0", "per_page=0", "per_page=101", "page=-1", "page=abc"] {
        let response = app.get(&format!("/api/admin/users?{query}")).bearer_auth(&admin.token).fetch().await;
        assert_eq!(response.status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {}", response.text);
        response.assert_error_shape();
    }
}

async fn users_and_agents_cannot_manage_users(app: TestApp) {
    let admin = app.signup_admin().await;
    let user = app.signup().await;
    let agent = app.signup().await;
    patch_user(&app, &admin, &agent.id, json!({ "role": "agent" })).await.assert_status(StatusCode::OK);
    let agent = app.login_as(&agent).await;

    for caller in [&user, &agent] {
        app.get("/api/admin/users")
            .bearer_auth(&caller.token)
            .fetch()
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
        patch_user(&app, caller, &caller.id, json!({ "role": "admin" }))
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
        patch_user(&app, caller, &admin.id, json!({ "disabled": true }))
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
    }
    // Nothing changed.
    assert_eq!(app.me(&user).await.body["role"], "user");
    assert_eq!(app.me(&agent).await.body["role"], "agent");
    app.me(&admin).await.assert_status(StatusCode::OK);
}

async fn admins_change_roles(app: TestApp) {
    let admin = app.signup_admin().await;
    let alice = app.signup().await;

    let response = patch_user(&app, &admin, &alice.id, json!({ "role": "agent" })).await;
    response.assert_status(StatusCode::OK).assert_json();
    assert_user(&response.body, "agent");
    assert_eq!(response.body["id"], alice.id.as_str());

    let list = app.get("/api/admin/users").bearer_auth(&admin.token).fetch().await;
    let listed = list.items().iter().find(|u| u["id"] == alice.id.as_str()).unwrap().clone();
    assert_eq!(listed["role"], "agent");

    let me = app.me(&app.login_as(&alice).await).await;
    assert_eq!(me.body["role"], "agent");

    let back = patch_user(&app, &admin, &alice.id, json!({ "role": "user" })).await;
    back.assert_status(StatusCode::OK);
    assert_eq!(back.body["role"], "user");
}

async fn roles_are_validated(app: TestApp) {
    let admin = app.signup_admin().await;
    let alice = app.signup().await;
    for role in [json!("superuser"), json!(""), json!(1), json!("Admin ")] {
        let response = patch_user(&app, &admin, &alice.id, json!({ "role": role })).await;
        assert_eq!(response.status, StatusCode::UNPROCESSABLE_ENTITY, "role {role}: {}", response.text);
        response.assert_invalid("role");
    }
    patch_user(&app, &admin, &alice.id, json!({ "disabled": "yes" })).await.assert_invalid("disabled");
    assert_eq!(app.me(&alice).await.body["role"], "user");
}

async fn unknown_users_are_404(app: TestApp) {
    let admin = app.signup_admin().await;
    patch_user(&app, &admin, "00000000-0000-4000-8000-000000000000", json!({ "role": "agent" }))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    patch_user(&app, &admin, "not-a-uuid", json!({ "role": "agent" })).await.assert_invalid("id");
}

async fn admins_cannot_change_their_own_role_or_disable_themselves(app: TestApp) {
    let admin = app.signup_admin().await;

    let demote = patch_user(&app, &admin, &admin.id, json!({ "role": "user" })).await;
    demote.assert_status(StatusCode::FORBIDDEN).assert_error_shape();
    let disable = patch_user(&app, &admin, &admin.id, json!({ "disabled": true })).await;
    disable.assert_status(StatusCode::FORBIDDEN).assert_error_shape();

    let me = app.me(&admin).await;
    me.assert_status(StatusCode::OK);
    assert_eq!(me.body["role"], "admin");
    app.get("/api/admin/users").bearer_auth(&admin.token).fetch().await.assert_status(StatusCode::OK);
}

async fn disabling_a_user_kills_their_tokens_at_once_and_blocks_login(app: TestApp) {
    let admin = app.signup_admin().await;
    let alice = app.signup().await;
    let conversation = app.new_conversation(&alice).await;

    let response = patch_user(&app, &admin, &alice.id, json!({ "disabled": true })).await;
    response.assert_status(StatusCode::OK).assert_json();
    assert_eq!(response.body["id"], alice.id.as_str());
    if let Some(disabled) = response.body.get("disabled") {
        assert_eq!(disabled, true);
    }

    app.me(&alice).await.assert_unauthorized();
    app.conversation(&alice, &conversation).await.assert_unauthorized();
    app.refresh(&alice.refresh_token).await.assert_unauthorized();
    app.get("/api/users/me")
        .header("cookie", format!("palaver_session={}", alice.session_cookie))
        .fetch()
        .await
        .assert_unauthorized();

    app.login(json!({ "login": alice.email, "password": PASSWORD }))
        .await
        .assert_error(StatusCode::FORBIDDEN, "account_disabled");
    // A wrong password still gets the plain 401: being disabled is no oracle.
    app.login(json!({ "login": alice.email, "password": "not the password" }))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");

    let list = app.get("/api/admin/users").bearer_auth(&admin.token).fetch().await;
    let listed = list.items().iter().find(|u| u["id"] == alice.id.as_str()).unwrap().clone();
    assert_eq!(listed["disabled"], true);

    // Enabled again, she can log in and finds her data.
    patch_user(&app, &admin, &alice.id, json!({ "disabled": false })).await.assert_status(StatusCode::OK);
    let alice = app.login_as(&alice).await;
    app.conversation(&alice, &conversation).await.assert_status(StatusCode::OK);
}

async fn an_admin_can_make_another_admin(app: TestApp) {
    let admin = app.signup_admin().await;
    let bob = app.signup().await;
    patch_user(&app, &admin, &bob.id, json!({ "role": "admin" })).await.assert_status(StatusCode::OK);
    let bob = app.login_as(&bob).await;
    let list = app.get("/api/admin/users").bearer_auth(&bob.token).fetch().await;
    list.assert_status(StatusCode::OK);
    assert_eq!(list.body["total"], 2);
    // The new admin may manage the first one (just not themselves).
    patch_user(&app, &bob, &admin.id, json!({ "role": "agent" })).await.assert_status(StatusCode::OK);
}
