//! Recovery from a lost majority: a stopped node's replica becomes its group's only voter, as
//! etcd's `--force-new-cluster` does. Offline: the node log and the group's store are opened by
//! the command (`bulkhead recover`), never while the node runs.
//!
//! A group that lost a majority of its replicas for good cannot elect a leader, and Raft will not
//! let it: what the lost replicas acknowledged might be missing from the survivors. The operator
//! decides to accept that, and which survivor to keep: the one whose log is furthest ahead
//! ([`Facts::last`], compared as (term, index); `bulkhead recover --inspect` prints it on each
//! survivor). [`force_sole_voter`] then appends one membership entry naming this replica the
//! group's only voter, in a term above any it has seen, and leaves its vote for that term
//! uncommitted: at its next start the replica is a voter of a one-member group, elects itself
//! after one election timeout and commits everything in its log with its first entry. The other
//! nodes must come back as new members (`bulkhead restore`, or empty disks): their old members are
//! out of the group, and a node that kept its old log could otherwise form a second majority of the
//! old configuration with another such node. The leader adds them back as it adds any new member.
//!
//! What the command does to the log is the same thing a leader writes for a membership change: an
//! entry at the next index. Nothing is removed.

use std::collections::{BTreeMap, BTreeSet};

use bulkhead_storage::{encode, NodeLog, Store};
use openraft::storage::{RaftLogReader, RaftLogStorage};
use openraft::{BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftLogId, Vote};

use super::log_store::LogStore;
use super::types::{member_id, GroupId, LogRecord, MemberId, IDENTITY};

/// What one replica's log says, for choosing the survivor to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub group: GroupId,
    pub member: MemberId,
    /// The last entry's (term, index); `None`: an empty log.
    pub last: Option<(u64, u64)>,
    /// The term of the vote it holds.
    pub vote_term: u64,
    /// The voters of the last membership entry in its log (member ids), if any is there.
    pub voters: Option<BTreeSet<MemberId>>,
}

impl std::fmt::Display for Facts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let last = self.last.map_or("empty".to_string(), |(t, i)| format!("term {t} index {i}"));
        write!(f, "{}: member {:x}, last entry {last}, vote term {}", self.group, self.member, self.vote_term)?;
        if let Some(v) = &self.voters {
            write!(f, ", {} voter(s) in its last membership entry", v.len())?;
        }
        Ok(())
    }
}

fn log_of(log: &NodeLog, store: &Store, node: &str, group: GroupId) -> Result<(LogStore, MemberId), String> {
    let ident = IDENTITY
        .get(store, &0)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{group}: the store has no identity (never started): nothing to recover"))?;
    if ident.node != node || ident.group != group {
        return Err(format!("{group}: the store belongs to {} in {}, not to {node}", ident.node, ident.group));
    }
    let stream = group.log_stream(ident.incarnation);
    Ok((LogStore::new(log.clone(), store.clone(), stream), member_id(node, ident.incarnation)))
}

/// The facts of this node's replica of `group`.
pub async fn inspect(log: &NodeLog, store: &Store, node: &str, group: GroupId) -> Result<Facts, String> {
    let (mut ls, member) = log_of(log, store, node, group)?;
    let state = ls.get_log_state().await.map_err(|e| e.to_string())?;
    let vote = ls.read_vote().await.map_err(|e| e.to_string())?;
    let last = state.last_log_id.map(|id| (id.leader_id.term, id.index));
    // The last membership entry: read back from the end (a membership change is rare, and the
    // log since the last snapshot is short; the state machine holds the older ones).
    let mut voters = None;
    if let Some(last_id) = state.last_log_id {
        let from = state.last_purged_log_id.map_or(0, |p| p.index + 1);
        let entries = ls.try_get_log_entries(from..=last_id.index).await.map_err(|e| e.to_string())?;
        voters = entries.iter().rev().find_map(|e| match &e.payload {
            EntryPayload::Membership(m) => Some(m.voter_ids().collect::<BTreeSet<_>>()),
            _ => None,
        });
    }
    Ok(Facts { group, member, last, vote_term: vote.map_or(0, |v| v.leader_id().term), voters })
}

/// Makes this node's replica of `group` its only voter (see the module doc); returns the facts
/// it started from and the term it wrote.
pub async fn force_sole_voter(
    log: &NodeLog,
    store: &Store,
    node: &str,
    group: GroupId,
) -> Result<(Facts, u64), String> {
    let facts = inspect(log, store, node, group).await?;
    let (mut ls, member) = log_of(log, store, node, group)?;
    let term = facts.vote_term.max(facts.last.map_or(0, |l| l.0)) + 1;
    let index = facts.last.map_or(0, |l| l.1 + 1);
    let voters = BTreeSet::from([member]);
    let nodes = BTreeMap::from([(member, BasicNode { addr: node.to_string() })]);
    let entry = Entry::<super::types::TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(term, member), index),
        payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    log.append(ls.stream(), vec![(entry.get_log_id().index, encode(&LogRecord(entry)))], move |r| {
        let _ = tx.send(r);
    })
    .map_err(|e| format!("{group}: appending the membership entry: {e}"))?;
    rx.await
        .map_err(|_| format!("{group}: the node log stopped before the entry was durable"))?
        .map_err(|e| format!("{group}: appending the membership entry: {e}"))?;
    ls.save_vote(&Vote::new(term, member)).await.map_err(|e| format!("{group}: saving the vote: {e}"))?;
    log.sync().await.map_err(|e| format!("{group}: flushing the node log: {e}"))?;
    Ok((facts, term))
}
