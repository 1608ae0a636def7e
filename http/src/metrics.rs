//! `/metrics`: Prometheus text exposition of the node's counters.

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use bulkhead_cluster::wire::WIRE_STATS;
use bulkhead_cluster::{Capability, Status};

use crate::AppState;

pub async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    let mut out = String::new();
    let mut line = |name: &str, help: &str, kind: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let m = &st.metrics;
    line(
        "bulkhead_orders_placed_total",
        "POST /v1/orders accepted for processing by this node",
        "counter",
        vec![(String::new(), m.placed.load(Relaxed))],
    );
    line(
        "bulkhead_orders_answered_total",
        "POST /v1/orders answers by outcome",
        "counter",
        vec![
            ("{outcome=\"confirmed\"}".into(), m.confirmed.load(Relaxed)),
            ("{outcome=\"pending\"}".into(), m.pending.load(Relaxed)),
            ("{outcome=\"cancelled\"}".into(), m.cancelled.load(Relaxed)),
        ],
    );
    line(
        "bulkhead_orders_unwitnessed_total",
        "keyed orders sent to their home without the successor's witness (it was unreachable)",
        "counter",
        vec![(String::new(), m.unwitnessed.load(Relaxed))],
    );
    if let Some(store) = st.stores.get(&Capability::Orders) {
        line(
            "bulkhead_orders_pending_witnesses",
            "Idempotency-Keys this node must still get witnessed by (or hand to) the other orders node",
            "gauge",
            vec![(String::new(), bulkhead_actors::orders::actor::UNWITNESSED.len(store) as u64)],
        );
    }
    line(
        "bulkhead_orders_duplicate_keys_total",
        "Idempotency-Keys found placed on both orders nodes (should stay 0)",
        "counter",
        vec![(String::new(), bulkhead_actors::orders::DUPLICATE_KEYS.load(Relaxed))],
    );
    line(
        "bulkhead_orders_shed_total",
        "POST /v1/orders refused with 429 because limits.orders_in_flight were already running",
        "counter",
        vec![(String::new(), m.shed.load(Relaxed))],
    );
    let limit = st.cluster.config().limits.orders_in_flight;
    line(
        "bulkhead_orders_in_flight",
        "POST /v1/orders being handled by this node now (429 at limits.orders_in_flight)",
        "gauge",
        vec![(String::new(), limit.saturating_sub(st.orders_in_flight.available_permits()) as u64)],
    );
    let c = st.cluster.metrics();
    line(
        "bulkhead_cluster_calls_total",
        "cross-node calls made",
        "counter",
        vec![(String::new(), c.calls.load(Relaxed))],
    );
    line(
        "bulkhead_cluster_call_errors_total",
        "cross-node calls that failed",
        "counter",
        vec![(String::new(), c.call_errors.load(Relaxed))],
    );
    line(
        "bulkhead_cluster_peer_downs_total",
        "peers declared down",
        "counter",
        vec![(String::new(), c.downs.load(Relaxed))],
    );
    line(
        "bulkhead_cluster_refused_peers_total",
        "peers refused for a different shard map",
        "counter",
        vec![(String::new(), c.refused_peers.load(Relaxed))],
    );
    line(
        "bulkhead_breaker_rejected_calls_total",
        "cross-node calls failed fast because the member's circuit breaker was open",
        "counter",
        vec![(String::new(), c.breaker_rejections.load(Relaxed))],
    );
    line(
        "bulkhead_gateway_shed_total",
        "requests a capability gateway on this node refused because limits.gateway_in_flight were unanswered",
        "counter",
        vec![(String::new(), bulkhead_cluster::gateway::GATEWAY_SHED.load(Relaxed))],
    );
    line(
        "bulkhead_dead_letters_total",
        "outbox entries this node's relay moved to the dead letters since it started",
        "counter",
        vec![(String::new(), bulkhead_actors::orders::DEAD_LETTERED.load(Relaxed))],
    );
    let breakers = st
        .cluster
        .breaker_states()
        .into_iter()
        .map(|((cap, node), state)| (format!("{{capability=\"{cap}\",node=\"{node}\"}}"), state.gauge()))
        .collect();
    line(
        "bulkhead_breaker_state",
        "circuit breaker per (capability, member) called from here: 0 closed, 1 half-open, 2 open",
        "gauge",
        breakers,
    );
    line(
        "bulkhead_wire_undecodable_total",
        "cluster messages that could not be decoded",
        "counter",
        vec![
            ("{part=\"envelope\"}".into(), WIRE_STATS.undecodable_envelopes.load(Relaxed)),
            ("{part=\"payload\"}".into(), WIRE_STATS.undecodable_payloads.load(Relaxed)),
        ],
    );
    let status = st
        .cluster
        .view()
        .values()
        .map(|n| {
            let v = match n.status {
                Status::Up => 2,
                Status::Suspect => 1,
                Status::Down => 0,
            };
            (format!("{{node=\"{}\"}}", n.name), v)
        })
        .collect();
    line("bulkhead_node_status", "peer status as seen from here: 2 up, 1 suspect, 0 down", "gauge", status);
    let mut writes = vec![];
    let mut flushes = vec![];
    for (cap, s) in st.stores.iter() {
        writes.push((format!("{{capability=\"{cap}\"}}"), s.stats().writes.load(Relaxed)));
        flushes.push((format!("{{capability=\"{cap}\"}}"), s.stats().flushes.load(Relaxed)));
    }
    line("bulkhead_store_writes_total", "records written per store", "counter", writes);
    line("bulkhead_store_flushes_total", "group flushes per store", "counter", flushes);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
