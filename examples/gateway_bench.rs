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
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use serde_json::{Value, json};

use common::{Load, Mock, PhaseResult, REPLY, WARMUP, Workload, run_phase, start_perf};

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
    let (mut server, gateway) = common::spawn_palaver(&binary, data_dir.path(), mock.addr, &[])?;
    let pid = server.id().expect("server pid");
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
}

impl Workload for Target {
    fn name(&self) -> &str {
        self.name
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn request(&self, _conn: usize) -> Request<Full<Bytes>> {
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
    fn complete(&self, status: StatusCode, body: &[u8]) -> bool {
        if status != StatusCode::OK {
            return false;
        }
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

/// Registers and logs in a user, and creates the API key the gateway
/// requests carry.
async fn api_key(base: &str) -> anyhow::Result<String> {
    let token = common::login(base, "bench@example.com", PASSWORD).await?;
    let http = reqwest::Client::new();
    let r = http.post(format!("{base}/api/keys")).bearer_auth(token).json(&json!({ "name": "bench" })).send().await?;
    let status = r.status();
    let created: Value = r.json().await.unwrap_or_default();
    anyhow::ensure!(status == StatusCode::CREATED, "POST /api/keys: {status} {created}");
    Ok(created["key"].as_str().expect("the new key").to_owned())
}
