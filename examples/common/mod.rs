//! What the benchmark clients share (not an example of its own: Cargo only
//! takes `examples/<name>/main.rs` from folders): the mock OpenAI provider and
//! the closed-loop / paced HTTP/1.1 load loop of the gateway and chat benches.
// Each bench uses only part of this module.
#![allow(dead_code)]

use sqlx::Connection;
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// The comma-separated levels argument (`100,500,1000`), or `default`.
pub fn levels(arg: Option<String>, default: &str) -> Vec<usize> {
    arg.unwrap_or_else(|| default.into()).split(',').map(|n| n.trim().parse().expect("levels are numbers")).collect()
}

/// A process's resident memory in KiB (`VmRSS`), 0 once it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The mock's reply text, split into these stream chunks.
pub const REPLY_CHUNKS: [&str; 3] = ["Hello", " from the", " mock provider."];
pub const REPLY: &str = "Hello from the mock provider.";
/// Requests before a phase's figures count.
pub const WARMUP: Duration = Duration::from_secs(1);
/// The tiny fixed body the mock answers on `GET /static`: the machine's limit.
pub const STATIC_BODY: &str = "ok";

/// One kind of request a phase sends, over and over, on each connection.
pub trait Workload: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn addr(&self) -> SocketAddr;
    /// The request connection `conn` sends next.
    fn request(&self, conn: usize) -> Request<Full<Bytes>>;
    /// Whether an answer counts as a success.
    fn complete(&self, status: StatusCode, body: &[u8]) -> bool;
}

#[derive(Clone)]
pub struct Load {
    pub conns: usize,
    /// Offered requests per second over all connections; `None` is closed loop.
    pub rate: Option<f64>,
}

impl Load {
    pub fn name(&self) -> String {
        match self.rate {
            None => format!("{} conn closed", self.conns),
            Some(r) => format!("{} conn paced {r:.0}/s", self.conns),
        }
    }
}

#[derive(Default)]
pub struct PhaseResult {
    /// Latencies (ns) of the measured requests, sorted.
    pub latencies: Vec<u64>,
    pub first_byte: Vec<u64>,
    /// Requests sent in the measured window (for the mock's count).
    pub sent: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub server_cpu: Duration,
    pub bench_cpu: Duration,
}

impl PhaseResult {
    pub fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// Percentile `p` in µs (NaN without samples).
    pub fn pct(sorted: &[u64], p: f64) -> f64 {
        if sorted.is_empty() {
            return f64::NAN;
        }
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i] as f64 / 1000.0
    }

    pub fn p(&self, p: f64) -> f64 {
        Self::pct(&self.latencies, p)
    }

    pub fn cpu_per_request(cpu: Duration, n: usize) -> f64 {
        cpu.as_secs_f64() * 1e6 / n.max(1) as f64
    }
}

#[derive(Default)]
struct ConnResult {
    latencies: Vec<u64>,
    first_byte: Vec<u64>,
    sent: u64,
    errors: u64,
    first_error: Option<String>,
}

/// `load.conns` connections send `target`'s request for WARMUP + `measure`;
/// requests started in the last `measure` count.
pub async fn run_phase<W: Workload>(target: &Arc<W>, load: &Load, measure: Duration, pid: u32) -> PhaseResult {
    let mut senders = Vec::with_capacity(load.conns);
    for _ in 0..load.conns {
        match connect(target.addr()).await {
            Ok(s) => senders.push(s),
            Err(e) => {
                return PhaseResult { errors: 1, first_error: Some(format!("connect: {e}")), ..Default::default() };
            }
        }
    }
    let start = Instant::now();
    let counted_from = start + WARMUP;
    let end = counted_from + measure;
    let interval = load.rate.map(|r| Duration::from_secs_f64(load.conns as f64 / r));
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, sender)| {
            let target = target.clone();
            // Paced connections are spread evenly over one interval.
            let first = interval.map(|iv| start + iv.mul_f64(i as f64 / load.conns as f64));
            tokio::spawn(connection_loop(sender, target, i, first, interval, counted_from, end))
        })
        .collect();
    // Counted once the warmup is over.
    tokio::time::sleep_until(counted_from.into()).await;
    let (server0, bench0) = (cpu_time(&format!("/proc/{pid}/stat")), cpu_time("/proc/self/stat"));
    let mut r = PhaseResult::default();
    tokio::time::sleep_until(end.into()).await;
    r.server_cpu = cpu_time(&format!("/proc/{pid}/stat")).saturating_sub(server0);
    r.bench_cpu = cpu_time("/proc/self/stat").saturating_sub(bench0);
    r.elapsed = measure;
    for task in tasks {
        let c = task.await.expect("connection task");
        r.latencies.extend(c.latencies);
        r.first_byte.extend(c.first_byte);
        r.sent += c.sent;
        r.errors += c.errors;
        r.first_error = r.first_error.or(c.first_error);
    }
    r.latencies.sort_unstable();
    r.first_byte.sort_unstable();
    r
}

async fn connection_loop<W: Workload>(
    mut sender: Sender,
    target: Arc<W>,
    conn: usize,
    mut next: Option<Instant>,
    interval: Option<Duration>,
    counted_from: Instant,
    end: Instant,
) -> ConnResult {
    let mut r = ConnResult::default();
    loop {
        if let Some(at) = next {
            tokio::time::sleep_until(at.into()).await;
        }
        let sent = Instant::now();
        if sent >= end {
            return r;
        }
        let counted = sent >= counted_from;
        let outcome = exchange(&mut sender, &*target, conn, sent).await;
        let done = Instant::now();
        match outcome {
            // Requests still running at the end would bias the tail down if dropped; they count.
            Ok(first_byte) if counted => {
                r.latencies.push((done - sent).as_nanos() as u64);
                r.first_byte.push(first_byte.as_nanos() as u64);
                r.sent += 1;
            }
            Ok(_) => {}
            Err(e) => {
                r.errors += u64::from(counted);
                r.sent += u64::from(counted);
                r.first_error = r.first_error.or(Some(e.to_string()));
                // A failed exchange may leave the connection unusable.
                match connect(target.addr()).await {
                    Ok(s) => sender = s,
                    Err(_) => return r,
                }
            }
        }
        next = match (next, interval) {
            // Behind schedule sends at once rather than in a burst.
            (Some(at), Some(iv)) => Some((at + iv).max(done)),
            _ => None,
        };
    }
}

pub type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

pub async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One request and its whole answer; the time to the answer's first body byte.
async fn exchange(sender: &mut Sender, target: &impl Workload, conn: usize, sent: Instant) -> anyhow::Result<Duration> {
    sender.ready().await?;
    let response = sender.send_request(target.request(conn)).await?;
    let status = response.status();
    let mut body = response.into_body();
    let mut first_byte = None;
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            first_byte.get_or_insert_with(|| sent.elapsed());
            bytes.extend_from_slice(&data);
        }
    }
    anyhow::ensure!(
        target.complete(status, &bytes),
        "{}: status {status}: {}",
        target.name(),
        String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
    );
    Ok(first_byte.unwrap_or_else(|| sent.elapsed()))
}

/// A process's user + system CPU time from `/proc/<pid>/stat` (USER_HZ is
/// 100 on Linux's user ABI).
pub fn cpu_time(stat: &str) -> Duration {
    let ticks = std::fs::read_to_string(stat)
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
            let rest = s.rsplit_once(')')?.1.to_owned();
            let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
            Some(f.iter().sum::<u64>())
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// The mock provider: an OpenAI chat completions endpoint answering at once
/// from memory, on its own thread so the load generator's timing is not
/// queued behind it.
pub struct Mock {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
}

#[derive(serde::Deserialize)]
struct StreamFlag {
    #[serde(default)]
    stream: bool,
}

impl Mock {
    pub fn start() -> anyhow::Result<Mock> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicU64::new(0));
        let replies = Arc::new(Replies::new());
        let counter = hits.clone();
        std::thread::Builder::new().name("mock-provider".into()).spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("mock runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("mock listener");
                loop {
                    let Ok((tcp, _)) = listener.accept().await else { continue };
                    let _ = tcp.set_nodelay(true);
                    let (hits, replies) = (counter.clone(), replies.clone());
                    tokio::spawn(async move {
                        let service = service_fn(move |request| {
                            let (hits, replies) = (hits.clone(), replies.clone());
                            async move { replies.answer(request, &hits).await }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), service)
                            .await;
                    });
                }
            })
        })?;
        Ok(Mock { addr, hits })
    }
}

/// The two answers, serialised once.
struct Replies {
    json: Bytes,
    sse: Bytes,
}

impl Replies {
    fn new() -> Self {
        let usage = json!({ "prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15 });
        let json = json!({
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-4o-mini",
            "choices": [{ "index": 0, "message": { "role": "assistant", "content": REPLY }, "finish_reason": "stop" }],
            "usage": usage,
        });
        let chunk = |choices: Value, usage: Value| {
            let c = json!({ "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_700_000_000,
                "model": "gpt-4o-mini", "choices": choices, "usage": usage });
            format!("data: {c}\n\n")
        };
        let delta = |d: Value, finish: Value| json!([{ "index": 0, "delta": d, "finish_reason": finish }]);
        let mut sse = chunk(delta(json!({ "role": "assistant", "content": "" }), Value::Null), Value::Null);
        for text in REPLY_CHUNKS {
            sse += &chunk(delta(json!({ "content": text }), Value::Null), Value::Null);
        }
        sse += &chunk(delta(json!({}), json!("stop")), Value::Null);
        sse += &chunk(json!([]), usage);
        sse += "data: [DONE]\n\n";
        Self { json: Bytes::from(json.to_string()), sse: Bytes::from(sse) }
    }

    async fn answer(&self, request: Request<Incoming>, hits: &AtomicU64) -> Result<Response<Full<Bytes>>, Infallible> {
        if request.uri().path() == "/static" {
            return Ok(Response::new(Full::new(Bytes::from_static(STATIC_BODY.as_bytes()))));
        }
        let found = request.uri().path().ends_with("/chat/completions");
        let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        if !found {
            return Ok(Response::builder().status(404).body(Full::new(Bytes::new())).expect("a valid response"));
        }
        hits.fetch_add(1, Ordering::Relaxed);
        let stream = serde_json::from_slice::<StreamFlag>(&body).is_ok_and(|f| f.stream);
        let (content_type, body) =
            if stream { ("text/event-stream", self.sse.clone()) } else { ("application/json", self.json.clone()) };
        Ok(Response::builder().header("content-type", content_type).body(Full::new(body)).expect("a valid response"))
    }
}

/// `palaver serve` on a free loopback port, its data (and `server.log`) in
/// `dir`, its OpenAI provider the mock at `mock`, with `extra` settings on
/// top; killed when dropped. Returns the child and its address.
pub fn spawn_palaver(
    binary: &str,
    dir: &std::path::Path,
    mock: SocketAddr,
    extra: &[(&str, &str)],
) -> anyhow::Result<(tokio::process::Child, SocketAddr)> {
    let log = std::fs::File::create(dir.join("server.log"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = tokio::process::Command::new(binary)
        .arg("serve")
        .env_clear()
        .current_dir(dir)
        .env("PALAVER_BIND", format!("127.0.0.1:{port}"))
        .env("PALAVER_DATA_DIR", dir)
        .env("SECRET_KEY", "bench-secret-key-0123456789-0123456789-abcdef")
        .env("OPENAI_API_KEY", "sk-test-fake")
        .env("OPENAI_BASE_URL", format!("http://{mock}/v1"))
        .env("PALAVER_DEFAULT_MODEL", "openai/gpt-4o-mini")
        .env("PALAVER_PROVIDER_RETRIES", "0")
        .env("RUST_LOG", "warn")
        .env("PALAVER_LOG_FORMAT", "text")
        .envs(extra.iter().copied())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    Ok((child, format!("127.0.0.1:{port}").parse()?))
}

/// Waits for the server, then registers `email` and logs in: the access token.
pub async fn login(base: &str, email: &str, password: &str) -> anyhow::Result<String> {
    let http = reqwest::Client::new();
    let mut healthy = false;
    for _ in 0..200 {
        if http.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status().is_success()) {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::ensure!(healthy, "the server did not become healthy");
    let username = email.split('@').next().unwrap_or(email);
    let body = json!({ "username": username, "email": email, "password": password });
    let r = http.post(format!("{base}/api/auth/register")).json(&body).send().await?;
    anyhow::ensure!(r.status().is_success(), "register: {}", r.status());
    let r = http
        .post(format!("{base}/api/auth/login"))
        .json(&json!({ "login": email, "password": password }))
        .send()
        .await?;
    let tokens: Value = r.json().await?;
    let token = tokens["access_token"].as_str().ok_or_else(|| anyhow::anyhow!("no access token: {tokens}"))?;
    Ok(token.to_owned())
}

/// `perf record -g` on the server for `duration`, into `out`.
pub fn start_perf(pid: u32, out: &str, duration: Duration) -> anyhow::Result<tokio::process::Child> {
    Ok(tokio::process::Command::new("perf")
        // PALAVER_BENCH_PERF_CALLGRAPH=dwarf unwinds a release build without frame pointers.
        .arg("record")
        .arg(format!("--call-graph={}", std::env::var("PALAVER_BENCH_PERF_CALLGRAPH").unwrap_or_else(|_| "fp".into())))
        .args(["-p", &pid.to_string(), "-o", out, "--", "sleep"])
        .arg(format!("{:.1}", duration.as_secs_f64()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?)
}

/// `n` alternating user and assistant messages of about 300 bytes in
/// conversation `id`, by bulk SQL straight into the database (`engine`:
/// `sqlite` or `postgres`), with the conversation's counters set to match.
pub async fn seed_messages(url: &str, engine: &str, id: &str, n: i64) -> anyhow::Result<()> {
    let generate = if engine == "sqlite" {
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $2)"
    } else {
        "WITH n(i) AS (SELECT generate_series(1, CAST($2 AS BIGINT)))"
    };
    // About 300 bytes a message: a typical chat turn.
    let insert = format!(
        "{generate} INSERT INTO messages (id, conversation_id, role, content, status, usage_estimated, \
         created_at, updated_at, seq) SELECT $1 || '-' || CAST(i AS TEXT), $1, \
         CASE WHEN i % 2 = 1 THEN 'user' ELSE 'assistant' END, \
         'message ' || CAST(i AS TEXT) || ' {filler}', 'complete', 0, 1700000000000 + i, 1700000000000 + i, i FROM n",
        filler = "lorem ipsum dolor sit amet ".repeat(10)
    );
    let mut conn = sqlx::AnyConnection::connect(url).await?;
    sqlx::query(sqlx::AssertSqlSafe(insert)).bind(id).bind(n).execute(&mut conn).await?;
    sqlx::query("UPDATE conversations SET message_count = $2, last_seq = $2 WHERE id = $1")
        .bind(id)
        .bind(n)
        .execute(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(())
}
