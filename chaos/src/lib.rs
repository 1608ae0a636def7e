//! `bulkhead-chaos`: prove fault isolation with a machine-checked verdict.
//!
//! A run launches a local cluster (or attaches to a remote one), drives a steady stream of orders
//! with Idempotency-Keys at it, injects the scenario's faults, heals them, and then checks the
//! brief's invariants through the public HTTP API only, so it can judge any cluster.
//!
//! - [`report`]: the verdict and timeline data (`verdict.json`).
//! - [`svg`]: the timeline plot (`timeline.svg`).

pub mod report;
pub mod svg;
