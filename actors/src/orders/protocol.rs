//! Orders' requests and replies (remote, versioned; append variants at the end only).

use bulkhead_storage::Record;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::inventory::{Item, PricedLine};

/// `Idempotency-Key` and a hash of the request body it came with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdemKey {
    pub key: String,
    pub body_hash: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaceOrder {
    /// The orders shard to place it in: the key's shard with an Idempotency-Key (one key, one
    /// shard, one order), else any (the front prefers one this node leads).
    pub shard: u32,
    pub customer_id: String,
    pub items: Vec<Item>,
    pub payment_token: String,
    pub idempotency: Option<IdemKey>,
    /// How long to wait for the saga before answering with the order still pending.
    pub wait_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at_ms: u64,
    pub event: String,
}

/// An order as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderView {
    pub order_id: Uuid,
    pub customer_id: String,
    pub items: Vec<Item>,
    pub lines: Vec<PricedLine>,
    pub total_cents: u64,
    pub status: OrderStatus,
    pub reason: Option<String>,
    pub payment_id: Option<String>,
    pub history: Vec<HistoryEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrdersRequest {
    Place(PlaceOrder),
    /// One order, read linearizably on its shard's leader (the shard is the id's last byte).
    Get {
        order_id: Uuid,
    },
    InjectPanic,
    /// A shard's dead letters, of one order or all (at most `MAX_DEAD_LETTERS_LISTED`).
    DeadLetters {
        shard: u32,
        order_id: Option<Uuid>,
    },
    /// A customer's orders in one shard, newest first, older than `before` if given.
    ByCustomer {
        shard: u32,
        customer_id: String,
        before: Option<Uuid>,
        limit: u32,
    },
    /// Waits up to `wait_ms` for an order's saga to finish, on its shard's leader, and answers
    /// with the order as it then is. The front asks this when a `Place` came back pending before
    /// its wait was over: the shard's leadership moved mid-saga, and the new leader drives it now.
    Await {
        order_id: Uuid,
        wait_ms: u64,
    },
}

/// An outbox entry the relay gave up on: its destination answered with a failure
/// `DEAD_LETTER_AFTER` times in a row (unreachable destinations are retried forever instead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub order_id: Uuid,
    /// The event's id (`OrderConfirmed.event_id`; the order id for the inventory/payments commands).
    pub event_id: Uuid,
    /// `order_confirmed`, `commit_reservation`, `release_reservation` or `refund_payment`.
    pub event: String,
    /// The destination capability, e.g. `shipping` or `inventory@n2`.
    pub destination: String,
    pub attempts: u32,
    pub last_error: String,
    pub at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrdersReply {
    Order(OrderView),
    NotFound,
    /// The Idempotency-Key was first used with a different body.
    IdempotencyConflict {
        order_id: Uuid,
    },
    Refused(String),
    DeadLetters(Vec<DeadLetter>),
    /// This replica does not lead the shard; `leader` does (if known). The caller follows it once.
    NotLeader {
        leader: Option<String>,
    },
    /// The leader could not finish (no majority in time, storage failure); nothing is promised.
    Unavailable(String),
    Orders(Vec<OrderView>),
    /// The write may or may not have committed (no majority answered in time): retry with the same
    /// Idempotency-Key to learn which.
    Uncertain(String),
}

// Version 2: orders on Raft groups (the witness requests and replies are gone).
impl Record for OrdersRequest {
    const VERSION: u8 = 2;
}
impl Record for OrdersReply {
    const VERSION: u8 = 2;
}

impl bulkhead_cluster::LeaderReply for OrdersReply {
    fn not_leader(&self) -> Option<Option<String>> {
        match self {
            OrdersReply::NotLeader { leader } => Some(leader.clone()),
            _ => None,
        }
    }
}
