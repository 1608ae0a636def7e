//! The outbox relay: delivers what finished orders queued in the outbox, at least once.
//!
//! A finished order's outbox entries are written by the same committed command as its terminal
//! state ([`super::machine::OrdersCommand::Finish`]), so a confirmed order always has its
//! deliveries queued, on every replica. The relay runs on every node but works only the shards
//! this node leads: it scans their outbox, delivers the entries with timed cluster calls, and once
//! destinations have acknowledged (after their own commit) proposes the entries' removal
//! ([`OrdersCommand::Delivered`]). A new leader's relay simply finds what is left. Consumers dedupe
//! by event id, so a redelivery (a lost ack, a removal that did not commit) is harmless.
//!
//! One call per destination shard and round: a round's inventory commits for one shard travel as
//! one `CommitManyOn`, its confirmations for one shipping or notifications shard as one
//! `DeliverMany` (`parcels`); each entry is still its own command there, and gets its own
//! outcome. Why: a cluster call costs far more CPU than the command it carries (an envelope, TLS
//! records, tasks and actor hops on both sides), and an order has three such entries. A batch
//! refused whole (an event a consumer fails on, a node too old to know batches) is delivered
//! entry by entry, as before.
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
use crate::consumer::{ConsumerReply, ConsumerRequest, OrderConfirmed};
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

/// What one inventory commit's answer means for its entry. `NotLeader` reaches here only inside a
/// batch (a single call follows the leader): its replica lost the lead while serving it, and
/// nothing says the commit happened.
fn commit_delivery(order_id: &Uuid, shard: u32, answer: Result<InventoryReply, Delivery>) -> Delivery {
    match answer {
        Ok(InventoryReply::Committed) => Delivery::Acked,
        Ok(InventoryReply::CommitFailed { reason }) => {
            tracing::error!(%order_id, shard, %reason, "reservation commit failed for a confirmed order");
            Delivery::Acked
        }
        Ok(InventoryReply::Unavailable(_) | InventoryReply::NotLeader { .. }) => Delivery::Retry,
        Ok(other) => Delivery::Failed(format!("inventory shard {shard} answered {other:?}")),
        Err(d) => d,
    }
}

/// What one consumer's answer to an event means for its entry (`NotLeader`: as for a commit).
fn event_delivery(cap: Capability, shard: u32, answer: Result<ConsumerReply, Delivery>) -> Delivery {
    match answer {
        Ok(ConsumerReply::Accepted { .. }) => Delivery::Acked,
        Ok(ConsumerReply::Unavailable(_) | ConsumerReply::NotLeader { .. }) => Delivery::Retry,
        Ok(ConsumerReply::Refused(why)) => Delivery::Failed(format!("{cap} shard {shard} refused: {why}")),
        Ok(other) => Delivery::Failed(format!("{cap} shard {shard} answered {other:?}")),
        Err(d) => d,
    }
}

fn consumer_of(dest: &Dest) -> Capability {
    if *dest == Dest::Shipping {
        Capability::Shipping
    } else {
        Capability::Notifications
    }
}

/// Delivers one entry.
async fn deliver(cluster: &Cluster, e: &OutboxEntry) -> Delivery {
    let tp = bulkhead_cluster::wire::child_traceparent(&e.traceparent);
    match (&e.dest, &e.event) {
        (Dest::Inventory { shard }, OutboxEvent::CommitReservation { order_id }) => {
            let commit = InventoryRequest::CommitOn { shard: *shard, order_id: *order_id };
            commit_delivery(order_id, *shard, call_inventory_shard(cluster, *shard, commit, &tp).await)
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
            let cap = consumer_of(&e.dest);
            let shard = cluster.shard_of(cap, ev.order_id.as_bytes());
            let t = Duration::from_millis(cluster.config().timing.call_timeout_ms);
            let req = ConsumerRequest::Deliver(ev.clone());
            let answer = cluster.call_leader::<_, ConsumerReply>(cap, shard, &req, &tp, t).await.map_err(on_error);
            event_delivery(cap, shard, answer)
        }
        (dest, event) => {
            tracing::error!(dest = %dest_label(dest), ?event, "outbox entry with a mismatched destination dropped");
            Delivery::Acked
        }
    }
}

/// What one call of a round carries: an entry alone, or the entries of one destination shard
/// that takes them in one request, each with what it asks for there.
#[derive(Debug, PartialEq)]
enum Parcel {
    One(Keyed),
    /// Inventory commits of one shard, with their order ids.
    Commits {
        shard: u32,
        entries: Vec<(Keyed, Uuid)>,
    },
    /// Confirmations for one shard of a consumer, with their events.
    Events {
        cap: Capability,
        shard: u32,
        entries: Vec<(Keyed, OrderConfirmed)>,
    },
}

/// Groups a round's entries into the calls that carry them: one call per destination shard
/// for commits and confirmations, one per entry for the rest (releases and refunds are rare,
/// and come from cancellations). A group of one travels alone, as the single request it is.
/// Pure: `shard_of` says which shard of a consumer an order's confirmation goes to.
fn parcels(batch: Vec<Keyed>, shard_of: impl Fn(Capability, &Uuid) -> u32) -> Vec<Parcel> {
    let mut commits: BTreeMap<u32, Vec<(Keyed, Uuid)>> = BTreeMap::new();
    let mut events: BTreeMap<(Capability, u32), Vec<(Keyed, OrderConfirmed)>> = BTreeMap::new();
    let mut out = Vec::new();
    for keyed in batch {
        match (&keyed.1.dest, &keyed.1.event) {
            (Dest::Inventory { shard }, OutboxEvent::CommitReservation { order_id }) => {
                let (shard, order_id) = (*shard, *order_id);
                commits.entry(shard).or_default().push((keyed, order_id));
            }
            (dest @ (Dest::Shipping | Dest::Notifications), OutboxEvent::Confirmed(ev)) => {
                let cap = consumer_of(dest);
                let (shard, ev) = (shard_of(cap, &ev.order_id), ev.clone());
                events.entry((cap, shard)).or_default().push((keyed, ev));
            }
            _ => out.push(Parcel::One(keyed)),
        }
    }
    out.extend(
        commits.into_iter().map(|(shard, entries)| alone_or(entries, |entries| Parcel::Commits { shard, entries })),
    );
    out.extend(
        events
            .into_iter()
            .map(|((cap, shard), entries)| alone_or(entries, |entries| Parcel::Events { cap, shard, entries })),
    );
    out
}

/// A group of one travels alone, as the single request it is; a larger one as `batch` makes it.
fn alone_or<T>(mut entries: Vec<(Keyed, T)>, batch: impl FnOnce(Vec<(Keyed, T)>) -> Parcel) -> Parcel {
    if entries.len() == 1 {
        Parcel::One(entries.remove(0).0)
    } else {
        batch(entries)
    }
}

/// A reply that answers a batch: `Each` entry's reply in order, or one reply for all of it.
trait BatchReply: Sized {
    fn each(self) -> Result<Vec<Self>, Self>;
    /// Not served now, none of it recorded for sure (no majority in time): try again later.
    fn unavailable(&self) -> bool;
}

impl BatchReply for InventoryReply {
    fn each(self) -> Result<Vec<Self>, Self> {
        match self {
            InventoryReply::Each(replies) => Ok(replies),
            whole => Err(whole),
        }
    }
    fn unavailable(&self) -> bool {
        matches!(self, InventoryReply::Unavailable(_))
    }
}

impl BatchReply for ConsumerReply {
    fn each(self) -> Result<Vec<Self>, Self> {
        match self {
            ConsumerReply::Each(replies) => Ok(replies),
            whole => Err(whole),
        }
    }
    fn unavailable(&self) -> bool {
        matches!(self, ConsumerReply::Unavailable(_))
    }
}

/// Each entry's outcome from a batch's answer, the `i`th reply judged by `one` as a single
/// answer would be; or `None` when the batch was refused whole (a batch with an event a consumer
/// fails on, a node too old to know batches, an answer of the wrong shape): then its entries go
/// one by one.
fn outcomes<R: BatchReply>(
    n: usize,
    answer: Result<R, bulkhead_cluster::CallError>,
    mut one: impl FnMut(usize, R) -> Delivery,
) -> Option<Vec<Delivery>> {
    match answer.map(BatchReply::each) {
        Err(e) if e.is_transient() => Some(vec![Delivery::Retry; n]),
        Ok(Ok(replies)) if replies.len() == n => {
            Some(replies.into_iter().enumerate().map(|(i, r)| one(i, r)).collect())
        }
        Ok(Err(whole)) if whole.unavailable() => Some(vec![Delivery::Retry; n]),
        Err(_) | Ok(_) => None,
    }
}

/// A batch's call goes under its first entry's trace (each entry keeps its own in the outbox).
fn batch_traceparent<T>(entries: &[(Keyed, T)]) -> String {
    entries.first().map(|((_, e), _)| bulkhead_cluster::wire::child_traceparent(&e.traceparent)).unwrap_or_default()
}

/// Delivers a parcel: one call for a batch, each entry on its own if the batch is refused.
async fn deliver_parcel(cluster: &Cluster, parcel: Parcel) -> Vec<((Uuid, u64), OutboxEntry, Delivery)> {
    let t = Duration::from_millis(cluster.config().timing.call_timeout_ms);
    let (entries, outcomes): (Vec<Keyed>, _) = match parcel {
        Parcel::One((key, entry)) => {
            let outcome = deliver(cluster, &entry).await;
            return vec![(key, entry, outcome)];
        }
        Parcel::Commits { shard, entries } => {
            let order_ids: Vec<Uuid> = entries.iter().map(|(_, id)| *id).collect();
            let req = InventoryRequest::CommitManyOn { shard, order_ids: order_ids.clone() };
            let tp = batch_traceparent(&entries);
            let answer = cluster.call_leader::<_, InventoryReply>(Capability::Inventory, shard, &req, &tp, t).await;
            let outcomes = outcomes(entries.len(), answer, |i, r| commit_delivery(&order_ids[i], shard, Ok(r)));
            (entries.into_iter().map(|(keyed, _)| keyed).collect(), outcomes)
        }
        Parcel::Events { cap, shard, entries } => {
            let req = ConsumerRequest::DeliverMany(entries.iter().map(|(_, ev)| ev.clone()).collect());
            let tp = batch_traceparent(&entries);
            let answer = cluster.call_leader::<_, ConsumerReply>(cap, shard, &req, &tp, t).await;
            let outcomes = outcomes(entries.len(), answer, |_, r| event_delivery(cap, shard, Ok(r)));
            (entries.into_iter().map(|(keyed, _)| keyed).collect(), outcomes)
        }
    };
    match outcomes {
        Some(outcomes) => entries.into_iter().zip(outcomes).map(|((key, entry), d)| (key, entry, d)).collect(),
        None => {
            tracing::debug!(entries = entries.len(), "a batch was refused whole; delivering its entries one by one");
            stream::iter(entries)
                .map(|(key, entry)| async move {
                    let outcome = deliver(cluster, &entry).await;
                    (key, entry, outcome)
                })
                .buffer_unordered(PARALLEL)
                .collect()
                .await
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
            let parcels = parcels(batch, |cap, order_id| cluster.shard_of(cap, order_id.as_bytes()));
            let results: Vec<((Uuid, u64), OutboxEntry, Delivery)> = stream::iter(parcels)
                .map(|parcel| {
                    let cluster = cluster.clone();
                    async move { deliver_parcel(&cluster, parcel).await }
                })
                .buffer_unordered(PARALLEL)
                .flat_map(stream::iter)
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

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_cluster::CallError;

    fn entry(n: u128, dest: Dest, event: OutboxEvent) -> Keyed {
        let order_id = Uuid::from_u128(n);
        ((order_id, 0), OutboxEntry { dest, event, order_id, created_ms: 0, traceparent: String::new() })
    }

    fn commit(n: u128, shard: u32) -> Keyed {
        entry(n, Dest::Inventory { shard }, OutboxEvent::CommitReservation { order_id: Uuid::from_u128(n) })
    }

    fn confirmed(n: u128, dest: Dest) -> Keyed {
        let ev = OrderConfirmed {
            event_id: Uuid::from_u128(1000 + n),
            order_id: Uuid::from_u128(n),
            customer_id: "c".into(),
            lines: vec![],
            total_cents: 1,
            payment_id: "p".into(),
        };
        entry(n, dest, OutboxEvent::Confirmed(ev))
    }

    fn ids<T>(entries: &[(Keyed, T)]) -> Vec<u128> {
        entries.iter().map(|((k, _), _)| k.0.as_u128()).collect()
    }

    /// Odd order ids go to shard 1 of a consumer, even ones to shard 0.
    fn by_parity(_: Capability, id: &Uuid) -> u32 {
        (id.as_u128() % 2) as u32
    }

    #[test]
    fn a_round_travels_as_one_call_per_destination_shard_and_the_rare_entries_alone() {
        let release =
            entry(9, Dest::Inventory { shard: 0 }, OutboxEvent::ReleaseReservation { order_id: Uuid::from_u128(9) });
        let refund = entry(8, Dest::Payments, OutboxEvent::RefundPayment { order_id: Uuid::from_u128(8) });
        let batch = vec![
            commit(1, 0),
            confirmed(1, Dest::Shipping),
            confirmed(1, Dest::Notifications),
            commit(3, 0),
            commit(5, 1),
            confirmed(3, Dest::Shipping),
            release.clone(),
            confirmed(2, Dest::Shipping),
            refund.clone(),
            confirmed(3, Dest::Notifications),
        ];
        let got = parcels(batch, by_parity);
        let mut alone: Vec<u128> = Vec::new();
        let mut many: Vec<(String, Vec<u128>)> = Vec::new();
        for p in got {
            match p {
                Parcel::One(k) => alone.push(k.0 .0.as_u128()),
                Parcel::Commits { shard, entries } => many.push((format!("inventory {shard}"), ids(&entries))),
                Parcel::Events { cap, shard, entries } => many.push((format!("{cap} {shard}"), ids(&entries))),
            }
        }
        alone.sort();
        // The release and the refund alone, and so is each group of one: commit 5 (shard 1),
        // shipping of order 2 (shard 0).
        assert_eq!(alone, vec![2, 5, 8, 9]);
        many.sort();
        assert_eq!(
            many,
            vec![
                ("inventory 0".to_string(), vec![1, 3]),
                ("notifications 1".to_string(), vec![1, 3]),
                ("shipping 1".to_string(), vec![1, 3]),
            ]
        );
    }

    fn timed_out() -> CallError {
        CallError::TimedOut { capability: Capability::Shipping.into(), node: "n2".into(), timeout_ms: 1 }
    }

    fn rejected() -> CallError {
        CallError::Rejected { capability: Capability::Shipping.into(), node: "n2".into(), reason: "undecodable".into() }
    }

    fn judge(answer: Result<ConsumerReply, CallError>, n: usize) -> Option<Vec<Delivery>> {
        outcomes(n, answer, |_, r| event_delivery(Capability::Shipping, 0, Ok(r)))
    }

    #[test]
    fn each_entry_of_a_batch_gets_its_own_outcome() {
        let answer = ConsumerReply::Each(vec![
            ConsumerReply::Accepted { duplicate: false },
            ConsumerReply::Unavailable("no majority".into()),
            ConsumerReply::Refused("poison".into()),
        ]);
        let got = judge(Ok(answer), 3).unwrap();
        assert_eq!(got[..2], [Delivery::Acked, Delivery::Retry]);
        assert!(matches!(&got[2], Delivery::Failed(why) if why.contains("poison")));
    }

    /// Found by `random-faults`: a batch served while its replica lost the lead answers
    /// `NotLeader` for what it could not commit. A single call follows the leader; in a batch
    /// that answer must be a retry, never a delivery (a commit "acked" that never happened left
    /// stock reserved) nor a failure (five in a row dead-lettered notifications).
    #[test]
    fn what_a_replica_that_lost_the_lead_answers_in_a_batch_is_retried() {
        let answer = ConsumerReply::Each(vec![
            ConsumerReply::Accepted { duplicate: false },
            ConsumerReply::NotLeader { leader: Some("n2".into()) },
            ConsumerReply::NotLeader { leader: None },
        ]);
        assert_eq!(judge(Ok(answer), 3), Some(vec![Delivery::Acked, Delivery::Retry, Delivery::Retry]));
        let commits = InventoryReply::Each(vec![
            InventoryReply::Committed,
            InventoryReply::NotLeader { leader: None },
            InventoryReply::Unavailable("no majority".into()),
        ]);
        let ids = [Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3)];
        let got = outcomes(3, Ok(commits), |i, r| commit_delivery(&ids[i], 0, Ok(r)));
        assert_eq!(got, Some(vec![Delivery::Acked, Delivery::Retry, Delivery::Retry]));
    }

    #[test]
    fn a_batch_not_delivered_is_retried_whole_and_one_refused_whole_goes_entry_by_entry() {
        // Not delivered at all: every entry waits for the destination's backoff.
        assert_eq!(judge(Err(timed_out()), 2), Some(vec![Delivery::Retry; 2]));
        assert_eq!(judge(Ok(ConsumerReply::Unavailable("election".into())), 2), Some(vec![Delivery::Retry; 2]));
        // Refused whole (a poison event inside, a node that cannot decode a batch) or answered
        // out of shape: no outcome for any entry; each goes again on its own.
        assert_eq!(judge(Err(rejected()), 2), None);
        assert_eq!(judge(Ok(ConsumerReply::Refused("deliver one by one".into())), 2), None);
        assert_eq!(judge(Ok(ConsumerReply::Each(vec![ConsumerReply::Accepted { duplicate: true }])), 2), None);
    }
}
