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
            ConsumerRequest::DeliverMany(events) => {
                let shard_of = |ev: &OrderConfirmed| cluster.shard_of(self.capability(), ev.order_id.as_bytes());
                return match batch_shard(self.kind, fault_injection, events, shard_of) {
                    Ok(Some(shard)) => Route::Shard(shard),
                    Ok(None) => Route::Answer(ConsumerReply::Each(Vec::new())),
                    Err(refused) => Route::Answer(refused),
                };
            }
        };
        Route::Shard(cluster.shard_of(self.capability(), order_id.as_bytes()))
    }

    async fn serve(&self, replica: Replica, req: ConsumerRequest, trace: String) -> ConsumerReply {
        match req {
            ConsumerRequest::Deliver(event) => self.deliver(&replica, event, &trace).await,
            // All proposed at once: the group's proposer puts them in as few entries as it can.
            ConsumerRequest::DeliverMany(events) => ConsumerReply::Each(
                futures::future::join_all(events.into_iter().map(|ev| self.deliver(&replica, ev, &trace))).await,
            ),
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

/// The shard a batch of events goes to (`None` for an empty batch), or the answer that refuses it
/// whole: one that spans shards, or (with `fault_injection`) one that holds an event this consumer
/// fails on, so that the relay delivers its events one by one and only that one fails.
fn batch_shard(
    kind: &str,
    fault_injection: bool,
    events: &[OrderConfirmed],
    shard_of: impl Fn(&OrderConfirmed) -> u32,
) -> Result<Option<u32>, ConsumerReply> {
    let Some(shard) = events.first().map(&shard_of) else { return Ok(None) };
    if events.iter().any(|ev| shard_of(ev) != shard) {
        return Err(ConsumerReply::Refused("a batch of events must stay within one shard".into()));
    }
    if fault_injection && events.iter().any(|ev| is_poison(kind, ev)) {
        tracing::warn!(kind, "fault injection: refusing a batch with a poison event; the relay delivers it one by one");
        return Err(ConsumerReply::Refused(format!(
            "fault injection: a batch with an event {kind} fails on; deliver one by one"
        )));
    }
    Ok(Some(shard))
}

impl Making {
    /// Records one event (a command of its own, deduped by its event id) once a majority has it.
    async fn deliver(&self, replica: &Replica, event: OrderConfirmed, trace: &str) -> ConsumerReply {
        let (order_id, event_id) = (event.order_id, event.event_id);
        let cmd = ConsumerCommand::Deliver { event, now_ms: replica.now_ms(), delivery_id: Uuid::now_v7() };
        let answer = replica.propose::<ConsumerMachine>(&cmd).await.unwrap_or_else(|e| unserved(e.into()));
        if let ConsumerReply::Accepted { duplicate } = &answer {
            tracing::info!(kind = self.kind, %order_id, %event_id, duplicate, trace_id = %trace, "event delivered");
        }
        answer
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
    fn a_batch_goes_to_its_one_shard_and_is_refused_whole_if_it_spans_shards_or_holds_poison() {
        let by_customer = |ev: &OrderConfirmed| ev.customer_id.len() as u32;
        let (a, b, poison) = (ev("c-1"), ev("c-2"), ev("poison-shipping"));
        assert_eq!(batch_shard("shipping", true, &[], by_customer), Ok(None));
        assert_eq!(batch_shard("shipping", true, &[a.clone(), b.clone()], by_customer), Ok(Some(3)));
        assert!(matches!(
            batch_shard("shipping", false, &[a.clone(), ev("c-10")], by_customer),
            Err(ConsumerReply::Refused(_))
        ));
        let with_poison = [a.clone(), ev("poison-shipping-"), b.clone()];
        let one_shard = |_: &OrderConfirmed| 1;
        assert!(matches!(batch_shard("shipping", true, &with_poison, one_shard), Err(ConsumerReply::Refused(_))));
        // Poison for shipping only, and only where the node takes drills.
        assert_eq!(batch_shard("notifications", true, &with_poison, one_shard), Ok(Some(1)));
        assert_eq!(batch_shard("shipping", false, &[poison, a], one_shard), Ok(Some(1)));
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
