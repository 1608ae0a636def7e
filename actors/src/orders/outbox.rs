//! The outbox relay: delivers what finished orders wrote to the outbox, at least once.
//!
//! Entries are written in the same batch as the order's terminal state, so a confirmed order
//! always has its deliveries queued, even if the node dies right after. The relay scans the outbox,
//! delivers each entry with a timed cluster call, and deletes it only once the destination has
//! acknowledged (after its own flush). A destination that fails is backed off alone; the others go
//! on. Consumers dedupe by event id, so redelivery after a lost ack is harmless.
//!
//! Dead letters: a destination that is unreachable (or times out, or is restarting) is retried
//! forever. One that *answers* with a failure (a refusal, a non-transient rejection) has failed on
//! the event itself; after [`DEAD_LETTER_AFTER`] such answers in a row the entry is moved to
//! [`DEAD_LETTERS`] (same key) so it stops holding its destination back. The move is two ordered
//! writes, the dead letter first, then the compare-and-swap removal of the outbox entry: a crash in
//! between leaves the entry in the outbox as well, which is redelivered (and, should it now succeed,
//! its dead letter is dropped). The failure count lives in the relay's memory: a restart gives a
//! poison entry another [`DEAD_LETTER_AFTER`] tries, which is harmless.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bulkhead_cluster::{Capability, Cluster};
use bulkhead_storage::{now_ms, Batch, Record, Store, StoreError, Table};
use futures::stream::{self, StreamExt};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::protocol::DeadLetter;
use super::saga::{Dest, OutboxEvent};
use crate::consumer::{ConsumerReply, ConsumerRequest};
use crate::inventory::{InventoryReply, InventoryRequest};
use crate::payments::{PaymentReply, PaymentRequest};
use crate::util::{backoff_ms, jitter};

use super::actor::{parse_inventory_shard, UNFINISHED};

pub const RELAY_NAME: &str = "bulkhead.orders.outbox";
/// Outbox entries by (order id, position): deterministic, so a repeated finish overwrites.
pub const OUTBOX: Table<(Uuid, u64), OutboxEntry> = Table::new(3, "outbox");
/// Entries the relay gave up on, by the key they had in [`OUTBOX`].
pub const DEAD_LETTERS: Table<(Uuid, u64), DeadLetterRecord> = Table::new(7, "dead_letters");
/// Failure answers in a row after which an entry becomes a dead letter.
pub const DEAD_LETTER_AFTER: u32 = 5;
/// Entries this process moved to the dead letters since it started (for `/metrics`).
pub static DEAD_LETTERED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Most dead letters one node lists in one answer (keeps the reply small; oldest orders first).
pub const MAX_DEAD_LETTERS_LISTED: usize = 1000;
const ROUND_SIZE: usize = 512;
const PARALLEL: usize = 32;
/// At most this many entries for one destination per round, so a slow one cannot fill a round.
const PER_DEST: usize = 128;

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
    const VERSION: u8 = 1;
}

/// A dead letter as stored: what the API lists, plus the entry itself (so it can be replayed by hand).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    pub letter: DeadLetter,
    pub entry: OutboxEntry,
}
impl Record for DeadLetterRecord {
    const VERSION: u8 = 1;
}

/// This store's dead letters, of one order or all, at most [`MAX_DEAD_LETTERS_LISTED`].
pub fn dead_letters(store: &Store, order_id: Option<Uuid>) -> Result<Vec<DeadLetter>, StoreError> {
    let mut list = Vec::new();
    let mut push = |item: Result<((Uuid, u64), DeadLetterRecord), StoreError>| -> Result<bool, StoreError> {
        list.push(item?.1.letter);
        Ok(list.len() < MAX_DEAD_LETTERS_LISTED)
    };
    match order_id {
        Some(id) => {
            for item in DEAD_LETTERS.iter_prefix(store, id.as_bytes()) {
                if !push(item)? {
                    break;
                }
            }
        }
        None => {
            for item in DEAD_LETTERS.iter(store) {
                if !push(item)? {
                    break;
                }
            }
        }
    }
    Ok(list)
}

/// Moves `entry` (at `key` in the outbox) to the dead letters; `None` if the entry was rewritten
/// meanwhile (a resumed finish), in which case the new entry stays and gets its own chances.
pub fn move_to_dead_letters(
    store: &Store,
    key: (Uuid, u64),
    entry: &OutboxEntry,
    attempts: u32,
    last_error: String,
) -> Result<Option<DeadLetter>, StoreError> {
    let (event, event_id) = event_label(&entry.event);
    let letter = DeadLetter {
        order_id: entry.order_id,
        event_id,
        event: event.to_string(),
        destination: dest_label(&entry.dest),
        attempts,
        last_error,
        at_ms: now_ms(),
    };
    // The dead letter first, then the entry's removal: a crash between them leaves both, and the
    // entry is tried again; never an entry gone without its dead letter.
    let mut b = Batch::new();
    DEAD_LETTERS.put(&mut b, &key, &DeadLetterRecord { letter: letter.clone(), entry: entry.clone() });
    store.apply_in_order(b)?;
    if OUTBOX.remove_if_unchanged(store, &key, entry)? {
        return Ok(Some(letter));
    }
    let mut b = Batch::new();
    DEAD_LETTERS.remove(&mut b, &key);
    store.apply_in_order(b)?;
    Ok(None)
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Acknowledged: the entry may go.
    Acked,
    /// Not delivered (unreachable, timed out, lost, restarting): retry after the destination's backoff.
    Retry,
    /// The destination answered that it failed on this entry.
    Failed(String),
}

#[derive(RactorMessage)]
pub enum OutboxMsg {
    Tick,
    /// New entries were written: look now rather than at the next tick.
    Kick,
    RoundDone {
        delivered: Vec<((Uuid, u64), OutboxEntry)>,
        ok: Vec<Dest>,
        failed: Vec<Dest>,
        /// Entries whose destination answered with a failure, and that failure.
        refused: Vec<((Uuid, u64), OutboxEntry, String)>,
    },
}

pub struct OutboxRelay;

pub struct RelayArgs {
    pub cluster: Cluster,
    pub store: Store,
}

pub struct RelayState {
    cluster: Cluster,
    store: Store,
    in_flight: bool,
    again: bool,
    backoff: HashMap<Dest, (u32, Instant)>,
    /// Failure answers in a row per entry (see the module doc on dead letters).
    refusals: HashMap<(Uuid, u64), u32>,
}

fn dest_label(d: &Dest) -> String {
    match d {
        Dest::Inventory { node } => format!("inventory@{node}"),
        Dest::Payments => "payments".into(),
        Dest::Shipping => "shipping".into(),
        Dest::Notifications => "notifications".into(),
    }
}

fn event_label(e: &OutboxEvent) -> (&'static str, Uuid) {
    match e {
        OutboxEvent::CommitReservation { order_id } => ("commit_reservation", *order_id),
        OutboxEvent::ReleaseReservation { order_id } => ("release_reservation", *order_id),
        OutboxEvent::Confirmed(ev) => ("order_confirmed", ev.event_id),
        OutboxEvent::RefundPayment { order_id } => ("refund_payment", *order_id),
    }
}

/// A failed call: retried later when the destination did not get it or may recover by itself,
/// a failure of the entry when the destination answered that it will not handle it.
fn on_error(e: bulkhead_cluster::CallError) -> Delivery {
    if e.is_transient() {
        Delivery::Retry
    } else {
        Delivery::Failed(e.to_string())
    }
}

/// Calls the leader of the inventory shard a saga labelled `label` with the request `make` builds
/// for it; an error is already the delivery's outcome.
async fn call_inventory_shard(
    cluster: &Cluster,
    label: &str,
    make: impl FnOnce(u32) -> InventoryRequest,
    tp: &str,
) -> Result<InventoryReply, Delivery> {
    let Some(shard) = parse_inventory_shard(label) else {
        return Err(Delivery::Failed(format!("`{label}` is not an inventory shard")));
    };
    let t = Duration::from_millis(cluster.config().timing.call_timeout_ms);
    cluster.call_leader(Capability::Inventory, shard, &make(shard), tp, t).await.map_err(on_error)
}

/// Delivers one entry.
async fn deliver(cluster: &Cluster, e: &OutboxEntry) -> Delivery {
    let tp = bulkhead_cluster::wire::child_traceparent(&e.traceparent);
    match (&e.dest, &e.event) {
        (Dest::Inventory { node }, OutboxEvent::CommitReservation { order_id }) => {
            let commit = |shard| InventoryRequest::CommitOn { shard, order_id: *order_id };
            match call_inventory_shard(cluster, node, commit, &tp).await {
                Ok(InventoryReply::CommitFailed { reason }) => {
                    tracing::error!(%order_id, %node, %reason, "reservation commit failed for a confirmed order");
                    Delivery::Acked
                }
                Ok(InventoryReply::Unavailable(_)) => Delivery::Retry,
                Ok(_) => Delivery::Acked,
                Err(d) => d,
            }
        }
        (Dest::Inventory { node }, OutboxEvent::ReleaseReservation { order_id }) => {
            let release = |shard| InventoryRequest::ReleaseOn { shard, order_id: *order_id };
            match call_inventory_shard(cluster, node, release, &tp).await {
                Ok(InventoryReply::Unavailable(_)) => Delivery::Retry,
                Ok(_) => Delivery::Acked,
                Err(d) => d,
            }
        }
        (Dest::Payments, OutboxEvent::RefundPayment { order_id }) => {
            let shard = cluster.shard_of(Capability::Payments, order_id.as_bytes());
            let req = PaymentRequest::Refund { order_id: *order_id };
            let t = Duration::from_millis(cluster.config().timing.call_timeout_ms);
            match cluster.call_leader::<_, PaymentReply>(Capability::Payments, shard, &req, &tp, t).await {
                Ok(PaymentReply::Refunded) => {
                    tracing::warn!(%order_id, "charge refunded for a cancelled order");
                    Delivery::Acked
                }
                Ok(PaymentReply::TransientError { .. }) => Delivery::Retry,
                Ok(_) => Delivery::Acked,
                Err(e) => on_error(e),
            }
        }
        (Dest::Shipping | Dest::Notifications, OutboxEvent::Confirmed(ev)) => {
            let cap = if e.dest == Dest::Shipping { Capability::Shipping } else { Capability::Notifications };
            let shard = cluster.shard_of(cap, ev.order_id.as_bytes());
            let t = Duration::from_millis(cluster.config().timing.call_timeout_ms);
            let req = ConsumerRequest::Deliver(ev.clone());
            match cluster.call_leader::<_, ConsumerReply>(cap, shard, &req, &tp, t).await {
                Ok(ConsumerReply::Accepted { .. }) => Delivery::Acked,
                Ok(ConsumerReply::Unavailable(_)) => Delivery::Retry,
                Ok(ConsumerReply::Refused(why)) => Delivery::Failed(format!("{cap} shard {shard} refused: {why}")),
                Ok(other) => Delivery::Failed(format!("{cap} shard {shard} answered {other:?}")),
                Err(e) => on_error(e),
            }
        }
        (dest, event) => {
            tracing::error!(dest = %dest_label(dest), ?event, "outbox entry with a mismatched destination dropped");
            Delivery::Acked
        }
    }
}

impl RelayState {
    /// The destination failed on `entry` again; past [`DEAD_LETTER_AFTER`] it becomes a dead letter.
    fn on_refused(&mut self, key: (Uuid, u64), entry: OutboxEntry, why: String) -> Result<(), StoreError> {
        let attempts = {
            let n = self.refusals.entry(key).or_default();
            *n += 1;
            *n
        };
        let destination = dest_label(&entry.dest);
        if attempts < DEAD_LETTER_AFTER {
            tracing::warn!(order_id = %entry.order_id, %destination, attempts, error = %why, "outbox delivery refused; will retry");
            return Ok(());
        }
        self.refusals.remove(&key);
        if let Some(letter) = move_to_dead_letters(&self.store, key, &entry, attempts, why)? {
            DEAD_LETTERED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(
                order_id = %letter.order_id, destination = %letter.destination, event = %letter.event, attempts,
                error = %letter.last_error, "outbox entry moved to the dead letters"
            );
        }
        Ok(())
    }

    fn start_round(&mut self, myself: &ActorRef<OutboxMsg>) -> Result<(), ActorProcessingErr> {
        if self.in_flight {
            self.again = true;
            return Ok(());
        }
        let now = Instant::now();
        let mut batch = Vec::new();
        let mut per_dest: HashMap<Dest, usize> = HashMap::new();
        for item in OUTBOX.iter(&self.store) {
            let (key, entry) = item?;
            if self.backoff.get(&entry.dest).is_some_and(|(_, until)| *until > now) {
                continue;
            }
            // Not committed yet (the finish is mid-way, or a crash interrupted it): not ours to send.
            if UNFINISHED.get(&self.store, &entry.order_id)?.is_some() {
                continue;
            }
            // Read it again now that its order is known to be committed: the scan may hand out a
            // value from before a resumed finish rewrote this key.
            let Some(entry) = OUTBOX.get(&self.store, &key)? else { continue };
            let n = per_dest.entry(entry.dest.clone()).or_default();
            if *n >= PER_DEST {
                continue;
            }
            *n += 1;
            batch.push((key, entry));
            if batch.len() >= ROUND_SIZE {
                break;
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.in_flight = true;
        let (cluster, me, store) = (self.cluster.clone(), myself.clone(), self.store.clone());
        tokio::spawn(async move {
            // The scan sees applied writes; deliver nothing a crash could still take back.
            if store.sync().await.is_err() {
                let _ =
                    me.cast(OutboxMsg::RoundDone { delivered: vec![], ok: vec![], failed: vec![], refused: vec![] });
                return;
            }
            let results: Vec<((Uuid, u64), OutboxEntry, Delivery)> = stream::iter(batch)
                .map(|(key, entry)| {
                    let cluster = cluster.clone();
                    async move {
                        let outcome = deliver(&cluster, &entry).await;
                        (key, entry, outcome)
                    }
                })
                .buffer_unordered(PARALLEL)
                .collect()
                .await;
            let (mut delivered, mut ok_dests, mut failed, mut refused) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (key, entry, outcome) in results {
                let dest = entry.dest.clone();
                match outcome {
                    // A destination that answered (even with a failure on one entry) is reachable.
                    Delivery::Acked | Delivery::Failed(_) if !ok_dests.contains(&dest) => ok_dests.push(dest),
                    Delivery::Retry if !failed.contains(&dest) => failed.push(dest),
                    _ => {}
                }
                match outcome {
                    Delivery::Acked => delivered.push((key, entry)),
                    Delivery::Failed(why) => refused.push((key, entry, why)),
                    Delivery::Retry => {}
                }
            }
            let _ = me.cast(OutboxMsg::RoundDone { delivered, ok: ok_dests, failed, refused });
        });
        Ok(())
    }
}

impl Actor for OutboxRelay {
    type Msg = OutboxMsg;
    type State = RelayState;
    type Arguments = RelayArgs;

    async fn pre_start(&self, myself: ActorRef<OutboxMsg>, args: RelayArgs) -> Result<RelayState, ActorProcessingErr> {
        myself.send_interval(Duration::from_millis(200), || OutboxMsg::Tick);
        Ok(RelayState {
            cluster: args.cluster,
            store: args.store,
            in_flight: false,
            again: false,
            backoff: HashMap::new(),
            refusals: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<OutboxMsg>,
        msg: OutboxMsg,
        state: &mut RelayState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            OutboxMsg::Tick | OutboxMsg::Kick => state.start_round(&myself)?,
            OutboxMsg::RoundDone { delivered, ok, failed, refused } => {
                state.in_flight = false;
                // Only what was delivered is removed: an entry rewritten meanwhile (a resumed finish)
                // stays. Not awaited: if a deletion is lost in a crash, the entry is delivered again.
                for (key, entry) in &delivered {
                    OUTBOX.remove_if_unchanged(&state.store, key, entry)?;
                    // Delivered after all (a crash came between a dead letter and its outbox removal).
                    if state.refusals.remove(key).is_some() || DEAD_LETTERS.get(&state.store, key)?.is_some() {
                        let mut b = Batch::new();
                        DEAD_LETTERS.remove(&mut b, key);
                        state.store.apply_in_order(b)?;
                    }
                }
                for (key, entry, why) in refused {
                    state.on_refused(key, entry, why)?;
                }
                let now = Instant::now();
                for dest in &failed {
                    let attempts = state.backoff.get(dest).map(|(a, _)| a + 1).unwrap_or(0);
                    let wait = backoff_ms(attempts, 100, 5_000, jitter());
                    tracing::debug!(dest = %dest_label(dest), attempts, wait, "outbox delivery failed; backing off");
                    state.backoff.insert(dest.clone(), (attempts, now + Duration::from_millis(wait)));
                }
                // A destination that answered is healthy again; one that was skipped keeps its backoff.
                for dest in ok.iter().filter(|d| !failed.contains(d)) {
                    state.backoff.remove(dest);
                }
                if std::mem::take(&mut state.again) || (!delivered.is_empty() && failed.is_empty()) {
                    state.start_round(&myself)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_storage::StoreOptions;

    fn entry(order_id: Uuid, dest: Dest) -> OutboxEntry {
        OutboxEntry {
            dest,
            event: OutboxEvent::ReleaseReservation { order_id },
            order_id,
            created_ms: 1,
            traceparent: String::new(),
        }
    }

    fn put(store: &Store, key: (Uuid, u64), e: &OutboxEntry) {
        let mut b = Batch::new();
        OUTBOX.put(&mut b, &key, e);
        store.apply_in_order(b).unwrap();
    }

    #[tokio::test]
    async fn a_dead_letter_replaces_its_outbox_entry_and_is_listed_by_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "orders", &StoreOptions::default()).unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let ea = entry(a, Dest::Inventory { node: "n2".into() });
        put(&store, (a, 0), &ea);
        put(&store, (b, 0), &entry(b, Dest::Payments));
        let letter = move_to_dead_letters(&store, (a, 0), &ea, 5, "no".into()).unwrap().expect("moved");
        assert_eq!(
            (letter.order_id, letter.event_id, letter.event.as_str(), letter.destination.as_str(), letter.attempts),
            (a, a, "release_reservation", "inventory@n2", 5)
        );
        assert!(OUTBOX.get(&store, &(a, 0)).unwrap().is_none(), "the entry left the outbox");
        assert!(OUTBOX.get(&store, &(b, 0)).unwrap().is_some(), "the other order's entry stays");
        assert_eq!(dead_letters(&store, Some(a)).unwrap(), vec![letter.clone()]);
        assert_eq!(dead_letters(&store, Some(b)).unwrap(), vec![]);
        assert_eq!(dead_letters(&store, None).unwrap(), vec![letter]);
        let stored = DEAD_LETTERS.get(&store, &(a, 0)).unwrap().expect("stored");
        assert_eq!(stored.entry, ea, "the entry is kept for a replay by hand");
    }

    #[tokio::test]
    async fn an_entry_rewritten_meanwhile_is_not_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "orders", &StoreOptions::default()).unwrap();
        let a = Uuid::now_v7();
        let old = entry(a, Dest::Payments);
        let mut new = old.clone();
        new.created_ms = 2;
        put(&store, (a, 0), &new);
        assert_eq!(move_to_dead_letters(&store, (a, 0), &old, 5, "no".into()).unwrap(), None);
        assert_eq!(OUTBOX.get(&store, &(a, 0)).unwrap(), Some(new));
        assert!(dead_letters(&store, None).unwrap().is_empty());
    }
}
