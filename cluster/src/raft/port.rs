//! The Raft layer's port: all it needs of the node it runs on, and nothing more.
//!
//! A replica's driver, the Raft network and the router see the node through [`RaftPort`] alone:
//! their node's name, the agreed timing, the liveness of peers, whether the node drains, the
//! registry of local replicas, and a way to send one Raft message, or a lane's frame, to a peer. So the Raft layer
//! does not import the node's handle ([`crate::Cluster`] implements the port), and a test can
//! drive it with a port of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::call::CallError;
use crate::capability::CapabilityId;
use crate::config::Timing;
use crate::detector::Status;

use super::lanes::FrameSink;
use super::replica::Registry;
use super::rpc::{RaftRpc, RaftRpcReply};

/// A sent Raft message's answer, to come.
pub type Reply<'a> = Pin<Box<dyn Future<Output = Result<RaftRpcReply, CallError>> + Send + 'a>>;

/// What the Raft layer asks of its node; as a [`FrameSink`], it also sends a lane's frames.
pub trait RaftPort: FrameSink {
    /// This node's name (a member's `BasicNode::addr`).
    fn name(&self) -> &str;
    /// The `[timing]` every node of the cluster agrees on.
    fn timing(&self) -> &Timing;
    /// The failure detector's verdict on `node` (this node is always up).
    fn status_of(&self, node: &str) -> Status;
    /// Whether `node` serves `cap` now (up, not refused, the capability healthy there).
    fn is_routable(&self, cap: CapabilityId, node: &str) -> bool;
    /// Whether `node` was ever heard from since this process started.
    fn heard_from(&self, node: &str) -> bool;
    /// When this process started, in ms since the epoch.
    fn started_ms(&self) -> u64;
    /// Whether this node is stopping (it takes no leadership).
    fn is_draining(&self) -> bool;
    /// This node's replicas.
    fn raft(&self) -> &Registry;
    /// Whether a message that names `node` and carries `binding` came over a link of `node`.
    fn vouches_for(&self, node: &str, binding: &[u8]) -> bool;
    /// Counts a Raft RPC refused for its sender.
    fn count_refused(&self);
    /// Sends one Raft RPC to the router on `node`, within `timeout` (`cap` only labels errors).
    fn raft_call<'a>(&'a self, node: &'a str, cap: CapabilityId, rpc: RaftRpc, timeout: Duration) -> Reply<'a>;
}

/// The port as the Raft layer holds it.
pub type Port = Arc<dyn RaftPort>;
