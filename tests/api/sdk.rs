//! SPEC §4 through real clients: the official `openai` Python package and
//! LangChain's `ChatOpenAI` (`tests/sdk/*.py`) run as child processes against
//! the server with an API key, one run per behaviour of the mock (`text`,
//! then `tools`); the `/v1/responses` checks only where that route is built.
//! They need the venv `.ci/run` makes: `PALAVER_SDK_PYTHON` (default
//! `/var/tmp/palaver-sdk-venv/bin/python`); without it these tests print why
//! and skip, and with `CI=true` they fail.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{DEFAULT_MODEL, Fetch, TestApp, db_tests};
use crate::mock_llm::{MOCK_COMPLETION_TOKENS, MOCK_PROMPT_TOKENS, ToolReply};

db_tests!(; sqlite_only: the_openai_python_sdk_works, langchain_chat_openai_works);

const DEFAULT_PYTHON: &str = "/var/tmp/palaver-sdk-venv/bin/python";
/// How long one script run may take (a few seconds when all is well).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);
/// What the mock says in the `text` phase: multi-byte characters on both
/// sides of where it splits the reply into deltas.
const SAID: &str = "Hello from Palaver — grüße 🌍";
/// The calls it makes in the `tools` phase (tools the scripts offer), the
/// arguments with characters that need more than one byte.
const CALLS: [(&str, &str); 2] =
    [("get_weather", r#"{"city":"Zürich","unit":"celsius"}"#), ("get_time", r#"{"timezone":"Europe/Zürich"}"#)];

async fn the_openai_python_sdk_works(app: TestApp) {
    if !run_both_phases(&app, "openai_sdk.py").await {
        return;
    }
    let requests = app.provider.requests();
    assert!(
        requests.iter().any(|r| offered_tools(&r.body) == ["get_weather", "get_time"]),
        "the tools the client offered never reached the provider"
    );
    // The script's last check sent the calls back with their results.
    for (name, _) in CALLS {
        let result = format!("result of {name}");
        assert!(
            requests.iter().any(|r| r.messages().iter().any(|(role, content)| role == "tool" && *content == result)),
            "the tool result {result:?} never reached the provider"
        );
    }
}

async fn langchain_chat_openai_works(app: TestApp) {
    run_both_phases(&app, "langchain_sdk.py").await;
}

/// Runs `script` with a fresh user's key while the mock says `SAID`, then
/// while it calls `CALLS`; false if it was skipped (no venv outside CI).
async fn run_both_phases(app: &TestApp, script: &str) -> bool {
    let Some(python) = sdk_python().await else { return false };
    let key = api_key(app).await;
    // `/v1/responses` is built: its checks always run.
    let skip_responses = false;
    app.provider.reply_with(SAID);
    run_script(app, &python, &key, script, "text", skip_responses).await;
    app.provider.call_tools(ToolReply::calls(&CALLS));
    run_script(app, &python, &key, script, "tools", skip_responses).await;
    true
}

/// A fresh user's new API key.
async fn api_key(app: &TestApp) -> String {
    let user = app.signup().await;
    let created = app.post("/api/keys").bearer_auth(&user.token).json(&json!({ "name": "sdk" })).fetch().await;
    created.assert_status(StatusCode::CREATED);
    let key = created.str("key").to_owned();
    assert!(key.starts_with("pk_"), "API keys start with pk_, got {key:?}");
    key
}

/// The function names in a provider request's `tools`.
fn offered_tools(body: &Value) -> Vec<&str> {
    let tools = body["tools"].as_array().map(Vec::as_slice).unwrap_or_default();
    tools.iter().filter_map(|t| t["function"]["name"].as_str()).collect()
}

/// The venv's python if it has both packages; else `None` after saying why
/// (a panic with `CI=true`).
pub(crate) async fn sdk_python() -> Option<PathBuf> {
    let python = PathBuf::from(std::env::var("PALAVER_SDK_PYTHON").unwrap_or_else(|_| DEFAULT_PYTHON.into()));
    let probe = tokio::process::Command::new(&python)
        .args(["-c", "import openai, langchain_openai"])
        .stdin(Stdio::null())
        .output()
        .await;
    let reason = match probe {
        Ok(out) if out.status.success() => return Some(python),
        Ok(out) => format!("{} cannot import openai and langchain_openai: {}", python.display(), stderr_tail(&out)),
        Err(e) => format!("{} does not run: {e}", python.display()),
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{reason}; with CI=true the SDK tests must run (.ci/run installs the venv)");
    }
    eprintln!("skipping SDK test: {reason} (.ci/run installs the venv; PALAVER_SDK_PYTHON names another python)");
    None
}

fn stderr_tail(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr.lines().last().unwrap_or_default().to_owned()
}

/// Runs `tests/sdk/<script> <phase>` against `app` and fails the test,
/// showing all it printed, unless it exits 0; `skip_responses` leaves out
/// the `/v1/responses` checks.
async fn run_script(app: &TestApp, python: &Path, key: &str, script: &str, phase: &str, skip_responses: bool) {
    let calls: Vec<Value> = CALLS
        .iter()
        .map(|(name, args)| json!([name, serde_json::from_str::<Value>(args).expect("scripted arguments are JSON")]))
        .collect();
    let mut command = tokio::process::Command::new(python);
    // Nothing of ours (an OPENAI_API_KEY, a proxy, LangSmith tracing) may
    // change where the clients go.
    command.env_clear();
    if skip_responses || std::env::var("PALAVER_SDK_SKIP_RESPONSES").is_ok_and(|v| v == "1") {
        command.env("PALAVER_SDK_SKIP_RESPONSES", "1");
    }
    let run = command
        .args(["-u", script, phase])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk"))
        .env("HOME", &app.settings.server.data_dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PALAVER_BASE_URL", app.url("/v1"))
        .env("PALAVER_API_KEY", key)
        .env("PALAVER_MODEL", DEFAULT_MODEL)
        .env("PALAVER_EXPECT_TEXT", SAID)
        .env("PALAVER_EXPECT_CALLS", Value::Array(calls).to_string())
        .env("PALAVER_EXPECT_USAGE", format!("{MOCK_PROMPT_TOKENS},{MOCK_COMPLETION_TOKENS}"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(SCRIPT_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("{script} {phase} did not finish within {SCRIPT_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("cannot run {} {script}: {e}", python.display()));
    let printed = format!(
        "--- stdout ---\n{}--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script} {phase} failed ({}):\n{printed}", out.status);
    println!("{script} {phase}:\n{printed}");
}
