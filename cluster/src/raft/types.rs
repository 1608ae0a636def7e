//! The one Raft type configuration every group shares, group and member identities, and the
//! records the groups keep in a capability's store.
//!
//! Every group carries opaque bytes: a capability encodes its own commands and replies with its
//! versioned [`Record`] codec, so one log store, one network and one router serve every group.

use std::fmt;
use std::io::Cursor;

use bulkhead_codec::Record;
use bulkhead_storage::Table;
use openraft::{Entry, LogId, SnapshotMeta, StoredMembership, Vote};
use serde::{Deserialize, Serialize};

use crate::capability::CapabilityId;
use crate::config::stable_hash;

/// A capability's command, encoded by the capability (a versioned [`Record`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal(pub Vec<u8>);

/// What applying a [`Proposal`] answered, encoded by the capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Applied(pub Vec<u8>);

/// The first byte of a [`Proposal`] that carries several commands ([`CommandBatch`]). A single
/// command's bytes begin with its record's version byte, which is never this.
pub const BATCH_MARK: u8 = 0xB7;

/// Several commands in one log entry, applied in order, each answering for itself
/// ([`ReplyBatch`]): under load a group proposes whatever queued while its last writes were in
/// flight as one entry (see `group::Replica::propose`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandBatch {
    pub commands: Vec<Vec<u8>>,
}
impl Record for CommandBatch {
    const VERSION: u8 = 1;
}

/// What applying a [`CommandBatch`] answered: one encoded reply per command, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyBatch {
    pub replies: Vec<Vec<u8>>,
}
impl Record for ReplyBatch {
    const VERSION: u8 = 1;
}

impl Proposal {
    /// One command alone (the layout every build reads), or several behind [`BATCH_MARK`].
    pub fn of(mut commands: Vec<Vec<u8>>) -> Proposal {
        if commands.len() == 1 {
            return Proposal(commands.pop().unwrap_or_default());
        }
        let mut bytes = vec![BATCH_MARK];
        bytes.extend_from_slice(&bulkhead_codec::encode(&CommandBatch { commands }));
        Proposal(bytes)
    }

    /// The commands of a batch, or `None` for a single command.
    pub fn batch(&self) -> Option<Result<Vec<Vec<u8>>, bulkhead_codec::CodecError>> {
        match self.0.split_first() {
            // Under the network limit: an entry is a leader's bytes, never larger than a frame.
            Some((&BATCH_MARK, rest)) => Some(bulkhead_codec::decode_wire::<CommandBatch>(rest).map(|b| b.commands)),
            _ => None,
        }
    }
}

openraft::declare_raft_types!(
    /// Raft types of every Bulkhead group: member ids are `u64` ([`member_id`]), a member's node
    /// info is its node name (`BasicNode::addr`), snapshots are byte buffers.
    pub TypeConfig:
        D = Proposal,
        R = Applied,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type MemberId = u64;

/// One Raft group: a (capability, shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GroupId {
    pub capability: CapabilityId,
    pub shard: u32,
}

impl GroupId {
    pub fn new(capability: impl Into<CapabilityId>, shard: u32) -> GroupId {
        GroupId { capability: capability.into(), shard }
    }

    /// The group as a number, for keys: the capability's id + 1 in the high 32 bits (a fixed code,
    /// never its position in a list), the shard in the low ones.
    pub fn code(&self) -> u64 {
        ((u64::from(self.capability.0) + 1) << 32) | u64::from(self.shard)
    }

    /// The node-log stream of this group's member in `incarnation`: the capability in the top 8
    /// bits, the shard in the next 24 (at most 256 shards), the incarnation in the low 32.
    pub fn log_stream(&self, incarnation: u32) -> u64 {
        let code = self.code();
        ((code >> 32) << 56) | ((code & 0xFF_FFFF) << 32) | u64::from(incarnation)
    }
}

/// Whether two node-log streams belong to the same group (any incarnations).
pub fn same_group(a: u64, b: u64) -> bool {
    a >> 32 == b >> 32
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.capability, self.shard)
    }
}

/// A member of a group is a node *in one incarnation of its store*: the high 32 bits name the
/// node, the low 32 bits are the incarnation its store drew when it was created empty. A node
/// whose disk was wiped therefore comes back as a different member and can never vote again
/// under the identity it had (Raft's safety assumes stable storage).
pub fn member_id(node: &str, incarnation: u32) -> MemberId {
    ((stable_hash(node.as_bytes()) as u32 as u64) << 32) | u64::from(incarnation)
}

/// Whether `member` is a member id of node `node` (any incarnation).
pub fn is_member_of(member: MemberId, node: &str) -> bool {
    member >> 32 == member_id(node, 0) >> 32
}

/// Tables of a group's store at and above this id belong to Raft; the capability's own tables
/// (below it) are the state machine, and exactly what a snapshot carries.
pub const RAFT_TABLES_FROM: u8 = 0xF0;

/// One log entry, versioned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogRecord(pub Entry<TypeConfig>);
impl Record for LogRecord {
    const VERSION: u8 = 1;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VoteRecord(pub Vote<MemberId>);
impl Record for VoteRecord {
    const VERSION: u8 = 1;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogIdRecord(pub Option<LogId<MemberId>>);
impl Record for LogIdRecord {
    const VERSION: u8 = 1;
}

/// The last entry applied to the capability's tables and the membership in force then; written
/// in the same all-or-nothing batch as the applied entries' effects.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppliedState {
    pub last_applied: Option<LogId<MemberId>>,
    pub membership: StoredMembership<MemberId, openraft::BasicNode>,
}
impl Record for AppliedState {
    const VERSION: u8 = 1;
}

/// The latest snapshot this replica built or installed: its meta, and where its bytes are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub meta: SnapshotMeta<MemberId, openraft::BasicNode>,
    pub data: SnapshotData,
}

/// Where a snapshot's bytes are kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SnapshotData {
    /// In the record itself: how version 1 kept them. A large value becomes a sled blob file that
    /// sled 0.34 never deletes once the value is replaced (sled#786): every snapshot leaked its
    /// size on disk. Only read now.
    Inline(Vec<u8>),
    /// In [`SNAPSHOT_PARTS`]: `parts` records of at most [`SNAPSHOT_PART`] bytes under generation
    /// `generation` (keys `generation << 32 | part`), written before this record. How version 2
    /// kept them: writing hundreds of MB through sled stalled the whole machine (see `File`). Only
    /// read now.
    Parts { generation: u32, parts: u32 },
    /// In a file of its own in the store's [`SNAPSHOT_DIR`] ([`snapshot_file_name`]), made durable
    /// before this record was written; `len` and `crc32` check it when it is read back. Why not in
    /// sled: a snapshot of a large state (350 MB, 2.5 million records in a 20-minute soak) kept as
    /// 43,000 parts cost seconds of sled's CPU and then one flush of all of it, and on ext4 that
    /// flush held every node's log `fdatasync` on the same disk past the Raft heartbeat timeout.
    File { generation: u32, len: u64, crc32: u32 },
}

/// The folder, inside a group's store folder, of its kept snapshots' files (sled ignores it).
pub const SNAPSHOT_DIR: &str = "raft-snapshots";

/// The file of one kept snapshot, in [`SNAPSHOT_DIR`].
pub fn snapshot_file_name(generation: u32) -> String {
    format!("{generation:010}.snapshot")
}

/// Bytes per snapshot part: far under sled's blob threshold.
pub const SNAPSHOT_PART: usize = 8 * 1024;

/// One part of a snapshot's bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotPart(pub Vec<u8>);
impl Record for SnapshotPart {
    const VERSION: u8 = 1;
}

/// [`SnapshotRecord`] version 1: the bytes inline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SnapshotRecordV1 {
    pub(crate) meta: SnapshotMeta<MemberId, openraft::BasicNode>,
    pub(crate) data: Vec<u8>,
}

impl Record for SnapshotRecord {
    /// 2: the bytes moved out of the record, into parts. 3: or into a file (`SnapshotData::File`,
    /// appended to the enum: a version 2 payload reads as it is).
    const VERSION: u8 = 3;

    fn upgrade(version: u8, payload: &[u8]) -> Result<Self, bulkhead_codec::CodecError> {
        match version {
            1 => {
                let v1: SnapshotRecordV1 = bulkhead_codec::decode_payload(payload)?;
                Ok(SnapshotRecord { meta: v1.meta, data: SnapshotData::Inline(v1.data) })
            }
            2 | 3 => bulkhead_codec::decode_payload(payload),
            v => Err(bulkhead_codec::unknown_version::<Self>(v)),
        }
    }
}

/// What a snapshot's bytes hold: every raw record of the capability's tables.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotBody {
    pub records: Vec<(Vec<u8>, Vec<u8>)>,
}
impl Record for SnapshotBody {
    const VERSION: u8 = 1;
}

/// Who this store belongs to: drawn once when the store is created empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub node: String,
    pub group: GroupId,
    pub incarnation: u32,
    pub created_ms: u64,
}
impl Record for Identity {
    const VERSION: u8 = 1;
}

/// The group's time: the latest time any applied command carried ([`super::Machine::time_of`]).
/// A leader's clock starts from it (see [`super::clock`]), so no node's wall clock decides an
/// outcome. Below [`RAFT_TABLES_FROM`] on purpose: it is state-machine state and travels in
/// snapshots, so a replica rebuilt from one knows it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupTime(pub u64);
impl Record for GroupTime {
    const VERSION: u8 = 1;
}

pub const GROUP_TIME: Table<u64, GroupTime> = Table::new(0xEF, "raft_group_time");

/// The store name (folder) of the node log: `<data_dir>/raft-log/`.
pub const NODE_LOG_DIR: &str = "raft-log";

/// Where groups kept their log before the node log (0.1 builds up to 2026-12-06): in the group's
/// own store. Read once at start-up to move an old log into the node log, then removed.
pub const LOG: Table<u64, LogRecord> = Table::new(0xF0, "raft_log");
pub const VOTE: Table<u64, VoteRecord> = Table::new(0xF1, "raft_vote");
/// Key 0: the last purged log id; key 1: the last committed log id.
pub const LOG_IDS: Table<u64, LogIdRecord> = Table::new(0xF2, "raft_log_ids");
pub const APPLIED: Table<u64, AppliedState> = Table::new(0xF3, "raft_applied");
pub const SNAPSHOT: Table<u64, SnapshotRecord> = Table::new(0xF4, "raft_snapshot");
pub const IDENTITY: Table<u64, Identity> = Table::new(0xF5, "raft_identity");
/// The parts of the current snapshot's bytes (see [`SnapshotData::Parts`]).
pub const SNAPSHOT_PARTS: Table<u64, SnapshotPart> = Table::new(0xF6, "raft_snapshot_parts");
pub const PURGED_KEY: u64 = 0;
pub const COMMITTED_KEY: u64 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_streams_name_the_group_and_the_incarnation() {
        let g = GroupId { capability: CapabilityId(1), shard: 3 };
        let other = GroupId { capability: CapabilityId(1), shard: 4 };
        assert!(same_group(g.log_stream(7), g.log_stream(9)));
        assert!(!same_group(g.log_stream(7), other.log_stream(7)));
        assert_ne!(g.log_stream(7), g.log_stream(8));
        let streams: std::collections::BTreeSet<u64> = (0..5)
            .flat_map(|c| {
                (0..256).map(move |shard| GroupId { capability: CapabilityId(c), shard }.log_stream(u32::MAX) >> 32)
            })
            .collect();
        assert_eq!(streams.len(), 5 * 256);
    }

    #[test]
    fn a_batch_of_one_is_a_plain_command_and_a_batch_splits_back() {
        assert_eq!(Proposal::of(vec![vec![1, 2]]), Proposal(vec![1, 2]));
        assert!(Proposal(vec![1, 2]).batch().is_none());
        let p = Proposal::of(vec![vec![1, 2], vec![], vec![3]]);
        assert_eq!(p.0[0], BATCH_MARK);
        assert_eq!(p.batch().unwrap().unwrap(), vec![vec![1, 2], vec![], vec![3]]);
        assert!(Proposal(vec![BATCH_MARK, 9, 9]).batch().unwrap().is_err());
    }

    #[test]
    fn group_codes_differ_by_capability_and_shard() {
        let codes: std::collections::BTreeSet<u64> = (0..5)
            .flat_map(|c| (0..3).map(move |shard| GroupId { capability: CapabilityId(c), shard }.code()))
            .collect();
        assert_eq!(codes.len(), 15);
        // Fixed for good: node-log stream ids and store keys were made from these codes.
        assert_eq!(GroupId { capability: CapabilityId(0), shard: 1 }.code(), 1 << 32 | 1);
        assert_eq!(GroupId { capability: CapabilityId(4), shard: 0 }.code(), 5 << 32);
        assert_eq!(GroupId { capability: CapabilityId(2), shard: 3 }.log_stream(7), 3 << 56 | 3 << 32 | 7);
    }

    #[test]
    fn member_ids_differ_by_node_and_by_incarnation() {
        assert_ne!(member_id("n1", 7), member_id("n2", 7));
        assert_ne!(member_id("n1", 7), member_id("n1", 8));
        assert_eq!(member_id("n1", 7) >> 32, member_id("n1", 8) >> 32);
    }
}
