//! The outbox relay: delivers what finished orders wrote to the outbox, at least once.
//!
//! Entries are written in the same batch as the order's terminal state, so a confirmed order
//! always has its deliveries queued, even if the node dies right after. The relay scans the outbox,
//! delivers each entry with a timed cluster call, and deletes it only once the destination has
//! acknowledged (after its own flush). A destination that fails is backed off alone; the others go
//! on. Consumers dedupe by event id, so redelivery after a lost ack is harmless.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bulkhead_cluster::{Capability, Cluster};
use bulkhead_storage::{Record, Store, Table};
use futures::stream::{self, StreamExt};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::saga::{Dest, OutboxEvent};
use crate::consumer::{ConsumerReply, ConsumerRequest};
use crate::inventory::{InventoryReply, InventoryRequest};
use crate::payments::{PaymentReply, PaymentRequest};
use crate::util::{backoff_ms, jitter};

use super::actor::UNFINISHED;

pub const RELAY_NAME: &str = "bulkhead.orders.outbox";
/// Outbox entries by (order id, position): deterministic, so a repeated finish overwrites.
pub const OUTBOX: Table<(Uuid, u64), OutboxEntry> = Table::new(3, "outbox");
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

#[derive(RactorMessage)]
pub enum OutboxMsg {
    Tick,
    /// New entries were written: look now rather than at the next tick.
    Kick,
    RoundDone {
        delivered: Vec<((Uuid, u64), OutboxEntry)>,
        ok: Vec<Dest>,
        failed: Vec<Dest>,
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
}

fn dest_label(d: &Dest) -> String {
    match d {
        Dest::Inventory { node } => format!("inventory@{node}"),
        Dest::Payments => "payments".into(),
        Dest::Shipping => "shipping".into(),
        Dest::Notifications => "notifications".into(),
    }
}

/// Delivers one entry; true once the destination acknowledged it.
async fn deliver(cluster: &Cluster, e: &OutboxEntry) -> bool {
    let tp = bulkhead_cluster::wire::child_traceparent(&e.traceparent);
    match (&e.dest, &e.event) {
        (Dest::Inventory { node }, OutboxEvent::CommitReservation { order_id }) => {
            match cluster
                .call::<_, InventoryReply>(
                    Capability::Inventory,
                    node,
                    &InventoryRequest::Commit { order_id: *order_id },
                    &tp,
                )
                .await
            {
                Ok(InventoryReply::CommitFailed { reason }) => {
                    tracing::error!(%order_id, %node, %reason, "reservation commit failed for a confirmed order");
                    true
                }
                Ok(_) => true,
                Err(_) => false,
            }
        }
        (Dest::Inventory { node }, OutboxEvent::ReleaseReservation { order_id }) => cluster
            .call::<_, InventoryReply>(
                Capability::Inventory,
                node,
                &InventoryRequest::Release { order_id: *order_id },
                &tp,
            )
            .await
            .is_ok(),
        (Dest::Payments, OutboxEvent::RefundPayment { order_id }) => {
            let Some(node) = cluster.owner(Capability::Payments, order_id.as_bytes()) else { return false };
            let req = PaymentRequest::Refund { order_id: *order_id };
            match cluster.call::<_, PaymentReply>(Capability::Payments, &node, &req, &tp).await {
                Ok(PaymentReply::Refunded) => {
                    tracing::warn!(%order_id, "charge refunded for a cancelled order");
                    true
                }
                Ok(_) => true,
                Err(_) => false,
            }
        }
        (Dest::Shipping | Dest::Notifications, OutboxEvent::Confirmed(ev)) => {
            let cap = if e.dest == Dest::Shipping { Capability::Shipping } else { Capability::Notifications };
            let Some(node) = cluster.owner(cap, ev.order_id.as_bytes()) else { return false };
            matches!(
                cluster.call::<_, ConsumerReply>(cap, &node, &ConsumerRequest::Deliver(ev.clone()), &tp).await,
                Ok(ConsumerReply::Accepted { .. })
            )
        }
        (dest, event) => {
            tracing::error!(dest = %dest_label(dest), ?event, "outbox entry with a mismatched destination dropped");
            true
        }
    }
}

impl RelayState {
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
                let _ = me.cast(OutboxMsg::RoundDone { delivered: vec![], ok: vec![], failed: vec![] });
                return;
            }
            let results: Vec<((Uuid, u64), OutboxEntry, bool)> = stream::iter(batch)
                .map(|(key, entry)| {
                    let cluster = cluster.clone();
                    async move {
                        let ok = deliver(&cluster, &entry).await;
                        (key, entry, ok)
                    }
                })
                .buffer_unordered(PARALLEL)
                .collect()
                .await;
            let (mut delivered, mut ok_dests, mut failed) = (Vec::new(), Vec::new(), Vec::new());
            for (key, entry, ok) in results {
                let dest = entry.dest.clone();
                if ok {
                    delivered.push((key, entry));
                    if !ok_dests.contains(&dest) {
                        ok_dests.push(dest);
                    }
                } else if !failed.contains(&dest) {
                    failed.push(dest);
                }
            }
            let _ = me.cast(OutboxMsg::RoundDone { delivered, ok: ok_dests, failed });
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
            OutboxMsg::RoundDone { delivered, ok, failed } => {
                state.in_flight = false;
                // Only what was delivered is removed: an entry rewritten meanwhile (a resumed finish)
                // stays. Not awaited: if a deletion is lost in a crash, the entry is delivered again.
                for (key, entry) in &delivered {
                    OUTBOX.remove_if_unchanged(&state.store, key, entry)?;
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
