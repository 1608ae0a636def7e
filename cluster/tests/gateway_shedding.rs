//! The gateway's in-flight bound: a worker that holds every request (as a slow one would) fills it,
//! the next request is refused at once as `unavailable` (nothing handed over), and a slot frees as
//! soon as an answer goes out. A test binary of its own: ractor's registries are per process.

use std::sync::{Arc, Mutex};
use std::time::Duration;

mod support;
use support::{sender, NamedMembers, Ping, Pong};

use bulkhead_cluster::call::call;
use bulkhead_cluster::gateway::{worker_name, GATEWAY_SHED};
use bulkhead_cluster::{CallError, CapabilityId, Gateway, GatewayArgs, Inbound};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;

/// A capability id, as the layer above would give one.
const PAYMENTS: CapabilityId = CapabilityId(2);

#[derive(RactorMessage)]
enum HoldMsg {
    Req(Inbound<Ping, Pong>),
}

type Held = Arc<Mutex<Vec<(u32, RpcReplyPort<Pong>)>>>;

/// A worker that answers nothing by itself: the test releases the held replies.
struct Hold(Held);

impl Actor for Hold {
    type Msg = HoldMsg;
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<HoldMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
    async fn handle(&self, _: ActorRef<HoldMsg>, msg: HoldMsg, _: &mut ()) -> Result<(), ActorProcessingErr> {
        let HoldMsg::Req(Inbound { req, reply, .. }) = msg;
        self.0.lock().expect("lock").push((req.0, reply));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_gateway_sheds_at_once_and_recovers_when_answers_go_out() {
    let held: Held = Arc::default();
    Actor::spawn(Some(worker_name(PAYMENTS)), Hold(held.clone()), ()).await.expect("worker");
    let args = GatewayArgs {
        capability: PAYMENTS,
        node: "a".into(),
        wrap: HoldMsg::Req,
        worker_timeout: Duration::from_secs(10),
        max_in_flight: 2,
        peers: Arc::new(NamedMembers(&["a"])),
    };
    let (gw, _) = Actor::spawn(None, Gateway::<Ping, Pong, HoldMsg>::default(), args).await.expect("gateway");
    let t = Duration::from_secs(5);
    let ask = |n: u32| {
        let gw = gw.clone();
        tokio::spawn(async move { call::<Ping, Pong>(&gw, PAYMENTS, "a", sender("a"), &Ping(n), "", t).await })
    };
    let (first, second) = (ask(1), ask(2));
    // Readiness, not a sleep: wait until the worker holds both.
    while held.lock().expect("lock").len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = GATEWAY_SHED.load(std::sync::atomic::Ordering::Relaxed);
    let started = std::time::Instant::now();
    let third = ask(3).await.expect("join");
    match &third {
        Err(e @ CallError::Busy { reason, .. }) => {
            assert!(reason.contains("shedding load"), "{reason}");
            assert!(e.is_transient() && e.nothing_recorded());
        }
        other => panic!("expected a shed rejection, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(1), "shedding must not wait");
    assert_eq!(GATEWAY_SHED.load(std::sync::atomic::Ordering::Relaxed), before + 1);
    assert_eq!(held.lock().expect("lock").len(), 2, "the shed request never reached the worker");

    // Answer one: its slot frees, and a new request is handed over again.
    let (n, port) = held.lock().expect("lock").remove(0);
    port.send(Pong(n)).expect("reply");
    let done = if n == 1 { first } else { second };
    assert_eq!(done.await.expect("join"), Ok(Pong(n)));
    let fourth = ask(4);
    while held.lock().expect("lock").len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (n, port) in held.lock().expect("lock").drain(..) {
        port.send(Pong(n)).expect("reply");
    }
    assert_eq!(fourth.await.expect("join"), Ok(Pong(4)));
}
