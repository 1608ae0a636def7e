//! The five business capabilities, and where each lives: [`Capability`] (its name and the
//! [`CapabilityId`] the cluster layer knows it by) and [`CapabilityMap`], the `[capabilities.X]`
//! tables of the node's config file, which become the cluster's [`ShardMap`].
//!
//! Ids are fixed for good: they are the enum's order, the byte every stored and sent record that
//! names a capability carries (Raft group ids, heartbeats, errors), and the code of its node-log
//! streams. Append a capability at the end; never reorder.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use bulkhead_cluster::config::CapabilityPlacement;
use bulkhead_cluster::{CapabilityId, ShardMap};
use serde::{Deserialize, Serialize};

/// The five business capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    Orders,
    Inventory,
    Payments,
    Shipping,
    Notifications,
}

impl Capability {
    pub const ALL: [Capability; 5] = [
        Capability::Orders,
        Capability::Inventory,
        Capability::Payments,
        Capability::Shipping,
        Capability::Notifications,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Orders => "orders",
            Capability::Inventory => "inventory",
            Capability::Payments => "payments",
            Capability::Shipping => "shipping",
            Capability::Notifications => "notifications",
        }
    }

    /// The id the cluster layer knows this capability by (named in this process from now on).
    pub fn id(self) -> CapabilityId {
        CapabilityId::named(self as u8, self.as_str())
    }

    /// The capability of a cluster id; `None` for an id this build does not know.
    pub fn of(id: CapabilityId) -> Option<Capability> {
        Capability::ALL.get(usize::from(id.0)).copied()
    }
}

impl From<Capability> for CapabilityId {
    fn from(c: Capability) -> CapabilityId {
        c.id()
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Capability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Capability::ALL.into_iter().find(|c| c.as_str() == s).ok_or_else(|| {
            format!("unknown capability `{s}` (known: orders, inventory, payments, shipping, notifications)")
        })
    }
}

/// The `[capabilities.X]` tables: each capability's placement, by name. Every node must hold the
/// same map; [`CapabilityMap::shard_map`] is what the cluster layer routes by.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CapabilityMap(pub BTreeMap<Capability, CapabilityPlacement>);

impl CapabilityMap {
    /// The same placements, by the ids the cluster layer knows.
    pub fn shard_map(&self) -> ShardMap {
        ShardMap(self.0.iter().map(|(cap, p)| (cap.id(), p.clone())).collect())
    }

    /// The capabilities `node` hosts.
    pub fn hosted_by(&self, node: &str) -> Vec<Capability> {
        self.0.iter().filter(|(_, p)| p.nodes.iter().any(|n| n == node)).map(|(c, _)| *c).collect()
    }

    /// Every capability placed, each on a list of distinct nodes, with sane shard counts.
    pub fn validate(&self) -> Result<(), String> {
        for (cap, p) in &self.0 {
            if p.nodes.is_empty() {
                return Err(format!("[capabilities.{cap}] nodes is empty: list at least one node"));
            }
            if p.shards == Some(0) || p.replicas == Some(0) {
                return Err(format!("[capabilities.{cap}] shards and replicas must be at least 1"));
            }
            if let Some(l) = p.leaders.iter().find(|l| !p.nodes.contains(l)) {
                return Err(format!("[capabilities.{cap}] leaders names `{l}`, which is not in its nodes"));
            }
            if p.leaders.len() > p.shards.unwrap_or(1) as usize {
                return Err(format!("[capabilities.{cap}] lists more leaders than it has shards"));
            }
            let mut seen = std::collections::HashSet::new();
            for n in &p.nodes {
                if !seen.insert(n) {
                    return Err(format!("[capabilities.{cap}] lists node `{n}` twice"));
                }
            }
            // An order id's last byte names its shard.
            if *cap == Capability::Orders && p.shards.unwrap_or(1) > 256 {
                return Err("[capabilities.orders] may have at most 256 shards".into());
            }
        }
        for cap in Capability::ALL {
            if !self.0.contains_key(&cap) {
                return Err(format!("[capabilities.{cap}] is missing: every capability needs at least one node"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ids are the variants' order, as the records written before them hold (the enum lived in
    /// the cluster crate and bincode wrote its variant index).
    #[test]
    fn ids_are_the_enum_order_and_carry_the_names() {
        for (i, cap) in Capability::ALL.into_iter().enumerate() {
            assert_eq!(cap.id(), CapabilityId(i as u8));
            assert_eq!(Capability::of(cap.id()), Some(cap));
            assert_eq!(cap.id().to_string(), cap.as_str());
        }
        assert_eq!(Capability::of(CapabilityId(5)), None);
    }

    #[test]
    fn the_shard_map_keeps_every_placement_and_its_fingerprint() {
        let on = |n: &[&str]| CapabilityPlacement::on(n);
        let map = CapabilityMap(Capability::ALL.into_iter().map(|c| (c, on(&["n1", "n2"]))).collect());
        let cluster = map.shard_map();
        assert_eq!(cluster.0.len(), 5);
        assert_eq!(cluster.hosted_by("n1"), Capability::ALL.map(Capability::id).to_vec());
        assert_eq!(map.hosted_by("n2"), Capability::ALL.to_vec());
        // The digest heartbeats carry, as the map by names gave it before ids (a rolling upgrade
        // must not see a different map): FNV-1a of the canonical text.
        let canon = "orders=n1,n2;inventory=n1,n2;payments=n1,n2;shipping=n1,n2;notifications=n1,n2;";
        assert_eq!(cluster.fingerprint(), bulkhead_storage::fnv1a(canon.as_bytes()));
    }
}
