//! Cross-cutting layers: the access log line and request metrics (labelled
//! by matched route, never the raw path, which may carry a token), the early
//! 413 for oversized bodies and 400 for ambiguous ones, the panic guard and CORS.

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
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
    let span = tracing::info_span!("request", request_id = %request_id, method = %method, route = %route);
    let response = next.run(req).instrument(span.clone()).await;
    let elapsed = start.elapsed();
    let status = response.status().as_u16();
    metrics::counter!("palaver_http_requests_total",
        "method" => method.to_string(), "route" => route.clone(), "status" => status.to_string())
    .increment(1);
    metrics::histogram!("palaver_http_request_duration_seconds", "method" => method.to_string(), "route" => route)
        .record(elapsed.as_secs_f64());
    span.in_scope(|| {
        tracing::info!(status, latency_ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3, "request");
    });
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
