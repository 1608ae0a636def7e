//! The order saga as a pure state machine: `step(order, event, now) -> commands`.
//!
//! 1. reserve the items on every inventory shard that holds some of them (all shards, or none);
//! 2. charge the total (idempotent by order id on the payments side);
//! 3. finish: the shell persists the terminal state and this order's outbox entries in one batch
//!    (commit or release the reservations; `OrderConfirmed` for shipping and notifications).
//!
//! Every request the saga makes is idempotent by order id, so after a restart or a timeout the
//! shell simply re-issues what is outstanding ([`Event::Resume`], [`Event::RetryDue`]). A step whose
//! capability is unreachable keeps the order `pending` and schedules a retry with exponential
//! backoff and jitter; a definite answer (out of stock, declined) cancels it.

use bulkhead_storage::{decode_payload, unknown_version, CodecError, Record};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::protocol::{CancelReason, HistoryEntry, OrderStatus, OrderView};
use crate::consumer::OrderConfirmed;
use crate::inventory::{Item, PricedLine};
use crate::util::backoff_ms;

pub const RETRY_BASE_MS: u64 = 100;
pub const RETRY_CAP_MS: u64 = 5_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardState {
    Pending,
    /// Held for this order until `expires_ms` (inventory's wall clock).
    Reserved {
        lines: Vec<PricedLine>,
        expires_ms: u64,
    },
}

/// The part of the order held by one inventory shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStep {
    /// The inventory shard (a Raft group, led wherever).
    pub shard: u32,
    pub items: Vec<Item>,
    pub state: ShardState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Reserving,
    Charging,
    Done,
}

/// An order and its saga progress: persisted whole at every step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    pub id: Uuid,
    pub customer_id: String,
    pub items: Vec<Item>,
    pub payment_token: String,
    pub status: OrderStatus,
    pub reason: Option<CancelReason>,
    pub payment_id: Option<String>,
    pub lines: Vec<PricedLine>,
    pub total_cents: u64,
    pub phase: Phase,
    pub shards: Vec<ShardStep>,
    pub attempts: u32,
    pub retry_scheduled: bool,
    /// The earliest expiry of this order's holds (as inventory answered; `u64::MAX`: until the
    /// saga ends them). Shown, never decided on: comparing it with this leader's time would compare
    /// two groups' clocks. `hold_margin_ms` is no longer used (kept for the record's layout).
    pub hold_until_ms: u64,
    pub hold_margin_ms: u64,
    /// A charge was requested at least once, as far as this record knows. Shown only: a cancel
    /// refunds (or voids) whatever it says, since an unrecorded charge may have landed
    /// (`must_commit`).
    pub charge_attempted: bool,
    pub last_wait: Option<String>,
    pub history: Vec<HistoryEntry>,
    pub created_ms: u64,
    /// The W3C trace of the request that placed the order: every call the saga makes for it, and
    /// its outbox deliveries, continue this trace, so one order can be followed across nodes.
    pub traceparent: String,
}

impl Record for OrderRecord {
    /// 2: a shard step names its inventory shard by number (`inventory/3` before), and the cancel
    /// reason is a [`CancelReason`] (its text before).
    const VERSION: u8 = 2;

    fn upgrade(version: u8, payload: &[u8]) -> Result<Self, CodecError> {
        match version {
            1 => decode_payload::<v1::OrderRecord>(payload)?.try_into(),
            2 => decode_payload(payload),
            v => Err(unknown_version::<Self>(v)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    Reserved {
        lines: Vec<PricedLine>,
        expires_ms: u64,
    },
    OutOfStock {
        sku: String,
    },
    /// The shard had already released this order (its reservation expired).
    AlreadyReleased,
    Unavailable(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    Charged { payment_id: String },
    Declined { reason: String },
    Unavailable(String),
}

impl ReserveOutcome {
    /// The variant's name, for metric labels.
    pub fn label(&self) -> &'static str {
        match self {
            ReserveOutcome::Reserved { .. } => "reserved",
            ReserveOutcome::OutOfStock { .. } => "out_of_stock",
            ReserveOutcome::AlreadyReleased => "already_released",
            ReserveOutcome::Unavailable(_) => "unavailable",
        }
    }
}

impl ChargeOutcome {
    /// The variant's name, for metric labels.
    pub fn label(&self) -> &'static str {
        match self {
            ChargeOutcome::Charged { .. } => "charged",
            ChargeOutcome::Declined { .. } => "declined",
            ChargeOutcome::Unavailable(_) => "unavailable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The order was just created.
    Start,
    /// The node restarted with this order unfinished.
    Resume,
    Reserve {
        /// The inventory shard that answered.
        shard: u32,
        outcome: ReserveOutcome,
    },
    Charge(ChargeOutcome),
    RetryDue,
    /// The order's reservation window passed (see [`window_passed`]) with no definite charge.
    WindowPassed,
}

/// Whether an unfinished order has held its stock for `window_ms` since it was created, by the
/// group's time `now_ms` (pure). The driver steps [`Event::WindowPassed`] then, instead of one more
/// retry: an outage of payments (or of an inventory shard) keeps no stock from other buyers for
/// longer than the window, whatever the retries would have done.
pub fn window_passed(o: &OrderRecord, now_ms: u64, window_ms: u64) -> bool {
    o.phase != Phase::Done && now_ms >= o.created_ms.saturating_add(window_ms)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Reserve {
        /// The inventory shard to ask.
        shard: u32,
        items: Vec<Item>,
    },
    Charge {
        amount_cents: u64,
        token: String,
    },
    /// Send [`Event::RetryDue`] after this many ms.
    RetryIn(u64),
    /// The order is terminal: persist it with its [`outbox`] entries, answer waiters.
    Finish,
}

/// Whether the step that `event` leads to must be committed before the order goes on.
///
/// Not when a hold was granted. A hold ends only through this order's outbox (after a committed
/// terminal state), never on a clock, and reserve is idempotent by order id: a leader that resumes
/// the order from an earlier record asks the shards again and gets the same holds back, hence the
/// same lines, total and charge (idempotent by order id on the payments side). A failover that loses
/// the step therefore loses nothing, and not recording it saves one Raft write on the way to the
/// `201` (two for an order over two shards). The only cancel a resumed `Reserving` order can then
/// meet is a declined charge, which took nothing; and should a hold ever end another way, every
/// other cancel refunds (or voids) the charge whether or not the record shows one ([`outbox`]).
pub fn must_commit(event: &Event) -> bool {
    !matches!(event, Event::Reserve { outcome: ReserveOutcome::Reserved { .. }, .. })
}

/// Whether `cmd` may go out while the step that produced it is being committed: the charge, for
/// the reason [`must_commit`] gives (a resumed saga would send the same one).
pub fn runs_before_commit(cmd: &Command) -> bool {
    matches!(cmd, Command::Charge { .. })
}

/// Where an outbox entry goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dest {
    Inventory { shard: u32 },
    Payments,
    Shipping,
    Notifications,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutboxEvent {
    CommitReservation { order_id: Uuid },
    ReleaseReservation { order_id: Uuid },
    Confirmed(OrderConfirmed),
    RefundPayment { order_id: Uuid },
}

/// Creates a pending order whose items are split over `shards` (inventory shard -> its items).
pub fn new_order(
    id: Uuid,
    customer_id: String,
    items: Vec<Item>,
    payment_token: String,
    shards: Vec<(u32, Vec<Item>)>,
    now_ms: u64,
) -> OrderRecord {
    OrderRecord {
        id,
        customer_id,
        items,
        payment_token,
        status: OrderStatus::Pending,
        reason: None,
        payment_id: None,
        lines: vec![],
        total_cents: 0,
        phase: Phase::Reserving,
        shards: shards
            .into_iter()
            .map(|(shard, items)| ShardStep { shard, items, state: ShardState::Pending })
            .collect(),
        attempts: 0,
        retry_scheduled: false,
        hold_until_ms: 0,
        hold_margin_ms: 0,
        charge_attempted: false,
        last_wait: None,
        history: vec![HistoryEntry { at_ms: now_ms, event: "created".into() }],
        created_ms: now_ms,
        traceparent: String::new(),
    }
}

/// The most history entries an order keeps: the first ("created") and the newest. An order's
/// history grows only when its wait changes (see `transient`); the cap makes "only" a bound even
/// for an order that waits on payments and inventory in turn for hours.
pub const MAX_HISTORY: usize = 24;

fn note(o: &mut OrderRecord, now_ms: u64, event: impl Into<String>) {
    o.history.push(HistoryEntry { at_ms: now_ms, event: event.into() });
    trim_history(o);
}

/// Keeps "created" and the newest entries, at most [`MAX_HISTORY`] in all. Every step trims, so
/// a record an older build let grow (one entry per changed error text) shrinks at its next step.
fn trim_history(o: &mut OrderRecord) {
    if o.history.len() > MAX_HISTORY {
        let excess = o.history.len() - MAX_HISTORY;
        o.history.drain(1..=excess);
    }
}

/// Whether a step changed what must be recorded: anything but the retry bookkeeping. `attempts`
/// only sets the next backoff and `retry_scheduled` only the timer of this leader (a resumed saga
/// starts with none), so a step that changed nothing else is not proposed: a long outage of a
/// peer then costs no Raft write per retry, and the record stays the size it was.
pub fn worth_recording(before: &OrderRecord, after: &OrderRecord) -> bool {
    let bookkeeping = |o: &OrderRecord| (o.attempts, o.retry_scheduled);
    if bookkeeping(before) == bookkeeping(after) {
        return before != after;
    }
    let mut a = after.clone();
    (a.attempts, a.retry_scheduled) = bookkeeping(before);
    &a != before
}

fn outstanding(o: &mut OrderRecord) -> Vec<Command> {
    if o.phase == Phase::Charging {
        o.charge_attempted = true;
    }
    match o.phase {
        Phase::Reserving => o
            .shards
            .iter()
            .filter(|s| s.state == ShardState::Pending)
            .map(|s| Command::Reserve { shard: s.shard, items: s.items.clone() })
            .collect(),
        Phase::Charging => vec![Command::Charge { amount_cents: o.total_cents, token: o.payment_token.clone() }],
        Phase::Done => vec![],
    }
}

fn finish(o: &mut OrderRecord, now_ms: u64, status: OrderStatus, reason: Option<CancelReason>) -> Vec<Command> {
    o.status = status;
    o.reason = reason;
    o.phase = Phase::Done;
    note(
        o,
        now_ms,
        match reason {
            Some(r) => format!("cancelled: {r}"),
            None => "confirmed".to_string(),
        },
    );
    vec![Command::Finish]
}

/// A peer could not answer: wait and retry. The record notes *what* the order waits on (the
/// payments service, an inventory shard), once per change of it: never the error's own text,
/// which carries counters ("next try in 3400 ms", "17 requests queued") that would make every
/// retry a new history entry and a new Raft write of the whole record.
fn transient(o: &mut OrderRecord, now_ms: u64, waiting_on: String, jitter: f64) -> Vec<Command> {
    o.attempts = o.attempts.saturating_add(1);
    if o.last_wait.as_deref() != Some(waiting_on.as_str()) {
        note(o, now_ms, format!("waiting: {waiting_on} unavailable, retrying"));
        o.last_wait = Some(waiting_on);
    }
    if o.retry_scheduled {
        return vec![];
    }
    o.retry_scheduled = true;
    vec![Command::RetryIn(backoff_ms(o.attempts - 1, RETRY_BASE_MS, RETRY_CAP_MS, jitter))]
}

/// Advances the saga by one event. `jitter` in [0.5, 1] scales retry delays.
pub fn step(o: &mut OrderRecord, event: Event, now_ms: u64, jitter: f64) -> Vec<Command> {
    if o.phase == Phase::Done {
        return vec![];
    }
    trim_history(o);
    match event {
        Event::Start => outstanding(o),
        // Cancelled while no charge is definite: the outbox releases every hold and refunds, or
        // voids, whatever charge may have landed (every cancel but a decline does), so a charge
        // that lands later is refused by the ledger, and no charged order keeps its stock.
        Event::WindowPassed => {
            note(o, now_ms, "reservation window passed without a definite charge");
            finish(o, now_ms, OrderStatus::Cancelled, Some(CancelReason::ReservationWindowPassed))
        }
        // A retry timer does not survive a restart: a resumed saga starts with none scheduled.
        Event::Resume | Event::RetryDue => {
            o.retry_scheduled = false;
            outstanding(o)
        }
        Event::Reserve { shard, outcome } => {
            if o.phase != Phase::Reserving {
                return vec![];
            }
            let Some(i) = o.shards.iter().position(|s| s.shard == shard && s.state == ShardState::Pending) else {
                return vec![];
            };
            match outcome {
                ReserveOutcome::Reserved { lines, expires_ms } => {
                    o.shards[i].state = ShardState::Reserved { lines, expires_ms };
                    if o.shards.iter().all(|s| s.state != ShardState::Pending) {
                        o.lines = o
                            .shards
                            .iter()
                            .flat_map(|s| match &s.state {
                                ShardState::Reserved { lines, .. } => lines.clone(),
                                ShardState::Pending => vec![],
                            })
                            .collect();
                        o.hold_until_ms = o
                            .shards
                            .iter()
                            .filter_map(|s| match s.state {
                                ShardState::Reserved { expires_ms, .. } => Some(expires_ms),
                                ShardState::Pending => None,
                            })
                            .min()
                            .unwrap_or(u64::MAX);
                        o.total_cents = o.lines.iter().map(|l| l.quantity.saturating_mul(l.unit_price_cents)).sum();
                        o.phase = Phase::Charging;
                        o.attempts = 0;
                        o.last_wait = None;
                        note(o, now_ms, format!("reserved: {} line(s), total {} cents", o.lines.len(), o.total_cents));
                        return outstanding(o);
                    }
                    vec![]
                }
                ReserveOutcome::OutOfStock { sku } => {
                    note(o, now_ms, format!("out of stock: {sku}"));
                    finish(o, now_ms, OrderStatus::Cancelled, Some(CancelReason::OutOfStock))
                }
                ReserveOutcome::AlreadyReleased => {
                    finish(o, now_ms, OrderStatus::Cancelled, Some(CancelReason::ReservationExpired))
                }
                ReserveOutcome::Unavailable(_) => transient(o, now_ms, format!("inventory shard {shard}"), jitter),
            }
        }
        Event::Charge(outcome) => {
            if o.phase != Phase::Charging {
                return vec![];
            }
            match outcome {
                ChargeOutcome::Charged { payment_id } => {
                    note(o, now_ms, format!("charged: {payment_id}"));
                    o.payment_id = Some(payment_id);
                    finish(o, now_ms, OrderStatus::Confirmed, None)
                }
                ChargeOutcome::Declined { reason } => {
                    note(o, now_ms, format!("payment declined: {reason}"));
                    finish(o, now_ms, OrderStatus::Cancelled, Some(CancelReason::PaymentDeclined))
                }
                ChargeOutcome::Unavailable(_) => transient(o, now_ms, "payments".to_string(), jitter),
            }
        }
    }
}

/// The outbox entries a finished order produces (written in the same batch as its final state).
pub fn outbox(o: &OrderRecord) -> Vec<(Dest, OutboxEvent)> {
    let inventory = |e: OutboxEvent| o.shards.iter().map(move |s| (Dest::Inventory { shard: s.shard }, e.clone()));
    match o.status {
        OrderStatus::Confirmed => {
            let ev = OrderConfirmed {
                // One confirmation per order, so its id is the order's: a second Finish could not
                // produce a second distinct event.
                event_id: o.id,
                order_id: o.id,
                customer_id: o.customer_id.clone(),
                lines: o.lines.clone(),
                total_cents: o.total_cents,
                payment_id: o.payment_id.clone().unwrap_or_default(),
            };
            let mut out: Vec<_> = inventory(OutboxEvent::CommitReservation { order_id: o.id }).collect();
            out.push((Dest::Shipping, OutboxEvent::Confirmed(ev.clone())));
            out.push((Dest::Notifications, OutboxEvent::Confirmed(ev)));
            out
        }
        // Release on every shard, even one that never answered: its reservation may have landed.
        // Refund on every cancel but a decline: a charge may have landed that no record shows (it
        // goes out before its step is recorded, see `must_commit`). With no charge, the refund
        // voids the order on the ledger, so a stray charge arriving later is refused, not taken.
        OrderStatus::Cancelled => {
            let mut out: Vec<_> = inventory(OutboxEvent::ReleaseReservation { order_id: o.id }).collect();
            // (A declined order was never charged, and the ledger keeps it so.)
            if o.reason != Some(CancelReason::PaymentDeclined) {
                out.push((Dest::Payments, OutboxEvent::RefundPayment { order_id: o.id }));
            }
            out
        }
        OrderStatus::Pending => vec![],
    }
}

impl OrderRecord {
    pub fn view(&self) -> OrderView {
        OrderView {
            order_id: self.id,
            customer_id: self.customer_id.clone(),
            items: self.items.clone(),
            lines: self.lines.clone(),
            total_cents: self.total_cents,
            status: self.status,
            reason: self.reason,
            payment_id: self.payment_id.clone(),
            history: self.history.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub dest: Dest,
    pub event: OutboxEvent,
    pub order_id: Uuid,
    pub created_ms: u64,
    /// The order's trace, continued by the delivery.
    pub traceparent: String,
}
impl Record for OutboxEntry {
    /// 2: an inventory destination names its shard by number (`inventory/3` before).
    const VERSION: u8 = 2;

    fn upgrade(version: u8, payload: &[u8]) -> Result<Self, CodecError> {
        match version {
            1 => decode_payload::<v1::OutboxEntry>(payload)?.try_into(),
            2 => decode_payload(payload),
            v => Err(unknown_version::<Self>(v)),
        }
    }
}

/// The destination as a dead letter names it: `inventory/1`, `payments`, `shipping`, ...
pub(crate) fn dest_label(d: &Dest) -> String {
    match d {
        Dest::Inventory { shard } => inventory_shard_label(*shard),
        Dest::Payments => "payments".into(),
        Dest::Shipping => "shipping".into(),
        Dest::Notifications => "notifications".into(),
    }
}

pub(crate) fn event_label(e: &OutboxEvent) -> (&'static str, Uuid) {
    match e {
        OutboxEvent::CommitReservation { order_id } => ("commit_reservation", *order_id),
        OutboxEvent::ReleaseReservation { order_id } => ("release_reservation", *order_id),
        OutboxEvent::Confirmed(ev) => ("order_confirmed", ev.event_id),
        OutboxEvent::RefundPayment { order_id } => ("refund_payment", *order_id),
    }
}

/// How a dead letter names an inventory shard (and how records before version 2 named it in
/// `ShardStep` and `Dest::Inventory`).
pub fn inventory_shard_label(shard: u32) -> String {
    format!("inventory/{shard}")
}

/// The shard a label of [`inventory_shard_label`] names (only records before version 2 hold one).
pub(crate) fn parse_inventory_shard(label: &str) -> Option<u32> {
    label.strip_prefix("inventory/")?.parse().ok()
}

/// The records as version 1 laid them out, read into today's (`saga/v1.rs`).
pub(crate) mod v1;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn line(sku: &str, q: u64, p: u64) -> PricedLine {
        PricedLine { sku: sku.into(), quantity: q, unit_price_cents: p }
    }
    fn item(sku: &str, q: u64) -> Item {
        Item { sku: sku.into(), quantity: q }
    }
    fn two_shard_order() -> OrderRecord {
        new_order(
            Uuid::from_u128(7),
            "c1".into(),
            vec![item("a", 1), item("b", 2)],
            "tok_ok".into(),
            vec![(1, vec![item("a", 1)]), (2, vec![item("b", 2)])],
            0,
        )
    }
    fn reserved(shard: u32, l: PricedLine) -> Event {
        Event::Reserve { shard, outcome: ReserveOutcome::Reserved { lines: vec![l], expires_ms: 1_000_000 } }
    }

    #[test]
    fn happy_path_reserves_everywhere_then_charges_then_confirms() {
        let mut o = two_shard_order();
        let c = step(&mut o, Event::Start, 1, 1.0);
        assert_eq!(c.len(), 2);
        assert!(step(&mut o, reserved(1, line("a", 1, 100)), 2, 1.0).is_empty());
        let c = step(&mut o, reserved(2, line("b", 2, 50)), 3, 1.0);
        assert_eq!(c, vec![Command::Charge { amount_cents: 200, token: "tok_ok".into() }]);
        let c = step(&mut o, Event::Charge(ChargeOutcome::Charged { payment_id: "p".into() }), 4, 1.0);
        assert_eq!(c, vec![Command::Finish]);
        assert_eq!((o.status, o.payment_id.as_deref()), (OrderStatus::Confirmed, Some("p")));
        let ob = outbox(&o);
        assert_eq!(ob.len(), 4);
        assert!(ob.iter().any(|(d, _)| *d == Dest::Shipping));
        // Nothing moves a finished order.
        assert!(step(&mut o, Event::Charge(ChargeOutcome::Declined { reason: "x".into() }), 5, 1.0).is_empty());
        assert_eq!(o.status, OrderStatus::Confirmed);
    }

    #[test]
    fn out_of_stock_cancels_and_releases_every_shard() {
        let mut o = two_shard_order();
        step(&mut o, Event::Start, 1, 1.0);
        step(&mut o, reserved(1, line("a", 1, 100)), 2, 1.0);
        let c =
            step(&mut o, Event::Reserve { shard: 2, outcome: ReserveOutcome::OutOfStock { sku: "b".into() } }, 3, 1.0);
        assert_eq!(c, vec![Command::Finish]);
        assert_eq!((o.status, o.reason), (OrderStatus::Cancelled, Some(CancelReason::OutOfStock)));
        let ob = outbox(&o);
        assert_eq!(ob.len(), 3);
        assert_eq!(ob.iter().filter(|(_, e)| matches!(e, OutboxEvent::ReleaseReservation { .. })).count(), 2);
        // No charge is recorded, yet one may have landed unrecorded: refunded, or voided if none did.
        assert!(!o.charge_attempted);
        assert!(ob.iter().any(|(d, e)| *d == Dest::Payments && matches!(e, OutboxEvent::RefundPayment { .. })));
    }

    #[test]
    fn declined_cancels_and_releases() {
        let mut o = two_shard_order();
        step(&mut o, Event::Start, 1, 1.0);
        step(&mut o, reserved(1, line("a", 1, 1)), 2, 1.0);
        step(&mut o, reserved(2, line("b", 2, 1)), 2, 1.0);
        step(&mut o, Event::Charge(ChargeOutcome::Declined { reason: "card declined".into() }), 3, 1.0);
        assert_eq!(o.reason, Some(CancelReason::PaymentDeclined));
        assert!(outbox(&o).iter().all(|(_, e)| matches!(e, OutboxEvent::ReleaseReservation { .. })));
    }

    #[test]
    fn unreachable_stays_pending_with_one_backoff_at_a_time() {
        let mut o = two_shard_order();
        step(&mut o, Event::Start, 1, 1.0);
        let down = |n: u32| Event::Reserve { shard: n, outcome: ReserveOutcome::Unavailable("timed out".into()) };
        assert_eq!(step(&mut o, down(1), 2, 1.0), vec![Command::RetryIn(100)]);
        assert_eq!(step(&mut o, down(2), 2, 1.0), vec![]);
        assert_eq!(o.status, OrderStatus::Pending);
        // The retry re-issues only what is still outstanding.
        step(&mut o, reserved(2, line("b", 2, 1)), 3, 1.0);
        assert_eq!(
            step(&mut o, Event::RetryDue, 4, 1.0),
            vec![Command::Reserve { shard: 1, items: vec![item("a", 1)] }]
        );
        assert_eq!(step(&mut o, down(1), 5, 1.0), vec![Command::RetryIn(400)]);
    }

    /// Payments unreachable for the equivalent of hours (10,000 retries at the 5 s cap is about
    /// 14 hours), with error texts that carry counters, as the call path's do: the record stays
    /// small and its history bounded, and after the first note of the wait no retry changes
    /// anything worth a Raft write, so the shard is not flooded with steps. Then payments
    /// recovers and the order confirms.
    #[test]
    fn a_long_payments_outage_neither_grows_the_record_nor_writes_a_step_per_retry() {
        let mut o = two_shard_order();
        step(&mut o, Event::Start, 1, 1.0);
        step(&mut o, reserved(1, line("a", 1, 100)), 2, 1.0);
        step(&mut o, reserved(2, line("b", 2, 50)), 3, 1.0);
        let size = |o: &OrderRecord| bulkhead_storage::encode(o).len();
        let at_start = size(&o);
        let mut recorded = 0;
        for i in 0..10_000u64 {
            let now = 10 + i * 5_000;
            let why = format!("circuit breaker open, next try in {} ms; {} requests queued", 5_000 - i % 977, i % 31);
            for event in [Event::Charge(ChargeOutcome::Unavailable(why)), Event::RetryDue] {
                let before = o.clone();
                step(&mut o, event, now, 0.7);
                recorded += usize::from(worth_recording(&before, &o));
            }
        }
        assert_eq!(recorded, 1, "only the first wait is worth a write");
        assert_eq!(o.status, OrderStatus::Pending);
        assert!(o.history.len() <= MAX_HISTORY, "{}", o.history.len());
        assert!(size(&o) < at_start + 200, "the record grew from {at_start} to {} bytes", size(&o));
        assert_eq!(o.history.last().map(|h| h.event.as_str()), Some("waiting: payments unavailable, retrying"));
        let c = step(&mut o, Event::Charge(ChargeOutcome::Charged { payment_id: "p".into() }), 1, 1.0);
        assert_eq!((c, o.status), (vec![Command::Finish], OrderStatus::Confirmed));
    }

    #[test]
    fn an_order_past_its_window_without_a_definite_charge_is_cancelled_released_and_voided() {
        let window = 60_000;
        let mut o = two_shard_order();
        step(&mut o, Event::Start, 1, 1.0);
        step(&mut o, reserved(1, line("a", 1, 100)), 2, 1.0);
        step(&mut o, reserved(2, line("b", 2, 50)), 3, 1.0);
        step(&mut o, Event::Charge(ChargeOutcome::Unavailable("payments down".into())), 4, 1.0);
        assert!(!window_passed(&o, window - 1, window));
        assert!(window_passed(&o, window, window));
        let c = step(&mut o, Event::WindowPassed, window, 1.0);
        assert_eq!(c, vec![Command::Finish]);
        assert_eq!((o.status, o.reason), (OrderStatus::Cancelled, Some(CancelReason::ReservationWindowPassed)));
        // Both holds released, and the charge that may have landed refunded (or the order voided).
        let ob = outbox(&o);
        assert_eq!(ob.iter().filter(|(_, e)| matches!(e, OutboxEvent::ReleaseReservation { .. })).count(), 2);
        assert!(ob.iter().any(|(d, e)| *d == Dest::Payments && matches!(e, OutboxEvent::RefundPayment { .. })));
        // A late answer changes nothing, and a finished order is never past its window.
        assert!(step(&mut o, Event::Charge(ChargeOutcome::Charged { payment_id: "late".into() }), 5, 1.0).is_empty());
        assert_eq!(o.status, OrderStatus::Cancelled);
        assert!(!window_passed(&o, u64::MAX, window));
    }

    #[test]
    fn a_record_an_older_build_let_grow_shrinks_at_its_next_step() {
        let mut o = two_shard_order();
        for i in 0..5_000 {
            o.history.push(HistoryEntry { at_ms: i, event: format!("waiting: payments: next try in {i} ms") });
        }
        let before = o.clone();
        step(&mut o, Event::RetryDue, 1, 1.0);
        assert_eq!(o.history.len(), MAX_HISTORY);
        assert_eq!(o.history[0].event, "created");
        assert!(worth_recording(&before, &o), "the shrunk record is written");
        assert!(bulkhead_storage::encode(&o).len() < 4096);
    }

    #[test]
    fn history_keeps_its_first_entry_and_the_newest() {
        let mut o = two_shard_order();
        for i in 0..100 {
            note(&mut o, i, format!("event {i}"));
        }
        assert_eq!(o.history.len(), MAX_HISTORY);
        assert_eq!(o.history[0].event, "created");
        assert_eq!(o.history[MAX_HISTORY - 1].event, "event 99");
        assert_eq!(o.history[1].event, format!("event {}", 100 - (MAX_HISTORY - 1)));
    }

    #[test]
    fn only_the_retry_bookkeeping_is_not_worth_recording() {
        let o = two_shard_order();
        let mut a = o.clone();
        a.attempts += 3;
        a.retry_scheduled = true;
        assert!(!worth_recording(&o, &a));
        assert!(!worth_recording(&o, &o.clone()));
        a.last_wait = Some("payments".into());
        assert!(worth_recording(&o, &a));
        let mut b = o.clone();
        b.phase = Phase::Charging;
        assert!(worth_recording(&o, &b));
    }

    #[test]
    fn a_resumed_saga_retries_even_if_a_retry_was_pending_before_the_restart() {
        let mut o = two_shard_order();
        step(&mut o, Event::Start, 1, 1.0);
        let down = Event::Reserve { shard: 1, outcome: ReserveOutcome::Unavailable("down".into()) };
        assert!(matches!(step(&mut o, down.clone(), 2, 1.0)[..], [Command::RetryIn(_)]));
        // The node restarts: the persisted record says a retry is scheduled, but the timer is gone.
        let mut restored = o.clone();
        assert_eq!(step(&mut restored, Event::Resume, 3, 1.0).len(), 2);
        assert!(matches!(step(&mut restored, down, 4, 1.0)[..], [Command::RetryIn(_)]));
    }

    #[test]
    fn a_shard_that_already_released_the_order_cancels_it_with_a_refund_if_a_charge_was_tried() {
        let mut o = two_shard_order();
        step(&mut o, Event::Start, 0, 1.0);
        step(&mut o, reserved(1, line("a", 1, 1)), 0, 1.0);
        let c = step(&mut o, reserved(2, line("b", 2, 1)), 0, 1.0);
        assert!(matches!(c[..], [Command::Charge { .. }]));
        // However long payments is down, the saga keeps its holds and retries the charge: holds end
        // with the saga, never on a clock (comparing two groups' clocks could loop or lapse).
        step(&mut o, Event::Charge(ChargeOutcome::Unavailable("down".into())), 100, 1.0);
        let c = step(&mut o, Event::RetryDue, 86_400_000 * 2, 1.0);
        assert!(matches!(c[..], [Command::Charge { .. }]), "{c:?}");
        assert!(o.charge_attempted);
        // A shard answering "already released" (a stale tombstone) to a repeated reserve cancels.
        let mut o = two_shard_order();
        step(&mut o, Event::Start, 0, 1.0);
        o.charge_attempted = true;
        let c = step(&mut o, Event::Reserve { shard: 1, outcome: ReserveOutcome::AlreadyReleased }, 801, 1.0);
        assert_eq!(c, vec![Command::Finish]);
        assert_eq!(o.reason, Some(CancelReason::ReservationExpired));
        assert!(outbox(&o).iter().any(|(d, e)| *d == Dest::Payments && matches!(e, OutboxEvent::RefundPayment { .. })));
    }

    #[test]
    fn resume_reissues_the_current_step() {
        let mut o = two_shard_order();
        step(&mut o, Event::Start, 1, 1.0);
        step(&mut o, reserved(1, line("a", 1, 1)), 2, 1.0);
        step(&mut o, reserved(2, line("b", 2, 1)), 2, 1.0);
        assert_eq!(
            step(&mut o.clone(), Event::Resume, 3, 1.0),
            vec![Command::Charge { amount_cents: 3, token: "tok_ok".into() }]
        );
    }

    #[test]
    fn a_charge_sent_before_its_holds_were_recorded_is_the_charge_a_resumed_saga_sends() {
        // The leader takes both holds and sends the charge without recording either hold; it
        // dies. The next leader resumes the order as last committed: before any hold.
        let mut o = two_shard_order();
        step(&mut o, Event::Start, 1, 1.0);
        let committed = o.clone();
        let (first, second) = (reserved(1, line("a", 1, 100)), reserved(2, line("b", 2, 50)));
        assert!(!must_commit(&first) && !must_commit(&second));
        assert!(step(&mut o, first.clone(), 2, 1.0).is_empty());
        let sent = step(&mut o, second.clone(), 3, 1.0);
        assert!(!sent.is_empty() && sent.iter().all(runs_before_commit), "{sent:?}");

        let mut resumed = committed;
        let again = step(&mut resumed, Event::Resume, 10, 1.0);
        assert_eq!(again.len(), 2, "both shards are asked again: {again:?}");
        assert!(!again.iter().any(runs_before_commit), "a reserve is not sent before its step commits");
        // Reserve is idempotent by order id: each shard answers with the hold it already gave.
        step(&mut resumed, first, 11, 1.0);
        let charge = step(&mut resumed, second, 12, 1.0);
        assert_eq!(charge, sent, "the same amount and token: payments sees one charge");
        assert!(resumed.charge_attempted);
        // Everything else is recorded before the order goes on.
        assert!(must_commit(&Event::Charge(ChargeOutcome::Charged { payment_id: "p".into() })));
        assert!(must_commit(&Event::Reserve { shard: 1, outcome: ReserveOutcome::OutOfStock { sku: "a".into() } }));
        assert!(must_commit(&Event::Charge(ChargeOutcome::Unavailable("down".into()))));
    }

    fn any_event() -> impl Strategy<Value = Event> {
        let shard = prop_oneof![Just(1u32), Just(2u32)];
        prop_oneof![
            Just(Event::RetryDue),
            Just(Event::Resume),
            shard.clone().prop_map(|n| Event::Reserve {
                shard: n,
                outcome: ReserveOutcome::Reserved { lines: vec![line("x", 1, 10)], expires_ms: 1_000_000 }
            }),
            shard
                .clone()
                .prop_map(|n| Event::Reserve { shard: n, outcome: ReserveOutcome::Unavailable("down".into()) }),
            shard.prop_map(|n| Event::Reserve { shard: n, outcome: ReserveOutcome::OutOfStock { sku: "x".into() } }),
            Just(Event::Charge(ChargeOutcome::Charged { payment_id: "p".into() })),
            Just(Event::Charge(ChargeOutcome::Declined { reason: "d".into() })),
            Just(Event::Charge(ChargeOutcome::Unavailable("down".into()))),
        ]
    }

    proptest! {
        /// Any sequence of (possibly stale, duplicated, reordered) events: Finish at most once, a
        /// charge only after every shard reserved, confirmed only with a payment, and a terminal
        /// order never changes again.
        #[test]
        fn saga_is_safe_under_any_event_order(events in proptest::collection::vec(any_event(), 0..60)) {
            let mut o = two_shard_order();
            step(&mut o, Event::Start, 0, 1.0);
            let mut finishes = 0;
            let mut terminal: Option<OrderStatus> = None;
            for (t, ev) in events.into_iter().enumerate() {
                let cmds = step(&mut o, ev, t as u64, 0.75);
                for c in &cmds {
                    match c {
                        Command::Finish => finishes += 1,
                        Command::Charge { .. } => prop_assert!(o.shards.iter().all(|s| s.state != ShardState::Pending)),
                        Command::RetryIn(ms) => prop_assert!(*ms <= RETRY_CAP_MS),
                        Command::Reserve { .. } => prop_assert_eq!(o.phase, Phase::Reserving),
                    }
                }
                if let Some(s) = terminal { prop_assert_eq!(o.status, s); }
                if o.status != OrderStatus::Pending { terminal = Some(o.status); }
            }
            prop_assert!(finishes <= 1);
            prop_assert_eq!(finishes == 1, o.phase == Phase::Done);
            if o.status == OrderStatus::Confirmed {
                prop_assert!(o.payment_id.is_some());
                prop_assert_eq!(o.total_cents, 20);
            }
        }
    }
}
