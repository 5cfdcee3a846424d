//! Accounts below HTTP: creating users (registration and the CLI's
//! `palaver admin create` alike), with taken emails and usernames answered
//! as conflicts.

use std::sync::Arc;

use crate::{
    auth::PasswordHasher,
    clock::Clock,
    domain::user::{DisplayName, Email, Password, Role, Username},
    error::{Error, Result},
    ids::Ids,
    store::{NewUser, Store, StoreError, UserRecord},
};

/// What account management needs: storage, time, ids and the password hasher.
#[derive(Clone)]
pub struct Accounts {
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub ids: Arc<dyn Ids>,
    pub hasher: PasswordHasher,
}

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
}
