//! API keys and login sessions remembered between requests, so that a
//! request with a key or an access token does not read the database: the
//! hot path of the gateway and of every `/api` call. Sessions only on a
//! single instance (see `remembers_sessions`).
//!
//! A remembered entry is used only while nothing can have changed it unseen.
//! Every write to users, keys or a session's revocation bumps the store's
//! accounts epoch, and an
//! entry read at an older epoch is not used. Other instances' writes reach
//! this one as an announcement on the Redis channel `<prefix>:accounts`,
//! which bumps the epoch here too; the writer announces before it answers,
//! so a revoked key is refused everywhere at once. While that subscription
//! is down nothing is remembered (every request reads the database), as on
//! PostgreSQL without Redis, where other instances could write unseen. A
//! SQLite file has one server, so there every write is seen.
//!
//! An entry also expires after `TTL`, a bound on staleness should an
//! announcement be lost with Redis up (a partition, say).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::{
    redis_link::RedisLink,
    store::{ApiKeyRecord, Engine, SessionAuth, Store, UserRecord},
};

/// The longest an entry is used without reading the database again.
const TTL: Duration = Duration::from_secs(10);
/// Entries kept at most; past that the cache starts over.
const CAPACITY: usize = 10_000;
/// The most an announcement may hold up the write that makes it.
const ANNOUNCE_WAIT: Duration = Duration::from_millis(500);

pub struct KeyCache {
    entries: Mutex<HashMap<String, Entry>>,
    /// Login sessions (with their user) by session id.
    sessions: Mutex<HashMap<String, SessionEntry>>,
    /// Whether every write to users and keys reaches this instance's epoch.
    sees_all_writes: AtomicBool,
    /// With Redis: where announcements are published.
    announcer: Option<Announcer>,
}

struct Entry {
    key: ApiKeyRecord,
    user: UserRecord,
    epoch: u64,
    read_at: Instant,
}

struct SessionEntry {
    auth: SessionAuth,
    epoch: u64,
    read_at: Instant,
}

struct Announcer {
    link: RedisLink,
    channel: String,
}

impl KeyCache {
    /// A cache that remembers nothing (for tests and tools).
    pub fn disabled() -> Self {
        Self {
            entries: Default::default(),
            sessions: Default::default(),
            sees_all_writes: AtomicBool::new(false),
            announcer: None,
        }
    }

    /// The cache for `store`. With Redis, it starts the task that listens
    /// for other instances' announcements (until `stop`) and remembers keys
    /// only while that task is subscribed.
    pub fn start(store: &Store, redis: Option<&redis::Client>, prefix: &str, stop: CancellationToken) -> Arc<Self> {
        let Some(client) = redis else {
            let alone = store.engine() == Engine::Sqlite;
            return Arc::new(Self { sees_all_writes: AtomicBool::new(alone), ..Self::disabled() });
        };
        let channel = format!("{prefix}:accounts");
        let cache = Arc::new(Self {
            announcer: Some(Announcer {
                link: RedisLink::new(client.clone(), ANNOUNCE_WAIT, "account changes"),
                channel: channel.clone(),
            }),
            ..Self::disabled()
        });
        let listener = Listener { cache: cache.clone(), store: store.clone() };
        tokio::spawn(crate::redis_link::follow(client.clone(), channel, "account changes", stop, listener));
        cache
    }

    /// The remembered key with this hash and its owner, if still good.
    pub fn get(&self, store: &Store, key_hash: &str) -> Option<(ApiKeyRecord, UserRecord)> {
        if !self.sees_all_writes.load(Ordering::SeqCst) {
            return None;
        }
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get(key_hash)?;
        let fresh = entry.epoch == store.accounts_epoch() && entry.read_at.elapsed() < TTL;
        fresh.then(|| (entry.key.clone(), entry.user.clone()))
    }

    /// Remembers a key read from the database at `epoch` (taken before the
    /// read began).
    pub fn put(&self, key_hash: &str, epoch: u64, key: &ApiKeyRecord, user: &UserRecord) {
        if !self.sees_all_writes.load(Ordering::SeqCst) {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CAPACITY {
            entries.clear();
        }
        let entry = Entry { key: key.clone(), user: user.clone(), epoch, read_at: Instant::now() };
        entries.insert(key_hash.to_owned(), entry);
    }

    /// Whether sessions are remembered: only where every write is seen the
    /// moment it is made (one instance alone on its SQLite file). Across
    /// instances an announcement reaches the others a moment after the
    /// writer answered, and a logout must hold on the very next request.
    fn remembers_sessions(&self) -> bool {
        self.announcer.is_none() && self.sees_all_writes.load(Ordering::SeqCst)
    }

    /// The remembered login session with this id and its user, if still good.
    pub fn session(&self, store: &Store, session_id: &str) -> Option<SessionAuth> {
        if !self.remembers_sessions() {
            return None;
        }
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let entry = sessions.get(session_id)?;
        let fresh = entry.epoch == store.accounts_epoch() && entry.read_at.elapsed() < TTL;
        fresh.then(|| entry.auth.clone())
    }

    /// Remembers a session read from the database at `epoch` (taken before
    /// the read began).
    pub fn put_session(&self, epoch: u64, auth: &SessionAuth) {
        if !self.remembers_sessions() {
            return;
        }
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if sessions.len() >= CAPACITY {
            sessions.clear();
        }
        let entry = SessionEntry { auth: auth.clone(), epoch, read_at: Instant::now() };
        sessions.insert(auth.session.id.clone(), entry);
    }

    /// The session's last use was written as `at`: the remembered copy
    /// follows, so the next requests do not write it again.
    pub fn session_touched(&self, session_id: &str, at: i64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = sessions.get_mut(session_id) {
            entry.auth.session.last_used_at = entry.auth.session.last_used_at.max(at);
        }
    }

    /// Tells the other instances that users or keys changed (after the
    /// write), waiting for Redis at most `ANNOUNCE_WAIT`. An announcement
    /// Redis does not take is tried again in the background for as long as
    /// an entry lives (`TTL`): an instance that misses it has lost its
    /// subscription too (and remembers nothing), or drops its entries by then.
    pub async fn announce(self: &Arc<Self>) {
        if self.announcer.is_none() || self.publish().await {
            return;
        }
        tracing::warn!("could not announce a change of users or API keys to the other instances; retrying");
        let cache = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            while started.elapsed() < TTL {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if cache.publish().await {
                    return;
                }
            }
        });
    }

    async fn publish(&self) -> bool {
        let Some(a) = &self.announcer else { return true };
        a.link.query::<()>(redis::pipe().cmd("PUBLISH").arg(&a.channel).arg("changed").ignore()).await.is_some()
    }
}

/// Follows the other instances' announcements: each one bumps the epoch.
/// Keys are remembered only while subscribed; on every (re)subscription
/// the epoch is bumped, as announcements may have been missed.
struct Listener {
    cache: Arc<KeyCache>,
    store: Store,
}

impl crate::redis_link::Follower for Listener {
    fn subscribed(&mut self, _first: bool) {
        self.store.accounts_changed();
        self.cache.sees_all_writes.store(true, Ordering::SeqCst);
    }

    fn message(&mut self, _payload: &str) {
        self.store.accounts_changed();
    }

    fn lost(&mut self) {
        self.cache.sees_all_writes.store(false, Ordering::SeqCst);
        tracing::warn!("reading API keys from the database until Redis is back");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{domain::user::Role, store::NewApiKey, store::NewUser};

    async fn store_with_a_key() -> (tempfile::TempDir, Store, String) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&format!("sqlite://{}/t.db", dir.path().display())).await.unwrap();
        store.migrate().await.unwrap();
        let user = NewUser {
            id: "u1",
            email: Some("a@example.com"),
            username: None,
            display_name: None,
            password_hash: "x",
            role: Role::User,
            now: 1,
        };
        store.insert_user(user).await.unwrap();
        let key = NewApiKey {
            id: "k1",
            user_id: "u1",
            name: "k",
            prefix: "pk_abc",
            key_hash: "hash-1",
            models: None,
            expires_at: None,
            now: 1,
        };
        store.insert_api_key(key).await.unwrap();
        (dir, store, "hash-1".to_owned())
    }

    #[tokio::test]
    async fn an_entry_is_used_until_users_or_keys_change() {
        let (_dir, store, hash) = store_with_a_key().await;
        let cache = KeyCache::start(&store, None, "t", CancellationToken::new());
        assert!(cache.get(&store, &hash).is_none());
        let epoch = store.accounts_epoch();
        let (key, user) = store.api_key_by_hash(&hash).await.unwrap().unwrap();
        cache.put(&hash, epoch, &key, &user);
        assert_eq!(cache.get(&store, &hash).map(|(k, _)| k.id), Some("k1".to_owned()));

        store.set_display_name("u1", Some("Ann"), 2).await.unwrap();
        assert!(cache.get(&store, &hash).is_none(), "a change of the owner drops the entry");

        // Read before a write and stored after it: not used.
        let before = store.accounts_epoch();
        store.delete_api_key("u1", "k1").await.unwrap();
        cache.put(&hash, before, &key, &user);
        assert!(cache.get(&store, &hash).is_none());
    }

    #[tokio::test]
    async fn nothing_is_remembered_where_writes_can_go_unseen() {
        let (_dir, store, hash) = store_with_a_key().await;
        let cache = KeyCache::disabled();
        let (key, user) = store.api_key_by_hash(&hash).await.unwrap().unwrap();
        cache.put(&hash, store.accounts_epoch(), &key, &user);
        assert!(cache.get(&store, &hash).is_none());
    }

    #[tokio::test]
    async fn a_session_is_remembered_until_it_is_revoked() {
        let (_dir, store, _) = store_with_a_key().await;
        let session = crate::store::NewLoginSession {
            id: "s1",
            user_id: "u1",
            cookie_hash: "c1",
            user_agent: None,
            refresh_hash: "r1",
            now: 1,
            expires_at: i64::MAX,
        };
        store.create_login_session(session).await.unwrap();
        let cache = KeyCache::start(&store, None, "t", CancellationToken::new());
        let epoch = store.accounts_epoch();
        let auth = store.session_auth_by_id("s1").await.unwrap().unwrap();
        cache.put_session(epoch, &auth);
        assert_eq!(cache.session(&store, "s1").map(|a| a.user.id), Some("u1".to_owned()));
        cache.session_touched("s1", 90_000);
        assert_eq!(cache.session(&store, "s1").unwrap().session.last_used_at, 90_000);

        assert!(store.revoke_session("s1", "u1", 2).await.unwrap());
        assert!(cache.session(&store, "s1").is_none(), "a revocation drops the entry");
        let revoked = store.session_auth_by_id("s1").await.unwrap().unwrap();
        assert!(!revoked.is_valid(3));
    }
}
