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
    Get {
        order_id: Uuid,
    },
    InjectPanic,
    /// Sent to a key's successor before its home `owner` takes the key: "if `owner` is down and
    /// this key comes to you, it is `owner`'s, do not place it yourself" (see `orders::actor`).
    Witness {
        key: String,
        owner: String,
    },
    /// A `Place` whose key the successor could not witness (unreachable): the home takes it and
    /// keeps trying to get it witnessed afterwards.
    PlaceUnwitnessed(PlaceOrder),
    /// This node's dead letters, of one order or all (at most `MAX_DEAD_LETTERS_LISTED`).
    DeadLetters {
        order_id: Option<Uuid>,
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
    /// The witness is recorded (durably).
    Witnessed,
    /// This node placed an order under that key itself (while its home was down): send the
    /// request here, not to the home.
    OwnedHere,
    /// This node witnessed the key for its home `owner`: the order, if any, lives there.
    Elsewhere {
        owner: String,
    },
    DeadLetters(Vec<DeadLetter>),
}

impl Record for OrdersRequest {
    const VERSION: u8 = 1;
}
impl Record for OrdersReply {
    const VERSION: u8 = 1;
}
