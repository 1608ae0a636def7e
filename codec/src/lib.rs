//! The bottom crate: what both `storage` (bytes on disk) and `cluster` (bytes on the wire) need,
//! so that neither borrows it from the other. It knows nothing of sled, Raft or actors.
//!
//! - `record.rs`: the versioned record codec (`[VERSION byte][bincode 2 payload]`, [`Record`] with
//!   its `upgrade` hook, [`encode`] / [`decode`], [`decode_wire`] under [`WIRE_DECODE_LIMIT`] for
//!   bytes from a peer);
//! - [`fixtures`]: the checked-in byte fixtures every crate's `record_fixtures` test reads;
//! - [`now_ms`]: the wall clock every record uses;
//! - [`fnv1a`]: the stable 64-bit hash (shard placement, config fingerprints).
//!
//! `bulkhead_storage` re-exports all of it under its old paths.

mod clock;
pub mod fixtures;
mod hash;
mod record;

pub use clock::now_ms;
pub use hash::fnv1a;
pub use record::{
    decode, decode_either, decode_payload, decode_wire, encode, encode_payload, unknown_version, CodecError, Record,
    WIRE_DECODE_LIMIT,
};
