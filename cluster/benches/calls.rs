//! Measures `call::call` to a gateway, in-process and over a ractor_cluster link, 1 and 64 in flight; and seal/open.
//! Every order makes several such calls (reserve per shard, charge): they bound an order's latency and rate.

#[path = "../tests/support/mod.rs"]
mod support;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{sender, Duplex, Echo, EchoMsg, NamedMembers};

use bulkhead_cluster::call::call;
use bulkhead_cluster::gateway::{group_name, worker_name};
use bulkhead_cluster::wire::{new_traceparent, open, seal, WireMsg};
use bulkhead_cluster::{CapabilityId, Gateway, GatewayArgs};
use bulkhead_codec::Record;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ractor::{Actor, ActorRef};
use ractor_cluster::{NodeServer, NodeServerMessage};
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;

/// A capability id, as the layer above would give one.
const STOCK: CapabilityId = CapabilityId(1);
/// A capability id, as the layer above would give one.
const SAGA: CapabilityId = CapabilityId(0);

/// Shaped like an inventory reserve: an order id and a few lines.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reserve {
    order_id: u128,
    items: Vec<(String, u64)>,
    ttl_ms: u64,
}
impl Record for Reserve {
    const VERSION: u8 = 1;
}
impl bulkhead_cluster::SentBy for Reserve {
    fn sent_by(&self) -> bulkhead_cluster::Role {
        bulkhead_cluster::Role::Hosts(SAGA)
    }
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Reserved {
    order_id: u128,
    lines: u32,
    expires_ms: u64,
}
impl Record for Reserved {
    const VERSION: u8 = 1;
}

fn request(n: u128) -> Reserve {
    Reserve {
        order_id: n,
        items: vec![("SKU-RED-MUG-0001".into(), 2), ("SKU-GREEN-BOWL-0013".into(), 4)],
        ttl_ms: 600_000,
    }
}

async fn node(name: &str) -> ActorRef<NodeServerMessage> {
    let server = NodeServer::new(0, "cookie".into(), name.into(), "localhost".into(), None, None);
    Actor::spawn(None, server, ()).await.expect("node server").0
}

/// The worker and the inventory gateway of node "b", both in this process: returns the local gateway.
async fn local_gateway() -> ActorRef<WireMsg> {
    Actor::spawn(
        Some(worker_name(STOCK)),
        Echo::<Reserve, Reserved> {
            answer: |req| Reserved { order_id: req.order_id, lines: req.items.len() as u32, expires_ms: 1 },
        },
        (),
    )
    .await
    .expect("worker");
    let args = GatewayArgs {
        capability: STOCK,
        node: "b".into(),
        wrap: EchoMsg::<Reserve, Reserved>::Req,
        worker_timeout: Duration::from_secs(5),
        max_in_flight: 1024,
        peers: Arc::new(NamedMembers(&["a", "b"])),
    };
    Actor::spawn(None, Gateway::<Reserve, Reserved, EchoMsg<Reserve, Reserved>>::default(), args)
        .await
        .expect("gateway")
        .0
}

/// Nodes "a" and "b" joined over an in-memory duplex; returns the remote stub of b's gateway.
async fn remote_gateway() -> ActorRef<WireMsg> {
    let (a, b) = (node("a").await, node("b").await);
    let (a_end, b_end) = tokio::io::duplex(1 << 16);
    ractor_cluster::client_connect_external(&a, Box::new(Duplex(a_end))).await.expect("connect");
    b.cast(NodeServerMessage::ConnectionOpenedExternal { stream: Box::new(Duplex(b_end)), is_server: true })
        .expect("b accepts");
    let group = group_name(STOCK, "b");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(cell) = ractor::pg::get_members(&group).into_iter().find(|c| !c.get_id().is_local()) {
            return cell.into();
        }
        assert!(tokio::time::Instant::now() < deadline, "the gateway never appeared across the link");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const TIMEOUT: Duration = Duration::from_secs(5);
const IN_FLIGHT: usize = 64;

async fn one(gw: &ActorRef<WireMsg>, req: &Reserve, tp: &str) {
    let r: Reserved = call(gw, STOCK, "b", sender("a"), req, tp, TIMEOUT).await.expect("call");
    debug_assert_eq!(r.order_id, req.order_id);
}

/// Runs `iters` rounds of `batch` calls (sequential when `batch` is 1) from a task on the runtime,
/// as the saga's caller would, and times them there: `block_on` from the bench thread would add a
/// cross-thread wake-up per round that no caller in a node pays.
fn timed(rt: &Runtime, gw: &ActorRef<WireMsg>, reqs: &Arc<Vec<Reserve>>, iters: u64) -> Duration {
    let (gw, reqs, tp) = (gw.clone(), reqs.clone(), new_traceparent());
    rt.block_on(async move {
        tokio::spawn(async move {
            let started = Instant::now();
            for _ in 0..iters {
                if let [req] = &reqs[..] {
                    one(&gw, req, &tp).await;
                } else {
                    futures::future::join_all(reqs.iter().map(|req| one(&gw, req, &tp))).await;
                }
            }
            started.elapsed()
        })
        .await
        .expect("bench task")
    })
}

fn bench_path(c: &mut Criterion, rt: &Runtime, name: &str, gw: &ActorRef<WireMsg>) {
    let single = Arc::new(vec![request(1)]);
    let batch: Arc<Vec<_>> = Arc::new((0..IN_FLIGHT as u128).map(request).collect());
    let mut g = c.benchmark_group(name);
    g.sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(1));
    g.bench_function("sequential", |b| b.iter_custom(|iters| timed(rt, gw, &single, iters)));
    g.throughput(Throughput::Elements(IN_FLIGHT as u64));
    g.bench_function(format!("in_flight_{IN_FLIGHT}"), |b| b.iter_custom(|iters| timed(rt, gw, &batch, iters)));
    g.finish();
}

fn calls(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    let tp = new_traceparent();
    let req = request(7);
    let mut g = c.benchmark_group("wire");
    g.bench_function("seal_open", |b| {
        b.iter(|| open::<Reserve>(&seal(black_box(&req), &tp), "bench").expect("open").1)
    });
    g.finish();

    let local = rt.block_on(local_gateway());
    bench_path(c, &rt, "call_local", &local);
    let remote = rt.block_on(remote_gateway());
    bench_path(c, &rt, "call_remote", &remote);
}

criterion_group!(benches, calls);
criterion_main!(benches);
