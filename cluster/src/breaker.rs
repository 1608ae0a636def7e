//! A circuit breaker for one (capability, member) pair, as a pure state machine (time is an input).
//!
//! closed → open after [`BreakerConfig::failure_threshold`] consecutive failures; open → half-open
//! once the cool-down has passed (exponential in the number of consecutive trips, capped, scaled by a
//! jitter the caller passes in); half-open admits exactly one probe: its success closes the breaker,
//! its failure opens it again with a longer cool-down. Outcomes of calls admitted before the breaker
//! opened carry no vote once it is open or half-open: only the probe decides, so a burst of late
//! answers from the old state cannot flap it. Likewise, once closed again (probe or reset), only
//! calls admitted since then count.
//!
//! A probe whose outcome is never reported (its caller was dropped) would wedge the breaker
//! half-open; [`Breaker::abandon`] releases it, and a probe older than [`BreakerConfig::probe_lease_ms`]
//! is given up on by the next [`Breaker::admit`] anyway.

use serde::Serialize;

/// What `/v1/cluster` and `/metrics` show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }

    /// The Prometheus gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> u64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open a closed breaker.
    pub failure_threshold: u32,
    /// Cool-down after the first trip; doubled per consecutive trip.
    pub base_cooldown_ms: u64,
    /// Longest cool-down.
    pub max_cooldown_ms: u64,
    /// A probe not reported within this long is given up on and another one admitted.
    pub probe_lease_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        // Base 500 ms: shorter than the detector's `down` deadline, so a peer that is merely slow
        // for a moment is probed again soon; the cap keeps a dead-but-not-detected peer cheap.
        Self { failure_threshold: 5, base_cooldown_ms: 500, max_cooldown_ms: 10_000, probe_lease_ms: 30_000 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed {
        failures: u32,
    },
    Open {
        until_ms: u64,
    },
    /// `probe`: when the probe in flight was admitted, if there is one.
    HalfOpen {
        probe: Option<u64>,
    },
}

/// What [`Breaker::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead; report the outcome with this ticket.
    Call(Ticket),
    /// Fail fast: the breaker is open (or half-open with its probe in flight).
    Reject { retry_in_ms: u64 },
}

impl Admit {
    /// The ticket of an admitted call; a rejection yields a ticket that decides nothing.
    pub fn ticket(self) -> Ticket {
        match self {
            Admit::Call(t) => t,
            Admit::Reject { .. } => Ticket { probe: false, epoch: u64::MAX },
        }
    }
}

/// Handed out with an admitted call; says whether it is the half-open probe of a given epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    probe: bool,
    epoch: u64,
}

impl Ticket {
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    phase: Phase,
    /// Consecutive trips without a successful probe (drives the cool-down's exponent).
    trips: u32,
    /// Bumped on every phase change, so a stale probe ticket is recognised.
    epoch: u64,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self { config, phase: Phase::Closed { failures: 0 }, trips: 0, epoch: 0 }
    }

    /// The state as shown to operators: an open breaker whose cool-down is over shows half-open.
    pub fn state(&self, now_ms: u64) -> BreakerState {
        match self.phase {
            Phase::Closed { .. } => BreakerState::Closed,
            Phase::Open { until_ms } if now_ms >= until_ms => BreakerState::HalfOpen,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Asks to make one call at `now_ms`.
    pub fn admit(&mut self, now_ms: u64) -> Admit {
        match self.phase {
            Phase::Closed { .. } => Admit::Call(Ticket { probe: false, epoch: self.epoch }),
            Phase::Open { until_ms } if now_ms < until_ms => Admit::Reject { retry_in_ms: until_ms - now_ms },
            Phase::Open { .. } => self.start_probe(now_ms),
            Phase::HalfOpen { probe: None } => self.start_probe(now_ms),
            Phase::HalfOpen { probe: Some(at) } if now_ms.saturating_sub(at) >= self.config.probe_lease_ms => {
                self.start_probe(now_ms)
            }
            Phase::HalfOpen { probe: Some(at) } => {
                Admit::Reject { retry_in_ms: (at + self.config.probe_lease_ms).saturating_sub(now_ms).max(1) }
            }
        }
    }

    fn start_probe(&mut self, now_ms: u64) -> Admit {
        self.epoch += 1;
        self.phase = Phase::HalfOpen { probe: Some(now_ms) };
        Admit::Call(Ticket { probe: true, epoch: self.epoch })
    }

    fn is_current_probe(&self, t: Ticket) -> bool {
        t.probe && t.epoch == self.epoch && matches!(self.phase, Phase::HalfOpen { probe: Some(_) })
    }

    /// The call admitted with `t` succeeded.
    pub fn on_success(&mut self, t: Ticket) {
        match self.phase {
            Phase::Closed { .. } if t.epoch == self.epoch => self.phase = Phase::Closed { failures: 0 },
            _ if self.is_current_probe(t) => self.close(),
            // A late answer from before the trip: only the probe decides.
            _ => {}
        }
    }

    /// The call admitted with `t` failed at `now_ms`; `jitter` in [0, 1] scales the cool-down
    /// between half and all of it.
    pub fn on_failure(&mut self, t: Ticket, now_ms: u64, jitter: f64) {
        match self.phase {
            // Only calls admitted since the breaker (re)closed vote: a reset must not be undone by
            // the failures of calls sent before it.
            Phase::Closed { failures } if t.epoch == self.epoch => {
                let failures = failures + 1;
                if failures >= self.config.failure_threshold {
                    self.open(now_ms, jitter);
                } else {
                    self.phase = Phase::Closed { failures };
                }
            }
            _ if self.is_current_probe(t) => self.open(now_ms, jitter),
            _ => {}
        }
    }

    /// The call admitted with `t` ended without an outcome (its caller went away): a probe's slot
    /// is freed so the next call may probe.
    pub fn abandon(&mut self, t: Ticket) {
        if self.is_current_probe(t) {
            self.epoch += 1;
            self.phase = Phase::HalfOpen { probe: None };
        }
    }

    /// Back to closed with a clean slate (the member was seen to come back).
    pub fn reset(&mut self) {
        self.close();
    }

    fn close(&mut self) {
        self.epoch += 1;
        self.trips = 0;
        self.phase = Phase::Closed { failures: 0 };
    }

    fn open(&mut self, now_ms: u64, jitter: f64) {
        self.epoch += 1;
        let cooldown = cooldown_ms(&self.config, self.trips, jitter);
        self.trips = self.trips.saturating_add(1);
        self.phase = Phase::Open { until_ms: now_ms.saturating_add(cooldown) };
    }
}

/// Cool-down after `trips` earlier consecutive trips: base · 2^trips, capped, times 0.5..=1 by jitter.
pub fn cooldown_ms(c: &BreakerConfig, trips: u32, jitter: f64) -> u64 {
    let full = c.base_cooldown_ms.saturating_mul(1u64 << trips.min(32)).min(c.max_cooldown_ms);
    let j = if jitter.is_finite() { jitter.clamp(0.0, 1.0) } else { 1.0 };
    ((full as f64) * (0.5 + 0.5 * j)).max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig { failure_threshold: 3, base_cooldown_ms: 100, max_cooldown_ms: 1_000, probe_lease_ms: 5_000 }
    }

    fn call(b: &mut Breaker, now: u64) -> Ticket {
        match b.admit(now) {
            Admit::Call(t) => t,
            other => panic!("expected a call at {now}, got {other:?}"),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let mut b = Breaker::new(cfg());
        for _ in 0..2 {
            let t = call(&mut b, 0);
            b.on_failure(t, 0, 1.0);
        }
        let t = call(&mut b, 0);
        b.on_success(t);
        for _ in 0..2 {
            let t = call(&mut b, 0);
            b.on_failure(t, 0, 1.0);
        }
        assert_eq!(b.state(0), BreakerState::Closed, "a success in between resets the count");
        let t = call(&mut b, 0);
        b.on_failure(t, 10, 1.0);
        assert_eq!(b.state(10), BreakerState::Open);
        assert_eq!(b.admit(50), Admit::Reject { retry_in_ms: 60 });
    }

    #[test]
    fn half_open_admits_one_probe_and_its_outcome_decides() {
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            let t = call(&mut b, 0);
            b.on_failure(t, 0, 1.0);
        }
        assert_eq!(b.state(100), BreakerState::HalfOpen, "cool-down over");
        let probe = call(&mut b, 100);
        assert!(probe.is_probe());
        assert!(matches!(b.admit(101), Admit::Reject { .. }), "only one probe in flight");
        b.on_failure(probe, 150, 1.0);
        // Second trip: 200 ms.
        assert_eq!(b.admit(349), Admit::Reject { retry_in_ms: 1 });
        let probe = call(&mut b, 350);
        b.on_success(probe);
        assert_eq!(b.state(350), BreakerState::Closed);
        // Trips were forgotten: the next trip cools down for the base again.
        for _ in 0..3 {
            let t = call(&mut b, 400);
            b.on_failure(t, 400, 1.0);
        }
        assert_eq!(b.admit(499), Admit::Reject { retry_in_ms: 1 });
    }

    #[test]
    fn late_outcomes_from_before_the_trip_do_not_decide() {
        let mut b = Breaker::new(cfg());
        let old = call(&mut b, 0);
        for _ in 0..3 {
            let t = call(&mut b, 0);
            b.on_failure(t, 0, 1.0);
        }
        b.on_success(old);
        assert_eq!(b.state(10), BreakerState::Open);
        let probe = call(&mut b, 100);
        b.on_success(old);
        b.on_failure(old, 100, 1.0);
        assert!(matches!(b.admit(100), Admit::Reject { .. }), "the probe is still the one in flight");
        b.on_success(probe);
        assert_eq!(b.state(100), BreakerState::Closed);
    }

    #[test]
    fn an_abandoned_or_expired_probe_frees_the_slot() {
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            let t = call(&mut b, 0);
            b.on_failure(t, 0, 1.0);
        }
        let probe = call(&mut b, 100);
        b.abandon(probe);
        let probe2 = call(&mut b, 101);
        b.on_success(probe); // stale: ignored
        assert_eq!(b.state(101), BreakerState::HalfOpen);
        assert!(matches!(b.admit(102), Admit::Reject { .. }));
        let probe3 = call(&mut b, 101 + 5_000);
        b.on_failure(probe2, 5_200, 1.0); // stale: ignored
        b.on_success(probe3);
        assert_eq!(b.state(5_200), BreakerState::Closed);
    }

    #[test]
    fn failures_of_calls_sent_before_a_reset_do_not_count() {
        let mut b = Breaker::new(cfg());
        let stale: Vec<Ticket> = (0..5).map(|_| call(&mut b, 0)).collect();
        b.reset();
        for t in stale {
            b.on_failure(t, 0, 1.0);
        }
        assert_eq!(b.state(0), BreakerState::Closed);
    }

    #[test]
    fn reset_closes_at_once() {
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            let t = call(&mut b, 0);
            b.on_failure(t, 0, 1.0);
        }
        b.reset();
        assert_eq!(b.state(0), BreakerState::Closed);
        assert!(matches!(b.admit(0), Admit::Call(_)));
    }

    #[test]
    fn cooldown_grows_is_capped_and_jittered() {
        let c = cfg();
        assert_eq!(cooldown_ms(&c, 0, 1.0), 100);
        assert_eq!(cooldown_ms(&c, 1, 1.0), 200);
        assert_eq!(cooldown_ms(&c, 10, 1.0), 1_000);
        assert_eq!(cooldown_ms(&c, 100, 1.0), 1_000);
        assert_eq!(cooldown_ms(&c, 0, 0.0), 50);
        assert_eq!(cooldown_ms(&c, 0, f64::NAN), 100);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Admit,
        Succeed(usize),
        Fail(usize, f64),
        Abandon(usize),
        Reset,
        Wait(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Admit),
            2 => any::<usize>().prop_map(Op::Succeed),
            3 => (any::<usize>(), 0.0f64..=1.0).prop_map(|(i, j)| Op::Fail(i, j)),
            1 => any::<usize>().prop_map(Op::Abandon),
            1 => Just(Op::Reset),
            3 => (0u64..3_000).prop_map(Op::Wait),
        ]
    }

    proptest! {
        /// Whatever happens: never two probes in flight (unless the first one's lease ran out), and
        /// an open breaker admits nothing before its cool-down is over.
        #[test]
        fn at_most_one_probe_and_no_call_before_the_cooldown(ops in proptest::collection::vec(op(), 1..200)) {
            let c = cfg();
            let mut b = Breaker::new(c);
            let mut now = 0u64;
            // Tickets still outstanding, with when they were admitted.
            let mut open: Vec<(Ticket, u64)> = Vec::new();
            for op in ops {
                let before = b.phase;
                match op {
                    Op::Admit => match b.admit(now) {
                        Admit::Call(t) => {
                            if let Phase::Open { until_ms } = before {
                                prop_assert!(now >= until_ms, "admitted at {now} before the cool-down ended at {until_ms}");
                            }
                            if t.is_probe() {
                                let live_probes = open.iter().filter(|(o, at)| {
                                    o.is_probe() && o.epoch + 1 == t.epoch && now - at < c.probe_lease_ms
                                }).count();
                                prop_assert_eq!(live_probes, 0, "a second probe while one is in flight");
                            } else {
                                prop_assert!(matches!(before, Phase::Closed { .. }), "a plain call only when closed");
                            }
                            open.push((t, now));
                        }
                        Admit::Reject { retry_in_ms } => {
                            prop_assert!(retry_in_ms > 0);
                            prop_assert!(!matches!(before, Phase::Closed { .. }), "closed never rejects");
                        }
                    },
                    Op::Succeed(i) if !open.is_empty() => {
                        let (t, _) = open.remove(i % open.len());
                        b.on_success(t);
                    }
                    Op::Fail(i, j) if !open.is_empty() => {
                        let (t, _) = open.remove(i % open.len());
                        b.on_failure(t, now, j);
                        // A trip made now cools down for at least half the base, at most the cap.
                        if let (Phase::Open { until_ms }, true) = (b.phase, b.phase != before) {
                            prop_assert!(until_ms >= now + c.base_cooldown_ms / 2);
                            prop_assert!(until_ms <= now + c.max_cooldown_ms);
                        }
                    }
                    Op::Abandon(i) if !open.is_empty() => {
                        let (t, _) = open.remove(i % open.len());
                        b.abandon(t);
                    }
                    Op::Reset => b.reset(),
                    Op::Wait(ms) => now += ms,
                    _ => {}
                }
                // Half-open with a probe means exactly that probe's ticket is the current epoch.
                if let Phase::HalfOpen { probe: Some(at) } = b.phase {
                    prop_assert!(at <= now);
                }
            }
        }
    }
}
