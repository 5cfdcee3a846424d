//! The one error type of the HTTP layer and its mapping to
//! `{"detail", "code"}` answers. Internal errors are logged with the request
//! and never shown to the client.

use axum::{
    Json,
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

use crate::{
    domain::FieldError,
    quota::{LimitState, QuotaError, reset_text},
    store::StoreError,
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("authentication required")]
    Unauthorized,
    /// Login failed: the same answer for an unknown user and a wrong password.
    #[error("invalid credentials")]
    BadCredentials,
    #[error("{detail}")]
    Forbidden { code: &'static str, detail: String },
    #[error("not found")]
    NotFound,
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String },
    #[error("validation failed")]
    Validation { code: &'static str, errors: Vec<FieldError> },
    #[error("{detail}")]
    BadRequest { code: &'static str, detail: String },
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("unsupported content type")]
    UnsupportedMediaType,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Rate limited; the client may retry after this many seconds.
    #[error("{detail}")]
    TooManyRequests { code: &'static str, detail: String, retry_after_secs: u64 },
    /// A rate limit (`rate_limited`) or token budget (`budget_exceeded`)
    /// refused the request; `limits` becomes the `x-ratelimit-*` headers.
    #[error("{detail}")]
    Limited { code: &'static str, detail: String, retry_after_secs: u64, limits: LimitState },
    /// A budgeted request while the limits cannot be checked (fail closed).
    #[error("limits unavailable")]
    LimitsUnavailable,
    /// The reply failed (provider error, timeout, interruption); `extra`
    /// carries fields such as `user_message`.
    #[error("{detail}")]
    ReplyFailed { code: String, detail: String, extra: Map<String, Value> },
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn forbidden(code: &'static str, detail: impl Into<String>) -> Self {
        ApiError::Forbidden { code, detail: detail.into() }
    }

    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        ApiError::Conflict { code, detail: detail.into() }
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        ApiError::BadRequest { code, detail: detail.into() }
    }

    pub fn invalid(errors: Vec<FieldError>) -> Self {
        ApiError::Validation { code: "validation_error", errors }
    }

    /// One bad field, with its own code.
    pub fn invalid_field(code: &'static str, field: &str, message: impl Into<String>) -> Self {
        ApiError::Validation { code, errors: vec![FieldError::new(field, message)] }
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized | ApiError::BadCredentials => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooManyRequests { .. } | ApiError::Limited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::LimitsUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::ReplyFailed { code, .. } if code == "provider_timeout" => StatusCode::GATEWAY_TIMEOUT,
            ApiError::ReplyFailed { .. } => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::BadCredentials => "invalid_credentials",
            ApiError::Forbidden { code, .. }
            | ApiError::Conflict { code, .. }
            | ApiError::BadRequest { code, .. }
            | ApiError::Validation { code, .. }
            | ApiError::TooManyRequests { code, .. }
            | ApiError::Limited { code, .. } => code,
            ApiError::LimitsUnavailable => "limits_unavailable",
            ApiError::NotFound => "not_found",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::ReplyFailed { code, .. } => code,
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal_error",
        }
    }

    pub fn detail(&self) -> String {
        match self {
            ApiError::Unauthorized => "Missing, invalid, expired or revoked credentials.".into(),
            ApiError::BadCredentials => "Wrong login or password.".into(),
            ApiError::NotFound => "Not found.".into(),
            ApiError::Validation { errors, .. } => match errors.as_slice() {
                [one] => format!("Invalid {}: {}.", one.field, one.message),
                _ => "The request has invalid fields.".into(),
            },
            ApiError::PayloadTooLarge => "The request body is larger than the limit of 1 MiB.".into(),
            ApiError::UnsupportedMediaType => "Send the body as application/json.".into(),
            ApiError::MethodNotAllowed => "This method is not allowed on this path.".into(),
            ApiError::ReplyFailed { detail, .. } => detail.clone(),
            ApiError::Unavailable(_) => "The service is temporarily unavailable; try again.".into(),
            ApiError::LimitsUnavailable => {
                "The usage limits cannot be checked right now, so budgeted requests are refused; try again shortly."
                    .into()
            }
            ApiError::Internal(_) => "Something went wrong on our side.".into(),
            other => other.to_string(),
        }
    }
}

/// The one mapping of the services' answers onto HTTP.
impl From<crate::error::Error> for ApiError {
    fn from(e: crate::error::Error) -> Self {
        use crate::error::Error;
        match e {
            Error::NotFound => ApiError::NotFound,
            Error::Unauthorized => ApiError::Unauthorized,
            Error::Forbidden { code, detail } => ApiError::Forbidden { code, detail },
            Error::Conflict { code, detail } => ApiError::Conflict { code, detail },
            Error::Invalid { code, errors } => ApiError::Validation { code, errors },
            Error::RateLimited { code, detail, retry_after_secs } => {
                ApiError::TooManyRequests { code, detail, retry_after_secs }
            }
            Error::Limits(e) => e.into(),
            Error::Store(e) => e.into(),
            Error::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<QuotaError> for ApiError {
    fn from(e: QuotaError) -> Self {
        let detail = e.to_string();
        let secs = |ms: i64| (ms.max(0) as u64).div_ceil(1000).max(1);
        match e {
            QuotaError::RateLimited { state, wait_ms } => {
                ApiError::Limited { code: "rate_limited", detail, retry_after_secs: secs(wait_ms), limits: state }
            }
            QuotaError::BudgetExceeded { state, wait_ms, .. } => {
                ApiError::Limited { code: "budget_exceeded", detail, retry_after_secs: secs(wait_ms), limits: state }
            }
            QuotaError::Unavailable => ApiError::LimitsUnavailable,
            QuotaError::Store(e) => e.into(),
        }
    }
}

/// An answer with the caller's `x-ratelimit-*` headers.
pub fn with_limits(mut response: Response, limits: &LimitState) -> Response {
    limit_headers(response.headers_mut(), limits);
    response
}

/// OpenAI's `x-ratelimit-*` headers for `state`: `-requests` for the rate,
/// `-tokens` for the budget, each the tightest that applies.
pub fn limit_headers(headers: &mut HeaderMap, state: &LimitState) {
    for (kind, window) in [("requests", state.requests), ("tokens", state.tokens)] {
        let Some(w) = window else { continue };
        let values =
            [("limit", w.limit.to_string()), ("remaining", w.remaining.to_string()), ("reset", reset_text(w.reset_ms))];
        for (what, value) in values {
            if let (Ok(name), Ok(value)) =
                (HeaderName::try_from(format!("x-ratelimit-{what}-{kind}")), HeaderValue::from_str(&value))
            {
                headers.insert(name, value);
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(msg) => ApiError::Unavailable(msg),
            other => ApiError::Internal(anyhow::Error::new(other)),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        match &self {
            ApiError::Internal(e) => tracing::error!(error = ?e, "internal error"),
            ApiError::Unavailable(e) => tracing::warn!(error = e.as_str(), "unavailable"),
            ApiError::ReplyFailed { detail, .. } => tracing::warn!(error = detail.as_str(), "reply failed"),
            _ => {}
        }
        let mut body = json!({ "detail": self.detail(), "code": self.code() });
        if let ApiError::Validation { errors, .. } = &self {
            body["errors"] = json!(errors);
        }
        if let ApiError::ReplyFailed { extra, .. } = &self {
            for (k, v) in extra {
                body[k] = v.clone();
            }
        }
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ApiError::TooManyRequests { retry_after_secs, .. } | ApiError::Limited { retry_after_secs, .. } = &self
            && let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if let ApiError::Limited { limits, .. } = &self {
            limit_headers(response.headers_mut(), limits);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
