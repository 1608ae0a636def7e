//! Payments as a [`Service`]: what the shared [`crate::worker::ShardWorker`] does with a request
//! on the leader of its shard.
//!
//! A charge or refund becomes a [`PaymentCommand`] proposed to the shard's Raft group (the time
//! and the new payment id are put in here, on the leader), and is answered with what applying it
//! answered, once a majority has it on disk. A listing is a linearizable read: the leader confirms
//! it still leads before reading its replica. A replica that does not lead answers
//! [`PaymentReply::NotLeader`], naming the leader it knows; the caller follows it once.
//!
//! The shell around it (routing to the shard's replica, a task per request) is the shared
//! [`crate::worker::ShardWorker`]; this file is what payments does.

use std::time::Duration;

use bulkhead_cluster::raft::Replica;
use bulkhead_cluster::Cluster;
use uuid::Uuid;

use super::ledger::{self, ChargeStatus};
use super::machine::{PaymentCommand, PaymentsMachine, PAYMENTS};
use super::protocol::{PaymentReply, PaymentRequest};
use crate::capability::Capability;
use crate::util::Unserved;
use crate::worker::{Route, ServeMsg, Service, WorkerArgs};
use ractor::ActorRef;

/// Payments as the [`crate::worker::ShardWorker`] serves it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Payments;

impl Service for Payments {
    type Req = PaymentRequest;
    type Resp = PaymentReply;
    type Own = std::convert::Infallible;
    type Local = ();

    fn start(&self, _: &ActorRef<ServeMsg<Self>>, _: &WorkerArgs<Self>) {}

    fn capability(&self) -> Capability {
        Capability::Payments
    }

    fn route(&self, cluster: &Cluster, _: bool, req: &PaymentRequest) -> Route<PaymentReply> {
        match req {
            PaymentRequest::Charge { order_id, .. }
            | PaymentRequest::Refund { order_id }
            | PaymentRequest::List { order_id } => {
                Route::Shard(cluster.shard_of(Capability::Payments, order_id.as_bytes()))
            }
            PaymentRequest::InjectPanic => Route::Drill,
        }
    }

    async fn serve(&self, replica: Replica, req: PaymentRequest, trace: String) -> PaymentReply {
        match req {
            PaymentRequest::Charge { order_id, amount_cents, token } => {
                let answer = charge(&replica, order_id, amount_cents, token).await;
                match &answer {
                    PaymentReply::Charged { payment_id } => {
                        tracing::info!(%order_id, amount_cents, %payment_id, trace_id = %trace, "payment charged")
                    }
                    PaymentReply::Declined { reason } => {
                        tracing::info!(%order_id, amount_cents, %reason, "payment declined")
                    }
                    other => tracing::debug!(%order_id, answer = ?other, "charge not answered"),
                }
                answer
            }
            PaymentRequest::Refund { order_id } => {
                let cmd = PaymentCommand::Refund { order_id, now_ms: replica.now_ms() };
                replica.propose::<PaymentsMachine>(&cmd).await.unwrap_or_else(refused)
            }
            PaymentRequest::List { order_id } => match replica.read_barrier().await {
                Err(e) => refused(e),
                Ok(()) => match replica_store_read(&replica, order_id) {
                    Ok(list) => PaymentReply::Payments(list),
                    Err(e) => PaymentReply::TransientError { reason: e },
                },
            },
            // Routed as a drill; never served.
            PaymentRequest::InjectPanic => PaymentReply::Refused("a drill is not served".into()),
        }
    }

    fn unserved(&self, why: Unserved) -> PaymentReply {
        refused(why)
    }

    fn drill_refused(&self) -> PaymentReply {
        PaymentReply::Refused("fault injection is disabled on this node".into())
    }
}

fn refused(e: impl Into<Unserved>) -> PaymentReply {
    match e.into() {
        Unserved::NotLeader(leader) => PaymentReply::NotLeader { leader },
        // A write that timed out may still commit: the caller retries with the same order id.
        Unserved::Unavailable(reason) => PaymentReply::TransientError { reason },
    }
}

/// Charges; a slow provider (`tok_slow`) keeps the caller until it is done, then the charge is
/// proposed again with the time it finished (the caller may have given up by then: its retry
/// gets the recorded answer).
async fn charge(replica: &Replica, order_id: Uuid, amount_cents: u64, token: String) -> PaymentReply {
    loop {
        let cmd = PaymentCommand::Charge {
            order_id,
            amount_cents,
            token: token.clone(),
            now_ms: replica.now_ms(),
            new_id: Uuid::new_v4(),
        };
        match replica.propose::<PaymentsMachine>(&cmd).await {
            Ok(PaymentReply::InProgress) => {
                let ready = match replica_store_record(replica, order_id) {
                    Some(ChargeStatus::Processing { ready_ms }) => ready_ms,
                    _ => replica.now_ms() + ledger::SLOW_MS,
                };
                // `ready_ms` is in the group's time (whoever led when it was set), so is the wait.
                tokio::time::sleep(Duration::from_millis(ready.saturating_sub(replica.now_ms()).max(1))).await;
            }
            Ok(answer) => return answer,
            Err(e) => return refused(e),
        }
    }
}

fn replica_store_record(replica: &Replica, order_id: Uuid) -> Option<ChargeStatus> {
    PAYMENTS.get(replica.store(), &order_id).ok().flatten().map(|r| r.status)
}

fn replica_store_read(replica: &Replica, order_id: Uuid) -> Result<Vec<super::protocol::PaymentView>, String> {
    // A voided order never had a charge: nothing to list.
    Ok(PAYMENTS
        .get(replica.store(), &order_id)
        .map_err(|e| e.to_string())?
        .filter(|r| r.status != ChargeStatus::Voided)
        .map(|r| vec![r.view()])
        .unwrap_or_default())
}
