//! Memory (issue #8): Argon2 takes ~19 MiB per hash; after a burst of
//! logins the server's resident memory must come back down (bounded
//! hashing, an allocator that returns freed memory), measured on the real
//! binary.

use std::time::Duration;

use crate::helpers::{Db, spawn_process_app};

/// The idle resident memory allowed after the logins (the 60 MB).
const IDLE_RSS_LIMIT_KIB: u64 = 60 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn resident_memory_returns_after_a_hundred_logins() {
    let Some(app) = spawn_process_app(Db::Sqlite).await else { return };
    let user = app.signup().await;
    let started = app.server_rss_kib();
    let mut peak = started;
    // A few at a time, as a small crowd logging in would.
    for _ in 0..25 {
        let logins = (0..4).map(|_| app.login_as(&user));
        futures::future::join_all(logins).await;
        peak = peak.max(app.server_rss_kib());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = app.server_rss_kib();
    eprintln!("server RSS: {started} KiB at start, {peak} KiB at the highest, {idle} KiB idle after 100 logins");
    assert!(idle <= IDLE_RSS_LIMIT_KIB, "idle RSS after 100 logins is {idle} KiB (limit {IDLE_RSS_LIMIT_KIB} KiB)");
}
