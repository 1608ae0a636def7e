//! Coalesced Raft traffic: one lane per peer node, carrying every local group's AppendEntries
//! (heartbeats included) and the answers to the peer's own, in as few messages as the moment allows.
//!
//! Why: each group's replication task sends its own AppendEntries, and each used to be a ractor
//! call of its own: an envelope, a session hop and a TLS record each way, a reply port and a task on
//! the far side. A node's groups all replicate to the same two peers, so what they send in the same
//! moment can travel together (as CockroachDB coalesces heartbeats and TiKV batches Raft messages per
//! store).
//!
//! How:
//! - A call puts its request in the peer's queue and waits for its answer. The first item into an
//!   idle queue spawns a flush, which yields once (so that every task made ready in the same moment
//!   can add to the queue), then sends everything queued as [`RaftFrame`](super::rpc::RaftFrame)s: fire-and-forget
//!   messages to the peer's router. No timer: a lone request goes at once.
//! - The peer serves each request on its own and answers it through its own lane back as soon as its
//!   replica has (an append after the follower's log round, a heartbeat at once), so no group's
//!   answer waits for another's, and answers going the same way travel together too.
//! - Answers are matched to calls by id, and only from the node the call went to. Ids start at
//!   random in each process, so an answer meant for the node's previous process (it restarted
//!   while a request was out) cannot complete a call of the new one.
//! - Every call keeps its own timeout (openraft's: one heartbeat interval for an append). A frame
//!   that cannot be sent (the node is down, no router there) fails its calls at once as
//!   unreachable; a frame lost with a link that breaks leaves its calls to time out.
//!
//! Caveats:
//! - Only AppendEntries take the lanes. Votes, snapshots, hellos and hand-overs stay single calls:
//!   they are rare, and a snapshot chunk is large.
//! - A node of an older build drops frames (it knows only calls), so this is not a rolling change
//!   (docs/operations.md, "Upgrading").

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bulkhead_codec::encode;
use tokio::sync::oneshot;

use super::rpc::{LaneItem, RaftRpc, RaftRpcReply};
use crate::call::CallError;
use crate::capability::CapabilityId;

/// Bytes of lane items in one frame: room for the largest AppendEntries (about 6.1 MiB, see
/// [`super::MAX_PAYLOAD_ENTRIES`]) with the envelope, below a link's [`super::MAX_FRAME`].
pub const FRAME_BYTES: usize = 7 * 1024 * 1024;
const _: () =
    assert!(FRAME_BYTES + 512 * 1024 <= super::MAX_FRAME as usize, "a full frame and its envelope fit a link");

/// Why a frame was not sent (nothing of it reached the peer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotSent(pub String);

/// Where a lane's frames go: the node's links ([`crate::Cluster`] implements it through the
/// [`super::RaftPort`]), or a test's own.
pub trait FrameSink: Send + Sync + 'static {
    /// Sends `items` to the raft router on `node` as one message, without waiting for anything
    /// (`Err`: nothing was sent).
    fn raft_frame(&self, node: &str, items: Vec<LaneItem>) -> Result<(), NotSent>;
    /// Why this node's view has `node` down, if it does.
    fn down(&self, node: &str) -> Option<String>;
}

/// What a call on a lane comes to.
pub type Answer = Result<RaftRpcReply, CallError>;

/// The lanes of one node to all its peers, and the calls waiting on them; cheap to clone.
#[derive(Clone, Default)]
pub struct Lanes(Arc<Shared>);

struct Shared {
    /// The next call's id. It starts at random, so that an answer sent to this node's previous
    /// process (a request it made just before it restarted) can never complete a call of this
    /// one: that would hand openraft another group's answer.
    next_id: AtomicU64,
    calls: Mutex<HashMap<u64, Call>>,
    queues: Mutex<HashMap<String, Queue>>,
}

impl Default for Shared {
    fn default() -> Self {
        Self { next_id: AtomicU64::new(rand::random()), calls: Mutex::default(), queues: Mutex::default() }
    }
}

/// A call waiting for its answer.
struct Call {
    node: String,
    capability: CapabilityId,
    done: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct Queue {
    items: Vec<LaneItem>,
    /// A flush is on its way and will take whatever is queued.
    flushing: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The lanes' maps stay consistent across a panic elsewhere (no invariant spans two statements).
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Forgets a call whose caller stopped waiting (its timeout, or openraft dropping the request).
struct Forget<'a> {
    lanes: &'a Lanes,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(&self.lanes.0.calls).remove(&self.id);
    }
}

impl Lanes {
    /// Sends `rpc` to the raft router on `node` through its lane and waits at most `timeout` for
    /// the answer (`cap` labels errors).
    pub async fn call(
        &self,
        sink: Arc<dyn FrameSink>,
        node: &str,
        cap: CapabilityId,
        rpc: &RaftRpc,
        timeout: Duration,
    ) -> Answer {
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed); // wraps, after 2^64 calls
        let (done, answer) = oneshot::channel();
        lock(&self.0.calls).insert(id, Call { node: node.to_string(), capability: cap, done });
        let _forget = Forget { lanes: self, id };
        self.push(sink, node, LaneItem::Request { id, rpc: encode(rpc) });
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(answer)) => answer,
            // Only a call removed without an answer (never: every removal answers or is ours).
            Ok(Err(_)) => Err(CallError::Lost {
                capability: cap,
                node: node.to_string(),
                reason: "the call was dropped unanswered".into(),
            }),
            Err(_) => Err(CallError::TimedOut {
                capability: cap,
                node: node.to_string(),
                timeout_ms: timeout.as_millis() as u64,
            }),
        }
    }

    /// Sends the answer to `node`'s request `id` through the lane back to it.
    pub fn answer(&self, sink: Arc<dyn FrameSink>, node: &str, id: u64, reply: RaftRpcReply) {
        self.push(sink, node, LaneItem::Answer { id, reply });
    }

    /// `from` answered call `id`. An answer from another node than the call went to, or to a call
    /// nobody waits for any more, is dropped (false).
    pub fn complete(&self, from: &str, id: u64, reply: RaftRpcReply) -> bool {
        let call = {
            let mut calls = lock(&self.0.calls);
            match calls.get(&id) {
                Some(c) if c.node == from => calls.remove(&id),
                _ => None,
            }
        };
        match call {
            Some(c) => c.done.send(Ok(reply)).is_ok(),
            None => false,
        }
    }

    /// Calls waiting for an answer (for tests and `/metrics`).
    pub fn waiting(&self) -> usize {
        lock(&self.0.calls).len()
    }

    fn push(&self, sink: Arc<dyn FrameSink>, node: &str, item: LaneItem) {
        let start = {
            let mut queues = lock(&self.0.queues);
            if !queues.contains_key(node) {
                queues.insert(node.to_string(), Queue::default());
            }
            let Some(q) = queues.get_mut(node) else { return };
            q.items.push(item);
            !std::mem::replace(&mut q.flushing, true)
        };
        if start {
            let lanes = self.clone();
            let node = node.to_string();
            tokio::spawn(async move {
                // Let every task made ready in this moment queue its item first.
                tokio::task::yield_now().await;
                lanes.flush(&*sink, &node);
            });
        }
    }

    /// Sends everything queued for `node`; what is queued meanwhile starts the next flush.
    fn flush(&self, sink: &dyn FrameSink, node: &str) {
        let mut items = {
            let mut queues = lock(&self.0.queues);
            let Some(q) = queues.get_mut(node) else { return };
            q.flushing = false;
            std::mem::take(&mut q.items)
        };
        if let Some(reason) = sink.down(node) {
            // Requests to a node this one has down fail at once (openraft backs off). Answers go
            // anyway: their node has just sent the requests over a vouched link, and may be
            // back before this node's view says so.
            let requests = items.extract_if(.., |i| matches!(i, LaneItem::Request { .. }));
            let ids: Vec<u64> = requests.filter_map(|i| i.request_id()).collect();
            self.fail(&ids, &reason);
        }
        for frame in frames(items, FRAME_BYTES) {
            metrics::histogram!("bulkhead_raft_frame_items").record(frame.len() as f64);
            let requests: Vec<u64> = frame.iter().filter_map(LaneItem::request_id).collect();
            if let Err(NotSent(reason)) = sink.raft_frame(node, frame) {
                // Nothing reached the peer: its calls fail now (openraft backs off), not at their
                // timeout. Answers to the peer are lost with it; it times out and sends again.
                self.fail(&requests, &reason);
            }
        }
    }

    /// Fails the calls `ids` as unreachable: their requests were not sent.
    fn fail(&self, ids: &[u64], reason: &str) {
        for id in ids {
            let call = lock(&self.0.calls).remove(id);
            if let Some(c) = call {
                let e = CallError::Unreachable { capability: c.capability, node: c.node, reason: reason.to_string() };
                let _ = c.done.send(Err(e));
            }
        }
    }
}

impl LaneItem {
    /// The id of a request (`None` for an answer).
    fn request_id(&self) -> Option<u64> {
        match self {
            LaneItem::Request { id, .. } => Some(*id),
            LaneItem::Answer { .. } => None,
        }
    }

    /// About how many bytes the item takes in a frame.
    fn size(&self) -> usize {
        match self {
            LaneItem::Request { rpc, .. } => rpc.len() + 16,
            LaneItem::Answer { reply: RaftRpcReply::Failed(s) | RaftRpcReply::NoSuchMember(s), .. } => s.len() + 64,
            LaneItem::Answer { .. } => 64,
        }
    }
}

/// Splits `items` into frames of at most `budget` bytes, in order; an item larger than the budget
/// goes alone.
pub fn frames(items: Vec<LaneItem>, budget: usize) -> Vec<Vec<LaneItem>> {
    let mut out: Vec<Vec<LaneItem>> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let size = item.size();
        match out.last_mut() {
            Some(frame) if bytes + size <= budget => frame.push(item),
            _ => {
                out.push(vec![item]);
                bytes = 0;
            }
        }
        bytes += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::GroupId;

    const CAP: CapabilityId = CapabilityId(2);

    fn hello(shard: u32) -> RaftRpc {
        RaftRpc::Hello { group: GroupId { capability: CAP, shard } }
    }

    fn request(id: u64, bytes: usize) -> LaneItem {
        LaneItem::Request { id, rpc: vec![0; bytes] }
    }

    fn ids(frame: &[LaneItem]) -> Vec<u64> {
        frame
            .iter()
            .map(|i| match i {
                LaneItem::Request { id, .. } | LaneItem::Answer { id, .. } => *id,
            })
            .collect()
    }

    #[test]
    fn frames_keep_the_order_and_the_budget_and_a_large_item_goes_alone() {
        let items = vec![
            request(0, 40),
            request(1, 40),
            request(2, 500),
            request(3, 10),
            LaneItem::Answer { id: 4, reply: RaftRpcReply::Done },
        ];
        let f = frames(items, 120);
        let got: Vec<Vec<u64>> = f.iter().map(|f| ids(f)).collect();
        assert_eq!(got, vec![vec![0, 1], vec![2], vec![3, 4]]);
        assert!(frames(Vec::new(), 120).is_empty());
    }

    /// Two nodes' lanes joined by sinks that hand each frame to the other side, which answers
    /// every request with `Done` (the router's part) and completes every answer.
    /// The frames a sink sent: to whom, and the ids in each.
    type Sent = Arc<Mutex<Vec<(String, Vec<u64>)>>>;

    #[derive(Clone)]
    struct Wire {
        sent: Sent,
        peer: Lanes,
        peer_name: &'static str,
        from: &'static str,
        /// The far side's way back.
        back: Arc<Mutex<Option<Arc<dyn FrameSink>>>>,
        down: bool,
    }

    impl FrameSink for Wire {
        fn raft_frame(&self, node: &str, items: Vec<LaneItem>) -> Result<(), NotSent> {
            if self.down {
                return Err(NotSent(format!("{node} is down")));
            }
            assert_eq!(node, self.peer_name);
            lock(&self.sent).push((node.to_string(), ids(&items)));
            let back = lock(&self.back).clone();
            for item in items {
                match item {
                    LaneItem::Request { id, rpc } => {
                        let rpc: RaftRpc = bulkhead_codec::decode(&rpc).unwrap();
                        assert!(matches!(rpc, RaftRpc::Hello { .. }));
                        if let Some(back) = &back {
                            self.peer.answer(back.clone(), self.from, id, RaftRpcReply::Done);
                        }
                    }
                    LaneItem::Answer { id, reply } => {
                        self.peer.complete(self.from, id, reply);
                    }
                }
            }
            Ok(())
        }
        fn down(&self, _: &str) -> Option<String> {
            None
        }
    }

    fn pair(down: bool) -> (Lanes, Arc<Wire>, Arc<Wire>) {
        let (a, b) = (Lanes::default(), Lanes::default());
        let a_to_b = Arc::new(Wire {
            sent: Arc::default(),
            peer: b.clone(),
            peer_name: "b",
            from: "a",
            back: Arc::default(),
            down,
        });
        let b_to_a = Arc::new(Wire {
            sent: Arc::default(),
            peer: a.clone(),
            peer_name: "a",
            from: "b",
            back: Arc::default(),
            down: false,
        });
        *lock(&a_to_b.back) = Some(b_to_a.clone());
        (a, a_to_b, b_to_a)
    }

    /// Calls made in the same moment travel in one frame, and their answers in one frame back.
    #[tokio::test(flavor = "current_thread")]
    async fn calls_of_one_moment_share_a_frame_each_way() {
        let (a, a_to_b, b_to_a) = pair(false);
        let t = Duration::from_secs(5);
        let calls = (0..10).map(|s| {
            let (a, sink) = (a.clone(), a_to_b.clone() as Arc<dyn FrameSink>);
            async move { a.call(sink, "b", CAP, &hello(s), t).await }
        });
        let answers = futures::future::join_all(calls).await;
        assert!(answers.iter().all(|r| matches!(r, Ok(RaftRpcReply::Done))), "{answers:?}");
        assert_eq!(lock(&a_to_b.sent).len(), 1, "ten requests, one frame: {:?}", lock(&a_to_b.sent));
        assert_eq!(lock(&a_to_b.sent)[0].1.len(), 10);
        assert_eq!(lock(&b_to_a.sent).len(), 1, "ten answers, one frame");
        assert_eq!(a.waiting(), 0);

        // A lone call later goes at once, in a frame of its own.
        assert!(matches!(a.call(a_to_b.clone(), "b", CAP, &hello(0), t).await, Ok(RaftRpcReply::Done)));
        assert_eq!(lock(&a_to_b.sent).len(), 2);
    }

    /// A peer that takes every frame and answers nothing: it records the ids of what was sent.
    /// `down`: this node's view has every peer down.
    struct Recording(Arc<Mutex<Vec<u64>>>, bool);
    impl FrameSink for Recording {
        fn raft_frame(&self, _: &str, items: Vec<LaneItem>) -> Result<(), NotSent> {
            lock(&self.0).extend(ids(&items));
            Ok(())
        }
        fn down(&self, node: &str) -> Option<String> {
            self.1.then(|| format!("{node} is down"))
        }
    }

    /// A node restarted while one of its requests was out: the answer, arriving at the new
    /// process, completes none of its calls (their ids start elsewhere).
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn an_answer_meant_for_the_previous_process_completes_nothing() {
        let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
        let sink: Arc<dyn FrameSink> = Arc::new(Recording(seen.clone(), false));
        let t = Duration::from_millis(50);
        let (before, after) = (Lanes::default(), Lanes::default());
        let _ = before.call(sink.clone(), "b", CAP, &hello(0), t).await;
        let old_id = lock(&seen)[0];
        let call = tokio::spawn({
            let (after, sink) = (after.clone(), sink.clone());
            async move { after.call(sink, "b", CAP, &hello(0), t).await }
        });
        while lock(&seen).len() < 2 {
            tokio::task::yield_now().await;
        }
        assert!(!after.complete("b", old_id, RaftRpcReply::Done), "ids {old_id} and {} collide", lock(&seen)[1]);
        assert!(matches!(call.await.unwrap(), Err(CallError::TimedOut { .. })));
    }

    /// To a node this one has down, requests fail at once unsent; answers still go.
    #[tokio::test(flavor = "current_thread")]
    async fn to_a_node_seen_down_only_answers_go() {
        let lanes = Lanes::default();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let sink: Arc<dyn FrameSink> = Arc::new(Recording(sent.clone(), true));
        lanes.answer(sink.clone(), "b", 41, RaftRpcReply::Done);
        let r = lanes.call(sink, "b", CAP, &hello(0), Duration::from_secs(60)).await;
        assert!(matches!(&r, Err(CallError::Unreachable { reason, .. }) if reason == "b is down"), "{r:?}");
        assert_eq!(*lock(&sent), vec![41], "the answer went, the request did not");
        assert_eq!(lanes.waiting(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_frame_that_cannot_be_sent_fails_its_calls_at_once() {
        let (a, a_to_b, _) = pair(true);
        let r = a.call(a_to_b, "b", CAP, &hello(0), Duration::from_secs(60)).await;
        assert!(matches!(&r, Err(CallError::Unreachable { reason, .. }) if reason == "b is down"), "{r:?}");
        assert_eq!(a.waiting(), 0);
    }

    /// An answer counts only from the node the call went to; a call nobody answers times out and
    /// is forgotten, and its late answer is dropped.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn answers_count_only_from_the_callee_and_a_silent_one_times_out() {
        let lanes = Lanes::default();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink: Arc<dyn FrameSink> = Arc::new(Recording(seen.clone(), false));
        let call = tokio::spawn({
            let (lanes, sink) = (lanes.clone(), sink.clone());
            async move { lanes.call(sink, "b", CAP, &hello(0), Duration::from_millis(100)).await }
        });
        while lock(&seen).is_empty() {
            tokio::task::yield_now().await;
        }
        let id = lock(&seen)[0];
        assert!(!lanes.complete("c", id, RaftRpcReply::Done), "c answers a call that went to b");
        let r = call.await.unwrap();
        assert!(matches!(r, Err(CallError::TimedOut { timeout_ms: 100, .. })), "{r:?}");
        assert_eq!(lanes.waiting(), 0, "the call is forgotten");
        assert!(!lanes.complete("b", id, RaftRpcReply::Done), "too late");
    }
}
