//! The node log under SIGKILL: a stream of keyed orders from several clients while a random node is
//! killed at a random moment (after a random number of acknowledged orders, so the moment falls
//! in the middle of appends, rounds and applies), then started again, three times. Afterwards every
//! acknowledged order is there, each key still names its one order, and the replicas of every shard
//! agree on how far they have applied. The torn-tail half of the crash test (a segment cut at every
//! byte) is a unit test beside the log (`storage/src/nodelog.rs`).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, start, TestCluster};
use rand::Rng;
use serde_json::{json, Value};

/// What a client learned of each key: the order id of a `201`/`202`, or `None` if the answer
/// never came (the node died under it: the order may or may not exist).
type Outcomes = Arc<Mutex<BTreeMap<String, Option<String>>>>;

/// No node is down (`usize::MAX`), or the index of the one that is.
const NONE_DOWN: usize = usize::MAX;

async fn place(http: &reqwest::Client, url: &str, key: &str) -> Result<(u16, Value), reqwest::Error> {
    let body =
        json!({"customer_id": "c-crash", "items": [{"sku": "crash-1", "quantity": 1}], "payment_token": "tok_ok"});
    let resp = http.post(format!("{url}/v1/orders")).header("Idempotency-Key", key).json(&body).send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// One client: keyed orders to any live front until told to stop.
async fn client(
    tc_urls: Vec<String>,
    http: reqwest::Client,
    id: usize,
    down: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    outcomes: Outcomes,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let front = (id + n as usize) % tc_urls.len();
        if down.load(Ordering::Relaxed) == front {
            n += 1;
            continue;
        }
        let key = format!("crash-{id}-{n}");
        n += 1;
        match place(&http, &tc_urls[front], &key).await {
            Ok((201 | 202, body)) => {
                let order = body["order_id"].as_str().map(str::to_string);
                outcomes.lock().unwrap().insert(key, order);
                acked.fetch_add(1, Ordering::Relaxed);
            }
            // Refused before anything was recorded (no leader yet, shedding): the key is unused.
            Ok((429 | 503, _)) => {}
            // Anything else, or no answer: it may exist. The check asks again with the key.
            _ => {
                outcomes.lock().unwrap().insert(key, None);
            }
        }
    }
}

async fn wait_acked(acked: &AtomicU64, more: u64, what: &str) {
    let target = acked.load(Ordering::Relaxed) + more;
    eventually(Duration::from_secs(60), what, || async { (acked.load(Ordering::Relaxed) >= target).then_some(()) })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_acknowledged_order_and_the_replicas_agree() {
    let mut tc: TestCluster = start().await;
    tc.stock("crash-1", 10_000_000, 100).await;
    let urls: Vec<String> = (0..3).map(|i| tc.url(i)).collect();
    let (down, stop) = (Arc::new(AtomicUsize::new(NONE_DOWN)), Arc::new(AtomicBool::new(false)));
    let (acked, outcomes): (Arc<AtomicU64>, Outcomes) = (Arc::default(), Arc::default());
    let clients: Vec<_> = (0..8)
        .map(|id| {
            tokio::spawn(client(
                urls.clone(),
                tc.http.clone(),
                id,
                down.clone(),
                stop.clone(),
                acked.clone(),
                outcomes.clone(),
            ))
        })
        .collect();

    let mut rng = rand::thread_rng();
    for round in 0..3 {
        // A random moment: after a random number of acknowledged orders.
        wait_acked(&acked, rng.gen_range(20..120), "orders acknowledged before the kill").await;
        let victim = rng.gen_range(0..3);
        down.store(victim, Ordering::Relaxed);
        tc.lc.kill(victim);
        // The survivors go on (the victim's shards fail over) ...
        wait_acked(&acked, 30, "orders acknowledged while a node is down").await;
        // ... and the victim comes back from its node log.
        tc.lc.start(victim).unwrap_or_else(|e| panic!("round {round}: restarting n{}: {e}", victim + 1));
        if let Err(e) = tc.lc.wait_ready(Duration::from_secs(60)).await {
            tc.dump_logs();
            panic!("round {round}: n{} did not come back: {e}", victim + 1);
        }
        down.store(NONE_DOWN, Ordering::Relaxed);
    }
    wait_acked(&acked, 30, "orders acknowledged after the last restart").await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    // Every key names one order: the acknowledged ones the order first answered, from any front
    // (eight replays at a time).
    let outcomes: Vec<(String, Option<String>)> = outcomes.lock().unwrap().clone().into_iter().collect();
    let acknowledged = outcomes.iter().filter(|(_, o)| o.is_some()).count();
    assert!(acknowledged >= 200, "only {acknowledged} orders were acknowledged");
    let outcomes = Arc::new(outcomes);
    let next = Arc::new(AtomicUsize::new(0));
    let checkers: Vec<_> = (0..8)
        .map(|_| {
            let (outcomes, next, http, urls) = (outcomes.clone(), next.clone(), tc.http.clone(), urls.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((key, first)) = outcomes.get(i) else { return };
                    let (status, body) = place(&http, &urls[i % 3], key).await.expect("the replay answers");
                    assert!(matches!(status, 201 | 202), "{key}: {status} {body}");
                    let now = body["order_id"].as_str().map(str::to_string);
                    if let Some(first) = first {
                        assert_eq!(now.as_ref(), Some(first), "{key} names another order than the one acknowledged");
                        // 404 is a loss; 503 only says the shard has no leader this moment (a
                        // hand-back to a restarted node, say): asked again, as a client would.
                        let url = format!("{}/v1/orders/{first}", urls[(i + 1) % 3]);
                        let status = eventually(Duration::from_secs(5), "an answer other than 503", || async {
                            let status = http.get(&url).send().await.expect("GET").status().as_u16();
                            (status != 503).then_some(status)
                        })
                        .await;
                        assert_eq!(status, 200, "acknowledged order {first} ({key}) is gone");
                    }
                }
            })
        })
        .collect();
    for c in checkers {
        c.await.unwrap();
    }

    // The replicas of every shard reach the same applied index.
    eventually(Duration::from_secs(30), "every shard's replicas applied the same entries", || async {
        let mut applied: BTreeMap<String, Vec<Option<u64>>> = BTreeMap::new();
        for from in 0..3 {
            for s in tc.shards(from).await {
                let id = format!("{}/{}", s["capability"].as_str().unwrap_or("?"), s["shard"]);
                applied.entry(id).or_default().push(s["applied_index"].as_u64());
            }
        }
        let agree = !applied.is_empty()
            && applied.values().all(|v| v.len() == 3 && v.iter().all(|a| a.is_some() && *a == v[0]));
        agree.then_some(())
    })
    .await;
}
