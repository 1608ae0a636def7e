//! Inventory as a Raft group applies it: each committed command loads the records it touches
//! into the pure [`Inventory`] model, runs the model, and writes back what changed, alike on every
//! replica. The leader puts the group's time into the command. Holds no longer expire on a clock
//! (they end with their saga); `Expire` and the expiry index are kept so that logs written before
//! still apply the same on every replica.

use bulkhead_cluster::raft::Machine;
use bulkhead_storage::{Batch, Record, Store, StoreError, Table};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::protocol::{InventoryReply, Item};
use super::stock::{Changes, HoldState, Inventory, Reservation, Stock};

pub const STOCK: Table<String, Stock> = Table::new(1, "stock");
pub const RESERVATIONS: Table<Uuid, Reservation> = Table::new(2, "reservations");
/// Held reservations by `(expires_ms, order)`: the expiry index the reaper used to read; still
/// maintained by apply (removing it would change what old log entries write), read by nobody.
pub const HELD_UNTIL: Table<(u64, Uuid), Held> = Table::new(4, "held_until");

/// A marker of the expiry index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held;
impl Record for Held {
    const VERSION: u8 = 1;
}

/// A change to inventory (replicated, versioned; append variants at the end only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InventoryCommand {
    Reserve {
        order_id: Uuid,
        items: Vec<Item>,
        ttl_ms: u64,
        now_ms: u64,
    },
    Commit {
        order_id: Uuid,
    },
    Release {
        order_id: Uuid,
        now_ms: u64,
    },
    Set {
        sku: String,
        available: u64,
        price_cents: u64,
    },
    /// Release these holds if they are still held and expired at `now_ms`. No longer proposed
    /// (holds end with their saga); kept so that entries already in a log still apply.
    Expire {
        order_ids: Vec<Uuid>,
        now_ms: u64,
    },
}
impl Record for InventoryCommand {
    const VERSION: u8 = 1;
}

/// Applies [`InventoryCommand`]s with the rules of [`Inventory`].
pub struct InventoryMachine;

/// The records a command reads (through the writes `batch` already holds), loaded into a model
/// of just those.
fn load(store: &Store, batch: &Batch, skus: &[String], orders: &[Uuid]) -> Result<Inventory, StoreError> {
    let mut model = Inventory::default();
    for order in orders {
        if let Some(r) = RESERVATIONS.get_through(store, batch, order)? {
            model.reservations.insert(*order, r);
        }
    }
    let held_skus: Vec<String> =
        model.reservations.values().flat_map(|r| r.lines.iter().map(|l| l.sku.clone())).collect();
    for sku in skus.iter().cloned().chain(held_skus) {
        if let std::collections::btree_map::Entry::Vacant(slot) = model.stock.entry(sku) {
            if let Some(s) = STOCK.get_through(store, batch, slot.key())? {
                slot.insert(s);
            }
        }
    }
    Ok(model)
}

/// Queues the records `changes` names, as they are in `model`, and keeps the expiry index true.
fn write(store: &Store, batch: &mut Batch, model: &Inventory, changes: &Changes) -> Result<(), StoreError> {
    for sku in &changes.stock {
        if let Some(s) = model.stock.get(sku) {
            STOCK.put(batch, sku, s);
        }
    }
    for id in &changes.reservations {
        let Some(after) = model.reservations.get(id) else { continue };
        if let Some(before) = RESERVATIONS.get_through(store, batch, id)?.filter(|r| r.state == HoldState::Held) {
            HELD_UNTIL.remove(batch, &(before.expires_ms, *id));
        }
        if after.state == HoldState::Held {
            HELD_UNTIL.put(batch, &(after.expires_ms, *id), &Held);
        }
        RESERVATIONS.put(batch, id, after);
    }
    Ok(())
}

impl Machine for InventoryMachine {
    type Command = InventoryCommand;
    type Reply = InventoryReply;

    fn apply(&self, store: &Store, batch: &mut Batch, cmd: InventoryCommand) -> Result<InventoryReply, StoreError> {
        let (model, reply, changes) = match cmd {
            InventoryCommand::Reserve { order_id, items, ttl_ms, now_ms } => {
                let skus: Vec<String> = items.iter().map(|i| i.sku.clone()).collect();
                let mut m = load(store, batch, &skus, &[order_id])?;
                let (reply, changes) = m.reserve(order_id, &items, now_ms, ttl_ms);
                (m, reply, changes)
            }
            InventoryCommand::Commit { order_id } => {
                let mut m = load(store, batch, &[], &[order_id])?;
                let (reply, changes) = m.commit(order_id);
                (m, reply, changes)
            }
            InventoryCommand::Release { order_id, now_ms } => {
                let mut m = load(store, batch, &[], &[order_id])?;
                let (reply, changes) = m.release(order_id, now_ms);
                (m, reply, changes)
            }
            InventoryCommand::Set { sku, available, price_cents } => {
                let mut m = load(store, batch, std::slice::from_ref(&sku), &[])?;
                let changes = m.set(&sku, available, price_cents);
                let reply = m.view(&sku).map(InventoryReply::Stock).unwrap_or(InventoryReply::NotFound);
                (m, reply, changes)
            }
            InventoryCommand::Expire { order_ids, now_ms } => {
                let mut m = load(store, batch, &[], &order_ids)?;
                let (expired, changes) = m.expire(now_ms);
                if !expired.is_empty() {
                    tracing::info!(count = expired.len(), "released expired reservations");
                }
                (m, InventoryReply::Released, changes)
            }
        };
        write(store, batch, &model, &changes)?;
        Ok(reply)
    }

    fn time_of(&self, cmd: &InventoryCommand) -> Option<u64> {
        match cmd {
            InventoryCommand::Reserve { now_ms, .. }
            | InventoryCommand::Release { now_ms, .. }
            | InventoryCommand::Expire { now_ms, .. } => Some(*now_ms),
            InventoryCommand::Commit { .. } | InventoryCommand::Set { .. } => None,
        }
    }
}

/// The stock of `sku` as this replica has applied it.
pub fn view(store: &Store, sku: &str) -> Result<InventoryReply, StoreError> {
    let m = load(store, &Batch::new(), &[sku.to_string()], &[])?;
    Ok(m.view(sku).map(InventoryReply::Stock).unwrap_or(InventoryReply::NotFound))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_storage::StoreOptions;

    fn item(sku: &str, q: u64) -> Item {
        Item { sku: sku.into(), quantity: q }
    }

    fn cmds() -> Vec<InventoryCommand> {
        let o = Uuid::from_u128;
        vec![
            InventoryCommand::Set { sku: "a".into(), available: 5, price_cents: 10 },
            InventoryCommand::Set { sku: "b".into(), available: 1, price_cents: 20 },
            InventoryCommand::Reserve {
                order_id: o(1),
                items: vec![item("a", 2), item("b", 1)],
                ttl_ms: 100,
                now_ms: 0,
            },
            InventoryCommand::Reserve { order_id: o(2), items: vec![item("b", 1)], ttl_ms: 100, now_ms: 1 },
            InventoryCommand::Reserve { order_id: o(3), items: vec![item("a", 3)], ttl_ms: 100, now_ms: 2 },
            InventoryCommand::Commit { order_id: o(1) },
            InventoryCommand::Release { order_id: o(4), now_ms: 3 },
            InventoryCommand::Reserve { order_id: o(4), items: vec![item("a", 1)], ttl_ms: 100, now_ms: 4 },
            InventoryCommand::Expire { order_ids: vec![o(3)], now_ms: 50 },
            InventoryCommand::Expire { order_ids: vec![o(3)], now_ms: 200 },
        ]
    }

    /// Applies the log one batch per entry, or (`one_batch`) every entry in one batch, as the
    /// Raft adapter does with the entries of one apply call.
    fn replay(
        dir: &std::path::Path,
        name: &str,
        one_batch: bool,
    ) -> (Vec<InventoryReply>, Vec<(String, Stock)>, Vec<Uuid>) {
        let store = Store::open(dir, name, &StoreOptions::default()).unwrap();
        let mut replies = vec![];
        let mut b = Batch::new();
        for c in cmds() {
            replies.push(InventoryMachine.apply(&store, &mut b, c).unwrap());
            if !one_batch {
                store.apply(std::mem::take(&mut b)).unwrap();
            }
        }
        store.apply(b).unwrap();
        let stock = STOCK.iter(&store).collect::<Result<Vec<_>, _>>().unwrap();
        let held = HELD_UNTIL.iter(&store).map(|r| r.map(|((_, id), _)| id)).collect::<Result<Vec<_>, _>>().unwrap();
        (replies, stock, held)
    }

    /// Replicas replaying one log agree, however the entries are batched; stock is conserved; the expiry index holds exactly the
    /// reservations still held.
    #[tokio::test]
    async fn replicas_replaying_one_log_agree() {
        let dir = tempfile::tempdir().unwrap();
        let a = replay(dir.path(), "a", false);
        assert_eq!(a, replay(dir.path(), "b", false));
        assert_eq!(a, replay(dir.path(), "c", true), "one batch for the whole log reads through its own writes");
        let (replies, stock, held) = a;
        assert!(matches!(replies[3], InventoryReply::OutOfStock { .. }), "b has one unit, taken by order 1");
        assert_eq!(replies[7], InventoryReply::AlreadyReleased, "a release tombstone refuses the late reserve");
        let a_stock = &stock.iter().find(|(s, _)| s == "a").unwrap().1;
        assert_eq!((a_stock.available, a_stock.reserved, a_stock.sold), (3, 0, 2), "order 3 expired at 200, not at 50");
        assert!(held.is_empty(), "{held:?}");
    }
}
