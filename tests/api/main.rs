//! End-to-end API tests: each test spawns the real server on port 0 with a
//! fresh database (SQLite, and PostgreSQL when reachable), the mock LLM
//! provider and a manual clock, then talks to it over HTTP.
//!
//! Run: `cargo test --test api` (PostgreSQL from `PALAVER_TEST_POSTGRES_URL`,
//! default `postgres://postgres@127.0.0.1:5432/test`; with `CI=true` an
//! unreachable PostgreSQL fails the postgres tests instead of skipping them).

mod client;
mod harness;
mod helpers;
#[path = "../common/mock_llm.rs"]
mod mock_llm;
mod sockets;

mod admin;
mod auth;
mod budgets;
mod chat;
mod cluster;
mod cluster_order;
mod connections;
mod conversations;
mod crash;
mod export;
mod gateway;
mod idempotency;
mod ids;
mod login_protection;
mod memory;
mod metrics;
mod ops;
mod outage;
mod refresh_races;
mod retention;
mod robustness;
mod sdk;
mod search;
mod security;
mod streaming;
mod support;
mod support_ws;
mod takeover;
mod users;
pub mod websocket;
