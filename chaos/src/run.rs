//! One chaos run from start to verdict: bring the cluster up (or attach), seed stock, start the
//! observer and the load, play the fault schedule (inject, hold, heal, wait for recovery), stop
//! the load, check the invariants, and write `verdict.json` and `timeline.svg`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::check::{check, StockBaseline};
use crate::load::{self, LoadLog};
use crate::observe::{Observations, Observer};
use crate::report::{percentile, Detection, FaultRecord, Phase, Report, Second, Timeline, Totals};
use crate::scenario::{Action, Fault, RemoteNode, Scenario};
use crate::target::Target;

pub struct RunOptions {
    pub scenario: PathBuf,
    pub report_dir: PathBuf,
    /// The `bulkhead` binary for a local cluster.
    pub bulkhead: Option<PathBuf>,
    /// Attach to these nodes instead of what the scenario says (or instead of launching).
    pub nodes: Vec<RemoteNode>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// The admin token of an attached cluster (a launched one has its own).
    pub admin_token_file: Option<PathBuf>,
}

/// Finds the node binary: `--bulkhead`, `$BULKHEAD_BIN`, or next to this executable (or one
/// directory up, where test binaries live).
pub fn find_bulkhead(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("BULKHEAD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    for dir in me.ancestors().skip(1).take(2) {
        let p = dir.join("bulkhead");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(format!(
        "cannot find the `bulkhead` node binary next to {}; build it (`cargo build --release`) or pass --bulkhead PATH",
        me.display()
    ))
}

/// Runs the scenario; the report is also written to `opts.report_dir`.
pub async fn run(opts: RunOptions) -> Result<Report, String> {
    let mut sc = Scenario::load_file(&opts.scenario)?;
    if !opts.nodes.is_empty() {
        sc.cluster.nodes = opts.nodes.clone();
    }
    std::fs::create_dir_all(&opts.report_dir)
        .map_err(|e| format!("cannot create {}: {e}", opts.report_dir.display()))?;
    let pb = if opts.progress { ProgressBar::new(100) } else { ProgressBar::hidden() };
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{wide_bar}] {pos:>3}% {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.enable_steady_tick(Duration::from_millis(200));

    let mut target = if sc.cluster.nodes.is_empty() {
        let exe = find_bulkhead(opts.bulkhead.as_deref())?;
        let data = opts.report_dir.join("cluster");
        let _ = std::fs::remove_dir_all(&data);
        pb.set_message(format!("launching a local 3-node cluster ({})", exe.display()));
        Target::launch_local(&exe, &data, &sc.cluster.local_settings()?)?
    } else {
        Target::remote(&sc.cluster)
    };
    // The tool acts as the operator (it sets stock, reads /v1/cluster, injects faults): admin token.
    let token = match (&target, &opts.admin_token_file) {
        (Target::Local { lc, .. }, _) => Some(lc.secrets().admin_token()?),
        (Target::Remote { .. }, Some(file)) => Some(bulkhead_launch::read_token_file(file, "--admin-token-file")?),
        // A cluster with auth = "off" needs none; one with auth on answers 401, which the run reports.
        (Target::Remote { .. }, None) => None,
    };
    let builder = reqwest::Client::builder().pool_max_idle_per_host(256);
    let http = match token {
        Some(t) => bulkhead_launch::authorized(builder, &t)?,
        None => builder.build().map_err(|e| format!("cannot build an HTTP client: {e}"))?,
    };
    let result = run_on(&sc, &mut target, &http, &pb, &opts.report_dir).await;
    pb.finish_and_clear();
    for log in target.log_paths() {
        if let Some(name) = log.file_name() {
            let _ = std::fs::copy(&log, opts.report_dir.join(name));
        }
    }
    target.shutdown();
    result
}

/// Waits until the cluster is whole: every node ready, and every node sees every member of every
/// capability as routable (readiness alone leaves a heartbeat's worth of lag in the others' views).
/// Whether every shard in a `/v1/cluster` answer has a leader and only voters, one per node (a
/// wiped node's new replica is a learner, next to its old member, until it has caught up and been
/// swapped in: until then the group has less redundancy than it should, and another fault could
/// take its majority).
pub fn shards_whole(cluster: &serde_json::Value) -> bool {
    cluster["shards"].as_array().is_some_and(|shards| {
        shards.iter().all(|s| {
            let replicas = s["replicas"].as_array().cloned().unwrap_or_default();
            let mut nodes: Vec<&str> = replicas.iter().filter_map(|r| r["node"].as_str()).collect();
            nodes.sort_unstable();
            nodes.dedup();
            !s["leader"].is_null() && replicas.iter().all(|r| r["role"] != "learner") && nodes.len() == replicas.len()
        })
    })
}

async fn wait_ready(http: &reqwest::Client, urls: &[String], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut bad = Vec::new();
        for u in urls {
            let ready = match http.get(format!("{u}/readyz")).timeout(Duration::from_secs(1)).send().await {
                Ok(r) => r.status().is_success(),
                Err(_) => false,
            };
            let whole = match http.get(format!("{u}/v1/cluster")).timeout(Duration::from_secs(1)).send().await {
                Ok(r) => r.json::<serde_json::Value>().await.ok().is_some_and(|v| {
                    v["capabilities"]
                        .as_object()
                        .is_some_and(|caps| caps.values().all(|c| c["healthy"] == c["members"]))
                        && shards_whole(&v)
                }),
                Err(_) => false,
            };
            if !(ready && whole) {
                bad.push(u.clone());
            }
        }
        if bad.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("not ready after {timeout:?}: {bad:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn seed_stock(
    http: &reqwest::Client,
    urls: &[String],
    sc: &Scenario,
) -> Result<(Vec<String>, StockBaseline), String> {
    let mut skus: Vec<(String, u64)> = (0..sc.load.skus).map(|i| (format!("chaos-{i}"), sc.load.stock)).collect();
    if sc.load.scarce_stock > 0 {
        skus.push(("chaos-scarce".to_string(), sc.load.scarce_stock));
    }
    let mut baseline = BTreeMap::new();
    for (i, (sku, units)) in skus.iter().enumerate() {
        let url = &urls[i % urls.len()];
        let body = serde_json::json!({"available": units, "price_cents": 100 + 7 * i as u64});
        let r = http
            .put(format!("{url}/v1/inventory/{sku}"))
            .json(&body)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("PUT /v1/inventory/{sku}: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("PUT /v1/inventory/{sku}: HTTP {}", r.status()));
        }
        let v: serde_json::Value = http
            .get(format!("{url}/v1/inventory/{sku}"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("GET /v1/inventory/{sku}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("GET /v1/inventory/{sku}: {e}"))?;
        let f = |k: &str| v[k].as_u64().unwrap_or(0);
        baseline.insert(sku.clone(), (f("available") + f("reserved") + f("sold"), f("sold")));
    }
    Ok((skus.into_iter().map(|(s, _)| s).collect(), baseline))
}

fn label(f: &Fault) -> String {
    match &f.capability {
        Some(c) => format!("{} {c}@{}", f.action.as_str(), f.node),
        None => format!("{} {}", f.action.as_str(), f.node),
    }
}

async fn run_on(
    sc: &Scenario,
    target: &mut Target,
    http: &reqwest::Client,
    pb: &ProgressBar,
    report_dir: &Path,
) -> Result<Report, String> {
    let urls = target.urls();
    let names = target.names();
    pb.set_message("waiting for every node to be ready");
    wait_ready(http, &urls, Duration::from_secs(60)).await?;
    let hosts = target.hosts(http).await?;
    let faults = sc.schedule(&hosts)?;
    target.can_run(&faults)?;
    let (skus, baseline) = seed_stock(http, &urls, sc).await?;

    // Rough length of the run, for the progress bar only.
    let planned: f64 = sc.warmup.0.as_secs_f64()
        + faults.iter().map(|f| f.after.0.as_secs_f64() + f.hold.0.as_secs_f64() + 1.5).sum::<f64>()
        + sc.cooldown.0.as_secs_f64()
        + 5.0;
    let started_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let t0 = Instant::now();
    let observer = Observer::start(urls.clone(), names.clone(), t0, http.clone());
    let load = load::start(&sc.load, urls.clone(), skus, t0, http.clone());
    let progress = |what: &str| {
        let pct = (t0.elapsed().as_secs_f64() / planned * 100.0).min(99.0) as u64;
        pb.set_position(pct);
        let (acked, errors) = load
            .log
            .lock()
            .map(|l| {
                let a = l.orders.iter().filter(|o| o.acked_s.is_some()).count();
                (a, l.attempts.iter().filter(|a| !a.definitive).count())
            })
            .unwrap_or_default();
        pb.set_message(format!("{what} | {acked} orders acknowledged, {errors} errors"));
    };
    let sleep_with_progress = |d: Duration, what: String| {
        let progress = &progress;
        async move {
            let until = Instant::now() + d;
            while Instant::now() < until {
                progress(&what);
                tokio::time::sleep(Duration::from_millis(200).min(until.saturating_duration_since(Instant::now())))
                    .await;
            }
        }
    };

    let mut phases: Vec<(String, f64, f64)> = Vec::new();
    sleep_with_progress(sc.warmup.0, "warmup".into()).await;
    phases.push(("warmup".into(), 0.0, t0.elapsed().as_secs_f64()));
    let mut records = Vec::new();
    let mut run_error = None;
    let n = faults.len();
    // Faults run in groups: one fault, plus the ones marked `overlaps` after it, which are
    // injected while it still holds (on other nodes). A group is healed fault by fault, each at
    // the end of its own hold, and the next group waits until the whole cluster has recovered.
    let mut k = 0;
    'groups: while k < n {
        let mut group = vec![k];
        while group.len() + k < n && faults[k + group.len()].overlaps {
            group.push(k + group.len());
        }
        let gap_from = t0.elapsed().as_secs_f64();
        let mut injected: Vec<(usize, f64, Instant)> = Vec::new();
        for (pos, &i) in group.iter().enumerate() {
            let f = &faults[i];
            sleep_with_progress(f.after.0, format!("fault {}/{n} next: {}", i + 1, label(f))).await;
            let at = t0.elapsed().as_secs_f64();
            if pos == 0 && at - gap_from > 0.05 {
                phases.push(("steady".into(), gap_from, at));
            }
            if let Err(e) = target.inject(f, http).await {
                run_error = Some(format!("injecting {}: {e}", label(f)));
                break 'groups;
            }
            let overlap = if pos > 0 { " (overlapping the previous fault)" } else { "" };
            say(pb, format!("{at:>7.1}s  inject {}{overlap}", label(f)));
            injected.push((i, at, Instant::now() + f.hold.0));
        }
        injected.sort_by_key(|(_, _, until)| *until);
        let mut healed: Vec<(usize, f64, f64)> = Vec::new();
        for (i, at, until) in injected {
            let f = &faults[i];
            let wait = until.saturating_duration_since(Instant::now());
            sleep_with_progress(wait, format!("fault {}/{n}: {} (holding)", i + 1, label(f))).await;
            let healed_at = t0.elapsed().as_secs_f64();
            if let Err(e) = target.heal(f, http).await {
                run_error = Some(format!("healing {}: {e}", label(f)));
                break 'groups;
            }
            healed.push((i, at, healed_at));
        }
        // Recovered = every other node sees each faulted node up again, every node is ready and
        // every shard is whole (a leader, every replica a voter).
        let recover_deadline = Instant::now() + sc.recovery_timeout.0;
        let first = &faults[group[0]];
        let recovered: Vec<Option<f64>> = loop {
            progress(&format!("fault {}/{n}: {} (recovering)", group[0] + 1, label(first)));
            let ups: Vec<Option<f64>> = healed
                .iter()
                .map(|(i, _, healed_at)| {
                    observer.obs.lock().ok().and_then(|o| o.all_up_after(&faults[*i].node, *healed_at, &names))
                })
                .collect();
            if ups.iter().all(Option::is_some) && wait_ready(http, &urls, Duration::from_millis(1)).await.is_ok() {
                break ups;
            }
            if Instant::now() >= recover_deadline {
                break ups.iter().map(|_| None).collect();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let end = t0.elapsed().as_secs_f64();
        for ((i, at, healed_at), recovered) in healed.iter().zip(&recovered) {
            let f = &faults[*i];
            phases.push((format!("fault {}: {}", i + 1, label(f)), *at, end));
            let (detected, down) = if f.action.is_detectable() {
                let o = observer.obs.lock().map_err(|_| "observer poisoned".to_string())?;
                (o.first_after(&f.node, *at, |s| s != "up"), o.first_after(&f.node, *at, |s| s == "down"))
            } else {
                (None, None)
            };
            let ms = |t: Option<f64>, from: f64| t.map(|t| ((t - from).max(0.0) * 1000.0).round() as u64);
            records.push(FaultRecord {
                kind: f.action.as_str().to_string(),
                node: f.node.clone(),
                capability: f.capability.clone(),
                at_s: *at,
                healed_s: (f.action != crate::scenario::Action::Panic).then_some(*healed_at),
                detected_ms: ms(detected, *at),
                down_ms: ms(down, *at),
                recovered_ms: ms(*recovered, *healed_at),
                // From the load log, once the run is over (`build_report`).
                first_201_ms: None,
            });
            say(
                pb,
                format!(
                    "{healed_at:>7.1}s  healed {}; detected {}, recovered {}",
                    label(f),
                    records.last().and_then(|r| r.detected_ms).map(|m| format!("in {m} ms")).unwrap_or("-".into()),
                    records.last().and_then(|r| r.recovered_ms).map(|m| format!("in {m} ms")).unwrap_or("NOT".into()),
                ),
            );
            if recovered.is_none() {
                run_error = Some(format!("{} did not recover within {:?}", f.node, sc.recovery_timeout.0));
            }
        }
        if run_error.is_some() {
            break;
        }
        k += group.len();
    }
    let heal_s = t0.elapsed().as_secs_f64();
    let heal_at = Instant::now();
    if run_error.is_none() {
        sleep_with_progress(sc.cooldown.0, "cooldown".into()).await;
        phases.push(("cooldown".into(), heal_s, t0.elapsed().as_secs_f64()));
    }
    load.stop_new();
    let load_end_s = t0.elapsed().as_secs_f64();
    let deadline = heal_at + sc.settle.0.max(Duration::from_secs(1));
    // Orders still in flight finish their retries against the healed cluster, within the deadline.
    while load.in_flight() > 0 && Instant::now() < deadline {
        progress("checking: waiting for the client's last retries");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.give_up();
    progress("checking the invariants");
    let orders = load.log.lock().map(|l| l.orders.clone()).unwrap_or_default();
    let checked = check(http, &urls, &orders, &baseline, t0, deadline).await;
    progress("checking that every shard's replicas agree");
    let agree = crate::check::replicas_agree(http, &urls, Instant::now() + Duration::from_secs(30)).await;
    let log_arc = load.log.clone();
    load.join().await;
    let obs_arc = observer.obs.clone();
    observer.stop().await;
    let duration_s = t0.elapsed().as_secs_f64();
    phases.push(("check".into(), load_end_s, duration_s));

    let log = log_arc.lock().map_err(|_| "load log poisoned".to_string())?;
    let obs = obs_arc.lock().map_err(|_| "observations poisoned".to_string())?;
    let mut report = build_report(sc, target.kind(), started_at, &log, &obs, &phases, records, load_end_s, duration_s);
    report.invariants = checked.invariants;
    report.invariants.push(agree);
    let undetected: Vec<String> = report
        .faults
        .iter()
        .filter(|f| Action::is_detectable_kind(&f.kind) && f.detected_ms.is_none())
        .map(|f| format!("{} {} at {:.1}s", f.kind, f.node, f.at_s))
        .collect();
    let n_detectable = report.faults.iter().filter(|f| Action::is_detectable_kind(&f.kind)).count();
    report.invariants.push(crate::report::Invariant {
        name: "every_fault_detected".into(),
        held: undetected.is_empty(),
        judged: n_detectable > 0,
        detail: format!(
            "{n_detectable} kills, pauses, partitions, wipes and replacements; each seen not up by another node"
        ),
        offending: undetected,
    });
    if let Some(e) = &run_error {
        report.invariants.push(crate::report::Invariant {
            name: "run_completed".into(),
            held: false,
            judged: true,
            detail: e.clone(),
            offending: Vec::new(),
        });
    }
    report.totals.confirmed = checked.confirmed;
    report.totals.cancelled = checked.cancelled;
    report.totals.pending = checked.pending;
    report.totals.dead_letters = checked.dead_letters;
    report.totals.settle_s = checked.all_terminal_s.map(|t| (t - heal_s).max(0.0));
    report.verdict = if report.passed() { "pass" } else { "fail" }.to_string();
    write_report(&report, report_dir)?;
    Ok(report)
}

/// One line of the run's story: above the progress bar on a terminal, else in the log (a CI job
/// or a redirected run still shows each fault as it happens).
fn say(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        tracing::info!("{line}");
    } else {
        pb.println(format!("  {line}"));
    }
}

pub fn write_report(report: &Report, dir: &Path) -> Result<(), String> {
    let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("verdict.json"), json).map_err(|e| format!("cannot write verdict.json: {e}"))?;
    std::fs::write(dir.join("timeline.svg"), crate::svg::render(report))
        .map_err(|e| format!("cannot write timeline.svg: {e}"))
}

/// Milliseconds from `at_s` to the first `201` of an order first sent at or after it.
fn first_201_after(log: &LoadLog, at_s: f64) -> Option<u64> {
    log.orders
        .iter()
        .filter(|o| o.sent_s >= at_s && o.acked_http == Some(201))
        .filter_map(|o| o.acked_s)
        .min_by(f64::total_cmp)
        .map(|t| ((t - at_s).max(0.0) * 1000.0).round() as u64)
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    sc: &Scenario,
    kind: &str,
    started_at: String,
    log: &LoadLog,
    obs: &Observations,
    phases: &[(String, f64, f64)],
    faults: Vec<FaultRecord>,
    load_end_s: f64,
    duration_s: f64,
) -> Report {
    let mut faults = faults;
    for f in faults.iter_mut() {
        f.first_201_ms = first_201_after(log, f.at_s);
    }
    let latency = |o: &crate::load::OrderRec| o.acked_s.map(|a| (a - o.sent_s) * 1000.0);
    let phase_stats = |name: &str, from: f64, to: f64| {
        let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
        let mut errors = 0;
        let mut requests = 0;
        for a in log.attempts.iter().filter(|a| a.t_s >= from && a.t_s < to) {
            requests += 1;
            *by_status.entry(a.outcome.clone()).or_default() += 1;
            errors += u64::from(!a.definitive);
        }
        let mut lat: Vec<f64> =
            log.orders.iter().filter(|o| o.acked_s.is_some_and(|a| a >= from && a < to)).filter_map(latency).collect();
        lat.sort_by(f64::total_cmp);
        let span = (to - from).max(1e-3);
        Phase {
            name: name.to_string(),
            from_s: from,
            to_s: to,
            requests,
            acknowledged: lat.len() as u64,
            orders_per_s: lat.len() as f64 / span,
            by_status,
            errors,
            p50_ms: percentile(&lat, 50.0),
            p99_ms: percentile(&lat, 99.0),
        }
    };
    let phases: Vec<Phase> = phases.iter().map(|(n, a, b)| phase_stats(n, *a, *b)).collect();
    let secs = duration_s.ceil() as usize;
    let mut seconds: Vec<Second> = (0..secs).map(|t| Second { t: t as u64, ..Default::default() }).collect();
    let mut lat_per_sec: Vec<Vec<f64>> = vec![Vec::new(); secs];
    for o in &log.orders {
        if let (Some(a), Some(l)) = (o.acked_s, latency(o)) {
            if let Some(v) = lat_per_sec.get_mut(a as usize) {
                v.push(l);
            }
        }
    }
    for a in log.attempts.iter().filter(|a| !a.definitive) {
        if let Some(s) = seconds.get_mut(a.t_s as usize) {
            s.errors += 1;
        }
    }
    for (s, mut l) in seconds.iter_mut().zip(lat_per_sec) {
        l.sort_by(f64::total_cmp);
        s.acknowledged = l.len() as u64;
        s.p99_ms = percentile(&l, 99.0);
    }
    let mut detection: BTreeMap<String, Detection> = BTreeMap::new();
    for kind in ["kill", "pause", "partition"] {
        let mut v: Vec<u64> = faults.iter().filter(|f| f.kind == kind).filter_map(|f| f.detected_ms).collect();
        if v.is_empty() {
            continue;
        }
        v.sort_unstable();
        detection.insert(
            kind.to_string(),
            Detection { count: v.len(), min_ms: v[0], median_ms: v[v.len() / 2], max_ms: v[v.len() - 1] },
        );
    }
    let acknowledged = log.orders.iter().filter(|o| o.acked_s.is_some()).count() as u64;
    let requests = log.attempts.len() as u64;
    Report {
        scenario: sc.name.clone(),
        description: sc.description.clone(),
        cluster: kind.to_string(),
        started_at,
        duration_s,
        verdict: String::new(),
        invariants: Vec::new(),
        main_checks: sc.main_checks.clone(),
        faults,
        detection,
        phases,
        totals: Totals {
            orders: log.orders.len() as u64,
            acknowledged,
            unanswered: log.orders.len() as u64 - acknowledged,
            requests,
            retries: requests.saturating_sub(log.orders.len() as u64),
            errors: log.attempts.iter().filter(|a| !a.definitive).count() as u64,
            ..Default::default()
        },
        timeline: Timeline { seconds, nodes: obs.lanes.clone(), load_end_s },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_shard_is_whole_with_a_leader_and_one_voter_per_node() {
        let shard = |leader: serde_json::Value, replicas: &[(&str, &str)]| json!({"shards": [{"leader": leader, "replicas": replicas.iter().map(|(n, r)| json!({"node": n, "role": r})).collect::<Vec<_>>()}]});
        let whole = [("n1", "leader"), ("n2", "follower"), ("n3", "follower")];
        assert!(shards_whole(&shard(json!("n1"), &whole)));
        assert!(!shards_whole(&shard(json!(null), &whole)), "no leader");
        // A wiped n2: its old member and its new learner, until the swap.
        let wiped = [("n1", "leader"), ("n2", "follower"), ("n2", "learner"), ("n3", "follower")];
        assert!(!shards_whole(&shard(json!("n1"), &wiped)));
        assert!(!shards_whole(&json!({})), "no shards listed: not whole");
    }
}
