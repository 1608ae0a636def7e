//! The inventory worker: serves each inventory shard where this node's replica leads it.
//! Reserve, commit, release and set become [`InventoryCommand`]s proposed to the shard's Raft
//! group (the leader puts the time in); reads of a SKU's stock are linearizable. The leader's
//! reaper proposes the release of holds whose TTL has passed, read from the expiry index.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_cluster::raft::Replica;
use bulkhead_cluster::{Capability, Cluster, Inbound};
use bulkhead_storage::now_ms;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;

use super::machine::{self, InventoryCommand, InventoryMachine};
use super::protocol::{InventoryReply, InventoryRequest};
use crate::util::{local_replica, Unserved};

/// Most holds one reaper round releases per shard (one proposal).
const REAP_BATCH: usize = 512;

#[derive(RactorMessage)]
pub enum InventoryMsg {
    Request(Inbound<InventoryRequest, InventoryReply>),
    Reap,
}

/// What the inventory worker is started with: this node's replicas, by shard.
#[derive(Clone)]
pub struct InventoryArgs {
    pub cluster: Cluster,
    pub replicas: Arc<BTreeMap<u32, Replica>>,
    pub fault_injection: bool,
}

pub struct InventoryWorker;

impl Actor for InventoryWorker {
    type Msg = InventoryMsg;
    type State = InventoryArgs;
    type Arguments = InventoryArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<InventoryMsg>,
        args: InventoryArgs,
    ) -> Result<InventoryArgs, ActorProcessingErr> {
        myself.send_interval(Duration::from_secs(1), || InventoryMsg::Reap);
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<InventoryMsg>,
        msg: InventoryMsg,
        st: &mut InventoryArgs,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            InventoryMsg::Request(Inbound { req, reply, traceparent }) => {
                tracing::debug!(trace = bulkhead_cluster::wire::trace_id(&traceparent), request = ?req, "request");
                let shard_of = |sku: &str| st.cluster.shard_of(Capability::Inventory, sku.as_bytes());
                let shard = match &req {
                    InventoryRequest::Reserve { items, .. } => {
                        shard_of(items.first().map(|i| i.sku.as_str()).unwrap_or(""))
                    }
                    InventoryRequest::Get { sku } | InventoryRequest::Set { sku, .. } => shard_of(sku),
                    InventoryRequest::CommitOn { shard, .. } | InventoryRequest::ReleaseOn { shard, .. } => *shard,
                    InventoryRequest::Commit { .. } | InventoryRequest::Release { .. } => {
                        // They carry no SKU: which shard holds the reservation is the caller's to say.
                        let _ = reply.send(InventoryReply::Refused("name the shard: use CommitOn / ReleaseOn".into()));
                        return Ok(());
                    }
                    InventoryRequest::InjectPanic => {
                        if st.fault_injection {
                            panic!("fault injection: inventory worker panics on request");
                        }
                        let _ = reply.send(InventoryReply::Refused("fault injection is disabled on this node".into()));
                        return Ok(());
                    }
                };
                let replica = local_replica(&st.cluster, &st.replicas, Capability::Inventory, shard);
                match replica {
                    Ok(r) => {
                        tokio::spawn(serve(r, req, reply));
                    }
                    Err(e) => {
                        let _ = reply.send(unserved(e));
                    }
                }
            }
            InventoryMsg::Reap => {
                for r in st.replicas.values().filter(|r| r.is_leader()).cloned() {
                    tokio::spawn(reap(r));
                }
            }
        }
        Ok(())
    }
}

fn unserved(e: impl Into<Unserved>) -> InventoryReply {
    match e.into() {
        Unserved::NotLeader(leader) => InventoryReply::NotLeader { leader },
        Unserved::Unavailable(why) => InventoryReply::Unavailable(why),
    }
}

async fn serve(replica: Replica, req: InventoryRequest, reply: RpcReplyPort<InventoryReply>) {
    let cmd = match req {
        InventoryRequest::Reserve { order_id, items, ttl_ms } => {
            InventoryCommand::Reserve { order_id, items, ttl_ms, now_ms: now_ms() }
        }
        InventoryRequest::CommitOn { order_id, .. } => InventoryCommand::Commit { order_id },
        InventoryRequest::ReleaseOn { order_id, .. } => InventoryCommand::Release { order_id, now_ms: now_ms() },
        InventoryRequest::Set { sku, available, price_cents } => InventoryCommand::Set { sku, available, price_cents },
        InventoryRequest::Get { sku } => {
            let answer = match replica.read_barrier().await {
                Err(e) => unserved(e),
                Ok(()) => {
                    machine::view(replica.store(), &sku).unwrap_or_else(|e| InventoryReply::Unavailable(e.to_string()))
                }
            };
            let _ = reply.send(answer);
            return;
        }
        InventoryRequest::Commit { .. } | InventoryRequest::Release { .. } | InventoryRequest::InjectPanic => return,
    };
    let _ = reply.send(replica.propose::<InventoryMachine>(&cmd).await.unwrap_or_else(unserved));
}

/// One reaper round on a leader: release the holds the expiry index says have lapsed.
async fn reap(replica: Replica) {
    let now = now_ms();
    match machine::expired(replica.store(), now, REAP_BATCH) {
        Ok(order_ids) if !order_ids.is_empty() => {
            if let Err(e) =
                replica.propose::<InventoryMachine>(&InventoryCommand::Expire { order_ids, now_ms: now }).await
            {
                tracing::debug!(group = %replica.id, error = %e, "reaper round not applied; the next one retries");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(group = %replica.id, error = %e, "reading the expiry index failed"),
    }
}
