//! Transcript tests of the orders [`Driver`]: scripts in `testscripts/driver/` feed it inputs and
//! facts, and the effects it returns are written under each command (goldenscript, as toydb tests
//! its Raft node). Run with `UPDATE_GOLDENFILES=1` to rewrite the expected output after a change
//! that means to alter it, then read the diff.
//!
//! Commands (orders are named by labels such as `o1`; replies by `r<N>`, one per request):
//!
//! - `facts SHARD leads=TERM [now=MS]`, `facts SHARD follows=NODE|- [now=MS]`,
//!   `facts SHARD remote=NODE`: what the actor would gather (a local replica leading or following,
//!   or no replica here), and the shard's group time the environment answers (1000 until set).
//! - `lead`, `sweep`: the worker's timers.
//! - `loaded SHARD term=T [orders="o1:STEPS,..."...] [error=WHY]`: a load came back.
//! - `place LABEL shard=S [key=K] [wait=MS]`, `await LABEL [wait=MS]`: client requests.
//! - `placed LABEL [placed|same-key|other-body|timeout|not-leader] [first=LABEL]`: the place's
//!   proposal came back (`first`: the order the key already names).
//! - `committed LABEL [done|stale|timeout]`: the oldest of the order's proposals in flight came back.
//! - `reserved LABEL`, `out-of-stock LABEL`, `charged LABEL`, `declined LABEL`,
//!   `payments-down LABEL`, `retry-due LABEL`: a saga step's answer or its retry timer.
//! - `wait-over LABEL waiter=W`: a waiter's time is up.
//! - `state`: the shards driven, the sagas in memory, the requests parked.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::error::Error;
use std::fmt::Write as _;

use uuid::Uuid;

use super::driver::{Driver, Effect, Env, Facts, Input, Placed, ShardFacts};
use super::machine::{OrdersApplied, OrdersCommand};
use super::protocol::{IdemKey, OrdersReply, OrdersRequest, PlaceOrder};
use super::saga::{self, ChargeOutcome, Command, Event, OrderRecord, ReserveOutcome};
use crate::inventory::{Item, PricedLine};
use crate::util::Unserved;
use bulkhead_storage::BodyFingerprint;

const WINDOW_MS: u64 = 60_000;

#[derive(Default)]
struct Pending {
    place: Option<(u32, u64, OrderRecord, u64, u64)>,
    /// Proposals in flight (epoch, the commands waiting for it, the record it carries), answered
    /// in the order they were made.
    proposals: VecDeque<(u64, Vec<Command>, OrderRecord)>,
}

/// The transcripts' environment: each shard's time as `facts ... now=` set it, the next ids the
/// `place` commands named, every SKU in inventory shard 0, no jitter.
#[derive(Default)]
struct TestEnv {
    now: BTreeMap<u32, u64>,
    ids: BTreeMap<u32, VecDeque<Uuid>>,
}

impl Env for TestEnv {
    fn now_ms(&mut self, shard: u32) -> u64 {
        self.now.get(&shard).copied().unwrap_or(1_000)
    }
    fn new_order_id(&mut self, shard: u32) -> Uuid {
        self.ids
            .get_mut(&shard)
            .and_then(VecDeque::pop_front)
            .unwrap_or_else(|| panic!("no id queued for shard {shard}"))
    }
    fn inventory_shard(&mut self, _sku: &str) -> u32 {
        0
    }
    fn jitter(&mut self) -> f64 {
        1.0
    }
}

struct Runner {
    driver: Driver<u64>,
    facts: Facts,
    env: TestEnv,
    labels: BTreeMap<String, Uuid>,
    names: HashMap<Uuid, String>,
    /// Each order as last committed: what a `loaded` finds.
    records: HashMap<Uuid, OrderRecord>,
    pending: HashMap<Uuid, Pending>,
    next_reply: u64,
}

impl Runner {
    fn new() -> Self {
        Self {
            driver: Driver::new(WINDOW_MS),
            facts: Facts::default(),
            env: TestEnv::default(),
            labels: BTreeMap::new(),
            names: HashMap::new(),
            records: HashMap::new(),
            pending: HashMap::new(),
            next_reply: 1,
        }
    }

    /// The order id of `label` in `shard` (its last byte names the shard, as real ids do).
    fn id(&mut self, label: &str, shard: u32) -> Uuid {
        if let Some(id) = self.labels.get(label) {
            return *id;
        }
        let n = self.labels.len() as u64 + 1;
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&n.to_be_bytes());
        b[15] = shard as u8;
        let id = Uuid::from_bytes(b);
        self.labels.insert(label.to_string(), id);
        self.names.insert(id, label.to_string());
        id
    }

    fn known(&self, label: &str) -> Result<Uuid, Box<dyn Error>> {
        self.labels.get(label).copied().ok_or_else(|| format!("unknown order {label}").into())
    }

    fn name(&self, id: &Uuid) -> String {
        self.names.get(id).cloned().unwrap_or_else(|| id.to_string())
    }

    fn reply_id(&mut self) -> u64 {
        let r = self.next_reply;
        self.next_reply += 1;
        r
    }

    fn step(&mut self, input: Input<u64>) -> String {
        let effects = self.driver.step(input, &self.facts, &mut self.env);
        let mut out = String::new();
        for e in effects {
            let line = self.describe(e);
            let _ = writeln!(out, "{line}");
        }
        out
    }

    fn describe(&mut self, e: Effect<u64>) -> String {
        match e {
            Effect::Reply(r, answer) => format!("r{r} <- {}", self.answer(&answer)),
            Effect::Place { shard, term, command, wait_ms, reply } => {
                let OrdersCommand::Place { order, .. } = command else {
                    return format!("propose unexpected {command:?}");
                };
                let (id, name) = (order.id, self.name(&order.id));
                self.pending.entry(id).or_default().place = Some((shard, term, order, wait_ms, reply));
                format!("propose place {name} in shard {shard} term {term} (for r{reply})")
            }
            Effect::Propose { order_id, shard, epoch, command, then } => {
                let name = self.name(&order_id);
                let (what, step, order) = match command {
                    OrdersCommand::Step { order, step } => ("step", step, order),
                    OrdersCommand::Finish { order, step, .. } => ("finish", step, order),
                    other => return format!("propose unexpected {other:?}"),
                };
                let status = format!("{:?}", order.status).to_lowercase();
                let then_s = if then.is_empty() { String::new() } else { format!(", then {}", commands(&then)) };
                self.pending.entry(order_id).or_default().proposals.push_back((epoch, then, order));
                format!("propose {what} {step} of {name} ({status}) in shard {shard}, epoch {epoch}{then_s}")
            }
            Effect::Reserve { order_id, shard, items, .. } => {
                let n: u64 = items.iter().map(|i| i.quantity).sum();
                format!("call reserve {} at inventory/{shard} ({n} unit(s))", self.name(&order_id))
            }
            Effect::Charge { order_id, amount_cents, .. } => {
                format!("call charge {} {amount_cents} cents", self.name(&order_id))
            }
            Effect::RetryAfter { order_id, ms } => format!("timer retry {} in {ms} ms", self.name(&order_id)),
            Effect::WaitTimer { order_id, waiter, ms } => {
                format!("timer wait-over {} waiter={waiter} in {ms} ms", self.name(&order_id))
            }
            Effect::Load { shard, term } => format!("load shard {shard} term {term}"),
            Effect::ReadApplied { shard, order_id, reply } => {
                format!("read applied {} in shard {shard} (for r{reply})", self.name(&order_id))
            }
            Effect::Read { req, reply } => match req {
                OrdersRequest::Get { order_id } => {
                    format!("read {} at the leader (for r{reply})", self.name(&order_id))
                }
                other => format!("read {other:?} (for r{reply})"),
            },
            Effect::Sweep { shard } => format!("sweep shard {shard}"),
            Effect::KickRelay => "kick relay".to_string(),
        }
    }

    fn answer(&self, a: &OrdersReply) -> String {
        match a {
            OrdersReply::Order(v) => {
                format!("order {} {}", self.name(&v.order_id), format!("{:?}", v.status).to_lowercase())
            }
            OrdersReply::NotLeader { leader } => {
                format!("not leader (leader {})", leader.as_deref().unwrap_or("unknown"))
            }
            OrdersReply::Unavailable(why) => format!("unavailable: {why}"),
            OrdersReply::Uncertain(why) => format!("uncertain: {why}"),
            OrdersReply::IdempotencyConflict { order_id } => format!("conflict with {}", self.name(order_id)),
            other => format!("{other:?}"),
        }
    }

    fn state(&self) -> String {
        let mut out = String::new();
        for (shard, how, term) in self.driver.driving() {
            let _ = writeln!(out, "shard {shard}: {how} term {term}");
        }
        for (id, shard, epoch, steps, in_flight, queued, waiters) in self.driver.sagas() {
            let _ = writeln!(
                out,
                "saga {} shard {shard} epoch {epoch} steps {steps} in_flight={in_flight} queued={queued} waiters={waiters}",
                self.name(&id)
            );
        }
        for (shard, n) in self.driver.parked() {
            let _ = writeln!(out, "parked in shard {shard}: {n}");
        }
        if out.is_empty() {
            out.push_str("nothing\n");
        }
        out
    }
}

fn commands(cmds: &[Command]) -> String {
    let names: Vec<String> = cmds
        .iter()
        .map(|c| match c {
            Command::Reserve { shard, .. } => format!("reserve at inventory/{shard}"),
            Command::Charge { .. } => "charge".to_string(),
            Command::RetryIn(ms) => format!("retry in {ms} ms"),
            Command::Finish => "finish".to_string(),
        })
        .collect();
    names.join(", ")
}

fn place_order(shard: u32, key: Option<String>, wait_ms: u64) -> PlaceOrder {
    PlaceOrder {
        shard,
        customer_id: "c1".into(),
        items: vec![Item { sku: "widget-1".into(), quantity: 2 }],
        payment_token: "tok_ok".into(),
        idempotency: key.map(|key| IdemKey { key, body: BodyFingerprint::of(b"{}") }),
        wait_ms,
    }
}

impl goldenscript::Runner for Runner {
    fn run(&mut self, command: &goldenscript::Command) -> Result<String, Box<dyn Error>> {
        let mut args = command.consume_args();
        let out = match command.name.as_str() {
            "facts" => {
                let shard: u32 = args.next_pos().ok_or("facts SHARD ...")?.parse()?;
                if let Some(now) = args.lookup_parse::<u64>("now")? {
                    self.env.now.insert(shard, now);
                }
                if let Some(term) = args.lookup_parse::<u64>("leads")? {
                    self.facts.local.insert(shard, ShardFacts { leading: Some(term), leader: None });
                } else if let Some(leader) = args.lookup("follows") {
                    let leader = (leader.value != "-").then(|| leader.value.clone());
                    self.facts.local.insert(shard, ShardFacts { leading: None, leader });
                } else if let Some(leader) = args.lookup("remote") {
                    self.facts.local.remove(&shard);
                    self.facts.elsewhere.insert(shard, Some(leader.value.clone()));
                } else {
                    return Err("facts: leads=, follows= or remote=".into());
                }
                String::new()
            }
            "lead" => self.step(Input::Lead),
            "sweep" => self.step(Input::Sweep),
            "state" => self.state(),
            "loaded" => {
                let shard: u32 = args.next_pos().ok_or("loaded SHARD term=T")?.parse()?;
                let term: u64 = args.lookup_parse("term")?.ok_or("loaded: term=")?;
                let orders = match args.lookup("error") {
                    Some(e) => Err(e.value.clone()),
                    None => {
                        let mut v = Vec::new();
                        let list = args.lookup("orders").map(|a| a.value.clone()).unwrap_or_default();
                        for item in list.split(',').filter(|s| !s.is_empty()) {
                            let (label, steps) = item.split_once(':').ok_or("orders=LABEL:STEPS,...")?;
                            let id = self.id(label, shard);
                            let record = match self.records.get(&id) {
                                Some(r) => r.clone(),
                                None => {
                                    let p = place_order(shard, None, 0);
                                    let split = vec![(0, p.items.clone())];
                                    let created = self.env.now_ms(shard);
                                    saga::new_order(id, p.customer_id, p.items, p.payment_token, split, created)
                                }
                            };
                            v.push((record, steps.parse()?));
                        }
                        Ok(v)
                    }
                };
                self.step(Input::Loaded { shard, term, orders })
            }
            "place" => {
                let label = args.next_pos().ok_or("place LABEL shard=S")?.value.clone();
                let shard: u32 = args.lookup_parse("shard")?.ok_or("place: shard=")?;
                let key = args.lookup("key").map(|a| a.value.clone());
                let wait = args.lookup_parse::<u64>("wait")?.unwrap_or(500);
                let id = self.id(&label, shard);
                // The id the driver draws when it admits this place (now, or once its shard loads).
                self.env.ids.entry(shard).or_default().push_back(id);
                let place = place_order(shard, key, wait);
                let reply = self.reply_id();
                let out = self.step(Input::Place { place, traceparent: String::new(), reply });
                if out.contains(&format!("r{reply} <- ")) {
                    // Turned away before an id was drawn.
                    self.env.ids.entry(shard).or_default().retain(|i| *i != id);
                }
                format!("r{reply} = place {label}\n") + &out
            }
            "await" => {
                let label = args.next_pos().ok_or("await LABEL")?.value.clone();
                let order_id = self.known(&label)?;
                let wait_ms = args.lookup_parse::<u64>("wait")?.unwrap_or(500);
                let reply = self.reply_id();
                format!("r{reply} = await {label}\n") + &self.step(Input::Await { order_id, wait_ms, reply })
            }
            "placed" => {
                let label = args.next_pos().ok_or("placed LABEL")?.value.clone();
                let id = self.known(&label)?;
                let how = args.next_pos().map_or("placed".to_string(), |a| a.value.clone());
                // `same-key`/`other-body`: the key's first order, `first=LABEL`.
                let first = match args.lookup("first") {
                    Some(a) => self.known(&a.value)?,
                    None => id,
                };
                let (shard, term, order, wait_ms, reply) =
                    self.pending.get_mut(&id).and_then(|p| p.place.take()).ok_or("no place in flight")?;
                if how == "placed" {
                    self.records.insert(id, order.clone());
                }
                let applied = match how.as_str() {
                    "placed" => Ok(OrdersApplied::Placed),
                    "same-key" => Ok(OrdersApplied::Existing { order_id: first, same_body: true }),
                    "other-body" => Ok(OrdersApplied::Existing { order_id: first, same_body: false }),
                    "timeout" => Err(Unserved::Unavailable("timed out".into())),
                    "not-leader" => Err(Unserved::NotLeader(Some("n2".into()))),
                    other => return Err(format!("placed: unknown outcome {other}").into()),
                };
                self.step(Input::Placed(Placed { shard, term, order, applied, wait_ms, reply }))
            }
            "committed" => {
                let label = args.next_pos().ok_or("committed LABEL")?.value.clone();
                let order_id = self.known(&label)?;
                let how = args.next_pos().map_or("done".to_string(), |a| a.value.clone());
                let (epoch, then, order) = self
                    .pending
                    .get_mut(&order_id)
                    .and_then(|p| p.proposals.pop_front())
                    .ok_or("no proposal in flight")?;
                if how == "done" {
                    self.records.insert(order_id, order);
                }
                let applied = match how.as_str() {
                    "done" => Ok(OrdersApplied::Done),
                    "stale" => Ok(OrdersApplied::Stale),
                    "timeout" => Err(Unserved::Unavailable("timed out".into())),
                    other => return Err(format!("committed: unknown outcome {other}").into()),
                };
                self.step(Input::Committed { order_id, epoch, then, applied })
            }
            name @ ("reserved" | "out-of-stock" | "charged" | "declined" | "payments-down" | "retry-due") => {
                let label = args.next_pos().ok_or("EVENT LABEL")?.value.clone();
                let order_id = self.known(&label)?;
                let shard = 0;
                let event = match name {
                    "reserved" => {
                        let lines = vec![PricedLine { sku: "widget-1".into(), quantity: 2, unit_price_cents: 500 }];
                        Event::Reserve { shard, outcome: ReserveOutcome::Reserved { lines, expires_ms: u64::MAX } }
                    }
                    "out-of-stock" => {
                        Event::Reserve { shard, outcome: ReserveOutcome::OutOfStock { sku: "widget-1".into() } }
                    }
                    "charged" => Event::Charge(ChargeOutcome::Charged { payment_id: "pay-1".into() }),
                    "declined" => Event::Charge(ChargeOutcome::Declined { reason: "card".into() }),
                    "payments-down" => Event::Charge(ChargeOutcome::Unavailable("no leader".into())),
                    _ => Event::RetryDue,
                };
                self.step(Input::Saga { order_id, event })
            }
            "wait-over" => {
                let label = args.next_pos().ok_or("wait-over LABEL waiter=W")?.value.clone();
                let order_id = self.known(&label)?;
                let waiter: u64 = args.lookup_parse("waiter")?.ok_or("wait-over: waiter=")?;
                self.step(Input::WaitOver { order_id, waiter })
            }
            other => return Err(format!("unknown command {other}").into()),
        };
        args.reject_rest()?;
        Ok(out)
    }
}

#[test]
fn transcripts() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/orders/testscripts/driver");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no transcripts in {}", dir.display());
    for path in paths {
        goldenscript::run(&mut Runner::new(), &path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}
