//! The breaker on the real call path (`Cluster::call`): a member that keeps losing requests trips
//! its breaker after 5 failures, further calls fail fast as `Unreachable` without reaching it, and
//! after the cool-down one probe goes through and closes it. One node calling its own gateway: the
//! call path is the same as for a remote member. A test binary of its own (ractor's registries are
//! per process).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;
use support::{Ping, Pong};

use bulkhead_cluster::config::CapabilityPlacement;
use bulkhead_cluster::gateway::worker_name;
use bulkhead_cluster::{
    BreakerState, CallError, CapabilityId, Cluster, ClusterConfig, Gateway, GatewayArgs, Inbound, ShardMap,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;

/// A capability id, as the layer above would give one.
const PAYMENTS: CapabilityId = CapabilityId(2);

#[derive(RactorMessage)]
enum FlakyMsg {
    Req(Inbound<Ping, Pong>),
}

/// Drops every request unanswered (the caller sees `Lost`) until `healthy` is set.
struct Flaky {
    healthy: Arc<AtomicBool>,
    seen: Arc<AtomicUsize>,
}

impl Actor for Flaky {
    type Msg = FlakyMsg;
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<FlakyMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
    async fn handle(&self, _: ActorRef<FlakyMsg>, msg: FlakyMsg, _: &mut ()) -> Result<(), ActorProcessingErr> {
        let FlakyMsg::Req(Inbound { req, reply, .. }) = msg;
        self.seen.fetch_add(1, Ordering::Relaxed);
        if self.healthy.load(Ordering::Relaxed) {
            let _ = reply.send(Pong(req.0));
        }
        Ok(())
    }
}

/// One node, no peers, no HTTP, plain TCP: nothing here crosses a network.
fn config() -> ClusterConfig {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let on_a = CapabilityPlacement::on(&["a"]);
    let map = ShardMap((0..5).map(|c| (CapabilityId(c), on_a.clone())).collect());
    ClusterConfig::plain("a", std::net::SocketAddr::from(([127, 0, 0, 1], port)), "test", map)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_member_trips_its_breaker_and_a_successful_probe_closes_it() {
    let cluster = Cluster::start(config()).await.expect("cluster");
    let (healthy, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    Actor::spawn(Some(worker_name(PAYMENTS)), Flaky { healthy: healthy.clone(), seen: seen.clone() }, ())
        .await
        .expect("worker");
    let args = GatewayArgs {
        capability: PAYMENTS,
        node: "a".into(),
        wrap: FlakyMsg::Req,
        worker_timeout: Duration::from_secs(5),
        max_in_flight: 64,
        peers: cluster.sender_roles(),
    };
    Actor::spawn(None, Gateway::<Ping, Pong, FlakyMsg>::default(), args).await.expect("gateway");
    let t = Duration::from_secs(2);
    let ask = |n| {
        let c = cluster.clone();
        async move { c.call_with_timeout::<Ping, Pong>(PAYMENTS, "a", &Ping(n), "", t).await }
    };

    for n in 0..5 {
        let r = ask(n).await;
        assert!(matches!(r, Err(CallError::Lost { .. })), "{r:?}");
    }
    assert_eq!(seen.load(Ordering::Relaxed), 5);
    let states = cluster.breaker_states();
    assert_eq!(states.get(&(PAYMENTS, "a".to_string())), Some(&BreakerState::Open), "{states:?}");

    // Open: fails fast, nothing sent, counted.
    let tripped_at = Instant::now();
    match ask(5).await {
        Err(CallError::Unreachable { reason, .. }) => assert!(reason.contains("circuit breaker open"), "{reason}"),
        other => panic!("expected a fail-fast Unreachable, got {other:?}"),
    }
    assert_eq!(seen.load(Ordering::Relaxed), 5, "an open breaker sends nothing");
    assert_eq!(cluster.metrics().breaker_rejections.load(Ordering::Relaxed), 1);

    // After the cool-down (at most 500 ms for a first trip) the next call is the probe.
    healthy.store(true, Ordering::Relaxed);
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    let pong = loop {
        poll.tick().await;
        match ask(6).await {
            Ok(p) => break p,
            Err(CallError::Unreachable { .. }) => {
                assert!(tripped_at.elapsed() < Duration::from_secs(3), "the breaker never let a probe through")
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(pong, Pong(6));
    assert_eq!(seen.load(Ordering::Relaxed), 6, "exactly one probe reached the member");
    let states = cluster.breaker_states();
    assert_eq!(states.get(&(PAYMENTS, "a".to_string())), Some(&BreakerState::Closed));
    cluster.shutdown();
}
