//! The demo topology, and node configs for a local cluster (used by `demo` and the tests).
//!
//! Every shard of every capability is a Raft group with a replica on each of the three nodes;
//! preferred leaders spread the work so that every order crosses nodes and one node's death shows
//! isolation: payments is led away from orders, orders has a shard led on n1 and one on n3, and
//! each inventory shard is led apart from one of the orders shards. When a preferred node is
//! healthy and caught up again, leadership moves back to it.
//!
//! | node | leads                                      | also holds replicas of |
//! |------|--------------------------------------------|------------------------|
//! | n1   | orders shard 0, inventory shard 0          | every other shard      |
//! | n2   | payments, inventory shard 1                | every other shard      |
//! | n3   | orders shard 1, shipping, notifications    | every other shard      |

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use bulkhead_actors::{Capability, CapabilityMap};
use bulkhead_cluster::config::CapabilityPlacement;
use bulkhead_cluster::Timing;

use crate::config::NodeConfig;
use crate::error::LaunchError;

use crate::secrets::LocalSecrets;

pub const NODES: [&str; 3] = ["n1", "n2", "n3"];

pub fn demo_shard_map() -> CapabilityMap {
    let p = CapabilityPlacement::on;
    // Replicated capabilities: a replica on every node, led where the topology puts them.
    let led_by = |n: &str| CapabilityPlacement { leaders: vec![n.into()], ..p(&["n1", "n2", "n3"]) };
    let payments = led_by("n2");
    CapabilityMap(BTreeMap::from([
        (
            Capability::Orders,
            CapabilityPlacement { shards: Some(2), leaders: vec!["n1".into(), "n3".into()], ..p(&["n1", "n2", "n3"]) },
        ),
        (
            Capability::Inventory,
            CapabilityPlacement { shards: Some(2), leaders: vec!["n1".into(), "n2".into()], ..p(&["n1", "n2", "n3"]) },
        ),
        (Capability::Payments, payments),
        (Capability::Shipping, led_by("n3")),
        (Capability::Notifications, led_by("n3")),
    ]))
}

/// Each demo node's name and the names of the capabilities it hosts.
pub fn demo_hosts() -> BTreeMap<String, Vec<String>> {
    let map = demo_shard_map();
    NODES
        .iter()
        .map(|n| {
            let caps = map.0.iter().filter(|(_, p)| p.nodes.iter().any(|x| x == n)).map(|(c, _)| c.to_string());
            (n.to_string(), caps.collect())
        })
        .collect()
}

/// Ports of one local node.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub cluster: u16,
    pub http: u16,
}

/// Every capability on one node `n1`: the benchmark's one-node cluster.
pub fn single_node_shard_map() -> CapabilityMap {
    let p = CapabilityPlacement::on(&["n1"]);
    CapabilityMap(Capability::ALL.into_iter().map(|c| (c, p.clone())).collect())
}

/// Configs for the three demo nodes on 127.0.0.1, all seeded with each other.
pub fn local_configs(
    data_dir: &Path,
    secrets: &LocalSecrets,
    ports: &[Ports; 3],
    timing: Timing,
    fault_injection: bool,
) -> Vec<NodeConfig> {
    cluster_configs(&NODES, demo_shard_map(), data_dir, secrets, ports, timing, fault_injection)
}

/// Configs for nodes `names` on 127.0.0.1 (node i on `ports[i]`), all seeded with each other.
pub fn cluster_configs(
    names: &[&str],
    map: CapabilityMap,
    data_dir: &Path,
    secrets: &LocalSecrets,
    ports: &[Ports],
    timing: Timing,
    fault_injection: bool,
) -> Vec<NodeConfig> {
    let addr = |p: u16| -> SocketAddr { SocketAddr::from(([127, 0, 0, 1], p)) };
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut cfg = NodeConfig {
                name: name.to_string(),
                cluster_listen: addr(ports[i].cluster),
                cluster_advertise: None,
                seeds: (0..names.len()).filter(|j| *j != i).map(|j| addr(ports[j].cluster).to_string()).collect(),
                cookie: None,
                cookie_file: None,
                data_dir: data_dir.join(name),
                http_listen: addr(ports[i].http),
                http_advertise: None,
                durability: Default::default(),
                fault_injection,
                timing: timing.clone(),
                limits: Default::default(),
                orders: Default::default(),
                http: Default::default(),
                auth: Default::default(),
                client_token_file: None,
                admin_token_file: None,
                clients_file: None,
                rate_limit: Default::default(),
                log: Default::default(),
                telemetry: Default::default(),
                tls: Default::default(),
                tls_ca_file: None,
                tls_cert_file: None,
                tls_key_file: None,
                tokens: None,
                capabilities: map.clone(),
            };
            secrets.apply(&mut cfg);
            cfg
        })
        .collect()
}

/// Writes `cfg` as TOML to `path`.
pub fn write_config(cfg: &NodeConfig, path: &Path) -> Result<(), LaunchError> {
    let text = toml::to_string_pretty(cfg).map_err(LaunchError::EncodeConfig)?;
    std::fs::write(path, text).map_err(LaunchError::io("write", path))
}
