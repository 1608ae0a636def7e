//! Durable storage for one capability on one node: a sled `Db` of its own, typed tables over it
//! whose records go through the versioned bincode codec, and group commit so that a caller is
//! acknowledged only after the flush that covers its write.
//!
//! The codec, the clock ([`now_ms`]), the stable hash ([`fnv1a`]) and the byte fixtures live in
//! `bulkhead_codec` (shared with `cluster`, which must not borrow them from here); this crate
//! re-exports them under their old paths (`bulkhead_storage::{encode, decode, Record, ..}`,
//! `bulkhead_storage::fixtures`).
//!
//! Layout on disk: `<data_dir>/<capability>-<shard>/` holds one sled database per replica. Every
//! table is a one-byte prefix in the database's default tree. `<data_dir>/raft-log/` is the node
//! log ([`nodelog`]): every Raft group's log on this node, with one group commit.
//!
//! Writes: [`Store::apply_in_order`] writes one record after another with no extra I/O; they reach
//! the disk with the next group flush, and after a crash a *prefix* of them survives, so callers order
//! their writes to make any prefix safe (a commit marker last, or an intent record first).
//! [`Store::apply`] is atomic for several records, but sled implements that by writing its log buffer
//! out for every batch, which group commit cannot amortise: the capabilities avoid it.
//! [`Store::apply_deferred`] writes behind, for a replicated state machine whose log is the durable
//! copy: reads see the writes at once, and sled gets the last value of each key a few thousand keys
//! at a time, all-or-nothing (see the `overlay` module).
//!
//! Caveats (honest list):
//! - sled 0.34's `flush()` is `pwrite` + `sync_file_range`; with [`Durability::Fsync`] (the default) each
//!   group flush is followed by an `fdatasync` of the database file, which is what makes a write survive
//!   power loss rather than only a killed process.
//! - sled 0.34 has known crash-consistency bugs; a store that fails to open is reported with its path and
//!   left untouched for an operator to inspect ([`StoreError::Open`]).
//! - `apply_batch` takes a process-wide lock in sled, shared by every store in the process.
//! - Ordered writes rely on sled recovering its log in order up to the last complete flush.

mod idempotency;
mod key;
pub mod nodelog;
mod overlay;
#[cfg(test)]
mod record_fixtures;
mod store;
mod table;

pub use bulkhead_codec::fixtures;
pub use bulkhead_codec::{
    decode, decode_either, decode_payload, decode_wire, encode, fnv1a, now_ms, unknown_version, CodecError, Record,
    WIRE_DECODE_LIMIT,
};
pub use idempotency::{BodyFingerprint, BodyHash, IdemIndexEntry, IdemRecord, Idempotency, IDEMPOTENCY_RETENTION_MS};
pub use key::{name_prefix, Key};
pub use nodelog::{NodeLog, NodeLogStats};
pub use store::{Batch, Durability, RawRecord, Store, StoreError, StoreOptions, StoreStats};
pub use table::Table;
