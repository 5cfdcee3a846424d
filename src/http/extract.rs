//! Extractors, so that handlers state in their signature what they need:
//! `AuthUser` (401 before the body is read), `ApiJson<T>` (400/413/415/422
//! answers in our error format), `Pagination`, `Cursor` and `UuidPath`.

use std::{collections::HashMap, sync::Arc};

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{HeaderMap, Method, header, request::Parts},
};
use axum_extra::extract::CookieJar;
use serde::de::DeserializeOwned;

use super::{AppState, error::ApiError};
use crate::{
    auth::hash_token,
    domain::{FieldError, Validator, conversation::ExportFormat, search::SearchTerm, user::Role},
    store::{SessionAuth, UserRecord},
};

pub const SESSION_COOKIE: &str = "palaver_session";
pub const CSRF_COOKIE: &str = "palaver_csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The client's address, for rate limits: the connection's peer or, when
/// that peer is a trusted proxy (PALAVER_TRUSTED_PROXIES), the rightmost
/// `X-Forwarded-For` entry that is not a trusted proxy itself (entries to
/// its left are whatever the client chose to send, so they count for nothing).
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<std::net::IpAddr>);

impl ClientIp {
    /// A rate-limit key: `ip:<address>`.
    pub fn key(&self) -> String {
        match self.0 {
            Some(ip) => format!("ip:{ip}"),
            None => "ip:unknown".to_owned(),
        }
    }
}

pub fn client_ip(
    peer: Option<std::net::IpAddr>,
    headers: &HeaderMap,
    trusted: &[ipnet::IpNet],
) -> Option<std::net::IpAddr> {
    let is_trusted = |ip: &std::net::IpAddr| trusted.iter().any(|net| net.contains(ip));
    let peer = peer?;
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let forwarded =
        headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
    let hops: Vec<std::net::IpAddr> = forwarded.filter_map(|h| h.trim().parse().ok()).collect();
    Some(hops.into_iter().rev().find(|ip| !is_trusted(ip)).unwrap_or(peer))
}

impl FromRequestParts<Arc<AppState>> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
        Ok(ClientIp(client_ip(peer, &parts.headers, &state.settings.server.trusted_proxies)))
    }
}

/// The caller, authenticated by Bearer access token or session cookie.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub user: UserRecord,
    /// The login session; empty when an API key authenticated the request.
    pub session_id: String,
    /// The API key that authenticated the request, if one did.
    pub key: Option<Box<crate::store::ApiKeyRecord>>,
    /// Authenticated by the session cookie (so cross-site requests could carry it).
    pub via_cookie: bool,
}

impl AuthUser {
    /// 403 unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.contains(&self.user.role) {
            Ok(())
        } else {
            Err(ApiError::forbidden("forbidden", "Your role does not allow this."))
        }
    }

    /// Who pays for what this caller asks, with the user's and the key's limits.
    pub fn payer(&self) -> crate::quota::Payer {
        crate::quota::Payer {
            user_id: self.user.id.clone(),
            user_budget: self.user.token_budget,
            key_id: self.key.as_ref().map(|k| k.id.clone()),
            key_budget: self.key.as_ref().and_then(|k| k.token_budget),
            key_rpm: self.key.as_ref().and_then(|k| k.rpm),
        }
    }
}

pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl FromRequestParts<Arc<AppState>> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        if let Some(token) = bearer(&parts.headers) {
            if token.starts_with("pk_") {
                return authenticate_key(state, token).await;
            }
            return authenticate_token(state, token).await;
        }
        let jar = CookieJar::from_headers(&parts.headers);
        let cookie = jar.get(SESSION_COOKIE).ok_or(ApiError::Unauthorized)?;
        let auth =
            state.store.session_auth_by_cookie(&hash_token(cookie.value())).await?.ok_or(ApiError::Unauthorized)?;
        check_csrf(&parts.method, &parts.headers, state, &auth)?;
        accept(state, auth, true).await
    }
}

/// Authenticates an access token (from the Authorization header or, for
/// WebSockets, `?token=`): well signed, unexpired, and its login session live.
pub async fn authenticate_token(state: &AppState, token: &str) -> Result<AuthUser, ApiError> {
    let claims = state.keys.decode_access(token, state.clock.now_ms()).ok_or(ApiError::Unauthorized)?;
    let auth = state.accounts.session_auth(&claims.sid).await?.ok_or(ApiError::Unauthorized)?;
    if auth.user.id != claims.sub {
        return Err(ApiError::Unauthorized);
    }
    accept(state, auth, false).await
}

async fn accept(state: &AppState, auth: SessionAuth, via_cookie: bool) -> Result<AuthUser, ApiError> {
    let now = state.clock.now_ms();
    if !auth.is_valid(now) {
        return Err(ApiError::Unauthorized);
    }
    state.accounts.touch_session(&auth.session, now).await?;
    Ok(AuthUser { session_id: auth.session.id, user: auth.user, key: None, via_cookie })
}

/// Authenticates an API key (`pk_…`): it exists, has not expired, and its
/// owner is not disabled.
pub async fn authenticate_key(state: &AppState, key: &str) -> Result<AuthUser, ApiError> {
    let (key, user) = state.accounts.authenticate_key(key).await?.ok_or(ApiError::Unauthorized)?;
    Ok(AuthUser { session_id: String::new(), user, key: Some(Box::new(key)), via_cookie: false })
}

/// A cookie rides along on cross-site requests, so a state-changing request
/// authenticated by it must also prove it could read our responses.
fn check_csrf(method: &Method, headers: &HeaderMap, state: &AppState, auth: &SessionAuth) -> Result<(), ApiError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let presented = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    if state.keys.csrf_matches(&auth.session.id, presented) {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "csrf_failed",
            "Cookie-authenticated requests that change state need the X-CSRF-Token header.",
        ))
    }
}

/// The caller's conversation: someone else's answers 404 like a missing one.
pub async fn owned_conversation(
    state: &AppState,
    auth: &AuthUser,
    id: &str,
) -> Result<crate::store::ConversationRecord, ApiError> {
    state.store.conversation(id, &auth.user.id).await?.ok_or(ApiError::NotFound)
}

/// A JSON body, with errors in our format: 415 for another content type,
/// 400 for malformed JSON, 413 past the body limit, 422 naming the field
/// for wrong types or missing fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let bytes = read_body(req, state).await?;
        match content_type {
            Some(ct) if is_json(&ct) => {}
            None if bytes.is_empty() => {}
            _ => return Err(ApiError::UnsupportedMediaType),
        }
        parse_json(&bytes).map(ApiJson)
    }
}

pub fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Reads the whole body within `BODY_LIMIT`. A body over the limit is
/// read on (and thrown away, up to `DRAIN_LIMIT`) before the 413 answer:
/// answering with unread data in the socket makes the kernel reset the
/// connection, and the client would never see the 413.
pub async fn read_body<S: Send + Sync>(req: Request, _state: &S) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let mut body = req.into_body();
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|_| ApiError::bad_request("unreadable_body", "The request body could not be read."))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > super::BODY_LIMIT {
                drain(body).await;
                return Err(ApiError::PayloadTooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// How much of an oversized body is read and discarded, and for how long.
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and discards the rest of a body, within `DRAIN_LIMIT` and
/// `DRAIN_TIME`, in the background: it returns at once, so the answer is
/// not delayed, and the reading lets the client receive that answer (a
/// socket closed with unread data in it is reset, answer and all).
pub async fn drain(mut body: axum::body::Body) {
    use http_body_util::BodyExt;
    tokio::spawn(async move {
        let discard = async {
            let mut seen = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                seen += frame.data_ref().map_or(0, |d| d.len());
                if seen > DRAIN_LIMIT {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
    });
}

/// Deserializes a JSON object body, mapping serde's errors onto 400 and 422
/// answers. Only an object is a body: serde would also fill a struct from an
/// array (`[null, null]` clearing two fields), which no client means.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("malformed_json", "A JSON body is required."));
    }
    let is_object = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let not_an_object = || ApiError::invalid(vec![FieldError::new("body", "must be a JSON object")]);
    let malformed =
        |e: &serde_json::Error| ApiError::bad_request("malformed_json", format!("The body is not valid JSON: {e}."));
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let parsed = serde_path_to_error::deserialize(&mut *de);
    if !is_object {
        // Whatever serde made of it: well-formed JSON that is no object is
        // a 422, anything else a 400 (a struct filled from an array stops
        // early with "trailing characters", which is no syntax error here).
        return Err(match parsed {
            Err(err) if err.inner().classify() != serde_json::error::Category::Data => {
                match serde_json::from_slice::<serde_json::Value>(bytes) {
                    Ok(_) => not_an_object(),
                    Err(_) => malformed(err.inner()),
                }
            }
            _ => not_an_object(),
        });
    }
    match parsed {
        Ok(value) => de.end().map(|()| value).map_err(|e| malformed(&e)),
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            match inner.classify() {
                serde_json::error::Category::Data => Err(ApiError::invalid(vec![data_error(&path, &inner)])),
                _ => Err(malformed(&inner)),
            }
        }
    }
}

fn data_error(path: &str, err: &serde_json::Error) -> FieldError {
    let text = err.to_string();
    // serde reports a missing field at its parent's path; name the field.
    let missing = text
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
        .map(|name| if path == "." { name.to_owned() } else { format!("{path}.{name}") });
    let field = missing.clone().unwrap_or_else(|| if path == "." { "body".to_owned() } else { path.to_owned() });
    let message = if missing.is_some() { "field required".to_owned() } else { client_message(&text) };
    FieldError::new(field, message)
}

/// serde's message in the client's terms: "invalid type: map, expected
/// struct ClientInfoBody" names our Rust types (and echoes the client's
/// value), so type errors become "must be <kind of JSON value>".
fn client_message(serde_text: &str) -> String {
    // Drop serde's " at line 1 column 12" position suffix.
    let text = serde_text.split(" at line ").next().unwrap_or(serde_text);
    let is_type_error = ["invalid type", "invalid value", "invalid length"].iter().any(|p| text.starts_with(p));
    match text.rsplit_once(", expected ") {
        Some((_, expected)) if is_type_error => format!("must be {}", json_kind(expected.trim())),
        _ => text.to_owned(),
    }
}

/// What serde's "expected …" (a Rust type or a visitor's wording) is in JSON.
fn json_kind(expected: &str) -> String {
    let first_word = expected.split_whitespace().next().unwrap_or("");
    let kind = match first_word {
        "struct" | "map" => "a JSON object",
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a non-negative integer in range",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer in range",
        "f32" | "f64" => "a number",
        "bool" => "true or false",
        "char" => "a single character",
        "tuple" | "sequence" => "an array",
        "enum" | "variant" | "unit" => "one of the allowed values",
        _ => match expected {
            "a string" | "a borrowed string" => "a string",
            "a boolean" => "true or false",
            "a map" => "a JSON object",
            "a sequence" => "an array",
            // A visitor's own wording ("a UUID string", "a valid date") is
            // already for people; anything naming a type is not.
            e if e.contains("struct ") || e.contains("enum ") => "a valid value",
            e => return e.to_owned(),
        },
    };
    kind.to_owned()
}

/// For PATCH bodies: tells an absent field (`None`) from an explicit null
/// (`Some(None)`). Use with `#[serde(default, deserialize_with = "nullable")]`.
pub fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(d).map(Some)
}

/// Like `nullable`, for a whole number: JSON Schema counts `30.0` as an
/// integer, so a client's integral float is read as one; `1.5` is refused.
pub fn nullable_integer<'de, D>(d: D) -> Result<Option<Option<i64>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <Option<WholeNumber> as serde::Deserialize>::deserialize(d).map(|n| Some(n.map(|n| n.0)))
}

/// An integer in a JSON body, written as `30` or `30.0`.
struct WholeNumber(i64);

impl<'de> serde::Deserialize<'de> for WholeNumber {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_json::Number::deserialize(d)? {
            n if n.is_i64() => Ok(WholeNumber(n.as_i64().unwrap_or_default())),
            n => match n.as_f64() {
                // 2^63 as f64 is out of range; below it an integral float converts exactly.
                Some(f) if f.fract() == 0.0 && (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&f) => {
                    Ok(WholeNumber(f as i64))
                }
                _ => Err(D::Error::custom("must be an integer in range")),
            },
        }
    }
}

/// The raw query string as a map; repeated keys keep the last value.
pub(super) fn query_map(parts: &Parts) -> Result<HashMap<String, String>, ApiError> {
    let q = parts.uri.query().unwrap_or("");
    serde_urlencoded::from_str::<Vec<(String, String)>>(q)
        .map(|pairs| pairs.into_iter().collect())
        .map_err(|_| ApiError::bad_request("malformed_query", "The query string could not be parsed."))
}

fn int_param(v: &mut Validator, q: &HashMap<String, String>, name: &str, default: i64, min: i64, max: i64) -> i64 {
    let Some(raw) = q.get(name) else { return default };
    let parsed =
        raw.trim().parse::<i64>().map_err(|_| "must be an integer".to_owned()).and_then(|n| {
            if (min..=max).contains(&n) { Ok(n) } else { Err(format!("must be between {min} and {max}")) }
        });
    v.check(name, parsed).unwrap_or(default)
}

/// `?page=1&per_page=20` (per_page at most 100).
#[derive(Debug, Clone, Copy)]
pub struct Pagination {
    pub page: i64,
    pub per_page: i64,
}

impl Pagination {
    pub fn offset(&self) -> i64 {
        (self.page - 1) * self.per_page
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Pagination {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let q = query_map(parts)?;
        let mut v = Validator::new();
        let page = int_param(&mut v, &q, "page", 1, 1, 1_000_000);
        let per_page = int_param(&mut v, &q, "per_page", 20, 1, 100);
        v.finish().map_err(ApiError::invalid)?;
        Ok(Pagination { page, per_page })
    }
}

/// `?q=…`: a literal search term (not blank, at most 200 characters).
#[derive(Debug, Clone)]
pub struct SearchQuery(pub SearchTerm);

impl<S: Send + Sync> FromRequestParts<S> for SearchQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let q = query_map(parts)?;
        let parsed = match q.get("q") {
            Some(q) => SearchTerm::parse(q),
            None => Err("is required".to_owned()),
        };
        parsed.map(SearchQuery).map_err(|e| ApiError::invalid(vec![FieldError::new("q", e)]))
    }
}

/// `?format=json|markdown` (default json).
#[derive(Debug, Clone, Copy)]
pub struct ExportQuery(pub ExportFormat);

impl<S: Send + Sync> FromRequestParts<S> for ExportQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let q = query_map(parts)?;
        let format = q.get("format").map_or(Ok(ExportFormat::Json), |f| ExportFormat::parse(f));
        format.map(ExportQuery).map_err(|e| ApiError::invalid(vec![FieldError::new("format", e)]))
    }
}

/// `ExportQuery` as the OpenAPI document states it.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code, reason = "documentation only")]
pub struct ExportQueryDoc {
    /// `json` (the default) or `markdown`.
    #[param(inline)]
    format: Option<ExportFormat>,
}

/// `SearchQuery` as the OpenAPI document states it.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code, reason = "documentation only")]
pub struct SearchQueryDoc {
    /// Text to find, literally and case-insensitively: no character is an operator or a wildcard.
    #[param(min_length = 1, max_length = 200)]
    q: String,
}

/// `Pagination`'s query as the OpenAPI document states it.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code, reason = "documentation only")]
pub struct PageQuery {
    /// Page number, from 1.
    #[param(minimum = 1, maximum = 1_000_000)]
    page: Option<i64>,
    /// Items per page (default 20).
    #[param(minimum = 1, maximum = 100)]
    per_page: Option<i64>,
}

/// `Cursor`'s query as the OpenAPI document states it.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code, reason = "documentation only")]
pub struct CursorQuery {
    /// Messages per page (default 50).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// Answer the messages before this one.
    #[param(schema_with = super::docs::uuid_or_blank, required = false)]
    before: Option<String>,
}

/// `?limit=50&before=<message id>` for message lists.
#[derive(Debug, Clone)]
pub struct Cursor {
    pub limit: i64,
    pub before: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Cursor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let q = query_map(parts)?;
        let mut v = Validator::new();
        let limit = int_param(&mut v, &q, "limit", 50, 1, 100);
        v.finish().map_err(ApiError::invalid)?;
        let before = match q.get("before").map(|s| s.trim()).filter(|s| !s.is_empty()) {
            None => None,
            Some(b) => Some(
                parse_uuid(b)
                    .ok_or_else(|| ApiError::invalid_field("invalid_cursor", "before", "must be a message id"))?,
            ),
        };
        Ok(Cursor { limit, before })
    }
}

/// A UUID in canonical lowercase form, or None.
pub fn parse_uuid(s: &str) -> Option<String> {
    uuid::Uuid::parse_str(s).ok().map(|u| u.to_string())
}

/// Path parameters that must all be UUIDs; a bad one is a 422 naming it.
#[derive(Debug, Clone)]
pub struct UuidPath(pub Vec<String>);

impl UuidPath {
    pub fn one(&self) -> &str {
        &self.0[0]
    }
}

impl<S: Send + Sync> FromRequestParts<S> for UuidPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let params =
            axum::extract::RawPathParams::from_request_parts(parts, state).await.map_err(|_| ApiError::NotFound)?;
        let mut v = Validator::new();
        let ids: Vec<String> = params
            .iter()
            .filter_map(|(name, value)| v.check(name, parse_uuid(value).ok_or_else(|| "must be a UUID".to_owned())))
            .collect();
        v.finish().map_err(ApiError::invalid)?;
        Ok(UuidPath(ids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Body {
        content: String,
        n: Option<u32>,
    }

    fn field_of(e: ApiError) -> (u16, String) {
        match e {
            ApiError::Validation { errors, .. } => (422, errors[0].field.clone()),
            other => (other.status_code().as_u16(), String::new()),
        }
    }

    #[test]
    fn json_errors_name_the_field() {
        assert_eq!(field_of(parse_json::<Body>(b"{}").unwrap_err()), (422, "content".into()));
        assert_eq!(field_of(parse_json::<Body>(br#"{"content": 5}"#).unwrap_err()), (422, "content".into()));
        assert_eq!(field_of(parse_json::<Body>(br#"{"content":"x","n":-1}"#).unwrap_err()), (422, "n".into()));
        assert_eq!(field_of(parse_json::<Body>(b"7").unwrap_err()), (422, "body".into()));
        assert_eq!(field_of(parse_json::<Body>(b"[1]").unwrap_err()).0, 422);
        assert_eq!(field_of(parse_json::<Body>(b"{\"content\":").unwrap_err()).0, 400);
        assert_eq!(field_of(parse_json::<Body>(b"").unwrap_err()).0, 400);
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(field_of(parse_json::<serde_json::Value>(deep.as_bytes()).unwrap_err()).0, 400);
        assert_eq!(field_of(parse_json::<Body>(deep.as_bytes()).unwrap_err()).0, 422);
    }

    fn message_of(e: ApiError) -> String {
        match e {
            ApiError::Validation { errors, .. } => format!("{}: {}", errors[0].field, errors[0].message),
            other => other.detail(),
        }
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Outer {
        title: Option<String>,
        inner: Inner,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        name: String,
        count: u32,
    }

    #[test]
    fn only_objects_are_bodies() {
        for body in [&b"[null, null]"[..], b"[\"x\", 1]", b" 7", b"\"text\"", b"null", b"true"] {
            let shown = String::from_utf8_lossy(body);
            assert_eq!(message_of(parse_json::<Body>(body).unwrap_err()), "body: must be a JSON object", "{shown}");
        }
        // Even a type that would take any JSON value only gets objects.
        assert_eq!(field_of(parse_json::<serde_json::Value>(b"[1]").unwrap_err()), (422, "body".into()));
        assert!(parse_json::<serde_json::Value>(b" {\"a\": [1]}").is_ok());
        assert_eq!(field_of(parse_json::<serde_json::Value>(b"[1, ").unwrap_err()).0, 400, "malformed stays 400");
        assert_eq!(field_of(parse_json::<Body>(br#"{"content": "x"} {}"#).unwrap_err()).0, 400, "trailing data");
    }

    #[test]
    fn errors_never_name_rust_types() {
        let cases: [(&[u8], &str); 6] = [
            (br#"{"inner": "x"}"#, "inner: must be a JSON object"),
            (br#"{"inner": {"name": 5, "count": 1}}"#, "inner.name: must be a string"),
            (br#"{"inner": {"name": "a", "count": -1}}"#, "inner.count: must be a non-negative integer in range"),
            (br#"{"inner": {"name": "a", "count": true}}"#, "inner.count: must be a non-negative integer in range"),
            (br#"{"title": [], "inner": {"name": "a", "count": 1}}"#, "title: must be a string"),
            (br#"{"inner": {"name": "a"}}"#, "inner.count: field required"),
        ];
        for (body, expected) in cases {
            let message = message_of(parse_json::<Outer>(body).unwrap_err());
            assert_eq!(message, expected, "{}", String::from_utf8_lossy(body));
        }
        for body in [&br#"{"inner": 1}"#[..], br#"{"inner": {"name": {}, "count": 1}}"#, b"[]"] {
            let message = message_of(parse_json::<Outer>(body).unwrap_err());
            for rust in ["struct", "Outer", "Inner", "u32", "String"] {
                assert!(!message.contains(rust), "{message:?} names {rust}");
            }
        }
    }

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
    }
}

#[cfg(test)]
mod client_ip_tests {
    use super::{HeaderMap, client_ip};

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", v.parse().unwrap());
        }
        headers
    }

    #[test]
    fn only_a_trusted_peer_may_name_the_client() {
        let trusted = ["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        let ip = |s: &str| Some(s.parse().unwrap());
        let spoof = forwarded(&["6.6.6.6"]);
        assert_eq!(client_ip(ip("192.0.2.1"), &spoof, &trusted), ip("192.0.2.1"), "untrusted peer");
        assert_eq!(client_ip(ip("10.1.2.3"), &spoof, &trusted), ip("6.6.6.6"));
        assert_eq!(client_ip(ip("::1"), &forwarded(&["2001:db8::7"]), &trusted), ip("2001:db8::7"));
        // The rightmost untrusted hop wins, across repeated headers; junk is skipped.
        let chain = forwarded(&["6.6.6.6, 198.51.100.9", "garbage, 10.0.0.2"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &chain, &trusted), ip("198.51.100.9"));
        // Nothing usable forwarded: the proxy itself.
        assert_eq!(client_ip(ip("10.0.0.1"), &forwarded(&["10.9.9.9", "nonsense"]), &trusted), ip("10.0.0.1"));
        assert_eq!(client_ip(ip("10.0.0.1"), &HeaderMap::new(), &trusted), ip("10.0.0.1"));
        assert_eq!(client_ip(None, &spoof, &trusted), None);
        assert_eq!(client_ip(ip("10.0.0.1"), &spoof, &[]), ip("10.0.0.1"), "nothing trusted by default");
    }
}
