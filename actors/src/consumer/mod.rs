//! What shipping and notifications share: an at-least-once consumer of `OrderConfirmed` events,
//! replicated: each shard is a Raft group, served where its leader is.
//!
//! The orders outbox may deliver an event more than once (a lost ack, a restart, a failover); the
//! consumer dedupes by event id, and records at most one entity per (order, kind) where the kind
//! demands it, so "exactly one shipment per confirmed order" holds whatever the redeliveries.
//!
//! - [`protocol`]: the event and the requests/replies that cross nodes.
//! - [`machine`]: the replicated state machine (dedupe + record), parameterised by [`Making`].
//! - [`actor`]: the worker, which proposes deliveries on the leader and reads linearizably.

pub mod actor;
pub mod client;
pub mod machine;
pub mod protocol;

pub use machine::Making;
pub use machine::{ConsumerCommand, ConsumerMachine};
pub use protocol::{ConsumerReply, ConsumerRequest, Delivery, OrderConfirmed};
