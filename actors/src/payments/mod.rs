//! Payments: a simulated provider behind an idempotent ledger, keyed by order id.
//!
//! - [`protocol`]: requests/replies that cross nodes.
//! - [`ledger`]: the pure provider + ledger rules (tokens, idempotency, refunds).
//! - [`actor`]: the worker.

pub mod actor;
pub mod ledger;
pub mod protocol;

pub use actor::{PaymentsMsg, PaymentsWorker};
pub use protocol::{PaymentReply, PaymentRequest, PaymentView};
