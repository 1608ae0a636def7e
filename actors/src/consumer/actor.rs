//! Shipping and notifications as a [`Service`] ([`Making`]): what the shared
//! [`crate::worker::ShardWorker`] does with a request on the leader of its shard. A delivery is a [`ConsumerCommand`] proposed to the shard's Raft group and
//! acknowledged once a majority has it (so the outbox may forget it); a listing is a linearizable
//! read. A replica that does not lead answers `NotLeader`.

use bulkhead_cluster::raft::Replica;
use bulkhead_cluster::Cluster;
use uuid::Uuid;

use super::machine::{ConsumerCommand, ConsumerMachine, Making, DELIVERIES};
use super::protocol::{ConsumerReply, ConsumerRequest, OrderConfirmed};
use crate::capability::Capability;
use crate::util::Unserved;
use crate::worker::{Route, ServeMsg, Service, WorkerArgs};
use ractor::ActorRef;

/// With `fault_injection`, a consumer fails on the events of customers named `poison-<kind>…`.
fn is_poison(kind: &str, ev: &OrderConfirmed) -> bool {
    ev.customer_id.strip_prefix("poison-").is_some_and(|rest| rest.starts_with(kind))
}

impl Service for Making {
    type Req = ConsumerRequest;
    type Resp = ConsumerReply;
    type Own = std::convert::Infallible;
    type Local = ();

    fn start(&self, _: &ActorRef<ServeMsg<Self>>, _: &WorkerArgs<Self>) {}

    fn capability(&self) -> Capability {
        Making::capability(self)
    }

    fn route(&self, cluster: &Cluster, fault_injection: bool, req: &ConsumerRequest) -> Route<ConsumerReply> {
        let order_id = match req {
            ConsumerRequest::Deliver(ev) if fault_injection && is_poison(self.kind, ev) => {
                // A consumer that fails on this event every time: what the outbox's dead letters are for.
                tracing::warn!(kind = self.kind, order_id = %ev.order_id, "fault injection: refusing a poison event");
                return Route::Answer(ConsumerReply::Refused(format!(
                    "fault injection: {} fails on events of customer `{}`",
                    self.kind, ev.customer_id
                )));
            }
            ConsumerRequest::Deliver(ev) => ev.order_id,
            ConsumerRequest::List { order_id } => *order_id,
            ConsumerRequest::InjectPanic => return Route::Drill,
        };
        Route::Shard(cluster.shard_of(self.capability(), order_id.as_bytes()))
    }

    async fn serve(&self, replica: Replica, req: ConsumerRequest, trace: String) -> ConsumerReply {
        match req {
            ConsumerRequest::Deliver(event) => {
                let (order_id, event_id) = (event.order_id, event.event_id);
                let cmd = ConsumerCommand::Deliver { event, now_ms: replica.now_ms(), delivery_id: Uuid::now_v7() };
                let answer = replica.propose::<ConsumerMachine>(&cmd).await.unwrap_or_else(|e| unserved(e.into()));
                if let ConsumerReply::Accepted { duplicate } = &answer {
                    tracing::info!(kind = self.kind, %order_id, %event_id, duplicate, trace_id = %trace, "event delivered");
                }
                answer
            }
            ConsumerRequest::List { order_id } => match replica.read_barrier().await {
                Err(e) => unserved(e.into()),
                Ok(()) => {
                    let prefix = format!("{}/", order_id.simple());
                    match DELIVERIES
                        .iter_prefix(replica.store(), prefix.as_bytes())
                        .map(|r| r.map(|(_, d)| d))
                        .collect()
                    {
                        Ok(list) => ConsumerReply::Listed(list),
                        Err(e) => ConsumerReply::Unavailable(e.to_string()),
                    }
                }
            },
            // Routed as a drill; never served.
            ConsumerRequest::InjectPanic => ConsumerReply::Refused("a drill is not served".into()),
        }
    }

    fn unserved(&self, why: Unserved) -> ConsumerReply {
        unserved(why)
    }

    fn drill_refused(&self) -> ConsumerReply {
        ConsumerReply::Refused("fault injection is disabled on this node".into())
    }
}

fn unserved(e: Unserved) -> ConsumerReply {
    match e {
        Unserved::NotLeader(leader) => ConsumerReply::NotLeader { leader },
        Unserved::Unavailable(why) => ConsumerReply::Unavailable(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(customer: &str) -> OrderConfirmed {
        OrderConfirmed {
            event_id: Uuid::nil(),
            order_id: Uuid::nil(),
            customer_id: customer.into(),
            lines: vec![],
            total_cents: 0,
            payment_id: String::new(),
        }
    }

    #[test]
    fn poison_customers_name_the_capability_that_fails() {
        assert!(is_poison("shipping", &ev("poison-shipping")));
        assert!(is_poison("shipping", &ev("poison-shipping-42")));
        assert!(!is_poison("notifications", &ev("poison-shipping")));
        assert!(is_poison("notifications", &ev("poison-notifications-1")));
        assert!(!is_poison("shipping", &ev("c-poison-shipping")));
        assert!(!is_poison("shipping", &ev("shipping")));
    }
}
