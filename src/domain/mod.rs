//! Types and rules of the product, free of HTTP and SQL: validated values
//! (`Email`, `Username`, `Password`, `MessageContent`, …), roles, statuses,
//! and the context-budget rule that decides what history a model sees.

pub mod context;
pub mod conversation;
pub mod search;
pub mod support;
pub mod user;
pub mod validation;

pub use validation::{FieldError, Validator};
