//! The saga's records as version 1 laid them out (until 7 Dec 2026): an inventory shard was named
//! by its label, `inventory/<n>` ([`super::inventory_shard_label`]). Read into today's records; a label
//! that names no shard (no build since inventory became Raft groups on 30 Nov 2026 wrote one) is
//! a malformed record, not a guess.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{parse_inventory_shard, OutboxEvent, Phase, ShardState};
use crate::inventory::{Item, PricedLine};
use crate::orders::protocol::{CancelReason, HistoryEntry, OrderStatus};
use bulkhead_storage::CodecError;

fn shard(label: &str) -> Result<u32, CodecError> {
    parse_inventory_shard(label).ok_or_else(|| CodecError::Malformed(format!("`{label}` names no inventory shard")))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardStep {
    pub node: String,
    pub items: Vec<Item>,
    pub state: ShardState,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderRecord {
    pub id: Uuid,
    pub customer_id: String,
    pub items: Vec<Item>,
    pub payment_token: String,
    pub status: OrderStatus,
    pub reason: Option<String>,
    pub payment_id: Option<String>,
    pub lines: Vec<PricedLine>,
    pub total_cents: u64,
    pub phase: Phase,
    pub shards: Vec<ShardStep>,
    pub attempts: u32,
    pub retry_scheduled: bool,
    pub hold_until_ms: u64,
    pub hold_margin_ms: u64,
    pub charge_attempted: bool,
    pub last_wait: Option<String>,
    pub history: Vec<HistoryEntry>,
    pub created_ms: u64,
    pub traceparent: String,
}

impl TryFrom<OrderRecord> for super::OrderRecord {
    type Error = CodecError;
    fn try_from(o: OrderRecord) -> Result<Self, CodecError> {
        let shards = o
            .shards
            .into_iter()
            .map(|s| Ok(super::ShardStep { shard: shard(&s.node)?, items: s.items, state: s.state }))
            .collect::<Result<_, CodecError>>()?;
        Ok(super::OrderRecord {
            id: o.id,
            customer_id: o.customer_id,
            items: o.items,
            payment_token: o.payment_token,
            status: o.status,
            reason: o.reason.as_deref().map(CancelReason::from_old_text).transpose()?,
            payment_id: o.payment_id,
            lines: o.lines,
            total_cents: o.total_cents,
            phase: o.phase,
            shards,
            attempts: o.attempts,
            retry_scheduled: o.retry_scheduled,
            hold_until_ms: o.hold_until_ms,
            hold_margin_ms: o.hold_margin_ms,
            charge_attempted: o.charge_attempted,
            last_wait: o.last_wait,
            history: o.history,
            created_ms: o.created_ms,
            traceparent: o.traceparent,
        })
    }
}

/// Today's record as version 1 laid it out (for tests of the upgrade).
#[cfg(test)]
impl From<super::OrderRecord> for OrderRecord {
    fn from(o: super::OrderRecord) -> Self {
        let shards = o
            .shards
            .into_iter()
            .map(|s| ShardStep { node: super::inventory_shard_label(s.shard), items: s.items, state: s.state })
            .collect();
        OrderRecord {
            id: o.id,
            customer_id: o.customer_id,
            items: o.items,
            payment_token: o.payment_token,
            status: o.status,
            reason: o.reason.map(|r| r.as_str().to_string()),
            payment_id: o.payment_id,
            lines: o.lines,
            total_cents: o.total_cents,
            phase: o.phase,
            shards,
            attempts: o.attempts,
            retry_scheduled: o.retry_scheduled,
            hold_until_ms: o.hold_until_ms,
            hold_margin_ms: o.hold_margin_ms,
            charge_attempted: o.charge_attempted,
            last_wait: o.last_wait,
            history: o.history,
            created_ms: o.created_ms,
            traceparent: o.traceparent,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Dest {
    Inventory { node: String },
    Payments,
    Shipping,
    Notifications,
}

/// Today's entry as version 1 laid it out (for tests of the upgrade).
#[cfg(test)]
impl From<super::OutboxEntry> for OutboxEntry {
    fn from(e: super::OutboxEntry) -> Self {
        let dest = match e.dest {
            super::Dest::Inventory { shard } => Dest::Inventory { node: super::inventory_shard_label(shard) },
            super::Dest::Payments => Dest::Payments,
            super::Dest::Shipping => Dest::Shipping,
            super::Dest::Notifications => Dest::Notifications,
        };
        OutboxEntry { dest, event: e.event, order_id: e.order_id, created_ms: e.created_ms, traceparent: e.traceparent }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub dest: Dest,
    pub event: OutboxEvent,
    pub order_id: Uuid,
    pub created_ms: u64,
    pub traceparent: String,
}

impl TryFrom<OutboxEntry> for super::OutboxEntry {
    type Error = CodecError;
    fn try_from(e: OutboxEntry) -> Result<Self, CodecError> {
        let dest = match e.dest {
            Dest::Inventory { node } => super::Dest::Inventory { shard: shard(&node)? },
            Dest::Payments => super::Dest::Payments,
            Dest::Shipping => super::Dest::Shipping,
            Dest::Notifications => super::Dest::Notifications,
        };
        Ok(super::OutboxEntry {
            dest,
            event: e.event,
            order_id: e.order_id,
            created_ms: e.created_ms,
            traceparent: e.traceparent,
        })
    }
}
