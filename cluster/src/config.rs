//! Node configuration (TOML) and the static shard map every node must agree on.
//!
//! A node hosts capability X exactly when its name is listed in `[capabilities.X] nodes`, so the
//! hosted set and the shard map cannot disagree with each other. Every capability is sharded into
//! Raft groups; which shard owns a key, and which nodes hold its replicas, are pure functions of
//! the map ([`ShardMap::shard_for`], [`ShardMap::shards`]); the map's [`ShardMap::fingerprint`]
//! travels in every heartbeat, and a peer whose fingerprint differs is refused.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The five business capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    Orders,
    Inventory,
    Payments,
    Shipping,
    Notifications,
}

impl Capability {
    pub const ALL: [Capability; 5] = [
        Capability::Orders,
        Capability::Inventory,
        Capability::Payments,
        Capability::Shipping,
        Capability::Notifications,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Orders => "orders",
            Capability::Inventory => "inventory",
            Capability::Payments => "payments",
            Capability::Shipping => "shipping",
            Capability::Notifications => "notifications",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Capability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Capability::ALL.into_iter().find(|c| c.as_str() == s).ok_or_else(|| {
            format!("unknown capability `{s}` (known: orders, inventory, payments, shipping, notifications)")
        })
    }
}

/// `[capabilities.X]`: the nodes hosting X, in shard order.
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

/// Capability -> the ordered list of nodes hosting it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ShardMap(pub BTreeMap<Capability, CapabilityPlacement>);

/// FNV-1a, 64 bit: stable across builds and platforms (std's hasher is not promised to be).
pub use bulkhead_storage::fnv1a as stable_hash;

impl ShardMap {
    pub fn nodes(&self, cap: Capability) -> &[String] {
        self.0.get(&cap).map(|p| p.nodes.as_slice()).unwrap_or(&[])
    }

    /// The preferred leader of the shard that owns `key` for `cap`: where it is served while that
    /// node is healthy.
    pub fn node_for(&self, cap: Capability, key: &[u8]) -> Option<&str> {
        let shard = self.shard_for(cap, key);
        let p = self.0.get(&cap)?;
        let n = p.nodes.len().max(1);
        let leader = p.leaders.get(shard as usize).map(String::as_str);
        leader.or_else(|| p.nodes.get(shard as usize % n).map(String::as_str))
    }

    /// The shards of a capability (each one Raft group) and where each lives. Shard `s` takes
    /// `replicas` nodes of the list, starting at its preferred leader and wrapping around.
    pub fn shards(&self, cap: Capability) -> Vec<ShardPlacement> {
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
    pub fn shard_for(&self, cap: Capability, key: &[u8]) -> u32 {
        let shards = self.0.get(&cap).and_then(|p| p.shards).unwrap_or(1).max(1);
        (stable_hash(key) % u64::from(shards)) as u32
    }

    /// The capabilities `node` hosts.
    pub fn hosted_by(&self, node: &str) -> Vec<Capability> {
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
            canon.push_str(cap.as_str());
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

    fn validate(&self) -> Result<(), String> {
        for (cap, p) in &self.0 {
            if p.nodes.is_empty() {
                return Err(format!("[capabilities.{cap}] nodes is empty: list at least one node"));
            }
            if p.shards == Some(0) || p.replicas == Some(0) {
                return Err(format!("[capabilities.{cap}] shards and replicas must be at least 1"));
            }
            if let Some(l) = p.leaders.iter().find(|l| !p.nodes.contains(l)) {
                return Err(format!("[capabilities.{cap}] leaders names `{l}`, which is not in its nodes"));
            }
            if p.leaders.len() > p.shards.unwrap_or(1) as usize {
                return Err(format!("[capabilities.{cap}] lists more leaders than it has shards"));
            }
            let mut seen = std::collections::HashSet::new();
            for n in &p.nodes {
                if !seen.insert(n) {
                    return Err(format!("[capabilities.{cap}] lists node `{n}` twice"));
                }
            }
            // An order id's last byte names its shard.
            if *cap == Capability::Orders && p.shards.unwrap_or(1) > 256 {
                return Err("[capabilities.orders] may have at most 256 shards".into());
            }
        }
        for cap in Capability::ALL {
            if !self.0.contains_key(&cap) {
                return Err(format!("[capabilities.{cap}] is missing: every capability needs at least one node"));
            }
        }
        Ok(())
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
    /// How long `POST /v1/orders` waits for the saga before answering 202 pending.
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

/// Load-shedding bounds: past them a request is refused at once (429/503 + `Retry-After`) instead
/// of queueing without limit in an unbounded ractor mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// `POST /v1/orders` requests this node's HTTP front handles at once; one more is answered 429.
    pub orders_in_flight: usize,
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
        // Orders: a few times the concurrency at which the benchmarks saturate a 2-core node.
        // Gateway: room for the orders fronts of several nodes plus the saga and relay traffic.
        // Cluster: two links per peer for a few dozen nodes; handshakes take milliseconds.
        Self {
            orders_in_flight: 1024,
            gateway_in_flight: 4096,
            cluster_connections: 64,
            cluster_handshakes: 16,
            cluster_handshakes_per_address: 4,
        }
    }
}

/// The HTTP edge's bounds (`[http]`): what a slow or greedy client can hold, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpEdge {
    /// Open connections to the API; one more is answered `503` and closed.
    pub max_connections: usize,
    /// Of those, how many one client address may hold; one more from it is answered `503` and
    /// closed, so one address cannot take every connection. Behind a proxy, raise it.
    pub max_connections_per_address: usize,
    /// From the accept to the end of the first request's headers, and from an answer to the end of
    /// the next request's headers: a client slower than that (one byte a second, nothing at all,
    /// or an idle keep-alive) is disconnected.
    pub header_timeout_ms: u64,
    /// A whole request, body included, until its answer is ready: past it, `408`. Must leave room
    /// for `POST /v1/orders`, which may wait `wait_budget_ms + call_timeout_ms`.
    pub request_timeout_ms: u64,
    /// A connection on which no byte moves either way for this long is closed (one stuck mid-request,
    /// such as a client that stops reading its answer). Longer than `request_timeout_ms`, so it
    /// never cuts a request that is being answered.
    pub idle_timeout_ms: u64,
    /// On SIGTERM, how long `/readyz` answers `503 draining` while requests are still served, so
    /// that load balancers polling it stop sending here before anything is refused. At least the
    /// balancer's check interval times its failure threshold.
    pub drain_grace_ms: u64,
    /// After the grace, how long requests already being handled may take to finish; new ones are
    /// refused `503 draining` meanwhile. What is still running then is cut off.
    pub drain_timeout_ms: u64,
}

impl Default for HttpEdge {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_address: 256,
            header_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            drain_grace_ms: 1_000,
            drain_timeout_ms: 10_000,
        }
    }
}

impl HttpEdge {
    pub const MAX_CONNECTIONS: usize = 1 << 20;
    pub const MAX_TIMEOUT_MS: u64 = 86_400_000;

    /// Checked against the order path's own budget (`timing`): a request timeout shorter than it
    /// would answer `408` for orders that are still being placed.
    pub fn validate(&self, timing: &Timing) -> Result<(), String> {
        if self.max_connections == 0 || self.max_connections_per_address == 0 || self.header_timeout_ms == 0 {
            return Err("http: max_connections, max_connections_per_address and header_timeout_ms must be > 0".into());
        }
        // Upper bounds: past them a deadline overflows the clock or the connection semaphore.
        if self.max_connections > Self::MAX_CONNECTIONS {
            return Err(format!("http: max_connections must be at most {}", Self::MAX_CONNECTIONS));
        }
        for (what, ms) in [
            ("header_timeout_ms", self.header_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("drain_grace_ms", self.drain_grace_ms),
            ("drain_timeout_ms", self.drain_timeout_ms),
        ] {
            if ms > Self::MAX_TIMEOUT_MS {
                return Err(format!("http: {what} must be at most {} (a day)", Self::MAX_TIMEOUT_MS));
            }
        }
        let order_path = timing.wait_budget_ms.saturating_add(timing.call_timeout_ms);
        if self.request_timeout_ms <= order_path {
            return Err(format!(
                "http: request_timeout_ms ({}) must be longer than timing.wait_budget_ms + timing.call_timeout_ms ({order_path}), \
                 the longest a POST /v1/orders may legitimately take",
                self.request_timeout_ms
            ));
        }
        if self.idle_timeout_ms <= self.request_timeout_ms {
            return Err(format!(
                "http: idle_timeout_ms ({}) must be longer than request_timeout_ms ({}), or it would cut requests being answered",
                self.idle_timeout_ms, self.request_timeout_ms
            ));
        }
        Ok(())
    }
}

/// `auth`: whether the HTTP API asks for a token. On unless a config says `auth = "off"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every request but the probes, the spec and the dashboard's page needs `Authorization: Bearer`.
    #[default]
    Tokens,
    /// No token asked for: anyone who reaches the port is admin. Only for a private test bench.
    Off,
}

/// `[log]`: how the node writes its log (to stderr; journald or a file keeps it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// One line per event: `text` for people, `json` (one object per line) for log collectors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[telemetry]`: OpenTelemetry export of the node's spans (HTTP requests, cluster calls, saga
/// steps, Raft proposals). Off unless `otlp_endpoint` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// An OTLP/HTTP (protobuf) collector, e.g. `http://127.0.0.1:4318`; spans go to
    /// `<endpoint>/v1/traces`. Plain HTTP only: run a collector agent next to the node.
    pub otlp_endpoint: Option<String>,
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), String> {
        match self.otlp_endpoint.as_deref() {
            None => Ok(()),
            Some(e) if e.starts_with("http://") && e.len() > "http://".len() => Ok(()),
            Some(e) if e.starts_with("https://") => Err(format!(
                "telemetry.otlp_endpoint `{e}`: https is not supported; run an OpenTelemetry collector agent on this host and give its http:// address"
            )),
            Some(e) => Err(format!("telemetry.otlp_endpoint `{e}` must be an http:// URL, e.g. http://127.0.0.1:4318")),
        }
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

/// `[rate_limit]`: requests per second the API takes, per client address (every request, before
/// its token is looked at) and per token; a burst of one second's worth. Past either: `429`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    pub per_address: u32,
    pub per_token: u32,
}

impl RateLimit {
    /// For a local cluster under a load test (the bench, a chaos run): one client address and one
    /// token carry the whole load, and the run measures the cluster, not the limiter.
    pub const LOAD_TEST: RateLimit = RateLimit { per_address: 1_000_000, per_token: 1_000_000 };
}

impl Default for RateLimit {
    fn default() -> Self {
        // Above what one 2-core node serves (about 600 orders/s plus reads), so the limit binds
        // on a misbehaving client, not on a healthy load balancer or benchmark.
        Self { per_address: 2_000, per_token: 5_000 }
    }
}

/// `[orders]`: the order saga's own settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrdersConfig {
    /// How long an order may hold stock without a definite charge: past it (in the shard's group
    /// time) the saga cancels the order, voids or refunds any charge that may have landed, and
    /// releases its holds, so an outage of payments keeps no stock from other buyers for longer.
    /// Every node should use the same value: the leader of the order's shard applies its own.
    pub reservation_window_ms: u64,
}

impl Default for OrdersConfig {
    fn default() -> Self {
        Self { reservation_window_ms: 15 * 60 * 1000 }
    }
}

/// One node's configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name; unique in the cluster; the shard map refers to nodes by it.
    pub name: String,
    /// Address the cluster listener binds, e.g. `0.0.0.0:7101`.
    pub cluster_listen: SocketAddr,
    /// `host:port` peers dial to reach this node (defaults to `cluster_listen`).
    #[serde(default)]
    pub cluster_advertise: Option<String>,
    /// `host:port` of other nodes to dial at start; the rest of the mesh is learned from them.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// Shared secret of the cluster handshake. Give this or `cookie_file`, not both.
    #[serde(default)]
    pub cookie: Option<String>,
    /// File holding the cookie (trimmed); relative paths are relative to the config file.
    #[serde(default)]
    pub cookie_file: Option<PathBuf>,
    /// Where this node's stores live: `<data_dir>/<capability>/`.
    pub data_dir: PathBuf,
    /// Address the HTTP API binds.
    pub http_listen: SocketAddr,
    /// Address clients should use for this node's API (defaults to `http_listen`).
    #[serde(default)]
    pub http_advertise: Option<String>,
    /// `fsync` (default) or `flush`.
    #[serde(default)]
    pub durability: bulkhead_storage::Durability,
    /// Enables `POST /admin/panic/{capability}` and the poison customers (`poison-shipping…`,
    /// `poison-notifications…`) the consumers fail on; never on in production.
    #[serde(default)]
    pub fault_injection: bool,
    #[serde(default)]
    pub timing: Timing,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub orders: OrdersConfig,
    #[serde(default)]
    pub http: HttpEdge,
    /// `tokens` (default) or `off`.
    #[serde(default)]
    pub auth: AuthMode,
    /// Files holding the `client` and the `admin` API token (mode 0600; relative to the config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// The named clients' file (`bulkhead tokens --add NAME`; mode 0600; relative to the
    /// config): one token per client, read again within a second of a change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients_file: Option<PathBuf>,
    #[serde(default)]
    pub rate_limit: RateLimit,
    /// `[log] format = "text" | "json"`.
    #[serde(default)]
    pub log: LogConfig,
    /// `[telemetry] otlp_endpoint`: where spans are exported, if anywhere.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// `mutual` (default) or `off`.
    #[serde(default)]
    pub tls: TlsMode,
    /// The cluster CA's certificate, this node's certificate (naming this node) and its private
    /// key (mode 0600), PEM; relative to the config. Made by `bulkhead certs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// The API tokens read from the token files by [`NodeConfig::load`] (never written back).
    #[serde(skip)]
    pub tokens: Option<ApiTokens>,
    /// The shard map: `[capabilities.inventory] nodes = ["n1", "n2"]`.
    pub capabilities: ShardMap,
}

impl NodeConfig {
    /// Reads and validates a config file; errors say which file and what is wrong.
    pub fn load(path: &Path) -> Result<NodeConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        let mut cfg: NodeConfig =
            toml::from_str(&text).map_err(|e| format!("invalid config {}: {e}", path.display()))?;
        if cfg.cookie.is_some() && cfg.cookie_file.is_some() {
            return Err(format!("invalid config {}: give `cookie` or `cookie_file`, not both", path.display()));
        }
        if cfg.cookie.is_some() {
            // The secret is in the config itself: the config is then a secret file.
            crate::secret::check_private(path, "the config (it holds `cookie` inline; prefer `cookie_file`)")?;
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        for file in [
            &mut cfg.cookie_file,
            &mut cfg.client_token_file,
            &mut cfg.admin_token_file,
            &mut cfg.clients_file,
            &mut cfg.tls_ca_file,
            &mut cfg.tls_cert_file,
            &mut cfg.tls_key_file,
        ]
        .into_iter()
        .flatten()
        {
            if file.is_relative() {
                *file = dir.join(&*file);
            }
        }
        cfg.validate().map_err(|e| format!("invalid config {}: {e}", path.display()))?;
        cfg.read_secrets().map_err(|e| format!("invalid config {}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// Reads the cookie and token files named by a validated config, each refused unless only its
    /// owner may read it.
    pub fn read_secrets(&mut self) -> Result<(), String> {
        if let Some(file) = &self.cookie_file {
            self.cookie = Some(crate::secret::read_secret(file, "cookie_file")?);
        }
        if let (AuthMode::Tokens, Some(client), Some(admin)) =
            (self.auth, &self.client_token_file, &self.admin_token_file)
        {
            self.tokens = Some(ApiTokens::new(
                crate::secret::read_secret(client, "client_token_file")?,
                crate::secret::read_secret(admin, "admin_token_file")?,
            )?);
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!("name `{}` must be non-empty ASCII letters, digits, - or _", self.name));
        }
        match (&self.cookie, &self.cookie_file) {
            (Some(c), _) if !c.is_empty() => {}
            (None, Some(_)) => {}
            _ => return Err("give a non-empty `cookie` or a `cookie_file`".into()),
        }
        if self.auth == AuthMode::Tokens && (self.client_token_file.is_none() || self.admin_token_file.is_none()) {
            return Err("auth is on: give client_token_file and admin_token_file (`bulkhead tokens`), \
                        or say auth = \"off\" to serve the API to anyone who reaches it"
                .into());
        }
        if self.tls == TlsMode::Mutual
            && (self.name.contains('_') || self.name.starts_with('-') || self.name.ends_with('-'))
        {
            return Err(format!(
                "name `{}`: with tls on, a node's name is its certificate's DNS name: letters, digits and inner hyphens",
                self.name
            ));
        }
        if self.tls == TlsMode::Mutual
            && (self.tls_ca_file.is_none() || self.tls_cert_file.is_none() || self.tls_key_file.is_none())
        {
            return Err("tls is on: give tls_ca_file, tls_cert_file and tls_key_file (`bulkhead certs`), \
                        or say tls = \"off\" to run cluster links in plain TCP"
                .into());
        }
        if self.rate_limit.per_address == 0 || self.rate_limit.per_token == 0 {
            return Err("rate_limit: per_address and per_token must be > 0".into());
        }
        if self.orders.reservation_window_ms < 100 {
            return Err("orders.reservation_window_ms must be at least 100 (default 900000: 15 minutes)".into());
        }
        if self.cluster_advertise.is_none() && self.cluster_listen.ip().is_unspecified() {
            return Err(format!(
                "cluster_listen {} binds every interface: set cluster_advertise to the host:port peers should dial",
                self.cluster_listen
            ));
        }
        for (what, addr) in [("cluster_advertise", &self.cluster_advertise), ("http_advertise", &self.http_advertise)] {
            if let Some(a) = addr {
                match a.rsplit_once(':') {
                    Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
                    _ => return Err(format!("{what} `{a}` must be host:port")),
                }
            }
        }
        for seed in &self.seeds {
            match seed.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
                _ => return Err(format!("seed `{seed}` must be host:port")),
            }
        }
        self.capabilities.validate()?;
        let t = &self.timing;
        if t.heartbeat_ms == 0 || t.suspect_after_ms <= t.heartbeat_ms || t.down_after_ms <= t.suspect_after_ms {
            return Err("timing: need 0 < heartbeat_ms < suspect_after_ms < down_after_ms".into());
        }
        if t.call_timeout_ms == 0 || t.wait_budget_ms == 0 {
            return Err("timing: call_timeout_ms and wait_budget_ms must be > 0".into());
        }
        let l = &self.limits;
        if [
            l.orders_in_flight,
            l.gateway_in_flight,
            l.cluster_connections,
            l.cluster_handshakes,
            l.cluster_handshakes_per_address,
        ]
        .contains(&0)
        {
            return Err("limits: every limit must be > 0".into());
        }
        if l.cluster_handshakes > l.cluster_connections {
            return Err("limits: cluster_handshakes cannot exceed cluster_connections".into());
        }
        self.http.validate(t)?;
        self.telemetry.validate()?;
        if self.hosted().is_empty() {
            return Err(format!(
                "node `{}` is not listed in any [capabilities.*] nodes: a node the shard map does not name is refused by its peers; list it under a capability",
                self.name
            ));
        }
        Ok(())
    }

    /// Things that are allowed but probably not meant; logged at start-up.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.http_advertise.is_none() && self.http_listen.ip().is_unspecified() {
            w.push("http_listen binds every interface and http_advertise is not set: peers will show an unusable HTTP address".into());
        }
        let order_path = self.timing.wait_budget_ms.saturating_add(self.timing.call_timeout_ms);
        if self.http.drain_timeout_ms < order_path {
            w.push(format!(
                "http.drain_timeout_ms ({}) is shorter than an order may take (timing.wait_budget_ms + call_timeout_ms = {order_path}): \
                 a SIGTERM may cut orders being placed (their clients retry with the same Idempotency-Key)",
                self.http.drain_timeout_ms
            ));
        }
        w
    }

    pub fn cookie(&self) -> &str {
        self.cookie.as_deref().unwrap_or_default()
    }

    pub fn advertised_cluster_addr(&self) -> String {
        self.cluster_advertise.clone().unwrap_or_else(|| self.cluster_listen.to_string())
    }

    pub fn advertised_http_addr(&self) -> String {
        self.http_advertise.clone().unwrap_or_else(|| self.http_listen.to_string())
    }

    pub fn hosted(&self) -> Vec<Capability> {
        self.capabilities.hosted_by(&self.name)
    }
}

/// The API tokens of the two scopes. A token file may hold several tokens, one per line (a new
/// and an old one while rotating); any of them is accepted. `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiTokens {
    pub client: Vec<String>,
    pub admin: Vec<String>,
}

impl ApiTokens {
    /// Shortest token accepted: 128 bits as hex. `bulkhead tokens` makes 256.
    pub const MIN_LEN: usize = 32;

    /// From the token files' contents: one token per non-empty line.
    pub fn new(client: String, admin: String) -> Result<Self, String> {
        let lines = |what: &str, text: &str| -> Result<Vec<String>, String> {
            let tokens: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
            if tokens.is_empty() {
                return Err(format!("the {what} token file holds no token"));
            }
            if let Some(bad) =
                tokens.iter().find(|t| t.len() < Self::MIN_LEN || !t.bytes().all(|b| b.is_ascii_graphic()))
            {
                return Err(format!(
                    "a {what} token of {} characters is refused: each must be at least {} printable characters without spaces (`bulkhead tokens` makes them)",
                    bad.len(),
                    Self::MIN_LEN
                ));
            }
            Ok(tokens)
        };
        let (client, admin) = (lines("client", &client)?, lines("admin", &admin)?);
        if client.iter().any(|c| admin.contains(c)) {
            return Err("a token is in both the client and the admin file: a client could do what an admin does".into());
        }
        Ok(Self { client, admin })
    }
}

impl fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiTokens { .. }")
    }
}

#[cfg(test)]
mod tests {

    /// The example configs in deploy/ parse with every key they document (unknown keys are refused).
    #[test]
    fn the_deploy_examples_parse_and_validate() {
        for text in [
            include_str!("../../deploy/n1.toml"),
            include_str!("../../deploy/n2.toml"),
            include_str!("../../deploy/n3.toml"),
        ] {
            let mut cfg: NodeConfig = toml::from_str(text).unwrap();
            cfg.cookie = Some("c".into());
            cfg.cookie_file = None;
            cfg.validate().unwrap();
            assert_eq!(cfg.auth, AuthMode::Tokens);
            assert_eq!(cfg.rate_limit, RateLimit::default());
            assert_eq!(cfg.tls, TlsMode::Mutual);
            let mut open = cfg.clone();
            open.admin_token_file = None;
            assert!(open.validate().unwrap_err().contains("auth = \"off\""));
            open.tls_key_file = None;
            open.auth = AuthMode::Off;
            assert!(open.validate().unwrap_err().contains("tls = \"off\""));
            let mut underscored = cfg.clone();
            underscored.name = "n_1".into();
            assert!(underscored.validate().unwrap_err().contains("DNS name"));
            assert_eq!(cfg.limits, Limits::default());
            assert_eq!(cfg.timing, Timing::default());
            cfg.limits.orders_in_flight = 0;
            assert!(cfg.validate().unwrap_err().contains("limits"));
            cfg.limits = Limits::default();
            assert_eq!(cfg.http, HttpEdge::default());
            cfg.http.request_timeout_ms = cfg.timing.wait_budget_ms + cfg.timing.call_timeout_ms;
            assert!(cfg.validate().unwrap_err().contains("request_timeout_ms"), "would cut orders being placed");
            cfg.http = HttpEdge { idle_timeout_ms: HttpEdge::default().request_timeout_ms, ..HttpEdge::default() };
            assert!(cfg.validate().unwrap_err().contains("idle_timeout_ms"));
            cfg.http = HttpEdge { max_connections: 0, ..HttpEdge::default() };
            assert!(cfg.validate().unwrap_err().contains("max_connections"));
            cfg.http = HttpEdge { idle_timeout_ms: u64::MAX, ..HttpEdge::default() };
            assert!(cfg.validate().unwrap_err().contains("at most"), "u64::MAX would overflow a deadline");
            cfg.http = HttpEdge { max_connections: usize::MAX, ..HttpEdge::default() };
            assert!(cfg.validate().unwrap_err().contains("at most"));
            cfg.http = HttpEdge { drain_timeout_ms: u64::MAX, ..HttpEdge::default() };
            assert!(cfg.validate().unwrap_err().contains("drain_timeout_ms"));
            cfg.http = HttpEdge::default();
            assert!(cfg.validate().is_ok());
        }
    }

    use super::*;

    const SAMPLE: &str = r#"
name = "n1"
cluster_listen = "127.0.0.1:7101"
seeds = ["127.0.0.1:7102"]
cookie = "secret"
data_dir = "/tmp/x"
http_listen = "127.0.0.1:8080"
auth = "off"
tls = "off"

[capabilities.orders]
nodes = ["n1"]
[capabilities.inventory]
nodes = ["n1", "n2"]
shards = 2
[capabilities.payments]
nodes = ["n2"]
[capabilities.shipping]
nodes = ["n3"]
[capabilities.notifications]
nodes = ["n3"]
"#;

    #[test]
    fn token_files_are_one_token_a_line_long_enough_and_never_in_both_scopes() {
        let (a, b, c) = ("a".repeat(32), "b".repeat(40), "c".repeat(32));
        let t = ApiTokens::new(format!("{a}\n\n {c} \n"), b.clone()).unwrap();
        assert_eq!(t.client, vec![a.clone(), c.clone()]);
        assert_eq!(format!("{t:?}"), "ApiTokens { .. }", "Debug shows no token");
        assert!(ApiTokens::new("short".into(), b.clone()).unwrap_err().contains("at least 32"));
        assert!(ApiTokens::new(format!("{a}\n"), format!("{b}\n{a}")).unwrap_err().contains("both"));
        assert!(ApiTokens::new("\n".into(), b).unwrap_err().contains("no token"));
    }

    #[cfg(unix)]
    #[test]
    fn a_config_with_the_cookie_inline_must_be_private_itself() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, SAMPLE).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = NodeConfig::load(&path).unwrap_err();
        assert!(e.contains("inline") && e.contains("0644"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(NodeConfig::load(&path).unwrap().cookie(), "secret");
    }

    #[test]
    fn parses_and_derives_hosted_capabilities() {
        let cfg: NodeConfig = toml::from_str(SAMPLE).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.hosted(), vec![Capability::Orders, Capability::Inventory]);
        assert_eq!(cfg.capabilities.all_nodes(), vec!["n1", "n2", "n3"]);
    }

    #[test]
    fn fingerprint_sees_any_difference() {
        let a: NodeConfig = toml::from_str(SAMPLE).unwrap();
        let b: NodeConfig =
            toml::from_str(&SAMPLE.replace(r#"nodes = ["n1", "n2"]"#, r#"nodes = ["n2", "n1"]"#)).unwrap();
        assert_eq!(a.capabilities.fingerprint(), a.clone().capabilities.fingerprint());
        assert_ne!(a.capabilities.fingerprint(), b.capabilities.fingerprint());
        let slower = Timing { election_timeout_ms: a.timing.election_timeout_ms + 1, ..a.timing.clone() };
        assert_eq!(a.timing.fingerprint(), a.timing.clone().fingerprint());
        assert_ne!(a.timing.fingerprint(), slower.fingerprint());
    }

    #[test]
    fn node_for_is_stable_and_spreads() {
        let cfg: NodeConfig = toml::from_str(SAMPLE).unwrap();
        let m = &cfg.capabilities;
        let on_n1 =
            (0..100).filter(|i| m.node_for(Capability::Inventory, format!("sku-{i}").as_bytes()) == Some("n1")).count();
        assert!((25..75).contains(&on_n1), "{on_n1}");
        assert_eq!(m.node_for(Capability::Inventory, b"sku-1"), m.node_for(Capability::Inventory, b"sku-1"));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let e = toml::from_str::<NodeConfig>(&SAMPLE.replace("[capabilities.payments]", "[capabilities.paymnts]"))
            .unwrap_err();
        assert!(e.to_string().contains("paymnts"), "{e}");
        let cfg: NodeConfig = toml::from_str(&SAMPLE.replace(r#"cookie = "secret""#, "")).unwrap();
        assert!(cfg.validate().unwrap_err().contains("cookie"));
        let cfg: NodeConfig = toml::from_str(&SAMPLE.replace(r#"nodes = ["n2"]"#, "nodes = []")).unwrap();
        assert!(cfg.validate().unwrap_err().contains("payments"));
        let cfg: NodeConfig = toml::from_str(&SAMPLE.replace("127.0.0.1:7101", "0.0.0.0:7101")).unwrap();
        assert!(cfg.validate().unwrap_err().contains("cluster_advertise"));
        let cfg: NodeConfig = toml::from_str(&SAMPLE.replace(r#"["127.0.0.1:7102"]"#, r#"["nohost"]"#)).unwrap();
        assert!(cfg.validate().unwrap_err().contains("seed `nohost`"));
        let cfg: NodeConfig = toml::from_str(&SAMPLE.replace(r#"name = "n1""#, r#"name = "n9""#)).unwrap();
        assert!(cfg.validate().unwrap_err().contains("refused by its peers"));
    }
}
