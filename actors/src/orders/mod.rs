//! Orders: the order saga's orchestrator, its store, its outbox.
//!
//! - [`protocol`]: requests/replies that cross nodes (place, get).
//! - [`saga`]: the pure saga state machine (events + time in, commands out); unit + proptest.
//! - [`actor`]: the worker that drives every unfinished saga and answers waiting clients.
//! - [`outbox`]: the relay that delivers finished orders' events at least once, and moves an entry its
//!   destination keeps failing on to the dead-letter table.
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

pub use actor::{home_of, new_order_id, successor_of, OrdersMsg, OrdersWorker, DUPLICATE_KEYS};
pub use outbox::{OutboxRelay, RelayArgs, DEAD_LETTERED, DEAD_LETTER_AFTER, MAX_DEAD_LETTERS_LISTED, RELAY_NAME};
pub use protocol::{DeadLetter, IdemKey, OrderStatus, OrderView, OrdersReply, OrdersRequest, PlaceOrder};
