//! The Raft log, vote and log ids of one group, in the group's own sled store.
//!
//! Appends ride the store's group commit: the entries are written at once, and openraft is told
//! they are durable by the flusher, after the `flush` + `fdatasync` that covers them, so many
//! groups' appends and the capabilities' own writes share one flush. A vote is saved and synced
//! before it is answered (a voter that forgets its vote can vote twice in one term).

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use bulkhead_storage::{Batch, Store, StoreError};
use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogId, StorageError, StorageIOError, Vote};

use super::types::{
    LogIdRecord, LogRecord, MemberId, TypeConfig, VoteRecord, COMMITTED_KEY, LOG, LOG_IDS, PURGED_KEY, VOTE,
};

type Result<T> = std::result::Result<T, StorageError<MemberId>>;

/// A handle on one group's log; cheap to clone (the log reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    store: Store,
}

impl LogStore {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

fn read_err(e: StoreError) -> StorageError<MemberId> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: StoreError) -> StorageError<MemberId> {
    StorageIOError::write_logs(&e).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let from = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(i) => Some(i.saturating_add(1)),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        LOG.iter_range(&self.store, &from, to.as_ref()).map(|r| r.map(|(_, rec)| rec.0).map_err(read_err)).collect()
    }
}

/// Removes the log entries up to `upto` (inclusive); how many there were. Keys only: the values
/// are not decoded. In small chunks with a breath between them: the group's core appends to the
/// same sled store, and a burst of tens of thousands of removals fills sled's write buffers and
/// holds those appends up (a follower held up so misses heartbeats, then calls an election).
fn remove_entries_upto(store: &Store, upto: u64) -> std::result::Result<usize, StoreError> {
    const CHUNK: usize = 1_024;
    let mut removed = 0;
    let mut b = Batch::new();
    for index in LOG.keys_range(store, &0, Some(&(upto + 1))) {
        LOG.remove(&mut b, &index?);
        if b.len() == CHUNK {
            removed += b.len();
            store.apply_in_order(std::mem::take(&mut b))?;
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    removed += b.len();
    store.apply_in_order(b)?;
    Ok(removed)
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let last_purged = LOG_IDS.get(&self.store, &PURGED_KEY).map_err(read_err)?.and_then(|r| r.0);
        let last = LOG.last(&self.store).map_err(read_err)?.map(|(_, rec)| *rec.0.get_log_id());
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last.or(last_purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<MemberId>) -> Result<()> {
        let mut b = Batch::new();
        VOTE.put(&mut b, &0, &VoteRecord(*vote));
        let done = self.store.commit(b).await;
        done.map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<MemberId>>> {
        Ok(VOTE.get(&self.store, &0).map_err(|e| StorageIOError::read_vote(&e))?.map(|r| r.0))
    }

    async fn save_committed(&mut self, committed: Option<LogId<MemberId>>) -> Result<()> {
        // Only a hint for a faster restart (apply up to here at once): no sync of its own.
        let mut b = Batch::new();
        LOG_IDS.put(&mut b, &COMMITTED_KEY, &LogIdRecord(committed));
        self.store.apply_in_order(b).map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<MemberId>>> {
        Ok(LOG_IDS.get(&self.store, &COMMITTED_KEY).map_err(read_err)?.and_then(|r| r.0))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut b = Batch::new();
        for entry in entries {
            let index = entry.get_log_id().index;
            LOG.put(&mut b, &index, &LogRecord(entry));
        }
        self.store.apply_in_order(b).map_err(write_err)?;
        // openraft learns the entries are on disk from the flusher, after the covering fdatasync.
        self.store.after_sync(move |r| callback.log_io_completed(r.map_err(|e| io::Error::other(e.to_string()))));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<MemberId>) -> Result<()> {
        // Conflicting entries from `log_id.index` on are gone before the leader's replace them.
        let mut b = Batch::new();
        for index in LOG.keys_range(&self.store, &log_id.index, None) {
            LOG.remove(&mut b, &index.map_err(read_err)?);
        }
        let done = self.store.commit(b).await;
        done.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<MemberId>) -> Result<()> {
        // openraft awaits this on the group's core task, which also sends its heartbeats, and a
        // purge after a snapshot removes tens of thousands of entries (seconds on a loaded
        // machine). So only the purged id is written here; the entries are removed afterwards on
        // the blocking pool. Nothing reads them meanwhile (openraft reads above the purged id, a
        // truncation or an append touches higher indexes only), and after a crash the next purge
        // removes whatever is left (it starts from 0).
        let mut b = Batch::new();
        LOG_IDS.put(&mut b, &PURGED_KEY, &LogIdRecord(Some(log_id)));
        self.store.apply_in_order(b).map_err(write_err)?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            match remove_entries_upto(&store, log_id.index) {
                Ok(n) => tracing::info!(store = %store.capability(), upto = log_id.index, entries = n,
                    ms = started.elapsed().as_millis() as u64, "raft log purged"),
                Err(e) => tracing::warn!(store = %store.capability(), upto = log_id.index, error = %e,
                    "purging the raft log failed; the next purge removes these entries"),
            }
        });
        Ok(())
    }
}
