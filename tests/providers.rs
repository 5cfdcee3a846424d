//! The provider layer against mock servers speaking each wire format:
//! streaming, tool calls and options, usage, retries, key rotation, timeouts
//! and fallback, driven through `Providers` exactly as the chat paths (and
//! the OpenAI-compatible gateway) use it.

#[path = "common/mock_llm.rs"]
mod mock_llm;

use std::time::{Duration, Instant};

use futures::StreamExt;
use mock_llm::{ANTHROPIC_USAGE, Fault, GEMINI_USAGE, MockLlm, OPENAI_USAGE, PIECES, REPLY, ToolReply};
use palaver::{
    config::{Secret, Settings},
    domain::{
        context::{ChatMessage, ChatRole, ToolCall},
        conversation::ModelId,
    },
    providers::{
        ChatEvent, ChatOptions, FinishReason, ProviderError, Providers, ResponseFormat, ToolChoice, ToolSpec, Usage,
    },
};
use serde_json::json;

const OPENAI: &str = "openai/gpt-4o-mini";
const GEMINI: &str = "gemini/gemini-1.5-flash";
const ANTHROPIC: &str = "anthropic/claude-3-5-haiku-latest";

/// Settings with every wire format pointed at `mock`, fast backoff and
/// short timeouts; `keys` for all three.
fn settings(mock: &MockLlm, keys: &str) -> Settings {
    let mut s = Settings::defaults();
    s.providers.openai_api_key = Some(Secret(keys.into()));
    s.providers.openai_base_url = format!("{}/v1", mock.root);
    s.providers.gemini_api_key = Some(Secret(keys.into()));
    s.providers.gemini_base_url = mock.root.clone();
    s.providers.anthropic_api_key = Some(Secret(keys.into()));
    s.providers.anthropic_base_url = mock.root.clone();
    s.providers.default_model = Some(OPENAI.into());
    s.providers.provider_timeout = 5;
    s.providers.provider_idle_timeout = 2;
    s.providers.provider_retries = 2;
    s.providers.provider_backoff_ms = 10;
    s
}

fn providers(s: &Settings) -> Providers {
    Providers::from_settings(&s.providers).expect("valid provider settings")
}

fn model(id: &str) -> ModelId {
    ModelId::parse(id).unwrap()
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new(ChatRole::System, "You are terse."),
        ChatMessage::new(ChatRole::User, "Say hello"),
        ChatMessage::new(ChatRole::Assistant, "Hi."),
        ChatMessage::new(ChatRole::User, "Again, to the world"),
    ]
}

/// Everything a reply stream yields, with the arrival time of each delta.
struct Collected {
    deltas: Vec<(String, Instant)>,
    usage: Option<Usage>,
    error: Option<ProviderError>,
}

impl Collected {
    fn text(&self) -> String {
        self.deltas.iter().map(|(d, _)| d.as_str()).collect()
    }
}

async fn collect(mut stream: impl futures::Stream<Item = Result<ChatEvent, ProviderError>> + Unpin) -> Collected {
    let mut out = Collected { deltas: Vec::new(), usage: None, error: None };
    let mut finished = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(ChatEvent::Delta(d)) => out.deltas.push((d, Instant::now())),
            Ok(ChatEvent::ToolCallDelta { .. }) => panic!("no tools were offered"),
            Ok(ChatEvent::Finish(reason)) => {
                assert!(!finished && out.usage.is_none(), "one finish, before the usage");
                assert_eq!(reason, FinishReason::Stop);
                finished = true;
            }
            Ok(ChatEvent::Usage(u)) => {
                assert!(out.usage.is_none(), "exactly one usage event");
                assert!(finished, "the finish reason comes before the usage");
                out.usage = Some(u);
            }
            Err(e) => {
                out.error = Some(e);
                assert!(stream.next().await.is_none(), "an error ends the stream");
                break;
            }
        }
    }
    out
}

#[tokio::test]
async fn each_format_streams_its_deltas_then_its_usage() {
    let mock = MockLlm::start_pieces().await;
    let p = providers(&settings(&mock, "k1"));
    for (id, (prompt, completion)) in [(OPENAI, OPENAI_USAGE), (GEMINI, GEMINI_USAGE), (ANTHROPIC, ANTHROPIC_USAGE)] {
        let stream = p.stream(&model(id), conversation()).await.unwrap();
        assert_eq!(stream.model().to_string(), id);
        let got = collect(stream).await;
        assert!(got.error.is_none(), "{id}: {:?}", got.error);
        let deltas: Vec<&str> = got.deltas.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(deltas, PIECES, "{id}: one delta per streamed piece");
        assert_eq!(got.usage, Some(Usage { prompt_tokens: prompt, completion_tokens: completion, estimated: false }));
    }

    let requests = mock.requests();
    let openai = &requests[0];
    assert_eq!(openai.path, "/v1/chat/completions");
    assert_eq!(openai.key.as_deref(), Some("k1"));
    assert_eq!(openai.body["model"], "gpt-4o-mini");
    assert_eq!(openai.body["stream"], true);
    assert_eq!(openai.body["stream_options"]["include_usage"], true);
    assert_eq!(openai.body["messages"][0]["role"], "system");
    assert_eq!(openai.body["messages"].as_array().unwrap().len(), 4);

    let gemini = &requests[1];
    assert_eq!(gemini.path, "/v1beta/models/gemini-1.5-flash:streamGenerateContent");
    assert_eq!(gemini.key.as_deref(), Some("k1"));
    assert_eq!(gemini.body["systemInstruction"]["parts"][0]["text"], "You are terse.");
    let roles: Vec<&str> =
        gemini.body["contents"].as_array().unwrap().iter().map(|c| c["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "model", "user"]);

    let anthropic = &requests[2];
    assert_eq!(anthropic.path, "/v1/messages");
    assert_eq!(anthropic.key.as_deref(), Some("k1"));
    assert_eq!(anthropic.headers["anthropic-version"], "2023-06-01");
    assert_eq!(anthropic.body["system"], "You are terse.");
    assert_eq!(anthropic.body["stream"], true);
    assert!(anthropic.body["max_tokens"].as_u64().unwrap() > 0);
    assert_eq!(anthropic.body["messages"][0]["role"], "user");
}

#[tokio::test]
async fn deltas_reach_the_caller_as_they_are_streamed() {
    let mock = MockLlm::start_pieces().await;
    mock.chunk_delay(Duration::from_millis(150));
    let p = providers(&settings(&mock, "k1"));
    for id in [OPENAI, GEMINI, ANTHROPIC] {
        let got = collect(p.stream(&model(id), conversation()).await.unwrap()).await;
        assert_eq!(got.text(), REPLY);
        let spread = got.deltas.last().unwrap().1 - got.deltas[0].1;
        assert!(spread >= Duration::from_millis(300), "{id}: deltas were buffered (spread {spread:?})");
    }
}

#[tokio::test]
async fn a_500_is_retried_and_the_retry_answers() {
    let mock = MockLlm::start_pieces().await;
    mock.then(Fault::Status(500)).then(Fault::Status(502));
    let p = providers(&settings(&mock, "k1"));
    let done = p.complete(&model(ANTHROPIC), conversation()).await.unwrap();
    assert_eq!(done.text, REPLY);
    assert_eq!(done.model.to_string(), ANTHROPIC);
    assert_eq!(mock.requests().len(), 3, "two failures, then the answer");
}

#[tokio::test]
async fn retries_stop_at_the_configured_count() {
    let mock = MockLlm::start_pieces().await;
    mock.always(Fault::Status(503));
    let mut s = settings(&mock, "k1");
    s.providers.provider_retries = 3;
    let err = providers(&s).complete(&model(GEMINI), conversation()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Upstream { status: 503, .. }), "{err:?}");
    assert_eq!(mock.requests().len(), 4, "the attempt and three retries");

    // A client error is not retried.
    let mock = MockLlm::start_pieces().await;
    mock.always(Fault::Status(400));
    let err = providers(&settings(&mock, "k1")).complete(&model(OPENAI), conversation()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Upstream { status: 400, .. }), "{err:?}");
    assert_eq!(mock.requests().len(), 1);
}

#[tokio::test]
async fn a_refused_connection_is_retried_then_reported() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut s = Settings::defaults();
    s.providers.openai_api_key = Some(Secret("k".into()));
    s.providers.openai_base_url = format!("http://127.0.0.1:{closed}/v1");
    s.providers.provider_backoff_ms = 10;
    let err = providers(&s).complete(&model(OPENAI), conversation()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Connect(_)), "{err:?}");
}

#[tokio::test]
async fn a_rate_limited_key_is_rested_and_the_other_key_answers_at_once() {
    let mock = MockLlm::start_pieces().await;
    mock.limit_key("k1", 30);
    let p = providers(&settings(&mock, "k1,k2"));

    let started = Instant::now();
    let done = p.complete(&model(OPENAI), conversation()).await.unwrap();
    assert_eq!(done.text, REPLY);
    assert!(started.elapsed() < Duration::from_secs(2), "no wait while another key is free");
    assert_eq!(mock.keys(), ["k1", "k2"]);

    // k1 rests for its Retry-After: the next calls go straight to k2.
    for _ in 0..3 {
        p.complete(&model(OPENAI), conversation()).await.unwrap();
    }
    assert_eq!(mock.keys(), ["k1", "k2", "k2", "k2", "k2"]);
}

#[tokio::test]
async fn with_one_key_a_429_waits_for_its_retry_after() {
    let mock = MockLlm::start_pieces().await;
    mock.then(Fault::RateLimited(1));
    let p = providers(&settings(&mock, "only"));
    let started = Instant::now();
    let done = p.complete(&model(GEMINI), conversation()).await.unwrap();
    assert_eq!(done.text, REPLY);
    assert!(started.elapsed() >= Duration::from_secs(1), "Retry-After honoured: {:?}", started.elapsed());
    assert_eq!(mock.keys(), ["only", "only"]);
}

#[tokio::test]
async fn a_key_refused_with_401_leaves_the_rotation() {
    let mock = MockLlm::start_pieces().await;
    mock.refuse_key("bad");
    let p = providers(&settings(&mock, "bad,good"));
    for _ in 0..4 {
        let done = p.complete(&model(ANTHROPIC), conversation()).await.unwrap();
        assert_eq!(done.text, REPLY);
    }
    assert_eq!(mock.keys(), ["bad", "good", "good", "good", "good"], "the refused key is not used again");

    // With no other key the refusal is the answer (not retried).
    let mock = MockLlm::start_pieces().await;
    mock.refuse_key("bad");
    let err = providers(&settings(&mock, "bad")).complete(&model(OPENAI), conversation()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Auth(401)), "{err:?}");
    assert_eq!(mock.requests().len(), 1);
    assert!(!err.to_string().contains("bad"), "the key stays out of messages");
}

#[tokio::test]
async fn a_hung_provider_times_out_without_retries() {
    let mock = MockLlm::start_pieces().await;
    mock.always(Fault::Hang);
    let mut s = settings(&mock, "k1");
    s.providers.provider_timeout = 1;
    let started = Instant::now();
    let err = providers(&s).stream(&model(OPENAI), conversation()).await.err().expect("a timeout");
    assert!(matches!(err, ProviderError::Timeout), "{err:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(mock.requests().len(), 1, "a hung provider is not asked again");
}

#[tokio::test]
async fn a_silence_between_chunks_times_out_after_the_first_delta() {
    let mock = MockLlm::start_pieces().await;
    let mut s = settings(&mock, "k1");
    s.providers.provider_idle_timeout = 1;
    let p = providers(&s);
    for id in [OPENAI, GEMINI, ANTHROPIC] {
        mock.then(Fault::IdleGap(Duration::from_secs(10)));
        let started = Instant::now();
        let got = collect(p.stream(&model(id), conversation()).await.unwrap()).await;
        assert_eq!(got.text(), "Hel", "{id}");
        assert!(matches!(got.error, Some(ProviderError::Timeout)), "{id}: {:?}", got.error);
        assert!(started.elapsed() < Duration::from_secs(3), "{id}: idle timeout, not the total one");
    }
    assert_eq!(mock.requests().len(), 3, "nothing retried once text was sent");
}

#[tokio::test]
async fn a_connection_dropped_mid_stream_ends_the_reply_with_an_error() {
    let mock = MockLlm::start_pieces().await;
    let p = providers(&settings(&mock, "k1"));
    for id in [OPENAI, GEMINI, ANTHROPIC] {
        mock.then(Fault::DropAfter(2));
        let got = collect(p.stream(&model(id), conversation()).await.unwrap()).await;
        assert_eq!(got.text(), "Hello, ", "{id}");
        assert!(matches!(got.error, Some(ProviderError::Connect(_))), "{id}: {:?}", got.error);
        assert!(got.usage.is_none());
    }
    assert_eq!(mock.requests().len(), 3, "nothing retried once text was sent");
}

#[tokio::test]
async fn a_drop_before_any_text_is_retried() {
    let mock = MockLlm::start_pieces().await;
    mock.then(Fault::DropAfter(0));
    let p = providers(&settings(&mock, "k1"));
    let done = p.complete(&model(OPENAI), conversation()).await.unwrap();
    assert_eq!(done.text, REPLY);
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test]
async fn a_whole_reply_that_broke_off_starts_over_and_then_falls_back() {
    let mock = MockLlm::start_pieces().await;
    let mut s = settings(&mock, "k1");
    s.providers.fallback_models = vec![GEMINI.into()];
    let p = providers(&s);
    // Collected whole, nothing was shown: a break after text starts over.
    mock.then(Fault::DropAfter(2));
    let done = p.complete(&model(OPENAI), conversation()).await.unwrap();
    assert_eq!((done.text.as_str(), done.model.to_string()), (REPLY, OPENAI.to_owned()));
    assert_eq!(mock.requests().len(), 2);

    // The primary breaks off every time: its retries (2), then the fallback.
    for _ in 0..3 {
        mock.then(Fault::DropAfter(1));
    }
    let done = p.complete(&model(OPENAI), conversation()).await.unwrap();
    assert_eq!((done.text.as_str(), done.model.to_string()), (REPLY, GEMINI.to_owned()));
    let paths: Vec<String> = mock.requests()[2..].iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths.len(), 4, "{paths:?}");
    assert!(paths[..3].iter().all(|p| p.contains("chat/completions")), "{paths:?}");
    assert!(paths[3].contains("gemini"), "{paths:?}");

    // Everything breaks off: the break is the answer, after every try.
    let mut s = settings(&mock, "k1");
    s.providers.provider_retries = 1;
    mock.always(Fault::DropAfter(1));
    let before = mock.requests().len();
    let err = providers(&s).complete(&model(OPENAI), conversation()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Connect(_)), "{err:?}");
    assert_eq!(mock.requests().len() - before, 2, "the first try and one retry");
}

#[tokio::test]
async fn the_fallback_model_answers_when_the_primary_fails_and_says_so() {
    let mock = MockLlm::start_pieces().await;
    let mut s = settings(&mock, "k1");
    s.providers.fallback_models = vec![GEMINI.into(), ANTHROPIC.into()];
    // The primary (OpenAI) and the first fallback (Gemini) point at a broken server.
    let broken = MockLlm::start_pieces().await;
    broken.always(Fault::Status(500));
    s.providers.openai_base_url = format!("{}/v1", broken.root);
    s.providers.gemini_base_url = broken.root.clone();
    let p = providers(&s);

    let stream = p.stream(&model(OPENAI), conversation()).await.unwrap();
    assert_eq!(stream.model().to_string(), ANTHROPIC, "the model that answers is reported");
    let got = collect(stream).await;
    assert_eq!(got.text(), REPLY);
    assert_eq!(got.usage.unwrap().prompt_tokens, ANTHROPIC_USAGE.0);
    assert_eq!(broken.requests().len(), 6, "each failing model had its retries first");

    let done = p.complete(&model(OPENAI), conversation()).await.unwrap();
    assert_eq!(done.model.to_string(), ANTHROPIC);

    // When everything fails the primary's error is the answer.
    let mut s = settings(&broken, "k1");
    s.providers.fallback_models = vec![GEMINI.into()];
    s.providers.provider_retries = 0;
    let err = providers(&s).complete(&model(OPENAI), conversation()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Upstream { status: 500, .. }), "{err:?}");
}

#[tokio::test]
async fn usage_is_estimated_and_flagged_when_the_provider_reports_none() {
    let mock = MockLlm::start_pieces().await;
    let p = providers(&settings(&mock, "k1"));
    for id in [OPENAI, GEMINI, ANTHROPIC] {
        mock.then(Fault::NoUsage);
        let done = p.complete(&model(id), conversation()).await.unwrap();
        assert_eq!(done.text, REPLY, "{id}");
        assert!(done.usage.estimated, "{id}: {:?}", done.usage);
        assert!(done.usage.prompt_tokens > 0 && done.usage.completion_tokens > 0, "{id}: {:?}", done.usage);
    }
}

#[tokio::test]
async fn provider_calls_show_in_the_metrics() {
    let handle = palaver::startup::metrics_handle();
    let mock = MockLlm::start_pieces().await;
    mock.then(Fault::Status(503));
    let p = providers(&settings(&mock, "k1"));
    p.complete(&model(GEMINI), conversation()).await.unwrap();
    let text = handle.render();
    for expected in [
        r#"palaver_provider_calls_total{provider="gemini",model="gemini-1.5-flash"}"#,
        r#"palaver_provider_errors_total{provider="gemini",model="gemini-1.5-flash",kind="server_error"}"#,
        r#"palaver_provider_latency_seconds_bucket{provider="gemini",model="gemini-1.5-flash""#,
        r#"palaver_provider_ttft_seconds_bucket{provider="gemini",model="gemini-1.5-flash""#,
        r#"palaver_tokens_total{provider="gemini",model="gemini-1.5-flash",direction="in"}"#,
        r#"palaver_tokens_total{provider="gemini",model="gemini-1.5-flash",direction="out"}"#,
    ] {
        assert!(text.contains(expected), "missing {expected} in:\n{text}");
    }
}

// ---- Tool calls, options and finish reasons, in each wire format ----

/// Arguments with escaped quotes, a backslash and characters of several
/// byte lengths, so the pieces split inside escapes and characters.
const WEATHER_ARGS: &str = r#"{"city":"Zürich \"Altstadt\"","unit":"°C","path":"C:\\x"}"#;
const TIME_ARGS: &str = r#"{"zone":"日本/東京 🗼","list":[1,2.5,null]}"#;

fn weather_and_time() -> ToolReply {
    ToolReply::calls(&[("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)])
}

fn tool_options() -> ChatOptions {
    ChatOptions {
        temperature: Some(0.25),
        top_p: Some(0.5),
        max_tokens: Some(321),
        stop: vec!["END".into()],
        seed: Some(7),
        tools: vec![
            ToolSpec {
                name: "get_weather".into(),
                description: Some("Weather in a city".into()),
                parameters: json!({
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                    "required": ["city"],
                    "additionalProperties": false
                }),
            },
            ToolSpec { name: "get_time".into(), description: None, parameters: serde_json::Value::Null },
        ],
        tool_choice: Some(ToolChoice::Function("get_weather".into())),
        parallel_tool_calls: Some(false),
        user: Some("user-42".into()),
        ..ChatOptions::default()
    }
}

/// What a stream with tool calls yields, checked against the contract as it
/// arrives: first pieces carry id and name, indices start in order, one
/// finish, then one usage, nothing after.
#[derive(Debug, Default)]
struct ToolCollected {
    text: String,
    calls: Vec<ToolCall>,
    pieces: Vec<usize>,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
}

async fn collect_tools(
    mut stream: impl futures::Stream<Item = Result<ChatEvent, ProviderError>> + Unpin,
) -> ToolCollected {
    let mut out = ToolCollected::default();
    while let Some(event) = stream.next().await {
        assert!(out.usage.is_none(), "nothing after the usage");
        match event.expect("no error") {
            ChatEvent::Delta(d) => {
                assert!(out.finish.is_none());
                out.text.push_str(&d);
            }
            ChatEvent::ToolCallDelta { index, id, name, arguments } => {
                assert!(out.finish.is_none(), "tool calls before the finish");
                if index == out.calls.len() {
                    let id = id.expect("the first piece carries the id");
                    let name = name.expect("the first piece carries the name");
                    assert!(!id.is_empty() && !name.is_empty());
                    out.calls.push(ToolCall { id, name, arguments });
                } else {
                    assert!(index < out.calls.len(), "index {index} skips ahead");
                    assert!(id.is_none() && name.is_none(), "later pieces carry arguments only");
                    out.calls[index].arguments.push_str(&arguments);
                }
                out.pieces.push(index);
            }
            ChatEvent::Finish(reason) => {
                assert!(out.finish.is_none(), "one finish");
                out.finish = Some(reason);
            }
            ChatEvent::Usage(u) => {
                assert!(out.finish.is_some(), "the finish comes before the usage");
                out.usage = Some(u);
            }
        }
    }
    assert!(out.usage.is_some(), "the stream ends with its usage");
    out
}

/// The calls are the scripted ones: their argument text exactly as
/// streamed, except from Gemini, which sends arguments as JSON objects
/// (whose text we write anew, keys in another order).
fn assert_scripted_calls(id: &str, calls: &[ToolCall]) {
    let named: Vec<(&str, &str)> = calls.iter().map(|c| (c.name.as_str(), c.arguments.as_str())).collect();
    let expected = [("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)];
    if id != GEMINI {
        assert_eq!(named, expected, "{id}");
        return;
    }
    let parse = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap();
    let parsed: Vec<_> = named.iter().map(|(n, a)| (*n, parse(a))).collect();
    assert_eq!(parsed, expected.map(|(n, a)| (n, parse(a))), "{id}");
}

#[tokio::test]
async fn each_format_streams_parallel_tool_calls_that_reassemble_exactly() {
    let mock = MockLlm::start_pieces().await;
    let p = providers(&settings(&mock, "k1"));
    for (id, text, (prompt, completion)) in [
        (OPENAI, "", OPENAI_USAGE),
        (OPENAI, "Let me look.", OPENAI_USAGE),
        (GEMINI, "", GEMINI_USAGE),
        (GEMINI, "Let me look.", GEMINI_USAGE),
        (ANTHROPIC, "", ANTHROPIC_USAGE),
        (ANTHROPIC, "Let me look.", ANTHROPIC_USAGE),
    ] {
        mock.call_tools(weather_and_time().after_text(text));
        let stream = p.stream_with(&model(id), conversation(), tool_options()).await.unwrap();
        let got = collect_tools(stream).await;
        assert_eq!(got.text, text, "{id}");
        assert_scripted_calls(id, &got.calls);
        let ids: Vec<&str> = got.calls.iter().map(|c| c.id.as_str()).collect();
        match id {
            OPENAI => assert_eq!(ids, ["call_mock_0", "call_mock_1"]),
            ANTHROPIC => assert_eq!(ids, ["toolu_mock_0", "toolu_mock_1"], "Anthropic's block indices are not ours"),
            _ => {
                assert!(ids.iter().all(|i| i.starts_with("call_") && i.len() > 10), "minted: {ids:?}");
                assert_ne!(ids[0], ids[1]);
            }
        }
        if id != GEMINI {
            assert!(got.pieces.len() > 10, "{id}: the arguments came in pieces: {:?}", got.pieces);
        }
        assert_eq!(got.finish, Some(FinishReason::ToolCalls), "{id}");
        assert_eq!(got.usage, Some(Usage { prompt_tokens: prompt, completion_tokens: completion, estimated: false }));
    }
}

#[tokio::test]
async fn the_request_carries_tools_choice_and_parameters_in_each_format() {
    let mock = MockLlm::start_pieces().await;
    let p = providers(&settings(&mock, "k1"));
    let mut options = tool_options();
    options.response_format = Some(ResponseFormat::JsonSchema {
        name: "weather".into(),
        schema: json!({"type": "object", "properties": {"t": {"type": "number"}}}),
        strict: Some(true),
    });
    for id in [OPENAI, GEMINI, ANTHROPIC] {
        p.complete_with(&model(id), conversation(), options.clone()).await.unwrap();
    }
    let requests = mock.requests();

    let openai = &requests[0].body;
    assert_eq!(openai["temperature"], 0.25);
    assert_eq!(openai["top_p"], 0.5);
    assert_eq!(openai["max_tokens"], 321);
    assert_eq!(openai["stop"], json!(["END"]));
    assert_eq!(openai["seed"], 7);
    assert_eq!(openai["user"], "user-42");
    assert_eq!(openai["parallel_tool_calls"], false);
    assert_eq!(openai["tool_choice"], json!({"type": "function", "function": {"name": "get_weather"}}));
    assert_eq!(
        openai["tools"],
        json!([
            {"type": "function", "function": {
                "name": "get_weather", "description": "Weather in a city", "parameters": options.tools[0].parameters
            }},
            {"type": "function", "function": {"name": "get_time"}}
        ])
    );
    assert_eq!(
        openai["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "weather", "schema": {"type": "object", "properties": {"t": {"type": "number"}}}, "strict": true}})
    );

    let gemini = &requests[1].body;
    assert_eq!(
        gemini["generationConfig"],
        json!({
            "temperature": 0.25, "topP": 0.5, "maxOutputTokens": 321, "stopSequences": ["END"], "seed": 7,
            "responseMimeType": "application/json",
            "responseJsonSchema": {"type": "object", "properties": {"t": {"type": "number"}}}
        })
    );
    assert_eq!(
        gemini["tools"],
        json!([{"functionDeclarations": [
            {"name": "get_weather", "description": "Weather in a city", "parametersJsonSchema": options.tools[0].parameters},
            {"name": "get_time"}
        ]}])
    );
    assert_eq!(
        gemini["toolConfig"],
        json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}})
    );

    let anthropic = &requests[2].body;
    assert_eq!(anthropic["max_tokens"], 321);
    assert_eq!(anthropic["temperature"], 0.25);
    assert_eq!(anthropic["top_p"], 0.5);
    assert_eq!(anthropic["stop_sequences"], json!(["END"]));
    assert_eq!(anthropic["metadata"], json!({"user_id": "user-42"}));
    assert!(anthropic.get("seed").is_none(), "Anthropic has no seed");
    assert_eq!(
        anthropic["tool_choice"],
        json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        anthropic["tools"],
        json!([
            {"name": "get_weather", "description": "Weather in a city", "input_schema": options.tools[0].parameters},
            {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
        ])
    );
    let system = anthropic["system"].as_str().unwrap();
    assert!(system.starts_with("You are terse.") && system.contains("JSON Schema"), "{system}");

    // Nothing set, nothing sent.
    let mock = MockLlm::start_pieces().await;
    let p = providers(&settings(&mock, "k1"));
    for id in [OPENAI, GEMINI, ANTHROPIC] {
        p.complete(&model(id), conversation()).await.unwrap();
    }
    let requests = mock.requests();
    let keys = |i: usize| {
        let mut keys: Vec<String> = requests[i].body.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    assert_eq!(keys(0), ["messages", "model", "stream", "stream_options"]);
    assert_eq!(keys(1), ["contents", "systemInstruction"]);
    assert_eq!(keys(2), ["max_tokens", "messages", "model", "stream", "system"]);
}

/// A conversation in which the assistant called two tools and got both
/// results, and the user then spoke again.
fn tool_conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new(ChatRole::System, "You are terse."),
        ChatMessage::new(ChatRole::User, "Weather and time in Zürich?"),
        ChatMessage::tool_calls(
            "Checking.",
            vec![
                ToolCall { id: "call_a".into(), name: "get_weather".into(), arguments: WEATHER_ARGS.into() },
                ToolCall { id: "call_b".into(), name: "get_time".into(), arguments: "{\"zone\":".into() },
            ],
        ),
        ChatMessage::tool_result("call_a", r#"{"temp":21}"#),
        ChatMessage::tool_result("call_b", "12:00"),
        ChatMessage::new(ChatRole::User, "Thanks. And tomorrow?"),
    ]
}

#[tokio::test]
async fn tool_calls_and_results_are_sent_in_each_formats_shape() {
    let mock = MockLlm::start_pieces().await;
    let p = providers(&settings(&mock, "k1"));
    for id in [OPENAI, GEMINI, ANTHROPIC] {
        p.complete(&model(id), tool_conversation()).await.unwrap();
    }
    let requests = mock.requests();

    assert_eq!(
        requests[0].body["messages"],
        json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Weather and time in Zürich?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": WEATHER_ARGS}},
                {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{\"zone\":"}}
            ]},
            {"role": "tool", "tool_call_id": "call_a", "content": "{\"temp\":21}"},
            {"role": "tool", "tool_call_id": "call_b", "content": "12:00"},
            {"role": "user", "content": "Thanks. And tomorrow?"}
        ])
    );

    let weather: serde_json::Value = serde_json::from_str(WEATHER_ARGS).unwrap();
    assert_eq!(
        requests[1].body["contents"],
        json!([
            {"role": "user", "parts": [{"text": "Weather and time in Zürich?"}]},
            {"role": "model", "parts": [
                {"text": "Checking."},
                {"functionCall": {"name": "get_weather", "args": weather}},
                {"functionCall": {"name": "get_time", "args": {}}}
            ]},
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
                {"functionResponse": {"name": "get_time", "response": {"content": "12:00"}}},
                {"text": "Thanks. And tomorrow?"}
            ]}
        ])
    );

    assert_eq!(
        requests[2].body["messages"],
        json!([
            {"role": "user", "content": "Weather and time in Zürich?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": weather},
                {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_a", "content": "{\"temp\":21}"},
                {"type": "tool_result", "tool_use_id": "call_b", "content": "12:00"},
                {"type": "text", "text": "Thanks. And tomorrow?"}
            ]}
        ])
    );
}

#[tokio::test]
async fn complete_with_returns_the_tool_calls_and_the_finish_reason() {
    let mock = MockLlm::start_pieces().await;
    let p = providers(&settings(&mock, "k1"));
    mock.call_tools(weather_and_time().after_text("Sure."));
    for id in [OPENAI, GEMINI, ANTHROPIC] {
        let done = p.complete_with(&model(id), conversation(), tool_options()).await.unwrap();
        assert_eq!(done.text, "Sure.", "{id}");
        assert_eq!(done.finish_reason, FinishReason::ToolCalls, "{id}");
        assert_scripted_calls(id, &done.tool_calls);
        assert!(done.tool_calls.iter().all(|c| !c.id.is_empty()));
        assert!(!done.usage.estimated);
    }
    mock.reply_with("plain");
    let done = p.complete_with(&model(ANTHROPIC), conversation(), tool_options()).await.unwrap();
    assert_eq!((done.text.as_str(), done.finish_reason, done.tool_calls.len()), ("plain", FinishReason::Stop, 0));
}

#[tokio::test]
async fn a_tool_call_counts_as_output_so_a_drop_after_it_is_not_retried() {
    let mock = MockLlm::start_pieces().await;
    let p = providers(&settings(&mock, "k1"));
    mock.call_tools(weather_and_time());
    for id in [OPENAI, ANTHROPIC] {
        mock.then(Fault::DropAfter(3));
        let mut stream = p.stream_with(&model(id), conversation(), tool_options()).await.unwrap();
        let mut saw_call = false;
        let error = loop {
            match stream.next().await.expect("an error ends the stream") {
                Ok(ChatEvent::ToolCallDelta { .. }) => saw_call = true,
                Ok(other) => panic!("{id}: {other:?} before the drop"),
                Err(e) => break e,
            }
        };
        assert!(saw_call, "{id}");
        assert!(matches!(error, ProviderError::Connect(_)), "{id}: {error:?}");
        assert!(stream.next().await.is_none());
    }
    assert_eq!(mock.requests().len(), 2, "nothing retried once a tool call was passed on");
}

/// Per-user token totals (for quotas) on both engines: SQLite always,
/// PostgreSQL when `PALAVER_TEST_POSTGRES_URL` (or the local default) answers.
#[tokio::test]
async fn usage_totals_add_up_per_user_by_day_and_month() {
    on_both_engines("usage", |url| async move { check_usage_totals(&url).await }).await;
}

#[tokio::test]
async fn retention_deletes_only_what_is_still_due_and_a_lease_has_one_holder() {
    on_both_engines("retention", |url| async move { check_retention(&url).await }).await;
}

/// Runs `check` on a fresh SQLite file and, when PostgreSQL answers
/// (`PALAVER_TEST_POSTGRES_URL` or the local default), on a fresh schema.
async fn on_both_engines<F, Fut>(name: &str, check: F)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    check(format!("sqlite://{}", dir.path().join(format!("{name}.db")).display())).await;

    let base = std::env::var("PALAVER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    sqlx::any::install_default_drivers();
    let connected = tokio::time::timeout(Duration::from_secs(5), sqlx::AnyConnection::connect(&base)).await;
    let Ok(Ok(mut conn)) = connected else {
        assert!(!std::env::var("CI").is_ok_and(|v| v == "true"), "PostgreSQL at {base} is unreachable in CI");
        eprintln!("skipping the PostgreSQL half: {base} is unreachable");
        return;
    };
    use sqlx::Connection;
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&mut conn).await.unwrap();
    let separator = if base.contains('?') { '&' } else { '?' };
    check(format!("{base}{separator}options=-c%20search_path%3D{schema}")).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&mut conn).await.unwrap();
    let _ = conn.close().await;
}

async fn check_retention(url: &str) {
    use palaver::{
        domain::{
            conversation::{MessageRole, MessageStatus},
            user::Role,
        },
        store::{ConversationRecord, NewMessage, NewUser, Store},
    };
    const DAY: i64 = 86_400_000;
    let store = Store::connect(url).await.unwrap();
    store.migrate().await.unwrap();
    let user = NewUser {
        id: "u1",
        email: None,
        username: Some("u1"),
        display_name: None,
        password_hash: "x",
        role: Role::User,
        now: 0,
    };
    store.insert_user(user).await.unwrap();
    for id in ["c1", "c2"] {
        let c = ConversationRecord {
            id: id.into(),
            user_id: "u1".into(),
            title: None,
            system_prompt: None,
            model: None,
            message_count: 0,
            last_message_at: None,
            created_at: 0,
            updated_at: 0,
        };
        store.insert_conversation(&c).await.unwrap();
        for i in 0..7 {
            let message_id = format!("{id}-m{i}");
            let m = NewMessage {
                id: &message_id,
                conversation_id: id,
                role: MessageRole::User,
                content: "old",
                status: MessageStatus::Complete,
                model: None,
                now: 0,
            };
            store.insert_message(m).await.unwrap();
        }
    }
    let now = 10 * DAY;
    let mut due = store.conversations_due(Some(5), now, 10).await.unwrap();
    due.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(due.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["c1", "c2"], "{url}");
    assert_eq!(due[0].cutoff, 5 * DAY);
    assert!(store.conversations_due(Some(11), now, 10).await.unwrap().is_empty(), "not idle for 11 days");
    assert_eq!(store.conversations_due(None, now, 10).await.unwrap(), vec![], "no retention anywhere");
    store.set_retention_days("u1", Some(3), 0).await.unwrap();
    let own = store.conversations_due(None, now, 10).await.unwrap();
    assert_eq!((own.len(), own[0].cutoff), (2, 7 * DAY), "the user's own retention");
    assert_eq!(store.conversations_due(Some(30), now, 1).await.unwrap().len(), 1, "the limit holds");

    // c2 comes back to life after it was found due: nothing of it is deleted.
    let revived = NewMessage {
        id: "c2-new",
        conversation_id: "c2",
        role: MessageRole::User,
        content: "back",
        status: MessageStatus::Complete,
        model: None,
        now: now - DAY,
    };
    store.insert_message(revived).await.unwrap();
    assert!(store.delete_due_conversation(&due[0], 3).await.unwrap(), "c1 in batches of 3");
    assert!(!store.delete_due_conversation(&due[1], 3).await.unwrap());
    assert!(store.conversation("c1", "u1").await.unwrap().is_none());
    let (left, _) = store.list_messages("c2", None, 100).await.unwrap();
    assert_eq!(left.len(), 8, "{url}: the revived conversation keeps every message");

    // One holder at a time; a lease that ran out or was given up is taken over.
    assert!(store.take_lease("job", "a", 0, 100).await.unwrap());
    assert!(!store.take_lease("job", "b", 50, 100).await.unwrap());
    assert!(store.take_lease("job", "a", 90, 100).await.unwrap(), "renewed by its holder");
    assert!(!store.take_lease("job", "b", 150, 100).await.unwrap(), "the renewal counts from 90");
    assert!(store.take_lease("job", "b", 190, 100).await.unwrap(), "expired");
    store.release_lease("job", "a").await.unwrap();
    assert!(!store.take_lease("job", "a", 200, 100).await.unwrap(), "only the holder gives it up");
    store.release_lease("job", "b").await.unwrap();
    assert!(store.take_lease("job", "a", 200, 100).await.unwrap());
    store.close().await;
}

async fn check_usage_totals(url: &str) {
    use palaver::{
        domain::user::Role,
        store::{NewUser, Store, UsagePeriod, UsageTotals},
    };
    let store = Store::connect(url).await.unwrap();
    store.migrate().await.unwrap();
    for id in ["u1", "u2"] {
        let user = NewUser {
            id,
            email: None,
            username: Some(id),
            display_name: None,
            password_hash: "x",
            role: Role::User,
            now: 0,
        };
        store.insert_user(user).await.unwrap();
    }
    // 2026-11-22T23:00Z, then an hour later (next day, same month), then December.
    let day1 = 1_795_388_400_000;
    let day2 = day1 + 3_600_000;
    let december = day1 + 9 * 86_400_000;
    let adds = (0..10).map(|_| store.add_usage("u1", day1, 10, 5));
    for added in futures::future::join_all(adds).await {
        added.unwrap();
    }
    store.add_usage("u1", day2, 1, 2).await.unwrap();
    store.add_usage("u1", december, 7, 7).await.unwrap();
    store.add_usage("u2", day1, 1000, 1000).await.unwrap();

    let totals = |prompt_tokens, completion_tokens| UsageTotals { prompt_tokens, completion_tokens };
    assert_eq!(store.usage_totals("u1", UsagePeriod::Day, day1).await.unwrap(), totals(100, 50), "{url}");
    assert_eq!(store.usage_totals("u1", UsagePeriod::Day, day2).await.unwrap(), totals(1, 2));
    assert_eq!(store.usage_totals("u1", UsagePeriod::Month, day2).await.unwrap(), totals(101, 52));
    assert_eq!(store.usage_totals("u1", UsagePeriod::Month, december).await.unwrap().total(), 14);
    assert_eq!(store.usage_totals("nobody", UsagePeriod::Month, day1).await.unwrap(), UsageTotals::default());
    store.close().await;
}
