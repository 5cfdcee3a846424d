//! What the HTTP adapters share: the provider's base URL and keys, sending a
//! request with key rotation, and mapping refusals to `ProviderError`s.
//!
//! Keys are used in turn. A key answered 401/403 leaves the rotation (one
//! warning naming its position, never the key); a key answered 429 rests
//! for its Retry-After. Both only while another key is usable: a provider
//! with no usable key left keeps trying the least bad one rather than
//! refusing every request without asking.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use reqwest::{Client, RequestBuilder, Response, StatusCode, header::HeaderMap};

use super::ProviderError;

/// How long a key answered 429 without a Retry-After rests.
const DEFAULT_REST: Duration = Duration::from_secs(5);
/// How much of an error body is kept for the error message.
const ERROR_BODY_LIMIT: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, Default)]
struct KeyState {
    refused: bool,
    rested_until: Option<Instant>,
}

/// A provider's API keys and their standing.
pub struct KeyRing {
    provider: String,
    keys: Vec<String>,
    next: AtomicUsize,
    states: Mutex<Vec<KeyState>>,
}

impl KeyRing {
    /// `keys` holds zero or more comma-separated keys.
    pub fn parse(provider: &str, keys: Option<&str>) -> Self {
        let keys: Vec<String> =
            keys.unwrap_or_default().split(',').map(str::trim).filter(|k| !k.is_empty()).map(str::to_owned).collect();
        let states = Mutex::new(vec![KeyState::default(); keys.len()]);
        Self { provider: provider.to_owned(), keys, next: AtomicUsize::new(0), states }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    fn usable(state: &KeyState, now: Instant) -> bool {
        !state.refused && state.rested_until.is_none_or(|t| t <= now)
    }

    /// The next key in turn (its index and value), skipping refused and
    /// resting keys while a usable one exists.
    pub fn pick(&self) -> Option<(usize, &str)> {
        let n = self.keys.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let states = self.states.lock().expect("key ring lock poisoned");
        let order = (0..n).map(|i| (start + i) % n);
        let chosen = order
            .clone()
            .find(|&i| Self::usable(&states[i], now))
            // Every key rests: the one free soonest, unless it was refused.
            .or_else(|| order.clone().filter(|&i| !states[i].refused).min_by_key(|&i| states[i].rested_until))
            .unwrap_or(start % n);
        Some((chosen, &self.keys[chosen]))
    }

    /// Whether a key other than `index` can be used now.
    pub fn another_usable(&self, index: usize) -> bool {
        let now = Instant::now();
        let states = self.states.lock().expect("key ring lock poisoned");
        states.iter().enumerate().any(|(i, s)| i != index && Self::usable(s, now))
    }

    /// Takes a key the provider refused out of the rotation.
    pub fn refuse(&self, index: usize, status: u16) {
        let mut states = self.states.lock().expect("key ring lock poisoned");
        if !states[index].refused {
            states[index].refused = true;
            tracing::warn!(
                provider = self.provider.as_str(),
                key_index = index,
                keys = self.keys.len(),
                status,
                "the provider refused an API key; it is out of the rotation until restart (key_index counts from 0 in the key list)"
            );
        }
    }

    /// Rests a rate-limited key.
    pub fn rest(&self, index: usize, for_how_long: Duration) {
        let mut states = self.states.lock().expect("key ring lock poisoned");
        states[index].rested_until = Some(Instant::now() + for_how_long);
    }

    /// `text` with every key blanked out, for error messages.
    fn scrub(&self, text: &str) -> String {
        self.keys.iter().filter(|k| k.len() >= 6).fold(text.to_owned(), |t, k| t.replace(k.as_str(), "***"))
    }
}

/// An address under a provider's base URL, parsed once rather than on
/// every request (URL parsing with IDNA was a visible share of a gateway
/// request's CPU). One that does not parse is kept as text, so the request
/// fails the way it always did, with reqwest's error.
pub struct Target {
    parsed: Option<reqwest::Url>,
    text: String,
}

impl Target {
    pub fn new(endpoint: &Endpoint, path: &str) -> Self {
        let text = format!("{}{path}", endpoint.base_url);
        Self { parsed: reqwest::Url::parse(&text).ok(), text }
    }

    pub fn post(&self, http: &Client) -> RequestBuilder {
        match &self.parsed {
            Some(url) => http.post(url.clone()),
            None => http.post(&self.text),
        }
    }
}

/// A provider's base URL and keys, and the shared HTTP client.
pub struct Endpoint {
    pub base_url: String,
    pub http: Client,
    keys: KeyRing,
}

impl Endpoint {
    pub fn new(provider: &str, base_url: &str, keys: Option<&str>, http: Client) -> Self {
        Self { base_url: base_url.trim_end_matches('/').to_owned(), http, keys: KeyRing::parse(provider, keys) }
    }

    /// Sends the request `build` makes for a key, and answers the successful
    /// response. A refused or rate-limited key is set aside and, when
    /// another key is usable, the request goes out again with that one.
    pub async fn send(
        &self,
        build: impl Fn(&Client, Option<&str>) -> RequestBuilder,
    ) -> Result<Response, ProviderError> {
        let mut tried = 0;
        loop {
            let key = self.keys.pick();
            let response = build(&self.http, key.map(|(_, k)| k)).send().await.map_err(request_error)?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            let headers = response.headers().clone();
            let body = read_error_body(response).await;
            let error = status_error(status, &headers, &self.keys.scrub(&body));
            let Some((index, _)) = key else { return Err(error) };
            tried += 1;
            match &error {
                ProviderError::Auth(code) => self.keys.refuse(index, *code),
                ProviderError::RateLimited { retry_after } => {
                    self.keys.rest(index, retry_after.unwrap_or(DEFAULT_REST));
                }
                _ => return Err(error),
            }
            if tried >= self.keys.len() || !self.keys.another_usable(index) {
                return Err(error);
            }
        }
    }
}

async fn read_error_body(mut response: Response) -> String {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() >= ERROR_BODY_LIMIT {
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// Maps an HTTP failure to the error kinds the callers act on.
pub fn status_error(status: StatusCode, headers: &HeaderMap, body: &str) -> ProviderError {
    let code = status.as_u16();
    match code {
        401 | 403 => ProviderError::Auth(code),
        429 => ProviderError::RateLimited { retry_after: retry_after(headers) },
        _ => ProviderError::Upstream { status: code, message: error_message(body) },
    }
}

/// `retry-after-ms` (OpenAI), else `Retry-After` in seconds or as a date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return Duration::try_from_secs_f64(ms / 1000.0).ok();
    }
    let value = header("retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let at = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    let wait = at - time::OffsetDateTime::now_utc();
    Some(Duration::try_from(wait).unwrap_or(Duration::ZERO))
}

/// The human part of a provider's error body: `error.message` in the
/// OpenAI, Anthropic and Gemini formats, else the start of the text.
pub fn error_message(body: &str) -> String {
    let json: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let found = json.as_ref().and_then(|v| {
        let v = v.get(0).unwrap_or(v);
        v.pointer("/error/message").or_else(|| v.get("message")).and_then(|m| m.as_str())
    });
    found.unwrap_or(body).trim().chars().take(300).collect()
}

pub fn request_error(e: reqwest::Error) -> ProviderError {
    if e.is_connect() || !e.is_timeout() {
        ProviderError::Connect(e.without_url().to_string())
    } else {
        ProviderError::Timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_rotate_and_skip_refused_and_resting_ones() {
        let ring = KeyRing::parse("openai", Some(" a, b ,,c"));
        assert_eq!(ring.len(), 3);
        let picks: Vec<usize> = (0..6).map(|_| ring.pick().unwrap().0).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        ring.refuse(1, 401);
        ring.rest(2, Duration::from_secs(60));
        assert!((0..4).all(|_| ring.pick().unwrap().1 == "a"));
        assert!(!ring.another_usable(0));
        assert!(ring.another_usable(1));
    }

    #[test]
    fn with_every_key_set_aside_the_least_bad_one_is_used() {
        let ring = KeyRing::parse("groq", Some("a,b"));
        ring.refuse(0, 403);
        ring.rest(1, Duration::from_secs(60));
        assert_eq!(ring.pick().unwrap().1, "b");
        ring.refuse(1, 401);
        assert!(ring.pick().is_some(), "still tries rather than failing unasked");
        assert!(KeyRing::parse("ollama", None).pick().is_none());
    }

    #[test]
    fn retry_after_in_its_three_spellings() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut h = HeaderMap::new();
        h.insert("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::ZERO), "a past date means now");
    }

    #[test]
    fn error_messages_come_out_of_each_format() {
        assert_eq!(error_message(r#"{"error":{"message":"bad model","type":"x"}}"#), "bad model");
        assert_eq!(error_message(r#"[{"error":{"code":400,"message":"gemini says no"}}]"#), "gemini says no");
        assert_eq!(error_message("plain text"), "plain text");
        let ring = KeyRing::parse("openai", Some("sk-secret-1"));
        assert_eq!(ring.scrub("Incorrect API key provided: sk-secret-1."), "Incorrect API key provided: ***.");
    }
}
