//! Membership: heartbeats between all nodes, the failure detector, and the cluster view.
//!
//! Every node runs one `Membership` actor in the process group `bulkhead/membership`. Each tick it
//! sends a [`Heartbeat`] to every remote member, feeds what arrives into the pure [`Detector`], and
//! acts on its transitions: a node going `down` has its session force-closed, so calls to it fail
//! fast instead of queueing into a dead link (ractor_cluster has no deadline of its own). Heartbeats
//! also carry each node's addresses, pid, capabilities and health, which is what `GET /v1/cluster`
//! shows, and the shard-map and timing fingerprints: a peer whose map or `[timing]` differs is refused (never routed to).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use bulkhead_codec::{decode_either, decode_payload, unknown_version, CodecError, Record};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorClusterMessage;
use serde::{Deserialize, Serialize};

use crate::capability::CapabilityId;
use crate::config::ClusterConfig;
use crate::detector::{Detector, Status, Transition};
use crate::wire::{new_traceparent, open, seal};

pub const MEMBERSHIP_GROUP: &str = "bulkhead/membership";

/// Membership's message type; remotable because peers send heartbeats to it.
#[derive(RactorClusterMessage)]
pub enum MembershipMsg {
    /// An encoded envelope holding a [`Heartbeat`].
    Heartbeat(Vec<u8>),
    /// Time to look again (sent by the local timer and by session events; the value is unused).
    Tick(u64),
}

/// What each node tells every other node, every heartbeat interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub name: String,
    pub cluster_addr: String,
    pub http_addr: String,
    pub pid: u32,
    /// Start time of the process (ms since epoch): tells a restarted node from a returning one.
    pub incarnation: u64,
    pub seq: u64,
    pub capabilities: Vec<CapabilityId>,
    /// Capabilities that are hosted here but not ready (starting, or escalated after a crash loop).
    pub unhealthy: Vec<CapabilityId>,
    pub shard_fingerprint: u64,
    /// A digest of the node's `[timing]`: nodes whose failure detector, Raft timeouts or
    /// snapshot policy differ would disagree about who is down and when to call an election.
    pub timing_fingerprint: u64,
    /// Cluster addresses of the nodes this node is connected to: how the mesh spreads.
    pub peers: Vec<String>,
    /// The TLS channel binding of the link this heartbeat is sent over (empty without TLS): proof
    /// that the sender is the node at the other end of a link whose certificate names `name`.
    pub binding: Vec<u8>,
}

/// Versions: 1; 2 added `down` (2bc4c0a), then `owes` under the same number (320935c); 3 dropped
/// both (the witness protocol went, ca16541), then added `timing_fingerprint` under the same number
/// (2ae3196); 4 added `binding` (mutual TLS, 57db09b). Every layout decodes (see
/// `tests/fixtures/records.txt`); what an old one lacked takes a value that the receiver's own
/// checks then refuse where it matters: no timing fingerprint reads as 0 (a timing mismatch), no
/// binding as empty (not vouched for over TLS). Decoding is not trusting.
impl Record for Heartbeat {
    const VERSION: u8 = 4;

    fn upgrade(version: u8, payload: &[u8]) -> Result<Self, CodecError> {
        use old_heartbeat::*;
        match version {
            // Version 3's first layout is version 1's.
            1 => decode_payload::<V1>(payload).map(Into::into),
            2 => decode_either::<Self, V2b, V2a>(payload),
            3 => decode_either::<Self, V3b, V1>(payload),
            4 => decode_payload(payload),
            v => Err(unknown_version::<Self>(v)),
        }
    }
}

/// The layouts [`Heartbeat`] had before version 4, field for field as they were sent.
pub(crate) mod old_heartbeat {
    use serde::{Deserialize, Serialize};

    use super::Heartbeat;
    use crate::capability::CapabilityId;

    /// Version 1 (2c05dbb), and version 3 until 2ae3196.
    #[derive(Debug, Serialize, Deserialize)]
    pub struct V1 {
        pub name: String,
        pub cluster_addr: String,
        pub http_addr: String,
        pub pid: u32,
        pub incarnation: u64,
        pub seq: u64,
        pub capabilities: Vec<CapabilityId>,
        pub unhealthy: Vec<CapabilityId>,
        pub shard_fingerprint: u64,
        pub peers: Vec<String>,
    }

    /// Version 2 as 2bc4c0a sent it: each node's down list (the witness protocol's votes).
    #[derive(Debug, Serialize, Deserialize)]
    pub struct V2a {
        pub name: String,
        pub cluster_addr: String,
        pub http_addr: String,
        pub pid: u32,
        pub incarnation: u64,
        pub seq: u64,
        pub capabilities: Vec<CapabilityId>,
        pub unhealthy: Vec<CapabilityId>,
        pub shard_fingerprint: u64,
        pub peers: Vec<String>,
        pub down: Vec<String>,
    }

    /// Version 2 from 320935c: and whom the node owed a hand-off of keys.
    #[derive(Debug, Serialize, Deserialize)]
    pub struct V2b {
        pub name: String,
        pub cluster_addr: String,
        pub http_addr: String,
        pub pid: u32,
        pub incarnation: u64,
        pub seq: u64,
        pub capabilities: Vec<CapabilityId>,
        pub unhealthy: Vec<CapabilityId>,
        pub shard_fingerprint: u64,
        pub peers: Vec<String>,
        pub down: Vec<String>,
        pub owes: Vec<String>,
    }

    /// Version 3 from 2ae3196: the timing fingerprint, before `peers`.
    #[derive(Debug, Serialize, Deserialize)]
    pub struct V3b {
        pub name: String,
        pub cluster_addr: String,
        pub http_addr: String,
        pub pid: u32,
        pub incarnation: u64,
        pub seq: u64,
        pub capabilities: Vec<CapabilityId>,
        pub unhealthy: Vec<CapabilityId>,
        pub shard_fingerprint: u64,
        pub timing_fingerprint: u64,
        pub peers: Vec<String>,
    }

    impl From<V3b> for Heartbeat {
        fn from(o: V3b) -> Heartbeat {
            Heartbeat {
                name: o.name,
                cluster_addr: o.cluster_addr,
                http_addr: o.http_addr,
                pid: o.pid,
                incarnation: o.incarnation,
                seq: o.seq,
                capabilities: o.capabilities,
                unhealthy: o.unhealthy,
                shard_fingerprint: o.shard_fingerprint,
                timing_fingerprint: o.timing_fingerprint,
                peers: o.peers,
                binding: Vec::new(),
            }
        }
    }

    /// The layouts before the timing fingerprint: it reads as 0 (in practice no real `[timing]`'s
    /// digest), so the receiver refuses the sender as having a different `[timing]` (it never checked).
    /// `down` and `owes` meant something only to the witness protocol, which is gone.
    macro_rules! without_timing {
        ($($old:ty),*) => {$(
            impl From<$old> for Heartbeat {
                fn from(o: $old) -> Heartbeat {
                    V3b {
                        name: o.name,
                        cluster_addr: o.cluster_addr,
                        http_addr: o.http_addr,
                        pid: o.pid,
                        incarnation: o.incarnation,
                        seq: o.seq,
                        capabilities: o.capabilities,
                        unhealthy: o.unhealthy,
                        shard_fingerprint: o.shard_fingerprint,
                        timing_fingerprint: 0,
                        peers: o.peers,
                    }
                    .into()
                }
            }
        )*};
    }
    without_timing!(V1, V2a, V2b);
}

/// What membership asks of its node, and nothing more ([`crate::Cluster`] answers it): the config,
/// the clock, the sessions and links (to send heartbeats over and to believe them), and where the
/// verdicts go.
pub trait MembershipPort: Send + Sync + 'static {
    fn config(&self) -> &ClusterConfig;
    fn now_ms(&self) -> u64;
    /// This process's start, ms since the epoch (a peer tells a restart by it).
    fn incarnation(&self) -> u64;
    /// The detector's tick ran (for `/readyz`: a stalled membership is a sick node).
    fn note_tick(&self);
    /// The capabilities this node hosts but cannot serve now.
    fn unhealthy_local(&self) -> Vec<CapabilityId>;
    /// Peers this node has a session with.
    fn connected_names(&self) -> BTreeSet<String>;
    /// The advertised cluster addresses of those peers (what heartbeats gossip).
    fn connected_advertised(&self) -> Vec<String>;
    /// The member of process group `group` on `node`, and the binding of the link to it.
    fn member_on(&self, group: &str, node: &str) -> Option<(ractor::ActorCell, Vec<u8>)>;
    /// Whether a heartbeat that names `node` and carries `binding` came over a link of `node`.
    fn vouches_for(&self, node: &str, binding: &[u8]) -> bool;
    /// A peer address heard of: the dialer keeps dialling it.
    fn learn_addr(&self, addr: &str);
    /// A peer came back from down: its breakers start from a clean slate.
    fn reset_breakers(&self, node: &str);
    /// A peer is down: its session goes, so pending calls fail at once.
    fn close_session(&self, node: &str);
    /// The view, where the HTTP layer and the call path read it.
    fn set_view(&self, nodes: BTreeMap<String, NodeView>);
    /// Counts what membership saw.
    fn count(&self, event: Seen);
}

/// What membership counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// A heartbeat that did not come over a link of the node it names.
    HeartbeatRefused,
    /// A peer refused for another shard map or `[timing]`.
    PeerRefused,
    /// A peer declared down.
    Down,
}

pub struct Membership;

pub struct MembershipState {
    cluster: Arc<dyn MembershipPort>,
    detector: Detector,
    seq: u64,
    last_sent: u64,
    last: BTreeMap<String, Heartbeat>,
    /// Peers whose heartbeats are refused, and why.
    refused: BTreeMap<String, Disagreement>,
}

impl Actor for Membership {
    type Msg = MembershipMsg;
    type State = MembershipState;
    type Arguments = Arc<dyn MembershipPort>;

    async fn pre_start(
        &self,
        myself: ActorRef<MembershipMsg>,
        cluster: Arc<dyn MembershipPort>,
    ) -> Result<MembershipState, ActorProcessingErr> {
        ractor::pg::join(MEMBERSHIP_GROUP.to_string(), vec![myself.get_cell()]);
        let t = cluster.config().timing.clone();
        // Tick at least 4x per heartbeat so detection lags the deadline by little.
        let every = std::time::Duration::from_millis((t.heartbeat_ms / 4).max(10));
        myself.send_interval(every, || MembershipMsg::Tick(0));
        let state = MembershipState {
            detector: Detector::new(t.suspect_after_ms, t.down_after_ms),
            cluster,
            seq: 0,
            last_sent: 0,
            last: BTreeMap::new(),
            refused: BTreeMap::new(),
        };
        state.publish();
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<MembershipMsg>,
        msg: MembershipMsg,
        state: &mut MembershipState,
    ) -> Result<(), ActorProcessingErr> {
        let now = state.cluster.now_ms();
        match msg {
            MembershipMsg::Tick(_) => state.tick(now),
            MembershipMsg::Heartbeat(bytes) => {
                if let Ok((_, hb)) = open::<Heartbeat>(&bytes, "heartbeat") {
                    state.on_heartbeat(hb, now);
                }
            }
        }
        Ok(())
    }
}

impl MembershipState {
    fn tick(&mut self, now: u64) {
        self.cluster.note_tick();
        let hb_ms = self.cluster.config().timing.heartbeat_ms;
        if now.saturating_sub(self.last_sent) >= hb_ms {
            self.last_sent = now;
            self.send_heartbeats();
        }
        // A closed session is a definite answer: the peer is down now, not in a second.
        let connected = self.cluster.connected_names();
        let mut changes = Vec::new();
        for (name, _) in self.last.iter() {
            if !connected.contains(name) && self.detector.status(name) != Some(Status::Down) {
                changes.extend(self.detector.session_lost(name, now));
            }
        }
        changes.extend(self.detector.tick(now));
        let changed = !changes.is_empty();
        for t in changes {
            self.apply(t);
        }
        if changed || self.seq.is_multiple_of(10) {
            self.publish();
        }
    }

    fn send_heartbeats(&mut self) {
        self.seq += 1;
        let c = &*self.cluster;
        let cfg = c.config();
        let hb = Heartbeat {
            name: cfg.name.clone(),
            cluster_addr: cfg.advertised_cluster_addr(),
            http_addr: cfg.http_advertise.clone(),
            pid: std::process::id(),
            incarnation: c.incarnation(),
            seq: self.seq,
            capabilities: cfg.hosted(),
            unhealthy: c.unhealthy_local(),
            shard_fingerprint: cfg.shard_map.fingerprint(),
            timing_fingerprint: cfg.timing.fingerprint(),
            peers: c.connected_advertised(),
            binding: Vec::new(),
        };
        let traceparent = new_traceparent();
        // One heartbeat per connected peer, over its own session's link, with that link's binding.
        let mut hb = hb;
        for node in c.connected_names() {
            let Some((cell, binding)) = c.member_on(MEMBERSHIP_GROUP, &node) else { continue };
            hb.binding = binding;
            let peer: ActorRef<MembershipMsg> = cell.into();
            let _ = peer.cast(MembershipMsg::Heartbeat(seal(&hb, &traceparent)));
        }
    }

    fn on_heartbeat(&mut self, hb: Heartbeat, now: u64) {
        let cfg = self.cluster.config();
        if hb.name == cfg.name {
            return;
        }
        if !self.cluster.vouches_for(&hb.name, &hb.binding) {
            // Another node speaking for `hb.name` (or a heartbeat from a link closing just now).
            self.cluster.count(Seen::HeartbeatRefused);
            tracing::debug!(node = %hb.name, "heartbeat dropped: it did not come over a link of the node it names");
            return;
        }
        for addr in std::iter::once(&hb.cluster_addr).chain(hb.peers.iter()) {
            self.cluster.learn_addr(addr);
        }
        let (ours, our_timing) = (cfg.shard_map.fingerprint(), cfg.timing.fingerprint());
        let mismatch = if hb.shard_fingerprint != ours {
            Some(Disagreement::ShardMap { theirs: hb.shard_fingerprint, ours })
        } else if hb.timing_fingerprint != our_timing {
            Some(Disagreement::Timing { theirs: hb.timing_fingerprint, ours: our_timing })
        } else {
            None
        };
        if let Some(why) = mismatch {
            if self.refused.insert(hb.name.clone(), why).is_none() {
                let reason = NodeReason::Refused { node: hb.name.clone(), why };
                tracing::error!(node = %hb.name, "{reason}");
                self.cluster.count(Seen::PeerRefused);
            }
            self.last.insert(hb.name.clone(), hb);
            self.publish();
            return;
        }
        if self.refused.remove(&hb.name).is_some() {
            tracing::info!(node = %hb.name, "shard maps and timing agree again");
        }
        if let Some(prev) = self.last.get(&hb.name) {
            if prev.incarnation != hb.incarnation {
                tracing::info!(node = %hb.name, pid = hb.pid, "peer restarted (new incarnation)");
            }
        }
        let t = self.detector.heartbeat(&hb.name, now);
        let health_changed =
            self.last.get(&hb.name).map(|p| p.unhealthy != hb.unhealthy || p.pid != hb.pid).unwrap_or(true);
        self.last.insert(hb.name.clone(), hb);
        if let Some(t) = t {
            self.apply(t);
        }
        if health_changed {
            self.publish();
        }
    }

    fn apply(&mut self, t: Transition) {
        match t.to {
            Status::Up => {
                tracing::info!(node = %t.node, from = ?t.from, silent_ms = t.silent_ms, "peer up");
                // Back from down (a restart, a resume, a healed link): what tripped its breakers is
                // history, and the detector is the better judge of liveness.
                if t.from == Some(Status::Down) {
                    self.cluster.reset_breakers(&t.node);
                }
            }
            Status::Suspect => tracing::warn!(node = %t.node, silent_ms = t.silent_ms, "peer suspect"),
            Status::Down => {
                tracing::warn!(node = %t.node, silent_ms = t.silent_ms, "peer down; closing its session");
                self.cluster.count(Seen::Down);
                self.cluster.close_session(&t.node);
            }
        }
        self.publish();
    }

    /// Writes the current view where the HTTP layer and the call path read it.
    fn publish(&self) {
        let c = &*self.cluster;
        let cfg = c.config();
        let mut nodes = BTreeMap::new();
        for name in cfg.shard_map.all_nodes().into_iter().chain(self.last.keys().cloned()) {
            let view = if name == cfg.name {
                NodeView {
                    name: name.clone(),
                    addr: cfg.advertised_cluster_addr(),
                    http: cfg.http_advertise.clone(),
                    pid: Some(std::process::id()),
                    status: Status::Up,
                    capabilities: cfg.hosted(),
                    unhealthy: c.unhealthy_local(),
                    reason: None,
                }
            } else if let Some(hb) = self.last.get(&name) {
                let refused = self.refused.get(&name).map(|&why| NodeReason::Refused { node: name.clone(), why });
                NodeView {
                    name: name.clone(),
                    addr: hb.cluster_addr.clone(),
                    http: hb.http_addr.clone(),
                    pid: Some(hb.pid),
                    status: if refused.is_some() {
                        Status::Down
                    } else {
                        self.detector.status(&name).unwrap_or(Status::Down)
                    },
                    capabilities: hb.capabilities.clone(),
                    unhealthy: hb.unhealthy.clone(),
                    reason: refused,
                }
            } else {
                NodeView {
                    name: name.clone(),
                    addr: String::new(),
                    http: String::new(),
                    pid: None,
                    status: Status::Down,
                    capabilities: cfg.shard_map.hosted_by(&name),
                    unhealthy: vec![],
                    reason: Some(NodeReason::NeverHeardFrom),
                }
            };
            nodes.insert(name, view);
        }
        c.set_view(nodes);
    }
}

/// One node as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeView {
    pub name: String,
    pub addr: String,
    pub http: String,
    pub pid: Option<u32>,
    pub status: Status,
    pub capabilities: Vec<CapabilityId>,
    pub unhealthy: Vec<CapabilityId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<NodeReason>,
}

/// Why a node counts as down whatever else is known of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeReason {
    /// No heartbeat from it since this node started.
    NeverHeardFrom,
    /// Its heartbeats are refused: it disagrees with this node on a table every node must share.
    Refused { node: String, why: Disagreement },
}

impl NodeReason {
    pub fn is_refused(&self) -> bool {
        matches!(self, NodeReason::Refused { .. })
    }
}

/// A table every node must share, which a peer's heartbeat says it holds otherwise (by fingerprint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disagreement {
    ShardMap { theirs: u64, ours: u64 },
    Timing { theirs: u64, ours: u64 },
}

impl fmt::Display for NodeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeReason::NeverHeardFrom => f.write_str("never heard from"),
            NodeReason::Refused { node, why: Disagreement::ShardMap { theirs, ours } } => write!(
                f,
                "refused: node {node} has a different shard map (fingerprint {theirs:016x}, ours {ours:016x}); every node must use the same [capabilities] tables"
            ),
            NodeReason::Refused { node, why: Disagreement::Timing { theirs, ours } } => write!(
                f,
                "refused: node {node} has a different [timing] (fingerprint {theirs:016x}, ours {ours:016x}); every node must use the same [timing] table"
            ),
        }
    }
}

/// As text, the way `/v1/cluster` and the logs show it.
impl Serialize for NodeReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
