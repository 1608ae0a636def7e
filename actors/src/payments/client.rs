//! The payments client: a front's reads of an order's charges, sent to the leader of the order's
//! payments shard. (Charges and refunds are the orders saga's: `orders::actor`, `outbox`.)

use bulkhead_cluster::{CallError, Cluster};
use uuid::Uuid;

use super::protocol::{PaymentReply, PaymentRequest};
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

    /// The charges recorded for `order_id`, read linearizably.
    pub async fn charges(&self, order_id: Uuid, traceparent: &str) -> Result<PaymentReply, CallError> {
        let shard = self.cluster.shard_of(Capability::Payments, order_id.as_bytes());
        ask_leader(&self.cluster, Capability::Payments, shard, &PaymentRequest::List { order_id }, traceparent).await
    }
}
