//! Running one node: bind the HTTP port, start the cluster layer, open the stores and start the
//! hosted capabilities, serve the API, and on SIGINT/SIGTERM stop everything in reverse order.

use std::sync::Arc;

use bulkhead_actors::start_capabilities;
use bulkhead_cluster::{Cluster, NodeConfig};
use bulkhead_http::{AppState, HttpFront, HttpMetrics};
use bulkhead_storage::StoreOptions;
use ractor::Actor;
use tokio::net::TcpListener;

/// Runs the node until a termination signal.
pub async fn run(cfg: NodeConfig) -> Result<(), String> {
    for w in cfg.warnings() {
        tracing::warn!("config: {w}");
    }
    // Bind first: a port already in use is the most common start-up error, and says so at once.
    let listener = TcpListener::bind(cfg.http_listen)
        .await
        .map_err(|e| format!("cannot listen for HTTP on {}: {e}", cfg.http_listen))?;
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| format!("cannot create data_dir {}: {e}", cfg.data_dir.display()))?;
    let cluster = Cluster::start(cfg.clone()).await?;
    let opts = StoreOptions { durability: cfg.durability, ..StoreOptions::default() };
    let caps = start_capabilities(&cluster, &cfg.data_dir, &opts, cfg.fault_injection).await;
    let state = AppState {
        cluster: cluster.clone(),
        fault_injection: cfg.fault_injection,
        metrics: Arc::new(HttpMetrics::default()),
        orders_in_flight: Arc::new(tokio::sync::Semaphore::new(cfg.limits.orders_in_flight)),
    };
    let (front, _) = Actor::spawn(Some("bulkhead.http".into()), HttpFront, (listener, state))
        .await
        .map_err(|e| format!("cannot start the HTTP front: {e}"))?;
    tracing::info!(
        node = %cfg.name, pid = std::process::id(), http = %cfg.http_listen, cluster = %cfg.cluster_listen,
        capabilities = ?cfg.hosted(), failed = ?caps.failed.keys().collect::<Vec<_>>(), "node started"
    );
    wait_for_signal().await;
    tracing::info!("stopping");
    front.stop(None);
    caps.shutdown().await;
    cluster.shutdown();
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
