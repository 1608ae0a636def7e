//! The JSON bodies API v1 answers with: the types the handlers serialize, and (through utoipa's
//! `ToSchema`) the schemas `/openapi.json` describes, so the two cannot drift apart.
//!
//! Each view is made from its capability's own type by a `From`; the capabilities' types stay free
//! of HTTP concerns (times here are RFC 3339 text, there milliseconds). Enums are mirrored with an
//! exhaustive `match`, so a new variant there fails to compile here until the API says how it shows.

use std::collections::BTreeMap;

use bulkhead_actors::consumer::Delivery as DeliveryRecord;
use bulkhead_actors::inventory::{Item as ItemRecord, PricedLine as PricedLineRecord, StockView};
use bulkhead_actors::orders::{DeadLetter as DeadLetterRecord, OrderStatus as OrderStatusRecord, OrderView};
use bulkhead_actors::payments::PaymentView;
use bulkhead_actors::Capability as CapabilityRecord;
use bulkhead_cluster::membership::NodeView;
use bulkhead_cluster::raft::{ReplicaStatus, Role as RoleRecord, ShardStatus};
use bulkhead_cluster::{BreakerState as BreakerRecord, Status};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

/// One of the five business capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    Orders,
    Inventory,
    Payments,
    Shipping,
    Notifications,
}

impl From<CapabilityRecord> for Capability {
    fn from(c: CapabilityRecord) -> Self {
        match c {
            CapabilityRecord::Orders => Self::Orders,
            CapabilityRecord::Inventory => Self::Inventory,
            CapabilityRecord::Payments => Self::Payments,
            CapabilityRecord::Shipping => Self::Shipping,
            CapabilityRecord::Notifications => Self::Notifications,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Cancelled,
}

impl From<OrderStatusRecord> for OrderStatus {
    fn from(s: OrderStatusRecord) -> Self {
        match s {
            OrderStatusRecord::Pending => Self::Pending,
            OrderStatusRecord::Confirmed => Self::Confirmed,
            OrderStatusRecord::Cancelled => Self::Cancelled,
        }
    }
}

/// One line of an order as the client asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Item {
    pub sku: String,
    #[schema(minimum = 1)]
    pub quantity: u64,
}

impl From<&ItemRecord> for Item {
    fn from(i: &ItemRecord) -> Self {
        Self { sku: i.sku.clone(), quantity: i.quantity }
    }
}

/// A reserved line, with the unit price at the time of reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct PricedLine {
    pub sku: String,
    pub quantity: u64,
    pub unit_price_cents: u64,
}

impl From<&PricedLineRecord> for PricedLine {
    fn from(l: &PricedLineRecord) -> Self {
        Self { sku: l.sku.clone(), quantity: l.quantity, unit_price_cents: l.unit_price_cents }
    }
}

/// One step of an order's saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct HistoryEntry {
    /// RFC 3339 UTC with milliseconds, e.g. 2026-11-21T05:19:29.123Z.
    #[schema(format = DateTime)]
    pub at: String,
    /// The saga step for people, e.g. `created`, `charged: pay_…`.
    pub event: String,
}

/// An order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Order {
    /// A UUIDv7; its last byte names the order's shard.
    pub order_id: Uuid,
    pub customer_id: String,
    /// The items as the client asked for them.
    pub items: Vec<Item>,
    /// The reserved, priced lines (empty until reserved).
    pub lines: Vec<PricedLine>,
    pub total_cents: u64,
    pub status: OrderStatus,
    /// Why the order was cancelled (`out_of_stock`, `payment_declined`, ...); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub reason: Option<String>,
    /// Present once the payment succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub payment_id: Option<String>,
    pub history: Vec<HistoryEntry>,
}

impl From<&OrderView> for Order {
    fn from(o: &OrderView) -> Self {
        Self {
            order_id: o.order_id,
            customer_id: o.customer_id.clone(),
            items: o.items.iter().map(Item::from).collect(),
            lines: o.lines.iter().map(PricedLine::from).collect(),
            total_cents: o.total_cents,
            status: o.status.into(),
            reason: o.reason.map(|r| r.as_str().to_string()),
            payment_id: o.payment_id.clone(),
            history: o.history.iter().map(|h| HistoryEntry { at: rfc3339(h.at_ms), event: h.event.clone() }).collect(),
        }
    }
}

/// A customer's orders, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OrderList {
    pub customer_id: String,
    pub orders: Vec<Order>,
    /// The `before` of the next page; `null` on the last page.
    #[schema(required = true)]
    pub next_before: Option<Uuid>,
}

/// One SKU's stock. For every SKU, the initial stock = available + reserved + sold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Stock {
    pub sku: String,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    pub price_cents: u64,
}

impl From<StockView> for Stock {
    fn from(s: StockView) -> Self {
        Self { sku: s.sku, available: s.available, reserved: s.reserved, sold: s.sold, price_cents: s.price_cents }
    }
}

/// One recorded charge.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Payment {
    pub payment_id: String,
    pub amount_cents: u64,
    /// `processing`, `failing`, `charged`, `declined` or `refunded`.
    pub status: String,
    pub attempts: u32,
    #[schema(format = DateTime)]
    pub at: String,
}

impl From<&PaymentView> for Payment {
    fn from(p: &PaymentView) -> Self {
        Self {
            payment_id: p.payment_id.clone(),
            amount_cents: p.amount_cents,
            status: p.status.clone(),
            attempts: p.attempts,
            at: rfc3339(p.at_ms),
        }
    }
}

/// The charges recorded for an order: zero or one (more than one is a bug).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PaymentList {
    pub order_id: Uuid,
    pub payments: Vec<Payment>,
}

/// A shipment or a notification, made from an `OrderConfirmed` event.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Delivery {
    pub id: String,
    /// The outbox event it was made from (consumers dedupe by it).
    pub event_id: Uuid,
    pub detail: String,
    #[schema(format = DateTime)]
    pub at: String,
}

impl From<&DeliveryRecord> for Delivery {
    fn from(d: &DeliveryRecord) -> Self {
        Self { id: d.id.clone(), event_id: d.event_id, detail: d.detail.clone(), at: rfc3339(d.created_ms) }
    }
}

/// The shipments made for an order: one for a confirmed order once delivered, none otherwise.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ShipmentList {
    pub order_id: Uuid,
    pub shipments: Vec<Delivery>,
}

/// The notifications sent for an order: at least one for a confirmed order once delivered.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NotificationList {
    pub order_id: Uuid,
    pub notifications: Vec<Delivery>,
}

/// An outbox entry a relay gave up on: its destination answered with a failure too many times in
/// a row (unreachable destinations are retried forever instead).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeadLetter {
    pub order_id: Uuid,
    /// The event's id (`OrderConfirmed.event_id`; the order id for inventory and payments commands).
    pub event_id: Uuid,
    /// `order_confirmed`, `commit_reservation`, `release_reservation` or `refund_payment`.
    pub event: String,
    /// The destination: `shipping`, `notifications`, `payments` or `inventory@<node>`.
    pub destination: String,
    /// Failure answers in a row before it was given up on.
    pub attempts: u32,
    /// The destination's last answer.
    pub last_error: String,
    /// When it was moved to the dead letters.
    #[schema(format = DateTime)]
    pub at: String,
    /// The orders shard holding it.
    pub shard: u32,
}

impl DeadLetter {
    pub fn new(shard: u32, d: &DeadLetterRecord) -> Self {
        Self {
            order_id: d.order_id,
            event_id: d.event_id,
            event: d.event.clone(),
            destination: d.destination.clone(),
            attempts: d.attempts,
            last_error: d.last_error.clone(),
            at: rfc3339(d.at_ms),
            shard,
        }
    }
}

/// An orders shard that could not be asked for its dead letters.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UnreachableShard {
    pub shard: u32,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeadLetterList {
    /// By order id, then time.
    pub dead_letters: Vec<DeadLetter>,
    /// Shards that could not be asked: their dead letters are missing from the list.
    pub unreachable: Vec<UnreachableShard>,
}

/// A peer's status as this node's failure detector sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Up,
    Suspect,
    Down,
}

impl From<Status> for NodeStatus {
    fn from(s: Status) -> Self {
        match s {
            Status::Up => Self::Up,
            Status::Suspect => Self::Suspect,
            Status::Down => Self::Down,
        }
    }
}

/// One node as the answering node sees it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ClusterNode {
    pub name: String,
    /// Advertised cluster address (host:port); empty if never heard from.
    pub addr: String,
    /// Advertised HTTP address (host:port); empty if never heard from.
    pub http: String,
    /// Process id; `null` if never heard from.
    #[schema(required = true)]
    pub pid: Option<u32>,
    pub status: NodeStatus,
    pub capabilities: Vec<Capability>,
    /// Hosted capabilities whose workers are not serving.
    pub unhealthy: Vec<Capability>,
    /// Why the node is down, e.g. `never heard from` or a refusal (another shard map).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub reason: Option<String>,
}

impl From<&NodeView> for ClusterNode {
    fn from(n: &NodeView) -> Self {
        Self {
            name: n.name.clone(),
            addr: n.addr.clone(),
            http: n.http.clone(),
            pid: n.pid,
            status: n.status.into(),
            // An id this build does not know (a newer peer's) has no name to show.
            capabilities: n
                .capabilities
                .iter()
                .copied()
                .filter_map(CapabilityRecord::of)
                .map(Capability::from)
                .collect(),
            unhealthy: n.unhealthy.iter().copied().filter_map(CapabilityRecord::of).map(Capability::from).collect(),
            reason: n.reason.as_ref().map(ToString::to_string),
        }
    }
}

/// A circuit breaker's state: `open` fails calls to that member fast (503) until its cool-down
/// ends; `half_open` lets one probe call through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl From<BreakerRecord> for BreakerState {
    fn from(b: BreakerRecord) -> Self {
        match b {
            BreakerRecord::Closed => Self::Closed,
            BreakerRecord::HalfOpen => Self::HalfOpen,
            BreakerRecord::Open => Self::Open,
        }
    }
}

/// Who serves a capability, as the answering node's call path sees it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CapabilityView {
    /// Nodes hosting the capability, in shard order.
    pub members: Vec<String>,
    /// The members a call is routed to now.
    pub healthy: Vec<String>,
    /// The worst breaker state over the members (open > half_open > closed).
    pub breaker: BreakerState,
    /// Each member's breaker; a member never called is `closed`.
    pub breakers: BTreeMap<String, BreakerState>,
}

/// A replica's role in its shard's Raft group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Leader,
    Follower,
    Learner,
}

impl From<RoleRecord> for Role {
    fn from(r: RoleRecord) -> Self {
        match r {
            RoleRecord::Leader => Self::Leader,
            RoleRecord::Follower => Self::Follower,
            RoleRecord::Learner => Self::Learner,
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Replica {
    pub node: String,
    /// `null` when the answering node holds no replica of the shard.
    #[schema(required = true)]
    pub role: Option<Role>,
    /// Entries behind the leader; known on the leader only (`null` elsewhere).
    #[schema(required = true)]
    pub lag: Option<u64>,
}

impl From<&ReplicaStatus> for Replica {
    fn from(r: &ReplicaStatus) -> Self {
        Self { node: r.node.clone(), role: Some(r.role.into()), lag: r.lag }
    }
}

/// One shard of a replicated capability. With a replica on the answering node: that replica's view
/// (role and lag of every replica are known on the leader). Without: only the leader this node
/// would call, and `null` for the rest.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Shard {
    pub capability: Capability,
    pub shard: u32,
    #[schema(required = true)]
    pub leader: Option<String>,
    #[schema(required = true)]
    pub term: Option<u64>,
    pub replicas: Vec<Replica>,
    #[schema(required = true)]
    pub last_log_index: Option<u64>,
    #[schema(required = true)]
    pub applied_index: Option<u64>,
}

impl Shard {
    pub fn of_replica(capability: CapabilityRecord, s: &ShardStatus) -> Self {
        Self {
            capability: capability.into(),
            shard: s.shard,
            leader: s.leader.clone(),
            term: Some(s.term),
            replicas: s.replicas.iter().map(Replica::from).collect(),
            last_log_index: s.last_log_index,
            applied_index: s.applied_index,
        }
    }

    pub fn elsewhere(capability: CapabilityRecord, shard: u32, leader: Option<String>, replicas: &[String]) -> Self {
        Self {
            capability: capability.into(),
            shard,
            leader,
            term: None,
            replicas: replicas.iter().map(|n| Replica { node: n.clone(), role: None, lag: None }).collect(),
            last_log_index: None,
            applied_index: None,
        }
    }
}

/// The digests of the answering node's replicas (`GET /admin/digests`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Digests {
    /// The node that answered.
    pub node: String,
    pub replicas: Vec<ReplicaDigest>,
}

/// A fingerprint of one replica's state: replicas of one shard at the same `applied_index` must
/// have the same `sha256`; if they do not, they diverged.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReplicaDigest {
    pub capability: Capability,
    pub shard: u32,
    /// The Raft index the state stands for (`null`: nothing applied yet).
    pub applied_index: Option<u64>,
    /// Records in the state (every table of the capability).
    pub records: u64,
    /// SHA-256 over every record, key and value, in key order (hex).
    pub sha256: String,
}

/// Every node and capability as the answering node sees them.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ClusterView {
    /// The node that answered.
    pub node: String,
    pub nodes: Vec<ClusterNode>,
    /// Keyed by capability name; all five are always present.
    pub capabilities: BTreeMap<String, CapabilityView>,
    /// One entry per shard of every capability.
    pub shards: Vec<Shard>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    Ok,
}

/// `/healthz`: the process serves HTTP.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    pub status: Liveness,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReadyState {
    Ready,
    NotReady,
    /// The node is stopping (SIGTERM): it takes no new requests.
    Draining,
}

/// `/readyz`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Readiness {
    pub status: ReadyState,
    /// Present when not ready, and only to the admin token: capabilities not serving, shards
    /// without a leader or stopped, peers refused, or not joined.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PanicFault {
    Panic,
}

/// A worker panic was injected.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PanicInjected {
    pub injected: PanicFault,
    pub capability: Capability,
    pub node: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PartitionFault {
    Partition,
}

/// This node's cluster links were cut (`cut: true`) or healed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PartitionSet {
    pub injected: PartitionFault,
    pub cut: bool,
    pub node: String,
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds (`2026-11-21T05:19:29.123Z`):
/// every time the API shows.
pub fn rfc3339(ms: u64) -> String {
    // humantime writes four-digit years only (it fails past 9999, and `to_string` would panic): a
    // clock that far ahead shows as the last millisecond it can write.
    const LAST: u64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.min(LAST));
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(super::rfc3339(1_795_238_369_000), "2026-11-21T05:19:29.000Z");
        assert_eq!(super::rfc3339(u64::MAX), "9999-12-31T23:59:59.999Z", "never a panic");
    }

    use super::*;
    use bulkhead_actors::orders::protocol::HistoryEntry as HistoryRecord;
    use serde_json::json;

    /// The bytes the API answered before these types existed (built with `json!`), for an order
    /// with every optional field and one without.
    #[test]
    fn an_order_serializes_as_it_always_did() {
        let id = Uuid::now_v7();
        let mut view = OrderView {
            order_id: id,
            customer_id: "c1".into(),
            items: vec![ItemRecord { sku: "w".into(), quantity: 2 }],
            lines: vec![PricedLineRecord { sku: "w".into(), quantity: 2, unit_price_cents: 5 }],
            total_cents: 10,
            status: OrderStatusRecord::Cancelled,
            reason: Some(bulkhead_actors::orders::CancelReason::OutOfStock),
            payment_id: Some("pay_1".into()),
            history: vec![HistoryRecord { at_ms: 0, event: "created".into() }],
        };
        let want = json!({
            "order_id": id.to_string(), "customer_id": "c1",
            "items": [{"sku": "w", "quantity": 2}],
            "lines": [{"sku": "w", "quantity": 2, "unit_price_cents": 5}],
            "total_cents": 10, "status": "cancelled", "reason": "out_of_stock", "payment_id": "pay_1",
            "history": [{"at": "1970-01-01T00:00:00.000Z", "event": "created"}],
        });
        assert_eq!(serde_json::to_value(Order::from(&view)).unwrap(), want);
        view.reason = None;
        view.payment_id = None;
        let v = serde_json::to_value(Order::from(&view)).unwrap();
        assert!(v.get("reason").is_none() && v.get("payment_id").is_none(), "{v}");
    }

    #[test]
    fn a_shard_elsewhere_names_its_replicas_with_null_roles() {
        let s = Shard::elsewhere(CapabilityRecord::Payments, 0, Some("n2".into()), &["n1".into(), "n2".into()]);
        let v = serde_json::to_value(s).unwrap();
        assert_eq!(v["capability"], "payments");
        assert_eq!(v["term"], serde_json::Value::Null);
        assert_eq!(v["replicas"][1], json!({"node": "n2", "role": null, "lag": null}));
    }
}
