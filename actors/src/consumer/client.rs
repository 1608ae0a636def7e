//! The consumers' client (shipping, notifications): a front's reads of what was delivered for an
//! order, sent to the leader of the order's shard. (Deliveries are the orders outbox's.)

use bulkhead_cluster::{CallError, Cluster};
use uuid::Uuid;

use super::protocol::{ConsumerReply, ConsumerRequest};
use crate::capability::Capability;
use crate::util::ask_leader;

#[derive(Clone)]
pub struct Client {
    cluster: Cluster,
    /// Shipping or notifications.
    cap: Capability,
}

impl Client {
    pub fn new(cluster: &Cluster, cap: Capability) -> Self {
        Self { cluster: cluster.clone(), cap }
    }

    /// What this consumer made of `order_id`'s confirmation, read linearizably.
    pub async fn deliveries(&self, order_id: Uuid, traceparent: &str) -> Result<ConsumerReply, CallError> {
        let shard = self.cluster.shard_of(self.cap, order_id.as_bytes());
        ask_leader(&self.cluster, self.cap, shard, &ConsumerRequest::List { order_id }, traceparent).await
    }
}
