//! Ids come from the source injected beside the clock: with fixed ids a
//! test can name every object before it exists.

use std::sync::Arc;

use palaver::{
    clock::SystemClock,
    config::{Secret, Settings},
    ids::SequentialIds,
    startup::Application,
};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn every_minted_id_comes_from_the_injected_source() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::defaults();
    settings.server.bind = "127.0.0.1:0".parse().unwrap();
    settings.server.data_dir = dir.path().to_path_buf();
    settings.server.database_url = Some(Secret(format!("sqlite://{}", dir.path().join("palaver.db").display())));
    settings.auth.secret_key = Some(Secret("test-secret-key-that-is-long-enough-0123456789".into()));
    settings.providers.openai_api_key = None;
    settings.providers.default_model = None;
    let app =
        Application::build_with(settings, Arc::new(SystemClock), Arc::new(SequentialIds::default())).await.unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let stop = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());
    let http = reqwest::Client::new();
    let post = |path: &str, token: Option<&str>, body: Value| {
        let mut request = http.post(format!("{base}{path}")).json(&body);
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (status, response.json::<Value>().await.unwrap())
        }
    };

    let password = "correct horse battery staple";
    let (status, user) = post("/api/auth/register", None, json!({ "username": "ann", "password": password })).await;
    assert_eq!(status, 201, "{user}");
    assert_eq!(user["id"], SequentialIds::nth(1));
    let (_, tokens) = post("/api/auth/login", None, json!({ "login": "ann", "password": password })).await;
    let token = tokens["access_token"].as_str().unwrap();
    let (_, sessions) = {
        let response = http.get(format!("{base}/api/auth/sessions")).bearer_auth(token).send().await.unwrap();
        (response.status(), response.json::<Value>().await.unwrap())
    };
    assert_eq!(sessions["items"][0]["id"], SequentialIds::nth(2), "the login session");
    let (_, conversation) = post("/api/conversations", Some(token), json!({})).await;
    assert_eq!(conversation["id"], SequentialIds::nth(3));
    let path = format!("/api/conversations/{}/messages", SequentialIds::nth(3));
    let (status, sent) = post(&path, Some(token), json!({ "content": "hello" })).await;
    assert_eq!(status, 201, "{sent}");
    assert_eq!(sent["user_message"]["id"], SequentialIds::nth(4));
    assert_eq!(sent["assistant_message"]["id"], SequentialIds::nth(5));

    stop.cancel();
    let _ = server.await;
}
