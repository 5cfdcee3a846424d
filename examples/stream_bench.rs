//! Streaming benchmark (issue 4): the release `palaver` binary against a mock
//! OpenAI provider in this process that streams every reply at a fixed rate.
//! Each token carries the instant the mock sent it, so the client measures
//! the latency the server adds per token (p50/p99); then it ramps concurrent
//! SSE and WebSocket streams and reports how many completed, with the
//! server's peak RSS. Loopback only. Run through `bench/stream_bench.sh`.
//!
//! Usage: stream_bench <path to palaver> [levels, default 100,500,1000,2000] [kinds, default sse,ws]

mod common;

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use axum::{Router, body::Body, response::IntoResponse, routing::post};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Tokens per second the mock streams.
const RATE: u64 = 20;
/// Tokens per reply: two seconds of streaming.
const TOKENS: usize = 40;
/// Longest a level may take before its unfinished streams count as failed.
const LEVEL_LIMIT: Duration = Duration::from_secs(25);

static EPOCH: OnceLock<Instant> = OnceLock::new();

fn now_us() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let binary = args.next().expect("usage: stream_bench <path to palaver> [levels]");
    let levels = common::levels(args.next(), "100,500,1000,2000");
    let kinds: Vec<Kind> = args
        .next()
        .unwrap_or_else(|| "sse,ws".into())
        .split(',')
        .map(|k| match k.trim() {
            "sse" => Kind::Sse,
            "ws" => Kind::Ws,
            other => panic!("unknown kind {other:?}: sse or ws"),
        })
        .collect();
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    now_us();

    let mock = start_mock().await?;
    let data_dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut server = tokio::process::Command::new(&binary)
        .arg("serve")
        .env_clear()
        .current_dir(data_dir.path())
        .env("PALAVER_BIND", format!("127.0.0.1:{port}"))
        .env("PALAVER_DATA_DIR", data_dir.path())
        .env("SECRET_KEY", "bench-secret-key-0123456789-0123456789-abcdef")
        .env("OPENAI_API_KEY", "sk-test-fake")
        .env("OPENAI_BASE_URL", format!("http://127.0.0.1:{mock}/v1"))
        .env("PALAVER_DEFAULT_MODEL", "openai/gpt-4o-mini")
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = server.id().expect("server pid");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder().pool_max_idle_per_host(4096).build()?;
    wait_healthy(&http, &base).await?;
    let token = signup(&http, &base).await?;
    let bench = Arc::new(Bench { http, base, ws: format!("ws://127.0.0.1:{port}/api/ws?token={token}"), token, pid });

    println!(
        "mock provider: {RATE} tokens/s, {TOKENS} tokens per reply; server RSS at rest {} MiB",
        common::rss_kib(pid) / 1024
    );
    println!(
        "{:<4} {:>6} {:>6} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "kind", "streams", "done", "failed", "p50 ms", "p99 ms", "peak MiB", "wall s"
    );
    for kind in kinds {
        for &n in &levels {
            let r = run_level(&bench, kind, n).await;
            println!(
                "{:<4} {:>6} {:>6} {:>7} {:>9.2} {:>9.2} {:>9} {:>9.1}",
                kind.name(),
                n,
                r.done,
                n - r.done,
                r.p50_ms,
                r.p99_ms,
                r.peak_rss_kib / 1024,
                r.wall.as_secs_f64()
            );
            // Let the server settle between levels.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    server.kill().await?;
    Ok(())
}

struct Bench {
    http: reqwest::Client,
    base: String,
    ws: String,
    token: String,
    pid: u32,
}

#[derive(Clone, Copy)]
enum Kind {
    Sse,
    Ws,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Sse => "sse",
            Kind::Ws => "ws",
        }
    }
}

struct LevelResult {
    done: usize,
    p50_ms: f64,
    p99_ms: f64,
    peak_rss_kib: u64,
    wall: Duration,
}

/// `n` streams at once; each records the added latency of every token.
async fn run_level(bench: &Arc<Bench>, kind: Kind, n: usize) -> LevelResult {
    let started = Instant::now();
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (pid, sampling) = (bench.pid, sampling.clone());
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(common::rss_kib(pid));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peak
        })
    };
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let bench = bench.clone();
            tokio::spawn(async move {
                let run = async {
                    match kind {
                        Kind::Sse => sse_stream(&bench, i).await,
                        Kind::Ws => ws_stream(&bench, i).await,
                    }
                };
                tokio::time::timeout(LEVEL_LIMIT, run).await.unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")))
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut done = 0;
    let mut first_error = None;
    for task in tasks {
        match task.await.expect("stream task") {
            Ok(mut l) if l.len() == TOKENS => {
                done += 1;
                latencies.append(&mut l);
            }
            Ok(l) => first_error = first_error.or(Some(format!("{} of {TOKENS} tokens", l.len()))),
            Err(e) => first_error = first_error.or(Some(e.to_string())),
        }
    }
    let wall = started.elapsed();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak_rss_kib = sampler.await.unwrap_or(0);
    if let Some(e) = first_error {
        eprintln!("  {} x{n}: first failure: {e}", kind.name());
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[i] as f64 / 1000.0
    };
    LevelResult { done, p50_ms: pct(0.50), p99_ms: pct(0.99), peak_rss_kib, wall }
}

/// The latencies (µs) of the tokens in a delta's text: each token is the
/// instant the mock sent it.
fn token_latencies(text: &str, out: &mut Vec<u64>) {
    let now = now_us();
    out.extend(text.split_whitespace().filter_map(|t| t.parse::<u64>().ok()).map(|sent| now.saturating_sub(sent)));
}

async fn sse_stream(bench: &Bench, i: usize) -> anyhow::Result<Vec<u64>> {
    let response = bench
        .http
        .post(format!("{}/api/chat/stream", bench.base))
        .bearer_auth(&bench.token)
        .header("accept", "text/event-stream")
        .json(&json!({ "message": format!("stream {i}") }))
        .send()
        .await?;
    anyhow::ensure!(response.status().is_success(), "status {}", response.status());
    let mut body = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut latencies = Vec::with_capacity(TOKENS);
    while let Some(bytes) = body.next().await {
        buffer.extend_from_slice(&bytes?);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buffer.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&block);
            let event = block.lines().find_map(|l| l.strip_prefix("event:")).map(str::trim).unwrap_or("");
            let data = block.lines().find_map(|l| l.strip_prefix("data:")).map(str::trim).unwrap_or("");
            match event {
                "delta" => {
                    let data: Value = serde_json::from_str(data)?;
                    token_latencies(data["text"].as_str().unwrap_or(""), &mut latencies);
                }
                "done" => return Ok(latencies),
                "error" => anyhow::bail!("error event: {data}"),
                _ => {}
            }
        }
    }
    anyhow::bail!("the stream ended before done")
}

async fn ws_stream(bench: &Bench, i: usize) -> anyhow::Result<Vec<u64>> {
    let (mut socket, _) = tokio_tungstenite::connect_async(&bench.ws).await?;
    // A fresh request_id: a reused one would re-attach to an earlier reply.
    let request_id = uuid::Uuid::new_v4().to_string();
    let frame = json!({ "type": "message", "request_id": request_id, "conversation_id": null, "content": format!("socket {i}") });
    socket.send(Message::text(frame.to_string())).await?;
    let mut latencies = Vec::with_capacity(TOKENS);
    while let Some(message) = socket.next().await {
        let Message::Text(text) = message? else { continue };
        let frame: Value = serde_json::from_str(text.as_str())?;
        match frame["type"].as_str() {
            Some("delta") => token_latencies(frame["text"].as_str().unwrap_or(""), &mut latencies),
            Some("done") => {
                let _ = socket.close(None).await;
                return Ok(latencies);
            }
            Some("error") => anyhow::bail!("error frame: {frame}"),
            _ => {}
        }
    }
    anyhow::bail!("the socket closed before done")
}

/// The mock provider: every reply is `TOKENS` tokens at `RATE` per second,
/// each token being the microsecond it was sent.
async fn start_mock() -> anyhow::Result<u16> {
    let app = Router::new().route("/v1/chat/completions", post(completions));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(port)
}

async fn completions() -> impl IntoResponse {
    let chunk = |delta: Value, finish: Value| {
        let c = json!({ "id": "b", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini",
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] });
        format!("data: {c}\n\n")
    };
    let tail = format!(
        "{}data: {}\n\ndata: [DONE]\n\n",
        chunk(json!({}), json!("stop")),
        json!({ "id": "b", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini", "choices": [],
            "usage": { "prompt_tokens": 5, "completion_tokens": TOKENS, "total_tokens": 5 + TOKENS } })
    );
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let body = futures::stream::unfold((0usize, tick, Some(tail)), move |(sent, mut tick, mut tail)| async move {
        if sent == TOKENS {
            return tail.take().map(|t| (Ok::<_, std::convert::Infallible>(t), (sent, tick, None)));
        }
        tick.tick().await;
        let token = chunk(json!({ "content": format!("{} ", now_us()) }), Value::Null);
        Some((Ok(token), (sent + 1, tick, tail)))
    });
    ([("content-type", "text/event-stream")], Body::from_stream(body))
}

async fn wait_healthy(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if http.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the server did not become healthy")
}

async fn signup(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let body = json!({ "username": "bench", "email": "bench@example.com", "password": "bench password 123" });
    let r = http.post(format!("{base}/api/auth/register")).json(&body).send().await?;
    anyhow::ensure!(r.status().is_success(), "register: {}", r.status());
    let r = http
        .post(format!("{base}/api/auth/login"))
        .json(&json!({ "login": "bench", "password": "bench password 123" }))
        .send()
        .await?;
    let tokens: Value = r.json().await?;
    Ok(tokens["access_token"].as_str().expect("access token").to_owned())
}
