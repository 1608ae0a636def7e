//! Two ractor_cluster nodes in one process, joined over an in-memory link the test controls
//! (`client_connect_external`), so a link can be cut cleanly (EOF) or silently (a black hole).
//! What crosses the link is the real thing: our envelope, the gateway, the timed call path.
//!
//! (ractor's registries are per process, so a whole Bulkhead node per NodeServer cannot share one
//! process; the full stack is tested with real processes in the root package's tests/.)

mod support;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::{sender, Duplex, Echo, EchoMsg, NamedMembers, Ping, Pong};

use bulkhead_cluster::call::call;
use bulkhead_cluster::gateway::{group_name, worker_name};
use bulkhead_cluster::wire::{WireMsg, WIRE_STATS};
use bulkhead_cluster::{CallError, CapabilityId, Gateway, GatewayArgs};
use bulkhead_codec::Record;
use ractor::{Actor, ActorRef};
use ractor_cluster::{NodeServer, NodeServerMessage};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;

/// A capability id, as the layer above would give one.
const STOCK: CapabilityId = CapabilityId(1);

/// A request of another shape than the gateway expects.
#[derive(Debug, Serialize, Deserialize)]
struct Other(String);
impl Record for Other {
    const VERSION: u8 = 1;
}

/// A link between two nodes: bytes are relayed while `mode` is `Pass`; `Blackhole` stops
/// forwarding but keeps both ends open (a cut cable); `Sever` closes both ends (a dead process).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Pass,
    Blackhole,
    Sever,
}

fn link() -> (Duplex, Duplex, watch::Sender<Mode>) {
    let (a_end, a_relay) = tokio::io::duplex(1 << 16);
    let (b_end, b_relay) = tokio::io::duplex(1 << 16);
    let (tx, rx) = watch::channel(Mode::Pass);
    let (ar, aw) = tokio::io::split(a_relay);
    let (br, bw) = tokio::io::split(b_relay);
    tokio::spawn(pump(ar, bw, rx.clone()));
    tokio::spawn(pump(br, aw, rx));
    (Duplex(a_end), Duplex(b_end), tx)
}

async fn pump(
    mut from: tokio::io::ReadHalf<DuplexStream>,
    mut to: tokio::io::WriteHalf<DuplexStream>,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 1 << 14];
    loop {
        tokio::select! {
            n = from.read(&mut buf) => {
                let Ok(n) = n else { return };
                if n == 0 { return; }
                let m = *mode.borrow();
                match m {
                    Mode::Pass => { if to.write_all(&buf[..n]).await.is_err() { return; } }
                    Mode::Blackhole => {}
                    Mode::Sever => return,
                }
            }
            r = mode.changed() => {
                let severed = r.is_err() || *mode.borrow() == Mode::Sever;
                if severed { return; }
            }
        }
    }
}

async fn node(name: &str) -> ActorRef<NodeServerMessage> {
    let server = NodeServer::new(0, "cookie".into(), name.into(), "localhost".into(), None, None);
    Actor::spawn(None, server, ()).await.expect("node server").0
}

/// The remote stub of b's inventory gateway, once pg has synchronised over the link.
async fn remote_gateway() -> ActorRef<WireMsg> {
    let group = group_name(STOCK, "b");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut poll = tokio::time::interval(Duration::from_millis(10));
    loop {
        poll.tick().await;
        if let Some(cell) = ractor::pg::get_members(&group).into_iter().find(|c| !c.get_id().is_local()) {
            return cell.into();
        }
        assert!(tokio::time::Instant::now() < deadline, "the gateway never appeared across the link");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_cross_a_real_link_and_fail_fast_or_time_out_when_it_is_cut() {
    let (a, b) = (node("a").await, node("b").await);
    Actor::spawn(Some(worker_name(STOCK)), Echo::<Ping, Pong> { answer: |p| Pong(p.0 + 1) }, ()).await.unwrap();
    let args = GatewayArgs {
        capability: STOCK,
        node: "b".into(),
        wrap: EchoMsg::<Ping, Pong>::Req,
        worker_timeout: Duration::from_secs(5),
        max_in_flight: 1024,
        peers: std::sync::Arc::new(NamedMembers(&["a", "b"])),
    };
    Actor::spawn(None, Gateway::<Ping, Pong, EchoMsg<Ping, Pong>>::default(), args).await.unwrap();

    let (a_end, b_end, control) = link();
    ractor_cluster::client_connect_external(&a, Box::new(a_end)).await.unwrap();
    b.cast(NodeServerMessage::ConnectionOpenedExternal { stream: Box::new(b_end), is_server: true }).unwrap();

    let gw = remote_gateway().await;
    let t = Duration::from_secs(2);
    let pong: Pong = call(&gw, STOCK, "b", sender("a"), &Ping(41), "00-trace-span-01", t).await.unwrap();
    assert_eq!(pong, Pong(42));

    // A sender the gateway cannot vouch for is refused before its worker sees the request.
    let stranger: Result<Pong, CallError> = call(&gw, STOCK, "b", sender("x"), &Ping(1), "", t).await;
    assert!(
        matches!(&stranger, Err(CallError::Busy { reason, .. }) if reason.contains("did not come over a link")),
        "{stranger:?}"
    );

    // A request the gateway cannot decode is answered "rejected" and counted, not dropped silently.
    let before = WIRE_STATS.undecodable_envelopes.load(Ordering::Relaxed);
    let raw = gw.call(|port| WireMsg::Ask(vec![0xde, 0xad], port), Some(t)).await.unwrap();
    assert!(matches!(raw, ractor::rpc::CallResult::Success(_)));
    assert!(WIRE_STATS.undecodable_envelopes.load(Ordering::Relaxed) > before);
    let wrong: Result<Pong, CallError> = call(&gw, STOCK, "b", sender("a"), &Other("not a ping".into()), "", t).await;
    assert!(matches!(wrong, Err(CallError::Rejected { .. })), "{wrong:?}");

    // A silent cut: the call does not hang, it times out.
    control.send(Mode::Blackhole).unwrap();
    let started = std::time::Instant::now();
    let r: Result<Pong, CallError> = call(&gw, STOCK, "b", sender("a"), &Ping(1), "", Duration::from_millis(300)).await;
    assert!(matches!(r, Err(CallError::TimedOut { .. })), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // A severed link: the stub goes away and pending/next calls fail as unreachable.
    control.send(Mode::Sever).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r: Result<Pong, CallError> =
            call(&gw, STOCK, "b", sender("a"), &Ping(1), "", Duration::from_millis(300)).await;
        if matches!(r, Err(CallError::Unreachable { .. })) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "calls over a severed link never became unreachable: {r:?}");
    }
    assert!(ractor::pg::get_members(&group_name(STOCK, "b")).iter().all(|c| c.get_id().is_local()));
}
