//! The state machine side of a group: the capability's own tables in the group's store.
//!
//! A capability supplies a [`Machine`]: a deterministic function from (its tables, one committed
//! command) to (a reply, the writes to make). This adapter applies the entries of one call and the
//! new applied log id as one batch written behind (`Store::apply_deferred`): reads see it at once,
//! and sled takes it with the store's next fold, all-or-nothing together with every batch before
//! it (an intent record, the last value of each key, the intent's removal). So after a crash the
//! tables and the applied id agree, and openraft re-applies exactly what came after. The tables
//! need no flush of their own: the log is durable, and what was applied is applied again from it
//! (the log is purged only after `Store::sync`, which folds first).
//!
//! Snapshots are a consistent export of every table below [`RAFT_TABLES_FROM`]; installing one
//! replaces those tables in one batch. The last one is kept as a file of the store's
//! [`SNAPSHOT_DIR`], synced in chunks, not in sled (see `SnapshotData::File` for why).

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bulkhead_codec::{decode, encode, CodecError, Record};
use bulkhead_storage::{Batch, RawRecord, Store, StoreError};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftLogId, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};

use super::types::{
    snapshot_file_name, Applied, AppliedState, GroupTime, MemberId, ReplyBatch, SnapshotBody, SnapshotData,
    SnapshotRecord, TypeConfig, APPLIED, GROUP_TIME, RAFT_TABLES_FROM, SNAPSHOT, SNAPSHOT_DIR, SNAPSHOT_PART,
    SNAPSHOT_PARTS,
};

type Result<T> = std::result::Result<T, StorageError<MemberId>>;
type StoreResult<T> = std::result::Result<T, StoreError>;

/// A capability's replicated state machine. `apply` must be deterministic: the same tables and
/// the same command give the same reply and writes on every replica. Time, ids and randomness come
/// in the command (the leader puts them there), never from a clock or a generator inside `apply`.
pub trait Machine: Send + Sync + 'static {
    type Command: Record + Send;
    type Reply: Record + Send;

    /// Applies one committed command: reads the tables through `batch` (`Table::get_through`:
    /// earlier entries of the same batch are not in the store yet), queues this one's writes there.
    fn apply(
        &self,
        store: &Store,
        batch: &mut Batch,
        cmd: Self::Command,
    ) -> std::result::Result<Self::Reply, StoreError>;

    /// The time the leader put into `cmd`, if it carries one: the group's time follows the latest
    /// (see [`super::clock`]).
    fn time_of(&self, _cmd: &Self::Command) -> Option<u64> {
        None
    }

    /// A stored record in today's layout, when it may stand in an older one (`Table::canonical`):
    /// what the state digest hashes, so that replicas that applied one command under two builds
    /// (across an upgrade) agree. `None`: the bytes as they are.
    fn canonical(&self, _key: &[u8], _value: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// What applying raw command bytes gave: the encoded reply and the time the command carried.
pub struct RawApplied {
    pub reply: Vec<u8>,
    pub time_ms: Option<u64>,
}

/// Why a committed command could not be applied. Either stops this replica's group (fail-stop):
/// openraft takes a state machine error as fatal, and nothing of the failed call is written.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The command does not decode on this build: a newer build proposed it (a mixed-version
    /// cluster), or its bytes are damaged. Skipping it would let this replica's state drift from
    /// the others in silence, and a later failover to it could double-charge or oversell; so the
    /// replica stops here instead, and a build that reads the command applies it from the log.
    #[error(
        "a committed command does not decode on this build (this replica stops until one that reads it runs): {0}"
    )]
    Undecodable(CodecError),
}

/// Object-safe form of a [`Machine`] over raw bytes, so one adapter type serves every capability.
pub trait RawMachine: Send + Sync + 'static {
    fn apply_raw(&self, store: &Store, batch: &mut Batch, cmd: &[u8]) -> std::result::Result<RawApplied, ApplyError>;
    fn canonical_raw(&self, key: &[u8], value: &[u8]) -> Option<Vec<u8>>;
}

impl<M: Machine> RawMachine for M {
    fn apply_raw(&self, store: &Store, batch: &mut Batch, cmd: &[u8]) -> std::result::Result<RawApplied, ApplyError> {
        let cmd = decode::<M::Command>(cmd).map_err(ApplyError::Undecodable)?;
        let time_ms = self.time_of(&cmd);
        let reply = self.apply(store, batch, cmd)?;
        Ok(RawApplied { reply: encode(&reply), time_ms })
    }

    fn canonical_raw(&self, key: &[u8], value: &[u8]) -> Option<Vec<u8>> {
        self.canonical(key, value)
    }
}

/// What applies and snapshot exports share, under one lock.
#[derive(Default)]
struct Gate {
    /// The group's time as applied so far, so applies need not read it from the store; `None`
    /// until first needed (read then), and again after a snapshot replaced the tables.
    time: Option<u64>,
    /// While a snapshot is exported: for each state-machine key an apply changed since the export
    /// began, the value it had then (`None`: absent), recorded before the change is written. The
    /// export runs without holding the gate (applies go on) and is corrected with these values
    /// afterwards, so it is exactly the state at the applied id it is labelled with.
    before: Option<HashMap<Vec<u8>, Option<Vec<u8>>>>,
    /// Snapshots installed so far: an install during an export makes that export worthless.
    installs: u64,
}

/// The openraft state machine of one group.
#[derive(Clone)]
pub struct StateMachineStore {
    store: Store,
    machine: Arc<dyn RawMachine>,
    /// Held while entries are applied (see [`Gate`]).
    gate: Arc<std::sync::Mutex<Gate>>,
    /// Records in the last snapshot this replica built or installed: the size of its state, which
    /// is what the next snapshot will cost (see `raft::group::snapshot_due`).
    state_records: Arc<AtomicU64>,
    /// Held while the kept snapshot (its record and parts) is written or read: openraft builds a
    /// snapshot on a task of its own, beside installs and reads of the current one.
    kept: Arc<std::sync::Mutex<()>>,
    /// Held for the length of an export (a snapshot's, a digest's): they share `Gate::before`.
    exporting: Arc<std::sync::Mutex<()>>,
}

/// A fingerprint of one replica's state: SHA-256 over every state-machine record (key and value,
/// each behind its length, in key order; a record in an older layout as today's build writes it,
/// `Machine::canonical`) at the applied index it stands for. Two replicas of a
/// group at the same applied index that give different digests have diverged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateDigest {
    pub applied_index: Option<u64>,
    pub records: u64,
    pub sha256: String,
}

impl StateDigest {
    /// Pure: the digest of `records` (sorted by key, as an export gives them).
    pub fn of(applied_index: Option<u64>, records: &[RawRecord]) -> StateDigest {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (k, v) in records {
            h.update((k.len() as u64).to_be_bytes());
            h.update(k);
            h.update((v.len() as u64).to_be_bytes());
            h.update(v);
        }
        let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        StateDigest { applied_index, records: records.len() as u64, sha256 }
    }
}

impl StateMachineStore {
    pub fn new(store: Store, machine: Arc<dyn RawMachine>) -> Self {
        Self {
            store,
            machine,
            gate: Arc::default(),
            state_records: Arc::default(),
            kept: Arc::default(),
            exporting: Arc::default(),
        }
    }

    /// The digest of this replica's state as applied now. Reads the whole state (blocking, on
    /// the caller's thread) without stopping applies: an operator's check, not a hot path.
    pub fn digest(&self) -> Result<StateDigest> {
        let (state, mut records) = self.export()?;
        for (k, v) in records.iter_mut() {
            if let Some(today) = self.machine.canonical_raw(k, v) {
                *v = today;
            }
        }
        Ok(StateDigest::of(state.last_applied.map(|l| l.index), &records))
    }

    /// The group's store: the capability's tables as applied so far.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The records of the last snapshot built or installed here, shared with the replica's driver.
    pub fn state_records(&self) -> Arc<AtomicU64> {
        self.state_records.clone()
    }

    fn applied(&self) -> std::result::Result<AppliedState, StoreError> {
        Ok(APPLIED.get(&self.store, &0)?.unwrap_or_default())
    }
}

/// The error that stops this replica's group at `log_id` (openraft takes it as fatal), logged.
fn stop_at(log_id: LogId<MemberId>, e: ApplyError) -> StorageError<MemberId> {
    tracing::error!(log_id = %log_id, error = %e, "apply failed: this replica's group stops");
    StorageIOError::apply(log_id, &e).into()
}

fn sm_read(e: StoreError) -> StorageError<MemberId> {
    StorageIOError::read_state_machine(&e).into()
}

fn sm_write(e: StoreError) -> StorageError<MemberId> {
    StorageIOError::write_state_machine(&e).into()
}

impl StateMachineStore {
    /// Applies committed entries in order; their writes and the new applied id go in one atomic
    /// batch, so after a crash the tables and the applied id agree.
    fn apply_blocking(&self, entries: Vec<Entry<TypeConfig>>) -> Result<Vec<Applied>> {
        let mut gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = self.applied().map_err(sm_read)?;
        let mut replies = Vec::with_capacity(entries.len());
        // One batch for every entry of this call: each entry reads through the writes of the ones
        // before it (`Table::get_through`); the store's fold makes it all-or-nothing across a
        // crash, together with the applied id written last (`Store::apply_deferred`).
        let mut b = Batch::new();
        let stored_time = match gate.time {
            Some(t) => t,
            None => GROUP_TIME.get(&self.store, &0).map_err(sm_read)?.map_or(0, |t| t.0),
        };
        let mut time = stored_time;
        for entry in entries {
            let log_id = *entry.get_log_id();
            let reply = match entry.payload {
                EntryPayload::Blank => Applied::default(),
                EntryPayload::Normal(p) => {
                    // One command or a batch of them: each applied alike, reading through the
                    // writes of those before it; a batch answers each.
                    let mut apply = |cmd: &[u8]| -> Result<Vec<u8>> {
                        let applied =
                            self.machine.apply_raw(&self.store, &mut b, cmd).map_err(|e| stop_at(log_id, e))?;
                        time = time.max(applied.time_ms.unwrap_or(0));
                        Ok(applied.reply)
                    };
                    match p.batch() {
                        None => Applied(apply(&p.0)?),
                        Some(commands) => {
                            let commands = commands.map_err(|e| stop_at(log_id, ApplyError::Undecodable(e)))?;
                            let replies = commands.iter().map(|c| apply(c)).collect::<Result<Vec<_>>>()?;
                            Applied(encode(&ReplyBatch { replies }))
                        }
                    }
                }
                EntryPayload::Membership(m) => {
                    state.membership = StoredMembership::new(Some(log_id), m);
                    Applied::default()
                }
            };
            state.last_applied = Some(log_id);
            replies.push(reply);
        }
        if time > stored_time {
            GROUP_TIME.put(&mut b, &0, &GroupTime(time));
        }
        APPLIED.put(&mut b, &0, &state);
        if let Some(before) = gate.before.as_mut() {
            for key in b.keys().filter(|k| k.first().is_some_and(|id| *id < RAFT_TABLES_FROM)) {
                if !before.contains_key(key) {
                    before.insert(key.to_vec(), self.store.get_raw(key).map_err(sm_read)?);
                }
            }
        }
        // Written behind: the overlay takes the batch at once, sled gets it with the next fold,
        // atomically together with this applied id (see `bulkhead_storage`'s overlay).
        self.store.apply_deferred(b).map_err(sm_write)?;
        gate.time = Some(time);
        Ok(replies)
    }
}

/// Corrects an export made while applies went on: every key an apply changed since the export
/// began takes back the value it had then (or goes, if it had none). Pure, for tests.
fn as_of(exported: Vec<RawRecord>, mut before: HashMap<Vec<u8>, Option<Vec<u8>>>) -> Vec<RawRecord> {
    let mut out: Vec<RawRecord> = Vec::with_capacity(exported.len());
    for (k, v) in exported {
        match before.remove(&k) {
            None => out.push((k, v)),
            Some(Some(old)) => out.push((k, old)),
            // Created during the export: not part of the state it stands for.
            Some(None) => {}
        }
    }
    // Removed during the export (so the export did not see them), present at its start.
    out.extend(before.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn part_key(generation: u32, part: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(part)
}

impl StateMachineStore {
    /// Writes the snapshot's bytes to a file of a new generation, durable before this returns, then
    /// queues into `b` its record and the removal of every part an older build kept a snapshot in
    /// (all there are, not only the previous record's: a crash in the middle of an earlier removal
    /// would leave some behind for good). A crash anywhere leaves the old or the new record, and its
    /// file whole (an orphaned file at worst, removed by the next keep). Returns the new
    /// generation: once the record is durable, [`Self::forget_other_snapshots`] removes every other
    /// file.
    fn keep_snapshot(&self, b: &mut Batch, meta: &SnapshotMeta<MemberId, BasicNode>, data: &[u8]) -> StoreResult<u32> {
        let previous = match SNAPSHOT.get(&self.store, &0)? {
            Some(SnapshotRecord {
                data: SnapshotData::Parts { generation, .. } | SnapshotData::File { generation, .. },
                ..
            }) => Some(generation),
            Some(SnapshotRecord { data: SnapshotData::Inline(_), .. }) | None => None,
        };
        let generation = previous.map_or(1, |g| g.wrapping_add(1));
        write_snapshot_file(&self.snapshot_dir(), generation, data)
            .map_err(|e| StoreError::Io(format!("{}: {e}", self.snapshot_dir().display())))?;
        let kept = SnapshotData::File { generation, len: data.len() as u64, crc32: crc32fast::hash(data) };
        SNAPSHOT.put(b, &0, &SnapshotRecord { meta: meta.clone(), data: kept });
        for part in SNAPSHOT_PARTS.keys_range(&self.store, &0, None) {
            SNAPSHOT_PARTS.remove(b, &part?);
        }
        Ok(generation)
    }

    /// The folder of this group's kept snapshots, inside its store's folder.
    fn snapshot_dir(&self) -> PathBuf {
        self.store.path().join(SNAPSHOT_DIR)
    }

    /// Once the record naming `generation` is durable (waits for the store's next flush), removes
    /// every other file of the snapshot folder: the snapshot it replaced, and whatever a crash left
    /// half written. Best effort: a file left behind costs disk, never a wrong read.
    fn forget_other_snapshots(&self, generation: u32) {
        if let Err(e) = self.store.sync_blocking() {
            tracing::warn!(store = %self.store.capability(), error = %e, "the kept snapshot's record is not durable; older snapshot files stay");
            return;
        }
        let keep = snapshot_file_name(generation);
        let Ok(entries) = std::fs::read_dir(self.snapshot_dir()) else { return };
        for entry in entries.flatten() {
            if entry.file_name().to_str() != Some(keep.as_str()) {
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(path = %entry.path().display(), error = %e, "an old snapshot file could not be removed");
                }
            }
        }
    }
}

/// Bytes of a kept snapshot written between two `fdatasync`s of its file. On ext4 (data=ordered)
/// a sync waits for every dirty page its journal commit covers, whoever wrote them: a snapshot of
/// hundreds of MB made durable at once held every node-log `fdatasync` on the same disk for as
/// long. Synced chunk by chunk, another sync waits behind one chunk at most.
const SNAPSHOT_WRITE_CHUNK: usize = 4 * 1024 * 1024;

/// Writes `data` as the snapshot file of `generation` in `dir`: into a temporary file, synced
/// chunk by chunk, then renamed into place and the folder synced, so the name only ever stands for
/// a whole file.
fn write_snapshot_file(dir: &Path, generation: u32, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        // The new folder's own entry in the store's folder must be durable too, or a power cut
        // could keep the record and lose the folder. (With `Durability::Flush`, for comparisons
        // only, the store's record itself is not made durable, so after a power cut it may name a
        // file already replaced: that mode promises nothing across one.)
        if let Some(parent) = dir.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
    }
    let path = dir.join(snapshot_file_name(generation));
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    for chunk in data.chunks(SNAPSHOT_WRITE_CHUNK) {
        file.write_all(chunk)?;
        file.sync_data()?;
    }
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Reads the snapshot file of `generation` back, checked against its record's `len` and `crc32`.
fn read_snapshot_file(dir: &Path, generation: u32, len: u64, crc32: u32) -> StoreResult<Vec<u8>> {
    let path = dir.join(snapshot_file_name(generation));
    let data = std::fs::read(&path).map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
    if data.len() as u64 != len || crc32fast::hash(&data) != crc32 {
        return Err(StoreError::Io(format!(
            "{}: {} bytes that do not match the kept snapshot's record ({len} bytes, crc32 {crc32:08x})",
            path.display(),
            data.len()
        )));
    }
    Ok(data)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        // The export, its encoding and its writes are blocking sled work of the size of the whole
        // state: on the blocking pool, never on a runtime thread that carries heartbeats.
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.build_snapshot_blocking())
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?
    }
}

impl StateMachineStore {
    /// The state-machine tables exactly as they were at the applied id returned with them, without
    /// stopping applies for the length of the export: the gate is held only to mark the start
    /// (applies then record what they change, see [`Gate::before`]) and the end.
    fn export(&self) -> Result<(AppliedState, Vec<RawRecord>)> {
        let _one = self.exporting.lock().unwrap_or_else(|p| p.into_inner());
        // An install during the export replaces the tables under it: start again (rare; bounded).
        for _ in 0..3 {
            let (state, installs) = self.begin_export()?;
            // Whatever happens, the export ends (applies stop recording what they change).
            let (exported, failed) = match self.store.export_below(RAFT_TABLES_FROM) {
                Ok(records) => (records, None),
                Err(e) => (Vec::new(), Some(e)),
            };
            let finished = self.finish_export(exported, installs);
            if let Some(e) = failed {
                return Err(sm_read(e));
            }
            if let Some(records) = finished {
                return Ok((state, records));
            }
        }
        Err(sm_read(StoreError::Io("snapshots kept being installed during the export".into())))
    }

    /// Marks the start of an export: the applied state it stands for, and the installs so far.
    fn begin_export(&self) -> Result<(AppliedState, u64)> {
        let mut gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        let state = self.applied().map_err(sm_read)?;
        debug_assert!(gate.before.is_none(), "two snapshot exports at once");
        gate.before = Some(HashMap::new());
        Ok((state, gate.installs))
    }

    /// Ends an export: the records as they were at its start, or `None` if a snapshot was
    /// installed meanwhile.
    fn finish_export(&self, exported: Vec<RawRecord>, installs: u64) -> Option<Vec<RawRecord>> {
        let (before, installed) = {
            let mut gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
            (gate.before.take().unwrap_or_default(), gate.installs != installs)
        };
        (!installed).then(|| as_of(exported, before))
    }

    fn build_snapshot_blocking(&self) -> Result<Snapshot<TypeConfig>> {
        // One build at a time in this process: a build takes a core for seconds on a large state,
        // and two groups of one node reaching their turn together took both cores of a small box.
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let started = std::time::Instant::now();
        let (state, records) = self.export()?;
        let exported_ms = started.elapsed().as_millis() as u64;
        let n_records = records.len();
        self.state_records.store(n_records as u64, Ordering::Relaxed);
        let data = encode(&SnapshotBody { records });
        let snapshot_id = match state.last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id.term, id.index, data.len()),
            None => format!("empty-{}", data.len()),
        };
        let meta = SnapshotMeta { last_log_id: state.last_applied, last_membership: state.membership, snapshot_id };
        {
            let _kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
            // A snapshot installed since the export began is newer: keep it, not this one.
            let kept = SNAPSHOT.get(&self.store, &0).map_err(sm_read)?;
            if kept.is_some_and(|k| k.meta.last_log_id >= meta.last_log_id) {
                tracing::info!(store = %self.store.capability(), snapshot = %meta.snapshot_id,
                    "a newer snapshot was installed meanwhile; this one is not kept");
                return Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) });
            }
            let mut b = Batch::new();
            let generation = self
                .keep_snapshot(&mut b, &meta, &data)
                .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
            // In order, as one batch would be, but in slices with a breath between them: the
            // removal of an older build's parts can be long, and the group's core appends to this
            // store too (see `log_store::remove_entries_upto`).
            for slice in b.split(256) {
                self.store
                    .apply_in_order(slice)
                    .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            self.forget_other_snapshots(generation);
        }
        tracing::info!(store = %self.store.capability(), snapshot = %meta.snapshot_id, bytes = data.len(),
            records = n_records, exported_ms, ms = started.elapsed().as_millis() as u64, "snapshot built");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId<MemberId>>, StoredMembership<MemberId, BasicNode>)> {
        let s = self.applied().map_err(sm_read)?;
        Ok((s.last_applied, s.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // On openraft's state-machine task itself, not the blocking pool: an apply is a few sled
        // writes in memory (no flush: the log is the durability), tens of microseconds, and a hop
        // to the blocking pool and back cost more in thread wake-ups than the apply. The group's
        // core (heartbeats, replication) runs on a task of its own meanwhile.
        self.apply_blocking(entries.into_iter().collect())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<MemberId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        // Decoding and replacing the whole state is blocking work: on the blocking pool.
        let (this, meta) = (self.clone(), meta.clone());
        tokio::task::spawn_blocking(move || this.install_snapshot_blocking(&meta, snapshot.into_inner()))
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.current_snapshot_blocking())
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
    }
}

impl StateMachineStore {
    fn install_snapshot_blocking(&self, meta: &SnapshotMeta<MemberId, BasicNode>, data: Vec<u8>) -> Result<()> {
        let body: SnapshotBody =
            decode(&data).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let n = body.records.len();
        let mut extra = Batch::new();
        let state = AppliedState { last_applied: meta.last_log_id, membership: meta.last_membership.clone() };
        APPLIED.put(&mut extra, &0, &state);
        let _kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self
            .keep_snapshot(&mut extra, meta, &data)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let mut gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        self.store
            .replace_below(RAFT_TABLES_FROM, body.records, extra)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        // The group's time came with the tables: read it again at the next apply.
        gate.time = None;
        gate.installs += 1;
        drop(gate);
        self.forget_other_snapshots(generation);
        self.state_records.store(n as u64, Ordering::Relaxed);
        tracing::info!(store = %self.store.capability(), snapshot = %meta.snapshot_id, records = n, "snapshot installed");
        Ok(())
    }

    fn current_snapshot_blocking(&self) -> Result<Option<Snapshot<TypeConfig>>> {
        let _kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let Some(rec) = SNAPSHOT.get(&self.store, &0).map_err(sm_read)? else { return Ok(None) };
        let data = match rec.data {
            SnapshotData::Inline(data) => data,
            SnapshotData::Parts { generation, parts } => {
                let mut data = Vec::with_capacity(parts as usize * SNAPSHOT_PART);
                for i in 0..parts {
                    let part = SNAPSHOT_PARTS.get(&self.store, &part_key(generation, i)).map_err(sm_read)?.ok_or_else(
                        || {
                            StorageIOError::read_snapshot(
                                Some(rec.meta.signature()),
                                &StoreError::Io(format!("snapshot part {i} of {parts} is missing")),
                            )
                        },
                    )?;
                    data.extend_from_slice(&part.0);
                }
                data
            }
            SnapshotData::File { generation, len, crc32 } => {
                read_snapshot_file(&self.snapshot_dir(), generation, len, crc32)
                    .map_err(|e| StorageIOError::read_snapshot(Some(rec.meta.signature()), &e))?
            }
        };
        Ok(Some(Snapshot { meta: rec.meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_storage::{StoreOptions, Table};

    struct Nothing;
    impl Machine for Nothing {
        type Command = SnapshotPart;
        type Reply = SnapshotPart;
        fn apply(&self, _: &Store, _: &mut Batch, cmd: SnapshotPart) -> std::result::Result<SnapshotPart, StoreError> {
            Ok(cmd)
        }
    }

    use super::super::types::SnapshotPart;
    const BIG: Table<u64, SnapshotPart> = Table::new(1, "big");

    #[test]
    fn a_digest_covers_every_byte_and_where_each_key_ends() {
        let rec = |k: &[u8], v: &[u8]| (k.to_vec(), v.to_vec());
        let a = StateDigest::of(Some(3), &[rec(b"ab", b"c")]);
        assert_eq!(a, StateDigest::of(Some(3), &[rec(b"ab", b"c")]));
        assert_ne!(a.sha256, StateDigest::of(Some(3), &[rec(b"a", b"bc")]).sha256);
        assert_ne!(a.sha256, StateDigest::of(Some(3), &[rec(b"ab", b"d")]).sha256);
        assert_eq!(a.records, 1);
        // Pinned: the digest is compared across builds (a mixed-version cluster), so it must not move.
        assert_eq!(
            StateDigest::of(None, &[]).sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            a.sha256, "601d5476e2ccfe2c87a2bba7a322659734a05749d5b5aa781f513e4912db0d5f",
            "SHA-256 of be64(2) \"ab\" be64(1) \"c\""
        );
    }

    /// Sets (`Some`) or removes (`None`) counters of table 2, in one command.
    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    struct Set(Vec<(u64, Option<u64>)>);
    impl Record for Set {
        const VERSION: u8 = 1;
    }
    const COUNTERS: Table<u64, Set> = Table::new(2, "counters");
    struct Setter;
    impl Machine for Setter {
        type Command = Set;
        type Reply = Set;
        fn apply(&self, _: &Store, b: &mut Batch, cmd: Set) -> std::result::Result<Set, StoreError> {
            for (k, v) in &cmd.0 {
                match v {
                    Some(v) => COUNTERS.put(b, k, &Set(vec![(*k, Some(*v))])),
                    None => COUNTERS.remove(b, k),
                }
            }
            Ok(cmd)
        }
    }

    /// A command that changes, removes and creates keys, deterministically by index.
    fn churn(i: u64) -> Set {
        Set(vec![(i * 7 % 500, Some(i)), (i * 13 % 500, (!i.is_multiple_of(3)).then_some(i + 1)), (1_000 + i, Some(i))])
    }

    fn entry(index: u64, cmd: &Set) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 0), index),
            payload: EntryPayload::Normal(super::super::types::Proposal(encode(cmd))),
        }
    }

    /// Applies go on while a snapshot exports (they no longer wait for it): a key changed, a key
    /// removed, a key created meanwhile, some twice. The export is still exactly the tables at the
    /// applied id it is labelled with; an install meanwhile voids it.
    #[tokio::test]
    async fn an_export_during_applies_is_the_state_at_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "cap", &StoreOptions::default()).unwrap();
        let sm = StateMachineStore::new(store.clone(), Arc::new(Setter));
        sm.apply_blocking(vec![entry(1, &Set(vec![(1, Some(10)), (2, Some(20)), (3, Some(30))]))]).unwrap();
        let at_start = store.export_below(RAFT_TABLES_FROM).unwrap();

        let (state, installs) = sm.begin_export().unwrap();
        assert_eq!(state.last_applied.map(|l| l.index), Some(1));
        sm.apply_blocking(vec![
            entry(2, &Set(vec![(1, Some(11)), (2, None), (4, Some(40))])),
            entry(3, &Set(vec![(1, Some(12)), (5, Some(50)), (5, None)])),
        ])
        .unwrap();
        let exported = store.export_below(RAFT_TABLES_FROM).unwrap();
        assert_ne!(exported, at_start, "the applies changed the tables under the export");
        assert_eq!(sm.finish_export(exported, installs), Some(at_start.clone()));
        // The export is over: later applies record nothing.
        sm.apply_blocking(vec![entry(4, &Set(vec![(6, Some(60))]))]).unwrap();
        assert!(sm.gate.lock().unwrap().before.is_none());

        let (_, installs) = sm.begin_export().unwrap();
        sm.gate.lock().unwrap().installs += 1;
        assert_eq!(sm.finish_export(at_start, installs), None);
    }

    /// The same with a real race: one thread applies entries without pause while a snapshot
    /// exports the tables. The export equals the tables of a replay of the log up to the id it is
    /// labelled with, on a fresh store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_export_racing_applies_equals_a_replay_up_to_its_label() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "cap", &StoreOptions::default()).unwrap();
        let sm = StateMachineStore::new(store.clone(), Arc::new(Setter));
        for chunk in (1..=5_000u64).collect::<Vec<_>>().chunks(100) {
            sm.apply_blocking(chunk.iter().map(|i| entry(*i, &churn(*i))).collect()).unwrap();
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let applier = {
            let (sm, stop) = (sm.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 5_001;
                while !stop.load(Ordering::Relaxed) {
                    sm.apply_blocking(vec![entry(i, &churn(i))]).unwrap();
                    i += 1;
                }
            })
        };
        let (state, records) = sm.export().unwrap();
        let applied_after = sm.applied().unwrap().last_applied.map_or(0, |l| l.index);
        stop.store(true, Ordering::Relaxed);
        applier.join().unwrap();
        let label = state.last_applied.map_or(0, |l| l.index);
        assert!(applied_after > label, "no apply ran beside the export ({label})");

        let dir2 = tempfile::tempdir().unwrap();
        let replay = Store::open(dir2.path(), "cap", &StoreOptions::default()).unwrap();
        let sm2 = StateMachineStore::new(replay.clone(), Arc::new(Setter));
        for chunk in (1..=label).collect::<Vec<_>>().chunks(100) {
            sm2.apply_blocking(chunk.iter().map(|i| entry(*i, &churn(*i))).collect()).unwrap();
        }
        assert_eq!(records, replay.export_below(RAFT_TABLES_FROM).unwrap());
    }

    /// A crash loses what no fold took, and loses it whole: the store reopens at the applied id
    /// of its last fold with the tables of exactly that id, and applying the log from there gives
    /// the state of a replica that never crashed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_loses_unfolded_applies_whole_and_the_log_applies_them_again() {
        let apply = |sm: &StateMachineStore, from: u64, to: u64| {
            for chunk in (from..=to).collect::<Vec<_>>().chunks(7) {
                sm.apply_blocking(chunk.iter().map(|i| entry(*i, &churn(*i))).collect()).unwrap();
            }
        };
        let replay = |to: u64| {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), "cap", &StoreOptions::default()).unwrap();
            apply(&StateMachineStore::new(store.clone(), Arc::new(Setter)), 1, to);
            store.export_below(RAFT_TABLES_FROM).unwrap()
        };
        for crash_at in [40u64, 700, 4_321] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), "cap", &StoreOptions::default()).unwrap();
            let sm = StateMachineStore::new(store.clone(), Arc::new(Setter));
            apply(&sm, 1, crash_at / 2);
            store.sync().await.unwrap();
            // Past the sync, the flusher folds on its own (after 2,048 new keys), or not at all.
            apply(&sm, crash_at / 2 + 1, crash_at);
            drop(sm);
            store.crash();

            let store = Store::open(dir.path(), "cap", &StoreOptions::default()).unwrap();
            let sm = StateMachineStore::new(store.clone(), Arc::new(Setter));
            let at = sm.applied().unwrap().last_applied.map_or(0, |l| l.index);
            assert!(at >= crash_at / 2 && at <= crash_at, "reopened at {at} after a crash at {crash_at}");
            assert_eq!(store.export_below(RAFT_TABLES_FROM).unwrap(), replay(at), "the tables are those of {at}");
            apply(&sm, at + 1, crash_at);
            assert_eq!(store.export_below(RAFT_TABLES_FROM).unwrap(), replay(crash_at));
        }
    }

    /// An entry of several commands applies them in order, each seeing the ones before it, and
    /// answers each; an entry whose batch does not decode stops the apply (no silent skip).
    #[tokio::test]
    async fn a_batch_entry_applies_every_command_in_order_and_answers_each() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "cap", &StoreOptions::default()).unwrap();
        let sm = StateMachineStore::new(store.clone(), Arc::new(Setter));
        let cmds = [Set(vec![(1, Some(10))]), Set(vec![(1, Some(11)), (2, Some(20))]), Set(vec![(2, None)])];
        let batch = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 0), 1),
            payload: EntryPayload::Normal(super::super::types::Proposal::of(cmds.iter().map(encode).collect())),
        };
        let replies = sm.apply_blocking(vec![batch, entry(2, &Set(vec![(3, Some(30))]))]).unwrap();
        let answers = decode::<ReplyBatch>(&replies[0].0).unwrap().replies;
        let answers: Vec<Set> = answers.iter().map(|a| decode::<Set>(a).unwrap()).collect();
        assert_eq!(format!("{answers:?}"), format!("{cmds:?}"));
        assert_eq!(decode::<Set>(&replies[1].0).unwrap().0, vec![(3, Some(30))]);
        assert_eq!(COUNTERS.get(&store, &1).unwrap().map(|s| s.0), Some(vec![(1, Some(11))]));
        assert!(COUNTERS.get(&store, &2).unwrap().is_none());
        let broken = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 0), 3),
            payload: EntryPayload::Normal(super::super::types::Proposal(vec![super::super::types::BATCH_MARK, 7])),
        };
        assert!(sm.apply_blocking(vec![broken]).is_err());
        assert_eq!(sm.applied().unwrap().last_applied.map(|l| l.index), Some(2), "nothing of it was applied");
    }

    #[test]
    fn as_of_puts_back_what_changed_and_drops_what_was_created() {
        let rec = |k: &[u8], v: &[u8]| (k.to_vec(), v.to_vec());
        let exported = vec![rec(b"a", b"1"), rec(b"b", b"new"), rec(b"d", b"created")];
        let before = HashMap::from([
            (b"b".to_vec(), Some(b"old".to_vec())),
            (b"c".to_vec(), Some(b"removed".to_vec())),
            (b"d".to_vec(), None),
        ]);
        assert_eq!(as_of(exported, before), vec![rec(b"a", b"1"), rec(b"b", b"old"), rec(b"c", b"removed")]);
    }

    fn snapshot_files(sm: &StateMachineStore) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(sm.snapshot_dir())
            .map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Marks the store applied up to `index`, as an apply would.
    fn applied_up_to(store: &Store, index: u64) {
        let mut b = Batch::new();
        let last_applied = Some(LogId::new(openraft::CommittedLeaderId::new(1, 0), index));
        APPLIED.put(&mut b, &0, &AppliedState { last_applied, membership: StoredMembership::default() });
        store.apply_in_order(b).unwrap();
    }

    async fn store_of_3mb(dir: &Path) -> (Store, StateMachineStore) {
        let store = Store::open(dir, "cap", &StoreOptions::default()).unwrap();
        let mut b = Batch::new();
        for i in 0..600u64 {
            BIG.put(&mut b, &i, &SnapshotPart(vec![i as u8; 5_000]));
        }
        store.apply_in_order(b).unwrap();
        let sm = StateMachineStore::new(store.clone(), Arc::new(Nothing));
        (store, sm)
    }

    /// Snapshots of a few MB, built again and again (a snapshot every N entries, a new member
    /// caught up), are kept as one file each, the last one only, and read back whole; sled writes
    /// no blob file and keeps no part.
    #[tokio::test]
    async fn a_kept_snapshot_is_one_file_and_only_the_last_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut sm) = store_of_3mb(dir.path()).await;
        let mut last = Vec::new();
        for i in 1..=5 {
            applied_up_to(&store, i);
            let built = sm.build_snapshot().await.unwrap();
            last = built.snapshot.into_inner();
        }
        assert!(last.len() > 3_000_000, "{}", last.len());
        assert_eq!(snapshot_files(&sm), vec![snapshot_file_name(5)]);
        store.sync().await.unwrap();
        assert!(store.blob_bytes() < 1_000_000, "sled wrote {} bytes of blob files", store.blob_bytes());
        assert_eq!(SNAPSHOT_PARTS.iter(&store).count(), 0);
        let current = sm.get_current_snapshot().await.unwrap().expect("a snapshot");
        assert_eq!(current.snapshot.into_inner(), last);

        // sled opens its folder again with the snapshot folder inside, and the snapshot is there.
        drop((sm, store));
        let store = Store::open(dir.path(), "cap", &StoreOptions::default()).unwrap();
        let mut sm = StateMachineStore::new(store, Arc::new(Nothing));
        let current = sm.get_current_snapshot().await.unwrap().expect("the snapshot, after a restart");
        assert_eq!(current.snapshot.into_inner(), last);
    }

    /// A kept snapshot's file that was cut short or changed is refused with its path, never served
    /// as a snapshot.
    #[tokio::test]
    async fn a_damaged_snapshot_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, mut sm) = store_of_3mb(dir.path()).await;
        let built = sm.build_snapshot().await.unwrap().snapshot.into_inner();
        let path = sm.snapshot_dir().join(snapshot_file_name(1));
        std::fs::write(&path, &built[..built.len() - 1]).unwrap();
        let err = sm.get_current_snapshot().await.expect_err("a cut file is refused").to_string();
        assert!(err.contains("do not match"), "{err}");
        let mut changed = built.clone();
        changed[1000] ^= 1;
        std::fs::write(&path, &changed).unwrap();
        assert!(sm.get_current_snapshot().await.is_err());
        std::fs::remove_file(&path).unwrap();
        let err = sm.get_current_snapshot().await.expect_err("a missing file is refused").to_string();
        assert!(err.contains(&snapshot_file_name(1)), "{err}");
    }

    /// A store of an older build, with its snapshot in parts: read back as it is, and the next
    /// snapshot goes to a file and removes every part (also an earlier generation's that a crash
    /// left). A file a crash left behind (written, its record never made durable) goes with the
    /// next keep.
    #[tokio::test]
    async fn a_snapshot_kept_in_parts_reads_back_and_the_next_one_moves_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut sm) = store_of_3mb(dir.path()).await;
        let old: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        let meta =
            SnapshotMeta { last_log_id: None, last_membership: StoredMembership::default(), snapshot_id: "old".into() };
        let mut b = Batch::new();
        let parts = old.chunks(SNAPSHOT_PART).len() as u32;
        for (i, chunk) in old.chunks(SNAPSHOT_PART).enumerate() {
            SNAPSHOT_PARTS.put(&mut b, &part_key(7, i as u32), &SnapshotPart(chunk.to_vec()));
        }
        SNAPSHOT.put(&mut b, &0, &SnapshotRecord { meta, data: SnapshotData::Parts { generation: 7, parts } });
        // Parts of an earlier generation whose removal a crash cut short: they go too.
        SNAPSHOT_PARTS.put(&mut b, &part_key(6, 40), &SnapshotPart(vec![6; 10]));
        store.apply_in_order(b).unwrap();
        std::fs::create_dir_all(sm.snapshot_dir()).unwrap();
        std::fs::write(sm.snapshot_dir().join(snapshot_file_name(8)), b"left by a crash").unwrap();
        std::fs::write(sm.snapshot_dir().join("0000000008.tmp"), b"half written").unwrap();
        applied_up_to(&store, 1);

        let current = sm.get_current_snapshot().await.unwrap().expect("the old snapshot");
        assert_eq!(current.snapshot.into_inner(), old);

        let built = sm.build_snapshot().await.unwrap().snapshot.into_inner();
        assert_eq!(snapshot_files(&sm), vec![snapshot_file_name(8)]);
        assert_eq!(SNAPSHOT_PARTS.iter(&store).count(), 0);
        let current = sm.get_current_snapshot().await.unwrap().expect("the new snapshot");
        assert_eq!(current.snapshot.into_inner(), built);
    }
}
