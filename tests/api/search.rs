//! SPEC §3 search: the caller's messages containing `q` literally and
//! case-insensitively (no operator, no wildcard), newest first, paged, with
//! a snippet; the index in step with edits and deletes; agents' search over
//! support transcripts.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{ApiResponse, Fetch, TestApp, TestUser, assert_page, assert_timestamp, assert_uuid, db_tests};
use crate::support::{agent, visitor};

db_tests!(
    hits_carry_the_message_and_a_snippet,
    every_character_of_q_is_literal,
    case_and_unicode_are_folded,
    other_users_messages_are_never_found,
    the_index_follows_edits_and_streamed_replies,
    deleted_conversations_and_accounts_are_not_found,
    short_queries_scan_the_newest_messages,
    hits_are_newest_first_and_paged,
    q_is_validated,
    agents_search_support_transcripts,
    a_long_history_is_searched_through_the_index,
);

async fn search(app: &TestApp, user: &TestUser, q: &str) -> ApiResponse {
    app.get("/api/search").query(&[("q", q)]).bearer_auth(&user.token).fetch().await
}

/// The ids of the user messages found for `q` (the mock's echoes of them
/// are found too, as assistant messages).
async fn found(app: &TestApp, user: &TestUser, q: &str) -> Vec<String> {
    let r = search(app, user, q).await;
    r.assert_status(StatusCode::OK);
    r.items().iter().filter(|h| h["role"] == "user").map(|h| h["message_id"].as_str().unwrap().to_owned()).collect()
}

fn id_of(sent: &Value) -> String {
    sent["user_message"]["id"].as_str().unwrap().to_owned()
}

async fn hits_carry_the_message_and_a_snippet(app: TestApp) {
    let user = app.signup().await;
    let c = app.create_conversation(&user, json!({ "title": "Gardening" })).await;
    let cid = c["id"].as_str().unwrap();
    let long = format!("{} the tomatoes need water {}", "a".repeat(300), "b".repeat(300));
    let sent = app.say(&user, cid, &long).await;

    let r = search(&app, &user, "Tomatoes").await;
    r.assert_status(StatusCode::OK).assert_json();
    assert_page(&r.body, 1, 20, 2);
    let hit = r.items().iter().find(|h| h["role"] == "user").expect("the user message").clone();
    assert_eq!(hit["message_id"], sent["user_message"]["id"]);
    assert_eq!(hit["conversation_id"], cid);
    assert_eq!(hit["conversation_title"], "Gardening");
    assert_uuid(&hit["message_id"]);
    assert_timestamp(&hit["created_at"]);
    let snippet = hit["snippet"].as_str().unwrap();
    assert!(snippet.contains("the tomatoes need water"), "{snippet}");
    assert!(snippet.chars().count() < 200, "a snippet, not the message: {snippet}");
    assert!(r.items().iter().any(|h| h["role"] == "assistant"), "the echo is found too: {}", r.body);
}

async fn every_character_of_q_is_literal(app: TestApp) {
    let user = app.signup().await;
    let cid = app.new_conversation(&user).await;
    let cases = [
        ("%", "growth was 100% this year", "growth was 100 this year"),
        ("_", "call snake_case names", "call snakecase names"),
        ("*", "rated 5* by all", "rated 5 by all"),
        ("\"", "she said \"hi\" there", "she said hi there"),
        ("'", "it's fine", "its fine"),
        ("\\", r"a path C:\temp here", "a path C:/temp here"),
        ("NEAR(", "words NEAR(one two) here", "words near one two here"),
        ("a OR b", "either a OR b works", "either a or not b"),
        ("'; DROP TABLE messages; --", "he typed '; DROP TABLE messages; -- once", "he typed DROP TABLE messages once"),
        ("x%y", "x%y exactly", "xzzzy not"),
        ("p_q", "p_q exactly", "pzq not"),
    ];
    let mut expected = Vec::new();
    for (q, with, without) in cases {
        expected.push((q, id_of(&app.say(&user, &cid, with).await)));
        app.say(&user, &cid, without).await;
    }
    for (q, id) in expected {
        let ids = found(&app, &user, q).await;
        assert!(ids.contains(&id), "{q:?} does not find its message");
        for other in &ids {
            let content = message_content(&app, &user, &cid, other).await;
            assert!(content.to_lowercase().contains(&q.to_lowercase()), "{q:?} found {content:?}");
        }
    }
    // The messages table survived the SQL-looking term.
    assert_eq!(app.database.scalar("SELECT COUNT(*) FROM messages", &[]).await, 44);
}

async fn message_content(app: &TestApp, user: &TestUser, cid: &str, id: &str) -> String {
    let r = app.messages(user, cid, "?limit=100").await;
    r.items().iter().find(|m| m["id"] == id).expect("message")["content"].as_str().unwrap().to_owned()
}

async fn case_and_unicode_are_folded(app: TestApp) {
    let user = app.signup().await;
    let cid = app.new_conversation(&user).await;
    let ecole = id_of(&app.say(&user, &cid, "Je vais à l'école demain").await);
    let strasse = id_of(&app.say(&user, &cid, "ΟΔΥΣΣΕΑΣ and Hello World").await);
    assert_eq!(found(&app, &user, "ÉCOLE").await, vec![ecole.clone()]);
    assert_eq!(found(&app, &user, "l'École").await, vec![ecole]);
    assert_eq!(found(&app, &user, "hello WORLD").await, vec![strasse.clone()]);
    assert_eq!(found(&app, &user, "οδυσσεα").await, vec![strasse]);
    assert!(found(&app, &user, "ecole").await.is_empty(), "accents are not dropped");
}

async fn other_users_messages_are_never_found(app: TestApp) {
    let alice = app.signup().await;
    let bob = app.signup().await;
    let a = app.new_conversation(&alice).await;
    let b = app.new_conversation(&bob).await;
    let mine = id_of(&app.say(&alice, &a, "the secret plan of alice").await);
    app.say(&bob, &b, "the secret plan of bob").await;
    assert_eq!(found(&app, &alice, "secret plan").await, vec![mine]);
    assert_eq!(found(&app, &bob, "of alice").await, Vec::<String>::new());
    assert_eq!(found(&app, &bob, "al").await, Vec::<String>::new(), "nor by a scan");
}

async fn the_index_follows_edits_and_streamed_replies(app: TestApp) {
    let user = app.signup().await;
    let cid = app.new_conversation(&user).await;
    let sent = app.say(&user, &cid, "original wording here").await;
    let id = id_of(&sent);
    let n =
        app.database.execute("UPDATE messages SET content = 'rewritten wording' WHERE id = $1", &[id.as_str()]).await;
    assert_eq!(n, 1);
    assert!(found(&app, &user, "original wording").await.is_empty());
    assert_eq!(found(&app, &user, "rewritten").await, vec![id]);

    // A reply's text is written as it streams and when it is done: the final text is found.
    let reply = sent["assistant_message"]["id"].as_str().unwrap();
    let r = search(&app, &user, "mock reply to: original").await;
    assert!(r.items().iter().any(|h| h["message_id"] == reply), "{}", r.body);
    let streamed = app
        .post(&format!("/api/conversations/{cid}/messages"))
        .bearer_auth(&user.token)
        .header("accept", "text/event-stream")
        .json(&json!({ "content": "streamed question" }))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), StatusCode::OK);
    let text = streamed.text().await.unwrap();
    assert!(text.contains("event: done"), "{text}");
    let r = search(&app, &user, "mock reply to: streamed question").await;
    assert_eq!(r.items().len(), 1, "{}", r.body);
    assert_eq!(r.items()[0]["role"], "assistant");
}

async fn deleted_conversations_and_accounts_are_not_found(app: TestApp) {
    let user = app.signup().await;
    let gone = app.new_conversation(&user).await;
    let kept = app.new_conversation(&user).await;
    app.say(&user, &gone, "ephemeral thought").await;
    let stays = id_of(&app.say(&user, &kept, "lasting thought").await);
    let r = app.delete(&format!("/api/conversations/{gone}")).bearer_auth(&user.token).fetch().await;
    r.assert_status(StatusCode::NO_CONTENT);
    assert_eq!(found(&app, &user, "thought").await, vec![stays]);
    assert!(search(&app, &user, "ephemeral").await.items().is_empty());

    let r =
        app.delete("/api/users/me").bearer_auth(&user.token).json(&json!({ "password": user.password })).fetch().await;
    r.assert_status(StatusCode::NO_CONTENT);
    assert_eq!(app.database.scalar("SELECT COUNT(*) FROM messages", &[]).await, 0);
    if app.database.url.starts_with("sqlite:") {
        // The index holds nothing of them either: a full-text query over the whole table finds nothing.
        let left =
            app.database.scalar("SELECT COUNT(*) FROM messages_fts WHERE messages_fts MATCH '\"thought\"'", &[]).await;
        assert_eq!(left, 0);
    }
    let other = app.signup().await;
    let cid = app.new_conversation(&other).await;
    app.say(&other, &cid, "a fresh start").await;
    assert!(search(&app, &other, "thought").await.items().is_empty());
}

async fn short_queries_scan_the_newest_messages(app: TestApp) {
    let user = app.signup().await;
    let cid = app.new_conversation(&user).await;
    let x = id_of(&app.say(&user, &cid, "Qx marks").await);
    let e = id_of(&app.say(&user, &cid, "Ça va").await);
    app.say(&user, &cid, "nothing here").await;
    assert_eq!(found(&app, &user, "qX").await, vec![x]);
    assert_eq!(found(&app, &user, "ça").await, vec![e]);
    let r = search(&app, &user, "%").await;
    r.assert_status(StatusCode::OK);
    assert!(r.items().is_empty(), "% is no wildcard: {}", r.body);
    let r = search(&app, &user, "_").await;
    assert!(r.items().is_empty(), "_ is no wildcard: {}", r.body);
}

async fn hits_are_newest_first_and_paged(app: TestApp) {
    let user = app.signup().await;
    let a = app.new_conversation(&user).await;
    let b = app.new_conversation(&user).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        app.tick();
        let cid = if i % 2 == 0 { &a } else { &b };
        ids.push(id_of(&app.say(&user, cid, &format!("needle number {i}")).await));
    }
    ids.reverse();
    let page = |n: i64| {
        let request = app
            .get("/api/search")
            .query(&[("q", "NEEDLE number"), ("page", &n.to_string()), ("per_page", "4")])
            .bearer_auth(&user.token);
        async move { request.fetch().await }
    };
    let mut seen = Vec::new();
    let mut times = Vec::new();
    for n in 1..=3 {
        let r = page(n).await;
        r.assert_status(StatusCode::OK);
        assert_page(&r.body, n, 4, 10);
        for h in r.items() {
            times.push(assert_timestamp(&h["created_at"]));
            if h["role"] == "user" {
                seen.push(h["message_id"].as_str().unwrap().to_owned());
            }
        }
    }
    assert_eq!(seen, ids, "newest first, each once");
    assert_eq!(times.len(), 10);
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first: {times:?}");
}

async fn q_is_validated(app: TestApp) {
    let user = app.signup().await;
    for query in ["", "?q=", "?q=%20%20", "?q=%09"] {
        let r = app.get(&format!("/api/search{query}")).bearer_auth(&user.token).fetch().await;
        r.assert_invalid("q");
    }
    search(&app, &user, &"x".repeat(201)).await.assert_invalid("q");
    search(&app, &user, &"é".repeat(200)).await.assert_status(StatusCode::OK);
    let r = app.get("/api/search").query(&[("q", "x"), ("per_page", "0")]).bearer_auth(&user.token).fetch().await;
    r.assert_invalid("per_page");
    app.get("/api/search?q=hello").fetch().await.assert_unauthorized();
}

async fn agents_search_support_transcripts(app: TestApp) {
    let v = visitor(&app, "ann").await;
    let r = app
        .post(&format!("/api/support/sessions/{}/messages", v.id))
        .bearer_auth(&v.token)
        .json(&json!({ "content": "My Parcel 42% is late" }))
        .fetch()
        .await;
    r.assert_status(StatusCode::CREATED);
    let message_id = r.body["message"]["id"].clone();
    let user = app.signup().await;
    let cid = app.new_conversation(&user).await;
    app.say(&user, &cid, "my parcel 42% of a chat, not support").await;

    let staff = agent(&app).await;
    let r = app.get("/api/agent/search").query(&[("q", "parcel 42%")]).bearer_auth(&staff.token).fetch().await;
    r.assert_status(StatusCode::OK);
    let users: Vec<&Value> = r.items().iter().filter(|h| h["role"] == "user").collect();
    assert_eq!(users.len(), 1, "{}", r.body);
    assert_eq!(users[0]["session_id"], v.id.as_str());
    assert_eq!(users[0]["message_id"], message_id);
    assert!(users[0]["snippet"].as_str().unwrap().contains("Parcel 42%"));
    assert!(users[0].get("conversation_id").is_none(), "{}", users[0]);

    let admin = app.signup_admin().await;
    let r = app.get("/api/agent/search").query(&[("q", "parcel")]).bearer_auth(&admin.token).fetch().await;
    r.assert_status(StatusCode::OK);
    let r = app.get("/api/agent/search").query(&[("q", "parcel")]).bearer_auth(&user.token).fetch().await;
    r.assert_status(StatusCode::FORBIDDEN);
    app.get("/api/agent/search?q=parcel").bearer_auth(&v.token).fetch().await.assert_unauthorized();
    // A user's own search never shows support transcripts.
    assert_eq!(found(&app, &user, "parcel 42%").await.len(), 1);
}

/// More messages than one search scans: only the index finds the oldest,
/// and it follows their edits and deletion.
async fn a_long_history_is_searched_through_the_index(app: TestApp) {
    let user = app.signup().await;
    let cid = app.new_conversation(&user).await;
    let inserted = app
        .database
        .execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 6000) \
             INSERT INTO messages (id, conversation_id, role, content, status, usage_estimated, created_at, \
             updated_at, seq) \
             SELECT $1 || '-' || CAST(i AS TEXT), $1, 'user', \
             CASE WHEN i = 7 THEN 'the OLD_NEEDLE 100% here' ELSE 'filler text number ' || CAST(i AS TEXT) END, \
             'complete', 0, 1700000000000 + i, 1700000000000 + i, i FROM n",
            &[cid.as_str()],
        )
        .await;
    assert_eq!(inserted, 6000);
    app.database
        .execute("UPDATE conversations SET message_count = 6000, last_seq = 6000 WHERE id = $1", &[cid.as_str()])
        .await;
    let oldest = format!("{cid}-7");
    assert_eq!(found(&app, &user, "old_needle 100%").await, vec![oldest.clone()]);
    assert!(found(&app, &user, "old-needle").await.is_empty(), "_ is no wildcard");
    let r = search(&app, &user, "filler text number 599").await;
    assert_page(&r.body, 1, 20, 11);
    assert_eq!(r.items()[0]["message_id"], format!("{cid}-5999"), "newest first");

    app.database.execute("UPDATE messages SET content = 'moved on' WHERE id = $1", &[oldest.as_str()]).await;
    assert!(found(&app, &user, "old_needle").await.is_empty());
    assert_eq!(found(&app, &user, "MOVED ON").await, vec![oldest]);
    let r = app.delete(&format!("/api/conversations/{cid}")).bearer_auth(&user.token).fetch().await;
    r.assert_status(StatusCode::NO_CONTENT);
    assert!(search(&app, &user, "filler text").await.items().is_empty());
}
