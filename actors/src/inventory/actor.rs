//! Inventory as a [`Service`]: what the shared [`crate::worker::ShardWorker`] does with a request
//! on the leader of its shard. Reserve, commit, release and set become [`InventoryCommand`]s
//! proposed to the shard's Raft group (the leader puts the group's time in); reads of a SKU's
//! stock are linearizable.
//!
//! There is no reaper: a hold ends when its order's saga commits or releases it. The saga is
//! replicated (orders is a Raft group too), so it always ends; a hold that expired on a clock
//! instead could lapse under an order that was already charged.

use bulkhead_cluster::raft::Replica;
use bulkhead_cluster::Cluster;

use super::machine::{self, InventoryCommand, InventoryMachine};
use super::protocol::{InventoryReply, InventoryRequest};
use crate::capability::Capability;
use crate::util::Unserved;
use crate::worker::{Route, ServeMsg, Service, WorkerArgs};
use ractor::ActorRef;

/// Inventory as the [`crate::worker::ShardWorker`] serves it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Inventory;

impl Service for Inventory {
    type Req = InventoryRequest;
    type Resp = InventoryReply;
    type Own = std::convert::Infallible;
    type Local = ();

    fn start(&self, _: &ActorRef<ServeMsg<Self>>, _: &WorkerArgs<Self>) {}

    fn capability(&self) -> Capability {
        Capability::Inventory
    }

    fn route(&self, cluster: &Cluster, _: bool, req: &InventoryRequest) -> Route<InventoryReply> {
        let shard_of = |sku: &str| cluster.shard_of(Capability::Inventory, sku.as_bytes());
        match req {
            InventoryRequest::Reserve { items, .. } => {
                Route::Shard(shard_of(items.first().map(|i| i.sku.as_str()).unwrap_or("")))
            }
            InventoryRequest::Get { sku } | InventoryRequest::Set { sku, .. } => Route::Shard(shard_of(sku)),
            InventoryRequest::CommitOn { shard, .. }
            | InventoryRequest::ReleaseOn { shard, .. }
            | InventoryRequest::CommitManyOn { shard, .. } => Route::Shard(*shard),
            // They carry no SKU: which shard holds the reservation is the caller's to say.
            InventoryRequest::Commit { .. } | InventoryRequest::Release { .. } => {
                Route::Answer(InventoryReply::Refused("name the shard: use CommitOn / ReleaseOn".into()))
            }
            InventoryRequest::InjectPanic => Route::Drill,
        }
    }

    async fn serve(&self, replica: Replica, req: InventoryRequest, _trace: String) -> InventoryReply {
        let cmd = match req {
            InventoryRequest::Reserve { order_id, items, ttl_ms } => {
                InventoryCommand::Reserve { order_id, items, ttl_ms, now_ms: replica.now_ms() }
            }
            InventoryRequest::CommitOn { order_id, .. } => InventoryCommand::Commit { order_id },
            // All proposed at once: the group's proposer puts them in as few entries as it can.
            InventoryRequest::CommitManyOn { order_ids, .. } => {
                let commits =
                    order_ids.into_iter().map(|order_id| propose(&replica, InventoryCommand::Commit { order_id }));
                return InventoryReply::Each(futures::future::join_all(commits).await);
            }
            InventoryRequest::ReleaseOn { order_id, .. } => {
                InventoryCommand::Release { order_id, now_ms: replica.now_ms() }
            }
            InventoryRequest::Set { sku, available, price_cents } => {
                InventoryCommand::Set { sku, available, price_cents }
            }
            InventoryRequest::Get { sku } => {
                return match replica.read_barrier().await {
                    Err(e) => unserved(e),
                    Ok(()) => machine::view(replica.store(), &sku)
                        .unwrap_or_else(|e| InventoryReply::Unavailable(e.to_string())),
                };
            }
            // Routed elsewhere; never served.
            InventoryRequest::Commit { .. } | InventoryRequest::Release { .. } | InventoryRequest::InjectPanic => {
                return InventoryReply::Refused("not served by a shard".into())
            }
        };
        propose(&replica, cmd).await
    }

    fn unserved(&self, why: Unserved) -> InventoryReply {
        unserved(why)
    }

    fn drill_refused(&self) -> InventoryReply {
        InventoryReply::Refused("fault injection is disabled on this node".into())
    }
}

/// Proposes `cmd` to the shard's group: its reply once committed, or why it was not served.
async fn propose(replica: &Replica, cmd: InventoryCommand) -> InventoryReply {
    replica.propose::<InventoryMachine>(&cmd).await.unwrap_or_else(unserved)
}

fn unserved(e: impl Into<Unserved>) -> InventoryReply {
    match e.into() {
        Unserved::NotLeader(leader) => InventoryReply::NotLeader { leader },
        Unserved::Unavailable(why) => InventoryReply::Unavailable(why),
    }
}
