//! The OpenAI-compatible gateway (`/v1`): chat completions (JSON or SSE
//! chunks), the model list, and OpenAI-shaped errors, so any OpenAI SDK can
//! point its base URL here. This file is only the wire format: requests are
//! translated to the provider layer's messages and options and answered by
//! `Chat::relay`, the same engine (retries, timeouts, fallbacks, usage) as
//! every other chat path.

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    body::{Body, Bytes},
    extract::{FromRequestParts, State},
    http::{HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::{
    AppState,
    error::{ApiError, limit_headers, with_limits},
    extract::{AuthUser, authenticate_key, authenticate_token, bearer},
    streaming::keepalive_every,
};
use crate::{
    chat::{Caller, RelayStream},
    domain::{
        context::{ChatMessage, ChatRole, ToolCall},
        conversation::ModelId,
    },
    providers::{ChatEvent, ChatOptions, Completion, ProviderError, ResponseFormat, ToolChoice, ToolSpec, Usage},
    quota::{Admission, LimitState},
};

/// How long a streamed answer waits for the provider before it commits to
/// `200` and sends `: ping` comments: errors that come quickly (a refused
/// key, a rate limit) still get their own status.
const FIRST_EVENT_GRACE: Duration = Duration::from_secs(2);
/// What a stream with nothing to send writes every `PALAVER_SSE_KEEPALIVE_SECS`.
const PING: &[u8] = b": ping\n\n";

// ---------------------------------------------------------------------------
// Errors, as OpenAI shapes them

/// `{"error": {"message", "type", "param", "code"}}` with its status.
#[derive(Debug)]
pub struct OpenAiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<String>,
    retry_after_secs: Option<u64>,
    /// The caller's limits, for a refusal by one of them (boxed: most errors have none).
    limits: Option<Box<LimitState>>,
}

impl OpenAiError {
    pub(super) fn new(status: StatusCode, kind: &'static str, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: Some(code.to_owned()),
            retry_after_secs: None,
            limits: None,
        }
    }

    pub(super) fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_owned()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request_error", message)
        }
    }

    fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "Missing, invalid, expired or revoked API key.",
        )
    }

    fn model_not_found(model: &str, why: &str) -> Self {
        Self {
            param: Some("model".into()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("The model `{model}` does not exist: {why}"),
            )
        }
    }

    /// A provider failure after the provider layer's retries and fallbacks.
    pub(super) fn from_provider(e: &ProviderError) -> Self {
        let message = e.to_string();
        match e {
            ProviderError::Timeout => Self::new(StatusCode::GATEWAY_TIMEOUT, "api_error", "provider_timeout", message),
            ProviderError::RateLimited { retry_after } => Self {
                retry_after_secs: Some(retry_after.map_or(1, |d| d.as_secs().max(1))),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "rate_limit_exceeded", message)
            },
            // A request the provider finds wrong stays wrong on a retry.
            ProviderError::Upstream { status: 400 | 404 | 413 | 422, message: upstream } => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "provider_rejected", upstream.clone())
            }
            _ => Self::new(StatusCode::BAD_GATEWAY, "api_error", "provider_error", message),
        }
    }

    pub(super) fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }

    /// Refusals a retry cannot fix (a spent budget among them: it comes
    /// back only when the period ends); the SDKs retry 408, 409, 429 and 5xx otherwise.
    fn retryable(&self) -> bool {
        self.kind != "insufficient_quota"
            && (matches!(self.status.as_u16(), 408 | 409 | 429) || self.status.is_server_error())
    }
}

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        let status = e.status_code();
        let kind = match status.as_u16() {
            401 => "invalid_request_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            s if s >= 500 => "api_error",
            _ => "invalid_request_error",
        };
        let (retry_after_secs, limits) = match &e {
            ApiError::TooManyRequests { retry_after_secs, .. } => (Some(*retry_after_secs), None),
            ApiError::Limited { retry_after_secs, limits, .. } => (Some(*retry_after_secs), Some(Box::new(*limits))),
            _ => (None, None),
        };
        let kind = if e.code() == "budget_exceeded" { "insufficient_quota" } else { kind };
        let code = if status == StatusCode::UNAUTHORIZED { "invalid_api_key".to_owned() } else { e.code().to_owned() };
        Self { status, message: e.detail(), kind, param: None, code: Some(code), retry_after_secs, limits }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        let headers = response.headers_mut();
        headers.insert("x-should-retry", HeaderValue::from_static(if self.retryable() { "true" } else { "false" }));
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(limits) = &self.limits {
            limit_headers(headers, limits);
        }
        response
    }
}

pub(super) type V1Result<T> = Result<T, OpenAiError>;

// ---------------------------------------------------------------------------
// Authentication: an API key or an access token

/// The caller of a `/v1` route; refused in OpenAI's shape.
pub struct V1Caller(pub AuthUser);

impl FromRequestParts<Arc<AppState>> for V1Caller {
    type Rejection = OpenAiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers).ok_or_else(OpenAiError::unauthorized)?;
        let auth = if token.starts_with("pk_") {
            authenticate_key(state, token).await
        } else {
            authenticate_token(state, token).await
        };
        match auth {
            Ok(a) => Ok(V1Caller(a)),
            Err(ApiError::Unauthorized) => Err(OpenAiError::unauthorized()),
            Err(e) => Err(e.into()),
        }
    }
}

impl V1Caller {
    pub(super) fn caller(&self) -> Caller {
        self.0.payer()
    }

    /// The model, if it exists and this caller may use it.
    pub(super) fn model(&self, state: &AppState, requested: &str) -> V1Result<ModelId> {
        let model =
            state.providers.validate_model(requested).map_err(|e| OpenAiError::model_not_found(requested, &e))?;
        if let Some(key) = &self.0.key
            && !key.allows(&model.to_string())
        {
            return Err(OpenAiError {
                param: Some("model".into()),
                ..OpenAiError::new(
                    StatusCode::FORBIDDEN,
                    "permission_error",
                    "model_not_allowed",
                    format!("This API key may not use the model `{model}`."),
                )
            });
        }
        Ok(model)
    }
}

// ---------------------------------------------------------------------------
// GET /v1/models

#[derive(Debug, Serialize)]
struct ModelObject {
    id: String,
    object: &'static str,
    created: i64,
    owned_by: String,
}

/// The configured models (those the key may use), in OpenAI's list shape.
pub async fn models(State(state): State<Arc<AppState>>, caller: V1Caller) -> Json<Value> {
    let created = state.clock.now_ms() / 1000;
    let data: Vec<ModelObject> = state
        .providers
        .models()
        .into_iter()
        .filter(|m| caller.0.key.as_ref().is_none_or(|k| k.allows(&m.id)))
        .map(|m| ModelObject { id: m.id, object: "model", created, owned_by: m.provider })
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

// ---------------------------------------------------------------------------
// POST /v1/chat/completions: the request

/// A chat completion request, translated.
struct CompletionRequest {
    model: ModelId,
    messages: Vec<ChatMessage>,
    options: ChatOptions,
    stream: bool,
    include_usage: bool,
}

/// A `/v1` body: a JSON object naming a model this caller may use.
pub(super) fn body_and_model(
    state: &AppState,
    caller: &V1Caller,
    body: &Bytes,
) -> V1Result<(Map<String, Value>, ModelId)> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| OpenAiError::invalid("body", format!("The body is not valid JSON: {e}")))?;
    let Value::Object(body) = body else { return Err(OpenAiError::invalid("body", "The body must be a JSON object.")) };
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => caller.model(state, m)?,
        _ => return Err(OpenAiError::invalid("model", "`model` is required (a string such as `openai/gpt-4o-mini`).")),
    };
    Ok((body, model))
}

/// Reads the body leniently, as the SDKs and UIs send it: unknown fields are
/// ignored, every known one is checked and named in the error.
fn parse_completion(state: &AppState, caller: &V1Caller, body: &Bytes) -> V1Result<CompletionRequest> {
    let (body, model) = body_and_model(state, caller, body)?;
    let messages = match body.get("messages") {
        Some(Value::Array(items)) if !items.is_empty() => parse_messages(items)?,
        _ => return Err(OpenAiError::invalid("messages", "`messages` must be a non-empty array.")),
    };
    let stream = opt_bool(&body, "stream")?.unwrap_or(false);
    let include_usage = match body.get("stream_options") {
        Some(Value::Object(o)) if stream => matches!(o.get("include_usage"), Some(Value::Bool(true))),
        _ => false,
    };
    let max_tokens = opt_u32(&body, "max_completion_tokens")?.or(opt_u32(&body, "max_tokens")?);
    let options = ChatOptions {
        temperature: opt_f64(&body, "temperature", 0.0, 2.0)?,
        top_p: opt_f64(&body, "top_p", 0.0, 1.0)?,
        max_tokens,
        stop: parse_stop(body.get("stop"))?,
        seed: match body.get("seed") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_i64().ok_or_else(|| OpenAiError::invalid("seed", "`seed` must be an integer."))?),
        },
        response_format: parse_response_format(body.get("response_format"))?,
        tools: parse_tools(body.get("tools"), true)?,
        tool_choice: parse_tool_choice(body.get("tool_choice"))?,
        parallel_tool_calls: opt_bool(&body, "parallel_tool_calls")?,
        user: match body.get("user") {
            None | Some(Value::Null) => None,
            Some(Value::String(u)) => Some(u.chars().take(256).collect()),
            Some(_) => return Err(OpenAiError::invalid("user", "`user` must be a string.")),
        },
    };
    Ok(CompletionRequest { model, messages, options, stream, include_usage })
}

pub(super) fn opt_bool(body: &Map<String, Value>, field: &str) -> V1Result<Option<bool>> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(OpenAiError::invalid(field, format!("`{field}` must be a boolean."))),
    }
}

pub(super) fn opt_u32(body: &Map<String, Value>, field: &str) -> V1Result<Option<u32>> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(OpenAiError::invalid(field, format!("`{field}` must be a positive integer."))),
        },
    }
}

pub(super) fn opt_f64(body: &Map<String, Value>, field: &str, min: f64, max: f64) -> V1Result<Option<f64>> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
            _ => Err(OpenAiError::invalid(field, format!("`{field}` must be a number from {min} to {max}."))),
        },
    }
}

pub(super) fn parse_stop(v: Option<&Value>) -> V1Result<Vec<String>> {
    let bad = || OpenAiError::invalid("stop", "`stop` must be a string or an array of up to 4 strings.");
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) if items.len() <= 4 => {
            items.iter().map(|i| i.as_str().map(str::to_owned).ok_or_else(bad)).collect()
        }
        Some(_) => Err(bad()),
    }
}

fn parse_response_format(v: Option<&Value>) -> V1Result<Option<ResponseFormat>> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(None) };
    let bad = |m: &str| OpenAiError::invalid("response_format", m.to_owned());
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Some(ResponseFormat::Text)),
        Some("json_object") => Ok(Some(ResponseFormat::JsonObject)),
        Some("json_schema") => {
            let spec = v.get("json_schema").ok_or_else(|| bad("`json_schema` is required with type json_schema."))?;
            let name = spec.get("name").and_then(Value::as_str).unwrap_or("response").to_owned();
            let schema = spec.get("schema").cloned().unwrap_or_else(|| json!({}));
            let strict = spec.get("strict").and_then(Value::as_bool);
            Ok(Some(ResponseFormat::JsonSchema { name, schema, strict }))
        }
        _ => Err(bad("`response_format.type` must be text, json_object or json_schema.")),
    }
}

/// The tools of a request. Chat completions nest each definition under
/// `function`; the Responses API (`nested: false`) puts it on the tool.
pub(super) fn parse_tools(v: Option<&Value>, nested: bool) -> V1Result<Vec<ToolSpec>> {
    let items = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(OpenAiError::invalid("tools", "`tools` must be an array.")),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let param = format!("tools[{i}]");
            let kind = t.get("type").and_then(Value::as_str).unwrap_or(if nested { "function" } else { "" });
            if kind != "function" {
                return Err(OpenAiError::invalid(&param, "Only tools of type `function` are supported."));
            }
            let (def, def_param) = if nested {
                let f = t.get("function").ok_or_else(|| OpenAiError::invalid(&param, "`function` is required."))?;
                (f, format!("{param}.function"))
            } else {
                (t, param)
            };
            let name = def.get("name").and_then(Value::as_str).filter(|n| valid_tool_name(n)).ok_or_else(|| {
                OpenAiError::invalid(&format!("{def_param}.name"), "A tool name is 1–64 of a-z, A-Z, 0-9, _ and -.")
            })?;
            Ok(ToolSpec {
                name: name.to_owned(),
                description: def.get("description").and_then(Value::as_str).map(str::to_owned),
                parameters: def.get("parameters").cloned().unwrap_or(Value::Null),
            })
        })
        .collect()
}

fn valid_tool_name(n: &str) -> bool {
    (1..=64).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub(super) fn parse_tool_choice(v: Option<&Value>) -> V1Result<Option<ToolChoice>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Ok(Some(ToolChoice::Auto)),
            "none" => Ok(Some(ToolChoice::None)),
            "required" => Ok(Some(ToolChoice::Required)),
            _ => Err(OpenAiError::invalid("tool_choice", "`tool_choice` must be auto, none, required or a function.")),
        },
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => Ok(Some(ToolChoice::Function(name.to_owned()))),
            None => Err(OpenAiError::invalid("tool_choice", "`tool_choice.function.name` is required.")),
        },
    }
}

/// The messages, in the provider layer's terms.
fn parse_messages(items: &[Value]) -> V1Result<Vec<ChatMessage>> {
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let role = m.get("role").and_then(Value::as_str).unwrap_or("");
            let content = text_of(m.get("content"), &format!("{param}.content"))?;
            match role {
                "system" | "developer" => Ok(ChatMessage::new(ChatRole::System, content)),
                "user" => Ok(ChatMessage::new(ChatRole::User, content)),
                "assistant" => {
                    let calls = match m.get("tool_calls") {
                        None | Some(Value::Null) => Vec::new(),
                        Some(Value::Array(calls)) => calls
                            .iter()
                            .enumerate()
                            .map(|(j, c)| tool_call_of(c, &format!("{param}.tool_calls[{j}]")))
                            .collect::<V1Result<_>>()?,
                        Some(_) => return Err(OpenAiError::invalid(&param, "`tool_calls` must be an array.")),
                    };
                    Ok(ChatMessage::tool_calls(content, calls))
                }
                "tool" => {
                    let id =
                        m.get("tool_call_id").and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or_else(|| {
                            OpenAiError::invalid(
                                &format!("{param}.tool_call_id"),
                                "A tool message needs `tool_call_id`.",
                            )
                        })?;
                    Ok(ChatMessage::tool_result(id, content))
                }
                _ => Err(OpenAiError::invalid(
                    &format!("{param}.role"),
                    "`role` must be system, developer, user, assistant or tool.",
                )),
            }
        })
        .collect()
}

/// A message's text: a string, null, or an array of text parts.
pub(super) fn text_of(v: Option<&Value>, param: &str) -> V1Result<String> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text" | "input_text" | "output_text"), Some(t)) => texts.push(t),
                    (Some("refusal"), _) => {}
                    _ => {
                        return Err(OpenAiError::invalid(
                            &format!("{param}[{j}]"),
                            "Only text content parts are supported (no images, audio or files).",
                        ));
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(OpenAiError::invalid(param, "`content` must be a string or an array of parts.")),
    }
}

fn tool_call_of(c: &Value, param: &str) -> V1Result<ToolCall> {
    let id = c.get("id").and_then(Value::as_str).filter(|s| !s.is_empty());
    let name = c.pointer("/function/name").and_then(Value::as_str).filter(|s| !s.is_empty());
    let (Some(id), Some(name)) = (id, name) else {
        return Err(OpenAiError::invalid(param, "A tool call needs `id` and `function.name`."));
    };
    let arguments = match c.pointer("/function/arguments") {
        Some(Value::String(a)) => a.clone(),
        None | Some(Value::Null) => "{}".to_owned(),
        Some(other) => other.to_string(),
    };
    Ok(ToolCall { id: id.to_owned(), name: name.to_owned(), arguments })
}

// ---------------------------------------------------------------------------
// POST /v1/chat/completions: the answer

/// Chat completions in OpenAI's wire format, non-stream or SSE chunks.
pub async fn chat_completions(State(state): State<Arc<AppState>>, caller: V1Caller, body: Bytes) -> Response {
    match completions(state, caller, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions(state: Arc<AppState>, caller: V1Caller, body: Bytes) -> V1Result<Response> {
    let mut req = parse_completion(&state, &caller, &body)?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = state.clock.now_ms() / 1000;
    let chat = state.chat.clone();
    let who = caller.caller();
    let admitted = admit(&state, &who, &req.messages, &mut req.options).await?;
    let limits = admitted.state;
    if !req.stream {
        let reply = chat
            .relay_complete(&who, &req.model, req.messages, req.options, admitted.reservation)
            .await
            .map_err(|e| OpenAiError::from_provider(&e))?;
        return Ok(with_limits(Json(completion_json(&id, created, &reply)).into_response(), &limits));
    }
    let start = async move { chat.relay(&who, &req.model, req.messages, req.options, admitted.reservation).await };
    let started = start_within_grace(Box::pin(start)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    tokio::spawn(stream_chunks(tx, started, id, created, req.include_usage));
    Ok(with_limits(sse_response(rx, keepalive_every(&state)), &limits))
}

/// Admits a `/v1` call against the caller's rate limits and budgets.
pub(super) async fn admit(
    state: &AppState,
    who: &Caller,
    messages: &[ChatMessage],
    options: &mut ChatOptions,
) -> V1Result<Admission> {
    state.chat.admit_relay(who, messages, options).await.map_err(|e| OpenAiError::from(ApiError::from(e)))
}

/// Waits a little for the reply to start, so that quick failures get their
/// own status; a slower start is handed on to be waited for with pings.
pub(super) async fn start_within_grace(mut start: Starting) -> V1Result<Started> {
    match tokio::time::timeout(FIRST_EVENT_GRACE, &mut start).await {
        Ok(Err(e)) => Err(OpenAiError::from_provider(&e)),
        Ok(Ok(stream)) => Ok(Started::Now(stream)),
        Err(_) => Ok(Started::Later(start)),
    }
}

/// An event stream of the frames `rx` receives, with a `: ping` comment
/// whenever none came for `every` (so proxies keep a slow answer open).
pub(super) fn sse_response(rx: tokio::sync::mpsc::Receiver<Bytes>, every: Duration) -> Response {
    let frames = futures::stream::unfold(rx, move |mut rx| async move {
        let frame = match tokio::time::timeout(every, rx.recv()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return None,
            Err(_) => Bytes::from_static(PING),
        };
        Some((Ok::<_, std::io::Error>(frame), rx))
    });
    let mut response = Response::new(Body::from_stream(frames));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

pub(super) type Starting = std::pin::Pin<Box<dyn Future<Output = Result<RelayStream, ProviderError>> + Send>>;

/// A stream that started within the grace period, or one still starting.
pub(super) enum Started {
    Now(RelayStream),
    Later(Starting),
}

/// Waits for a stream still starting, after a first ping that commits the
/// answer to 200 (the keep-alive of `sse_response` pings on meanwhile);
/// `None` when the client went away.
pub(super) async fn wait_started(
    started: Started,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
) -> Option<Result<RelayStream, ProviderError>> {
    let starting = match started {
        Started::Now(s) => return Some(Ok(s)),
        Started::Later(f) => f,
    };
    if tx.send(Bytes::from_static(PING)).await.is_err() {
        return None;
    }
    tokio::select! {
        done = starting => Some(done),
        _ = tx.closed() => None,
    }
}

fn data(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Writes the chunks of a streamed completion; ends when the reply does or
/// the client goes away (which drops the provider stream).
async fn stream_chunks(
    tx: tokio::sync::mpsc::Sender<Bytes>,
    started: Started,
    id: String,
    created: i64,
    include_usage: bool,
) {
    let stream = match wait_started(started, &tx).await {
        None => return,
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            let _ = tx.send(data(&OpenAiError::from_provider(&e).body())).await;
            return;
        }
    };
    let model = stream.model().to_string();
    let chunk = |delta: Value, finish: Option<&str>| {
        data(&json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
        }))
    };
    if tx.send(chunk(json!({ "role": "assistant", "content": "" }), None)).await.is_err() {
        return;
    }
    tokio::pin!(stream);
    while let Some(event) = stream.next().await {
        let frame = match event {
            Ok(ChatEvent::Delta(text)) => chunk(json!({ "content": text }), None),
            Ok(ChatEvent::ToolCallDelta { index, id: call_id, name, arguments }) => {
                let mut call = Map::new();
                call.insert("index".into(), json!(index));
                let mut function = Map::new();
                if let Some(call_id) = call_id {
                    call.insert("id".into(), json!(call_id));
                    call.insert("type".into(), json!("function"));
                }
                if let Some(name) = name {
                    function.insert("name".into(), json!(name));
                }
                function.insert("arguments".into(), json!(arguments));
                call.insert("function".into(), Value::Object(function));
                chunk(json!({ "tool_calls": [call] }), None)
            }
            Ok(ChatEvent::Finish(reason)) => chunk(json!({}), Some(reason.as_openai())),
            Ok(ChatEvent::Usage(u)) => {
                if include_usage {
                    let usage = data(&json!({
                        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": usage_json(&u),
                    }));
                    if tx.send(usage).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            Err(e) => {
                let _ = tx.send(data(&OpenAiError::from_provider(&e).body())).await;
                return;
            }
        };
        if tx.send(frame).await.is_err() {
            return;
        }
    }
    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

fn completion_json(id: &str, created: i64, reply: &Completion) -> Value {
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    let content = if reply.text.is_empty() && !reply.tool_calls.is_empty() { Value::Null } else { json!(reply.text) };
    message.insert("content".into(), content);
    message.insert("refusal".into(), Value::Null);
    if !reply.tool_calls.is_empty() {
        let calls: Vec<Value> = reply
            .tool_calls
            .iter()
            .map(
                |c| json!({ "id": c.id, "type": "function", "function": { "name": c.name, "arguments": c.arguments } }),
            )
            .collect();
        message.insert("tool_calls".into(), Value::Array(calls));
    }
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": reply.model.to_string(),
        "choices": [{ "index": 0, "message": message, "logprobs": null, "finish_reason": reply.finish_reason.as_openai() }],
        "usage": usage_json(&reply.usage),
        "system_fingerprint": null,
    })
}
