//! Palaver: a self-hostable AI chatbot backend in one binary.
//!
//! Layers are folders: `http` (routes, extractors, error mapping, framing)
//! on top of the services `chat` (the reply engine), `desk` (the support
//! desk and its bus), `accounts` and `limits`, which answer `error::Error`;
//! below them `domain` (types and rules, no HTTP or SQL), `store` (all SQL,
//! SQLite and Postgres) and `providers` (one file per LLM wire format).
//! `state` is what they share; `startup` wires them together.

pub mod accounts;
pub mod auth;
pub mod chat;
pub mod clock;
pub mod config;
pub mod desk;
pub mod domain;
pub mod error;
pub mod http;
pub mod ids;
pub mod limits;
pub mod providers;
pub mod quota;
pub mod redis_link;
pub mod retention;
pub mod startup;
pub mod state;
pub mod store;
pub mod telemetry;
