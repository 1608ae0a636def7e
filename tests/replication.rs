//! Real node processes on loopback: payments is a Raft group with a replica on every node.
//! The payments leader is killed and replaced; a replica whose store is wiped comes back as a new
//! member, catches up, and gets its leadership back; no charge is lost or doubled on the way.

mod common;

use std::time::{Duration, Instant};

use bulkhead_actors::Capability;
use common::{eventually, start, TestCluster};
use serde_json::Value;

/// A SKU of the inventory shard on n1: inventory is not replicated yet, and these tests take n2 away.
fn sku_on_n1() -> String {
    let map = bulkhead::topology::demo_shard_map().shard_map();
    (0..).map(|i| format!("sku-{i}")).find(|s| map.node_for(Capability::Inventory, s.as_bytes()) == Some("n1")).unwrap()
}

/// The payments shard as `from` reports it in `/v1/cluster` (`Null` while `from` is not answering).
async fn payments_shard(tc: &TestCluster, from: usize) -> Value {
    tc.shards(from).await.into_iter().find(|s| s["capability"] == "payments").unwrap_or(Value::Null)
}

/// Waits until `want` leads payments and reports (lag is known on the leader) all three replicas
/// caught up.
async fn settled_leader(tc: &TestCluster, want: &str) {
    let leader = ["n1", "n2", "n3"].iter().position(|n| *n == want).unwrap();
    eventually(Duration::from_secs(20), &format!("{want} leads payments with three caught-up replicas"), || async {
        let s = payments_shard(tc, leader).await;
        let replicas = s["replicas"].as_array().cloned().unwrap_or_default();
        let caught_up = replicas.len() == 3 && replicas.iter().all(|r| r["lag"] == 0);
        (s["leader"] == want && caught_up).then_some(())
    })
    .await;
}

/// The demo cluster with stock for a SKU of n1's inventory shard, once n2 leads payments.
async fn started_with_n2_leading() -> (TestCluster, String) {
    let tc = start().await;
    let sku = sku_on_n1();
    tc.stock(&sku, 100, 100).await;
    settled_leader(&tc, "n2").await;
    (tc, sku)
}

async fn charges(tc: &TestCluster, from: usize, id: &str) -> usize {
    let p = tc.get(from, &format!("/v1/payments?order_id={id}")).await;
    assert_eq!(p.status, 200, "{}", p.body);
    p.body["payments"].as_array().map(Vec::len).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_payments_leader_fails_over_and_orders_keep_confirming() {
    let (mut tc, sku) = started_with_n2_leading().await;
    let before = tc.order(0, Some("before-kill"), &sku, 1, "tok_ok").await;
    assert_eq!(before.status, 201, "{}", before.body);
    let before = before.body["order_id"].as_str().unwrap().to_string();

    let killed = Instant::now();
    tc.lc.kill(1);
    // Orders keep arriving at n1; the first that confirms needed a charge from the new leader.
    let mut n = 0;
    let first = eventually(Duration::from_secs(10), "an order confirms after the leader's death", || {
        n += 1;
        let key = format!("after-kill-{n}");
        let (tc, sku) = (&tc, &sku);
        async move {
            let r = tc.order(0, Some(&key), sku, 1, "tok_ok").await;
            (r.status == 201).then(|| r.body["order_id"].as_str().unwrap_or_default().to_string())
        }
    })
    .await;
    let took = killed.elapsed();
    eprintln!("first 201 after the payments leader's SIGKILL: {took:?}");
    assert!(took < Duration::from_secs(5), "failover took {took:?}");
    let s = payments_shard(&tc, 0).await;
    assert!(s["leader"] == "n1" || s["leader"] == "n3", "{s}");
    // Nothing acknowledged before the kill is lost; nothing is charged twice.
    assert_eq!(charges(&tc, 0, &before).await, 1);
    assert_eq!(charges(&tc, 2, &first).await, 1);

    // n2 comes back, catches up, and leads again (its preferred shard).
    tc.lc.start(1).unwrap();
    settled_leader(&tc, "n2").await;
    assert_eq!(charges(&tc, 1, &before).await, 1);
    assert_eq!(charges(&tc, 1, &first).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_payments_replica_comes_back_as_a_new_member_and_loses_nothing() {
    let (mut tc, sku) = started_with_n2_leading().await;
    let member_of_n2 =
        |s: &Value| s["replicas"].as_array().map(|r| r.iter().any(|r| r["node"] == "n2")).unwrap_or(false);
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = tc.order(i % 2 * 2, Some(&format!("wipe-{i}")), &sku, 1, "tok_ok").await;
        assert_eq!(r.status, 201, "{}", r.body);
        ids.push(r.body["order_id"].as_str().unwrap().to_string());
    }
    tc.lc.kill(1);
    let payments_dir = tc.lc.configs[1].data_dir.join("payments-0");
    std::fs::remove_dir_all(&payments_dir).unwrap();
    tc.lc.start(1).unwrap();
    // The leader swaps n2's new member in for its old one, then hands the leadership back.
    settled_leader(&tc, "n2").await;
    assert!(member_of_n2(&payments_shard(&tc, 0).await));
    let log = std::fs::read_to_string(tc.lc.log_path(1)).unwrap();
    assert!(log.contains("joins the group as a new member"), "n2 did not take a new incarnation");
    // Every charge made before the wipe is still there, once, read through the new leader n2.
    for id in &ids {
        assert_eq!(charges(&tc, 1, id).await, 1, "order {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_host_takes_over_every_replica_of_its_node_and_nothing_is_lost() {
    let (mut tc, sku) = started_with_n2_leading().await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let r = tc.order(i % 2 * 2, Some(&format!("replace-{i}")), &sku, 1, "tok_ok").await;
        assert_eq!(r.status, 201, "{}", r.body);
        ids.push(r.body["order_id"].as_str().unwrap().to_string());
    }
    let old_http = tc.url(1);
    // n2's host is gone for good (its disk with it); a new host takes the name n2 on new ports.
    let p = common::ports()[0];
    tc.lc.replace(1, p).expect("replace n2");
    assert_ne!(tc.url(1), old_http);
    // Every shard ends with three voters, n2's being the new host's, all caught up on the leader;
    // the shards n2 prefers are led by it again.
    eventually(Duration::from_secs(60), "every shard whole again, with the new n2", || async {
        let all = tc.shards(0).await;
        if all.is_empty() {
            return None;
        }
        for s in &all {
            let leader = s["leader"].as_str()?;
            let i = ["n1", "n2", "n3"].iter().position(|n| *n == leader)?;
            let seen = tc
                .shards(i)
                .await
                .into_iter()
                .find(|x| x["capability"] == s["capability"] && x["shard"] == s["shard"])?;
            let replicas = seen["replicas"].as_array()?;
            let voters = replicas.iter().filter(|r| r["role"] != "learner").count();
            let n2 = replicas.iter().filter(|r| r["node"] == "n2").count();
            if replicas.len() != 3 || voters != 3 || n2 != 1 || !replicas.iter().all(|r| r["lag"] == 0) {
                return None;
            }
        }
        Some(())
    })
    .await;
    settled_leader(&tc, "n2").await;
    let log = std::fs::read_to_string(tc.lc.log_path(1)).unwrap();
    assert!(log.contains("replacing the host of n2"), "n2 was not started as a replacement");
    // Everything acknowledged before is there, read through the new host; one charge each.
    for id in &ids {
        let o = tc.get(1, &format!("/v1/orders/{id}")).await;
        assert_eq!((o.status, o.body["status"].as_str()), (200, Some("confirmed")), "{}", o.body);
        assert_eq!(charges(&tc, 1, id).await, 1, "order {id}");
    }
    // And the new host serves orders: its front, its payments leadership.
    let r = tc.order(1, Some("after-replace"), &sku, 1, "tok_ok").await;
    assert_eq!(r.status, 201, "{}", r.body);
    // Starting a replacement over a data dir that holds a node's data is refused, files kept.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["replace", "--config"])
        .arg(tc.dir.path().join("n2.toml"))
        .output()
        .expect("run bulkhead replace");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not empty"), "{err}");
    assert!(tc.lc.configs[1].data_dir.join("payments-0").exists());
}
