//! Gateway benchmark: the same OpenAI `POST /v1/chat/completions` request
//! sent to a mock provider directly and through the release `palaver`
//! binary's OpenAI-compatible gateway (API key auth), so the difference is
//! what Palaver adds. The mock answers at once from memory, as JSON or, for
//! `stream: true`, as SSE chunks with a usage chunk and `[DONE]`; Palaver
//! always calls its provider streamed, so both direct answers are measured.
//!
//! Each connection is an HTTP/1.1 keep-alive connection of hyper's client
//! sending its requests one after another: closed loop (as fast as answers
//! come), or paced (the offered rate spread evenly over the connections,
//! latency counted from the actual send). Mock, load generator and server
//! share the machine's cores. Loopback only. Run through
//! `bench/gateway_bench.sh`.
//!
//! Usage: gateway_bench <path to palaver> [connections, default 1,64]
//!        [seconds per phase, default 5] [paced rate, req/s, default 10000]
//! PALAVER_BENCH_MODEL sets the request's model (default openai/gpt-4o-mini);
//! PALAVER_BENCH_PERF=<file> records `perf record -g` on the server during the
//! saturated non-stream gateway phase (its figures are then perturbed);
//! PALAVER_BENCH_PERF_CALLGRAPH=dwarf for call graphs of a release build.

mod common;

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

/// The mock's reply text, split into these stream chunks.
const REPLY_CHUNKS: [&str; 3] = ["Hello", " from the", " mock provider."];
const REPLY: &str = "Hello from the mock provider.";
/// Requests before a phase's figures count.
const WARMUP: Duration = Duration::from_secs(1);
const PASSWORD: &str = "bench password 123";

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let binary = args.next().expect("usage: gateway_bench <path to palaver> [connections] [seconds] [paced rate]");
    let levels = common::levels(args.next(), "1,64");
    let seconds: u64 = args.next().map_or(5, |s| s.parse().expect("seconds is a number"));
    let paced: f64 = args.next().map_or(10_000.0, |s| s.parse().expect("paced rate is a number"));
    let measure = Duration::from_secs(seconds);
    let model = std::env::var("PALAVER_BENCH_MODEL").unwrap_or_else(|_| "openai/gpt-4o-mini".into());
    let perf_out = std::env::var("PALAVER_BENCH_PERF").ok();
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }

    let mock = Mock::start()?;
    let data_dir = tempfile::tempdir()?;
    let log_path = data_dir.path().join("server.log");
    let log = std::fs::File::create(&log_path)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut server = tokio::process::Command::new(&binary)
        .arg("serve")
        .env_clear()
        .current_dir(data_dir.path())
        .env("PALAVER_BIND", format!("127.0.0.1:{port}"))
        .env("PALAVER_DATA_DIR", data_dir.path())
        .env("SECRET_KEY", "bench-secret-key-0123456789-0123456789-abcdef")
        .env("OPENAI_API_KEY", "sk-test-fake")
        .env("OPENAI_BASE_URL", format!("http://{}/v1", mock.addr))
        .env("PALAVER_DEFAULT_MODEL", "openai/gpt-4o-mini")
        .env("PALAVER_PROVIDER_RETRIES", "0")
        .env("RUST_LOG", "warn")
        .env("PALAVER_LOG_FORMAT", "text")
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let pid = server.id().expect("server pid");
    let gateway: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    // Without the gateway (an older server) the direct figures still show the harness works.
    let (targets, probes) = match api_key(&format!("http://{gateway}")).await {
        Ok(key) => (Target::all(mock.addr, gateway, &key, &model), Target::probes(gateway, &key)),
        Err(e) => {
            eprintln!("no gateway ({e}): measuring the provider directly only");
            (Target::all(mock.addr, gateway, "", &model).into_iter().filter(|t| !t.gateway).collect(), Vec::new())
        }
    };
    println!(
        "gateway bench: palaver pid {pid}, model {model:?}, {seconds} s per phase after {} s warmup, {} cores shared by server, mock and load generator",
        WARMUP.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "added latency = gateway percentile - direct percentile of the same request (non-stream or stream) at the same connections and load\n"
    );

    // Closed loop at each level, then paced at the offered rate at the highest.
    let mut loads: Vec<Load> = levels.iter().map(|&conns| Load { conns, rate: None }).collect();
    if let Some(&top) = levels.iter().max().filter(|&&c| c > 1) {
        loads.push(Load { conns: top, rate: Some(paced) });
    }
    let mut results = Vec::new();
    println!(
        "| load | target | req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | first byte p50 µs | errors | server CPU µs/req | bench CPU µs/req |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for load in &loads {
        let closed = load.rate.is_none();
        for target in targets.iter().chain(probes.iter().filter(|_| closed)) {
            let perf = match (
                &perf_out,
                target.gateway && target.probe.is_none() && !target.stream && closed && load.conns > 1,
            ) {
                (Some(out), true) => Some(start_perf(pid, out, WARMUP + measure)?),
                _ => None,
            };
            let hits_before = mock.hits.load(Ordering::Relaxed);
            let r = run_phase(target, load, measure, pid).await;
            let hits = mock.hits.load(Ordering::Relaxed) - hits_before;
            if let Some(mut perf) = perf {
                perf.wait().await?;
            }
            print_row(load, target, &r);
            if target.gateway && target.probe.is_none() && hits < r.sent {
                eprintln!("  warning: {} gateway requests but {hits} provider calls", r.sent);
            }
            if let Some(e) = &r.first_error {
                eprintln!("  first failure: {e}");
            }
            results.push((load.clone(), target.name, r));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    summary(&results);
    println!("\nserver RSS at the end: {} MiB", common::rss_kib(pid) / 1024);
    server.kill().await?;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    if !lines.is_empty() {
        println!("server log at warn: {} lines; first: {}", lines.len(), lines[0]);
    }
    Ok(())
}

#[derive(Clone)]
struct Load {
    conns: usize,
    /// Offered requests per second over all connections; `None` is closed loop.
    rate: Option<f64>,
}

impl Load {
    fn name(&self) -> String {
        match self.rate {
            None => format!("{} conn closed", self.conns),
            Some(r) => format!("{} conn paced {r:.0}/s", self.conns),
        }
    }
}

/// One way to send the request: straight to the mock or through Palaver.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// `None` is `POST /v1/chat/completions`; a probe is a GET of this path.
    probe: Option<&'static str>,
    gateway: bool,
    stream: bool,
    authorization: Option<String>,
    body: Bytes,
}

impl Target {
    fn all(mock: SocketAddr, gateway: SocketAddr, key: &str, model: &str) -> Vec<Arc<Target>> {
        let body = |stream: bool| {
            let mut b =
                json!({ "model": model, "messages": [{ "role": "user", "content": "Say hello." }], "stream": stream });
            if stream {
                b["stream_options"] = json!({ "include_usage": true });
            }
            Bytes::from(b.to_string())
        };
        let auth = Some(format!("Bearer {key}"));
        [
            Target {
                name: "direct",
                addr: mock,
                probe: None,
                gateway: false,
                stream: false,
                authorization: None,
                body: body(false),
            },
            Target {
                name: "direct stream",
                addr: mock,
                probe: None,
                gateway: false,
                stream: true,
                authorization: None,
                body: body(true),
            },
            Target {
                name: "gateway",
                addr: gateway,
                probe: None,
                gateway: true,
                stream: false,
                authorization: auth.clone(),
                body: body(false),
            },
            Target {
                name: "gateway stream",
                addr: gateway,
                probe: None,
                gateway: true,
                stream: true,
                authorization: auth,
                body: body(true),
            },
        ]
        .into_iter()
        .map(Arc::new)
        .collect()
    }

    /// Where a gateway request's server time goes: the HTTP stack alone
    /// (`/health`), then with API key auth (`/v1/models`).
    fn probes(gateway: SocketAddr, key: &str) -> Vec<Arc<Target>> {
        let probe = |name, path, authorization| Target {
            name,
            addr: gateway,
            probe: Some(path),
            gateway: true,
            stream: false,
            authorization,
            body: Bytes::new(),
        };
        vec![
            Arc::new(probe("probe GET /health", "/health", None)),
            Arc::new(probe("probe GET /v1/models (key auth)", "/v1/models", Some(format!("Bearer {key}")))),
        ]
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let builder = match self.probe {
            Some(path) => Request::get(path),
            None => Request::post("/v1/chat/completions"),
        };
        let mut r = builder
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .header("accept", if self.stream { "text/event-stream" } else { "application/json" });
        if let Some(a) = &self.authorization {
            r = r.header("authorization", a);
        }
        r.body(Full::new(self.body.clone())).expect("a valid request")
    }

    /// Whether an answer is the whole reply: the text, or the stream's end.
    fn complete(&self, body: &[u8]) -> bool {
        let text = String::from_utf8_lossy(body);
        if self.probe.is_some() {
            true
        } else if self.stream {
            text.trim_end().ends_with("data: [DONE]")
        } else {
            text.contains(REPLY)
        }
    }
}

#[derive(Default)]
struct PhaseResult {
    /// Latencies (ns) of the measured requests, sorted.
    latencies: Vec<u64>,
    first_byte: Vec<u64>,
    /// Requests sent in the measured window (for the mock's count).
    sent: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    server_cpu: Duration,
    bench_cpu: Duration,
}

impl PhaseResult {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// Percentile `p` in µs (NaN without samples).
    fn pct(sorted: &[u64], p: f64) -> f64 {
        if sorted.is_empty() {
            return f64::NAN;
        }
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i] as f64 / 1000.0
    }

    fn p(&self, p: f64) -> f64 {
        Self::pct(&self.latencies, p)
    }

    fn cpu_per_request(cpu: Duration, n: usize) -> f64 {
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
async fn run_phase(target: &Arc<Target>, load: &Load, measure: Duration, pid: u32) -> PhaseResult {
    let mut senders = Vec::with_capacity(load.conns);
    for _ in 0..load.conns {
        match connect(target.addr).await {
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
            tokio::spawn(connection_loop(sender, target, first, interval, counted_from, end))
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

async fn connection_loop(
    mut sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    target: Arc<Target>,
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
        let outcome = exchange(&mut sender, &target, sent).await;
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
                match connect(target.addr).await {
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

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One request and its whole answer; the time to the answer's first body byte.
async fn exchange(sender: &mut Sender, target: &Target, sent: Instant) -> anyhow::Result<Duration> {
    sender.ready().await?;
    let response = sender.send_request(target.request()).await?;
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
        status == StatusCode::OK && target.complete(&bytes),
        "{}: status {status}: {}",
        target.name,
        String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
    );
    Ok(first_byte.unwrap_or_else(|| sent.elapsed()))
}

/// A process's user + system CPU time from `/proc/<pid>/stat` (USER_HZ is
/// 100 on Linux's user ABI).
fn cpu_time(stat: &str) -> Duration {
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

fn print_row(load: &Load, target: &Target, r: &PhaseResult) {
    println!(
        "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.1} | {:.1} |",
        load.name(),
        target.name,
        r.rate(),
        r.p(0.50),
        r.p(0.90),
        r.p(0.99),
        r.p(0.999),
        r.latencies.last().map_or(f64::NAN, |&l| l as f64 / 1000.0),
        PhaseResult::pct(&r.first_byte, 0.50),
        r.errors,
        PhaseResult::cpu_per_request(r.server_cpu, r.latencies.len()),
        PhaseResult::cpu_per_request(r.bench_cpu, r.latencies.len()),
    );
}

/// The figures with targets, and gateway/direct ratios.
fn summary(results: &[(Load, &'static str, PhaseResult)]) {
    let find = |conns: usize, paced: bool, name: &str| {
        results.iter().find(|(l, n, _)| l.conns == conns && l.rate.is_some() == paced && *n == name).map(|(_, _, r)| r)
    };
    println!("\n| figure | measured | target | measured/target | met |");
    println!("|---|---:|---:|---:|:-:|");
    let row = |figure: String, measured: f64, unit: &str, target: f64, at_most: bool| {
        let met = if at_most { measured <= target } else { measured >= target };
        println!(
            "| {figure} | {measured:.0} {unit} | {} {target:.0} {unit} | {:.2} | {} |",
            if at_most { "≤" } else { "≥" },
            measured / target,
            if met { "yes" } else { "no" }
        );
    };
    let max_conns = results.iter().map(|(l, _, _)| l.conns).max().unwrap_or(1);
    for (stream, suffix) in [(false, ""), (true, " stream")] {
        let (direct, gateway) = (format!("direct{suffix}"), format!("gateway{suffix}"));
        let kind = if stream { "stream" } else { "non-stream" };
        if let (Some(d), Some(g)) = (find(1, false, &direct), find(1, false, &gateway)) {
            let (t50, t99) = if stream { (f64::NAN, f64::NAN) } else { (150.0, 500.0) };
            added_row(&row, format!("added p50, 1 conn, {kind}"), g.p(0.5) - d.p(0.5), t50);
            added_row(&row, format!("added p99, 1 conn, {kind}"), g.p(0.99) - d.p(0.99), t99);
        }
        if max_conns > 1 {
            if let (Some(d), Some(g)) = (find(max_conns, false, &direct), find(max_conns, false, &gateway)) {
                let target = if stream { f64::NAN } else { 10_000.0 };
                if target.is_nan() {
                    println!(
                        "| gateway req/s, {max_conns} conn closed loop, {kind} | {:.0} req/s | - | - | - |",
                        g.rate()
                    );
                } else {
                    row(
                        format!("gateway req/s, {max_conns} conn closed loop, {kind}"),
                        g.rate(),
                        "req/s",
                        target,
                        false,
                    );
                }
                let t99 = if stream { f64::NAN } else { 2000.0 };
                added_row(&row, format!("added p99, {max_conns} conn closed loop, {kind}"), g.p(0.99) - d.p(0.99), t99);
            }
            if let (Some(d), Some(g)) = (find(max_conns, true, &direct), find(max_conns, true, &gateway)) {
                let t99 = if stream { f64::NAN } else { 2000.0 };
                added_row(
                    &row,
                    format!("added p99, {max_conns} conn paced, {kind} ({:.0} req/s achieved)", g.rate()),
                    g.p(0.99) - d.p(0.99),
                    t99,
                );
            }
        }
    }
    println!("\n| ratio gateway / direct | p50 | p99 | req/s |");
    println!("|---|---:|---:|---:|");
    for (load, name, g) in results.iter().filter(|(_, n, _)| n.starts_with("gateway")) {
        let direct = name.replace("gateway", "direct");
        if let Some(d) = find(load.conns, load.rate.is_some(), &direct) {
            println!(
                "| {} {name} / {direct} | {:.2} | {:.2} | {:.2} |",
                load.name(),
                g.p(0.5) / d.p(0.5),
                g.p(0.99) / d.p(0.99),
                g.rate() / d.rate()
            );
        }
    }
    // Where the added time comes from: Palaver calls its provider streamed.
    if let (Some(ds), Some(g)) = (find(1, false, "direct stream"), find(1, false, "gateway")) {
        println!(
            "\n1 conn: gateway non-stream p50 - direct stream p50 (Palaver's own time, its provider call being streamed) = {:.0} µs",
            g.p(0.5) - ds.p(0.5)
        );
    }
}

/// An added-latency row (µs); without a target it is shown only.
fn added_row(row: &impl Fn(String, f64, &str, f64, bool), figure: String, added_us: f64, target_us: f64) {
    if target_us.is_nan() {
        println!("| {figure} | {added_us:.0} µs | - | - | - |");
    } else {
        row(figure, added_us, "µs", target_us, true);
    }
}

/// The mock provider: an OpenAI chat completions endpoint answering at once
/// from memory, on its own thread so the load generator's timing is not
/// queued behind it.
struct Mock {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
}

#[derive(serde::Deserialize)]
struct StreamFlag {
    #[serde(default)]
    stream: bool,
}

impl Mock {
    fn start() -> anyhow::Result<Mock> {
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

/// Waits for the server, registers and logs in a user, and creates the API
/// key the gateway requests carry.
async fn api_key(base: &str) -> anyhow::Result<String> {
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
    let body = json!({ "username": "bench", "email": "bench@example.com", "password": PASSWORD });
    let r = http.post(format!("{base}/api/auth/register")).json(&body).send().await?;
    anyhow::ensure!(r.status().is_success(), "register: {}", r.status());
    let r = http
        .post(format!("{base}/api/auth/login"))
        .json(&json!({ "login": "bench", "password": PASSWORD }))
        .send()
        .await?;
    let tokens: Value = r.json().await?;
    let token = tokens["access_token"].as_str().expect("access token");
    let r = http.post(format!("{base}/api/keys")).bearer_auth(token).json(&json!({ "name": "bench" })).send().await?;
    let status = r.status();
    let created: Value = r.json().await.unwrap_or_default();
    anyhow::ensure!(status == StatusCode::CREATED, "POST /api/keys: {status} {created}");
    Ok(created["key"].as_str().expect("the new key").to_owned())
}

/// `perf record -g` on the server for `duration`, into `out`.
fn start_perf(pid: u32, out: &str, duration: Duration) -> anyhow::Result<tokio::process::Child> {
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
