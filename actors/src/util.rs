//! Small pieces every worker shares.

use std::collections::BTreeMap;

use bulkhead_cluster::raft::{ProposeError, Replica};
use bulkhead_cluster::Cluster;

use crate::capability::Capability;

/// Why a replicated capability's worker did not serve a request itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unserved {
    /// Another replica leads (or none is known: `None`); the caller follows it once.
    NotLeader(Option<String>),
    /// This replica leads but could not finish (no majority in time, storage failure).
    Unavailable(String),
}

impl From<ProposeError> for Unserved {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NotLeader { leader } => Unserved::NotLeader(leader),
            ProposeError::NoLeader => Unserved::NotLeader(None),
            // A write that timed out may still commit: the caller retries with the same ids.
            ProposeError::TimedOut(_) | ProposeError::Failed(_) => Unserved::Unavailable(e.to_string()),
            // Nothing was sent; the same command would be refused again (logged by the caller).
            ProposeError::TooLarge { .. } => Unserved::Unavailable(e.to_string()),
        }
    }
}

/// This node's replica of `shard` of `cap`, or (no replica here) the leader this node would send
/// the request to instead.
pub fn local_replica(
    cluster: &Cluster,
    replicas: &BTreeMap<u32, Replica>,
    cap: Capability,
    shard: u32,
) -> Result<Replica, Unserved> {
    replicas
        .get(&shard)
        .cloned()
        .ok_or_else(|| Unserved::NotLeader(cluster.leader_of(cap, shard).filter(|l| l != cluster.name())))
}

/// Exponential backoff with jitter: `base * 2^attempt`, capped, scaled by `jitter` in [0.5, 1.0].
pub fn backoff_ms(attempt: u32, base_ms: u64, cap_ms: u64, jitter: f64) -> u64 {
    let exp = base_ms.saturating_mul(1u64 << attempt.min(20));
    let capped = exp.min(cap_ms) as f64;
    (capped * jitter.clamp(0.5, 1.0)) as u64
}

/// A random jitter factor in [0.5, 1.0].
pub fn jitter() -> f64 {
    0.5 + rand::random::<f64>() / 2.0
}

/// One timed call (the cluster's `call_timeout_ms`) to the leader of `shard` of `cap`: what each
/// capability's client sends a front's request with.
pub(crate) async fn ask_leader<Req, Resp>(
    cluster: &Cluster,
    cap: Capability,
    shard: u32,
    req: &Req,
    traceparent: &str,
) -> Result<Resp, bulkhead_cluster::CallError>
where
    Req: bulkhead_storage::Record,
    Resp: bulkhead_storage::Record + bulkhead_cluster::LeaderReply,
{
    let t = std::time::Duration::from_millis(cluster.config().timing.call_timeout_ms);
    cluster.call_leader(cap, shard, req, traceparent, t).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_caps() {
        assert_eq!(backoff_ms(0, 100, 5_000, 1.0), 100);
        assert_eq!(backoff_ms(3, 100, 5_000, 1.0), 800);
        assert_eq!(backoff_ms(30, 100, 5_000, 1.0), 5_000);
        assert_eq!(backoff_ms(30, 100, 5_000, 0.5), 2_500);
        assert_eq!(backoff_ms(0, 100, 5_000, 7.0), 100);
    }
}
