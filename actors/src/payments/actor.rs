//! The payments worker: the ledger of one record per order, answered after the group flush.
//! A slow charge keeps its callers waiting (up to their own timeout) and answers all of them when
//! the provider is done; a caller that timed out gets the recorded answer on its retry.

use std::collections::HashMap;
use std::time::Duration;

use bulkhead_cluster::Inbound;
use bulkhead_storage::{now_ms, Batch, Table};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;
use uuid::Uuid;

use super::ledger::{self, PaymentRecord};
use super::protocol::{PaymentReply, PaymentRequest};
use crate::util::reply_after_sync;
use crate::WorkerArgs;

pub const PAYMENTS: Table<Uuid, PaymentRecord> = Table::new(1, "payments");

#[derive(RactorMessage)]
pub enum PaymentsMsg {
    Request(Inbound<PaymentRequest, PaymentReply>),
    /// A slow charge may be ready now.
    Wake(Uuid),
}

pub struct PaymentsWorker;

pub struct PaymentsState {
    args: WorkerArgs,
    waiting: HashMap<Uuid, Vec<RpcReplyPort<PaymentReply>>>,
}

impl PaymentsState {
    fn put(&self, rec: &PaymentRecord) -> Result<(), ActorProcessingErr> {
        let mut b = Batch::new();
        PAYMENTS.put(&mut b, &rec.order_id, rec);
        Ok(self.args.store.apply(b)?)
    }

    fn charge(
        &mut self,
        myself: &ActorRef<PaymentsMsg>,
        order_id: Uuid,
        amount: u64,
        token: &str,
        reply: Option<RpcReplyPort<PaymentReply>>,
    ) -> Result<(), ActorProcessingErr> {
        let now = now_ms();
        let existing = PAYMENTS.get(&self.args.store, &order_id)?;
        let d = ledger::charge(existing.as_ref(), order_id, amount, token, now, Uuid::new_v4());
        if let Some(rec) = &d.record {
            self.put(rec)?;
        }
        match (d.reply, d.wake_at_ms) {
            (PaymentReply::InProgress, Some(at)) => {
                if let Some(r) = reply {
                    self.waiting.entry(order_id).or_default().push(r);
                }
                myself.send_after(Duration::from_millis(at.saturating_sub(now)), move || PaymentsMsg::Wake(order_id));
            }
            (answer, _) => {
                if let Some(r) = reply {
                    reply_after_sync(&self.args.store, r, answer.clone());
                }
                for w in self.waiting.remove(&order_id).unwrap_or_default() {
                    reply_after_sync(&self.args.store, w, answer.clone());
                }
            }
        }
        Ok(())
    }
}

impl Actor for PaymentsWorker {
    type Msg = PaymentsMsg;
    type State = PaymentsState;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<PaymentsMsg>,
        args: WorkerArgs,
    ) -> Result<PaymentsState, ActorProcessingErr> {
        // Charges that were processing when the node stopped finish now (or when due).
        let now = now_ms();
        for item in PAYMENTS.iter(&args.store) {
            let (order_id, rec) = item?;
            if let ledger::ChargeStatus::Processing { ready_ms } = rec.status {
                myself.send_after(Duration::from_millis(ready_ms.saturating_sub(now)), move || {
                    PaymentsMsg::Wake(order_id)
                });
            }
        }
        Ok(PaymentsState { args, waiting: HashMap::new() })
    }

    async fn handle(
        &self,
        myself: ActorRef<PaymentsMsg>,
        msg: PaymentsMsg,
        state: &mut PaymentsState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PaymentsMsg::Request(Inbound { req, reply, traceparent }) => {
                tracing::debug!(trace = bulkhead_cluster::wire::trace_id(&traceparent), request = ?req, "request");
                state.request(&myself, req, reply)?;
            }
            PaymentsMsg::Wake(order_id) => {
                if let Some(rec) = PAYMENTS.get(&state.args.store, &order_id)? {
                    let (amount, token) = (rec.amount_cents, rec.token.clone());
                    state.charge(&myself, order_id, amount, &token, None)?;
                }
            }
        }
        Ok(())
    }
}

impl PaymentsState {
    fn request(
        &mut self,
        myself: &ActorRef<PaymentsMsg>,
        req: PaymentRequest,
        reply: RpcReplyPort<PaymentReply>,
    ) -> Result<(), ActorProcessingErr> {
        match req {
            PaymentRequest::Charge { order_id, amount_cents, token } => {
                self.charge(myself, order_id, amount_cents, &token, Some(reply))?;
            }
            PaymentRequest::Refund { order_id } => {
                let existing = PAYMENTS.get(&self.args.store, &order_id)?;
                let (answer, rec) = ledger::refund(existing.as_ref(), order_id, now_ms());
                if let Some(rec) = rec {
                    self.put(&rec)?;
                }
                reply_after_sync(&self.args.store, reply, answer);
            }
            PaymentRequest::List { order_id } => {
                // A voided order never had a charge: nothing to list.
                let list = PAYMENTS
                    .get(&self.args.store, &order_id)?
                    .filter(|r| r.status != ledger::ChargeStatus::Voided)
                    .map(|r| vec![r.view()])
                    .unwrap_or_default();
                reply_after_sync(&self.args.store, reply, PaymentReply::Payments(list));
            }
            PaymentRequest::InjectPanic => {
                if self.args.fault_injection {
                    panic!("fault injection: payments worker panics on request");
                }
                let _ = reply.send(PaymentReply::Refused("fault injection is disabled on this node".into()));
            }
        }
        Ok(())
    }
}
