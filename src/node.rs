//! Running one node: bind the HTTP port, start the cluster layer, open the stores and start the
//! hosted capabilities, serve the API, tell systemd when it is ready (and keep its watchdog fed),
//! and on SIGINT/SIGTERM drain ([`crate::lifecycle`]) and exit 0. Further signals during the drain
//! are only logged: it is bounded anyway, and a terminal's Ctrl-C reaches a local cluster's nodes
//! as well as the launcher that then sends them SIGTERM (`bulkhead demo`). SIGKILL stops at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bulkhead_actors::start_capabilities;
use bulkhead_cluster::Cluster;
use bulkhead_http::auth::Guard;
use bulkhead_http::clients::{self, ClientsFile};
use bulkhead_http::drain::Drain;
use bulkhead_http::ready::{self, Readiness};
use bulkhead_http::{AppState, AuthMode, HttpFront, HttpMetrics, OrdersInFlight};
use bulkhead_launch::config::NodeConfig;
use bulkhead_storage::StoreOptions;
use ractor::Actor;
use tokio::net::TcpListener;

use crate::lifecycle::{self, Bounds};
use crate::systemd::{self, LivenessFacts, Systemd};

/// Why a node did not start (or stopped before serving). Printed as the process's last line.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen for HTTP on {addr}: {source}")]
    HttpListen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot create data_dir {}: {source}", .path.display())]
    CreateDataDir { path: PathBuf, source: std::io::Error },
    #[error("cannot read data_dir {}: {source}", .path.display())]
    ReadDataDir { path: PathBuf, source: std::io::Error },
    #[error(
        "data_dir {} is not empty: `bulkhead replace` brings a new, empty host in for a node that is gone for good. \
         To restart this node with its data, run `bulkhead node --config ...`; to replace it anyway, move the data dir away first",
        .path.display()
    )]
    NotANewHost { path: PathBuf },
    /// The named clients file would not parse (its own message says where).
    #[error("{0}")]
    ClientsFile(String),
    /// The cluster layer would not start (its own message says why: listen, TLS, cookie).
    #[error("{0}")]
    Cluster(String),
    #[error("auth is on but no API tokens were read from the token files")]
    NoTokens,
    #[error("cannot start the HTTP front: {0}")]
    HttpFront(String),
}

/// `bulkhead replace`: runs a *new, empty* host in place of a node whose host is gone for good.
///
/// The new host takes the node's name (the shard map names nodes, so nothing else changes) with
/// its own addresses, and joins through its seeds, which learn its address from it. Its stores
/// are new, so each of its replicas is a new member (a new incarnation): every group adds it as a
/// learner, catches it up (by snapshot when the log was purged), then makes it a voter in place of
/// the old host's member, which can never vote again. Refuses a data dir that holds anything, so
/// that a node with its data is never started as a replacement by mistake.
pub async fn replace(cfg: NodeConfig) -> Result<(), StartError> {
    check_new_host(&cfg.data_dir)?;
    tracing::info!(
        node = %cfg.name, cluster = %cfg.advertised_cluster_addr(),
        "replacing the host of {}: this host starts empty; every group moves {}'s replicas here and drops the old host's members",
        cfg.name, cfg.name
    );
    run(cfg).await
}

/// A replacement host must start with nothing of the node's data: a missing or empty data dir.
fn check_new_host(data_dir: &Path) -> Result<(), StartError> {
    match std::fs::read_dir(data_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StartError::ReadDataDir { path: data_dir.to_path_buf(), source }),
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(StartError::NotANewHost { path: data_dir.to_path_buf() }),
        },
    }
}

/// Runs the node until a termination signal.
pub async fn run(cfg: NodeConfig) -> Result<(), StartError> {
    for w in cfg.warnings() {
        tracing::warn!("config: {w}");
    }
    // Bind first: a port already in use is the most common start-up error, and says so at once.
    let listener = TcpListener::bind(cfg.http_listen)
        .await
        .map_err(|source| StartError::HttpListen { addr: cfg.http_listen, source })?;
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|source| StartError::CreateDataDir { path: cfg.data_dir.clone(), source })?;
    // Named clients: read once now (a file that will not parse stops the start), watched later.
    let clients_file = match (&cfg.clients_file, cfg.auth) {
        (Some(path), AuthMode::Tokens) => Some(ClientsFile::open(path.clone()).map_err(StartError::ClientsFile)?),
        _ => None,
    };
    let cluster = Cluster::start(cfg.cluster()).await.map_err(StartError::Cluster)?;
    let opts = StoreOptions { durability: cfg.durability, ..StoreOptions::default() };
    let caps = start_capabilities(&cluster, &cfg.data_dir, &opts, cfg.fault_injection, &cfg.orders).await;
    let metrics = Arc::new(HttpMetrics::default());
    if cfg.auth == AuthMode::Off {
        tracing::warn!("auth = \"off\": anyone who reaches {} may do anything an admin may", cfg.http_listen);
    }
    // Fail closed: auth on with no tokens read would otherwise let everyone in.
    let tokens = match (cfg.auth, &cfg.tokens) {
        (AuthMode::Off, _) => None,
        (AuthMode::Tokens, Some(t)) => Some(t.clone()),
        (AuthMode::Tokens, None) => return Err(StartError::NoTokens),
    };
    let mut guard = Guard::new(tokens, cfg.rate_limit, metrics.clone());
    let mut clients_watch = None;
    if let Some(file) = clients_file {
        guard = guard.with_clients(file.clone());
        clients_watch = Some(clients::watch(file));
    }
    let drain = Arc::new(Drain::default());
    let state = AppState {
        cluster: cluster.clone(),
        fault_injection: cfg.fault_injection,
        guard: Arc::new(guard),
        metrics,
        orders_in_flight: Arc::new(OrdersInFlight::new(cfg.limits.orders_in_flight)),
        edge: bulkhead_http::edge::EdgeConfig::from(&cfg.http),
        drain: drain.clone(),
    };
    let (front, _) = Actor::spawn(Some("bulkhead.http".into()), HttpFront, (listener, state))
        .await
        .map_err(|e| StartError::HttpFront(e.to_string()))?;
    tracing::info!(
        node = %cfg.name, pid = std::process::id(), http = %cfg.http_listen, cluster = %cfg.cluster_listen,
        capabilities = ?cfg.hosted(), failed = ?caps.failed.keys().collect::<Vec<_>>(), "node started"
    );
    let sd = Systemd::from_env();
    let notifier = sd.spawn_ready_notifier({
        let cluster = cluster.clone();
        move || match ready::judge(&ready::gather(&cluster)) {
            Readiness::Ready => Ok(()),
            Readiness::Draining => Err("draining".into()),
            Readiness::NotReady(problems) => Err(problems.join("; ")),
        }
    });
    let watchdog = sd.spawn_watchdog({
        let (cluster, front) = (cluster.clone(), front.clone());
        let membership_limit = systemd::membership_limit(cfg.timing.heartbeat_ms);
        move || {
            systemd::alive(&LivenessFacts {
                draining: cluster.is_draining(),
                membership_silent_for: cluster.membership_silent_for(),
                membership_limit,
                http_front: front.get_status() == ractor::ActorStatus::Running,
            })
        }
    });
    wait_for_signal().await;
    sd.stopping();
    if let Some(n) = notifier {
        n.abort();
    }
    let repeated = tokio::spawn(async {
        loop {
            wait_for_signal().await;
            tracing::warn!("already draining: the drain ends within its bound (SIGKILL stops at once)");
        }
    });
    let node = lifecycle::Node { cluster, drain, front, caps };
    lifecycle::drain(&node, &Bounds::new(&cfg.http), &sd).await;
    repeated.abort();
    if let Some(w) = clients_watch {
        w.abort();
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_new_host;

    #[test]
    fn a_replacement_starts_only_on_an_empty_or_missing_data_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(check_new_host(&dir.path().join("absent")).is_ok());
        assert!(check_new_host(dir.path()).is_ok());
        std::fs::create_dir(dir.path().join("payments-0")).expect("mkdir");
        let e = check_new_host(dir.path()).expect_err("a data dir with a store");
        assert!(matches!(e, super::StartError::NotANewHost { .. }), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("not empty") && e.contains("bulkhead node"), "{e}");
    }
}
