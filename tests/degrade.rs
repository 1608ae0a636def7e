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
