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

    fn persist(&mut self, changes: &Changes) -> Result<(), ActorProcessingErr> {
        let mut b = Batch::new();
        for sku in &changes.stock {
            if let Some(s) = self.model.stock.get(sku) {
                STOCK.put(&mut b, sku, s);
            }
        }
        for id in &changes.reservations {
            if let Some(r) = self.model.reservations.get(id) {
                RESERVATIONS.put(&mut b, id, r);
            }
        }
        self.args.store.apply(b)?;
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
