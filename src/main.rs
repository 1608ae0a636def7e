//! `bulkhead`: parses the command line and wires the pieces; nothing else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// The allocator: jemalloc served 25 % more orders than glibc's malloc at the same memory order,
// and as many as mimalloc with half its RSS (BENCHMARKS.md, "Allocators"). jemalloc wins if both
// features are on.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "bulkhead", version, about = "A fault-isolated order system on a small cluster of nodes")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum CertsCmd {
    /// A new cluster CA: DIR/ca.pem and DIR/ca.key (0600).
    Init { dir: PathBuf },
    /// A certificate for node NODE, signed by the CA in DIR: DIR/NODE.pem and DIR/NODE.key (0600).
    Issue { dir: PathBuf, node: String },
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node from a config file (bare metal; see deploy/).
    Node {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a new, empty host in place of a node whose host is gone for good: the config names the
    /// dead node and gives this host's addresses; every group moves that node's replicas here.
    Replace {
        #[arg(long)]
        config: PathBuf,
    },
    /// Copy this stopped node's data dir to DIR/<node>-<unix seconds>/ (back up every node in one
    /// cluster-wide stop if the copies are ever to be restored: docs/operations.md, "Backups").
    Backup {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        to: PathBuf,
    },
    /// Start this stopped node over as a new member of every group: its data dir is moved aside
    /// (kept), and at its next start it catches up from the current leaders. It never votes with
    /// an old log, which a copied-back backup would.
    Restore {
        #[arg(long)]
        config: PathBuf,
    },
    /// After a lost majority: make this stopped node's replicas their groups' only voters, so
    /// they serve again with what they hold (every other node of those groups must come back as
    /// a new member: `restore` first). `--inspect` only prints each replica's last entry, to
    /// choose the survivor furthest ahead.
    Recover {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        inspect: bool,
        /// Only these groups (e.g. `orders/0`; repeatable); default every group this node hosts.
        #[arg(long = "group", value_name = "CAP/SHARD")]
        groups: Vec<String>,
    },
    /// Make the API token files `client.token` and `admin.token` in DIR (mode 0600), or rotate one;
    /// or add, revoke and list named clients in DIR/clients.tokens (running nodes read it again
    /// within a second: copy it to every node).
    Tokens {
        dir: PathBuf,
        /// Put a new token first in this scope's file, keeping the previous one for the changeover.
        #[arg(long, value_enum, conflicts_with_all = ["retire", "add", "revoke", "list"])]
        rotate: Option<bulkhead::keys::TokenScope>,
        /// Drop every token of this scope's file but the first (newest).
        #[arg(long, value_enum, conflicts_with_all = ["add", "revoke", "list"])]
        retire: Option<bulkhead::keys::TokenScope>,
        /// Make a named client with a token of its own (printed once; the file keeps its SHA-256).
        #[arg(long, value_name = "NAME", conflicts_with_all = ["revoke", "list"])]
        add: Option<String>,
        /// The scope of the client made with --add.
        #[arg(long, value_enum, default_value = "client", requires = "add")]
        scope: bulkhead::keys::TokenScope,
        /// Revoke a named client: its token stops working on each node within a second of the
        /// node's copy of the file changing.
        #[arg(long, value_name = "NAME", conflicts_with = "list")]
        revoke: Option<String>,
        /// List the named clients and their scopes.
        #[arg(long)]
        list: bool,
    },
    /// Make the cluster CA, or a node's certificate signed by it (mutual TLS on cluster links).
    Certs {
        #[command(subcommand)]
        action: CertsCmd,
    },
    /// Start a local 3-node cluster on 127.0.0.1 with a seeded catalog; Ctrl-C stops it.
    Demo {
        #[arg(long, default_value = "./bulkhead-data")]
        data_dir: PathBuf,
        /// HTTP port of n1 (n2 and n3 use the next two).
        #[arg(long, default_value_t = 8080)]
        http_port: u16,
        /// Cluster port of n1 (n2 and n3 use the next two).
        #[arg(long, default_value_t = 7101)]
        cluster_port: u16,
        /// Enable the fault-injection admin endpoints (/admin/panic, /admin/partition), e.g. for
        /// `bulkhead-chaos run ... --nodes n1=http://127.0.0.1:8080,...`.
        #[arg(long)]
        fault_injection: bool,
    },
    /// Throughput and latency of POST /v1/orders on local 1- and 3-node clusters (real processes).
    Bench {
        /// Cluster sizes to run, in order (1 = every capability on one node; 3 = the demo topology).
        #[arg(long, default_value = "1,3", value_delimiter = ',')]
        nodes: Vec<usize>,
        /// Replicas per shard of the replicated capabilities, each run in turn on the 3-node
        /// cluster (e.g. 1,3 to compare; a 1-node cluster always has 1).
        #[arg(long, default_value = "3", value_delimiter = ',')]
        replicas: Vec<u32>,
        /// Length of the closed loop and of the open loop, each (e.g. 15s).
        #[arg(long, default_value = "15s", value_parser = bulkhead::bench::parse_duration)]
        duration: std::time::Duration,
        /// Warm-up before measuring.
        #[arg(long, default_value = "2s", value_parser = bulkhead::bench::parse_duration)]
        warmup: std::time::Duration,
        /// Concurrent clients in the closed loop.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// SIGKILL the shipping node a third of the way into the 3-node closed loop.
        #[arg(long)]
        kill_shipping: bool,
        /// Parent folder for the clusters' data (default: the system temp dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// `fsync` (default, as in production) or `flush` (skips fdatasync; for comparison only).
        #[arg(long, default_value = "fsync", value_parser = parse_durability)]
        durability: bulkhead_storage::Durability,
        /// Send all orders to the first node's API (default: spread over every node's API).
        #[arg(long)]
        single_front: bool,
        /// The clusters' `[timing] raft_heartbeat_ms` (default 100): openraft's AppendEntries
        /// timeout too, worth comparing under load.
        #[arg(long)]
        raft_heartbeat_ms: Option<u64>,
        /// Keep each node's log (copied next to the run's deleted data folder) to read afterwards.
        #[arg(long)]
        keep_logs: bool,
        /// Instead: fill the orders stores with this many orders, then measure restart-to-ready,
        /// memory and a supervised worker restart, once per `--nodes` size (on three nodes, with
        /// the first `--replicas` value, n1 is restarted while the others run: after a SIGKILL,
        /// then after a graceful stop).
        #[arg(long)]
        restart_orders: Option<u64>,
    },
}

fn parse_durability(s: &str) -> Result<bulkhead_storage::Durability, String> {
    match s {
        "fsync" => Ok(bulkhead_storage::Durability::Fsync),
        "flush" => Ok(bulkhead_storage::Durability::Flush),
        _ => Err(format!("`{s}`: expected fsync or flush")),
    }
}

/// Loads a node's config, sets up its logs, spans and metrics from it, runs `node`, and flushes
/// what telemetry still holds.
async fn with_telemetry<F, Fut>(config: &std::path::Path, node: F) -> Result<(), String>
where
    F: FnOnce(bulkhead_launch::config::NodeConfig) -> Fut,
    Fut: std::future::Future<Output = Result<(), bulkhead::node::StartError>>,
{
    let cfg = match bulkhead_launch::config::NodeConfig::load(config) {
        Ok(cfg) => cfg,
        Err(e) => {
            bulkhead::telemetry::init_plain();
            return Err(e);
        }
    };
    let telemetry = bulkhead::telemetry::init(&cfg)?;
    let result = node(cfg).await;
    telemetry.shutdown().await;
    result.map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Node { config } => with_telemetry(&config, bulkhead::node::run).await,
        Cmd::Replace { config } => with_telemetry(&config, bulkhead::node::replace).await,
        Cmd::Tokens { dir, rotate, retire, add, scope, revoke, list } => {
            use bulkhead::keys::TokenAction;
            let action = match (rotate, retire, add, revoke) {
                (Some(s), ..) => TokenAction::Rotate(s),
                (_, Some(s), ..) => TokenAction::Retire(s),
                (_, _, Some(name), _) => TokenAction::Add { name, scope },
                (_, _, _, Some(name)) => TokenAction::Revoke(name),
                _ if list => TokenAction::List,
                _ => TokenAction::Init,
            };
            bulkhead::keys::tokens(&dir, action, &mut std::io::stdout())
        }
        Cmd::Backup { config, to } => bulkhead_launch::config::NodeConfig::load(&config)
            .and_then(|cfg| bulkhead::restore::backup(&cfg, &to, &mut std::io::stdout()).map(drop)),
        Cmd::Restore { config } => bulkhead_launch::config::NodeConfig::load(&config)
            .and_then(|cfg| bulkhead::restore::restore(&cfg, &mut std::io::stdout()).map(drop)),
        Cmd::Recover { config, inspect, groups } => match bulkhead_launch::config::NodeConfig::load(&config) {
            Ok(cfg) => bulkhead::restore::recover(&cfg, inspect, &groups, &mut std::io::stdout()).await,
            Err(e) => Err(e),
        },
        Cmd::Certs { action: CertsCmd::Init { dir } } => bulkhead::keys::certs_init(&dir, &mut std::io::stdout()),
        Cmd::Certs { action: CertsCmd::Issue { dir, node } } => {
            bulkhead::keys::certs_issue(&dir, &node, &mut std::io::stdout())
        }
        Cmd::Demo { data_dir, http_port, cluster_port, fault_injection } => {
            let opts = bulkhead::demo::DemoOptions { data_dir, http_port, cluster_port, fault_injection };
            bulkhead::demo::run(opts, &mut std::io::stdout()).await
        }
        Cmd::Bench { restart_orders: Some(orders), data_dir, json, nodes, replicas, .. } => {
            let mut results = Vec::new();
            let mut failed = None;
            for n in nodes {
                let replicas = if n == 1 { 1 } else { replicas.first().copied().unwrap_or(3) };
                let opts = bulkhead::bench::RestartOptions { orders, data_dir: data_dir.clone(), nodes: n, replicas };
                match bulkhead::bench::restart(opts, &mut std::io::stdout()).await {
                    Ok(r) => results.push(r),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match (failed, json) {
                (Some(e), _) => Err(e),
                (None, Some(path)) => serde_json::to_string_pretty(&results)
                    .map_err(|e| e.to_string())
                    .and_then(|t| bulkhead::bench::write_json(&path, &t)),
                (None, None) => Ok(()),
            }
        }
        Cmd::Bench {
            nodes,
            replicas,
            duration,
            warmup,
            concurrency,
            json,
            kill_shipping,
            data_dir,
            durability,
            restart_orders: None,
            single_front,
            raft_heartbeat_ms,
            keep_logs,
        } => {
            let opts = bulkhead::bench::BenchOptions {
                nodes,
                replicas,
                duration,
                warmup,
                concurrency,
                json,
                kill_shipping,
                data_dir,
                durability,
                single_front,
                raft_heartbeat_ms,
                keep_logs,
            };
            bulkhead::bench::run(opts, &mut std::io::stdout()).await.map(|_| ())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead: {e}");
            ExitCode::FAILURE
        }
    }
}
