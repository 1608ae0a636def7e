//! Inventory: stock per SKU and reservations per order, sharded by SKU; each shard is a Raft
//! group, served where its leader is.
//!
//! - [`protocol`]: requests/replies that cross nodes.
//! - [`stock`]: the pure model (never oversells; stock conserved); proptested.
//! - [`machine`]: the replicated state machine: commands applied with the model's rules.
//! - [`actor`]: the worker, which proposes commands on the leader.
//!
//! A hold lasts until its order's saga commits or releases it: no clock ends it (see [`actor`]).
//! Caveat: stock held by orders whose saga waits on a long outage (payments down for an hour)
//! stays held for that hour; those orders are still pending and will be confirmed or cancelled.

pub mod actor;
pub mod client;
pub mod machine;
pub mod protocol;
pub mod stock;

pub use actor::Inventory;
pub use machine::{InventoryCommand, InventoryMachine};
pub use protocol::{InventoryReply, InventoryRequest, Item, PricedLine, StockView};
