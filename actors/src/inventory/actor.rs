//! The inventory worker: applies requests to the [`Inventory`] model one at a time, writes what
//! changed in one batch, and answers after the group flush. A reaper tick releases expired
//! reservations, including those that expired while the node was down (it runs on start).

use std::time::Duration;

use bulkhead_cluster::Inbound;
use bulkhead_storage::{now_ms, Batch, Store, Table};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use uuid::Uuid;

use super::protocol::{InventoryReply, InventoryRequest};
use super::stock::{Changes, HoldState, Inventory, Reservation, Stock};
use crate::util::reply_after_sync;
use crate::WorkerArgs;

pub const STOCK: Table<String, Stock> = Table::new(1, "stock");
pub const RESERVATIONS: Table<Uuid, Reservation> = Table::new(2, "reservations");
/// Operations in progress: at most one survives a crash, and is completed at start-up.
pub const INTENTS: Table<Uuid, Intent> = Table::new(3, "intents");

/// The records one operation writes, as they are after it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Intent {
    pub stock: Vec<(String, Stock)>,
    pub reservations: Vec<(Uuid, Reservation)>,
}

impl bulkhead_storage::Record for Intent {
    const VERSION: u8 = 1;
}

impl Intent {
    fn write(&self, b: &mut Batch) {
        for (sku, s) in &self.stock {
            STOCK.put(b, sku, s);
        }
        for (id, r) in &self.reservations {
            RESERVATIONS.put(b, id, r);
        }
    }
}

/// Completes any operation a crash cut short (see `InventoryState::persist`).
pub fn recover(store: &bulkhead_storage::Store) -> Result<usize, bulkhead_storage::StoreError> {
    let intents: Vec<(Uuid, Intent)> = INTENTS.iter(store).collect::<Result<_, _>>()?;
    for (key, intent) in &intents {
        let mut b = Batch::new();
        intent.write(&mut b);
        INTENTS.remove(&mut b, key);
        store.apply_in_order(b)?;
    }
    Ok(intents.len())
}

#[derive(RactorMessage)]
pub enum InventoryMsg {
    Request(Inbound<InventoryRequest, InventoryReply>),
    Reap,
}

pub struct InventoryWorker;

pub struct InventoryState {
    args: WorkerArgs,
    model: Inventory,
}

impl InventoryState {
    fn store(&self) -> &Store {
        &self.args.store
    }

    /// Loads a finished reservation from disk into the model if the model does not know the order.
    fn ensure_loaded(&mut self, order: Uuid) -> Result<(), ActorProcessingErr> {
        if !self.model.reservations.contains_key(&order) {
            if let Some(r) = RESERVATIONS.get(self.store(), &order)? {
                self.model.reservations.insert(order, r);
            }
        }
        Ok(())
    }

    /// Writes what an operation changed, crash-safe without an atomic batch (which would cost a
    /// log write of its own in sled). The worker applies one operation at a time, so a crash can cut
    /// short at most the last one: first an intent holding the *new* records, then the records,
    /// then the intent's removal. At start-up a surviving intent is re-applied (its records are
    /// absolute values, so applying them again is harmless), which completes the operation.
    fn persist(&mut self, changes: &Changes) -> Result<(), ActorProcessingErr> {
        let mut intent = Intent::default();
        for sku in &changes.stock {
            if let Some(s) = self.model.stock.get(sku) {
                intent.stock.push((sku.clone(), s.clone()));
            }
        }
        for id in &changes.reservations {
            if let Some(r) = self.model.reservations.get(id) {
                intent.reservations.push((*id, r.clone()));
            }
        }
        if intent.stock.len() + intent.reservations.len() <= 1 {
            // One record is atomic by itself.
            let mut b = Batch::new();
            intent.write(&mut b);
            self.args.store.apply_in_order(b)?;
        } else {
            let key = Uuid::now_v7();
            let mut b = Batch::new();
            INTENTS.put(&mut b, &key, &intent);
            intent.write(&mut b);
            INTENTS.remove(&mut b, &key);
            self.args.store.apply_in_order(b)?;
        }
        // Finished reservations live on disk only; memory keeps what may still change.
        for id in &changes.reservations {
            if self.model.reservations.get(id).is_some_and(|r| r.state != HoldState::Held) {
                self.model.reservations.remove(id);
            }
        }
        Ok(())
    }

    fn handle_request(&mut self, req: InventoryRequest) -> Result<InventoryReply, ActorProcessingErr> {
        let now = now_ms();
        let (reply, changes) = match req {
            InventoryRequest::Reserve { order_id, items, ttl_ms } => {
                self.ensure_loaded(order_id)?;
                self.model.reserve(order_id, &items, now, ttl_ms)
            }
            InventoryRequest::Commit { order_id } => {
                self.ensure_loaded(order_id)?;
                self.model.commit(order_id)
            }
            InventoryRequest::Release { order_id } => {
                self.ensure_loaded(order_id)?;
                self.model.release(order_id, now)
            }
            InventoryRequest::Get { sku } => {
                let reply = self.model.view(&sku).map(InventoryReply::Stock).unwrap_or(InventoryReply::NotFound);
                (reply, Changes::default())
            }
            InventoryRequest::Set { sku, available, price_cents } => {
                let changes = self.model.set(&sku, available, price_cents);
                let view = self.model.view(&sku).map(InventoryReply::Stock).unwrap_or(InventoryReply::NotFound);
                (view, changes)
            }
            InventoryRequest::InjectPanic => {
                if self.args.fault_injection {
                    panic!("fault injection: inventory worker panics on request");
                }
                (InventoryReply::Refused("fault injection is disabled on this node".into()), Changes::default())
            }
        };
        self.persist(&changes)?;
        Ok(reply)
    }
}

impl Actor for InventoryWorker {
    type Msg = InventoryMsg;
    type State = InventoryState;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<InventoryMsg>,
        args: WorkerArgs,
    ) -> Result<InventoryState, ActorProcessingErr> {
        let completed = recover(&args.store)?;
        if completed > 0 {
            tracing::warn!(completed, "completed inventory operations interrupted by a crash");
        }
        let mut model = Inventory::default();
        for item in STOCK.iter(&args.store) {
            let (sku, s) = item?;
            model.stock.insert(sku, s);
        }
        for item in RESERVATIONS.iter(&args.store) {
            let (id, r) = item?;
            if r.state == HoldState::Held {
                model.reservations.insert(id, r);
            }
        }
        tracing::info!(skus = model.stock.len(), reservations = model.reservations.len(), "inventory loaded");
        myself.send_interval(Duration::from_secs(1), || InventoryMsg::Reap);
        let _ = myself.cast(InventoryMsg::Reap);
        Ok(InventoryState { args, model })
    }

    async fn handle(
        &self,
        _myself: ActorRef<InventoryMsg>,
        msg: InventoryMsg,
        state: &mut InventoryState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            InventoryMsg::Request(Inbound { req, reply, traceparent }) => {
                tracing::debug!(trace = bulkhead_cluster::wire::trace_id(&traceparent), request = ?req, "request");
                let answer = state.handle_request(req)?;
                reply_after_sync(state.store(), reply, answer);
            }
            InventoryMsg::Reap => {
                let (expired, changes) = state.model.expire(now_ms());
                if !expired.is_empty() {
                    tracing::info!(count = expired.len(), "released expired reservations");
                    state.persist(&changes)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::protocol::PricedLine;
    use bulkhead_storage::{Store, StoreOptions};

    /// A crash after the intent and part of its records: recovery completes the operation.
    #[tokio::test]
    async fn an_interrupted_operation_is_completed_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "inventory", &StoreOptions::default()).unwrap();
        let order = Uuid::from_u128(7);
        let before = Stock { available: 5, reserved: 0, sold: 0, price_cents: 10 };
        let after = Stock { available: 3, reserved: 2, sold: 0, price_cents: 10 };
        let hold = Reservation {
            lines: vec![PricedLine { sku: "a".into(), quantity: 2, unit_price_cents: 10 }],
            expires_ms: 99,
            state: HoldState::Held,
        };
        let mut b = Batch::new();
        STOCK.put(&mut b, &"a".to_string(), &before);
        let intent = Intent { stock: vec![("a".into(), after.clone())], reservations: vec![(order, hold.clone())] };
        INTENTS.put(&mut b, &Uuid::from_u128(1), &intent);
        // ... the crash came before the stock and reservation writes.
        store.commit(b).await.unwrap();
        assert_eq!(recover(&store).unwrap(), 1);
        assert_eq!(STOCK.get(&store, &"a".to_string()).unwrap(), Some(after.clone()));
        assert_eq!(RESERVATIONS.get(&store, &order).unwrap(), Some(hold));
        assert!(INTENTS.is_empty(&store));
        // Running it again changes nothing.
        assert_eq!(recover(&store).unwrap(), 0);
        assert_eq!(STOCK.get(&store, &"a".to_string()).unwrap(), Some(after));
    }
}
