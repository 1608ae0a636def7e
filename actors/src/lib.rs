//! The five business capabilities, each a supervised actor group over its own sled store.
//!
//! [`capability`] names them, gives each its id in the cluster layer, and holds the
//! `[capabilities]` tables of the config (where each lives).
//!
//! Every capability folder has the same shape: `protocol` (what crosses nodes, versioned), a pure
//! state machine (`orders::saga`, `inventory::stock`, `payments::ledger`), the replicated machine,
//! the worker around it (`actor`: a [`worker::Service`] that the one generic [`worker::ShardWorker`]
//! serves; orders adds its own loop, the saga driver, inside the same worker), and the `client` a
//! front calls it through. Each hosted capability runs under one [`supervisor::Supervisor`] with
//! two or three children: the local-only worker, the remotable [`bulkhead_cluster::Gateway`]
//! (decodes envelopes, finds the worker by name) and, for orders, the outbox relay.
//!
//! ```text
//! supervisor(orders)       ── gateway(orders)   ── worker(orders) ── relay(outbox)
//! supervisor(inventory)    ── gateway(inventory) ── worker(inventory)
//! ...
//! ```
//!
//! Shipping and notifications share the consumer worker ([`consumer`]); what differs is what they
//! make of an `OrderConfirmed` ([`shipping::MAKING`], [`notifications::MAKING`]).

pub mod capability;
pub mod consumer;
pub mod inventory;
pub mod notifications;
pub mod orders;
pub mod payments;
#[cfg(test)]
mod record_fixtures;
pub mod shipping;
pub mod supervisor;
pub mod util;
pub mod worker;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bulkhead_cluster::gateway::worker_name;
use bulkhead_cluster::raft::{self, GroupId, Replica};
use bulkhead_cluster::{Cluster, Gateway, GatewayArgs, Inbound};
use bulkhead_storage::{NodeLog, Store, StoreOptions};
use ractor::{Actor, ActorRef, Message};

pub use capability::{Capability, CapabilityMap};
use supervisor::{ChildSpec, Intensity, Supervisor, SupervisorArgs, SupervisorMsg};

/// The capabilities running on this node.
pub struct Capabilities {
    pub supervisors: BTreeMap<Capability, ActorRef<SupervisorMsg>>,
    /// This node's Raft replicas of the replicated capabilities' shards.
    pub replicas: Vec<Replica>,
    /// The node log every replica here appends to (`None` if it would not open).
    pub node_log: Option<NodeLog>,
    cluster: Cluster,
    /// Capabilities this node should host but cannot (their store would not open), with why.
    pub failed: BTreeMap<Capability, String>,
    shutting_down: Arc<AtomicBool>,
}

impl Capabilities {
    /// Stops every capability (children first, so nothing restarts).
    /// Starts `cap`'s supervisor over `children`; a failure is logged and marked unhealthy.
    async fn supervise(&mut self, cap: Capability, children: Vec<ChildSpec>) -> bool {
        let args = SupervisorArgs {
            capability: cap,
            cluster: self.cluster.clone(),
            children,
            intensity: Intensity::default(),
            shutting_down: self.shutting_down.clone(),
        };
        match Actor::spawn(Some(format!("bulkhead.{cap}.supervisor")), Supervisor, args).await {
            Ok((sup, _)) => {
                self.supervisors.insert(cap, sup);
                true
            }
            Err(e) => {
                tracing::error!(capability = %cap, error = %e, "capability failed to start");
                self.cluster.set_health(cap, false, &format!("failed to start: {e}"));
                self.failed.insert(cap, e.to_string());
                false
            }
        }
    }

    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        for sup in self.supervisors.values() {
            sup.stop_children_and_wait(None, Some(Duration::from_secs(5))).await;
            sup.stop(None);
        }
        for r in &self.replicas {
            bulkhead_cluster::raft::group::stop(&self.cluster, r).await;
        }
    }
}

fn gateway_spec<Req, Resp, M>(cap: Capability, cluster: &Cluster, wrap: fn(Inbound<Req, Resp>) -> M) -> ChildSpec
where
    Req: bulkhead_storage::Record + bulkhead_cluster::SentBy + Send + 'static,
    Resp: bulkhead_storage::Record + Send + 'static,
    M: Message,
{
    let node = cluster.name().to_string();
    let peers = cluster.sender_roles();
    // Workers answer promptly or not at all; a slow charge is the longest legitimate wait.
    let worker_timeout = Duration::from_millis(cluster.config().timing.call_timeout_ms.max(1_000) * 3);
    let max_in_flight = cluster.config().limits.gateway_in_flight;
    ChildSpec::new(format!("bulkhead.{cap}.gateway"), Gateway::<Req, Resp, M>::default, move || GatewayArgs {
        capability: cap.id(),
        node: node.clone(),
        wrap,
        worker_timeout,
        max_in_flight,
        peers: peers.clone(),
    })
}

/// The children of a capability served by the shared [`worker::ShardWorker`]: the worker and its
/// gateway.
fn served<S>(
    cluster: &Cluster,
    replicas: Arc<BTreeMap<u32, Replica>>,
    fault_injection: bool,
    service: S,
) -> Vec<ChildSpec>
where
    S: worker::Service,
    S::Req: bulkhead_storage::Record + bulkhead_cluster::SentBy,
    S::Resp: bulkhead_storage::Record,
{
    let cap = service.capability();
    let args = worker::WorkerArgs { cluster: cluster.clone(), replicas, fault_injection, service };
    vec![
        ChildSpec::new(worker_name(cap), worker::ShardWorker::<S>::default, move || args.clone()),
        gateway_spec(cap, cluster, worker::ServeMsg::<S>::Request),
    ]
}

/// What shipping or notifications makes of a confirmed order.
fn making(cap: Capability) -> consumer::Making {
    if cap == Capability::Shipping {
        shipping::MAKING
    } else {
        notifications::MAKING
    }
}

/// A drill: asks this node's `cap` worker to panic (its supervisor restarts it). The worker dies
/// instead of answering, so the call's failure is the expected outcome; it is returned for the log.
pub async fn inject_panic(
    cluster: &Cluster,
    cap: Capability,
    traceparent: &str,
) -> Result<(), bulkhead_cluster::CallError> {
    use crate::{consumer::*, inventory::*, orders::*, payments::*};
    let (node, t) = (cluster.name().to_string(), std::time::Duration::from_millis(500));
    match cap {
        Capability::Orders => cluster
            .call_with_timeout::<_, OrdersReply>(cap, &node, &OrdersRequest::InjectPanic, traceparent, t)
            .await
            .map(|_| ()),
        Capability::Inventory => cluster
            .call_with_timeout::<_, InventoryReply>(cap, &node, &InventoryRequest::InjectPanic, traceparent, t)
            .await
            .map(|_| ()),
        Capability::Payments => cluster
            .call_with_timeout::<_, PaymentReply>(cap, &node, &PaymentRequest::InjectPanic, traceparent, t)
            .await
            .map(|_| ()),
        Capability::Shipping | Capability::Notifications => cluster
            .call_with_timeout::<_, ConsumerReply>(cap, &node, &ConsumerRequest::InjectPanic, traceparent, t)
            .await
            .map(|_| ()),
    }
}

/// sled page cache per capability: what each one reads back (orders re-reads its own orders;
/// inventory keeps its model in memory; the consumers mostly append). sled's default is 1 GB each.
pub fn cache_bytes(cap: Capability) -> u64 {
    const MB: u64 = 1024 * 1024;
    match cap {
        Capability::Orders => 32 * MB,
        Capability::Inventory | Capability::Payments => 16 * MB,
        Capability::Shipping | Capability::Notifications => 8 * MB,
    }
}

/// Opens one store per local shard of a replicated capability (`<data_dir>/<capability>-<shard>/`),
/// starts its Raft replica, and returns the replicas and the capability's supervised children.
async fn start_replicated(
    cluster: &Cluster,
    cap: Capability,
    log: &NodeLog,
    data_dir: &Path,
    opts: &StoreOptions,
    fault_injection: bool,
    orders: &orders::OrdersConfig,
) -> Result<(Vec<Replica>, Vec<ChildSpec>), String> {
    let mut replicas = BTreeMap::new();
    let port = cluster.raft_port();
    for placement in cluster.config().shard_map.shards(cap) {
        if !placement.replicas.iter().any(|n| n == cluster.name()) {
            continue;
        }
        let shard = placement.shard;
        let store = Store::open(data_dir, &format!("{cap}-{shard}"), opts).map_err(|e| e.to_string())?;
        let group = GroupId::new(cap, shard);
        let replica = match cap {
            Capability::Payments => {
                raft::group::start(&port, group, placement, log.clone(), store, payments::PaymentsMachine).await?
            }
            Capability::Shipping | Capability::Notifications => {
                let machine = consumer::ConsumerMachine { making: making(cap) };
                raft::group::start(&port, group, placement, log.clone(), store, machine).await?
            }
            Capability::Inventory => {
                raft::group::start(&port, group, placement, log.clone(), store, inventory::InventoryMachine).await?
            }
            Capability::Orders => {
                raft::group::start(&port, group, placement, log.clone(), store, orders::OrdersMachine).await?
            }
        };
        replicas.insert(shard, replica);
    }
    let all: Vec<Replica> = replicas.values().cloned().collect();
    let replicas = Arc::new(replicas);
    let children = match cap {
        Capability::Payments => served(cluster, replicas, fault_injection, payments::Payments),
        Capability::Inventory => served(cluster, replicas, fault_injection, inventory::Inventory),
        Capability::Shipping | Capability::Notifications => served(cluster, replicas, fault_injection, making(cap)),
        Capability::Orders => {
            let relay = orders::RelayArgs { cluster: cluster.clone(), replicas: replicas.clone() };
            let mut children = served(cluster, replicas, fault_injection, orders::Orders { settings: *orders });
            children.push(ChildSpec::new(
                orders::RELAY_NAME.to_string(),
                || orders::OutboxRelay,
                move || orders::RelayArgs { cluster: relay.cluster.clone(), replicas: relay.replicas.clone() },
            ));
            children
        }
    };
    Ok((all, children))
}

/// Opens the store of, and starts, every capability this node hosts. A store that will not open
/// is reported (which store, which path, why) and its capability is not hosted; its files are kept.
pub async fn start_capabilities(
    cluster: &Cluster,
    data_dir: &Path,
    opts: &StoreOptions,
    fault_injection: bool,
    orders: &orders::OrdersConfig,
) -> Capabilities {
    let mut caps = Capabilities {
        supervisors: BTreeMap::new(),
        replicas: Vec::new(),
        node_log: None,
        cluster: cluster.clone(),
        failed: BTreeMap::new(),
        shutting_down: Arc::new(AtomicBool::new(false)),
    };
    // One Raft log for every group on this node, with one group commit (cluster's raft::log_store).
    let log = match NodeLog::open(&data_dir.join(raft::NODE_LOG_DIR), opts.durability) {
        Ok(log) => log,
        Err(e) => {
            // Without its log no replicated capability can run here: say so for each of them.
            tracing::error!(error = %e, "the node's raft log will not open: hosting no capability");
            for cap in hosted(cluster) {
                cluster.set_health(cap, false, &e.to_string());
                caps.failed.insert(cap, e.to_string());
            }
            return caps;
        }
    };
    caps.node_log = Some(log.clone());
    for cap in hosted(cluster) {
        let opts = StoreOptions { cache_bytes: cache_bytes(cap), ..opts.clone() };
        let children = match start_replicated(cluster, cap, &log, data_dir, &opts, fault_injection, orders).await {
            Ok((replicas, children)) => {
                caps.replicas.extend(replicas);
                children
            }
            Err(e) => {
                tracing::error!(capability = %cap, error = %e, "not hosting this capability");
                cluster.set_health(cap, false, &e);
                caps.failed.insert(cap, e);
                continue;
            }
        };
        caps.supervise(cap, children).await;
    }
    caps
}

/// The capabilities this node hosts, by the shard map (an id this build does not know is none of them).
pub fn hosted(cluster: &Cluster) -> Vec<Capability> {
    cluster.config().hosted().into_iter().filter_map(Capability::of).collect()
}
