//! What a chaos run leaves behind: the verdict (`verdict.json`) and the data the timeline plot
//! (`timeline.svg`) is drawn from. Plain data, serialisable, built by the runner and the checker.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole report of one run; `verdict.json` is this, pretty-printed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    /// `local` (launched by the tool) or `remote` (node addresses given).
    pub cluster: String,
    /// RFC 3339 wall-clock time of t = 0.
    pub started_at: String,
    /// Seconds from t = 0 to the end of the check.
    pub duration_s: f64,
    /// `pass` when every invariant held and every main check was judged, else `fail`.
    pub verdict: String,
    pub invariants: Vec<Invariant>,
    /// The checks this scenario is about: each must have had something to judge, or the run fails.
    #[serde(default)]
    pub main_checks: Vec<String>,
    pub faults: Vec<FaultRecord>,
    /// Detection times by fault kind (`kill`, `pause`, `partition`), in milliseconds.
    pub detection: BTreeMap<String, Detection>,
    pub phases: Vec<Phase>,
    pub totals: Totals,
    pub timeline: Timeline,
}

/// One invariant of the brief and whether it held.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Invariant {
    pub name: String,
    pub held: bool,
    /// Whether there was anything to judge: a check that saw nothing (no order confirmed, no key
    /// answered) holds vacuously and says so here instead of passing silently.
    #[serde(default = "judged_by_default")]
    pub judged: bool,
    /// What was checked, in a sentence with the counts.
    pub detail: String,
    /// Order ids (or SKUs) that violate it; empty when it held. Capped at 100.
    pub offending: Vec<String>,
}

/// One injected fault.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FaultRecord {
    /// `kill`, `pause`, `partition`, `restart`, `panic`.
    pub kind: String,
    pub node: String,
    /// For `panic`: the capability whose worker panicked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    /// Seconds since t = 0 when the fault was injected.
    pub at_s: f64,
    /// Seconds since t = 0 when it was healed (restart done, SIGCONT sent, links healed); `None`
    /// for faults that heal themselves (panic) or were never healed.
    pub healed_s: Option<f64>,
    /// Milliseconds from injection until another node's `GET /v1/cluster` first showed the node
    /// not `up` (an upper bound: the observer polls).
    pub detected_ms: Option<u64>,
    /// Milliseconds from injection until another node first showed it `down`.
    pub down_ms: Option<u64>,
    /// Milliseconds from the heal until every other node showed it `up` again.
    pub recovered_ms: Option<u64>,
    /// Milliseconds from injection until the first `201 confirmed` of an order first sent after
    /// it (so its charge, too, was made after the fault): how long the fault stopped business.
    #[serde(default)]
    pub first_201_ms: Option<u64>,
}

/// Summary of detection times for one fault kind.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Detection {
    pub count: usize,
    pub min_ms: u64,
    pub median_ms: u64,
    pub max_ms: u64,
}

/// Load figures for one stretch of the run (`steady`, `fault 1: pause n2`, `heal`, ...).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub from_s: f64,
    pub to_s: f64,
    /// Requests sent (first attempts and retries).
    pub requests: u64,
    /// Orders acknowledged (201, 202, 402, 409) in this phase.
    pub acknowledged: u64,
    pub orders_per_s: f64,
    /// Answers by HTTP status (`201`, `503`, ...) plus `timeout` and `connect` for no answer.
    pub by_status: BTreeMap<String, u64>,
    /// Requests that got no definitive answer (5xx, 429, timeouts, connection errors).
    pub errors: u64,
    /// Client-perceived latency of acknowledged orders (first send to acknowledgement, retries
    /// included), in milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Totals {
    /// Distinct orders (Idempotency-Keys) the client tried to place.
    pub orders: u64,
    pub acknowledged: u64,
    pub confirmed: u64,
    pub cancelled: u64,
    /// Acknowledged orders still pending when the check gave up.
    pub pending: u64,
    /// Keys that never got a definitive answer (no order, or an order the client never learnt).
    pub unanswered: u64,
    pub requests: u64,
    pub retries: u64,
    pub errors: u64,
    /// Seconds from the last heal until every acknowledged order was terminal.
    pub settle_s: Option<f64>,
    pub dead_letters: u64,
}

/// Per-second series for the plot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timeline {
    pub seconds: Vec<Second>,
    /// Per node, its status over time as the other nodes saw it: `up`, `suspect`, `down`, or
    /// `unknown` (no observer answered). Changes only, in time order.
    pub nodes: BTreeMap<String, Vec<StatusChange>>,
    /// When the load stopped and the check began.
    pub load_end_s: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Second {
    /// Start of the second, since t = 0.
    pub t: u64,
    /// Orders acknowledged in this second.
    pub acknowledged: u64,
    /// Requests without a definitive answer in this second.
    pub errors: u64,
    /// p99 client latency of the orders acknowledged in this second, ms (0 when none).
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusChange {
    pub at_s: f64,
    pub status: String,
}

fn judged_by_default() -> bool {
    true
}

impl Report {
    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }

    /// Why the run fails: each broken invariant, and each main check that judged nothing.
    pub fn failures(&self) -> Vec<String> {
        let mut out: Vec<String> = self.invariants.iter().filter(|i| !i.held).map(|i| i.name.clone()).collect();
        for name in &self.main_checks {
            match self.invariants.iter().find(|i| &i.name == name) {
                Some(i) if i.judged => {}
                _ => out.push(format!("{name} (not judged)")),
            }
        }
        out
    }
}

/// Sorted-sample percentile (nearest rank); 0 for no samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A few lines for a terminal: the verdict, each invariant, detection times, totals.
pub fn summary(r: &Report) -> String {
    let mut s = format!(
        "{}: {} in {:.0} s — {} orders, {} acknowledged ({} confirmed, {} cancelled), {} requests, {} errors\n",
        r.scenario,
        r.verdict.to_uppercase(),
        r.duration_s,
        r.totals.orders,
        r.totals.acknowledged,
        r.totals.confirmed,
        r.totals.cancelled,
        r.totals.requests,
        r.totals.errors
    );
    for i in &r.invariants {
        let mark = match (i.held, i.judged) {
            (false, _) => "VIOLATED",
            (true, true) => "held",
            (true, false) => "not judged",
        };
        s.push_str(&format!("  [{mark}] {}: {}\n", i.name, i.detail));
        for o in i.offending.iter().take(5) {
            s.push_str(&format!("        {o}\n"));
        }
    }
    for (kind, d) in &r.detection {
        s.push_str(&format!(
            "  detection {kind}: {} faults, median {} ms, max {} ms\n",
            d.count, d.median_ms, d.max_ms
        ));
    }
    for f in r.faults.iter().filter(|f| crate::scenario::Action::is_detectable_kind(&f.kind)) {
        if let Some(ms) = f.first_201_ms {
            s.push_str(&format!(
                "  {} {} at {:.1} s: first 201 of an order sent after it {ms} ms later\n",
                f.kind, f.node, f.at_s
            ));
        }
    }
    if let Some(t) = r.totals.settle_s {
        s.push_str(&format!(
            "  every acknowledged order seen terminal {t:.1} s after the last heal (cooldown load included)\n"
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(name: &str, held: bool, judged: bool) -> Invariant {
        Invariant { name: name.into(), held, judged, ..Default::default() }
    }

    #[test]
    fn a_main_check_that_judged_nothing_fails_the_run() {
        let mut r = Report {
            invariants: vec![inv("a", true, true), inv("b", true, false)],
            main_checks: vec!["a".into()],
            ..Default::default()
        };
        assert!(r.passed(), "b is not a main check: reported, not failed");
        r.main_checks.push("b".into());
        assert_eq!(r.failures(), vec!["b (not judged)".to_string()]);
        r.main_checks.push("missing".into());
        assert_eq!(r.failures().len(), 2, "a main check that never ran is not judged either");
        r.invariants[0].held = false;
        assert_eq!(r.failures()[0], "a");
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
        assert_eq!(percentile(&[7.0], 1.0), 7.0);
    }
}
