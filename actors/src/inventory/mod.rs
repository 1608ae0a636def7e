//! Inventory: stock per SKU and reservations per order, sharded by SKU; each shard is a Raft
//! group, served where its leader is.
//!
//! - [`protocol`]: requests/replies that cross nodes.
//! - [`stock`]: the pure model (never oversells; stock conserved); proptested.
//! - [`machine`]: the replicated state machine: commands applied with the model's rules.
//! - [`actor`]: the worker, which proposes commands on the leader; the leader's reaper.
//!
//! Caveat: a reservation that expires before its order's confirmation reaches inventory (15 min by
//! default) is re-taken on commit if the stock is still there; otherwise the commit fails and is logged.

pub mod actor;
pub mod machine;
pub mod protocol;
pub mod stock;

pub use actor::{InventoryArgs, InventoryMsg, InventoryWorker};
pub use machine::{InventoryCommand, InventoryMachine};
pub use protocol::{InventoryReply, InventoryRequest, Item, PricedLine, StockView};
