//! Issue #11: token budgets and rate limits (SPEC §6). A budget is exact
//! under concurrency, on one instance and on two sharing PostgreSQL and
//! Redis; a killed request's reservation expires; a Redis that goes away
//! refuses budgeted requests (and only those) until it is back; refusals
//! and admissions carry `Retry-After` and OpenAI's `x-ratelimit-*` headers
//! on `/api` and `/v1`; usage is shown per user, key and model; the support
//! desk has a budget of its own; the `openai` SDK does not retry a spent budget.

use std::time::Duration;

use palaver::config::Secret;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    cluster::{PrivateRedis, with_cluster},
    gateway::create_key,
    helpers::{ApiResponse, DEFAULT_MODEL, Db, Fetch, TestApp, TestUser, db_tests, spawn_process_app_with},
    mock_llm::{MOCK_COMPLETION_TOKENS, MOCK_PROMPT_TOKENS},
};

db_tests!(
    a_budget_is_exact_under_100_concurrent_requests,
    api_sends_are_refused_past_the_budget_with_headers,
    rate_limits_answer_429_with_openai_headers,
    budgets_are_validated_and_removed_with_null,
    the_support_desk_has_a_daily_budget,
    a_deleted_users_counters_and_usage_go_with_them,
    a_retried_send_is_neither_limited_nor_charged_again;
    sqlite_only: the_openai_sdk_does_not_retry_a_spent_budget,
);

/// What one mock answer costs.
const SPENT: i64 = MOCK_PROMPT_TOKENS + MOCK_COMPLETION_TOKENS;
/// `max_tokens` of the gateway calls here: with "hello" (2 tokens and 4 of
/// overhead) each reserves 26, more than the 18 it spends.
const MAX_TOKENS: i64 = 20;
const RESERVED: i64 = 6 + MAX_TOKENS;

fn hello() -> Value {
    json!({ "model": DEFAULT_MODEL, "messages": [{ "role": "user", "content": "hello" }], "max_tokens": MAX_TOKENS })
}

async fn complete(client: &reqwest::Client, address: &str, key: &str) -> ApiResponse {
    client.post(format!("{address}/v1/chat/completions")).bearer_auth(key).json(&hello()).fetch().await
}

/// An admin sets `user`'s budget through the API.
async fn set_budget(app: &TestApp, admin: &TestUser, user: &TestUser, budget: Value) -> ApiResponse {
    app.patch(&format!("/api/admin/users/{}", user.id)).bearer_auth(&admin.token).json(&budget).fetch().await
}

/// A user with a daily budget of `tokens` and an API key.
async fn budgeted_user(app: &TestApp, tokens: i64) -> (TestUser, String) {
    let admin = app.signup_admin().await;
    let user = app.signup().await;
    let r = set_budget(app, &admin, &user, json!({ "token_budget": tokens, "budget_period": "day" })).await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.body["token_budget"], tokens);
    assert_eq!(r.body["budget_period"], "day");
    let key = create_key(app, &user, json!({ "name": "budgeted" })).await;
    (user, key["key"].as_str().unwrap().to_owned())
}

/// The user's usage once every settlement has landed (settling is detached).
async fn settled_usage(client: &reqwest::Client, address: &str, user: &TestUser, expect_total: i64) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        let r = client.get(format!("{address}/api/users/me/usage")).bearer_auth(&user.token).fetch().await;
        r.assert_status(StatusCode::OK);
        last = r.body.clone();
        if last["total_tokens"] == expect_total {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("usage never reached {expect_total} tokens: {last}");
}

#[track_caller]
fn assert_budget_refusal_v1(r: &ApiResponse) {
    r.assert_status(StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.body["error"]["type"], "insufficient_quota", "{}", r.text);
    assert_eq!(r.body["error"]["code"], "budget_exceeded", "{}", r.text);
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let retry: u64 = r.header("retry-after").expect("Retry-After").parse().expect("whole seconds");
    assert!((1..=86_400).contains(&retry), "Retry-After runs to the end of the day: {retry}");
    assert!(r.header("x-ratelimit-limit-tokens").is_some(), "the tokens trio: {:?}", r.headers);
}

/// Fires `n` gateway calls at once, spread over `addresses`; answers how
/// many were answered, checking every refusal.
async fn hammer(addresses: &[String], key: &str, n: usize) -> i64 {
    let client = reqwest::Client::new();
    let calls = (0..n).map(|i| {
        let (client, address, key) = (client.clone(), addresses[i % addresses.len()].clone(), key.to_owned());
        tokio::spawn(async move { complete(&client, &address, &key).await })
    });
    let mut answered = 0;
    for call in futures::future::join_all(calls).await {
        let r = call.expect("a call task");
        if r.status == StatusCode::OK {
            assert_eq!(r.body["usage"]["total_tokens"], SPENT);
            answered += 1;
        } else {
            assert_budget_refusal_v1(&r);
        }
    }
    answered
}

/// The settled total never passes the budget, and what fits is not refused.
async fn assert_exact(addresses: &[String], user: &TestUser, key: &str, budget: i64) {
    let answered = hammer(addresses, key, 100).await;
    let client = reqwest::Client::new();
    let usage = settled_usage(&client, &addresses[0], user, answered * SPENT).await;
    assert!(answered * SPENT <= budget, "{answered} answers of {SPENT} tokens passed the budget of {budget}");
    assert!(answered >= budget / RESERVED, "only {answered} of 100 answered within a budget of {budget}");
    assert_eq!(usage["token_budget"], budget);
    assert_eq!(usage["remaining_tokens"], budget - answered * SPENT);
    assert_eq!(usage["models"][0]["model"], DEFAULT_MODEL);
    assert_eq!(usage["models"][0]["requests"], answered);
    // Out of budget: the next call is refused (what is left is below a reservation)
    // or, if one still fits, answered within it.
    let next = complete(&client, &addresses[1 % addresses.len()], key).await;
    if budget - answered * SPENT < RESERVED {
        assert_budget_refusal_v1(&next);
    }
}

async fn a_budget_is_exact_under_100_concurrent_requests(app: TestApp) {
    let budget = 20 * SPENT;
    let (user, key) = budgeted_user(&app, budget).await;
    assert_exact(std::slice::from_ref(&app.address), &user, &key, budget).await;
    // The key shows the same usage in the key list.
    let keys = app.get("/api/keys").bearer_auth(&user.token).fetch().await;
    keys.assert_status(StatusCode::OK);
    let usage = &keys.items()[0]["usage"];
    assert!(usage["total_tokens"].as_i64().unwrap() > 0, "{usage}");
    assert!(usage["total_tokens"].as_i64().unwrap() <= budget, "{usage}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_share_one_budget_exactly() {
    with_cluster(|a, b, redis| async move {
        // Kept whole for the test's length (a field alone would be captured).
        let (b, _redis) = (b, redis);
        let budget = 20 * SPENT;
        let (user, key) = budgeted_user(&a, budget).await;
        assert_exact(&[a.address.clone(), b.address.clone()], &user, &key, budget).await;
    })
    .await;
}

/// The "done means": one user hammering three instances (one
/// PostgreSQL, one Redis) through the web API and the OpenAI API at once
/// gets at most their budget of answers, and what fits is answered.
#[tokio::test(flavor = "multi_thread")]
async fn three_instances_and_both_apis_share_one_budget_exactly() {
    let Some(redis) = PrivateRedis::start().await else { return };
    let url = redis.url();
    // Sends on /api reserve what /v1 calls with `max_tokens` do.
    let Some(mut a) = spawn_process_app_with(Db::Postgres, |s| {
        s.server.redis_url = Some(Secret(url));
        s.limits.budget_default_reserve = MAX_TOKENS as u32;
    })
    .await
    else {
        return;
    };
    let (b, c) = (a.sibling().await, a.sibling().await);
    let database = a.database.clone();
    let outcome = tokio::spawn(async move {
        let (_b, _c, _redis) = (&b, &c, &redis);
        let budget = 30 * SPENT;
        let (user, key) = budgeted_user(&a, budget).await;
        let addresses = [a.address.clone(), b.address.clone(), c.address.clone()];
        let client = reqwest::Client::new();
        let calls = (0..120).map(|i| {
            let (client, address, key, token) =
                (client.clone(), addresses[i % 3].clone(), key.clone(), user.token.clone());
            tokio::spawn(async move {
                if i % 2 == 0 {
                    (true, complete(&client, &address, &key).await)
                } else {
                    let send = client.post(format!("{address}/api/chat")).bearer_auth(&token);
                    (false, send.json(&json!({ "message": "hello" })).fetch().await)
                }
            })
        });
        let mut answered = 0;
        for call in futures::future::join_all(calls).await {
            match call.expect("a call task") {
                (_, r) if r.status == StatusCode::OK => answered += 1,
                (true, r) => assert_budget_refusal_v1(&r),
                (false, r) => {
                    r.assert_error(StatusCode::TOO_MANY_REQUESTS, "budget_exceeded");
                }
            }
        }
        let usage = settled_usage(&client, &addresses[2], &user, answered * SPENT).await;
        assert!(answered * SPENT <= budget, "{answered} answers of {SPENT} tokens passed the budget of {budget}");
        assert!(answered >= budget / RESERVED, "only {answered} of 120 answered within a budget of {budget}");
        assert_eq!(usage["remaining_tokens"], budget - answered * SPENT);
        assert_eq!(usage["models"][0]["requests"], answered);
    })
    .await;
    database.drop_schema().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn api_sends_are_refused_past_the_budget_with_headers(app: TestApp) {
    let admin = app.signup_admin().await;
    let user = app.signup().await;
    // Enough for one reply: the message (1 token and 4 of overhead) plus the default reserve.
    let budget = 5 + app.settings.limits.budget_default_reserve as i64;
    set_budget(&app, &admin, &user, json!({ "token_budget": budget })).await.assert_status(StatusCode::OK);
    let ok = app.post("/api/chat").bearer_auth(&user.token).json(&json!({ "message": "four" })).fetch().await;
    ok.assert_status(StatusCode::OK);
    assert_eq!(ok.header("x-ratelimit-limit-tokens"), Some(budget.to_string().as_str()));
    assert!(ok.header("x-ratelimit-reset-tokens").is_some_and(|r| r.ends_with('s')));
    assert_eq!(ok.header("x-ratelimit-remaining-tokens"), Some("0"), "the whole budget was held by that reply");
    settled_usage(&app.client, &app.address, &user, SPENT).await;
    let refused = app.post("/api/chat").bearer_auth(&user.token).json(&json!({ "message": "four" })).fetch().await;
    refused.assert_error(StatusCode::TOO_MANY_REQUESTS, "budget_exceeded");
    assert!(refused.header("retry-after").is_some());
    assert_eq!(refused.header("x-ratelimit-remaining-tokens"), Some((budget - SPENT).to_string().as_str()));
    // Nothing of a refused send was stored, and the SSE path is refused alike.
    let stream =
        app.post("/api/chat/stream").bearer_auth(&user.token).json(&json!({ "message": "four" })).fetch().await;
    stream.assert_error(StatusCode::TOO_MANY_REQUESTS, "budget_exceeded");
    let history = app.get("/api/history").bearer_auth(&user.token).fetch().await;
    assert_eq!(history.body["total"], 1);
    // The admin sees the same usage; the next day the budget is whole again.
    let seen = app.get(&format!("/api/admin/users/{}/usage", user.id)).bearer_auth(&admin.token).fetch().await;
    seen.assert_status(StatusCode::OK);
    assert_eq!(seen.body["total_tokens"], SPENT);
    assert_eq!(seen.body["remaining_tokens"], budget - SPENT);
    app.advance(Duration::from_secs(86_400));
    let user = app.login_as(&user).await;
    let again = app.post("/api/chat").bearer_auth(&user.token).json(&json!({ "message": "four" })).fetch().await;
    again.assert_status(StatusCode::OK);
}

async fn rate_limits_answer_429_with_openai_headers(mut app: TestApp) {
    app.restart_with(|s| s.limits.rate_limit_rpm = Some(3)).await;
    let user = app.signup().await;
    for left in [2, 1, 0] {
        let r = app.post("/api/chat").bearer_auth(&user.token).json(&json!({ "message": "hi" })).fetch().await;
        r.assert_status(StatusCode::OK);
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some(left.to_string().as_str()));
        assert!(r.header("x-ratelimit-reset-requests").is_some());
        assert!(r.header("x-ratelimit-limit-tokens").is_none(), "no budget, no tokens trio");
    }
    let refused = app.post("/api/chat").bearer_auth(&user.token).json(&json!({ "message": "hi" })).fetch().await;
    refused.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert_eq!(refused.header("retry-after"), Some("20"));
    assert_eq!(refused.header("x-ratelimit-remaining-requests"), Some("0"));
    // The same limit on /v1, in OpenAI's shape and retryable.
    let key = create_key(&app, &user, json!({ "name": "rated" })).await;
    let key = key["key"].as_str().unwrap().to_owned();
    let v1 = complete(&app.client, &app.address, &key).await;
    v1.assert_status(StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(v1.body["error"]["type"], "rate_limit_error");
    assert_eq!(v1.header("x-should-retry"), Some("true"));
    app.advance(Duration::from_secs(20));
    complete(&app.client, &app.address, &key).await.assert_status(StatusCode::OK);
    // A key's own rpm holds on top of the user's.
    app.advance(Duration::from_secs(60));
    let id = app.get("/api/keys").bearer_auth(&user.token).fetch().await.items()[0]["id"].as_str().unwrap().to_owned();
    let patched =
        app.patch(&format!("/api/keys/{id}")).bearer_auth(&user.token).json(&json!({ "rpm": 1 })).fetch().await;
    patched.assert_status(StatusCode::OK);
    assert_eq!(patched.body["rpm"], 1);
    complete(&app.client, &app.address, &key).await.assert_status(StatusCode::OK);
    let second = complete(&app.client, &app.address, &key).await;
    second.assert_status(StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(second.header("x-ratelimit-limit-requests"), Some("1"));
}

async fn budgets_are_validated_and_removed_with_null(app: TestApp) {
    let admin = app.signup_admin().await;
    let user = app.signup().await;
    set_budget(&app, &admin, &user, json!({ "token_budget": -1 })).await.assert_invalid("token_budget");
    set_budget(&app, &admin, &user, json!({ "token_budget": 2.5 })).await.assert_invalid("token_budget");
    let r = set_budget(&app, &admin, &user, json!({ "token_budget": 700.0 })).await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.body["token_budget"], 700);
    let r = set_budget(&app, &admin, &user, json!({ "token_budget": 0, "budget_period": "month" })).await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.body["budget_period"], "month");
    let refused = app.post("/api/chat").bearer_auth(&user.token).json(&json!({ "message": "hi" })).fetch().await;
    refused.assert_error(StatusCode::TOO_MANY_REQUESTS, "budget_exceeded");
    let r = set_budget(&app, &admin, &user, json!({ "token_budget": null })).await;
    r.assert_status(StatusCode::OK);
    assert!(r.body["token_budget"].is_null());
    app.post("/api/chat")
        .bearer_auth(&user.token)
        .json(&json!({ "message": "hi" }))
        .fetch()
        .await
        .assert_status(StatusCode::OK);
    // Nobody but the admin sets a user's budget; a key's budget is its owner's to set.
    set_budget(&app, &user, &user, json!({ "token_budget": 5 })).await.assert_error(StatusCode::FORBIDDEN, "forbidden");
    let key = create_key(&app, &user, json!({ "name": "k" })).await;
    let (id, secret) = (key["id"].as_str().unwrap(), key["key"].as_str().unwrap());
    let other = app.signup().await;
    let path = format!("/api/keys/{id}");
    let body = json!({ "token_budget": 0 });
    app.patch(&path)
        .bearer_auth(&other.token)
        .json(&body)
        .fetch()
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    let set = app.patch(&path).bearer_auth(&admin.token).json(&body).fetch().await;
    set.assert_status(StatusCode::OK);
    assert_eq!(set.body["token_budget"], 0);
    assert_budget_refusal_v1(&complete(&app.client, &app.address, secret).await);
    let usage = app.get("/api/users/me/usage?period=year").bearer_auth(&user.token).fetch().await;
    usage.assert_invalid("period");
    // A repeated key keeps its last value, as on every other query here.
    let usage = app.get("/api/users/me/usage?period=day&period=month").bearer_auth(&user.token).fetch().await;
    usage.assert_status(StatusCode::OK);
    assert_eq!(usage.body["period"], "month");
    let path = format!("/api/admin/users/{}/usage?period=null&period=null", user.id);
    app.get(&path).bearer_auth(&admin.token).fetch().await.assert_invalid("period");
}

async fn the_support_desk_has_a_daily_budget(mut app: TestApp) {
    app.restart_with(|s| s.limits.support_token_budget = Some(1)).await;
    let visitor = crate::support::visitor(&app, "Ada").await;
    let r = app
        .post(&format!("/api/support/sessions/{}/messages", visitor.id))
        .bearer_auth(&visitor.token)
        .json(&json!({ "content": "hello there" }))
        .fetch()
        .await;
    r.assert_error(StatusCode::TOO_MANY_REQUESTS, "budget_exceeded");
    assert!(r.str("detail").contains("support desk"), "{}", r.text);
}

async fn a_retried_send_is_neither_limited_nor_charged_again(app: TestApp) {
    let admin = app.signup_admin().await;
    let user = app.signup().await;
    let budget = 5 + app.settings.limits.budget_default_reserve as i64;
    set_budget(&app, &admin, &user, json!({ "token_budget": budget })).await.assert_status(StatusCode::OK);
    let send = |key: Option<&str>| {
        let mut request = app.post("/api/chat").bearer_auth(&user.token).json(&json!({ "message": "four" }));
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.fetch()
    };
    let first = send(Some("retry-1")).await;
    first.assert_status(StatusCode::OK);
    settled_usage(&app.client, &app.address, &user, SPENT).await;
    // The budget has no room for another reply, but a retry starts none.
    let again = send(Some("retry-1")).await;
    again.assert_status(StatusCode::OK);
    assert_eq!(again.body["assistant_message"]["id"], first.body["assistant_message"]["id"], "{}", again.text);
    send(None).await.assert_error(StatusCode::TOO_MANY_REQUESTS, "budget_exceeded");
    let usage = app.get("/api/users/me/usage").bearer_auth(&user.token).fetch().await;
    assert_eq!(usage.body["total_tokens"], SPENT, "the retry cost nothing: {}", usage.text);
}

async fn a_deleted_users_counters_and_usage_go_with_them(app: TestApp) {
    let (user, key) = budgeted_user(&app, 20 * SPENT).await;
    complete(&app.client, &app.address, &key).await.assert_status(StatusCode::OK);
    settled_usage(&app.client, &app.address, &user, SPENT).await;
    let key_id =
        app.get("/api/keys").bearer_auth(&user.token).fetch().await.items()[0]["id"].as_str().unwrap().to_owned();
    let subjects = [format!("user:{}", user.id), format!("key:{key_id}")];
    let rows = "SELECT (SELECT COUNT(*) FROM quota_usage WHERE subject IN ($1, $2)) \
                + (SELECT COUNT(*) FROM quota_counters WHERE subject IN ($1, $2))";
    let params = [subjects[0].as_str(), subjects[1].as_str()];
    assert!(app.database.scalar(rows, &params).await > 0, "the user's usage was kept");
    let r =
        app.delete("/api/users/me").bearer_auth(&user.token).json(&json!({ "password": user.password })).fetch().await;
    r.assert_status(StatusCode::NO_CONTENT);
    assert_eq!(app.database.scalar(rows, &params).await, 0, "the deleted user's usage stayed behind");
}

/// A killed instance's reservation stops counting once its TTL is up.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_requests_reservation_expires() {
    let Some(mut app) = spawn_process_app_with(Db::Sqlite, |s| s.limits.budget_reservation_ttl = 2).await else {
        return;
    };
    let (_user, key) = budgeted_user(&app, RESERVED).await;
    app.provider.hang();
    let (client, address, hung_key) = (app.client.clone(), app.address.clone(), key.clone());
    let hung = tokio::spawn(async move { complete(&client, &address, &hung_key).await });
    for _ in 0..100 {
        if app.provider.request_count() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(app.provider.request_count() > 0, "the hung request never reached the provider");
    app.kill_server().await;
    let _ = hung.await;
    app.restart().await;
    app.provider.reply_with("back");
    assert_budget_refusal_v1(&complete(&app.client, &app.address, &key).await);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    complete(&app.client, &app.address, &key).await.assert_status(StatusCode::OK);
}

/// Redis away: budgeted requests 503 `limits_unavailable`, the others go on,
/// `/ready` says so; Redis back: budgets work again.
#[tokio::test(flavor = "multi_thread")]
async fn redis_down_refuses_budgeted_requests_until_it_is_back() {
    let Some(mut redis) = PrivateRedis::start().await else { return };
    let url = redis.url();
    let Some(app) = spawn_process_app_with(Db::Sqlite, |s| s.server.redis_url = Some(Secret(url))).await else {
        return;
    };
    let (user, key) = budgeted_user(&app, 100 * SPENT).await;
    let free = app.signup().await;
    let free_key = create_key(&app, &free, json!({ "name": "free" })).await;
    let free_key = free_key["key"].as_str().unwrap().to_owned();
    complete(&app.client, &app.address, &key).await.assert_status(StatusCode::OK);
    // A request under way when Redis goes: it settles while Redis is away.
    app.provider.chunk_delay(Duration::from_millis(300));
    let before = app.provider.request_count();
    let (client, address, busy_key) = (app.client.clone(), app.address.clone(), key.clone());
    let in_flight = tokio::spawn(async move { complete(&client, &address, &busy_key).await });
    while app.provider.request_count() == before {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    redis.kill().await;
    in_flight.await.expect("the call task").assert_status(StatusCode::OK);
    app.provider.chunk_delay(Duration::ZERO);
    let refused = complete(&app.client, &app.address, &key).await;
    refused.assert_status(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.body["error"]["code"], "limits_unavailable", "{}", refused.text);
    complete(&app.client, &app.address, &free_key).await.assert_status(StatusCode::OK);
    let ready = app.get("/ready").fetch().await;
    ready.assert_status(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.body["limits"], "unavailable");
    redis.run().await;
    let mut last = None;
    for _ in 0..50 {
        let r = complete(&app.client, &app.address, &key).await;
        if r.status == StatusCode::OK {
            last = None;
            break;
        }
        last = Some(r.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(last.is_none(), "budgeted requests did not come back with Redis: {last:?}");
    // The restarted Redis was empty: it counts on from the database's copy,
    // which holds the answer settled while Redis was away: three answers in all.
    let mut usage = Value::Null;
    for _ in 0..100 {
        usage = app.get("/api/users/me/usage").bearer_auth(&user.token).fetch().await.body;
        if usage["remaining_tokens"] == 97 * SPENT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(usage["remaining_tokens"], 97 * SPENT, "{usage}");
}

async fn the_openai_sdk_does_not_retry_a_spent_budget(app: TestApp) {
    let Some(python) = crate::sdk::sdk_python().await else { return };
    let (_user, key) = budgeted_user(&app, 0).await;
    let out = tokio::process::Command::new(python)
        .env_clear()
        .args(["-u", "openai_budget.py"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk"))
        .env("HOME", &app.settings.server.data_dir)
        .env("PALAVER_BASE_URL", app.url("/v1"))
        .env("PALAVER_API_KEY", &key)
        .env("PALAVER_MODEL", DEFAULT_MODEL)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run openai_budget.py");
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "openai_budget.py failed:\n{printed}");
}
