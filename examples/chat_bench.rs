//! Chat round-trip benchmark (issue 13): in one run, the machine's limit (the
//! mock answering a tiny fixed body on `GET /static`), the mock provider
//! called directly as Palaver calls it (`POST /v1/chat/completions`, streamed),
//! and the release `palaver` binary's `POST /api/conversations/{id}/messages`
//! (JSON answer: the user message and the reply stored) on SQLite and, when it
//! answers, PostgreSQL; then `GET /api/conversations`, and the round trip at 1
//! connection on 10-message conversations against a 10,000-message one.
//! Prints one table with absolute figures and the ratios Palaver ÷ provider
//! and Palaver ÷ limit, then the targets, met or not.
//!
//! Each send connection writes to its own conversation. The short-history
//! phase rotates over many conversations seeded with 10 messages each (bulk
//! SQL, like the long one), so they stay short while it runs; the long one
//! grows from 10,000 by two messages per request. Mock, load generator and
//! server share the machine's cores. Run through `bench/chat_bench.sh`.
//!
//! Usage: chat_bench <path to palaver> [seconds per phase, default 5]
//!        [engines, default sqlite,postgres] [connections, default 8,16,64]
//! PALAVER_BENCH_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/test)
//! gets a fresh schema, dropped afterwards; PostgreSQL is skipped when it does
//! not answer. PALAVER_BENCH_PERF=<file> records `perf record` on the server
//! during the SQLite send phase at the most connections (its figures are then
//! perturbed); PALAVER_BENCH_PERF_CALLGRAPH=dwarf for call graphs.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use serde_json::{Value, json};
use sqlx::Connection;

use common::{Load, Mock, PhaseResult, REPLY, STATIC_BODY, WARMUP, Workload, run_phase, start_perf};

const PASSWORD: &str = "bench password 123";
/// Conversations the short-history phase rotates over, each seeded with
/// `SHORT_HISTORY` messages.
const SHORT_CONVERSATIONS: usize = 300;
const SHORT_HISTORY: i64 = 10;
const LONG_HISTORY: i64 = 10_000;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let binary = args.next().expect("usage: chat_bench <path to palaver> [seconds] [engines] [connections]");
    let seconds: u64 = args.next().map_or(5, |s| s.parse().expect("seconds is a number"));
    let engines: Vec<String> =
        args.next().unwrap_or_else(|| "sqlite,postgres".into()).split(',').map(str::to_owned).collect();
    let levels = common::levels(args.next(), "8,16,64");
    let measure = Duration::from_secs(seconds);
    let top = levels.iter().copied().max().unwrap_or(1);
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    sqlx::any::install_default_drivers();
    let mock = Mock::start()?;
    println!(
        "chat bench: {seconds} s per phase after {} s warmup, {} cores shared by server, mock and load generator\n",
        WARMUP.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let mut rows: Vec<Row> = Vec::new();
    let limit = Arc::new(Call::get("limit: static GET", mock.addr, vec!["/static".into()], None));
    for &conns in &levels {
        rows.push(Row::run(&limit, conns, measure, std::process::id(), None, "-").await);
    }
    let direct = Arc::new(Call::provider(mock.addr));
    for conns in std::iter::once(1).chain(levels.iter().copied()) {
        rows.push(Row::run(&direct, conns, measure, std::process::id(), None, "-").await);
    }
    for engine in &engines {
        let Some(server) = Server::start(&binary, engine, mock.addr).await? else { continue };
        if let Err(e) = palaver_phases(&server, engine, &levels, top, measure, &mut rows).await {
            eprintln!("{engine}: {e:#}");
        }
        server.stop().await?;
    }
    print_table(&rows);
    print_targets(&rows, top);
    Ok(())
}

async fn palaver_phases(
    server: &Server,
    engine: &str,
    levels: &[usize],
    top: usize,
    measure: Duration,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let base = format!("http://{}", server.addr);
    let token = common::login(&base, "bench@example.com", PASSWORD).await?;
    let auth = Some(format!("Bearer {token}"));
    let http = reqwest::Client::new();
    let mut fresh = Vec::new();
    for i in 0..top {
        fresh.push(create_conversation(&http, &base, &token, &format!("connection {i}")).await?);
    }
    let mut short = Vec::new();
    for i in 0..SHORT_CONVERSATIONS {
        let id = create_conversation(&http, &base, &token, &format!("short {i}")).await?;
        common::seed_messages(&server.db_url, engine, &id, SHORT_HISTORY).await?;
        short.push(id);
    }
    let long = create_conversation(&http, &base, &token, "long").await?;
    common::seed_messages(&server.db_url, engine, &long, LONG_HISTORY).await?;
    let messages = |ids: &[String]| ids.iter().map(|id| format!("/api/conversations/{id}/messages")).collect();

    let send = Arc::new(Call::send("send", server.addr, messages(&fresh), auth.clone(), false));
    let perf = std::env::var("PALAVER_BENCH_PERF").ok().filter(|_| engine == "sqlite");
    for &conns in levels {
        let perf = perf.as_deref().filter(|_| conns == top);
        rows.push(Row::run(&send, conns, measure, server.pid, perf, engine).await);
    }
    let list =
        Arc::new(Call::get("GET /api/conversations", server.addr, vec!["/api/conversations".into()], auth.clone()));
    rows.push(Row::run(&list, 16, measure, server.pid, None, engine).await);
    let short_name = format!("send, {SHORT_HISTORY}-message history");
    let short = Arc::new(Call::send(&short_name, server.addr, messages(&short), auth.clone(), true));
    rows.push(Row::run(&short, 1, measure, server.pid, None, engine).await);
    let long_name = format!("send, {LONG_HISTORY}-message history");
    let long = Arc::new(Call::send(&long_name, server.addr, messages(&[long]), auth, false));
    rows.push(Row::run(&long, 1, measure, server.pid, None, engine).await);
    Ok(())
}

/// One kind of request: the path each connection sends to (or, `rotate`,
/// each request in turn), and what a success looks like.
struct Call {
    name: String,
    addr: SocketAddr,
    post: bool,
    paths: Vec<String>,
    rotate: bool,
    next: AtomicUsize,
    authorization: Option<String>,
    accept: &'static str,
    body: Bytes,
    /// Text a successful answer contains.
    expect: &'static str,
    palaver: bool,
}

impl Call {
    fn get(name: &str, addr: SocketAddr, paths: Vec<String>, authorization: Option<String>) -> Call {
        let palaver = authorization.is_some();
        Call {
            name: name.into(),
            addr,
            post: false,
            paths,
            rotate: false,
            next: AtomicUsize::new(0),
            authorization,
            accept: "application/json",
            body: Bytes::new(),
            expect: if palaver { "" } else { STATIC_BODY },
            palaver,
        }
    }

    /// The request Palaver's OpenAI provider makes for a one-message context.
    fn provider(addr: SocketAddr) -> Call {
        let body = json!({ "model": "gpt-4o-mini", "messages": [{ "role": "user", "content": "Say hello." }],
            "stream": true, "stream_options": { "include_usage": true } });
        Call {
            name: "provider direct (stream)".into(),
            post: true,
            paths: vec!["/v1/chat/completions".into()],
            accept: "text/event-stream",
            body: Bytes::from(body.to_string()),
            expect: "data: [DONE]",
            palaver: false,
            ..Call::get("", addr, Vec::new(), None)
        }
    }

    fn send(name: &str, addr: SocketAddr, paths: Vec<String>, authorization: Option<String>, rotate: bool) -> Call {
        Call {
            name: name.into(),
            post: true,
            rotate,
            body: Bytes::from(json!({ "content": "Say hello." }).to_string()),
            expect: REPLY,
            ..Call::get("", addr, paths, authorization)
        }
    }
}

impl Workload for Call {
    fn name(&self) -> &str {
        &self.name
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn request(&self, conn: usize) -> Request<Full<Bytes>> {
        let i = if self.rotate { self.next.fetch_add(1, Ordering::Relaxed) } else { conn };
        let path = &self.paths[i % self.paths.len()];
        let mut r = if self.post { Request::post(path) } else { Request::get(path) }
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .header("accept", self.accept);
        if let Some(a) = &self.authorization {
            r = r.header("authorization", a);
        }
        r.body(Full::new(self.body.clone())).expect("a valid request")
    }

    fn complete(&self, status: StatusCode, body: &[u8]) -> bool {
        status.is_success() && String::from_utf8_lossy(body).contains(self.expect)
    }
}

/// One measured phase.
struct Row {
    engine: String,
    workload: String,
    palaver: bool,
    conns: usize,
    r: PhaseResult,
}

impl Row {
    /// `pid`'s CPU time counts; `perf` records it into that file meanwhile.
    async fn run(call: &Arc<Call>, conns: usize, measure: Duration, pid: u32, perf: Option<&str>, engine: &str) -> Row {
        let recording = perf.and_then(|out| start_perf(pid, out, WARMUP + measure).ok());
        let r = run_phase(call, &Load { conns, rate: None }, measure, pid).await;
        if let Some(mut p) = recording {
            let _ = p.wait().await;
        }
        if let Some(e) = &r.first_error {
            eprintln!("  {engine} {} at {conns}: {} errors, first: {e}", call.name, r.errors);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        Row { engine: engine.into(), workload: call.name.clone(), palaver: call.palaver, conns, r }
    }
}

fn find<'a>(rows: &'a [Row], engine: &str, workload: &str, conns: usize) -> Option<&'a PhaseResult> {
    rows.iter().find(|w| w.engine == engine && w.workload.starts_with(workload) && w.conns == conns).map(|w| &w.r)
}

fn print_table(rows: &[Row]) {
    println!(
        "| engine | workload | conns | req/s | p50 µs | p99 µs | errors | server CPU µs/req | req/s ÷ provider | req/s ÷ limit | p50 ÷ provider |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let r = &row.r;
        let ratio = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.3}"));
        let direct = find(rows, "-", "provider", row.conns).filter(|_| row.palaver);
        let limit = find(rows, "-", "limit", row.conns).filter(|_| row.palaver);
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
            row.engine,
            row.workload,
            row.conns,
            r.rate(),
            r.p(0.5),
            r.p(0.99),
            r.errors,
            if row.palaver {
                format!("{:.0}", PhaseResult::cpu_per_request(r.server_cpu, r.latencies.len()))
            } else {
                "-".into()
            },
            ratio(direct.map(|d| r.rate() / d.rate())),
            ratio(limit.map(|l| r.rate() / l.rate())),
            ratio(direct.map(|d| r.p(0.5) / d.p(0.5))),
        );
    }
}

/// Issue 13's targets, per engine measured.
fn print_targets(rows: &[Row], top: usize) {
    println!("\n| target (issue 13) | measured | target | met |");
    println!("|---|---:|---:|:-:|");
    let row = |figure: String, measured: f64, unit: &str, target: f64, at_most: bool| {
        let met = if at_most { measured <= target } else { measured >= target };
        let sign = if at_most { "≤" } else { "≥" };
        println!("| {figure} | {measured:.2} {unit} | {sign} {target} {unit} | {} |", if met { "yes" } else { "no" });
    };
    let mut engines: Vec<&str> = rows.iter().map(|r| r.engine.as_str()).filter(|e| *e != "-").collect();
    engines.dedup();
    let direct = find(rows, "-", "provider", 1);
    for engine in engines {
        if let Some(s) = find(rows, engine, "send", top).filter(|_| top == 64) {
            let floor = if engine == "sqlite" { 5000.0 } else { 3000.0 };
            row(format!("{engine}: send msg/s at 64 conns"), s.rate(), "msg/s", floor, false);
            row(format!("{engine}: send errors at 64 conns"), s.errors as f64, "", 0.0, true);
            if engine == "sqlite" {
                row(format!("{engine}: send p99 at 64 conns"), s.p(0.99) / 1000.0, "ms", 30.0, true);
            }
        }
        let short = find(rows, engine, &format!("send, {SHORT_HISTORY}-"), 1);
        if let (Some(s), Some(d)) = (short, direct) {
            row(format!("{engine}: added p50 at 1 conn"), (s.p(0.5) - d.p(0.5)) / 1000.0, "ms", 0.3, true);
            row(format!("{engine}: added p99 at 1 conn"), (s.p(0.99) - d.p(0.99)) / 1000.0, "ms", 1.0, true);
        }
        if let (Some(s), Some(l)) = (short, find(rows, engine, &format!("send, {LONG_HISTORY}-"), 1)) {
            row(format!("{engine}: p50 long ÷ short history"), l.p(0.5) / s.p(0.5), "×", 1.2, true);
            row(format!("{engine}: p99 long ÷ short history"), l.p(0.99) / s.p(0.99), "×", 1.2, true);
        }
        if let Some(g) = find(rows, engine, "GET /api/conversations", 16) {
            row(format!("{engine}: GET /api/conversations at 16 conns"), g.rate(), "req/s", 10_000.0, false);
        }
    }
}

async fn create_conversation(http: &reqwest::Client, base: &str, token: &str, title: &str) -> anyhow::Result<String> {
    let created: Value = http
        .post(format!("{base}/api/conversations"))
        .bearer_auth(token)
        .json(&json!({ "title": title }))
        .send()
        .await?
        .json()
        .await?;
    Ok(created["id"].as_str().ok_or_else(|| anyhow::anyhow!("no conversation: {created}"))?.to_owned())
}

/// The `palaver serve` child on a fresh SQLite file or PostgreSQL schema.
struct Server {
    child: tokio::process::Child,
    pid: u32,
    addr: SocketAddr,
    db_url: String,
    /// PostgreSQL: the server URL and the schema to drop.
    schema: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// `None` (with a line saying why) when the engine is not available.
    async fn start(binary: &str, engine: &str, mock: SocketAddr) -> anyhow::Result<Option<Server>> {
        let dir = tempfile::tempdir()?;
        let (db_url, schema) = match engine {
            "sqlite" => (format!("sqlite://{}", dir.path().join("palaver.db").display()), None),
            "postgres" => {
                let base = std::env::var("PALAVER_BENCH_POSTGRES_URL")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
                let connected = tokio::time::timeout(Duration::from_secs(3), sqlx::AnyConnection::connect(&base)).await;
                let mut conn = match connected {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => return skip(engine, &e.to_string()),
                    Err(_) => return skip(engine, "no answer in 3 s"),
                };
                let schema = format!("chat_bench_{}", std::process::id());
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&mut conn).await?;
                let _ = conn.close().await;
                (format!("{base}?options=-c%20search_path%3D{schema}"), Some((base, schema)))
            }
            other => anyhow::bail!("unknown engine {other:?} (sqlite or postgres)"),
        };
        let settings = [
            ("DATABASE_URL", db_url.as_str()),
            ("ACCESS_TOKEN_EXPIRE_MINUTES", "100000"),
            ("PALAVER_REGISTRATIONS_PER_IP", "1000000"),
        ];
        let (child, addr) = common::spawn_palaver(binary, dir.path(), mock, &settings)?;
        let pid = child.id().expect("server pid");
        println!("{engine}: palaver pid {pid}");
        Ok(Some(Server { child, pid, addr, db_url, schema, _dir: dir }))
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        let log = std::fs::read_to_string(self._dir.path().join("server.log")).unwrap_or_default();
        if let Some(first) = log.lines().next() {
            println!("server log at warn: {} lines; first: {first}", log.lines().count());
        }
        if let Some((base, schema)) = &self.schema {
            let mut conn = sqlx::AnyConnection::connect(base).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&mut conn).await?;
        }
        Ok(())
    }
}

fn skip(engine: &str, why: &str) -> anyhow::Result<Option<Server>> {
    println!("{engine}: skipped ({why})");
    Ok(None)
}
