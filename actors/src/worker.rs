//! One replicated worker: the shell that serves a capability's shards where this node's replicas
//! lead them.
//!
//! A capability says only what is its own in a [`Service`]: which shard a request is for (or the
//! answer at once), how the leading replica serves it, and how it words "not served here". The
//! [`ShardWorker`] does the rest, once for every capability: the serving span, the fault-injection
//! drill, finding this node's replica of the shard (or naming the leader it knows, so the caller
//! follows it once), and a task per request, so the worker never waits for a majority.
//!
//! Every capability is served by it. A service whose work outlives a request (orders drives
//! sagas) also has a loop of its own inside the same actor: requests it routes to [`Route::Own`]
//! and its own messages ([`ServeMsg::Own`]: outcomes of its tasks, its timers) go to
//! [`Service::own`], with the state [`Service::start`] made. The others have none
//! (`type Own = Infallible; type Local = ();`).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use bulkhead_cluster::raft::Replica;
use bulkhead_cluster::{Cluster, Inbound};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::Instrument;

use crate::capability::Capability;
use crate::util::{local_replica, Unserved};

/// Where a request goes.
#[derive(Debug)]
pub enum Route<Resp> {
    /// To this shard's leader.
    Shard(u32),
    /// The request is the drill `InjectPanic`: the worker panics if fault injection is on.
    Drill,
    /// Answered at once, without a replica (a request that names no shard, a poison event).
    Answer(Resp),
    /// Handled by the service's own loop ([`Service::own`]).
    Own,
}

/// What a replicated capability does; the [`ShardWorker`] serves it.
pub trait Service: Clone + Send + Sync + 'static {
    type Req: Debug + Send + Sync + 'static;
    type Resp: Debug + Send + Sync + 'static;
    /// Messages of the service's own loop; `Infallible` when it has none.
    type Own: Send + 'static;
    /// The own loop's state; `()` when it has none.
    type Local: Send + 'static;

    /// The capability served (its replicas, its shard map, its span's name).
    fn capability(&self) -> Capability;

    /// Which shard serves `req`. `fault_injection`: whether this node takes drills.
    fn route(&self, cluster: &Cluster, fault_injection: bool, req: &Self::Req) -> Route<Self::Resp>;

    /// Serves `req` on `replica`, which leads its shard or did a moment ago (a proposal or read
    /// barrier says which). `trace` is the caller's trace id, for the info lines.
    fn serve(&self, replica: Replica, req: Self::Req, trace: String) -> impl Future<Output = Self::Resp> + Send;

    /// The answer when this node does not serve the shard: another replica leads (the caller
    /// follows it once), or this one could not.
    fn unserved(&self, why: Unserved) -> Self::Resp;

    /// The answer to a drill on a node without fault injection.
    fn drill_refused(&self) -> Self::Resp;

    /// The own loop's state, made once the worker starts (and its timers, if it has any).
    fn start(&self, myself: &ActorRef<ServeMsg<Self>>, args: &WorkerArgs<Self>) -> Self::Local;

    /// A request routed to [`Route::Own`], or one of the own loop's messages. A service without
    /// an own loop never routes there; should it, the request is answered "not served here"
    /// rather than left without an answer.
    fn own(&self, _local: &mut Self::Local, _myself: &ActorRef<ServeMsg<Self>>, input: OwnInput<Self>) {
        if let OwnInput::Request(Inbound { reply, .. }) = input {
            let why = format!("{} has no loop of its own", self.capability());
            let _ = reply.send(self.unserved(Unserved::Unavailable(why)));
        }
    }
}

/// What reaches a service's own loop.
pub enum OwnInput<S: Service> {
    Request(Inbound<S::Req, S::Resp>),
    Message(S::Own),
}

/// What a [`ShardWorker`] receives: a request, as the gateway hands it over, or a message of the
/// service's own loop.
pub enum ServeMsg<S: Service> {
    Request(Inbound<S::Req, S::Resp>),
    Own(S::Own),
}

impl<S: Service> ractor::Message for ServeMsg<S> {}

/// What a [`ShardWorker`] is started with.
#[derive(Clone)]
pub struct WorkerArgs<S> {
    pub cluster: Cluster,
    /// This node's replicas of the capability, by shard.
    pub replicas: Arc<BTreeMap<u32, Replica>>,
    pub fault_injection: bool,
    pub service: S,
}

/// The worker of a [`Service`].
pub struct ShardWorker<S>(std::marker::PhantomData<fn() -> S>);

impl<S> Default for ShardWorker<S> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

/// A [`ShardWorker`]'s state: what it was started with, and the service's own loop's.
pub struct WorkerState<S: Service> {
    args: WorkerArgs<S>,
    local: S::Local,
}

impl<S: Service> Actor for ShardWorker<S> {
    type Msg = ServeMsg<S>;
    type State = WorkerState<S>;
    type Arguments = WorkerArgs<S>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: WorkerArgs<S>,
    ) -> Result<WorkerState<S>, ActorProcessingErr> {
        let local = args.service.start(&myself, &args);
        Ok(WorkerState { args, local })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut WorkerState<S>,
    ) -> Result<(), ActorProcessingErr> {
        let WorkerState { args: st, local } = state;
        let Inbound { req, reply, traceparent } = match msg {
            ServeMsg::Request(inbound) => inbound,
            ServeMsg::Own(m) => {
                st.service.own(local, &myself, OwnInput::Message(m));
                return Ok(());
            }
        };
        let cap = st.service.capability();
        let (span, _) = bulkhead_cluster::traced_span!("capability.serve", &traceparent, capability = %cap);
        let entered = span.enter();
        tracing::debug!(request = ?req, "request");
        // Routed in the request's span: what a route logs (a poison event) carries its trace.
        let shard = match st.service.route(&st.cluster, st.fault_injection, &req) {
            Route::Shard(shard) => shard,
            Route::Own => {
                // The own loop opens the spans of what it starts (the orders loop: one per
                // proposal and per saga step, in the order's trace).
                drop(entered);
                st.service.own(local, &myself, OwnInput::Request(Inbound { req, reply, traceparent }));
                return Ok(());
            }
            Route::Answer(answer) => {
                let _ = reply.send(answer);
                return Ok(());
            }
            Route::Drill if st.fault_injection => panic!("fault injection: {cap} worker panics on request"),
            Route::Drill => {
                let _ = reply.send(st.service.drill_refused());
                return Ok(());
            }
        };
        drop(entered);
        match local_replica(&st.cluster, &st.replicas, cap, shard) {
            Ok(replica) => {
                let (service, trace) =
                    (st.service.clone(), bulkhead_cluster::trace::trace_id(&traceparent).to_string());
                tokio::spawn(
                    async move {
                        let answer = service.serve(replica, req, trace).await;
                        tracing::debug!(?answer, "answered");
                        let _ = reply.send(answer);
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                let _ = reply.send(st.service.unserved(e));
            }
        }
        Ok(())
    }
}
