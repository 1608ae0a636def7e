//! Orders' requests and replies (remote, versioned; append variants at the end only).

use bulkhead_storage::{decode_payload, unknown_version, BodyFingerprint, CodecError, Record};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::inventory::{Item, PricedLine};

/// `Idempotency-Key` and the fingerprint of the request body it came with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdemKey {
    pub key: String,
    pub body: BodyFingerprint,
}

/// [`IdemKey`] as builds before SHA-256 body hashes had it (in `OrdersRequest` v1-v2 and
/// `OrdersCommand` v1): the body's FNV-1a only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdemKeyV1 {
    pub key: String,
    pub body_hash: u64,
}

impl From<IdemKeyV1> for IdemKey {
    fn from(old: IdemKeyV1) -> Self {
        Self { key: old.key, body: BodyFingerprint { sha256: None, fnv64: old.body_hash } }
    }
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

/// Why an order was cancelled. (In the records before `OrderRecord` v2 and `OrdersReply` v3 it
/// was its [`CancelReason::as_str`] text.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CancelReason {
    /// An inventory shard had too little stock for one of its lines.
    OutOfStock,
    /// An inventory shard had already released the order's hold.
    ReservationExpired,
    /// Payments declined the charge (nothing was charged: no refund goes out).
    PaymentDeclined,
    /// No charge was definite within `[orders] reservation_window_ms`.
    ReservationWindowPassed,
}

impl CancelReason {
    pub const ALL: [CancelReason; 4] = [
        CancelReason::OutOfStock,
        CancelReason::ReservationExpired,
        CancelReason::PaymentDeclined,
        CancelReason::ReservationWindowPassed,
    ];

    /// As the API shows it (`reason` of a cancelled order).
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::OutOfStock => "out_of_stock",
            CancelReason::ReservationExpired => "reservation_expired",
            CancelReason::PaymentDeclined => "payment_declined",
            CancelReason::ReservationWindowPassed => "reservation_window_passed",
        }
    }

    /// The reason an older record wrote as `text`; a text no build wrote is a malformed record.
    pub(crate) fn from_old_text(text: &str) -> Result<Self, CodecError> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == text)
            .ok_or_else(|| CodecError::Malformed(format!("`{text}` is no cancel reason")))
    }
}

impl std::fmt::Display for CancelReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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
    pub reason: Option<CancelReason>,
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

/// The orders shard an order id names (see [`new_order_id`](super::new_order_id)).
pub fn shard_of_order(id: &Uuid) -> u32 {
    u32::from(id.as_bytes()[15])
}

/// Every orders request comes from the front, which runs on every node; a drill only from the
/// node's own front.
impl bulkhead_cluster::SentBy for OrdersRequest {
    fn sent_by(&self) -> bulkhead_cluster::Role {
        match self {
            Self::InjectPanic => bulkhead_cluster::Role::Itself,
            _ => bulkhead_cluster::Role::AnyMember,
        }
    }
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
    /// The destination, e.g. `shipping` or `inventory/2` (an inventory shard).
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

/// Version 2: orders on Raft groups (ca16541): a request names its shard, the witness requests and
/// replies are gone. Version 1 (the single-copy orders of before) still decodes: what carries over
/// unchanged, as itself; a request that would need a shard it does not name, or a witness message,
/// as [`CodecError::Retired`].
impl Record for OrdersRequest {
    /// 3: an Idempotency-Key's body fingerprint is SHA-256 (with the FNV-1a of version 2 beside it).
    const VERSION: u8 = 3;

    fn upgrade(version: u8, payload: &[u8]) -> Result<Self, CodecError> {
        match version {
            1 => decode_payload::<v1::OrdersRequest>(payload)?.try_into(),
            2 => decode_payload::<v2::OrdersRequest>(payload).map(Into::into),
            3 => decode_payload(payload),
            v => Err(unknown_version::<Self>(v)),
        }
    }
}
impl Record for OrdersReply {
    /// 3: an order's cancel reason is a [`CancelReason`] (its text before).
    const VERSION: u8 = 3;

    fn upgrade(version: u8, payload: &[u8]) -> Result<Self, CodecError> {
        match version {
            1 => decode_payload::<v1::OrdersReply>(payload)?.try_into(),
            2 => decode_payload::<v2::OrdersReply>(payload)?.try_into(),
            3 => decode_payload(payload),
            v => Err(unknown_version::<Self>(v)),
        }
    }
}

/// [`OrderView`] as `OrdersReply` versions 1 and 2 carried it: the cancel reason as text.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderViewV1 {
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

impl TryFrom<OrderViewV1> for OrderView {
    type Error = CodecError;
    fn try_from(v: OrderViewV1) -> Result<Self, CodecError> {
        Ok(OrderView {
            order_id: v.order_id,
            customer_id: v.customer_id,
            items: v.items,
            lines: v.lines,
            total_cents: v.total_cents,
            status: v.status,
            reason: v.reason.as_deref().map(CancelReason::from_old_text).transpose()?,
            payment_id: v.payment_id,
            history: v.history,
        })
    }
}

/// Today's view as versions 1 and 2 laid it out (for the fixtures and tests of the upgrade).
#[cfg(test)]
impl From<OrderView> for OrderViewV1 {
    fn from(v: OrderView) -> Self {
        OrderViewV1 {
            order_id: v.order_id,
            customer_id: v.customer_id,
            items: v.items,
            lines: v.lines,
            total_cents: v.total_cents,
            status: v.status,
            reason: v.reason.map(|r| r.as_str().to_string()),
            payment_id: v.payment_id,
            history: v.history,
        }
    }
}

/// Orders' requests and replies as version 1 had them last (0f3bb7a; earlier builds had a prefix
/// of these variants, except abcf9c1's branch, whose `DeadLetters` was index 3 until the merge).
pub(crate) mod v1 {
    use bulkhead_storage::CodecError;
    use serde::{Deserialize, Serialize};
    use uuid::Uuid;

    use super::{DeadLetter, IdemKeyV1 as IdemKey, OrderViewV1 as OrderView};
    use crate::inventory::Item;

    #[derive(Debug, Serialize, Deserialize)]
    pub struct PlaceOrder {
        pub customer_id: String,
        pub items: Vec<Item>,
        pub payment_token: String,
        pub idempotency: Option<IdemKey>,
        pub wait_ms: u64,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub enum OrdersRequest {
        Place(PlaceOrder),
        Get { order_id: Uuid },
        InjectPanic,
        Witness { key: String, owner: String },
        PlaceUnwitnessed(PlaceOrder),
        DeadLetters { order_id: Option<Uuid> },
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub enum OrdersReply {
        Order(OrderView),
        NotFound,
        IdempotencyConflict { order_id: Uuid },
        Refused(String),
        Witnessed,
        OwnedHere,
        Elsewhere { owner: String },
        DeadLetters(Vec<DeadLetter>),
    }

    const fn retired(what: &'static str) -> CodecError {
        CodecError::Retired { version: 1, what }
    }

    impl TryFrom<OrdersRequest> for super::OrdersRequest {
        type Error = CodecError;
        fn try_from(old: OrdersRequest) -> Result<Self, CodecError> {
            match old {
                OrdersRequest::Get { order_id } => Ok(Self::Get { order_id }),
                OrdersRequest::InjectPanic => Ok(Self::InjectPanic),
                // Which shard a key's order belongs in is the front's to say; a guess would break
                // "one key, one shard, one order".
                OrdersRequest::Place(_) => Err(retired("orders Place names no shard")),
                OrdersRequest::DeadLetters { .. } => Err(retired("orders DeadLetters names no shard")),
                OrdersRequest::Witness { .. } | OrdersRequest::PlaceUnwitnessed(_) => {
                    Err(retired("orders witness request"))
                }
            }
        }
    }

    impl TryFrom<OrdersReply> for super::OrdersReply {
        type Error = CodecError;
        fn try_from(old: OrdersReply) -> Result<Self, CodecError> {
            match old {
                OrdersReply::Order(view) => Ok(Self::Order(view.try_into()?)),
                OrdersReply::NotFound => Ok(Self::NotFound),
                OrdersReply::IdempotencyConflict { order_id } => Ok(Self::IdempotencyConflict { order_id }),
                OrdersReply::Refused(reason) => Ok(Self::Refused(reason)),
                OrdersReply::DeadLetters(letters) => Ok(Self::DeadLetters(letters)),
                OrdersReply::Witnessed | OrdersReply::OwnedHere | OrdersReply::Elsewhere { .. } => {
                    Err(retired("orders witness reply"))
                }
            }
        }
    }
}

/// Orders' requests as version 2 had them (ca16541, `Await` appended at 60e7f1c, until the SHA-256
/// body fingerprint): the same variants, an Idempotency-Key with the body's FNV-1a only.
pub(crate) mod v2 {
    use bulkhead_storage::CodecError;
    use serde::{Deserialize, Serialize};
    use uuid::Uuid;

    use super::{DeadLetter, IdemKeyV1, OrderViewV1 as OrderView};
    use crate::inventory::Item;

    /// `OrdersReply` version 2 (ca16541 until the typed cancel reason).
    #[derive(Debug, Serialize, Deserialize)]
    pub enum OrdersReply {
        Order(OrderView),
        NotFound,
        IdempotencyConflict { order_id: Uuid },
        Refused(String),
        DeadLetters(Vec<DeadLetter>),
        NotLeader { leader: Option<String> },
        Unavailable(String),
        Orders(Vec<OrderView>),
        Uncertain(String),
    }

    impl TryFrom<OrdersReply> for super::OrdersReply {
        type Error = CodecError;
        fn try_from(old: OrdersReply) -> Result<Self, CodecError> {
            Ok(match old {
                OrdersReply::Order(view) => Self::Order(view.try_into()?),
                OrdersReply::NotFound => Self::NotFound,
                OrdersReply::IdempotencyConflict { order_id } => Self::IdempotencyConflict { order_id },
                OrdersReply::Refused(why) => Self::Refused(why),
                OrdersReply::DeadLetters(letters) => Self::DeadLetters(letters),
                OrdersReply::NotLeader { leader } => Self::NotLeader { leader },
                OrdersReply::Unavailable(why) => Self::Unavailable(why),
                OrdersReply::Orders(views) => {
                    Self::Orders(views.into_iter().map(TryInto::try_into).collect::<Result<_, _>>()?)
                }
                OrdersReply::Uncertain(why) => Self::Uncertain(why),
            })
        }
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub struct PlaceOrder {
        pub shard: u32,
        pub customer_id: String,
        pub items: Vec<Item>,
        pub payment_token: String,
        pub idempotency: Option<IdemKeyV1>,
        pub wait_ms: u64,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub enum OrdersRequest {
        Place(PlaceOrder),
        Get { order_id: Uuid },
        InjectPanic,
        DeadLetters { shard: u32, order_id: Option<Uuid> },
        ByCustomer { shard: u32, customer_id: String, before: Option<Uuid>, limit: u32 },
        Await { order_id: Uuid, wait_ms: u64 },
    }

    impl From<OrdersRequest> for super::OrdersRequest {
        fn from(old: OrdersRequest) -> Self {
            match old {
                OrdersRequest::Place(p) => Self::Place(super::PlaceOrder {
                    shard: p.shard,
                    customer_id: p.customer_id,
                    items: p.items,
                    payment_token: p.payment_token,
                    idempotency: p.idempotency.map(Into::into),
                    wait_ms: p.wait_ms,
                }),
                OrdersRequest::Get { order_id } => Self::Get { order_id },
                OrdersRequest::InjectPanic => Self::InjectPanic,
                OrdersRequest::DeadLetters { shard, order_id } => Self::DeadLetters { shard, order_id },
                OrdersRequest::ByCustomer { shard, customer_id, before, limit } => {
                    Self::ByCustomer { shard, customer_id, before, limit }
                }
                OrdersRequest::Await { order_id, wait_ms } => Self::Await { order_id, wait_ms },
            }
        }
    }
}

impl bulkhead_cluster::LeaderReply for OrdersReply {
    fn not_leader(&self) -> Option<Option<String>> {
        match self {
            OrdersReply::NotLeader { leader } => Some(leader.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason reads back from the text older records hold, and only those texts do.
    #[test]
    fn every_cancel_reason_reads_back_from_its_old_text() {
        for r in CancelReason::ALL {
            assert_eq!(CancelReason::from_old_text(r.as_str()), Ok(r));
        }
        let texts: std::collections::BTreeSet<_> = CancelReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(texts.len(), CancelReason::ALL.len(), "one text per reason");
        assert!(CancelReason::from_old_text("cancelled").is_err());
    }
}
