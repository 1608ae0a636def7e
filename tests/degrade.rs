//! "Degrade, don't block", with real node processes: load shedding at the HTTP front and the
//! dead-letter table of the outbox.

mod common;

use std::time::Duration;

use bulkhead_cluster::Timing;
use common::{eventually, start_configured};

/// The value of an unlabelled sample in Prometheus text.
fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_past_the_in_flight_bound_are_answered_429_with_retry_after() {
    let tc = start_configured(Timing::default(), |cfgs| cfgs[0].limits.orders_in_flight = 1).await;
    tc.stock("shed-1", 100, 500).await;
    // n2 forwards orders to n1: wait until n1's orders capability is healthy in n2's view.
    eventually(Duration::from_secs(10), "n2 routes orders to n1", || async {
        let v = tc.get(1, "/v1/cluster").await.body;
        v["capabilities"]["orders"]["healthy"].as_array()?.iter().any(|n| n == "n1").then_some(())
    })
    .await;
    // tok_slow answers after 3 s: the order holds n1's only slot for the whole wait budget.
    let slow = {
        let tc_http = tc.http.clone();
        let url = format!("{}/v1/orders", tc.url(0));
        tokio::spawn(async move {
            let body = serde_json::json!({"customer_id": "c-slow", "items": [{"sku": "shed-1", "quantity": 1}], "payment_token": "tok_slow"});
            tc_http.post(url).json(&body).send().await.expect("POST").status().as_u16()
        })
    };
    let metrics_url = format!("{}/metrics", tc.url(0));
    eventually(Duration::from_secs(5), "the slow order occupies n1's slot", || async {
        let text = tc.http.get(&metrics_url).send().await.ok()?.text().await.ok()?;
        (sample(&text, "bulkhead_orders_in_flight") == Some(1)).then_some(())
    })
    .await;

    let r = tc.order(0, None, "shed-1", 1, "tok_ok").await;
    assert_eq!(r.status, 429, "{}", r.body);
    // Shedding is not a failure of the member: its breaker stays closed.
    let v = tc.get(0, "/v1/cluster").await.body;
    assert_eq!(v["capabilities"]["orders"]["breaker"], "closed", "{v}");
    assert_eq!(v["capabilities"]["orders"]["breakers"]["n1"], "closed", "{v}");
    assert_eq!(r.retry_after.as_deref(), Some("1"));
    assert_eq!(r.body["error"], "overloaded", "{}", r.body);
    assert!(r.body["message"].as_str().is_some_and(|m| m.contains("nothing was recorded")));
    // Another node's front has its own bound: it still takes orders.
    let other = tc.order(1, None, "shed-1", 1, "tok_ok").await;
    assert_eq!(other.status, 201, "{}", other.body);

    assert_eq!(slow.await.expect("join"), 202, "the slow order is answered pending at the wait budget");
    let text = tc.http.get(&metrics_url).send().await.expect("metrics").text().await.expect("text");
    assert!(sample(&text, "bulkhead_orders_shed_total").is_some_and(|n| n >= 1), "{text}");
    // The slot is free again.
    let after = tc.order(0, None, "shed-1", 1, "tok_ok").await;
    assert_eq!(after.status, 201, "{}", after.body);
    // Only the three admitted orders took stock.
    let stock = tc.get(0, "/v1/inventory/shed-1").await.body;
    assert_eq!(stock["available"].as_u64(), Some(97), "{stock}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_ends_in_the_dead_letters_and_does_not_block_its_destination() {
    let tc = start_configured(Timing::default(), |_| {}).await;
    tc.stock("dl-1", 100, 250).await;
    // With fault_injection, shipping fails on every event of a `poison-shipping…` customer.
    // Placed together with normal orders, so its event may travel in one batch (`DeliverMany`)
    // with theirs: the batch is refused whole and the relay delivers its events one by one.
    let body = serde_json::json!({"customer_id": "poison-shipping-1", "items": [{"sku": "dl-1", "quantity": 1}], "payment_token": "tok_ok"});
    let (poison, others) = tokio::join!(
        tc.post(0, "/v1/orders", None, body),
        futures::future::join_all((0..6).map(|_| tc.order(0, None, "dl-1", 1, "tok_ok")))
    );
    assert_eq!(poison.status, 201, "{}", poison.body);
    let poison_id = poison.body["order_id"].as_str().expect("order_id").to_string();
    let other_ids: Vec<String> = others
        .iter()
        .map(|r| {
            assert_eq!(r.status, 201, "{}", r.body);
            r.body["order_id"].as_str().expect("order_id").to_string()
        })
        .collect();

    let letters = eventually(Duration::from_secs(20), "the poison event is dead-lettered", || async {
        let r = tc.get(1, &format!("/v1/dead-letters?order_id={poison_id}")).await;
        let list = r.body["dead_letters"].as_array()?.clone();
        (!list.is_empty()).then_some(list)
    })
    .await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let d = &letters[0];
    assert_eq!(d["order_id"], poison_id.as_str());
    assert_eq!(d["destination"], "shipping");
    assert_eq!(d["event"], "order_confirmed");
    assert_eq!(d["attempts"], 5);
    assert!(d["event_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(d["last_error"].as_str().is_some_and(|e| e.contains("refused")), "{d}");
    assert!(d["at"].as_str().is_some());

    // No shipment for it, but its notification went out: only the failing destination is affected.
    let shipments = tc.get(2, &format!("/v1/shipments?order_id={poison_id}")).await;
    assert_eq!(shipments.body["shipments"].as_array().map(Vec::len), Some(0), "{}", shipments.body);
    eventually(Duration::from_secs(10), "the poison order's notification", || async {
        let r = tc.get(0, &format!("/v1/notifications?order_id={poison_id}")).await;
        (r.body["notifications"].as_array()?.len() == 1).then_some(())
    })
    .await;

    // The orders placed with it, and the next normal order, get their shipments.
    for id in &other_ids {
        eventually(Duration::from_secs(10), "a shipment of an order placed with the poison one", || async {
            let r = tc.get(2, &format!("/v1/shipments?order_id={id}")).await;
            (r.body["shipments"].as_array()?.len() == 1).then_some(())
        })
        .await;
    }
    let ok = tc.order(0, None, "dl-1", 1, "tok_ok").await;
    assert_eq!(ok.status, 201, "{}", ok.body);
    let ok_id = ok.body["order_id"].as_str().expect("order_id").to_string();
    eventually(Duration::from_secs(10), "the normal order's shipment", || async {
        let r = tc.get(2, &format!("/v1/shipments?order_id={ok_id}")).await;
        (r.body["shipments"].as_array()?.len() == 1).then_some(())
    })
    .await;

    // The unfiltered list, asked of every orders shard from another node, has exactly the poison letter.
    let all = tc.get(2, "/v1/dead-letters").await;
    assert_eq!(all.status, 200, "{}", all.body);
    let all_list = all.body["dead_letters"].as_array().expect("list");
    assert_eq!(all_list.len(), 1, "{}", all.body);
    assert_eq!(all_list[0]["order_id"], poison_id.as_str());
    assert_eq!(all.body["unreachable"].as_array().map(Vec::len), Some(0));
    let none = tc.get(0, &format!("/v1/dead-letters?order_id={ok_id}")).await;
    assert_eq!(none.body["dead_letters"].as_array().map(Vec::len), Some(0), "{}", none.body);
    let bad = tc.get(0, "/v1/dead-letters?order_id=nope").await;
    assert_eq!(bad.status, 400);
    let text = tc.http.get(format!("{}/metrics", tc.url(0))).send().await.expect("metrics").text().await.expect("text");
    assert_eq!(sample(&text, "bulkhead_dead_letters_total"), Some(1), "{text}");
}

/// No stock held hostage: an order whose charge is not definite within its reservation window (a
/// second here; `tok_slow` keeps payments busy for 3 s, past the call timeout) is cancelled by the
/// saga, its hold goes back to the stock, and the charge that lands later is refunded or refused:
/// nothing stays charged for a cancelled order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_without_a_definite_charge_in_its_window_is_cancelled_and_its_stock_returns() {
    let timing = Timing { wait_budget_ms: 300, call_timeout_ms: 1_000, ..Timing::default() };
    let tc = start_configured(timing, |cfgs| {
        for c in cfgs.iter_mut() {
            c.orders.reservation_window_ms = 1_000;
        }
    })
    .await;
    tc.stock("window-1", 10, 100).await;
    let placed = std::time::Instant::now();
    let r = tc.order(0, None, "window-1", 3, "tok_slow").await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.body["order_id"].as_str().expect("order id").to_string();
    let order = eventually(Duration::from_secs(20), "the order is cancelled by its window", || async {
        let o = tc.get(1, &format!("/v1/orders/{id}")).await.body;
        (o["status"] != "pending").then_some(o)
    })
    .await;
    assert_eq!(
        (order["status"].as_str(), order["reason"].as_str()),
        (Some("cancelled"), Some("reservation_window_passed"))
    );
    eventually(Duration::from_secs(15), "the hold goes back to the stock", || async {
        let s = tc.get(2, "/v1/inventory/window-1").await.body;
        (s["available"] == 10 && s["reserved"] == 0 && s["sold"] == 0).then_some(())
    })
    .await;
    // The slow charge finishes after the cancel: refunded if it landed first, else refused. The
    // fake provider's delay is a fixed 3 s from the first charge call, so this waits that out
    // (a fault's own clock, not a guess at readiness).
    tokio::time::sleep_until((placed + Duration::from_millis(3_500)).into()).await;
    // A voided order is not listed (it never had a charge); a refunded one is, as refunded.
    eventually(Duration::from_secs(10), "the payment refunded or voided", || async {
        let p = tc.get(1, &format!("/v1/payments?order_id={id}")).await.body;
        p["payments"].as_array()?.iter().all(|x| x["status"] == "refunded").then_some(())
    })
    .await;
}
