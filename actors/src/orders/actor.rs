//! The orders worker: serves each orders shard where this node's replica leads it, and drives the
//! sagas of exactly those shards.
//!
//! The worker is a thin shell around [`saga::step`]. An event for an order steps its record in
//! memory; a step that changed the record is proposed to the shard's Raft group
//! ([`OrdersCommand::Step`], or [`OrdersCommand::Finish`] with the outbox), and the commands the step
//! produced (reserve, retry) are carried out only once it has committed. Two exceptions save Raft
//! writes on the way to the `201`, both because a resumed saga would find the same again: a granted
//! hold is not recorded on its own ([`saga::must_commit`]), so on the happy path the charge goes out
//! with nothing recorded since the place; and a charge that does come with a recorded step (a retry)
//! goes out without waiting for its commit ([`saga::runs_before_commit`]). One proposal per
//! order is in flight at a time; events that arrive meanwhile wait their turn, so the log holds an
//! order's steps in the order they were taken. Cross-node calls run in their own tasks and come
//! back as messages: the worker never waits on a peer or a majority.
//!
//! Leadership: every 100 ms the worker compares which shards its replicas lead (and in which term)
//! with the shards it drives. A shard it starts leading is loaded after a read barrier (everything
//! committed before is applied), and its unfinished sagas resume; every step is idempotent by order
//! id, so a step the old leader had taken is repeated with one effect. A shard it stops leading is
//! dropped from memory at once; its waiting clients get the order as last committed (`202 pending`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_cluster::raft::Replica;
use bulkhead_cluster::wire::trace_id;
use bulkhead_cluster::{Cluster, Inbound};
use bulkhead_storage::now_ms;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;
use tracing::Instrument;
use uuid::Uuid;

use super::machine::{self, OrdersApplied, OrdersCommand, OrdersMachine, IDEMPOTENCY, ORDERS};
use super::outbox::{OutboxMsg, RELAY_NAME};
use super::protocol::{shard_of_order, OrdersReply, OrdersRequest, PlaceOrder};
use super::saga::{
    self, inventory_shard_label, parse_inventory_shard, ChargeOutcome, Command, Event, OrderRecord, ReserveOutcome,
};
use super::MAX_DEAD_LETTERS_LISTED;
use crate::capability::Capability;
use crate::inventory::{InventoryReply, InventoryRequest, Item};
use crate::payments::{PaymentReply, PaymentRequest};
use crate::util::{jitter, local_replica, Unserved};

/// Idempotency keys forgotten per sweep proposal (each entry is at most about 160 bytes, so one
/// proposal stays near 64 KiB, the size every Raft batch is bounded by: `raft::MAX_FRAME`), the
/// proposals one sweep may make in a row (20,000 keys a minute per shard), and how often a leader
/// sweeps.
const SWEEP_MAX: usize = 400;
const SWEEP_ROUNDS: usize = 50;
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Per orders shard: idempotency sweeps this node finished as its leader (empty ones too), and
/// the keys they forgot (their retention had passed). For `/metrics`.
pub static SWEEPS: std::sync::Mutex<BTreeMap<u32, SweepCounts>> = std::sync::Mutex::new(BTreeMap::new());

#[derive(Debug, Clone, Copy, Default)]
pub struct SweepCounts {
    pub sweeps: u64,
    pub keys_forgotten: u64,
}

fn count_sweep(shard: u32, keys_forgotten: u64) {
    if let Ok(mut m) = SWEEPS.lock() {
        let c = m.entry(shard).or_default();
        c.sweeps += 1;
        c.keys_forgotten += keys_forgotten;
    }
}
/// Most orders one `ByCustomer` answer lists.
pub const MAX_ORDERS_LISTED: u32 = 500;

/// A new order id: a UUIDv7 (time-ordered keys) whose last byte names its orders shard, so any
/// node can route a lookup by id alone.
pub fn new_order_id(shard: u32) -> Uuid {
    let mut b = *Uuid::now_v7().as_bytes();
    b[15] = shard as u8;
    Uuid::from_bytes(b)
}

/// What the orders worker is started with: this node's replicas, by shard.
#[derive(Clone)]
pub struct OrdersArgs {
    pub cluster: Cluster,
    pub replicas: Arc<BTreeMap<u32, Replica>>,
    pub fault_injection: bool,
    /// `[orders]`: the saga's settings.
    pub settings: super::config::OrdersConfig,
}

#[derive(RactorMessage)]
pub enum OrdersMsg {
    Request(Inbound<OrdersRequest, OrdersReply>),
    /// A `Place` came back.
    Placed(Box<Placed>),
    Saga {
        order_id: Uuid,
        event: Event,
    },
    /// The proposal of an order's step came back; `then` are the step's commands. `epoch` names
    /// the saga instance that proposed it: a reply to an instance since dropped is ignored.
    Committed {
        order_id: Uuid,
        epoch: u64,
        then: Vec<Command>,
        applied: Result<OrdersApplied, Unserved>,
    },
    WaitOver {
        order_id: Uuid,
        waiter: u64,
    },
    /// Time to compare the shards this node leads with the shards it drives.
    Lead,
    /// A shard this node leads in `term` was read after a barrier: its unfinished orders.
    Loaded {
        shard: u32,
        term: u64,
        orders: Result<Vec<(OrderRecord, u64)>, String>,
    },
    Sweep,
}

/// A `Place` proposed in `term`, and what applying it answered: a new order, or the key's earlier one.
pub struct Placed {
    shard: u32,
    term: u64,
    order: OrderRecord,
    applied: Result<OrdersApplied, Unserved>,
    wait_ms: u64,
    reply: RpcReplyPort<OrdersReply>,
}

/// One saga this worker drives.
struct Saga {
    shard: u32,
    /// Which instance this is (a worker-wide counter): a saga dropped and loaded again is a new
    /// instance, and replies to the old one's proposals are ignored.
    epoch: u64,
    /// The record as stepped, ahead of `committed` by at most the step in flight.
    order: OrderRecord,
    committed: OrderRecord,
    /// Steps committed for this order: the next proposal is step `steps + 1`.
    steps: u64,
    in_flight: bool,
    queued: VecDeque<Event>,
    waiters: Vec<(u64, RpcReplyPort<OrdersReply>)>,
}

/// Whether a `Place` may go ahead (see `OrdersState::admit`).
enum Admit {
    Go(Box<Replica>, u64),
    Wait,
}

/// A request waiting for its shard to be loaded.
enum Parked {
    Place(PlaceOrder, String, RpcReplyPort<OrdersReply>),
    Await { order_id: Uuid, wait_ms: u64, reply: RpcReplyPort<OrdersReply> },
}

impl Parked {
    fn reply(self) -> RpcReplyPort<OrdersReply> {
        match self {
            Parked::Place(_, _, reply) | Parked::Await { reply, .. } => reply,
        }
    }
}

/// A shard this worker drives, in the term its replica leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driving {
    /// Waiting for the read barrier and the unfinished orders.
    Loading(u64),
    Ready(u64),
}

pub struct OrdersWorker;

pub struct OrdersState {
    args: OrdersArgs,
    driving: BTreeMap<u32, Driving>,
    sagas: HashMap<Uuid, Saga>,
    /// Places and awaits that arrived while their shard was loading, by shard.
    parked: BTreeMap<u32, Vec<Parked>>,
    /// Places committed while their shard was loading (the load may not have seen them), by shard.
    placed_while_loading: BTreeMap<u32, Vec<Placed>>,
    next_waiter: u64,
    next_epoch: u64,
}

fn unserved(e: impl Into<Unserved>) -> OrdersReply {
    match e.into() {
        Unserved::NotLeader(leader) => OrdersReply::NotLeader { leader },
        Unserved::Unavailable(why) => OrdersReply::Unavailable(why),
    }
}

impl OrdersState {
    fn cluster(&self) -> &Cluster {
        &self.args.cluster
    }

    fn replica(&self, shard: u32) -> Result<Replica, Unserved> {
        local_replica(&self.args.cluster, &self.args.replicas, Capability::Orders, shard)
    }

    /// Whether this worker may place an order in `shard` now: it drives the shard in the term its
    /// replica leads (`Go`), or it leads and is still loading the shard's sagas (`Wait`: the order
    /// is placed once loaded, so a new leader never turns a client away for that).
    fn admit(&mut self, myself: &ActorRef<OrdersMsg>, shard: u32) -> Result<Admit, Unserved> {
        let replica = self.replica(shard)?;
        let Some(term) = replica.leading_term() else {
            return Err(Unserved::NotLeader(replica.leader().filter(|l| l != self.cluster().name())));
        };
        match self.driving.get(&shard) {
            Some(Driving::Ready(t)) if *t == term => Ok(Admit::Go(Box::new(replica), term)),
            Some(Driving::Loading(t)) if *t == term => Ok(Admit::Wait),
            // Leading since the last check: start loading now rather than at the next tick.
            _ => {
                self.lead(myself);
                match self.driving.get(&shard) {
                    Some(Driving::Loading(_)) => Ok(Admit::Wait),
                    _ => Err(Unserved::NotLeader(replica.leader().filter(|l| l != self.cluster().name()))),
                }
            }
        }
    }

    fn wait_for(
        &mut self,
        myself: &ActorRef<OrdersMsg>,
        order_id: Uuid,
        wait_ms: u64,
        reply: RpcReplyPort<OrdersReply>,
    ) {
        let Some(s) = self.sagas.get_mut(&order_id) else {
            let _ = reply.send(OrdersReply::Unavailable("the order left this leader".into()));
            return;
        };
        let w = self.next_waiter;
        self.next_waiter += 1;
        s.waiters.push((w, reply));
        myself.send_after(Duration::from_millis(wait_ms), move || OrdersMsg::WaitOver { order_id, waiter: w });
    }

    fn place(
        &mut self,
        myself: &ActorRef<OrdersMsg>,
        p: PlaceOrder,
        traceparent: String,
        reply: RpcReplyPort<OrdersReply>,
    ) {
        let (replica, term) = match self.admit(myself, p.shard) {
            Ok(Admit::Go(replica, term)) => (*replica, term),
            Ok(Admit::Wait) => {
                self.parked.entry(p.shard).or_default().push(Parked::Place(p, traceparent, reply));
                return;
            }
            Err(e) => {
                let _ = reply.send(unserved(e));
                return;
            }
        };
        let now = replica.now_ms();
        let id = new_order_id(p.shard);
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
        let (shard, wait_ms, me) = (p.shard, p.wait_ms, myself.clone());
        let cmd = OrdersCommand::Place { order: order.clone(), idempotency: p.idempotency, now_ms: now };
        let (span, _) = bulkhead_cluster::traced_span!("orders.place", &order.traceparent, order_id = %id);
        tokio::spawn(
            async move {
                let applied = replica.propose::<OrdersMachine>(&cmd).await.map_err(Unserved::from);
                let _ = me.cast(OrdersMsg::Placed(Box::new(Placed { shard, term, order, applied, wait_ms, reply })));
            }
            .instrument(span),
        );
    }

    fn on_placed(&mut self, myself: &ActorRef<OrdersMsg>, placed: Placed) {
        let Placed { shard, term, order, applied, wait_ms, reply } = placed;
        match applied {
            Ok(OrdersApplied::Placed) => {
                tracing::debug!(order_id = %order.id, shard, trace_id = %trace_id(&order.traceparent), "order placed");
                match self.driving.get(&shard) {
                    Some(Driving::Ready(t)) if *t == term => {}
                    Some(Driving::Loading(t)) if *t == term => {
                        // The load's read may have come before this place: decide once it is in.
                        let placed = Placed { shard, term, order, applied: Ok(OrdersApplied::Placed), wait_ms, reply };
                        self.placed_while_loading.entry(shard).or_default().push(placed);
                        return;
                    }
                    // Leadership moved while the place committed: whoever leads now loads it
                    // (it was committed before their read barrier).
                    _ => {
                        let _ = reply.send(OrdersReply::Order(order.view()));
                        return;
                    }
                }
                let id = order.id;
                if self.sagas.contains_key(&id) {
                    // A reload of the shard found it first.
                    return self.wait_for(myself, id, wait_ms, reply);
                }
                self.insert_saga(myself, shard, order, 0, Event::Start);
                self.wait_for(myself, id, wait_ms, reply);
            }
            Ok(OrdersApplied::Existing { order_id, same_body: false }) => {
                let _ = reply.send(OrdersReply::IdempotencyConflict { order_id });
            }
            Ok(OrdersApplied::Existing { order_id, same_body: true }) => {
                if self.sagas.contains_key(&order_id) {
                    self.wait_for(myself, order_id, wait_ms, reply);
                    return;
                }
                // Applied on this replica before the `Place` that found it: a plain read will do.
                let answer = match self.replica(shard).map(|r| ORDERS.get(r.store(), &order_id)) {
                    Ok(Ok(Some(o))) => OrdersReply::Order(o.view()),
                    Ok(Ok(None)) => OrdersReply::Unavailable("the key's order is not readable here yet".into()),
                    Ok(Err(e)) => OrdersReply::Unavailable(e.to_string()),
                    Err(e) => unserved(e),
                };
                let _ = reply.send(answer);
            }
            Ok(other) => {
                tracing::error!(?other, "unexpected answer to placing an order");
                let _ = reply.send(OrdersReply::Unavailable(format!("placing the order answered {other:?}")));
            }
            Err(Unserved::Unavailable(why)) => {
                // Timed out or failed: the place may still commit. Reload the shard so that, if it
                // does, the order is driven; tell the client it may exist (retry with its key).
                self.release(shard);
                let _ = reply.send(OrdersReply::Uncertain(why));
            }
            Err(e) => {
                let _ = reply.send(unserved(e));
            }
        }
    }

    /// Takes a saga into memory (a new order, or one loaded from the shard) and steps `first`.
    fn insert_saga(&mut self, myself: &ActorRef<OrdersMsg>, shard: u32, order: OrderRecord, steps: u64, first: Event) {
        let (id, epoch) = (order.id, self.next_epoch);
        self.next_epoch += 1;
        let saga = Saga {
            shard,
            epoch,
            order: order.clone(),
            committed: order,
            steps,
            in_flight: false,
            queued: VecDeque::new(),
            waiters: Vec::new(),
        };
        self.sagas.insert(id, saga);
        self.on_saga_event(myself, id, first);
    }

    fn on_saga_event(&mut self, myself: &ActorRef<OrdersMsg>, order_id: Uuid, event: Event) {
        let Some(shard) = self.sagas.get(&order_id).map(|s| s.shard) else { return };
        // The group's time, as every time this worker puts into a command (see `raft::clock`).
        let now = self.replica(shard).map(|r| r.now_ms()).unwrap_or_else(|_| now_ms());
        let window = self.args.settings.reservation_window_ms;
        let Some(s) = self.sagas.get_mut(&order_id) else { return };
        if s.in_flight {
            s.queued.push_back(event);
            return;
        }
        // A retry (or a resume) past the order's reservation window cancels it instead: the
        // window is judged on the group's time, like every time the saga records.
        let event = match event {
            Event::RetryDue | Event::Resume if saga::window_passed(&s.order, now, window) => Event::WindowPassed,
            other => other,
        };
        let record = saga::must_commit(&event);
        let before = s.order.clone();
        let cmds = saga::step(&mut s.order, event, now, jitter());
        if !saga::worth_recording(&before, &s.order) || !record {
            // Nothing new (or only the retry bookkeeping), or nothing a resumed saga would not
            // find again (a granted hold): the next recorded step carries it.
            return self.execute(myself, order_id, cmds);
        }
        // A step's commands wait for its commit (a new leader must find what was asked for), but
        // for those a resumed saga asks for again identically: they go out with the proposal.
        let step = s.steps + 1;
        let cmd = if cmds.contains(&Command::Finish) {
            OrdersCommand::Finish { order: s.order.clone(), step, now_ms: now }
        } else {
            OrdersCommand::Step { order: s.order.clone(), step }
        };
        s.in_flight = true;
        let (shard, epoch) = (s.shard, s.epoch);
        let (span, _) = bulkhead_cluster::traced_span!("saga.commit", &s.order.traceparent, %order_id, step);
        let replica = match self.replica(shard) {
            Ok(r) => r,
            Err(e) => return self.on_committed(myself, order_id, epoch, cmds, Err(e)),
        };
        let (now_cmds, then): (Vec<_>, Vec<_>) = cmds.into_iter().partition(saga::runs_before_commit);
        let me = myself.clone();
        tokio::spawn(
            async move {
                let applied = replica.propose::<OrdersMachine>(&cmd).await.map_err(Unserved::from);
                let _ = me.cast(OrdersMsg::Committed { order_id, epoch, then, applied });
            }
            .instrument(span),
        );
        // Its answer waits in `queued` until the step has committed.
        self.execute(myself, order_id, now_cmds);
    }

    fn on_committed(
        &mut self,
        myself: &ActorRef<OrdersMsg>,
        order_id: Uuid,
        epoch: u64,
        then: Vec<Command>,
        applied: Result<OrdersApplied, Unserved>,
    ) {
        let Some(s) = self.sagas.get_mut(&order_id) else { return };
        if s.epoch != epoch {
            // A reply to a dropped instance: this one works from the committed record it loaded.
            return;
        }
        match applied {
            Ok(OrdersApplied::Done) => {
                s.in_flight = false;
                s.steps += 1;
                s.committed = s.order.clone();
                self.execute(myself, order_id, then);
                while let Some(s) = self.sagas.get_mut(&order_id) {
                    if s.in_flight {
                        break;
                    }
                    let Some(ev) = s.queued.pop_front() else { break };
                    self.on_saga_event(myself, order_id, ev);
                }
            }
            other => {
                // Not committed (this replica lost the lead, no majority in time), or the order is
                // already terminal. The shard is dropped from memory and, if this replica still
                // leads, loaded again from what is committed: every step is idempotent, so going on
                // from the committed records loses nothing.
                let shard = s.shard;
                tracing::info!(%order_id, shard, outcome = ?other, "saga step not committed; the shard is reloaded");
                self.release(shard);
            }
        }
    }

    /// Forgets a saga; its waiters get the order as last committed.
    fn drop_saga(&mut self, order_id: Uuid) {
        if let Some(s) = self.sagas.remove(&order_id) {
            for (_, w) in s.waiters {
                let _ = w.send(OrdersReply::Order(s.committed.view()));
            }
        }
    }

    fn execute(&mut self, myself: &ActorRef<OrdersMsg>, order_id: Uuid, cmds: Vec<Command>) {
        // Holds end with the saga (commit or release), never on a clock.
        let ttl_ms = crate::inventory::protocol::UNTIL_RELEASED;
        let parent = self.sagas.get(&order_id).map(|s| s.order.traceparent.clone()).unwrap_or_default();
        for cmd in cmds {
            let (cluster, me) = (self.cluster().clone(), myself.clone());
            match cmd {
                Command::Reserve { node, items } => {
                    let (span, tp) =
                        bulkhead_cluster::traced_span!("saga.step", &parent, step = "reserve", %order_id, %node);
                    tokio::spawn(
                        async move {
                            let started = Instant::now();
                            let outcome = reserve(&cluster, order_id, &node, items, ttl_ms, &tp).await;
                            step_done("reserve", started, outcome.label());
                            let _ = me.cast(OrdersMsg::Saga { order_id, event: Event::Reserve { node, outcome } });
                        }
                        .instrument(span),
                    );
                }
                Command::Charge { amount_cents, token } => {
                    let (span, tp) = bulkhead_cluster::traced_span!("saga.step", &parent, step = "charge", %order_id);
                    tokio::spawn(
                        async move {
                            let started = Instant::now();
                            let outcome = charge(&cluster, order_id, amount_cents, token, &tp).await;
                            step_done("charge", started, outcome.label());
                            let _ = me.cast(OrdersMsg::Saga { order_id, event: Event::Charge(outcome) });
                        }
                        .instrument(span),
                    );
                }
                Command::RetryIn(ms) => {
                    myself.send_after(Duration::from_millis(ms), move || OrdersMsg::Saga {
                        order_id,
                        event: Event::RetryDue,
                    });
                }
                Command::Finish => self.finish(order_id),
            }
        }
    }

    /// The terminal state (and its outbox) is committed: answer the waiters, wake the relay.
    fn finish(&mut self, order_id: Uuid) {
        let Some(s) = self.sagas.remove(&order_id) else { return };
        let o = &s.committed;
        let reason = o.reason.as_deref().unwrap_or("");
        tracing::info!(%order_id, trace_id = %trace_id(&o.traceparent), status = ?o.status, reason, "order finished");
        let view = o.view();
        for (_, w) in s.waiters {
            let _ = w.send(OrdersReply::Order(view.clone()));
        }
        if let Some(relay) = ActorRef::<OutboxMsg>::where_is(RELAY_NAME) {
            let _ = relay.cast(OutboxMsg::Kick);
        }
    }

    /// Compares the shards this node's replicas lead with the shards it drives: starts loading a
    /// shard it leads in a new term, drops one it no longer leads.
    fn lead(&mut self, myself: &ActorRef<OrdersMsg>) {
        let replicas = self.args.replicas.clone();
        for (shard, replica) in replicas.iter() {
            let shard = *shard;
            let leading = replica.leading_term();
            let driving = self.driving.get(&shard).copied();
            let term_of = |d: Driving| match d {
                Driving::Loading(t) | Driving::Ready(t) => t,
            };
            if leading.is_some() && driving.map(term_of) == leading {
                continue;
            }
            if driving.is_some() {
                self.release(shard);
            }
            let Some(term) = leading else {
                // Nothing was proposed for these: the caller follows the leader, or retries.
                let leader = replica.leader().filter(|l| l != self.cluster().name());
                for parked in self.parked.remove(&shard).unwrap_or_default() {
                    let _ = parked.reply().send(OrdersReply::NotLeader { leader: leader.clone() });
                }
                continue;
            };
            self.driving.insert(shard, Driving::Loading(term));
            let (replica, me) = (replica.clone(), myself.clone());
            tokio::spawn(async move {
                let orders = match replica.read_barrier().await {
                    Ok(()) => {
                        let store = replica.store().clone();
                        tokio::task::spawn_blocking(move || machine::unfinished(&store))
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|r| r.map_err(|e| e.to_string()))
                    }
                    Err(e) => Err(e.to_string()),
                };
                let _ = me.cast(OrdersMsg::Loaded { shard, term, orders });
            });
        }
    }

    /// Stops driving `shard`: its sagas leave memory (their waiters get the committed order).
    fn release(&mut self, shard: u32) {
        if self.driving.remove(&shard).is_some() {
            tracing::info!(
                shard,
                "not driving this orders shard's sagas any more (leadership moved, or a step failed)"
            );
        }
        let ids: Vec<Uuid> = self.sagas.iter().filter(|(_, s)| s.shard == shard).map(|(id, _)| *id).collect();
        for id in ids {
            self.drop_saga(id);
        }
        // Committed places the load had not settled: whoever loads the shard next finds them.
        for p in self.placed_while_loading.remove(&shard).unwrap_or_default() {
            let _ = p.reply.send(OrdersReply::Order(p.order.view()));
        }
    }

    fn on_loaded(
        &mut self,
        myself: &ActorRef<OrdersMsg>,
        shard: u32,
        term: u64,
        orders: Result<Vec<(OrderRecord, u64)>, String>,
    ) {
        if self.driving.get(&shard) != Some(&Driving::Loading(term)) {
            return;
        }
        let orders = match orders {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(shard, term, error = %e, "cannot load this orders shard's unfinished sagas yet");
                // The next leadership check tries again; the parked places are not kept waiting.
                self.driving.remove(&shard);
                for parked in self.parked.remove(&shard).unwrap_or_default() {
                    let _ =
                        parked.reply().send(OrdersReply::Unavailable(format!("shard {shard} is not loaded yet: {e}")));
                }
                for p in self.placed_while_loading.remove(&shard).unwrap_or_default() {
                    let _ = p.reply.send(OrdersReply::Order(p.order.view()));
                }
                return;
            }
        };
        self.driving.insert(shard, Driving::Ready(term));
        self.sweep_shard(shard);
        tracing::info!(
            shard,
            term,
            resuming = orders.len(),
            "leading this orders shard: its unfinished sagas resume here"
        );
        for (o, steps) in orders {
            if !self.sagas.contains_key(&o.id) {
                self.insert_saga(myself, shard, o, steps, Event::Resume);
            }
        }
        for p in self.placed_while_loading.remove(&shard).unwrap_or_default() {
            self.on_placed(myself, p);
        }
        for parked in self.parked.remove(&shard).unwrap_or_default() {
            match parked {
                Parked::Place(p, traceparent, reply) => self.place(myself, p, traceparent, reply),
                Parked::Await { order_id, wait_ms, reply } => self.await_order(myself, order_id, wait_ms, reply),
            }
        }
    }

    /// Waits for an order whose client is still waiting (`OrdersRequest::Await`): on the leader
    /// that drives its shard now. An order not in flight here is finished (or was never placed):
    /// a linearizable read answers at once.
    fn await_order(
        &mut self,
        myself: &ActorRef<OrdersMsg>,
        order_id: Uuid,
        wait_ms: u64,
        reply: RpcReplyPort<OrdersReply>,
    ) {
        let shard = shard_of_order(&order_id);
        match self.admit(myself, shard) {
            Err(e) => {
                let _ = reply.send(unserved(e));
            }
            Ok(Admit::Wait) => self.parked.entry(shard).or_default().push(Parked::Await { order_id, wait_ms, reply }),
            Ok(Admit::Go(..)) if self.sagas.contains_key(&order_id) => self.wait_for(myself, order_id, wait_ms, reply),
            Ok(Admit::Go(..)) => self.read(OrdersRequest::Get { order_id }, reply),
        }
    }

    /// Reads served by the leader after a read barrier: never a stale answer from an old leader.
    fn read(&self, req: OrdersRequest, reply: RpcReplyPort<OrdersReply>) {
        let shard = match &req {
            OrdersRequest::Get { order_id } => shard_of_order(order_id),
            OrdersRequest::DeadLetters { shard, .. } | OrdersRequest::ByCustomer { shard, .. } => *shard,
            OrdersRequest::Place(_) | OrdersRequest::InjectPanic | OrdersRequest::Await { .. } => return,
        };
        let replica = match self.replica(shard) {
            Ok(r) => r,
            Err(e) => {
                let _ = reply.send(unserved(e));
                return;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = replica.read_barrier().await {
                let _ = reply.send(unserved(e));
                return;
            }
            let store = replica.store().clone();
            let answer = tokio::task::spawn_blocking(move || {
                let result = match req {
                    OrdersRequest::Get { order_id } => ORDERS
                        .get(&store, &order_id)
                        .map(|o| o.map_or(OrdersReply::NotFound, |o| OrdersReply::Order(o.view()))),
                    OrdersRequest::DeadLetters { order_id, .. } => {
                        machine::dead_letters(&store, order_id, MAX_DEAD_LETTERS_LISTED).map(OrdersReply::DeadLetters)
                    }
                    OrdersRequest::ByCustomer { customer_id, before, limit, .. } => {
                        let limit = limit.clamp(1, MAX_ORDERS_LISTED) as usize;
                        machine::by_customer(&store, &customer_id, before, limit).map(OrdersReply::Orders)
                    }
                    OrdersRequest::Place(_) | OrdersRequest::InjectPanic | OrdersRequest::Await { .. } => {
                        Ok(OrdersReply::Refused("not a read".into()))
                    }
                };
                result.unwrap_or_else(|e| OrdersReply::Unavailable(e.to_string()))
            })
            .await
            .unwrap_or_else(|e| OrdersReply::Unavailable(e.to_string()));
            let _ = reply.send(answer);
        });
    }

    fn sweep(&self) {
        for (shard, d) in &self.driving {
            if let Driving::Ready(_) = d {
                self.sweep_shard(*shard);
            }
        }
    }

    /// One idempotency sweep of a shard this node leads: forget the keys older than the retention
    /// at the group's time (not this node's wall clock: a clock a day ahead must not forget a day
    /// of keys, see `raft::clock`). Also run once when a shard is taken over.
    fn sweep_shard(&self, shard: u32) {
        let Ok(replica) = self.replica(shard) else { return };
        tokio::spawn(async move {
            for _ in 0..SWEEP_ROUNDS {
                let now = replica.now_ms();
                let store = replica.store().clone();
                let read = tokio::task::spawn_blocking(move || IDEMPOTENCY.expired(&store, now, SWEEP_MAX)).await;
                let entries = match read.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                    Ok(e) => e,
                    Err(e) => {
                        return tracing::warn!(group = %replica.id, error = %e, "reading the idempotency index failed")
                    }
                };
                if entries.is_empty() {
                    return count_sweep(shard, 0);
                }
                let n = entries.len();
                let cmd = OrdersCommand::Sweep { entries, now_ms: now };
                match replica.propose::<OrdersMachine>(&cmd).await {
                    Ok(_) => {
                        count_sweep(shard, n as u64);
                        tracing::info!(group = %replica.id, keys = n, "idempotency keys past their retention forgotten");
                    }
                    Err(e) => {
                        return tracing::debug!(group = %replica.id, error = %e, "idempotency sweep not applied; the next one retries")
                    }
                }
                // A short proposal took every key that was due.
                if n < SWEEP_MAX {
                    return;
                }
            }
        });
    }
}

/// A saga step's remote part is over: its duration by step and outcome.
fn step_done(step: &'static str, started: Instant, outcome: &'static str) {
    metrics::histogram!("bulkhead_saga_step_duration_seconds", "step" => step, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

async fn reserve(
    cluster: &Cluster,
    order_id: Uuid,
    node: &str,
    items: Vec<Item>,
    ttl_ms: u64,
    tp: &str,
) -> ReserveOutcome {
    let req = InventoryRequest::Reserve { order_id, items, ttl_ms };
    let t = Duration::from_millis(cluster.config().timing.call_timeout_ms);
    let reply = match parse_inventory_shard(node) {
        Some(shard) => cluster.call_leader::<_, InventoryReply>(Capability::Inventory, shard, &req, tp, t).await,
        None => Ok(InventoryReply::Unavailable(format!("`{node}` is not an inventory shard"))),
    };
    match reply {
        Ok(InventoryReply::Reserved { lines, expires_ms }) => ReserveOutcome::Reserved { lines, expires_ms },
        Ok(InventoryReply::OutOfStock { sku, .. }) => ReserveOutcome::OutOfStock { sku },
        Ok(InventoryReply::AlreadyReleased) => ReserveOutcome::AlreadyReleased,
        Ok(other) => ReserveOutcome::Unavailable(format!("unexpected reply {other:?}")),
        Err(e) => ReserveOutcome::Unavailable(e.to_string()),
    }
}

async fn charge(cluster: &Cluster, order_id: Uuid, amount_cents: u64, token: String, tp: &str) -> ChargeOutcome {
    let shard = cluster.shard_of(Capability::Payments, order_id.as_bytes());
    let req = PaymentRequest::Charge { order_id, amount_cents, token };
    let t = Duration::from_millis(cluster.config().timing.call_timeout_ms);
    match cluster.call_leader::<_, PaymentReply>(Capability::Payments, shard, &req, tp, t).await {
        Ok(PaymentReply::Charged { payment_id }) => ChargeOutcome::Charged { payment_id },
        Ok(PaymentReply::Declined { reason }) => ChargeOutcome::Declined { reason },
        Ok(PaymentReply::TransientError { reason }) => ChargeOutcome::Unavailable(reason),
        Ok(PaymentReply::InProgress) => ChargeOutcome::Unavailable("the charge is still processing".into()),
        Ok(other) => ChargeOutcome::Unavailable(format!("unexpected reply {other:?}")),
        Err(e) => ChargeOutcome::Unavailable(e.to_string()),
    }
}

impl Actor for OrdersWorker {
    type Msg = OrdersMsg;
    type State = OrdersState;
    type Arguments = OrdersArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<OrdersMsg>,
        args: OrdersArgs,
    ) -> Result<OrdersState, ActorProcessingErr> {
        myself.send_interval(Duration::from_millis(100), || OrdersMsg::Lead);
        myself.send_interval(SWEEP_EVERY, || OrdersMsg::Sweep);
        let _ = myself.cast(OrdersMsg::Lead);
        Ok(OrdersState {
            args,
            driving: BTreeMap::new(),
            sagas: HashMap::new(),
            parked: BTreeMap::new(),
            placed_while_loading: BTreeMap::new(),
            next_waiter: 0,
            next_epoch: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<OrdersMsg>,
        msg: OrdersMsg,
        state: &mut OrdersState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            OrdersMsg::Request(Inbound { req, reply, traceparent }) => match req {
                OrdersRequest::Place(p) => state.place(&myself, p, traceparent, reply),
                OrdersRequest::Await { order_id, wait_ms } => state.await_order(&myself, order_id, wait_ms, reply),
                OrdersRequest::InjectPanic => {
                    if state.args.fault_injection {
                        panic!("fault injection: orders worker panics on request");
                    }
                    let _ = reply.send(OrdersReply::Refused("fault injection is disabled on this node".into()));
                }
                read => state.read(read, reply),
            },
            OrdersMsg::Placed(placed) => state.on_placed(&myself, *placed),
            OrdersMsg::Saga { order_id, event } => state.on_saga_event(&myself, order_id, event),
            OrdersMsg::Committed { order_id, epoch, then, applied } => {
                state.on_committed(&myself, order_id, epoch, then, applied)
            }
            OrdersMsg::WaitOver { order_id, waiter } => {
                if let Some(s) = state.sagas.get_mut(&order_id) {
                    if let Some(pos) = s.waiters.iter().position(|(w, _)| *w == waiter) {
                        let (_, port) = s.waiters.swap_remove(pos);
                        let _ = port.send(OrdersReply::Order(s.committed.view()));
                    }
                }
            }
            OrdersMsg::Lead => state.lead(&myself),
            OrdersMsg::Loaded { shard, term, orders } => state.on_loaded(&myself, shard, term, orders),
            OrdersMsg::Sweep => state.sweep(),
        }
        Ok(())
    }
}
