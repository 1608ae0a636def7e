//! Raft's RPCs over ractor_cluster: the same timed call path and versioned envelope as every
//! other cross-node call, to one remotable [`RaftRouter`] per node that hands each RPC to the
//! local replica it names. No second port, no second transport.
//!
//! Every RPC names the *member* it is for (node + incarnation). A node answers only for the
//! member it is now: a node whose store was wiped has a new incarnation, and refuses the votes
//! and entries meant for the member it used to be.

use std::time::Duration;

use bulkhead_storage::{encode, Record};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, SnapshotMismatch, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::{Deserialize, Serialize};

use super::group::Registry;
use super::types::{GroupId, MemberId, TypeConfig};
use crate::call::CallError;
use crate::node::Cluster;
use crate::wire::{open, seal, Refusal, WireMsg, WireReply};

/// A Raft RPC for one member of one group (remote, versioned; append variants at the end only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RaftRpc {
    Append {
        group: GroupId,
        to: MemberId,
        req: AppendEntriesRequest<TypeConfig>,
    },
    Vote {
        group: GroupId,
        to: MemberId,
        req: VoteRequest<MemberId>,
    },
    Snapshot {
        group: GroupId,
        to: MemberId,
        req: InstallSnapshotRequest<TypeConfig>,
    },
    /// Who are you in this group? (bootstrap, and noticing a node that came back with a new store)
    Hello {
        group: GroupId,
    },
    /// The leader hands over: the preferred member is caught up, and should call an election now.
    TakeLead {
        group: GroupId,
        to: MemberId,
    },
}
impl Record for RaftRpc {
    const VERSION: u8 = 1;
}

/// The answer to a [`RaftRpc`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpcReply {
    Append(AppendEntriesResponse<MemberId>),
    Vote(VoteResponse<MemberId>),
    Snapshot(InstallSnapshotResponse<MemberId>),
    SnapshotMismatch(SnapshotMismatch),
    Hello {
        member: MemberId,
        initialized: bool,
    },
    Done,
    /// The group is not hosted here, or the member named is not this node's current incarnation.
    NoSuchMember(String),
    /// The local replica failed to handle it (shutting down, storage failure).
    Failed(String),
}
impl Record for RaftRpcReply {
    const VERSION: u8 = 1;
}

/// The pg group of the raft router on `node`.
pub fn router_group(node: &str) -> String {
    format!("bulkhead/raft/{node}")
}

/// The one remotable actor per node that receives Raft RPCs for every local replica.
pub struct RaftRouter;

impl Actor for RaftRouter {
    type Msg = WireMsg;
    type State = Registry;
    type Arguments = Registry;

    async fn pre_start(&self, myself: ActorRef<WireMsg>, registry: Registry) -> Result<Registry, ActorProcessingErr> {
        ractor::pg::join(router_group(&registry.node), vec![myself.get_cell()]);
        Ok(registry)
    }

    async fn handle(
        &self,
        _: ActorRef<WireMsg>,
        msg: WireMsg,
        registry: &mut Registry,
    ) -> Result<(), ActorProcessingErr> {
        let WireMsg::Ask(bytes, port) = msg else { return Ok(()) };
        let (env, rpc) = match open::<RaftRpc>(&bytes, "raft rpc") {
            Ok(x) => x,
            Err(e) => {
                let _ = port.send(seal(
                    &WireReply::Refused { kind: Refusal::Rejected, reason: format!("undecodable raft rpc: {e}") },
                    "",
                ));
                return Ok(());
            }
        };
        // Each RPC on its own task: an append waits for the group commit, a vote for its fsync,
        // and the router must not make one group wait behind another.
        let registry = registry.clone();
        tokio::spawn(async move {
            let reply = dispatch(&registry, rpc).await;
            let _ = port.send(seal(&WireReply::Ok(encode(&reply)), &env.traceparent));
        });
        Ok(())
    }
}

async fn dispatch(registry: &Registry, rpc: RaftRpc) -> RaftRpcReply {
    let failed = |e: &dyn std::fmt::Display| RaftRpcReply::Failed(e.to_string());
    match rpc {
        RaftRpc::Hello { group } => match registry.get(group) {
            Some(r) => RaftRpcReply::Hello { member: r.member, initialized: r.is_initialized() },
            None => RaftRpcReply::NoSuchMember(format!("group {group} is not hosted on {}", registry.node)),
        },
        RaftRpc::Append { group, to, req } => match registry.member(group, to) {
            Ok(r) => r.raft.append_entries(req).await.map_or_else(|e| failed(&e), RaftRpcReply::Append),
            Err(why) => RaftRpcReply::NoSuchMember(why),
        },
        RaftRpc::Vote { group, to, req } => match registry.member(group, to) {
            Ok(r) => r.raft.vote(req).await.map_or_else(|e| failed(&e), RaftRpcReply::Vote),
            Err(why) => RaftRpcReply::NoSuchMember(why),
        },
        RaftRpc::Snapshot { group, to, req } => match registry.member(group, to) {
            Ok(r) => match r.raft.install_snapshot(req).await {
                Ok(resp) => RaftRpcReply::Snapshot(resp),
                Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m))) => {
                    RaftRpcReply::SnapshotMismatch(m)
                }
                Err(e) => failed(&e),
            },
            Err(why) => RaftRpcReply::NoSuchMember(why),
        },
        RaftRpc::TakeLead { group, to } => match registry.member(group, to) {
            Ok(r) => {
                tracing::info!(%group, "the leader hands over: calling an election");
                r.raft.trigger().elect().await.map_or_else(|e| failed(&e), |_| RaftRpcReply::Done)
            }
            Err(why) => RaftRpcReply::NoSuchMember(why),
        },
    }
}

/// Makes one [`Peer`] per (group, target member) for openraft.
pub struct Network {
    pub(crate) cluster: Cluster,
    pub(crate) group: GroupId,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: MemberId, node: &BasicNode) -> Peer {
        Peer { cluster: self.cluster.clone(), group: self.group, target, node: node.addr.clone() }
    }
}

/// Sends one group's RPCs to one member.
pub struct Peer {
    cluster: Cluster,
    group: GroupId,
    target: MemberId,
    /// The member's node name (`BasicNode::addr`).
    node: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

type RpcErr<E = openraft::error::Infallible> = RPCError<MemberId, BasicNode, RaftError<MemberId, E>>;

impl Peer {
    async fn send<E: std::error::Error>(&self, rpc: RaftRpc, ttl: Duration) -> Result<RaftRpcReply, RpcErr<E>> {
        match self.cluster.raft_call(&self.node, self.group.capability, &rpc, ttl).await {
            Ok(RaftRpcReply::NoSuchMember(why)) => Err(RPCError::Unreachable(Unreachable::new(&Refused(why)))),
            Ok(RaftRpcReply::Failed(why)) => Err(RPCError::Network(NetworkError::new(&Refused(why)))),
            Ok(reply) => Ok(reply),
            // Nothing was delivered: back off (a down node, or no router there yet).
            Err(e @ CallError::Unreachable { .. }) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            // It may have been delivered: try again soon.
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn unexpected<E: std::error::Error>(reply: &RaftRpcReply) -> RpcErr<E> {
        RPCError::Network(NetworkError::new(&Refused(format!("unexpected raft reply {reply:?}"))))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<MemberId>, RpcErr> {
        let rpc = RaftRpc::Append { group: self.group, to: self.target, req };
        match self.send(rpc, option.hard_ttl()).await? {
            RaftRpcReply::Append(resp) => Ok(resp),
            other => Err(Self::unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<MemberId>, RpcErr<InstallSnapshotError>> {
        let rpc = RaftRpc::Snapshot { group: self.group, to: self.target, req };
        match self.send(rpc, option.hard_ttl()).await? {
            RaftRpcReply::Snapshot(resp) => Ok(resp),
            RaftRpcReply::SnapshotMismatch(m) => Err(RPCError::RemoteError(RemoteError::new(
                self.target,
                RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m)),
            ))),
            other => Err(Self::unexpected(&other)),
        }
    }

    async fn vote(&mut self, req: VoteRequest<MemberId>, option: RPCOption) -> Result<VoteResponse<MemberId>, RpcErr> {
        let rpc = RaftRpc::Vote { group: self.group, to: self.target, req };
        match self.send(rpc, option.hard_ttl()).await? {
            RaftRpcReply::Vote(resp) => Ok(resp),
            other => Err(Self::unexpected(&other)),
        }
    }
}
