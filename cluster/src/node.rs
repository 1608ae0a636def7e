//! Node bootstrap and the [`Cluster`] handle every other layer uses.
//!
//! [`Cluster::start`] starts ractor_cluster's `NodeServer` with the cookie, subscribes to its session
//! events, starts [`Membership`], and runs the dialer: every known peer address (seeds, plus what
//! heartbeats teach) that has no live session is dialled again, with backoff. ractor_cluster never
//! reconnects by itself, and a reconnect yields new remote stubs, which is why callers resolve a
//! member on every call ([`Cluster::member`]) and never keep an `ActorRef` to a remote actor.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bulkhead_codec::Record;
use ractor::{Actor, ActorRef};
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage};
use serde::Serialize;

use crate::breaker::{Admit, Breaker, BreakerConfig, BreakerState, Ticket};
use crate::call::{call, CallError};
use crate::capability::CapabilityId;
use crate::config::ClusterConfig;
use crate::detector::Status;
use crate::gate::{Expect, Gate, GateEvents, Refusal};
use crate::gateway::group_name;
use crate::link::{LinkFaults, LinkIo, LinkStream};
use crate::membership::{Membership, MembershipMsg, NodeView};
use crate::senders::Sender;
use crate::tls::TlsLinks;
use crate::wire::WireMsg;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    pub calls: AtomicU64,
    pub call_errors: AtomicU64,
    pub downs: AtomicU64,
    pub refused_peers: AtomicU64,
    pub dials: AtomicU64,
    /// Calls failed fast because the (capability, member) breaker was open.
    pub breaker_rejections: AtomicU64,
    /// Cluster connections refused, by why (see [`LinkRefusal`]).
    pub links_refused: [AtomicU64; LinkRefusal::ALL.len()],
    /// Heartbeats dropped because they did not come over a link of the node they name.
    pub heartbeats_refused: AtomicU64,
    /// Raft RPCs refused: not over a link of their sender, or naming another node's member.
    pub raft_refused: AtomicU64,
}

/// Why a cluster connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRefusal {
    /// `[limits] cluster_connections` were open.
    ConnectionCap,
    /// `[limits] cluster_handshakes` were in their handshake.
    HandshakeCap,
    /// `[limits] cluster_handshakes_per_address` from the same address were in their handshake.
    AddressCap,
    /// The TLS handshake failed or took too long: garbage, no certificate, or one from another CA.
    Tls,
    /// Past TLS (or without it), bytes that are not a cluster handshake.
    Garbage,
    /// The peer claimed a node its certificate does not name.
    WrongName,
    /// The peer claimed a node the shard map does not name.
    Stranger,
    /// The cluster handshake did not finish: a wrong cookie, or no answer within 3 s.
    Handshake,
}

impl LinkRefusal {
    pub const ALL: [LinkRefusal; 8] = [
        LinkRefusal::ConnectionCap,
        LinkRefusal::HandshakeCap,
        LinkRefusal::AddressCap,
        LinkRefusal::Tls,
        LinkRefusal::Garbage,
        LinkRefusal::WrongName,
        LinkRefusal::Stranger,
        LinkRefusal::Handshake,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LinkRefusal::ConnectionCap => "connection_cap",
            LinkRefusal::HandshakeCap => "handshake_cap",
            LinkRefusal::AddressCap => "address_cap",
            LinkRefusal::Tls => "tls",
            LinkRefusal::Garbage => "garbage",
            LinkRefusal::WrongName => "wrong_name",
            LinkRefusal::Stranger => "stranger",
            LinkRefusal::Handshake => "handshake",
        }
    }
}

impl ClusterMetrics {
    pub fn refused(&self, why: LinkRefusal) {
        self.links_refused[why as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What this node knows of one link, by its label. Removed when the link's reader goes
/// (`LinkEvents`' drop) or its session closes, whichever is first.
#[derive(Debug, Default)]
struct LinkInfo {
    /// The node the peer claimed, once the gate accepted it (checked against its certificate with TLS).
    peer: Option<String>,
    /// The TLS channel binding (none without TLS).
    binding: Option<[u8; 32]>,
    /// An incoming link's slot of `[limits] cluster_handshakes` and its address's share, given
    /// back when its session is ready (cookie checked) or the link goes.
    handshake: Option<HandshakeSlot>,
}

/// A handshake in progress: one of `[limits] cluster_handshakes`, and one of its address's.
type HandshakeSlot = (tokio::sync::OwnedSemaphorePermit, crate::caps::AddressSlot);

/// Whether a local capability is serving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CapHealth {
    pub ready: bool,
    pub detail: String,
}

struct Inner {
    config: ClusterConfig,
    clock: Instant,
    incarnation: u64,
    server: ActorRef<NodeServerMessage>,
    membership: Mutex<Option<ActorRef<MembershipMsg>>>,
    /// Live, authenticated sessions by peer node name.
    sessions: Mutex<HashMap<String, NodeServerSessionInformation>>,
    /// Sessions opened (dialled or accepted) but not yet ready, with when they opened.
    handshaking: Mutex<HashMap<ractor::ActorId, (NodeServerSessionInformation, Instant)>>,
    known_addrs: Mutex<BTreeSet<String>>,
    view: RwLock<BTreeMap<String, NodeView>>,
    health: RwLock<BTreeMap<CapabilityId, CapHealth>>,
    metrics: ClusterMetrics,
    link_faults: Arc<LinkFaults>,
    /// One breaker per (capability, member) this node has called.
    breakers: Mutex<BTreeMap<(CapabilityId, String), Breaker>>,
    /// This node's Raft replicas (shared with the Raft router).
    raft: crate::raft::Registry,
    /// The last leader another node named for a shard this node has no replica of.
    leader_hints: RwLock<BTreeMap<(CapabilityId, u32), String>>,
    shutdown: tokio::sync::watch::Sender<bool>,
    /// TLS on the links (`None`: `tls = "off"`).
    tls: Option<crate::tls::TlsLinks>,
    /// Every open link by label.
    links: Mutex<HashMap<String, LinkInfo>>,
    /// `[limits] cluster_connections` and `cluster_handshakes`.
    link_slots: Arc<tokio::sync::Semaphore>,
    handshake_slots: Arc<tokio::sync::Semaphore>,
    /// Handshakes in progress per peer address (`[limits] cluster_handshakes_per_address`).
    handshakes_per_address: Arc<crate::caps::PerAddress>,
    link_serial: AtomicU64,
    /// What a call from this node to one of its own actors carries as its binding: random, never sent.
    local_binding: [u8; 32],
    /// Links that passed the gate and closed before their session was ready: (peer, label, when).
    unfinished: Mutex<Vec<(String, String, Instant)>>,
    /// The node is stopping (SIGTERM): see [`Cluster::begin_drain`].
    draining: std::sync::atomic::AtomicBool,
    /// When the membership actor last handled a tick (`now_ms`): the watchdog's proof that the
    /// actor system still delivers messages.
    last_tick_ms: AtomicU64,
}

/// This node's handle on the cluster; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

fn peer_node_name(ses: &NodeServerSessionInformation) -> Option<String> {
    ses.peer_name.as_ref().map(|n| n.name.split('@').next().unwrap_or_default().to_string())
}

struct Events {
    inner: std::sync::Weak<Inner>,
}

impl Events {
    fn poke(inner: &Inner) {
        if let Some(m) = inner.membership.lock().ok().and_then(|m| m.clone()) {
            let _ = m.cast(MembershipMsg::Tick(0));
        }
    }
}

impl NodeEventSubscription for Events {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        let Some(inner) = self.inner.upgrade() else { return };
        if let Ok(mut h) = inner.handshaking.lock() {
            h.insert(ses.actor.get_id(), (ses, Instant::now()));
        };
    }

    fn node_session_authenticated(&self, _ses: NodeServerSessionInformation) {}

    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        let Some(inner) = self.inner.upgrade() else { return };
        if let Ok(mut h) = inner.handshaking.lock() {
            h.remove(&ses.actor.get_id());
        }
        let Some(name) = peer_node_name(&ses) else { return };
        // The gate let this link through only with this claim; if the two ever disagreed, the
        // session would speak for a node its link never proved.
        let gated = inner.links.lock().ok().and_then(|mut l| {
            l.get_mut(&ses.peer_addr).and_then(|i| {
                // Past the cookie: no longer a half-open connection.
                drop(i.handshake.take());
                i.peer.clone()
            })
        });
        if gated.as_deref() != Some(name.as_str()) {
            tracing::error!(peer = %name, gated = ?gated, addr = %ses.peer_addr, "a session names another node than its link proved; closing it");
            inner.metrics.refused(LinkRefusal::WrongName);
            ses.actor.stop(Some("identity mismatch".into()));
            return;
        }
        tracing::info!(peer = %name, addr = %ses.peer_addr, "cluster session ready");
        if let Ok(mut s) = inner.sessions.lock() {
            s.insert(name, ses);
        }
        Self::poke(&inner);
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let Some(inner) = self.inner.upgrade() else { return };
        let never_ready =
            inner.handshaking.lock().map(|mut h| h.remove(&ses.actor.get_id()).is_some()).unwrap_or(false);
        let link = inner.links.lock().ok().and_then(|mut l| l.remove(&ses.peer_addr));
        if never_ready {
            // A claim the gate accepted, then no session: the cookie was wrong or the handshake
            // stalled, unless it was a duplicate of a link to the same peer that ractor_cluster
            // closed on purpose. Which one is known only a moment later: the dialer judges it.
            if let Some(peer) = link.and_then(|l| l.peer) {
                if let Ok(mut f) = inner.unfinished.lock() {
                    f.push((peer, ses.peer_addr.clone(), Instant::now()));
                }
            }
        }
        let Some(name) = peer_node_name(&ses) else { return };
        let removed = inner.sessions.lock().map(|mut s| {
            if s.get(&name).map(|cur| cur.actor.get_id() == ses.actor.get_id()).unwrap_or(false) {
                s.remove(&name);
                true
            } else {
                false
            }
        });
        if removed.unwrap_or(false) {
            tracing::warn!(peer = %name, "cluster session closed");
            Self::poke(&inner);
        }
    }
}

impl Cluster {
    /// Starts this node's cluster layer: listener, membership, dialer.
    pub async fn start(config: ClusterConfig) -> Result<Cluster, String> {
        let advertised = config.advertised_cluster_addr();
        let host = advertised.rsplit_once(':').map(|(h, _)| h.to_string()).unwrap_or_else(|| advertised.clone());
        // We accept and dial ourselves (see `link`), so the NodeServer's own listener is parked on
        // an ephemeral loopback port, and sealed (below): a local process that finds it gets no
        // session, whatever cookie it holds.
        let listener = tokio::net::TcpListener::bind(config.cluster_listen)
            .await
            .map_err(|e| format!("cannot listen for cluster peers on {}: {e}", config.cluster_listen))?;
        let tls = match config.tls {
            crate::config::TlsMode::Mutual => Some(crate::tls::TlsLinks::load(&config)?),
            crate::config::TlsMode::Off => {
                tracing::warn!(
                    "tls = \"off\": cluster links are plain TCP; anyone on the path can read and alter them"
                );
                None
            }
        };
        // ractor_cluster always opens a listener of its own; sealed, so that nothing reaches a
        // session except through `accept_loop` (TLS, the identity gate, the caps).
        let sealed = crate::tls::sealed_acceptor()?;
        let server = NodeServer::new(
            0,
            config.cookie.clone(),
            config.name.clone(),
            host,
            Some(ractor_cluster::IncomingEncryptionMode::Tls(sealed)),
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr(std::net::IpAddr::from([127, 0, 0, 1]))
        .with_max_inbound_frame_size(crate::raft::MAX_FRAME);
        let (server_ref, _) =
            Actor::spawn(None, server, ()).await.map_err(|e| format!("cannot start the cluster node server: {e}"))?;
        let incarnation = bulkhead_codec::now_ms();
        let config_name = config.name.clone();
        let config_limits = config.limits.clone();
        let (shutdown, _) = tokio::sync::watch::channel(false);
        let inner = Arc::new(Inner {
            config,
            clock: Instant::now(),
            incarnation,
            server: server_ref.clone(),
            membership: Mutex::new(None),
            sessions: Mutex::new(HashMap::new()),
            handshaking: Mutex::new(HashMap::new()),
            known_addrs: Mutex::new(BTreeSet::new()),
            view: RwLock::new(BTreeMap::new()),
            health: RwLock::new(BTreeMap::new()),
            metrics: ClusterMetrics::default(),
            link_faults: Arc::new(LinkFaults::default()),
            breakers: Mutex::new(BTreeMap::new()),
            raft: crate::raft::Registry::new(&config_name),
            leader_hints: RwLock::new(BTreeMap::new()),
            shutdown,
            tls,
            links: Mutex::new(HashMap::new()),
            link_slots: Arc::new(tokio::sync::Semaphore::new(config_limits.cluster_connections)),
            handshake_slots: Arc::new(tokio::sync::Semaphore::new(config_limits.cluster_handshakes)),
            handshakes_per_address: crate::caps::PerAddress::new(config_limits.cluster_handshakes_per_address),
            link_serial: AtomicU64::new(0),
            unfinished: Mutex::new(Vec::new()),
            local_binding: rand::random(),
            draining: std::sync::atomic::AtomicBool::new(false),
            last_tick_ms: AtomicU64::new(0),
        });
        let cluster = Cluster { inner };
        for cap in cluster.config().hosted() {
            cluster.set_health(cap, false, "starting");
        }
        server_ref
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "bulkhead-membership".into(),
                subscription: Box::new(Events { inner: Arc::downgrade(&cluster.inner) }),
            })
            .map_err(|e| format!("cluster listener stopped: {e}"))?;
        let (membership, _) = Actor::spawn(Some("bulkhead.membership".into()), Membership, Arc::new(cluster.clone()))
            .await
            .map_err(|e| format!("cannot start membership: {e}"))?;
        if let Ok(mut m) = cluster.inner.membership.lock() {
            *m = Some(membership);
        }
        Actor::spawn(Some("bulkhead.raft.router".into()), crate::raft::RaftRouter, cluster.raft_port())
            .await
            .map_err(|e| format!("cannot start the raft router: {e}"))?;
        for seed in &cluster.config().seeds {
            cluster.learn_addr(seed);
        }
        tokio::spawn(accept_loop(cluster.clone(), listener));
        tokio::spawn(dialer(cluster.clone()));
        tracing::info!(node = %cluster.config().name, listen = %cluster.config().cluster_listen, "cluster layer started");
        Ok(cluster)
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.inner.config
    }

    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    pub fn metrics(&self) -> &ClusterMetrics {
        &self.inner.metrics
    }

    /// Milliseconds on this process's monotonic clock (the detector's time).
    pub fn now_ms(&self) -> u64 {
        self.inner.clock.elapsed().as_millis() as u64
    }

    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// Stops the dialer, membership and the cluster listener (sessions close with it).
    pub fn shutdown(&self) {
        let _ = self.inner.shutdown.send(true);
        if let Ok(mut m) = self.inner.membership.lock() {
            if let Some(m) = m.take() {
                m.stop(None);
            }
        }
        if let Ok(s) = self.inner.sessions.lock() {
            for ses in s.values() {
                ses.actor.stop_children(None);
                ses.actor.stop(Some("node shutting down".into()));
            }
        }
        self.inner.server.stop_children(None);
        self.inner.server.stop(None);
    }

    /// The node is stopping: its heartbeats say every hosted capability is unhealthy (so no peer
    /// hands a Raft leadership back to it), it refuses `TakeLead`, its replicas stop calling
    /// elections of their own, and its Raft drivers leave membership changes and hand-backs to the
    /// nodes that stay. Leadership it holds is handed away by [`crate::raft::group::hand_over_all`].
    pub fn begin_drain(&self) {
        if self.inner.draining.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        for r in self.inner.raft.all() {
            r.raft.runtime_config().elect(false);
        }
        Events::poke(&self.inner);
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Called by the membership actor on each tick.
    pub(crate) fn note_tick(&self) {
        self.inner.last_tick_ms.store(self.now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// How long since the membership actor last handled a tick (it ticks several times per
    /// heartbeat): past a few heartbeats, the actor system is stuck or the actor is gone.
    pub fn membership_silent_for(&self) -> Duration {
        let last = self.inner.last_tick_ms.load(std::sync::atomic::Ordering::Relaxed);
        Duration::from_millis(self.now_ms().saturating_sub(last))
    }

    // ----- health of local capabilities -----

    pub fn set_health(&self, cap: impl Into<CapabilityId>, ready: bool, detail: &str) {
        let cap = cap.into();
        if let Ok(mut h) = self.inner.health.write() {
            h.insert(cap, CapHealth { ready, detail: detail.to_string() });
        }
    }

    pub fn local_health(&self) -> BTreeMap<CapabilityId, CapHealth> {
        self.inner.health.read().map(|h| h.clone()).unwrap_or_default()
    }

    pub(crate) fn unhealthy_local(&self) -> Vec<CapabilityId> {
        if self.is_draining() {
            return self.config().hosted();
        }
        self.local_health().into_iter().filter(|(_, h)| !h.ready).map(|(c, _)| c).collect()
    }

    // ----- sessions and addresses -----

    pub(crate) fn learn_addr(&self, addr: &str) {
        if addr.is_empty() || addr == self.config().advertised_cluster_addr() {
            return;
        }
        if let Ok(mut k) = self.inner.known_addrs.lock() {
            k.insert(addr.to_string());
        }
    }

    pub(crate) fn connected_names(&self) -> BTreeSet<String> {
        self.inner.sessions.lock().map(|s| s.keys().cloned().collect()).unwrap_or_default()
    }

    /// The cluster addresses of connected peers: the address dialled for sessions we opened, and
    /// the address each peer advertises in its heartbeats (an accepted socket's own address is an
    /// ephemeral port, of no use to dial).
    pub(crate) fn connected_addrs(&self) -> Vec<String> {
        let view = self.inner.view.read().map(|v| v.clone()).unwrap_or_default();
        let Ok(sessions) = self.inner.sessions.lock() else { return Vec::new() };
        let mut out = Vec::new();
        for (name, ses) in sessions.iter() {
            if !ses.is_server {
                out.push(crate::link::label_addr(&ses.peer_addr).to_string());
            }
            if let Some(v) = view.get(name).filter(|v| !v.addr.is_empty()) {
                out.push(v.addr.clone());
            }
        }
        out
    }

    /// The advertised cluster addresses of connected peers: what heartbeats gossip. Dialled
    /// spellings (a seed written as a DNS name, say) stay local, or every node would learn an alias
    /// it can never match to a session and dial it forever.
    pub(crate) fn connected_advertised(&self) -> Vec<String> {
        let view = self.inner.view.read().map(|v| v.clone()).unwrap_or_default();
        self.connected_names()
            .into_iter()
            .filter_map(|n| view.get(&n).map(|v| v.addr.clone()))
            .filter(|a| !a.is_empty())
            .collect()
    }

    /// The member of process group `group` that lives on `node`, with the channel binding of the
    /// link it is reached over (what a heartbeat or a Raft RPC sent to it carries; empty without
    /// TLS). For this node: a local actor, with a binding only this process knows. For another:
    /// the stub of `node`'s own session (any peer may join any process group, so a group named
    /// for n2 may also hold an actor a misbehaving n3 put there). `None`: no session with `node`,
    /// or nothing of `group` on it.
    pub(crate) fn member_on(&self, group: &str, node: &str) -> Option<(ractor::ActorCell, Vec<u8>)> {
        let (session, binding) = if node == self.name() {
            (None, self.inner.local_binding.to_vec())
        } else {
            let (node_id, label) =
                self.inner.sessions.lock().ok()?.get(node).map(|ses| (ses.node_id, ses.peer_addr.clone()))?;
            let binding = self.inner.links.lock().ok().and_then(|l| l.get(&label).and_then(|i| i.binding));
            (Some(node_id), binding.map(|b| b.to_vec()).unwrap_or_default())
        };
        let cell = ractor::pg::get_members(&group.to_string()).into_iter().find(|m| match (m.get_id(), session) {
            (ractor::ActorId::Local(_), None) => true,
            (ractor::ActorId::Remote { node_id, .. }, Some(id)) => node_id == id,
            _ => false,
        })?;
        Some((cell, binding))
    }

    /// Whether a heartbeat that names `node` and carries `binding` came over a link of `node`.
    pub(crate) fn vouches_for(&self, node: &str, binding: &[u8]) -> bool {
        if node == self.name() {
            // Only this process knows its own binding (a call to one of its own actors).
            return binding == self.inner.local_binding.as_slice();
        }
        let connected = self.inner.sessions.lock().map(|s| s.contains_key(node)).unwrap_or(false);
        let Ok(links) = self.inner.links.lock() else { return false };
        vouched(self.inner.tls.is_some(), links.values(), connected, node, binding)
    }

    /// Whether `node` was heard from since this process started.
    pub(crate) fn heard_from(&self, node: &str) -> bool {
        self.inner.view.read().ok().is_some_and(|v| v.get(node).is_some_and(|n| n.pid.is_some()))
    }

    /// The fault switch on every cluster link of this node (used by `/admin/partition`).
    pub fn link_faults(&self) -> &LinkFaults {
        &self.inner.link_faults
    }

    /// Force-closes the session with `node` (declared down): stubs go, pending calls fail at once.
    pub(crate) fn close_session(&self, node: &str) {
        let ses = self.inner.sessions.lock().ok().and_then(|mut s| s.remove(node));
        if let Some(ses) = ses {
            ses.actor.stop_children(Some("peer declared down".into()));
            ses.actor.stop(Some("peer declared down".into()));
        }
    }

    // ----- the view -----

    pub(crate) fn set_view(&self, nodes: BTreeMap<String, NodeView>) {
        if let Ok(mut v) = self.inner.view.write() {
            *v = nodes;
        }
    }

    /// Every node this node knows of, including itself.
    pub fn view(&self) -> BTreeMap<String, NodeView> {
        self.inner.view.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// This node's verdict on `node` (itself is always up; a node never heard from is down).
    pub fn status_of(&self, node: &str) -> Status {
        if node == self.name() {
            return Status::Up;
        }
        self.inner.view.read().ok().and_then(|v| v.get(node).map(|n| n.status)).unwrap_or(Status::Down)
    }

    /// Whether `node` may be sent requests for `cap`: up or suspect, not refused, capability healthy.
    pub fn is_routable(&self, cap: impl Into<CapabilityId>, node: &str) -> bool {
        let cap = cap.into();
        if node == self.name() {
            return self.local_health().get(&cap).map(|h| h.ready).unwrap_or(false);
        }
        self.inner
            .view
            .read()
            .ok()
            .and_then(|v| {
                v.get(node).map(|n| n.status != Status::Down && n.reason.is_none() && !n.unhealthy.contains(&cap))
            })
            .unwrap_or(false)
    }

    // ----- circuit breakers -----

    /// Asks the breaker of (`cap`, `node`) whether a call may go now.
    fn admit(&self, cap: CapabilityId, node: &str) -> Result<Ticket, CallError> {
        let now = self.now_ms();
        let admit = match self.inner.breakers.lock() {
            Ok(mut b) => {
                b.entry((cap, node.to_string())).or_insert_with(|| Breaker::new(BreakerConfig::default())).admit(now)
            }
            // A poisoned lock must not stop calls: the breaker is advice, the timeout is the guard.
            Err(_) => return Ok(Breaker::new(BreakerConfig::default()).admit(now).ticket()),
        };
        match admit {
            Admit::Call(t) => Ok(t),
            Admit::Reject { retry_in_ms } => {
                self.inner.metrics.breaker_rejections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(CallError::Unreachable {
                    capability: cap,
                    node: node.to_string(),
                    reason: format!("circuit breaker open after repeated failures; next try in {retry_in_ms} ms"),
                })
            }
        }
    }

    fn with_breaker(&self, cap: CapabilityId, node: &str, f: impl FnOnce(&mut Breaker)) {
        if let Ok(mut b) = self.inner.breakers.lock() {
            if let Some(b) = b.get_mut(&(cap, node.to_string())) {
                f(b);
            }
        }
    }

    /// Closes every breaker of `node` (the detector saw it come back: start from a clean slate).
    pub(crate) fn reset_breakers(&self, node: &str) {
        if let Ok(mut b) = self.inner.breakers.lock() {
            for ((_, n), br) in b.iter_mut() {
                if n == node {
                    br.reset();
                }
            }
        }
    }

    /// The state of the breaker of (`cap`, `node`); closed if never called.
    pub fn breaker_state(&self, cap: impl Into<CapabilityId>, node: &str) -> BreakerState {
        let cap = cap.into();
        let now = self.now_ms();
        self.inner
            .breakers
            .lock()
            .ok()
            .and_then(|b| b.get(&(cap, node.to_string())).map(|br| br.state(now)))
            .unwrap_or(BreakerState::Closed)
    }

    /// The state of every breaker this node has, by (capability, member); a pair never called is closed.
    pub fn breaker_states(&self) -> BTreeMap<(CapabilityId, String), BreakerState> {
        let now = self.now_ms();
        self.inner
            .breakers
            .lock()
            .map(|b| b.iter().map(|(k, br)| (k.clone(), br.state(now))).collect())
            .unwrap_or_default()
    }

    // ----- the registry and the call path -----

    /// The gateway of `cap` on `node`, looked up afresh (a reconnect makes new stubs), and this
    /// node as the sender of a request to it (with the binding of the link it goes over).
    pub fn member(&self, cap: impl Into<CapabilityId>, node: &str) -> Result<(ActorRef<WireMsg>, Sender), CallError> {
        let cap = cap.into();
        self.remotable(&group_name(cap, node), cap, node, &format!("no {cap} member is registered on {node}"))
            .map(|(actor, binding)| (actor, Sender { node: self.name().to_string(), binding }))
    }

    /// The member of pg group `group` on `node` ([`Cluster::member_on`]) and its link's binding,
    /// unless the view has `node` down (fail fast, nothing sent). `cap` labels the error; `absent`
    /// says what is missing when nothing is registered.
    fn remotable(
        &self,
        group: &str,
        cap: CapabilityId,
        node: &str,
        absent: &str,
    ) -> Result<(ActorRef<WireMsg>, Vec<u8>), CallError> {
        self.reachable(group, node, absent).map_err(|reason| CallError::Unreachable {
            capability: cap,
            node: node.to_string(),
            reason,
        })
    }

    /// [`Self::remotable`], with the reason it is not as the error.
    fn reachable(&self, group: &str, node: &str, absent: &str) -> Result<(ActorRef<WireMsg>, Vec<u8>), String> {
        if let Some(reason) = self.down_reason(node) {
            return Err(reason);
        }
        self.member_on(group, node)
            .map(|(cell, binding)| (ActorRef::from(cell), binding))
            .ok_or_else(|| absent.to_string())
    }

    /// Why `node` is down in this node's view, if it is (this node never is).
    pub(crate) fn down_reason(&self, node: &str) -> Option<String> {
        if node == self.name() {
            return None;
        }
        // One read of the view for both the status and the reason (this is the fail-fast path).
        match self.inner.view.read() {
            Ok(v) => match v.get(node) {
                Some(n) if n.status != Status::Down => None,
                Some(n) => Some(n.reason.as_ref().map_or_else(|| "node is down".into(), ToString::to_string)),
                None => Some("node is down".into()),
            },
            Err(_) => Some("node is down".into()),
        }
    }

    /// Calls `cap` on `node` with the default call timeout.
    pub async fn call<Req: Record, Resp: Record>(
        &self,
        cap: impl Into<CapabilityId>,
        node: &str,
        req: &Req,
        traceparent: &str,
    ) -> Result<Resp, CallError> {
        let cap = cap.into();
        let t = Duration::from_millis(self.config().timing.call_timeout_ms);
        self.call_with_timeout(cap, node, req, traceparent, t).await
    }

    pub async fn call_with_timeout<Req: Record, Resp: Record>(
        &self,
        cap: impl Into<CapabilityId>,
        node: &str,
        req: &Req,
        traceparent: &str,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let cap = cap.into();
        use std::sync::atomic::Ordering::Relaxed;
        use tracing::Instrument;
        self.inner.metrics.calls.fetch_add(1, Relaxed);
        let started = std::time::Instant::now();
        let (span, traceparent) = crate::traced_span!("cluster.call", traceparent, capability = %cap, node = %node);
        // A down node fails fast in `member` (nothing sent, no vote for the breaker); a member that
        // keeps failing trips its breaker, and then calls fail fast here without being sent.
        let result = match self.member(cap, node).and_then(|to| Ok((to, self.admit(cap, node)?))) {
            Ok(((actor, from), ticket)) => {
                let mut pending = Outcome { cluster: self, cap, node, ticket: Some(ticket) };
                let result = call(&actor, cap, node, from, req, &traceparent, timeout).instrument(span.clone()).await;
                pending.record(&result);
                result
            }
            Err(e) => Err(e),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        metrics::histogram!("bulkhead_cluster_call_duration_seconds", "capability" => cap.label(), "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.inner.metrics.call_errors.fetch_add(1, Relaxed);
            span.in_scope(|| tracing::debug!(error = %e, "cluster call failed"));
        }
        result
    }

    // ----- Raft groups -----

    /// The Raft layer's view of this node ([`crate::raft::RaftPort`]).
    pub fn raft_port(&self) -> crate::raft::Port {
        Arc::new(self.clone())
    }

    /// This node's Raft replicas.
    pub fn raft(&self) -> &crate::raft::Registry {
        &self.inner.raft
    }

    /// Sends one Raft RPC to the raft router on `node` (the cluster call path, no breaker: Raft
    /// backs off on its own). `cap` only labels errors.
    pub async fn raft_call(
        &self,
        node: &str,
        cap: CapabilityId,
        rpc: crate::raft::RaftRpc,
        timeout: Duration,
    ) -> Result<crate::raft::RaftRpcReply, CallError> {
        let group = crate::raft::network::router_group(node);
        let (actor, binding) = self.remotable(&group, cap, node, &format!("no raft router is registered on {node}"))?;
        // The call carries its sender and binding itself: the envelope need not say them again.
        let rpc = crate::raft::network::RaftCall { from: self.name().to_string(), binding, rpc };
        crate::call::send(&actor, cap, node, None, &rpc, "", timeout).await
    }

    /// Sends a lane's frame to the raft router on `node` ([`crate::raft::lanes`]): one
    /// fire-and-forget message, refused here if the node has no router. Whether to send to a
    /// node seen down is the lane's choice (`FrameSink::down`).
    pub fn raft_frame(
        &self,
        node: &str,
        items: Vec<crate::raft::rpc::LaneItem>,
    ) -> Result<(), crate::raft::lanes::NotSent> {
        use crate::raft::lanes::NotSent;
        let group = crate::raft::network::router_group(node);
        let (cell, binding) =
            self.member_on(&group, node).ok_or_else(|| NotSent(format!("no raft router is registered on {node}")))?;
        let frame = crate::raft::rpc::RaftFrame { from: self.name().to_string(), binding, items };
        let bytes = crate::wire::seal(&frame, "");
        if bytes.len() as u64 > crate::raft::MAX_FRAME {
            // Never by construction (lanes::FRAME_BYTES); a link would close on it.
            return Err(NotSent(format!("a raft frame of {} bytes is over the link's limit", bytes.len())));
        }
        ActorRef::<WireMsg>::from(cell).cast(WireMsg::Tell(bytes)).map_err(|e| NotSent(format!("could not send: {e}")))
    }

    /// The shard of a replicated capability that owns `key`.
    pub fn shard_of(&self, cap: impl Into<CapabilityId>, key: &[u8]) -> u32 {
        let cap = cap.into();
        self.config().shard_map.shard_for(cap, key)
    }

    /// Where to send a request for a shard: the leader this node's own replica knows, else the
    /// last leader another node named, else the shard's preferred node (which answers with the
    /// leader if it is not it). `None`: this node's replica knows there is no leader right now.
    pub fn leader_of(&self, cap: impl Into<CapabilityId>, shard: u32) -> Option<String> {
        let cap = cap.into();
        let group = crate::raft::GroupId { capability: cap, shard };
        if let Some(r) = self.inner.raft.get(group) {
            return r.leader();
        }
        if let Some(hint) = self.inner.leader_hints.read().ok().and_then(|h| h.get(&(cap, shard)).cloned()) {
            if self.status_of(&hint) != Status::Down {
                return Some(hint);
            }
        }
        let shards = self.config().shard_map.shards(cap);
        shards
            .iter()
            .find(|p| p.shard == shard)
            .map(|p| p.replicas.iter().find(|n| self.status_of(n) != Status::Down).unwrap_or(&p.replicas[0]).clone())
    }

    /// Calls the leader of `shard` of `cap`; a member that answers "not the leader, X is"
    /// ([`LeaderReply`]) is followed.
    ///
    /// No leader known, or a member that answers "no leader known" (a leader handing over to the
    /// preferred node, a follower whose leader just went): an election is under way. If this node
    /// has a replica of the group, the call waits for it to name the new leader (at most two
    /// election timeouts at a time, `timeout` in all) and goes there; a hand-over costs a client
    /// some milliseconds, not a 503. If none came while a majority is up, the member that said "no
    /// leader" is asked again: a hand-over called off (its target did not catch up in time)
    /// leaves the old leader leading in the same term, and an election slowed by a loaded machine
    /// may need a second wait. At most `LEADER_ATTEMPTS` sends; then `NoLeader` (nothing
    /// recorded), at once when a majority of the group's replicas is down or this node has no
    /// replica of the group.
    pub async fn call_leader<Req: Record, Resp: Record + LeaderReply>(
        &self,
        cap: impl Into<CapabilityId>,
        shard: u32,
        req: &Req,
        traceparent: &str,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let cap = cap.into();
        let no_leader = |node: &str| CallError::NoLeader { capability: cap, shard, node: node.to_string() };
        // Waiting for a leader never goes past `timeout` in all; each send has `timeout` of its
        // own (a `Place` waits its saga's budget on the leader, however long the search took).
        let deadline = std::time::Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(std::time::Instant::now());
        let mut target = match self.leader_of(cap, shard) {
            Some(target) => target,
            None => match self.wait_for_new_leader(cap, shard, None, timeout).await {
                NextLeader::Named(target) => target,
                NextLeader::NoneYet | NextLeader::Hopeless => return Err(no_leader(self.name())),
            },
        };
        for attempt in 1..=LEADER_ATTEMPTS {
            let resp: Resp = self.call_with_timeout(cap, &target, req, traceparent, timeout).await?;
            let next = match resp.not_leader() {
                None => return Ok(resp),
                Some(Some(leader)) if leader != target => leader,
                Some(_) => match self.wait_for_new_leader(cap, shard, Some(&target), left()).await {
                    NextLeader::Named(leader) => leader,
                    // The old leader may have called its hand-over off (the target did not catch
                    // up in time) and lead on in the same term, or the election outlasted one
                    // wait (a loaded machine): ask it again while time is left.
                    NextLeader::NoneYet => target.clone(),
                    NextLeader::Hopeless => return Err(no_leader(&target)),
                },
            };
            if attempt == LEADER_ATTEMPTS || left().is_zero() {
                return Err(no_leader(&next));
            }
            if next != target {
                if let Ok(mut h) = self.inner.leader_hints.write() {
                    h.insert((cap, shard), next.clone());
                }
            }
            target = next;
        }
        Err(no_leader(&target))
    }

    /// Waits up to `bound` for this node to know a new leader of the group: one on another node
    /// than `old`, or `old` again in a later term. From this node's replica when it has one (it
    /// hears the election); else from the leader hints and the failure detector, looked at every
    /// 25 ms. `None` if none came. A caller holding an Idempotency-Key uses it to stop waiting on
    /// a leader that died with its request and ask the new one.
    pub async fn new_leader(
        &self,
        cap: impl Into<CapabilityId>,
        shard: u32,
        old: Option<&str>,
        bound: Duration,
    ) -> Option<String> {
        let cap = cap.into();
        if let Some(replica) = self.inner.raft.get(crate::raft::GroupId { capability: cap, shard }) {
            return replica.wait_for_new_leader(old, bound).await;
        }
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            match self.leader_of(cap, shard) {
                Some(now) if Some(now.as_str()) != old => return Some(now),
                _ if tokio::time::Instant::now() >= deadline => return None,
                _ => tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + HINT_POLL)).await,
            }
        }
    }

    /// The leader this node's replica of the group names next (other than `old`), waiting at most
    /// two election timeouts (never longer than `timeout`).
    async fn wait_for_new_leader(
        &self,
        cap: CapabilityId,
        shard: u32,
        old: Option<&str>,
        timeout: Duration,
    ) -> NextLeader {
        let Some(replica) = self.inner.raft.get(crate::raft::GroupId { capability: cap, shard }) else {
            return NextLeader::Hopeless;
        };
        if let crate::raft::ShardHealth::MajorityLost { .. } = replica.health(self) {
            return NextLeader::Hopeless;
        }
        let bound = Duration::from_millis(2 * self.config().timing.election_timeout_ms).min(timeout);
        match replica.wait_for_new_leader(old, bound).await {
            Some(leader) => NextLeader::Named(leader),
            None => NextLeader::NoneYet,
        }
    }
}

/// Judges a heartbeat's sender. With TLS: the binding must be that of a live link whose peer
/// claimed `node` at the gate (with its certificate naming it); nobody but the two ends of that
/// link knows it. Without TLS there is nothing to bind to: a session with `node` must exist.
fn vouched<'a>(
    tls: bool,
    mut links: impl Iterator<Item = &'a LinkInfo>,
    connected: bool,
    node: &str,
    binding: &[u8],
) -> bool {
    if !tls {
        return connected;
    }
    links.any(|l| l.peer.as_deref() == Some(node) && l.binding.is_some_and(|b| b.as_slice() == binding))
}

/// How many times one [`Cluster::call_leader`] sends its request: to the leader it knows, to the
/// one a member names, and again through an election or a hand-over that outlasts one wait.
const LEADER_ATTEMPTS: usize = 4;

/// How often [`Cluster::new_leader`] looks again when this node has no replica of the group.
const HINT_POLL: Duration = Duration::from_millis(25);

/// What waiting for a group's next leader found.
enum NextLeader {
    Named(String),
    /// None within the bound, with a majority up: an election or a hand-over may still end.
    NoneYet,
    /// No local replica to ask, or a majority of the group's replicas is down: no election can end.
    Hopeless,
}

/// A replicated capability's reply type says when it was answered by a replica that does not
/// lead: `Some(Some(x))` "X leads", `Some(None)` "no leader known".
pub trait LeaderReply {
    fn not_leader(&self) -> Option<Option<String>>;
}

/// Accepts peers' connections and hands each to [`open_link`] (caps first).
async fn accept_loop(cluster: Cluster, listener: tokio::net::TcpListener) {
    let mut shutdown = cluster.inner.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((tcp, from)) => {
                // Cut off: the connection is held open and never answered (a black hole, not a refusal).
                let Some(tcp) = cluster.inner.link_faults.hold_if_cut(tcp) else { continue };
                // One address's share first: a flood from it must not reach the shared caps.
                let Some(own) = cluster.inner.handshakes_per_address.try_take(from.ip()) else {
                    cluster.inner.metrics.refused(LinkRefusal::AddressCap);
                    tracing::debug!(%from, "cluster connection refused: cluster_handshakes_per_address in progress");
                    continue;
                };
                let Ok(slot) = cluster.inner.link_slots.clone().try_acquire_owned() else {
                    cluster.inner.metrics.refused(LinkRefusal::ConnectionCap);
                    tracing::debug!(%from, "cluster connection refused: cluster_connections open");
                    continue;
                };
                let Ok(handshake) = cluster.inner.handshake_slots.clone().try_acquire_owned().map(|h| (h, own)) else {
                    cluster.inner.metrics.refused(LinkRefusal::HandshakeCap);
                    tracing::debug!(%from, "cluster connection refused: cluster_handshakes in progress");
                    continue;
                };
                let serial = cluster.inner.link_serial.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let cluster = cluster.clone();
                tokio::spawn(async move {
                    let label = format!("{from}#{serial}");
                    if let Err(e) = open_link(&cluster, tcp, label, true, slot, Some(handshake)).await {
                        tracing::debug!(%from, error = %e, "incoming cluster connection refused");
                    }
                });
            }
            // Out of file descriptors and the like: say so, breathe, go on.
            Err(e) => {
                tracing::warn!(error = %e, "accepting a cluster connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// TLS (unless off) within the handshake deadline, then the gate, then the node server.
/// `handshake` (an incoming link's) is given back when its session is ready (or the link goes).
async fn open_link(
    cluster: &Cluster,
    tcp: tokio::net::TcpStream,
    label: String,
    incoming: bool,
    slot: tokio::sync::OwnedSemaphorePermit,
    handshake: Option<HandshakeSlot>,
) -> Result<(), String> {
    let inner = &cluster.inner;
    let (io, expect, binding) = match &inner.tls {
        None => (LinkIo::Plain(tcp), Expect::Nothing, None),
        Some(tls) => {
            use crate::tls::peer_and_binding;
            let handshaken = async {
                if incoming {
                    let s = tls.acceptor.accept(tcp).await?;
                    let peer = peer_and_binding::<rustls::server::ServerConnectionData>(s.get_ref().1);
                    Ok::<_, std::io::Error>((tokio_rustls::TlsStream::from(s), peer))
                } else {
                    let s = tls.connector.connect(TlsLinks::dial_name(), tcp).await?;
                    let peer = peer_and_binding::<rustls::client::ClientConnectionData>(s.get_ref().1);
                    Ok((tokio_rustls::TlsStream::from(s), peer))
                }
            };
            let (stream, peer) = match tokio::time::timeout(HANDSHAKE_DEADLINE, handshaken).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    inner.metrics.refused(LinkRefusal::Tls);
                    return Err(format!("TLS handshake failed: {e}"));
                }
                Err(_) => {
                    inner.metrics.refused(LinkRefusal::Tls);
                    return Err("no TLS handshake within the deadline".into());
                }
            };
            let Some((cert, binding)) = peer else {
                inner.metrics.refused(LinkRefusal::Tls);
                return Err("the peer showed no certificate".into());
            };
            (LinkIo::Tls(Box::new(stream)), Expect::Cert(cert), Some(binding))
        }
    };
    if let Ok(mut l) = inner.links.lock() {
        l.insert(label.clone(), LinkInfo { peer: None, binding, handshake });
    }
    let events = LinkEvents { inner: Arc::downgrade(&cluster.inner), label: label.clone() };
    let known = Arc::new(cluster.config().shard_map.all_nodes().into_iter().collect());
    let gate = Gate::new(expect, incoming).knowing(known);
    let link = Box::new(LinkStream::new(
        io,
        inner.link_faults.clone(),
        label.clone(),
        Some((gate, Box::new(events))),
        Some(slot),
    ));
    let refused = |e: String| {
        if let Ok(mut l) = inner.links.lock() {
            l.remove(&label);
        }
        e
    };
    if incoming {
        let msg = NodeServerMessage::ConnectionOpenedExternal { stream: link, is_server: true };
        inner.server.cast(msg).map_err(|_| refused("the cluster node server stopped".into()))
    } else {
        ractor_cluster::client_connect_external(&inner.server, link)
            .await
            .map_err(|e| refused(format!("the node server refused the link: {e}")))
    }
}

/// What a link's gate tells the node; its drop (the link's reader going) forgets the link.
struct LinkEvents {
    inner: std::sync::Weak<Inner>,
    label: String,
}

impl Drop for LinkEvents {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            if let Ok(mut l) = inner.links.lock() {
                l.remove(&self.label);
            }
        }
    }
}

impl GateEvents for LinkEvents {
    fn claimed(&self, node: &str) {
        if let Some(inner) = self.inner.upgrade() {
            if let Ok(mut l) = inner.links.lock() {
                if let Some(i) = l.get_mut(&self.label) {
                    i.peer = Some(node.to_string());
                }
            }
        }
    }

    fn refused(&self, why: &Refusal) {
        let Some(inner) = self.inner.upgrade() else { return };
        tracing::warn!(link = %self.label, "cluster connection refused: {why}");
        inner.metrics.refused(match why {
            Refusal::Garbage(_) => LinkRefusal::Garbage,
            Refusal::WrongName { .. } => LinkRefusal::WrongName,
            Refusal::Stranger { .. } => LinkRefusal::Stranger,
        });
    }
}

/// Reports a call's outcome to its breaker; if the caller's future is dropped mid-call, the drop
/// frees the probe slot (otherwise a half-open breaker would wait for a result that never comes).
struct Outcome<'a> {
    cluster: &'a Cluster,
    cap: CapabilityId,
    node: &'a str,
    ticket: Option<Ticket>,
}

impl Outcome<'_> {
    fn record<T>(&mut self, result: &Result<T, CallError>) {
        let Some(t) = self.ticket.take() else { return };
        let now = self.cluster.now_ms();
        self.cluster.with_breaker(self.cap, self.node, |b| match result {
            // A refusal is the member answering: it is alive, the request is what it refused.
            Ok(_) | Err(CallError::Rejected { .. } | CallError::Busy { .. } | CallError::NoLeader { .. }) => {
                b.on_success(t)
            }
            Err(CallError::Unreachable { .. } | CallError::TimedOut { .. } | CallError::Lost { .. }) => {
                b.on_failure(t, now, rand::random::<f64>())
            }
        });
    }
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.cluster.with_breaker(self.cap, self.node, |b| b.abandon(t));
        }
    }
}

/// How long a cluster session may take from TCP accept/connect to ready.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(3);

/// A link that closed before its session was ready, a second ago: a failed handshake (a wrong
/// cookie, a stalled peer) unless its peer has a session by now (it was a duplicate).
fn judge_unfinished(cluster: &Cluster, now: Instant) {
    let inner = &cluster.inner;
    let due: Vec<(String, String)> = match inner.unfinished.lock() {
        Ok(mut f) => {
            let (due, wait): (Vec<_>, Vec<_>) =
                f.drain(..).partition(|(_, _, at)| now.duration_since(*at) >= Duration::from_secs(1));
            *f = wait;
            due.into_iter().map(|(p, l, _)| (p, l)).collect()
        }
        Err(_) => return,
    };
    let connected = cluster.connected_names();
    for (peer, label) in due.into_iter().filter(|(p, _)| !connected.contains(p)) {
        tracing::warn!(%peer, link = %label, "cluster handshake failed: a wrong cookie, or no answer in time");
        inner.metrics.refused(LinkRefusal::Handshake);
    }
}

/// Dials every known address that has no live session, with per-address backoff.
async fn dialer(cluster: Cluster) {
    let mut shutdown = cluster.inner.shutdown.subscribe();
    let mut backoff: HashMap<String, (Duration, Instant)> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = shutdown.changed() => return,
        }
        let now = Instant::now();
        // ractor_cluster has no handshake deadline: a session to a paused peer (whose kernel still
        // accepts TCP) or from a client that never authenticates would wait forever. Close them.
        let mut in_progress = BTreeSet::new();
        if let Ok(mut h) = cluster.inner.handshaking.lock() {
            h.retain(|_, (ses, opened)| {
                if now.duration_since(*opened) < HANDSHAKE_DEADLINE {
                    in_progress.insert(crate::link::label_addr(&ses.peer_addr).to_string());
                    return true;
                }
                tracing::debug!(addr = %ses.peer_addr, "closing a session that never finished its handshake");
                ses.actor.stop_children(Some("handshake deadline".into()));
                ses.actor.stop(Some("handshake deadline".into()));
                false
            });
        }
        judge_unfinished(&cluster, now);
        // A cut-off node reaches nobody: dialling would only pile up held sockets.
        if cluster.inner.link_faults.is_cut() {
            continue;
        }
        let known: Vec<String> =
            cluster.inner.known_addrs.lock().map(|k| k.iter().cloned().collect()).unwrap_or_default();
        let connected: BTreeSet<String> = cluster.connected_addrs().into_iter().collect();
        for addr in known {
            if connected.contains(&addr) {
                backoff.remove(&addr);
                continue;
            }
            if in_progress.contains(&addr) {
                continue;
            }
            let entry = backoff.entry(addr.clone()).or_insert((Duration::from_millis(100), now));
            if entry.1 > now {
                continue;
            }
            // Next attempt no sooner than the backoff; a handshake in progress gets that long too.
            entry.1 = now + entry.0;
            entry.0 = (entry.0 * 2).min(Duration::from_secs(2));
            cluster.inner.metrics.dials.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Our own dials take link slots too, but never a handshake slot: a flood of strangers
            // holds at most `cluster_handshakes` slots, and must not stop this node reaching its peers.
            let Ok(slot) = cluster.inner.link_slots.clone().try_acquire_owned() else { continue };
            let serial = cluster.inner.link_serial.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let cluster = cluster.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr.as_str())).await
                {
                    Ok(Ok(tcp)) => {
                        let label = format!("{addr}#{serial}");
                        match open_link(&cluster, tcp, label, false, slot, None).await {
                            Ok(()) => tracing::debug!(%addr, "dialled peer"),
                            Err(e) => tracing::debug!(%addr, error = %e, "dial refused"),
                        }
                    }
                    Ok(Err(e)) => tracing::debug!(%addr, error = %e, "dial failed"),
                    Err(_) => tracing::debug!(%addr, "dial timed out"),
                }
            });
        }
    }
}

#[cfg(test)]
mod vouch_tests {
    use super::*;

    #[test]
    fn a_heartbeat_is_believed_only_with_the_binding_of_a_link_of_the_node_it_names() {
        let link = |peer: Option<&str>, b: u8| LinkInfo {
            peer: peer.map(String::from),
            binding: Some([b; 32]),
            handshake: None,
        };
        let links = [link(Some("n2"), 2), link(Some("n3"), 3), link(None, 4)];
        assert!(vouched(true, links.iter(), true, "n2", &[2; 32]));
        // n3 knows its own link's binding, not n2's: it cannot speak for n2.
        assert!(!vouched(true, links.iter(), true, "n2", &[3; 32]));
        assert!(!vouched(true, links.iter(), true, "n2", &[]));
        // A link whose claim the gate has not accepted vouches for nobody.
        assert!(!vouched(true, links.iter(), true, "n4", &[4; 32]));
        // Without TLS: a session with the node is all there is.
        assert!(vouched(false, [].iter(), true, "n2", &[]));
        assert!(!vouched(false, [].iter(), false, "n2", &[]));
    }
}
