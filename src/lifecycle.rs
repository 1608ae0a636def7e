//! Stopping a node (SIGTERM or SIGINT) without failing a request it accepted: the drain's steps,
//! in order, each with its bound ([`Step`], [`Bounds`]: pure), and [`drain`], which runs them.
//!
//! 1. `announce`: `/readyz` answers `503 {"status":"draining"}`; heartbeats tell the peers this
//!    node's capabilities are unhealthy, so none hands a Raft leadership back to it.
//! 2. `grace` (`[http] drain_grace_ms`): everything is still served while load balancers notice.
//! 3. `refuse`: new requests get `503 {"error":"draining"}` + `Retry-After` (watch endpoints answer).
//! 4. `in_flight` (`[http] drain_timeout_ms`): requests already admitted finish.
//! 5. `hand_over`: every Raft group this node leads is handed to an up-to-date replica (a Raft
//!    election the target can only win with every entry); what could not be is logged.
//! 6. `close_http`: the listener closes (only now: `/readyz` said 503 the whole time before).
//! 7. `stop_capabilities`, 8. `flush_stores`, 9. `stop_cluster`; then the process exits 0.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_actors::Capabilities;
use bulkhead_cluster::raft::group::hand_over_all;
use bulkhead_cluster::Cluster;
use bulkhead_http::drain::{Drain, Phase};
use bulkhead_http::HttpEdge;
use bulkhead_http::HttpMsg;
use ractor::ActorRef;

use crate::systemd::Systemd;

/// One step of a drain, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Announce,
    Grace,
    Refuse,
    InFlight,
    HandOver,
    CloseHttp,
    StopCapabilities,
    FlushStores,
    StopCluster,
}

impl Step {
    pub const ORDER: [Step; 9] = [
        Step::Announce,
        Step::Grace,
        Step::Refuse,
        Step::InFlight,
        Step::HandOver,
        Step::CloseHttp,
        Step::StopCapabilities,
        Step::FlushStores,
        Step::StopCluster,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::Announce => "announce",
            Step::Grace => "grace",
            Step::Refuse => "refuse",
            Step::InFlight => "in_flight",
            Step::HandOver => "hand_over",
            Step::CloseHttp => "close_http",
            Step::StopCapabilities => "stop_capabilities",
            Step::FlushStores => "flush_stores",
            Step::StopCluster => "stop_cluster",
        }
    }

    /// The `STATUS=` line systemd shows while this step runs.
    pub fn status(self) -> &'static str {
        match self {
            Step::Announce | Step::Grace => "draining: /readyz says 503, still serving while load balancers notice",
            Step::Refuse | Step::InFlight => "draining: refusing new requests, finishing those in flight",
            Step::HandOver => "draining: handing Raft leaderships to other replicas",
            Step::CloseHttp => "draining: closing the HTTP listener",
            Step::StopCapabilities => "draining: stopping capabilities",
            Step::FlushStores => "draining: flushing stores",
            Step::StopCluster => "draining: leaving the cluster",
        }
    }
}

/// How long each step may take at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub grace: Duration,
    pub in_flight: Duration,
    pub hand_over: Duration,
    pub close_http: Duration,
    pub stop_capabilities: Duration,
    pub flush_stores: Duration,
}

/// One hand-over takes up to ~2.3 s (catch-up pause, `TakeLead`, the election); groups go at once,
/// and this leaves room to try each again.
pub const HAND_OVER_BOUND: Duration = Duration::from_secs(5);
/// Closing the listener and connections that are idle by now (nothing is in flight any more).
pub const CLOSE_HTTP_BOUND: Duration = Duration::from_secs(2);
/// Stopping the capabilities' supervisors and Raft replicas.
pub const STOP_CAPABILITIES_BOUND: Duration = Duration::from_secs(10);
/// One last flush of every store (each one's pending writes; acknowledged ones are on disk already).
pub const FLUSH_BOUND: Duration = Duration::from_secs(5);

impl Bounds {
    pub fn new(http: &HttpEdge) -> Self {
        Self {
            grace: Duration::from_millis(http.drain_grace_ms),
            in_flight: Duration::from_millis(http.drain_timeout_ms),
            hand_over: HAND_OVER_BOUND,
            close_http: CLOSE_HTTP_BOUND,
            stop_capabilities: STOP_CAPABILITIES_BOUND,
            flush_stores: FLUSH_BOUND,
        }
    }

    /// The bound of one step (the instant ones: zero).
    pub fn of(&self, step: Step) -> Duration {
        match step {
            Step::Announce | Step::Refuse | Step::StopCluster => Duration::ZERO,
            Step::Grace => self.grace,
            Step::InFlight => self.in_flight,
            Step::HandOver => self.hand_over,
            Step::CloseHttp => self.close_http,
            Step::StopCapabilities => self.stop_capabilities,
            Step::FlushStores => self.flush_stores,
        }
    }

    /// The longest a whole stop takes, the spans still batched sent after the drain included:
    /// systemd's `TimeoutStopSec=` must be longer.
    pub fn total(&self) -> Duration {
        Step::ORDER.iter().map(|s| self.of(*s)).sum::<Duration>() + crate::telemetry::SPAN_FLUSH_BOUND
    }
}

/// What a drain works on.
pub struct Node {
    pub cluster: Cluster,
    pub drain: Arc<Drain>,
    pub front: ActorRef<HttpMsg>,
    pub caps: Capabilities,
}

/// Runs every step in order, each within its bound, logging each with its duration.
pub async fn drain(node: &Node, bounds: &Bounds, sd: &Systemd) {
    let started = Instant::now();
    tracing::info!(bound_ms = bounds.total().as_millis() as u64, "draining: stopping the node");
    for step in Step::ORDER {
        sd.status(step.status());
        let t = Instant::now();
        let outcome = run_step(node, bounds, step).await;
        tracing::info!(step = step.name(), took_ms = t.elapsed().as_millis() as u64, "drain: {outcome}");
    }
    sd.status("stopped");
    tracing::info!(took_ms = started.elapsed().as_millis() as u64, "drained: exiting");
}

async fn run_step(node: &Node, bounds: &Bounds, step: Step) -> String {
    let bound = bounds.of(step);
    match step {
        Step::Announce => {
            node.drain.advance(Phase::Announced);
            node.cluster.begin_drain();
            "/readyz answers 503 draining; peers are told".into()
        }
        Step::Grace => {
            tokio::time::sleep(bound).await;
            format!("grace of {} ms over", bound.as_millis())
        }
        Step::Refuse => {
            node.drain.advance(Phase::Refusing);
            format!("refusing new requests; {} in flight", node.drain.in_flight())
        }
        Step::InFlight => match node.drain.settled(bound).await {
            Ok(()) => "every admitted request finished".into(),
            Err(n) => {
                tracing::warn!(
                    still = n,
                    bound_ms = bound.as_millis() as u64,
                    "requests still running at the drain's bound; they are cut off"
                );
                format!("{n} requests still running; cut off")
            }
        },
        Step::HandOver => {
            let report = hand_over_all(&node.cluster.raft_port(), bound).await;
            for (group, why) in &report.kept {
                tracing::warn!(%group, reason = %why, "leadership not handed over; the group elects a new leader once this node is gone");
            }
            let handed: Vec<String> = report.handed.iter().map(|(g, to)| format!("{g} → {to}")).collect();
            format!("handed over {} groups [{}], kept {}", handed.len(), handed.join(", "), report.kept.len())
        }
        Step::CloseHttp => match node.front.stop_and_wait(None, Some(bound)).await {
            Ok(()) => "HTTP listener closed".into(),
            Err(e) => {
                tracing::warn!(error = %e, "the HTTP server did not close in time");
                "HTTP server did not close in time".into()
            }
        },
        Step::StopCapabilities => match tokio::time::timeout(bound, node.caps.shutdown()).await {
            Ok(()) => "capabilities and Raft replicas stopped".into(),
            Err(_) => {
                tracing::warn!(bound_ms = bound.as_millis() as u64, "capabilities did not stop in time");
                "capabilities did not stop in time".into()
            }
        },
        Step::FlushStores => {
            let flushes = async {
                let mut results = Vec::new();
                for r in &node.caps.replicas {
                    results.push((r.id.to_string(), r.store().sync().await));
                }
                if let Some(log) = &node.caps.node_log {
                    results.push(("node log".to_string(), log.sync().await));
                }
                results
            };
            match tokio::time::timeout(bound, flushes).await {
                Ok(results) => {
                    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
                    for (group, e) in &failed {
                        tracing::error!(%group, error = ?e, "store flush failed");
                    }
                    format!("{} stores flushed, {} failed", results.len() - failed.len(), failed.len())
                }
                Err(_) => {
                    tracing::warn!(bound_ms = bound.as_millis() as u64, "stores did not flush in time");
                    "stores did not flush in time".into()
                }
            }
        }
        Step::StopCluster => {
            node.cluster.shutdown();
            "cluster links closed".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steps_run_announce_first_and_close_the_port_only_after_the_requests_and_leaderships() {
        let at = |s: Step| Step::ORDER.iter().position(|x| *x == s).expect("listed");
        assert_eq!(Step::ORDER[0], Step::Announce);
        assert!(at(Step::Grace) < at(Step::Refuse));
        assert!(at(Step::Refuse) < at(Step::InFlight));
        assert!(at(Step::InFlight) < at(Step::HandOver));
        assert!(at(Step::HandOver) < at(Step::CloseHttp));
        assert!(at(Step::CloseHttp) < at(Step::StopCapabilities));
        assert!(at(Step::StopCapabilities) < at(Step::FlushStores));
        assert_eq!(Step::ORDER[8], Step::StopCluster);
    }

    #[test]
    fn the_drain_is_bounded_by_the_config() {
        let http = HttpEdge { drain_grace_ms: 1_500, drain_timeout_ms: 8_000, ..HttpEdge::default() };
        let b = Bounds::new(&http);
        assert_eq!(b.of(Step::Grace), Duration::from_millis(1_500));
        assert_eq!(b.of(Step::InFlight), Duration::from_millis(8_000));
        assert_eq!(
            b.total(),
            Duration::from_millis(9_500)
                + HAND_OVER_BOUND
                + CLOSE_HTTP_BOUND
                + STOP_CAPABILITIES_BOUND
                + FLUSH_BOUND
                + crate::telemetry::SPAN_FLUSH_BOUND
        );
    }

    /// `TimeoutStopSec=` of the shipped unit, in seconds.
    fn unit_stop_timeout(unit: &str) -> u64 {
        let line = unit.lines().find(|l| l.starts_with("TimeoutStopSec=")).expect("TimeoutStopSec= in the unit");
        line["TimeoutStopSec=".len()..].trim().trim_end_matches('s').parse().expect("whole seconds")
    }

    #[test]
    fn systemd_waits_longer_than_the_shipped_configs_drain() {
        let stop = Duration::from_secs(unit_stop_timeout(include_str!("../deploy/bulkhead.service")));
        for (name, text) in [
            ("n1", include_str!("../deploy/n1.toml")),
            ("n2", include_str!("../deploy/n2.toml")),
            ("n3", include_str!("../deploy/n3.toml")),
        ] {
            let doc: toml::Value = toml::from_str(text).expect("valid TOML");
            let http: HttpEdge =
                doc.get("http").cloned().map_or_else(HttpEdge::default, |h| h.try_into().expect("[http]"));
            let total = Bounds::new(&http).total();
            assert!(stop > total, "{name}: TimeoutStopSec ({stop:?}) must exceed the drain's bound ({total:?})");
        }
        assert!(stop > Bounds::new(&HttpEdge::default()).total(), "and the defaults' bound");
    }
}
