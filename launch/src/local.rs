//! A local cluster of real node processes: what `bulkhead demo` runs, and what the tests and the
//! chaos tool drive.
//!
//! [`LocalCluster`] writes a config per node, starts `bulkhead node --config ...` for each (logs to
//! `<data_dir>/logs/<node>.log`), waits on readiness (never a fixed sleep), and can kill, pause,
//! resume and restart nodes. Dropping it stops and reaps every child, even when a test panics.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_cluster::Timing;
use serde_json::Value;

use crate::config::NodeConfig;
use crate::error::LaunchError;
use crate::secrets::{authorized, LocalSecrets};
use crate::topology::{local_configs, write_config, Ports, NODES};

/// `n` distinct free TCP ports on 127.0.0.1, below the kernel's ephemeral range.
///
/// Not from port 0: the kernel hands those out of the same range it takes outgoing connections'
/// local ports from, and the nodes dial each other ten times a second while a peer is not up yet;
/// one of those dials could take a port between the pick and the node's bind ("Address already in
/// use", found in the tests). Ports below the range are never taken that way.
///
/// Nor twice in one process: a node restarted by a test releases its ports for a moment, and a
/// test running beside it could pick one of them then ("Address already in use" at the restart,
/// found in CI). Every port handed out is remembered (`HANDED_OUT`) and never picked again.
pub fn free_ports(n: usize) -> Result<Vec<u16>, LaunchError> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let ports = pick_ports(n, &handed_out)?;
    handed_out.extend(ports.iter().copied());
    Ok(ports)
}

/// Ports this process has handed out (see [`free_ports`]).
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

fn pick_ports(n: usize, handed_out: &std::collections::BTreeSet<u16>) -> Result<Vec<u16>, LaunchError> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|l| l.parse::<u16>().ok()))
        .unwrap_or(32768);
    if low <= 10_000 + n as u16 * 4 {
        return ephemeral_ports(n);
    }
    let mut held: Vec<TcpListener> = Vec::new();
    for _ in 0..n * 200 {
        if held.len() == n {
            break;
        }
        let port = rand::Rng::gen_range(&mut rand::thread_rng(), 10_000..low);
        if handed_out.contains(&port) || held.iter().any(|l| l.local_addr().map(|a| a.port()).ok() == Some(port)) {
            continue;
        }
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    if held.len() < n {
        return ephemeral_ports(n);
    }
    held.iter().map(|l| l.local_addr().map(|a| a.port()).map_err(LaunchError::Ports)).collect()
}

/// Asks the OS for `n` distinct free ports (port 0).
fn ephemeral_ports(n: usize) -> Result<Vec<u16>, LaunchError> {
    let listeners: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind("127.0.0.1:0").map_err(LaunchError::Ports)).collect::<Result<_, _>>()?;
    listeners.iter().map(|l| l.local_addr().map(|a| a.port()).map_err(LaunchError::Ports)).collect()
}

/// The variable tokio's runtime reads for its number of worker threads.
pub const WORKERS_VAR: &str = "TOKIO_WORKER_THREADS";

/// Tokio workers for each of `nodes` node processes sharing `cores` cores: an equal share, at
/// least one. tokio's default (one per core in every process) makes three nodes on two cores run
/// six workers that wake and steal from each other: a third more context switches per order at
/// saturation, half again as many one order at a time, for no more throughput.
pub fn workers_per_node(cores: usize, nodes: usize) -> usize {
    (cores / nodes.max(1)).max(1)
}

/// How long [`LocalCluster::stop`] waits for a node's drain before SIGKILL.
pub const STOP_WAIT: Duration = Duration::from_secs(15);

pub struct LocalCluster {
    pub configs: Vec<NodeConfig>,
    config_paths: Vec<PathBuf>,
    children: Vec<Option<Child>>,
    /// Extra environment of each node's next start (e.g. libfaketime for a clock test).
    envs: Vec<Vec<(String, String)>>,
    exe: PathBuf,
    log_dir: PathBuf,
    http: reqwest::Client,
    secrets: LocalSecrets,
}

/// How a launched local cluster differs from the node defaults, in the words of a scenario file:
/// a `[timing]` table and a `durability` ("fsync" or "flush"). Made by [`LocalSettings::parse`],
/// which reads them as the node would, so a scenario with a misspelt knob is refused when it is read.
#[derive(Debug, Clone, Default)]
pub struct LocalSettings {
    timing: Timing,
    durability: Option<bulkhead_storage::Durability>,
}

impl LocalSettings {
    pub fn parse(timing: Option<&toml::Table>, durability: Option<&str>) -> Result<LocalSettings, LaunchError> {
        let timing: Timing = match timing {
            Some(t) => toml::Value::Table(t.clone()).try_into().map_err(LaunchError::Timing)?,
            None => Timing::default(),
        };
        let durability = match durability {
            Some(d) => Some(
                toml::Value::String(d.to_string())
                    .try_into()
                    .map_err(|source| LaunchError::Durability { value: d.to_string(), source })?,
            ),
            None => None,
        };
        Ok(LocalSettings { timing, durability })
    }
}

impl LocalCluster {
    /// The three demo nodes with fault injection on and `settings` applied, ready for a load test:
    /// the per-client rate limit is lifted, since the load and a checker's reads (tens of
    /// thousands in seconds) all come from one address. What the chaos tool launches.
    pub fn launch_for_load(
        exe: &Path,
        data_dir: &Path,
        ports: [Ports; 3],
        settings: &LocalSettings,
    ) -> Result<LocalCluster, LaunchError> {
        let secrets = LocalSecrets::ensure(data_dir, &NODES)?;
        let mut configs = local_configs(data_dir, &secrets, &ports, settings.timing.clone(), true);
        for c in &mut configs {
            if let Some(d) = settings.durability {
                c.durability = d;
            }
            c.rate_limit = bulkhead_http::RateLimit::LOAD_TEST;
        }
        Self::launch_configs(exe, data_dir, configs)
    }

    /// Writes the configs and starts the three demo nodes (does not wait for readiness).
    pub fn launch(
        exe: &Path,
        data_dir: &Path,
        ports: [Ports; 3],
        timing: Timing,
        fault_injection: bool,
    ) -> Result<LocalCluster, LaunchError> {
        let secrets = LocalSecrets::ensure(data_dir, &NODES)?;
        let configs = local_configs(data_dir, &secrets, &ports, timing, fault_injection);
        Self::launch_configs(exe, data_dir, configs)
    }

    /// As [`LocalCluster::launch`], with every node's config passed through `edit` first.
    pub fn launch_edited(
        exe: &Path,
        data_dir: &Path,
        ports: [Ports; 3],
        timing: Timing,
        fault_injection: bool,
        edit: impl Fn(&mut NodeConfig),
    ) -> Result<LocalCluster, LaunchError> {
        let secrets = LocalSecrets::ensure(data_dir, &NODES)?;
        let mut configs = local_configs(data_dir, &secrets, &ports, timing, fault_injection);
        configs.iter_mut().for_each(edit);
        Self::launch_configs(exe, data_dir, configs)
    }

    /// Writes `configs` under `data_dir` and starts one node per config. The configs use the
    /// secrets of `data_dir` ([`LocalSecrets`]); this handle's HTTP client sends its admin token.
    pub fn launch_configs(exe: &Path, data_dir: &Path, configs: Vec<NodeConfig>) -> Result<LocalCluster, LaunchError> {
        let names: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
        let secrets = LocalSecrets::ensure(data_dir, &names)?;
        let mut config_paths = Vec::new();
        for cfg in &configs {
            let path = data_dir.join(format!("{}.toml", cfg.name));
            write_config(cfg, &path)?;
            config_paths.push(path);
        }
        let log_dir = data_dir.join("logs");
        std::fs::create_dir_all(&log_dir).map_err(LaunchError::io("create", &log_dir))?;
        let http = authorized(reqwest::Client::builder().timeout(Duration::from_secs(10)), &secrets.admin_token()?)?;
        let mut lc = LocalCluster {
            secrets,
            configs,
            config_paths,
            children: Vec::new(),
            envs: Vec::new(),
            exe: exe.to_path_buf(),
            log_dir,
            http,
        };
        lc.children = lc.configs.iter().map(|_| None).collect();
        lc.envs = lc.configs.iter().map(|_| Vec::new()).collect();
        for i in 0..lc.configs.len() {
            lc.start(i)?;
        }
        Ok(lc)
    }

    /// Sets the extra environment node `i` gets from its next start on (replacing any earlier).
    pub fn set_env(&mut self, i: usize, vars: &[(&str, &str)]) {
        self.envs[i] = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    }

    /// The config file node `i` starts with.
    pub fn config_path(&self, i: usize) -> &Path {
        &self.config_paths[i]
    }

    /// Starts node `i` (again).
    pub fn start(&mut self, i: usize) -> Result<(), LaunchError> {
        self.spawn(i, "node")
    }

    /// Replaces the host of node `i` for good, as `bulkhead replace` does on a new machine: the
    /// old process is SIGKILLed and its data dir deleted (that disk is gone), and a new host
    /// under the same name starts empty on `ports`, seeded with the other nodes' current addresses
    /// (they learn its new address from it, and every config's seeds are brought up to date for
    /// the next start). Every group then moves the node's replicas to the new host.
    pub fn replace(&mut self, i: usize, ports: Ports) -> Result<(), LaunchError> {
        self.kill(i);
        let cfg = &mut self.configs[i];
        match std::fs::remove_dir_all(&cfg.data_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LaunchError::io("delete", &cfg.data_dir)(e)),
        }
        cfg.cluster_listen = std::net::SocketAddr::from(([127, 0, 0, 1], ports.cluster));
        cfg.http_listen = std::net::SocketAddr::from(([127, 0, 0, 1], ports.http));
        // As the runbook says: every config's seeds name the nodes' current addresses (the others
        // read theirs at their next start; a node whose seeds are all gone finds nobody).
        let addrs: Vec<String> = self.configs.iter().map(|c| c.cluster_listen.to_string()).collect();
        for (j, c) in self.configs.iter_mut().enumerate() {
            c.seeds = addrs.iter().enumerate().filter(|(k, _)| *k != j).map(|(_, a)| a.clone()).collect();
            write_config(c, &self.config_paths[j])?;
        }
        self.spawn(i, "replace")
    }

    /// Starts node `i` with `bulkhead <subcommand> --config <its config>`.
    fn spawn(&mut self, i: usize, subcommand: &str) -> Result<(), LaunchError> {
        let log_path = self.log_path(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(LaunchError::io("open", &log_path))?;
        let err = log.try_clone().map_err(LaunchError::io("open", &log_path))?;
        let mut cmd = Command::new(&self.exe);
        // The nodes of a local cluster share this machine's cores: each gets its share of tokio
        // workers unless the caller chose (BENCHMARKS.md, "Tokio workers per node").
        let chosen = std::env::var_os(WORKERS_VAR).is_some() || self.envs[i].iter().any(|(k, _)| k == WORKERS_VAR);
        if !chosen {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            cmd.env(WORKERS_VAR, workers_per_node(cores, self.configs.len()).to_string());
        }
        let child = cmd
            .arg(subcommand)
            .arg("--config")
            .arg(&self.config_paths[i])
            .envs(self.envs[i].iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|source| LaunchError::Spawn { exe: self.exe.clone(), source })?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// Where this cluster's cookie, tokens and certificates are.
    pub fn secrets(&self) -> &LocalSecrets {
        &self.secrets
    }

    /// An HTTP client that sends the admin token (`timeout`: per request).
    pub fn admin_client(&self, timeout: Duration) -> Result<reqwest::Client, LaunchError> {
        authorized(reqwest::Client::builder().timeout(timeout), &self.secrets.admin_token()?)
    }

    pub fn pid(&self, i: usize) -> Option<u32> {
        self.children[i].as_ref().map(Child::id)
    }

    /// `http://127.0.0.1:<port>` of node `i`.
    /// Node `i`'s data dir (what a wipe deletes).
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.configs[i].data_dir
    }

    /// Node `i`'s HTTP port (what a replacement host keeps).
    pub fn http_port(&self, i: usize) -> u16 {
        self.configs[i].http_listen.port()
    }

    pub fn url(&self, i: usize) -> String {
        format!("http://{}", self.configs[i].http_listen)
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.log_dir.join(format!("{}.log", self.configs[i].name))
    }

    /// Sends `sig` (e.g. `libc::SIGSTOP`) to node `i`.
    pub fn signal(&self, i: usize, sig: i32) {
        if let Some(pid) = self.pid(i) {
            // SAFETY: kill(2) on a pid we spawned and have not yet reaped.
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
    }

    /// SIGKILLs node `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, up to [`STOP_WAIT`] to drain and exit (a drain takes `[http] drain_grace_ms`,
    /// then as long as the requests in flight and the leadership hand-overs: a few seconds on a
    /// local cluster), then SIGKILL; reaps.
    pub fn stop(&mut self, i: usize) {
        self.stop_some(&[i]);
    }

    /// Stops every node at once: each drains while the others do, so the whole cluster takes one
    /// drain's time, not three (a node stopped last would find no peer to hand leadership to anyway).
    pub fn stop_all(&mut self) {
        let all: Vec<usize> = (0..self.children.len()).collect();
        self.stop_some(&all);
    }

    fn stop_some(&mut self, nodes: &[usize]) {
        let mut stopping: Vec<Child> = nodes.iter().filter_map(|i| self.children[*i].take()).collect();
        for c in &stopping {
            // SAFETY: as in `signal`.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGCONT);
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_WAIT;
        while !stopping.is_empty() && Instant::now() < deadline {
            stopping.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
            std::thread::sleep(Duration::from_millis(20));
        }
        for mut c in stopping {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A node that exited on its own, with how.
    pub fn exited(&mut self) -> Option<(usize, String)> {
        for (i, c) in self.children.iter_mut().enumerate() {
            if let Some(child) = c {
                if let Ok(Some(status)) = child.try_wait() {
                    *c = None;
                    return Some((i, status.to_string()));
                }
            }
        }
        None
    }

    /// `PUT` of `body` (JSON) to `path` on node `i`: the status and the answer's JSON (`Null` if none).
    pub async fn put_json(&self, i: usize, path: &str, body: &Value) -> Result<(u16, Value), LaunchError> {
        let resp =
            self.http.put(format!("{}{path}", self.url(i))).json(body).send().await.map_err(LaunchError::Http)?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    pub async fn get_json(&self, i: usize, path: &str) -> Result<(u16, Value), LaunchError> {
        let resp = self.http.get(format!("{}{path}", self.url(i))).send().await.map_err(LaunchError::Http)?;
        let status = resp.status().as_u16();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Waits until every running node answers `/readyz` and sees every running node `up`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), LaunchError> {
        self.wait_joined(timeout, true).await
    }

    /// Waits until every running node sees every running node `up` (and, if `ready`, answers
    /// `/readyz` with 200; a node that cannot host a capability never does).
    pub async fn wait_joined(&self, timeout: Duration, ready: bool) -> Result<(), LaunchError> {
        let deadline = Instant::now() + timeout;
        let running: Vec<usize> = (0..self.children.len()).filter(|i| self.children[*i].is_some()).collect();
        let name = |i: usize| self.configs[i].name.as_str();
        let mut poll = tokio::time::interval(Duration::from_millis(100));
        poll.tick().await;
        loop {
            let mut missing = Vec::new();
            for &i in &running {
                match self.get_json(i, "/readyz").await {
                    Ok((200, _)) => {}
                    Ok(_) if !ready => {}
                    Ok((_, body)) => missing.push(format!("{}: {}", name(i), body["problems"])),
                    Err(e) => missing.push(format!("{}: {e}", name(i))),
                }
                if let Ok((200, view)) = self.get_json(i, "/v1/cluster").await {
                    for &j in &running {
                        let up = view["nodes"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|n| n["name"] == name(j) && n["status"] == "up");
                        if !up {
                            missing.push(format!("{} does not see {} up yet", name(i), name(j)));
                        }
                    }
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LaunchError::NotReady { after: timeout, missing: missing.join("; ") });
            }
            poll.tick().await;
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut() {
            if let Some(mut child) = c.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{free_ports, workers_per_node};

    /// A port a test's node released at a restart is never handed to another test of the process.
    #[test]
    fn no_port_is_handed_out_twice_in_one_process() {
        let first = free_ports(6).unwrap();
        let second = free_ports(6).unwrap();
        let all: std::collections::BTreeSet<u16> = first.iter().chain(&second).copied().collect();
        assert_eq!(all.len(), 12, "{first:?} {second:?}");
    }

    #[test]
    fn nodes_on_one_machine_share_its_cores_and_each_gets_at_least_one_worker() {
        assert_eq!(workers_per_node(2, 3), 1);
        assert_eq!(workers_per_node(8, 3), 2);
        assert_eq!(workers_per_node(16, 1), 16);
        assert_eq!(workers_per_node(1, 5), 1);
        assert_eq!(workers_per_node(4, 0), 4, "no nodes: treated as one");
    }
}
