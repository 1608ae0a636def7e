//! `bulkhead-chaos`: prove fault isolation with a machine-checked verdict.
//!
//! A run launches a local cluster (or attaches to a remote one), drives a steady stream of orders
//! with Idempotency-Keys at it, injects the scenario's faults, heals them, and then checks the
//! brief's invariants through the public HTTP API only, so it can judge any cluster.
//!
//! - [`scenario`]: the TOML scenario files and the (seeded) random fault schedule.
//! - [`target`]: the cluster under test, local or remote, and how each fault is injected and healed.
//! - [`load`]: the client, retrying with the same key like a real one.
//! - [`observe`]: polls every node's view of the cluster; detection and recovery times.
//! - [`check`]: the invariant checker (public HTTP API only).
//! - [`run`]: one run from launch to verdict.
//! - [`report`] + [`svg`]: `verdict.json` and `timeline.svg`.
//!
//! Caveats: detection times are upper bounds (the observer polls every 25 ms); a local cluster is
//! always the three-node demo topology; remote kill/pause/restart need the operator's commands.

pub mod check;
pub mod load;
pub mod observe;
pub mod report;
pub mod run;
pub mod scenario;
pub mod svg;
pub mod target;
