//! Keyed orders ride through a leader's death (issue 17, item 5): while the leader of orders
//! shard 0 (n1 in the demo map) is paused (SIGSTOP) or killed (SIGKILL), keyed orders for that
//! shard keep arriving at n2, 20 a second, each tried once. Every one must answer 201, 202, 402 or
//! 409: the front holds the key and retries on the new leader within the order's budget, so a
//! client never sees 503/504 for a fault a majority survives. Afterwards every acknowledged order
//! is readable, once.
//!
//! CI runs one round of each fault; `BULKHEAD_FAILOVER_ROUNDS=10` runs the full probe.

mod common;

use std::time::{Duration, Instant};

use bulkhead_actors::Capability;
use common::{eventually, start, TestCluster};
use serde_json::Value;

/// How long each fault lasts, as in the probe.
const FAULT: Duration = Duration::from_secs(3);
/// One keyed order every this long (20 a second).
const EVERY: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug)]
enum Fault {
    Pause,
    Kill,
}

const SKU: &str = "failover-sku";

/// The body of every keyed order (the same body again with its key answers the same order).
fn order(sku: &str) -> Value {
    serde_json::json!({"customer_id": "c-failover", "items": [{"sku": sku, "quantity": 1}], "payment_token": "tok_ok"})
}

fn rounds() -> usize {
    std::env::var("BULKHEAD_FAILOVER_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

/// Idempotency-Keys of orders shard 0 (led by n1 while it is healthy), unique per `tag`.
fn keys_of_shard_0(tag: &str) -> impl Iterator<Item = String> + '_ {
    let map = bulkhead::topology::demo_shard_map().shard_map();
    (0..)
        .map(move |i| format!("{tag}-{i}"))
        .filter(move |k| map.node_for(Capability::Orders, k.as_bytes()) == Some("n1"))
}

async fn n1_leads_orders_shard_0(tc: &TestCluster) {
    eventually(Duration::from_secs(30), "n1 leads orders shard 0 (and n2 knows it)", || async {
        let v = tc.get(1, "/v1/cluster").await.body;
        let led = v["shards"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["capability"] == "orders" && s["shard"] == 0 && s["leader"] == "n1");
        led.then_some(())
    })
    .await;
}

/// One fault of n1 while keyed orders arrive at n2; returns each order's (key, status, body).
async fn one_round(tc: &mut TestCluster, fault: Fault, tag: &str, sku: &str) -> Vec<(String, u16, Value)> {
    n1_leads_orders_shard_0(tc).await;
    match fault {
        Fault::Pause => tc.lc.signal(0, libc::SIGSTOP),
        Fault::Kill => tc.lc.kill(0),
    }
    let began = Instant::now();
    let mut sent = Vec::new();
    let mut keys = keys_of_shard_0(tag);
    let mut tick = tokio::time::interval(EVERY);
    while began.elapsed() < FAULT {
        tick.tick().await;
        let key = keys.next().unwrap_or_default();
        let (http, url, sku) = (tc.http.clone(), tc.url(1), sku.to_string());
        sent.push(tokio::spawn(async move {
            let resp =
                http.post(format!("{url}/v1/orders")).header("Idempotency-Key", &key).json(&order(&sku)).send().await;
            match resp {
                Ok(r) => {
                    let status = r.status().as_u16();
                    (key, status, r.json::<Value>().await.unwrap_or(Value::Null))
                }
                Err(e) => (key, 0, Value::String(e.to_string())),
            }
        }));
    }
    match fault {
        Fault::Pause => tc.lc.signal(0, libc::SIGCONT),
        Fault::Kill => tc.lc.start(0).expect("restart n1"),
    }
    let mut answers = Vec::new();
    for s in sent {
        answers.push(s.await.expect("an order task"));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_orders_answer_through_a_paused_or_killed_orders_leader() {
    let mut tc = start().await;
    let sku = SKU;
    tc.stock(sku, 1_000_000, 100).await;
    let mut all = Vec::new();
    let mut bad = Vec::new();
    for round in 0..rounds() {
        for fault in [Fault::Pause, Fault::Kill] {
            let tag = format!("{fault:?}-{round}");
            let answers = one_round(&mut tc, fault, &tag, sku).await;
            let mut counts = std::collections::BTreeMap::<u16, usize>::new();
            for (_, status, _) in &answers {
                *counts.entry(*status).or_default() += 1;
            }
            eprintln!("round {round}, {fault:?} of n1: {} keyed orders, answers {counts:?}", answers.len());
            for (key, status, body) in &answers {
                if ![201, 202, 402, 409].contains(status) {
                    bad.push(format!("{fault:?} round {round}: key {key} answered {status}: {body}"));
                }
            }
            all.extend(answers);
        }
    }
    if !bad.is_empty() {
        tc.dump_logs();
    }
    assert!(bad.is_empty(), "{} of {} keyed orders were not answered:\n{}", bad.len(), all.len(), bad.join("\n"));
    // The checks below read through n1, restarted by the last round: wait until it sees its
    // peers up (before that it answers 503 for an order whose leader it has not heard from yet).
    tc.lc.wait_joined(Duration::from_secs(30), true).await.expect("n1 rejoined after the last round");
    // Every acknowledged order is there, once: its key answers the same order again.
    for (key, _, body) in &all {
        let id = body["order_id"].as_str().expect("an acknowledged order has an id");
        let again = tc.post(2, "/v1/orders", Some(key), order(SKU)).await;
        assert_eq!(again.body["order_id"].as_str(), Some(id), "key {key}: {}", again.body);
        let read = tc.get(0, &format!("/v1/orders/{id}")).await;
        assert_eq!(read.status, 200, "order {id}: {}", read.body);
    }
    // And no retry placed a second order: the customer has one order per key.
    if all.len() <= 500 {
        let listed = tc.get(1, "/v1/orders?customer_id=c-failover&limit=500").await;
        let n = listed.body["orders"].as_array().map(Vec::len);
        assert_eq!(n, Some(all.len()), "orders listed for the customer: {}", listed.body);
    }
}
