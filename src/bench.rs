//! `bulkhead bench`: throughput and latency of `POST /v1/orders` on real local clusters.
//!
//! For each cluster size asked for (1 node hosting everything; 3 nodes in the demo topology), in
//! the same run: start the cluster, seed a catalog that cannot run out, then
//! 1. **closed loop**: `concurrency` clients, each sending its next order as soon as the last one is
//!    answered, for `duration`: the maximum throughput;
//! 2. **open loop** at 70 % of that maximum: orders are sent on a fixed schedule and each latency is
//!    measured from its *intended* send time, so a stall shows up as the queueing it causes instead
//!    of being hidden (coordinated omission).
//!
//! Only `201 confirmed` counts: every one of those was flushed (and fdatasync'ed) on every store it
//! touched before the answer. Anything else is an error. Every order carries a unique
//! Idempotency-Key. The load generator reports its own CPU use, so a saturated generator is visible.
//!
//! Per confirmed order of the closed loop, the run also says what the node processes spent on it:
//! CPU time and context switches (from /proc), group-commit flushes and Raft proposals (from each
//! node's `/metrics`) and Raft log entries (from each node's `GET /v1/cluster`), each the difference
//! between a reading just before the loop and one just after it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_actors::Capability;
use bulkhead_cluster::Timing;
use bulkhead_http::RateLimit;
use bulkhead_launch::{authorized, LocalSecrets};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Mutex;

use crate::demo::{free_ports, LocalCluster};
use crate::topology::{cluster_configs, demo_shard_map, single_node_shard_map, Ports, NODES};

/// SKUs the benchmark spreads its orders over.
pub const BENCH_SKUS: usize = 64;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub nodes: Vec<usize>,
    /// Replicas per shard of the replicated capabilities, each run in turn on the 3-node cluster
    /// (a 1-node cluster always has 1).
    pub replicas: Vec<u32>,
    pub duration: Duration,
    pub warmup: Duration,
    pub concurrency: usize,
    pub json: Option<PathBuf>,
    /// SIGKILL the shipping node a third of the way into the closed loop (3-node runs).
    pub kill_shipping: bool,
    /// Where the clusters' data goes (a fresh folder per run under it); default: the temp dir.
    pub data_dir: Option<PathBuf>,
    /// `fsync` (the default, as in production) or `flush` (for comparison only).
    pub durability: bulkhead_storage::Durability,
    /// Send every order to the first node's API only (to compare with an external tool aimed at one
    /// address); by default clients are spread over every node's API.
    pub single_front: bool,
    /// `[timing] raft_heartbeat_ms` of the clusters (default: the node default, 100). openraft 0.9
    /// gives each AppendEntries one heartbeat interval to be answered, so this is also the
    /// replication timeout: worth comparing under load.
    pub raft_heartbeat_ms: Option<u64>,
    /// Copy each node's log out of the run's folder before it is deleted (to read after a soak).
    pub keep_logs: bool,
}

/// One cluster size's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub nodes: usize,
    /// Replicas per shard of the replicated capabilities.
    pub replicas: u32,
    /// The clusters' `[timing] raft_heartbeat_ms` (openraft's AppendEntries timeout too).
    pub raft_heartbeat_ms: u64,
    pub orders_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub errors: u64,
    pub confirmed: u64,
    pub open_loop_rate: f64,
    pub p50_ms_at_70pct: f64,
    pub p99_ms_at_70pct: f64,
    pub p999_ms_at_70pct: f64,
    pub errors_at_70pct: u64,
    /// What the errors were, closed and open loop: the status (`429`, `503`, `202` a pending
    /// order, ...) or `transport` (the request failed or timed out in the client).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub error_kinds: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub error_kinds_at_70pct: BTreeMap<String, u64>,
    /// The load generator's CPU time as a share of one core, in the closed loop.
    pub loadgen_cpu_pct: f64,
    /// With --kill-shipping: closed-loop throughput before and after the shipping node died.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orders_per_sec_before_kill: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orders_per_sec_after_kill: Option<f64>,
    /// Peers declared down during the run, summed over the nodes' `/metrics` (without
    /// --kill-shipping, every one is a false down: no node was harmed).
    pub peer_downs: u64,
    /// Raft elections during the run: per group, how far its term moved from the start of the
    /// warm-up to the end (the highest term any node reports), summed over the groups.
    pub elections: u64,
    /// Per confirmed order of the closed loop, what the node processes spent over it (from /proc
    /// and their `/metrics`, summed over the nodes running at its start and end): CPU time (user +
    /// system) ...
    pub cpu_ms_per_order: f64,
    /// ... voluntary context switches of all their threads (threads that exited during the phase
    /// are missing, see `threads_exited`) ...
    pub ctx_switches_per_order: f64,
    pub nonvoluntary_ctx_switches_per_order: f64,
    /// ... group-commit flushes (`bulkhead_fdatasync_duration_seconds_count`: one flush, and with
    /// the default durability one fdatasync, each) ...
    pub flushes_per_order: f64,
    /// ... Raft log entries (growth of every shard's leader's last log index) ...
    pub raft_entries_per_order: f64,
    /// ... and committed Raft proposals (`bulkhead_raft_proposal_duration_seconds_count` with
    /// `outcome="committed"`: one client command each).
    pub raft_commands_per_order: f64,
    /// ... and records written to sled by every replica's store (`bulkhead_store_writes_total`;
    /// applies write behind, so a record rewritten between two folds counts once).
    pub store_writes_per_order: f64,
    /// Committed proposals per log entry (1 when every entry carries one command).
    pub commands_per_entry: f64,
    /// Node threads alive at the start of the closed loop and gone at its end (their context
    /// switches are not in the figures above).
    pub threads_exited: u64,
    /// Resident memory of each node at the end of the run, MB.
    pub rss_mb: BTreeMap<String, f64>,
}

#[derive(Serialize)]
struct Report<'a> {
    runs: &'a [RunResult],
}

/// Parses `15s`, `500ms`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration (e.g. 15s, 500ms, 2m)");
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit() && c != '.').map(|i| s.split_at(i)).ok_or_else(bad)?;
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF is always valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

struct Shared {
    hist: Mutex<Histogram<u64>>,
    confirmed: AtomicU64,
    error_kinds: std::sync::Mutex<BTreeMap<String, u64>>,
    seq: AtomicU64,
}

impl Shared {
    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            hist: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")),
            confirmed: AtomicU64::new(0),
            error_kinds: std::sync::Mutex::new(BTreeMap::new()),
            seq: AtomicU64::new(0),
        })
    }

    fn count_error(&self, kind: String) {
        if let Ok(mut k) = self.error_kinds.lock() {
            *k.entry(kind).or_default() += 1;
        }
    }

    fn error_kinds(&self) -> BTreeMap<String, u64> {
        self.error_kinds.lock().map(|k| k.clone()).unwrap_or_default()
    }

    fn errors(&self) -> u64 {
        self.error_kinds.lock().map(|k| k.values().sum()).unwrap_or_default()
    }
}

/// Sends one order to `base`: `Ok` if it was confirmed (201), else what came back instead.
async fn one_order(client: &reqwest::Client, base: &str, run: &str, seq: u64) -> Result<(), String> {
    let sku = seq as usize % BENCH_SKUS;
    let body =
        format!(r#"{{"customer_id":"bench","items":[{{"sku":"bench-{sku}","quantity":1}}],"payment_token":"tok_ok"}}"#);
    let req = client
        .post(format!("{base}/v1/orders"))
        .header("content-type", "application/json")
        .header("idempotency-key", format!("{run}-{seq}"))
        .body(body);
    match req.send().await {
        Ok(r) if r.status().as_u16() == 201 => Ok(()),
        Ok(r) => Err(r.status().as_u16().to_string()),
        Err(_) => Err("transport".to_string()),
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn bar(len: Duration, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len.as_millis() as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>22} [{bar:30}] {elapsed:>4} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// Closed loop: `concurrency` clients for `duration`. Returns (shared counters, elapsed).
async fn closed_loop(
    client: &reqwest::Client,
    urls: &[String],
    run: &str,
    concurrency: usize,
    duration: Duration,
    label: &str,
    mut during: impl FnMut(Duration, u64),
) -> (Arc<Shared>, Duration) {
    let shared = Shared::new();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (client, shared, run) = (client.clone(), shared.clone(), run.to_string());
        let base = urls[w % urls.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
            while Instant::now() < deadline {
                let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                match one_order(&client, &base, &run, seq).await {
                    Ok(()) => {
                        let _ = local.record(t.elapsed().as_micros().max(1) as u64);
                        shared.confirmed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(kind) => shared.count_error(kind),
                }
            }
            let _ = shared.hist.lock().await.add(&local);
        }));
    }
    let pb = bar(duration, label);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while Instant::now() < deadline {
        tick.tick().await;
        let e = start.elapsed();
        let n = shared.confirmed.load(Ordering::Relaxed);
        during(e, n);
        pb.set_position(e.as_millis() as u64);
        pb.set_message(format!("{:.0} orders/s, {} errors", n as f64 / e.as_secs_f64(), shared.errors()));
    }
    for t in tasks {
        let _ = t.await;
    }
    pb.finish_and_clear();
    (shared, start.elapsed())
}

/// Open loop at `rate` orders/s for `duration`; latency counted from each intended send time.
async fn open_loop(client: &reqwest::Client, urls: &[String], run: &str, rate: f64, duration: Duration) -> Arc<Shared> {
    let shared = Shared::new();
    let start = Instant::now();
    let total = (rate * duration.as_secs_f64()) as u64;
    let pb = bar(duration, "open loop (70 %)");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let intended = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(intended.into()).await;
        let (client, shared, run) = (client.clone(), shared.clone(), run.to_string());
        let base = urls[i as usize % urls.len()].clone();
        tasks.spawn(async move {
            let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
            match one_order(&client, &base, &run, seq).await {
                Ok(()) => {
                    let _ = shared.hist.lock().await.record(intended.elapsed().as_micros().max(1) as u64);
                    shared.confirmed.fetch_add(1, Ordering::Relaxed);
                }
                Err(kind) => shared.count_error(kind),
            }
        });
        if i % 256 == 0 {
            pb.set_position(start.elapsed().as_millis() as u64);
            while tasks.try_join_next().is_some() {}
        }
    }
    while tasks.join_next().await.is_some() {}
    pb.finish_and_clear();
    shared
}

/// The samples of metric `name` in a Prometheus text page: (labels, value).
fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, u64)> + 'a {
    text.lines().filter_map(move |l| {
        let rest = l.strip_prefix(name)?;
        let (labels, value) = rest.rsplit_once(' ')?;
        (labels.is_empty() || labels.starts_with('{')).then_some((labels, value.parse().ok()?))
    })
}

/// The `/metrics` page of every node in `urls` (a node that does not answer gives an empty page).
async fn metric_pages(client: &reqwest::Client, urls: &[String]) -> Vec<String> {
    let mut pages = Vec::new();
    for u in urls {
        let page = match client.get(format!("{u}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        pages.push(page);
    }
    pages
}

/// The highest term any node reports, per group.
fn max_terms(pages: &[String]) -> std::collections::BTreeMap<String, u64> {
    let mut terms = std::collections::BTreeMap::new();
    for page in pages {
        for (group, term) in samples(page, "bulkhead_raft_term") {
            let t = terms.entry(group.to_string()).or_insert(0);
            *t = (*t).max(term);
        }
    }
    terms
}

/// utime + stime, in clock ticks, from a `/proc/<pid>/stat` line: fields 14 and 15. The process
/// name (field 2) is in parentheses and may itself hold spaces and `)`, so the fields are counted
/// from after the *last* `)`. For a process (not a single thread) Linux sums every thread of the
/// group, the exited ones included (`thread_group_cputime_adjusted`).
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (the state): field 14 is its 12th word.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// (voluntary, nonvoluntary) context switches from a `/proc/.../status` file.
fn status_ctxt(status: &str) -> Option<(u64, u64)> {
    let value =
        |key: &str| status.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().parse::<u64>().ok());
    Some((value("voluntary_ctxt_switches")?, value("nonvoluntary_ctxt_switches")?))
}

/// The sum of metric `name` over its samples whose labels contain `label` (`""`: all of them), e.g.
/// a histogram's `_count` over every label set.
fn metric_sum(text: &str, name: &str, label: &str) -> u64 {
    samples(text, name).filter(|(labels, _)| labels.contains(label)).map(|(_, v)| v).sum()
}

/// What the kernel says about one node process at one moment.
#[derive(Debug, Clone)]
struct ProcSample {
    pid: u32,
    cpu_ticks: u64,
    /// Per live thread id: (voluntary, nonvoluntary) context switches.
    threads: BTreeMap<u32, (u64, u64)>,
}

/// Reads `pid`'s CPU time and its threads' context switches; `None` if the process is gone.
///
/// Context switches are summed per thread from `/proc/<pid>/task/*/status`, not read from
/// `/proc/<pid>/status`: on Linux the `*_ctxt_switches` lines of the process's status are those of
/// its main thread alone (`task_context_switch_counts` prints that task's `nvcsw`/`nivcsw`; the
/// process-wide sum, exited threads included, is kept in the signal struct and only reaches
/// `getrusage` of the process itself and taskstats, which needs CAP_NET_ADMIN). Checked on this
/// machine: four busy threads summed 1,228 voluntary switches while the process line said 19. So
/// the process line is never the more complete one, and a thread that exits during the phase takes
/// its switches since the first reading with it: [`Accounting`] counts such threads.
fn proc_sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let cpu_ticks = stat_cpu_ticks(&stat)?;
    let mut threads = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for entry in dir.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else { continue };
            // A thread may exit between the listing and the read: it is simply not counted.
            if let Some(c) = std::fs::read_to_string(entry.path().join("status")).ok().and_then(|s| status_ctxt(&s)) {
                threads.insert(tid, c);
            }
        }
    }
    Some(ProcSample { pid, cpu_ticks, threads })
}

/// Per shard (`capability/shard`): the last log index of its leader, from every node's
/// `GET /v1/cluster`. Each node reports the shards it holds a replica of as that replica sees them;
/// the view of the node that calls itself leader is taken, else (no leader known, mid-election) the
/// highest any replica reports.
fn leader_log_indexes(views: &[serde_json::Value]) -> BTreeMap<String, u64> {
    let mut from_leader = BTreeMap::new();
    let mut highest: BTreeMap<String, u64> = BTreeMap::new();
    for view in views {
        let node = view["node"].as_str();
        for s in view["shards"].as_array().into_iter().flatten() {
            let Some(index) = s["last_log_index"].as_u64() else { continue };
            let key = format!("{}/{}", s["capability"].as_str().unwrap_or("?"), s["shard"]);
            let h = highest.entry(key.clone()).or_default();
            *h = (*h).max(index);
            if node.is_some() && s["leader"].as_str() == node {
                from_leader.insert(key, index);
            }
        }
    }
    highest
        .into_iter()
        .map(|(k, h)| {
            let index = from_leader.get(&k).copied().unwrap_or(h);
            (k, index)
        })
        .collect()
}

/// Every node's `GET /v1/cluster` (a node that does not answer is left out).
async fn cluster_views(client: &reqwest::Client, urls: &[String]) -> Vec<serde_json::Value> {
    let mut views = Vec::new();
    for u in urls {
        if let Ok(r) = client.get(format!("{u}/v1/cluster")).send().await {
            if let Ok(v) = r.json::<serde_json::Value>().await {
                views.push(v);
            }
        }
    }
    views
}

/// The counters per-order accounting takes the difference of, read from every node at one moment.
struct Accounting {
    /// Per node (index into the cluster): its process, if running.
    procs: Vec<Option<ProcSample>>,
    /// Per node: its `/metrics` page (empty if it did not answer).
    pages: Vec<String>,
    /// Per shard: its leader's last log index.
    log_indexes: BTreeMap<String, u64>,
}

/// What the nodes spent over a phase, summed over the nodes (a node that was not running at both
/// readings, e.g. killed with --kill-shipping, is left out).
#[derive(Debug, Default, PartialEq)]
struct Spent {
    cpu_ticks: u64,
    voluntary: u64,
    nonvoluntary: u64,
    /// Threads alive at the first reading and gone at the second: their switches are missing.
    threads_exited: u64,
    flushes: u64,
    store_writes: u64,
    /// Raft proposals committed (one client command each).
    commands: u64,
    /// Growth of the shards' leaders' logs.
    entries: u64,
}

const FLUSHES: &str = "bulkhead_fdatasync_duration_seconds_count";
const STORE_WRITES: &str = "bulkhead_store_writes_total";
const PROPOSALS: &str = "bulkhead_raft_proposal_duration_seconds_count";
const COMMITTED: &str = "outcome=\"committed\"";

impl Accounting {
    async fn read(lc: &LocalCluster, client: &reqwest::Client, urls: &[String]) -> Accounting {
        let procs = (0..urls.len()).map(|i| lc.pid(i).and_then(proc_sample)).collect();
        let pages = metric_pages(client, urls).await;
        let log_indexes = leader_log_indexes(&cluster_views(client, urls).await);
        Accounting { procs, pages, log_indexes }
    }

    /// From `self` (the start) to `end`.
    fn spent(&self, end: &Accounting) -> Spent {
        let mut s = Spent::default();
        for (a, b) in self.procs.iter().zip(&end.procs) {
            let (Some(a), Some(b)) = (a, b) else { continue };
            if a.pid != b.pid {
                continue;
            }
            s.cpu_ticks += b.cpu_ticks.saturating_sub(a.cpu_ticks);
            for (tid, (v, nv)) in &b.threads {
                // A thread started during the phase counts from zero.
                let (v0, nv0) = a.threads.get(tid).copied().unwrap_or((0, 0));
                s.voluntary += v.saturating_sub(v0);
                s.nonvoluntary += nv.saturating_sub(nv0);
            }
            s.threads_exited += a.threads.keys().filter(|t| !b.threads.contains_key(t)).count() as u64;
        }
        for (a, b) in self.pages.iter().zip(&end.pages) {
            if a.is_empty() || b.is_empty() {
                continue;
            }
            s.flushes += metric_sum(b, FLUSHES, "").saturating_sub(metric_sum(a, FLUSHES, ""));
            s.store_writes += metric_sum(b, STORE_WRITES, "").saturating_sub(metric_sum(a, STORE_WRITES, ""));
            s.commands += metric_sum(b, PROPOSALS, COMMITTED).saturating_sub(metric_sum(a, PROPOSALS, COMMITTED));
        }
        for (shard, b) in &end.log_indexes {
            if let Some(a) = self.log_indexes.get(shard) {
                s.entries += b.saturating_sub(*a);
            }
        }
        s
    }
}

async fn bench_one(
    exe: &std::path::Path,
    opts: &BenchOptions,
    n: usize,
    replicas: u32,
    out: &mut dyn Write,
) -> Result<RunResult, String> {
    let base = opts.data_dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("bulkhead-bench-{}-{n}n-{replicas}r", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let p = free_ports(2 * n)?;
    let ports: Vec<Ports> = (0..n).map(|i| Ports { cluster: p[2 * i], http: p[2 * i + 1] }).collect();
    let (names, map) = match n {
        1 => (vec!["n1"], single_node_shard_map()),
        3 => (NODES.to_vec(), demo_shard_map()),
        _ => return Err(format!("--nodes: {n} is not a benchmarked cluster size (1 or 3)")),
    };
    let mut map = map;
    for p in map.0.values_mut() {
        p.replicas = Some(replicas);
    }
    let secrets = LocalSecrets::ensure(&dir, &names)?;
    let mut timing = Timing::default();
    if let Some(ms) = opts.raft_heartbeat_ms {
        timing.raft_heartbeat_ms = ms;
    }
    let mut configs = cluster_configs(&names, map, &dir, &secrets, &ports, timing, false);
    for c in configs.iter_mut() {
        c.durability = opts.durability;
        c.rate_limit = RateLimit::LOAD_TEST;
    }
    let mut lc = LocalCluster::launch_configs(exe, &dir, configs)?;
    let _ =
        writeln!(out, "{n}-node cluster, {replicas} replica(s) per shard, starting (data in {}) ...", dir.display());
    lc.wait_ready(Duration::from_secs(60)).await?;
    let all_urls: Vec<String> = (0..n).map(|i| lc.url(i)).collect();
    let fronts = if opts.single_front { 1 } else { n };
    let shipping = names.iter().position(|x| *x == "n3");
    // Clients use every node's API; with --kill-shipping, only those of the nodes that stay up
    // (a client would not keep using a dead node's address).
    let urls: Vec<String> =
        (0..fronts).filter(|i| !(opts.kill_shipping && Some(*i) == shipping && n > 1)).map(|i| lc.url(i)).collect();
    let client = authorized(
        reqwest::Client::builder()
            .pool_max_idle_per_host(opts.concurrency * 2)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(30)),
        &secrets.admin_token()?,
    )?;
    for s in 0..BENCH_SKUS {
        let r = client
            .put(format!("{}/v1/inventory/bench-{s}", urls[0]))
            .json(&serde_json::json!({"available": 1_000_000_000u64, "price_cents": 100}))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("seeding failed: {}", r.status()));
        }
    }
    let pages_before = metric_pages(&client, &all_urls).await;
    let terms_before = max_terms(&pages_before);
    // Downs while the cluster formed (two nodes dialling each other at once, one session closed)
    // are not load's doing: count from here.
    let downs_before: u64 =
        pages_before.iter().flat_map(|p| samples(p, "bulkhead_cluster_peer_downs_total")).map(|(_, v)| v).sum();
    let run = format!("b{:x}", rand::random::<u64>());
    let _ = closed_loop(&client, &urls, &format!("{run}w"), opts.concurrency, opts.warmup, "warm-up", |_, _| {}).await;

    // Read before the load generator's own CPU clock starts, so reading costs it nothing.
    let acct_start = Accounting::read(&lc, &client, &all_urls).await;
    let cpu0 = cpu_time();
    let kill_at = opts.duration / 3;
    let mut killed: Option<(Duration, u64)> = None;
    let lc_ref = &mut lc;
    let label = format!("{n} node(s), closed loop");
    let (closed, elapsed) =
        closed_loop(&client, &urls, &format!("{run}c"), opts.concurrency, opts.duration, &label, |e, confirmed| {
            if opts.kill_shipping && killed.is_none() && e >= kill_at {
                if let Some(i) = shipping {
                    lc_ref.kill(i);
                    killed = Some((e, confirmed));
                }
            }
        })
        .await;
    let loadgen_cpu_pct = (cpu_time() - cpu0).as_secs_f64() / elapsed.as_secs_f64() * 100.0;
    let confirmed = closed.confirmed.load(Ordering::Relaxed);
    let orders_per_sec = confirmed as f64 / elapsed.as_secs_f64();
    // Every client has had its last answer: nothing of the phase is still in flight on our side.
    let spent = acct_start.spent(&Accounting::read(&lc, &client, &all_urls).await);
    let per_order = |x: f64| x / confirmed.max(1) as f64;
    let h = closed.hist.lock().await.clone();
    let (before_kill, after_kill) = match killed {
        Some((at, c)) => {
            (Some(c as f64 / at.as_secs_f64()), Some((confirmed - c) as f64 / (elapsed - at).as_secs_f64().max(0.001)))
        }
        None => (None, None),
    };
    if let (Some(b), Some(a)) = (before_kill, after_kill) {
        let _ = writeln!(
            out,
            "shipping node killed at {kill_at:?}: {b:.0} orders/s before, {a:.0} after ({:.0} %)",
            a / b * 100.0
        );
    }

    let rate = (orders_per_sec * 0.7).max(1.0);
    let open = open_loop(&client, &urls, &format!("{run}o"), rate, opts.duration).await;
    let ho = open.hist.lock().await.clone();
    let pages = metric_pages(&client, &urls).await;
    let peer_downs: u64 = pages
        .iter()
        .flat_map(|p| samples(p, "bulkhead_cluster_peer_downs_total"))
        .map(|(_, v)| v)
        .sum::<u64>()
        .saturating_sub(downs_before);
    let terms_after = max_terms(&metric_pages(&client, &all_urls).await);
    let elections: u64 =
        terms_after.iter().map(|(g, t)| t.saturating_sub(terms_before.get(g).copied().unwrap_or(*t))).sum();
    if peer_downs > 0 && killed.is_none() {
        let _ = writeln!(out, "WARNING: {peer_downs} peers declared down under load with no fault injected");
    }
    for (phase, shared) in [("closed loop", &closed), ("open loop (70 %)", &open)] {
        let kinds = shared.error_kinds();
        if !kinds.is_empty() {
            let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} × {n}")).collect();
            let _ = writeln!(out, "errors in the {phase}: {}", list.join(", "));
        }
    }
    if elections > 0 && killed.is_none() {
        let _ = writeln!(out, "WARNING: {elections} Raft election(s) under load with no fault injected");
    }
    let rss: BTreeMap<String, f64> =
        names.iter().enumerate().filter_map(|(i, name)| lc.pid(i).map(|pid| (name.to_string(), rss_mb(pid)))).collect();
    lc.stop_all();
    if opts.keep_logs {
        let logs = dir.with_file_name(format!("{}-logs", dir.file_name().unwrap_or_default().to_string_lossy()));
        let _ = std::fs::create_dir_all(&logs);
        for (i, name) in names.iter().enumerate() {
            if let Err(e) = std::fs::copy(lc.log_path(i), logs.join(format!("{name}.log"))) {
                let _ = writeln!(out, "cannot keep {name}'s log: {e}");
            }
        }
        let _ = writeln!(out, "node logs kept in {}", logs.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(RunResult {
        nodes: n,
        replicas,
        raft_heartbeat_ms: opts.raft_heartbeat_ms.unwrap_or(Timing::default().raft_heartbeat_ms),
        orders_per_sec,
        p50_ms: ms(&h, 0.5),
        p90_ms: ms(&h, 0.9),
        p99_ms: ms(&h, 0.99),
        p999_ms: ms(&h, 0.999),
        errors: closed.errors(),
        confirmed,
        open_loop_rate: rate,
        p50_ms_at_70pct: ms(&ho, 0.5),
        p99_ms_at_70pct: ms(&ho, 0.99),
        p999_ms_at_70pct: ms(&ho, 0.999),
        errors_at_70pct: open.errors(),
        error_kinds: closed.error_kinds(),
        error_kinds_at_70pct: open.error_kinds(),
        loadgen_cpu_pct,
        orders_per_sec_before_kill: before_kill,
        orders_per_sec_after_kill: after_kill,
        peer_downs,
        elections,
        cpu_ms_per_order: per_order(spent.cpu_ticks as f64 * 1000.0 / clock_ticks_per_sec()),
        ctx_switches_per_order: per_order(spent.voluntary as f64),
        nonvoluntary_ctx_switches_per_order: per_order(spent.nonvoluntary as f64),
        flushes_per_order: per_order(spent.flushes as f64),
        raft_entries_per_order: per_order(spent.entries as f64),
        raft_commands_per_order: per_order(spent.commands as f64),
        store_writes_per_order: per_order(spent.store_writes as f64),
        commands_per_entry: if spent.entries == 0 { 0.0 } else { spent.commands as f64 / spent.entries as f64 },
        threads_exited: spent.threads_exited,
        rss_mb: rss,
    })
}

/// `sysconf(_SC_CLK_TCK)`: the unit of /proc's CPU times (100 if the call fails, Linux's value).
fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The compact per-order line of one run.
fn per_order_line(r: &RunResult) -> String {
    let rss: Vec<String> = r.rss_mb.iter().map(|(n, mb)| format!("{n} {mb:.0} MB")).collect();
    let exited = if r.threads_exited > 0 {
        format!(" ({} node threads exited during the phase: their switches are missing)", r.threads_exited)
    } else {
        String::new()
    };
    format!(
        "per order: CPU {:.2} ms, {:.2} fdatasync, {:.1} voluntary cs ({:.1} involuntary), {:.1} raft entries, {:.2} commands/entry, {:.1} sled writes; RSS {}{exited}",
        r.cpu_ms_per_order,
        r.flushes_per_order,
        r.ctx_switches_per_order,
        r.nonvoluntary_ctx_switches_per_order,
        r.raft_entries_per_order,
        r.commands_per_entry,
        r.store_writes_per_order,
        rss.join(", ")
    )
}

/// Runs every cluster size asked for, prints the table, writes the JSON if asked.
pub async fn run(opts: BenchOptions, out: &mut dyn Write) -> Result<Vec<RunResult>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let mut results = Vec::new();
    for &n in &opts.nodes {
        // A one-node cluster has one replica of everything, whatever --replicas says.
        let mut counts: Vec<u32> = opts.replicas.iter().map(|r| if n == 1 { 1 } else { *r }).collect();
        counts.dedup();
        for r in counts {
            results.push(bench_one(&exe, &opts, n, r, out).await?);
        }
    }
    let _ = writeln!(
        out,
        "\n{:>5} {:>4} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} | {:>9} {:>8} {:>8} {:>7} | {:>8} {:>6} {:>5}",
        "nodes",
        "repl",
        "orders/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9",
        "errors",
        "70% rate",
        "p50 ms",
        "p99 ms",
        "errors",
        "gen CPU",
        "downs",
        "elect"
    );
    for r in &results {
        let _ = writeln!(
            out,
            "{:>5} {:>4} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7} | {:>9.0} {:>8.2} {:>8.2} {:>7} | {:>7.0}% {:>6} {:>5}",
            r.nodes,
            r.replicas,
            r.orders_per_sec,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.p999_ms,
            r.errors,
            r.open_loop_rate,
            r.p50_ms_at_70pct,
            r.p99_ms_at_70pct,
            r.errors_at_70pct,
            r.loadgen_cpu_pct,
            r.peer_downs,
            r.elections
        );
    }
    let _ = writeln!(
        out,
        "(closed loop: {} clients for {:?}; open loop at 70 % of it, latency from the intended send time; gen CPU = the load generator's own CPU, % of one core; downs = peers declared down during the run, elect = Raft elections; both false alarms unless a node was killed)",
        opts.concurrency, opts.duration
    );
    for r in &results {
        let _ = writeln!(out, "{:>5} {:>4} {}", r.nodes, r.replicas, per_order_line(r));
    }
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&Report { runs: &results }).map_err(|e| e.to_string())?;
        write_json(path, &text)?;
    }
    Ok(results)
}

/// Writes a benchmark's JSON to `path`, creating its folder if needed.
pub fn write_json(path: &std::path::Path, text: &str) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("15").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn stat_cpu_is_read_after_the_last_parenthesis() {
        // A name with spaces and parentheses, `) 1 2 3` included, cannot shift the fields.
        let stat = "4242 (my (odd) name) 1 2 3) S 1 4242 4242 0 -1 4194560 1234 0 5 0 \
                    731 269 0 0 20 0 17 0 99 123456 789 18446744073709551615";
        assert_eq!(stat_cpu_ticks(stat), Some(731 + 269));
        assert_eq!(stat_cpu_ticks("4242 (cut short) S 1 2"), None);
        assert_eq!(stat_cpu_ticks("no parenthesis at all"), None);
    }

    #[test]
    fn status_context_switches_parse() {
        let status = "Name:\tbulkhead\nThreads:\t17\nVmRSS:\t  183420 kB\n\
                      voluntary_ctxt_switches:\t15021\nnonvoluntary_ctxt_switches:\t733\n";
        assert_eq!(status_ctxt(status), Some((15021, 733)));
        assert_eq!(status_ctxt("Name:\tbulkhead\nvoluntary_ctxt_switches:\t3\n"), None);
    }

    #[test]
    fn metric_families_sum_over_label_sets() {
        let page = "# TYPE bulkhead_fdatasync_duration_seconds histogram\n\
            bulkhead_fdatasync_duration_seconds_bucket{store=\"orders\",le=\"0.01\"} 40\n\
            bulkhead_fdatasync_duration_seconds_sum{store=\"orders\"} 0.75\n\
            bulkhead_fdatasync_duration_seconds_count{store=\"orders\"} 50\n\
            bulkhead_fdatasync_duration_seconds_count{store=\"raft-orders-0\"} 70\n\
            bulkhead_fdatasync_duration_seconds_count_other 1000\n\
            bulkhead_raft_proposal_duration_seconds_count{capability=\"orders\",outcome=\"committed\"} 9\n\
            bulkhead_raft_proposal_duration_seconds_count{capability=\"payments\",outcome=\"committed\"} 4\n\
            bulkhead_raft_proposal_duration_seconds_count{capability=\"orders\",outcome=\"not_leader\"} 2\n";
        assert_eq!(metric_sum(page, FLUSHES, ""), 120);
        assert_eq!(metric_sum(page, PROPOSALS, COMMITTED), 13);
        assert_eq!(metric_sum(page, PROPOSALS, ""), 15);
        assert_eq!(metric_sum("", FLUSHES, ""), 0);
    }

    #[test]
    fn log_index_is_the_leaders() {
        let views = [
            serde_json::json!({"node": "n1", "shards": [
                {"capability": "orders", "shard": 0, "leader": "n2", "last_log_index": 120},
                {"capability": "payments", "shard": 0, "leader": null, "last_log_index": 7},
                {"capability": "shipping", "shard": 0, "leader": "n3", "last_log_index": null}]}),
            serde_json::json!({"node": "n2", "shards": [
                {"capability": "orders", "shard": 0, "leader": "n2", "last_log_index": 118},
                {"capability": "payments", "shard": 0, "leader": null, "last_log_index": 9}]}),
        ];
        let got = leader_log_indexes(&views);
        assert_eq!(got.get("orders/0"), Some(&118));
        assert_eq!(got.get("payments/0"), Some(&9));
        assert_eq!(got.get("shipping/0"), None);
    }

    #[test]
    fn spent_is_per_node_and_per_thread() {
        let proc = |pid, cpu, threads: &[(u32, u64, u64)]| {
            Some(ProcSample {
                pid,
                cpu_ticks: cpu,
                threads: threads.iter().map(|(t, v, nv)| (*t, (*v, *nv))).collect(),
            })
        };
        let page = |flushes: u64| {
            format!(
                "{FLUSHES}{{store=\"orders\"}} {flushes}\n{STORE_WRITES}{{capability=\"orders\",shard=\"0\"}} {}\n",
                flushes * 7
            )
        };
        let start = Accounting {
            procs: vec![proc(10, 100, &[(10, 5, 1), (11, 50, 2), (12, 9, 0)]), proc(20, 40, &[(20, 1, 1)])],
            pages: vec![page(3), page(4)],
            log_indexes: [("orders/0".to_string(), 10)].into(),
        };
        let end = Accounting {
            // Node 1: thread 12 exited, 13 started. Node 2 was restarted (a new pid): left out.
            procs: vec![proc(10, 160, &[(10, 6, 1), (11, 80, 5), (13, 4, 1)]), proc(21, 5, &[(21, 1, 0)])],
            pages: vec![page(13), String::new()],
            log_indexes: [("orders/0".to_string(), 25), ("payments/0".to_string(), 3)].into(),
        };
        let s = start.spent(&end);
        assert_eq!(
            s,
            Spent {
                cpu_ticks: 60,
                voluntary: 35,
                nonvoluntary: 4,
                threads_exited: 1,
                flushes: 10,
                store_writes: 70,
                commands: 0,
                entries: 15
            }
        );
    }
}

/// Options of `bulkhead bench --restart-orders N`.
#[derive(Debug, Clone)]
pub struct RestartOptions {
    pub orders: u64,
    pub data_dir: Option<PathBuf>,
    /// 1: every capability on one node; 3: the demo topology, where n1 is restarted while the
    /// other two keep running.
    pub nodes: usize,
    /// Replicas per shard on the 3-node cluster (every replica of an orders shard is filled).
    pub replicas: u32,
}

/// What the restart benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct RestartResult {
    pub nodes: usize,
    pub replicas: u32,
    pub orders_in_store: u64,
    pub fill_secs: f64,
    /// n1's orders stores on disk.
    pub store_bytes: u64,
    /// Start of n1 to its `/readyz` answering 200. On three nodes: n1 restarted after a graceful
    /// stop (SIGTERM: it drains and hands its leaderships over first), the others running.
    pub start_to_ready_ms: f64,
    /// On three nodes: n1 started again after a SIGKILL. This includes the election of new
    /// leaders for the shards it led (the others wait an election timeout, 500-750 ms, for it).
    pub start_to_ready_after_kill_ms: Option<f64>,
    pub rss_ready_mb: f64,
    pub rss_after_load_mb: f64,
    pub orders_per_sec_after_restart: f64,
    /// Worker panic (fault injection) until the orders API answers again.
    pub supervised_restart_ms: f64,
    /// The supervisor's own figure for respawning the worker (from the node log).
    pub respawn_us: Option<u64>,
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(path) {
        for e in rd.flatten() {
            let p = e.path();
            total += if p.is_dir() { dir_bytes(&p) } else { e.metadata().map(|m| m.len()).unwrap_or(0) };
        }
    }
    total
}

/// Polls `url`'s `/readyz` until it answers 200; how long that took from `since`.
async fn ready_after(client: &reqwest::Client, url: &str, since: Instant) -> Result<f64, String> {
    let mut poll = tokio::time::interval(Duration::from_millis(5));
    loop {
        poll.tick().await;
        if let Ok(r) = client.get(format!("{url}/readyz")).send().await {
            if r.status().as_u16() == 200 {
                return Ok(since.elapsed().as_secs_f64() * 1000.0);
            }
        }
        if since.elapsed() > Duration::from_secs(120) {
            return Err(format!("{url} did not become ready within 120 s"));
        }
    }
}

/// Fills every replica of the orders shards with `n` confirmed orders in all (written directly
/// into the state machine's tables, identically on each replica, as applying them would have; the
/// Raft log stays short, as after a snapshot), then measures start-up to ready (on three nodes: of
/// n1, restarted while the others run), memory, and a supervised restart of the orders worker.
pub async fn restart(opts: RestartOptions, out: &mut dyn Write) -> Result<RestartResult, String> {
    use bulkhead_actors::orders::machine::ORDERS;
    use bulkhead_actors::orders::saga::new_order;
    use bulkhead_actors::orders::{new_order_id, OrderStatus};
    use bulkhead_storage::{Batch, Store, StoreOptions};

    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let base = opts.data_dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("bulkhead-restart-{}-{}n", std::process::id(), opts.nodes));
    let _ = std::fs::remove_dir_all(&dir);
    let (names, mut map) = match opts.nodes {
        1 => (vec!["n1"], single_node_shard_map()),
        3 => (NODES.to_vec(), demo_shard_map()),
        n => return Err(format!("--nodes: {n} is not a benchmarked cluster size (1 or 3)")),
    };
    for p in map.0.values_mut() {
        p.replicas = Some(opts.replicas);
    }
    let p = free_ports(2 * names.len())?;
    let ports: Vec<Ports> = (0..names.len()).map(|i| Ports { cluster: p[2 * i], http: p[2 * i + 1] }).collect();
    let secrets = LocalSecrets::ensure(&dir, &names)?;
    let shards = map.shard_map().shards(Capability::Orders);
    let configs = cluster_configs(&names, map, &dir, &secrets, &ports, Timing::default(), true);
    let replicas = shards.first().map_or(1, |s| s.replicas.len()) as u32;

    let _ = writeln!(
        out,
        "writing {} confirmed orders into {} orders shard(s), {replicas} replica(s) each, under {} ...",
        opts.orders,
        shards.len(),
        dir.display()
    );
    let filled = Instant::now();
    let mut last_id = None;
    let pb = indicatif::ProgressBar::new(opts.orders * u64::from(replicas));
    for (i, shard) in shards.iter().enumerate() {
        // This shard's share of the orders, the same records on each of its replicas.
        let share = opts.orders / shards.len() as u64 + u64::from((i as u64) < opts.orders % shards.len() as u64);
        let stores: Vec<Store> = shard
            .replicas
            .iter()
            .map(|node| {
                let c = configs.iter().find(|c| &c.name == node).ok_or(format!("no config for {node}"))?;
                Store::open(&c.data_dir, &format!("orders-{}", shard.shard), &StoreOptions::default())
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<_, String>>()?;
        let mut written = 0;
        while written < share {
            let n = (share - written).min(10_000);
            let mut orders = Vec::with_capacity(n as usize);
            for i in 0..n {
                let id = new_order_id(shard.shard);
                let item = bulkhead_actors::inventory::Item { sku: format!("bench-{}", i % 64), quantity: 1 };
                let mut o = new_order(id, "bench".into(), vec![item.clone()], "tok_ok".into(), vec![], 0);
                o.status = OrderStatus::Confirmed;
                o.total_cents = 100;
                o.payment_id = Some(format!("pay_{}", id.simple()));
                orders.push((id, o));
                last_id = Some(id);
            }
            for store in &stores {
                let mut b = Batch::new();
                for (id, o) in &orders {
                    ORDERS.put(&mut b, id, o);
                }
                store.apply_in_order(b).map_err(|e| e.to_string())?;
                pb.inc(n);
            }
            written += n;
        }
        for store in &stores {
            store.sync().await.map_err(|e| e.to_string())?;
        }
    }
    pb.finish_and_clear();
    let fill_secs = filled.elapsed().as_secs_f64();
    let store_bytes: u64 =
        shards.iter().map(|s| dir_bytes(&configs[0].data_dir.join(format!("orders-{}", s.shard)))).sum();

    let client = authorized(reqwest::Client::builder().timeout(Duration::from_secs(10)), &secrets.admin_token()?)?;
    let started = Instant::now();
    let mut lc = LocalCluster::launch_configs(&exe, &dir, configs)?;
    let url = lc.url(0);
    let mut start_to_ready_ms = ready_after(&client, &url, started).await?;
    let mut start_to_ready_after_kill_ms = None;
    if names.len() > 1 {
        // The figures that matter on a cluster: one node restarted while the others run, first
        // after a crash (while it leads shards: they elect new leaders meanwhile), then as an
        // operator restarts it (stop, start).
        lc.wait_ready(Duration::from_secs(60)).await?;
        let _ = writeln!(out, "first start of all nodes to n1 ready: {start_to_ready_ms:.0} ms; restarting n1 ...");
        lc.kill(0);
        let started = Instant::now();
        lc.start(0)?;
        start_to_ready_after_kill_ms = Some(ready_after(&client, &url, started).await?);
        lc.wait_ready(Duration::from_secs(60)).await?;
        lc.stop(0);
        let started = Instant::now();
        lc.start(0)?;
        start_to_ready_ms = ready_after(&client, &url, started).await?;
        lc.wait_ready(Duration::from_secs(60)).await?;
    }
    let pid = lc.pid(0).unwrap_or(0);
    let rss_ready_mb = rss_mb(pid);
    if let Some(id) = last_id {
        let r = client.get(format!("{url}/v1/orders/{id}")).send().await.map_err(|e| e.to_string())?;
        if r.status().as_u16() != 200 {
            return Err(format!("an order written before the restart is not readable: {}", r.status()));
        }
    }

    // Load after the restart: the caches fill, which is what RSS should be judged on. Before the
    // worker panic below: with RUST_BACKTRACE set, resolving its backtrace loads the binary's
    // debug info (~200 MB), which is not what the load costs.
    for s in 0..BENCH_SKUS {
        client
            .put(format!("{url}/v1/inventory/bench-{s}"))
            .json(&serde_json::json!({"available": 1_000_000_000u64, "price_cents": 100}))
            .send()
            .await
            .map_err(|e| e.to_string())?;
    }
    let (load, elapsed) = closed_loop(
        &client,
        std::slice::from_ref(&url),
        "restart-load",
        64,
        Duration::from_secs(5),
        "load after restart",
        |_, _| {},
    )
    .await;
    let orders_per_sec_after_restart = load.confirmed.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64();
    let rss_after_load_mb = rss_mb(pid);

    // Supervised restart, on an idle node (a backlog in the worker's mailbox would be timed too;
    // the load above has ended and every order in it was answered):
    // make the orders worker panic, time until the orders API answers again.
    let id = last_id.map(|i| i.to_string()).unwrap_or_default();
    let t = Instant::now();
    let _ = client
        .post(format!("{url}/admin/panic/orders"))
        .json(&serde_json::json!({"reason": "bench restart"}))
        .send()
        .await;
    loop {
        if let Ok(r) = client.get(format!("{url}/v1/orders/{id}")).send().await {
            if r.status().as_u16() == 200 {
                break;
            }
        }
        if t.elapsed() > Duration::from_secs(10) {
            return Err("the orders worker did not come back within 10 s".into());
        }
    }
    let supervised_restart_ms = t.elapsed().as_secs_f64() * 1000.0;

    let log = std::fs::read_to_string(lc.log_path(0)).unwrap_or_default();
    let respawn_us = log
        .lines()
        .filter(|l| l.contains("child started") && l.contains("bulkhead.orders.worker"))
        .filter_map(|l| l.split("took_us").nth(1))
        .filter_map(|rest| {
            rest.trim_start_matches('=')
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse::<u64>()
                .ok()
        })
        .next_back();
    for l in log
        .lines()
        .filter(|l| {
            l.contains("fault injected") || l.contains("restarting failed child") || l.contains("child started")
        })
        .rev()
        .take(4)
    {
        let _ = writeln!(out, "  log: {l}");
    }
    lc.stop_all();
    let _ = std::fs::remove_dir_all(&dir);

    let r = RestartResult {
        nodes: names.len(),
        replicas,
        orders_in_store: opts.orders,
        fill_secs,
        store_bytes,
        start_to_ready_ms,
        start_to_ready_after_kill_ms,
        rss_ready_mb,
        rss_after_load_mb,
        orders_per_sec_after_restart,
        supervised_restart_ms,
        respawn_us,
    };
    let _ = writeln!(
        out,
        "orders in store: {}  (n1's orders stores {:.0} MB on disk, filled in {:.1} s)\nstart to ready: {:.0} ms{}\nRSS: {:.1} MB when ready, {:.1} MB after 5 s of load ({:.0} orders/s)\nsupervised restart of the orders worker: {:.1} ms until the API answers again (respawn itself: {} µs)",
        r.orders_in_store,
        r.store_bytes as f64 / 1e6,
        r.fill_secs,
        r.start_to_ready_ms,
        r.start_to_ready_after_kill_ms
            .map(|k| format!(" after a graceful stop; {k:.0} ms after a SIGKILL"))
            .unwrap_or_default(),
        r.rss_ready_mb,
        r.rss_after_load_mb,
        r.orders_per_sec_after_restart,
        r.supervised_restart_ms,
        r.respawn_us.map(|u| u.to_string()).unwrap_or_else(|| "?".into())
    );
    Ok(r)
}
