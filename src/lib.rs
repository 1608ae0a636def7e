//! The `bulkhead` binary's pieces: running one node ([`node`]), the demo ([`demo`]: a local
//! three-node cluster of real processes on the [`topology`] the docs describe, launched with the
//! `bulkhead-launch` crate), benchmarking local clusters ([`mod@bench`]), and making API tokens and
//! cluster certificates ([`keys`]); a node's logs, span export and metrics recorder
//! ([`telemetry`]). Stopping a node is [`lifecycle`]'s (the drain), telling systemd about it
//! [`systemd`]'s. `main.rs` only parses arguments and calls these.

pub mod bench;
pub mod demo;
pub mod keys;
pub mod lifecycle;
pub mod node;
pub mod restore;
pub mod systemd;
pub mod telemetry;

pub use bulkhead_launch::topology;
