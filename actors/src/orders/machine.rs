//! Orders as a Raft group applies it: every table of an orders shard, and the commands that change
//! them, alike on every replica.
//!
//! The saga itself runs on the leader ([`super::actor`]); what it decides reaches the tables only
//! as a committed command: a new order (with its Idempotency-Key's claim, in the same apply, so a
//! key can never be claimed without its order), each step of the saga (the whole record), the
//! terminal state with its outbox entries (one apply: a finished order always has its deliveries
//! queued), and the relay's deliveries and dead letters. The leader puts the time into each
//! command; `apply` reads no clock and draws no randomness.
//!
//! One key, one order, cluster-wide: a key is claimed only in the shard its hash names, and there a
//! claim is a committed write that every later `Place` of that key reads.

use bulkhead_cluster::raft::Machine;
use bulkhead_storage::{
    decode_payload, unknown_version, Batch, CodecError, IdemIndexEntry, IdemRecord, Idempotency, Record, Store,
    StoreError, Table,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::protocol::{DeadLetter, IdemKey, OrderStatus, OrderView};
use super::saga::{self, OrderRecord, OutboxEntry, Phase};

/// Every order of the shard, by id.
pub const ORDERS: Table<Uuid, OrderRecord> = Table::new(1, "orders");
/// Index of unfinished orders: what a new leader resumes, without scanning every order.
pub const UNFINISHED: Table<Uuid, Unfinished> = Table::new(2, "unfinished");
/// Outbox entries by (order id, position): written with the order's terminal state.
pub const OUTBOX: Table<(Uuid, u64), OutboxEntry> = Table::new(3, "outbox");
pub const IDEMPOTENCY: Idempotency = Idempotency::new(5, 6);
/// Entries the relay gave up on, by the key they had in [`OUTBOX`].
pub const DEAD_LETTERS: Table<(Uuid, u64), DeadLetterRecord> = Table::new(7, "dead_letters");
/// Orders by (customer, order id): `GET /v1/orders?customer_id=` reads it newest first.
pub const BY_CUSTOMER: Table<(String, Uuid), Listed> = Table::new(8, "by_customer");

/// An unfinished order's mark: since when, and how many saga steps have been committed for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unfinished {
    pub since_ms: u64,
    /// Steps committed so far: a `Step`/`Finish` must name the next one (compare-and-set), so a
    /// driver that worked from an older record can never overwrite a newer one.
    pub steps: u64,
}
impl Record for Unfinished {
    const VERSION: u8 = 1;
}

/// A marker of the customer index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed;
impl Record for Listed {
    const VERSION: u8 = 1;
}

/// A dead letter as stored: what the API lists, plus the entry itself (so it can be replayed by hand).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    pub letter: DeadLetter,
    pub entry: OutboxEntry,
}
impl Record for DeadLetterRecord {
    /// 2: the entry's inventory destination names its shard by number ([`OutboxEntry`] v2).
    const VERSION: u8 = 2;

    fn upgrade(version: u8, payload: &[u8]) -> Result<Self, CodecError> {
        match version {
            1 => {
                let old = decode_payload::<v1::DeadLetterRecord>(payload)?;
                Ok(DeadLetterRecord { letter: old.letter, entry: old.entry.try_into()? })
            }
            2 => decode_payload(payload),
            v => Err(unknown_version::<Self>(v)),
        }
    }
}

/// A change to an orders shard (replicated, versioned; append variants at the end only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrdersCommand {
    /// A new pending order, and the claim of its Idempotency-Key if it has one.
    Place { order: OrderRecord, idempotency: Option<IdemKey>, now_ms: u64 },
    /// The saga moved on without finishing: the whole record, as step number `step` (the
    /// committed count + 1; any other number is `Stale`).
    Step { order: OrderRecord, step: u64 },
    /// The saga finished: the terminal record and the outbox entries it produces, as step `step`.
    Finish { order: OrderRecord, step: u64, now_ms: u64 },
    /// The relay delivered these outbox entries.
    Delivered { keys: Vec<(Uuid, u64)> },
    /// The relay gave up on this outbox entry: it moves to the dead letters.
    DeadLetter { key: (Uuid, u64), attempts: u32, last_error: String, now_ms: u64 },
    /// Forget these idempotency keys (read from the time index by the leader) if they are older
    /// than the retention at `now_ms`.
    Sweep { entries: Vec<IdemIndexEntry>, now_ms: u64 },
}
impl Record for OrdersCommand {
    /// 2: `Place`'s Idempotency-Key carries a SHA-256 body fingerprint ([`IdemKey`]). A version-1
    /// command (in a log written before the upgrade) still applies, claiming by FNV-1a as it did.
    /// 3: the order it carries names its inventory shards by number ([`OrderRecord`] v2).
    const VERSION: u8 = 3;

    fn upgrade(version: u8, payload: &[u8]) -> Result<Self, CodecError> {
        match version {
            1 => decode_payload::<v1::OrdersCommand>(payload)?.try_into(),
            2 => decode_payload::<v2::OrdersCommand>(payload)?.try_into(),
            3 => decode_payload(payload),
            v => Err(unknown_version::<Self>(v)),
        }
    }
}

/// [`OrdersCommand`] version 1 (ca16541/d9332a4 until the SHA-256 body fingerprint), and
/// [`DeadLetterRecord`] version 1 (until inventory shards by number): orders as
/// [`saga::v1::OrderRecord`] laid them out.
pub(crate) mod v1 {
    use bulkhead_storage::{CodecError, IdemIndexEntry};
    use serde::{Deserialize, Serialize};
    use uuid::Uuid;

    use crate::orders::protocol::{DeadLetter, IdemKeyV1};
    use crate::orders::saga::v1::{OrderRecord, OutboxEntry};

    #[derive(Debug, Serialize, Deserialize)]
    pub struct DeadLetterRecord {
        pub letter: DeadLetter,
        pub entry: OutboxEntry,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub enum OrdersCommand {
        Place { order: OrderRecord, idempotency: Option<IdemKeyV1>, now_ms: u64 },
        Step { order: OrderRecord, step: u64 },
        Finish { order: OrderRecord, step: u64, now_ms: u64 },
        Delivered { keys: Vec<(Uuid, u64)> },
        DeadLetter { key: (Uuid, u64), attempts: u32, last_error: String, now_ms: u64 },
        Sweep { entries: Vec<IdemIndexEntry>, now_ms: u64 },
    }

    impl TryFrom<OrdersCommand> for super::v2::OrdersCommand {
        type Error = CodecError;
        fn try_from(old: OrdersCommand) -> Result<Self, CodecError> {
            Ok(match old {
                OrdersCommand::Place { order, idempotency, now_ms } => {
                    Self::Place { order, idempotency: idempotency.map(Into::into), now_ms }
                }
                OrdersCommand::Step { order, step } => Self::Step { order, step },
                OrdersCommand::Finish { order, step, now_ms } => Self::Finish { order, step, now_ms },
                OrdersCommand::Delivered { keys } => Self::Delivered { keys },
                OrdersCommand::DeadLetter { key, attempts, last_error, now_ms } => {
                    Self::DeadLetter { key, attempts, last_error, now_ms }
                }
                OrdersCommand::Sweep { entries, now_ms } => Self::Sweep { entries, now_ms },
            })
        }
    }

    impl TryFrom<OrdersCommand> for super::OrdersCommand {
        type Error = CodecError;
        fn try_from(old: OrdersCommand) -> Result<Self, CodecError> {
            super::v2::OrdersCommand::try_from(old)?.try_into()
        }
    }
}

/// [`OrdersCommand`] version 2 (SHA-256 body fingerprints, until inventory shards by number).
pub(crate) mod v2 {
    use bulkhead_storage::{CodecError, IdemIndexEntry};
    use serde::{Deserialize, Serialize};
    use uuid::Uuid;

    use crate::orders::protocol::IdemKey;
    use crate::orders::saga::v1::OrderRecord;

    #[derive(Debug, Serialize, Deserialize)]
    pub enum OrdersCommand {
        Place { order: OrderRecord, idempotency: Option<IdemKey>, now_ms: u64 },
        Step { order: OrderRecord, step: u64 },
        Finish { order: OrderRecord, step: u64, now_ms: u64 },
        Delivered { keys: Vec<(Uuid, u64)> },
        DeadLetter { key: (Uuid, u64), attempts: u32, last_error: String, now_ms: u64 },
        Sweep { entries: Vec<IdemIndexEntry>, now_ms: u64 },
    }

    impl TryFrom<OrdersCommand> for super::OrdersCommand {
        type Error = CodecError;
        fn try_from(old: OrdersCommand) -> Result<Self, CodecError> {
            Ok(match old {
                OrdersCommand::Place { order, idempotency, now_ms } => {
                    Self::Place { order: order.try_into()?, idempotency, now_ms }
                }
                OrdersCommand::Step { order, step } => Self::Step { order: order.try_into()?, step },
                OrdersCommand::Finish { order, step, now_ms } => {
                    Self::Finish { order: order.try_into()?, step, now_ms }
                }
                OrdersCommand::Delivered { keys } => Self::Delivered { keys },
                OrdersCommand::DeadLetter { key, attempts, last_error, now_ms } => {
                    Self::DeadLetter { key, attempts, last_error, now_ms }
                }
                OrdersCommand::Sweep { entries, now_ms } => Self::Sweep { entries, now_ms },
            })
        }
    }
}

/// What applying an [`OrdersCommand`] answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrdersApplied {
    Placed,
    /// The Idempotency-Key already names an order, placed with the same body or with another.
    Existing {
        order_id: Uuid,
        same_body: bool,
    },
    Done,
    /// Nothing done: the order is unknown or already terminal, the step was taken from an older
    /// record than the committed one (a driver that was superseded), or the outbox entry is gone.
    Stale,
    /// No longer answered: a replica that cannot decode a committed command now stops
    /// (`raft::state_machine::ApplyError::Undecodable`). Kept so the record's layout is unchanged.
    Undecodable(String),
}
impl Record for OrdersApplied {
    const VERSION: u8 = 1;
}

/// Applies [`OrdersCommand`]s.
pub struct OrdersMachine;

impl Machine for OrdersMachine {
    type Command = OrdersCommand;
    type Reply = OrdersApplied;

    /// A record written before an upgrade that changed its layout is in the old layout on a
    /// replica that applied it then, and in the new one on a replica that applied the same command
    /// after: a key claimed before SHA-256 fingerprints (`IdemRecord` v1), an order, an outbox entry
    /// or a dead letter from before inventory shards by number (`OrderRecord`, `OutboxEntry`,
    /// `DeadLetterRecord` v1). The digest hashes each as today's build writes it.
    fn canonical(&self, key: &[u8], value: &[u8]) -> Option<Vec<u8>> {
        ORDERS
            .canonical(key, value)
            .or_else(|| OUTBOX.canonical(key, value))
            .or_else(|| DEAD_LETTERS.canonical(key, value))
            .or_else(|| IDEMPOTENCY.canonical(key, value))
    }

    fn apply(&self, store: &Store, batch: &mut Batch, cmd: OrdersCommand) -> Result<OrdersApplied, StoreError> {
        match cmd {
            OrdersCommand::Place { order, idempotency, now_ms } => {
                if ORDERS.get_through(store, batch, &order.id)?.is_some() {
                    return Ok(OrdersApplied::Stale);
                }
                if let Some(ik) = &idempotency {
                    let claim =
                        IdemRecord { body: ik.body.claim(), result: order.id.as_bytes().to_vec(), created_ms: now_ms };
                    if let Some(prev) = IDEMPOTENCY.claim_in(store, batch, &ik.key, &claim, order.id)? {
                        let order_id = Uuid::from_slice(&prev.result).unwrap_or_default();
                        return Ok(OrdersApplied::Existing { order_id, same_body: ik.body.matches(&prev.body) });
                    }
                }
                ORDERS.put(batch, &order.id, &order);
                UNFINISHED.put(batch, &order.id, &Unfinished { since_ms: now_ms, steps: 0 });
                BY_CUSTOMER.put(batch, &(order.customer_id.clone(), order.id), &Listed);
                Ok(OrdersApplied::Placed)
            }
            OrdersCommand::Step { order, step } => {
                let Some(mark) = next_step(store, batch, &order.id, step)? else { return Ok(OrdersApplied::Stale) };
                if order.phase == Phase::Done {
                    return Ok(OrdersApplied::Stale);
                }
                ORDERS.put(batch, &order.id, &order);
                UNFINISHED.put(batch, &order.id, &Unfinished { steps: step, ..mark });
                Ok(OrdersApplied::Done)
            }
            OrdersCommand::Finish { order, step, now_ms } => {
                if next_step(store, batch, &order.id, step)?.is_none() || order.status == OrderStatus::Pending {
                    return Ok(OrdersApplied::Stale);
                }
                for (i, (dest, event)) in saga::outbox(&order).into_iter().enumerate() {
                    let entry = OutboxEntry {
                        dest,
                        event,
                        order_id: order.id,
                        created_ms: now_ms,
                        traceparent: order.traceparent.clone(),
                    };
                    OUTBOX.put(batch, &(order.id, i as u64), &entry);
                }
                ORDERS.put(batch, &order.id, &order);
                UNFINISHED.remove(batch, &order.id);
                Ok(OrdersApplied::Done)
            }
            OrdersCommand::Delivered { keys } => {
                for key in &keys {
                    OUTBOX.remove(batch, key);
                }
                Ok(OrdersApplied::Done)
            }
            OrdersCommand::DeadLetter { key, attempts, last_error, now_ms } => {
                let Some(entry) = OUTBOX.get_through(store, batch, &key)? else { return Ok(OrdersApplied::Stale) };
                let (event, event_id) = saga::event_label(&entry.event);
                let letter = DeadLetter {
                    order_id: entry.order_id,
                    event_id,
                    event: event.to_string(),
                    destination: saga::dest_label(&entry.dest),
                    attempts,
                    last_error,
                    at_ms: now_ms,
                };
                DEAD_LETTERS.put(batch, &key, &DeadLetterRecord { letter, entry });
                OUTBOX.remove(batch, &key);
                Ok(OrdersApplied::Done)
            }
            OrdersCommand::Sweep { entries, now_ms } => {
                IDEMPOTENCY.forget_in(store, batch, &entries, now_ms)?;
                Ok(OrdersApplied::Done)
            }
        }
    }

    fn time_of(&self, cmd: &OrdersCommand) -> Option<u64> {
        match cmd {
            OrdersCommand::Place { now_ms, .. }
            | OrdersCommand::Finish { now_ms, .. }
            | OrdersCommand::DeadLetter { now_ms, .. }
            | OrdersCommand::Sweep { now_ms, .. } => Some(*now_ms),
            OrdersCommand::Step { .. } | OrdersCommand::Delivered { .. } => None,
        }
    }
}

/// The order's unfinished mark if `step` is its next step (as of the writes in `batch`): the
/// order is unfinished and exactly `step - 1` steps were committed before.
fn next_step(store: &Store, batch: &Batch, id: &Uuid, step: u64) -> Result<Option<Unfinished>, StoreError> {
    Ok(UNFINISHED.get_through(store, batch, id)?.filter(|m| m.steps.checked_add(1) == Some(step)))
}

/// The unfinished orders of a shard with their committed step counts, as its replica has applied
/// them: what a new leader resumes.
pub fn unfinished(store: &Store) -> Result<Vec<(OrderRecord, u64)>, StoreError> {
    let mut out = Vec::new();
    for item in UNFINISHED.iter(store) {
        let (id, mark) = item?;
        if let Some(o) = ORDERS.get(store, &id)? {
            out.push((o, mark.steps));
        }
    }
    Ok(out)
}

/// A customer's orders in this shard, newest first, older than `before` if given, at most `limit`.
pub fn by_customer(
    store: &Store,
    customer_id: &str,
    before: Option<Uuid>,
    limit: usize,
) -> Result<Vec<OrderView>, StoreError> {
    let from = (customer_id.to_string(), Uuid::nil());
    let to = (customer_id.to_string(), before.unwrap_or(Uuid::max()));
    let mut out = Vec::new();
    for item in BY_CUSTOMER.iter_range_rev(store, &from, &to).take(limit) {
        let ((_, id), Listed) = item?;
        if let Some(o) = ORDERS.get(store, &id)? {
            out.push(o.view());
        }
    }
    Ok(out)
}

/// This shard's dead letters, of one order or all, at most `max`.
pub fn dead_letters(store: &Store, order_id: Option<Uuid>, max: usize) -> Result<Vec<DeadLetter>, StoreError> {
    type Rows<'a> = Box<dyn Iterator<Item = Result<((Uuid, u64), DeadLetterRecord), StoreError>> + 'a>;
    let rows: Rows = match order_id {
        Some(id) => Box::new(DEAD_LETTERS.iter_prefix(store, id.as_bytes())),
        None => Box::new(DEAD_LETTERS.iter(store)),
    };
    rows.take(max).map(|r| r.map(|(_, d)| d.letter)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::OrderConfirmed;
    use crate::inventory::{Item, PricedLine};
    use crate::orders::saga::{new_order, Dest, OutboxEvent};
    use bulkhead_storage::StoreOptions;

    fn order(n: u128, customer: &str) -> OrderRecord {
        let item = Item { sku: "a".into(), quantity: 1 };
        new_order(
            Uuid::from_u128(n),
            customer.into(),
            vec![item.clone()],
            "tok_ok".into(),
            vec![(0, vec![item])],
            n as u64,
        )
    }

    fn confirmed(mut o: OrderRecord) -> OrderRecord {
        o.status = OrderStatus::Confirmed;
        o.phase = Phase::Done;
        o.lines = vec![PricedLine { sku: "a".into(), quantity: 1, unit_price_cents: 5 }];
        o.payment_id = Some("pay".into());
        o
    }

    fn key(k: &str, body: u64) -> Option<IdemKey> {
        Some(IdemKey { key: k.into(), body: bulkhead_storage::BodyFingerprint::of(&body.to_le_bytes()) })
    }

    fn cmds() -> Vec<OrdersCommand> {
        let (a, b, c) = (order(1, "alice"), order(2, "alice"), order(3, "bob"));
        let mut a_step = a.clone();
        a_step.phase = Phase::Charging;
        vec![
            OrdersCommand::Place { order: a.clone(), idempotency: key("k1", 7), now_ms: 10 },
            // Same key, same body, another id (a retry that reached a new leader): not placed.
            OrdersCommand::Place { order: b.clone(), idempotency: key("k1", 7), now_ms: 11 },
            OrdersCommand::Place { order: b.clone(), idempotency: None, now_ms: 12 },
            OrdersCommand::Place { order: c.clone(), idempotency: key("k2", 1), now_ms: 13 },
            OrdersCommand::Step { order: a_step.clone(), step: 1 },
            // A superseded driver's step, taken from the record before step 1: ignored.
            OrdersCommand::Step { order: a_step, step: 1 },
            OrdersCommand::Finish { order: confirmed(a.clone()), step: 2, now_ms: 20 },
            // A step after the finish: ignored.
            OrdersCommand::Step { order: a.clone(), step: 3 },
            OrdersCommand::Delivered { keys: vec![(a.id, 0)] },
            OrdersCommand::DeadLetter { key: (a.id, 1), attempts: 5, last_error: "no".into(), now_ms: 30 },
            OrdersCommand::Sweep {
                entries: vec![((10, a.id), "k1".into()), ((13, c.id), "k2".into())],
                now_ms: 11 + bulkhead_storage::IDEMPOTENCY_RETENTION_MS,
            },
        ]
    }

    fn apply_all(store: &Store, cmds: &[OrdersCommand], per_batch: usize) -> Vec<OrdersApplied> {
        let mut replies = Vec::new();
        for chunk in cmds.chunks(per_batch) {
            let mut b = Batch::new();
            for c in chunk {
                replies.push(OrdersMachine.apply(store, &mut b, c.clone()).unwrap());
            }
            store.apply_atomic(b).unwrap();
        }
        replies
    }

    fn dump(store: &Store) -> Vec<bulkhead_storage::RawRecord> {
        store.export_below(bulkhead_cluster::raft::RAFT_TABLES_FROM).unwrap()
    }

    #[tokio::test]
    async fn replaying_the_log_gives_the_same_tables_whatever_the_batching() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s1 = Store::open(d1.path(), "orders", &StoreOptions::default()).unwrap();
        let s2 = Store::open(d2.path(), "orders", &StoreOptions::default()).unwrap();
        let r1 = apply_all(&s1, &cmds(), 1);
        let r2 = apply_all(&s2, &cmds(), 64);
        assert_eq!(r1, r2);
        assert_eq!(dump(&s1), dump(&s2));
        let a = Uuid::from_u128(1);
        assert_eq!(
            r1[..8],
            [
                OrdersApplied::Placed,
                OrdersApplied::Existing { order_id: a, same_body: true },
                OrdersApplied::Placed,
                OrdersApplied::Placed,
                OrdersApplied::Done,
                OrdersApplied::Stale,
                OrdersApplied::Done,
                OrdersApplied::Stale,
            ]
        );
        assert_eq!(ORDERS.get(&s1, &a).unwrap().unwrap().status, OrderStatus::Confirmed);
        // Confirmed: commit on one shard, shipping, notifications; one delivered, one dead-lettered.
        assert_eq!(OUTBOX.iter(&s1).count(), 1);
        assert_eq!(dead_letters(&s1, Some(a), 10).unwrap().len(), 1);
        assert_eq!(
            unfinished(&s1).unwrap().iter().map(|(o, n)| (o.id.as_u128(), *n)).collect::<Vec<_>>(),
            vec![(2, 0), (3, 0)]
        );
        // k1 was claimed at 10: swept at 10 + retention; k2 (13) stays.
        assert_eq!(IDEMPOTENCY.get(&s1, "k1").unwrap(), None);
        assert!(IDEMPOTENCY.get(&s1, "k2").unwrap().is_some());
    }

    #[tokio::test]
    async fn a_key_with_another_body_names_the_first_order() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path(), "orders", &StoreOptions::default()).unwrap();
        let r = apply_all(
            &s,
            &[
                OrdersCommand::Place { order: order(1, "c"), idempotency: key("k", 1), now_ms: 1 },
                OrdersCommand::Place { order: order(2, "c"), idempotency: key("k", 2), now_ms: 2 },
            ],
            2,
        );
        assert_eq!(r[1], OrdersApplied::Existing { order_id: Uuid::from_u128(1), same_body: false });
        assert!(ORDERS.get(&s, &Uuid::from_u128(2)).unwrap().is_none(), "nothing placed for the reused key");
    }

    /// Across the upgrade: a replica that applied a keyed `Place` before it (the claim in version
    /// 1's layout) and one that applied the same command after it (version 2) have one digest.
    #[tokio::test]
    async fn replicas_that_applied_one_claim_under_two_builds_agree() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path(), "orders", &StoreOptions::default()).unwrap();
        let old: OrdersCommand = v1::OrdersCommand::Place {
            order: order(1, "c").into(),
            idempotency: Some(super::super::protocol::IdemKeyV1 { key: "k".into(), body_hash: 9 }),
            now_ms: 1,
        }
        .try_into()
        .unwrap();
        apply_all(&s, &[old], 1);
        let after = dump(&s);
        // The same record as an older build wrote it: the claim's value in version 1's bytes.
        let before: Vec<_> = after
            .iter()
            .map(|(k, v)| match bulkhead_storage::decode::<IdemRecord>(v) {
                Ok(r) if v.first() == Some(&2) && matches!(r.body, bulkhead_storage::BodyHash::Fnv64(9)) => {
                    (k.clone(), v1_claim(&r))
                }
                _ => (k.clone(), v.clone()),
            })
            .collect();
        assert_ne!(before, after, "the two builds wrote different bytes");
        assert_eq!(digest(&before), digest(&after));
    }

    /// Across the upgrade to inventory shards by number: a replica that stored an order, its outbox
    /// entries and a dead letter in version 1's layout (labels) and one that stored them in
    /// version 2's have one digest.
    #[tokio::test]
    async fn replicas_that_stored_orders_before_and_after_shards_by_number_agree() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path(), "orders", &StoreOptions::default()).unwrap();
        let mut done = order(1, "c");
        (done.status, done.phase) = (OrderStatus::Confirmed, Phase::Done);
        let cmds = [
            OrdersCommand::Place { order: order(1, "c"), idempotency: None, now_ms: 1 },
            OrdersCommand::Finish { order: done, step: 1, now_ms: 2 },
            OrdersCommand::DeadLetter { key: (Uuid::from_u128(1), 0), attempts: 5, last_error: "x".into(), now_ms: 3 },
        ];
        apply_all(&s, &cmds, 1);
        let after = dump(&s);
        let old = |version_one: Vec<u8>| {
            let mut v = vec![1u8];
            v.extend(version_one);
            v
        };
        let before: Vec<_> = after
            .iter()
            .map(|(k, v)| {
                let payload = |x: &dyn erased::Encode| old(x.payload());
                let v1 = match k.first() {
                    Some(1) => {
                        payload(&saga::v1::OrderRecord::from(bulkhead_storage::decode::<OrderRecord>(v).unwrap()))
                    }
                    Some(3) => {
                        payload(&saga::v1::OutboxEntry::from(bulkhead_storage::decode::<OutboxEntry>(v).unwrap()))
                    }
                    Some(7) => {
                        let r = bulkhead_storage::decode::<DeadLetterRecord>(v).unwrap();
                        payload(&v1::DeadLetterRecord { letter: r.letter, entry: r.entry.into() })
                    }
                    _ => v.clone(),
                };
                (k.clone(), v1)
            })
            .collect();
        assert_ne!(before, after, "the two layouts are different bytes");
        assert!(before.iter().filter(|(_, v)| v.first() == Some(&1)).count() >= 3, "an order, an entry, a letter");
        assert_eq!(digest(&before), digest(&after));
    }

    /// The state digest of `records` as `/admin/digests` takes it: each in today's layout.
    fn digest(records: &[bulkhead_storage::RawRecord]) -> bulkhead_cluster::raft::StateDigest {
        let canonical: Vec<_> = records
            .iter()
            .map(|(k, v)| (k.clone(), OrdersMachine.canonical(k, v).unwrap_or_else(|| v.clone())))
            .collect();
        bulkhead_cluster::raft::StateDigest::of(Some(1), &canonical)
    }

    /// Encodes a copy of an old layout's struct without its version byte.
    mod erased {
        pub trait Encode {
            fn payload(&self) -> Vec<u8>;
        }
        impl<T: serde::Serialize> Encode for T {
            fn payload(&self) -> Vec<u8> {
                bincode::serde::encode_to_vec(self, bincode::config::standard()).unwrap()
            }
        }
    }

    /// An `IdemRecord` in version 1's layout (a copy of that build's struct).
    fn v1_claim(r: &IdemRecord) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct V1<'a> {
            body_hash: u64,
            result: &'a [u8],
            created_ms: u64,
        }
        let bulkhead_storage::BodyHash::Fnv64(body_hash) = r.body else { panic!("a legacy claim") };
        let v1 = V1 { body_hash, result: &r.result, created_ms: r.created_ms };
        let mut out = vec![1u8];
        out.extend(bincode::serde::encode_to_vec(&v1, bincode::config::standard()).unwrap());
        out
    }

    /// Across the upgrade to SHA-256 fingerprints: a key an older build claimed (its `Place`
    /// replayed from the log, FNV-1a only) still recognises a retry of the same body sent through
    /// a new front, and still refuses another body.
    #[tokio::test]
    async fn a_claim_an_older_build_made_still_knows_its_body() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path(), "orders", &StoreOptions::default()).unwrap();
        // As version 1's bytes read (the fixture test pins the bytes to this conversion).
        let old: OrdersCommand = v1::OrdersCommand::Place {
            order: order(1, "c").into(),
            idempotency: Some(super::super::protocol::IdemKeyV1 {
                key: "k".into(),
                body_hash: bulkhead_storage::fnv1a(&1u64.to_le_bytes()),
            }),
            now_ms: 1,
        }
        .try_into()
        .unwrap();
        let r = apply_all(
            &s,
            &[
                old,
                OrdersCommand::Place { order: order(2, "c"), idempotency: key("k", 1), now_ms: 2 },
                OrdersCommand::Place { order: order(3, "c"), idempotency: key("k", 2), now_ms: 3 },
            ],
            1,
        );
        let first = Uuid::from_u128(1);
        assert_eq!(r[0], OrdersApplied::Placed);
        assert_eq!(r[1], OrdersApplied::Existing { order_id: first, same_body: true });
        assert_eq!(r[2], OrdersApplied::Existing { order_id: first, same_body: false });
        assert!(matches!(IDEMPOTENCY.get(&s, "k").unwrap().unwrap().body, bulkhead_storage::BodyHash::Fnv64(_)));
    }

    #[tokio::test]
    async fn a_finish_queues_the_outbox_of_its_outcome_once() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path(), "orders", &StoreOptions::default()).unwrap();
        let o = order(1, "c");
        let r = apply_all(
            &s,
            &[
                OrdersCommand::Place { order: o.clone(), idempotency: None, now_ms: 1 },
                OrdersCommand::Finish { order: confirmed(o.clone()), step: 1, now_ms: 2 },
                OrdersCommand::Finish { order: confirmed(o.clone()), step: 2, now_ms: 3 },
            ],
            1,
        );
        assert_eq!(r[2], OrdersApplied::Stale, "a second finish queues nothing more");
        let dests: Vec<Dest> = OUTBOX.iter(&s).map(|e| e.unwrap().1.dest).collect();
        assert_eq!(dests, vec![Dest::Inventory { shard: 0 }, Dest::Shipping, Dest::Notifications]);
        let shipped = OUTBOX.get(&s, &(o.id, 1)).unwrap().unwrap();
        assert!(matches!(shipped.event, OutboxEvent::Confirmed(OrderConfirmed { order_id, .. }) if order_id == o.id));
        assert!(UNFINISHED.get(&s, &o.id).unwrap().is_none());
    }

    #[tokio::test]
    async fn customers_list_newest_first_and_page_by_id() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path(), "orders", &StoreOptions::default()).unwrap();
        let places: Vec<OrdersCommand> = [(1, "al"), (2, "alice"), (3, "al"), (4, "al")]
            .into_iter()
            .map(|(n, c)| OrdersCommand::Place { order: order(n, c), idempotency: None, now_ms: n as u64 })
            .collect();
        apply_all(&s, &places, 4);
        let ids = |v: Vec<OrderView>| v.into_iter().map(|o| o.order_id.as_u128()).collect::<Vec<_>>();
        assert_eq!(ids(by_customer(&s, "al", None, 10).unwrap()), vec![4, 3, 1]);
        assert_eq!(ids(by_customer(&s, "al", None, 2).unwrap()), vec![4, 3]);
        assert_eq!(ids(by_customer(&s, "al", Some(Uuid::from_u128(3)), 2).unwrap()), vec![1]);
        assert_eq!(ids(by_customer(&s, "alice", None, 10).unwrap()), vec![2]);
        assert_eq!(ids(by_customer(&s, "nobody", None, 10).unwrap()), Vec::<u128>::new());
    }
}
