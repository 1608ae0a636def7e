//! Scenario files (TOML): the cluster to run against, the load, and the fault schedule.
//!
//! Faults run one after another: wait `after`, inject, hold for `hold`, heal, and wait until every
//! node sees every other node `up` again (and every shard is whole) before the next fault, so each
//! detection and recovery is measured on its own. A fault marked `overlaps = true` is instead
//! injected `after` the previous one while that one still holds, on another node: two faults at
//! once, which can take a majority of a group away for a while. A `[random]` table expands, with
//! a seed, into such a list.
//!
//! ```toml
//! name = "pause-inventory"
//! description = "SIGSTOP the inventory node n2 for 5 s"
//! warmup = "5s"
//! [load]
//! rate = 40
//! [[faults]]
//! action = "pause"
//! node = "n2"
//! hold = "5s"
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Deserializer};

/// A duration written as `500ms`, `5s`, `2m` or `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Dur).map_err(serde::de::Error::custom)
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("`{s}` is not a duration (write 500ms, 5s, 2m or 1h)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}` is not a duration (write 500ms, 5s, 2m or 1h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{s}` is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// SIGKILL the node, hold, start it again.
    Kill,
    /// SIGSTOP the node, hold, SIGCONT.
    Pause,
    /// Cut every cluster link of the node (silently), hold, heal.
    Partition,
    /// Stop the node gracefully (SIGTERM), hold, start it again.
    Restart,
    /// Make one capability's worker on the node panic (its supervisor restarts it).
    Panic,
    /// SIGKILL the node, delete its data dir, hold, start it again with empty stores: its Raft
    /// replicas come back as new members and catch up from the others.
    Wipe,
    /// The node's host is gone for good (SIGKILL, its disk deleted); heal = a new host takes the
    /// node's name with `bulkhead replace` on a new cluster address, and every group moves the
    /// node's replicas to it.
    Replace,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Kill => "kill",
            Action::Pause => "pause",
            Action::Partition => "partition",
            Action::Restart => "restart",
            Action::Panic => "panic",
            Action::Wipe => "wipe",
            Action::Replace => "replace",
        }
    }

    /// Whether the node's disk is lost: two such faults at once would lose two of three copies.
    pub fn loses_disk(self) -> bool {
        matches!(self, Action::Wipe | Action::Replace)
    }

    /// The action a report's fault `kind` names (`as_str` backwards).
    pub fn from_kind(kind: &str) -> Option<Action> {
        [Action::Kill, Action::Pause, Action::Partition, Action::Restart, Action::Panic, Action::Wipe, Action::Replace]
            .into_iter()
            .find(|a| a.as_str() == kind)
    }

    /// Whether a report's fault `kind` is one whose detection is measured.
    pub fn is_detectable_kind(kind: &str) -> bool {
        Action::from_kind(kind).is_some_and(Action::is_detectable)
    }

    /// Whether the node stops being reachable by its peers (so detection is measured).
    pub fn is_detectable(self) -> bool {
        matches!(self, Action::Kill | Action::Pause | Action::Partition | Action::Wipe | Action::Replace)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub action: Action,
    pub node: String,
    /// For `panic`: which capability's worker.
    pub capability: Option<String>,
    /// Time to wait before injecting (after the previous fault has healed and recovered).
    #[serde(default = "default_after")]
    pub after: Dur,
    /// How long the fault lasts before it is healed.
    #[serde(default = "default_hold")]
    pub hold: Dur,
    /// Injected while the previous fault still holds (`after` counts from its injection), before
    /// it heals; the next fault waits until both have healed and the cluster has recovered.
    #[serde(default)]
    pub overlaps: bool,
}

fn default_after() -> Dur {
    Dur(Duration::from_secs(2))
}
fn default_hold() -> Dur {
    Dur(Duration::from_secs(3))
}

/// A seeded random schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Random {
    pub faults: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "all_actions")]
    pub actions: Vec<Action>,
    /// Nodes to pick from; all nodes when empty.
    #[serde(default)]
    pub nodes: Vec<String>,
    #[serde(default = "default_gap_min")]
    pub gap_min: Dur,
    #[serde(default = "default_gap_max")]
    pub gap_max: Dur,
    #[serde(default = "default_hold_min")]
    pub hold_min: Dur,
    #[serde(default = "default_hold_max")]
    pub hold_max: Dur,
    /// Share of faults (0-1) that overlap the one before them, on another node. Two wipes never
    /// overlap (losing two of three replicas' disks at once is a disaster, not a fault).
    #[serde(default)]
    pub overlap_share: f64,
}

fn all_actions() -> Vec<Action> {
    vec![Action::Kill, Action::Pause, Action::Partition, Action::Restart, Action::Panic]
}
fn default_gap_min() -> Dur {
    Dur(Duration::from_millis(500))
}
fn default_gap_max() -> Dur {
    Dur(Duration::from_secs(2))
}
fn default_hold_min() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_hold_max() -> Dur {
    Dur(Duration::from_secs(4))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// New orders per second (open loop: a slow cluster does not slow the client down).
    #[serde(default = "default_rate")]
    pub rate: f64,
    /// Most orders in flight at once; beyond it a tick is skipped and counted.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    #[serde(default = "default_skus")]
    pub skus: usize,
    /// Units of each SKU at the start.
    #[serde(default = "default_stock")]
    pub stock: u64,
    /// One extra SKU with this little stock, so that out-of-stock (409) happens too; 0 for none.
    #[serde(default = "default_scarce")]
    pub scarce_stock: u64,
    /// Payment tokens with their weights.
    #[serde(default = "default_tokens")]
    pub tokens: BTreeMap<String, u32>,
    /// How long one HTTP attempt may take before the client gives up on it and retries.
    #[serde(default = "default_attempt_timeout")]
    pub attempt_timeout: Dur,
    /// Share of orders whose first attempt goes to two fronts at once (same key, same body), as a
    /// client that gave up too early and retried elsewhere would: both answers must name one order.
    #[serde(default = "default_parallel")]
    pub parallel_share: f64,
}

fn default_rate() -> f64 {
    30.0
}
fn default_in_flight() -> usize {
    512
}
fn default_skus() -> usize {
    16
}
fn default_stock() -> u64 {
    1_000_000
}
fn default_scarce() -> u64 {
    25
}
fn default_tokens() -> BTreeMap<String, u32> {
    BTreeMap::from([
        ("tok_ok".to_string(), 85),
        ("tok_decline".to_string(), 5),
        ("tok_error".to_string(), 5),
        ("tok_slow".to_string(), 5),
    ])
}
fn default_parallel() -> f64 {
    0.1
}
fn default_attempt_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}

impl Default for Load {
    fn default() -> Self {
        Load {
            rate: default_rate(),
            max_in_flight: default_in_flight(),
            skus: default_skus(),
            stock: default_stock(),
            scarce_stock: default_scarce(),
            tokens: default_tokens(),
            attempt_timeout: default_attempt_timeout(),
            parallel_share: default_parallel(),
        }
    }
}

/// A node of a cluster the tool does not launch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteNode {
    pub name: String,
    /// Base URL of its HTTP API, e.g. `http://10.0.0.11:8080`.
    pub http: String,
}

/// Shell commands (run with `sh -c`) that inject faults on a remote cluster. `{node}` is replaced
/// by the node's name and `{host}` by the host of its HTTP URL. Partition and panic default to the
/// node's fault-injection admin endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Commands {
    pub kill: Option<String>,
    pub start: Option<String>,
    pub stop: Option<String>,
    pub pause: Option<String>,
    pub resume: Option<String>,
    pub partition: Option<String>,
    pub heal: Option<String>,
    /// For `wipe`: delete the node's data dir (run after `kill`, before `start`).
    pub wipe: Option<String>,
    /// For `replace`'s heal: bring a new host in under the node's name (`bulkhead replace
    /// --config ...` there; its HTTP URL must stay the one the scenario names, e.g. behind a
    /// load balancer or a moved DNS name).
    pub replace: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Empty: launch the three-node demo topology locally (with fault injection on).
    #[serde(default)]
    pub nodes: Vec<RemoteNode>,
    #[serde(default)]
    pub commands: Commands,
    /// A launched local cluster's `[timing]` (default: the node defaults). CI's smoke run uses a
    /// slower Raft heartbeat: openraft gives every AppendEntries one heartbeat interval to answer,
    /// and unoptimised debug builds of three nodes on two cores miss 100 ms under load.
    #[serde(default)]
    pub timing: Option<toml::Table>,
    /// A launched local cluster's `durability` (default `fsync`). `flush` still survives every
    /// fault the tool injects (a killed process loses nothing sled has flushed), only not a power
    /// loss; CI's smoke run uses it so that a build's disk writeback does not stall every commit.
    #[serde(default)]
    pub durability: Option<String>,
}

impl ClusterSpec {
    /// What a launched local cluster changes from the node defaults, read as the nodes read it.
    pub fn local_settings(&self) -> Result<bulkhead_launch::LocalSettings, String> {
        Ok(bulkhead_launch::LocalSettings::parse(self.timing.as_ref(), self.durability.as_deref())?)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Load before the first fault.
    #[serde(default = "default_warmup")]
    pub warmup: Dur,
    /// Load after the last fault has healed, before the load stops and the check begins.
    #[serde(default = "default_cooldown")]
    pub cooldown: Dur,
    /// How long, after the heal, every acknowledged order has to become terminal (the brief: 30 s).
    #[serde(default = "default_settle")]
    pub settle: Dur,
    /// How long a healed node has to be seen `up` by every other node before the run fails.
    #[serde(default = "default_recovery")]
    pub recovery_timeout: Dur,
    #[serde(default)]
    pub load: Load,
    #[serde(default)]
    pub cluster: ClusterSpec,
    #[serde(default)]
    pub faults: Vec<Fault>,
    pub random: Option<Random>,
    /// The checks this scenario is about (invariant names): the run fails if one of them had
    /// nothing to judge. Default: the five order invariants.
    #[serde(default = "default_main_checks")]
    pub main_checks: Vec<String>,
}

fn default_warmup() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_cooldown() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_main_checks() -> Vec<String> {
    [
        "no_acknowledged_order_lost",
        "at_most_one_charge_per_order",
        "stock_conserved",
        "one_shipment_per_confirmed_order",
        "retries_idempotent",
    ]
    .map(String::from)
    .to_vec()
}
fn default_settle() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_recovery() -> Dur {
    Dur(Duration::from_secs(60))
}

impl Scenario {
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        s.cluster.local_settings()?;
        if !(s.load.rate > 0.0 && s.load.rate <= 10_000.0) {
            return Err(format!("load.rate must be in (0, 10000], not {}", s.load.rate));
        }
        if s.cooldown.0 + Duration::from_secs(5) > s.settle.0 {
            return Err("settle must be at least cooldown + 5s: the check deadline counts from the last heal".into());
        }
        if !(0.0..=1.0).contains(&s.load.parallel_share) {
            return Err("load.parallel_share must be between 0 and 1".into());
        }
        if s.load.skus == 0 || s.load.tokens.values().all(|w| *w == 0) {
            return Err("load needs at least one SKU and one token with a weight above 0".into());
        }
        if let Some(r) = &s.random {
            if r.actions.is_empty() || r.gap_min.0 > r.gap_max.0 || r.hold_min.0 > r.hold_max.0 {
                return Err("random: actions must not be empty, and each *_min must be ≤ its *_max".into());
            }
            if !(0.0..=1.0).contains(&r.overlap_share) {
                return Err("random: overlap_share must be between 0 and 1".into());
            }
        }
        for (i, f) in s.faults.iter().enumerate() {
            if f.action == Action::Panic && f.capability.is_none() {
                return Err(format!("a panic fault on {} needs `capability`", f.node));
            }
            if f.overlaps {
                let Some(prev) = i.checked_sub(1).map(|p| &s.faults[p]) else {
                    return Err("the first fault cannot overlap a previous one".into());
                };
                if prev.node == f.node {
                    return Err(format!(
                        "an overlapping fault must be on another node than the one before it ({})",
                        f.node
                    ));
                }
                if prev.action.loses_disk() && f.action.loses_disk() {
                    return Err(
                        "two wipes or replacements must not overlap: losing two of three disks at once is a disaster, not a fault"
                            .into(),
                    );
                }
            }
        }
        Ok(s)
    }

    pub fn load_file(path: &std::path::Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Scenario::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The fault list to run: the listed faults, then the random ones. `hosts` names each node
    /// with the capabilities it hosts (to pick a capability to panic).
    pub fn schedule(&self, hosts: &BTreeMap<String, Vec<String>>) -> Result<Vec<Fault>, String> {
        let mut out = self.faults.clone();
        if let Some(r) = &self.random {
            out.extend(expand_random(r, hosts)?);
        }
        for f in &out {
            let Some(caps) = hosts.get(&f.node) else {
                let known: Vec<&String> = hosts.keys().collect();
                return Err(format!("fault on unknown node `{}` (the cluster has {known:?})", f.node));
            };
            if let Some(c) = &f.capability {
                if !caps.contains(c) {
                    return Err(format!("node {} does not host {c} (it hosts {caps:?})", f.node));
                }
            }
        }
        Ok(out)
    }
}

/// Expands a random table into faults; the same seed and hosts give the same list.
pub fn expand_random(r: &Random, hosts: &BTreeMap<String, Vec<String>>) -> Result<Vec<Fault>, String> {
    let nodes: Vec<String> = if r.nodes.is_empty() { hosts.keys().cloned().collect() } else { r.nodes.clone() };
    if nodes.is_empty() {
        return Err("random: no nodes to pick from".into());
    }
    let mut rng = StdRng::seed_from_u64(r.seed);
    let pick = |rng: &mut StdRng, lo: Duration, hi: Duration| {
        let (lo, hi) = (lo.as_millis() as u64, hi.as_millis() as u64);
        Dur(Duration::from_millis(rng.gen_range(lo..=hi)))
    };
    let mut out: Vec<Fault> = Vec::with_capacity(r.faults);
    for _ in 0..r.faults {
        let mut action = r.actions[rng.gen_range(0..r.actions.len())];
        let mut node = nodes[rng.gen_range(0..nodes.len())].clone();
        // Overlap the previous fault (not itself overlapping: at most two at once) on another node.
        let overlaps = nodes.len() > 1
            && rng.gen_bool(r.overlap_share)
            && out.last().is_some_and(|p| !p.overlaps && p.action != Action::Panic)
            && action != Action::Panic;
        if let (true, Some(prev)) = (overlaps, out.last()) {
            while node == prev.node {
                node = nodes[rng.gen_range(0..nodes.len())].clone();
            }
            if prev.action.loses_disk() && action.loses_disk() {
                action = Action::Kill;
            }
        }
        let capability = if action == Action::Panic {
            let caps =
                hosts.get(&node).filter(|c| !c.is_empty()).ok_or(format!("random: node {node} hosts nothing"))?;
            Some(caps[rng.gen_range(0..caps.len())].clone())
        } else {
            None
        };
        let hold = pick(&mut rng, r.hold_min.0, r.hold_max.0);
        // An overlapping fault comes within the previous one's hold.
        let after = match out.last() {
            Some(p) if overlaps => pick(&mut rng, Duration::ZERO, p.hold.0 / 2),
            _ => pick(&mut rng, r.gap_min.0, r.gap_max.0),
        };
        out.push(Fault { action, node, capability, after, hold, overlaps });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> BTreeMap<String, Vec<String>> {
        BTreeMap::from([
            ("n1".to_string(), vec!["orders".to_string(), "inventory".to_string()]),
            ("n2".to_string(), vec!["payments".to_string()]),
        ])
    }

    #[test]
    fn durations_parse_and_bad_ones_say_why() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5").unwrap_err().contains("500ms"));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn a_scenario_parses_with_defaults_and_rejects_typos() {
        let s = Scenario::parse(
            "name = \"x\"\n[[faults]]\naction = \"pause\"\nnode = \"n2\"\nhold = \"5s\"\n[load]\nrate = 10\n",
        )
        .unwrap();
        assert_eq!(s.faults[0].hold, Dur(Duration::from_secs(5)));
        assert_eq!(s.faults[0].after, default_after());
        assert_eq!(s.settle.0, Duration::from_secs(30));
        assert!(Scenario::parse("name = \"x\"\nwarmpu = \"1s\"\n").unwrap_err().contains("warmpu"));
        assert!(Scenario::parse("name = \"x\"\n[[faults]]\naction = \"panic\"\nnode = \"n1\"\n")
            .unwrap_err()
            .contains("capability"));
        assert!(Scenario::parse("name = \"x\"\n[load]\nrate = 0\n").is_err());
    }

    /// A launched cluster's knobs are read as the nodes read them, when the scenario is read.
    #[test]
    fn a_local_clusters_settings_are_checked_when_the_scenario_is_read() {
        let ok = "name = \"x\"\n[cluster]\ndurability = \"flush\"\n[cluster.timing]\nraft_heartbeat_ms = 250\n";
        assert!(Scenario::parse(ok).is_ok());
        let bad_durability = "name = \"x\"\n[cluster]\ndurability = \"fsnyc\"\n";
        assert!(Scenario::parse(bad_durability).unwrap_err().contains("fsnyc"));
        let bad_knob = "name = \"x\"\n[cluster.timing]\nraft_heartbeat = 250\n";
        assert!(Scenario::parse(bad_knob).unwrap_err().contains("raft_heartbeat"));
    }

    #[test]
    fn schedule_checks_nodes_and_capabilities() {
        let s = Scenario::parse("name = \"x\"\n[[faults]]\naction = \"kill\"\nnode = \"n9\"\n").unwrap();
        assert!(s.schedule(&hosts()).unwrap_err().contains("n9"));
        let s =
            Scenario::parse("name = \"x\"\n[[faults]]\naction = \"panic\"\nnode = \"n2\"\ncapability = \"orders\"\n")
                .unwrap();
        assert!(s.schedule(&hosts()).unwrap_err().contains("does not host orders"));
    }

    #[test]
    fn random_schedules_are_seeded_and_within_bounds() {
        let r: Random = toml::from_str("faults = 200\nseed = 7\n").unwrap();
        let a = expand_random(&r, &hosts()).unwrap();
        let b = expand_random(&r, &hosts()).unwrap();
        assert_eq!(a.len(), 200);
        assert!(a.iter().zip(&b).all(|(x, y)| x.action == y.action && x.node == y.node && x.hold == y.hold));
        for f in &a {
            assert!(f.hold.0 >= r.hold_min.0 && f.hold.0 <= r.hold_max.0);
            assert!(f.after.0 >= r.gap_min.0 && f.after.0 <= r.gap_max.0);
            if f.action == Action::Panic {
                assert!(hosts()[&f.node].contains(f.capability.as_ref().unwrap()));
            }
        }
        for act in all_actions() {
            assert!(a.iter().any(|f| f.action == act), "{act:?} never drawn");
        }
    }

    #[test]
    fn overlapping_faults_are_on_other_nodes_two_at_most_and_never_two_wipes() {
        let r: Random = toml::from_str(
            "faults = 400\nseed = 11\noverlap_share = 0.5\nactions = [\"kill\", \"wipe\", \"replace\", \"pause\", \"partition\"]\n",
        )
        .unwrap();
        let a = expand_random(&r, &hosts()).unwrap();
        let overlapping = a.iter().filter(|f| f.overlaps).count();
        assert!(overlapping > 50, "only {overlapping} of 400 overlap");
        assert!(!a[0].overlaps);
        for w in a.windows(2) {
            if w[1].overlaps {
                assert_ne!(w[0].node, w[1].node);
                assert!(!w[0].overlaps, "three faults at once");
                assert!(!(w[0].action.loses_disk() && w[1].action.loses_disk()), "two disks lost at once");
                assert!(w[1].after.0 <= w[0].hold.0, "an overlapping fault comes within the hold");
            }
        }
        assert!(a.iter().any(|f| f.action == Action::Wipe && f.overlaps));
    }

    #[test]
    fn listed_overlaps_are_checked() {
        let two = |a: &str, b: &str, node_b: &str| {
            format!(
                "name = \"x\"\n[[faults]]\naction = \"{a}\"\nnode = \"n1\"\n[[faults]]\naction = \"{b}\"\nnode = \"{node_b}\"\noverlaps = true\n"
            )
        };
        assert!(Scenario::parse(&two("kill", "pause", "n2")).is_ok());
        assert!(Scenario::parse(&two("kill", "pause", "n1")).unwrap_err().contains("another node"));
        assert!(Scenario::parse(&two("wipe", "wipe", "n2")).unwrap_err().contains("two wipes"));
        assert!(Scenario::parse(&two("replace", "wipe", "n2")).unwrap_err().contains("two wipes or replacements"));
        let first = "name = \"x\"\n[[faults]]\naction = \"kill\"\nnode = \"n1\"\noverlaps = true\n";
        assert!(Scenario::parse(first).unwrap_err().contains("first fault"));
    }
}
