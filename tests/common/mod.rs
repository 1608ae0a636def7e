//! Shared harness of the real-process tests: a three-node cluster of `bulkhead node` processes on
//! loopback, free ports, readiness waits (never fixed sleeps), and clean-up of every child on drop.

#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use bulkhead_cluster::Timing;
use bulkhead_launch::config::NodeConfig;
use bulkhead_launch::topology::{local_configs, Ports};
use bulkhead_launch::{free_ports, LocalCluster, LocalSecrets};
use serde_json::{json, Value};

pub struct TestCluster {
    pub lc: LocalCluster,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

pub fn ports() -> [Ports; 3] {
    let p = free_ports(6).expect("free ports");
    std::array::from_fn(|i| Ports { cluster: p[2 * i], http: p[2 * i + 1] })
}

pub async fn start_with(timing: Timing, prepare: impl FnOnce(&std::path::Path)) -> TestCluster {
    start_opts(timing, prepare, true).await
}

/// Like [`start_with`], but waits only for the nodes to see each other up, not for `/readyz`.
pub async fn start_unready(timing: Timing, prepare: impl FnOnce(&std::path::Path)) -> TestCluster {
    start_opts(timing, prepare, false).await
}

/// Like [`start_with`] (fault injection on), after `edit` changed the three nodes' configs.
pub async fn start_configured(timing: Timing, edit: impl FnOnce(&mut [NodeConfig])) -> TestCluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = LocalSecrets::ensure(dir.path(), &bulkhead_launch::topology::NODES).expect("secrets");
    let mut configs = local_configs(dir.path(), &secrets, &ports(), timing, true);
    edit(&mut configs);
    let lc = LocalCluster::launch_configs(std::path::Path::new(env!("CARGO_BIN_EXE_bulkhead")), dir.path(), configs)
        .expect("launch");
    wait(lc, dir, true).await
}

async fn start_opts(timing: Timing, prepare: impl FnOnce(&std::path::Path), ready: bool) -> TestCluster {
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    let lc =
        LocalCluster::launch(std::path::Path::new(env!("CARGO_BIN_EXE_bulkhead")), dir.path(), ports(), timing, true)
            .expect("launch");
    wait(lc, dir, ready).await
}

async fn wait(lc: LocalCluster, dir: tempfile::TempDir, ready: bool) -> TestCluster {
    // The tests act as the operator: the admin token may do everything (tests/auth.rs checks the scopes).
    let http = lc.admin_client(Duration::from_secs(15)).expect("an HTTP client");
    let tc = TestCluster { lc, dir, http };
    if let Err(e) = tc.lc.wait_joined(Duration::from_secs(60), ready).await {
        tc.dump_logs();
        panic!("{e}");
    }
    if ready {
        // Readiness says each node serves; routing also needs each node to have heard the others'
        // health (one heartbeat later): wait until every node sees every member routable.
        eventually(Duration::from_secs(10), "every node sees every capability's members routable", || async {
            for i in 0..tc.lc.configs.len() {
                let v = tc.get(i, "/v1/cluster").await.body;
                let whole = v["capabilities"]
                    .as_object()
                    .is_some_and(|caps| caps.values().all(|c| c["healthy"] == c["members"]));
                if !whole {
                    return None;
                }
            }
            Some(())
        })
        .await;
    }
    tc
}

pub async fn start() -> TestCluster {
    start_with(Timing::default(), |_| {}).await
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub location: Option<String>,
    pub retry_after: Option<String>,
}

impl TestCluster {
    pub fn url(&self, node: usize) -> String {
        self.lc.url(node)
    }

    pub fn dump_logs(&self) {
        for i in 0..3 {
            let log = std::fs::read_to_string(self.lc.log_path(i)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("----- n{} log (last 40 lines) -----", i + 1);
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }

    async fn reply(resp: reqwest::Response) -> Reply {
        let status = resp.status().as_u16();
        let h = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (location, retry_after) = (h("location"), h("retry-after"));
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        Reply { status, body, location, retry_after }
    }

    pub async fn get(&self, node: usize, path: &str) -> Reply {
        Self::reply(self.http.get(format!("{}{path}", self.url(node))).send().await.expect("GET")).await
    }

    pub async fn delete(&self, node: usize, path: &str) -> Reply {
        // Admin actions take a JSON body (see `http::auth`); `{}` says nothing more.
        let req = self.http.delete(format!("{}{path}", self.url(node))).json(&json!({}));
        Self::reply(req.send().await.expect("DELETE")).await
    }

    pub async fn put(&self, node: usize, path: &str, body: Value) -> Reply {
        Self::reply(self.http.put(format!("{}{path}", self.url(node))).json(&body).send().await.expect("PUT")).await
    }

    pub async fn post(&self, node: usize, path: &str, key: Option<&str>, body: Value) -> Reply {
        let mut req = self.http.post(format!("{}{path}", self.url(node))).json(&body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        Self::reply(req.send().await.expect("POST")).await
    }

    pub async fn order(&self, node: usize, key: Option<&str>, sku: &str, qty: u64, token: &str) -> Reply {
        self.post(
            node,
            "/v1/orders",
            key,
            json!({"customer_id": "c-test", "items": [{"sku": sku, "quantity": qty}], "payment_token": token}),
        )
        .await
    }

    pub async fn stock(&self, sku: &str, available: u64, price: u64) {
        let r =
            self.put(0, &format!("/v1/inventory/{sku}"), json!({"available": available, "price_cents": price})).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }

    /// Every shard as node `from` reports it in `/v1/cluster` (empty while `from` is not answering).
    pub async fn shards(&self, from: usize) -> Vec<Value> {
        let Ok(resp) = self.http.get(format!("{}/v1/cluster", self.url(from))).send().await else { return Vec::new() };
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        v["shards"].as_array().cloned().unwrap_or_default()
    }

    /// Status of `name` as node `from` sees it.
    pub async fn status_of(&self, from: usize, name: &str) -> String {
        let v = self.get(from, "/v1/cluster").await.body;
        v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == name)
            .map(|n| n["status"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    // Poll the condition itself (a readiness wait), at most every 50 ms.
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    loop {
        poll.tick().await;
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
    }
}
