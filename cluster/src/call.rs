//! The one call path for cross-node requests: resolve a member, send with a timeout, decode.
//!
//! There is no untimed call anywhere: a paused peer would otherwise hang the caller forever
//! (ractor_cluster keeps queueing into a session nobody reads). The error says which of the three
//! things went wrong, because callers treat them differently: `Unreachable`, `NoLeader`, `Busy`,
//! `Lost` and `TimedOut` are retried (the saga's backoff), `Rejected` is an answer.

use std::time::Duration;

use bulkhead_codec::Record;
use ractor::rpc::CallResult;
use ractor::ActorRef;
use serde::{Deserialize, Serialize};

use crate::capability::CapabilityId;
use crate::senders::Sender;
use crate::wire::{open, seal_from, Refusal, WireMsg, WireReply};

/// Why a cross-node call did not produce an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CallError {
    /// No live member to send to: nothing was sent.
    #[error("{capability} on {node} is unreachable: {reason}")]
    Unreachable { capability: CapabilityId, node: String, reason: String },
    /// The shard has no leader right now (an election is under way, or a majority is down):
    /// nothing was recorded. `node` is the node whose replica said so.
    #[error("{capability} shard {shard} has no leader right now (as seen by {node})")]
    NoLeader { capability: CapabilityId, shard: u32, node: String },
    /// The member refused before its worker saw the request (restarting, stopping, shedding load):
    /// nothing was recorded.
    #[error("{capability} on {node} is busy: {reason}")]
    Busy { capability: CapabilityId, node: String, reason: String },
    /// Sent, but the member or its link went away before answering: it may have been applied.
    #[error("{capability} on {node} went away before answering: {reason}")]
    Lost { capability: CapabilityId, node: String, reason: String },
    /// Sent, but no answer within the timeout (the request may or may not have been applied).
    #[error("{capability} on {node} did not answer within {timeout_ms} ms")]
    TimedOut { capability: CapabilityId, node: String, timeout_ms: u64 },
    /// The member answered that it will not handle the request.
    #[error("{capability} on {node} rejected the request: {reason}")]
    Rejected { capability: CapabilityId, node: String, reason: String },
}

impl CallError {
    /// The variant's name, for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Unreachable { .. } => "unreachable",
            CallError::NoLeader { .. } => "no_leader",
            CallError::Busy { .. } => "busy",
            CallError::Lost { .. } => "lost",
            CallError::TimedOut { .. } => "timed_out",
            CallError::Rejected { .. } => "rejected",
        }
    }

    /// Worth retrying later (as opposed to a definite answer).
    pub fn is_transient(&self) -> bool {
        match self {
            CallError::Unreachable { .. }
            | CallError::NoLeader { .. }
            | CallError::Busy { .. }
            | CallError::TimedOut { .. }
            | CallError::Lost { .. } => true,
            CallError::Rejected { .. } => false,
        }
    }

    /// Nothing was recorded: the request never reached a worker, so a retry cannot duplicate it.
    pub fn nothing_recorded(&self) -> bool {
        matches!(self, CallError::Unreachable { .. } | CallError::NoLeader { .. } | CallError::Busy { .. })
    }
}

/// Sends `req` to `actor` (the gateway of `capability` on `node`) as `from`, and waits at most `timeout`.
pub async fn call<Req: Record, Resp: Record>(
    actor: &ActorRef<WireMsg>,
    capability: impl Into<CapabilityId>,
    node: &str,
    from: Sender,
    req: &Req,
    traceparent: &str,
    timeout: Duration,
) -> Result<Resp, CallError> {
    send(actor, capability.into(), node, Some(from), req, traceparent, timeout).await
}

/// [`call`], with the envelope's sender left out where the payload carries its own proof (a
/// `RaftCall` names its sender and binding, and the Raft router checks those).
pub(crate) async fn send<Req: Record, Resp: Record>(
    actor: &ActorRef<WireMsg>,
    capability: CapabilityId,
    node: &str,
    from: Option<Sender>,
    req: &Req,
    traceparent: &str,
    timeout: Duration,
) -> Result<Resp, CallError> {
    let bytes = seal_from(req, traceparent, from);
    let unreachable = |reason: String| CallError::Unreachable { capability, node: node.to_string(), reason };
    let rejected = |reason: String| CallError::Rejected { capability, node: node.to_string(), reason };
    // Our own timer runs ahead of ractor's: a remote stub drops the reply port at ractor's
    // deadline, which would surface as a "sender error" and be misread as unreachable. A timeout
    // must be reported as such: the request may have been applied.
    let timed_out =
        || CallError::TimedOut { capability, node: node.to_string(), timeout_ms: timeout.as_millis() as u64 };
    let attempt = tokio::time::timeout(
        timeout,
        actor.call(|port| WireMsg::Ask(bytes, port), Some(timeout + Duration::from_secs(1))),
    );
    let Ok(result) = attempt.await else { return Err(timed_out()) };
    match result {
        Ok(CallResult::Success(reply)) => match open::<WireReply>(&reply, "reply") {
            Ok((_, WireReply::Ok(payload))) => {
                bulkhead_codec::decode_wire::<Resp>(&payload).map_err(|e| rejected(format!("undecodable reply: {e}")))
            }
            Ok((_, WireReply::Refused { kind, reason })) => Err(match kind {
                Refusal::Busy => CallError::Busy { capability, node: node.to_string(), reason },
                Refusal::Lost => CallError::Lost { capability, node: node.to_string(), reason },
                Refusal::Rejected => rejected(reason),
            }),
            Err(e) => Err(rejected(format!("undecodable reply envelope: {e}"))),
        },
        Ok(CallResult::Timeout) => Err(timed_out()),
        Ok(CallResult::SenderError) => Err(CallError::Lost {
            capability,
            node: node.to_string(),
            reason: "the member or its link went away before answering".into(),
        }),
        Err(e) => Err(unreachable(format!("could not send: {e}"))),
    }
}
