//! SPEC §0 from the outside: the `palaver` binary with zero configuration,
//! production refusals (exit code 2, one line), and the subcommands.

use std::{
    io::Write,
    net::TcpListener,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_palaver");

/// The binary with an environment free of the developer's own settings.
fn palaver(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir);
    for var in [
        "DATABASE_URL",
        "REDIS_URL",
        "SECRET_KEY",
        "PALAVER_ENV",
        "PALAVER_BIND",
        "PALAVER_DATA_DIR",
        "CORS_ORIGINS",
        "OPENAI_API_KEY",
        "GEMINI_API_KEY",
        "ANTHROPIC_API_KEY",
        "OPENROUTER_API_KEY",
        "GROQ_API_KEY",
        "OLLAMA_BASE_URL",
        "PALAVER_DEFAULT_MODEL",
        "PALAVER_FALLBACK_MODELS",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn production_refuses_a_missing_secret_with_exit_code_2_and_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = palaver(dir.path()).args(["serve"]).env("PALAVER_ENV", "production").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("SECRET_KEY"), "{err}");
}

#[test]
fn production_refuses_a_weak_secret_and_wildcard_cors() {
    let dir = tempfile::tempdir().unwrap();
    let weak = palaver(dir.path())
        .args(["serve"])
        .env("PALAVER_ENV", "production")
        .env("SECRET_KEY", "short-secret")
        .output()
        .unwrap();
    assert_eq!(weak.status.code(), Some(2));
    assert!(stderr_of(&weak).contains("32 characters"), "{}", stderr_of(&weak));

    let cors = palaver(dir.path())
        .args(["serve"])
        .env("PALAVER_ENV", "production")
        .env("SECRET_KEY", "x".repeat(40))
        .env("CORS_ORIGINS", "*")
        .output()
        .unwrap();
    assert_eq!(cors.status.code(), Some(2));
    let err = stderr_of(&cors);
    assert!(err.contains("CORS_ORIGINS"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn help_names_every_flag_with_its_env_var_and_hides_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let out = palaver(dir.path()).arg("--help").env("OPENAI_API_KEY", "sk-test-must-not-show").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "DATABASE_URL",
        "REDIS_URL",
        "SECRET_KEY",
        "ACCESS_TOKEN_EXPIRE_MINUTES",
        "REFRESH_TOKEN_EXPIRE_DAYS",
        "CORS_ORIGINS",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "PALAVER_DEFAULT_MODEL",
        "PALAVER_BIND",
        "PALAVER_PROVIDER_TIMEOUT",
        "PALAVER_MAX_MESSAGE_CHARS",
    ] {
        assert!(help.contains(&format!("env: {var}")), "--help does not name {var}");
    }
    assert!(!help.contains("sk-test-must-not-show"), "a key leaked into --help");
    for sub in ["serve", "migrate", "admin", "openapi"] {
        assert!(help.contains(sub), "--help does not list {sub}");
    }
}

#[test]
fn openapi_prints_the_document() {
    let dir = tempfile::tempdir().unwrap();
    let out = palaver(dir.path()).arg("openapi").output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(doc["openapi"].as_str().unwrap().starts_with('3'));
    assert!(doc["paths"]["/api/conversations/{id}/messages"].is_object());
}

#[test]
fn migrate_then_admin_create_makes_an_admin_who_can_log_in() {
    let dir = tempfile::tempdir().unwrap();
    let out = palaver(dir.path()).arg("migrate").output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(dir.path().join("data/palaver.db").exists());

    let mut child = palaver(dir.path())
        .args(["admin", "create", "--email", "Boss@Example.com", "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"admin password 1\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));

    // A second time the email is taken: a clear failure, not a crash.
    let mut again = palaver(dir.path())
        .args(["admin", "create", "--email", "boss@example.com", "--password-stdin"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    again.stdin.take().unwrap().write_all(b"admin password 1\n").unwrap();
    let out = again.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("already exists"), "{}", stderr_of(&out));

    // The admin logs in to a served instance and may list users.
    let server = Server::start(dir.path(), &[]);
    let client = reqwest::blocking::Client::new();
    let tokens: serde_json::Value = client
        .post(server.url("/api/auth/login"))
        .json(&serde_json::json!({ "login": "boss@example.com", "password": "admin password 1" }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(tokens["user"]["role"], "admin");
    let users = client
        .get(server.url("/api/admin/users"))
        .bearer_auth(tokens["access_token"].as_str().unwrap())
        .send()
        .unwrap();
    assert_eq!(users.status(), 200);
}

#[test]
fn serve_with_zero_configuration_creates_its_data_and_warns() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let health: serde_json::Value = reqwest::blocking::get(server.url("/health")).unwrap().json().unwrap();
    assert_eq!(health["status"], "ok");
    let secret = dir.path().join("data/secret_key");
    assert!(dir.path().join("data/palaver.db").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the dev secret must be private");
    }
    let log = server.stop();
    assert!(log.contains("development secret"), "no warning about the dev secret: {log}");
    assert!(log.contains("OPENAI_API_KEY"), "no warning naming the provider variables: {log}");
}

/// A `palaver serve` child process on a free port.
struct Server {
    child: Option<Child>,
    port: u16,
    log: std::path::PathBuf,
}

impl Server {
    fn start(dir: &Path, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let log = dir.join("server.log");
        let mut cmd = palaver(dir);
        cmd.arg("serve")
            .env("PALAVER_BIND", format!("127.0.0.1:{port}"))
            .env("PALAVER_LOG_FORMAT", "text")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("server.err")).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let server = Server { child: Some(child), port, log };
        let started = Instant::now();
        while reqwest::blocking::get(server.url("/health")).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Stops the server and returns what it logged.
    fn stop(mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
