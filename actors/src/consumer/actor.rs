//! The consumer worker: dedupe by event id, record what the capability makes of the event,
//! answer after the flush (so an acknowledged delivery is never lost and the outbox may forget it).

use bulkhead_storage::{now_ms, Batch, Record, Table};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::protocol::{ConsumerReply, ConsumerRequest, Delivery, OrderConfirmed};
use crate::util::reply_after_sync;
use crate::WorkerArgs;
use bulkhead_cluster::Inbound;

/// Event ids already handled.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Seen {
    pub at_ms: u64,
}
impl Record for Seen {
    const VERSION: u8 = 1;
}

pub const SEEN: Table<Uuid, Seen> = Table::new(1, "seen_events");
/// Deliveries by `(order id, delivery id)`: one prefix scan lists an order's deliveries.
pub const DELIVERIES: Table<String, Delivery> = Table::new(2, "deliveries");

/// What a capability makes of a confirmed order.
#[derive(Clone, Copy)]
pub struct Making {
    /// `shipping` or `notifications`.
    pub kind: &'static str,
    /// One per order (shipping) rather than one per event (notifications).
    pub one_per_order: bool,
    pub detail: fn(&OrderConfirmed) -> String,
}

#[derive(Clone)]
pub struct ConsumerArgs {
    pub worker: WorkerArgs,
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

fn key(order: Uuid, suffix: &str) -> String {
    format!("{}/{suffix}", order.simple())
}

impl Actor for ConsumerWorker {
    type Msg = ConsumerMsg;
    type State = ConsumerArgs;
    type Arguments = ConsumerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ConsumerMsg>,
        args: ConsumerArgs,
    ) -> Result<ConsumerArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<ConsumerMsg>,
        msg: ConsumerMsg,
        state: &mut ConsumerArgs,
    ) -> Result<(), ActorProcessingErr> {
        let ConsumerMsg::Request(Inbound { req, reply, traceparent }) = msg;
        tracing::debug!(trace = bulkhead_cluster::wire::trace_id(&traceparent), request = ?req, "request");
        let store = &state.worker.store;
        let m = state.making;
        match req {
            ConsumerRequest::Deliver(ev) if state.worker.fault_injection && is_poison(m.kind, &ev) => {
                // A consumer that fails on this event every time: what the outbox's dead letters are for.
                tracing::warn!(kind = m.kind, order_id = %ev.order_id, "fault injection: refusing a poison event");
                let _ = reply.send(ConsumerReply::Refused(format!(
                    "fault injection: {} fails on events of customer `{}`",
                    m.kind, ev.customer_id
                )));
            }
            ConsumerRequest::Deliver(ev) => {
                let seen = SEEN.get(store, &ev.event_id)?.is_some();
                let k = if m.one_per_order {
                    key(ev.order_id, m.kind)
                } else {
                    key(ev.order_id, &ev.event_id.simple().to_string())
                };
                let duplicate = seen || DELIVERIES.get(store, &k)?.is_some();
                // The delivery before the seen-mark: a crash between them leaves a delivery whose
                // redelivery is recognised by its key, never a mark without its delivery.
                let mut b = Batch::new();
                if !duplicate {
                    let prefix = if m.kind == "shipping" { "shp" } else { "ntf" };
                    let d = Delivery {
                        id: format!("{prefix}_{}", Uuid::now_v7().simple()),
                        order_id: ev.order_id,
                        event_id: ev.event_id,
                        kind: m.kind.to_string(),
                        detail: (m.detail)(&ev),
                        created_ms: now_ms(),
                    };
                    DELIVERIES.put(&mut b, &k, &d);
                    tracing::debug!(kind = m.kind, order_id = %ev.order_id, id = %d.id, "recorded");
                }
                SEEN.put(&mut b, &ev.event_id, &Seen { at_ms: now_ms() });
                store.apply_in_order(b)?;
                reply_after_sync(store, reply, ConsumerReply::Accepted { duplicate });
            }
            ConsumerRequest::List { order_id } => {
                let prefix = format!("{}/", order_id.simple());
                let mut list = Vec::new();
                for item in DELIVERIES.iter_prefix(store, prefix.as_bytes()) {
                    list.push(item?.1);
                }
                reply_after_sync(store, reply, ConsumerReply::Listed(list));
            }
            ConsumerRequest::InjectPanic => {
                if state.worker.fault_injection {
                    panic!("fault injection: {} worker panics on request", m.kind);
                }
                let _ = reply.send(ConsumerReply::Refused("fault injection is disabled on this node".into()));
            }
        }
        Ok(())
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
