//! The failure detector: a pure state machine over heartbeat arrival times.
//!
//! Deadline-based rather than phi-accrual: a node on a quiet LAN either answers within a few
//! heartbeat intervals or is hung, paused or cut off, and a fixed deadline gives operators a bound
//! they can state ("down within 1 s"). The defaults are 100 ms heartbeats, suspect after 400 ms and
//! down after 800 ms of silence: 8 missed heartbeats, plus at most one heartbeat interval and one
//! 25 ms tick of lag, stays under 1 s. A loaded node is not silent: heartbeats leave from their own
//! actor every 100 ms whatever the order traffic does, and `bulkhead bench --nodes 3` at full load
//! reports the downs it saw (`false downs`), which is how the margin is checked. Inputs are heartbeats, session events and `tick(now)`; outputs
//! are status transitions. Time is milliseconds on any monotonic clock the caller chooses.
//!
//! - heartbeat from a peer ⇒ `Up` (from any state: a returning node rejoins);
//! - silent longer than `suspect_after` ⇒ `Suspect` (still routed to, flagged);
//! - silent longer than `down_after` ⇒ `Down` (the shell then closes its session);
//! - the session closed (socket EOF: a killed process) ⇒ `Down` at once;
//! - this node itself stalled (two ticks more than [`STALL_MS`] apart: starved of CPU, paused) ⇒
//!   the stall is forgiven, silence is counted around it, never through it.

use std::collections::BTreeMap;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Up,
    Suspect,
    Down,
}

/// A change of a peer's status the shell must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub node: String,
    pub from: Option<Status>,
    pub to: Status,
    pub silent_ms: u64,
}

#[derive(Debug, Clone)]
struct Peer {
    last_heard: u64,
    status: Status,
}

/// A gap between two ticks longer than this means this node itself did not run (starved of CPU,
/// paused, or its runtime blocked): the peers' silence during it is not evidence against them.
pub const STALL_MS: u64 = 200;

#[derive(Debug, Clone)]
pub struct Detector {
    suspect_after: u64,
    down_after: u64,
    peers: BTreeMap<String, Peer>,
    last_tick: Option<u64>,
}

impl Detector {
    pub fn new(suspect_after_ms: u64, down_after_ms: u64) -> Self {
        Self { suspect_after: suspect_after_ms, down_after: down_after_ms, peers: BTreeMap::new(), last_tick: None }
    }

    /// A heartbeat from `node` arrived at `now`.
    pub fn heartbeat(&mut self, node: &str, now: u64) -> Option<Transition> {
        match self.peers.get_mut(node) {
            Some(p) => {
                let silent = now.saturating_sub(p.last_heard);
                p.last_heard = p.last_heard.max(now);
                if p.status != Status::Up {
                    let from = p.status;
                    p.status = Status::Up;
                    return Some(Transition {
                        node: node.to_string(),
                        from: Some(from),
                        to: Status::Up,
                        silent_ms: silent,
                    });
                }
                None
            }
            None => {
                self.peers.insert(node.to_string(), Peer { last_heard: now, status: Status::Up });
                Some(Transition { node: node.to_string(), from: None, to: Status::Up, silent_ms: 0 })
            }
        }
    }

    /// The link to `node` closed (EOF, reset, or we closed it).
    pub fn session_lost(&mut self, node: &str, now: u64) -> Option<Transition> {
        let p = self.peers.get_mut(node)?;
        if p.status == Status::Down {
            return None;
        }
        let from = p.status;
        p.status = Status::Down;
        Some(Transition {
            node: node.to_string(),
            from: Some(from),
            to: Status::Down,
            silent_ms: now.saturating_sub(p.last_heard),
        })
    }

    /// Advances time; returns every peer whose status changed.
    ///
    /// Ticks come every few tens of milliseconds; when one comes much later than the previous
    /// ([`STALL_MS`]), this node was not running in between, so the gap is forgiven: every peer's
    /// silence is counted from the end of the stall. A loaded or resumed node then does not declare
    /// its healthy peers down for heartbeats it was not there to receive.
    pub fn tick(&mut self, now: u64) -> Vec<Transition> {
        if let Some(prev) = self.last_tick.replace(now) {
            let gap = now.saturating_sub(prev);
            if gap > STALL_MS {
                for p in self.peers.values_mut().filter(|p| p.status != Status::Down) {
                    p.last_heard = (p.last_heard + gap).min(now);
                }
            }
        }
        let mut out = Vec::new();
        for (name, p) in self.peers.iter_mut() {
            let silent = now.saturating_sub(p.last_heard);
            let want = if silent >= self.down_after {
                Status::Down
            } else if silent >= self.suspect_after {
                Status::Suspect
            } else {
                Status::Up
            };
            // Only time can make things worse; getting better needs a heartbeat.
            let worse = matches!(
                (p.status, want),
                (Status::Up, Status::Suspect | Status::Down) | (Status::Suspect, Status::Down)
            );
            if worse {
                out.push(Transition { node: name.clone(), from: Some(p.status), to: want, silent_ms: silent });
                p.status = want;
            }
        }
        out
    }

    pub fn status(&self, node: &str) -> Option<Status> {
        self.peers.get(node).map(|p| p.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_stall_of_this_node_is_not_held_against_its_peers() {
        let mut d = Detector::new(400, 800);
        d.heartbeat("n2", 0);
        for t in (25..=100).step_by(25) {
            assert!(d.tick(t).is_empty());
        }
        // This node did not run from 100 to 1 000 ms: no verdict on that silence.
        assert!(d.tick(1_000).is_empty(), "declared a peer down for our own stall");
        assert_eq!(d.status("n2"), Some(Status::Up));
        // Silence outside the stall still counts (0-100 ms before it, then after it).
        let mut t = 1_000;
        let mut seen = Vec::new();
        while t < 2_000 {
            t += 25;
            seen.extend(d.tick(t).into_iter().map(|x| (t, x.to)));
        }
        assert_eq!(seen, vec![(1_300, Status::Suspect), (1_700, Status::Down)], "{seen:?}");
    }

    #[test]
    fn silence_goes_suspect_then_down_and_a_heartbeat_brings_it_back() {
        let mut d = Detector::new(400, 1000);
        assert_eq!(d.heartbeat("n2", 0).unwrap().to, Status::Up);
        // Ticks come every 25 ms (a longer gap would be this node's own stall): advance the clock
        // in such steps and keep what the last tick reported.
        let mut now = 0;
        let mut at = |d: &mut Detector, upto: u64| {
            let mut last = Vec::new();
            while now < upto {
                now = (now + 25).min(upto);
                last = d.tick(now);
            }
            last
        };
        assert!(at(&mut d, 399).is_empty());
        assert_eq!(at(&mut d, 400)[0].to, Status::Suspect);
        assert!(at(&mut d, 999).is_empty());
        let t = at(&mut d, 1000);
        assert_eq!((t[0].from, t[0].to, t[0].silent_ms), (Some(Status::Suspect), Status::Down, 1000));
        assert!(at(&mut d, 5000).is_empty());
        assert_eq!(d.heartbeat("n2", 5001).unwrap().to, Status::Up);
    }

    #[test]
    fn a_lost_session_is_down_at_once() {
        let mut d = Detector::new(400, 1000);
        d.heartbeat("n2", 0);
        let t = d.session_lost("n2", 10).unwrap();
        assert_eq!(t.to, Status::Down);
        assert_eq!(d.session_lost("n2", 11), None);
        assert_eq!(d.session_lost("never-seen", 11), None);
    }

    proptest! {
        /// Heartbeats never more than `suspect_after` apart ⇒ never suspect, never down.
        #[test]
        fn regular_heartbeats_never_go_down(gaps in proptest::collection::vec(1u64..399, 1..200)) {
            let mut d = Detector::new(400, 1000);
            let mut now = 0;
            d.heartbeat("n", now);
            for g in gaps {
                for step in 1..=g { prop_assert!(d.tick(now + step).is_empty()); }
                now += g;
                prop_assert_eq!(d.heartbeat("n", now), None);
            }
        }

        /// Whatever the gaps, a node silent past `down_after` is reported down exactly once.
        #[test]
        fn silence_is_always_detected(silence in 1000u64..10_000) {
            let mut d = Detector::new(400, 1000);
            d.heartbeat("n", 0);
            let downs: usize = (0..=silence).step_by(50).map(|t| d.tick(t).iter().filter(|x| x.to == Status::Down).count()).sum();
            let final_downs = d.tick(silence).iter().filter(|x| x.to == Status::Down).count();
            prop_assert_eq!(downs + final_downs, 1);
            prop_assert_eq!(d.status("n"), Some(Status::Down));
        }
    }
}
