//! The consumer worker: serves each shard of shipping (or notifications) where this node's
//! replica leads it. A delivery is a [`ConsumerCommand`] proposed to the shard's Raft group and
//! acknowledged once a majority has it (so the outbox may forget it); a listing is a linearizable
//! read. A replica that does not lead answers `NotLeader`.

use std::collections::BTreeMap;
use std::sync::Arc;

use bulkhead_cluster::raft::Replica;
use bulkhead_cluster::{Capability, Cluster, Inbound};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;
use tracing::Instrument;
use uuid::Uuid;

use super::machine::{ConsumerCommand, ConsumerMachine, DELIVERIES};
use super::protocol::{ConsumerReply, ConsumerRequest, OrderConfirmed};
use crate::util::{local_replica, Unserved};

/// What a capability makes of a confirmed order.
#[derive(Clone, Copy)]
pub struct Making {
    /// `shipping` or `notifications`.
    pub kind: &'static str,
    /// One per order (shipping) rather than one per event (notifications).
    pub one_per_order: bool,
    pub detail: fn(&OrderConfirmed) -> String,
}

impl Making {
    pub fn capability(&self) -> Capability {
        if self.kind == "shipping" {
            Capability::Shipping
        } else {
            Capability::Notifications
        }
    }
}

#[derive(Clone)]
pub struct ConsumerArgs {
    pub cluster: Cluster,
    pub replicas: Arc<BTreeMap<u32, Replica>>,
    pub fault_injection: bool,
    pub making: Making,
}

#[derive(RactorMessage)]
pub enum ConsumerMsg {
    Request(Inbound<ConsumerRequest, ConsumerReply>),
}

pub struct ConsumerWorker;

/// With `fault_injection`, a consumer fails on the events of customers named `poison-<kind>…`.
fn is_poison(kind: &str, ev: &OrderConfirmed) -> bool {
    ev.customer_id.strip_prefix("poison-").is_some_and(|rest| rest.starts_with(kind))
}

impl Actor for ConsumerWorker {
    type Msg = ConsumerMsg;
    type State = ConsumerArgs;
    type Arguments = ConsumerArgs;

    async fn pre_start(
        &self,
        _: ActorRef<ConsumerMsg>,
        args: ConsumerArgs,
    ) -> Result<ConsumerArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<ConsumerMsg>,
        msg: ConsumerMsg,
        st: &mut ConsumerArgs,
    ) -> Result<(), ActorProcessingErr> {
        let ConsumerMsg::Request(Inbound { req, reply, traceparent }) = msg;
        let (span, _) = bulkhead_cluster::traced_span!("consumer.serve", &traceparent, kind = st.making.kind);
        let trace = bulkhead_cluster::trace::trace_id(&traceparent).to_string();
        span.in_scope(|| tracing::debug!(request = ?req, "request"));
        let m = st.making;
        let order_id = match &req {
            ConsumerRequest::Deliver(ev) if st.fault_injection && is_poison(m.kind, ev) => {
                // A consumer that fails on this event every time: what the outbox's dead letters are for.
                tracing::warn!(kind = m.kind, order_id = %ev.order_id, "fault injection: refusing a poison event");
                let _ = reply.send(ConsumerReply::Refused(format!(
                    "fault injection: {} fails on events of customer `{}`",
                    m.kind, ev.customer_id
                )));
                return Ok(());
            }
            ConsumerRequest::Deliver(ev) => ev.order_id,
            ConsumerRequest::List { order_id } => *order_id,
            ConsumerRequest::InjectPanic => {
                if st.fault_injection {
                    panic!("fault injection: {} worker panics on request", m.kind);
                }
                let _ = reply.send(ConsumerReply::Refused("fault injection is disabled on this node".into()));
                return Ok(());
            }
        };
        match local_replica(
            &st.cluster,
            &st.replicas,
            m.capability(),
            st.cluster.shard_of(m.capability(), order_id.as_bytes()),
        ) {
            Ok(replica) => {
                tokio::spawn(serve(replica, m, req, reply, trace).instrument(span));
            }
            Err(e) => {
                let _ = reply.send(unserved(e));
            }
        }
        Ok(())
    }
}

fn unserved(e: Unserved) -> ConsumerReply {
    match e {
        Unserved::NotLeader(leader) => ConsumerReply::NotLeader { leader },
        Unserved::Unavailable(why) => ConsumerReply::Unavailable(why),
    }
}

/// Serves one request; `trace` (the caller's trace id) names the info lines.
async fn serve(
    replica: Replica,
    making: Making,
    req: ConsumerRequest,
    reply: RpcReplyPort<ConsumerReply>,
    trace: String,
) {
    let answer = match req {
        ConsumerRequest::Deliver(event) => {
            let (order_id, event_id) = (event.order_id, event.event_id);
            let cmd = ConsumerCommand::Deliver { event, now_ms: replica.now_ms(), delivery_id: Uuid::now_v7() };
            let answer = replica.propose::<ConsumerMachine>(&cmd).await.unwrap_or_else(|e| unserved(e.into()));
            if let ConsumerReply::Accepted { duplicate } = &answer {
                tracing::info!(kind = making.kind, %order_id, %event_id, duplicate, trace_id = %trace, "event delivered");
            }
            answer
        }
        ConsumerRequest::List { order_id } => match replica.read_barrier().await {
            Err(e) => unserved(e.into()),
            Ok(()) => {
                let prefix = format!("{}/", order_id.simple());
                match DELIVERIES.iter_prefix(replica.store(), prefix.as_bytes()).map(|r| r.map(|(_, d)| d)).collect() {
                    Ok(list) => ConsumerReply::Listed(list),
                    Err(e) => ConsumerReply::Unavailable(e.to_string()),
                }
            }
        },
        ConsumerRequest::InjectPanic => return,
    };
    tracing::debug!(kind = making.kind, ?answer, "answered");
    let _ = reply.send(answer);
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
