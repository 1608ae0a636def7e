//! Orders: the order saga's orchestrator, its store, its outbox.
//!
//! - [`protocol`]: requests/replies that cross nodes (place, get).
//! - [`saga`]: the pure saga state machine (events + time in, commands out); unit + proptest.
//! - [`actor`]: the worker that drives every unfinished saga and answers waiting clients.
//! - [`outbox`]: the relay that delivers finished orders' events at least once.
//!
//! Caveats:
//! - With an `Idempotency-Key`, the HTTP layer routes the request to the key's home orders node
//!   (the key hashed over the orders nodes), so one key always meets one store; if that node is
//!   down the request is refused (503) rather than risking a second order under the same key.
//! - Only unfinished sagas are kept in memory; finished orders are read from the store.

pub mod actor;
pub mod outbox;
pub mod protocol;
pub mod saga;

pub use actor::{home_of, new_order_id, OrdersMsg, OrdersWorker};
pub use outbox::{OutboxRelay, RelayArgs, RELAY_NAME};
pub use protocol::{IdemKey, OrderStatus, OrderView, OrdersReply, OrdersRequest, PlaceOrder};
