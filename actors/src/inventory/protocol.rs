//! Inventory's requests and replies (remote, versioned). Append variants at the end only: bincode
//! encodes the variant index.

use bulkhead_storage::Record;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One line of an order as the client asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    pub quantity: u64,
}

/// A reserved line, with the unit price at the time of reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PricedLine {
    pub sku: String,
    pub quantity: u64,
    pub unit_price_cents: u64,
}

/// The public view of one SKU's stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockView {
    pub sku: String,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    pub price_cents: u64,
}

/// A hold's `ttl_ms` for "until committed or released": nothing expires it.
pub const UNTIL_RELEASED: u64 = u64::MAX;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InventoryRequest {
    /// Reserve every item for `order_id` (all or nothing), held for `ttl_ms` ([`UNTIL_RELEASED`]:
    /// until committed or released, what the orders saga asks). Idempotent per order.
    Reserve {
        order_id: Uuid,
        items: Vec<Item>,
        ttl_ms: u64,
    },
    /// The order is confirmed: reserved becomes sold. Idempotent.
    Commit {
        order_id: Uuid,
    },
    /// The order is cancelled: reserved becomes available again. Idempotent; a release that
    /// arrives before its reservation leaves a tombstone so the late reservation is refused.
    Release {
        order_id: Uuid,
    },
    Get {
        sku: String,
    },
    /// Sets available stock and price (admin).
    Set {
        sku: String,
        available: u64,
        price_cents: u64,
    },
    /// Fault injection: the worker panics (only when the node enables fault injection).
    InjectPanic,
    /// `Commit` on the shard that holds the reservation (shards are Raft groups; an order id does
    /// not name its inventory shard, the saga remembers it).
    CommitOn {
        shard: u32,
        order_id: Uuid,
    },
    /// `Release` on the shard that holds (or will hold) the reservation.
    ReleaseOn {
        shard: u32,
        order_id: Uuid,
    },
    /// `CommitOn` for several orders of one shard, as the outbox relay batches them: answered
    /// [`InventoryReply::Each`], one reply per order in order. Each is still its own command.
    CommitManyOn {
        shard: u32,
        order_ids: Vec<Uuid>,
    },
}

/// Holds are taken, committed and released by the orders saga and its outbox, on a node that hosts
/// orders; reads and stock settings come from the front of any node, a drill only from the node itself.
impl bulkhead_cluster::SentBy for InventoryRequest {
    fn sent_by(&self) -> bulkhead_cluster::Role {
        use crate::capability::Capability;
        use bulkhead_cluster::Role;
        match self {
            Self::Reserve { .. }
            | Self::Commit { .. }
            | Self::Release { .. }
            | Self::CommitOn { .. }
            | Self::ReleaseOn { .. }
            | Self::CommitManyOn { .. } => Role::hosts(Capability::Orders),
            Self::Get { .. } | Self::Set { .. } => Role::AnyMember,
            Self::InjectPanic => Role::Itself,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InventoryReply {
    /// Held until `expires_ms` (wall clock, ms since the epoch; `u64::MAX` once committed).
    Reserved {
        lines: Vec<PricedLine>,
        expires_ms: u64,
    },
    OutOfStock {
        sku: String,
        available: u64,
    },
    /// The order was released (or expired) before this request: nothing is held for it.
    AlreadyReleased,
    Committed,
    Released,
    /// A commit found its reservation expired and the stock gone since.
    CommitFailed {
        reason: String,
    },
    Stock(StockView),
    NotFound,
    Refused(String),
    /// This replica does not lead the shard; `leader` is the one it knows, if any.
    NotLeader {
        leader: Option<String>,
    },
    /// Could not be served right now (no majority answered in time); try again later.
    Unavailable(String),
    /// The answers to an [`InventoryRequest::CommitManyOn`], one per order, in its order.
    Each(Vec<InventoryReply>),
}

impl bulkhead_cluster::LeaderReply for InventoryReply {
    fn not_leader(&self) -> Option<Option<String>> {
        match self {
            InventoryReply::NotLeader { leader } => Some(leader.clone()),
            _ => None,
        }
    }
}

impl Record for InventoryRequest {
    const VERSION: u8 = 1;
}
impl Record for InventoryReply {
    const VERSION: u8 = 1;
}
