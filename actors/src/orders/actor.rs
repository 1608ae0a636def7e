//! The orders worker: places orders, drives every unfinished saga, answers waiting clients.
//!
//! The worker is a thin shell around [`saga::step`]: it turns requests and call results into saga
//! events, persists the order after every step (saga state lives in the store, not in memory), and
//! carries out the commands (cross-node calls run in their own tasks and come back as messages, so
//! the worker never waits on a peer). Clients are answered once the saga is terminal or the wait
//! budget is spent (then `pending`), always after the flush covering the answer.

use std::collections::HashMap;
use std::time::Duration;

use bulkhead_cluster::wire::{child_traceparent, new_traceparent, trace_id};
use bulkhead_cluster::{Capability, Cluster, Inbound};
use bulkhead_storage::{now_ms, Batch, IdemRecord, Idempotency, Record, Table};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::outbox::{OutboxEntry, OutboxMsg, OUTBOX, RELAY_NAME};
use super::protocol::{OrderStatus, OrdersReply, OrdersRequest, PlaceOrder};
use super::saga::{self, ChargeOutcome, Command, Event, OrderRecord, ReserveOutcome};
use crate::inventory::{InventoryReply, InventoryRequest, Item};
use crate::payments::{PaymentReply, PaymentRequest};
use crate::util::{jitter, reply_after_sync};
use crate::WorkerArgs;

pub const ORDERS: Table<Uuid, OrderRecord> = Table::new(1, "orders");
/// Index of unfinished orders: what to resume after a restart without scanning every order.
pub const UNFINISHED: Table<Uuid, Unfinished> = Table::new(2, "unfinished");
pub const IDEMPOTENCY: Idempotency = Idempotency::new(5, 6);
/// Keys whose home is another orders node, witnessed here before that node took them.
///
/// Why: with an Idempotency-Key a request must meet the one store that may already hold the key,
/// its home. When the home is down, its successor (the next orders node in the list) may place the
/// order instead, but only if the home never took the key, or one key could end up as two orders
/// (two charges). So the front asks the successor to witness every key before the home takes it;
/// the successor then refuses (`Elsewhere`, 503) exactly the keys the dead home may hold, and
/// places the others itself. A key the successor placed itself answers `OwnedHere` to a later
/// witness request, so the front sends the retry there. Safe against any single fault; a key taken
/// by its home while the successor was also unreachable is not witnessed (counted, logged).
pub const WITNESSES: Table<String, WitnessRecord> = Table::new(8, "witnesses");
/// Witnesses are kept as long as idempotency records.
const WITNESS_TTL_MS: u64 = 24 * 3600 * 1000;
/// Keys the other orders node must still be told about: keys this node took as their home without
/// the successor's witness (`node` = the successor), and keys it placed as successor while their
/// home was down (`node` = the home, which then refuses them with `Elsewhere`). Retried every second
/// while `node` is reachable.
pub const UNWITNESSED: Table<String, PendingWitness> = Table::new(9, "unwitnessed");

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingWitness {
    pub since_ms: u64,
    /// Where the witness must be recorded.
    pub node: String,
}
impl Record for PendingWitness {
    const VERSION: u8 = 1;
}

/// Keys found placed on both orders nodes (by the repair): should stay 0. `/metrics` shows it and
/// the chaos checker reads it.
pub static DUPLICATE_KEYS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Keys per repair round, and witness requests in flight at once within it.
const REPAIR_BATCH: usize = 512;
const REPAIR_CONCURRENCY: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WitnessRecord {
    pub owner: String,
    pub at_ms: u64,
}
impl Record for WitnessRecord {
    const VERSION: u8 = 1;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Unfinished {
    pub since_ms: u64,
}
impl Record for Unfinished {
    const VERSION: u8 = 1;
}

/// A new order id: a UUIDv7 (time-ordered keys) whose last byte names the home orders node
/// (its index in `[capabilities.orders] nodes`), so any node can route a lookup by id alone.
pub fn new_order_id(home_index: u8) -> Uuid {
    let mut b = *Uuid::now_v7().as_bytes();
    b[15] = home_index;
    Uuid::from_bytes(b)
}

/// Removes idempotency records and witnesses older than a day (every 10 minutes, off the runtime).
fn sweep(store: &bulkhead_storage::Store) -> Result<(), bulkhead_storage::StoreError> {
    let n = IDEMPOTENCY.sweep(store, now_ms())?;
    if n > 0 {
        tracing::info!(removed = n, "swept expired idempotency records");
    }
    let cutoff = now_ms().saturating_sub(WITNESS_TTL_MS);
    let mut b = Batch::new();
    let mut n = 0;
    for item in WITNESSES.iter(store) {
        let (key, w) = item?;
        if w.at_ms < cutoff {
            WITNESSES.remove(&mut b, &key);
            n += 1;
        }
    }
    if n > 0 {
        store.apply_in_order(b)?;
        tracing::info!(removed = n, "swept expired witnesses");
    }
    Ok(())
}

/// The orders node after `node` in `[capabilities.orders] nodes` (cyclic): where `node`'s keys are
/// witnessed. `None` when orders runs on one node only.
pub fn successor_of(cluster: &Cluster, node: &str) -> Option<String> {
    let nodes = cluster.config().capabilities.nodes(Capability::Orders);
    let i = nodes.iter().position(|n| n == node)?;
    Some(nodes[(i + 1) % nodes.len()].clone()).filter(|s| s != node)
}

/// The home orders node of an order id, under `cluster`'s shard map.
pub fn home_of(cluster: &Cluster, id: &Uuid) -> Option<String> {
    let nodes = cluster.config().capabilities.nodes(Capability::Orders);
    nodes.get(id.as_bytes()[15] as usize).cloned()
}

#[derive(RactorMessage)]
pub enum OrdersMsg {
    Request(Inbound<OrdersRequest, OrdersReply>),
    Saga {
        order_id: Uuid,
        event: Event,
    },
    WaitOver {
        order_id: Uuid,
        waiter: u64,
    },
    /// The orders store could not flush: the worker fails, and its restart resumes from the store.
    FlushFailed(String),
    Sweep,
    /// Time to get the keys in `UNWITNESSED` witnessed by the successor.
    WitnessRepair,
    /// The successor answered a repair request for `key`: `duplicate` when it had placed an order
    /// under that key itself.
    RepairDone {
        key: String,
        duplicate: bool,
    },
    /// A repair round ended (the next may start).
    RepairRoundOver,
}

pub struct OrdersWorker;

pub struct OrdersState {
    args: WorkerArgs,
    home_index: u8,
    sagas: HashMap<Uuid, OrderRecord>,
    waiters: HashMap<Uuid, Vec<(u64, RpcReplyPort<OrdersReply>)>>,
    next_waiter: u64,
    /// A witness repair round is in flight (one at a time).
    repairing: bool,
}

impl OrdersState {
    fn cluster(&self) -> &Cluster {
        &self.args.cluster
    }

    fn put_order(&self, o: &OrderRecord) -> Result<(), ActorProcessingErr> {
        let mut b = Batch::new();
        ORDERS.put(&mut b, &o.id, o);
        Ok(self.args.store.apply(b)?)
    }

    fn wait_for(
        &mut self,
        myself: &ActorRef<OrdersMsg>,
        order_id: Uuid,
        wait_ms: u64,
        reply: RpcReplyPort<OrdersReply>,
    ) {
        let w = self.next_waiter;
        self.next_waiter += 1;
        self.waiters.entry(order_id).or_default().push((w, reply));
        myself.send_after(Duration::from_millis(wait_ms), move || OrdersMsg::WaitOver { order_id, waiter: w });
    }

    /// Answers for an order that already exists (an idempotent replay, or a lookup).
    fn answer_existing(
        &mut self,
        myself: &ActorRef<OrdersMsg>,
        order_id: Uuid,
        wait_ms: Option<u64>,
        reply: RpcReplyPort<OrdersReply>,
    ) -> Result<(), ActorProcessingErr> {
        if self.sagas.contains_key(&order_id) {
            match wait_ms {
                Some(ms) => self.wait_for(myself, order_id, ms, reply),
                None => reply_after_sync(&self.args.store, reply, OrdersReply::Order(self.sagas[&order_id].view())),
            }
            return Ok(());
        }
        let answer = match ORDERS.get(&self.args.store, &order_id)? {
            Some(o) => OrdersReply::Order(o.view()),
            None => OrdersReply::NotFound,
        };
        reply_after_sync(&self.args.store, reply, answer);
        Ok(())
    }

    fn place(
        &mut self,
        myself: &ActorRef<OrdersMsg>,
        p: PlaceOrder,
        witnessed: bool,
        traceparent: String,
        reply: RpcReplyPort<OrdersReply>,
    ) -> Result<(), ActorProcessingErr> {
        let mut id = new_order_id(self.home_index);
        let now = now_ms();
        if let Some(ik) = &p.idempotency {
            if let Some(w) = WITNESSES.get(&self.args.store, &ik.key)? {
                reply_after_sync(&self.args.store, reply, OrdersReply::Elsewhere { owner: w.owner });
                return Ok(());
            }
            let claim = IdemRecord { body_hash: ik.body_hash, result: id.as_bytes().to_vec(), created_ms: now };
            if let Some(prev) = IDEMPOTENCY.claim(&self.args.store, &ik.key, &claim)? {
                let prev_id = Uuid::from_slice(&prev.result).unwrap_or_default();
                if prev.body_hash != ik.body_hash {
                    reply_after_sync(&self.args.store, reply, OrdersReply::IdempotencyConflict { order_id: prev_id });
                    return Ok(());
                }
                if self.sagas.contains_key(&prev_id) || ORDERS.get(&self.args.store, &prev_id)?.is_some() {
                    return self.answer_existing(myself, prev_id, Some(p.wait_ms), reply);
                }
                // The key was claimed but the node stopped before the order was written (the claim
                // and the order are two writes): place the order now, under the id the key promised.
                tracing::warn!(order_id = %prev_id, "idempotency key claimed without its order; placing it now");
                id = prev_id;
            }
        }
        // Split the items over the inventory shards that own their SKUs. The saga's `node` of a
        // shard step is the shard's label ([`inventory_shard_label`]): a Raft group, led wherever.
        let mut shards: Vec<(String, Vec<Item>)> = Vec::new();
        for it in &p.items {
            let node = inventory_shard_label(self.cluster().shard_of(Capability::Inventory, it.sku.as_bytes()));
            match shards.iter_mut().find(|(n, _)| *n == node) {
                Some((_, items)) => items.push(it.clone()),
                None => shards.push((node, vec![it.clone()])),
            }
        }
        let mut order = saga::new_order(id, p.customer_id, p.items, p.payment_token, shards, now);
        order.traceparent = traceparent;
        // In this order, so any prefix a crash leaves is safe: an `UNFINISHED` mark without its
        // order is dropped at start-up; an order is never written without its mark.
        let mut b = Batch::new();
        if let Some(ik) = &p.idempotency {
            let me = self.cluster().name().to_string();
            let home = self.cluster().owner(Capability::Orders, ik.key.as_bytes()).unwrap_or_else(|| me.clone());
            let tell = if home != me {
                // Placed as the successor while the home was down: the home must learn the key is here.
                Some(home)
            } else if !witnessed {
                successor_of(self.cluster(), &me)
            } else {
                None
            };
            if let Some(node) = tell {
                // Announced before anything is acknowledged: heartbeats carry it from now on.
                let mut owes = self.cluster().owes();
                owes.insert(node.clone());
                self.cluster().set_owes(owes);
                UNWITNESSED.put(&mut b, &ik.key, &PendingWitness { since_ms: now, node });
            }
        }
        UNFINISHED.put(&mut b, &id, &Unfinished { since_ms: now });
        ORDERS.put(&mut b, &id, &order);
        self.args.store.apply_in_order(b)?;
        tracing::debug!(order_id = %id, trace = trace_id(&order.traceparent), "order created");
        self.sagas.insert(id, order);
        self.wait_for(myself, id, p.wait_ms, reply);
        // No peer hears of the order (no reservation, no charge) before it is durable here:
        // otherwise a crash could leave a charge for an order that does not exist.
        let me = myself.clone();
        self.args.store.after_sync(move |result| match result {
            Ok(()) => {
                let _ = me.cast(OrdersMsg::Saga { order_id: id, event: Event::Start });
            }
            // The saga resumes from the store after a restart, if the write made it at all.
            // Fail the worker: its restart resumes every saga from what the store really holds.
            Err(e) => {
                let _ = me.cast(OrdersMsg::FlushFailed(e.to_string()));
            }
        });
        Ok(())
    }

    /// Announces (in heartbeats) who is still owed a hand-off, read from `UNWITNESSED` itself, so
    /// it is right after a restart too.
    fn publish_owes(&self) -> Result<(), ActorProcessingErr> {
        let mut owes = std::collections::BTreeSet::new();
        for item in UNWITNESSED.iter(&self.args.store) {
            owes.insert(item?.1.node);
        }
        self.cluster().set_owes(owes);
        Ok(())
    }

    /// Gets the keys in `UNWITNESSED` witnessed where they must be, a batch per round, only while
    /// that node is reachable.
    fn repair_witnesses(&mut self, myself: &ActorRef<OrdersMsg>) -> Result<(), ActorProcessingErr> {
        if self.repairing {
            return Ok(());
        }
        self.publish_owes()?;
        if UNWITNESSED.is_empty(&self.args.store) {
            return Ok(());
        }
        let mut batch = Vec::new();
        for item in UNWITNESSED.iter(&self.args.store).take(REPAIR_BATCH) {
            let (key, pending) = item?;
            if self.cluster().is_routable(Capability::Orders, &pending.node) {
                batch.push((key, pending.node));
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.repairing = true;
        let me = self.cluster().name().to_string();
        let (cluster, me_ref) = (self.cluster().clone(), myself.clone());
        tokio::spawn(async move {
            use futures::StreamExt;
            let answers = futures::stream::iter(batch)
                .map(|(key, node)| {
                    let (cluster, me) = (cluster.clone(), me.clone());
                    async move {
                        let req = OrdersRequest::Witness { key: key.clone(), owner: me };
                        let r =
                            cluster.call::<_, OrdersReply>(Capability::Orders, &node, &req, &new_traceparent()).await;
                        (key, r)
                    }
                })
                .buffer_unordered(REPAIR_CONCURRENCY);
            futures::pin_mut!(answers);
            while let Some((key, r)) = answers.next().await {
                let duplicate = match r {
                    Ok(OrdersReply::Witnessed) => false,
                    Ok(OrdersReply::OwnedHere) => true,
                    // Unreachable again, or an odd answer: a later round tries again.
                    _ => continue,
                };
                let _ = me_ref.cast(OrdersMsg::RepairDone { key, duplicate });
            }
            let _ = me_ref.cast(OrdersMsg::RepairRoundOver);
        });
        Ok(())
    }

    fn on_saga_event(
        &mut self,
        myself: &ActorRef<OrdersMsg>,
        order_id: Uuid,
        event: Event,
    ) -> Result<(), ActorProcessingErr> {
        let Some(order) = self.sagas.get_mut(&order_id) else { return Ok(()) };
        let before = order.clone();
        let cmds = saga::step(order, event, now_ms(), jitter());
        if *order != before && !cmds.contains(&Command::Finish) {
            let o = order.clone();
            self.put_order(&o)?;
        }
        self.execute(myself, order_id, cmds)
    }

    fn execute(
        &mut self,
        myself: &ActorRef<OrdersMsg>,
        order_id: Uuid,
        cmds: Vec<Command>,
    ) -> Result<(), ActorProcessingErr> {
        let ttl_ms = self.cluster().config().timing.reservation_ttl_ms;
        let parent = self.sagas.get(&order_id).map(|o| o.traceparent.clone()).unwrap_or_default();
        for cmd in cmds {
            let (cluster, me) = (self.cluster().clone(), myself.clone());
            let tp = child_traceparent(&parent);
            match cmd {
                Command::Reserve { node, items } => {
                    tokio::spawn(async move {
                        let req = InventoryRequest::Reserve { order_id, items, ttl_ms };
                        let t = Duration::from_millis(cluster.config().timing.call_timeout_ms);
                        let reply = match parse_inventory_shard(&node) {
                            Some(shard) => {
                                cluster
                                    .call_leader::<_, InventoryReply>(Capability::Inventory, shard, &req, &tp, t)
                                    .await
                            }
                            None => Ok(InventoryReply::Unavailable(format!("`{node}` is not an inventory shard"))),
                        };
                        let outcome = match reply {
                            Ok(InventoryReply::Reserved { lines, expires_ms }) => {
                                ReserveOutcome::Reserved { lines, expires_ms }
                            }
                            Ok(InventoryReply::OutOfStock { sku, .. }) => ReserveOutcome::OutOfStock { sku },
                            Ok(InventoryReply::AlreadyReleased) => ReserveOutcome::AlreadyReleased,
                            Ok(other) => ReserveOutcome::Unavailable(format!("unexpected reply {other:?}")),
                            Err(e) => ReserveOutcome::Unavailable(e.to_string()),
                        };
                        let _ = me.cast(OrdersMsg::Saga { order_id, event: Event::Reserve { node, outcome } });
                    });
                }
                Command::Charge { amount_cents, token } => {
                    // The charge goes out only once the state that says "a charge was asked for" is
                    // durable: a cancel after a restart must know to refund.
                    let charge = async move {
                        let shard = cluster.shard_of(Capability::Payments, order_id.as_bytes());
                        let req = PaymentRequest::Charge { order_id, amount_cents, token };
                        let t = Duration::from_millis(cluster.config().timing.call_timeout_ms);
                        let outcome = match cluster
                            .call_leader::<_, PaymentReply>(Capability::Payments, shard, &req, &tp, t)
                            .await
                        {
                            Ok(PaymentReply::Charged { payment_id }) => ChargeOutcome::Charged { payment_id },
                            Ok(PaymentReply::Declined { reason }) => ChargeOutcome::Declined { reason },
                            Ok(PaymentReply::TransientError { reason }) => ChargeOutcome::Unavailable(reason),
                            Ok(PaymentReply::InProgress) => {
                                ChargeOutcome::Unavailable("the charge is still processing".into())
                            }
                            Ok(other) => ChargeOutcome::Unavailable(format!("unexpected reply {other:?}")),
                            Err(e) => ChargeOutcome::Unavailable(e.to_string()),
                        };
                        let _ = me.cast(OrdersMsg::Saga { order_id, event: Event::Charge(outcome) });
                    };
                    let me = myself.clone();
                    self.args.store.after_sync(move |result| match result {
                        Ok(()) => {
                            tokio::spawn(charge);
                        }
                        Err(e) => {
                            let _ = me.cast(OrdersMsg::FlushFailed(e.to_string()));
                        }
                    });
                }
                Command::RetryIn(ms) => {
                    myself.send_after(Duration::from_millis(ms), move || OrdersMsg::Saga {
                        order_id,
                        event: Event::RetryDue,
                    });
                }
                Command::Finish => self.finish(order_id)?,
            }
        }
        Ok(())
    }

    /// Persists a terminal order with its outbox entries, then answers its waiters.
    ///
    /// The writes go in an order that makes any crash-prefix safe, instead of one atomic batch
    /// (which would cost a log write of its own in sled): first the outbox entries (keyed by order
    /// and position, so writing them again overwrites), then the terminal order, and last the removal
    /// of its `UNFINISHED` mark, which is the commit point. The relay delivers nothing for an order
    /// that is still marked unfinished; after a crash before the mark goes, the saga resumes and
    /// finishes again with the same outcome (every step it took is idempotent).
    fn finish(&mut self, order_id: Uuid) -> Result<(), ActorProcessingErr> {
        let Some(order) = self.sagas.remove(&order_id) else { return Ok(()) };
        let now = now_ms();
        let mut b = Batch::new();
        // Entries an interrupted earlier finish left behind go first: the outcome may differ now.
        for item in OUTBOX.iter_prefix(&self.args.store, order_id.as_bytes()) {
            OUTBOX.remove(&mut b, &item?.0);
        }
        for (i, (dest, event)) in saga::outbox(&order).into_iter().enumerate() {
            let entry = OutboxEntry { dest, event, order_id, created_ms: now, traceparent: order.traceparent.clone() };
            OUTBOX.put(&mut b, &(order_id, i as u64), &entry);
        }
        ORDERS.put(&mut b, &order_id, &order);
        UNFINISHED.remove(&mut b, &order_id);
        self.args.store.apply_in_order(b)?;
        tracing::debug!(%order_id, trace = trace_id(&order.traceparent), status = ?order.status, reason = ?order.reason, "order finished");
        let view = order.view();
        for (_, w) in self.waiters.remove(&order_id).unwrap_or_default() {
            reply_after_sync(&self.args.store, w, OrdersReply::Order(view.clone()));
        }
        // The relay syncs before it delivers anything, so it can be told at once.
        if let Some(relay) = ActorRef::<OutboxMsg>::where_is(RELAY_NAME) {
            let _ = relay.cast(OutboxMsg::Kick);
        }
        Ok(())
    }
}

impl Actor for OrdersWorker {
    type Msg = OrdersMsg;
    type State = OrdersState;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<OrdersMsg>,
        args: WorkerArgs,
    ) -> Result<OrdersState, ActorProcessingErr> {
        let home_index = args
            .cluster
            .config()
            .capabilities
            .orders_index(args.cluster.name())
            .ok_or("this node hosts orders but is not in [capabilities.orders] nodes")?;
        let mut state = OrdersState {
            args,
            home_index,
            sagas: HashMap::new(),
            waiters: HashMap::new(),
            next_waiter: 0,
            repairing: false,
        };
        // Resume every saga that was in flight when the node (or this worker) stopped.
        let ids: Vec<Uuid> =
            UNFINISHED.iter(&state.args.store).map(|r| r.map(|(id, _)| id)).collect::<Result<_, _>>()?;
        let mut orphans = Batch::new();
        for id in &ids {
            match ORDERS.get(&state.args.store, id)? {
                Some(o) if o.status == OrderStatus::Pending => {
                    state.sagas.insert(*id, o);
                }
                // A crash between the mark and the order (nothing was sent anywhere yet), or after a
                // terminal write but before the mark went: either way, nothing left to drive.
                _ => UNFINISHED.remove(&mut orphans, id),
            }
        }
        state.args.store.apply_in_order(orphans)?;
        if !ids.is_empty() {
            tracing::info!(count = state.sagas.len(), "resuming unfinished sagas");
        }
        for id in ids {
            let _ = myself.cast(OrdersMsg::Saga { order_id: id, event: Event::Resume });
        }
        myself.send_interval(Duration::from_secs(600), || OrdersMsg::Sweep);
        myself.send_interval(Duration::from_secs(1), || OrdersMsg::WitnessRepair);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<OrdersMsg>,
        msg: OrdersMsg,
        state: &mut OrdersState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            OrdersMsg::Request(Inbound { req, reply, traceparent }) => match req {
                OrdersRequest::Place(p) => state.place(&myself, p, true, traceparent, reply)?,
                OrdersRequest::PlaceUnwitnessed(p) => state.place(&myself, p, false, traceparent, reply)?,
                OrdersRequest::Get { order_id } => state.answer_existing(&myself, order_id, None, reply)?,
                OrdersRequest::Witness { key, owner } => {
                    let store = &state.args.store;
                    let answer = if IDEMPOTENCY.get(store, &key)?.is_some() {
                        OrdersReply::OwnedHere
                    } else {
                        if WITNESSES.get(store, &key)?.is_none() {
                            let mut b = Batch::new();
                            WITNESSES.put(&mut b, &key, &WitnessRecord { owner, at_ms: now_ms() });
                            store.apply_in_order(b)?;
                        }
                        OrdersReply::Witnessed
                    };
                    reply_after_sync(store, reply, answer);
                }
                OrdersRequest::InjectPanic => {
                    if state.args.fault_injection {
                        panic!("fault injection: orders worker panics on request");
                    }
                    let _ = reply.send(OrdersReply::Refused("fault injection is disabled on this node".into()));
                }
                OrdersRequest::DeadLetters { order_id } => {
                    let list = super::outbox::dead_letters(&state.args.store, order_id)?;
                    reply_after_sync(&state.args.store, reply, OrdersReply::DeadLetters(list));
                }
            },
            OrdersMsg::Saga { order_id, event } => state.on_saga_event(&myself, order_id, event)?,
            OrdersMsg::WaitOver { order_id, waiter } => {
                let mut answered = None;
                if let Some(ws) = state.waiters.get_mut(&order_id) {
                    if let Some(pos) = ws.iter().position(|(w, _)| *w == waiter) {
                        answered = Some(ws.swap_remove(pos).1);
                    }
                }
                if let (Some(port), Some(o)) = (answered, state.sagas.get(&order_id)) {
                    reply_after_sync(&state.args.store, port, OrdersReply::Order(o.view()));
                }
            }
            OrdersMsg::FlushFailed(why) => return Err(format!("orders store flush failed: {why}").into()),
            OrdersMsg::WitnessRepair => state.repair_witnesses(&myself)?,
            OrdersMsg::RepairRoundOver => {
                state.repairing = false;
                // At once: a node that has just handed everything over must stop announcing a
                // debt (others refuse to act alone while it does).
                state.publish_owes()?;
            }
            OrdersMsg::RepairDone { key, duplicate } => {
                if duplicate {
                    // Both orders nodes placed an order under one key (two faults in a row, e.g. the
                    // successor down and then the home). Counted and logged; not undone here.
                    DUPLICATE_KEYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(%key, "duplicate: the other orders node also placed an order under this Idempotency-Key");
                }
                let mut b = Batch::new();
                UNWITNESSED.remove(&mut b, &key);
                state.args.store.apply_in_order(b)?;
            }
            OrdersMsg::Sweep => {
                // The witness table holds a day of keys: scanning it takes long enough to starve
                // a runtime thread (and with it heartbeats) on a loaded node. Off the runtime.
                let store = state.args.store.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = sweep(&store) {
                        tracing::warn!(error = %e, "sweeping expired idempotency records and witnesses failed");
                    }
                });
            }
        }
        Ok(())
    }
}

/// How a saga names an inventory shard in its records (`ShardStep::node`, `Dest::Inventory`).
pub fn inventory_shard_label(shard: u32) -> String {
    format!("inventory/{shard}")
}

/// The shard a label of [`inventory_shard_label`] names.
pub fn parse_inventory_shard(label: &str) -> Option<u32> {
    label.strip_prefix("inventory/")?.parse().ok()
}
