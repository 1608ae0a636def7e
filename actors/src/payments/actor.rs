//! The payments worker: serves each payments shard where this node's replica leads it.
//!
//! A charge or refund becomes a [`PaymentCommand`] proposed to the shard's Raft group (the time
//! and the new payment id are put in here, on the leader), and is answered with what applying it
//! answered, once a majority has it on disk. A listing is a linearizable read: the leader confirms
//! it still leads before reading its replica. A replica that does not lead answers
//! [`PaymentReply::NotLeader`], naming the leader it knows; the caller follows it once.
//!
//! Every request runs on its own task: the worker never waits for a majority.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_cluster::raft::Replica;
use bulkhead_cluster::{Capability, Cluster, Inbound};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;
use tracing::Instrument;
use uuid::Uuid;

use super::ledger::{self, ChargeStatus};
use super::machine::{PaymentCommand, PaymentsMachine, PAYMENTS};
use super::protocol::{PaymentReply, PaymentRequest};
use crate::util::{local_replica, Unserved};

#[derive(RactorMessage)]
pub enum PaymentsMsg {
    Request(Inbound<PaymentRequest, PaymentReply>),
}

/// What the payments worker is started with: this node's replicas, by shard.
#[derive(Clone)]
pub struct PaymentsArgs {
    pub cluster: Cluster,
    pub replicas: Arc<BTreeMap<u32, Replica>>,
    pub fault_injection: bool,
}

pub struct PaymentsWorker;

impl Actor for PaymentsWorker {
    type Msg = PaymentsMsg;
    type State = PaymentsArgs;
    type Arguments = PaymentsArgs;

    async fn pre_start(
        &self,
        _: ActorRef<PaymentsMsg>,
        args: PaymentsArgs,
    ) -> Result<PaymentsArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<PaymentsMsg>,
        msg: PaymentsMsg,
        st: &mut PaymentsArgs,
    ) -> Result<(), ActorProcessingErr> {
        let PaymentsMsg::Request(Inbound { req, reply, traceparent }) = msg;
        let (span, _) = bulkhead_cluster::traced_span!("payments.serve", &traceparent);
        let trace = bulkhead_cluster::trace::trace_id(&traceparent).to_string();
        span.in_scope(|| tracing::debug!(request = ?req, "request"));
        if let PaymentRequest::InjectPanic = req {
            if st.fault_injection {
                panic!("fault injection: payments worker panics on request");
            }
            let _ = reply.send(PaymentReply::Refused("fault injection is disabled on this node".into()));
            return Ok(());
        }
        let order_id = match &req {
            PaymentRequest::Charge { order_id, .. }
            | PaymentRequest::Refund { order_id }
            | PaymentRequest::List { order_id } => *order_id,
            PaymentRequest::InjectPanic => return Ok(()),
        };
        match local_replica(
            &st.cluster,
            &st.replicas,
            Capability::Payments,
            st.cluster.shard_of(Capability::Payments, order_id.as_bytes()),
        ) {
            Ok(replica) => {
                tokio::spawn(serve(replica, req, reply, trace).instrument(span));
            }
            Err(e) => {
                let _ = reply.send(refused(e));
            }
        }
        Ok(())
    }
}

fn refused(e: impl Into<Unserved>) -> PaymentReply {
    match e.into() {
        Unserved::NotLeader(leader) => PaymentReply::NotLeader { leader },
        // A write that timed out may still commit: the caller retries with the same order id.
        Unserved::Unavailable(reason) => PaymentReply::TransientError { reason },
    }
}

/// Serves one request; `trace` (the caller's trace id) names the info lines.
async fn serve(replica: Replica, req: PaymentRequest, reply: RpcReplyPort<PaymentReply>, trace: String) {
    let answer = match req {
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
        PaymentRequest::InjectPanic => return,
    };
    let _ = reply.send(answer);
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
