//! Real node processes on loopback: faults stay inside their bulkhead.
//! Worker panics, SIGKILLed nodes, a node with another shard map, a store that will not open.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use bulkhead::topology::write_config;
use bulkhead_actors::Capability;
use bulkhead_cluster::config::CapabilityPlacement;
use bulkhead_cluster::Timing;
use common::{eventually, start, start_unready, start_with};

/// Idempotency-Keys whose orders shard is led by `node` in the demo map (when it is healthy).
fn keys_homed_on(node: &str) -> impl Iterator<Item = String> + '_ {
    let map = bulkhead::topology::demo_shard_map().shard_map();
    (0..).map(|i| format!("key-{i}")).filter(move |k| map.node_for(Capability::Orders, k.as_bytes()) == Some(node))
}

/// Shard `shard` of `cap` in a `/v1/cluster` answer.
fn shard<'a>(v: &'a serde_json::Value, cap: &str, shard: u64) -> &'a serde_json::Value {
    v["shards"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["capability"] == cap && s["shard"] == shard))
        .unwrap_or(&serde_json::Value::Null)
}

fn key_homed_on(node: &str) -> String {
    keys_homed_on(node).next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_payments_worker_is_restarted_and_the_next_order_succeeds() {
    let tc = start().await;
    tc.stock("widget-1", 100, 100).await;
    let r = tc.post(1, "/admin/panic/payments", None, serde_json::json!({})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let r = tc.order(0, Some("after-panic"), "widget-1", 1, "tok_ok").await;
    assert_eq!(r.status, 201, "{}", r.body);
    let log = std::fs::read_to_string(tc.lc.log_path(1)).unwrap();
    assert!(log.contains("restarting failed child"), "n2 log shows no restart");
    assert_eq!(tc.get(1, "/readyz").await.status, 200);
    // Fault injection names a capability it knows.
    assert_eq!(tc.post(1, "/admin/panic/ledger", None, serde_json::json!({})).await.status, 400);
}

/// SIGKILL n3, which leads orders shard 1, shipping and notifications: the other replicas take
/// over. A key of shard 1 placed before the kill still names its one order, readable and
/// replayable everywhere; new orders with and without keys confirm and are shipped by the new
/// shipping leader; and after n3 is back, nothing was placed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_leader_node_fails_its_shards_over_and_every_key_keeps_its_one_order() {
    let mut tc = start().await;
    tc.stock("widget-1", 1_000, 100).await;
    let mut n3_keys = keys_homed_on("n3");
    let (k_old, k_new) = (n3_keys.next().unwrap(), n3_keys.next().unwrap());
    let on_n3 = tc.order(0, Some(&k_old), "widget-1", 1, "tok_ok").await;
    assert_eq!(on_n3.status, 201, "{}", on_n3.body);
    let on_n3 = on_n3.body["order_id"].as_str().unwrap().to_string();
    assert!(on_n3.ends_with("01"), "{on_n3} was not placed in its key's shard 1");
    tc.lc.kill(2);

    // Shard 1 gets a new leader: the key's order is still there, and its replay finds it.
    let r = eventually(Duration::from_secs(10), "the key replays after the failover", || async {
        let r = tc.order(0, Some(&k_old), "widget-1", 1, "tok_ok").await;
        (r.status == 201).then_some(r)
    })
    .await;
    assert_eq!(r.body["order_id"].as_str(), Some(on_n3.as_str()), "{}", r.body);
    let g = tc.get(1, &format!("/v1/orders/{on_n3}")).await;
    assert_eq!((g.status, g.body["status"].as_str()), (200, Some("confirmed")), "{}", g.body);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = tc.order(0, None, "widget-1", 1, "tok_ok").await;
        assert_eq!(r.status, 201, "{}", r.body);
        ids.push(r.body["order_id"].as_str().unwrap().to_string());
    }
    let r = tc.order(1, Some(&k_new), "widget-1", 1, "tok_ok").await;
    assert_eq!(r.status, 201, "{}", r.body);
    let new_id = r.body["order_id"].as_str().unwrap().to_string();
    assert!(new_id.ends_with("01"), "{new_id}: a key's shard does not change when its leader dies");
    // Shipping is replicated: another replica leads it now, and the new orders are shipped
    // while n3 is still down.
    for id in &ids {
        eventually(Duration::from_secs(15), "shipment while n3 is down", || async {
            let s = tc.get(0, &format!("/v1/shipments?order_id={id}")).await;
            (s.body["shipments"].as_array().map(Vec::len) == Some(1)).then_some(())
        })
        .await;
    }

    tc.lc.start(2).unwrap();
    tc.lc.wait_ready(Duration::from_secs(30)).await.unwrap();
    // Once caught up, n3 gets shard 1 back (a leader hand-over). Orders keep arriving for the
    // shard meanwhile, and not one of them is turned away: callers wait through a hand-over.
    let mut placed = 0;
    eventually(Duration::from_secs(20), "n3 leads orders shard 1 again", || {
        let key = n3_keys.next().unwrap();
        let tc = &tc;
        placed += 1;
        async move {
            let r = tc.order(0, Some(&key), "widget-1", 1, "tok_ok").await;
            assert_eq!(r.status, 201, "order {placed} during the hand-back: {}", r.body);
            (shard(&tc.get(0, "/v1/cluster").await.body, "orders", 1)["leader"] == "n3").then_some(())
        }
    })
    .await;
    // Back together, each key still names its one order, from every front.
    for front in [0, 1, 2] {
        for (k, want) in [(&k_old, &on_n3), (&k_new, &new_id)] {
            let r = tc.order(front, Some(k), "widget-1", 1, "tok_ok").await;
            assert_eq!((r.status, r.body["order_id"].as_str()), (201, Some(want.as_str())), "{}", r.body);
        }
    }
    let listed = tc.get(2, "/v1/orders?customer_id=c-test&limit=500").await;
    assert_eq!(listed.body["orders"].as_array().map(Vec::len), Some(5 + placed), "{}", listed.body);
}

/// SIGKILL the node leading an order's shard while its charge is in flight (`tok_slow`): the new
/// leader resumes the saga from the committed record, at once, and the order is confirmed with
/// exactly one charge, without the dead node coming back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_orders_leader_mid_saga_resumes_it_on_the_new_leader() {
    let timing = Timing { wait_budget_ms: 300, ..Timing::default() };
    let mut tc = start_with(timing, |_| {}).await;
    tc.stock("widget-1", 100, 100).await;
    let key = key_homed_on("n1");
    // tok_slow: payments answers after 3 s, so the saga is still charging when n1 dies.
    let r = tc.order(0, Some(&key), "widget-1", 1, "tok_slow").await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(r.location.as_deref().is_some_and(|l| l.starts_with("/v1/orders/")));
    let id = r.body["order_id"].as_str().unwrap().to_string();
    tc.lc.kill(0);
    eventually(Duration::from_secs(20), "the resumed saga confirms the order", || async {
        (tc.get(1, &format!("/v1/orders/{id}")).await.body["status"] == "confirmed").then_some(())
    })
    .await;
    let p = tc.get(1, &format!("/v1/payments?order_id={id}")).await;
    let charges = p.body["payments"].as_array().unwrap();
    assert_eq!(charges.len(), 1, "{}", p.body);
    assert_eq!(charges[0]["status"], "charged");
    // The replay by key answers with the same, now confirmed, order.
    let again = tc.order(2, Some(&key), "widget-1", 1, "tok_slow").await;
    assert_eq!((again.status, again.body["order_id"].as_str()), (201, Some(id.as_str())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_shard_map_is_refused() {
    let mut tc = start().await;
    // n3 comes back with its own name and certificate, and another shard map (a node the map does
    // not name at all is refused earlier, at the link: tests/cluster_security.rs).
    tc.lc.stop(2);
    let mut cfg = tc.lc.configs[2].clone();
    let p = common::ports();
    cfg.http_listen = std::net::SocketAddr::from(([127, 0, 0, 1], p[0].http));
    cfg.data_dir = tc.dir.path().join("n3-other");
    cfg.capabilities.0.insert(Capability::Payments, CapabilityPlacement::on(&["n2", "n3"]));
    bulkhead_launch::LocalSecrets::ensure(tc.dir.path(), &["n3"]).expect("n3's certificate").apply(&mut cfg);
    let path = tc.dir.path().join("n3-other.toml");
    write_config(&cfg, &path).unwrap();
    let log = std::fs::File::create(tc.dir.path().join("n3-other.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["node", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Reap(child);

    let reason = eventually(Duration::from_secs(10), "n1 refuses the other n3", || async {
        let v = tc.get(0, "/v1/cluster").await.body;
        let n3 = v["nodes"].as_array()?.iter().find(|n| n["name"] == "n3")?.clone();
        (n3["status"] == "down")
            .then(|| n3["reason"].as_str().unwrap_or("").to_string())
            .filter(|r| r.contains("shard map"))
    })
    .await;
    assert!(reason.contains("refused"), "{reason}");
    let other = format!("http://{}/readyz", cfg.http_listen);
    let ready = eventually(Duration::from_secs(10), "the other n3 says why it is not ready", || async {
        let r = tc.http.get(&other).send().await.ok()?;
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.ok()?;
        (status == 503 && body.to_string().contains("shard map")).then_some(body)
    })
    .await;
    assert!(ready["problems"].to_string().contains("refused"), "{ready}");
    // The three agreeing nodes keep working.
    tc.stock("widget-9", 5, 100).await;
    assert_eq!(tc.order(0, None, "widget-9", 1, "tok_ok").await.status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_will_not_open_is_reported_and_kept() {
    // n2's payments replica store path is taken by a plain file: sled cannot open it.
    let tc = start_unready(Timing { wait_budget_ms: 300, ..Timing::default() }, |dir| {
        std::fs::create_dir_all(dir.join("n2")).unwrap();
        std::fs::write(dir.join("n2").join("payments-0"), b"precious bytes").unwrap();
    })
    .await;
    let r = tc.get(1, "/readyz").await;
    assert_eq!(r.status, 503);
    let problems = r.body["problems"].to_string();
    assert!(problems.contains("payments-0 store") && problems.contains("n2/payments-0"), "{problems}");
    // Without the admin token: not ready, and nothing about paths or peers.
    let anonymous = reqwest::get(format!("{}/readyz", tc.url(1))).await.expect("GET /readyz");
    assert_eq!(anonymous.status().as_u16(), 503);
    let body: serde_json::Value = anonymous.json().await.expect("JSON");
    assert_eq!(body, serde_json::json!({"status": "not_ready"}), "a stranger learned why");
    assert_eq!(std::fs::read(tc.dir.path().join("n2").join("payments-0")).unwrap(), b"precious bytes");
    // The rest of the cluster works; orders wait for payments instead of failing. (A new group is
    // initialized by its preferred node, n2, so payments has no leader until n2's store opens.)
    eventually(Duration::from_secs(20), "every inventory and orders shard has a leader", || async {
        let v = tc.get(0, "/v1/cluster").await.body;
        let led = |cap, n| !shard(&v, cap, n)["leader"].is_null();
        (led("inventory", 0) && led("inventory", 1) && led("orders", 0) && led("orders", 1)).then_some(())
    })
    .await;
    tc.stock("widget-1", 10, 100).await;
    let r = tc.order(0, None, "widget-1", 1, "tok_ok").await;
    assert_eq!((r.status, r.body["status"].as_str()), (202, Some("pending")), "{}", r.body);
    let v = tc.get(0, "/v1/cluster").await.body;
    assert_eq!(shard(&v, "payments", 0)["leader"], serde_json::Value::Null, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_is_declared_down_and_rejoins_when_it_resumes() {
    let tc = start().await;
    tc.stock("widget-1", 100, 100).await;
    tc.lc.signal(2, libc::SIGSTOP);
    let paused = std::time::Instant::now();
    // ractor_cluster alone would never notice: the socket stays open. Our heartbeats do.
    eventually(Duration::from_secs(5), "n1 declares the paused n3 down", || async {
        (tc.status_of(0, "n3").await == "down").then_some(())
    })
    .await;
    let detected = paused.elapsed();
    assert!(detected < Duration::from_secs(3), "took {detected:?}");
    let r = tc.order(0, Some(&key_homed_on("n1")), "widget-1", 1, "tok_ok").await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["order_id"].as_str().unwrap().to_string();

    tc.lc.signal(2, libc::SIGCONT);
    eventually(Duration::from_secs(15), "n3 back up everywhere", || async {
        (tc.status_of(0, "n3").await == "up" && tc.status_of(1, "n3").await == "up").then_some(())
    })
    .await;
    eventually(Duration::from_secs(15), "the shipment delivered after the resume", || async {
        let s = tc.get(0, &format!("/v1/shipments?order_id={id}")).await;
        (s.body["shipments"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
}

/// A partition (every cluster link of n3 cut silently, its HTTP still up) is seen from both sides,
/// orders keep being placed, and after the heal n3 rejoins and its deliveries catch up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_is_declared_down_on_both_sides_and_rejoins_after_heal() {
    let tc = start().await;
    tc.stock("widget-1", 100, 500).await;
    let cut = tc.post(2, "/admin/partition", None, serde_json::json!({})).await;
    assert_eq!(cut.status, 202, "{}", cut.body);
    let at = std::time::Instant::now();
    eventually(Duration::from_secs(5), "n1 declares the cut-off n3 down", || async {
        (tc.status_of(0, "n3").await == "down").then_some(())
    })
    .await;
    let detected = at.elapsed();
    eventually(Duration::from_secs(5), "n3 declares n1 and n2 down", || async {
        (tc.status_of(2, "n1").await == "down" && tc.status_of(2, "n2").await == "down").then_some(())
    })
    .await;
    assert!(detected < Duration::from_secs(3), "took {detected:?}");
    // The majority side places keys of both orders shards: n1's own, and n3's once a new leader
    // of shard 1 is elected on this side.
    let mut n3_keys = keys_homed_on("n3");
    let (k1, k3, k3_cut) = (key_homed_on("n1"), n3_keys.next().unwrap(), n3_keys.next().unwrap());
    let r = tc.order(0, Some(&k1), "widget-1", 1, "tok_ok").await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["order_id"].as_str().unwrap().to_string();
    let r = eventually(Duration::from_secs(10), "shard 1 serves on the majority side", || async {
        let r = tc.order(1, Some(&k3), "widget-1", 1, "tok_ok").await;
        (r.status == 201).then_some(r)
    })
    .await;
    let id3 = r.body["order_id"].as_str().unwrap().to_string();
    // The cut-off n3 has no majority: it acknowledges nothing (503 or 504, both say retry).
    let r = tc.order(2, Some(&k3_cut), "widget-1", 1, "tok_ok").await;
    assert!(matches!(r.status, 503 | 504), "{}", r.body);
    assert!(r.retry_after.is_some());
    // Without a key the same: and a 504 does not advise a retry with a key the order never had.
    let r = tc.order(2, None, "widget-1", 1, "tok_ok").await;
    assert!(matches!(r.status, 503 | 504), "{}", r.body);
    eprintln!("an unkeyed order on the cut-off n3: {} {}", r.status, r.body);
    if r.status == 504 {
        let message = r.body["message"].as_str().unwrap_or_default();
        assert!(message.contains("had no Idempotency-Key"), "{message}");
    }
    // Nor does it serve a read it cannot prove current.
    let r = tc.get(2, &format!("/v1/orders/{id3}")).await;
    assert!(matches!(r.status, 503 | 504), "{}", r.body);

    let heal = tc.delete(2, "/admin/partition").await;
    assert_eq!(heal.status, 202, "{}", heal.body);
    eventually(Duration::from_secs(15), "n3 back up everywhere", || async {
        (tc.status_of(0, "n3").await == "up" && tc.status_of(2, "n1").await == "up").then_some(())
    })
    .await;
    // Healed, every front answers each key with its one order.
    for front in [0, 1, 2] {
        for (k, want) in [(&k1, &id), (&k3, &id3)] {
            let r = eventually(Duration::from_secs(10), "the key replays after the heal", || async {
                let r = tc.order(front, Some(k), "widget-1", 1, "tok_ok").await;
                (r.status == 201).then_some(r)
            })
            .await;
            assert_eq!(r.body["order_id"].as_str(), Some(want.as_str()), "{}", r.body);
        }
    }

    eventually(Duration::from_secs(15), "the shipment delivered after the heal", || async {
        let s = tc.get(0, &format!("/v1/shipments?order_id={id}")).await;
        (s.body["shipments"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
}

/// SIGSTOP the payments leader n2 (payments is a Raft group with a replica on every node): another
/// node shows n2 not `up` within about a second, orders arriving at n1 confirm again once a new
/// leader is elected (the goal: the first `201` within 3 s of a SIGSTOP), and after SIGCONT
/// n2 catches up and leads again, with exactly one payment per order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_payments_leader_is_replaced_and_orders_confirm_meanwhile() {
    let tc = start().await;
    // A SKU whose inventory shard is n1, so the order reaches the payments step.
    let map = bulkhead::topology::demo_shard_map().shard_map();
    let sku = (0..)
        .map(|i| format!("pay-{i}"))
        .find(|s| map.node_for(Capability::Inventory, s.as_bytes()) == Some("n1"))
        .unwrap();
    tc.stock(&sku, 100, 250).await;
    eventually(Duration::from_secs(20), "n2 leads payments", || async {
        let v = tc.get(0, "/v1/cluster").await.body;
        (shard(&v, "payments", 0)["leader"] == "n2").then_some(())
    })
    .await;
    tc.lc.signal(1, libc::SIGSTOP);
    let paused = std::time::Instant::now();
    let mut n = 0;
    let first = eventually(Duration::from_secs(10), "an order confirms while n2 is paused", || {
        n += 1;
        let (tc, sku, key) = (&tc, &sku, format!("{}-{n}", key_homed_on("n1")));
        async move {
            let r = tc.order(0, Some(&key), sku, 1, "tok_ok").await;
            (r.status == 201).then(|| r.body["order_id"].as_str().unwrap_or_default().to_string())
        }
    })
    .await;
    let confirmed = paused.elapsed();
    let not_up = tc.status_of(0, "n2").await;
    tc.lc.signal(1, libc::SIGCONT);
    eprintln!("first 201 after SIGSTOP of the payments leader: {confirmed:?}");
    assert_ne!(not_up, "up");
    assert!(confirmed < Duration::from_secs(6), "first 201 only after {confirmed:?}");
    eventually(Duration::from_secs(20), "n2 leads payments again after SIGCONT", || async {
        let v = tc.get(0, "/v1/cluster").await.body;
        (shard(&v, "payments", 0)["leader"] == "n2").then_some(())
    })
    .await;
    let p = tc.get(1, &format!("/v1/payments?order_id={first}")).await;
    assert_eq!(p.body["payments"].as_array().map(Vec::len), Some(1), "{}", p.body);
}

/// An unreachable inventory shard holds up only the orders for its own SKUs: with inventory on n1
/// and n3 (payments, shipping and notifications on n2), SIGSTOP n3 makes orders for an n3 SKU
/// `202 pending` while orders for an n1 SKU still confirm; after SIGCONT the pending one confirms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_inventory_shard_holds_up_only_its_own_skus() {
    let tc = common::start_configured(Timing::default(), |configs| {
        for c in configs.iter_mut() {
            let p = CapabilityPlacement::on;
            c.capabilities.0.insert(Capability::Orders, p(&["n1"]));
            // One copy per shard (replicas = 1): shard 1 lives on n1 only, shard 2 on n3 only.
            let inventory = CapabilityPlacement {
                shards: Some(2),
                replicas: Some(1),
                leaders: vec!["n1".into(), "n3".into()],
                ..p(&["n1", "n3"])
            };
            c.capabilities.0.insert(Capability::Inventory, inventory);
            c.capabilities.0.insert(Capability::Payments, p(&["n2"]));
            c.capabilities.0.insert(Capability::Shipping, p(&["n2"]));
            c.capabilities.0.insert(Capability::Notifications, p(&["n2"]));
        }
    })
    .await;
    let map = tc.lc.configs[0].capabilities.shard_map();
    let sku_on = |node: &str| {
        (0..)
            .map(|i| format!("sku-{i}"))
            .find(|s| map.node_for(Capability::Inventory, s.as_bytes()) == Some(node))
            .unwrap()
    };
    let (near, far) = (sku_on("n1"), sku_on("n3"));
    tc.stock(&near, 10, 100).await;
    tc.stock(&far, 10, 100).await;
    tc.lc.signal(2, libc::SIGSTOP);
    eventually(Duration::from_secs(5), "n1 sees the paused n3 down", || async {
        (tc.status_of(0, "n3").await == "down").then_some(())
    })
    .await;
    let held = tc.order(0, None, &far, 1, "tok_ok").await;
    let fine = tc.order(0, None, &near, 1, "tok_ok").await;
    tc.lc.signal(2, libc::SIGCONT);
    assert_eq!((held.status, held.body["status"].as_str()), (202, Some("pending")), "{}", held.body);
    assert_eq!((fine.status, fine.body["status"].as_str()), (201, Some("confirmed")), "{}", fine.body);
    let id = held.body["order_id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(30), "the held order confirms after SIGCONT", || async {
        (tc.get(0, &format!("/v1/orders/{id}")).await.body["status"] == "confirmed").then_some(())
    })
    .await;
}
