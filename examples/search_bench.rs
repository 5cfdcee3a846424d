//! Search benchmark (issue 12): seeds N messages across 1,000 users (10
//! conversations each; users and conversations through the store, messages
//! in bulk SQL so the index triggers and the GIN index do their normal work)
//! plus one heavy user with 20,000 messages, then times
//! `Store::search_messages` (the first page of 20, as `/api/search` asks it)
//! for a common term (in every message) and a rare one (1 in 10,000) for
//! 200 random users, and for the heavy user, printing p50/p99.
//!
//! Usage: search_bench <sqlite|postgres> <N>[,<N>…]   (postgres reads
//! PALAVER_BENCH_POSTGRES_URL, default the local `test` database, and works
//! in a fresh schema it drops afterwards). Run through bench/search_bench.sh.

use std::time::{Duration, Instant};

use palaver::{
    domain::{search::SearchTerm, user::Role},
    store::{ConversationRecord, Engine, NewUser, SearchScope, Store},
};
use sqlx::Connection;

const USERS: usize = 1_000;
const CONVERSATIONS_PER_USER: usize = 10;
const HEAVY_MESSAGES: i64 = 20_000;
const SAMPLES: usize = 200;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let engine = args.get(1).map(String::as_str).unwrap_or("sqlite");
    let sizes: Vec<i64> =
        args.get(2).map(String::as_str).unwrap_or("10000,1000000").split(',').map(|n| n.parse().unwrap()).collect();
    println!("| engine | messages | term | who | p50 ms | p99 ms | hits (total) |");
    println!("|---|---:|---|---|---:|---:|---:|");
    for n in sizes {
        run(engine, n).await?;
    }
    Ok(())
}

async fn run(engine: &str, n: i64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (url, schema) = match engine {
        "sqlite" => (format!("sqlite://{}", dir.path().join("bench.db").display()), None),
        _ => {
            let base = std::env::var("PALAVER_BENCH_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
            sqlx::any::install_default_drivers();
            let schema = format!("search_bench_{}", std::process::id());
            let mut conn = sqlx::AnyConnection::connect(&base).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&mut conn).await?;
            (format!("{base}?options=-c%20search_path%3D{schema}"), Some((base, schema)))
        }
    };
    let store = Store::connect(&url).await?;
    store.migrate().await?;
    let started = Instant::now();
    let mut users = Vec::new();
    for u in 0..=USERS {
        let id = if u == USERS { "bench-heavy".to_owned() } else { format!("bench-user-{u}") };
        let email = format!("u{u}@example.com");
        store
            .insert_user(NewUser {
                id: &id,
                email: Some(&email),
                username: None,
                display_name: None,
                password_hash: "!",
                role: Role::User,
                now: 0,
            })
            .await?;
        let conversations = if u == USERS { 1 } else { CONVERSATIONS_PER_USER };
        for c in 0..conversations {
            let record = ConversationRecord {
                id: format!("{id}-{c}"),
                user_id: id.clone(),
                title: Some(format!("conversation {c}")),
                system_prompt: None,
                model: None,
                message_count: 0,
                last_message_at: None,
                created_at: 0,
                updated_at: 0,
            };
            store.insert_conversation(&record).await?;
        }
        users.push(id);
    }
    let heavy = users.pop().unwrap();
    let mut conn = sqlx::AnyConnection::connect(&url).await?;
    let spread = (USERS * CONVERSATIONS_PER_USER) as i64;
    let (generate, random) = match store.engine() {
        Engine::Sqlite => {
            ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $1)", "hex(randomblob(8))")
        }
        Engine::Postgres => ("WITH n(i) AS (SELECT generate_series(1, CAST($1 AS BIGINT)))", "md5(CAST(i AS TEXT))"),
    };
    // Message i goes to conversation i mod 10 of user (i mod 10,000) / 10.
    let insert = |prefix: &str, conversation: &str| {
        format!(
            "{generate} INSERT INTO messages (id, conversation_id, role, content, status, usage_estimated, \
             created_at, updated_at, seq) SELECT '{prefix}' || CAST(i AS TEXT), {conversation}, \
             'user', 'message ' || CAST(i AS TEXT) || ' about the weather ' || {random} || \
             CASE WHEN i % 10000 = 0 THEN ' zebracorn' ELSE '' END, 'complete', 0, i, i, i FROM n"
        )
    };
    let spread = format!(
        "'bench-user-' || CAST((i % {spread}) / {CONVERSATIONS_PER_USER} AS TEXT) || '-' || CAST(i % {CONVERSATIONS_PER_USER} AS TEXT)"
    );
    sqlx::query(sqlx::AssertSqlSafe(insert("m-", &spread))).bind(n).execute(&mut conn).await?;
    let heavy_conversation = format!("'{heavy}-0'");
    sqlx::query(sqlx::AssertSqlSafe(insert("h-", &heavy_conversation))).bind(HEAVY_MESSAGES).execute(&mut conn).await?;
    sqlx::query(
        "UPDATE conversations SET message_count = (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = conversations.id)",
    )
    .execute(&mut conn)
    .await?;
    sqlx::query("ANALYZE").execute(&mut conn).await?;
    let seeded = started.elapsed();
    eprintln!("{engine} {n}: seeded in {:.1} s", seeded.as_secs_f64());

    for word in ["weather", "zebracorn"] {
        let term = SearchTerm::parse(word).map_err(anyhow::Error::msg)?;
        let mut times = Vec::new();
        let mut hits = 0;
        for s in 0..SAMPLES {
            let user = &users[(s * 7919) % users.len()];
            let at = Instant::now();
            let (page, total) = store.search_messages(SearchScope::Owner(user), &term, 20, 0).await?;
            times.push(at.elapsed());
            hits += total.max(page.len() as i64);
        }
        print_row(engine, n, word, "200 users", &mut times, hits);
        let mut times = Vec::new();
        let mut hits = 0;
        for _ in 0..50 {
            let at = Instant::now();
            let (_, total) = store.search_messages(SearchScope::Owner(&heavy), &term, 20, 0).await?;
            times.push(at.elapsed());
            hits = total;
        }
        print_row(engine, n, word, "heavy user (20k messages)", &mut times, hits);
    }
    store.close().await;
    if let Some((base, schema)) = schema {
        let mut conn = sqlx::AnyConnection::connect(&base).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&mut conn).await?;
    }
    Ok(())
}

fn print_row(engine: &str, n: i64, term: &str, who: &str, times: &mut [Duration], hits: i64) {
    times.sort();
    let at = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0;
    println!("| {engine} | {n} | {term} | {who} | {:.2} | {:.2} | {hits} |", at(0.5), at(0.99));
}
