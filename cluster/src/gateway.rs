//! The gateway: the one remotable actor of a capability on a node.
//!
//! It joins the process group `bulkhead/<capability>/<node>`, opens each envelope, decodes the
//! capability's request and hands it to the capability's local worker (found by its registered
//! name on every request, so a restarted worker is picked up at once). The worker's answer is sealed
//! back into the caller's reply port. Only this actor's message type crosses nodes; workers keep
//! local-only message types, so no stub of them is created on peers.
//!
//! Senders: a request is handed over only when its envelope names a sender that [`judge`] lets
//! send it (vouched for by the link it came over, of the role the request needs); anything else is
//! refused before the worker sees it, counted in `bulkhead_cluster_requests_refused_total`.
//!
//! Load shedding: the worker's mailbox is unbounded, so the gateway bounds it instead. It counts the
//! requests it handed over and that are not answered yet; at `max_in_flight` it refuses the next one
//! at once with an `unavailable: ` rejection (nothing handed over, so nothing applied; HTTP 503 +
//! `Retry-After`, the saga and the relay retry later) rather than letting the queue grow.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bulkhead_codec::{encode, Record};
use ractor::{Actor, ActorProcessingErr, ActorRef, Message, RpcReplyPort};

use crate::capability::CapabilityId;
use tracing::Instrument;

use crate::senders::{judge, Peers, SentBy, Unvouched};
use crate::wire::{open, seal, Refusal, WireMsg, WireReply};

/// Requests refused by any gateway of this process because its worker had `max_in_flight` unanswered.
pub static GATEWAY_SHED: AtomicU64 = AtomicU64::new(0);

/// The process group of `capability`'s gateway on `node`.
pub fn group_name(capability: impl Into<CapabilityId>, node: &str) -> String {
    let capability = capability.into();
    format!("bulkhead/{capability}/{node}")
}

/// The registered name of `capability`'s worker in this process.
pub fn worker_name(capability: impl Into<CapabilityId>) -> String {
    let capability = capability.into();
    format!("bulkhead.{capability}.worker")
}

/// A request delivered to a worker: the decoded request, the caller's trace, and where to answer.
pub struct Inbound<Req, Resp> {
    pub req: Req,
    pub traceparent: String,
    pub reply: RpcReplyPort<Resp>,
}

/// A gateway for requests `Req` answered with `Resp` by a worker accepting `M`.
pub struct Gateway<Req, Resp, M> {
    _types: PhantomData<Types<Req, Resp, M>>,
}

type Types<Req, Resp, M> = fn() -> (Req, Resp, M);

impl<Req, Resp, M> Default for Gateway<Req, Resp, M> {
    fn default() -> Self {
        Self { _types: PhantomData }
    }
}

pub struct GatewayArgs<Req, Resp, M> {
    pub capability: CapabilityId,
    pub node: String,
    /// How a decoded request becomes the worker's message.
    pub wrap: fn(Inbound<Req, Resp>) -> M,
    /// Longest a worker may take before the caller is told so (callers time out sooner anyway).
    pub worker_timeout: Duration,
    /// Requests handed to the worker and not answered yet above which new ones are refused.
    pub max_in_flight: usize,
    /// What this node knows of senders (its links and its shard map): `Cluster::sender_roles`.
    pub peers: Arc<dyn Peers>,
}

pub struct GatewayState<Req, Resp, M> {
    args: GatewayArgs<Req, Resp, M>,
    in_flight: Arc<AtomicUsize>,
}

/// One handed-over request; dropping it (answer sent, or the waiting task gone) frees its slot.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn reject(port: RpcReplyPort<Vec<u8>>, traceparent: &str, kind: Refusal, reason: String) {
    let _ = port.send(seal(&WireReply::Refused { kind, reason }, traceparent));
}

impl<Req, Resp, M> Actor for Gateway<Req, Resp, M>
where
    Req: Record + SentBy + Send + 'static,
    Resp: Record + Send + 'static,
    M: Message,
{
    type Msg = WireMsg;
    type State = GatewayState<Req, Resp, M>;
    type Arguments = GatewayArgs<Req, Resp, M>;

    async fn pre_start(
        &self,
        myself: ActorRef<WireMsg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        ractor::pg::join(group_name(args.capability, &args.node), vec![myself.get_cell()]);
        Ok(GatewayState { args, in_flight: Arc::new(AtomicUsize::new(0)) })
    }

    async fn handle(
        &self,
        _myself: ActorRef<WireMsg>,
        msg: WireMsg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let cap = state.args.capability;
        match msg {
            WireMsg::Tell(bytes) => {
                tracing::warn!(capability = %cap, len = bytes.len(), "one-way message to a request gateway ignored");
            }
            WireMsg::Ask(bytes, port) => {
                let (env, req) = match open::<Req>(&bytes, &cap.label()) {
                    Ok(x) => x,
                    Err(e) => {
                        reject(port, "", Refusal::Rejected, format!("undecodable request: {e}"));
                        return Ok(());
                    }
                };
                // The serving span lasts until the answer is sent; the worker's own work (and the
                // calls it makes) continue the trace from it.
                let (span, tp) =
                    crate::traced_span!("cluster.serve", &env.traceparent, capability = %cap, msg_id = env.msg_id);
                if let Err(why) = judge(env.sender.as_ref(), req.sent_by(), &*state.args.peers) {
                    metrics::counter!("bulkhead_cluster_requests_refused_total", "capability" => cap.label(), "reason" => why.label())
                        .increment(1);
                    let _enter = span.enter();
                    tracing::warn!(sender = ?env.sender.as_ref().map(|s| &s.node), "request refused: {why}");
                    // A binding that matches no link may be a link that just closed: nothing was
                    // applied, the caller may retry. The rest are facts of the map or the build.
                    let kind =
                        if matches!(why, Unvouched::NotOverItsLink { .. }) { Refusal::Busy } else { Refusal::Rejected };
                    reject(port, &tp, kind, why.to_string());
                    return Ok(());
                }
                let Some(worker) = ActorRef::<M>::where_is(worker_name(cap)) else {
                    reject(port, &tp, Refusal::Busy, format!("the {cap} worker is restarting"));
                    return Ok(());
                };
                // Only this actor increments, one message at a time, so load-then-add cannot overshoot.
                let queued = state.in_flight.load(Ordering::Relaxed);
                if queued >= state.args.max_in_flight {
                    GATEWAY_SHED.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(capability = %cap, queued, "gateway full; request shed");
                    reject(
                        port,
                        &tp,
                        Refusal::Busy,
                        format!("the {cap} worker has {queued} requests queued; shedding load"),
                    );
                    return Ok(());
                }
                let (tx, rx) = ractor::concurrency::oneshot();
                let inbound = Inbound { req, traceparent: tp.clone(), reply: tx.into() };
                if worker.cast((state.args.wrap)(inbound)).is_err() {
                    reject(port, &tp, Refusal::Busy, format!("the {cap} worker is stopping"));
                    return Ok(());
                }
                state.in_flight.fetch_add(1, Ordering::Relaxed);
                let slot = Slot(state.in_flight.clone());
                let timeout = state.args.worker_timeout;
                tokio::spawn(
                    async move {
                        let _slot = slot;
                        match tokio::time::timeout(timeout, rx).await {
                            Ok(Ok(resp)) => {
                                let _ = port.send(seal(&WireReply::Ok(encode(&resp)), &tp));
                            }
                            // Handed over, then no answer: the outcome is unknown, never "not delivered".
                            Ok(Err(_)) => {
                                reject(port, &tp, Refusal::Lost, format!("the {cap} worker stopped before answering"))
                            }
                            Err(_) => {
                                reject(port, &tp, Refusal::Lost, format!("the {cap} worker did not answer in time"))
                            }
                        }
                    }
                    .instrument(span),
                );
            }
        }
        Ok(())
    }
}
