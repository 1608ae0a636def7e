//! The orders client: how a front places an order on its shard's leader, and rides through that
//! leader's death on the way.
//!
//! A `Place` goes to the shard's leader, which commits the pending order and waits for its saga up
//! to the order's wait budget. When that leader dies (SIGKILL: its link drops; SIGSTOP: it goes
//! silent), the call fails as `Lost`, `TimedOut` or `Unreachable`, and the order may or may not
//! have been committed. With an Idempotency-Key that question has a safe answer: ask the new leader
//! with the same key. If the first `Place` committed, the key's claim finds its order (the new
//! leader resumed its saga); if not, the order is placed now. Either way one order, and the client
//! gets 201/202/402/409 instead of 503/504. The front does this itself, within the order's budget
//! ([`Budget`]): it waits for the group to name a new leader (this node usually hosts a replica and
//! hears the election), and while a keyed `Place` is in flight it stops waiting on a leader that
//! another one replaced.
//!
//! Without a key only the failures that recorded nothing are retried (no leader, unreachable,
//! busy, refused before the worker): after `Lost` or `TimedOut` a second try could place a second
//! order, so the client hears 504 and the advice to send a key.
//!
//! [`next`] is the whole policy, pure; `place_order` performs it. [`Client`] is what a front uses:
//! it picks each request's shard and sends it to that shard's leader.

use std::time::{Duration, Instant};

use bulkhead_cluster::{CallError, Cluster};
use uuid::Uuid;

use super::protocol::shard_of_order;
use super::protocol::{IdemKey, OrderView, OrdersReply, OrdersRequest, PlaceOrder};
use crate::capability::Capability;
use crate::inventory::Item;
use crate::util::ask_leader;

/// The orders capability as a front sees it.
#[derive(Clone)]
pub struct Client {
    cluster: Cluster,
}

/// A new order as the front validated it.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub customer_id: String,
    pub items: Vec<Item>,
    pub payment_token: String,
}

/// Where [`Client::place`] placed an order, its time, and how it ended.
#[derive(Debug)]
pub struct Placement {
    pub shard: u32,
    pub budget: Budget,
    pub placed: Placed,
}

impl Client {
    pub fn new(cluster: &Cluster) -> Self {
        Self { cluster: cluster.clone() }
    }

    /// The orders shards, as the shard map lists them.
    pub fn shards(&self) -> Vec<u32> {
        self.cluster.config().shard_map.shards(Capability::Orders).iter().map(|p| p.shard).collect()
    }

    /// The shard an order id names, if the shard map has it (ids are not guessed at otherwise).
    pub fn shard_of_id(&self, id: &Uuid) -> Option<u32> {
        let shard = shard_of_order(id);
        self.shards().contains(&shard).then_some(shard)
    }

    /// Places an order, within the node's wait budget: with an Idempotency-Key in the key's shard
    /// (one key, one shard, one order: the claim is a write in that shard's group), else in a
    /// shard this node leads if any (no extra hop), else one with a known leader.
    pub async fn place(&self, order: NewOrder, key: Option<IdemKey>, traceparent: &str) -> Placement {
        let shard = match &key {
            Some(k) => self.cluster.shard_of(Capability::Orders, k.key.as_bytes()),
            None => self.pick_shard(),
        };
        let timing = &self.cluster.config().timing;
        let budget = Budget::starting_now(
            Duration::from_millis(timing.wait_budget_ms),
            Duration::from_millis(timing.call_timeout_ms),
        );
        let NewOrder { customer_id, items, payment_token } = order;
        let place =
            PlaceOrder { shard, customer_id, items, payment_token, idempotency: key, wait_ms: timing.wait_budget_ms };
        Placement { shard, budget, placed: place_order(&self.cluster, place, budget, traceparent).await }
    }

    /// A `Place` answered pending before its wait was over: the shard's leadership moved mid-saga
    /// (a hand-over, a failover). Waits out the `left` of it on the shard's leader now; any
    /// failure keeps the pending view (the order is recorded: pending is still the truth).
    pub async fn await_order(&self, shard: u32, view: OrderView, left: Duration, traceparent: &str) -> OrderView {
        let req = OrdersRequest::Await { order_id: view.order_id, wait_ms: left.as_millis() as u64 };
        let timeout = left + Duration::from_millis(self.cluster.config().timing.call_timeout_ms);
        match self.cluster.call_leader::<_, OrdersReply>(Capability::Orders, shard, &req, traceparent, timeout).await {
            Ok(OrdersReply::Order(now)) if now.order_id == view.order_id => now,
            _ => view,
        }
    }

    /// One order, read linearizably on its shard's leader; `None`: no shard of the map owns the id.
    pub async fn get(&self, order_id: Uuid, traceparent: &str) -> Option<Result<OrdersReply, CallError>> {
        let shard = self.shard_of_id(&order_id)?;
        Some(self.ask(shard, &OrdersRequest::Get { order_id }, traceparent).await)
    }

    /// A customer's orders in one shard, newest first, older than `before` if given.
    pub async fn by_customer(
        &self,
        shard: u32,
        customer_id: String,
        before: Option<Uuid>,
        limit: u32,
        traceparent: &str,
    ) -> Result<OrdersReply, CallError> {
        self.ask(shard, &OrdersRequest::ByCustomer { shard, customer_id, before, limit }, traceparent).await
    }

    /// A shard's dead letters, of one order or all.
    pub async fn dead_letters(
        &self,
        shard: u32,
        order_id: Option<Uuid>,
        traceparent: &str,
    ) -> Result<OrdersReply, CallError> {
        self.ask(shard, &OrdersRequest::DeadLetters { shard, order_id }, traceparent).await
    }

    async fn ask(&self, shard: u32, req: &OrdersRequest, traceparent: &str) -> Result<OrdersReply, CallError> {
        ask_leader(&self.cluster, Capability::Orders, shard, req, traceparent).await
    }

    /// The shard for an order without a key: one this node leads if any, else one with a known
    /// leader, else any; spread by fresh randomness.
    fn pick_shard(&self) -> u32 {
        let cluster = &self.cluster;
        let shards = self.shards();
        let leader = |s: &u32| cluster.leader_of(Capability::Orders, *s);
        let led_here: Vec<u32> =
            shards.iter().copied().filter(|s| leader(s).as_deref() == Some(cluster.name())).collect();
        let led: Vec<u32> = shards.iter().copied().filter(|s| leader(s).is_some()).collect();
        let pool = [led_here, led, shards].into_iter().find(|p| !p.is_empty()).unwrap_or_else(|| vec![0]);
        pool[Uuid::new_v4().as_u128() as usize % pool.len()]
    }
}

/// The first pause between two tries when no new leader shows up sooner; it doubles up to
/// [`MAX_PAUSE`]. A new leader ends the pause at once.
const FIRST_PAUSE: Duration = Duration::from_millis(25);
const MAX_PAUSE: Duration = Duration::from_millis(400);

/// After a keyed `Place` was dropped for a new leader: the pause before asking it.
const MOVED_PAUSE: Duration = Duration::from_millis(5);

/// Below this much time left, another try could not be answered anyway: the last failure stands.
const LEAST_TRY: Duration = Duration::from_millis(20);

/// An order's time: its saga may be waited for until `wait_until` (the client's wait budget,
/// after which a pending order answers 202), and every answer comes by `answer_by` (the budget
/// plus one call timeout: room for a `Place` sent near the end of the wait to come back).
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub wait_until: Instant,
    pub answer_by: Instant,
}

impl Budget {
    pub fn starting_now(wait: Duration, call_timeout: Duration) -> Self {
        let now = Instant::now();
        Budget { wait_until: now + wait, answer_by: now + wait + call_timeout }
    }

    fn wait_left(&self, now: Instant) -> Duration {
        self.wait_until.saturating_duration_since(now)
    }

    fn left(&self, now: Instant) -> Duration {
        self.answer_by.saturating_duration_since(now)
    }
}

/// What one try of a `Place` came to.
#[derive(Debug)]
pub enum Tried {
    Answered(OrdersReply),
    Failed(CallError),
    /// A keyed `Place` was still in flight when the group named a new leader: the old one is dead
    /// or deposed, and its answer would come late or never.
    LeaderMoved {
        from: Option<String>,
    },
}

/// What to do after a try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The try's outcome is the answer.
    Answer,
    /// Try again (after waiting for a new leader, at most the pause).
    Retry,
}

/// The policy, pure: whether a try's outcome is final. `keyed`: the order carries an
/// Idempotency-Key, so a `Place` whose fate is unknown may be sent again; `left`: time until the
/// order's answer is due.
pub fn next(keyed: bool, tried: &Tried, left: Duration) -> Next {
    let worth_retrying = match tried {
        Tried::Answered(reply) => match reply {
            // Nothing was recorded (the replica does not lead, or could not start), or the key's
            // order is not readable on the leader yet: the same `Place` is safe to send again.
            OrdersReply::Unavailable(_) | OrdersReply::NotLeader { .. } => true,
            // The leader proposed the order and no majority answered in time: it may commit.
            OrdersReply::Uncertain(_) => keyed,
            _ => false,
        },
        Tried::Failed(e) => match e {
            CallError::Unreachable { .. } | CallError::NoLeader { .. } | CallError::Busy { .. } => true,
            CallError::Lost { .. } | CallError::TimedOut { .. } => keyed,
            CallError::Rejected { .. } => false,
        },
        Tried::LeaderMoved { .. } => keyed,
    };
    if worth_retrying && left >= LEAST_TRY {
        Next::Retry
    } else {
        Next::Answer
    }
}

/// What [`Client::place`] answers: the leader's reply, or why none came.
pub type Placed = Result<OrdersReply, CallError>;

/// Places `order` on its shard's leader (see the module doc): tries until an answer is final by
/// [`next`] or the budget is spent. Each try asks the leader to wait for the saga only as long as
/// the budget has left (a try with none left answers pending at once: 202).
async fn place_order(cluster: &Cluster, order: PlaceOrder, budget: Budget, traceparent: &str) -> Placed {
    let (shard, keyed) = (order.shard, order.idempotency.is_some());
    let mut pause = FIRST_PAUSE;
    let mut tries = 0u32;
    loop {
        tries += 1;
        let now = Instant::now();
        let place = PlaceOrder { wait_ms: budget.wait_left(now).as_millis() as u64, ..order.clone() };
        let req = OrdersRequest::Place(place);
        let leader = cluster.leader_of(Capability::Orders, shard);
        let call =
            cluster.call_leader::<_, OrdersReply>(Capability::Orders, shard, &req, traceparent, budget.left(now));
        let tried = if keyed {
            // A keyed `Place` need not wait out a leader that was replaced: the new one answers
            // for the key. (Without a key the call must run its course: dropping it could leave
            // an order the client never hears of, and a retry would place a second.)
            tokio::select! {
                r = call => tried_from(r),
                Some(_) = cluster.new_leader(Capability::Orders, shard, leader.as_deref(), budget.left(now)) => {
                    Tried::LeaderMoved { from: leader.clone() }
                }
            }
        } else {
            tried_from(call.await)
        };
        let left = budget.left(Instant::now());
        if next(keyed, &tried, left) == Next::Answer {
            if tries > 1 {
                tracing::debug!(shard, tries, ?tried, "order placed after retries");
            }
            return answer(tried, shard);
        }
        tracing::debug!(shard, tries, ?tried, "order not placed yet; asking the shard's leader again");
        // The node that failed (or the leader known before the try): wait for another one.
        let failed = match &tried {
            Tried::Failed(
                CallError::Unreachable { node, .. }
                | CallError::Lost { node, .. }
                | CallError::TimedOut { node, .. }
                | CallError::Busy { node, .. }
                | CallError::NoLeader { node, .. },
            ) => Some(node.clone()),
            Tried::LeaderMoved { .. } => None,
            _ => leader,
        };
        if matches!(tried, Tried::LeaderMoved { .. }) {
            // The new leader is known; a breath before asking it, so that a view of the
            // leadership that trails another (the watch behind the metrics) cannot spin this loop.
            tokio::time::sleep(MOVED_PAUSE.min(left)).await;
        } else {
            let bound = pause.min(left);
            let _ = cluster.new_leader(Capability::Orders, shard, failed.as_deref(), bound).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
}

fn tried_from(r: Placed) -> Tried {
    match r {
        Ok(reply) => Tried::Answered(reply),
        Err(e) => Tried::Failed(e),
    }
}

fn answer(tried: Tried, shard: u32) -> Placed {
    match tried {
        Tried::Answered(reply) => Ok(reply),
        Tried::Failed(e) => Err(e),
        Tried::LeaderMoved { from } => Err(CallError::Lost {
            capability: Capability::Orders.id(),
            node: from.unwrap_or_else(|| format!("orders shard {shard}")),
            reason: "its leadership moved while the order was in flight, and the budget ran out".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lost() -> CallError {
        CallError::Lost { capability: Capability::Orders.id(), node: "n1".into(), reason: "link closed".into() }
    }
    fn timed_out() -> CallError {
        CallError::TimedOut { capability: Capability::Orders.id(), node: "n1".into(), timeout_ms: 4000 }
    }
    fn unreachable() -> CallError {
        CallError::Unreachable { capability: Capability::Orders.id(), node: "n1".into(), reason: "down".into() }
    }
    const PLENTY: Duration = Duration::from_secs(2);

    #[test]
    fn a_keyed_order_whose_fate_is_unknown_is_asked_again() {
        for tried in [
            Tried::Failed(lost()),
            Tried::Failed(timed_out()),
            Tried::Answered(OrdersReply::Uncertain("no majority".into())),
            Tried::LeaderMoved { from: Some("n1".into()) },
        ] {
            assert_eq!(next(true, &tried, PLENTY), Next::Retry, "{tried:?}");
            // Without a key, a second try could place a second order.
            assert_eq!(next(false, &tried, PLENTY), Next::Answer, "{tried:?}");
        }
    }

    #[test]
    fn what_recorded_nothing_is_asked_again_with_or_without_a_key() {
        for tried in [
            Tried::Failed(unreachable()),
            Tried::Failed(CallError::NoLeader { capability: Capability::Orders.id(), shard: 0, node: "n2".into() }),
            Tried::Failed(CallError::Busy {
                capability: Capability::Orders.id(),
                node: "n1".into(),
                reason: "x".into(),
            }),
            Tried::Answered(OrdersReply::Unavailable("loading".into())),
            Tried::Answered(OrdersReply::NotLeader { leader: None }),
        ] {
            assert_eq!(next(true, &tried, PLENTY), Next::Retry, "{tried:?}");
            assert_eq!(next(false, &tried, PLENTY), Next::Retry, "{tried:?}");
        }
    }

    #[test]
    fn a_definite_answer_is_final() {
        let id = uuid::Uuid::nil();
        for tried in [
            Tried::Answered(OrdersReply::IdempotencyConflict { order_id: id }),
            Tried::Answered(OrdersReply::Refused("bad".into())),
            Tried::Answered(OrdersReply::NotFound),
            Tried::Failed(CallError::Rejected {
                capability: Capability::Orders.id(),
                node: "n1".into(),
                reason: "x".into(),
            }),
        ] {
            assert_eq!(next(true, &tried, PLENTY), Next::Answer, "{tried:?}");
        }
    }

    proptest! {
        /// With no time left, every outcome is the answer: the budget bounds the retries.
        #[test]
        fn nothing_is_retried_past_the_budget(keyed: bool, kind in 0usize..6, left_ms in 0u64..20) {
            let tried = match kind {
                0 => Tried::Failed(lost()),
                1 => Tried::Failed(timed_out()),
                2 => Tried::Failed(unreachable()),
                3 => Tried::Answered(OrdersReply::Unavailable("x".into())),
                4 => Tried::Answered(OrdersReply::Uncertain("x".into())),
                _ => Tried::LeaderMoved { from: None },
            };
            prop_assert_eq!(next(keyed, &tried, Duration::from_millis(left_ms)), Next::Answer);
        }
    }

    #[test]
    fn giving_up_after_a_leader_moved_says_the_order_may_exist() {
        match answer(Tried::LeaderMoved { from: Some("n1".into()) }, 0) {
            Err(CallError::Lost { node, .. }) => assert_eq!(node, "n1"),
            other => panic!("{other:?}"),
        }
    }
}
