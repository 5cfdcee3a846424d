//! `POST /v1/responses`: the subset of OpenAI's Responses API that text
//! clients and coding agents use — `input` as a string or items (messages,
//! `function_call`, `function_call_output`), `instructions`, tools as
//! `function_call` items, usage, and streaming with the `response.*` events.
//! Nothing is stored, so `previous_response_id` is refused.

use std::sync::Arc;

use axum::{
    Json,
    body::Bytes,
    extract::State,
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use serde_json::{Map, Value, json};

use super::{
    AppState,
    error::with_limits,
    openai::{
        OpenAiError, Started, V1Caller, V1Result, admit, body_and_model, opt_bool, opt_f64, opt_u32, parse_tool_choice,
        parse_tools, sse_response, start_within_grace, text_of, wait_started,
    },
    streaming::keepalive_every,
};
use crate::{
    domain::context::{ChatMessage, ChatRole, ToolCall},
    providers::{ChatEvent, ChatOptions, FinishReason, ResponseFormat, Usage},
};

pub async fn responses(State(state): State<Arc<AppState>>, caller: V1Caller, body: Bytes) -> Response {
    match respond(state, caller, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

struct Request {
    model: crate::domain::conversation::ModelId,
    messages: Vec<ChatMessage>,
    options: ChatOptions,
    stream: bool,
    /// Echoed in the response object.
    echo: Map<String, Value>,
}

fn parse(state: &AppState, caller: &V1Caller, body: &Bytes) -> V1Result<Request> {
    let (body, model) = body_and_model(state, caller, body)?;
    if body.get("previous_response_id").is_some_and(|v| !v.is_null()) {
        return Err(OpenAiError::invalid(
            "previous_response_id",
            "Responses are not stored here; send the whole conversation as `input`.",
        ));
    }
    let mut messages = Vec::new();
    match body.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(ChatMessage::new(ChatRole::System, s.clone())),
        Some(_) => return Err(OpenAiError::invalid("instructions", "`instructions` must be a string.")),
    }
    match body.get("input") {
        Some(Value::String(s)) if !s.is_empty() => messages.push(ChatMessage::new(ChatRole::User, s.clone())),
        Some(Value::Array(items)) if !items.is_empty() => input_items(items, &mut messages)?,
        _ => return Err(OpenAiError::invalid("input", "`input` must be a non-empty string or array of items.")),
    }
    let stream = opt_bool(&body, "stream")?.unwrap_or(false);
    let options = ChatOptions {
        temperature: opt_f64(&body, "temperature", 0.0, 2.0)?,
        top_p: opt_f64(&body, "top_p", 0.0, 1.0)?,
        max_tokens: opt_u32(&body, "max_output_tokens")?,
        response_format: text_format(body.get("text"))?,
        tools: parse_tools(body.get("tools"), false)?,
        tool_choice: match body.get("tool_choice") {
            Some(v @ Value::Object(o)) if o.get("name").is_some() => {
                parse_tool_choice(Some(&json!({ "function": { "name": v["name"] } })))?
            }
            other => parse_tool_choice(other)?,
        },
        parallel_tool_calls: opt_bool(&body, "parallel_tool_calls")?,
        user: body.get("user").and_then(Value::as_str).map(|u| u.chars().take(256).collect()),
        ..ChatOptions::default()
    };
    let mut echo = Map::new();
    for field in ["instructions", "temperature", "top_p", "max_output_tokens", "tool_choice", "tools", "metadata"] {
        echo.insert(field.into(), body.get(field).cloned().unwrap_or(Value::Null));
    }
    Ok(Request { model, messages, options, stream, echo })
}

fn input_items(items: &[Value], out: &mut Vec<ChatMessage>) -> V1Result<()> {
    for (i, item) in items.iter().enumerate() {
        let param = format!("input[{i}]");
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
        match kind {
            "message" => {
                let content = text_of(item.get("content"), &format!("{param}.content"))?;
                let role = match item.get("role").and_then(Value::as_str) {
                    Some("system" | "developer") => ChatRole::System,
                    Some("user") => ChatRole::User,
                    Some("assistant") => ChatRole::Assistant,
                    _ => {
                        return Err(OpenAiError::invalid(
                            &format!("{param}.role"),
                            "`role` must be system, developer, user or assistant.",
                        ));
                    }
                };
                out.push(ChatMessage::new(role, content));
            }
            "function_call" => {
                let call_id = item.get("call_id").and_then(Value::as_str).filter(|s| !s.is_empty());
                let name = item.get("name").and_then(Value::as_str).filter(|s| !s.is_empty());
                let (Some(call_id), Some(name)) = (call_id, name) else {
                    return Err(OpenAiError::invalid(&param, "A function_call item needs `call_id` and `name`."));
                };
                let arguments = item.get("arguments").and_then(Value::as_str).unwrap_or("{}").to_owned();
                let call = ToolCall { id: call_id.to_owned(), name: name.to_owned(), arguments };
                // Consecutive calls are one assistant turn.
                match out.last_mut() {
                    Some(last) if last.role == ChatRole::Assistant && !last.tool_calls.is_empty() => {
                        last.tool_calls.push(call)
                    }
                    _ => out.push(ChatMessage::tool_calls(String::new(), vec![call])),
                }
            }
            "function_call_output" => {
                let call_id =
                    item.get("call_id").and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or_else(|| {
                        OpenAiError::invalid(&format!("{param}.call_id"), "A function_call_output needs `call_id`.")
                    })?;
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    other => text_of(other, &format!("{param}.output"))?,
                };
                out.push(ChatMessage::tool_result(call_id, output));
            }
            _ => {
                return Err(OpenAiError::invalid(
                    &format!("{param}.type"),
                    "Supported input items: message, function_call, function_call_output.",
                ));
            }
        }
    }
    Ok(())
}

fn text_format(v: Option<&Value>) -> V1Result<Option<ResponseFormat>> {
    let Some(format) = v.and_then(|t| t.get("format")).filter(|f| !f.is_null()) else { return Ok(None) };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Some(ResponseFormat::Text)),
        Some("json_object") => Ok(Some(ResponseFormat::JsonObject)),
        Some("json_schema") => Ok(Some(ResponseFormat::JsonSchema {
            name: format.get("name").and_then(Value::as_str).unwrap_or("response").to_owned(),
            schema: format.get("schema").cloned().unwrap_or_else(|| json!({})),
            strict: format.get("strict").and_then(Value::as_bool),
        })),
        _ => Err(OpenAiError::invalid("text.format", "`text.format.type` must be text, json_object or json_schema.")),
    }
}

async fn respond(state: Arc<AppState>, caller: V1Caller, body: Bytes) -> V1Result<Response> {
    let mut req = parse(&state, &caller, &body)?;
    let ids = Ids::new();
    let created = state.clock.now_ms() / 1000;
    let chat = state.chat.clone();
    let who = caller.caller();
    let model = req.model.to_string();
    let admitted = admit(&state, &who, &req.messages, &mut req.options).await?;
    let limits = admitted.state;
    let shell = Shell { id: ids.response.clone(), created, model, echo: req.echo };
    if !req.stream {
        let reply = chat
            .relay_complete(&who, &req.model, req.messages, req.options, admitted.reservation)
            .await
            .map_err(|e| OpenAiError::from_provider(&e))?;
        let output = output_items(&ids, &reply.text, &reply.tool_calls);
        let model = reply.model.to_string();
        let done = Some((&reply.usage, reply.finish_reason));
        return Ok(with_limits(Json(shell.object("completed", &model, output, done)).into_response(), &limits));
    }
    let start = async move { chat.relay(&who, &req.model, req.messages, req.options, admitted.reservation).await };
    let started = start_within_grace(Box::pin(start)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    tokio::spawn(stream_events(tx, started, shell, ids));
    Ok(with_limits(sse_response(rx, keepalive_every(&state)), &limits))
}

/// The ids of one response and its items.
struct Ids {
    response: String,
    message: String,
}

impl Ids {
    fn new() -> Self {
        let base = uuid::Uuid::new_v4().simple().to_string();
        Self { response: format!("resp_{base}"), message: format!("msg_{base}") }
    }

    fn function_call(&self, index: usize) -> String {
        format!("fc_{}_{index}", self.response.trim_start_matches("resp_"))
    }
}

/// What every response object repeats.
struct Shell {
    id: String,
    created: i64,
    model: String,
    echo: Map<String, Value>,
}

impl Shell {
    /// The response object; `done` is the usage and finish of a finished reply.
    fn object(&self, status: &str, model: &str, output: Vec<Value>, done: Option<(&Usage, FinishReason)>) -> Value {
        let mut o = Map::new();
        o.insert("id".into(), json!(self.id));
        o.insert("object".into(), json!("response"));
        o.insert("created_at".into(), json!(self.created));
        o.insert("status".into(), json!(status));
        o.insert("model".into(), json!(model));
        o.insert("output".into(), Value::Array(output));
        o.insert("error".into(), Value::Null);
        let incomplete = done
            .filter(|(_, finish)| *finish == FinishReason::Length)
            .map(|_| json!({ "reason": "max_output_tokens" }));
        o.insert("incomplete_details".into(), incomplete.unwrap_or(Value::Null));
        o.insert("parallel_tool_calls".into(), json!(true));
        for (k, v) in &self.echo {
            o.insert(k.clone(), v.clone());
        }
        if o.get("tools").is_none_or(Value::is_null) {
            o.insert("tools".into(), json!([]));
        }
        if o.get("tool_choice").is_none_or(Value::is_null) {
            o.insert("tool_choice".into(), json!("auto"));
        }
        o.insert("usage".into(), done.map_or(Value::Null, |(u, _)| usage(u)));
        Value::Object(o)
    }
}

fn usage(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": { "cached_tokens": 0 },
        "output_tokens": u.completion_tokens,
        "output_tokens_details": { "reasoning_tokens": 0 },
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

fn message_item(ids: &Ids, text: &str, status: &str) -> Value {
    let content = if status == "completed" {
        json!([{ "type": "output_text", "text": text, "annotations": [] }])
    } else {
        json!([])
    };
    json!({ "type": "message", "id": ids.message, "status": status, "role": "assistant", "content": content })
}

fn call_item(ids: &Ids, index: usize, call: &ToolCall, status: &str) -> Value {
    json!({
        "type": "function_call", "id": ids.function_call(index), "call_id": call.id, "name": call.name,
        "arguments": call.arguments, "status": status,
    })
}

fn output_items(ids: &Ids, text: &str, calls: &[ToolCall]) -> Vec<Value> {
    let mut out = Vec::new();
    if !text.is_empty() || calls.is_empty() {
        out.push(message_item(ids, text, "completed"));
    }
    out.extend(calls.iter().enumerate().map(|(i, c)| call_item(ids, i, c, "completed")));
    out
}

/// One item of a streamed response, as it grows.
enum Item {
    Message(String),
    Call(usize, ToolCall),
}

struct Events {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    seq: u64,
}

impl Events {
    async fn send(&mut self, kind: &str, mut payload: Value) -> bool {
        payload["type"] = json!(kind);
        payload["sequence_number"] = json!(self.seq);
        self.seq += 1;
        self.tx.send(Bytes::from(format!("event: {kind}\ndata: {payload}\n\n"))).await.is_ok()
    }
}

async fn stream_events(tx: tokio::sync::mpsc::Sender<Bytes>, started: Started, shell: Shell, ids: Ids) {
    let mut ev = Events { tx: tx.clone(), seq: 0 };
    let model = shell.model.clone();
    if !ev.send("response.created", json!({ "response": shell.object("in_progress", &model, vec![], None) })).await {
        return;
    }
    let stream = match wait_started(started, &tx).await {
        None => return,
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            let _ = ev.send("error", OpenAiError::from_provider(&e).body()["error"].clone()).await;
            return;
        }
    };
    let model = stream.model().to_string();
    let mut items: Vec<Item> = Vec::new();
    let (mut finish, mut used) = (FinishReason::Stop, Usage::default());
    tokio::pin!(stream);
    while let Some(event) = stream.next().await {
        let ok = match event {
            Ok(ChatEvent::Delta(text)) => {
                let at = match items.iter().position(|i| matches!(i, Item::Message(_))) {
                    Some(at) => at,
                    None => {
                        items.push(Item::Message(String::new()));
                        let at = items.len() - 1;
                        let item = message_item(&ids, "", "in_progress");
                        let part = json!({ "type": "output_text", "text": "", "annotations": [] });
                        if !ev.send("response.output_item.added", json!({ "output_index": at, "item": item })).await
                            || !ev
                                .send(
                                    "response.content_part.added",
                                    json!({ "item_id": ids.message, "output_index": at, "content_index": 0, "part": part }),
                                )
                                .await
                        {
                            return;
                        }
                        at
                    }
                };
                if let Item::Message(t) = &mut items[at] {
                    t.push_str(&text);
                }
                let delta = json!({ "item_id": ids.message, "output_index": at, "content_index": 0, "delta": text });
                ev.send("response.output_text.delta", delta).await
            }
            Ok(ChatEvent::ToolCallDelta { index, id, name, arguments }) => {
                let at = match items.iter().position(|i| matches!(i, Item::Call(n, _) if *n == index)) {
                    Some(at) => at,
                    None => {
                        let call = ToolCall {
                            id: id.unwrap_or_default(),
                            name: name.unwrap_or_default(),
                            arguments: String::new(),
                        };
                        let item = call_item(&ids, index, &call, "in_progress");
                        items.push(Item::Call(index, call));
                        let at = items.len() - 1;
                        if !ev.send("response.output_item.added", json!({ "output_index": at, "item": item })).await {
                            return;
                        }
                        at
                    }
                };
                if let Item::Call(_, c) = &mut items[at] {
                    c.arguments.push_str(&arguments);
                }
                let delta = json!({ "item_id": ids.function_call(index), "output_index": at, "delta": arguments });
                arguments.is_empty() || ev.send("response.function_call_arguments.delta", delta).await
            }
            Ok(ChatEvent::Finish(f)) => {
                finish = f;
                true
            }
            Ok(ChatEvent::Usage(u)) => {
                used = u;
                true
            }
            Err(e) => {
                let _ = ev.send("error", OpenAiError::from_provider(&e).body()["error"].clone()).await;
                return;
            }
        };
        if !ok {
            return;
        }
    }
    let mut output = Vec::new();
    for (at, item) in items.iter().enumerate() {
        let ok = match item {
            Item::Message(text) => {
                let part = json!({ "type": "output_text", "text": text, "annotations": [] });
                let done = message_item(&ids, text, "completed");
                output.push(done.clone());
                ev.send(
                    "response.output_text.done",
                    json!({ "item_id": ids.message, "output_index": at, "content_index": 0, "text": text }),
                )
                .await
                    && ev
                        .send(
                            "response.content_part.done",
                            json!({ "item_id": ids.message, "output_index": at, "content_index": 0, "part": part }),
                        )
                        .await
                    && ev.send("response.output_item.done", json!({ "output_index": at, "item": done })).await
            }
            Item::Call(index, call) => {
                let mut call = call.clone();
                if call.arguments.is_empty() {
                    call.arguments = "{}".into();
                }
                let done = call_item(&ids, *index, &call, "completed");
                output.push(done.clone());
                ev.send(
                    "response.function_call_arguments.done",
                    json!({ "item_id": ids.function_call(*index), "output_index": at, "arguments": call.arguments }),
                )
                .await
                    && ev.send("response.output_item.done", json!({ "output_index": at, "item": done })).await
            }
        };
        if !ok {
            return;
        }
    }
    let status = if finish == FinishReason::Length { "incomplete" } else { "completed" };
    let kind = if status == "completed" { "response.completed" } else { "response.incomplete" };
    let _ = ev.send(kind, json!({ "response": shell.object(status, &model, output, Some((&used, finish))) })).await;
}
