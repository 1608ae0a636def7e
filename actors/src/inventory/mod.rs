//! Inventory: stock per SKU and reservations per order, sharded by SKU over the inventory nodes.
//!
//! - [`protocol`]: requests/replies that cross nodes.
//! - [`stock`]: the pure model (never oversells; stock conserved); proptested.
//! - [`actor`]: the worker around it; the reaper.
//!
//! Caveat: a reservation that expires before its order's confirmation reaches inventory (15 min by
//! default) is re-taken on commit if the stock is still there; otherwise the commit fails and is logged.

pub mod actor;
pub mod protocol;
pub mod stock;

pub use actor::{InventoryMsg, InventoryWorker};
pub use protocol::{InventoryReply, InventoryRequest, Item, PricedLine, StockView};
