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
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
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
    /// The leader hands over: the member is caught up, and should call an election now (the
    /// preferred member getting its lead back, or any up-to-date one when the leader's node stops).
    TakeLead {
        group: GroupId,
        to: MemberId,
    },
}
impl Record for RaftRpc {
    const VERSION: u8 = 1;
}

/// A [`RaftRpc`] as it travels: who sends it, and the binding of the link it goes over (see
/// `Cluster::vouches_for`), so that no node can speak for another in a group, votes included.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RaftCall {
    pub from: String,
    pub binding: Vec<u8>,
    pub rpc: RaftRpc,
}
impl Record for RaftCall {
    const VERSION: u8 = 1;
}

/// Whether node `from` may send `rpc` (`leader`: the group's leader as the local replica knows
/// it; `replicas`: the nodes the shard map places the group on, `None` if it is not hosted here).
/// Only a node of the group's placement may send anything for it (a node with a valid
/// certificate and no place in the group is nobody to it); a vote's candidate and an append's or
/// a snapshot's leader must be members on `from`, and a hand-over must come from the leader.
pub fn sent_by(rpc: &RaftRpc, from: &str, leader: Option<&str>, replicas: Option<&[String]>) -> Result<(), String> {
    if let (Some(group), Some(replicas)) = (rpc.group(), replicas) {
        if !replicas.iter().any(|r| r == from) {
            return Err(format!("{from} has no replica of {group} in the shard map"));
        }
    }
    let on_from = |member: Option<MemberId>, what: &str| match member {
        Some(m) if super::types::is_member_of(m, from) => Ok(()),
        _ => Err(format!("a {what} from {from} names a member that is not on {from}")),
    };
    match rpc {
        RaftRpc::Hello { .. } => Ok(()),
        RaftRpc::Vote { req, .. } => on_from(req.vote.leader_id().voted_for(), "vote request"),
        RaftRpc::Append { req, .. } => on_from(req.vote.leader_id().voted_for(), "append"),
        RaftRpc::Snapshot { req, .. } => on_from(req.vote.leader_id().voted_for(), "snapshot"),
        RaftRpc::TakeLead { .. } => match leader {
            Some(l) if l == from => Ok(()),
            Some(l) => Err(format!("a hand-over from {from}, while {l} leads")),
            None => Err(format!("a hand-over from {from}, while no leader is known here")),
        },
    }
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
    type State = Cluster;
    type Arguments = Cluster;

    async fn pre_start(&self, myself: ActorRef<WireMsg>, cluster: Cluster) -> Result<Cluster, ActorProcessingErr> {
        ractor::pg::join(router_group(&cluster.raft().node), vec![myself.get_cell()]);
        Ok(cluster)
    }

    async fn handle(
        &self,
        _: ActorRef<WireMsg>,
        msg: WireMsg,
        cluster: &mut Cluster,
    ) -> Result<(), ActorProcessingErr> {
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
            cluster.metrics().raft_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

impl RaftRpc {
    /// The variant's name, for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            RaftRpc::Append { .. } => "append",
            RaftRpc::Vote { .. } => "vote",
            RaftRpc::Snapshot { .. } => "snapshot",
            RaftRpc::Hello { .. } => "hello",
            RaftRpc::TakeLead { .. } => "take_lead",
        }
    }

    /// The group this RPC is for.
    pub fn group(&self) -> Option<GroupId> {
        match self {
            RaftRpc::Append { group, .. }
            | RaftRpc::Vote { group, .. }
            | RaftRpc::Snapshot { group, .. }
            | RaftRpc::Hello { group }
            | RaftRpc::TakeLead { group, .. } => Some(*group),
        }
    }
}

#[cfg(test)]
mod sender_tests {
    use super::*;
    use crate::config::Capability;
    use crate::raft::types::member_id;
    use openraft::Vote;

    #[test]
    fn a_node_may_vote_append_and_hand_over_only_as_itself() {
        let group = GroupId { capability: Capability::Payments, shard: 0 };
        let (n1, n2) = (member_id("n1", 7), member_id("n2", 3));
        let placed = ["n1".to_string(), "n2".to_string(), "n3".to_string()];
        let all = Some(&placed[..]);
        let vote = |candidate| RaftRpc::Vote {
            group,
            to: n1,
            req: VoteRequest { vote: Vote::new(4, candidate), last_log_id: None },
        };
        assert!(sent_by(&vote(n2), "n2", None, all).is_ok());
        assert!(sent_by(&vote(n2), "n3", None, all).unwrap_err().contains("not on n3"), "n3 asks votes for n2");
        let append = RaftRpc::Append {
            group,
            to: n1,
            req: AppendEntriesRequest {
                vote: Vote::new_committed(4, n2),
                prev_log_id: None,
                entries: vec![],
                leader_commit: None,
            },
        };
        assert!(sent_by(&append, "n2", None, all).is_ok());
        assert!(sent_by(&append, "n1", None, all).is_err());
        let take = RaftRpc::TakeLead { group, to: n1 };
        assert!(sent_by(&take, "n2", Some("n2"), all).is_ok());
        assert!(sent_by(&take, "n3", Some("n2"), all).is_err());
        assert!(sent_by(&take, "n2", None, all).is_err(), "no leader known: nobody may hand over");
        assert!(sent_by(&RaftRpc::Hello { group }, "n3", Some("n2"), all).is_ok());
    }

    /// A node outside the group's placement can send nothing for it, not even a hello, and not a
    /// vote for a member of its own: a certificate of the cluster CA is not a place in a group.
    #[test]
    fn a_node_without_a_replica_of_the_group_is_refused_everything() {
        let group = GroupId { capability: Capability::Payments, shard: 0 };
        let placed: &[String] = &["n1".to_string(), "n2".to_string(), "n3".to_string()];
        let (n1, n4) = (member_id("n1", 7), member_id("n4", 1));
        let vote = RaftRpc::Vote { group, to: n1, req: VoteRequest { vote: Vote::new(9, n4), last_log_id: None } };
        let e = sent_by(&vote, "n4", None, Some(placed)).unwrap_err();
        assert!(e.contains("no replica of payments/0"), "{e}");
        assert!(sent_by(&RaftRpc::Hello { group }, "n4", None, Some(placed)).is_err());
        assert!(sent_by(&RaftRpc::Hello { group }, "n2", None, Some(placed)).is_ok());
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
    pub(crate) cluster: Cluster,
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
    cluster: Cluster,
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
        let beat = Duration::from_millis(self.cluster.config().timing.raft_heartbeat_ms.max(1));
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
