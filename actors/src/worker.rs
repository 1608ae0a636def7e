//! One replicated worker: the shell that serves a capability's shards where this node's replicas
//! lead them.
//!
//! A capability says only what is its own in a [`Service`]: which shard a request is for (or the
//! answer at once), how the leading replica serves it, and how it words "not served here". The
//! [`ShardWorker`] does the rest, once for every capability: the serving span, the fault-injection
//! drill, finding this node's replica of the shard (or naming the leader it knows, so the caller
//! follows it once), and a task per request, so the worker never waits for a majority.
//!
//! Payments, inventory, shipping and notifications are served by it. Orders is not: its worker
//! also drives sagas, which outlive a request (`orders::actor`).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use bulkhead_cluster::raft::Replica;
use bulkhead_cluster::{Cluster, Inbound};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
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
}

/// What a replicated capability does; the [`ShardWorker`] serves it.
pub trait Service: Clone + Send + Sync + 'static {
    type Req: Debug + Send + Sync + 'static;
    type Resp: Debug + Send + Sync + 'static;

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
}

/// A request for a [`ShardWorker`], as the gateway hands it over.
#[derive(RactorMessage)]
pub enum ServeMsg<Req: Send + 'static, Resp: Send + 'static> {
    Request(Inbound<Req, Resp>),
}

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

impl<S: Service> Actor for ShardWorker<S> {
    type Msg = ServeMsg<S::Req, S::Resp>;
    type State = WorkerArgs<S>;
    type Arguments = WorkerArgs<S>;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        args: WorkerArgs<S>,
    ) -> Result<WorkerArgs<S>, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut WorkerArgs<S>,
    ) -> Result<(), ActorProcessingErr> {
        let ServeMsg::Request(Inbound { req, reply, traceparent }) = msg;
        let cap = st.service.capability();
        let (span, _) = bulkhead_cluster::traced_span!("capability.serve", &traceparent, capability = %cap);
        span.in_scope(|| tracing::debug!(request = ?req, "request"));
        let shard = match st.service.route(&st.cluster, st.fault_injection, &req) {
            Route::Shard(shard) => shard,
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
