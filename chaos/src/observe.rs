//! The observer: polls every node's `GET /v1/cluster` every 25 ms and keeps, per (observer,
//! target) pair, the times the status changed. Detection and recovery times come from these
//! changes, so they are upper bounds (the time an answer arrived, not the instant the observer
//! changed its mind), good to one polling period plus one HTTP round trip.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;

use crate::report::StatusChange;

const PERIOD: Duration = Duration::from_millis(25);
const POLL_TIMEOUT: Duration = Duration::from_millis(300);

#[derive(Debug, Default)]
pub struct Observations {
    /// (observer, target) → status changes (seconds since t = 0, status).
    pub pairs: BTreeMap<(String, String), Vec<(f64, String)>>,
    /// Per target, the combined view of the other nodes that answered (see [`lane_status`]).
    pub lanes: BTreeMap<String, Vec<StatusChange>>,
    /// Last time each node answered a poll.
    pub answered: BTreeMap<String, f64>,
}

impl Observations {
    /// The current status of `target` as `observer` sees it.
    pub fn current(&self, observer: &str, target: &str) -> Option<&str> {
        self.pairs.get(&(observer.to_string(), target.to_string())).and_then(|v| v.last()).map(|(_, s)| s.as_str())
    }

    /// First time after `since` that a node other than `target` reported it in a state for which
    /// `pred` holds, as seconds since t = 0.
    pub fn first_after(&self, target: &str, since: f64, pred: impl Fn(&str) -> bool) -> Option<f64> {
        self.pairs
            .iter()
            .filter(|((o, t), _)| t == target && o != target)
            .filter_map(|(_, changes)| changes.iter().find(|(at, s)| *at >= since && pred(s)).map(|(at, _)| *at))
            .min_by(f64::total_cmp)
    }

    /// When every other node that has an opinion about `target` saw it `up` again after `since`
    /// (the latest of their first `up`), or `None` if one has not yet.
    pub fn all_up_after(&self, target: &str, since: f64, observers: &[String]) -> Option<f64> {
        let mut latest: f64 = since;
        for o in observers.iter().filter(|o| *o != target) {
            let changes = self.pairs.get(&(o.clone(), target.to_string()))?;
            let (last_at, last) = changes.last()?;
            if last != "up" {
                return None;
            }
            // The change into the current `up` (it may predate `since` if the node never left).
            latest = latest.max(if *last_at >= since { *last_at } else { since });
        }
        Some(latest)
    }
}

/// What most of the other nodes say: `down` when more than half of them say down, `suspect` when
/// more than half say anything but up, else `up`; `unknown` when none answered. A majority, so
/// that one confused observer (a node that has just restarted and has not heard its peers yet,
/// or the partitioned node itself) does not paint the whole cluster red.
pub fn lane_status(seen: &[&str]) -> &'static str {
    if seen.is_empty() {
        return "unknown";
    }
    let half = seen.len() / 2;
    if seen.iter().filter(|s| **s == "down").count() > half {
        "down"
    } else if seen.iter().filter(|s| **s != "up").count() > half {
        "suspect"
    } else {
        "up"
    }
}

pub struct Observer {
    pub obs: Arc<Mutex<Observations>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    pub fn start(urls: Vec<String>, names: Vec<String>, t0: Instant, http: reqwest::Client) -> Observer {
        let obs = Arc::new(Mutex::new(Observations::default()));
        let (stop, mut stop_rx) = watch::channel(false);
        let obs2 = obs.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => return,
                }
                let polls = urls.iter().map(|u| {
                    let http = http.clone();
                    async move {
                        let r = http.get(format!("{u}/v1/cluster")).timeout(POLL_TIMEOUT).send().await.ok()?;
                        let v: Value = r.json().await.ok()?;
                        Some((t0.elapsed().as_secs_f64(), v))
                    }
                });
                let answers = futures::future::join_all(polls).await;
                let Ok(mut o) = obs2.lock() else { return };
                let mut answered_now = Vec::new();
                for (at, v) in answers.into_iter().flatten() {
                    let Some(observer) = v["node"].as_str().map(str::to_string) else { continue };
                    o.answered.insert(observer.clone(), at);
                    answered_now.push(observer.clone());
                    for n in v["nodes"].as_array().into_iter().flatten() {
                        let (Some(target), Some(status)) = (n["name"].as_str(), n["status"].as_str()) else {
                            continue;
                        };
                        let changes = o.pairs.entry((observer.clone(), target.to_string())).or_default();
                        if changes.last().map(|(_, s)| s != status).unwrap_or(true) {
                            changes.push((at, status.to_string()));
                        }
                    }
                }
                let now = t0.elapsed().as_secs_f64();
                for target in &names {
                    let seen: Vec<&str> = answered_now
                        .iter()
                        .filter(|obs| *obs != target)
                        .filter_map(|obs| o.current(obs, target))
                        .collect();
                    let lane = lane_status(&seen);
                    let changes = o.lanes.entry(target.clone()).or_default();
                    if changes.last().map(|c| c.status != lane).unwrap_or(true) {
                        changes.push(StatusChange { at_s: now, status: lane.to_string() });
                    }
                }
            }
        });
        Observer { obs, stop, task }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_shows_what_most_other_nodes_see() {
        assert_eq!(lane_status(&[]), "unknown");
        assert_eq!(lane_status(&["down"]), "down");
        assert_eq!(lane_status(&["down", "up"]), "up");
        assert_eq!(lane_status(&["down", "down"]), "down");
        assert_eq!(lane_status(&["down", "suspect"]), "suspect");
        assert_eq!(lane_status(&["suspect", "down", "down"]), "down");
    }

    #[test]
    fn detection_and_recovery_come_from_the_other_nodes_changes() {
        let mut o = Observations::default();
        let ch = |v: &[(f64, &str)]| v.iter().map(|(t, s)| (*t, s.to_string())).collect::<Vec<_>>();
        o.pairs.insert(("n1".into(), "n2".into()), ch(&[(0.0, "up"), (10.4, "suspect"), (11.0, "down"), (20.0, "up")]));
        o.pairs.insert(("n3".into(), "n2".into()), ch(&[(0.0, "up"), (10.3, "down"), (21.0, "up")]));
        // n2 about itself never counts.
        o.pairs.insert(("n2".into(), "n2".into()), ch(&[(0.0, "up"), (10.1, "down")]));
        assert_eq!(o.first_after("n2", 10.0, |s| s != "up"), Some(10.3));
        assert_eq!(o.first_after("n2", 10.0, |s| s == "down"), Some(10.3));
        let names = vec!["n1".to_string(), "n2".to_string(), "n3".to_string()];
        assert_eq!(o.all_up_after("n2", 15.0, &names), Some(21.0));
        o.pairs.get_mut(&("n3".to_string(), "n2".to_string())).unwrap().push((22.0, "suspect".into()));
        assert_eq!(o.all_up_after("n2", 15.0, &names), None);
    }
}
