//! Payments: a simulated provider behind an idempotent ledger, keyed by order id, replicated:
//! each shard is a Raft group, served where its leader is.
//!
//! - [`protocol`]: requests/replies that cross nodes.
//! - [`ledger`]: the pure provider + ledger rules (tokens, idempotency, refunds).
//! - [`machine`]: the replicated state machine: commands applied with the ledger's rules.
//! - [`actor`]: the worker, which proposes commands on the leader and reads linearizably.

pub mod actor;
pub mod client;
pub mod ledger;
pub mod machine;
pub mod protocol;

pub use actor::Payments;
pub use machine::{PaymentCommand, PaymentsMachine, PAYMENTS};
pub use protocol::{PaymentReply, PaymentRequest, PaymentView};
