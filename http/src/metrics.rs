//! `/metrics`: Prometheus text exposition of the node's counters, gauges and histograms.
//!
//! Counters and gauges that describe state (peers, Raft groups, links) are read from their owners
//! at scrape time. Latencies are histograms recorded where they happen through the `metrics`
//! facade and rendered by `metrics-exporter-prometheus` ([`install`]):
//!
//! | histogram | labels | recorded in |
//! |---|---|---|
//! | `bulkhead_http_request_duration_seconds` | method, route, status | `observe` |
//! | `bulkhead_cluster_call_duration_seconds` | capability, outcome | `Cluster::call_with_timeout` |
//! | `bulkhead_saga_step_duration_seconds` | step, outcome | the orders worker's saga steps |
//! | `bulkhead_raft_proposal_duration_seconds` | capability, outcome | `Replica::propose` |
//! | `bulkhead_group_commit_batch_size` | store | the store's group flusher (writes per flush) |
//! | `bulkhead_fdatasync_duration_seconds` | store | the same (flush + fdatasync) |
//!
//! Counters through the same facade: `bulkhead_cluster_requests_refused_total{capability, reason}`
//! (a request whose sender the gateway would not vouch for, `cluster/src/gateway.rs`).
//!
//! Caveat: the recorder is per process. Nodes run one per process; a test that starts several
//! in one process sees their histograms summed.

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use bulkhead_cluster::node::LinkRefusal;
use bulkhead_cluster::wire::WIRE_STATS;
use bulkhead_cluster::Status;

use crate::AppState;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets, in seconds: 0.5 ms (a local read) to 10 s (a saga waiting out a failover).
const SECONDS: [f64; 15] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Writes per group flush.
const BATCH: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Installs the process's histogram recorder (once; later calls return the same handle) and
/// starts its upkeep, which bounds what unscraped histograms hold. Call from inside the runtime.
pub fn install() -> Result<PrometheusHandle, String> {
    if let Some(h) = RECORDER.get() {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("bulkhead_group_commit_batch_size".into()), &BATCH))
        .map_err(|e| format!("metrics buckets: {e}"))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| format!("a metrics recorder is already installed: {e}"))?;
    let _ = RECORDER.set(handle.clone());
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Per Raft group this node holds a replica of: term, leader, indexes, lag, proposals.
fn raft_metrics(st: &AppState, line: &mut impl FnMut(&str, &str, &str, Vec<(String, u64)>)) {
    let replicas = st.cluster.raft().all();
    let per = |f: &dyn Fn(&bulkhead_cluster::raft::Replica, &bulkhead_cluster::raft::ShardStatus) -> u64| {
        replicas.iter().map(|r| (format!("{{group=\"{}\"}}", r.id), f(r, &r.status()))).collect::<Vec<_>>()
    };
    line("bulkhead_raft_term", "current Raft term of the group as this replica sees it", "gauge", per(&|_, s| s.term));
    line(
        "bulkhead_raft_is_leader",
        "1 if this node's replica leads the group",
        "gauge",
        per(&|r, _| u64::from(r.is_leader())),
    );
    line(
        "bulkhead_raft_leader_changes_total",
        "leader changes this replica saw (elections, hand-overs)",
        "counter",
        per(&|r, _| r.stats.leader_changes.load(Relaxed)),
    );
    line(
        "bulkhead_raft_last_log_index",
        "index of the last entry in this replica's log",
        "gauge",
        per(&|_, s| s.last_log_index.unwrap_or(0)),
    );
    line(
        "bulkhead_raft_applied_index",
        "index of the last entry applied to this replica's tables",
        "gauge",
        per(&|_, s| s.applied_index.unwrap_or(0)),
    );
    line(
        "bulkhead_raft_proposals_total",
        "commands this replica proposed as leader and saw applied",
        "counter",
        per(&|r, _| r.stats.proposals.load(Relaxed)),
    );
    line(
        "bulkhead_raft_proposal_micros_total",
        "total time from proposal to applied, in microseconds (divide by bulkhead_raft_proposals_total)",
        "counter",
        per(&|r, _| r.stats.proposal_micros.load(Relaxed)),
    );
    line(
        "bulkhead_raft_proposal_failures_total",
        "proposals that did not commit here (not the leader, no majority in time)",
        "counter",
        per(&|r, _| r.stats.proposal_failures.load(Relaxed)),
    );
    let mut lag = Vec::new();
    for r in replicas.iter().filter(|r| r.is_leader()) {
        for rep in r.status().replicas {
            if let Some(l) = rep.lag {
                lag.push((format!("{{group=\"{}\",node=\"{}\"}}", r.id, rep.node), l));
            }
        }
    }
    line(
        "bulkhead_raft_replication_lag",
        "entries a replica is behind its leader (reported by the leader)",
        "gauge",
        lag,
    );
}

#[utoipa::path(
    get, path = "/metrics", tag = "ops", operation_id = "metrics",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4.", body = String, content_type = "text/plain"))
)]
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
        "bulkhead_orders_shed_total",
        "POST /v1/orders refused with 429 because limits.orders_in_flight were already running",
        "counter",
        vec![(String::new(), m.shed.load(Relaxed))],
    );
    line(
        "bulkhead_orders_in_flight",
        "POST /v1/orders being handled by this node now (429 at limits.orders_in_flight)",
        "gauge",
        vec![(String::new(), st.orders_in_flight.running() as u64)],
    );
    line(
        "bulkhead_http_connections",
        "connections to the API open now (refused past [http] max_connections)",
        "gauge",
        vec![(String::new(), m.connections_open.load(Relaxed))],
    );
    line(
        "bulkhead_http_connections_refused_total",
        "connections answered 503 and closed because [http] max_connections were open",
        "counter",
        vec![(String::new(), m.connections_refused.load(Relaxed))],
    );
    line(
        "bulkhead_http_connections_refused_per_address_total",
        "connections answered 503 and closed because their client address held [http] max_connections_per_address",
        "counter",
        vec![(String::new(), m.connections_refused_per_address.load(Relaxed))],
    );
    line(
        "bulkhead_http_request_timeouts_total",
        "requests answered 408 because they took longer than [http] request_timeout_ms (a slow body included)",
        "counter",
        vec![(String::new(), m.request_timeouts.load(Relaxed))],
    );
    line(
        "bulkhead_http_refused_total",
        "requests refused before their handler: 401 (no or unknown token), 403 (token scope too small), 429 ([rate_limit])",
        "counter",
        vec![
            ("{reason=\"unauthenticated\"}".into(), m.unauthenticated.load(Relaxed)),
            ("{reason=\"forbidden\"}".into(), m.forbidden.load(Relaxed)),
            ("{reason=\"rate_limited\"}".into(), m.rate_limited.load(Relaxed)),
        ],
    );
    line(
        "bulkhead_http_internal_errors_total",
        "requests answered 500 (a handler panicked; the panic is logged)",
        "counter",
        vec![(String::new(), m.internal_errors.load(Relaxed))],
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
        "bulkhead_cluster_links_refused_total",
        "cluster connections refused: connection_cap / handshake_cap / address_cap ([limits] cluster_connections / cluster_handshakes / cluster_handshakes_per_address), tls (failed or no TLS handshake: garbage, no or a foreign certificate), garbage (not a cluster handshake), wrong_name (a claim the certificate does not name), stranger (a node the shard map does not name), handshake (wrong cookie or no answer)",
        "counter",
        LinkRefusal::ALL
            .iter()
            .map(|r| (format!("{{reason=\"{}\"}}", r.as_str()), c.links_refused[*r as usize].load(Relaxed)))
            .collect(),
    );
    line(
        "bulkhead_cluster_heartbeats_refused_total",
        "heartbeats dropped because they did not come over a link of the node they name",
        "counter",
        vec![(String::new(), c.heartbeats_refused.load(Relaxed))],
    );
    line(
        "bulkhead_cluster_raft_rpcs_refused_total",
        "Raft RPCs refused: not over a link of the node they name, or naming another node's member",
        "counter",
        vec![(String::new(), c.raft_refused.load(Relaxed))],
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
    let sweeps: Vec<(u32, bulkhead_actors::orders::SweepCounts)> =
        bulkhead_actors::orders::SWEEPS.lock().map(|m| m.iter().map(|(k, v)| (*k, *v)).collect()).unwrap_or_default();
    line(
        "bulkhead_idempotency_sweeps_total",
        "idempotency sweeps this node finished as an orders shard's leader (taking a shard over runs one)",
        "counter",
        sweeps.iter().map(|(s, c)| (format!("{{shard=\"{s}\"}}"), c.sweeps)).collect(),
    );
    line(
        "bulkhead_idempotency_keys_forgotten_total",
        "idempotency keys those sweeps forgot because the group's time passed their retention",
        "counter",
        sweeps.iter().map(|(s, c)| (format!("{{shard=\"{s}\"}}"), c.keys_forgotten)).collect(),
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
    let (mut writes, mut deferred, mut folds, mut flushes) = (vec![], vec![], vec![], vec![]);
    for r in st.cluster.raft().all() {
        let labels = format!("{{capability=\"{}\",shard=\"{}\"}}", r.id.capability, r.id.shard);
        let stats = r.store().stats();
        writes.push((labels.clone(), stats.writes.load(Relaxed)));
        deferred.push((labels.clone(), stats.deferred.load(Relaxed)));
        folds.push((labels.clone(), stats.folds.load(Relaxed)));
        flushes.push((labels, stats.flushes.load(Relaxed)));
    }
    line(
        "bulkhead_store_writes_total",
        "records written to sled per store (one per local shard replica)",
        "counter",
        writes,
    );
    line(
        "bulkhead_store_deferred_writes_total",
        "records applies wrote behind, into the store's overlay, before folds kept the last of each",
        "counter",
        deferred,
    );
    line("bulkhead_store_folds_total", "folds of the overlay into sled per store", "counter", folds);
    line("bulkhead_store_flushes_total", "group flushes per store", "counter", flushes);
    raft_metrics(&st, &mut line);
    if let Some(h) = RECORDER.get() {
        out.push_str(&h.render());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
