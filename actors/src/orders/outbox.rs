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
//! What a round's outcomes mean (backoff, dead letters, the next round) is decided in
//! [`super::rounds`], with no I/O; this file collects, delivers and proposes.
//!
//! Dead letters: a destination that is unreachable (or times out, or has no leader) is retried
//! forever. One that *answers* with a failure has failed on the event itself; after
//! [`DEAD_LETTER_AFTER`](super::rounds::DEAD_LETTER_AFTER) such answers in a row the entry moves
//! to the dead letters, by one committed command. The failure count lives in the relay's memory: a
//! restart or a new leader gives a poison entry another `DEAD_LETTER_AFTER` tries, which is
//! harmless.

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
use super::rounds::{self, Delivery, Round, Rounds, ToDeadLetters};
use super::saga::{dest_label, Dest, OutboxEntry, OutboxEvent};
use crate::consumer::{ConsumerReply, ConsumerRequest};
use crate::inventory::{InventoryReply, InventoryRequest};
use crate::payments::{PaymentReply, PaymentRequest};
use crate::util::jitter;

pub const RELAY_NAME: &str = "bulkhead.orders.outbox";
/// Entries this process moved to the dead letters since it started (for `/metrics`).
pub static DEAD_LETTERED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Most dead letters one shard lists in one answer (keeps the reply small; oldest orders first).
pub const MAX_DEAD_LETTERS_LISTED: usize = 1000;
const ROUND_SIZE: usize = 512;
const PARALLEL: usize = 32;
/// At most this many entries for one destination per round, so a slow one cannot fill a round.
const PER_DEST: usize = 128;

#[derive(RactorMessage)]
pub enum OutboxMsg {
    Tick,
    /// New entries were written: look now rather than at the next tick.
    Kick,
    RoundDone {
        /// Delivered entries whose removal committed.
        removed: usize,
        round: Round,
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
    rounds: Rounds,
    /// The zero of the milliseconds [`Rounds`] is given (a monotonic clock).
    epoch: Instant,
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

/// Calls the leader of inventory shard `shard` with `req`; an error is already the delivery's outcome.
async fn call_inventory_shard(
    cluster: &Cluster,
    shard: u32,
    req: InventoryRequest,
    tp: &str,
) -> Result<InventoryReply, Delivery> {
    let t = Duration::from_millis(cluster.config().timing.call_timeout_ms);
    cluster.call_leader(Capability::Inventory, shard, &req, tp, t).await.map_err(on_error)
}

/// Delivers one entry.
async fn deliver(cluster: &Cluster, e: &OutboxEntry) -> Delivery {
    let tp = bulkhead_cluster::wire::child_traceparent(&e.traceparent);
    match (&e.dest, &e.event) {
        (Dest::Inventory { shard }, OutboxEvent::CommitReservation { order_id }) => {
            let commit = InventoryRequest::CommitOn { shard: *shard, order_id: *order_id };
            match call_inventory_shard(cluster, *shard, commit, &tp).await {
                Ok(InventoryReply::CommitFailed { reason }) => {
                    tracing::error!(%order_id, shard, %reason, "reservation commit failed for a confirmed order");
                    Delivery::Acked
                }
                Ok(InventoryReply::Unavailable(_)) => Delivery::Retry,
                Ok(_) => Delivery::Acked,
                Err(d) => d,
            }
        }
        (Dest::Inventory { shard }, OutboxEvent::ReleaseReservation { order_id }) => {
            let release = InventoryRequest::ReleaseOn { shard: *shard, order_id: *order_id };
            match call_inventory_shard(cluster, *shard, release, &tp).await {
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
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Moves an entry its destination keeps failing on to the dead letters (one committed command).
    fn dead_letter(&self, d: ToDeadLetters) {
        let ToDeadLetters { key, entry, attempts, last_error } = d;
        let Some(replica) = self.replicas.get(&shard_of_order(&key.0)).cloned() else { return };
        let destination = dest_label(&entry.dest);
        tokio::spawn(async move {
            let cmd =
                OrdersCommand::DeadLetter { key, attempts, last_error: last_error.clone(), now_ms: replica.now_ms() };
            match replica.propose::<OrdersMachine>(&cmd).await {
                Ok(OrdersApplied::Done) => {
                    DEAD_LETTERED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(
                        order_id = %entry.order_id, %destination, attempts, error = %last_error,
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
        let now = self.now_ms();
        let mut batch = Vec::new();
        let mut per_dest: HashMap<Dest, usize> = HashMap::new();
        for replica in self.replicas.values().filter(|r| r.is_leader()) {
            for item in OUTBOX.iter(replica.store()) {
                let (key, entry) = item?;
                if self.rounds.backed_off(&entry.dest, now) {
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
        if !self.rounds.begin() {
            return Ok(());
        }
        let batch = self.collect()?;
        if batch.is_empty() {
            return Ok(());
        }
        self.rounds.started();
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
            let mut round = rounds::judge(results);
            // Removed before the next round scans again, so nothing is sent twice for want of
            // waiting; a removal that does not commit means a harmless redelivery. (What is left
            // of the round is all `Rounds::finish` reads.)
            let mut removed = 0;
            for (shard, keys) in std::mem::take(&mut round.delivered) {
                let Some(replica) = replicas.get(&shard) else { continue };
                let n = keys.len();
                match replica.propose::<OrdersMachine>(&OrdersCommand::Delivered { keys }).await {
                    Ok(_) => removed += n,
                    Err(e) => tracing::debug!(shard, error = %e, "removing delivered outbox entries did not commit"),
                }
            }
            let _ = me.cast(OutboxMsg::RoundDone { removed, round });
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
            rounds: Rounds::default(),
            epoch: Instant::now(),
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
            OutboxMsg::RoundDone { removed, round } => {
                let after = state.rounds.finish(removed, round, state.now_ms(), &mut jitter);
                for d in after.dead_letters {
                    state.dead_letter(d);
                }
                if after.again {
                    state.start_round(&myself)?;
                }
            }
        }
        Ok(())
    }
}
