//! Palaver: a self-hostable AI chatbot backend in one binary.
//!
//! Layers are folders: `http` (routes, extractors, error mapping), `domain`
//! (types and rules, no HTTP or SQL), `store` (all SQL, SQLite and Postgres),
//! `providers` (one file per LLM wire format). `startup` wires them together.

pub mod accounts;
pub mod auth;
pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
pub mod http;
pub mod providers;
pub mod realtime;
pub mod startup;
pub mod state;
pub mod store;
pub mod telemetry;
