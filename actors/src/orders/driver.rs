//! The orders worker's decisions, with no I/O: which shards it drives, which places it admits,
//! parks or turns away, the sagas it holds in memory, their one proposal in flight, their epochs,
//! and who waits for which order.
//!
//! [`Driver::step`] takes one [`Input`] (a request, a proposal's answer, a timer, a load) and the
//! [`Facts`] the actor gathered just before (each local replica's leadership), with an [`Env`] to
//! ask for the group's time, a new order id, a SKU's inventory shard and a jitter, and returns
//! [`Effect`]s: replies, proposals, remote calls, timers and loads. The actor
//! ([`super::actor`]) performs them and feeds their outcomes back as inputs. The reply handle is a
//! type parameter, so the transcript tests (`testscripts/driver/`) drive it with plain numbers.
//!
//! The rules it keeps:
//! - A shard is driven in one term: `Loading` from the moment its replica is seen leading, until a
//!   read barrier and the shard's unfinished orders come back (`Loaded`), then `Ready`. A new term
//!   (or losing the lead) drops the shard's sagas from memory; their waiters get the order as last
//!   committed.
//! - A place is admitted only in the `Ready` term its replica leads; while the shard loads it is
//!   parked and placed once loaded, so a new leader never turns a client away for that.
//! - A place that commits while its shard loads is decided once the load is in (the load's read
//!   may have come before it).
//! - One proposal per saga is in flight; events that arrive meanwhile wait their turn, so the log
//!   holds an order's steps in the order they were taken. A proposal's answer names the saga's
//!   epoch: an answer to an instance since dropped is ignored.
//! - A step that does not commit drops the shard from memory; if the replica still leads, the next
//!   leadership check loads it again from what is committed (every step is idempotent).

use std::collections::{BTreeMap, HashMap, VecDeque};

use bulkhead_cluster::wire::trace_id;
use uuid::Uuid;

use super::machine::{OrdersApplied, OrdersCommand};
use super::protocol::{shard_of_order, OrdersReply, OrdersRequest, PlaceOrder};
use super::saga::{self, Command, Event, OrderRecord};
use crate::inventory::Item;
use crate::util::Unserved;

/// One local replica of an orders shard, as the actor saw it just before an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardFacts {
    /// The term this replica leads in, if it leads.
    pub leading: Option<u64>,
    /// The leader it knows of, when that is another node.
    pub leader: Option<String>,
}

/// What the driver asks of its surroundings while it decides: the node answers from its
/// replicas, its clock and a random source; the transcripts from fixed values. Asked only where a
/// decision needs it (the group's clock of a term starts at the first read, see `raft::clock`).
pub trait Env {
    /// The group's time of `shard` (`raft::clock`): every time put into a command is this one.
    fn now_ms(&mut self, shard: u32) -> u64;
    /// A new order id in `shard` (its last byte names the shard).
    fn new_order_id(&mut self, shard: u32) -> Uuid;
    /// The inventory shard that holds `sku`.
    fn inventory_shard(&mut self, sku: &str) -> u32;
    /// A jitter factor in [0.5, 1.0] for a saga step's backoff.
    fn jitter(&mut self) -> f64;
}

/// One step's view: the facts and the environment.
struct Cx<'a> {
    facts: &'a Facts,
    env: &'a mut dyn Env,
}

/// What the actor knows when it hands the driver an input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// This node's replicas, by shard.
    pub local: BTreeMap<u32, ShardFacts>,
    /// For a shard with no replica here: the leader this node would send the caller to.
    pub elsewhere: BTreeMap<u32, Option<String>>,
}

impl Facts {
    fn unserved(&self, shard: u32) -> Unserved {
        match self.local.get(&shard) {
            Some(f) => Unserved::NotLeader(f.leader.clone()),
            None => Unserved::NotLeader(self.elsewhere.get(&shard).cloned().flatten()),
        }
    }
}

/// A `Place` proposed in `term`, and what applying it answered: a new order, or the key's earlier one.
#[derive(Debug)]
pub struct Placed<R> {
    pub shard: u32,
    pub term: u64,
    pub order: OrderRecord,
    pub applied: Result<OrdersApplied, Unserved>,
    pub wait_ms: u64,
    pub reply: R,
}

/// What happens to the driver.
#[derive(Debug)]
pub enum Input<R> {
    /// A client's order.
    Place { place: PlaceOrder, traceparent: String, reply: R },
    /// A client still waiting for an order (`OrdersRequest::Await`).
    Await { order_id: Uuid, wait_ms: u64, reply: R },
    /// A proposed `Place` came back.
    Placed(Placed<R>),
    /// A saga's remote step came back, or its retry timer fired.
    Saga { order_id: Uuid, event: Event },
    /// A saga step's proposal came back; `then` are the step's commands that waited for it.
    Committed { order_id: Uuid, epoch: u64, then: Vec<Command>, applied: Result<OrdersApplied, Unserved> },
    /// A waiter's time is up.
    WaitOver { order_id: Uuid, waiter: u64 },
    /// Time to compare the shards this node leads with the shards it drives.
    Lead,
    /// A shard led in `term` was read after a barrier: its unfinished orders and their step counts.
    Loaded { shard: u32, term: u64, orders: Result<Vec<(OrderRecord, u64)>, String> },
    /// Time for every ready shard's idempotency sweep.
    Sweep,
}

/// What the driver asks the actor to do. (Effects live only in the `Vec` one step returns, so the
/// size of the largest variant costs nothing worth a box.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Effect<R> {
    Reply(R, OrdersReply),
    /// Propose `command` (an [`OrdersCommand::Place`], which holds the order); its answer comes
    /// back as [`Input::Placed`] with these fields.
    Place {
        shard: u32,
        term: u64,
        command: OrdersCommand,
        wait_ms: u64,
        reply: R,
    },
    /// Propose a saga step; its answer comes back as [`Input::Committed`].
    Propose {
        order_id: Uuid,
        shard: u32,
        epoch: u64,
        command: OrdersCommand,
        then: Vec<Command>,
    },
    /// Ask an inventory shard's leader for a hold; the answer comes back as an [`Input::Saga`].
    Reserve {
        order_id: Uuid,
        shard: u32,
        items: Vec<Item>,
        traceparent: String,
    },
    /// Ask payments for the charge; the answer comes back as an [`Input::Saga`].
    Charge {
        order_id: Uuid,
        amount_cents: u64,
        token: String,
        traceparent: String,
    },
    /// `Input::Saga { event: RetryDue }` after `ms`.
    RetryAfter {
        order_id: Uuid,
        ms: u64,
    },
    /// `Input::WaitOver` after `ms`.
    WaitTimer {
        order_id: Uuid,
        waiter: u64,
        ms: u64,
    },
    /// Read barrier on the shard's replica, then its unfinished orders: [`Input::Loaded`].
    Load {
        shard: u32,
        term: u64,
    },
    /// Answer `reply` with the order as this replica has applied it (no barrier: the place that
    /// found it was applied here).
    ReadApplied {
        shard: u32,
        order_id: Uuid,
        reply: R,
    },
    /// A linearizable read on the shard's leader, answered to `reply`.
    Read {
        req: OrdersRequest,
        reply: R,
    },
    /// One idempotency sweep of a ready shard.
    Sweep {
        shard: u32,
    },
    /// A finished order's outbox is committed: wake the relay.
    KickRelay,
}

/// A shard this worker drives, in the term its replica leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driving {
    /// Waiting for the read barrier and the unfinished orders.
    Loading(u64),
    Ready(u64),
}

impl Driving {
    fn term(self) -> u64 {
        match self {
            Driving::Loading(t) | Driving::Ready(t) => t,
        }
    }
}

/// A request waiting for its shard to be loaded.
#[derive(Debug)]
enum Parked<R> {
    Place { place: PlaceOrder, traceparent: String, reply: R },
    Await { order_id: Uuid, wait_ms: u64, reply: R },
}

impl<R> Parked<R> {
    fn reply(self) -> R {
        match self {
            Parked::Place { reply, .. } | Parked::Await { reply, .. } => reply,
        }
    }
}

/// One saga in memory.
#[derive(Debug)]
struct Saga<R> {
    shard: u32,
    /// Which instance this is: a saga dropped and loaded again is a new one, and answers to the
    /// old one's proposals are ignored.
    epoch: u64,
    /// The record as stepped, ahead of `committed` by at most the step in flight.
    order: OrderRecord,
    committed: OrderRecord,
    /// Steps committed for this order: the next proposal is step `steps + 1`.
    steps: u64,
    in_flight: bool,
    queued: VecDeque<Event>,
    waiters: Vec<(u64, R)>,
}

/// Whether a `Place` may go ahead now.
enum Admit {
    Go(u64),
    Wait,
}

/// The orders worker's state and rules.
pub struct Driver<R> {
    /// An order past this since it was placed is cancelled at its next retry or resume.
    window_ms: u64,
    driving: BTreeMap<u32, Driving>,
    sagas: HashMap<Uuid, Saga<R>>,
    /// Places and awaits that arrived while their shard was loading.
    parked: BTreeMap<u32, Vec<Parked<R>>>,
    /// Places committed while their shard was loading (the load may not have seen them).
    placed_while_loading: BTreeMap<u32, Vec<Placed<R>>>,
    next_waiter: u64,
    next_epoch: u64,
}

/// The reply for a request this node does not serve.
pub fn unserved_reply(e: Unserved) -> OrdersReply {
    match e {
        Unserved::NotLeader(leader) => OrdersReply::NotLeader { leader },
        Unserved::Unavailable(why) => OrdersReply::Unavailable(why),
    }
}

impl<R> Driver<R> {
    pub fn new(window_ms: u64) -> Self {
        Self {
            window_ms,
            driving: BTreeMap::new(),
            sagas: HashMap::new(),
            parked: BTreeMap::new(),
            placed_while_loading: BTreeMap::new(),
            next_waiter: 0,
            next_epoch: 0,
        }
    }

    /// Takes one input; returns what to do, in order.
    pub fn step(&mut self, input: Input<R>, facts: &Facts, env: &mut dyn Env) -> Vec<Effect<R>> {
        let mut out = Vec::new();
        let cx = &mut Cx { facts, env };
        match input {
            Input::Place { place, traceparent, reply } => self.place(cx, place, traceparent, reply, &mut out),
            Input::Await { order_id, wait_ms, reply } => self.await_order(cx, order_id, wait_ms, reply, &mut out),
            Input::Placed(p) => self.on_placed(cx, p, &mut out),
            Input::Saga { order_id, event } => self.on_saga_event(cx, order_id, event, &mut out),
            Input::Committed { order_id, epoch, then, applied } => {
                self.on_committed(cx, order_id, epoch, then, applied, &mut out)
            }
            Input::WaitOver { order_id, waiter } => {
                if let Some(s) = self.sagas.get_mut(&order_id) {
                    if let Some(pos) = s.waiters.iter().position(|(w, _)| *w == waiter) {
                        let (_, reply) = s.waiters.swap_remove(pos);
                        out.push(Effect::Reply(reply, OrdersReply::Order(s.committed.view())));
                    }
                }
            }
            Input::Lead => self.lead(cx, &mut out),
            Input::Loaded { shard, term, orders } => self.on_loaded(cx, shard, term, orders, &mut out),
            Input::Sweep => {
                for (shard, d) in &self.driving {
                    if let Driving::Ready(_) = d {
                        out.push(Effect::Sweep { shard: *shard });
                    }
                }
            }
        }
        out
    }

    /// The shards driven, and whether each is loading or ready (for tests and the transcripts).
    pub fn driving(&self) -> Vec<(u32, &'static str, u64)> {
        self.driving
            .iter()
            .map(|(s, d)| match d {
                Driving::Loading(t) => (*s, "loading", *t),
                Driving::Ready(t) => (*s, "ready", *t),
            })
            .collect()
    }

    /// The sagas in memory: order id, shard, epoch, committed steps, whether one is in flight,
    /// events queued and waiters (for tests and the transcripts).
    pub fn sagas(&self) -> Vec<(Uuid, u32, u64, u64, bool, usize, usize)> {
        let mut v: Vec<_> = self
            .sagas
            .iter()
            .map(|(id, s)| (*id, s.shard, s.epoch, s.steps, s.in_flight, s.queued.len(), s.waiters.len()))
            .collect();
        v.sort();
        v
    }

    /// Requests parked per shard.
    pub fn parked(&self) -> BTreeMap<u32, usize> {
        self.parked.iter().map(|(s, p)| (*s, p.len())).collect()
    }

    /// Whether a place in `shard` may go ahead now: the shard is driven in the term its replica
    /// leads (`Go`), or its replica leads and it is still loading (`Wait`).
    fn admit(&mut self, cx: &mut Cx<'_>, shard: u32, out: &mut Vec<Effect<R>>) -> Result<Admit, Unserved> {
        let Some(term) = cx.facts.local.get(&shard).and_then(|f| f.leading) else {
            return Err(cx.facts.unserved(shard));
        };
        match self.driving.get(&shard) {
            Some(Driving::Ready(t)) if *t == term => Ok(Admit::Go(term)),
            Some(Driving::Loading(t)) if *t == term => Ok(Admit::Wait),
            // Leading since the last check: start loading now rather than at the next tick.
            _ => {
                self.lead(cx, out);
                match self.driving.get(&shard) {
                    Some(Driving::Loading(_)) => Ok(Admit::Wait),
                    _ => Err(cx.facts.unserved(shard)),
                }
            }
        }
    }

    fn wait_for(&mut self, order_id: Uuid, wait_ms: u64, reply: R, out: &mut Vec<Effect<R>>) {
        let Some(s) = self.sagas.get_mut(&order_id) else {
            out.push(Effect::Reply(reply, OrdersReply::Unavailable("the order left this leader".into())));
            return;
        };
        let waiter = self.next_waiter;
        self.next_waiter += 1;
        s.waiters.push((waiter, reply));
        out.push(Effect::WaitTimer { order_id, waiter, ms: wait_ms });
    }

    fn place(&mut self, cx: &mut Cx<'_>, place: PlaceOrder, traceparent: String, reply: R, out: &mut Vec<Effect<R>>) {
        let term = match self.admit(cx, place.shard, out) {
            Ok(Admit::Go(term)) => term,
            Ok(Admit::Wait) => {
                let parked = Parked::Place { place, traceparent, reply };
                self.parked.entry(parked_shard(&parked)).or_default().push(parked);
                return;
            }
            Err(e) => {
                out.push(Effect::Reply(reply, unserved_reply(e)));
                return;
            }
        };
        // Admitted: the order's id, its items by the inventory shard that holds each SKU, and the
        // group's time (the shard is driven in the term its replica leads).
        let id = cx.env.new_order_id(place.shard);
        let mut split: Vec<(u32, Vec<Item>)> = Vec::new();
        for it in &place.items {
            let shard = cx.env.inventory_shard(&it.sku);
            match split.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, items)) => items.push(it.clone()),
                None => split.push((shard, vec![it.clone()])),
            }
        }
        let now = cx.env.now_ms(place.shard);
        let mut order = saga::new_order(id, place.customer_id, place.items, place.payment_token, split, now);
        order.traceparent = traceparent;
        let command = OrdersCommand::Place { order, idempotency: place.idempotency, now_ms: now };
        out.push(Effect::Place { shard: place.shard, term, command, wait_ms: place.wait_ms, reply });
    }

    fn on_placed(&mut self, cx: &mut Cx<'_>, placed: Placed<R>, out: &mut Vec<Effect<R>>) {
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
                    // Leadership moved while the place committed: whoever leads now loads it (it
                    // was committed before their read barrier).
                    _ => return out.push(Effect::Reply(reply, OrdersReply::Order(order.view()))),
                }
                let id = order.id;
                if !self.sagas.contains_key(&id) {
                    self.insert_saga(cx, shard, order, 0, Event::Start, out);
                }
                // else: a reload of the shard found it first.
                self.wait_for(id, wait_ms, reply, out);
            }
            Ok(OrdersApplied::Existing { order_id, same_body: false }) => {
                out.push(Effect::Reply(reply, OrdersReply::IdempotencyConflict { order_id }));
            }
            Ok(OrdersApplied::Existing { order_id, same_body: true }) => {
                if self.sagas.contains_key(&order_id) {
                    return self.wait_for(order_id, wait_ms, reply, out);
                }
                // Applied on this replica before the `Place` that found it: a plain read will do.
                out.push(Effect::ReadApplied { shard, order_id, reply });
            }
            Ok(other) => {
                tracing::error!(?other, "unexpected answer to placing an order");
                let why = format!("placing the order answered {other:?}");
                out.push(Effect::Reply(reply, OrdersReply::Unavailable(why)));
            }
            Err(Unserved::Unavailable(why)) => {
                // Timed out or failed: the place may still commit. Reload the shard so that, if it
                // does, the order is driven; tell the client it may exist (retry with its key).
                self.release(shard, out);
                out.push(Effect::Reply(reply, OrdersReply::Uncertain(why)));
            }
            Err(e) => out.push(Effect::Reply(reply, unserved_reply(e))),
        }
    }

    /// Takes a saga into memory (a new order, or one loaded from the shard) and steps `first`.
    fn insert_saga(
        &mut self,
        cx: &mut Cx<'_>,
        shard: u32,
        order: OrderRecord,
        steps: u64,
        first: Event,
        out: &mut Vec<Effect<R>>,
    ) {
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
        self.on_saga_event(cx, id, first, out);
    }

    fn on_saga_event(&mut self, cx: &mut Cx<'_>, order_id: Uuid, event: Event, out: &mut Vec<Effect<R>>) {
        let window = self.window_ms;
        let Some(s) = self.sagas.get_mut(&order_id) else { return };
        if s.in_flight {
            s.queued.push_back(event);
            return;
        }
        // The group's time, as every time this worker puts into a command (see `raft::clock`).
        let now = cx.env.now_ms(s.shard);
        // A retry (or a resume) past the order's reservation window cancels it instead: the
        // window is judged on the group's time, like every time the saga records.
        let event = match event {
            Event::RetryDue | Event::Resume if saga::window_passed(&s.order, now, window) => Event::WindowPassed,
            other => other,
        };
        let record = saga::must_commit(&event);
        let before = s.order.clone();
        let cmds = saga::step(&mut s.order, event, now, cx.env.jitter());
        if !saga::worth_recording(&before, &s.order) || !record {
            // Nothing new (or only the retry bookkeeping), or nothing a resumed saga would not
            // find again (a granted hold): the next recorded step carries it.
            return self.execute(order_id, cmds, out);
        }
        // A step's commands wait for its commit (a new leader must find what was asked for), but
        // those a resumed saga asks for again identically go out with the proposal.
        let step = s.steps + 1;
        let command = if cmds.contains(&Command::Finish) {
            OrdersCommand::Finish { order: s.order.clone(), step, now_ms: now }
        } else {
            OrdersCommand::Step { order: s.order.clone(), step }
        };
        s.in_flight = true;
        let (shard, epoch) = (s.shard, s.epoch);
        if !cx.facts.local.contains_key(&shard) {
            // No replica to propose on (the node stopped hosting it): nothing goes out; the step
            // fails as a proposal would, and the shard is let go.
            let e = cx.facts.unserved(shard);
            return self.on_committed(cx, order_id, epoch, cmds, Err(e), out);
        }
        let (now_cmds, then): (Vec<_>, Vec<_>) = cmds.into_iter().partition(saga::runs_before_commit);
        out.push(Effect::Propose { order_id, shard, epoch, command, then });
        // Their answers wait in `queued` until the step has committed.
        self.execute(order_id, now_cmds, out);
    }

    fn on_committed(
        &mut self,
        cx: &mut Cx<'_>,
        order_id: Uuid,
        epoch: u64,
        then: Vec<Command>,
        applied: Result<OrdersApplied, Unserved>,
        out: &mut Vec<Effect<R>>,
    ) {
        let Some(s) = self.sagas.get_mut(&order_id) else { return };
        if s.epoch != epoch {
            // An answer to a dropped instance: this one works from the committed record it loaded.
            return;
        }
        match applied {
            Ok(OrdersApplied::Done) => {
                s.in_flight = false;
                s.steps += 1;
                s.committed = s.order.clone();
                self.execute(order_id, then, out);
                while let Some(s) = self.sagas.get_mut(&order_id) {
                    if s.in_flight {
                        break;
                    }
                    let Some(ev) = s.queued.pop_front() else { break };
                    self.on_saga_event(cx, order_id, ev, out);
                }
            }
            other => {
                // Not committed (this replica lost the lead, no majority in time), or the order is
                // already terminal. The shard is dropped from memory and, if this replica still
                // leads, loaded again from what is committed: every step is idempotent, so going on
                // from the committed records loses nothing.
                let shard = s.shard;
                tracing::info!(%order_id, shard, outcome = ?other, "saga step not committed; the shard is reloaded");
                self.release(shard, out);
            }
        }
    }

    /// Forgets a saga; its waiters get the order as last committed.
    fn drop_saga(&mut self, order_id: Uuid, out: &mut Vec<Effect<R>>) {
        if let Some(s) = self.sagas.remove(&order_id) {
            for (_, w) in s.waiters {
                out.push(Effect::Reply(w, OrdersReply::Order(s.committed.view())));
            }
        }
    }

    fn execute(&mut self, order_id: Uuid, cmds: Vec<Command>, out: &mut Vec<Effect<R>>) {
        let traceparent = self.sagas.get(&order_id).map(|s| s.order.traceparent.clone()).unwrap_or_default();
        for cmd in cmds {
            match cmd {
                Command::Reserve { shard, items } => {
                    out.push(Effect::Reserve { order_id, shard, items, traceparent: traceparent.clone() })
                }
                Command::Charge { amount_cents, token } => {
                    out.push(Effect::Charge { order_id, amount_cents, token, traceparent: traceparent.clone() })
                }
                Command::RetryIn(ms) => out.push(Effect::RetryAfter { order_id, ms }),
                Command::Finish => self.finish(order_id, out),
            }
        }
    }

    /// The terminal state (and its outbox) is committed: answer the waiters, wake the relay.
    fn finish(&mut self, order_id: Uuid, out: &mut Vec<Effect<R>>) {
        let Some(s) = self.sagas.remove(&order_id) else { return };
        let o = &s.committed;
        let reason = o.reason.map_or("", |r| r.as_str());
        tracing::info!(%order_id, trace_id = %trace_id(&o.traceparent), status = ?o.status, reason, "order finished");
        let view = o.view();
        for (_, w) in s.waiters {
            out.push(Effect::Reply(w, OrdersReply::Order(view.clone())));
        }
        out.push(Effect::KickRelay);
    }

    /// Compares the shards this node's replicas lead with the shards it drives: starts loading a
    /// shard it leads in a new term, drops one it no longer leads.
    fn lead(&mut self, cx: &mut Cx<'_>, out: &mut Vec<Effect<R>>) {
        for (&shard, f) in &cx.facts.local {
            let driving = self.driving.get(&shard).copied();
            if f.leading.is_some() && driving.map(Driving::term) == f.leading {
                continue;
            }
            if driving.is_some() {
                self.release(shard, out);
            }
            let Some(term) = f.leading else {
                // Nothing was proposed for these: the caller follows the leader, or retries.
                for parked in self.parked.remove(&shard).unwrap_or_default() {
                    out.push(Effect::Reply(parked.reply(), OrdersReply::NotLeader { leader: f.leader.clone() }));
                }
                continue;
            };
            self.driving.insert(shard, Driving::Loading(term));
            out.push(Effect::Load { shard, term });
        }
    }

    /// Stops driving `shard`: its sagas leave memory (their waiters get the committed order).
    fn release(&mut self, shard: u32, out: &mut Vec<Effect<R>>) {
        if self.driving.remove(&shard).is_some() {
            tracing::info!(
                shard,
                "not driving this orders shard's sagas any more (leadership moved, or a step failed)"
            );
        }
        let mut ids: Vec<Uuid> = self.sagas.iter().filter(|(_, s)| s.shard == shard).map(|(id, _)| *id).collect();
        ids.sort();
        for id in ids {
            self.drop_saga(id, out);
        }
        // Committed places the load had not settled: whoever loads the shard next finds them.
        for p in self.placed_while_loading.remove(&shard).unwrap_or_default() {
            out.push(Effect::Reply(p.reply, OrdersReply::Order(p.order.view())));
        }
    }

    fn on_loaded(
        &mut self,
        cx: &mut Cx<'_>,
        shard: u32,
        term: u64,
        orders: Result<Vec<(OrderRecord, u64)>, String>,
        out: &mut Vec<Effect<R>>,
    ) {
        if self.driving.get(&shard) != Some(&Driving::Loading(term)) {
            return;
        }
        let orders = match orders {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(shard, term, error = %e, "cannot load this orders shard's unfinished sagas yet");
                // The next leadership check tries again; the parked requests are not kept waiting.
                self.driving.remove(&shard);
                for parked in self.parked.remove(&shard).unwrap_or_default() {
                    let why = format!("shard {shard} is not loaded yet: {e}");
                    out.push(Effect::Reply(parked.reply(), OrdersReply::Unavailable(why)));
                }
                for p in self.placed_while_loading.remove(&shard).unwrap_or_default() {
                    out.push(Effect::Reply(p.reply, OrdersReply::Order(p.order.view())));
                }
                return;
            }
        };
        self.driving.insert(shard, Driving::Ready(term));
        out.push(Effect::Sweep { shard });
        tracing::info!(
            shard,
            term,
            resuming = orders.len(),
            "leading this orders shard: its unfinished sagas resume here"
        );
        for (o, steps) in orders {
            if !self.sagas.contains_key(&o.id) {
                self.insert_saga(cx, shard, o, steps, Event::Resume, out);
            }
        }
        for p in self.placed_while_loading.remove(&shard).unwrap_or_default() {
            self.on_placed(cx, p, out);
        }
        for parked in self.parked.remove(&shard).unwrap_or_default() {
            match parked {
                Parked::Place { place, traceparent, reply } => self.place(cx, place, traceparent, reply, out),
                Parked::Await { order_id, wait_ms, reply } => self.await_order(cx, order_id, wait_ms, reply, out),
            }
        }
    }

    /// Waits for an order whose client is still waiting: on the leader that drives its shard now.
    /// An order not in flight here is finished (or was never placed): a linearizable read answers.
    fn await_order(&mut self, cx: &mut Cx<'_>, order_id: Uuid, wait_ms: u64, reply: R, out: &mut Vec<Effect<R>>) {
        let shard = shard_of_order(&order_id);
        match self.admit(cx, shard, out) {
            Err(e) => out.push(Effect::Reply(reply, unserved_reply(e))),
            Ok(Admit::Wait) => self.parked.entry(shard).or_default().push(Parked::Await { order_id, wait_ms, reply }),
            Ok(Admit::Go(_)) if self.sagas.contains_key(&order_id) => self.wait_for(order_id, wait_ms, reply, out),
            Ok(Admit::Go(_)) => out.push(Effect::Read { req: OrdersRequest::Get { order_id }, reply }),
        }
    }
}

fn parked_shard<R>(p: &Parked<R>) -> u32 {
    match p {
        Parked::Place { place, .. } => place.shard,
        Parked::Await { order_id, .. } => shard_of_order(order_id),
    }
}
