//! Readiness: facts gathered from the cluster handle, then judged by a pure function. `/readyz`
//! answers from it, and the systemd notifier sends `READY=1` the first time it holds.

use bulkhead_cluster::raft::{GroupId, ShardHealth};
use bulkhead_cluster::{CapHealth, CapabilityId, Cluster, Status};

/// What readiness is judged from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadyFacts {
    /// The node is stopping (SIGTERM).
    pub draining: bool,
    /// Each capability this node hosts, as its supervisor reports it.
    pub capabilities: Vec<(CapabilityId, CapHealth)>,
    /// Each shard this node holds a replica of, as that replica sees it.
    pub shards: Vec<(GroupId, ShardHealth)>,
    /// Why peers are refused (a different shard map or `[timing]`).
    pub refused: Vec<String>,
    /// The node has no seeds, or sees at least one peer not down.
    pub joined: bool,
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Stopping: send nothing more here, whatever else holds.
    Draining,
    NotReady(Vec<String>),
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        matches!(self, Readiness::Ready)
    }
}

/// Ready = not stopping, every hosted capability serving, every local shard led, no peer refused,
/// and (when the node has seeds) joined to at least one peer.
pub fn judge(f: &ReadyFacts) -> Readiness {
    if f.draining {
        return Readiness::Draining;
    }
    let mut problems = Vec::new();
    for (cap, h) in &f.capabilities {
        if !h.ready {
            problems.push(format!("{cap}: {}", h.detail));
        }
    }
    for (id, health) in &f.shards {
        match health {
            ShardHealth::Led => {}
            ShardHealth::Electing => problems.push(format!(
                "{}: shard {} has no leader yet (an election is under way)",
                id.capability, id.shard
            )),
            ShardHealth::MajorityLost { down } => problems.push(format!(
                "DISASTER {}: shard {}: a majority of its replicas is down ({}); it serves nothing until they return, or until it is restored from a backup (docs/operations.md, \"Losing a majority\")",
                id.capability,
                id.shard,
                down.join(", ")
            )),
            ShardHealth::Stopped { why } => problems.push(format!(
                "{}: shard {}: this replica stopped ({why}); the other replicas serve; restart the node with a build that can go on",
                id.capability, id.shard
            )),
        }
    }
    problems.extend(f.refused.iter().cloned());
    if !f.joined {
        problems.push("not joined: no peer is reachable yet".into());
    }
    if problems.is_empty() {
        Readiness::Ready
    } else {
        Readiness::NotReady(problems)
    }
}

/// Reads the facts off the cluster handle. Draining is the cluster's word: the drain's first step
/// marks the cluster and the HTTP gate together (`src/lifecycle.rs`).
pub fn gather(cluster: &Cluster) -> ReadyFacts {
    let view = cluster.view();
    ReadyFacts {
        draining: cluster.is_draining(),
        capabilities: cluster.local_health().into_iter().collect(),
        shards: cluster.raft().all().iter().map(|r| (r.id, r.health(cluster))).collect(),
        refused: view
            .values()
            .filter_map(|n| n.reason.as_ref().filter(|r| r.is_refused()))
            .map(ToString::to_string)
            .collect(),
        joined: cluster.config().seeds.is_empty()
            || view.values().any(|n| n.name != cluster.name() && n.status != Status::Down),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_actors::Capability;

    fn healthy() -> ReadyFacts {
        ReadyFacts {
            draining: false,
            capabilities: vec![(Capability::Orders.id(), CapHealth { ready: true, detail: "serving".into() })],
            shards: vec![(GroupId::new(Capability::Orders, 0), ShardHealth::Led)],
            refused: vec![],
            joined: true,
        }
    }

    fn problems(f: &ReadyFacts) -> Vec<String> {
        match judge(f) {
            Readiness::NotReady(p) => p,
            other => panic!("expected not ready, got {other:?}"),
        }
    }

    #[test]
    fn a_serving_joined_node_with_led_shards_is_ready() {
        assert_eq!(judge(&healthy()), Readiness::Ready);
        // No seeds and nothing hosted: ready as soon as it runs (an HTTP-only node).
        assert!(judge(&ReadyFacts { joined: true, ..ReadyFacts::default() }).is_ready());
    }

    #[test]
    fn draining_wins_over_everything() {
        assert_eq!(judge(&ReadyFacts { draining: true, ..healthy() }), Readiness::Draining);
        assert_eq!(judge(&ReadyFacts { draining: true, joined: false, ..ReadyFacts::default() }), Readiness::Draining);
    }

    #[test]
    fn every_problem_is_named() {
        let mut f = healthy();
        f.capabilities.push((Capability::Payments.id(), CapHealth { ready: false, detail: "starting".into() }));
        f.shards.push((GroupId::new(Capability::Orders, 1), ShardHealth::Electing));
        f.shards.push((
            GroupId::new(Capability::Inventory, 0),
            ShardHealth::MajorityLost { down: vec!["n2".into(), "n3".into()] },
        ));
        f.shards.push((
            GroupId::new(Capability::Payments, 0),
            ShardHealth::Stopped { why: "a committed command does not decode".into() },
        ));
        f.refused.push("refused: node n3 has a different shard map".into());
        f.joined = false;
        let p = problems(&f);
        assert_eq!(p.len(), 6, "{p:?}");
        assert_eq!(p[0], "payments: starting");
        assert!(p[1].contains("shard 1 has no leader yet"), "{p:?}");
        assert!(p[2].starts_with("DISASTER inventory: shard 0") && p[2].contains("n2, n3"), "{p:?}");
        assert!(
            p[3].starts_with("payments: shard 0: this replica stopped") && p[3].contains("does not decode"),
            "{p:?}"
        );
        assert!(p[4].starts_with("refused"), "{p:?}");
        assert!(p[5].starts_with("not joined"), "{p:?}");
    }
}
