//! The narrow ports the node's parts see it through: what membership asks ([`MembershipPort`]) and
//! what the Raft layer asks ([`crate::raft::RaftPort`]), implemented by the [`Cluster`] handle, and
//! what a gateway asks of a request's sender ([`Peers`]), answered by [`SenderRoles`]. None of
//! those parts imports `Cluster`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::capability::CapabilityId;
use crate::config::ClusterConfig;
use crate::detector::Status;
use crate::membership::{MembershipPort, NodeView, Seen};
use crate::node::Cluster;
use crate::senders::Peers;

/// What membership asks of the node ([`crate::membership::MembershipPort`]).
impl MembershipPort for Cluster {
    fn config(&self) -> &ClusterConfig {
        Cluster::config(self)
    }

    fn now_ms(&self) -> u64 {
        Cluster::now_ms(self)
    }

    fn incarnation(&self) -> u64 {
        Cluster::incarnation(self)
    }

    fn note_tick(&self) {
        Cluster::note_tick(self)
    }

    fn unhealthy_local(&self) -> Vec<CapabilityId> {
        Cluster::unhealthy_local(self)
    }

    fn connected_names(&self) -> BTreeSet<String> {
        Cluster::connected_names(self)
    }

    fn connected_advertised(&self) -> Vec<String> {
        Cluster::connected_advertised(self)
    }

    fn member_on(&self, group: &str, node: &str) -> Option<(ractor::ActorCell, Vec<u8>)> {
        Cluster::member_on(self, group, node)
    }

    fn vouches_for(&self, node: &str, binding: &[u8]) -> bool {
        Cluster::vouches_for(self, node, binding)
    }

    fn learn_addr(&self, addr: &str) {
        Cluster::learn_addr(self, addr)
    }

    fn reset_breakers(&self, node: &str) {
        Cluster::reset_breakers(self, node)
    }

    fn close_session(&self, node: &str) {
        Cluster::close_session(self, node)
    }

    fn set_view(&self, nodes: BTreeMap<String, NodeView>) {
        Cluster::set_view(self, nodes)
    }

    fn count(&self, event: Seen) {
        use std::sync::atomic::Ordering::Relaxed;
        let m = self.metrics();
        match event {
            Seen::HeartbeatRefused => m.heartbeats_refused.fetch_add(1, Relaxed),
            Seen::PeerRefused => m.refused_peers.fetch_add(1, Relaxed),
            Seen::Down => m.downs.fetch_add(1, Relaxed),
        };
    }
}

/// What the Raft layer asks of the node ([`crate::raft::port`]).
impl crate::raft::RaftPort for Cluster {
    fn name(&self) -> &str {
        Cluster::name(self)
    }

    fn timing(&self) -> &crate::config::Timing {
        &self.config().timing
    }

    fn status_of(&self, node: &str) -> Status {
        Cluster::status_of(self, node)
    }

    fn is_routable(&self, cap: CapabilityId, node: &str) -> bool {
        Cluster::is_routable(self, cap, node)
    }

    fn heard_from(&self, node: &str) -> bool {
        Cluster::heard_from(self, node)
    }

    fn started_ms(&self) -> u64 {
        self.incarnation()
    }

    fn is_draining(&self) -> bool {
        Cluster::is_draining(self)
    }

    fn raft(&self) -> &crate::raft::Registry {
        Cluster::raft(self)
    }

    fn vouches_for(&self, node: &str, binding: &[u8]) -> bool {
        Cluster::vouches_for(self, node, binding)
    }

    fn count_refused(&self) {
        self.metrics().raft_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn raft_call<'a>(
        &'a self,
        node: &'a str,
        cap: CapabilityId,
        rpc: crate::raft::RaftRpc,
        timeout: Duration,
    ) -> crate::raft::port::Reply<'a> {
        Box::pin(Cluster::raft_call(self, node, cap, rpc, timeout))
    }
}

/// A lane's frames go to the raft router on the peer, over the same link as every call.
impl crate::raft::lanes::FrameSink for Cluster {
    fn raft_frame(
        &self,
        node: &str,
        items: Vec<crate::raft::rpc::LaneItem>,
    ) -> Result<(), crate::raft::lanes::NotSent> {
        Cluster::raft_frame(self, node, items)
    }

    fn down(&self, node: &str) -> Option<String> {
        self.down_reason(node)
    }
}

/// What a gateway asks of a request's sender: the node's links for the proof, and who holds what,
/// derived once from the shard map (fixed for the life of the process), so that judging a request
/// allocates nothing.
pub struct SenderRoles {
    cluster: Cluster,
    /// Every node the map names.
    members: BTreeSet<String>,
    /// Per capability, the nodes holding a replica of some shard: a node merely listed for it
    /// (more nodes than shards × replicas) never leads a shard, so never sends its requests.
    replicas: BTreeMap<CapabilityId, BTreeSet<String>>,
}

impl Cluster {
    /// The sender check every gateway of this node uses ([`crate::senders::judge`]).
    pub fn sender_roles(&self) -> Arc<dyn Peers> {
        let map = &self.config().shard_map;
        let members = map.all_nodes().into_iter().collect();
        let replicas =
            map.0.keys().map(|cap| (*cap, map.shards(*cap).into_iter().flat_map(|p| p.replicas).collect())).collect();
        Arc::new(SenderRoles { cluster: self.clone(), members, replicas })
    }
}

impl Peers for SenderRoles {
    fn vouches_for(&self, node: &str, binding: &[u8]) -> bool {
        self.cluster.vouches_for(node, binding)
    }

    fn in_map(&self, node: &str) -> bool {
        self.members.contains(node)
    }

    fn hosts(&self, node: &str, cap: CapabilityId) -> bool {
        self.replicas.get(&cap).is_some_and(|nodes| nodes.contains(node))
    }

    fn me(&self) -> &str {
        self.cluster.name()
    }
}
