//! The clock a leader puts into its commands: the group's time, advanced by the leader's own
//! monotonic clock, never by its wall clock.
//!
//! Decisions that depend on time (an idempotency key forgotten after its TTL, a slow charge that
//! is done at `ready_ms`) compare times that different leaders put into commands. If each leader
//! used its wall clock, one node whose clock jumped a day forward would forget every key at once
//! when it took the lead, and one a day behind would keep a slow charge waiting a day. So a
//! leader starts its clock, once per term, at the group's time (the latest time an applied command
//! carried, [`super::types::GROUP_TIME`]) and adds the time elapsed on its monotonic clock since.
//! Time in a group therefore only moves forward at the rate of a real clock, whoever leads.
//!
//! Caveat: the group's time stands still while the group has no leader, so after a long outage of
//! a whole group its timestamps lag the wall clock by that outage: expiries come later, never
//! earlier. A new group (time 0) starts from the wall clock of its first leader.

use std::time::{Duration, Instant};

/// A leader's clock for one term. Pure: the term, the stored group time, the wall clock and the
/// monotonic instant are inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderClock {
    term: u64,
    base_ms: u64,
    since: Instant,
}

impl LeaderClock {
    /// The time at `now` for a leader of `term`. A clock of an earlier term is started anew from
    /// `group_ms()` (the group's stored time, read only then), or from `wall_ms` if the group has
    /// none yet.
    pub fn now_ms(
        clock: &mut Option<LeaderClock>,
        term: u64,
        group_ms: impl FnOnce() -> u64,
        wall_ms: u64,
        now: Instant,
    ) -> u64 {
        match clock {
            Some(c) if c.term == term => c.base_ms.saturating_add(millis(now.saturating_duration_since(c.since))),
            _ => {
                let group_ms = group_ms();
                let base_ms = if group_ms == 0 { wall_ms } else { group_ms };
                *clock = Some(LeaderClock { term, base_ms, since: now });
                base_ms
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    #[test]
    fn a_leader_counts_from_the_group_time_not_from_its_wall_clock() {
        let t0 = Instant::now();
        let mut c = None;
        // The group last saw T; this node's wall clock is a day ahead, then a day behind.
        const T: u64 = 1_800_000_000_000;
        assert_eq!(LeaderClock::now_ms(&mut c, 5, || T, T + DAY, t0), T);
        let later = t0 + Duration::from_millis(250);
        assert_eq!(LeaderClock::now_ms(&mut c, 5, || unreachable!("read once per term"), T - DAY, later), T + 250);
    }

    #[test]
    fn a_new_term_starts_again_from_the_group_time() {
        let t0 = Instant::now();
        let mut c = None;
        LeaderClock::now_ms(&mut c, 1, || 500, 0, t0);
        let t1 = t0 + Duration::from_secs(10);
        // Lost the lead, led again in term 3: the group's time is what counts, not term 1's clock.
        assert_eq!(LeaderClock::now_ms(&mut c, 3, || 9_000, 0, t1), 9_000);
        assert_eq!(LeaderClock::now_ms(&mut c, 3, || 9_000, 0, t1 + Duration::from_millis(7)), 9_007);
    }

    #[test]
    fn a_new_group_starts_from_the_wall_clock() {
        let mut c = None;
        assert_eq!(LeaderClock::now_ms(&mut c, 1, || 0, 42_000, Instant::now()), 42_000);
    }
}
