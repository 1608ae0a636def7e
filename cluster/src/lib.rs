//! Everything ractor_cluster does not give Bulkhead, on top of it.
//!
//! - [`config`]: the cluster layer's settings and the static shard map (who hosts what, who owns a key).
//! - [`node`]: bootstrap, the dialer that keeps a full mesh and reconnects, and the [`Cluster`] handle.
//! - [`membership`] + [`detector`]: heartbeats and a pure deadline failure detector; the cluster view.
//! - [`wire`]: the versioned envelope every cross-node payload travels in; undecodable input is counted.
//! - [`gateway`]: the one remotable actor per capability per node; workers stay local-only.
//! - [`senders`]: who may send a capability's requests (a vouched sender of the right role).
//! - [`link`]: the TCP links this node accepts and dials, behind a switch that can cut them all.
//! - [`call`]: the one call path, always with a timeout, and its error type.
//! - `ports`: the narrow traits membership, Raft and the gateways see the node through, as
//!   [`Cluster`] implements them (no part imports `Cluster` back).
//! - [`breaker`]: a pure circuit breaker per (capability, member), consulted by [`Cluster::call`].
//!
//! Caveats:
//! - Discovery is by process group per (capability, node); ractor's pg membership is not re-gossiped,
//!   so the mesh must be full: the dialer keeps dialling every address it has learned.
//! - While a peer is paused (SIGSTOP), its kernel still accepts TCP connections, and ractor_cluster
//!   has no handshake deadline; the dialer closes any session not ready within 3 s (this also
//!   closes connections that send garbage and never authenticate).
//! - Ticks from remote peers are accepted by [`membership::MembershipMsg`] (the type must be remotable
//!   for heartbeats); a tick only makes the node look at its own clock, so it is harmless.

pub mod breaker;
pub mod call;
pub mod capability;
pub mod caps;
pub mod config;
pub mod detector;
pub mod gate;
pub mod gateway;
pub mod link;
pub mod membership;
pub mod node;
mod ports;
pub mod raft;
#[cfg(test)]
mod record_fixtures;
pub mod secret;
pub mod senders;
pub mod tls;
pub mod trace;
pub mod wire;

pub use breaker::BreakerState;
pub use call::CallError;
pub use capability::CapabilityId;
pub use config::{ClusterConfig, Limits, ShardMap, Timing, TlsMode};
pub use detector::Status;
pub use gateway::{Gateway, GatewayArgs, Inbound};
pub use node::{CapHealth, Cluster, LeaderReply};
pub use senders::{Role, SentBy};
