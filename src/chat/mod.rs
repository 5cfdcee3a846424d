//! The reply engine: how a message becomes a stored reply.
//!
//! - `send`: validation is done by the caller; this stores the user message
//!   and the reply's placeholder in one transaction with the idempotency key,
//!   and builds the context the model sees (history up to that message).
//! - `generate`: runs the provider stream detached from the request (a client
//!   that disconnects does not stop it, only a cancel does), saves the text as
//!   it goes and stores the final state, retrying until the database takes it.
//! - `follow`: what followers (the synchronous POST, SSE, sockets, resumers)
//!   read — the live text here, or the database for replies running on
//!   another instance or already finished — addressed by byte offset, so a
//!   resume sends exactly what was missed; and cancelling.
//! - `relay`: the gateway's stateless replies (`/v1`), usage batched.
//! - `usage`: token totals kept through database outages.

//!
//! All of it hangs off `Chat`, which holds only what the engine needs.

mod follow;
mod generate;
mod history;
mod live;
mod relay;
mod send;
pub mod usage;

use std::sync::Arc;

/// Who a gateway call counts against, with their limits.
pub use crate::quota::Payer as Caller;
pub use generate::{TakeOver, provider_error_code};
pub use history::HistoryCache;
pub use live::{LiveReply, Replies, ReplyEvent};
pub use relay::{GatewayUsage, RelayStream};
pub use send::{SendRequest, Sent, StoreSend, Stored, Target, send_hash};

use crate::{clock::Clock, config::ChatSettings, ids::Ids, providers::Providers, store::Store};

/// The reply engine's handle: storage, the providers, time, ids, the
/// replies running here and its settings — nothing of the web.
pub struct Chat {
    pub store: Store,
    pub providers: Providers,
    pub clock: Arc<dyn Clock>,
    pub ids: Arc<dyn Ids>,
    pub replies: Replies,
    pub settings: ChatSettings,
    /// `/v1` usage not yet written.
    pub gateway_usage: GatewayUsage,
    /// Conversations' recent history, so a reply's context reads only what is new.
    pub history: HistoryCache,
    /// Rate limits and token budgets, checked before every provider call.
    pub quota: Arc<crate::quota::Quota>,
}
