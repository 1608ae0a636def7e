//! Three members of one Raft group in one process, over links the test cuts: the group's own log
//! store and state machine (real sled stores, group commit, atomic applies, snapshots as table
//! exports) under openraft's elections and replication.
//!
//! ractor's registries are per process, so whole nodes cannot share one (see `in_process.rs`); the
//! Raft layer can: each member here is an `openraft::Raft` over `LogStore` + `StateMachineStore`,
//! and the network is an in-memory switchboard with a cut per member, standing in for
//! `raft::network` (which the real-process tests in `tests/` exercise). What is tested: a dead
//! leader is replaced and nothing committed is lost; a leader cut off from the majority commits
//! nothing, and after the heal it follows and every replica holds the same tables; a member whose
//! store is wiped rejoins as a new member and catches up by snapshot; a member of an older build
//! that cannot decode a committed command stops rather than skip it, and catches up once upgraded.

// openraft's error types are large and fixed by its network trait (as in `raft/mod.rs`).
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_cluster::raft::log_store::LogStore;
use bulkhead_cluster::raft::state_machine::{Machine, RawMachine, StateMachineStore};
use bulkhead_cluster::raft::types::{MemberId, Proposal, Raft, TypeConfig};
use bulkhead_cluster::raft::{GROUP_TIME, RAFT_TABLES_FROM};
use bulkhead_codec::{decode, decode_payload, encode, unknown_version, CodecError, Record};
use bulkhead_storage::{Batch, Durability, NodeLog, RawRecord, Store, StoreError, StoreOptions, Table};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};

// ----- a tiny replicated machine: named counters -----

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Add {
    key: String,
    n: u64,
    /// The time the leader put in: the group's time follows it (`Machine::time_of`).
    at_ms: u64,
}
impl Record for Add {
    const VERSION: u8 = 1;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Total(u64);
impl Record for Total {
    const VERSION: u8 = 1;
}

const TOTALS: Table<String, Total> = Table::new(1, "totals");

struct Adder;

impl Machine for Adder {
    type Command = Add;
    type Reply = Total;

    fn apply(&self, store: &Store, batch: &mut Batch, cmd: Add) -> Result<Total, StoreError> {
        let total = TOTALS.get_through(store, batch, &cmd.key)?.map_or(0, |t| t.0) + cmd.n;
        TOTALS.put(batch, &cmd.key, &Total(total));
        Ok(Total(total))
    }

    fn time_of(&self, cmd: &Add) -> Option<u64> {
        Some(cmd.at_ms)
    }
}

/// The counters' command as a newer build writes it: version 2 carries a note the first build
/// never knew, so [`Adder`] (version 1) cannot decode it; [`NewAdder`] reads both versions.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct AddV2 {
    key: String,
    n: u64,
    at_ms: u64,
    note: String,
}
impl Record for AddV2 {
    const VERSION: u8 = 2;
    fn upgrade(version: u8, payload: &[u8]) -> Result<Self, CodecError> {
        match version {
            1 => {
                let a: Add = decode_payload(payload)?;
                Ok(AddV2 { key: a.key, n: a.n, at_ms: a.at_ms, note: String::new() })
            }
            2 => decode_payload(payload),
            v => Err(unknown_version::<Self>(v)),
        }
    }
}

struct NewAdder;

impl Machine for NewAdder {
    type Command = AddV2;
    type Reply = Total;

    fn apply(&self, store: &Store, batch: &mut Batch, cmd: AddV2) -> Result<Total, StoreError> {
        Adder.apply(store, batch, Add { key: cmd.key, n: cmd.n, at_ms: cmd.at_ms })
    }

    fn time_of(&self, cmd: &AddV2) -> Option<u64> {
        Some(cmd.at_ms)
    }
}

/// Times the tests' proposals carry: increasing, like a leader's clock.
static NEXT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1_000);

// ----- the switchboard: every member's Raft, and the members whose links are cut -----

#[derive(Clone, Default)]
struct Net {
    rafts: Arc<Mutex<BTreeMap<MemberId, Raft>>>,
    cut: Arc<Mutex<HashSet<MemberId>>>,
}

impl Net {
    fn set_cut(&self, id: MemberId, cut: bool) {
        let mut c = self.cut.lock().unwrap();
        if cut {
            c.insert(id);
        } else {
            c.remove(&id);
        }
    }
}

struct Factory {
    net: Net,
    from: MemberId,
}

impl RaftNetworkFactory<TypeConfig> for Factory {
    type Network = Link;

    async fn new_client(&mut self, target: MemberId, _node: &BasicNode) -> Link {
        Link { net: self.net.clone(), from: self.from, to: target }
    }
}

struct Link {
    net: Net,
    from: MemberId,
    to: MemberId,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<MemberId, BasicNode, RaftError<MemberId, E>>;

impl Link {
    /// The target's Raft, unless either end is cut off or the target is gone.
    fn target<E: std::error::Error>(&self) -> Result<Raft, RpcErr<E>> {
        let cut = {
            let c = self.net.cut.lock().unwrap();
            c.contains(&self.from) || c.contains(&self.to)
        };
        let raft = self.net.rafts.lock().unwrap().get(&self.to).cloned();
        match (cut, raft) {
            (false, Some(r)) => Ok(r),
            _ => Err(RPCError::Unreachable(Unreachable::new(&std::io::Error::other("link cut")))),
        }
    }
}

impl RaftNetwork<TypeConfig> for Link {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        _: RPCOption,
    ) -> Result<AppendEntriesResponse<MemberId>, RpcErr> {
        let raft = self.target()?;
        raft.append_entries(req).await.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        _: RPCOption,
    ) -> Result<InstallSnapshotResponse<MemberId>, RpcErr<InstallSnapshotError>> {
        let raft = self.target()?;
        raft.install_snapshot(req).await.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn vote(&mut self, req: VoteRequest<MemberId>, _: RPCOption) -> Result<VoteResponse<MemberId>, RpcErr> {
        let raft = self.target()?;
        raft.vote(req).await.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }
}

// ----- members -----

struct Member {
    raft: Raft,
    store: Store,
}

struct Group {
    net: Net,
    dir: tempfile::TempDir,
    members: BTreeMap<MemberId, Member>,
}

fn config() -> Arc<Config> {
    let c = Config {
        cluster_name: "raft-groups-test".into(),
        heartbeat_interval: 50,
        election_timeout_min: 200,
        election_timeout_max: 400,
        // Small, so that a member that fell behind catches up by snapshot, not by log.
        snapshot_policy: SnapshotPolicy::LogsSinceLast(10),
        max_in_snapshot_log_to_keep: 0,
        ..Default::default()
    };
    Arc::new(c.validate().expect("a valid raft config"))
}

impl Group {
    async fn start(ids: &[MemberId]) -> Group {
        Self::start_with(ids, |_| Arc::new(Adder)).await
    }

    /// Starts the group with each member's machine (its build) given by `machine`.
    async fn start_with(ids: &[MemberId], machine: impl Fn(MemberId) -> Arc<dyn RawMachine>) -> Group {
        let mut g = Group { net: Net::default(), dir: tempfile::tempdir().unwrap(), members: BTreeMap::new() };
        for id in ids {
            g.add_member_with(*id, machine(*id)).await;
        }
        let voters: BTreeMap<MemberId, BasicNode> =
            ids.iter().map(|id| (*id, BasicNode::new(id.to_string()))).collect();
        g.members[&ids[0]].raft.initialize(voters).await.expect("initialize");
        g
    }

    async fn add_member(&mut self, id: MemberId) {
        self.add_member_with(id, Arc::new(Adder)).await;
    }

    /// Starts member `id` on its files (new ones, or those a stopped member left) with `machine`.
    async fn add_member_with(&mut self, id: MemberId, machine: Arc<dyn RawMachine>) {
        let store = Store::open(self.dir.path(), &format!("member-{id}"), &StoreOptions::default()).unwrap();
        // Each member stands for a node: a node log of its own beside its group's store. A member
        // started again on the files of a stopped one waits for the old log to be let go.
        let path = self.dir.path().join(format!("log-{id}"));
        let log = wait_for(Duration::from_secs(10), "the member's node log to open", || {
            NodeLog::open(&path, Durability::Fsync).ok()
        })
        .await;
        let sm = StateMachineStore::new(store.clone(), machine);
        let log_store = LogStore::new(log, store.clone(), 1);
        let raft = Raft::new(id, config(), Factory { net: self.net.clone(), from: id }, log_store, sm)
            .await
            .expect("start raft");
        self.net.rafts.lock().unwrap().insert(id, raft.clone());
        self.members.insert(id, Member { raft, store });
    }

    /// Shuts a member down and forgets it (its store stays on disk until `wipe`).
    async fn stop(&mut self, id: MemberId) {
        self.net.rafts.lock().unwrap().remove(&id);
        if let Some(m) = self.members.remove(&id) {
            let _ = m.raft.shutdown().await;
        }
    }

    fn wipe(&self, id: MemberId) {
        std::fs::remove_dir_all(self.dir.path().join(format!("member-{id}"))).unwrap();
        std::fs::remove_dir_all(self.dir.path().join(format!("log-{id}"))).unwrap();
    }

    /// The member that leads among `among`, once one does (and the others know it).
    async fn leader(&self, among: &[MemberId]) -> MemberId {
        wait_for(Duration::from_secs(10), "a leader", || {
            among.iter().copied().find(|id| {
                let m = self.members[id].raft.metrics().borrow().clone();
                m.state == ServerState::Leader
                    && m.current_leader == Some(*id)
                    && among.iter().all(|o| self.members[o].raft.metrics().borrow().current_leader == Some(*id))
            })
        })
        .await
    }

    async fn add(&self, via: MemberId, key: &str, n: u64) -> Result<u64, String> {
        let at_ms = NEXT_MS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cmd = Proposal(encode(&Add { key: key.into(), n, at_ms }));
        let write = self.members[&via].raft.client_write(cmd);
        match tokio::time::timeout(Duration::from_secs(2), write).await {
            Ok(Ok(resp)) => decode::<Total>(&resp.data.0).map(|t| t.0).map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no majority within 2 s".into()),
        }
    }

    /// Waits until every member in `ids` has applied everything the first one has, then returns
    /// each one's capability tables (everything below the Raft tables).
    async fn settled_tables(&self, ids: &[MemberId]) -> Vec<Vec<RawRecord>> {
        wait_for(Duration::from_secs(10), "every replica applied the same log", || {
            let applied: BTreeSet<Option<u64>> =
                ids.iter().map(|id| self.members[id].raft.metrics().borrow().last_applied.map(|l| l.index)).collect();
            let last = self.members[&ids[0]].raft.metrics().borrow().last_log_index;
            (applied.len() == 1 && applied.first().copied().flatten() == last).then_some(())
        })
        .await;
        ids.iter().map(|id| self.members[id].store.export_below(RAFT_TABLES_FROM).unwrap()).collect()
    }

    fn total(&self, id: MemberId, key: &str) -> u64 {
        TOTALS.get(&self.members[&id].store, &key.to_string()).unwrap().map_or(0, |t| t.0)
    }
}

/// Polls `check` every 10 ms until it gives `Some`, or panics after `timeout` naming `what`.
async fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leader_is_replaced_and_nothing_committed_is_lost() {
    let mut g = Group::start(&[1, 2, 3]).await;
    let first = g.leader(&[1, 2, 3]).await;
    for _ in 0..20 {
        g.add(first, "k", 1).await.unwrap();
    }
    g.stop(first).await;
    let rest: Vec<MemberId> = [1, 2, 3].into_iter().filter(|id| *id != first).collect();
    let second = g.leader(&rest).await;
    assert_ne!(second, first);
    for _ in 0..20 {
        g.add(second, "k", 1).await.unwrap();
    }
    let tables = g.settled_tables(&rest).await;
    assert_eq!(tables[0], tables[1], "the two survivors hold the same tables");
    assert_eq!(g.total(rest[0], "k"), 40, "every committed add is there, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_commits_nothing_and_follows_after_the_heal() {
    let g = Group::start(&[1, 2, 3]).await;
    let old = g.leader(&[1, 2, 3]).await;
    for _ in 0..5 {
        g.add(old, "k", 1).await.unwrap();
    }
    g.net.set_cut(old, true);
    let rest: Vec<MemberId> = [1, 2, 3].into_iter().filter(|id| *id != old).collect();
    let new = g.leader(&rest).await;
    // The old leader cannot get a majority for this write: it is never acknowledged.
    assert!(g.add(old, "k", 1000).await.is_err(), "a leader cut off from the majority acknowledged a write");
    for _ in 0..5 {
        g.add(new, "k", 1).await.unwrap();
    }
    g.net.set_cut(old, false);
    wait_for(Duration::from_secs(10), "the old leader follows the new one", || {
        let m = g.members[&old].raft.metrics().borrow().clone();
        (m.state == ServerState::Follower && m.current_leader == Some(new)).then_some(())
    })
    .await;
    g.add(new, "k", 1).await.unwrap();
    let tables = g.settled_tables(&[new, old, rest.iter().copied().find(|id| *id != new).unwrap()]).await;
    assert!(tables.windows(2).all(|w| w[0] == w[1]), "every replica holds the same tables after the heal");
    assert_eq!(g.total(old, "k"), 11, "the cut-off leader's write was dropped everywhere, its own copy included");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_member_rejoins_as_a_new_member_and_catches_up_by_snapshot() {
    let mut g = Group::start(&[1, 2, 3]).await;
    let leader = g.leader(&[1, 2, 3]).await;
    let victim = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    for i in 0..30 {
        g.add(leader, &format!("k{}", i % 3), 1).await.unwrap();
    }
    g.stop(victim).await;
    g.wipe(victim);
    let at_wipe = g.members[&leader].raft.metrics().borrow().last_log_index.unwrap_or(0);
    for i in 0..30 {
        g.add(leader, &format!("k{}", i % 3), 1).await.unwrap();
    }
    // The leader purges after each snapshot, once its store is synced: wait for a purge past
    // what the wiped member had, so that only a snapshot can catch it up.
    wait_for(Duration::from_secs(10), "the leader purged the entries the wiped member missed", || {
        let purged = g.members[&leader].raft.metrics().borrow().purged;
        purged.is_some_and(|p| p.index > at_wipe).then_some(())
    })
    .await;
    // The wiped disk comes back as a new member (a new incarnation, never its old self), is
    // added as a learner, catches up (the log it missed is purged: by snapshot), then replaces
    // the old member among the voters.
    let fresh: MemberId = 40 + victim;
    g.add_member(fresh).await;
    let raft = g.members[&leader].raft.clone();
    raft.add_learner(fresh, BasicNode::new(fresh.to_string()), true).await.expect("add learner");
    let voters: BTreeSet<MemberId> = [1, 2, 3].into_iter().filter(|id| *id != victim).chain([fresh]).collect();
    raft.change_membership(voters.clone(), false).await.expect("swap the wiped member for its new self");
    // Its metrics are published a moment after the install; its log had nothing the leader kept.
    wait_for(Duration::from_secs(10), "the new member was caught up by a snapshot", || {
        g.members[&fresh].raft.metrics().borrow().snapshot.map(|_| ())
    })
    .await;
    g.add(leader, "k0", 1).await.unwrap();
    let ids: Vec<MemberId> = voters.into_iter().collect();
    let tables = g.settled_tables(&ids).await;
    assert!(tables.windows(2).all(|w| w[0] == w[1]), "the new member holds the same tables");
    assert_eq!([g.total(fresh, "k0"), g.total(fresh, "k1"), g.total(fresh, "k2")], [21, 20, 20]);
    // The group's time came along (it is state-machine state): were the new member to lead, its
    // clock would start from it, not from its own wall clock.
    let time = |id: MemberId| GROUP_TIME.get(&g.members[&id].store, &0).unwrap().map(|t| t.0);
    assert!(time(leader).is_some_and(|t| t > 1_000), "{:?}", time(leader));
    assert_eq!(time(fresh), time(leader));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_decode_a_committed_command_stops_and_catches_up_once_upgraded() {
    // Members 1 and 2 run the newer build, member 3 the older one (a rolling upgrade half done).
    let mut g = Group::start_with(&[1, 2, 3], |id| {
        if id == 3 {
            Arc::new(Adder) as Arc<dyn RawMachine>
        } else {
            Arc::new(NewAdder)
        }
    })
    .await;
    let mut leader = g.leader(&[1, 2, 3]).await;
    if leader == 3 {
        // Let a member of the newer build lead, so the write below is answered by one that reads it.
        g.members[&1].raft.trigger().elect().await.expect("trigger an election");
        leader = wait_for(Duration::from_secs(10), "a leader of the newer build", || {
            [1, 2].into_iter().find(|id| g.members[id].raft.metrics().borrow().state == ServerState::Leader)
        })
        .await;
    }
    for _ in 0..5 {
        g.add(leader, "k", 1).await.unwrap();
    }
    // Version-2 bytes: members 1 and 2 read them, member 3 cannot.
    let at_ms = NEXT_MS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let cmd = Proposal(encode(&AddV2 { key: "k".into(), n: 100, at_ms, note: "newer".into() }));
    let resp = g.members[&leader].raft.client_write(cmd).await.expect("the newer build commits it");
    assert_eq!(decode::<Total>(&resp.data.0).unwrap(), Total(105));
    let index = resp.log_id.index;

    // Member 3 stops instead of skipping the command: its Raft reports a fatal error, and neither
    // the command nor anything after it is applied there.
    wait_for(Duration::from_secs(10), "the older member to stop", || {
        g.members[&3].raft.metrics().borrow().running_state.is_err().then_some(())
    })
    .await;
    let applied = g.members[&3].raft.metrics().borrow().last_applied.map(|l| l.index);
    assert!(applied < Some(index), "member 3 applied past a command it cannot read: {applied:?} >= {index}");
    assert_eq!(g.total(3, "k"), 5, "member 3 holds the state before the command, never a state without it");

    // The other two go on as a majority.
    for _ in 0..5 {
        g.add(leader, "k", 1).await.unwrap();
    }

    // Upgraded, member 3 applies the command from its log (or a snapshot) and agrees again.
    g.stop(3).await;
    g.add_member_with(3, Arc::new(NewAdder)).await;
    g.add(leader, "k", 1).await.unwrap();
    let tables = g.settled_tables(&[1, 2, 3]).await;
    assert!(tables.windows(2).all(|w| w[0] == w[1]), "every replica holds the same tables after the upgrade");
    assert_eq!(g.total(3, "k"), 111);
}
