//! The node log: one append-only, checksummed log per node, shared by every Raft group on it, with
//! one group commit (one `write` + one `fdatasync` per round, on a thread of its own).
//!
//! Why not sled: a Raft log is appended at the tail, cut at the tail (truncate), dropped at the head
//! (purge) and read back while recent. sled did all of it, but each group commit cost a hop to
//! sled's I/O threads, a `sync_file_range` that waits on the disk, then our `fdatasync` (a second
//! wait), plus sled's tree upkeep for keys nobody looks up at random (BENCHMARKS.md, the per-order
//! table). Here a round is: take every record submitted since the last round, `pwrite` them at the
//! end of the active segment, `fdatasync` it, wake the waiters.
//!
//! ## Format
//!
//! The log is a folder of segments, `<number>.log` (20 digits), each starting with [`MAGIC`] (the
//! format's version) and a `Kind::Checkpoint`: the metadata of every stream at the moment the
//! segment began. Then records, each `len: u32 | crc32(body): u32 | body` (little-endian), the body
//! a kind byte, the stream (`u64`) and the kind's fields:
//!
//! | kind | fields |
//! |---|---|
//! | `Entries` | first index `u64`, count `u32`, then per entry `len u32` + bytes |
//! | `Vote`, `Committed` | `len u32` + bytes (opaque to this file) |
//! | `Truncate` | from index `u64`: entries at and above it are gone |
//! | `Purge` | up to index `u64` (inclusive), then `len u32` + the caller's id bytes |
//! | `Remove` | — (the stream is gone) |
//! | `Checkpoint` | stream count `u32`, then per stream: stream, `next` index, vote, committed, purged |
//!
//! A stream is a caller's sequence of entries (a Raft group, in one incarnation of this node's
//! member). Entries of a stream are contiguous: appended at `next`, cut back by a truncation,
//! dropped from the front by a purge.
//!
//! ## Recovery
//!
//! Open reads every segment in order and replays its records into the in-memory index (where each
//! live entry is: segment, offset, length). A record that is cut short or fails its checksum ends
//! the log if it is in the last segment (a torn tail: nothing after it was acknowledged, because a
//! round is acknowledged only after its `fdatasync`); the segment is cut back to the last whole
//! record. Anywhere else it is corruption, and open fails with the path, leaving the files alone.
//! Writes to a new segment start only after the previous one is synced, so only the last segment
//! can have a torn tail. Open always starts a new segment (with a checkpoint).
//!
//! A checkpoint states each stream's metadata and its `next` index in full: replay trims a stream's
//! entries to below `next`, and drops streams it does not list. That is what lets an older segment
//! be deleted as soon as none of its entries is live, even when it held the truncation or purge
//! records: every later segment begins with their outcome. A segment is deleted only after the
//! round that wrote the record that killed its last entry is durable.
//!
//! Caveats:
//! - The index (about 40 bytes per live entry) is in memory; entry bytes are kept in memory for
//!   the newest [`CACHED_PER_STREAM`] entries of each stream, older ones are read from their file.
//! - A segment can be kept alive by one old entry of one stream: the purge after a snapshot is what
//!   frees them, so the disk holds about one snapshot interval of every group.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::store::{Durability, StoreError};

/// The first bytes of every segment: the format and its version.
pub const MAGIC: &[u8; 8] = b"BHLOG\x00\x00\x01";
/// A segment is closed (a new one begun) once it is this large.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// No record is larger: a length prefix above it is corruption, never an allocation.
pub const MAX_RECORD: u32 = 256 * 1024 * 1024;
/// Entries per stream whose bytes stay in memory (what followers and applies read back: the
/// newest few). Older ones are read from their segment. An entry holds up to a batch of commands.
pub const CACHED_PER_STREAM: usize = 256;
const HEADER: usize = 8;
/// A length that stands for "none" in optional byte fields.
const NONE_LEN: u32 = u32::MAX;

/// What runs once a record is durable (or the round failed), on the writer thread.
type Done = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// A stream's last entry: its index and bytes.
pub type LastEntry = (u64, Arc<[u8]>);

#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Entries = 1,
    Vote = 2,
    Committed = 3,
    Truncate = 4,
    Purge = 5,
    Remove = 6,
    Checkpoint = 7,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Entries,
            2 => Kind::Vote,
            3 => Kind::Committed,
            4 => Kind::Truncate,
            5 => Kind::Purge,
            6 => Kind::Remove,
            7 => Kind::Checkpoint,
            _ => return None,
        })
    }
}

/// Where one live entry is, and its bytes while it is recent.
#[derive(Debug, Clone)]
struct Slot {
    seg: u64,
    /// Offset of the entry's bytes (after its own length prefix) in the segment.
    off: u64,
    len: u32,
    cached: Option<Arc<[u8]>>,
    /// The log position (`State::submitted`) once its record is queued: its bytes are in the file
    /// only once a round covering this position has been written, so they stay cached till then.
    end: u64,
}

#[derive(Debug, Default, Clone)]
struct Stream {
    /// Index of `slots[0]`; with no slots, the index the next append must have (if known).
    first: u64,
    slots: VecDeque<Slot>,
    vote: Option<Vec<u8>>,
    committed: Option<Vec<u8>>,
    purged: Option<(u64, Vec<u8>)>,
    /// Index of the oldest slot that may still hold its bytes (everything before has none).
    cached_from: u64,
}

impl Stream {
    fn next(&self) -> u64 {
        self.first + self.slots.len() as u64
    }
}

/// What the writer thread has to do, and what the index says now.
struct State {
    streams: BTreeMap<u64, Stream>,
    active: u64,
    /// Bytes of the active segment, including those not yet written.
    active_len: u64,
    /// Bytes to write, in order: (segment, offset, bytes).
    pending: Vec<(u64, u64, Vec<u8>)>,
    waiters: Vec<Done>,
    /// Bytes submitted since open: the position a durable round is measured in.
    submitted: u64,
    /// Live entries per segment.
    live: BTreeMap<u64, u64>,
    /// Segments without a live entry, deletable once the position given is durable.
    doomed: Vec<(u64, u64)>,
    /// Set by the first failed write or sync: nothing is acknowledged after it.
    failed: Option<String>,
    closed: bool,
    /// A segment is closed once it is this large ([`SEGMENT_BYTES`]; smaller in tests).
    segment_bytes: u64,
}

struct Inner {
    dir: PathBuf,
    durability: Durability,
    state: Mutex<State>,
    wake: Condvar,
    /// The `submitted` position the last successful round covered.
    durable: AtomicU64,
    files: Mutex<HashMap<u64, Arc<File>>>,
    stats: Arc<NodeLogStats>,
}

/// Counters for `/metrics` and the benchmarks.
#[derive(Debug, Default)]
pub struct NodeLogStats {
    /// Rounds written (each one `fdatasync` per segment touched with [`Durability::Fsync`]).
    pub rounds: AtomicU64,
    pub bytes: AtomicU64,
    pub segments_deleted: AtomicU64,
}

/// A handle on the node log; cheap to clone. Dropping the last one stops its writer thread after
/// it wrote what was submitted.
#[derive(Clone)]
pub struct NodeLog {
    inner: Arc<Inner>,
    _closer: Arc<Closer>,
}

/// Tells the writer thread to finish when the last handle goes, and waits for it: once the last
/// handle is dropped, everything submitted is written and the folder (and its lock) is free.
struct Closer {
    inner: Arc<Inner>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Held open for its exclusive lock: a second node on the same data dir is refused.
    _lock: File,
}

impl Drop for Closer {
    fn drop(&mut self) {
        if let Ok(mut st) = self.inner.state.lock() {
            st.closed = true;
        }
        self.inner.wake.notify_all();
        if let Some(writer) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            // Never join from the writer itself (a completion callback that held the last handle):
            // it finishes on its own once it sees `closed`.
            if writer.thread().id() != std::thread::current().id() {
                let _ = writer.join();
            }
        }
    }
}

fn io_err(what: &str, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("node log: {what}: {e}"))
}

fn segment_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:020}.log"))
}

/// Little-endian writer of a record's body.
#[derive(Default)]
struct Body(Vec<u8>);

impl Body {
    fn new(kind: Kind, stream: u64) -> Body {
        let mut b = Body(Vec::with_capacity(64));
        b.0.push(kind as u8);
        b.u64(stream);
        b
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
    fn u8_flag(&mut self, v: bool) {
        self.0.push(u8::from(v));
    }
    fn opt(&mut self, v: Option<&[u8]>) {
        match v {
            Some(v) => self.bytes(v),
            None => self.u32(NONE_LEN),
        }
    }
    /// The whole record: header, then body.
    fn framed(self) -> Vec<u8> {
        let len = self.0.len() as u32;
        let mut out = Vec::with_capacity(HEADER + self.0.len());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&checksum(len, &self.0).to_le_bytes());
        out.extend_from_slice(&self.0);
        out
    }
}

/// A record's checksum: CRC-32 of its length and body, so that zeros (a block that never reached
/// the disk) never pass for an empty record.
fn checksum(len: u32, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(body);
    h.finalize()
}

/// The smallest body of any record: its kind and its stream.
const MIN_BODY: u32 = 9;

/// Little-endian reader of a record's body; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()?;
        self.take(n as usize)
    }
    fn opt(&mut self) -> Option<Option<Vec<u8>>> {
        let n = self.u32()?;
        if n == NONE_LEN {
            return Some(None);
        }
        self.take(n as usize).map(|b| Some(b.to_vec()))
    }
}

impl State {
    /// Queues `record` at the end of the active segment, beginning a new segment first if the
    /// active one is full; returns where the record's body starts.
    fn submit(&mut self, record: Vec<u8>) -> (u64, u64) {
        if self.active_len >= self.segment_bytes {
            self.begin_segment(self.active + 1);
        }
        let at = (self.active, self.active_len + HEADER as u64);
        self.active_len += record.len() as u64;
        self.submitted += record.len() as u64;
        self.pending.push((at.0, at.1 - HEADER as u64, record));
        at
    }

    /// Makes `seg` the active segment: its magic and a checkpoint of every stream come first.
    fn begin_segment(&mut self, seg: u64) {
        let mut body = Body::new(Kind::Checkpoint, 0);
        body.u32(self.streams.len() as u32);
        for (id, s) in &self.streams {
            body.u64(*id);
            body.u64(s.next());
            body.opt(s.vote.as_deref());
            body.opt(s.committed.as_deref());
            match &s.purged {
                Some((upto, bytes)) => {
                    body.u8_flag(true);
                    body.u64(*upto);
                    body.bytes(bytes);
                }
                None => body.u8_flag(false),
            }
        }
        let mut chunk = MAGIC.to_vec();
        chunk.extend_from_slice(&body.framed());
        self.active = seg;
        self.active_len = chunk.len() as u64;
        self.submitted += chunk.len() as u64;
        self.pending.push((seg, 0, chunk));
        self.live.entry(seg).or_insert(0);
    }

    /// Drops entries of `stream` from index `from` on (a truncation) or up to `upto` (a purge).
    fn drop_slots(&mut self, stream: u64, keep: impl Fn(u64) -> bool) {
        let Some(s) = self.streams.get_mut(&stream) else { return };
        let first = s.first;
        let mut kept = VecDeque::with_capacity(s.slots.len());
        let mut new_first = None;
        for (i, slot) in std::mem::take(&mut s.slots).into_iter().enumerate() {
            let index = first + i as u64;
            if keep(index) {
                new_first.get_or_insert(index);
                kept.push_back(slot);
            } else if let Some(n) = self.live.get_mut(&slot.seg) {
                *n = n.saturating_sub(1);
            }
        }
        s.slots = kept;
        if let Some(f) = new_first {
            s.first = f;
        }
        self.doom_empty_segments();
    }

    fn doom_empty_segments(&mut self) {
        let position = self.submitted;
        let empty: Vec<u64> =
            self.live.iter().filter(|(seg, n)| **n == 0 && **seg < self.active).map(|(seg, _)| *seg).collect();
        for seg in empty {
            self.live.remove(&seg);
            self.doomed.push((seg, position));
        }
    }

    /// Applies one replayed or new record's effect on the index (entries are added by the caller).
    fn apply_meta(&mut self, kind: Kind, stream: u64, r: &mut Reader<'_>) -> Option<()> {
        match kind {
            Kind::Vote => self.streams.entry(stream).or_default().vote = Some(r.bytes()?.to_vec()),
            Kind::Committed => self.streams.entry(stream).or_default().committed = Some(r.bytes()?.to_vec()),
            Kind::Truncate => {
                let from = r.u64()?;
                self.drop_slots(stream, |i| i < from);
                if let Some(s) = self.streams.get_mut(&stream) {
                    if s.slots.is_empty() {
                        s.first = from;
                    }
                    // Entries appended at `from` again are cached: trimming starts there at most.
                    s.cached_from = s.cached_from.min(from);
                }
            }
            Kind::Purge => {
                let upto = r.u64()?;
                let id = r.bytes()?.to_vec();
                self.drop_slots(stream, |i| i > upto);
                let s = self.streams.entry(stream).or_default();
                if s.slots.is_empty() {
                    s.first = s.first.max(upto.saturating_add(1));
                }
                s.purged = Some((upto, id));
            }
            Kind::Remove => {
                self.drop_slots(stream, |_| false);
                self.streams.remove(&stream);
            }
            Kind::Entries | Kind::Checkpoint => return None,
        }
        Some(())
    }

    /// Adds one entry at the end of `stream`; `index` must be its next one (or any, if empty).
    /// Whether `index` may be appended to `stream` now: its next index, or any if it is empty.
    fn may_append(&self, stream: u64, index: u64) -> Result<(), String> {
        match self.streams.get(&stream) {
            Some(s) if !s.slots.is_empty() && index != s.next() => {
                Err(format!("stream {stream:x}: entry {index} appended after {}", s.next() - 1))
            }
            _ => Ok(()),
        }
    }

    /// Adds one entry at the end of `stream` (checked with [`State::may_append`] first), and lets
    /// go of the bytes of its oldest cached entries beyond [`CACHED_PER_STREAM`] whose rounds are
    /// written (`durable`): before that, the file does not hold them yet.
    fn push_slot(&mut self, stream: u64, index: u64, slot: Slot, durable: u64) -> Result<(), String> {
        self.may_append(stream, index)?;
        let seg = slot.seg;
        let s = self.streams.entry(stream).or_default();
        if s.slots.is_empty() {
            s.first = index;
        }
        s.slots.push_back(slot);
        let keep_from = s.next().saturating_sub(CACHED_PER_STREAM as u64);
        let mut i = s.cached_from.max(s.first);
        while i < keep_from {
            let slot = &mut s.slots[(i - s.first) as usize];
            if slot.end > durable {
                break;
            }
            slot.cached = None;
            i += 1;
        }
        s.cached_from = i;
        *self.live.entry(seg).or_insert(0) += 1;
        Ok(())
    }
}

impl NodeLog {
    /// Opens (or creates) the node log in `dir`, replays it, and starts its writer thread.
    pub fn open(dir: &Path, durability: Durability) -> Result<NodeLog, StoreError> {
        Self::open_with(dir, durability, SEGMENT_BYTES)
    }

    /// [`NodeLog::open`] with segments of `segment_bytes` (tests use small ones).
    pub fn open_with(dir: &Path, durability: Durability, segment_bytes: u64) -> Result<NodeLog, StoreError> {
        let open_err =
            |reason: String| StoreError::Open { capability: "node log".into(), path: dir.to_path_buf(), reason };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let lock = File::create(dir.join("LOCK")).map_err(|e| open_err(format!("creating its LOCK file: {e}")))?;
        lock.try_lock().map_err(|e| open_err(format!("another process has it open ({e})")))?;
        let mut segs: Vec<u64> = std::fs::read_dir(dir)
            .map_err(|e| open_err(e.to_string()))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".log")?.parse::<u64>().ok()
            })
            .collect();
        segs.sort_unstable();
        let mut st = State {
            streams: BTreeMap::new(),
            active: 0,
            active_len: 0,
            pending: Vec::new(),
            waiters: Vec::new(),
            submitted: 0,
            live: BTreeMap::new(),
            doomed: Vec::new(),
            failed: None,
            closed: false,
            segment_bytes,
        };
        let mut files = HashMap::new();
        let mut torn_at = None;
        let mut replayed = Replayed::default();
        for (i, seg) in segs.iter().enumerate() {
            let path = segment_path(dir, *seg);
            let bytes = std::fs::read(&path).map_err(|e| open_err(format!("reading {}: {e}", path.display())))?;
            let last = i + 1 == segs.len();
            match replay_segment(&mut replayed, &mut st.live, *seg, &bytes) {
                Ok(()) => {}
                Err(Replay::Torn { valid }) if last => torn_at = Some((path.clone(), valid, bytes.len())),
                Err(Replay::Torn { valid }) => {
                    return Err(open_err(format!(
                        "segment {} is damaged at byte {valid} and is not the last one",
                        path.display()
                    )))
                }
                Err(Replay::Bad(why)) => return Err(open_err(format!("segment {}: {why}", path.display()))),
            }
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| open_err(format!("opening {}: {e}", path.display())))?;
            files.insert(*seg, Arc::new(f));
        }
        replayed.into_state(&mut st).map_err(open_err)?;
        if let Some((path, valid, len)) = torn_at {
            // A torn tail: the round it belonged to was never acknowledged. Cut it off, so that the
            // segment (no longer the last once a new one begins) reads whole next time; a segment
            // that has not even its magic (created, then the crash) goes.
            tracing::warn!(path = %path.display(), valid, len, "node log: cutting a torn tail off the last segment");
            if valid < MAGIC.len() {
                if let Some(seg) = segs.pop() {
                    files.remove(&seg);
                    st.live.remove(&seg);
                }
                std::fs::remove_file(&path).map_err(|e| open_err(e.to_string()))?;
            } else {
                let f = OpenOptions::new().write(true).open(&path).map_err(|e| open_err(e.to_string()))?;
                f.set_len(valid as u64).map_err(|e| open_err(e.to_string()))?;
                f.sync_all().map_err(|e| open_err(e.to_string()))?;
            }
        }
        let next = segs.last().map_or(1, |s| s + 1);
        st.begin_segment(next);
        // Segments that replay left without a live entry can go once the new checkpoint is durable.
        st.doom_empty_segments();
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            durability,
            state: Mutex::new(st),
            wake: Condvar::new(),
            durable: AtomicU64::new(0),
            files: Mutex::new(files),
            stats: Arc::default(),
        });
        let writer = inner.clone();
        let writer = std::thread::Builder::new()
            .name("node-log".into())
            .spawn(move || write_rounds(&writer))
            .map_err(|e| open_err(format!("starting the writer thread: {e}")))?;
        let closer = Closer { inner: inner.clone(), writer: Mutex::new(Some(writer)), _lock: lock };
        let log = NodeLog { _closer: Arc::new(closer), inner };
        tracing::info!(dir = %dir.display(), segments = segs.len(), streams = log.streams().len(), "node log opened");
        Ok(log)
    }

    fn state(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.inner.state.lock().map_err(|_| StoreError::Io("node log: state lock poisoned".into()))
    }

    pub fn stats(&self) -> &NodeLogStats {
        &self.inner.stats
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Queues a record and, if `then` is given, runs it once the record is durable. Only a record
    /// somebody waits on starts a round: one nobody waits on (a committed id, a purge) rides in the
    /// next round that somebody needs, rather than costing an `fdatasync` of its own.
    fn submit(&self, st: &mut State, record: Vec<u8>, then: Option<Done>) -> Result<(u64, u64), StoreError> {
        if let Some(why) = &st.failed {
            return Err(StoreError::Io(format!("node log failed earlier ({why}); restart the node")));
        }
        let at = st.submit(record);
        if let Some(then) = then {
            st.waiters.push(then);
            self.inner.wake.notify_one();
        }
        Ok(at)
    }

    /// Appends `entries` (index, bytes) to `stream`, visible to reads at once; `done` runs on the
    /// writer thread once they are durable (it must be quick: a send, not work).
    pub fn append(
        &self,
        stream: u64,
        entries: Vec<(u64, Vec<u8>)>,
        done: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) -> Result<(), StoreError> {
        let Some(first) = entries.first().map(|e| e.0) else {
            done(Ok(()));
            return Ok(());
        };
        let mut body = Body::new(Kind::Entries, stream);
        body.u64(first);
        body.u32(entries.len() as u32);
        // Offsets of each entry's bytes inside the body.
        let mut offsets = Vec::with_capacity(entries.len());
        for (i, (index, bytes)) in entries.iter().enumerate() {
            if *index != first + i as u64 {
                return Err(StoreError::Io(format!("node log: stream {stream:x}: entries not contiguous at {index}")));
            }
            body.u32(bytes.len() as u32);
            offsets.push(body.0.len() as u64);
            body.0.extend_from_slice(bytes);
        }
        if body.0.len() > MAX_RECORD as usize {
            return Err(StoreError::Io(format!(
                "node log: a record of {} bytes is over the {MAX_RECORD}-byte limit",
                body.0.len()
            )));
        }
        let mut st = self.state()?;
        // Refused before anything is queued: a record is written only if the index takes it.
        st.may_append(stream, first).map_err(StoreError::Io)?;
        let (seg, at) = self.submit(&mut st, body.framed(), Some(Box::new(done)))?;
        let (end, durable) = (st.submitted, self.inner.durable.load(Ordering::SeqCst));
        for ((index, bytes), off) in entries.into_iter().zip(offsets) {
            let slot = Slot { seg, off: at + off, len: bytes.len() as u32, cached: Some(bytes.into()), end };
            st.push_slot(stream, index, slot, durable).map_err(StoreError::Io)?;
        }
        Ok(())
    }

    /// Waits until every record submitted so far is durable.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut st = self.state()?;
            if let Some(why) = &st.failed {
                return Err(StoreError::Io(format!("node log failed earlier ({why}); restart the node")));
            }
            if self.inner.durable.load(Ordering::SeqCst) >= st.submitted && st.pending.is_empty() {
                return Ok(());
            }
            st.waiters.push(Box::new(move |r| {
                let _ = tx.send(r);
            }));
        }
        self.inner.wake.notify_one();
        rx.await.map_err(|_| StoreError::FlusherGone)?
    }

    /// Writes a metadata record of `kind` and waits until it is durable if `wait`.
    async fn meta(&self, record: Vec<u8>, stream: u64, kind: Kind, wait: bool) -> Result<(), StoreError> {
        {
            let mut st = self.state()?;
            // The index follows the record at once (reads see it), as for appends; after it is
            // queued, so a segment it empties is deleted only once the record is durable.
            let body = record[HEADER..].to_vec();
            self.submit(&mut st, record, None)?;
            let mut r = Reader { buf: &body, pos: 9 };
            st.apply_meta(kind, stream, &mut r)
                .ok_or_else(|| StoreError::Io("node log: bad metadata record".into()))?;
        }
        if wait {
            self.sync().await
        } else {
            Ok(())
        }
    }

    /// Saves a stream's vote; returns once it is durable.
    pub async fn save_vote(&self, stream: u64, vote: &[u8]) -> Result<(), StoreError> {
        let mut b = Body::new(Kind::Vote, stream);
        b.bytes(vote);
        self.meta(b.framed(), stream, Kind::Vote, true).await
    }

    /// Saves a stream's committed id: a hint for a faster restart, durable with the next round.
    pub async fn save_committed(&self, stream: u64, committed: &[u8]) -> Result<(), StoreError> {
        let mut b = Body::new(Kind::Committed, stream);
        b.bytes(committed);
        self.meta(b.framed(), stream, Kind::Committed, false).await
    }

    /// Removes a stream's entries from `from` on; returns once that is durable.
    pub async fn truncate(&self, stream: u64, from: u64) -> Result<(), StoreError> {
        let mut b = Body::new(Kind::Truncate, stream);
        b.u64(from);
        self.meta(b.framed(), stream, Kind::Truncate, true).await
    }

    /// Removes a stream's entries up to `upto` (inclusive) and records `id` as its last purged
    /// one; durable with the next round (a purge lost in a crash is only done again).
    pub async fn purge(&self, stream: u64, upto: u64, id: &[u8]) -> Result<(), StoreError> {
        let mut b = Body::new(Kind::Purge, stream);
        b.u64(upto);
        b.bytes(id);
        self.meta(b.framed(), stream, Kind::Purge, false).await
    }

    /// Removes a stream entirely; returns once that is durable.
    pub async fn remove_stream(&self, stream: u64) -> Result<(), StoreError> {
        let b = Body::new(Kind::Remove, stream);
        self.meta(b.framed(), stream, Kind::Remove, true).await
    }

    pub fn streams(&self) -> Vec<u64> {
        self.state().map(|st| st.streams.keys().copied().collect()).unwrap_or_default()
    }

    pub fn vote(&self, stream: u64) -> Option<Vec<u8>> {
        self.state().ok()?.streams.get(&stream)?.vote.clone()
    }

    pub fn committed(&self, stream: u64) -> Option<Vec<u8>> {
        self.state().ok()?.streams.get(&stream)?.committed.clone()
    }

    /// The last purge's index and id bytes.
    pub fn purged(&self, stream: u64) -> Option<(u64, Vec<u8>)> {
        self.state().ok()?.streams.get(&stream)?.purged.clone()
    }

    /// The index and bytes of the stream's last entry.
    pub fn last(&self, stream: u64) -> Result<Option<LastEntry>, StoreError> {
        let next = match self.state()?.streams.get(&stream) {
            Some(s) if !s.slots.is_empty() => s.next(),
            _ => return Ok(None),
        };
        Ok(self.read(stream, next - 1, next)?.pop().map(|b| (next - 1, b)))
    }

    /// The stream's entries with `from <= index < to` that exist, in order.
    pub fn read(&self, stream: u64, from: u64, to: u64) -> Result<Vec<Arc<[u8]>>, StoreError> {
        // Slots are copied under the lock; uncached bytes are read after it, from file handles
        // held meanwhile (a segment deleted in between stays readable through them).
        let (slots, files) = {
            let st = self.state()?;
            let Some(s) = st.streams.get(&stream) else { return Ok(Vec::new()) };
            let lo = from.max(s.first);
            let hi = to.min(s.next());
            if lo >= hi {
                return Ok(Vec::new());
            }
            let slots: Vec<Slot> = s.slots.range((lo - s.first) as usize..(hi - s.first) as usize).cloned().collect();
            let needs: Vec<u64> = slots.iter().filter(|s| s.cached.is_none()).map(|s| s.seg).collect();
            let files = if needs.is_empty() {
                HashMap::new()
            } else {
                let all =
                    self.inner.files.lock().map_err(|_| StoreError::Io("node log: files lock poisoned".into()))?;
                needs.iter().filter_map(|seg| all.get(seg).map(|f| (*seg, f.clone()))).collect()
            };
            (slots, files)
        };
        slots
            .into_iter()
            .map(|slot| match slot.cached {
                Some(b) => Ok(b),
                None => {
                    let f = files
                        .get(&slot.seg)
                        .ok_or_else(|| StoreError::Io(format!("node log: segment {} is gone", slot.seg)))?;
                    let mut buf = vec![0u8; slot.len as usize];
                    f.read_exact_at(&mut buf, slot.off).map_err(|e| io_err("reading an entry", e))?;
                    Ok(buf.into())
                }
            })
            .collect()
    }
}

/// Why a segment did not replay whole.
enum Replay {
    /// A record cut short or with a wrong checksum, at byte `valid` (everything before is whole).
    Torn { valid: usize },
    /// Not a segment of this format, or a whole record that makes no sense.
    Bad(String),
}

/// One stream as replay rebuilds it: entries by index, sparse until the end (see [`Replayed`]).
#[derive(Default)]
struct ReplayStream {
    entries: BTreeMap<u64, Slot>,
    /// Where the stream's next entry goes, as far as the records say.
    next: u64,
    vote: Option<Vec<u8>>,
    committed: Option<Vec<u8>>,
    purged: Option<(u64, Vec<u8>)>,
}

/// What replay has rebuilt so far. Entries are kept by index, not as a contiguous run: a segment
/// is deleted once none of its entries is live, so replay can meet a stream with a hole where a
/// deleted segment's entries were; the record that killed them (a truncation, a purge, a removal,
/// or the next checkpoint's statement of the stream) comes later and removes whatever else they
/// took with them. A re-appended index replaces the older entry. At the end every stream must be
/// contiguous again; one that is not means a segment is missing.
#[derive(Default)]
struct Replayed {
    streams: BTreeMap<u64, ReplayStream>,
}

impl Replayed {
    fn kill(&mut self, stream: u64, keep: impl Fn(u64) -> bool) {
        if let Some(s) = self.streams.get_mut(&stream) {
            s.entries.retain(|i, _| keep(*i));
        }
    }

    /// The index of the replay, checked: every stream contiguous.
    fn into_state(self, st: &mut State) -> Result<(), String> {
        for (id, r) in self.streams {
            let first = r.entries.keys().next().copied().unwrap_or(r.next);
            let mut s = Stream {
                first,
                slots: VecDeque::new(),
                vote: r.vote,
                committed: r.committed,
                purged: r.purged,
                cached_from: u64::MAX,
            };
            for (expect, (index, slot)) in (first..).zip(r.entries) {
                if index != expect {
                    return Err(format!("stream {id:x} has no entry {expect} but has {index}: a segment is missing"));
                }
                *st.live.entry(slot.seg).or_insert(0) += 1;
                s.slots.push_back(slot);
            }
            // Replayed entries carry no bytes: the first that may is the next appended.
            s.cached_from = s.next();
            st.streams.insert(id, s);
        }
        Ok(())
    }
}

/// Replays one segment's records into `rp`.
fn replay_segment(rp: &mut Replayed, live: &mut BTreeMap<u64, u64>, seg: u64, bytes: &[u8]) -> Result<(), Replay> {
    if bytes.len() < MAGIC.len() {
        // Created, then the crash came before its first bytes were synced.
        return Err(Replay::Torn { valid: 0 });
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(Replay::Bad("not a node-log segment of this version (magic differs)".into()));
    }
    live.entry(seg).or_insert(0);
    let mut pos = MAGIC.len();
    while pos < bytes.len() {
        let Some(header) = bytes.get(pos..pos + HEADER) else { return Err(Replay::Torn { valid: pos }) };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if !(MIN_BODY..=MAX_RECORD).contains(&len) {
            return Err(Replay::Torn { valid: pos });
        }
        let start = pos + HEADER;
        let Some(body) = bytes.get(start..start + len as usize) else { return Err(Replay::Torn { valid: pos }) };
        if checksum(len, body) != crc {
            return Err(Replay::Torn { valid: pos });
        }
        replay_record(rp, seg, start as u64, body)
            .ok_or_else(|| Replay::Bad(format!("a record at byte {pos} has a whole checksum but does not parse")))?;
        pos = start + len as usize;
    }
    Ok(())
}

/// One record's effect on the replay; `None` if it does not parse.
fn replay_record(rp: &mut Replayed, seg: u64, body_at: u64, body: &[u8]) -> Option<()> {
    let mut r = Reader { buf: body, pos: 0 };
    let kind = Kind::from_byte(r.u8()?)?;
    let stream = r.u64()?;
    match kind {
        Kind::Entries => {
            let first = r.u64()?;
            let n = r.u32()?;
            let s = rp.streams.entry(stream).or_default();
            for i in 0..u64::from(n) {
                let bytes = r.bytes()?;
                let off = body_at + (r.pos - bytes.len()) as u64;
                // Bytes are read back from the file when asked for: replay keeps no copies.
                s.entries.insert(first + i, Slot { seg, off, len: bytes.len() as u32, cached: None, end: 0 });
            }
            s.next = first + u64::from(n);
        }
        Kind::Vote => rp.streams.entry(stream).or_default().vote = Some(r.bytes()?.to_vec()),
        Kind::Committed => rp.streams.entry(stream).or_default().committed = Some(r.bytes()?.to_vec()),
        Kind::Truncate => {
            let from = r.u64()?;
            rp.kill(stream, |i| i < from);
            rp.streams.entry(stream).or_default().next = from;
        }
        Kind::Purge => {
            let upto = r.u64()?;
            let id = r.bytes()?.to_vec();
            rp.kill(stream, |i| i > upto);
            let s = rp.streams.entry(stream).or_default();
            s.next = s.next.max(upto.saturating_add(1));
            s.purged = Some((upto, id));
        }
        Kind::Remove => {
            rp.streams.remove(&stream);
        }
        Kind::Checkpoint => {
            let n = r.u32()?;
            let mut listed = BTreeMap::new();
            for _ in 0..n {
                let id = r.u64()?;
                let next = r.u64()?;
                let vote = r.opt()?;
                let committed = r.opt()?;
                let purged = match r.u8()? {
                    0 => None,
                    _ => {
                        let upto = r.u64()?;
                        Some((upto, r.bytes()?.to_vec()))
                    }
                };
                listed.insert(id, (next, vote, committed, purged));
            }
            rp.streams.retain(|id, _| listed.contains_key(id));
            for (id, (next, vote, committed, purged)) in listed {
                let after = purged.as_ref().map(|p| p.0);
                rp.kill(id, |i| i < next && after.is_none_or(|p| i > p));
                let s = rp.streams.entry(id).or_default();
                s.next = next;
                s.vote = vote;
                s.committed = committed;
                s.purged = purged;
            }
        }
    }
    Some(())
}

/// The writer thread: one round per wake-up, for everything submitted meanwhile.
fn write_rounds(inner: &Inner) {
    loop {
        let (chunks, waiters, position) = {
            let Ok(mut st) = inner.state.lock() else { return };
            // Records nobody waits on wait for a round that somebody needs (or the close).
            while st.waiters.is_empty() && !st.closed {
                st = match inner.wake.wait(st) {
                    Ok(st) => st,
                    Err(_) => return,
                };
            }
            if st.pending.is_empty() && st.waiters.is_empty() {
                return;
            }
            // Give the core away once before taking the round: on a loaded node the threads that
            // are about to append (a follower's next AppendEntries, another group's write) run
            // first and ride in this round's fdatasync. Not a timer: with nothing else runnable
            // the yield returns at once. Measured: 3.8 → 2.2 fdatasync and 3.3 → 2.7 ms of CPU per
            // order (BENCHMARKS.md, "Per order").
            drop(st);
            std::thread::yield_now();
            st = match inner.state.lock() {
                Ok(st) => st,
                Err(_) => return,
            };
            (std::mem::take(&mut st.pending), std::mem::take(&mut st.waiters), st.submitted)
        };
        let started = std::time::Instant::now();
        let bytes: u64 = chunks.iter().map(|c| c.2.len() as u64).sum();
        // After a failed round nothing is acknowledged again: a later fdatasync that "succeeds"
        // proves nothing about pages the kernel may have dropped.
        let failed = inner.state.lock().ok().and_then(|st| st.failed.clone());
        let result = match failed {
            Some(why) => Err(StoreError::Io(format!("node log failed earlier ({why}); restart the node"))),
            None => write_round(inner, chunks),
        };
        metrics::histogram!("bulkhead_fdatasync_duration_seconds", "store" => "node-log")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("bulkhead_group_commit_batch_size", "store" => "node-log").record(waiters.len() as f64);
        inner.stats.rounds.fetch_add(1, Ordering::Relaxed);
        inner.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
        let doomed = match (&result, inner.state.lock()) {
            (Ok(()), Ok(mut st)) => {
                inner.durable.fetch_max(position, Ordering::SeqCst);
                let (ready, later): (Vec<_>, Vec<_>) = st.doomed.drain(..).partition(|(_, at)| *at <= position);
                st.doomed = later;
                ready
            }
            (Err(e), Ok(mut st)) => {
                st.failed.get_or_insert_with(|| e.to_string());
                tracing::error!(error = %e, "node log: a round failed; every group on this node stops");
                Vec::new()
            }
            (_, Err(_)) => Vec::new(),
        };
        for w in waiters {
            let r = result.clone();
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w(r))).is_err() {
                tracing::error!("node log: a completion callback panicked");
            }
        }
        for (seg, _) in doomed {
            delete_segment(inner, seg);
        }
    }
}

/// Writes a round's chunks in order and syncs every segment they touched; a segment is synced
/// before the next one is written, so only the newest can ever have a torn tail.
fn write_round(inner: &Inner, chunks: Vec<(u64, u64, Vec<u8>)>) -> Result<(), StoreError> {
    let mut current: Option<(u64, Arc<File>)> = None;
    for (seg, off, bytes) in chunks {
        if current.as_ref().is_none_or(|(s, _)| *s != seg) {
            if let Some((_, f)) = current.take() {
                sync(inner, &f)?;
            }
            current = Some((seg, segment_file(inner, seg)?));
        }
        if let Some((_, f)) = &current {
            f.write_all_at(&bytes, off).map_err(|e| io_err("write", e))?;
        }
    }
    if let Some((_, f)) = current {
        sync(inner, &f)?;
    }
    Ok(())
}

fn sync(inner: &Inner, f: &File) -> Result<(), StoreError> {
    match inner.durability {
        Durability::Fsync => f.sync_data().map_err(|e| io_err("fdatasync", e)),
        // The bytes are in the page cache: they survive a killed process, not a power cut.
        Durability::Flush => Ok(()),
    }
}

/// The open file of `seg`, created (and its folder synced) if it is new.
fn segment_file(inner: &Inner, seg: u64) -> Result<Arc<File>, StoreError> {
    let mut files = inner.files.lock().map_err(|_| StoreError::Io("node log: files lock poisoned".into()))?;
    if let Some(f) = files.get(&seg) {
        return Ok(f.clone());
    }
    let path = segment_path(&inner.dir, seg);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io_err(&format!("creating {}", path.display()), e))?;
    if inner.durability == Durability::Fsync {
        File::open(&inner.dir).and_then(|d| d.sync_all()).map_err(|e| io_err("syncing the log folder", e))?;
    }
    let f = Arc::new(f);
    files.insert(seg, f.clone());
    Ok(f)
}

fn delete_segment(inner: &Inner, seg: u64) {
    if let Ok(mut files) = inner.files.lock() {
        files.remove(&seg);
    }
    let path = segment_path(&inner.dir, seg);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            inner.stats.segments_deleted.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(path = %path.display(), "node log: segment deleted (no live entry left)");
        }
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "node log: deleting a spent segment failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    /// Appends and waits until durable.
    async fn append(log: &NodeLog, stream: u64, entries: Vec<(u64, Vec<u8>)>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        log.append(stream, entries, move |r| {
            let _ = tx.send(r);
        })
        .unwrap();
        rx.await.unwrap().unwrap();
    }

    fn entries(stream: u64, from: u64, to: u64) -> Vec<(u64, Vec<u8>)> {
        (from..to).map(|i| (i, format!("{stream}:{i}").into_bytes())).collect()
    }

    /// The newest segment file in `dir`.
    fn last_segment(dir: &Path) -> PathBuf {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .max()
            .unwrap()
    }

    fn read_all(log: &NodeLog, stream: u64) -> Vec<Vec<u8>> {
        log.read(stream, 0, u64::MAX).unwrap().iter().map(|b| b.to_vec()).collect()
    }

    #[test]
    fn streams_append_truncate_purge_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            {
                let log = NodeLog::open(dir.path(), Durability::Fsync).unwrap();
                append(&log, 1, entries(1, 1, 11)).await;
                append(&log, 2, entries(2, 5, 8)).await;
                log.save_vote(1, b"vote-1").await.unwrap();
                log.truncate(1, 8).await.unwrap();
                append(&log, 1, vec![(8, b"new-8".to_vec())]).await;
                log.purge(1, 3, b"purged-3").await.unwrap();
                log.save_committed(2, b"c-7").await.unwrap();
                log.sync().await.unwrap();
                assert_eq!(log.read(1, 4, 9).unwrap().len(), 5);
            }
            let log = NodeLog::open(dir.path(), Durability::Fsync).unwrap();
            let mut want: Vec<Vec<u8>> = entries(1, 4, 8).into_iter().map(|e| e.1).collect();
            want.push(b"new-8".to_vec());
            assert_eq!(read_all(&log, 1), want);
            assert_eq!(read_all(&log, 2), entries(2, 5, 8).into_iter().map(|e| e.1).collect::<Vec<_>>());
            assert_eq!(log.vote(1), Some(b"vote-1".to_vec()));
            assert_eq!(log.vote(2), None);
            assert_eq!(log.committed(2), Some(b"c-7".to_vec()));
            assert_eq!(log.purged(1), Some((3, b"purged-3".to_vec())));
            assert_eq!(log.last(1).unwrap().map(|(i, b)| (i, b.to_vec())), Some((8, b"new-8".to_vec())));
            log.remove_stream(2).await.unwrap();
            drop(log);
            let log = NodeLog::open(dir.path(), Durability::Fsync).unwrap();
            assert_eq!(log.streams(), vec![1]);
        });
    }

    /// A committed id and a purge nobody waits on cost no round of their own: they ride in the
    /// next append's round (and are then durable), or are written at the close.
    #[test]
    fn records_nobody_waits_on_ride_in_the_next_round() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            {
                let log = NodeLog::open(dir.path(), Durability::Fsync).unwrap();
                append(&log, 1, entries(1, 1, 6)).await;
                let rounds = log.stats().rounds.load(Ordering::SeqCst);
                log.save_committed(1, b"c-3").await.unwrap();
                log.purge(1, 2, b"purged-2").await.unwrap();
                // Seen at once, though not written yet.
                assert_eq!(log.committed(1), Some(b"c-3".to_vec()));
                assert_eq!(log.purged(1).map(|p| p.0), Some(2));
                assert_eq!(log.stats().rounds.load(Ordering::SeqCst), rounds, "no round for a hint");
                append(&log, 1, entries(1, 6, 7)).await;
                assert_eq!(log.stats().rounds.load(Ordering::SeqCst), rounds + 1, "one round for all three");
                log.save_committed(1, b"c-6").await.unwrap();
            }
            // The append's round made the first two durable; the close wrote the last.
            let log = NodeLog::open(dir.path(), Durability::Fsync).unwrap();
            assert_eq!(log.committed(1), Some(b"c-6".to_vec()));
            assert_eq!(log.purged(1), Some((2, b"purged-2".to_vec())));
            assert_eq!(read_all(&log, 1), entries(1, 3, 7).into_iter().map(|e| e.1).collect::<Vec<_>>());
        });
    }

    /// A gap in a stream's indexes is refused, not written.
    #[test]
    fn a_gap_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let log = NodeLog::open(dir.path(), Durability::Flush).unwrap();
            append(&log, 1, entries(1, 1, 3)).await;
            assert!(log.append(1, vec![(1, vec![]), (3, vec![])], |_| {}).is_err());
        });
    }

    /// Segments roll over, old ones go once nothing in them is live, and entries older than the
    /// in-memory cache are read back from their files.
    #[test]
    fn spent_segments_are_deleted_and_old_entries_read_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let segments = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .count()
        };
        rt().block_on(async {
            let log = NodeLog::open_with(dir.path(), Durability::Fsync, 1024).unwrap();
            let n = CACHED_PER_STREAM as u64 + 2_000;
            for chunk in (1..=n).collect::<Vec<_>>().chunks(50) {
                append(&log, 7, entries(7, chunk[0], chunk[chunk.len() - 1] + 1)).await;
            }
            let many = segments();
            assert!(many > 10, "{many} segments");
            // The oldest entries are no longer cached: they come from their segment files.
            let got = read_all(&log, 7);
            assert_eq!(got.len() as u64, n);
            assert_eq!(got[0], b"7:1".to_vec());
            log.purge(7, n - 10, b"p").await.unwrap();
            append(&log, 7, entries(7, n + 1, n + 2)).await;
            // Spent segments are deleted right after the round that made the purge durable has
            // answered; the writer's next round begins only after that.
            append(&log, 7, entries(7, n + 2, n + 3)).await;
            assert!(segments() < 4, "{} segments left of {many}", segments());
            drop(log);
            let log = NodeLog::open_with(dir.path(), Durability::Fsync, 1024).unwrap();
            assert_eq!(read_all(&log, 7).len(), 12);
            assert_eq!(log.purged(7), Some((n - 10, b"p".to_vec())));
        });
    }

    /// A log whose last segment was cut at any byte opens, and holds a prefix of what was
    /// written: every record wholly before the cut, nothing after it.
    #[test]
    fn a_torn_tail_at_every_offset_opens_to_a_prefix() {
        let src = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let log = NodeLog::open(src.path(), Durability::Flush).unwrap();
            for i in 1..=30u64 {
                append(&log, 1, entries(1, i, i + 1)).await;
                if i % 10 == 0 {
                    log.save_vote(1, format!("v{i}").as_bytes()).await.unwrap();
                }
            }
        });
        let seg = last_segment(src.path());
        let full = std::fs::read(&seg).unwrap();
        let mut last_count = 0;
        for cut in 0..=full.len() {
            let dir = tempfile::tempdir().unwrap();
            let copy = dir.path().join(seg.file_name().unwrap());
            std::fs::write(&copy, &full[..cut]).unwrap();
            let got = rt().block_on(async {
                let log = NodeLog::open(dir.path(), Durability::Flush)
                    .unwrap_or_else(|e| panic!("a log cut at byte {cut} did not open: {e}"));
                let got = read_all(&log, 1);
                let vote = log.vote(1);
                drop(log);
                // And it opens again, the cut-off segment now whole and not the last.
                let again = NodeLog::open(dir.path(), Durability::Flush).unwrap();
                assert_eq!(read_all(&again, 1), got, "cut at {cut}: a second open differs");
                (got, vote)
            });
            let (got, vote) = got;
            assert_eq!(got, entries(1, 1, got.len() as u64 + 1).into_iter().map(|e| e.1).collect::<Vec<_>>());
            assert!(got.len() >= last_count, "cut at {cut}: fewer entries than a shorter cut");
            if got.len() >= 10 {
                assert!(vote.is_some() || got.len() == 10, "cut at {cut}: the vote after entry 10 is missing");
            }
            last_count = got.len();
        }
        assert_eq!(last_count, 30);
    }

    /// Zeros after the last record (a block of a round that never reached the disk, read back as
    /// zeros) are a torn tail, not an empty record that fails to parse.
    #[test]
    fn zeros_after_the_last_record_are_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let log = NodeLog::open(dir.path(), Durability::Flush).unwrap();
            append(&log, 1, entries(1, 1, 4)).await;
        });
        let seg = last_segment(dir.path());
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes.extend_from_slice(&[0u8; 4096]);
        std::fs::write(&seg, &bytes).unwrap();
        rt().block_on(async {
            let log = NodeLog::open(dir.path(), Durability::Flush).unwrap();
            assert_eq!(read_all(&log, 1).len(), 3);
        });
    }

    /// An entry's bytes stay in memory until the round that writes them is done, however many
    /// entries follow it: a read never looks in the file for bytes not yet there.
    #[test]
    fn bytes_leave_the_cache_only_once_written() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let log = NodeLog::open(dir.path(), Durability::Flush).unwrap();
            // One append of many entries: none of them is written when the next ones are indexed.
            let n = CACHED_PER_STREAM as u64 * 3;
            log.append(1, entries(1, 1, n + 1), |_| {}).unwrap();
            assert_eq!(read_all(&log, 1).len() as u64, n, "readable at once, from memory");
            log.sync().await.unwrap();
            // Later appends let go of the old bytes; they are read back from the file.
            append(&log, 1, entries(1, n + 1, n + 2)).await;
            append(&log, 1, entries(1, n + 2, n + 3)).await;
            let got = read_all(&log, 1);
            assert_eq!(got.len() as u64, n + 2);
            assert_eq!(got[0], b"1:1".to_vec());
            let cached =
                log.inner.state.lock().unwrap().streams[&1].slots.iter().filter(|s| s.cached.is_some()).count();
            assert!(cached <= CACHED_PER_STREAM + 1, "{cached} entries still cached");
        });
    }

    #[test]
    fn damage_before_the_last_segment_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let log = NodeLog::open(dir.path(), Durability::Flush).unwrap();
            append(&log, 1, entries(1, 1, 5)).await;
        });
        // A second open begins a new segment: the first is no longer the last.
        rt().block_on(async {
            let log = NodeLog::open(dir.path(), Durability::Flush).unwrap();
            append(&log, 1, entries(1, 5, 6)).await;
        });
        let first = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.path()).min().unwrap();
        let mut bytes = std::fs::read(&first).unwrap();
        let at = bytes.len() - 3;
        bytes[at] ^= 0xFF;
        std::fs::write(&first, &bytes).unwrap();
        let err = NodeLog::open(dir.path(), Durability::Flush).err().expect("a damaged log must not open");
        assert!(err.to_string().contains("damaged"), "{err}");
        assert_eq!(std::fs::read(&first).unwrap(), bytes, "the damaged segment is left as it was");
    }

    /// After a failed round nothing is acknowledged again: appends, syncs and votes all fail,
    /// so openraft stops the node's groups instead of trusting a log that may have lost pages.
    #[test]
    fn after_a_failed_round_nothing_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let log = NodeLog::open(dir.path(), Durability::Fsync).unwrap();
            append(&log, 1, entries(1, 1, 3)).await;
            // What the writer records when a write or an fdatasync fails.
            log.inner.state.lock().unwrap().failed = Some("fdatasync: EIO".into());
            assert!(log.append(1, entries(1, 3, 4), |_| {}).is_err());
            assert!(log.sync().await.is_err());
            assert!(log.save_vote(1, b"v").await.is_err());
        });
    }

    #[test]
    fn garbage_in_a_segment_is_an_error_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(format!("{:020}.log", 1)), b"this is not a log at all").unwrap();
        std::fs::write(dir.path().join(format!("{:020}.log", 2)), MAGIC).unwrap();
        let err = NodeLog::open(dir.path(), Durability::Flush).err().expect("garbage must not open");
        assert!(err.to_string().contains("magic"), "{err}");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u64, u8),
        Truncate(u64, u64),
        Purge(u64, u64),
        Vote(u64, u8),
        Remove(u64),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..3u64, 1..20u8).prop_map(|(s, n)| Op::Append(s, n)),
            1 => (0..3u64, 0..40u64).prop_map(|(s, back)| Op::Truncate(s, back)),
            2 => (0..3u64, 0..40u64).prop_map(|(s, fwd)| Op::Purge(s, fwd)),
            1 => (0..3u64, any::<u8>()).prop_map(|(s, v)| Op::Vote(s, v)),
            1 => (0..3u64).prop_map(Op::Remove),
            1 => Just(Op::Reopen),
        ]
    }

    /// What a stream should hold: its entries by index, its vote.
    #[derive(Debug, Default, Clone, PartialEq)]
    struct Model {
        entries: BTreeMap<u64, Vec<u8>>,
        next: u64,
        vote: Option<Vec<u8>>,
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Any sequence of appends, truncations, purges, votes, removals and reopens, with segments
        /// small enough to roll and be deleted often, leaves the log equal to a simple model.
        #[test]
        fn the_log_matches_a_model_through_reopens(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            rt().block_on(async {
                let open = || NodeLog::open_with(dir.path(), Durability::Flush, 512).unwrap();
                let mut log = open();
                let mut model: BTreeMap<u64, Model> = BTreeMap::new();
                let mut serial = 0u32;
                for op in ops {
                    match op {
                        Op::Append(s, n) => {
                            let m = model.entry(s).or_insert_with(|| Model { next: 1, ..Model::default() });
                            let from = m.next;
                            let batch: Vec<(u64, Vec<u8>)> = (from..from + u64::from(n)).map(|i| {
                                serial += 1;
                                (i, format!("{s}/{i}/{serial}").into_bytes())
                            }).collect();
                            for (i, b) in &batch {
                                m.entries.insert(*i, b.clone());
                            }
                            m.next = from + u64::from(n);
                            append(&log, s, batch).await;
                        }
                        Op::Truncate(s, back) => {
                            let Some(m) = model.get_mut(&s) else { continue };
                            let Some(first) = m.entries.keys().next().copied() else { continue };
                            let from = m.next.saturating_sub(back).max(first);
                            m.entries.retain(|i, _| *i < from);
                            m.next = from;
                            log.truncate(s, from).await.unwrap();
                        }
                        Op::Purge(s, fwd) => {
                            let Some(m) = model.get_mut(&s) else { continue };
                            let Some(first) = m.entries.keys().next().copied() else { continue };
                            let upto = (first + fwd).min(m.next - 1);
                            m.entries.retain(|i, _| *i > upto);
                            log.purge(s, upto, b"id").await.unwrap();
                        }
                        Op::Vote(s, v) => {
                            model.entry(s).or_insert_with(|| Model { next: 1, ..Model::default() }).vote = Some(vec![v]);
                            log.save_vote(s, &[v]).await.unwrap();
                        }
                        Op::Remove(s) => {
                            model.remove(&s);
                            log.remove_stream(s).await.unwrap();
                        }
                        Op::Reopen => {
                            log.sync().await.unwrap();
                            drop(log);
                            log = open();
                        }
                    }
                    for (s, m) in &model {
                        let got = read_all(&log, *s);
                        let want: Vec<Vec<u8>> = m.entries.values().cloned().collect();
                        assert_eq!(got, want, "stream {s}");
                        assert_eq!(log.vote(*s), m.vote, "stream {s}'s vote");
                    }
                    let streams: Vec<u64> = log.streams().into_iter().filter(|s| !model.contains_key(s)).collect();
                    for s in streams {
                        assert!(read_all(&log, s).is_empty(), "stream {s} was removed");
                    }
                }
            });
        }
    }
}
