//! Credentials: argon2id password hashes (computed on the blocking pool, a
//! few at a time), access tokens (JWT naming a login session), opaque
//! refresh/cookie secrets stored only as SHA-256 hashes, and CSRF tokens.

use std::sync::Arc;

use argon2::{
    Argon2,
    password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString},
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::domain::user::Password;

/// Hashes and checks passwords without blocking the async workers. Argon2id
/// takes ~19 MiB and tens of milliseconds per call, so a semaphore bounds how
/// many run at once: a login flood queues instead of exhausting memory.
#[derive(Clone)]
pub struct PasswordHasher {
    permits: Arc<Semaphore>,
    /// Verified against when the account does not exist, so that unknown
    /// users and wrong passwords take the same time.
    dummy_hash: Arc<String>,
}

impl PasswordHasher {
    pub fn new() -> Self {
        // One per core: more would not finish sooner, only hold more memory.
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
        let salt = SaltString::encode_b64(b"palaver-dummy-salt").expect("static salt is valid");
        let dummy = Argon2::default()
            .hash_password(b"palaver dummy password", &salt)
            .expect("hashing a static password cannot fail")
            .to_string();
        Self { permits: Arc::new(Semaphore::new(parallel)), dummy_hash: Arc::new(dummy) }
    }

    pub async fn hash(&self, password: &Password) -> anyhow::Result<String> {
        let pw = password.expose().to_owned();
        self.run(move || {
            let mut salt = [0u8; 16];
            rand::rng().fill_bytes(&mut salt);
            let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
            Argon2::default()
                .hash_password(pw.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| anyhow::anyhow!("argon2: {e}"))
        })
        .await
    }

    /// True when `password` matches `hash`; with no hash, burns the same time
    /// and answers false.
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> anyhow::Result<bool> {
        let pw = password.to_owned();
        let (hash, real) = match hash {
            Some(h) => (h.to_owned(), true),
            None => ((*self.dummy_hash).clone(), false),
        };
        self.run(move || {
            let parsed = PasswordHash::new(&hash).map_err(|e| anyhow::anyhow!("stored hash: {e}"))?;
            // Verify first, whatever `real` says: `real && verify` would skip
            // the hash for unknown users and tell them apart by timing.
            let matches = Argon2::default().verify_password(pw.as_bytes(), &parsed).is_ok();
            Ok(real && matches)
        })
        .await
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let _permit = self.permits.acquire().await?;
        tokio::task::spawn_blocking(f).await?
    }
}

impl Default for PasswordHasher {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AccessClaims {
    pub sub: String,
    /// The login session this token belongs to.
    pub sid: String,
    pub iat: i64,
    pub exp: i64,
    pub typ: String,
}

/// Signs and checks access tokens and derives CSRF tokens, from one secret.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    secret: Arc<Vec<u8>>,
}

impl TokenKeys {
    pub fn new(secret: &str) -> Self {
        Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            secret: Arc::new(secret.as_bytes().to_vec()),
        }
    }

    /// An access token for the session, valid `ttl_secs` from `now_ms`.
    pub fn issue_access(&self, user_id: &str, session_id: &str, now_ms: i64, ttl_secs: i64) -> anyhow::Result<String> {
        let iat = now_ms / 1000;
        let claims = AccessClaims {
            sub: user_id.to_owned(),
            sid: session_id.to_owned(),
            iat,
            exp: iat + ttl_secs,
            typ: "access".into(),
        };
        Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?)
    }

    /// The claims of a well-signed, unexpired access token. Expiry is checked
    /// against the injected clock, not the library's own.
    pub fn decode_access(&self, token: &str, now_ms: i64) -> Option<AccessClaims> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &validation).ok()?.claims;
        (claims.typ == "access" && claims.exp * 1000 > now_ms).then_some(claims)
    }

    /// The CSRF token of a login session: only someone who can read our
    /// responses (not a cross-site form) can know it.
    pub fn csrf_token(&self, session_id: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(b"csrf:");
        mac.update(session_id.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    pub fn csrf_matches(&self, session_id: &str, presented: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.csrf_token(session_id).as_bytes().ct_eq(presented.as_bytes()).into()
    }
}

/// A fresh opaque secret with a readable prefix (`prt_…`, `pcs_…`).
pub fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// What the database keeps of an opaque secret.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_unknown_users_fail() {
        let h = PasswordHasher::new();
        let pw = Password::parse("correct horse".into()).unwrap();
        let hash = h.hash(&pw).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(h.verify("correct horse", Some(&hash)).await.unwrap());
        assert!(!h.verify("wrong horse", Some(&hash)).await.unwrap());
        assert!(!h.verify("palaver dummy password", None).await.unwrap());
    }

    #[test]
    fn access_tokens_expire_by_the_given_clock() {
        let keys = TokenKeys::new("k".repeat(40).as_str());
        let t = keys.issue_access("u1", "s1", 1_000_000, 60).unwrap();
        let c = keys.decode_access(&t, 1_000_000).unwrap();
        assert_eq!((c.sub.as_str(), c.sid.as_str()), ("u1", "s1"));
        assert!(keys.decode_access(&t, 1_000_000 + 61_000).is_none());
        assert!(TokenKeys::new(&"x".repeat(40)).decode_access(&t, 1_000_000).is_none());
    }

    #[test]
    fn csrf_tokens_are_per_session() {
        let keys = TokenKeys::new("secret-secret-secret-secret-secret");
        let a = keys.csrf_token("s1");
        assert!(keys.csrf_matches("s1", &a));
        assert!(!keys.csrf_matches("s2", &a));
        assert_ne!(random_token("prt_"), random_token("prt_"));
        assert_eq!(hash_token("x").len(), 64);
    }
}
