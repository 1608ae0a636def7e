//! Raft groups (openraft 0.9): every shard of a replicated capability is one group with a replica
//! on each of its nodes.
//!
//! - [`types`]: the one type configuration all groups share, group and member ids, stored records.
//! - [`log_store`]: the log and the vote in the group's sled store, made durable by group commit.
//! - [`state_machine`]: the [`Machine`] a capability supplies, applied to its own tables; snapshots
//!   are an export of those tables.
//! - [`network`]: Raft RPCs over the cluster call path to the [`RaftRouter`] on each node.
//! - [`port`]: the one thing the layer knows of its node ([`RaftPort`]): no import of the node.
//! - [`rpc`]: the Raft messages between nodes, and who may send each.
//! - [`lanes`]: one lane per peer node: every group's AppendEntries and their answers coalesced
//!   into as few messages as the moment allows.
//! - [`replica`]: a running [`Replica`] (propose, linearizable read, status) and the registry.
//! - [`group`]: a replica's driver (start, bootstrap, reconfiguration, hand-over, health).
//! - [`clock`]: the time a leader puts into commands: the group's time, not its wall clock.
//! - [`recover`]: after a lost majority, one surviving replica made its group's only voter
//!   (offline, `bulkhead recover`).
//!
//! Why openraft 0.9 and not the 0.10 alphas: 0.9 is the stable line, with the storage-v2 API
//! (a log store that is told "durable" by a callback, which is exactly group commit) and
//! multi-raft in one process. 0.10 adds leader transfer, but as an alpha its API still moves; the
//! hand-back to a preferred leader is done here with 0.9's own means: the leader pauses proposals
//! until the preferred member has every entry, then asks it to call an election (`TakeLead`). A
//! stopping node hands each group it leads to the voter least behind the same way
//! ([`group::hand_over_all`]).
//!
//! Caveats:
//! - A snapshot is built and sent whole in memory (an export of the capability's tables); fine
//!   for the table sizes of a few million records, not for much more.
//! - An export no longer holds up applies (they record what they change meanwhile), but it still
//!   costs the whole state in CPU and memory each time (a core for 5-10 s and twice the state's
//!   size in memory at 2.5 million records). Snapshots are taken as rarely as the state is large
//!   (`group::snapshot_due`), one at a time per node, and kept in a file synced in small chunks
//!   (`state_machine`), not in sled; incremental snapshots are the real fix.
//! - After a restart the replica does not know its state's size until its first snapshot, so
//!   that one comes after `snapshot_every_entries` whatever the size.
//! - A group whose preferred node is down at the cluster's very first start is not initialized
//!   until that node comes up (bootstrap needs every replica to answer once).

// openraft's own error types (`StorageError`, `RaftError`) are large; the storage and network
// traits fix them as the error type, so boxing is not ours to choose.
#![allow(clippy::result_large_err)]

pub mod clock;
pub mod group;
pub mod lanes;
pub mod log_store;
pub mod network;
pub mod port;
pub mod recover;
pub mod replica;
pub mod rpc;
pub mod state_machine;
pub mod types;

/// Entries in one AppendEntries. An entry is a batch of commands that stops at 64 KiB, or one
/// command alone, which is refused at proposal above [`MAX_COMMAND`]: 48 entries stay under
/// 6.1 MiB, below [`MAX_FRAME`], so no AppendEntries can outgrow a link's frame (a link that got
/// one would close, and the shard would stop committing).
pub const MAX_PAYLOAD_ENTRIES: u64 = 48;
/// The largest command a replica proposes (`ProposeError::TooLarge` above it, nothing sent). Twice
/// the largest HTTP body (64 KiB): an order placed from one, its record, a sweep of 400 keys.
pub const MAX_COMMAND: usize = 128 * 1024;
/// Bytes of a snapshot sent in one InstallSnapshot.
pub const SNAPSHOT_CHUNK: u64 = 1024 * 1024;
/// The largest frame a cluster link accepts; ractor_cluster's default is 16 MiB. The largest real
/// messages: a capability's longest list reply (the actors crate bounds it to about 4.5 MiB), a Raft batch
/// (above: under 3.5 MiB), a snapshot chunk (1 MiB). A peer cannot make this node allocate more.
pub const MAX_FRAME: u64 = 8 * 1024 * 1024;

pub use group::{shard_health, ShardHealth};
pub use network::RaftRouter;
pub use port::{Port, RaftPort};
pub use replica::{ProposeError, Registry, Replica, ReplicaStatus, Role, ShardStatus};
pub use rpc::{RaftRpc, RaftRpcReply};
pub use state_machine::{Machine, StateDigest};
pub use types::{member_id, GroupId, MemberId, GROUP_TIME, NODE_LOG_DIR, RAFT_TABLES_FROM};
