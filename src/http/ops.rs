//! Operations endpoints: liveness, readiness and Prometheus metrics.

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::AppState;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "ops", responses((status = 200, description = "`{\"status\": \"ok\"}`")))]
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: 200 when the database (and Redis, if configured) answer,
/// else 503 naming what is down.
#[utoipa::path(get, path = "/ready", tag = "ops",
    responses((status = 200, description = "Ready"), (status = 503, description = "A dependency is down")))]
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let limit = Duration::from_secs(3);
    let database_ok = matches!(tokio::time::timeout(limit, state.store.ping()).await, Ok(Ok(())));
    let redis_ok = match &state.redis {
        None => None,
        Some(client) => Some(matches!(tokio::time::timeout(limit, redis_ping(client)).await, Ok(Ok(())))),
    };
    let mut down = Vec::new();
    if !database_ok {
        down.push("database");
    }
    if redis_ok == Some(false) {
        down.push("redis");
    }
    let status = |ok: bool| if ok { "ok" } else { "down" };
    let mut body =
        json!({ "status": if down.is_empty() { "ready" } else { "not_ready" }, "database": status(database_ok) });
    if let Some(ok) = redis_ok {
        body["redis"] = json!(status(ok));
        // Budgets live in Redis: without it budgeted requests are refused.
        body["limits"] = json!(if ok { "ok" } else { "unavailable" });
    }
    if down.is_empty() {
        return Json(body).into_response();
    }
    body["detail"] = json!(format!("Not ready: {} not answering.", down.join(" and ")));
    body["code"] = json!("not_ready");
    body["down"] = json!(down);
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn redis_ping(client: &redis::Client) -> redis::RedisResult<()> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    redis::cmd("PING").query_async::<String>(&mut conn).await.map(|_| ())
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let body = state.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
