//! What shipping and notifications share: an at-least-once consumer of `OrderConfirmed` events.
//!
//! The orders outbox may deliver an event more than once (a lost ack, a restart); the consumer
//! dedupes by event id, and records at most one entity per (order, kind) where the kind demands it,
//! so "exactly one shipment per confirmed order" holds whatever the redeliveries.
//!
//! - [`protocol`]: the event and the requests/replies that cross nodes.
//! - [`actor`]: the worker, parameterised by what the capability makes of an event.

pub mod actor;
pub mod protocol;

pub use actor::{ConsumerArgs, ConsumerMsg, ConsumerWorker, Making};
pub use protocol::{ConsumerReply, ConsumerRequest, Delivery, OrderConfirmed};
