//! What the services below HTTP (replies, the support desk) can answer:
//! kinds with stable codes and no HTTP in them. `http/error.rs` turns each
//! kind into a status and `{"detail", "code"}` in one `From` impl.

use crate::{domain::FieldError, store::StoreError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not found")]
    NotFound,
    /// Missing or invalid credentials (a support visitor's token, say).
    #[error("authentication required")]
    Unauthorized,
    #[error("{detail}")]
    Forbidden { code: &'static str, detail: String },
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String },
    #[error("validation failed")]
    Invalid { code: &'static str, errors: Vec<FieldError> },
    /// A limit was reached; the client may retry after this many seconds.
    #[error("{detail}")]
    RateLimited { code: &'static str, detail: String, retry_after_secs: u64 },
    /// A rate limit or token budget refused the request.
    #[error(transparent)]
    Limits(#[from] crate::quota::QuotaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl Error {
    pub fn forbidden(code: &'static str, detail: impl Into<String>) -> Self {
        Error::Forbidden { code, detail: detail.into() }
    }

    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Error::Conflict { code, detail: detail.into() }
    }

    /// A limit that frees up in `wait_ms`: `Retry-After` in whole seconds,
    /// at least one. Every limit answers through this.
    pub fn rate_limited(code: &'static str, detail: impl Into<String>, wait_ms: i64) -> Self {
        let retry_after_secs = (wait_ms.max(0) as u64).div_ceil(1000).max(1);
        Error::RateLimited { code, detail: detail.into(), retry_after_secs }
    }

    /// One bad field, with its own code.
    pub fn invalid_field(code: &'static str, field: &str, message: impl Into<String>) -> Self {
        Error::Invalid { code, errors: vec![FieldError::new(field, message)] }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
