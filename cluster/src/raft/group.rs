//! The driver that looks after this node's replica of a group ([`super::replica`]): bootstrap, noticing a member that came back with a new store,
//! handing leadership back to the preferred node, and a quick election when the failure
//! detector sees the leader's node go down; and a stopping node's hand-over of every group it
//! leads to an up-to-date voter ([`hand_over_all`]).
//!
//! Nothing here decides anything two nodes must agree on: the driver only *asks* Raft
//! (`initialize` on one node, membership changes on the leader, an election), and Raft decides.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_codec::now_ms;
use bulkhead_storage::{Batch, NodeLog, Store, StoreError};
use openraft::{BasicNode, ChangeMembers, Config, ServerState, SnapshotPolicy};

use super::log_store::LogStore;
use super::network::Network;
use super::port::{Port, RaftPort};
use super::replica::{known_leader, Leadership, Replica};
use super::rpc::{RaftRpc, RaftRpcReply};
use super::state_machine::{Machine, StateMachineStore};
use super::types::{member_id, GroupId, Identity, MemberId, Raft, IDENTITY};
use crate::call::CallError;
use crate::config::ShardPlacement;
use crate::detector::Status;

/// Raft timing for every group, from `[timing]`.
pub fn raft_config(t: &crate::config::Timing, group: GroupId) -> Result<Config, String> {
    Config {
        cluster_name: format!("bulkhead-{group}"),
        heartbeat_interval: t.raft_heartbeat_ms,
        election_timeout_min: t.election_timeout_ms,
        election_timeout_max: lease_ms(t),
        // Snapshots are taken by the driver (`snapshot_due`), not at a fixed count that every
        // replica of every group reaches at the same moment.
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: 1_000,
        install_snapshot_timeout: 2_000,
        // Bounded so that no Raft message outgrows the links' frame limit (`MAX_FRAME`).
        max_payload_entries: super::MAX_PAYLOAD_ENTRIES,
        snapshot_max_chunk_size: super::SNAPSHOT_CHUNK,
        ..Default::default()
    }
    .validate()
    .map_err(|e| format!("raft config of {group}: {e}"))
}

/// openraft's leader lease (its `election_timeout_max`): a follower that heard from its leader
/// within it refuses every vote.
fn lease_ms(t: &crate::config::Timing) -> u64 {
    t.election_timeout_ms + t.election_timeout_ms / 2
}

/// Reads this store's identity, or draws a new incarnation if the store is new (or was wiped).
fn identity(store: &Store, node: &str, group: GroupId) -> Result<Identity, StoreError> {
    if let Some(id) = IDENTITY.get(store, &0)? {
        if id.node == node && id.group == group {
            return Ok(id);
        }
        return Err(StoreError::Io(format!(
            "this store belongs to {} in group {}, not to {node} in {group}: refusing to use it",
            id.node, id.group
        )));
    }
    let id = Identity { node: node.to_string(), group, incarnation: rand::random(), created_ms: now_ms() };
    let mut b = Batch::new();
    IDENTITY.put(&mut b, &0, &id);
    store.apply_in_order(b)?;
    tracing::info!(%group, incarnation = id.incarnation, "empty store: this node joins the group as a new member");
    Ok(id)
}

/// Starts this node's replica of `group`, with its log in the node log `log` and its state in
/// `store`, applying commands with `machine`.
pub async fn start<M: Machine>(
    cluster: &Port,
    group: GroupId,
    placement: ShardPlacement,
    log: NodeLog,
    store: Store,
    machine: M,
) -> Result<Replica, String> {
    let node = cluster.name().to_string();
    let ident = identity(&store, &node, group).map_err(|e| e.to_string())?;
    store.sync().await.map_err(|e| e.to_string())?;
    super::log_store::open_group_log(&log, &store, group, ident.incarnation)
        .await
        .map_err(|e| format!("preparing the node log for {group}: {e}"))?;
    let member = member_id(&node, ident.incarnation);
    let config = Arc::new(raft_config(cluster.timing(), group)?);
    let network = Network { cluster: cluster.clone(), group };
    let sm = StateMachineStore::new(store.clone(), Arc::new(machine));
    let state_records = sm.state_records();
    let log_store = LogStore::new(log, store.clone(), group.log_stream(ident.incarnation));
    let raft = Raft::new(member, config, network, log_store, sm.clone())
        .await
        .map_err(|e| format!("cannot start the raft replica of {group}: {e}"))?;
    let proposal_timeout = Duration::from_millis(cluster.timing().call_timeout_ms);
    let replica = Replica::new(group, member, raft, placement, sm, proposal_timeout, state_records);
    cluster.raft().insert(replica.clone());
    tokio::spawn(drive(cluster.clone(), replica.clone()));
    tokio::spawn(watch_leadership(replica.clone()));
    tracing::info!(%group, member = format_args!("{member:x}"), "raft replica started");
    Ok(replica)
}

/// Stops a replica (node shutdown).
pub async fn stop(cluster: &dyn RaftPort, replica: &Replica) {
    cluster.raft().remove(replica.id);
    if let Err(e) = replica.raft.shutdown().await {
        tracing::warn!(group = %replica.id, error = %e, "raft replica did not shut down cleanly");
    }
}

/// The replica's housekeeping loop; ends when the replica shuts down.
async fn drive(cluster: Port, r: Replica) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_bootstrap = None::<Instant>;
    let mut last_reconcile = None::<Instant>;
    let mut last_elect = None::<Instant>;
    let mut last_snapshot_check = None::<Instant>;
    let mut leader_down_since = None::<Instant>;
    let mut majority_lost = false;
    let (mut hand_over_failures, mut hand_over_after) = (0u32, None::<Instant>);
    let window = ElectionWindow {
        from: Duration::from_millis(lease_ms(cluster.timing())),
        to: Duration::from_millis(cluster.timing().election_timeout_ms * 3),
    };
    let due = |last: &mut Option<Instant>, every: Duration| {
        let now = Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= every) {
            *last = Some(now);
            true
        } else {
            false
        }
    };
    loop {
        tick.tick().await;
        if cluster.raft().get(r.id).is_none_or(|cur| cur.member != r.member) {
            return;
        }
        let (state, leader_node, is_voter) = {
            let m = r.raft.metrics();
            let m = m.borrow();
            if m.running_state.is_err() {
                tracing::error!(group = %r.id, "raft replica stopped: {:?}", m.running_state);
                return;
            }
            let membership = m.membership_config.membership();
            let leader_node = m.current_leader.and_then(|id| membership.get_node(&id)).map(|n| n.addr.clone());
            (m.state, leader_node, membership.voter_ids().any(|v| v == r.member))
        };
        let lost = matches!(r.health(&*cluster), ShardHealth::MajorityLost { .. });
        if lost != majority_lost {
            majority_lost = lost;
            if let ShardHealth::MajorityLost { down } = r.health(&*cluster) {
                tracing::error!(
                    group = %r.id, ?down,
                    "DISASTER: a majority of this shard's replicas is down; it cannot serve until they return, or until it is restored from a backup (docs/operations.md, \"Losing a majority\")"
                );
            } else {
                tracing::info!(group = %r.id, "a majority of this shard's replicas is back");
            }
        }
        if !r.is_initialized() {
            if r.placement.preferred() == cluster.name() && due(&mut last_bootstrap, Duration::from_millis(500)) {
                bootstrap(&*cluster, &r).await;
            }
            continue;
        }
        if due(&mut last_snapshot_check, Duration::from_secs(1)) {
            maybe_snapshot(&*cluster, &r, state == ServerState::Leader).await;
        }
        if state == ServerState::Leader {
            // A stopping node's drain hands its leaderships away; it starts nothing of its own.
            if !cluster.is_draining() && due(&mut last_reconcile, Duration::from_secs(1)) {
                let may_hand_over = hand_over_after.is_none_or(|t| Instant::now() >= t);
                match reconcile(&*cluster, &r, may_hand_over).await {
                    Some(true) => (hand_over_failures, hand_over_after) = (0, None),
                    Some(false) => {
                        // Each failed hand-over costs the group a pause of its proposals (and a
                        // term, if the preferred node called an election that did not take;
                        // callers that met the pause wait up to two election timeouts for a
                        // leader that does not come, then answer 503): back off.
                        hand_over_failures += 1;
                        let wait = Duration::from_secs(1 << hand_over_failures.min(6));
                        hand_over_after = Some(Instant::now() + wait);
                        tracing::info!(group = %r.id, failures = hand_over_failures, next_in = ?wait,
                            "the preferred node did not take the lead; trying again later");
                    }
                    None => {}
                }
            }
            continue;
        }
        // A follower whose leader's node the failure detector sees down may call an election as
        // soon as the dead leader's lease has lapsed, rather than wait out its own randomized timer
        // (see `fast_election`). Raft still decides: the others grant their votes only to an
        // up-to-date log.
        // Only a known leader on a node seen down: with no leader known (an election under way,
        // a hand-over), calling one more would restart that election at a higher term, again and
        // again when votes are slow; openraft's own timers handle that case.
        let leader_down = leader_node.as_deref().is_some_and(|n| cluster.status_of(n) == Status::Down);
        let since = match (leader_down, leader_down_since) {
            (false, _) => None,
            (true, None) => Some(Instant::now()),
            (true, Some(t)) => Some(t),
        };
        leader_down_since = since;
        let live = r.placement.replicas.iter().filter(|n| cluster.status_of(n) != Status::Down).count();
        let facts = ElectionFacts {
            is_voter,
            leader_down_for: since.map(|t| t.elapsed()),
            live_replicas: live,
            replicas: r.placement.replicas.len(),
            first_live: first_live(&*cluster, &r),
        };
        // One call per election timeout at most, and never while this replica is already a
        // candidate: each call starts a new term, and a vote round slower than the interval would
        // otherwise never finish.
        let patience = Duration::from_millis(cluster.timing().election_timeout_ms);
        if state != ServerState::Candidate
            && !cluster.is_draining()
            && fast_election(&facts, window)
            && due(&mut last_elect, patience)
        {
            tracing::info!(group = %r.id, leader = ?leader_node, "the leader's node is down: calling an election");
            let _ = r.raft.trigger().elect().await;
        }
    }
}

/// Gathers the facts of [`snapshot_due`] and, if due, asks openraft to build a snapshot (it
/// ignores the request while one is being built; the log is purged once it is done).
async fn maybe_snapshot(cluster: &dyn RaftPort, r: &Replica, leading: bool) {
    let (applied, since_last) = {
        let m = r.raft.metrics();
        let m = m.borrow();
        let applied = m.last_applied.map_or(0, |l| l.index);
        let snapshot = m.snapshot.map_or(0, |l| l.index).max(r.snapshot_asked_at.load(Ordering::Relaxed));
        (applied, applied.saturating_sub(snapshot))
    };
    let facts = SnapshotFacts {
        since_last,
        state_records: r.state_records.load(Ordering::Relaxed),
        position: r.placement.replicas.iter().position(|n| n == cluster.name()).unwrap_or(0),
        replicas: r.placement.replicas.len(),
        leading,
    };
    if snapshot_due(&facts, cluster.timing().snapshot_every_entries) {
        tracing::debug!(group = %r.id, ?facts, "building a snapshot");
        r.snapshot_asked_at.store(applied, Ordering::Relaxed);
        let _ = r.raft.trigger().snapshot().await;
    }
}

/// What a follower knows when deciding whether to call an election before its timer would.
#[derive(Debug, Clone, Copy)]
struct ElectionFacts {
    is_voter: bool,
    /// How long the failure detector has seen the leader's node down (`None`: it is up).
    leader_down_for: Option<Duration>,
    /// Replica nodes (this one included) the failure detector does not see down.
    live_replicas: usize,
    replicas: usize,
    /// This node is the first of those, in preference order.
    first_live: bool,
}

/// When, after the failure detector saw the leader's node go down, a follower may call an
/// election before its timer would.
#[derive(Debug, Clone, Copy)]
struct ElectionWindow {
    /// Not before the leader's lease has lapsed: until then every other replica refuses its vote,
    /// so an early call wins nothing, and it does harm when the leader's process was only
    /// restarted. A leader killed and started again (systemd's `Restart=`) comes back as leader
    /// within a few tens of milliseconds (openraft restores a committed vote at start); a higher
    /// term called meanwhile made it step down, and the group then had no leader until the timers
    /// ran (0.7-1.5 s, measured by `bulkhead bench --restart-orders`).
    from: Duration,
    /// Past this, openraft's own randomized timers take over.
    to: Duration,
}

/// The fast path is only for the clear case: a voter that sees a majority of the replicas up (a
/// node cut off from the others must not inflate terms it will disrupt the group with at the
/// heal), the first of them in preference order (one candidate, no split vote), and only within
/// the `window` after the leader went down: from the end of its lease (see [`ElectionWindow`])
/// until its own timers would have acted (past that its log may be too short to win, say).
fn fast_election(f: &ElectionFacts, window: ElectionWindow) -> bool {
    f.is_voter
        && f.first_live
        && f.live_replicas * 2 > f.replicas
        && f.leader_down_for.is_some_and(|d| window.from <= d && d <= window.to)
}

/// How a shard stands, as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardHealth {
    /// A leader is known.
    Led,
    /// No leader, but a majority of the replicas is up: an election is under way.
    Electing,
    /// No leader, and a majority of the replicas' nodes is down: a disaster, not a fault. The
    /// shard cannot serve until they return (or it is restored from a backup).
    MajorityLost { down: Vec<String> },
    /// This replica's Raft stopped on a fatal error (e.g. a committed command this build cannot
    /// decode, or a failed write to its log): it takes no further part in the group until the node
    /// restarts, with a build that can go on. The other replicas serve meanwhile, as long as they
    /// are a majority (in a rolling upgrade, only one node at a time runs the older build).
    Stopped { why: String },
}

/// Judges a shard from facts: whether a leader is known, its replicas' nodes, and which of those
/// the failure detector sees down.
pub fn shard_health(has_leader: bool, replicas: &[String], down: &[String]) -> ShardHealth {
    if has_leader {
        return ShardHealth::Led;
    }
    let lost: Vec<String> = replicas.iter().filter(|n| down.contains(n)).cloned().collect();
    // No majority left alive: the live replicas are at most half of them.
    if !replicas.is_empty() && (replicas.len() - lost.len()) * 2 <= replicas.len() {
        ShardHealth::MajorityLost { down: lost }
    } else {
        ShardHealth::Electing
    }
}

impl Replica {
    /// This shard's health as this node sees it (its replica's leader, the failure detector).
    pub fn health(&self, cluster: &dyn RaftPort) -> ShardHealth {
        // Right after start-up every peer is "down" because none has been heard from yet: a node
        // counts as lost once it was heard from and then lost, or once this process has been up
        // long enough (10 detector deadlines) to have heard from it.
        let uptime = bulkhead_codec::now_ms().saturating_sub(cluster.started_ms());
        let settled = uptime > cluster.timing().down_after_ms.saturating_mul(10);
        let down: Vec<String> = self
            .placement
            .replicas
            .iter()
            .filter(|n| cluster.status_of(n) == Status::Down)
            .filter(|n| settled || cluster.heard_from(n))
            .cloned()
            .collect();
        // A replica shut down on purpose (the node stops) is not a failure.
        if let Err(fatal) = &self.raft.metrics().borrow().running_state {
            if !matches!(fatal, openraft::error::Fatal::Stopped) {
                return ShardHealth::Stopped { why: fatal.to_string() };
            }
        }
        shard_health(self.leader().is_some(), &self.placement.replicas, &down)
    }
}

/// Counts every change of leader this replica sees (openraft's metrics watch wakes on each).
/// Follows the replica's metrics: counts leader changes, and keeps [`Replica::leadership`] up
/// to date (sent only when the term or the known leader changed, so its waiters wake for an
/// election or a hand-over, not for every entry).
async fn watch_leadership(r: Replica) {
    let mut rx = r.raft.metrics();
    let mut last = rx.borrow().current_leader;
    loop {
        let seen = {
            let m = rx.borrow_and_update();
            let now = m.current_leader;
            if now != last {
                if now.is_some() {
                    r.stats.leader_changes.fetch_add(1, Ordering::Relaxed);
                }
                last = now;
            }
            let leader =
                known_leader(&m).and_then(|id| m.membership_config.membership().get_node(&id).map(|n| n.addr.clone()));
            Leadership { term: m.current_term, leader }
        };
        // The metrics' lock is released before this watch's is taken (see `wait_for_new_leader`).
        r.leadership.send_if_modified(|l| {
            let changed = *l != seen;
            if changed {
                *l = seen;
            }
            changed
        });
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// What decides whether a replica builds a snapshot now.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotFacts {
    /// Entries applied since the last snapshot.
    pub since_last: u64,
    /// Records in the last snapshot (0 before the first): what the next one will cost.
    pub state_records: u64,
    /// This node's place in the shard's replica list (0 = preferred leader).
    pub position: usize,
    pub replicas: usize,
    pub leading: bool,
}

/// Whether to build a snapshot now. A snapshot exports the whole state, so it is taken once the
/// log since the last one is as long as the state is large (at least `every` entries): its cost
/// per entry stays bounded as the state grows, where a fixed count would export a growing state
/// ever more often. Each replica waits a different multiple (by its place in the replica list,
/// the leader longest, since the leader's applies are what clients wait for): with a fixed count,
/// every replica of every group exported and purged at the same moment, and on a loaded machine
/// that burst stalled heartbeats into elections (BENCHMARKS.md, the soak).
pub fn snapshot_due(f: &SnapshotFacts, every: u64) -> bool {
    let base = every.max(f.state_records);
    let step = if f.leading { f.replicas } else { f.position.min(f.replicas) };
    // base × (1 + step / 4), in integers.
    let threshold = base.saturating_mul(4 + step as u64) / 4;
    f.since_last > 0 && f.since_last >= threshold
}

/// Whether this node is the first replica, in preference order, that the failure detector sees up.
fn first_live(cluster: &dyn RaftPort, r: &Replica) -> bool {
    r.placement.replicas.iter().find(|n| cluster.status_of(n) != Status::Down).is_some_and(|n| n == cluster.name())
}

/// The preferred node of a new group asks every replica who it is; once all answered and none
/// is initialized, it initializes the group with all of them. Only the preferred node does this,
/// so two different first memberships cannot exist.
async fn bootstrap(cluster: &dyn RaftPort, r: &Replica) {
    let mut members = std::collections::BTreeMap::new();
    for node in &r.placement.replicas {
        if node == cluster.name() {
            members.insert(r.member, BasicNode { addr: node.clone() });
            continue;
        }
        match cluster.raft_call(node, r.id.capability, RaftRpc::Hello { group: r.id }, Duration::from_millis(500)).await
        {
            Ok(RaftRpcReply::Hello { initialized: true, .. }) => {
                // Someone already has the group (this node's store was wiped): wait to be added.
                return;
            }
            Ok(RaftRpcReply::Hello { member, initialized: false }) => {
                members.insert(member, BasicNode { addr: node.clone() });
            }
            _ => return,
        }
    }
    match r.raft.initialize(members.clone()).await {
        Ok(()) => {
            tracing::info!(group = %r.id, members = ?members.values().map(|n| &n.addr).collect::<Vec<_>>(), "group initialized")
        }
        Err(e) => tracing::debug!(group = %r.id, error = %e, "initialize refused"),
    }
}

/// On the leader: every replica node of the placement should be a voter under its current
/// incarnation (a node whose store was wiped comes back as a new member: add it as a learner,
/// let it catch up, then swap it in for its old self); and the preferred node, once caught up,
/// gets the leadership back.
/// A leader's round of upkeep: finish or start a membership change, else hand the lead back to
/// the preferred node (if `may_hand_over`). Returns whether a hand-over was tried and took.
async fn reconcile(cluster: &dyn RaftPort, r: &Replica, may_hand_over: bool) -> Option<bool> {
    // A membership change is under way (this replica's own, on its task): nothing else until it
    // is done, a hand-over least of all (a new leader mid-change would leave it half made).
    if r.reconfiguring.load(Ordering::SeqCst) {
        return None;
    }
    let membership = r.raft.metrics().borrow().membership_config.membership().clone();
    // A change a previous leader began and could not finish (it lost the lead between the joint
    // configuration and the final one): finish it, to the configuration it was heading for.
    if membership.get_joint_config().len() > 1 {
        let target: BTreeSet<MemberId> =
            membership.get_joint_config().last().map(|c| c.iter().copied().collect()).unwrap_or_default();
        if r.reconfiguring.swap(true, Ordering::SeqCst) {
            return None;
        }
        tracing::info!(group = %r.id, voters = ?target.iter().map(|m| format!("{m:x}")).collect::<Vec<_>>(),
            "finishing a membership change an earlier leader began");
        let r2 = r.clone();
        tokio::spawn(async move {
            if let Err(e) = r2.raft.change_membership(ChangeMembers::ReplaceAllVoters(target), false).await {
                tracing::warn!(group = %r2.id, error = %e, "finishing the membership change failed; the next round retries");
            }
            r2.reconfiguring.store(false, Ordering::SeqCst);
        });
        return None;
    }
    for node in &r.placement.replicas {
        if node == cluster.name() || cluster.status_of(node) == Status::Down {
            continue;
        }
        let current: Vec<MemberId> = membership.nodes().filter(|(_, n)| &n.addr == node).map(|(id, _)| *id).collect();
        let hello = RaftRpc::Hello { group: r.id };
        let Ok(RaftRpcReply::Hello { member, .. }) =
            cluster.raft_call(node, r.id.capability, hello, Duration::from_millis(500)).await
        else {
            continue;
        };
        if current.contains(&member) && membership.voter_ids().any(|v| v == member) {
            continue;
        }
        tracing::info!(group = %r.id, %node, new = format_args!("{member:x}"), old = ?current.iter().map(|m| format!("{m:x}")).collect::<Vec<_>>(),
            "a replica came back with a new store: adding it as a learner, then replacing its old member");
        let r2 = r.clone();
        let node = node.clone();
        // Catching up may take a while (a snapshot): not on the driver's loop, and one at a time
        // (the next round would otherwise start the same change again meanwhile).
        if r.reconfiguring.swap(true, Ordering::SeqCst) {
            return None;
        }
        tokio::spawn(async move {
            swap_in(&r2, member, node, current).await;
            r2.reconfiguring.store(false, Ordering::SeqCst);
        });
        return None;
    }
    if !may_hand_over {
        return None;
    }
    hand_over(cluster, r).await
}

/// Adds `member` (on `node`) as a learner, waits until it has caught up, then makes it a voter in
/// place of `old` (the node's earlier incarnations).
async fn swap_in(r: &Replica, member: MemberId, node: String, old: Vec<MemberId>) {
    if let Err(e) = r.raft.add_learner(member, BasicNode { addr: node.clone() }, true).await {
        tracing::warn!(group = %r.id, %node, error = %e, "adding the new member as a learner failed");
        return;
    }
    let mut voters: BTreeSet<MemberId> = r.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
    for id in &old {
        voters.remove(id);
    }
    voters.insert(member);
    match r.raft.change_membership(ChangeMembers::ReplaceAllVoters(voters), false).await {
        Ok(_) => tracing::info!(group = %r.id, %node, "the new member is a voter; its old incarnation is removed"),
        Err(e) => tracing::warn!(group = %r.id, %node, error = %e, "replacing the old member failed"),
    }
}

/// How far behind the preferred node may be for a hand-over to begin: the pause that follows lets
/// it take the rest. Under steady load a follower is always a few entries behind, so waiting for
/// a lag of exactly 0 would never hand anything back.
const HAND_OVER_MAX_LAG: u64 = 256;

/// How long a hand-over pauses new proposals for the preferred node to take every entry.
const HAND_OVER_DRAIN: Duration = Duration::from_millis(300);

/// On a leader that is not the preferred node: once the preferred node is up, serving the
/// capability (not starting, escalated or stopping), a voter, and nearly caught up, hand it the lead.
async fn hand_over(cluster: &dyn RaftPort, r: &Replica) -> Option<bool> {
    let preferred = r.placement.preferred();
    if preferred == cluster.name()
        || cluster.status_of(preferred) != Status::Up
        || !cluster.is_routable(r.id.capability, preferred)
    {
        return None;
    }
    hand_over_to(cluster, r, preferred).await
}

/// Resets a replica's hand-over flag when the hand-over ends, however it ends (a drain's bound
/// may cancel one midway): a flag left set would refuse every proposal for good.
struct Pausing<'a>(&'a AtomicBool);

impl<'a> Pausing<'a> {
    fn new(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Relaxed);
        Self(flag)
    }
}

impl Drop for Pausing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// The voter on `node` and how many entries it lacks, as this leader's replication metrics say
/// (`None`: not a voter here, or its progress is not known yet).
fn voter_lag(r: &Replica, node: &str) -> Option<(MemberId, u64)> {
    let m = r.raft.metrics();
    let m = m.borrow();
    let membership = m.membership_config.membership();
    let id = membership.voter_ids().find(|id| membership.get_node(id).is_some_and(|n| n.addr == node))?;
    let matched = m.replication.as_ref()?.get(&id).copied().flatten()?.index;
    Some((id, m.last_log_index.unwrap_or(0).saturating_sub(matched)))
}

/// On a leader: once the voter on `to` is nearly caught up, pause new proposals until it has every
/// entry, ask it to call an election (`TakeLead`), and resume. `None`: not tried (not a voter, too
/// far behind); `Some(took)` otherwise. Raft decides: the target wins only with an up-to-date log.
async fn hand_over_to(cluster: &dyn RaftPort, r: &Replica, to: &str) -> Option<bool> {
    let (target, lag) = voter_lag(r, to)?;
    if lag > HAND_OVER_MAX_LAG {
        return None;
    }
    let _paused = Pausing::new(&r.handing_over);
    // Let in-flight entries reach the target so its log is as long as ours when it asks for votes.
    let deadline = Instant::now() + HAND_OVER_DRAIN;
    while voter_lag(r, to).is_none_or(|(_, lag)| lag > 0) {
        if Instant::now() > deadline {
            tracing::info!(group = %r.id, %to, "the new leader did not catch up in time; keeping the lead");
            return Some(false);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tracing::info!(group = %r.id, %to, "handing leadership over");
    let rpc = RaftRpc::TakeLead { group: r.id, to: target };
    match cluster.raft_call(to, r.id.capability, rpc, Duration::from_millis(500)).await {
        Ok(RaftRpcReply::Done) | Err(CallError::TimedOut { .. } | CallError::Lost { .. }) => {}
        // Refused or never delivered: no election is coming, so do not keep proposals waiting.
        other => {
            tracing::info!(group = %r.id, %to, reply = ?other, "the hand-over was not taken up; keeping the lead");
            return Some(false);
        }
    }
    let mut m = r.raft.metrics();
    let took = tokio::time::timeout(Duration::from_millis(1_500), m.wait_for(|m| m.current_leader == Some(target)))
        .await
        .is_ok_and(|r| r.is_ok());
    Some(took)
}

/// A voter that could take a leaving leader's place, as that leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Successor {
    pub node: String,
    /// Its place in the shard's replica list (0 = preferred).
    pub position: usize,
    /// Entries it lacks (`None`: unknown).
    pub lag: Option<u64>,
    /// The failure detector sees it up and it serves the capability.
    pub serving: bool,
}

/// Whom a leaving leader hands its lead to: a serving voter whose progress is known and within
/// reach of a hand-over, the least behind first, then the preferred order. `None`: nobody fits.
pub fn pick_successor(candidates: &[Successor]) -> Option<&Successor> {
    candidates
        .iter()
        .filter(|c| c.serving && c.lag.is_some_and(|l| l <= HAND_OVER_MAX_LAG))
        .min_by_key(|c| (c.lag, c.position))
}

/// What a drain's hand-over did, group by group.
#[derive(Debug, Default)]
pub struct HandOverReport {
    /// Groups this node led, with the node that leads them now.
    pub handed: Vec<(GroupId, String)>,
    /// Groups this node still leads, with why.
    pub kept: Vec<(GroupId, String)>,
}

/// On a node that is stopping (`Cluster::begin_drain`): hands every group this node leads to
/// another up-to-date voter, all groups at once, retrying each until `bound` is over. Leadership
/// moves only through Raft (the target calls an election it can win only with every entry).
pub async fn hand_over_all(cluster: &Port, bound: Duration) -> HandOverReport {
    let deadline = tokio::time::Instant::now() + bound;
    let mut tasks = tokio::task::JoinSet::new();
    for r in cluster.raft().all().into_iter().filter(Replica::is_leader) {
        let cluster = cluster.clone();
        tasks.spawn(async move {
            let id = r.id;
            match tokio::time::timeout_at(deadline, hand_off(&*cluster, &r)).await {
                Ok(done) => (id, done),
                Err(_) => (id, Err(format!("not handed over within {bound:?}"))),
            }
        });
    }
    let mut report = HandOverReport::default();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((id, Ok(to))) => report.handed.push((id, to)),
            Ok((id, Err(why))) => report.kept.push((id, why)),
            Err(e) => tracing::warn!(error = %e, "a hand-over task failed"),
        }
    }
    report.handed.sort();
    report.kept.sort();
    report
}

/// Hands one group's lead away, trying again every 100 ms; the caller bounds it.
async fn hand_off(cluster: &dyn RaftPort, r: &Replica) -> Result<String, String> {
    loop {
        if !r.is_leader() {
            return Ok(r.leader().unwrap_or_else(|| "(an election is under way)".into()));
        }
        // A membership change must finish first: a new leader mid-change would leave it half made.
        if !r.reconfiguring.load(Ordering::SeqCst) {
            let candidates: Vec<Successor> = r
                .placement
                .replicas
                .iter()
                .enumerate()
                .filter(|(_, n)| *n != cluster.name())
                .map(|(position, n)| Successor {
                    node: n.clone(),
                    position,
                    lag: voter_lag(r, n).map(|(_, lag)| lag),
                    serving: cluster.status_of(n) == Status::Up && cluster.is_routable(r.id.capability, n),
                })
                .collect();
            match pick_successor(&candidates) {
                Some(to) => {
                    if hand_over_to(cluster, r, &to.node).await == Some(true) {
                        return Ok(to.node.clone());
                    }
                }
                None => tracing::debug!(group = %r.id, ?candidates, "no replica can take the lead yet"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_without_a_leader_is_electing_until_a_majority_of_its_replicas_is_down() {
        let r: Vec<String> = ["n1", "n2", "n3"].map(String::from).to_vec();
        let down = |d: &[&str]| d.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(shard_health(true, &r, &down(&["n2", "n3"])), ShardHealth::Led);
        assert_eq!(shard_health(false, &r, &down(&[])), ShardHealth::Electing);
        assert_eq!(shard_health(false, &r, &down(&["n2"])), ShardHealth::Electing);
        assert_eq!(
            shard_health(false, &r, &down(&["n2", "n3"])),
            ShardHealth::MajorityLost { down: down(&["n2", "n3"]) }
        );
        // One replica of one: its node down is a lost majority; of two, one down is too.
        assert!(matches!(shard_health(false, &r[..1], &down(&["n1"])), ShardHealth::MajorityLost { .. }));
        assert!(matches!(shard_health(false, &r[..2], &down(&["n1"])), ShardHealth::MajorityLost { .. }));
    }

    #[test]
    fn snapshots_wait_as_long_as_the_state_is_large_and_replicas_take_turns() {
        let f = |since_last, state_records, position, leading| SnapshotFacts {
            since_last,
            state_records,
            position,
            replicas: 3,
            leading,
        };
        // A small state: every `every` entries on the preferred node when it does not lead…
        assert!(!snapshot_due(&f(49_999, 10, 0, false), 50_000));
        assert!(snapshot_due(&f(50_000, 10, 0, false), 50_000));
        // …a quarter later per place in the list, and the leader last of all.
        assert!(!snapshot_due(&f(62_499, 10, 1, false), 50_000));
        assert!(snapshot_due(&f(62_500, 10, 1, false), 50_000));
        assert!(!snapshot_due(&f(74_999, 10, 2, false), 50_000));
        assert!(!snapshot_due(&f(87_499, 10, 0, true), 50_000));
        assert!(snapshot_due(&f(87_500, 10, 0, true), 50_000));
        // A state of 400,000 records is exported once per 400,000 entries at the earliest.
        assert!(!snapshot_due(&f(399_999, 400_000, 0, false), 50_000));
        assert!(snapshot_due(&f(400_000, 400_000, 0, false), 50_000));
        assert!(!snapshot_due(&f(600_000, 400_000, 0, true), 50_000));
        // Nothing applied since the last one: never, whatever the sizes.
        assert!(!snapshot_due(&f(0, 0, 0, false), 0));
    }

    #[test]
    fn a_leaving_leader_picks_the_serving_voter_least_behind_then_the_preferred() {
        let c = |node: &str, position, lag, serving| Successor { node: node.into(), position, lag, serving };
        let pick = |cs: &[Successor]| pick_successor(cs).map(|s| s.node.clone());
        assert_eq!(pick(&[c("n2", 1, Some(3), true), c("n3", 2, Some(0), true)]), Some("n3".into()));
        assert_eq!(pick(&[c("n2", 1, Some(0), true), c("n3", 2, Some(0), true)]), Some("n2".into()));
        // Not serving (down, stopping, escalated), progress unknown, or too far behind: never.
        assert_eq!(pick(&[c("n2", 1, Some(0), false), c("n3", 2, None, true)]), None);
        assert_eq!(pick(&[c("n2", 1, Some(HAND_OVER_MAX_LAG + 1), true)]), None);
        assert_eq!(pick(&[c("n2", 1, Some(HAND_OVER_MAX_LAG), true)]), Some("n2".into()));
        assert_eq!(pick(&[]), None);
    }

    fn facts() -> ElectionFacts {
        ElectionFacts {
            is_voter: true,
            leader_down_for: Some(Duration::from_millis(800)),
            live_replicas: 2,
            replicas: 3,
            first_live: true,
        }
    }

    const W: ElectionWindow = ElectionWindow { from: Duration::from_millis(750), to: Duration::from_millis(1500) };

    #[test]
    fn the_first_live_voter_of_a_majority_calls_an_election_once_the_dead_leaders_lease_lapsed() {
        assert!(fast_election(&facts(), W));
        assert!(!fast_election(&ElectionFacts { first_live: false, ..facts() }, W));
        assert!(!fast_election(&ElectionFacts { is_voter: false, ..facts() }, W));
        assert!(!fast_election(&ElectionFacts { leader_down_for: None, ..facts() }, W));
    }

    /// A leader's node seen down for less than the lease may be a process being restarted: it
    /// comes back as leader unless a higher term was called meanwhile.
    #[test]
    fn a_leader_down_for_less_than_its_lease_is_left_to_come_back() {
        assert!(!fast_election(&ElectionFacts { leader_down_for: Some(Duration::from_millis(20)), ..facts() }, W));
        assert!(!fast_election(&ElectionFacts { leader_down_for: Some(Duration::from_millis(749)), ..facts() }, W));
        assert!(fast_election(&ElectionFacts { leader_down_for: Some(Duration::from_millis(750)), ..facts() }, W));
    }

    #[test]
    fn a_node_cut_off_from_the_majority_or_past_the_window_leaves_it_to_the_timers() {
        assert!(!fast_election(&ElectionFacts { live_replicas: 1, ..facts() }, W), "sees only itself");
        assert!(!fast_election(&ElectionFacts { leader_down_for: Some(Duration::from_secs(2)), ..facts() }, W));
    }
}
