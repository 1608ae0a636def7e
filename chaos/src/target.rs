//! The cluster under test and how faults reach it: a local demo cluster the tool launches (signals
//! to its own child processes), or a remote one (the operator's shell commands, and the nodes'
//! fault-injection admin endpoints for partitions and panics).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bulkhead_launch::topology::{demo_hosts, Ports, NODES};
use bulkhead_launch::{free_ports, LocalCluster, LocalSettings};

use crate::scenario::{Action, ClusterSpec, Commands, Fault};

pub enum Target {
    Local { lc: LocalCluster, names: Vec<String> },
    Remote { nodes: Vec<(String, String)>, commands: Commands },
}

impl Target {
    /// Launches the three-node demo topology under `data_dir`, fault injection on.
    pub fn launch_local(exe: &Path, data_dir: &Path, settings: &LocalSettings) -> Result<Target, String> {
        let p = free_ports(6)?;
        let ports = [
            Ports { cluster: p[0], http: p[1] },
            Ports { cluster: p[2], http: p[3] },
            Ports { cluster: p[4], http: p[5] },
        ];
        let lc = LocalCluster::launch_for_load(exe, data_dir, ports, settings)?;
        Ok(Target::Local { lc, names: NODES.iter().map(|s| s.to_string()).collect() })
    }

    pub fn remote(spec: &ClusterSpec) -> Target {
        Target::Remote {
            nodes: spec.nodes.iter().map(|n| (n.name.clone(), n.http.trim_end_matches('/').to_string())).collect(),
            commands: spec.commands.clone(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Target::Local { .. } => "local",
            Target::Remote { .. } => "remote",
        }
    }

    pub fn names(&self) -> Vec<String> {
        match self {
            Target::Local { names, .. } => names.clone(),
            Target::Remote { nodes, .. } => nodes.iter().map(|(n, _)| n.clone()).collect(),
        }
    }

    pub fn urls(&self) -> Vec<String> {
        match self {
            Target::Local { lc, names } => (0..names.len()).map(|i| lc.url(i)).collect(),
            Target::Remote { nodes, .. } => nodes.iter().map(|(_, u)| u.clone()).collect(),
        }
    }

    fn index(&self, node: &str) -> Result<usize, String> {
        self.names().iter().position(|n| n == node).ok_or_else(|| format!("no node named {node}"))
    }

    /// Node name → capabilities it hosts: the demo map locally; `GET /v1/cluster` remotely.
    pub async fn hosts(&self, http: &reqwest::Client) -> Result<BTreeMap<String, Vec<String>>, String> {
        match self {
            Target::Local { .. } => Ok(demo_hosts()),
            Target::Remote { nodes, .. } => {
                let mut last = String::new();
                for (_, url) in nodes {
                    match get_json(http, &format!("{url}/v1/cluster")).await {
                        Ok(v) => {
                            let mut out = BTreeMap::new();
                            for n in v["nodes"].as_array().into_iter().flatten() {
                                let caps = n["capabilities"].as_array().into_iter().flatten();
                                let caps = caps.filter_map(|c| c.as_str().map(str::to_string)).collect();
                                out.insert(n["name"].as_str().unwrap_or_default().to_string(), caps);
                            }
                            return Ok(out);
                        }
                        Err(e) => last = e,
                    }
                }
                Err(format!("no node answered GET /v1/cluster: {last}"))
            }
        }
    }

    /// Injects `f`.
    pub async fn inject(&mut self, f: &Fault, http: &reqwest::Client) -> Result<(), String> {
        let i = self.index(&f.node)?;
        match (self, f.action) {
            // These wait for the child to exit (kill: reap; restart: its drain, up to `STOP_WAIT`):
            // off the async workers, so the load and the observer keep their pace meanwhile.
            (Target::Local { lc, .. }, Action::Kill) => {
                tokio::task::block_in_place(|| lc.kill(i));
                Ok(())
            }
            (Target::Local { lc, .. }, Action::Pause) => {
                lc.signal(i, libc::SIGSTOP);
                Ok(())
            }
            (Target::Local { lc, .. }, Action::Wipe | Action::Replace) => {
                tokio::task::block_in_place(|| lc.kill(i));
                let dir = lc.data_dir(i).to_path_buf();
                std::fs::remove_dir_all(&dir).map_err(|e| format!("cannot wipe {}: {e}", dir.display()))
            }
            (Target::Local { lc, .. }, Action::Restart) => {
                tokio::task::block_in_place(|| lc.stop(i));
                Ok(())
            }
            (t, Action::Partition) => match t {
                Target::Remote { commands: Commands { partition: Some(cmd), .. }, nodes } => {
                    run_command(cmd, &nodes[i].0, &nodes[i].1).await
                }
                _ => admin(http, &t.urls()[i], reqwest::Method::POST, "/admin/partition").await,
            },
            (t, Action::Panic) => {
                let cap = f.capability.as_deref().unwrap_or_default();
                admin(http, &t.urls()[i], reqwest::Method::POST, &format!("/admin/panic/{cap}")).await
            }
            (Target::Remote { nodes, commands }, Action::Replace) => {
                let missing = || "the scenario has no [cluster.commands] `kill` for a replace".to_string();
                run_command(commands.kill.as_ref().ok_or_else(missing)?, &nodes[i].0, &nodes[i].1).await
            }
            (Target::Remote { nodes, commands }, Action::Wipe) => {
                let missing = || "the scenario has no [cluster.commands] `kill` and `wipe` for a wipe".to_string();
                run_command(commands.kill.as_ref().ok_or_else(missing)?, &nodes[i].0, &nodes[i].1).await?;
                run_command(commands.wipe.as_ref().ok_or_else(missing)?, &nodes[i].0, &nodes[i].1).await
            }
            (Target::Remote { nodes, commands }, action) => {
                let cmd = match action {
                    Action::Kill => &commands.kill,
                    Action::Pause => &commands.pause,
                    _ => &commands.stop,
                };
                let cmd =
                    cmd.as_ref().ok_or(format!("the scenario has no [cluster.commands] for {}", action.as_str()))?;
                run_command(cmd, &nodes[i].0, &nodes[i].1).await
            }
        }
    }

    /// Heals `f` (start again, SIGCONT, heal links); panics heal themselves.
    pub async fn heal(&mut self, f: &Fault, http: &reqwest::Client) -> Result<(), String> {
        let i = self.index(&f.node)?;
        match (self, f.action) {
            (_, Action::Panic) => Ok(()),
            (Target::Local { lc, .. }, Action::Kill | Action::Restart | Action::Wipe) => Ok(lc.start(i)?),
            // A new host: a new cluster address (what the others must learn); the same HTTP port,
            // as clients reach a replaced node through a load balancer or a moved DNS name.
            (Target::Local { lc, .. }, Action::Replace) => {
                let cluster = free_ports(1)?[0];
                let http = lc.http_port(i);
                Ok(tokio::task::block_in_place(|| lc.replace(i, Ports { cluster, http }))?)
            }
            (Target::Local { lc, .. }, Action::Pause) => {
                lc.signal(i, libc::SIGCONT);
                Ok(())
            }
            (t, Action::Partition) => match t {
                Target::Remote { commands: Commands { heal: Some(cmd), .. }, nodes } => {
                    run_command(cmd, &nodes[i].0, &nodes[i].1).await
                }
                _ => admin(http, &t.urls()[i], reqwest::Method::DELETE, "/admin/partition").await,
            },
            (Target::Remote { nodes, commands }, action) => {
                let (cmd, what) = match action {
                    Action::Pause => (&commands.resume, "resume"),
                    Action::Replace => (&commands.replace, "replace"),
                    _ => (&commands.start, "start"),
                };
                let cmd = cmd.as_ref().ok_or(format!("the scenario has no [cluster.commands] `{what}`"))?;
                run_command(cmd, &nodes[i].0, &nodes[i].1).await
            }
        }
    }

    /// Checks, before anything runs, that every fault in `faults` can be injected and healed here.
    pub fn can_run(&self, faults: &[Fault]) -> Result<(), String> {
        let Target::Remote { commands, .. } = self else { return Ok(()) };
        for f in faults {
            let need: &[(&str, &Option<String>)] = match f.action {
                Action::Kill => &[("kill", &commands.kill), ("start", &commands.start)],
                Action::Pause => &[("pause", &commands.pause), ("resume", &commands.resume)],
                Action::Restart => &[("stop", &commands.stop), ("start", &commands.start)],
                Action::Wipe => &[("kill", &commands.kill), ("wipe", &commands.wipe), ("start", &commands.start)],
                Action::Replace => &[("kill", &commands.kill), ("replace", &commands.replace)],
                Action::Partition | Action::Panic => &[],
            };
            for (name, cmd) in need {
                if cmd.is_none() {
                    return Err(format!(
                        "a {} fault needs `{name}` in [cluster.commands] (a shell command; {{node}} and {{host}} are replaced)",
                        f.action.as_str()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Local node logs (to copy into the report directory).
    pub fn log_paths(&self) -> Vec<std::path::PathBuf> {
        match self {
            Target::Local { lc, names } => (0..names.len()).map(|i| lc.log_path(i)).collect(),
            Target::Remote { .. } => Vec::new(),
        }
    }

    /// Stops a local cluster (SIGCONT first, so a paused node can exit).
    pub fn shutdown(&mut self) {
        if let Target::Local { lc, .. } = self {
            lc.stop_all();
        }
    }
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<serde_json::Value, String> {
    let r = http.get(url).timeout(Duration::from_secs(2)).send().await.map_err(|e| e.to_string())?;
    r.json().await.map_err(|e| e.to_string())
}

async fn admin(http: &reqwest::Client, base: &str, method: reqwest::Method, path: &str) -> Result<(), String> {
    let r = http
        .request(method, format!("{base}{path}"))
        // Admin actions take a JSON body (a cross-site form cannot send one).
        .json(&serde_json::json!({"reason": "bulkhead-chaos"}))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .map_err(|e| format!("{base}{path}: {e}"))?;
    match r.status().as_u16() {
        200..=299 => Ok(()),
        404 => Err(format!("{base}{path}: 404 — is the node running with fault_injection = true?")),
        401 | 403 => {
            Err(format!("{base}{path}: HTTP {} — pass the cluster's admin token with --admin-token-file", r.status()))
        }
        s => Err(format!("{base}{path}: HTTP {s}")),
    }
}

async fn run_command(template: &str, node: &str, url: &str) -> Result<(), String> {
    let host = url.split("://").nth(1).unwrap_or(url).split(['/', ':']).next().unwrap_or_default();
    let cmd = template.replace("{node}", node).replace("{host}", host);
    let run = tokio::process::Command::new("sh").arg("-c").arg(&cmd).kill_on_drop(true).output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .map_err(|_| format!("`{cmd}` did not finish within 120 s"))?
        .map_err(|e| format!("cannot run `{cmd}`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`{cmd}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}
