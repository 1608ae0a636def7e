//! The `bulkhead` binary's pieces: running one node ([`node`]), and launching a local three-node
//! cluster of real processes ([`demo`]) on the [`topology`] the docs describe. `main.rs` only parses
//! arguments and calls these.

pub mod demo;
pub mod node;
pub mod topology;
