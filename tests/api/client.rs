//! The HTTP client side of the harness: typed request helpers on `TestApp`,
//! `TestUser`, `ApiResponse` (via `Fetch`) and the assertions on the shapes
//! of SPEC §3, so tests read like the SPEC.

use std::future::Future;

use reqwest::{Method, RequestBuilder, StatusCode, header::HeaderMap};
use serde_json::{Value, json};

use crate::harness::{PASSWORD, TestApp};

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.request(Method::GET, path)
    }

    pub fn post(&self, path: &str) -> RequestBuilder {
        self.request(Method::POST, path)
    }

    pub fn patch(&self, path: &str) -> RequestBuilder {
        self.request(Method::PATCH, path)
    }

    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.request(Method::DELETE, path)
    }

    // -- accounts ----------------------------------------------------------

    pub async fn register(&self, body: Value) -> ApiResponse {
        self.post("/api/auth/register").json(&body).fetch().await
    }

    pub async fn login(&self, body: Value) -> ApiResponse {
        self.post("/api/auth/login").json(&body).fetch().await
    }

    pub async fn refresh(&self, refresh_token: &str) -> ApiResponse {
        self.post("/api/auth/refresh").json(&json!({ "refresh_token": refresh_token })).fetch().await
    }

    /// Registers a fresh user and logs them in.
    pub async fn signup(&self) -> TestUser {
        let username = format!("user_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let email = format!("{username}@example.com");
        let registered = self
            .register(
                json!({ "email": email, "username": username, "password": PASSWORD, "display_name": "Test User" }),
            )
            .await;
        registered.assert_status(StatusCode::CREATED);
        let id = registered.body["id"].as_str().expect("user id").to_owned();
        self.login_as(&TestUser::new(id, email, username, PASSWORD)).await
    }

    /// Registers a user, makes them admin directly in the database (the CLI
    /// cannot run in-process) and logs them in again.
    pub async fn signup_admin(&self) -> TestUser {
        let user = self.signup().await;
        self.set_role(&user, "admin").await;
        self.login_as(&user).await
    }

    pub async fn set_role(&self, user: &TestUser, role: &str) {
        let changed = self.database.execute("UPDATE users SET role = $1 WHERE id = $2", &[role, &user.id]).await;
        assert_eq!(changed, 1, "no user row with id {}", user.id);
    }

    /// A new login session for `user` (the returned copy carries its tokens).
    pub async fn login_as(&self, user: &TestUser) -> TestUser {
        self.login_as_with_agent(user, None).await
    }

    pub async fn login_as_with_agent(&self, user: &TestUser, user_agent: Option<&str>) -> TestUser {
        let mut request = self.post("/api/auth/login").json(&json!({ "login": user.email, "password": user.password }));
        if let Some(ua) = user_agent {
            request = request.header(reqwest::header::USER_AGENT, ua);
        }
        let response = request.fetch().await;
        response.assert_status(StatusCode::OK);
        let mut user = user.clone();
        user.token = response.str("access_token").to_owned();
        user.refresh_token = response.str("refresh_token").to_owned();
        user.csrf_token = response.str("csrf_token").to_owned();
        user.session_cookie = response.cookie("palaver_session").map(|c| c.value).unwrap_or_default();
        user
    }

    pub async fn me(&self, user: &TestUser) -> ApiResponse {
        self.get("/api/users/me").bearer_auth(&user.token).fetch().await
    }

    // -- conversations -----------------------------------------------------

    /// Creates a conversation and returns it (asserting 201).
    pub async fn create_conversation(&self, user: &TestUser, body: Value) -> Value {
        let response = self.post("/api/conversations").bearer_auth(&user.token).json(&body).fetch().await;
        response.assert_status(StatusCode::CREATED);
        response.body
    }

    /// Creates an untitled conversation and returns its id.
    pub async fn new_conversation(&self, user: &TestUser) -> String {
        self.create_conversation(user, json!({})).await["id"].as_str().unwrap().to_owned()
    }

    pub async fn post_message(&self, user: &TestUser, conversation_id: &str, body: Value) -> ApiResponse {
        self.post(&format!("/api/conversations/{conversation_id}/messages"))
            .bearer_auth(&user.token)
            .json(&body)
            .fetch()
            .await
    }

    /// Sends `content` and returns `{user_message, assistant_message}` (asserting 201).
    pub async fn say(&self, user: &TestUser, conversation_id: &str, content: &str) -> Value {
        let response = self.post_message(user, conversation_id, json!({ "content": content })).await;
        response.assert_status(StatusCode::CREATED);
        response.body
    }

    pub async fn conversation(&self, user: &TestUser, conversation_id: &str) -> ApiResponse {
        self.get(&format!("/api/conversations/{conversation_id}")).bearer_auth(&user.token).fetch().await
    }

    pub async fn messages(&self, user: &TestUser, conversation_id: &str, query: &str) -> ApiResponse {
        self.get(&format!("/api/conversations/{conversation_id}/messages{query}"))
            .bearer_auth(&user.token)
            .fetch()
            .await
    }

    pub async fn chat(&self, user: &TestUser, body: Value) -> ApiResponse {
        self.post("/api/chat").bearer_auth(&user.token).json(&body).fetch().await
    }
}

/// A registered user and the tokens of one of their login sessions.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: String,
    pub email: String,
    pub username: String,
    pub password: String,
    pub token: String,
    pub refresh_token: String,
    pub csrf_token: String,
    pub session_cookie: String,
}

impl TestUser {
    pub fn new(id: String, email: String, username: String, password: &str) -> Self {
        Self {
            id,
            email,
            username,
            password: password.to_owned(),
            token: String::new(),
            refresh_token: String::new(),
            csrf_token: String::new(),
            session_cookie: String::new(),
        }
    }

    /// The `Cookie` header a browser would send after this login.
    pub fn cookie_header(&self) -> String {
        format!("palaver_session={}; palaver_csrf={}", self.session_cookie, self.csrf_token)
    }
}

// ---------------------------------------------------------------------------
// Responses

/// A response read whole: status, headers, text and (if it parses) JSON.
#[derive(Debug)]
pub struct ApiResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
    pub body: Value,
}

pub trait Fetch {
    fn fetch(self) -> impl Future<Output = ApiResponse> + Send;
}

impl Fetch for RequestBuilder {
    async fn fetch(self) -> ApiResponse {
        let response = self.send().await.unwrap_or_else(|e| panic!("request failed: {e:?}"));
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_else(|e| panic!("reading the body failed: {e:?}"));
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        ApiResponse { status, headers, text, body }
    }
}

#[derive(Debug, Clone)]
pub struct SetCookie {
    pub value: String,
    /// Attribute names and values as sent, e.g. `("samesite", "Lax")`, names lowercased.
    pub attributes: Vec<(String, String)>,
}

impl SetCookie {
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes.iter().find(|(n, _)| n == &name.to_ascii_lowercase()).map(|(_, v)| v.as_str())
    }

    pub fn has_flag(&self, name: &str) -> bool {
        self.attribute(name).is_some()
    }
}

impl ApiResponse {
    fn describe(&self) -> String {
        format!("{} {}", self.status, self.text.chars().take(2000).collect::<String>())
    }

    #[track_caller]
    pub fn assert_status(&self, expected: StatusCode) -> &Self {
        assert_eq!(self.status, expected, "unexpected answer: {}", self.describe());
        self
    }

    /// A string field of the JSON body.
    #[track_caller]
    pub fn str(&self, field: &str) -> &str {
        self.body[field].as_str().unwrap_or_else(|| panic!("no string field {field:?} in {}", self.describe()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    #[track_caller]
    pub fn assert_json(&self) -> &Self {
        let ct = self.header("content-type").unwrap_or_default();
        assert!(ct.starts_with("application/json"), "expected a JSON content type, got {ct:?}: {}", self.describe());
        assert!(!self.body.is_null(), "expected a JSON body: {}", self.describe());
        self
    }

    /// `{detail, code}` with this status and code (SPEC §1).
    #[track_caller]
    pub fn assert_error(&self, status: StatusCode, code: &str) -> &Self {
        self.assert_status(status);
        self.assert_error_shape();
        assert_eq!(self.body["code"], code, "unexpected error code: {}", self.describe());
        self
    }

    /// Any error in the `{detail, code}` format.
    #[track_caller]
    pub fn assert_error_shape(&self) -> &Self {
        self.assert_json();
        let detail = self.body["detail"].as_str().unwrap_or_default();
        assert!(!detail.is_empty(), "error without a detail sentence: {}", self.describe());
        let code = self.body["code"].as_str().unwrap_or_default();
        assert!(
            !code.is_empty() && code.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()),
            "error code is not snake_case: {}",
            self.describe()
        );
        self
    }

    /// 422 whose `errors` name `field` (any code).
    #[track_caller]
    pub fn assert_invalid(&self, field: &str) -> &Self {
        self.assert_status(StatusCode::UNPROCESSABLE_ENTITY);
        self.assert_error_shape();
        let errors =
            self.body["errors"].as_array().unwrap_or_else(|| panic!("422 without errors: {}", self.describe()));
        assert!(
            errors.iter().any(|e| e["field"] == field && e["message"].as_str().is_some_and(|m| !m.is_empty())),
            "expected an error on field {field:?}: {}",
            self.describe()
        );
        self
    }

    /// 422 with this code whose `errors` name `field`.
    #[track_caller]
    pub fn assert_invalid_with(&self, code: &str, field: &str) -> &Self {
        self.assert_invalid(field);
        assert_eq!(self.body["code"], code, "unexpected error code: {}", self.describe());
        self
    }

    /// A 4xx answer in the error format: the server refused politely.
    #[track_caller]
    pub fn assert_client_error(&self) -> &Self {
        assert!(self.status.is_client_error(), "expected a 4xx answer: {}", self.describe());
        self.assert_error_shape();
        self
    }

    /// Tables of hostile requests report every offender at once: `None` for
    /// a 4xx in the error format, else a line saying what `what` got.
    pub fn problem_unless_client_error(&self, what: &str) -> Option<String> {
        let shaped = self.header("content-type").is_some_and(|ct| ct.starts_with("application/json"))
            && self.body["detail"].as_str().is_some_and(|d| !d.is_empty())
            && self.body["code"].as_str().is_some_and(|c| !c.is_empty());
        (!self.status.is_client_error() || !shaped).then(|| format!("{what}: {}", self.describe()))
    }

    /// 401 `unauthorized` with `WWW-Authenticate: Bearer`.
    #[track_caller]
    pub fn assert_unauthorized(&self) -> &Self {
        self.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
        let challenge = self.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer"), "401 without WWW-Authenticate: Bearer (got {challenge:?})");
        self
    }

    /// The `Set-Cookie` for `name`, if any.
    pub fn cookie(&self, name: &str) -> Option<SetCookie> {
        self.headers.get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).find_map(|raw| {
            let mut parts = raw.split(';').map(str::trim);
            let (n, v) = parts.next()?.split_once('=')?;
            (n == name).then(|| SetCookie {
                value: v.trim_matches('"').to_owned(),
                attributes: parts
                    .map(|p| {
                        let (k, v) = p.split_once('=').unwrap_or((p, ""));
                        (k.trim().to_ascii_lowercase(), v.trim().to_owned())
                    })
                    .collect(),
            })
        })
    }

    /// The `items` of a list answer.
    #[track_caller]
    pub fn items(&self) -> &Vec<Value> {
        self.body["items"].as_array().unwrap_or_else(|| panic!("no items array: {}", self.describe()))
    }
}

// ---------------------------------------------------------------------------
// Shapes

/// The value is a UUID string.
#[track_caller]
pub fn assert_uuid(value: &Value) -> uuid::Uuid {
    let s = value.as_str().unwrap_or_else(|| panic!("expected a UUID string, got {value}"));
    uuid::Uuid::parse_str(s).unwrap_or_else(|e| panic!("{s:?} is not a UUID: {e}"))
}

/// The value is an RFC 3339 UTC time ending in `Z`.
#[track_caller]
pub fn assert_timestamp(value: &Value) -> time::OffsetDateTime {
    let s = value.as_str().unwrap_or_else(|| panic!("expected an RFC 3339 time, got {value}"));
    assert!(s.ends_with('Z'), "{s:?} is not UTC with a Z suffix");
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"))
}

/// A User object (SPEC §2) with the given role.
#[track_caller]
pub fn assert_user(value: &Value, role: &str) {
    assert_uuid(&value["id"]);
    assert_timestamp(&value["created_at"]);
    assert_eq!(value["role"], role, "role of {value}");
    for field in ["email", "username", "display_name"] {
        assert!(value.get(field).is_some(), "User lacks {field}: {value}");
    }
    let text = value.to_string().to_lowercase();
    assert!(!text.contains("password") && !text.contains("argon2"), "a User leaks its password hash: {value}");
}

/// A Message object (SPEC §3).
#[track_caller]
pub fn assert_message(value: &Value, conversation_id: &str, role: &str, status: &str) {
    assert_uuid(&value["id"]);
    assert_eq!(value["conversation_id"], conversation_id, "conversation_id of {value}");
    assert_eq!(value["role"], role, "role of {value}");
    assert_eq!(value["status"], status, "status of {value}");
    assert!(value["content"].is_string(), "content of {value}");
    assert_timestamp(&value["created_at"]);
    for field in ["model", "usage", "error"] {
        assert!(value.get(field).is_some(), "Message lacks {field}: {value}");
    }
}

/// A Conversation object (SPEC §3).
#[track_caller]
pub fn assert_conversation(value: &Value) {
    assert_uuid(&value["id"]);
    assert_timestamp(&value["created_at"]);
    assert_timestamp(&value["updated_at"]);
    assert!(value["message_count"].is_i64(), "message_count of {value}");
    for field in ["title", "system_prompt", "model", "last_message_at"] {
        assert!(value.get(field).is_some(), "Conversation lacks {field}: {value}");
    }
    if !value["last_message_at"].is_null() {
        assert_timestamp(&value["last_message_at"]);
    }
}

/// A page answer `{items, page, per_page, total}`.
#[track_caller]
pub fn assert_page(body: &Value, page: i64, per_page: i64, total: i64) {
    assert!(body["items"].is_array(), "page without items: {body}");
    assert_eq!(body["page"], page, "page of {body}");
    assert_eq!(body["per_page"], per_page, "per_page of {body}");
    assert_eq!(body["total"], total, "total of {body}");
}

/// `(role, content)` of a list of Messages.
pub fn turns(messages: &[Value]) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|m| {
            (m["role"].as_str().unwrap_or_default().to_owned(), m["content"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

/// `(role, content)` pairs from literals, for comparisons.
pub fn expected_turns(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(r, c)| (r.to_string(), c.to_string())).collect()
}
