//! Accounts below HTTP: creating users (registration and the CLI's
//! `palaver admin create` alike), with taken emails and usernames answered
//! as conflicts; and API keys (`pk_…`): created, listed, revoked, and
//! checked on every request that presents one (from memory when nothing
//! can have changed them unseen: `key_cache`). Changes to users and keys
//! are announced to the other instances before they are answered.

pub mod key_cache;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::{
    auth::{PasswordHasher, hash_token, random_token},
    clock::Clock,
    domain::user::{DisplayName, Email, Password, Role, Username},
    error::{Error, Result},
    ids::Ids,
    store::{
        ApiKeyRecord, LoginSessionRecord, NewApiKey, NewUser, RefreshOutcome, SessionAuth, Store, StoreError,
        TokenBudget, UserRecord,
    },
};
use key_cache::KeyCache;

/// What account management needs: storage, time, ids and the password hasher.
#[derive(Clone)]
pub struct Accounts {
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub ids: Arc<dyn Ids>,
    pub hasher: PasswordHasher,
    /// When each key was last used, not yet written (see `flush_key_uses`).
    pub key_uses: Arc<Mutex<HashMap<String, i64>>>,
    pub key_cache: Arc<KeyCache>,
}

/// A new key: its record and the secret, which is shown this once.
pub struct CreatedKey {
    pub record: ApiKeyRecord,
    pub key: String,
}

/// The first characters of a key kept to tell keys apart in lists.
const SHOWN_PREFIX_CHARS: usize = 10;

impl Accounts {
    /// Stores a new account; a taken email or username is a `Conflict`.
    pub async fn insert_user(
        &self,
        email: Option<&Email>,
        username: Option<&Username>,
        display_name: Option<DisplayName>,
        password_hash: &str,
        role: Role,
    ) -> Result<UserRecord> {
        let id = self.ids.random();
        let display_name = display_name.map(DisplayName::into_inner);
        let now = self.clock.now_ms();
        let new = NewUser {
            id: &id,
            email: email.map(Email::as_str),
            username: username.map(Username::as_str),
            display_name: display_name.as_deref(),
            password_hash,
            role,
            now,
        };
        match self.store.insert_user(new).await {
            Ok(()) => {}
            Err(StoreError::Conflict("email")) => {
                return Err(Error::conflict("email_taken", "An account with this email already exists."));
            }
            Err(StoreError::Conflict(_)) => {
                return Err(Error::conflict("username_taken", "This username is taken."));
            }
            Err(e) => return Err(e.into()),
        }
        self.store.user_by_id(&id).await?.ok_or_else(|| anyhow::anyhow!("user vanished after insert").into())
    }

    /// `palaver admin create`: a new account with the admin role, validated like
    /// a registration. Errors are sentences for the terminal.
    pub async fn create_admin(
        &self,
        email: &str,
        username: Option<&str>,
        password: String,
    ) -> anyhow::Result<UserRecord> {
        let email = Email::parse(email).map_err(|e| anyhow::anyhow!("email {e}"))?;
        let username = username.map(Username::parse).transpose().map_err(|e| anyhow::anyhow!("username {e}"))?;
        let password = Password::parse(password).map_err(|e| anyhow::anyhow!("password {e}"))?;
        let hash = self.hasher.hash(&password).await?;
        self.insert_user(Some(&email), username.as_ref(), None, &hash, Role::Admin).await.map_err(|e| match e {
            Error::Conflict { detail, .. } => anyhow::anyhow!(detail),
            other => anyhow::anyhow!(other),
        })
    }

    /// A new API key for the user; the secret is returned once and only its
    /// hash is stored.
    pub async fn create_key(
        &self,
        user_id: &str,
        name: &str,
        expires_at: Option<i64>,
        models: Option<&[String]>,
    ) -> Result<CreatedKey> {
        let key = random_token("pk_");
        let prefix: String = key.chars().take(SHOWN_PREFIX_CHARS).collect();
        let record = self
            .store
            .insert_api_key(NewApiKey {
                id: &self.ids.random(),
                user_id,
                name,
                prefix: &prefix,
                key_hash: &hash_token(&key),
                models,
                expires_at,
                now: self.clock.now_ms(),
            })
            .await?;
        Ok(CreatedKey { record, key })
    }

    /// The user's keys, with the last use not yet written taken into account.
    pub async fn keys(&self, user_id: &str) -> Result<Vec<ApiKeyRecord>> {
        let mut keys = self.store.list_api_keys(user_id).await?;
        let uses = self.key_uses.lock().expect("key uses lock poisoned");
        for k in &mut keys {
            if let Some(&at) = uses.get(&k.id) {
                k.last_used_at = Some(k.last_used_at.map_or(at, |stored| stored.max(at)));
            }
        }
        Ok(keys)
    }

    /// Revokes one of the user's keys (404 when it is not theirs).
    pub async fn revoke_key(&self, user_id: &str, id: &str) -> Result<()> {
        let deleted = self.store.delete_api_key(user_id, id).await?;
        self.key_cache.announce().await;
        if deleted { Ok(()) } else { Err(Error::NotFound) }
    }

    /// Sets (or with `None` removes) a user's token budget.
    pub async fn set_user_budget(&self, user_id: &str, budget: Option<TokenBudget>) -> Result<UserRecord> {
        if !self.store.set_user_budget(user_id, budget, self.clock.now_ms()).await? {
            return Err(Error::NotFound);
        }
        self.key_cache.announce().await;
        self.store.user_by_id(user_id).await?.ok_or(Error::NotFound)
    }

    /// A key its owner or an admin may change (404 for anyone else).
    pub async fn key_for(&self, caller: &UserRecord, id: &str) -> Result<ApiKeyRecord> {
        match self.store.api_key(id).await? {
            Some(k) if k.user_id == caller.id || caller.role == Role::Admin => Ok(k),
            _ => Err(Error::NotFound),
        }
    }

    /// Sets a key's budget and requests per minute.
    pub async fn set_key_limits(
        &self,
        key: &ApiKeyRecord,
        budget: Option<TokenBudget>,
        rpm: Option<i64>,
    ) -> Result<ApiKeyRecord> {
        self.store.set_key_limits(&key.id, budget, rpm).await?;
        self.key_cache.announce().await;
        self.store.api_key(&key.id).await?.ok_or(Error::NotFound)
    }

    /// Sets (or clears) the user's display name.
    pub async fn set_display_name(&self, user_id: &str, name: Option<&str>) -> Result<()> {
        self.store.set_display_name(user_id, name, self.clock.now_ms()).await?;
        self.key_cache.announce().await;
        Ok(())
    }

    /// Sets (or clears) the user's own retention, in days.
    pub async fn set_retention_days(&self, user_id: &str, days: Option<i64>) -> Result<()> {
        self.store.set_retention_days(user_id, days, self.clock.now_ms()).await?;
        self.key_cache.announce().await;
        Ok(())
    }

    /// Stores a new password hash and ends the user's other login sessions
    /// (all of them when `keep_session` is empty, as for an API key).
    pub async fn set_password_hash(&self, user_id: &str, hash: &str, keep_session: &str) -> Result<()> {
        let now = self.clock.now_ms();
        self.store.set_password_hash(user_id, hash, now).await?;
        self.store.revoke_other_sessions(user_id, keep_session, now).await?;
        self.key_cache.announce().await;
        Ok(())
    }

    /// An admin's change of a user's role or disabled state; `None` when
    /// there is no such user.
    pub async fn update_user_admin(
        &self,
        user_id: &str,
        role: Option<Role>,
        disabled: Option<bool>,
    ) -> Result<Option<UserRecord>> {
        let user = self.store.update_user_admin(user_id, role, disabled, self.clock.now_ms()).await?;
        self.key_cache.announce().await;
        Ok(user)
    }

    /// Deletes the account with everything in it; false when there was none.
    pub async fn delete_user(&self, user_id: &str) -> Result<bool> {
        let deleted = self.store.delete_user(user_id).await?;
        self.key_cache.announce().await;
        Ok(deleted)
    }

    /// The key and its owner, when the key exists, has not expired and its
    /// owner may log in. Read from the database, or from memory when no
    /// write to users or keys can have gone unseen since (`key_cache`), so
    /// a revoked key, a deleted or a disabled owner is refused at once
    /// everywhere.
    pub async fn authenticate_key(&self, key: &str) -> Result<Option<(ApiKeyRecord, UserRecord)>> {
        if !key.starts_with("pk_") || key.len() > 200 {
            return Ok(None);
        }
        let now = self.clock.now_ms();
        let hash = hash_token(key);
        let (record, user) = match self.key_cache.get(&self.store, &hash) {
            Some(found) => found,
            None => {
                let epoch = self.store.accounts_epoch();
                let Some((record, user)) = self.store.api_key_by_hash(&hash).await? else { return Ok(None) };
                self.key_cache.put(&hash, epoch, &record, &user);
                (record, user)
            }
        };
        if record.is_expired(now) || user.is_disabled() {
            return Ok(None);
        }
        self.key_uses.lock().expect("key uses lock poisoned").insert(record.id.clone(), now);
        Ok(Some((record, user)))
    }

    /// The login session with this id and its user (live or not: the caller
    /// checks), from memory when no write to users, keys or sessions can
    /// have gone unseen since (`key_cache`), so a revoked session is refused
    /// at once everywhere.
    pub async fn session_auth(&self, session_id: &str) -> Result<Option<SessionAuth>> {
        if let Some(auth) = self.key_cache.session(&self.store, session_id) {
            return Ok(Some(auth));
        }
        let epoch = self.store.accounts_epoch();
        let Some(auth) = self.store.session_auth_by_id(session_id).await? else { return Ok(None) };
        self.key_cache.put_session(epoch, &auth);
        Ok(Some(auth))
    }

    /// Records the use of a session, at most once a minute.
    pub async fn touch_session(&self, session: &LoginSessionRecord, now: i64) -> Result<()> {
        if self.store.touch_session(session, now).await? {
            self.key_cache.session_touched(&session.id, now);
        }
        Ok(())
    }

    /// Revokes one live session of the user (false: no such session), on
    /// every instance before it answers.
    pub async fn revoke_session(&self, session_id: &str, user_id: &str) -> Result<bool> {
        let revoked = self.store.revoke_session(session_id, user_id, self.clock.now_ms()).await?;
        self.key_cache.announce().await;
        Ok(revoked)
    }

    /// Uses up a refresh token for its successor; a reused one revokes its
    /// session, on every instance before it answers.
    pub async fn rotate_refresh_token(&self, old_hash: &str, new_hash: &str) -> Result<RefreshOutcome> {
        let outcome = self.store.rotate_refresh_token(old_hash, new_hash, self.clock.now_ms()).await?;
        if matches!(outcome, RefreshOutcome::Reused) {
            self.key_cache.announce().await;
        }
        Ok(outcome)
    }

    /// Writes the last-use times gathered since the previous flush; on
    /// failure they are kept for the next one.
    pub async fn flush_key_uses(&self) {
        let batch: Vec<(String, i64)> =
            std::mem::take(&mut *self.key_uses.lock().expect("key uses lock poisoned")).into_iter().collect();
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.store.touch_api_keys(&batch).await {
            tracing::warn!(error = e.to_string().as_str(), "could not store when API keys were last used");
            let mut uses = self.key_uses.lock().expect("key uses lock poisoned");
            for (id, at) in batch {
                let entry = uses.entry(id).or_insert(at);
                *entry = (*entry).max(at);
            }
        }
    }
}
