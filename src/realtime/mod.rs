//! Old paths of the reply engine, the support desk and the limiter, kept
//! while the HTTP handlers move over to `chat`, `desk` and `limits`.

pub use crate::{
    chat as replies,
    chat::{Replies, ReplyEvent},
    desk as support,
    desk::bus,
    limits,
};
