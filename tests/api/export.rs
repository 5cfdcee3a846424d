//! SPEC §3 export: a conversation as a JSON or Markdown attachment with
//! every message in order (also thousands of them), 404 for anyone else's,
//! and the caller's whole account as one JSON download without key secrets.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::gateway::create_key;
use crate::helpers::{Fetch, TestApp, TestUser, db_tests};

db_tests!(
    a_conversation_exports_as_json_with_every_message_in_order,
    a_conversation_exports_as_markdown,
    export_formats_are_validated,
    other_users_conversations_do_not_export,
    thousands_of_messages_export_completely,
    the_account_export_holds_everything_but_secrets,
);

struct Download {
    status: StatusCode,
    content_type: String,
    disposition: String,
    text: String,
}

async fn download(app: &TestApp, user: &TestUser, path: &str) -> Download {
    let r = app.get(path).bearer_auth(&user.token).send().await.unwrap();
    let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let (content_type, disposition) = (header("content-type"), header("content-disposition"));
    Download { status: r.status(), content_type, disposition, text: r.text().await.unwrap() }
}

/// A conversation titled `title` with `n` exchanges; its id and every
/// message as the API lists them, oldest first.
async fn conversation_with(app: &TestApp, user: &TestUser, title: Option<&str>, n: usize) -> (String, Vec<Value>) {
    let body = title.map_or(json!({}), |t| json!({ "title": t }));
    let cid = app.create_conversation(user, body).await["id"].as_str().unwrap().to_owned();
    for i in 0..n {
        app.tick();
        app.say(user, &cid, &format!("question {i}: **bold** and\nnew line")).await;
    }
    let r = app.messages(user, &cid, "?limit=100").await;
    r.assert_status(StatusCode::OK);
    (cid, r.items().clone())
}

async fn a_conversation_exports_as_json_with_every_message_in_order(app: TestApp) {
    let user = app.signup().await;
    let (cid, messages) = conversation_with(&app, &user, Some("Trip to Lisbon!"), 3).await;
    assert_eq!(messages.len(), 6);
    for path in [format!("/api/conversations/{cid}/export"), format!("/api/conversations/{cid}/export?format=json")] {
        let d = download(&app, &user, &path).await;
        assert_eq!(d.status, StatusCode::OK, "{}", d.text);
        assert!(d.content_type.starts_with("application/json"), "{}", d.content_type);
        assert_eq!(d.disposition, "attachment; filename=\"trip-to-lisbon.json\"");
        let body: Value = serde_json::from_str(&d.text).expect("one JSON document");
        assert_eq!(body["id"], cid.as_str());
        assert_eq!(body["title"], "Trip to Lisbon!");
        assert_eq!(body["message_count"], 6);
        assert_eq!(body["messages"].as_array().unwrap(), &messages, "the same messages, in the same order");
    }
    // Untitled: the file is named by the id.
    let (untitled, _) = conversation_with(&app, &user, None, 0).await;
    let d = download(&app, &user, &format!("/api/conversations/{untitled}/export")).await;
    assert_eq!(d.status, StatusCode::OK);
    assert_eq!(d.disposition, format!("attachment; filename=\"{untitled}.json\""));
    let body: Value = serde_json::from_str(&d.text).unwrap();
    assert_eq!(body["messages"], json!([]));
}

async fn a_conversation_exports_as_markdown(app: TestApp) {
    let user = app.signup().await;
    let (cid, messages) = conversation_with(&app, &user, Some("Notes: été 2026"), 2).await;
    let d = download(&app, &user, &format!("/api/conversations/{cid}/export?format=markdown")).await;
    assert_eq!(d.status, StatusCode::OK, "{}", d.text);
    assert_eq!(d.content_type, "text/markdown; charset=utf-8");
    assert_eq!(d.disposition, "attachment; filename=\"notes-t-2026.md\"");
    assert!(d.text.starts_with("# Notes: été 2026\n"), "{}", d.text);
    let mut at = 0;
    for m in &messages {
        let heading = format!("## {} · {}", m["role"].as_str().unwrap(), m["created_at"].as_str().unwrap());
        let content = m["content"].as_str().unwrap();
        let h = at + d.text[at..].find(&heading).unwrap_or_else(|| panic!("{heading} after {at}:\n{}", d.text));
        let c = h + d.text[h..].find(content).unwrap_or_else(|| panic!("{content:?} after {h}:\n{}", d.text));
        at = c + content.len();
    }
    assert_eq!(d.text.matches("\n## ").count(), messages.len());
}

async fn export_formats_are_validated(app: TestApp) {
    let user = app.signup().await;
    let cid = app.new_conversation(&user).await;
    for format in ["pdf", "", "JSON", "markdown%00"] {
        let r =
            app.get(&format!("/api/conversations/{cid}/export?format={format}")).bearer_auth(&user.token).fetch().await;
        r.assert_invalid("format");
    }
    app.get(&format!("/api/conversations/{cid}/export")).fetch().await.assert_unauthorized();
    app.get("/api/users/me/export").fetch().await.assert_unauthorized();
}

async fn other_users_conversations_do_not_export(app: TestApp) {
    let alice = app.signup().await;
    let bob = app.signup().await;
    let (cid, _) = conversation_with(&app, &alice, Some("private"), 1).await;
    for format in ["json", "markdown"] {
        let r =
            app.get(&format!("/api/conversations/{cid}/export?format={format}")).bearer_auth(&bob.token).fetch().await;
        r.assert_error(StatusCode::NOT_FOUND, "not_found");
    }
    let r = app
        .get("/api/conversations/00000000-0000-4000-8000-000000000000/export")
        .bearer_auth(&alice.token)
        .fetch()
        .await;
    r.assert_status(StatusCode::NOT_FOUND);
    app.get("/api/conversations/nope/export").bearer_auth(&alice.token).fetch().await.assert_client_error();
    let mine = download(&app, &bob, "/api/users/me/export").await;
    assert!(!mine.text.contains(&cid), "bob's export holds alice's conversation");
}

const BULK: i64 = 3_000;

async fn thousands_of_messages_export_completely(app: TestApp) {
    let user = app.signup().await;
    let cid = app.create_conversation(&user, json!({ "title": "Bulk" })).await["id"].as_str().unwrap().to_owned();
    let inserted = app
        .database
        .execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000) \
             INSERT INTO messages (id, conversation_id, role, content, status, usage_estimated, created_at, \
             updated_at, seq) \
             SELECT $1 || '-' || CAST(i AS TEXT), $1, CASE WHEN i % 2 = 1 THEN 'user' ELSE 'assistant' END, \
             'bulk message ' || CAST(i AS TEXT), 'complete', 0, 1700000000000 + i, 1700000000000 + i, i FROM n",
            &[cid.as_str()],
        )
        .await;
    assert_eq!(inserted, BULK as u64);

    let d = download(&app, &user, &format!("/api/conversations/{cid}/export")).await;
    assert_eq!(d.status, StatusCode::OK);
    let body: Value = serde_json::from_str(&d.text).expect("complete JSON");
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len() as i64, BULK);
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(m["content"], format!("bulk message {}", i + 1), "message {i} in order");
    }

    let d = download(&app, &user, &format!("/api/conversations/{cid}/export?format=markdown")).await;
    assert_eq!(d.status, StatusCode::OK);
    assert_eq!(d.text.matches("\n## ").count() as i64, BULK);
    assert!(d.text.trim_end().ends_with(&format!("bulk message {BULK}")), "cut short");

    let account = download(&app, &user, "/api/users/me/export").await;
    let account: Value = serde_json::from_str(&account.text).expect("complete JSON");
    assert_eq!(account["conversations"][0]["messages"].as_array().unwrap().len() as i64, BULK);
}

async fn the_account_export_holds_everything_but_secrets(app: TestApp) {
    let user = app.signup().await;
    let other = app.signup().await;
    let (first, first_messages) = conversation_with(&app, &user, Some("first"), 2).await;
    let (second, second_messages) = conversation_with(&app, &user, None, 1).await;
    conversation_with(&app, &other, Some("not mine"), 1).await;
    let key = create_key(&app, &user, json!({ "name": "laptop" })).await;
    let secret = key["key"].as_str().unwrap().to_owned();

    let d = download(&app, &user, "/api/users/me/export").await;
    assert_eq!(d.status, StatusCode::OK, "{}", d.text);
    assert!(d.content_type.starts_with("application/json"), "{}", d.content_type);
    assert!(
        d.disposition.starts_with("attachment; filename=\"") && d.disposition.ends_with(".json\""),
        "{}",
        d.disposition
    );
    assert!(!d.text.contains(&secret), "the export shows a key's secret");
    let body: Value = serde_json::from_str(&d.text).expect("one JSON document");

    assert_eq!(body["user"]["id"], user.id.as_str());
    assert_eq!(body["user"]["email"], user.email.as_str());
    let keys = body["api_keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["id"], key["id"]);
    assert_eq!(keys[0]["name"], "laptop");
    assert!(keys[0].get("key").is_none() && keys[0].get("key_hash").is_none(), "{}", keys[0]);
    let periods = body["usage"]["periods"].as_array().unwrap();
    assert!(!periods.is_empty(), "usage: {}", body["usage"]);
    assert!(periods.iter().all(|p| p["prompt_tokens"].as_i64().unwrap() > 0), "{}", body["usage"]);
    assert!(body["usage"]["api"].is_array());

    let conversations = body["conversations"].as_array().unwrap();
    assert_eq!(conversations.len(), 2, "only the caller's: {conversations:?}");
    for (cid, messages) in [(&first, &first_messages), (&second, &second_messages)] {
        let c = conversations.iter().find(|c| c["id"] == cid.as_str()).expect("each conversation");
        assert_eq!(&c["messages"].as_array().unwrap(), &messages);
    }
}
