//! Cross-cutting layers: the access log line and request metrics (labelled
//! by matched route, never the raw path, which may carry a token), the early
//! 413 for oversized bodies and 400 for ambiguous ones, client request ids
//! kept to a sane shape, security headers, the panic guard and CORS.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request},
    http::{HeaderValue, Method, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument;

use super::{BODY_LIMIT, error::ApiError};

/// One structured line per request, with its request id; plus the request
/// counter and duration histogram for /metrics.
pub async fn access_log(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let request_id = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
    // `&str` values are quoted and escaped by the text format (`%` would
    // not be), so a request id cannot forge fields of the line.
    let span = tracing::info_span!("request", request_id = request_id.as_str(), method, route = route.as_str());
    let response = next.run(req).instrument(span.clone()).await;
    let elapsed = start.elapsed();
    let status = response.status().as_u16();
    metrics::counter!("palaver_http_requests_total",
        "method" => method, "route" => route.clone(), "status" => status.to_string())
    .increment(1);
    metrics::histogram!("palaver_http_request_duration_seconds", "method" => method, "route" => route)
        .record(elapsed.as_secs_f64());
    span.in_scope(|| {
        tracing::info!(status, latency_ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3, "request");
    });
    response
}

/// The method as a label without allocating; methods outside HTTP's own
/// are one label, so a client cannot add series by inventing methods.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Longest client-chosen `X-Request-Id` that is kept (and echoed).
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A client's `X-Request-Id` is echoed and logged, so only ids of 1 to 128
/// printable ASCII characters are kept; any other (or a repeated header) is
/// dropped here, and `SetRequestIdLayer` generates one instead.
pub async fn drop_unusable_request_id(mut req: Request, next: Next) -> Response {
    let ids = req.headers().get_all(REQUEST_ID);
    let mut iter = ids.iter();
    let usable = match (iter.next(), iter.next()) {
        (Some(id), None) => is_usable_request_id(id.as_bytes()),
        (None, _) => true,
        (Some(_), Some(_)) => false,
    };
    if !usable {
        req.headers_mut().remove(REQUEST_ID);
    }
    next.run(req).await
}

const REQUEST_ID: &str = "x-request-id";

fn is_usable_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len()) && id.iter().all(|b| (b' '..=b'~').contains(b))
}

/// What the doc pages need: their own scripts and styles (ReDoc and Swagger
/// UI inject `<style>` elements, hence `'unsafe-inline'` for styles only),
/// `data:` icons, ReDoc's search worker (a `blob:`) and the document itself.
const DOCS_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; \
base-uri 'none'; form-action 'self'; frame-ancestors 'none'";
/// Everything else is JSON (or an event stream): nothing to run, nowhere to be framed.
const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// Headers that keep browsers from sniffing, framing and leaking our
/// answers; the API's answers (tokens, conversations) are never cached.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let under = |prefix: &str| path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    let is_docs = under("/docs") || under("/redoc");
    let private = under("/api") || under("/v1") || under("/ws");
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    let csp = if is_docs { DOCS_CSP } else { API_CSP };
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(csp));
    if private {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// Refuses at once, and closes the connection after the answer: a head
/// that names both a length and a transfer coding (400: proxies in front
/// may read its body differently, the shape of request smuggling), and a
/// body announced as over the limit (413, without waiting for it). Bodies
/// without a length are checked as they are read.
pub async fn reject_large_bodies(req: Request, next: Next) -> Response {
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let refusal = if req.extensions().get::<super::serve::AmbiguousLength>().is_some() {
        ApiError::bad_request(
            "ambiguous_body_length",
            "A request may carry Content-Length or Transfer-Encoding, not both.",
        )
    } else if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        ApiError::PayloadTooLarge
    } else {
        return next.run(req).await;
    };
    // Reading the body is what asks a client that sent `Expect:
    // 100-continue` to send it, so such a body is left alone; any other is
    // read on in the background so the client sees the answer instead of
    // a connection reset.
    let expects_continue =
        req.headers().get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !expects_continue {
        super::extract::drain(req.into_body()).await;
    }
    let mut response = refusal.into_response();
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A panic in a handler is a bug; the client still gets our error format.
pub fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()
}

/// Listed origins get `Access-Control-Allow-Origin: <origin>` with
/// credentials; any other origin gets no CORS headers at all. `*` (refused
/// in production) mirrors every origin.
pub fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::mirror_request()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_credentials(true)
        .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::PUT, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::HeaderName::from_static("x-csrf-token"),
            header::HeaderName::from_static("x-request-id"),
            header::HeaderName::from_static("idempotency-key"),
            header::HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([header::HeaderName::from_static("x-request-id"), header::RETRY_AFTER])
        .max_age(std::time::Duration::from_secs(600))
}

#[cfg(test)]
mod tests {
    use super::is_usable_request_id;

    #[test]
    fn request_ids_are_short_and_printable() {
        assert!(is_usable_request_id(b"abc-123"));
        assert!(is_usable_request_id(b"x\" status=999 injected=1"), "printable: kept, and logged escaped");
        assert!(is_usable_request_id("a".repeat(128).as_bytes()));
        assert!(!is_usable_request_id("a".repeat(129).as_bytes()));
        assert!(!is_usable_request_id(b""));
        assert!(!is_usable_request_id(b"tab\there"));
        assert!(!is_usable_request_id("caf\u{e9}".as_bytes()));
    }
}
