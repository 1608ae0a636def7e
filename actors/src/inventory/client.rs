//! The inventory client: a front's reads and stock settings, each sent to the leader of the SKU's
//! shard. (Holds are the orders saga's, sent from the orders leader: `orders::actor`, `outbox`.)

use bulkhead_cluster::{CallError, Cluster};

use super::protocol::{InventoryReply, InventoryRequest};
use crate::capability::Capability;
use crate::util::ask_leader;

#[derive(Clone)]
pub struct Client {
    cluster: Cluster,
}

impl Client {
    pub fn new(cluster: &Cluster) -> Self {
        Self { cluster: cluster.clone() }
    }

    /// A SKU's stock, read linearizably on its shard's leader.
    pub async fn stock(&self, sku: &str, traceparent: &str) -> Result<InventoryReply, CallError> {
        self.ask(sku, InventoryRequest::Get { sku: sku.to_string() }, traceparent).await
    }

    /// Sets a SKU's available stock and price (creating it).
    pub async fn set_stock(
        &self,
        sku: &str,
        available: u64,
        price_cents: u64,
        traceparent: &str,
    ) -> Result<InventoryReply, CallError> {
        self.ask(sku, InventoryRequest::Set { sku: sku.to_string(), available, price_cents }, traceparent).await
    }

    async fn ask(&self, sku: &str, req: InventoryRequest, traceparent: &str) -> Result<InventoryReply, CallError> {
        let shard = self.cluster.shard_of(Capability::Inventory, sku.as_bytes());
        ask_leader(&self.cluster, Capability::Inventory, shard, &req, traceparent).await
    }
}
