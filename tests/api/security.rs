//! Hardening (issue #8): client request ids kept to a sane shape and logged
//! escaped, security headers on every answer, and the doc pages rendering
//! in a real browser under their Content-Security-Policy.

use reqwest::StatusCode;

use crate::helpers::{Db, Fetch, TestApp, db_tests, run_process_test};

db_tests!(oversized_or_unprintable_request_ids_are_replaced);

#[tokio::test(flavor = "multi_thread")]
async fn forged_request_ids_are_logged_escaped() {
    run_process_test(Db::Sqlite, |app| async move { request_ids_in_text_logs(app).await }).await;
}

async fn oversized_or_unprintable_request_ids_are_replaced(app: TestApp) {
    let long = "a".repeat(64 * 1024);
    for (what, sent) in [("64 KiB", long.as_str()), ("129 chars", &long[..129]), ("a tab", "tab\there")] {
        let response = app.get("/health").header("x-request-id", sent).fetch().await;
        response.assert_status(StatusCode::OK);
        let echoed = response.header("x-request-id").unwrap_or_else(|| panic!("{what}: no X-Request-Id"));
        assert_ne!(echoed, sent, "{what}: echoed as sent");
        assert!(uuid::Uuid::parse_str(echoed).is_ok(), "{what}: a generated id instead, got {echoed:?}");
    }
    let longest = &long[..128];
    let kept = app.get("/health").header("x-request-id", longest).fetch().await;
    assert_eq!(kept.header("x-request-id"), Some(longest), "128 printable characters are kept");
    // Two ids in one request: neither is trusted.
    let twice = app.get("/health").header("x-request-id", "one").header("x-request-id", "two").fetch().await;
    let echoed = twice.header("x-request-id").unwrap_or_default();
    assert!(uuid::Uuid::parse_str(echoed).is_ok(), "{echoed:?}");
}

/// The keys of a `key=value` log line, read as logfmt: a value that starts
/// with `"` runs to the next unescaped `"`, so it may hold spaces and `=`.
fn logged_keys(line: &str) -> Vec<String> {
    let (mut keys, mut token, mut quoted, mut escaped) = (Vec::new(), String::new(), false, false);
    for c in line.chars().chain([' ']) {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' if quoted => quoted = false,
            '"' if token.ends_with('=') => quoted = true,
            ' ' | '{' | '}' if !quoted => {
                if let Some((key, _)) = token.split_once('=') {
                    keys.push(key.to_owned());
                }
                token.clear();
                continue;
            }
            _ => {}
        }
        token.push(c);
    }
    keys
}

async fn request_ids_in_text_logs(mut app: TestApp) {
    use palaver::config::LogFormat;
    // The access line is at info; the harness's processes log warnings only.
    app.kill_server().await;
    app.restart_with(|s| {
        s.log_level = "info".into();
        s.log_format = Some(LogFormat::Text);
    })
    .await;
    let forged = r#"x" status=999 injected=1"#;
    let response = app.get("/health").header("x-request-id", forged).fetch().await;
    assert_eq!(response.header("x-request-id"), Some(forged), "a printable id is echoed as sent");
    let long = "b".repeat(64 * 1024);
    app.get("/health").header("x-request-id", &long).fetch().await.assert_status(StatusCode::OK);

    let log_path = app.settings.data_dir.join("server-1.log");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let log = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.lines().filter(|l| l.contains("/health")).count() >= 3 {
            break log;
        }
        assert!(tokio::time::Instant::now() < deadline, "no access lines in the log:\n{log}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let line = log.lines().find(|l| l.contains("injected")).unwrap_or_else(|| panic!("no forged line:\n{log}"));
    let keys = logged_keys(line);
    assert!(!keys.iter().any(|k| k == "injected"), "the id forged a field: {line}\nkeys: {keys:?}");
    assert_eq!(keys.iter().filter(|k| k.as_str() == "status").count(), 1, "one status field: {line}");
    assert!(!log.contains(&long[..200]), "the 64 KiB id was logged");
}
