//! /api/auth: register, login (JSON or OAuth2 form), refresh with rotation
//! and reuse detection, logout, and the list of login sessions.

use std::sync::Arc;

use axum::{
    Json,
    extract::{FromRequest, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use axum_extra::extract::cookie::{Cookie, SameSite};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    AppState, docs,
    error::{ApiError, ApiResult},
    extract::{ApiJson, AuthUser, CSRF_COOKIE, ClientIp, SESSION_COOKIE, UuidPath, is_json, parse_json, read_body},
    views::{ErrorBody, Items, UserView},
};
use crate::{
    auth::{hash_token, random_token},
    clock::rfc3339,
    domain::{
        Validator,
        user::{DisplayName, Email, Password, Role, Username},
    },
    limits,
    store::{NewLoginSession, RefreshOutcome, UserRecord},
};

#[derive(Debug, Deserialize, ToSchema)]
pub struct RegisterBody {
    #[schema(schema_with = docs::optional_email)]
    pub email: Option<String>,
    #[schema(schema_with = docs::optional_username)]
    pub username: Option<String>,
    #[schema(min_length = 8, max_length = 128, pattern = r"^[^\u0000]*$")]
    pub password: String,
    #[schema(schema_with = docs::optional_display_name)]
    pub display_name: Option<String>,
}

/// Create an account (role `user`); at least one of email and username.
#[utoipa::path(post, path = "/api/auth/register", tag = "auth", request_body = RegisterBody,
    responses((status = 201, body = UserView), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 429, body = ErrorBody, description = "Too many registrations from this address; see Retry-After")))]
pub async fn register(
    State(state): State<Arc<AppState>>,
    client: ClientIp,
    ApiJson(body): ApiJson<RegisterBody>,
) -> ApiResult<(StatusCode, Json<UserView>)> {
    let limiter = &state.login_throttle.registrations;
    let (address, now) = (client.key(), state.clock.now_ms());
    let detail = "Too many accounts registered from this address; try again later.";
    limiter.check(&address, now, "rate_limited", detail).await?;
    let mut v = Validator::new();
    let email = v.check_opt("email", body.email.filter(|s| !s.trim().is_empty()), |s| Email::parse(&s)).flatten();
    let username = v.check_opt("username", body.username.filter(|s| !s.is_empty()), |s| Username::parse(&s)).flatten();
    let display_name = v.check_opt("display_name", body.display_name, |s| DisplayName::parse(&s)).flatten();
    let password = v.check("password", Password::parse(body.password));
    if v.is_ok() && email.is_none() && username.is_none() {
        v.error("email", "an email or a username is required");
    }
    v.finish().map_err(ApiError::invalid)?;
    let password = password.expect("validated above");
    // Counted before the insert: probing for taken emails counts too.
    limiter.record(&address, now).await;

    let hash = state.hasher.hash(&password).await?;
    let user = state.accounts.insert_user(email.as_ref(), username.as_ref(), display_name, &hash, Role::User).await?;
    Ok((StatusCode::CREATED, Json(UserView::from(&user))))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginBody {
    /// Email or username.
    #[serde(alias = "email", alias = "username")]
    pub login: String,
    pub password: String,
}

/// The OAuth2 password-flow form of a login.
#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginFormBody {
    /// Email or username.
    pub username: String,
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokensView {
    pub access_token: String,
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    pub refresh_token: String,
    pub refresh_expires_in: i64,
    pub user: UserView,
    /// Send as `X-CSRF-Token` on state-changing requests authenticated by the cookie.
    pub csrf_token: String,
}

/// The login body as JSON or as an OAuth2 password-flow form.
pub struct LoginForm(LoginBody);

impl FromRequest<Arc<AppState>> for LoginForm {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let bytes = read_body(req, state).await?;
        if ct.starts_with("application/x-www-form-urlencoded") {
            let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes)
                .map_err(|_| ApiError::bad_request("malformed_form", "The form body could not be parsed."))?;
            let get = |k: &str| form.iter().rev().find(|(name, _)| name == k).map(|(_, v)| v.clone());
            let mut v = Validator::new();
            let login = v.check("username", get("username").ok_or_else(|| "field required".to_owned()));
            let password = v.check("password", get("password").ok_or_else(|| "field required".to_owned()));
            v.finish().map_err(ApiError::invalid)?;
            return Ok(LoginForm(LoginBody {
                login: login.unwrap_or_default(),
                password: password.unwrap_or_default(),
            }));
        }
        if !ct.is_empty() && !is_json(&ct) {
            return Err(ApiError::UnsupportedMediaType);
        }
        parse_json(&bytes).map(LoginForm)
    }
}

/// Log in with email or username; answers tokens and sets the session cookie.
#[utoipa::path(post, path = "/api/auth/login", tag = "auth",
    request_body(description = "JSON, or form `username=&password=` (OAuth2 password flow)",
        content((LoginBody = "application/json"), (LoginFormBody = "application/x-www-form-urlencoded"))),
    responses((status = 200, body = TokensView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 429, body = ErrorBody, description = "Too many failed logins; see Retry-After")))]
pub async fn login(
    State(state): State<Arc<AppState>>,
    client: ClientIp,
    headers: HeaderMap,
    LoginForm(body): LoginForm,
) -> ApiResult<Response> {
    // Over-long inputs cannot match; refuse them before hashing anything.
    if body.login.chars().count() > 254 || body.password.chars().count() > 128 || body.login.contains('\0') {
        return Err(ApiError::BadCredentials);
    }
    let address_key = client.key();
    let account_key = format!("account:{}", body.login.trim().to_lowercase());
    let now = state.clock.now_ms();
    let throttle = &state.login_throttle;
    let blocked = throttle
        .per_address
        .blocked_for(&address_key, now)
        .await
        .max(throttle.per_account.blocked_for(&account_key, now).await);
    limits::refuse(blocked, "too_many_attempts", "Too many failed logins; wait before trying again.")?;
    let user = state.store.user_by_login(&body.login).await?;
    let ok = state.hasher.verify(&body.password, user.as_ref().map(|u| u.password_hash.as_str())).await?;
    let user = match user {
        Some(u) if ok => u,
        _ => {
            throttle.per_address.record(&address_key, now).await;
            throttle.per_account.record(&account_key, now).await;
            return Err(ApiError::BadCredentials);
        }
    };
    throttle.per_account.reset(&account_key).await;
    if user.is_disabled() {
        return Err(ApiError::forbidden("account_disabled", "This account is disabled."));
    }

    let now = state.clock.now_ms();
    let session_id = state.ids.random();
    let cookie_secret = random_token("pcs_");
    let refresh_token = random_token("prt_");
    let user_agent: Option<String> =
        headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(|s| s.chars().take(300).collect());
    state
        .store
        .create_login_session(NewLoginSession {
            id: &session_id,
            user_id: &user.id,
            cookie_hash: &hash_token(&cookie_secret),
            user_agent: user_agent.as_deref(),
            refresh_hash: &hash_token(&refresh_token),
            now,
            expires_at: now + state.refresh_ttl_secs() * 1000,
        })
        .await?;

    let tokens = tokens_view(&state, &user, &session_id, refresh_token)?;
    let secure = is_https(&headers);
    let max_age = time::Duration::seconds(state.refresh_ttl_secs());
    let session_cookie = Cookie::build((SESSION_COOKIE, cookie_secret))
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(secure)
        .path("/")
        .max_age(max_age)
        .build();
    let csrf_cookie = Cookie::build((CSRF_COOKIE, tokens.csrf_token.clone()))
        .same_site(SameSite::Lax)
        .secure(secure)
        .path("/")
        .max_age(max_age)
        .build();
    let mut response = Json(tokens).into_response();
    append_cookie(&mut response, &session_cookie);
    append_cookie(&mut response, &csrf_cookie);
    Ok(response)
}

fn tokens_view(state: &AppState, user: &UserRecord, session_id: &str, refresh_token: String) -> ApiResult<TokensView> {
    let access_token = state.keys.issue_access(&user.id, session_id, state.clock.now_ms(), state.access_ttl_secs())?;
    Ok(TokensView {
        access_token,
        token_type: "bearer",
        expires_in: state.access_ttl_secs(),
        refresh_token,
        refresh_expires_in: state.refresh_ttl_secs(),
        user: user.into(),
        csrf_token: state.keys.csrf_token(session_id),
    })
}

/// Behind a TLS-terminating proxy the scheme arrives in `X-Forwarded-Proto`.
fn is_https(headers: &HeaderMap) -> bool {
    headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

fn append_cookie(response: &mut Response, cookie: &Cookie<'_>) {
    if let Ok(v) = HeaderValue::from_str(&cookie.to_string()) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RefreshBody {
    pub refresh_token: String,
}

/// Trade a refresh token for new tokens. The old one dies; presenting it
/// again revokes the whole login session.
#[utoipa::path(post, path = "/api/auth/refresh", tag = "auth", request_body = RefreshBody,
    responses((status = 200, body = TokensView), (status = 401, body = ErrorBody)))]
pub async fn refresh(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<RefreshBody>,
) -> ApiResult<Json<TokensView>> {
    if body.refresh_token.len() > 200 {
        return Err(ApiError::Unauthorized);
    }
    let new_token = random_token("prt_");
    match state.accounts.rotate_refresh_token(&hash_token(&body.refresh_token), &hash_token(&new_token)).await? {
        RefreshOutcome::Rotated(auth) => Ok(Json(tokens_view(&state, &auth.user, &auth.session.id, new_token)?)),
        RefreshOutcome::Reused => {
            tracing::warn!("a used refresh token was presented again; its login session is revoked");
            Err(ApiError::Unauthorized)
        }
        RefreshOutcome::Invalid => Err(ApiError::Unauthorized),
    }
}

/// End this login session: its access token, refresh token and cookie stop working.
#[utoipa::path(post, path = "/api/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 204), (status = 401, body = ErrorBody)))]
pub async fn logout(State(state): State<Arc<AppState>>, auth: AuthUser) -> ApiResult<Response> {
    state.accounts.revoke_session(&auth.session_id, &auth.user.id).await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    for name in [SESSION_COOKIE, CSRF_COOKIE] {
        let gone = Cookie::build((name, "")).path("/").max_age(time::Duration::ZERO).build();
        append_cookie(&mut response, &gone);
    }
    Ok(response)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    #[schema(format = Uuid)]
    pub id: String,
    pub created_at: String,
    pub last_used_at: String,
    pub user_agent: Option<String>,
    /// True for the session making this request.
    pub current: bool,
}

/// The caller's live login sessions.
#[utoipa::path(get, path = "/api/auth/sessions", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = Items<SessionView>), (status = 401, body = ErrorBody)))]
pub async fn list_sessions(State(state): State<Arc<AppState>>, auth: AuthUser) -> ApiResult<Json<Items<SessionView>>> {
    let sessions = state.store.list_live_sessions(&auth.user.id, state.clock.now_ms()).await?;
    let items = sessions
        .into_iter()
        .map(|s| SessionView {
            current: s.id == auth.session_id,
            id: s.id,
            created_at: rfc3339(s.created_at),
            last_used_at: rfc3339(s.last_used_at),
            user_agent: s.user_agent,
        })
        .collect();
    Ok(Json(Items { items }))
}

/// Revoke one of the caller's login sessions.
#[utoipa::path(delete, path = "/api/auth/sessions/{id}", tag = "auth", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path, description = "Login session id")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn revoke_session(State(state): State<Arc<AppState>>, auth: AuthUser, id: UuidPath) -> ApiResult<StatusCode> {
    if state.accounts.revoke_session(id.one(), &auth.user.id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound)
    }
}
