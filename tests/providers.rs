//! The provider layer against mock servers speaking each wire format:
//! streaming, usage, retries, key rotation, timeouts and fallback, driven
//! through `Providers` exactly as the chat paths use it.

#[path = "common/mock_llm.rs"]
mod mock_llm;

use std::time::{Duration, Instant};

use futures::StreamExt;
use mock_llm::{ANTHROPIC_USAGE, Fault, GEMINI_USAGE, MockLlm, OPENAI_USAGE, PIECES, REPLY};
use palaver::{
    config::{Secret, Settings},
    domain::{
        context::{ChatMessage, ChatRole},
        conversation::ModelId,
    },
    providers::{ChatEvent, ProviderError, Providers, Usage},
};

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
    while let Some(event) = stream.next().await {
        match event {
            Ok(ChatEvent::Delta(d)) => out.deltas.push((d, Instant::now())),
            Ok(ChatEvent::Usage(u)) => {
                assert!(out.usage.is_none(), "exactly one usage event");
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

/// Per-user token totals (for quotas) on both engines: SQLite always,
/// PostgreSQL when `PALAVER_TEST_POSTGRES_URL` (or the local default) answers.
#[tokio::test]
async fn usage_totals_add_up_per_user_by_day_and_month() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("usage.db").display());
    check_usage_totals(&sqlite).await;

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
    check_usage_totals(&format!("{base}{separator}options=-c%20search_path%3D{schema}")).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&mut conn).await.unwrap();
    let _ = conn.close().await;
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
