//! Connections (issue #8): a client that sends nothing, or a head too slowly,
//! is closed after the header-read timeout, a stalled upload after the idle
//! timeout; busy streams, sockets and handlers outlive the idle timeout; under a low open-file limit the server caps its
//! connections, waits out EMFILE without spinning and still answers once the
//! idle ones are gone; oversized and ambiguous bodies are answered at once.
//! Over raw TCP, against the real binary where its file limit matters.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    helpers::{Db, Fetch, TestApp, spawn_app, spawn_limited_process_app, spawn_process_app_with},
    mock_llm::Script,
};

/// Reads until the server closes the connection; what it sent, or `None`
/// if it is still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let reading = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, reading).await.ok().map(|_| seen)
}

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(("127.0.0.1", app.port)).await.expect("connect to the server")
}

/// Sends `request` and reads one answer: status, lowercase head and body.
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> (u16, String, Value) {
    stream.write_all(request).await.expect("send the request");
    read_answer(stream).await
}

async fn read_answer(stream: &mut TcpStream) -> (u16, String, Value) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .expect("read the answer");
        assert!(n > 0, "the connection closed before an answer: {:?}", String::from_utf8_lossy(&data));
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().expect("a numeric content-length"))
        .unwrap_or(0);
    while data.len() < head_end + length {
        let n = stream.read(&mut buf).await.expect("read the body");
        assert!(n > 0, "the connection closed inside the body");
        data.extend_from_slice(&buf[..n]);
    }
    let body = serde_json::from_slice(&data[head_end..head_end + length]).unwrap_or(Value::Null);
    (status, head, body)
}

// ---------------------------------------------------------------------------
// Timeouts

#[tokio::test(flavor = "multi_thread")]
async fn silent_and_slowloris_connections_are_closed_after_the_header_timeout() {
    // The idle timer is far off: what closes them here is the header timer.
    let Some(app) = spawn_process_app_with(Db::Sqlite, |s| {
        s.server.header_read_timeout = 1;
        s.server.idle_timeout = 600;
    })
    .await
    else {
        return;
    };
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(connect(&app).await);
    }
    let mut slowloris = connect(&app).await;
    let dripping = tokio::spawn(async move {
        // One byte every 100 ms: a head that never ends.
        for byte in
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter()
        {
            if slowloris.write_all(&[*byte]).await.is_err() {
                return (slowloris, true);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (slowloris, false)
    });
    // A keep-alive connection after its answer waits for a head too.
    let mut kept = connect(&app).await;
    let (status, _, _) = exchange(&mut kept, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 200);

    for (i, stream) in silent.iter_mut().enumerate() {
        assert!(closed_within(stream, Duration::from_secs(5)).await.is_some(), "silent connection {i} is still open");
    }
    assert!(closed_within(&mut kept, Duration::from_secs(5)).await.is_some(), "an idle keep-alive connection stays");
    let (mut slowloris, cut) = dripping.await.unwrap();
    assert!(cut || closed_within(&mut slowloris, Duration::from_secs(1)).await.is_some(), "the slowloris stays");
    app.get("/health").fetch().await.assert_status(StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_upload_is_closed_after_the_idle_timeout() {
    let Some(app) = spawn_process_app_with(Db::Sqlite, |s| {
        s.server.header_read_timeout = 600;
        s.server.idle_timeout = 1;
    })
    .await
    else {
        return;
    };
    let mut stream = connect(&app).await;
    let head = "POST /api/auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 100\r\n\r\n{\"email\": ";
    stream.write_all(head.as_bytes()).await.unwrap();
    // The handler waits for the rest of the body, which never comes.
    assert!(closed_within(&mut stream, Duration::from_secs(10)).await.is_some(), "the stalled upload stays open");
    app.get("/health").fetch().await.assert_status(StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn busy_streams_sockets_and_handlers_outlive_the_idle_timeout() {
    let Some(app) = spawn_process_app_with(Db::Sqlite, |s| {
        s.server.header_read_timeout = 1;
        s.server.idle_timeout = 1;
        s.providers.provider_timeout = 20;
        s.providers.provider_idle_timeout = 20;
    })
    .await
    else {
        return;
    };
    let user = app.signup().await;

    // An event stream of 3 s, one delta every 200 ms.
    app.provider.stream(Script::words(15, Duration::from_millis(200)));
    let started = Instant::now();
    let events = app.chat_stream(&user, json!({ "message": "a long answer" })).await.rest().await;
    assert!(started.elapsed() > Duration::from_secs(2), "the stream was not long: {:?}", started.elapsed());
    assert_eq!(events.last().map(|e| e.event.as_str()), Some("done"), "{events:?}");

    // A socket that pings every 300 ms for 3 s.
    let mut socket = app.ws(&user).await;
    for _ in 0..10 {
        socket.send(json!({ "type": "ping" })).await;
        socket.expect("pong").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A handler waiting 3 s for the provider's first token sends nothing meanwhile.
    let mut slow = Script::words(2, Duration::from_millis(10));
    slow.start = Duration::from_secs(3);
    app.provider.stream(slow);
    let reply =
        app.post("/api/chat").bearer_auth(&user.token).json(&json!({ "message": "take your time" })).fetch().await;
    reply.assert_status(StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_open_stream_finish_and_refuses_new_connections() {
    let Some(mut app) = spawn_process_app_with(Db::Sqlite, |s| s.server.shutdown_grace = 20).await else { return };
    let user = app.signup().await;
    app.provider.stream(Script::words(15, Duration::from_millis(200)));
    let mut stream = app.chat_stream(&user, json!({ "message": "a long answer" })).await;
    stream.expect("conversation").await;
    stream.expect("user_message").await;
    stream.expect("delta").await;
    let port = app.port;

    let stopping = tokio::spawn(async move {
        let stopped = app.terminate_server(Duration::from_secs(15)).await;
        (app, stopped)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err(), "a draining server accepts connections");
    let events = stream.rest().await;
    assert_eq!(events.last().map(|e| e.event.as_str()), Some("done"), "{events:?}");
    let (_app, stopped) = stopping.await.unwrap();
    assert!(stopped, "the server did not exit after its stream finished");
}

// ---------------------------------------------------------------------------
// The open-file limit

/// Opens `n` connections that send nothing (most wait in the backlog).
async fn flood(app: &TestApp, n: usize) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        streams.push(connect(app).await);
    }
    streams
}

/// Retries `/health` (each try on a new connection) until it answers.
async fn health_answers_within(app: &TestApp, within: Duration) -> bool {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if client.get(app.url("/health")).send().await.is_ok_and(|r| r.status() == StatusCode::OK) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn under_a_low_file_limit_health_and_login_answer_once_idle_connections_time_out() {
    const OPEN_FILES: u64 = 256;
    let Some(app) = spawn_limited_process_app(Db::Sqlite, Some(OPEN_FILES), |s| {
        s.server.header_read_timeout = 1;
        s.server.idle_timeout = 1;
    })
    .await
    else {
        return;
    };
    let user = app.signup().await;
    let idle = flood(&app, 2 * OPEN_FILES as usize).await;

    assert!(health_answers_within(&app, Duration::from_secs(30)).await, "/health never answered");
    app.login_as(&user).await;
    let log = app.server_log();
    assert!(log.contains("connection limit reached"), "no line about the cap in the log:\n{log}");
    assert!(!log.contains("accepting connections failed"), "the cap should keep accept clear of EMFILE:\n{log}");
    drop(idle);
}

/// CPU seconds the process has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/<pid>/stat");
    // Fields after the parenthesised name; utime and stime are the 14th and 15th.
    let after_name = &stat[stat.rfind(')').expect("a process name") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread")]
async fn accept_errors_past_the_file_limit_are_waited_out_without_spinning() {
    const OPEN_FILES: u64 = 256;
    // A cap above what the limit allows, so accepting does hit EMFILE.
    let Some(app) = spawn_limited_process_app(Db::Sqlite, Some(OPEN_FILES), |s| {
        s.server.header_read_timeout = 3;
        s.server.idle_timeout = 3;
        s.server.max_connections = Some(10_000);
    })
    .await
    else {
        return;
    };
    let idle = flood(&app, 2 * OPEN_FILES as usize).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cpu, wall) = (cpu_seconds(app.server_pid()), Instant::now());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let used = cpu_seconds(app.server_pid()) - cpu;
    let elapsed = wall.elapsed().as_secs_f64();
    eprintln!("server CPU while out of file descriptors: {used:.2} s in {elapsed:.2} s");
    // A spinning accept loop burns a whole core; backing off, next to nothing.
    assert!(used < elapsed / 3.0, "the accept loop spins: {used:.2} s of CPU in {elapsed:.2} s");

    assert!(health_answers_within(&app, Duration::from_secs(30)).await, "/health never answered");
    let log = app.server_log();
    assert!(log.contains("accepting connections failed"), "no accept error in the log:\n{log}");
    // A line when accepting starts to fail, not one per failed attempt.
    let lines = log.matches("accepting connections failed").count();
    assert!(lines <= 5, "{lines} lines about accept errors:\n{log}");
    drop(idle);
}

// ---------------------------------------------------------------------------
// Bodies: announced too large, or with two lengths

#[tokio::test(flavor = "multi_thread")]
async fn a_ten_gigabyte_content_length_is_refused_at_once() {
    let Some(app) = spawn_app(Db::Sqlite).await else { return };
    let head = "POST /api/auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 10000000000\r\n\r\n";
    let mut stream = connect(&app).await;
    let started = Instant::now();
    let (status, head_seen, body) = exchange(&mut stream, head.as_bytes()).await;
    let elapsed = started.elapsed();
    assert_eq!(status, 413, "{head_seen}");
    assert_eq!(body["code"], "payload_too_large", "{body}");
    assert!(head_seen.contains("connection: close"), "{head_seen}");
    // The old answer waited 5 s for the body; the issue asks for at once.
    assert!(elapsed < Duration::from_secs(1), "the 413 took {elapsed:?}");

    // A client that goes on sending its body still reads the answer.
    let mut stream = connect(&app).await;
    stream.write_all(head.as_bytes()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let sending = tokio::spawn(async move {
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..64 {
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut seen)).await;
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.starts_with("HTTP/1.1 413"), "the sending client got: {seen:?}");
    sending.abort();

    // With `Expect: 100-continue` the body is not asked for.
    let mut stream = connect(&app).await;
    let expecting = "POST /api/auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                     Content-Length: 10000000000\r\nExpect: 100-continue\r\n\r\n";
    let (status, head_seen, _) = exchange(&mut stream, expecting.as_bytes()).await;
    assert_eq!(status, 413, "{head_seen}");
    assert!(closed_within(&mut stream, Duration::from_secs(5)).await.is_some(), "the connection stays open");
    app.get("/health").fetch().await.assert_status(StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn content_length_with_chunked_transfer_encoding_is_400() {
    let Some(app) = spawn_app(Db::Sqlite).await else { return };
    let body = "{\"email\":\"smuggle@example.com\",\"password\":\"correct horse battery staple\"}";
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let heads = [
        format!("Content-Length: {}\r\nTransfer-Encoding: chunked\r\n", chunked.len()),
        "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n".to_owned(),
    ];
    for both in &heads {
        let mut stream = connect(&app).await;
        let request = format!(
            "POST /api/auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{both}\r\n{chunked}"
        );
        let (status, head, answer) = exchange(&mut stream, request.as_bytes()).await;
        assert_eq!(status, 400, "{both:?}: {head}{answer}");
        assert_eq!(answer["code"], "ambiguous_body_length", "{answer}");
        assert!(answer["detail"].is_string(), "{answer}");
        assert!(closed_within(&mut stream, Duration::from_secs(5)).await.is_some(), "the connection stays open");
    }

    // Later on a keep-alive connection, after bodies of both kinds.
    let mut stream = connect(&app).await;
    let plain =
        "POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
    assert_eq!(exchange(&mut stream, plain.as_bytes()).await.0, 422);
    let only_chunked = "POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                        Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
    assert_eq!(exchange(&mut stream, only_chunked.as_bytes()).await.0, 422);
    let smuggling = format!(
        "POST /api/auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{}\r\n{chunked}",
        heads[0]
    );
    let (status, _, answer) = exchange(&mut stream, smuggling.as_bytes()).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["code"], "ambiguous_body_length");

    // Nothing was registered through the ambiguous requests.
    let login = app.login(json!({ "login": "smuggle@example.com", "password": "correct horse battery staple" })).await;
    login.assert_status(StatusCode::UNAUTHORIZED);
}
