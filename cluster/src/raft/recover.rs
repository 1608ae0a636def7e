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

use bulkhead_codec::encode;
use bulkhead_storage::{NodeLog, Store};
use openraft::storage::{RaftLogReader, RaftLogStorage};
use openraft::{BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftLogId, Vote};

use super::log_store::LogStore;
use super::types::{member_id, GroupId, LogRecord, MemberId, APPLIED, IDENTITY};

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
    // A replica with nothing in its log has nothing to keep (and one whose log has not been moved
    // into the node log yet, by a first start of this build, looks the same): making it the only
    // voter would start the group over empty.
    let Some((last_term, last_index)) = facts.last else {
        return Err(format!(
            "{group}: this replica's log is empty here: nothing to keep (if this node was just upgraded, start it \
             once and stop it, then run recover again; else keep another survivor)"
        ));
    };
    // A follower that installed a snapshot and stopped before purging its log may have applied
    // past its log's end; openraft tidies that up at its next start. Appending below what is
    // applied would put the new entry where it is never applied: have the node tidy up first.
    let applied = APPLIED.get(store, &0).map_err(|e| e.to_string())?.and_then(|a| a.last_applied);
    if let Some(applied) = applied.filter(|a| a.index > last_index) {
        return Err(format!(
            "{group}: this replica has applied up to index {} but its log ends at {last_index} (a snapshot \
             installed just before it stopped): start the node once and stop it, then run recover again",
            applied.index
        ));
    }
    let term = facts.vote_term.max(last_term) + 1;
    let index = last_index + 1;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability::CapabilityId;
    use crate::raft::types::{Identity, Proposal, TypeConfig};
    use bulkhead_storage::{Batch, Durability, StoreOptions};

    const G: GroupId = GroupId { capability: CapabilityId(0), shard: 0 };

    fn replica(dir: &std::path::Path) -> (NodeLog, Store) {
        let log = NodeLog::open(&dir.join("raft-log"), Durability::Flush).unwrap();
        let store = Store::open(dir, "group-0", &StoreOptions::default()).unwrap();
        let mut b = Batch::new();
        IDENTITY.put(&mut b, &0, &Identity { node: "n1".into(), group: G, incarnation: 7, created_ms: 1 });
        store.apply_in_order(b).unwrap();
        (log, store)
    }

    async fn append(log: &NodeLog, term: u64, index: u64) {
        let e = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(term, member_id("n2", 1)), index),
            payload: EntryPayload::Normal(Proposal(vec![1])),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        log.append(G.log_stream(7), vec![(index, encode(&LogRecord(e)))], move |r| {
            let _ = tx.send(r);
        })
        .unwrap();
        rx.await.unwrap().unwrap();
    }

    /// An empty replica is never made the only voter: that would start the group over empty.
    #[tokio::test]
    async fn an_empty_replica_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (log, store) = replica(dir.path());
        let e = force_sole_voter(&log, &store, "n1", G).await.unwrap_err();
        assert!(e.contains("empty"), "{e}");
    }

    /// The kept replica gets one membership entry after its last, in a term above any it saw,
    /// naming itself the only voter, and a vote for that term that is not committed (it elects
    /// itself at start); what it held stays.
    #[tokio::test]
    async fn the_kept_replica_gets_one_membership_entry_after_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let (log, store) = replica(dir.path());
        append(&log, 3, 1).await;
        append(&log, 3, 2).await;
        let (facts, term) = force_sole_voter(&log, &store, "n1", G).await.unwrap();
        assert_eq!((facts.last, term), (Some((3, 2)), 4));
        let after = inspect(&log, &store, "n1", G).await.unwrap();
        let me = member_id("n1", 7);
        assert_eq!(after.last, Some((4, 3)));
        assert_eq!(after.voters, Some(BTreeSet::from([me])));
        assert_eq!(after.vote_term, 4);
        let (mut ls, _) = log_of(&log, &store, "n1", G).unwrap();
        let vote = ls.read_vote().await.unwrap().unwrap();
        assert!(!vote.is_committed());
        assert_eq!(ls.try_get_log_entries(1..3).await.unwrap().len(), 2, "the entries it held stay");
    }
}
