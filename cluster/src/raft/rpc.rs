//! The Raft messages between nodes: what one group's member asks another ([`RaftRpc`]), how
//! it travels ([`RaftCall`], with its sender's proof), what may send it ([`sent_by`]), and the
//! answers. Plain data; [`super::network`] sends and receives them.

use bulkhead_codec::Record;
use openraft::error::SnapshotMismatch;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::types::{GroupId, MemberId, TypeConfig};

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

/// Raft traffic to one peer node in one message ([`super::lanes`]): requests for members there
/// and answers to its own requests, of any groups. Sent fire-and-forget to the peer's router.
#[derive(Debug, Serialize, Deserialize)]
pub struct RaftFrame {
    pub from: String,
    /// The binding of the link it goes over, as in [`RaftCall`]: checked once for the whole frame.
    pub binding: Vec<u8>,
    pub items: Vec<LaneItem>,
}
impl Record for RaftFrame {
    const VERSION: u8 = 1;
}

/// One item of a [`RaftFrame`] (remote, versioned with it; append variants at the end only).
#[derive(Debug, Serialize, Deserialize)]
pub enum LaneItem {
    /// A request, numbered by its sender: an encoded [`RaftRpc`], each on its own, so that one
    /// the receiver cannot read is answered alone and the frame's size is known before it is built.
    Request { id: u64, rpc: Vec<u8> },
    /// The answer to the receiver's request `id`.
    Answer { id: u64, reply: RaftRpcReply },
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
    use crate::capability::CapabilityId;
    use crate::raft::types::member_id;
    use openraft::Vote;

    #[test]
    fn a_node_may_vote_append_and_hand_over_only_as_itself() {
        let group = GroupId { capability: CapabilityId(2), shard: 0 };
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
        let group = GroupId { capability: CapabilityId(2), shard: 0 };
        let placed: &[String] = &["n1".to_string(), "n2".to_string(), "n3".to_string()];
        let (n1, n4) = (member_id("n1", 7), member_id("n4", 1));
        let vote = RaftRpc::Vote { group, to: n1, req: VoteRequest { vote: Vote::new(9, n4), last_log_id: None } };
        let e = sent_by(&vote, "n4", None, Some(placed)).unwrap_err();
        assert!(e.contains(&format!("no replica of {group}")), "{e}");
        assert!(sent_by(&RaftRpc::Hello { group }, "n4", None, Some(placed)).is_err());
        assert!(sent_by(&RaftRpc::Hello { group }, "n2", None, Some(placed)).is_ok());
    }
}
