//! Restoring a node never loses an acknowledged order (issue 17, item 1), on real processes.
//!
//! The sequence: back up n1; stop n3; place keyed orders (committed on n1 and n2); stop n1 and n2;
//! restore n1; start n1 and n3 while n2 stays down. n1 and n3 are two of three replicas of every
//! group, and neither has the orders.
//!
//! - With `bulkhead restore`, n1 comes back as a new member of every group: it cannot vote, so
//!   n1 and n3 elect nobody and answer 503; no order reads 404 and no retry with a key places a
//!   second order. Once n2 is back, every order is there, once.
//! - Copying the backup back by hand (what docs/operations.md told an operator before) lets the
//!   stale pair elect a leader that lacks the orders: they read 404, and a retry with the same key
//!   places a second order. That test is `#[ignore]`d: it shows the hazard the command closes
//!   (`cargo test --test restore -- --ignored`).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{eventually, start, TestCluster};
use serde_json::{json, Value};

const ORDERS: usize = 12;
const SKU: &str = "restore-sku";

fn order() -> Value {
    json!({"customer_id": "c-restore", "items": [{"sku": SKU, "quantity": 1}], "payment_token": "tok_ok"})
}

fn bulkhead(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead")).args(args).output().expect("bulkhead");
    assert!(out.status.success(), "bulkhead {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Node `i`'s HTTP answers (ready or not).
async fn answering(tc: &TestCluster, i: usize) {
    eventually(Duration::from_secs(30), "the node answers HTTP", || async {
        tc.http.get(format!("{}/healthz", tc.url(i))).send().await.ok().filter(|r| r.status() == 200).map(drop)
    })
    .await;
}

/// Orders shard 0 as n3 sees it: its term, and whether it has no leader.
async fn orders_0_on_n3(tc: &TestCluster) -> Option<(u64, bool)> {
    let shards = tc.shards(2).await;
    let shard = shards.iter().find(|s| s["capability"] == "orders" && s["shard"] == 0)?;
    Some((shard["term"].as_u64().unwrap_or(0), shard["leader"].is_null()))
}

/// Every acknowledged order reads on every node, its key answers the same order, and the
/// customer has `total` orders (no retry placed a second one).
async fn every_order_once(tc: &TestCluster, acked: &[(String, String)], total: usize) {
    for (key, id) in acked {
        for node in 0..3 {
            let read = eventually(Duration::from_secs(20), "the order reads", || async {
                let r = tc.get(node, &format!("/v1/orders/{id}")).await;
                (r.status != 503).then_some(r)
            })
            .await;
            assert_eq!(read.status, 200, "order {id} on n{}: {}", node + 1, read.body);
        }
        let again = tc.post(1, "/v1/orders", Some(key), order()).await;
        assert_eq!(again.body["order_id"].as_str(), Some(id.as_str()), "{key}: {}", again.body);
    }
    let listed = tc.get(2, "/v1/orders?customer_id=c-restore&limit=500").await;
    assert_eq!(listed.body["orders"].as_array().map(Vec::len), Some(total), "{}", listed.body);
}

/// The sequence up to the restore: returns the keys and order ids acknowledged while n3 was away,
/// and the path of n1's backup. Ends with every node stopped.
async fn acknowledged_while_n3_was_away(tc: &mut TestCluster) -> (Vec<(String, String)>, std::path::PathBuf) {
    tc.stock(SKU, 1_000, 100).await;
    // Back up n1 (a backup is of a stopped node), and bring it back.
    tc.lc.stop(0);
    let backups = tc.dir.path().join("backups");
    let n1 = tc.lc.config_path(0).to_str().expect("utf-8 path").to_string();
    bulkhead(&["backup", "--config", &n1, "--to", backups.to_str().expect("utf-8 path")]);
    let backup = std::fs::read_dir(&backups).expect("backups").next().expect("one backup").expect("entry").path();
    tc.lc.start(0).expect("start n1");
    tc.lc.wait_ready(Duration::from_secs(60)).await.expect("ready again after the backup");
    // n3 away; orders committed on n1 and n2 only.
    tc.lc.stop(2);
    let mut acked = Vec::new();
    for n in 0..ORDERS {
        let key = format!("restore-{n}");
        let r = tc.post(n % 2, "/v1/orders", Some(&key), order()).await;
        assert!([201, 202].contains(&r.status), "{key}: {} {}", r.status, r.body);
        acked.push((key, r.body["order_id"].as_str().expect("an order id").to_string()));
    }
    tc.lc.kill(0);
    tc.lc.kill(1);
    (acked, backup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_node_rejoins_as_a_new_member_and_no_acknowledged_order_is_lost_or_doubled() {
    let mut tc = start().await;
    let (acked, _backup) = acknowledged_while_n3_was_away(&mut tc).await;
    let said = bulkhead(&["restore", "--config", tc.lc.config_path(0).to_str().expect("utf-8 path")]);
    assert!(said.contains("new member"), "{said}");
    tc.lc.start(0).expect("start n1");
    tc.lc.start(2).expect("start n3");
    answering(&tc, 2).await;
    // n1 (new member) and n3 (stale) must not serve. Watched until they have had their chance:
    // n3's term of orders shard 0 grew twice with no leader (an election among them tried and
    // failed); meanwhile every answer is 503, never the stale state.
    let first = eventually(Duration::from_secs(10), "n3 reports its orders shard", || orders_0_on_n3(&tc)).await.0;
    eventually(Duration::from_secs(30), "the stale pair tried to elect and could not", || async {
        for (key, id) in acked.iter().take(3) {
            let read = tc.get(2, &format!("/v1/orders/{id}")).await;
            assert_ne!(read.status, 404, "order {id} of {key} read as missing from the stale pair: {}", read.body);
            let again = tc.post(2, "/v1/orders", Some(key), order()).await;
            if let Some(other) = again.body["order_id"].as_str() {
                assert_eq!(other, id, "key {key} placed a second order");
            }
        }
        let (now, leaderless) = orders_0_on_n3(&tc).await?;
        assert!(leaderless, "the stale pair elected a leader");
        (now >= first + 2).then_some(())
    })
    .await;
    // n2 back: every acknowledged order is there, once, on every node.
    tc.lc.start(1).expect("start n2");
    tc.lc.wait_ready(Duration::from_secs(60)).await.expect("ready with n2 back");
    every_order_once(&tc, &acked, ORDERS).await;
    // n1 is a voter (leader or follower) of every group again, under its new incarnation.
    eventually(Duration::from_secs(30), "n1 is a voter of every group", || async {
        let shards = tc.shards(0).await;
        let all = !shards.is_empty()
            && shards.iter().all(|s| {
                s["replicas"].as_array().is_some_and(|r| {
                    r.iter().any(|r| r["node"] == "n1" && (r["role"] == "leader" || r["role"] == "follower"))
                })
            });
        all.then_some(())
    })
    .await;
}

fn copy_back(backup: &Path, data_dir: &Path) {
    std::fs::remove_dir_all(data_dir).expect("remove n1's data");
    let status = std::process::Command::new("cp").arg("-a").arg(backup).arg(data_dir).status().expect("cp");
    assert!(status.success());
}

/// The hazard `bulkhead restore` closes: a backup copied back by hand keeps n1's old identity, and
/// with n3 it elects a leader that never had the orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "shows the data loss of a hand-copied restore; run with --ignored"]
async fn a_backup_copied_back_by_hand_lets_a_stale_pair_lose_acknowledged_orders() {
    let mut tc = start().await;
    let (acked, backup) = acknowledged_while_n3_was_away(&mut tc).await;
    copy_back(&backup, &tc.lc.configs[0].data_dir.clone());
    tc.lc.start(0).expect("start n1");
    tc.lc.start(2).expect("start n3");
    answering(&tc, 2).await;
    let (key, id) = &acked[0];
    let lost = eventually(Duration::from_secs(20), "the stale pair answers", || async {
        let r = tc.get(2, &format!("/v1/orders/{id}")).await;
        (r.status != 503).then_some(r.status)
    })
    .await;
    let again = tc.post(2, "/v1/orders", Some(key), order()).await;
    eprintln!("hand-copied restore: order {id} reads {lost}; its key placed {}", again.body["order_id"]);
    assert_eq!(lost, 404, "the stale pair lost the acknowledged order");
}

/// Losing a majority for good (issue 17, item 1): n2 and n3 lose their disks while n1 keeps its
/// own. `bulkhead recover --inspect` shows n1's replicas; `bulkhead recover` makes each of them
/// its group's only voter; n1 then serves alone with every order acknowledged before, and n2 and
/// n3, started empty, rejoin as new members and get everything. Nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_two_disks_are_lost_recover_keeps_the_survivor_and_nothing_acknowledged_is_lost() {
    let mut tc = start().await;
    tc.stock(SKU, 1_000, 100).await;
    let mut acked = Vec::new();
    for n in 0..ORDERS {
        let key = format!("recover-{n}");
        let r = tc.post(n % 3, "/v1/orders", Some(&key), order()).await;
        assert!([201, 202].contains(&r.status), "{key}: {} {}", r.status, r.body);
        acked.push((key, r.body["order_id"].as_str().expect("an order id").to_string()));
    }
    // n2's and n3's disks are gone for good; n1 alone cannot elect anyone.
    for i in [1, 2] {
        tc.lc.kill(i);
        std::fs::remove_dir_all(&tc.lc.configs[i].data_dir).expect("wipe");
    }
    tc.lc.kill(0);
    let n1 = tc.lc.config_path(0).to_str().expect("utf-8 path").to_string();
    let facts = bulkhead(&["recover", "--config", &n1, "--inspect"]);
    assert!(facts.contains("orders/0") && facts.contains("last entry term"), "{facts}");
    eprintln!("{facts}");
    let said = bulkhead(&["recover", "--config", &n1]);
    eprintln!("{said}");
    assert!(said.contains("now its only voter") && said.contains("new member"), "{said}");

    // n1 serves alone, with every acknowledged order.
    tc.lc.start(0).expect("start n1");
    answering(&tc, 0).await;
    for (key, id) in &acked {
        let read = eventually(Duration::from_secs(30), "the order reads on the recovered n1", || async {
            let r = tc.get(0, &format!("/v1/orders/{id}")).await;
            (r.status != 503).then_some(r)
        })
        .await;
        assert_eq!(read.status, 200, "order {id} of {key}: {}", read.body);
    }
    let fresh = tc.post(0, "/v1/orders", Some("after-recovery"), order()).await;
    assert!([201, 202].contains(&fresh.status), "{}", fresh.body);

    // n2 and n3 come back empty: new members, caught up from n1.
    tc.lc.start(1).expect("start n2");
    tc.lc.start(2).expect("start n3");
    tc.lc.wait_ready(Duration::from_secs(60)).await.expect("ready with n2 and n3 back");
    eventually(Duration::from_secs(60), "every group has three voters again", || async {
        let shards = tc.shards(0).await;
        let whole = !shards.is_empty()
            && shards.iter().all(|s| {
                s["replicas"]
                    .as_array()
                    .is_some_and(|r| r.iter().filter(|r| r["role"] == "leader" || r["role"] == "follower").count() == 3)
            });
        whole.then_some(())
    })
    .await;
    every_order_once(&tc, &acked, ORDERS + 1).await;
}
