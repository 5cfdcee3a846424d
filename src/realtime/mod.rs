//! Live events: replies generated detached from requests, followed by any
//! number of readers (sync POST, SSE, WebSocket, resumers), and the support
//! desk's event bus (in-process, or Redis across instances).

pub mod bus;
pub mod limits;
pub mod redis_link;
pub mod replies;
pub mod support;
pub mod usage;

pub use replies::{Replies, ReplyEvent};
