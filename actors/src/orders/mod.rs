//! Orders: the order saga's orchestrator, its replicated tables, its outbox.
//!
//! Orders are sharded by Raft group: an order with an Idempotency-Key lives in the shard the key
//! hashes to (so a key meets one group, whose committed claim makes one order per key), an order
//! without one in any shard (the front prefers one its node leads). The order id's last byte
//! names its shard, so a lookup by id goes straight to the shard's leader.
//!
//! - [`config`]: the saga's settings (`[orders]`).
//! - [`protocol`]: requests/replies that cross nodes (place, get, list, dead letters).
//! - [`client`]: how a front places an order on its shard's leader, retrying a keyed order on the
//!   new leader when the old one dies with it (pure policy [`client::next`]).
//! - [`saga`]: the pure saga state machine (events + time in, commands out); unit + proptest.
//! - [`machine`]: the replicated state machine: orders, idempotency claims, outbox, indexes.
//! - [`driver`]: the worker's decisions with no I/O (admission, parking, loading a shard it
//!   starts leading, one proposal per saga, epochs, waiters): inputs and facts in, effects out;
//!   tested by transcripts (`testscripts/driver/`).
//! - [`actor`]: the orders [`Service`](crate::worker::Service): reads are served like every
//!   capability's; places and awaits go to its own loop, which gathers the driver's facts and
//!   performs its effects.
//! - [`outbox`]: the relay that delivers finished orders' events at least once from the shards
//!   this node leads, and moves an entry its destination keeps failing on to the dead letters.
//! - [`rounds`]: the relay's decisions with no I/O (one round at a time, backoff per destination,
//!   dead letters after repeated failure answers).
//!
//! Caveats:
//! - Every saga step that must survive a failover is one Raft write of the orders group: the place
//!   and the finish, plus any wait (a retry's backoff). Granted holds are not recorded on their
//!   own (`saga::must_commit`): a failover before the finish costs the new leader a re-reserve,
//!   which answers the same. With the reserve and the charge, four writes in sequence per order,
//!   each a round trip to a majority.
//! - Sagas live in the leader's memory; a new leader resumes them from the committed records, so a
//!   step in flight at a failover is taken again (each is idempotent by order id).
//! - Listing a customer's orders asks every shard's leader and merges the answers.

pub mod actor;
pub mod client;
pub mod config;
pub mod driver;
#[cfg(test)]
mod driver_transcripts;
pub mod machine;
pub mod outbox;
pub mod protocol;
pub mod rounds;
pub mod saga;

pub use actor::{new_order_id, Orders, SweepCounts, MAX_ORDERS_LISTED, SWEEPS};
pub use config::OrdersConfig;
pub use machine::{OrdersCommand, OrdersMachine};
pub use outbox::{OutboxRelay, RelayArgs, DEAD_LETTERED, MAX_DEAD_LETTERS_LISTED, RELAY_NAME};
pub use protocol::{
    shard_of_order, CancelReason, DeadLetter, IdemKey, OrderStatus, OrderView, OrdersReply, OrdersRequest, PlaceOrder,
};
pub use rounds::DEAD_LETTER_AFTER;
