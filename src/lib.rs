//! The `bulkhead` binary's pieces: running one node ([`node`]), launching a local three-node
//! cluster of real processes ([`demo`]) on the [`topology`] the docs describe, and benchmarking
//! local clusters ([`bench`]). `main.rs` only parses
//! arguments and calls these.

pub mod bench;
pub mod demo;
pub mod node;
pub mod topology;
