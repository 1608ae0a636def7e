//! The outbox relay: delivers what finished orders queued in the outbox, at least once.
//!
//! A finished order's outbox entries are written by the same committed command as its terminal
//! state ([`super::machine::OrdersCommand::Finish`]), so a confirmed order always has its
//! deliveries queued, on every replica. The relay runs on every node but works only the shards
//! this node leads: it scans their outbox, delivers each entry with a timed cluster call, and once
//! destinations have acknowledged (after their own commit) proposes the entries' removal
//! ([`OrdersCommand::Delivered`]). A new leader's relay simply finds what is left. Consumers dedupe
//! by event id, so a redelivery (a lost ack, a removal that did not commit) is harmless.
//!
//! Dead letters: a destination that is unreachable (or times out, or has no leader) is retried
//! forever. One that *answers* with a failure has failed on the event itself; after
//! [`DEAD_LETTER_AFTER`] such answers in a row the entry moves to the dead letters, by one
//! committed command. The failure count lives in the relay's memory: a restart or a new leader
//! gives a poison entry another [`DEAD_LETTER_AFTER`] tries, which is harmless.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_cluster::raft::Replica;
use bulkhead_cluster::Cluster;
use bulkhead_storage::StoreError;
use futures::stream::{self, StreamExt};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;

use crate::capability::Capability;

use uuid::Uuid;

use super::machine::{OrdersApplied, OrdersCommand, OrdersMachine, OUTBOX};
use super::protocol::shard_of_order;
use super::saga::{dest_label, parse_inventory_shard, Dest, OutboxEntry, OutboxEvent};
use crate::consumer::{ConsumerReply, ConsumerRequest};
use crate::inventory::{InventoryReply, InventoryRequest};
use crate::payments::{PaymentReply, PaymentRequest};
use crate::util::{backoff_ms, jitter};

pub const RELAY_NAME: &str = "bulkhead.orders.outbox";
/// Failure answers in a row after which an entry becomes a dead letter.
pub const DEAD_LETTER_AFTER: u32 = 5;
/// Entries this process moved to the dead letters since it started (for `/metrics`).
pub static DEAD_LETTERED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Most dead letters one shard lists in one answer (keeps the reply small; oldest orders first).
pub const MAX_DEAD_LETTERS_LISTED: usize = 1000;
const ROUND_SIZE: usize = 512;
const PARALLEL: usize = 32;
/// At most this many entries for one destination per round, so a slow one cannot fill a round.
const PER_DEST: usize = 128;

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
        /// Delivered entries whose removal committed.
        removed: usize,
        /// Every entry acknowledged this round (its failure count starts again).
        acked: Vec<(Uuid, u64)>,
        ok: Vec<Dest>,
        failed: Vec<Dest>,
        /// Entries whose destination answered with a failure, and that failure.
        refused: Vec<((Uuid, u64), OutboxEntry, String)>,
    },
}

pub struct OutboxRelay;

/// An outbox entry with its key.
type Keyed = ((Uuid, u64), OutboxEntry);

pub struct RelayArgs {
    pub cluster: Cluster,
    /// This node's orders replicas, by shard.
    pub replicas: Arc<BTreeMap<u32, Replica>>,
}

pub struct RelayState {
    cluster: Cluster,
    replicas: Arc<BTreeMap<u32, Replica>>,
    in_flight: bool,
    again: bool,
    backoff: HashMap<Dest, (u32, Instant)>,
    /// Failure answers in a row per entry (see the module doc on dead letters).
    refusals: HashMap<(Uuid, u64), u32>,
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
    fn on_refused(&mut self, key: (Uuid, u64), entry: OutboxEntry, why: String) {
        let attempts = {
            let n = self.refusals.entry(key).or_default();
            *n += 1;
            *n
        };
        let destination = dest_label(&entry.dest);
        if attempts < DEAD_LETTER_AFTER {
            tracing::warn!(order_id = %entry.order_id, %destination, attempts, error = %why, "outbox delivery refused; will retry");
            return;
        }
        self.refusals.remove(&key);
        let Some(replica) = self.replicas.get(&shard_of_order(&key.0)).cloned() else { return };
        tokio::spawn(async move {
            let cmd = OrdersCommand::DeadLetter { key, attempts, last_error: why.clone(), now_ms: replica.now_ms() };
            match replica.propose::<OrdersMachine>(&cmd).await {
                Ok(OrdersApplied::Done) => {
                    DEAD_LETTERED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(
                        order_id = %entry.order_id, %destination, attempts, error = %why,
                        "outbox entry moved to the dead letters"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(order_id = %entry.order_id, error = %e, "moving an entry to the dead letters did not commit; it stays in the outbox")
                }
            }
        });
    }

    /// Up to [`ROUND_SIZE`] entries of the shards this node leads, skipping backed-off destinations.
    fn collect(&self) -> Result<Vec<Keyed>, StoreError> {
        let now = Instant::now();
        let mut batch = Vec::new();
        let mut per_dest: HashMap<Dest, usize> = HashMap::new();
        for replica in self.replicas.values().filter(|r| r.is_leader()) {
            for item in OUTBOX.iter(replica.store()) {
                let (key, entry) = item?;
                if self.backoff.get(&entry.dest).is_some_and(|(_, until)| *until > now) {
                    continue;
                }
                let n = per_dest.entry(entry.dest.clone()).or_default();
                if *n >= PER_DEST {
                    continue;
                }
                *n += 1;
                batch.push((key, entry));
                if batch.len() >= ROUND_SIZE {
                    return Ok(batch);
                }
            }
        }
        Ok(batch)
    }

    fn start_round(&mut self, myself: &ActorRef<OutboxMsg>) -> Result<(), ActorProcessingErr> {
        if self.in_flight {
            self.again = true;
            return Ok(());
        }
        let batch = self.collect()?;
        if batch.is_empty() {
            return Ok(());
        }
        self.in_flight = true;
        let (cluster, me, replicas) = (self.cluster.clone(), myself.clone(), self.replicas.clone());
        tokio::spawn(async move {
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
                (BTreeMap::<u32, Vec<(Uuid, u64)>>::new(), Vec::new(), Vec::new(), Vec::new());
            let mut acked = Vec::new();
            for (key, entry, outcome) in results {
                let dest = entry.dest.clone();
                match outcome {
                    // A destination that answered (even with a failure on one entry) is reachable.
                    Delivery::Acked | Delivery::Failed(_) if !ok_dests.contains(&dest) => ok_dests.push(dest),
                    Delivery::Retry if !failed.contains(&dest) => failed.push(dest),
                    _ => {}
                }
                match outcome {
                    Delivery::Acked => {
                        acked.push(key);
                        delivered.entry(shard_of_order(&key.0)).or_default().push(key)
                    }
                    Delivery::Failed(why) => refused.push((key, entry, why)),
                    Delivery::Retry => {}
                }
            }
            // Removed before the next round scans again, so nothing is sent twice for want of
            // waiting; a removal that does not commit means a harmless redelivery.
            let mut removed = 0;
            for (shard, keys) in delivered {
                let Some(replica) = replicas.get(&shard) else { continue };
                let n = keys.len();
                match replica.propose::<OrdersMachine>(&OrdersCommand::Delivered { keys }).await {
                    Ok(_) => removed += n,
                    Err(e) => tracing::debug!(shard, error = %e, "removing delivered outbox entries did not commit"),
                }
            }
            let _ = me.cast(OutboxMsg::RoundDone { removed, acked, ok: ok_dests, failed, refused });
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
            replicas: args.replicas,
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
            OutboxMsg::RoundDone { removed, acked, ok, failed, refused } => {
                state.in_flight = false;
                for key in &acked {
                    state.refusals.remove(key);
                }
                for (key, entry, why) in refused {
                    state.on_refused(key, entry, why);
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
                if std::mem::take(&mut state.again) || (removed > 0 && failed.is_empty()) {
                    state.start_round(&myself)?;
                }
            }
        }
        Ok(())
    }
}
