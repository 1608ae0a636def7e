//! Raft's RPCs over ractor_cluster: the same timed call path and versioned envelope as every
//! other cross-node call, to one remotable [`RaftRouter`] per node that hands each RPC to the
//! local replica it names. No second port, no second transport.
//!
//! Every RPC names the *member* it is for (node + incarnation). A node answers only for the
//! member it is now: a node whose store was wiped has a new incarnation, and refuses the votes
//! and entries meant for the member it used to be.

use std::time::Duration;

use bulkhead_codec::encode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::port::Port;
use super::replica::Registry;
pub use super::rpc::{router_group, sent_by, RaftCall, RaftRpc, RaftRpcReply};
use super::types::{GroupId, MemberId, TypeConfig};
use crate::call::CallError;
use crate::wire::{open, seal, Refusal, WireMsg, WireReply};

/// The one remotable actor per node that receives Raft RPCs for every local replica.
pub struct RaftRouter;

impl Actor for RaftRouter {
    type Msg = WireMsg;
    type State = Port;
    type Arguments = Port;

    async fn pre_start(&self, myself: ActorRef<WireMsg>, cluster: Port) -> Result<Port, ActorProcessingErr> {
        ractor::pg::join(router_group(&cluster.raft().node), vec![myself.get_cell()]);
        Ok(cluster)
    }

    async fn handle(&self, _: ActorRef<WireMsg>, msg: WireMsg, cluster: &mut Port) -> Result<(), ActorProcessingErr> {
        let WireMsg::Ask(bytes, port) = msg else { return Ok(()) };
        let refuse = |reason: String| seal(&WireReply::Refused { kind: Refusal::Rejected, reason }, "");
        let (env, call) = match open::<RaftCall>(&bytes, "raft rpc") {
            Ok(x) => x,
            Err(e) => {
                let _ = port.send(refuse(format!("undecodable raft rpc: {e}")));
                return Ok(());
            }
        };
        let local = call.rpc.group().and_then(|g| cluster.raft().get(g));
        let leader = local.as_ref().and_then(|r| r.leader());
        let replicas = local.as_ref().map(|r| r.placement.replicas.as_slice());
        let proved = if cluster.vouches_for(&call.from, &call.binding) {
            sent_by(&call.rpc, &call.from, leader.as_deref(), replicas)
        } else {
            Err(format!("a raft rpc that names {} did not come over a link of {}", call.from, call.from))
        };
        if let Err(why) = proved {
            cluster.count_refused();
            tracing::warn!(from = %call.from, "raft rpc refused: {why}");
            let _ = port.send(refuse(why));
            return Ok(());
        }
        if matches!(call.rpc, RaftRpc::TakeLead { .. }) && cluster.is_draining() {
            // A node on its way out must not take a leadership it would have to hand away again.
            let reply = RaftRpcReply::Failed("this node is stopping: it takes no leadership".into());
            let _ = port.send(seal(&WireReply::Ok(encode(&reply)), &env.traceparent));
            return Ok(());
        }
        let rpc = call.rpc;
        // Each RPC on its own task: an append waits for the group commit, a vote for its fsync,
        // and the router must not make one group wait behind another.
        let registry = cluster.raft().clone();
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
            Ok(r) => {
                let started = std::time::Instant::now();
                let reply = r.raft.append_entries(req).await.map_or_else(|e| failed(&e), RaftRpcReply::Append);
                // The follower's share of an append's round trip: its core, its log write and fsync.
                metrics::histogram!("bulkhead_raft_append_serve_seconds").record(started.elapsed().as_secs_f64());
                reply
            }
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
    pub(crate) cluster: Port,
    pub(crate) group: GroupId,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: MemberId, node: &BasicNode) -> Peer {
        Peer {
            cluster: self.cluster.clone(),
            group: self.group,
            target,
            node: node.addr.clone(),
            refused_by_node: false,
        }
    }
}

/// Sends one group's RPCs to one member.
pub struct Peer {
    cluster: Port,
    group: GroupId,
    target: MemberId,
    /// The member's node name (`BasicNode::addr`).
    node: String,
    /// The node answered that it has no such member (a replaced incarnation): retrying soon would
    /// only send it the same entries again.
    refused_by_node: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

type RpcErr<E = openraft::error::Infallible> = RPCError<MemberId, BasicNode, RaftError<MemberId, E>>;

impl Peer {
    async fn send<E: std::error::Error>(&mut self, rpc: RaftRpc, ttl: Duration) -> Result<RaftRpcReply, RpcErr<E>> {
        let kind = rpc.kind();
        let started = std::time::Instant::now();
        let result = self.cluster.raft_call(&self.node, self.group.capability, rpc, ttl).await;
        // The round trip of one Raft RPC (the peer's append and fdatasync included, for appends).
        metrics::histogram!("bulkhead_raft_rpc_duration_seconds", "rpc" => kind, "ok" => if result.is_ok() { "true" } else { "false" })
            .record(started.elapsed().as_secs_f64());
        self.refused_by_node = matches!(result, Ok(RaftRpcReply::NoSuchMember(_)));
        match result {
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

    /// How long the leader waits before it tries an unreachable member again: 25 ms, 50 ms, then
    /// one heartbeat interval each time. openraft's default is a flat 500 ms, so a node that came
    /// back (a restart, a healed link) went unfed, and not ready, for up to half a second. A try
    /// at a node that is still away costs nothing on the wire (the call is refused here, before
    /// sending). A node that answered it has no such member (a replaced incarnation) keeps
    /// openraft's 500 ms: each try would carry the same entries to it again.
    fn backoff(&self) -> Backoff {
        if self.refused_by_node {
            return Backoff::new(std::iter::repeat(Duration::from_millis(500)));
        }
        let beat = Duration::from_millis(self.cluster.timing().raft_heartbeat_ms.max(1));
        let first = [Duration::from_millis(25), Duration::from_millis(50)].map(|d| d.min(beat));
        Backoff::new(first.into_iter().chain(std::iter::repeat(beat)))
    }

    async fn vote(&mut self, req: VoteRequest<MemberId>, option: RPCOption) -> Result<VoteResponse<MemberId>, RpcErr> {
        let rpc = RaftRpc::Vote { group: self.group, to: self.target, req };
        match self.send(rpc, option.hard_ttl()).await? {
            RaftRpcReply::Vote(resp) => Ok(resp),
            other => Err(Self::unexpected(&other)),
        }
    }
}
