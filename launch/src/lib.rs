//! Launching local clusters of real `bulkhead node` processes: the node's config file
//! ([`config`]), the demo topology and its configs ([`topology`]), and the processes themselves
//! ([`local`]). Used by `bulkhead demo` and `bulkhead bench`, by the tests in `tests/`, and by the
//! chaos tool, which depends on nothing else of Bulkhead's: launch speaks the node's config types
//! ([`config`], made of the layers' own sections) so that the checker never names one, and judges
//! only through the public HTTP API.

pub mod config;
pub mod error;
pub mod local;
pub mod secrets;
pub mod topology;

pub use local::{free_ports, LocalCluster, LocalSettings};
pub use secrets::{authorized, read_token_file, LocalSecrets};
