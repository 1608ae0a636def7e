//! Who may send a capability's requests, judged by the gateway before anything is decoded further.
//!
//! The identity gate already keeps out a node the shard map does not name, and the Raft router
//! takes a group's RPCs only from its members. This is the same rule for the capabilities'
//! requests: a request only a capability's leaders send (a saga's step, say) comes from a node that
//! hosts that capability, never from a node that merely holds a certificate. A request names its sender ([`Sender`], in the
//! envelope); the receiver believes the name only when the channel binding the request carries is
//! that of one of its own links to that node (the same proof a heartbeat and a Raft RPC carry:
//! ractor_cluster does not say which link a message came over). Then the request's [`Role`] says
//! whether that node may send it.
//!
//! Caveat: a node that hosts a capability may still send any request of that role it likes; the check
//! bounds a compromised node by its role, not by its intent.

use serde::{Deserialize, Serialize};

use crate::capability::CapabilityId;

/// The node a request names as its sender, and the channel binding of the link it was sent over
/// (empty without TLS; a process-local secret for a call to this node's own gateway).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    pub node: String,
    pub binding: Vec<u8>,
}

/// Which nodes may send a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Any node of the shard map: the HTTP front, which runs on every node (reads, admin calls).
    AnyMember,
    /// Only a node that hosts a replica of this capability: its leader's saga or outbox sends it.
    Hosts(CapabilityId),
    /// Only this node itself (a drill its own front sends to its own worker).
    Itself,
}

impl Role {
    /// Only a node that hosts a replica of `cap`.
    pub fn hosts(cap: impl Into<CapabilityId>) -> Role {
        Role::Hosts(cap.into())
    }
}

/// A capability's request type says who may send each of its requests.
pub trait SentBy {
    fn sent_by(&self) -> Role;
}

/// What the receiving node knows of a sender (`Cluster::sender_roles` answers from its links and its
/// shard map).
pub trait Peers: Send + Sync {
    /// Whether `binding` is that of a link of this node with `node` (or this node's own secret).
    fn vouches_for(&self, node: &str, binding: &[u8]) -> bool;
    /// Whether the shard map names `node` at all.
    fn in_map(&self, node: &str) -> bool;
    /// Whether the shard map places a replica of `cap` on `node`.
    fn hosts(&self, node: &str, cap: CapabilityId) -> bool;
    /// This node's name.
    fn me(&self) -> &str;
}

/// Why a request's sender was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unvouched {
    #[error("the request names no sender (sent by a build before 7 Dec 2026: every node must run this build)")]
    Anonymous,
    #[error("the request names {node} as its sender but did not come over a link with {node}")]
    NotOverItsLink { node: String },
    #[error("{node} has no place in the shard map")]
    Stranger { node: String },
    #[error("{node} hosts no {needs} replica, and only those send this request")]
    WrongRole { node: String, needs: CapabilityId },
    #[error("only this node sends itself this request, not {node}")]
    NotItself { node: String },
}

impl Unvouched {
    /// The `reason` label of `bulkhead_cluster_requests_refused_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Unvouched::Anonymous => "anonymous",
            Unvouched::NotOverItsLink { .. } => "not_vouched",
            Unvouched::Stranger { .. } => "stranger",
            Unvouched::WrongRole { .. } | Unvouched::NotItself { .. } => "role",
        }
    }
}

/// Whether `sender` may send a request of `role`.
pub fn judge(sender: Option<&Sender>, role: Role, peers: &dyn Peers) -> Result<(), Unvouched> {
    let Some(Sender { node, binding }) = sender else { return Err(Unvouched::Anonymous) };
    if !peers.vouches_for(node, binding) {
        return Err(Unvouched::NotOverItsLink { node: node.clone() });
    }
    if !peers.in_map(node) {
        return Err(Unvouched::Stranger { node: node.clone() });
    }
    match role {
        Role::AnyMember => Ok(()),
        Role::Hosts(cap) if peers.hosts(node, cap) => Ok(()),
        Role::Hosts(needs) => Err(Unvouched::WrongRole { node: node.clone(), needs }),
        Role::Itself if node == peers.me() => Ok(()),
        Role::Itself => Err(Unvouched::NotItself { node: node.clone() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SENDER: CapabilityId = CapabilityId(0);
    const OTHER: CapabilityId = CapabilityId(2);

    /// n1 and n2 host SENDER; n3 hosts OTHER only; each is reached over a link whose binding
    /// is its name's last byte. n9 has a link but no place in the map.
    struct Three;
    impl Peers for Three {
        fn vouches_for(&self, node: &str, binding: &[u8]) -> bool {
            node.as_bytes().last().is_some_and(|b| binding == [*b])
        }
        fn in_map(&self, node: &str) -> bool {
            ["n1", "n2", "n3"].contains(&node)
        }
        fn hosts(&self, node: &str, cap: CapabilityId) -> bool {
            match cap {
                SENDER => ["n1", "n2"].contains(&node),
                OTHER => node == "n3",
                _ => false,
            }
        }
        fn me(&self) -> &str {
            "n3"
        }
    }

    fn from(node: &str, binding: &[u8]) -> Option<Sender> {
        Some(Sender { node: node.into(), binding: binding.to_vec() })
    }

    #[test]
    fn a_request_passes_only_from_a_vouched_member_of_its_role() {
        let senders = Role::Hosts(SENDER);
        assert_eq!(judge(from("n1", b"1").as_ref(), senders, &Three), Ok(()));
        assert_eq!(judge(from("n3", b"3").as_ref(), Role::AnyMember, &Three), Ok(()));
        assert_eq!(
            judge(from("n3", b"3").as_ref(), senders, &Three),
            Err(Unvouched::WrongRole { node: "n3".into(), needs: SENDER }),
            "a host of another capability cannot send it"
        );
        assert_eq!(judge(None, Role::AnyMember, &Three), Err(Unvouched::Anonymous));
        // A drill only from the node itself (this one is n3).
        assert_eq!(judge(from("n3", b"3").as_ref(), Role::Itself, &Three), Ok(()));
        assert_eq!(
            judge(from("n1", b"1").as_ref(), Role::Itself, &Three),
            Err(Unvouched::NotItself { node: "n1".into() })
        );
    }

    #[test]
    fn a_sender_that_names_another_node_or_none_in_the_map_is_refused() {
        // n3 claims to be n1, but its request carries n3's binding (the only one it knows).
        let forged = judge(from("n1", b"3").as_ref(), Role::AnyMember, &Three);
        assert_eq!(forged, Err(Unvouched::NotOverItsLink { node: "n1".into() }));
        assert_eq!(forged.unwrap_err().label(), "not_vouched");
        let stranger = judge(from("n9", b"9").as_ref(), Role::AnyMember, &Three);
        assert_eq!(stranger, Err(Unvouched::Stranger { node: "n9".into() }));
    }
}
