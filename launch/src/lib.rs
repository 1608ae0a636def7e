//! Launching local clusters of real `bulkhead node` processes: the demo topology and its configs
//! ([`topology`]), and the processes themselves ([`local`]). Used by `bulkhead demo` and `bulkhead
//! bench`, by the tests in `tests/`, and by the chaos tool, which therefore depends on no business
//! code: only on the node's config types (`bulkhead-cluster`) and the node binary it starts.

pub mod local;
pub mod secrets;
pub mod topology;

pub use local::{free_ports, LocalCluster};
pub use secrets::{authorized, LocalSecrets};
