//! The HTTP/1.1 server under the router: our own accept loop, so that every
//! connection has a deadline for its request head, silent connections are
//! closed, connections stay below the open-file limit and accept errors such
//! as EMFILE are waited out instead of spinning or ending the server.
//!
//! Timeouts: hyper's header-read timer (`PALAVER_HEADER_READ_TIMEOUT`) runs
//! whenever hyper waits for a request head, on a new connection and between
//! keep-alive requests, so it also bounds idle keep-alive connections. The
//! idle timer (`PALAVER_IDLE_TIMEOUT`) covers the rest: it counts bytes in
//! both directions and closes a connection on which nothing moved for that
//! long while no handler was working on one of its requests (a handler that
//! waits for a slow provider keeps it; one that waits for body bytes does
//! not). Streams that send (SSE events and keep-alives) are never cut.
//! Upgraded connections (WebSockets) leave both timers: their heartbeat
//! closes dead ones.

use std::{
    collections::VecDeque,
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{Router, body::Body, extract::ConnectInfo};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use super::framing::FramingScanner;
use crate::config::ServerSettings;

/// Marks a request whose head carried both `Content-Length` and
/// `Transfer-Encoding` (hyper keeps only the latter); refused with 400.
#[derive(Debug, Clone, Copy)]
pub struct AmbiguousLength;

/// How the server treats connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    /// The configured limits; an unset connection cap comes from the
    /// process's open-file limit (logged once).
    pub fn from_settings(settings: &ServerSettings) -> Self {
        let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
        let room = default_max_connections(soft);
        let max_connections = match settings.max_connections {
            Some(n) => {
                if n > room as u64 {
                    tracing::warn!(
                        max_connections = n,
                        open_file_limit = soft,
                        "PALAVER_MAX_CONNECTIONS is above what the open-file limit leaves room for ({room}); \
                         accept errors (too many open files) will be waited out"
                    );
                }
                usize::try_from(n).unwrap_or(usize::MAX)
            }
            None => room,
        };
        tracing::info!(open_file_limit = soft, open_file_hard_limit = hard, max_connections, "connection limits");
        Self {
            header_read_timeout: Duration::from_secs(settings.header_read_timeout),
            idle_timeout: Duration::from_secs(settings.idle_timeout),
            max_connections: max_connections.max(1),
        }
    }
}

/// Connections that fit under an open-file limit: a quarter of it (and 64
/// more) is kept for the database pool, SQLite's files, Redis and the
/// connections to the LLM providers, one per reply being generated.
pub fn default_max_connections(open_file_limit: u64) -> usize {
    let limit = usize::try_from(open_file_limit).unwrap_or(usize::MAX);
    limit.saturating_sub(64 + limit / 4).max(16)
}

/// Accepts connections and serves `router` on them until `shutdown`
/// completes; then stops accepting, lets open requests finish for `grace`
/// and closes what is left.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let drain = CancellationToken::new();
    let force = CancellationToken::new();
    let mut backoff = Backoff::default();
    let mut warned_full: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                // One line per minute at most: a flood must not also flood the log.
                if warned_full.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection limit reached: new connections wait until one closes (PALAVER_MAX_CONNECTIONS)"
                    );
                    warned_full = Some(Instant::now());
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                    _ = &mut shutdown => break,
                }
            }
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    backoff.reset();
                    accepted
                }
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    let pause = backoff.next();
                    if pause == Backoff::FIRST {
                        tracing::warn!(error = e.to_string().as_str(), "accepting connections failed; retrying with a growing pause");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => continue,
                        _ = &mut shutdown => break,
                    }
                }
            },
            _ = &mut shutdown => break,
        };
        // Streamed tokens are small writes: without TCP_NODELAY, Nagle's
        // algorithm holds them back for the peer's delayed ACK (~40 ms).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = e.to_string().as_str(), "could not set TCP_NODELAY");
        }
        let connection = serve_connection(tcp, peer, slot, router.clone(), limits, drain.clone(), force.clone());
        connections.spawn(connection);
    }
    drop(listener);
    drain.cancel();
    connections.close();
    if tokio::time::timeout(grace, connections.wait()).await.is_err() {
        tracing::warn!("grace period over; closing remaining connections");
        force.cancel();
        connections.wait().await;
    }
}

/// Errors that concern one connection (it was reset before we took it),
/// not the listener: the next accept may go on at once.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// Pauses after failed accepts: 50 ms doubling to 1 s. Hand-written: three
/// lines, where a backoff crate would bring jitter and clocks we do not want.
#[derive(Default)]
struct Backoff(Option<Duration>);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(1);

    fn next(&mut self) -> Duration {
        let pause = self.0.map_or(Self::FIRST, |p| (p * 2).min(Self::MAX));
        self.0 = Some(pause);
        pause
    }

    fn reset(&mut self) {
        self.0 = None;
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
    router: Router,
    limits: Limits,
    drain: CancellationToken,
    force: CancellationToken,
) {
    let shared = Arc::new(Shared::new());
    let io = TokioIo::new(Watched { tcp, shared: shared.clone(), framing: FramingScanner::default(), _slot: slot });
    let service = hyper::service::service_fn({
        let shared = shared.clone();
        move |req| handle(req, peer, router.clone(), shared.clone())
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let connection = http.serve_connection(io, service).with_upgrades();
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        tokio::select! {
            done = connection.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(error = e.to_string().as_str(), %peer, "connection ended with an error");
                }
                return;
            }
            _ = drain.cancelled(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = force.cancelled() => return,
            _ = shared.silent_for(limits.idle_timeout) => {
                tracing::debug!(%peer, "closing a connection on which nothing moved");
                return;
            }
        }
    }
}

async fn handle(
    mut req: hyper::Request<Incoming>,
    peer: SocketAddr,
    router: Router,
    shared: Arc<Shared>,
) -> Result<axum::response::Response, Infallible> {
    let work = Arc::new(Work { shared: shared.clone(), state: AtomicU8::new(WORKING) });
    shared.busy.fetch_add(1, Ordering::AcqRel);
    let _finished = Finished(work.clone());
    if shared.next_verdict() {
        req.extensions_mut().insert(AmbiguousLength);
    }
    req.extensions_mut().insert(ConnectInfo(peer));
    let req = req.map(|body| Body::new(WatchedBody { body, work }));
    let Ok(response) = router.oneshot(req).await;
    if response.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS {
        shared.upgraded.store(true, Ordering::Release);
    }
    Ok(response)
}

/// What a connection's IO, its requests and its watchdog share.
struct Shared {
    opened: Instant,
    /// Milliseconds after `opened` of the last byte read or written.
    last_activity_ms: AtomicU64,
    /// Requests whose handler is working (not waiting for body bytes).
    busy: AtomicUsize,
    /// One entry per request head read, in order: is its length ambiguous?
    verdicts: Mutex<VecDeque<bool>>,
    /// Set once the connection switched protocols: its bytes are no longer HTTP.
    upgraded: AtomicBool,
}

impl Shared {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            verdicts: Mutex::new(VecDeque::new()),
            upgraded: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        self.last_activity_ms.store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }

    /// The verdict on the head of the request being dispatched. The bytes
    /// of a head pass the scanner before hyper can parse them, so it is
    /// there unless the scanner gave up on this connection.
    fn next_verdict(&self) -> bool {
        self.verdicts.lock().unwrap_or_else(|e| e.into_inner()).pop_front().unwrap_or(false)
    }

    /// Completes once nothing has moved for `limit` while no handler works.
    async fn silent_for(&self, limit: Duration) {
        loop {
            let quiet = self.quiet_for();
            if quiet >= limit && self.busy.load(Ordering::Acquire) == 0 {
                return;
            }
            let wait = if quiet >= limit { limit / 4 } else { limit - quiet };
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    }
}

/// The client socket, counting activity, following request framing and
/// holding the connection's slot until it closes (also after an upgrade).
struct Watched {
    tcp: TcpStream,
    shared: Arc<Shared>,
    framing: FramingScanner,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.tcp).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            this.shared.touch();
            if this.shared.upgraded.load(Ordering::Acquire) {
                this.framing.stop();
                return polled;
            }
            let shared = &this.shared;
            this.framing.feed(read, &mut |ambiguous| {
                shared.verdicts.lock().unwrap_or_else(|e| e.into_inner()).push_back(ambiguous);
            });
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.tcp).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.shared.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.tcp).poll_write_vectored(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.shared.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

const WAITING: u8 = 0;
const WORKING: u8 = 1;
const DONE: u8 = 2;

/// One request's handler: working (counted in `Shared::busy`), waiting
/// for body bytes from the client, or done.
struct Work {
    shared: Arc<Shared>,
    state: AtomicU8,
}

impl Work {
    fn switch(&self, from: u8, to: u8) {
        if self.state.compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            if to == WORKING {
                self.shared.busy.fetch_add(1, Ordering::AcqRel);
            } else {
                self.shared.busy.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    fn finish(&self) {
        if self.state.swap(DONE, Ordering::AcqRel) == WORKING {
            self.shared.busy.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Ends a request's work when its response is ready (or it was dropped).
struct Finished(Arc<Work>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// A request body that tells its request's `Work` when the handler waits
/// for the client.
struct WatchedBody {
    body: Incoming,
    work: Arc<Work>,
}

impl hyper::body::Body for WatchedBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_pending() {
            this.work.switch(WORKING, WAITING);
        } else {
            this.work.switch(WAITING, WORKING);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_leaves_room_under_the_file_limit() {
        assert_eq!(default_max_connections(1024), 704);
        assert_eq!(default_max_connections(256), 128);
        assert_eq!(default_max_connections(10), 16);
    }

    #[test]
    fn accept_backoff_doubles_to_a_second_and_starts_over() {
        let mut b = Backoff::default();
        let pauses: Vec<u128> = (0..7).map(|_| b.next().as_millis()).collect();
        assert_eq!(pauses, [50, 100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), Backoff::FIRST);
    }
}
