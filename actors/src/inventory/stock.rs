//! The inventory state machine: stock per SKU and reservations per order, no I/O.
//!
//! Invariant for every SKU, whatever the interleaving: `initial = available + reserved + sold`
//! (`Set` redefines `initial`). A reservation takes all its lines or none, so concurrent orders for
//! the last unit cannot both win: the worker applies requests one at a time to this model.
//! Each operation returns the records it changed, which the worker writes in one batch.

use std::collections::{BTreeMap, HashMap};

use bulkhead_storage::Record;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::protocol::{InventoryReply, Item, PricedLine, StockView};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    pub price_cents: u64,
}

impl Record for Stock {
    const VERSION: u8 = 1;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldState {
    Held,
    Committed,
    Released,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub lines: Vec<PricedLine>,
    pub expires_ms: u64,
    pub state: HoldState,
}

impl Record for Reservation {
    const VERSION: u8 = 1;
}

/// The three places a unit of stock can be.
#[derive(Debug, Clone, Copy)]
enum Bucket {
    Available,
    Reserved,
    Sold,
}

impl Bucket {
    fn of(self, s: &mut Stock) -> &mut u64 {
        match self {
            Bucket::Available => &mut s.available,
            Bucket::Reserved => &mut s.reserved,
            Bucket::Sold => &mut s.sold,
        }
    }
}

/// What an operation changed, for the worker to persist.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub stock: Vec<String>,
    pub reservations: Vec<Uuid>,
}

#[derive(Debug, Default, Clone)]
pub struct Inventory {
    pub stock: BTreeMap<String, Stock>,
    pub reservations: HashMap<Uuid, Reservation>,
}

impl Inventory {
    pub fn view(&self, sku: &str) -> Option<StockView> {
        self.stock.get(sku).map(|s| StockView {
            sku: sku.to_string(),
            available: s.available,
            reserved: s.reserved,
            sold: s.sold,
            price_cents: s.price_cents,
        })
    }

    pub fn set(&mut self, sku: &str, available: u64, price_cents: u64) -> Changes {
        let s = self.stock.entry(sku.to_string()).or_default();
        s.available = available;
        s.price_cents = price_cents;
        Changes { stock: vec![sku.to_string()], reservations: vec![] }
    }

    /// Reserves all of `items` for `order`, or nothing. Repeating it returns the first answer.
    pub fn reserve(&mut self, order: Uuid, items: &[Item], now_ms: u64, ttl_ms: u64) -> (InventoryReply, Changes) {
        if let Some(r) = self.reservations.get_mut(&order) {
            return match r.state {
                HoldState::Held => {
                    // A repeat extends the hold: the saga touches its reservations before charging.
                    r.expires_ms = r.expires_ms.max(now_ms.saturating_add(ttl_ms));
                    let reply = InventoryReply::Reserved { lines: r.lines.clone(), expires_ms: r.expires_ms };
                    (reply, Changes { stock: vec![], reservations: vec![order] })
                }
                HoldState::Committed => {
                    (InventoryReply::Reserved { lines: r.lines.clone(), expires_ms: u64::MAX }, Changes::default())
                }
                HoldState::Released => (InventoryReply::AlreadyReleased, Changes::default()),
            };
        }
        // Merge duplicate SKUs so the check sees the order's whole demand.
        let mut want: BTreeMap<&str, u64> = BTreeMap::new();
        for it in items {
            *want.entry(it.sku.as_str()).or_default() += it.quantity;
        }
        for (sku, qty) in &want {
            let available = self.stock.get(*sku).map(|s| s.available).unwrap_or(0);
            if available < *qty {
                return (InventoryReply::OutOfStock { sku: sku.to_string(), available }, Changes::default());
            }
        }
        let mut lines = Vec::new();
        let mut changes = Changes::default();
        for (sku, qty) in want {
            let s = self.stock.get_mut(sku).expect("checked above");
            s.available -= qty;
            s.reserved += qty;
            lines.push(PricedLine { sku: sku.to_string(), quantity: qty, unit_price_cents: s.price_cents });
            changes.stock.push(sku.to_string());
        }
        self.reservations.insert(
            order,
            Reservation { lines: lines.clone(), expires_ms: now_ms.saturating_add(ttl_ms), state: HoldState::Held },
        );
        changes.reservations.push(order);
        (InventoryReply::Reserved { lines, expires_ms: now_ms.saturating_add(ttl_ms) }, changes)
    }

    /// Moves each line's quantity from one bucket to another; returns the SKUs touched.
    fn transfer(&mut self, lines: &[PricedLine], from: Bucket, to: Bucket) -> Vec<String> {
        let mut touched = Vec::new();
        for l in lines {
            if let Some(s) = self.stock.get_mut(&l.sku) {
                *from.of(s) -= l.quantity;
                *to.of(s) += l.quantity;
                touched.push(l.sku.clone());
            }
        }
        touched
    }

    /// Sets a reservation's state and reports the change.
    fn settle(&mut self, order: Uuid, state: HoldState, stock: Vec<String>) -> Changes {
        if let Some(r) = self.reservations.get_mut(&order) {
            r.state = state;
        }
        Changes { stock, reservations: vec![order] }
    }

    pub fn commit(&mut self, order: Uuid) -> (InventoryReply, Changes) {
        let failed = |reason: &str| (InventoryReply::CommitFailed { reason: reason.into() }, Changes::default());
        let Some(r) = self.reservations.get(&order) else { return failed("no reservation for this order") };
        let (state, lines) = (r.state, r.lines.clone());
        let touched = match state {
            HoldState::Committed => return (InventoryReply::Committed, Changes::default()),
            HoldState::Held => self.transfer(&lines, Bucket::Reserved, Bucket::Sold),
            // Expired before the confirmation arrived: take the stock again if it is still there.
            HoldState::Released => {
                if lines.iter().any(|l| self.stock.get(&l.sku).map(|s| s.available).unwrap_or(0) < l.quantity) {
                    return failed("reservation expired and the stock is gone");
                }
                self.transfer(&lines, Bucket::Available, Bucket::Sold)
            }
        };
        (InventoryReply::Committed, self.settle(order, HoldState::Committed, touched))
    }

    pub fn release(&mut self, order: Uuid, now_ms: u64) -> (InventoryReply, Changes) {
        let changes = match self.reservations.get(&order).map(|r| (r.state, r.lines.clone())) {
            None => {
                // Tombstone: a reservation still in flight for this order must not take stock later.
                self.reservations
                    .insert(order, Reservation { lines: vec![], expires_ms: now_ms, state: HoldState::Released });
                Changes { stock: vec![], reservations: vec![order] }
            }
            Some((HoldState::Held, lines)) => {
                let touched = self.transfer(&lines, Bucket::Reserved, Bucket::Available);
                self.settle(order, HoldState::Released, touched)
            }
            // Released already, or committed (a confirmed order is never un-sold by a stray release).
            Some(_) => Changes::default(),
        };
        (InventoryReply::Released, changes)
    }

    /// Releases every held reservation whose TTL has passed.
    pub fn expire(&mut self, now_ms: u64) -> (Vec<Uuid>, Changes) {
        let due: Vec<Uuid> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.state == HoldState::Held && r.expires_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        let mut all = Changes::default();
        for id in &due {
            let (_, c) = self.release(*id, now_ms);
            all.stock.extend(c.stock);
            all.reservations.extend(c.reservations);
        }
        (due, all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn item(sku: &str, q: u64) -> Item {
        Item { sku: sku.into(), quantity: q }
    }

    fn total(inv: &Inventory, sku: &str) -> u64 {
        let s = &inv.stock[sku];
        s.available + s.reserved + s.sold
    }

    #[test]
    fn reserve_commit_release_flow() {
        let mut inv = Inventory::default();
        inv.set("a", 5, 100);
        let o1 = Uuid::from_u128(1);
        let (r, _) = inv.reserve(o1, &[item("a", 2)], 0, 1000);
        assert_eq!(
            r,
            InventoryReply::Reserved {
                lines: vec![PricedLine { sku: "a".into(), quantity: 2, unit_price_cents: 100 }],
                expires_ms: 1000,
            }
        );
        // Repeating returns the same lines, takes nothing more, and extends the hold.
        let (r2, c2) = inv.reserve(o1, &[item("a", 2)], 500, 1000);
        assert_eq!(
            r2,
            InventoryReply::Reserved {
                lines: vec![PricedLine { sku: "a".into(), quantity: 2, unit_price_cents: 100 }],
                expires_ms: 1500
            }
        );
        assert!(c2.stock.is_empty());
        assert!(inv.expire(1499).0.is_empty());
        assert_eq!(inv.view("a").unwrap().available, 3);
        inv.commit(o1);
        assert_eq!((inv.stock["a"].reserved, inv.stock["a"].sold), (0, 2));
        // A stray release after commit changes nothing.
        inv.release(o1, 0);
        assert_eq!(inv.stock["a"].sold, 2);
    }

    #[test]
    fn all_or_nothing() {
        let mut inv = Inventory::default();
        inv.set("a", 5, 1);
        inv.set("b", 1, 1);
        let (r, _) = inv.reserve(Uuid::from_u128(1), &[item("a", 2), item("b", 2)], 0, 10);
        assert_eq!(r, InventoryReply::OutOfStock { sku: "b".into(), available: 1 });
        assert_eq!(inv.stock["a"].available, 5);
        // Duplicate lines count together.
        let (r, _) = inv.reserve(Uuid::from_u128(2), &[item("b", 1), item("b", 1)], 0, 10);
        assert!(matches!(r, InventoryReply::OutOfStock { .. }));
        // Unknown SKU is out of stock.
        let (r, _) = inv.reserve(Uuid::from_u128(3), &[item("zz", 1)], 0, 10);
        assert_eq!(r, InventoryReply::OutOfStock { sku: "zz".into(), available: 0 });
    }

    #[test]
    fn release_before_reserve_leaves_a_tombstone() {
        let mut inv = Inventory::default();
        inv.set("a", 5, 1);
        let o = Uuid::from_u128(9);
        inv.release(o, 0);
        let (r, _) = inv.reserve(o, &[item("a", 1)], 0, 10);
        assert_eq!(r, InventoryReply::AlreadyReleased);
        assert_eq!(inv.stock["a"].available, 5);
    }

    #[test]
    fn expiry_releases_and_late_commit_retakes_if_possible() {
        let mut inv = Inventory::default();
        inv.set("a", 1, 1);
        let (o1, o2) = (Uuid::from_u128(1), Uuid::from_u128(2));
        inv.reserve(o1, &[item("a", 1)], 0, 100);
        assert!(inv.expire(99).0.is_empty());
        assert_eq!(inv.expire(100).0, vec![o1]);
        assert_eq!(inv.stock["a"].available, 1);
        inv.reserve(o2, &[item("a", 1)], 100, 100);
        assert!(matches!(inv.commit(o1).0, InventoryReply::CommitFailed { .. }));
        assert_eq!(total(&inv, "a"), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Reserve(u8, Vec<(u8, u64)>),
        Commit(u8),
        Release(u8),
        Expire(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..20, proptest::collection::vec((0u8..3, 1u64..4), 1..3)).prop_map(|(o, i)| Op::Reserve(o, i)),
            (0u8..20).prop_map(Op::Commit),
            (0u8..20).prop_map(Op::Release),
            (0u64..200).prop_map(Op::Expire),
        ]
    }

    proptest! {
        /// Any interleaving of reservations, commits, releases and expiries: stock is conserved,
        /// nothing goes negative (u64 would panic), and sold never exceeds the initial stock.
        #[test]
        fn never_oversells(ops in proptest::collection::vec(op(), 1..200), initial in 0u64..6) {
            let mut inv = Inventory::default();
            for s in 0..3 { inv.set(&format!("s{s}"), initial, 10); }
            let mut now = 0;
            for op in ops {
                now += 1;
                match op {
                    Op::Reserve(o, items) => {
                        let items: Vec<Item> = items.into_iter().map(|(s, q)| item(&format!("s{s}"), q)).collect();
                        inv.reserve(Uuid::from_u128(o as u128), &items, now, 50);
                    }
                    Op::Commit(o) => { inv.commit(Uuid::from_u128(o as u128)); }
                    Op::Release(o) => { inv.release(Uuid::from_u128(o as u128), now); }
                    Op::Expire(t) => { inv.expire(now + t); }
                }
                for s in 0..3 {
                    let sku = format!("s{s}");
                    prop_assert_eq!(total(&inv, &sku), initial);
                }
            }
            // Reserved stock is exactly what held reservations hold.
            for s in 0..3 {
                let sku = format!("s{s}");
                let held: u64 = inv.reservations.values().filter(|r| r.state == HoldState::Held)
                    .flat_map(|r| r.lines.iter()).filter(|l| l.sku == sku).map(|l| l.quantity).sum();
                prop_assert_eq!(inv.stock[&sku].reserved, held);
            }
        }
    }
}
