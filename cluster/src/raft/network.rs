//! Raft's RPCs over ractor_cluster, to one remotable [`RaftRouter`] per node that hands each RPC to
//! the local replica it names. AppendEntries (heartbeats included) travel on the peer's lane
//! ([`super::lanes`]), coalesced with every other group's; the rest are single calls on the same
//! timed call path and versioned envelope as every other cross-node call. No second port, no
//! second transport.
//!
//! Every RPC names the *member* it is for (node + incarnation). A node answers only for the
//! member it is now: a node whose store was wiped has a new incarnation, and refuses the votes
//! and entries meant for the member it used to be.

use std::time::Duration;

use std::sync::Arc;

use bulkhead_codec::{decode_wire, encode};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::lanes::FrameSink;
use super::port::Port;
use super::replica::Registry;
pub use super::rpc::{router_group, sent_by, LaneItem, RaftCall, RaftFrame, RaftRpc, RaftRpcReply};
use super::types::{GroupId, MemberId, TypeConfig};
use crate::call::CallError;
use crate::wire::{open, seal, Refusal, WireMsg, WireReply};

/// The one remotable actor per node that receives Raft RPCs for every local replica.
pub struct RaftRouter;

impl Actor for RaftRouter {
    type Msg = WireMsg;
    type State = Port;
    type Arguments = Port;

    async fn pre_start(&self, myself: ActorRef<WireMsg>, cluster: Port) -> Result<Port, ActorProcessingErr> {
        ractor::pg::join(router_group(&cluster.raft().node), vec![myself.get_cell()]);
        Ok(cluster)
    }

    async fn handle(&self, _: ActorRef<WireMsg>, msg: WireMsg, cluster: &mut Port) -> Result<(), ActorProcessingErr> {
        match msg {
            WireMsg::Ask(bytes, port) => serve_call(cluster, &bytes, port),
            WireMsg::Tell(bytes) => serve_frame(cluster, &bytes),
        }
        Ok(())
    }
}

/// What the router does with an RPC it received.
enum Admission {
    Serve,
    /// Not from who may send it: refused (and counted).
    Refused(String),
    /// Answered here, without the replica.
    Answered(RaftRpcReply),
}

/// Whether `from` may send `rpc` to this node, and what then (`vouched`: it came over a link of
/// `from`, by its binding).
fn admit(cluster: &Port, from: &str, vouched: bool, rpc: &RaftRpc) -> Admission {
    let local = rpc.group().and_then(|g| cluster.raft().get(g));
    let leader = local.as_ref().and_then(|r| r.leader());
    let replicas = local.as_ref().map(|r| r.placement.replicas.as_slice());
    let proved = if vouched {
        sent_by(rpc, from, leader.as_deref(), replicas)
    } else {
        Err(format!("a raft rpc that names {from} did not come over a link of {from}"))
    };
    if let Err(why) = proved {
        cluster.count_refused();
        tracing::warn!(%from, "raft rpc refused: {why}");
        return Admission::Refused(why);
    }
    if matches!(rpc, RaftRpc::TakeLead { .. }) && cluster.is_draining() {
        // A node on its way out must not take a leadership it would have to hand away again.
        return Admission::Answered(RaftRpcReply::Failed("this node is stopping: it takes no leadership".into()));
    }
    Admission::Serve
}

/// Judges `rpc` from `from` and hands the answer, or the refusal (`Err`), to `respond`: at once
/// if the router answers it itself, else from a task of its own once the replica has. An append
/// waits for the group commit, a vote for its fsync, and the router must not make one group wait
/// behind another.
fn serve(
    cluster: &Port,
    from: &str,
    vouched: bool,
    rpc: RaftRpc,
    respond: impl FnOnce(Result<RaftRpcReply, String>) + Send + 'static,
) {
    match admit(cluster, from, vouched, &rpc) {
        Admission::Refused(why) => respond(Err(why)),
        Admission::Answered(reply) => respond(Ok(reply)),
        Admission::Serve => {
            let registry = cluster.raft().clone();
            tokio::spawn(async move { respond(Ok(dispatch(&registry, rpc).await)) });
        }
    }
}

/// One RPC as a call of its own (votes, snapshots, hellos, hand-overs; appends from older builds).
fn serve_call(cluster: &Port, bytes: &[u8], port: ractor::RpcReplyPort<Vec<u8>>) {
    let refuse = |reason: String| seal(&WireReply::Refused { kind: Refusal::Rejected, reason }, "");
    let (env, call) = match open::<RaftCall>(bytes, "raft rpc") {
        Ok(x) => x,
        Err(e) => {
            let _ = port.send(refuse(format!("undecodable raft rpc: {e}")));
            return;
        }
    };
    let vouched = cluster.vouches_for(&call.from, &call.binding);
    serve(cluster, &call.from, vouched, call.rpc, move |answer| {
        let _ = port.send(match answer {
            Ok(reply) => seal(&WireReply::Ok(encode(&reply)), &env.traceparent),
            Err(why) => refuse(why),
        });
    });
}

/// A lane's frame ([`super::lanes`]): its answers complete this node's calls, its requests are
/// served each on its own task and answered through the lane back, each as soon as it is done.
fn serve_frame(cluster: &Port, bytes: &[u8]) {
    // `open` counts and logs a frame it cannot read; its sender's calls time out.
    let Ok((_, frame)) = open::<RaftFrame>(bytes, "raft frame") else { return };
    if !cluster.vouches_for(&frame.from, &frame.binding) {
        // Nothing in it is believed, answers included: a forged answer could complete a call.
        cluster.count_refused();
        tracing::warn!(from = %frame.from, "raft frame refused: it did not come over a link of the node it names");
        return;
    }
    let lanes = cluster.raft().lanes();
    let sink: Arc<dyn FrameSink> = cluster.clone();
    let from = frame.from;
    for item in frame.items {
        match item {
            LaneItem::Answer { id, reply } => {
                lanes.complete(&from, id, reply);
            }
            LaneItem::Request { id, rpc } => {
                // Under the wire limit, as every peer's bytes: a length prefix cannot make us allocate.
                let rpc = match decode_wire::<RaftRpc>(&rpc) {
                    Ok(rpc) => rpc,
                    Err(e) => {
                        cluster.count_refused();
                        tracing::warn!(%from, error = %e, "undecodable raft rpc in a frame");
                        let reply = RaftRpcReply::Failed(format!("undecodable raft rpc: {e}"));
                        lanes.answer(sink.clone(), &from, id, reply);
                        continue;
                    }
                };
                // The frame's binding was checked above, once for all its items.
                let (lanes, sink, to) = (lanes.clone(), sink.clone(), from.clone());
                serve(cluster, &from, true, rpc, move |answer| {
                    lanes.answer(sink, &to, id, answer.unwrap_or_else(RaftRpcReply::Failed));
                });
            }
        }
    }
}

async fn dispatch(registry: &Registry, rpc: RaftRpc) -> RaftRpcReply {
    let failed = |e: &dyn std::fmt::Display| RaftRpcReply::Failed(e.to_string());
    match rpc {
        RaftRpc::Hello { group } => match registry.get(group) {
            Some(r) => RaftRpcReply::Hello { member: r.member, initialized: r.is_initialized() },
            None => RaftRpcReply::NoSuchMember(format!("group {group} is not hosted on {}", registry.node)),
        },
        RaftRpc::Append { group, to, req } => match registry.member(group, to) {
            Ok(r) => {
                let started = std::time::Instant::now();
                let reply = r.raft.append_entries(req).await.map_or_else(|e| failed(&e), RaftRpcReply::Append);
                // The follower's share of an append's round trip: its core, its log write and fsync.
                metrics::histogram!("bulkhead_raft_append_serve_seconds").record(started.elapsed().as_secs_f64());
                reply
            }
            Err(why) => RaftRpcReply::NoSuchMember(why),
        },
        RaftRpc::Vote { group, to, req } => match registry.member(group, to) {
            Ok(r) => r.raft.vote(req).await.map_or_else(|e| failed(&e), RaftRpcReply::Vote),
            Err(why) => RaftRpcReply::NoSuchMember(why),
        },
        RaftRpc::Snapshot { group, to, req } => match registry.member(group, to) {
            Ok(r) => match r.raft.install_snapshot(req).await {
                Ok(resp) => RaftRpcReply::Snapshot(resp),
                Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m))) => {
                    RaftRpcReply::SnapshotMismatch(m)
                }
                Err(e) => failed(&e),
            },
            Err(why) => RaftRpcReply::NoSuchMember(why),
        },
        RaftRpc::TakeLead { group, to } => match registry.member(group, to) {
            Ok(r) => {
                tracing::info!(%group, "the leader hands over: calling an election");
                r.raft.trigger().elect().await.map_or_else(|e| failed(&e), |_| RaftRpcReply::Done)
            }
            Err(why) => RaftRpcReply::NoSuchMember(why),
        },
    }
}

/// Makes one [`Peer`] per (group, target member) for openraft.
pub struct Network {
    pub(crate) cluster: Port,
    pub(crate) group: GroupId,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: MemberId, node: &BasicNode) -> Peer {
        Peer {
            cluster: self.cluster.clone(),
            group: self.group,
            target,
            node: node.addr.clone(),
            refused_by_node: false,
        }
    }
}

/// Sends one group's RPCs to one member.
pub struct Peer {
    cluster: Port,
    group: GroupId,
    target: MemberId,
    /// The member's node name (`BasicNode::addr`).
    node: String,
    /// The node answered that it has no such member (a replaced incarnation): retrying soon would
    /// only send it the same entries again.
    refused_by_node: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

type RpcErr<E = openraft::error::Infallible> = RPCError<MemberId, BasicNode, RaftError<MemberId, E>>;

impl Peer {
    async fn send<E: std::error::Error>(&mut self, rpc: RaftRpc, ttl: Duration) -> Result<RaftRpcReply, RpcErr<E>> {
        let kind = rpc.kind();
        let started = std::time::Instant::now();
        let cap = self.group.capability;
        let result = if matches!(rpc, RaftRpc::Append { .. }) {
            // Appends and heartbeats share the peer's lane with every other group's.
            let sink: Arc<dyn FrameSink> = self.cluster.clone();
            self.cluster.raft().lanes().call(sink, &self.node, cap, &rpc, ttl).await
        } else {
            self.cluster.raft_call(&self.node, cap, rpc, ttl).await
        };
        // The round trip of one Raft RPC (the peer's append and fdatasync included, for appends).
        metrics::histogram!("bulkhead_raft_rpc_duration_seconds", "rpc" => kind, "ok" => if result.is_ok() { "true" } else { "false" })
            .record(started.elapsed().as_secs_f64());
        self.refused_by_node = matches!(result, Ok(RaftRpcReply::NoSuchMember(_)));
        match result {
            Ok(RaftRpcReply::NoSuchMember(why)) => Err(RPCError::Unreachable(Unreachable::new(&Refused(why)))),
            Ok(RaftRpcReply::Failed(why)) => Err(RPCError::Network(NetworkError::new(&Refused(why)))),
            Ok(reply) => Ok(reply),
            // Nothing was delivered: back off (a down node, or no router there yet).
            Err(e @ CallError::Unreachable { .. }) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            // It may have been delivered: try again soon.
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn unexpected<E: std::error::Error>(reply: &RaftRpcReply) -> RpcErr<E> {
        RPCError::Network(NetworkError::new(&Refused(format!("unexpected raft reply {reply:?}"))))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<MemberId>, RpcErr> {
        let rpc = RaftRpc::Append { group: self.group, to: self.target, req };
        match self.send(rpc, option.hard_ttl()).await? {
            RaftRpcReply::Append(resp) => Ok(resp),
            other => Err(Self::unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<MemberId>, RpcErr<InstallSnapshotError>> {
        let rpc = RaftRpc::Snapshot { group: self.group, to: self.target, req };
        match self.send(rpc, option.hard_ttl()).await? {
            RaftRpcReply::Snapshot(resp) => Ok(resp),
            RaftRpcReply::SnapshotMismatch(m) => Err(RPCError::RemoteError(RemoteError::new(
                self.target,
                RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m)),
            ))),
            other => Err(Self::unexpected(&other)),
        }
    }

    /// How long the leader waits before it tries an unreachable member again: 25 ms, 50 ms, then
    /// one heartbeat interval each time. openraft's default is a flat 500 ms, so a node that came
    /// back (a restart, a healed link) went unfed, and not ready, for up to half a second. A try
    /// at a node that is still away costs nothing on the wire (the call is refused here, before
    /// sending). A node that answered it has no such member (a replaced incarnation) keeps
    /// openraft's 500 ms: each try would carry the same entries to it again.
    fn backoff(&self) -> Backoff {
        if self.refused_by_node {
            return Backoff::new(std::iter::repeat(Duration::from_millis(500)));
        }
        let beat = Duration::from_millis(self.cluster.timing().raft_heartbeat_ms.max(1));
        let first = [Duration::from_millis(25), Duration::from_millis(50)].map(|d| d.min(beat));
        Backoff::new(first.into_iter().chain(std::iter::repeat(beat)))
    }

    async fn vote(&mut self, req: VoteRequest<MemberId>, option: RPCOption) -> Result<VoteResponse<MemberId>, RpcErr> {
        let rpc = RaftRpc::Vote { group: self.group, to: self.target, req };
        match self.send(rpc, option.hard_ttl()).await? {
            RaftRpcReply::Vote(resp) => Ok(resp),
            other => Err(Self::unexpected(&other)),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The router's side of a lane, driven through a port of the test's own: no sockets.
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::capability::CapabilityId;
    use crate::config::Timing;
    use crate::detector::Status;
    use crate::raft::lanes::NotSent;
    use crate::raft::port::{RaftPort, Reply};
    use crate::raft::types::member_id;

    /// A node `n2` whose only link is to `n1`, with binding `[1]`; it keeps the frames it sends.
    struct TestPort {
        timing: Timing,
        raft: Registry,
        refused: AtomicUsize,
        sent: Mutex<Vec<(String, Vec<LaneItem>)>>,
    }

    impl FrameSink for TestPort {
        fn raft_frame(&self, node: &str, items: Vec<LaneItem>) -> Result<(), NotSent> {
            self.sent.lock().unwrap().push((node.to_string(), items));
            Ok(())
        }
        fn down(&self, _: &str) -> Option<String> {
            None
        }
    }

    impl RaftPort for TestPort {
        fn name(&self) -> &str {
            "n2"
        }
        fn timing(&self) -> &Timing {
            &self.timing
        }
        fn status_of(&self, _: &str) -> Status {
            Status::Up
        }
        fn is_routable(&self, _: CapabilityId, _: &str) -> bool {
            true
        }
        fn heard_from(&self, _: &str) -> bool {
            true
        }
        fn started_ms(&self) -> u64 {
            0
        }
        fn is_draining(&self) -> bool {
            false
        }
        fn raft(&self) -> &Registry {
            &self.raft
        }
        fn vouches_for(&self, node: &str, binding: &[u8]) -> bool {
            node == "n1" && binding == [1]
        }
        fn count_refused(&self) {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        fn raft_call<'a>(&'a self, node: &'a str, cap: CapabilityId, _: RaftRpc, _: Duration) -> Reply<'a> {
            Box::pin(async move {
                Err(CallError::Unreachable {
                    capability: cap,
                    node: node.into(),
                    reason: "no calls in this test".into(),
                })
            })
        }
    }

    fn port() -> Arc<TestPort> {
        Arc::new(TestPort {
            timing: Timing::default(),
            raft: Registry::new("n2"),
            refused: AtomicUsize::new(0),
            sent: Mutex::default(),
        })
    }

    fn frame(from: &str, binding: u8, items: Vec<LaneItem>) -> Vec<u8> {
        seal(&RaftFrame { from: from.into(), binding: vec![binding], items }, "")
    }

    const GROUP: GroupId = GroupId { capability: CapabilityId(2), shard: 0 };

    fn append_from_n1() -> Vec<u8> {
        encode(&RaftRpc::Append {
            group: GROUP,
            to: member_id("n2", 1),
            req: AppendEntriesRequest {
                vote: openraft::Vote::new_committed(3, member_id("n1", 1)),
                prev_log_id: None,
                entries: vec![],
                leader_commit: None,
            },
        })
    }

    /// Waits (without sleeping a fixed time) until the port has sent `n` frames.
    async fn sent(p: &TestPort, n: usize) -> Vec<(String, Vec<LaneItem>)> {
        for _ in 0..10_000 {
            if p.sent.lock().unwrap().len() >= n {
                break;
            }
            tokio::task::yield_now().await;
        }
        std::mem::take(&mut *p.sent.lock().unwrap())
    }

    /// Every request of a frame is answered on its own through the lane back: one the router cannot
    /// read, one for a group this node does not host; garbage and a frame over another node's link
    /// are dropped and counted, and an answer completes only the call it names.
    #[tokio::test(flavor = "current_thread")]
    async fn a_frame_is_judged_once_and_each_request_answered_on_its_own() {
        let p = port();
        let cluster: Port = p.clone();

        serve_frame(
            &cluster,
            &frame(
                "n1",
                1,
                vec![
                    LaneItem::Request { id: 1, rpc: vec![0xde, 0xad] },
                    LaneItem::Request { id: 2, rpc: append_from_n1() },
                ],
            ),
        );
        let frames = sent(&p, 1).await;
        let answers: Vec<(u64, String)> = frames
            .iter()
            .flat_map(|(node, items)| {
                assert_eq!(node, "n1", "answers go back to the sender");
                items.iter().map(|i| match i {
                    LaneItem::Answer { id, reply } => (*id, format!("{reply:?}")),
                    other => panic!("the router sent a request: {other:?}"),
                })
            })
            .collect();
        assert_eq!(answers.len(), 2, "{answers:?}");
        assert!(answers.iter().any(|(id, r)| *id == 1 && r.contains("undecodable raft rpc")), "{answers:?}");
        assert!(answers.iter().any(|(id, r)| *id == 2 && r.contains("NoSuchMember")), "{answers:?}");
        assert_eq!(p.refused.load(Ordering::Relaxed), 1, "the unreadable request is counted");

        // Not over a link of n1 (a wrong binding), or not readable at all: nothing is answered.
        serve_frame(&cluster, &frame("n1", 9, vec![LaneItem::Request { id: 3, rpc: append_from_n1() }]));
        serve_frame(&cluster, &[0xff, 0x00, 0x13]);
        assert_eq!(p.refused.load(Ordering::Relaxed), 2, "the frame over another link is counted");
        assert!(sent(&p, 1).await.is_empty());

        // An answer completes the call it names, and only from the node the call went to.
        let lanes = p.raft.lanes().clone();
        let sink: Arc<dyn FrameSink> = p.clone();
        let call = tokio::spawn(async move {
            lanes.call(sink, "n1", GROUP.capability, &RaftRpc::Hello { group: GROUP }, Duration::from_secs(30)).await
        });
        let id = loop {
            if let Some((_, items)) = p.sent.lock().unwrap().first() {
                match &items[0] {
                    LaneItem::Request { id, .. } => break *id,
                    other => panic!("{other:?}"),
                }
            }
            tokio::task::yield_now().await;
        };
        serve_frame(&cluster, &frame("n1", 9, vec![LaneItem::Answer { id, reply: RaftRpcReply::Done }]));
        assert_eq!(p.raft.lanes().waiting(), 1, "a forged answer completes nothing");
        serve_frame(&cluster, &frame("n1", 1, vec![LaneItem::Answer { id, reply: RaftRpcReply::Done }]));
        assert!(matches!(call.await.unwrap(), Ok(RaftRpcReply::Done)));
    }
}
