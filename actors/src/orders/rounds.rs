//! The outbox relay's decisions, with no I/O: whether a round may start, which destinations are
//! backed off, what a round's deliveries mean, and when an entry becomes a dead letter.
//!
//! The relay ([`super::outbox`]) runs one round at a time: it collects entries of the shards this
//! node leads (skipping destinations that are backed off), delivers them, proposes the removal of
//! the acknowledged ones, and hands the outcomes to [`Rounds::finish`]. Time comes in as
//! milliseconds of the relay's monotonic clock, and the backoff's jitter as a number, so every
//! rule here is tested without a socket or a sleep.
//!
//! The rules:
//! - A kick during a round is not lost: the round that ends starts the next one at once.
//! - A destination that did not get an entry (unreachable, timed out, restarting) is backed off
//!   exponentially (100 ms doubling to 5 s, jittered); one that answered, even with a failure on one
//!   entry, is reachable again.
//! - An entry its destination *answered* a failure for [`DEAD_LETTER_AFTER`] times in a row
//!   becomes a dead letter; an acknowledgement starts its count again.
//! - After a round that removed entries with no destination failing, the next round starts at
//!   once (a backlog drains without waiting for the tick).

use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

use super::protocol::shard_of_order;
use super::saga::{dest_label, Dest, OutboxEntry};
use crate::util::backoff_ms;

/// Failure answers in a row after which an entry becomes a dead letter.
pub const DEAD_LETTER_AFTER: u32 = 5;

/// An outbox entry's key: its order and its index among the order's entries.
pub type Key = (Uuid, u64);

/// How one delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Acknowledged: the entry may go.
    Acked,
    /// Not delivered (unreachable, timed out, lost, restarting): retry after the destination's backoff.
    Retry,
    /// The destination answered that it failed on this entry.
    Failed(String),
}

/// A round's deliveries, judged.
#[derive(Debug, Default, PartialEq)]
pub struct Round {
    /// Acknowledged entries, by orders shard: their removal is proposed to that shard.
    pub delivered: BTreeMap<u32, Vec<Key>>,
    /// Every entry acknowledged (its failure count starts again).
    pub acked: Vec<Key>,
    /// Destinations that answered.
    pub ok: Vec<Dest>,
    /// Destinations that did not get an entry.
    pub failed: Vec<Dest>,
    /// Entries whose destination answered with a failure, and that failure.
    pub refused: Vec<(Key, OutboxEntry, String)>,
}

/// Judges a round's deliveries.
pub fn judge(results: Vec<(Key, OutboxEntry, Delivery)>) -> Round {
    let mut round = Round::default();
    for (key, entry, outcome) in results {
        let dest = &entry.dest;
        match outcome {
            // A destination that answered (even with a failure on one entry) is reachable.
            Delivery::Acked | Delivery::Failed(_) if !round.ok.contains(dest) => round.ok.push(dest.clone()),
            Delivery::Retry if !round.failed.contains(dest) => round.failed.push(dest.clone()),
            _ => {}
        }
        match outcome {
            Delivery::Acked => {
                round.acked.push(key);
                round.delivered.entry(shard_of_order(&key.0)).or_default().push(key);
            }
            Delivery::Failed(why) => round.refused.push((key, entry, why)),
            Delivery::Retry => {}
        }
    }
    round
}

/// An entry to move to the dead letters (one committed command of its shard).
#[derive(Debug, PartialEq)]
pub struct ToDeadLetters {
    pub key: Key,
    pub entry: OutboxEntry,
    pub attempts: u32,
    pub last_error: String,
}

/// What the relay does once a round is over.
#[derive(Debug, Default, PartialEq)]
pub struct AfterRound {
    pub dead_letters: Vec<ToDeadLetters>,
    /// Start the next round now.
    pub again: bool,
}

/// The relay's memory between rounds.
#[derive(Debug, Default)]
pub struct Rounds {
    in_flight: bool,
    /// A kick or tick came during the round in flight.
    again: bool,
    /// Per destination: failed rounds in a row, and until when it is skipped (ms).
    backoff: HashMap<Dest, (u32, u64)>,
    /// Failure answers in a row per entry.
    refusals: HashMap<Key, u32>,
}

impl Rounds {
    /// A tick or a kick: whether to collect a round now (`false`: one is in flight, and the next
    /// starts when it ends).
    pub fn begin(&mut self) -> bool {
        if self.in_flight {
            self.again = true;
            return false;
        }
        true
    }

    /// A round was collected and is under way.
    pub fn started(&mut self) {
        self.in_flight = true;
    }

    /// Whether entries for `dest` are skipped at `now_ms`.
    pub fn backed_off(&self, dest: &Dest, now_ms: u64) -> bool {
        self.backoff.get(dest).is_some_and(|(_, until)| *until > now_ms)
    }

    /// The round in flight ended: it removed `removed` delivered entries and was judged `round`.
    /// `jitter` draws a factor in [0.5, 1.0] for each failed destination's backoff.
    pub fn finish(&mut self, removed: usize, round: Round, now_ms: u64, jitter: &mut dyn FnMut() -> f64) -> AfterRound {
        self.in_flight = false;
        let mut after = AfterRound::default();
        for key in &round.acked {
            self.refusals.remove(key);
        }
        for (key, entry, why) in round.refused {
            let attempts = {
                let n = self.refusals.entry(key).or_default();
                *n += 1;
                *n
            };
            if attempts < DEAD_LETTER_AFTER {
                let destination = dest_label(&entry.dest);
                tracing::warn!(order_id = %entry.order_id, %destination, attempts, error = %why, "outbox delivery refused; will retry");
                continue;
            }
            self.refusals.remove(&key);
            after.dead_letters.push(ToDeadLetters { key, entry, attempts, last_error: why });
        }
        for dest in &round.failed {
            let attempts = self.backoff.get(dest).map_or(0, |(a, _)| a + 1);
            let wait = backoff_ms(attempts, 100, 5_000, jitter());
            tracing::debug!(dest = %dest_label(dest), attempts, wait, "outbox delivery failed; backing off");
            self.backoff.insert(dest.clone(), (attempts, now_ms + wait));
        }
        // A destination that answered is healthy again; one that was skipped keeps its backoff.
        for dest in round.ok.iter().filter(|d| !round.failed.contains(d)) {
            self.backoff.remove(dest);
        }
        after.again = std::mem::take(&mut self.again) || (removed > 0 && round.failed.is_empty());
        after
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orders::saga::OutboxEvent;

    fn entry(order: u8, dest: Dest) -> (Key, OutboxEntry) {
        let mut b = [0u8; 16];
        b[0] = order;
        b[15] = order % 2; // the shard
        let order_id = Uuid::from_bytes(b);
        let e = OutboxEntry {
            dest,
            event: OutboxEvent::RefundPayment { order_id },
            order_id,
            created_ms: 0,
            traceparent: String::new(),
        };
        ((order_id, 0), e)
    }

    fn results(list: Vec<(u8, Dest, Delivery)>) -> Vec<(Key, OutboxEntry, Delivery)> {
        list.into_iter()
            .map(|(o, d, out)| {
                let (k, e) = entry(o, d);
                (k, e, out)
            })
            .collect()
    }

    #[test]
    fn a_round_is_judged_by_destination_and_shard() {
        let r = judge(results(vec![
            (1, Dest::Shipping, Delivery::Acked),
            (2, Dest::Shipping, Delivery::Acked),
            (3, Dest::Payments, Delivery::Retry),
            (4, Dest::Notifications, Delivery::Failed("poison".into())),
        ]));
        assert_eq!(r.ok, vec![Dest::Shipping, Dest::Notifications]);
        assert_eq!(r.failed, vec![Dest::Payments]);
        assert_eq!(r.acked.len(), 2);
        assert_eq!(r.delivered.get(&1).map(Vec::len), Some(1), "order 1 is in shard 1");
        assert_eq!(r.delivered.get(&0).map(Vec::len), Some(1), "order 2 is in shard 0");
        assert_eq!(r.refused.len(), 1);
    }

    #[test]
    fn a_kick_during_a_round_starts_the_next_when_it_ends() {
        let mut rounds = Rounds::default();
        assert!(rounds.begin());
        rounds.started();
        assert!(!rounds.begin(), "one round at a time");
        let after = rounds.finish(0, Round::default(), 0, &mut || 1.0);
        assert!(after.again);
        assert!(rounds.begin());
        rounds.started();
        assert!(!rounds.finish(0, Round::default(), 0, &mut || 1.0).again, "nothing asked for another");
    }

    #[test]
    fn a_drained_round_without_failures_goes_on_at_once() {
        let mut rounds = Rounds::default();
        rounds.started();
        let round = judge(results(vec![(1, Dest::Shipping, Delivery::Acked)]));
        assert!(rounds.finish(1, round, 0, &mut || 1.0).again);
        rounds.started();
        let round = judge(results(vec![(1, Dest::Shipping, Delivery::Acked), (2, Dest::Payments, Delivery::Retry)]));
        assert!(!rounds.finish(1, round, 0, &mut || 1.0).again, "a failing destination waits for the tick");
    }

    #[test]
    fn a_failing_destination_backs_off_exponentially_and_recovers_when_it_answers() {
        let mut rounds = Rounds::default();
        let fail = || judge(results(vec![(1, Dest::Payments, Delivery::Retry)]));
        rounds.started();
        rounds.finish(0, fail(), 1_000, &mut || 1.0);
        assert!(rounds.backed_off(&Dest::Payments, 1_099));
        assert!(!rounds.backed_off(&Dest::Payments, 1_100));
        assert!(!rounds.backed_off(&Dest::Shipping, 1_000));
        rounds.started();
        rounds.finish(0, fail(), 2_000, &mut || 1.0);
        assert!(rounds.backed_off(&Dest::Payments, 2_199), "the second failure waits twice as long");
        rounds.started();
        rounds.finish(0, judge(results(vec![(1, Dest::Payments, Delivery::Acked)])), 3_000, &mut || 1.0);
        assert!(!rounds.backed_off(&Dest::Payments, 3_000));
    }

    #[test]
    fn an_entry_refused_five_times_in_a_row_becomes_a_dead_letter() {
        let mut rounds = Rounds::default();
        let refuse = || judge(results(vec![(7, Dest::Notifications, Delivery::Failed("bad event".into()))]));
        for _ in 1..DEAD_LETTER_AFTER {
            rounds.started();
            assert!(rounds.finish(0, refuse(), 0, &mut || 1.0).dead_letters.is_empty());
        }
        rounds.started();
        let after = rounds.finish(0, refuse(), 0, &mut || 1.0);
        assert_eq!(after.dead_letters.len(), 1);
        assert_eq!(after.dead_letters[0].attempts, DEAD_LETTER_AFTER);
        assert_eq!(after.dead_letters[0].last_error, "bad event");
    }

    #[test]
    fn an_acknowledgement_starts_the_count_again() {
        let mut rounds = Rounds::default();
        let refuse = || judge(results(vec![(7, Dest::Notifications, Delivery::Failed("flaky".into()))]));
        for _ in 1..DEAD_LETTER_AFTER {
            rounds.started();
            rounds.finish(0, refuse(), 0, &mut || 1.0);
        }
        rounds.started();
        rounds.finish(0, judge(results(vec![(7, Dest::Notifications, Delivery::Acked)])), 0, &mut || 1.0);
        rounds.started();
        assert!(rounds.finish(0, refuse(), 0, &mut || 1.0).dead_letters.is_empty());
    }
}
