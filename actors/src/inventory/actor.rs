//! The inventory worker: serves each inventory shard where this node's replica leads it.
//! Reserve, commit, release and set become [`InventoryCommand`]s proposed to the shard's Raft
//! group (the leader puts the group's time in); reads of a SKU's stock are linearizable.
//!
//! There is no reaper: a hold ends when its order's saga commits or releases it. The saga is
//! replicated (orders is a Raft group too), so it always ends; a hold that expired on a clock
//! instead could lapse under an order that was already charged.

use std::collections::BTreeMap;
use std::sync::Arc;

use bulkhead_cluster::raft::Replica;
use bulkhead_cluster::{Capability, Cluster, Inbound};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;
use tracing::Instrument;

use super::machine::{self, InventoryCommand, InventoryMachine};
use super::protocol::{InventoryReply, InventoryRequest};
use crate::util::{local_replica, Unserved};

#[derive(RactorMessage)]
pub enum InventoryMsg {
    Request(Inbound<InventoryRequest, InventoryReply>),
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
        _: ActorRef<InventoryMsg>,
        args: InventoryArgs,
    ) -> Result<InventoryArgs, ActorProcessingErr> {
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
                let (span, _) = bulkhead_cluster::traced_span!("inventory.serve", &traceparent);
                span.in_scope(|| tracing::debug!(request = ?req, "request"));
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
                        tokio::spawn(serve(r, req, reply).instrument(span));
                    }
                    Err(e) => {
                        let _ = reply.send(unserved(e));
                    }
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
            InventoryCommand::Reserve { order_id, items, ttl_ms, now_ms: replica.now_ms() }
        }
        InventoryRequest::CommitOn { order_id, .. } => InventoryCommand::Commit { order_id },
        InventoryRequest::ReleaseOn { order_id, .. } => {
            InventoryCommand::Release { order_id, now_ms: replica.now_ms() }
        }
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
