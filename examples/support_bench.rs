//! Support desk benchmark (issue 5): live conversations between visitors and
//! agents over the support sockets of the release `palaver` binary. For each
//! level, N visitors open sessions, ask for a human and are claimed by
//! agents (one per 20 visitors); then every visitor sends ROUNDS messages,
//! one every PACE milliseconds (a busy live chat; 0 sends the next as soon
//! as the answer arrives, to find the saturation throughput), and its agent
//! answers each at once. Every message carries the instant it was sent, so
//! the receiver measures its delivery latency (visitor → agent and agent →
//! visitor, p50/p99).
//!
//! Mode `one`: a single instance on SQLite, no other service. Mode `two`: two
//! instances on a fresh PostgreSQL schema and Redis, visitors on the first
//! and agents on the second, so every message crosses Redis pub/sub.
//! Loopback only. Run through `bench/support_bench.sh`.
//!
//! Usage: support_bench <path to palaver> [levels, default 100,500,1000] [one|two] [pace ms, default 2000]
//! (`two` reads PALAVER_BENCH_POSTGRES_URL and PALAVER_BENCH_REDIS_URL,
//! defaulting to the local services.)

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

/// Messages each side sends per conversation.
const ROUNDS: usize = 5;
/// Visitors per agent.
const VISITORS_PER_AGENT: usize = 20;
/// Longest a level's conversations may take.
const LEVEL_LIMIT: Duration = Duration::from_secs(90);
const PASSWORD: &str = "bench password 123";

static EPOCH: OnceLock<Instant> = OnceLock::new();

fn now_us() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Instance {
    base: String,
    ws: String,
    pid: u32,
    _process: tokio::process::Child,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let binary = args.next().expect("usage: support_bench <path to palaver> [levels] [one|two]");
    let levels = common::levels(args.next(), "100,500,1000");
    let two = match args.next().as_deref() {
        None | Some("one") => false,
        Some("two") => true,
        Some(other) => panic!("unknown mode {other:?}: one or two"),
    };
    let pace = Duration::from_millis(args.next().map_or(2000, |p| p.parse().expect("pace is milliseconds")));
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    now_us();

    let data_dir = tempfile::tempdir()?;
    let mut env: Vec<(&str, String)> = vec![
        ("PALAVER_DATA_DIR", data_dir.path().display().to_string()),
        ("SECRET_KEY", "bench-secret-key-0123456789-0123456789-abcdef".into()),
        ("PALAVER_SUPPORT_SESSIONS_PER_IP", "1000000".into()),
        // Every agent registers from here, and at saturation a console sends far more than a person would.
        ("PALAVER_REGISTRATIONS_PER_IP", "1000000".into()),
        ("PALAVER_SOCKET_FRAMES_PER_SECOND", "1000000".into()),
        ("RUST_LOG", "error".into()),
    ];
    let mut schema = None;
    if two {
        let pg = std::env::var("PALAVER_BENCH_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let redis = std::env::var("PALAVER_BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        sqlx::any::install_default_drivers();
        let name = format!("bench_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::AnyConnection::connect(&pg).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}"))).execute(&mut conn).await?;
        let separator = if pg.contains('?') { '&' } else { '?' };
        env.push(("DATABASE_URL", format!("{pg}{separator}options=-c%20search_path%3D{name}")));
        env.push(("REDIS_URL", redis));
        env.push(("PALAVER_REDIS_PREFIX", name.clone()));
        schema = Some((pg, name));
    }

    // An admin from the CLI (it also applies the migrations).
    let mut cli = tokio::process::Command::new(&binary);
    cli.args(["admin", "create", "--email", "bench-admin@example.com", "--password-stdin"])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(data_dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null());
    let mut child = cli.spawn()?;
    child.stdin.take().expect("stdin").write_all(format!("{PASSWORD}\n").as_bytes()).await?;
    anyhow::ensure!(child.wait().await?.success(), "palaver admin create failed");

    let http = reqwest::Client::builder().pool_max_idle_per_host(4096).build()?;
    let mut instances = Vec::new();
    for i in 0..if two { 2 } else { 1 } {
        instances.push(start_instance(&binary, &env, data_dir.path(), i, &http).await?);
    }
    let (visitors_at, agents_at) = (&instances[0], instances.last().expect("an instance"));
    let admin = login(&http, &visitors_at.base, "bench-admin@example.com").await?;

    println!(
        "support desk, mode {}: {ROUNDS} messages each way per conversation, {}, one agent per {VISITORS_PER_AGENT} visitors",
        if two { "two (PostgreSQL + Redis, visitors and agents on different instances)" } else { "one (SQLite)" },
        if pace.is_zero() { "flat out".to_owned() } else { format!("a visitor message every {} ms", pace.as_millis()) },
    );
    println!(
        "{:>9} {:>9} {:>10} {:>15} {:>15} {:>12}",
        "visitors", "messages", "msgs/s", "v→a p50/p99 ms", "a→v p50/p99 ms", "peak RSS MiB"
    );
    for (level, &n) in levels.iter().enumerate() {
        let result = run_level(&http, visitors_at, agents_at, &admin, level, n, &instances, pace).await;
        match result {
            Ok(r) => println!(
                "{:>9} {:>9} {:>10.0} {:>15} {:>15} {:>12}",
                n,
                r.delivered,
                r.delivered as f64 / r.wall.as_secs_f64(),
                format!("{:.2}/{:.2}", r.to_agent.0, r.to_agent.1),
                format!("{:.2}/{:.2}", r.to_visitor.0, r.to_visitor.1),
                r.peak_rss_kib / 1024,
            ),
            Err(e) => println!("{n:>9} failed: {e:#}"),
        }
    }
    drop(instances);
    for i in 0..if two { 2 } else { 1 } {
        let log = std::fs::read_to_string(data_dir.path().join(format!("server-{i}.log"))).unwrap_or_default();
        let panics = log.matches("panicked at").count();
        if panics > 0 {
            println!("WARNING: server {i} logged {panics} panic(s); see its log");
        }
    }
    if let Some((pg, name)) = schema {
        let mut conn = sqlx::AnyConnection::connect(&pg).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {name} CASCADE"))).execute(&mut conn).await?;
    }
    Ok(())
}

async fn start_instance(
    binary: &str,
    env: &[(&str, String)],
    dir: &std::path::Path,
    n: usize,
    http: &reqwest::Client,
) -> anyhow::Result<Instance> {
    let log = std::fs::File::create(dir.join(format!("server-{n}.log")))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let process = tokio::process::Command::new(binary)
        .arg("serve")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("PALAVER_BIND", format!("127.0.0.1:{port}"))
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if http.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status().is_success()) {
            let pid = process.id().expect("server pid");
            return Ok(Instance { base, ws: format!("ws://127.0.0.1:{port}"), pid, _process: process });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the server did not become healthy")
}

async fn login(http: &reqwest::Client, base: &str, login: &str) -> anyhow::Result<String> {
    let r = http
        .post(format!("{base}/api/auth/login"))
        .json(&json!({ "login": login, "password": PASSWORD }))
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "login {login}: {}", r.status());
    let tokens: Value = r.json().await?;
    Ok(tokens["access_token"].as_str().expect("access token").to_owned())
}

async fn post(http: &reqwest::Client, url: String, token: Option<&str>, body: Value) -> anyhow::Result<Value> {
    let mut request = http.post(&url).json(&body);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let r = request.send().await?;
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    anyhow::ensure!(status.is_success(), "POST {url}: {status} {body}");
    Ok(body)
}

struct LevelResult {
    delivered: usize,
    wall: Duration,
    to_agent: (f64, f64),
    to_visitor: (f64, f64),
    peak_rss_kib: u64,
}

#[allow(clippy::too_many_arguments)]
async fn run_level(
    http: &reqwest::Client,
    visitors_at: &Instance,
    agents_at: &Instance,
    admin: &str,
    level: usize,
    n: usize,
    instances: &[Instance],
    pace: Duration,
) -> anyhow::Result<LevelResult> {
    // Agents: registered, made agents by the admin, logged in on their instance.
    let agent_count = n.div_ceil(VISITORS_PER_AGENT);
    let mut agents = Vec::new();
    for i in 0..agent_count {
        let name = format!("agent_{level}_{i}");
        let email = format!("{name}@example.com");
        let user = post(
            http,
            format!("{}/api/auth/register", agents_at.base),
            None,
            json!({ "email": email, "username": name, "password": PASSWORD }),
        )
        .await?;
        let id = user["id"].as_str().expect("user id").to_owned();
        let r = http
            .patch(format!("{}/api/admin/users/{id}", visitors_at.base))
            .bearer_auth(admin)
            .json(&json!({ "role": "agent" }))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "making {name} an agent: {}", r.status());
        agents.push(login(http, &agents_at.base, &email).await?);
    }

    // Visitors: a session each, queued, claimed by agent i % agents.
    let mut visitors = Vec::new();
    for i in 0..n {
        let s = post(
            http,
            format!("{}/api/support/sessions", visitors_at.base),
            None,
            json!({ "client_info": { "name": format!("visitor {i}"), "email": format!("v{level}_{i}@example.com") } }),
        )
        .await?;
        let (id, token) =
            (s["session_id"].as_str().unwrap().to_owned(), s["client_token"].as_str().unwrap().to_owned());
        post(http, format!("{}/api/support/sessions/{id}/handoff", visitors_at.base), Some(&token), json!({})).await?;
        post(
            http,
            format!("{}/api/agent/sessions/{id}/claim", agents_at.base),
            Some(&agents[i % agent_count]),
            json!({}),
        )
        .await?;
        visitors.push((id, token));
    }

    // Sockets: agents answer every visitor message at once; visitors send
    // their next message when the agent's answer arrives.
    let mut agent_sockets = Vec::new();
    for token in &agents {
        let (socket, _) = tokio_tungstenite::connect_async(format!("{}/ws/agent?token={token}", agents_at.ws)).await?;
        agent_sockets.push(socket);
    }
    let mut visitor_sockets = Vec::new();
    for (id, token) in &visitors {
        let url = format!("{}/ws/support/{id}?token={token}", visitors_at.ws);
        let (socket, _) = tokio_tungstenite::connect_async(url).await?;
        visitor_sockets.push(socket);
    }

    let pids: Vec<u32> = instances.iter().map(|i| i.pid).collect();
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(pids.iter().map(|p| common::rss_kib(*p)).sum());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peak
        })
    };

    let started = Instant::now();
    let agent_tasks: Vec<_> = agent_sockets.into_iter().map(spawn_agent).collect();
    let visitor_tasks: Vec<_> = visitor_sockets
        .into_iter()
        .map(|s| tokio::spawn(tokio::time::timeout(LEVEL_LIMIT, visitor_loop(s, pace))))
        .collect();
    let mut to_visitor = Vec::new();
    let mut finished = 0;
    for task in visitor_tasks {
        if let Ok(Ok(Ok(latencies))) = task.await {
            finished += 1;
            to_visitor.extend(latencies);
        }
    }
    let wall = started.elapsed();
    let mut to_agent = Vec::new();
    for (task, latencies) in agent_tasks {
        task.abort();
        to_agent.extend(std::mem::take(&mut *latencies.lock().unwrap()));
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak_rss_kib = sampler.await.unwrap_or(0);
    anyhow::ensure!(finished == n, "{} of {n} conversations did not finish within {LEVEL_LIMIT:?}", n - finished);
    let delivered = to_visitor.len() * 2;
    Ok(LevelResult {
        delivered,
        wall,
        to_agent: percentiles(to_agent),
        to_visitor: percentiles(to_visitor),
        peak_rss_kib,
    })
}

/// (p50, p99) in milliseconds of microsecond samples.
fn percentiles(mut us: Vec<u64>) -> (f64, f64) {
    if us.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    us.sort_unstable();
    let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    (at(0.50), at(0.99))
}

/// A cheap pseudo-random number (the bench needs no quality).
fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_us());
    h.finish()
}

/// The sent-at stamp of a message's content `… @<micros>`.
fn stamp(content: &str) -> Option<u64> {
    content.rsplit_once('@').and_then(|(_, t)| t.parse().ok())
}

/// A visitor: sends a message, waits for the agent's answer and for its
/// next turn, ROUNDS times. Answers the agent → visitor latencies.
async fn visitor_loop(mut socket: Socket, pace: Duration) -> anyhow::Result<Vec<u64>> {
    let mut latencies = Vec::with_capacity(ROUNDS);
    // Visitors start spread over one pace, as real ones would.
    let offset = Duration::from_micros(fastrand_u64() % (pace.as_micros() as u64).max(1));
    let mut turn = tokio::time::interval_at(tokio::time::Instant::now() + offset, pace.max(Duration::from_micros(1)));
    for round in 0..ROUNDS {
        if !pace.is_zero() {
            turn.tick().await;
        }
        let content = format!("question {round} @{}", now_us());
        socket.send(Message::text(json!({ "type": "message", "content": content }).to_string())).await?;
        loop {
            let Some(frame) = socket.next().await else { anyhow::bail!("the visitor's socket closed") };
            let Message::Text(text) = frame? else { continue };
            let frame: Value = serde_json::from_str(text.as_str())?;
            if frame["type"] == "message" && frame["message"]["role"] == "agent" {
                let sent = stamp(frame["message"]["content"].as_str().unwrap_or_default()).unwrap_or(0);
                latencies.push(now_us().saturating_sub(sent));
                break;
            }
        }
    }
    socket.close(None).await.ok();
    Ok(latencies)
}

/// An agent: answers each visitor message on the session it came from,
/// until aborted; the visitor → agent latencies collect in the vector.
fn spawn_agent(socket: Socket) -> (tokio::task::JoinHandle<()>, Arc<std::sync::Mutex<Vec<u64>>>) {
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let collected = latencies.clone();
    let task = tokio::spawn(async move {
        let (mut sink, mut stream) = socket.split();
        let mut answered: HashMap<String, usize> = HashMap::new();
        while let Some(Ok(frame)) = stream.next().await {
            let Message::Text(text) = frame else { continue };
            let Ok(frame) = serde_json::from_str::<Value>(text.as_str()) else { continue };
            if frame["type"] != "message" || frame["message"]["role"] != "user" {
                continue;
            }
            let sent = stamp(frame["message"]["content"].as_str().unwrap_or_default()).unwrap_or(0);
            collected.lock().unwrap().push(now_us().saturating_sub(sent));
            let session = frame["session_id"].as_str().unwrap_or_default().to_owned();
            let n = answered.entry(session.clone()).or_default();
            *n += 1;
            let content = format!("answer {n} @{}", now_us());
            let reply = json!({ "type": "message", "session_id": session, "content": content });
            if sink.send(Message::text(reply.to_string())).await.is_err() {
                break;
            }
        }
    });
    (task, latencies)
}
