//! The orders worker: serves each orders shard where this node's replica leads it, and drives the
//! sagas of exactly those shards.
//!
//! The worker is a shell around [`Driver`] (`driver.rs`), which decides everything with no I/O:
//! which shards it drives, which places it admits or parks, the sagas in memory and their one
//! proposal in flight. For each message the worker gathers the facts the driver needs (each local
//! replica's leadership and the group's time), steps it, and performs the effects it returns:
//! proposals, the reserve and charge calls, timers, loads and replies. Every effect that takes time
//! runs in its own task and comes back as a message ([`OrdersOwn::Drive`]): the worker never waits
//! on a peer or a majority.
//!
//! Leadership: every 100 ms the worker lets the driver compare which shards its replicas lead (and
//! in which term) with the shards it drives. A shard it starts leading is loaded after a read
//! barrier (everything committed before is applied), and its unfinished sagas resume; every step
//! is idempotent by order id, so a step the old leader had taken is repeated with one effect.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_cluster::raft::Replica;
use bulkhead_cluster::{Cluster, Inbound};
use ractor::{ActorRef, RpcReplyPort};
use tracing::Instrument;
use uuid::Uuid;

use super::config::OrdersConfig;
use super::driver::{unserved_reply, Driver, Effect, Env, Facts, Input, Placed, ShardFacts};
use super::machine::{self, OrdersCommand, OrdersMachine, IDEMPOTENCY, ORDERS};
use super::outbox::{OutboxMsg, RELAY_NAME};
use super::protocol::{shard_of_order, OrdersReply, OrdersRequest, PlaceOrder};
use super::saga::{ChargeOutcome, Event, ReserveOutcome};
use super::MAX_DEAD_LETTERS_LISTED;
use crate::capability::Capability;
use crate::inventory::{InventoryReply, InventoryRequest, Item};
use crate::payments::{PaymentReply, PaymentRequest};
use crate::util::{jitter, local_replica, Unserved};
use crate::worker::{OwnInput, Route, ServeMsg, Service, WorkerArgs};

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

type Reply = RpcReplyPort<OrdersReply>;

/// The orders service, served by the shared [`ShardWorker`](crate::worker::ShardWorker): reads go
/// to the shard's replica like every capability's; places and awaits go to its own loop, the
/// [`Driver`].
#[derive(Clone, Copy)]
pub struct Orders {
    /// `[orders]`: the saga's settings.
    pub settings: OrdersConfig,
}

/// The worker's handle, as the orders loop's tasks and timers send to it.
type Myself = ActorRef<ServeMsg<Orders>>;

/// The orders loop's own messages.
pub enum OrdersOwn {
    /// Something for the [`Driver`]: an outcome of one of its effects, or a timer.
    Drive(Box<Input<Reply>>),
    /// Time to compare the shards this node leads with the shards it drives.
    Lead,
    Sweep,
}

fn drive(input: Input<Reply>) -> ServeMsg<Orders> {
    ServeMsg::Own(OrdersOwn::Drive(Box::new(input)))
}

/// The orders loop's state: the driver, and what its effects need.
pub struct OrdersState {
    cluster: Cluster,
    replicas: Arc<BTreeMap<u32, Replica>>,
    driver: Driver<Reply>,
}

impl OrdersState {
    fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    fn replica(&self, shard: u32) -> Result<Replica, Unserved> {
        local_replica(&self.cluster, &self.replicas, Capability::Orders, shard)
    }

    /// What the driver decides on: each local replica's leadership, and for `shard` (the
    /// request's, when it has no replica here) the leader to send the caller to. (The group's time
    /// is not gathered here: reading it starts a term's clock, so the driver asks for it through
    /// [`NodeEnv`] only where a decision needs it.)
    fn facts(&self, shard: Option<u32>) -> Facts {
        let me = self.cluster().name();
        let local = self
            .replicas
            .iter()
            .map(|(s, r)| (*s, ShardFacts { leading: r.leading_term(), leader: r.leader().filter(|l| l != me) }))
            .collect();
        let elsewhere = shard
            .filter(|s| !self.replicas.contains_key(s))
            .map(|s| (s, self.cluster().leader_of(Capability::Orders, s).filter(|l| l != me)))
            .into_iter()
            .collect();
        Facts { local, elsewhere }
    }

    /// Steps the driver and performs what it decided.
    fn drive(&mut self, myself: &Myself, input: Input<Reply>, shard: Option<u32>) {
        let facts = self.facts(shard);
        let mut env = NodeEnv { cluster: &self.cluster, replicas: &self.replicas };
        for effect in self.driver.step(input, &facts, &mut env) {
            self.perform(myself, effect);
        }
    }

    fn perform(&self, myself: &Myself, effect: Effect<Reply>) {
        let me = myself.clone();
        match effect {
            Effect::Reply(reply, answer) => {
                let _ = reply.send(answer);
            }
            Effect::Place { shard, term, command, wait_ms, reply } => {
                let OrdersCommand::Place { order, .. } = &command else { return };
                let replica = match self.replica(shard) {
                    Ok(r) => r,
                    Err(e) => return drop(reply.send(unserved_reply(e))),
                };
                let (span, _) =
                    bulkhead_cluster::traced_span!("orders.place", &order.traceparent, order_id = %order.id);
                tokio::spawn(
                    async move {
                        let applied = replica.propose::<OrdersMachine>(&command).await.map_err(Unserved::from);
                        // The order goes back with the answer: the command is done with.
                        let OrdersCommand::Place { order, .. } = command else { return };
                        let placed = Placed { shard, term, order, applied, wait_ms, reply };
                        let _ = me.cast(drive(Input::Placed(placed)));
                    }
                    .instrument(span),
                );
            }
            Effect::Propose { order_id, shard, epoch, command, then } => {
                let step = match &command {
                    OrdersCommand::Step { step, .. } | OrdersCommand::Finish { step, .. } => *step,
                    _ => 0,
                };
                let tp = traceparent_of(&command);
                let (span, _) = bulkhead_cluster::traced_span!("saga.commit", tp, %order_id, step);
                let replica = self.replica(shard);
                tokio::spawn(
                    async move {
                        let applied = match replica {
                            Ok(r) => r.propose::<OrdersMachine>(&command).await.map_err(Unserved::from),
                            Err(e) => Err(e),
                        };
                        let _ = me.cast(drive(Input::Committed { order_id, epoch, then, applied }));
                    }
                    .instrument(span),
                );
            }
            Effect::Reserve { order_id, shard, items, traceparent } => {
                let cluster = self.cluster().clone();
                let (span, tp) =
                    bulkhead_cluster::traced_span!("saga.step", &traceparent, step = "reserve", %order_id, shard);
                tokio::spawn(
                    async move {
                        let started = Instant::now();
                        // Holds end with the saga (commit or release), never on a clock.
                        let ttl_ms = crate::inventory::protocol::UNTIL_RELEASED;
                        let outcome = reserve(&cluster, order_id, shard, items, ttl_ms, &tp).await;
                        step_done("reserve", started, outcome.label());
                        let event = Event::Reserve { shard, outcome };
                        let _ = me.cast(drive(Input::Saga { order_id, event }));
                    }
                    .instrument(span),
                );
            }
            Effect::Charge { order_id, amount_cents, token, traceparent } => {
                let cluster = self.cluster().clone();
                let (span, tp) = bulkhead_cluster::traced_span!("saga.step", &traceparent, step = "charge", %order_id);
                tokio::spawn(
                    async move {
                        let started = Instant::now();
                        let outcome = charge(&cluster, order_id, amount_cents, token, &tp).await;
                        step_done("charge", started, outcome.label());
                        let _ = me.cast(drive(Input::Saga { order_id, event: Event::Charge(outcome) }));
                    }
                    .instrument(span),
                );
            }
            Effect::RetryAfter { order_id, ms } => {
                myself.send_after(Duration::from_millis(ms), move || {
                    drive(Input::Saga { order_id, event: Event::RetryDue })
                });
            }
            Effect::WaitTimer { order_id, waiter, ms } => {
                myself.send_after(Duration::from_millis(ms), move || drive(Input::WaitOver { order_id, waiter }));
            }
            Effect::Load { shard, term } => {
                let replica = match self.replica(shard) {
                    Ok(r) => r,
                    Err(e) => {
                        // Answered as a failed load: the parked requests are not left waiting.
                        let orders = Err(format!("no replica of orders shard {shard} here: {e:?}"));
                        let _ = me.cast(drive(Input::Loaded { shard, term, orders }));
                        return;
                    }
                };
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
                    let _ = me.cast(drive(Input::Loaded { shard, term, orders }));
                });
            }
            Effect::ReadApplied { shard, order_id, reply } => {
                let answer = match self.replica(shard).map(|r| ORDERS.get(r.store(), &order_id)) {
                    Ok(Ok(Some(o))) => OrdersReply::Order(o.view()),
                    Ok(Ok(None)) => OrdersReply::Unavailable("the key's order is not readable here yet".into()),
                    Ok(Err(e)) => OrdersReply::Unavailable(e.to_string()),
                    Err(e) => unserved_reply(e),
                };
                let _ = reply.send(answer);
            }
            Effect::Read { req, reply } => match self.replica(shard_of(&req)) {
                Ok(replica) => {
                    tokio::spawn(async move {
                        let _ = reply.send(read(replica, req).await);
                    });
                }
                Err(e) => {
                    let _ = reply.send(unserved_reply(e));
                }
            },
            Effect::Sweep { shard } => self.sweep_shard(shard),
            Effect::KickRelay => {
                if let Some(relay) = ActorRef::<OutboxMsg>::where_is(RELAY_NAME) {
                    let _ = relay.cast(OutboxMsg::Kick);
                }
            }
        }
    }

    fn place(&mut self, myself: &Myself, place: PlaceOrder, traceparent: String, reply: Reply) {
        let shard = place.shard;
        self.drive(myself, Input::Place { place, traceparent, reply }, Some(shard));
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

/// The driver's [`Env`] in a node: the group's time from the shard's replica, ids from the clock and
/// a random source, SKUs by the inventory shard map.
struct NodeEnv<'a> {
    cluster: &'a Cluster,
    replicas: &'a BTreeMap<u32, Replica>,
}

impl Env for NodeEnv<'_> {
    fn now_ms(&mut self, shard: u32) -> u64 {
        // The driver asks only of a shard it drives, which has its replica here; the wall clock
        // is what the worker used before if it ever had not.
        self.replicas.get(&shard).map_or_else(bulkhead_storage::now_ms, |r| r.now_ms())
    }

    fn new_order_id(&mut self, shard: u32) -> Uuid {
        new_order_id(shard)
    }

    fn inventory_shard(&mut self, sku: &str) -> u32 {
        self.cluster.shard_of(Capability::Inventory, sku.as_bytes())
    }

    fn jitter(&mut self) -> f64 {
        jitter()
    }
}

/// The trace a saga step's command continues: the order's.
fn traceparent_of(cmd: &OrdersCommand) -> &str {
    match cmd {
        OrdersCommand::Step { order, .. } | OrdersCommand::Finish { order, .. } => &order.traceparent,
        _ => "",
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
    shard: u32,
    items: Vec<Item>,
    ttl_ms: u64,
    tp: &str,
) -> ReserveOutcome {
    let req = InventoryRequest::Reserve { order_id, items, ttl_ms };
    let t = Duration::from_millis(cluster.config().timing.call_timeout_ms);
    match cluster.call_leader::<_, InventoryReply>(Capability::Inventory, shard, &req, tp, t).await {
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

/// The shard a read is for.
fn shard_of(req: &OrdersRequest) -> u32 {
    match req {
        OrdersRequest::Get { order_id } | OrdersRequest::Await { order_id, .. } => shard_of_order(order_id),
        OrdersRequest::DeadLetters { shard, .. } | OrdersRequest::ByCustomer { shard, .. } => *shard,
        OrdersRequest::Place(p) => p.shard,
        OrdersRequest::InjectPanic => 0,
    }
}

/// A read on the shard's leader after a read barrier: never a stale answer from an old leader.
async fn read(replica: Replica, req: OrdersRequest) -> OrdersReply {
    if let Err(e) = replica.read_barrier().await {
        return unserved_reply(e.into());
    }
    let store = replica.store().clone();
    tokio::task::spawn_blocking(move || {
        let result = match req {
            OrdersRequest::Get { order_id } => {
                ORDERS.get(&store, &order_id).map(|o| o.map_or(OrdersReply::NotFound, |o| OrdersReply::Order(o.view())))
            }
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
    .unwrap_or_else(|e| OrdersReply::Unavailable(e.to_string()))
}

impl Service for Orders {
    type Req = OrdersRequest;
    type Resp = OrdersReply;
    type Own = OrdersOwn;
    type Local = OrdersState;

    fn capability(&self) -> Capability {
        Capability::Orders
    }

    fn route(&self, _: &Cluster, _: bool, req: &OrdersRequest) -> Route<OrdersReply> {
        match req {
            OrdersRequest::Place(_) | OrdersRequest::Await { .. } => Route::Own,
            OrdersRequest::InjectPanic => Route::Drill,
            read => Route::Shard(shard_of(read)),
        }
    }

    async fn serve(&self, replica: Replica, req: OrdersRequest, _trace: String) -> OrdersReply {
        read(replica, req).await
    }

    fn unserved(&self, why: Unserved) -> OrdersReply {
        unserved_reply(why)
    }

    fn drill_refused(&self) -> OrdersReply {
        OrdersReply::Refused("fault injection is disabled on this node".into())
    }

    fn start(&self, myself: &Myself, args: &WorkerArgs<Self>) -> OrdersState {
        myself.send_interval(Duration::from_millis(100), || ServeMsg::Own(OrdersOwn::Lead));
        myself.send_interval(SWEEP_EVERY, || ServeMsg::Own(OrdersOwn::Sweep));
        let _ = myself.cast(ServeMsg::Own(OrdersOwn::Lead));
        let window = self.settings.reservation_window_ms;
        OrdersState { cluster: args.cluster.clone(), replicas: args.replicas.clone(), driver: Driver::new(window) }
    }

    fn own(&self, state: &mut OrdersState, myself: &Myself, input: OwnInput<Self>) {
        match input {
            OwnInput::Request(Inbound { req, reply, traceparent }) => match req {
                OrdersRequest::Place(p) => state.place(myself, p, traceparent, reply),
                OrdersRequest::Await { order_id, wait_ms } => {
                    let input = Input::Await { order_id, wait_ms, reply };
                    state.drive(myself, input, Some(shard_of_order(&order_id)))
                }
                other => {
                    let _ = reply.send(OrdersReply::Refused(format!("not for the orders loop: {other:?}")));
                }
            },
            OwnInput::Message(OrdersOwn::Drive(input)) => state.drive(myself, *input, None),
            OwnInput::Message(OrdersOwn::Lead) => state.drive(myself, Input::Lead, None),
            OwnInput::Message(OrdersOwn::Sweep) => state.drive(myself, Input::Sweep, None),
        }
    }
}
