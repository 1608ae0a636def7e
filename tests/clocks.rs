//! Real node processes on loopback: a node whose wall clock is two days ahead, or two days behind,
//! leads an orders shard and changes no outcome: no Idempotency-Key forgotten early, and the
//! orders it stamps carry the group's time, not its own.
//!
//! The clock is moved with libfaketime (Debian package `faketime`, which `.ci/run` installs) on
//! that one node only; its monotonic clock is left alone, as a real wall-clock jump would.

mod common;

use std::time::Duration;

use bulkhead_actors::Capability;
use common::{eventually, start, TestCluster};
use serde_json::Value;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Idempotency-Keys whose orders shard n1 leads in the demo map, and that shard.
fn n1_keys(prefix: &str, n: usize) -> (u32, Vec<String>) {
    let map = bulkhead::topology::demo_shard_map().shard_map();
    let keys: Vec<String> = (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|k| map.node_for(Capability::Orders, k.as_bytes()) == Some("n1"))
        .take(n)
        .collect();
    (map.shard_for(Capability::Orders, keys[0].as_bytes()), keys)
}

/// The leader of orders shard `shard` as node `from` sees it (`None` also while it is not up).
async fn leader_of(tc: &TestCluster, from: usize, shard: u32) -> Option<String> {
    let s = tc.shards(from).await.into_iter().find(|s| s["capability"] == "orders" && s["shard"] == shard)?;
    s["leader"].as_str().map(str::to_string)
}

/// Idempotency sweeps node `node` ran as the leader of orders shard `shard` since it started.
async fn sweeps(tc: &TestCluster, node: usize, shard: u32) -> Option<u64> {
    let r = tc.http.get(format!("{}/metrics", tc.url(node))).send().await.ok()?;
    let text = r.text().await.ok()?;
    let name = format!("bulkhead_idempotency_sweeps_total{{shard=\"{shard}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(name.as_str())?.trim().parse().ok())
}

/// Waits until node `i` (by index) leads `shard` and has run a sweep as its leader since it started.
async fn leads_and_swept(tc: &TestCluster, i: usize, shard: u32) {
    let name = format!("n{}", i + 1);
    eventually(Duration::from_secs(30), &format!("{name} leads orders shard {shard} and swept it"), || async {
        let leads = leader_of(tc, i, shard).await.as_deref() == Some(name.as_str());
        (leads && sweeps(tc, i, shard).await.unwrap_or(0) > 0).then_some(())
    })
    .await;
}

/// Places (or replays) the order of `key` at node `node` as a careful client does: a 503 (the
/// shard is between leaders, nothing recorded) is retried, and so is a 202 (still pending: right
/// after a restart the saga may wait on a shard changing hands); the answer must be 201.
async fn place(tc: &TestCluster, node: usize, key: &str) -> Value {
    let r = eventually(Duration::from_secs(15), &format!("a final answer for {key}"), || async {
        let r = tc.order(node, Some(key), "clock-1", 1, "tok_ok").await;
        (r.status != 503 && r.status != 202).then_some(r)
    })
    .await;
    assert_eq!(r.status, 201, "{key}: {}", r.body);
    r.body
}

/// The calendar day of an order's first history entry (when it was placed).
fn placed_on(order: &Value) -> String {
    order["history"][0]["at"].as_str().unwrap_or_default().chars().take(10).collect()
}

/// Today in UTC, or (right after midnight) yesterday: the two days an order placed now can carry.
fn today() -> [String; 2] {
    let now = bulkhead_storage::now_ms();
    [now, now.saturating_sub(3_600_000)].map(|ms| bulkhead_http::api::rfc3339(ms).chars().take(10).collect())
}

fn faked(offset: &str) -> [(&'static str, String); 3] {
    [
        ("LD_PRELOAD", LIBFAKETIME.to_string()),
        ("FAKETIME", offset.to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
    ]
}

fn set_clock(tc: &mut TestCluster, i: usize, offset: &str) {
    let vars = faked(offset);
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    tc.lc.set_env(i, &vars);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_days_off_leads_and_no_key_is_forgotten_early() {
    assert!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} is missing: install Debian's `faketime` package (.ci/run does)"
    );
    let mut tc = start().await;
    tc.stock("clock-1", 1_000, 100).await;
    let (shard, keys) = n1_keys("clock-a", 4);

    // Keys claimed while every clock is right.
    let mut first = Vec::new();
    for k in &keys {
        first.push(place(&tc, 1, k).await["order_id"].clone());
    }

    // n1 comes back two days ahead, takes its shard back and sweeps it: its wall clock says every
    // key is past the 24 h retention; the group's time says they are seconds old.
    tc.lc.kill(0);
    set_clock(&mut tc, 0, "+2d");
    tc.lc.start(0).expect("start n1");
    leads_and_swept(&tc, 0, shard).await;
    for (k, id) in keys.iter().zip(&first) {
        let again = place(&tc, 1, k).await;
        assert_eq!(&again["order_id"], id, "{k} must still name its order after a sweep by a clock 2 days ahead");
    }
    let ahead = place(&tc, 0, &n1_keys("clock-b", 1).1[0]).await;
    assert!(today().contains(&placed_on(&ahead)), "stamped with n1's wall clock: {ahead}");

    // n1 again, now two days behind: it claims keys, then dies for good; the next leader, whose
    // clock is right, sweeps. Keys stamped with n1's wall clock would look two days old to it.
    tc.lc.kill(0);
    set_clock(&mut tc, 0, "-2d");
    tc.lc.start(0).expect("start n1");
    leads_and_swept(&tc, 0, shard).await;
    let (_, behind_keys) = n1_keys("clock-c", 4);
    let mut behind = Vec::new();
    for k in &behind_keys {
        let o = place(&tc, 0, k).await;
        assert!(today().contains(&placed_on(&o)), "stamped with n1's wall clock: {o}");
        behind.push(o["order_id"].clone());
    }
    let sweeps_before = [sweeps(&tc, 1, shard).await.unwrap_or(0), sweeps(&tc, 2, shard).await.unwrap_or(0)];
    tc.lc.kill(0);
    let next = eventually(Duration::from_secs(30), "another node leads the shard and swept it", || async {
        let leader = leader_of(&tc, 1, shard).await?;
        let i = ["n2", "n3"].iter().position(|n| *n == leader)?;
        (sweeps(&tc, i + 1, shard).await.unwrap_or(0) > sweeps_before[i]).then_some(i + 1)
    })
    .await;
    for (k, id) in behind_keys.iter().zip(&behind) {
        let again = place(&tc, next, k).await;
        assert_eq!(&again["order_id"], id, "{k} must still name its order after a sweep by the next leader");
    }
}
