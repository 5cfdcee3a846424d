//! Export benchmark (issue 12): a server in this process on a fresh SQLite
//! file (or a PostgreSQL schema), one conversation of N messages (bulk SQL),
//! then `GET /api/conversations/{id}/export` as JSON and as Markdown, read
//! to the end and thrown away. Prints the bytes, the time and the peak RSS
//! growth during each download: the peak (VmHWM) is reset through
//! /proc/self/clear_refs just before it, so the growth is what the export
//! itself took.
//!
//! Usage: export_bench <sqlite|postgres> <N>   (postgres reads
//! PALAVER_BENCH_POSTGRES_URL, default the local `test` database, in a fresh
//! schema it drops afterwards). Run through bench/export_bench.sh.

mod common;

use std::time::Instant;

use futures::StreamExt;
use palaver::{
    config::{Secret, Settings},
    startup::Application,
};
use serde_json::{Value, json};
use sqlx::Connection;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let engine = args.get(1).map(String::as_str).unwrap_or("sqlite").to_owned();
    let n: i64 = args.get(2).map(String::as_str).unwrap_or("100000").parse()?;
    let dir = tempfile::tempdir()?;
    sqlx::any::install_default_drivers();
    let (url, schema) = match engine.as_str() {
        "sqlite" => (format!("sqlite://{}", dir.path().join("export.db").display()), None),
        _ => {
            let base = std::env::var("PALAVER_BENCH_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
            let schema = format!("export_bench_{}", std::process::id());
            let mut conn = sqlx::AnyConnection::connect(&base).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&mut conn).await?;
            (format!("{base}?options=-c%20search_path%3D{schema}"), Some((base, schema)))
        }
    };
    let mut settings = Settings::defaults();
    settings.server.bind = "127.0.0.1:0".parse()?;
    settings.server.data_dir = dir.path().to_path_buf();
    settings.server.database_url = Some(Secret(url.clone()));
    settings.server.log_level = "warn".into();
    settings.auth.secret_key = Some(Secret("export-bench-secret-key-not-a-real-one-0123456789".into()));
    let app = Application::build(settings).await?;
    let base = format!("http://127.0.0.1:{}", app.port());
    let stop = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());

    let client = reqwest::Client::new();
    let body = json!({ "email": "bench@example.com", "password": "a long bench password" });
    client.post(format!("{base}/api/auth/register")).json(&body).send().await?.error_for_status()?;
    let login = json!({ "login": "bench@example.com", "password": "a long bench password" });
    let session: Value = client.post(format!("{base}/api/auth/login")).json(&login).send().await?.json().await?;
    let token = session["access_token"].as_str().ok_or_else(|| anyhow::anyhow!("no token: {session}"))?;
    let created: Value = client
        .post(format!("{base}/api/conversations"))
        .bearer_auth(token)
        .json(&json!({ "title": "A long one" }))
        .send()
        .await?
        .json()
        .await?;
    let cid = created["id"].as_str().ok_or_else(|| anyhow::anyhow!("no conversation: {created}"))?.to_owned();

    let seeded = Instant::now();
    common::seed_messages(&url, &engine, &cid, n).await?;
    eprintln!("{engine}: seeded {n} messages in {:.1} s", seeded.elapsed().as_secs_f64());

    println!("| engine | messages | format | bytes | seconds | RSS before MB | peak RSS growth MB |");
    println!("|---|---:|---|---:|---:|---:|---:|");
    // JSON twice: the first download also pays for the first request's one-time allocations.
    for format in ["json", "markdown", "json"] {
        std::fs::write("/proc/self/clear_refs", "5")?;
        let before = status_kib("VmRSS:")?;
        let started = Instant::now();
        let response = client
            .get(format!("{base}/api/conversations/{cid}/export?format={format}"))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?;
        let mut bytes = 0usize;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            bytes += chunk?.len();
        }
        let seconds = started.elapsed().as_secs_f64();
        let peak = status_kib("VmHWM:")?;
        println!(
            "| {engine} | {n} | {format} | {bytes} | {seconds:.2} | {:.1} | {:.1} |",
            before as f64 / 1024.0,
            peak.saturating_sub(before) as f64 / 1024.0
        );
    }
    stop.cancel();
    let _ = server.await;
    if let Some((base, schema)) = schema {
        let mut conn = sqlx::AnyConnection::connect(&base).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&mut conn).await?;
    }
    Ok(())
}

/// A `kB` line of /proc/self/status.
fn status_kib(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with(field)).ok_or_else(|| anyhow::anyhow!("{field} missing"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}
