//! The Raft log, vote and log ids of one group, as one stream of the node log
//! ([`bulkhead_storage::NodeLog`]): one append-only log per node, shared by every group on it, with
//! one group commit (one `write` + one `fdatasync` per round, whatever every group appended).
//!
//! openraft is told an append is durable by the node log's writer thread, after the round that
//! covers it; a vote and a truncation return once durable (a voter that forgets its vote can vote
//! twice in one term).
//!
//! The capability's state stays in the group's own sled store (the state machine), which needs no
//! flush on the hot path: the log is the durability, and after a crash openraft applies again what
//! the log holds above the state's applied id. Hence the one rule kept here: the log is purged
//! only below what the state machine has made durable (`purge` syncs the group's store first).
//!
//! The stream is named by the group and this node's incarnation in it ([`GroupId::log_stream`]),
//! so a group whose store was wiped starts with an empty log under its new incarnation;
//! [`open_group_log`] removes the old incarnation's stream, and moves a log that an older build
//! kept in the group's own store into the node log.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use bulkhead_codec::{decode, encode};
use bulkhead_storage::{Batch, NodeLog, Store, StoreError};
use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogId, StorageError, StorageIOError, Vote};

use super::types::{
    same_group, GroupId, LogIdRecord, LogRecord, MemberId, TypeConfig, VoteRecord, COMMITTED_KEY, LOG, LOG_IDS,
    PURGED_KEY, VOTE,
};

type Result<T> = std::result::Result<T, StorageError<MemberId>>;

/// A handle on one group's stream of the node log; cheap to clone (the log reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    log: NodeLog,
    /// The group's own store (its state machine): synced before the log is purged.
    state: Store,
    stream: u64,
}

impl LogStore {
    pub fn new(log: NodeLog, state: Store, stream: u64) -> Self {
        Self { log, state, stream }
    }

    /// The node-log stream of this group's member.
    pub fn stream(&self) -> u64 {
        self.stream
    }
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<MemberId> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: StoreError) -> StorageError<MemberId> {
    StorageIOError::write_logs(&e).into()
}

fn log_id(bytes: Option<Vec<u8>>) -> Result<Option<LogId<MemberId>>> {
    match bytes {
        Some(b) => Ok(decode::<LogIdRecord>(&b).map_err(read_err)?.0),
        None => Ok(None),
    }
}

/// Prepares a group's stream of the node log before its replica starts: removes the streams of
/// this node's earlier incarnations in the group (a wiped group store drew a new one), and moves a
/// log that an older build kept in the group's own store into the node log. Returns how many
/// entries were moved.
pub async fn open_group_log(
    log: &NodeLog,
    state: &Store,
    group: GroupId,
    incarnation: u32,
) -> std::result::Result<usize, StoreError> {
    let stream = group.log_stream(incarnation);
    for old in log.streams().into_iter().filter(|s| *s != stream && same_group(*s, stream)) {
        tracing::info!(%group, stream = format_args!("{old:x}"), "removing an earlier incarnation's raft log");
        log.remove_stream(old).await?;
    }

    // An older build's log in the group's store: copy it over (durably), then remove it there. A
    // crash in between leaves both; the next start finds the stream there and only removes.
    let old_vote = VOTE.get(state, &0)?;
    let old_ids: Vec<(u64, LogIdRecord)> = LOG_IDS.iter(state).collect::<std::result::Result<_, _>>()?;
    let has_old_entries = LOG.last(state)?.is_some();
    if old_vote.is_none() && old_ids.is_empty() && !has_old_entries {
        return Ok(0);
    }
    // A move is finished once the stream has the vote, which is saved last (an old store with no
    // vote: never finished, so it is copied again). Anything a crash left of an unfinished move
    // is removed first, so the copy starts from nothing.
    let already = old_vote.is_some() && log.vote(stream).is_some();
    let mut moved = 0;
    if !already {
        if log.streams().contains(&stream) {
            log.remove_stream(stream).await?;
        }
        let mut purged = None;
        for (k, rec) in &old_ids {
            match (*k, rec.0) {
                (PURGED_KEY, Some(id)) => {
                    purged = Some(id.index);
                    log.purge(stream, id.index, &encode(rec)).await?;
                }
                (COMMITTED_KEY, _) => log.save_committed(stream, &encode(rec)).await?,
                _ => {}
            }
        }
        // The old build removed purged entries lazily: some at or below the purged id may be left.
        let mut batch = Vec::new();
        let mut bytes = 0;
        for item in LOG.iter(state) {
            let (index, rec) = item?;
            if purged.is_some_and(|p| index <= p) {
                continue;
            }
            let rec = encode(&rec);
            bytes += rec.len();
            batch.push((index, rec));
            moved += 1;
            // Records well under the node log's limit, and rounds of a sensible size.
            if batch.len() == 256 || bytes > 4 * 1024 * 1024 {
                log.append(stream, std::mem::take(&mut batch), |_| {})?;
                log.sync().await?;
                bytes = 0;
            }
        }
        log.append(stream, batch, |_| {})?;
        // The vote last, and synced: a stream with a vote is one whose move finished.
        if let Some(v) = &old_vote {
            log.save_vote(stream, &encode(v)).await?;
        }
        log.sync().await?;
        tracing::info!(%group, entries = moved, "moved this group's raft log from its own store into the node log");
    }
    let mut b = Batch::new();
    for k in LOG.keys_range(state, &0, None) {
        LOG.remove(&mut b, &k?);
    }
    for (k, _) in &old_ids {
        LOG_IDS.remove(&mut b, k);
    }
    VOTE.remove(&mut b, &0);
    state.apply_in_order(b)?;
    state.sync().await?;
    Ok(moved)
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
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        let raw = self.log.read(self.stream, from, to).map_err(read_err)?;
        raw.iter().map(|b| decode::<LogRecord>(b).map(|r| r.0).map_err(read_err)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let last_purged = log_id(self.log.purged(self.stream).map(|p| p.1))?;
        let last = match self.log.last(self.stream).map_err(read_err)? {
            Some((_, b)) => Some(*decode::<LogRecord>(&b).map_err(read_err)?.0.get_log_id()),
            None => None,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last.or(last_purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<MemberId>) -> Result<()> {
        let saved = self.log.save_vote(self.stream, &encode(&VoteRecord(*vote))).await;
        saved.map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<MemberId>>> {
        match self.log.vote(self.stream) {
            Some(b) => Ok(Some(decode::<VoteRecord>(&b).map_err(|e| StorageIOError::read_vote(&e))?.0)),
            None => Ok(None),
        }
    }

    async fn save_committed(&mut self, committed: Option<LogId<MemberId>>) -> Result<()> {
        // Only a hint for a faster restart (apply up to here at once): durable with the next round.
        let saved = self.log.save_committed(self.stream, &encode(&LogIdRecord(committed))).await;
        saved.map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<MemberId>>> {
        log_id(self.log.committed(self.stream))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<(u64, Vec<u8>)> =
            entries.into_iter().map(|e| (e.get_log_id().index, encode(&LogRecord(e)))).collect();
        // openraft learns the entries are on disk from the node log's writer, after the round's
        // fdatasync, which also covers what every other group appended meanwhile.
        self.log
            .append(self.stream, entries, move |r| {
                callback.log_io_completed(r.map_err(|e| io::Error::other(e.to_string())))
            })
            .map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId<MemberId>) -> Result<()> {
        // Conflicting entries from `log_id.index` on are gone (durably) before the leader's replace them.
        let done = self.log.truncate(self.stream, log_id.index).await;
        done.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<MemberId>) -> Result<()> {
        // The entries up to `log_id` may go only once the state they built is durable: the
        // group's store is not flushed on the hot path (the log is what a restart replays), so
        // flush it now. Everything applied so far is at or past the snapshot being purged to.
        self.state.sync().await.map_err(write_err)?;
        let done = self.log.purge(self.stream, log_id.index, &encode(&LogIdRecord(Some(log_id)))).await;
        done.map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability::CapabilityId;
    use crate::raft::types::Proposal;
    use bulkhead_storage::{Durability, StoreOptions};
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
            payload: EntryPayload::Normal(Proposal(vec![index as u8])),
        }
    }

    fn open(dir: &std::path::Path, name: &str) -> Store {
        Store::open(dir, name, &StoreOptions::default()).unwrap()
    }

    const G: GroupId = GroupId { capability: CapabilityId(0), shard: 0 };

    /// A group store wiped and started again draws a new incarnation: the old incarnation's
    /// stream goes, another group's stays.
    #[tokio::test]
    async fn an_earlier_incarnations_stream_is_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = NodeLog::open(&dir.path().join("raft-log"), Durability::Flush).unwrap();
        let state = open(dir.path(), "group-0");
        let other = GroupId { capability: CapabilityId(0), shard: 1 };
        let mut old = LogStore::new(log.clone(), state.clone(), G.log_stream(7));
        let mut kept = LogStore::new(log.clone(), state.clone(), other.log_stream(7));
        old.save_vote(&Vote::new(3, 9)).await.unwrap();
        kept.save_vote(&Vote::new(3, 9)).await.unwrap();
        assert_eq!(open_group_log(&log, &state, G, 8).await.unwrap(), 0);
        let mut new = LogStore::new(log.clone(), state, G.log_stream(8));
        assert_eq!(new.read_vote().await.unwrap(), None);
        assert_eq!(old.read_vote().await.unwrap(), None, "the old incarnation's stream is gone");
        assert!(kept.read_vote().await.unwrap().is_some());
    }

    /// A log an older build kept in the group's own store moves into the node log, vote and ids
    /// included, and is gone from the group's store; a second start moves nothing.
    #[tokio::test]
    async fn an_old_log_in_the_group_store_moves_into_the_node_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = NodeLog::open(&dir.path().join("raft-log"), Durability::Flush).unwrap();
        let state = open(dir.path(), "group-0");
        let mut b = Batch::new();
        for i in 1..=4 {
            LOG.put(&mut b, &i, &LogRecord(entry(i)));
        }
        VOTE.put(&mut b, &0, &VoteRecord(Vote::new_committed(5, 42)));
        LOG_IDS.put(&mut b, &COMMITTED_KEY, &LogIdRecord(Some(LogId::new(CommittedLeaderId::new(1, 0), 3))));
        state.apply_in_order(b).unwrap();
        assert_eq!(open_group_log(&log, &state, G, 7).await.unwrap(), 4);
        let mut ls = LogStore::new(log.clone(), state.clone(), G.log_stream(7));
        let got = ls.try_get_log_entries(..).await.unwrap();
        assert_eq!(got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(ls.read_vote().await.unwrap(), Some(Vote::new_committed(5, 42)));
        assert_eq!(ls.read_committed().await.unwrap().map(|l| l.index), Some(3));
        assert_eq!(ls.get_log_state().await.unwrap().last_log_id.map(|l| l.index), Some(4));
        assert!(LOG.last(&state).unwrap().is_none());
        assert!(VOTE.get(&state, &0).unwrap().is_none());
        assert_eq!(open_group_log(&log, &state, G, 7).await.unwrap(), 0);
        assert_eq!(ls.try_get_log_entries(2..=3).await.unwrap().len(), 2);
    }

    /// A move a crash cut short (entries copied, the vote not yet) is done again from the start:
    /// the vote and every entry arrive, nothing twice.
    #[tokio::test]
    async fn an_unfinished_move_is_done_again() {
        let dir = tempfile::tempdir().unwrap();
        let log = NodeLog::open(&dir.path().join("raft-log"), Durability::Flush).unwrap();
        let state = open(dir.path(), "group-0");
        let mut b = Batch::new();
        for i in 1..=6 {
            LOG.put(&mut b, &i, &LogRecord(entry(i)));
        }
        VOTE.put(&mut b, &0, &VoteRecord(Vote::new_committed(5, 42)));
        state.apply_in_order(b).unwrap();
        // What the crash left: the first entries in the node log, no vote, the old tables whole.
        let stream = G.log_stream(7);
        let first: Vec<(u64, Vec<u8>)> = (1..=3).map(|i| (i, encode(&LogRecord(entry(i))))).collect();
        log.append(stream, first, |_| {}).unwrap();
        log.sync().await.unwrap();
        assert_eq!(open_group_log(&log, &state, G, 7).await.unwrap(), 6);
        let mut ls = LogStore::new(log.clone(), state.clone(), stream);
        let got = ls.try_get_log_entries(..).await.unwrap();
        assert_eq!(got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(ls.read_vote().await.unwrap(), Some(Vote::new_committed(5, 42)));
    }

    /// A purge keeps the purged id, and the state machine's store is synced before it.
    #[tokio::test]
    async fn a_purge_syncs_the_state_first_and_keeps_the_purged_id() {
        let dir = tempfile::tempdir().unwrap();
        let log = NodeLog::open(&dir.path().join("raft-log"), Durability::Flush).unwrap();
        let state = open(dir.path(), "group-0");
        let mut ls = LogStore::new(log.clone(), state.clone(), G.log_stream(1));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let entries: Vec<(u64, Vec<u8>)> = (1..=5).map(|i| (i, encode(&LogRecord(entry(i))))).collect();
        log.append(ls.stream, entries, move |r| {
            let _ = tx.send(r);
        })
        .unwrap();
        rx.await.unwrap().unwrap();
        // Something applied and not yet flushed in the state machine's store.
        let mut b = Batch::new();
        crate::raft::types::GROUP_TIME.put(&mut b, &0, &crate::raft::types::GroupTime(5));
        state.apply_in_order(b).unwrap();
        let flushes = state.stats().flushes.load(std::sync::atomic::Ordering::Relaxed);
        ls.purge(LogId::new(CommittedLeaderId::new(1, 0), 3)).await.unwrap();
        assert!(state.stats().flushes.load(std::sync::atomic::Ordering::Relaxed) > flushes, "the state was synced");
        let s = ls.get_log_state().await.unwrap();
        assert_eq!((s.last_purged_log_id.map(|l| l.index), s.last_log_id.map(|l| l.index)), (Some(3), Some(5)));
        assert_eq!(ls.try_get_log_entries(..).await.unwrap().len(), 2);
    }
}
