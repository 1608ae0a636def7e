//! The cluster layer's configuration ([`ClusterConfig`]: identity, addresses, TLS, [`Timing`],
//! [`Limits`]) and the static shard map every node must agree on. The config file a node reads is
//! assembled from each layer's part by `bulkhead_launch::config`.
//!
//! A node hosts a capability exactly when the map lists it among that capability's nodes, so the
//! hosted set and the shard map cannot disagree with each other. The map names capabilities by
//! their opaque [`CapabilityId`]; which capabilities exist, and their names, are the layer above's. Every capability is sharded into
//! Raft groups; which shard owns a key, and which nodes hold its replicas, are pure functions of
//! the map ([`ShardMap::shard_for`], [`ShardMap::shards`]); the map's [`ShardMap::fingerprint`]
//! travels in every heartbeat, and a peer whose fingerprint differs is refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::capability::CapabilityId;

/// Where one capability lives: the nodes hosting it, in shard order, and how it is sharded and
/// replicated (in the config file, a `[capabilities.<name>]` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityPlacement {
    pub nodes: Vec<String>,
    /// How many Raft groups the keys are hashed over (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<u32>,
    /// Replicas per shard (default 3, or every node when fewer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// The preferred leader of each shard, in shard order (default:
    /// the shards' first replicas, which spread over `nodes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leaders: Vec<String>,
}

impl CapabilityPlacement {
    /// Hosted on `nodes`, with the default sharding and replication.
    pub fn on(nodes: &[&str]) -> Self {
        Self { nodes: nodes.iter().map(|s| s.to_string()).collect(), shards: None, replicas: None, leaders: Vec::new() }
    }
}

/// Where one shard of a capability lives: its replicas' nodes, the preferred leader first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlacement {
    pub shard: u32,
    pub replicas: Vec<String>,
}

impl ShardPlacement {
    /// The node that leads this shard whenever it is healthy and caught up.
    pub fn preferred(&self) -> &str {
        &self.replicas[0]
    }
}

/// Each capability's placement, by id. Every node must hold the same map.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShardMap(pub BTreeMap<CapabilityId, CapabilityPlacement>);

/// FNV-1a, 64 bit: stable across builds and platforms (std's hasher is not promised to be).
pub use bulkhead_codec::fnv1a as stable_hash;

impl ShardMap {
    pub fn nodes(&self, cap: impl Into<CapabilityId>) -> &[String] {
        let cap = cap.into();
        self.0.get(&cap).map(|p| p.nodes.as_slice()).unwrap_or(&[])
    }

    /// The preferred leader of the shard that owns `key` for `cap`: where it is served while that
    /// node is healthy.
    pub fn node_for(&self, cap: impl Into<CapabilityId>, key: &[u8]) -> Option<&str> {
        let cap = cap.into();
        let shard = self.shard_for(cap, key);
        let p = self.0.get(&cap)?;
        let n = p.nodes.len().max(1);
        let leader = p.leaders.get(shard as usize).map(String::as_str);
        leader.or_else(|| p.nodes.get(shard as usize % n).map(String::as_str))
    }

    /// The shards of a capability (each one Raft group) and where each lives. Shard `s` takes
    /// `replicas` nodes of the list, starting at its preferred leader and wrapping around.
    pub fn shards(&self, cap: impl Into<CapabilityId>) -> Vec<ShardPlacement> {
        let cap = cap.into();
        let Some(p) = self.0.get(&cap) else { return Vec::new() };
        if p.nodes.is_empty() {
            return Vec::new();
        }
        let n = p.nodes.len();
        let replicas = (p.replicas.unwrap_or(3) as usize).clamp(1, n);
        (0..p.shards.unwrap_or(1))
            .map(|shard| {
                let start = p
                    .leaders
                    .get(shard as usize)
                    .and_then(|l| p.nodes.iter().position(|x| x == l))
                    .unwrap_or(shard as usize % n);
                ShardPlacement { shard, replicas: (0..replicas).map(|i| p.nodes[(start + i) % n].clone()).collect() }
            })
            .collect()
    }

    /// The shard of a capability that owns `key`.
    pub fn shard_for(&self, cap: impl Into<CapabilityId>, key: &[u8]) -> u32 {
        let cap = cap.into();
        let shards = self.0.get(&cap).and_then(|p| p.shards).unwrap_or(1).max(1);
        (stable_hash(key) % u64::from(shards)) as u32
    }

    /// The capabilities `node` hosts.
    pub fn hosted_by(&self, node: &str) -> Vec<CapabilityId> {
        self.0.iter().filter(|(_, p)| p.nodes.iter().any(|n| n == node)).map(|(c, _)| *c).collect()
    }

    /// Every node named anywhere in the map.
    pub fn all_nodes(&self) -> Vec<String> {
        let mut all: Vec<String> = self.0.values().flat_map(|p| p.nodes.iter().cloned()).collect();
        all.sort();
        all.dedup();
        all
    }

    /// A digest of the whole map; equal maps give equal fingerprints on every node.
    pub fn fingerprint(&self) -> u64 {
        let mut canon = String::new();
        for (cap, p) in &self.0 {
            canon.push_str(&cap.label());
            canon.push('=');
            canon.push_str(&p.nodes.join(","));
            if let Some(s) = p.shards {
                canon.push_str(&format!("/shards={s}"));
            }
            if let Some(r) = p.replicas {
                canon.push_str(&format!("/replicas={r}"));
            }
            if !p.leaders.is_empty() {
                canon.push_str(&format!("/leaders={}", p.leaders.join(",")));
            }
            canon.push(';');
        }
        stable_hash(canon.as_bytes())
    }
}

/// Timing knobs; the defaults suit a LAN of a few bare-metal nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timing {
    /// Interval between heartbeats to every peer.
    pub heartbeat_ms: u64,
    /// Silence after which a peer is `suspect` (still used, but flagged).
    pub suspect_after_ms: u64,
    /// Silence after which a peer is `down`: its session is closed and calls to it fail fast.
    pub down_after_ms: u64,
    /// Timeout of one cross-node call.
    pub call_timeout_ms: u64,
    /// How long the HTTP front waits for a request's outcome before answering that it is still
    /// pending (here because every node must share it, as all of `[timing]`).
    pub wait_budget_ms: u64,
    /// Interval between a Raft leader's heartbeats to its followers.
    pub raft_heartbeat_ms: u64,
    /// A follower that hears no leader for this long (plus the leader's lease, 1.5 × this) calls an
    /// election; a leader whose node the failure detector sees down is replaced sooner.
    pub election_timeout_ms: u64,
    /// A replica builds a snapshot (and may purge its log) every this many applied entries.
    pub snapshot_every_entries: u64,
}

impl Timing {
    /// A digest of every timing knob; equal tables give equal fingerprints on every node.
    pub fn fingerprint(&self) -> u64 {
        stable_hash(toml::to_string(self).unwrap_or_default().as_bytes())
    }
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            suspect_after_ms: 400,
            down_after_ms: 800,
            call_timeout_ms: 2_000,
            wait_budget_ms: 2_000,
            raft_heartbeat_ms: 100,
            election_timeout_ms: 500,
            snapshot_every_entries: 50_000,
        }
    }
}

/// The load-shedding bounds the cluster layer enforces (the `[limits]` keys it owns): past them a
/// request or a connection is refused at once instead of queueing without limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Requests one capability gateway has handed to its local worker and not yet answered; one
    /// more is refused as unavailable (HTTP 503; the saga and the outbox retry later).
    pub gateway_in_flight: usize,
    /// Connections the cluster port keeps open at once (a peer needs one or two); one more is closed.
    pub cluster_connections: usize,
    /// Of those, connections still in their handshake (TLS and the node's claim); one more is
    /// closed at once: a flood of half-open connections cannot hold every slot.
    pub cluster_handshakes: usize,
    /// Of the handshakes, how many one address may have in progress; one more from it is closed
    /// at once, so a flood from one address leaves the rest to the peers (a peer needs one or two).
    pub cluster_handshakes_per_address: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // Gateway: room for the fronts of several nodes plus the leaders' own background traffic.
        // Cluster: two links per peer for a few dozen nodes; handshakes take milliseconds.
        Self {
            gateway_in_flight: 4096,
            cluster_connections: 64,
            cluster_handshakes: 16,
            cluster_handshakes_per_address: 4,
        }
    }
}

impl Limits {
    /// Every bound > 0, and no more handshakes than connections.
    pub fn validate(&self) -> Result<(), String> {
        if [
            self.gateway_in_flight,
            self.cluster_connections,
            self.cluster_handshakes,
            self.cluster_handshakes_per_address,
        ]
        .contains(&0)
        {
            return Err("limits: every limit must be > 0".into());
        }
        if self.cluster_handshakes > self.cluster_connections {
            return Err("limits: cluster_handshakes cannot exceed cluster_connections".into());
        }
        Ok(())
    }
}

impl Timing {
    /// The detector's deadlines in order, and the call path's timeouts above zero.
    pub fn validate(&self) -> Result<(), String> {
        let t = self;
        if t.heartbeat_ms == 0 || t.suspect_after_ms <= t.heartbeat_ms || t.down_after_ms <= t.suspect_after_ms {
            return Err("timing: need 0 < heartbeat_ms < suspect_after_ms < down_after_ms".into());
        }
        if t.call_timeout_ms == 0 || t.wait_budget_ms == 0 {
            return Err("timing: call_timeout_ms and wait_budget_ms must be > 0".into());
        }
        Ok(())
    }
}

/// `tls`: how cluster links are protected. Mutual TLS unless a config says `tls = "off"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// TLS 1.3 both ways, each side showing a certificate from the cluster CA that names its node.
    #[default]
    Mutual,
    /// Plain TCP: anyone on the path reads and alters every message. Only on a trusted private link.
    Off,
}

/// What the cluster layer needs of a node's config: who it is, where it listens and what it
/// announces, how links are protected, its timing and bounds, and the shard map. The binary
/// assembles it from the config file (`bulkhead_launch::config::NodeConfig::cluster`); secrets
/// come already read (`Debug` never shows the cookie).
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's name; unique in the cluster; the shard map refers to nodes by it.
    pub name: String,
    /// Address the cluster listener binds.
    pub cluster_listen: SocketAddr,
    /// `host:port` peers dial to reach this node (defaults to `cluster_listen`).
    pub cluster_advertise: Option<String>,
    /// `host:port` of other nodes to dial at start.
    pub seeds: Vec<String>,
    /// Shared secret of the cluster handshake.
    pub cookie: String,
    /// The address of this node's HTTP API, as heartbeats announce it.
    pub http_advertise: String,
    pub tls: TlsMode,
    /// The cluster CA's certificate, this node's certificate and its key (PEM files), with `tls` on.
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub timing: Timing,
    pub limits: Limits,
    /// The shard map every node must agree on.
    pub shard_map: ShardMap,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("name", &self.name)
            .field("cluster_listen", &self.cluster_listen)
            .field("cluster_advertise", &self.cluster_advertise)
            .field("seeds", &self.seeds)
            .field("http_advertise", &self.http_advertise)
            .field("tls", &self.tls)
            .field("timing", &self.timing)
            .field("limits", &self.limits)
            .field("shard_map", &self.shard_map)
            .finish_non_exhaustive()
    }
}

impl ClusterConfig {
    /// Node `name` on `cluster_listen` with plain-TCP links, no seeds, the default timing and
    /// bounds: for tests and tools that run one node in a process.
    pub fn plain(name: &str, cluster_listen: SocketAddr, cookie: &str, shard_map: ShardMap) -> Self {
        Self {
            name: name.to_string(),
            cluster_listen,
            cluster_advertise: None,
            seeds: Vec::new(),
            cookie: cookie.to_string(),
            http_advertise: String::new(),
            tls: TlsMode::Off,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            timing: Timing::default(),
            limits: Limits::default(),
            shard_map,
        }
    }

    pub fn advertised_cluster_addr(&self) -> String {
        self.cluster_advertise.clone().unwrap_or_else(|| self.cluster_listen.to_string())
    }

    /// The capabilities this node hosts.
    pub fn hosted(&self) -> Vec<CapabilityId> {
        self.shard_map.hosted_by(&self.name)
    }
}
