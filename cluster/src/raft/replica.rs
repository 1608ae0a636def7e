//! One replica of one group on this node, and the registry of this node's replicas: proposing
//! (batched, at most a couple of writes in flight), linearizable reads, and what a replica says of
//! itself. Its driver (bootstrap, reconfiguration, hand-over) is [`super::group`].

use super::clock::LeaderClock;
use super::state_machine::{Machine, StateDigest, StateMachineStore};
use super::types::{GroupId, MemberId, Proposal, Raft, ReplyBatch, GROUP_TIME};
use crate::config::ShardPlacement;
use bulkhead_codec::{decode, encode, now_ms};
use bulkhead_storage::Store;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Why a proposal or a linearizable read was not served here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// Another member leads (or this one is a follower that knows no leader: `None`).
    #[error("not the leader of this shard (leader: {leader:?})")]
    NotLeader { leader: Option<String> },
    /// The group has no leader right now (an election, a hand-over, no majority).
    #[error("the shard has no leader right now")]
    NoLeader,
    /// The write or read did not finish within its bound (no majority answering).
    #[error("no majority answered within {0} ms")]
    TimedOut(u64),
    /// The replica is shutting down or its storage failed.
    #[error("replica failed: {0}")]
    Failed(String),
    /// The command is larger than any entry may be ([`super::MAX_COMMAND`]): refused, never sent.
    #[error("a command of {bytes} bytes is larger than the {limit} a shard accepts")]
    TooLarge { bytes: usize, limit: usize },
}

impl ProposeError {
    /// The variant's name, for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ProposeError::NotLeader { .. } => "not_leader",
            ProposeError::NoLeader => "no_leader",
            ProposeError::TimedOut(_) => "timed_out",
            ProposeError::Failed(_) => "failed",
            ProposeError::TooLarge { .. } => "too_large",
        }
    }
}

/// Refuses a command larger than [`super::MAX_COMMAND`] (pure).
fn within_size(command: &[u8]) -> Result<(), ProposeError> {
    match command.len() {
        n if n > super::MAX_COMMAND => Err(ProposeError::TooLarge { bytes: n, limit: super::MAX_COMMAND }),
        _ => Ok(()),
    }
}

/// Counters of one replica, for `/metrics` (in memory: a restart starts them at 0).
#[derive(Debug, Default)]
pub struct ReplicaStats {
    /// Times this replica saw the group's leader change (an election, a hand-over).
    pub leader_changes: AtomicU64,
    /// Proposals this replica made as leader, and their total time until applied.
    pub proposals: AtomicU64,
    pub proposal_micros: AtomicU64,
    /// Proposals that did not commit (not the leader, no majority in time, failure).
    pub proposal_failures: AtomicU64,
}

impl ReplicaStats {
    pub(super) fn record(&self, started: Instant, committed: bool) {
        if committed {
            self.proposals.fetch_add(1, Ordering::Relaxed);
            self.proposal_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        } else {
            self.proposal_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One replica this node hosts.
#[derive(Clone)]
pub struct Replica {
    pub id: GroupId,
    pub member: MemberId,
    pub raft: Raft,
    pub placement: ShardPlacement,
    /// The state machine (its store holds the capability's tables), for what is read beside
    /// openraft: the tables, the state's digest.
    pub(super) sm: StateMachineStore,
    pub stats: Arc<ReplicaStats>,
    pub(super) handing_over: Arc<AtomicBool>,
    /// A membership change (a new member catching up, then swapped in) is under way.
    pub(super) reconfiguring: Arc<AtomicBool>,
    pub(super) proposal_timeout: Duration,
    /// Reads waiting for the next read barrier (see [`Replica::read_barrier`]).
    reads: Arc<std::sync::Mutex<ReadBatch>>,
    /// Commands waiting to be proposed (see [`Replica::propose`]).
    proposals: Arc<std::sync::Mutex<ProposalQueue>>,
    /// This replica's clock while it leads (see [`super::clock`]).
    pub(super) clock: Arc<std::sync::Mutex<Option<LeaderClock>>>,
    /// Records in the last snapshot built or installed here (the state machine's size).
    pub(super) state_records: Arc<AtomicU64>,
    /// The applied index when the driver last asked for a snapshot: openraft's metrics show the
    /// new snapshot only a while after, and one request per threshold is enough.
    pub(super) snapshot_asked_at: Arc<AtomicU64>,
    /// The group's term and known leader as this replica sees them ([`watch_leadership`]): a
    /// channel that changes only when they do, unlike openraft's metrics, which change with every
    /// entry appended or applied.
    pub(super) leadership: Arc<tokio::sync::watch::Sender<Leadership>>,
}

/// The group's term and the node of its known leader (`known_leader`), as one replica sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leadership {
    pub term: u64,
    pub leader: Option<String>,
}

/// Linearizable reads that share one read barrier: `running` while a barrier task is at work,
/// `waiting` the reads that arrived since its current barrier started.
#[derive(Default)]
struct ReadBatch {
    running: bool,
    waiting: Vec<tokio::sync::oneshot::Sender<Result<(), ProposeError>>>,
}

/// Writes a group keeps in flight at most; whatever queues meanwhile goes into the next entry.
const PROPOSALS_IN_FLIGHT: usize = 2;
/// Commands in one entry at most, and their bytes: far below the links' frame limit even with
/// `MAX_PAYLOAD_ENTRIES` entries in one AppendEntries.
const BATCH_COMMANDS: usize = 64;
const BATCH_BYTES: usize = 64 * 1024;

/// One command waiting for its entry, and who waits for its reply.
struct Waiting {
    command: Vec<u8>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<u8>, ProposeError>>,
    queued: Instant,
}

/// Commands waiting to be proposed, and how many writes are in flight.
#[derive(Default)]
struct ProposalQueue {
    waiting: std::collections::VecDeque<Waiting>,
    in_flight: usize,
}

impl ProposalQueue {
    /// The next batch: queued commands in order, up to the count and byte bounds (at least one).
    /// A command whose caller gave up is dropped, and one that waited longer than `bound` (no
    /// write got through meanwhile: no majority) is answered `NoLeader`: it was never proposed,
    /// so nothing was recorded, and it must not commit long after its caller moved on.
    pub(super) fn next_batch(&mut self, now: Instant, bound: Duration) -> Vec<Waiting> {
        let mut bytes = 0;
        let mut batch = Vec::new();
        while let Some(w) = self.waiting.front() {
            if !batch.is_empty() && (batch.len() == BATCH_COMMANDS || bytes + w.command.len() > BATCH_BYTES) {
                break;
            }
            let Some(w) = self.waiting.pop_front() else { break };
            if w.reply.is_closed() {
                continue;
            }
            if now.duration_since(w.queued) > bound {
                let _ = w.reply.send(Err(ProposeError::NoLeader));
                continue;
            }
            bytes += w.command.len();
            batch.push(w);
        }
        batch
    }
}

/// This node's replicas, by group; shared with the Raft router and the HTTP front.
#[derive(Clone)]
pub struct Registry {
    pub node: String,
    replicas: Arc<RwLock<HashMap<GroupId, Replica>>>,
    /// This node's lanes to its peers, shared by every local group's network.
    lanes: super::lanes::Lanes,
}

impl Registry {
    pub fn new(node: &str) -> Self {
        Self { node: node.to_string(), replicas: Arc::default(), lanes: Default::default() }
    }

    /// This node's lanes to its peers ([`super::lanes`]).
    pub fn lanes(&self) -> &super::lanes::Lanes {
        &self.lanes
    }

    pub fn get(&self, group: GroupId) -> Option<Replica> {
        self.replicas.read().ok().and_then(|r| r.get(&group).cloned())
    }

    /// The local replica if it is the member `to` (this node's current incarnation in `group`).
    pub fn member(&self, group: GroupId, to: MemberId) -> Result<Replica, String> {
        match self.get(group) {
            Some(r) if r.member == to => Ok(r),
            Some(r) => Err(format!(
                "{} is member {:x} of {group} now, not {to:x} (its store was replaced)",
                self.node, r.member
            )),
            None => Err(format!("group {group} is not hosted on {}", self.node)),
        }
    }

    pub fn all(&self) -> Vec<Replica> {
        let mut all: Vec<Replica> = self.replicas.read().map(|r| r.values().cloned().collect()).unwrap_or_default();
        all.sort_by_key(|r| r.id);
        all
    }

    pub(super) fn insert(&self, r: Replica) {
        if let Ok(mut m) = self.replicas.write() {
            m.insert(r.id, r);
        }
    }

    pub(super) fn remove(&self, group: GroupId) {
        if let Ok(mut m) = self.replicas.write() {
            m.remove(&group);
        }
    }
}

/// A replica's role as `/v1/cluster` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Leader,
    Follower,
    Learner,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaStatus {
    pub node: String,
    pub role: Role,
    /// Entries behind the leader; known on the leader only (`null` elsewhere).
    pub lag: Option<u64>,
}

/// One shard as this node's replica sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardStatus {
    pub capability: String,
    pub shard: u32,
    pub leader: Option<String>,
    pub term: u64,
    pub replicas: Vec<ReplicaStatus>,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
}

impl Replica {
    /// A started replica (`super::group::start` makes it, with its Raft instance and state machine).
    pub(super) fn new(
        id: GroupId,
        member: MemberId,
        raft: Raft,
        placement: ShardPlacement,
        sm: StateMachineStore,
        proposal_timeout: Duration,
        state_records: Arc<AtomicU64>,
    ) -> Replica {
        Replica {
            id,
            member,
            raft,
            placement,
            sm,
            stats: Arc::default(),
            handing_over: Arc::default(),
            reconfiguring: Arc::default(),
            proposal_timeout,
            reads: Arc::default(),
            proposals: Arc::default(),
            clock: Arc::default(),
            state_records,
            snapshot_asked_at: Arc::default(),
            leadership: Arc::new(tokio::sync::watch::channel(Leadership::default()).0),
        }
    }
}

impl Replica {
    /// The replica's store: the capability's tables as applied so far on this node (reads that
    /// must be linearizable go through [`Replica::read_barrier`] first).
    pub fn store(&self) -> &Store {
        self.sm.store()
    }

    /// The digest of this replica's state at its applied index (see [`StateDigest`]), read on the
    /// blocking pool.
    pub async fn digest(&self) -> Result<StateDigest, String> {
        let sm = self.sm.clone();
        match tokio::task::spawn_blocking(move || sm.digest()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(format!("the digest task failed: {e}")),
        }
    }

    pub fn is_initialized(&self) -> bool {
        self.raft.metrics().borrow().membership_config.membership().voter_ids().next().is_some()
    }

    /// Whether this replica leads its group now (leader-only work: a saga driver, a sweep).
    pub fn is_leader(&self) -> bool {
        leads(&self.raft.metrics().borrow(), self.member)
    }

    /// The term in which this replica leads, if it leads and is not handing the lead over: what a
    /// leader-only driver (such as a saga) follows, reloading its state when the term changes.
    pub fn leading_term(&self) -> Option<u64> {
        let m = self.raft.metrics();
        let m = m.borrow();
        (leads(&m, self.member) && !self.handing_over.load(Ordering::Relaxed)).then_some(m.current_term)
    }

    /// The node of the current leader, as this replica knows it.
    pub fn leader(&self) -> Option<String> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let id = known_leader(&m)?;
        m.membership_config.membership().get_node(&id).map(|n| n.addr.clone())
    }

    /// Waits up to `bound` until this replica knows a new leader: on another node than `old`, or
    /// elected in a later term than the one seen now (`old` itself may win the election). The
    /// way through a hand-over or an election that is already under way. `None` if none came.
    pub async fn wait_for_new_leader(&self, old: Option<&str>, bound: Duration) -> Option<String> {
        let mut rx = self.leadership.subscribe();
        // The watch may trail the metrics by a moment: "later" is judged against the newer term.
        // One lock at a time: `watch_leadership` takes the metrics, then this watch.
        let watched = rx.borrow().term;
        let term_now = watched.max(self.raft.metrics().borrow().current_term);
        let other = |l: &Leadership| {
            let leader = l.leader.as_deref()?;
            (Some(leader) != old || l.term > term_now).then(|| leader.to_string())
        };
        let waited = tokio::time::timeout(bound, rx.wait_for(|l| other(l).is_some())).await;
        match waited {
            Ok(Ok(l)) => other(&l),
            _ => None,
        }
    }

    /// The time to put into a command proposed now: the group's time, advanced by this leader's
    /// monotonic clock since it began leading (see [`super::clock`]). Never this node's wall
    /// clock, except for a group that has no time yet.
    pub fn now_ms(&self) -> u64 {
        let term = self.raft.metrics().borrow().current_term;
        let group_ms = || GROUP_TIME.get(self.sm.store(), &0).ok().flatten().map_or(0, |t| t.0);
        let mut clock = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        LeaderClock::now_ms(&mut clock, term, group_ms, now_ms(), Instant::now())
    }

    /// Proposes `cmd` to the group and returns what applying it answered; only the leader can.
    ///
    /// Batching: a group keeps at most `PROPOSALS_IN_FLIGHT` writes in flight; commands that
    /// arrive meanwhile wait and go together into the next entry ([`Proposal::of`]), each getting
    /// its own reply. No timer: an idle group proposes a command at once, alone (in the layout
    /// every build reads). Under load that is one log entry, one append, one fdatasync on each
    /// replica and one apply for many commands.
    pub async fn propose<M: Machine>(&self, cmd: &M::Command) -> Result<M::Reply, ProposeError> {
        if self.handing_over.load(Ordering::Relaxed) {
            return Err(ProposeError::NoLeader);
        }
        use tracing::Instrument;
        let started = Instant::now();
        let span = tracing::debug_span!("raft.propose", group = %self.id);
        let result = async {
            let command = encode(cmd);
            within_size(&command)?;
            let reply = self.submit(command).await?;
            decode::<M::Reply>(&reply).map_err(|e| ProposeError::Failed(e.to_string()))
        }
        .instrument(span)
        .await;
        self.stats.record(started, result.is_ok());
        let outcome = match &result {
            Ok(_) => "committed",
            Err(e) => e.kind(),
        };
        metrics::histogram!(
            "bulkhead_raft_proposal_duration_seconds",
            "capability" => self.id.capability.label(),
            "outcome" => outcome
        )
        .record(started.elapsed().as_secs_f64());
        result
    }

    /// Queues one encoded command and waits for its encoded reply.
    pub(super) async fn submit(&self, command: Vec<u8>) -> Result<Vec<u8>, ProposeError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = {
            let mut q = self.proposals.lock().map_err(|_| ProposeError::Failed("proposal queue poisoned".into()))?;
            q.waiting.push_back(Waiting { command, reply: tx, queued: Instant::now() });
            q.in_flight < PROPOSALS_IN_FLIGHT && {
                q.in_flight += 1;
                true
            }
        };
        if start {
            let me = self.clone();
            tokio::spawn(async move { me.run_proposals().await });
        }
        rx.await.unwrap_or_else(|_| Err(ProposeError::Failed("the proposal task stopped".into())))
    }

    /// Proposes batches until nothing is queued; one of at most [`PROPOSALS_IN_FLIGHT`] such tasks.
    pub(super) async fn run_proposals(&self) {
        // Should this task end any other way (a panic, the runtime shutting down), its place is
        // given back and the next command starts a new task: nothing waits forever.
        struct Done(Arc<std::sync::Mutex<ProposalQueue>>, bool);
        impl Drop for Done {
            fn drop(&mut self) {
                if !self.1 {
                    if let Ok(mut q) = self.0.lock() {
                        q.in_flight = q.in_flight.saturating_sub(1);
                    }
                }
            }
        }
        let mut done = Done(self.proposals.clone(), false);
        loop {
            let batch = match self.proposals.lock() {
                Ok(mut q) if q.waiting.is_empty() => {
                    q.in_flight = q.in_flight.saturating_sub(1);
                    done.1 = true;
                    return;
                }
                Ok(mut q) => q.next_batch(Instant::now(), self.proposal_timeout),
                Err(_) => return,
            };
            if batch.is_empty() {
                // Every command taken had been given up on or had waited too long: look again.
                continue;
            }
            metrics::histogram!("bulkhead_raft_batch_commands", "capability" => self.id.capability.label())
                .record(batch.len() as f64);
            let (commands, replies): (Vec<Vec<u8>>, Vec<_>) = batch.into_iter().map(|w| (w.command, w.reply)).unzip();
            match self.write(commands).await {
                Ok(answers) => {
                    for (tx, answer) in replies.into_iter().zip(answers) {
                        let _ = tx.send(Ok(answer));
                    }
                }
                Err(e) => {
                    for tx in replies {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// One entry with `commands`; their replies in order.
    pub(super) async fn write(&self, commands: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, ProposeError> {
        let n = commands.len();
        let write = self.raft.client_write(Proposal::of(commands));
        match tokio::time::timeout(self.proposal_timeout, write).await {
            Err(_) => Err(ProposeError::TimedOut(self.proposal_timeout.as_millis() as u64)),
            Ok(Ok(resp)) if n == 1 => Ok(vec![resp.data.0]),
            Ok(Ok(resp)) => match decode::<ReplyBatch>(&resp.data.0) {
                Ok(b) if b.replies.len() == n => Ok(b.replies),
                Ok(b) => Err(ProposeError::Failed(format!("{} replies to a batch of {n}", b.replies.len()))),
                Err(e) => Err(ProposeError::Failed(e.to_string())),
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Err(match f.leader_node {
                Some(n) => ProposeError::NotLeader { leader: Some(n.addr) },
                None => ProposeError::NoLeader,
            }),
            Ok(Err(e)) => Err(ProposeError::Failed(e.to_string())),
        }
    }

    /// Waits until this replica may serve a linearizable read: it still leads (a majority
    /// confirmed it after the read arrived) and has applied everything committed before.
    ///
    /// Reads share barriers: a read waits for the next barrier that *starts* after it arrived (so
    /// the guarantee holds), and every read that arrived meanwhile rides on that same barrier.
    /// Under load that is one heartbeat round per round trip, not one per read.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = match self.reads.lock() {
            Ok(mut b) => {
                b.waiting.push(tx);
                !std::mem::replace(&mut b.running, true)
            }
            Err(_) => return Err(ProposeError::Failed("read batch poisoned".into())),
        };
        if start {
            let me = self.clone();
            tokio::spawn(async move { me.run_read_barriers().await });
        }
        rx.await.unwrap_or_else(|_| Err(ProposeError::Failed("the read barrier task stopped".into())))
    }

    /// Runs barriers until no read is waiting: each serves the reads that arrived before it began.
    pub(super) async fn run_read_barriers(&self) {
        // Should this task end any other way (a panic, the runtime shutting down), the reads
        // queued are failed and the next read starts a new task: none waits forever.
        struct Reset(Arc<std::sync::Mutex<ReadBatch>>);
        impl Drop for Reset {
            fn drop(&mut self) {
                if let Ok(mut b) = self.0.lock() {
                    b.running = false;
                    for tx in b.waiting.drain(..) {
                        let _ = tx.send(Err(ProposeError::Failed("the read barrier task stopped".into())));
                    }
                }
            }
        }
        let _reset = Reset(self.reads.clone());
        loop {
            let batch = match self.reads.lock() {
                Ok(mut b) if b.waiting.is_empty() => {
                    b.running = false;
                    return;
                }
                Ok(mut b) => std::mem::take(&mut b.waiting),
                Err(_) => return,
            };
            let result = self.one_read_barrier().await;
            for tx in batch {
                let _ = tx.send(result.clone());
            }
        }
    }

    pub(super) async fn one_read_barrier(&self) -> Result<(), ProposeError> {
        let check = self.raft.ensure_linearizable();
        match tokio::time::timeout(self.proposal_timeout, check).await {
            Err(_) => Err(ProposeError::TimedOut(self.proposal_timeout.as_millis() as u64)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => Err(match f.leader_node {
                Some(n) => ProposeError::NotLeader { leader: Some(n.addr) },
                None => ProposeError::NoLeader,
            }),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => Err(ProposeError::NoLeader),
            Ok(Err(e)) => Err(ProposeError::Failed(e.to_string())),
        }
    }

    /// This replica's view of its shard.
    pub fn status(&self) -> ShardStatus {
        let m = self.raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        let leader_id = known_leader(&m);
        let last = m.last_log_index.unwrap_or(0);
        let lag_of = |id: &MemberId| -> Option<u64> {
            let repl = m.replication.as_ref()?;
            let matched = repl.get(id)?.map(|l| l.index).unwrap_or(0);
            Some(last.saturating_sub(matched))
        };
        let voters: BTreeSet<MemberId> = membership.voter_ids().collect();
        let replicas = membership
            .nodes()
            .map(|(id, node)| ReplicaStatus {
                node: node.addr.clone(),
                role: if Some(*id) == leader_id {
                    Role::Leader
                } else if voters.contains(id) {
                    Role::Follower
                } else {
                    Role::Learner
                },
                lag: if Some(*id) == leader_id && m.state == ServerState::Leader { Some(0) } else { lag_of(id) },
            })
            .collect();
        ShardStatus {
            capability: self.id.capability.to_string(),
            shard: self.id.shard,
            leader: leader_id.and_then(|id| membership.get_node(&id)).map(|n| n.addr.clone()),
            term: m.current_term,
            replicas,
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
        }
    }
}

/// The leader a replica's metrics name, except itself before a majority has acknowledged it:
/// openraft restarts a node that led as leader of its old term straight away (its vote was
/// committed), though the others may have elected another since. Until its first append is
/// acknowledged it cannot serve, so it must not say "I lead" to routing or to `/readyz`.
pub(super) fn known_leader(m: &openraft::RaftMetrics<MemberId, BasicNode>) -> Option<MemberId> {
    let id = m.current_leader?;
    let unconfirmed = id == m.id && m.state == ServerState::Leader && m.millis_since_quorum_ack.is_none();
    (!unconfirmed).then_some(id)
}

/// Whether `member` (this replica) leads, as [`known_leader`] judges it.
pub(super) fn leads(m: &openraft::RaftMetrics<MemberId, BasicNode>, member: MemberId) -> bool {
    known_leader(m) == Some(member) && m.state == ServerState::Leader
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_too_large_for_an_entry_is_refused_and_a_full_append_fits_a_frame() {
        assert!(within_size(&vec![0; super::super::MAX_COMMAND]).is_ok());
        let e = within_size(&vec![0; super::super::MAX_COMMAND + 1]).unwrap_err();
        assert_eq!(e.kind(), "too_large");
        assert!(e.to_string().contains("131073 bytes"), "{e}");
        // The most one AppendEntries can carry (entries of at most a command each, with room for
        // the entry's own fields) stays below the frame a link accepts.
        let per_entry = super::super::MAX_COMMAND.max(BATCH_BYTES) as u64 + 1024;
        assert!(super::super::MAX_PAYLOAD_ENTRIES * per_entry < super::super::MAX_FRAME);
    }

    type Reply = tokio::sync::oneshot::Receiver<Result<Vec<u8>, ProposeError>>;

    fn queue(sizes: &[usize]) -> (ProposalQueue, Vec<Reply>) {
        let mut q = ProposalQueue::default();
        let mut rxs = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            q.waiting.push_back(Waiting { command: vec![i as u8; *n], reply: tx, queued: Instant::now() });
            rxs.push(rx);
        }
        (q, rxs)
    }

    #[test]
    fn a_batch_takes_what_queued_in_order_up_to_its_count_and_bytes() {
        let (now, bound) = (Instant::now(), Duration::from_secs(1));
        let (mut q, _rx) = queue(&[10; BATCH_COMMANDS + 5]);
        let first = q.next_batch(now, bound);
        assert_eq!(first.len(), BATCH_COMMANDS);
        assert_eq!(
            first.iter().map(|w| w.command[0]).collect::<Vec<_>>(),
            (0..BATCH_COMMANDS as u8).collect::<Vec<_>>()
        );
        assert_eq!(q.next_batch(now, bound).len(), 5);
        assert!(q.next_batch(now, bound).is_empty());
        // Bytes: two commands of 40 KiB do not share an entry; one larger than the bound goes alone.
        let (mut q, _rx) = queue(&[40 * 1024, 40 * 1024, BATCH_BYTES + 1, 1, 1]);
        assert_eq!(q.next_batch(now, bound).len(), 1);
        assert_eq!(q.next_batch(now, bound).len(), 1);
        assert_eq!(q.next_batch(now, bound).len(), 1, "an oversized command still goes, alone");
        assert_eq!(q.next_batch(now, bound).len(), 2);
    }

    #[test]
    fn a_command_given_up_on_or_waiting_too_long_is_never_proposed() {
        let (mut q, mut rx) = queue(&[1, 1, 1]);
        drop(rx.remove(1));
        let later = Instant::now() + Duration::from_secs(5);
        // The bound has passed for all: the two still waited for are told NoLeader, none is taken.
        assert!(q.next_batch(later, Duration::from_secs(1)).is_empty());
        for mut r in rx {
            assert_eq!(r.try_recv().unwrap(), Err(ProposeError::NoLeader));
        }
        // A caller that gave up is skipped, the rest go.
        let (mut q, mut rx) = queue(&[1, 1, 1]);
        drop(rx.remove(0));
        let batch = q.next_batch(Instant::now(), Duration::from_secs(1));
        assert_eq!(batch.iter().map(|w| w.command[0]).collect::<Vec<_>>(), vec![1, 2]);
    }
}
