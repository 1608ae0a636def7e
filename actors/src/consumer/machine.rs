//! The consumers' replicated state machine: an `OrderConfirmed` delivery, deduplicated by event
//! id (and by order, for shipping), applied alike on every replica. The leader puts the time and
//! the new delivery's id into the command.

use bulkhead_cluster::raft::Machine;
use bulkhead_storage::{Batch, Record, Store, StoreError, Table};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::protocol::{ConsumerReply, Delivery, OrderConfirmed};
use crate::capability::Capability;

/// What a capability makes of a confirmed order; also the consumer `Service` of shipping or of
/// notifications (`super::actor`).
#[derive(Clone, Copy)]
pub struct Making {
    /// `shipping` or `notifications`.
    pub kind: &'static str,
    /// One per order (shipping) rather than one per event (notifications).
    pub one_per_order: bool,
    pub detail: fn(&OrderConfirmed) -> String,
}

impl Making {
    pub fn capability(&self) -> Capability {
        if self.kind == "shipping" {
            Capability::Shipping
        } else {
            Capability::Notifications
        }
    }
}

/// Event ids already handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub at_ms: u64,
}
impl Record for Seen {
    const VERSION: u8 = 1;
}

pub const SEEN: Table<Uuid, Seen> = Table::new(1, "seen_events");
/// Deliveries by `(order id, delivery id)`: one prefix scan lists an order's deliveries.
pub const DELIVERIES: Table<String, Delivery> = Table::new(2, "deliveries");

/// A change to a consumer's tables (replicated, versioned; append variants at the end only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsumerCommand {
    Deliver { event: OrderConfirmed, now_ms: u64, delivery_id: Uuid },
}
impl Record for ConsumerCommand {
    const VERSION: u8 = 1;
}

/// The key of a delivery: one per order (shipping) or one per event (notifications).
pub fn delivery_key(making: &Making, ev: &OrderConfirmed) -> String {
    let suffix = if making.one_per_order { making.kind.to_string() } else { ev.event_id.simple().to_string() };
    format!("{}/{suffix}", ev.order_id.simple())
}

/// Applies [`ConsumerCommand`]s for one kind of consumer.
pub struct ConsumerMachine {
    pub making: Making,
}

impl Machine for ConsumerMachine {
    type Command = ConsumerCommand;
    type Reply = ConsumerReply;

    fn apply(&self, store: &Store, batch: &mut Batch, cmd: ConsumerCommand) -> Result<ConsumerReply, StoreError> {
        let ConsumerCommand::Deliver { event: ev, now_ms, delivery_id } = cmd;
        let m = &self.making;
        let k = delivery_key(m, &ev);
        let duplicate = SEEN.get_through(store, batch, &ev.event_id)?.is_some()
            || DELIVERIES.get_through(store, batch, &k)?.is_some();
        if !duplicate {
            let prefix = if m.kind == "shipping" { "shp" } else { "ntf" };
            let d = Delivery {
                id: format!("{prefix}_{}", delivery_id.simple()),
                order_id: ev.order_id,
                event_id: ev.event_id,
                kind: m.kind.to_string(),
                detail: (m.detail)(&ev),
                created_ms: now_ms,
            };
            DELIVERIES.put(batch, &k, &d);
        }
        SEEN.put(batch, &ev.event_id, &Seen { at_ms: now_ms });
        Ok(ConsumerReply::Accepted { duplicate })
    }

    fn time_of(&self, cmd: &ConsumerCommand) -> Option<u64> {
        let ConsumerCommand::Deliver { now_ms, .. } = cmd;
        Some(*now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_storage::StoreOptions;

    fn ev(order: u128, event: u128) -> OrderConfirmed {
        OrderConfirmed {
            event_id: Uuid::from_u128(event),
            order_id: Uuid::from_u128(order),
            customer_id: "c".into(),
            lines: vec![],
            total_cents: 5,
            payment_id: "pay_1".into(),
        }
    }

    fn replay(dir: &std::path::Path, name: &str) -> (Vec<ConsumerReply>, Vec<(String, Delivery)>) {
        let store = Store::open(dir, name, &StoreOptions::default()).unwrap();
        let machine = ConsumerMachine { making: crate::shipping::MAKING };
        let cmds = [ev(1, 10), ev(1, 10), ev(1, 11), ev(2, 20)];
        let mut replies = vec![];
        for (i, event) in cmds.into_iter().enumerate() {
            let cmd =
                ConsumerCommand::Deliver { event, now_ms: i as u64, delivery_id: Uuid::from_u128(100 + i as u128) };
            let mut b = Batch::new();
            replies.push(machine.apply(&store, &mut b, cmd).unwrap());
            store.apply(b).unwrap();
        }
        (replies, DELIVERIES.iter(&store).collect::<Result<Vec<_>, _>>().unwrap())
    }

    /// Replicas replaying one log agree; a redelivered event, or a second event of a shipped
    /// order, makes no second shipment.
    #[tokio::test]
    async fn replicas_replaying_one_log_agree_and_ship_once_per_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = replay(dir.path(), "a");
        assert_eq!(a, replay(dir.path(), "b"));
        let dup = |d| ConsumerReply::Accepted { duplicate: d };
        assert_eq!(a.0, vec![dup(false), dup(true), dup(true), dup(false)]);
        assert_eq!(a.1.len(), 2);
    }
}
