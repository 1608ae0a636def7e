//! Real node processes on loopback: the order flow across nodes, idempotency, declines, bad input.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{eventually, start};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_crosses_nodes_replays_by_key_and_ships() {
    let tc = start().await;
    tc.stock("widget-1", 10, 250).await;
    tc.stock("gadget-7", 10, 1000).await;
    let body = json!({"customer_id": "c1", "items": [{"sku": "widget-1", "quantity": 2}, {"sku": "gadget-7", "quantity": 1}], "payment_token": "tok_ok"});

    let r = tc.post(0, "/v1/orders", Some("key-1"), body.clone()).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["status"], "confirmed");
    assert_eq!(r.body["total_cents"], 1500);
    let id = r.body["order_id"].as_str().unwrap().to_string();

    // Readable from every node (a linearizable read on the shard's leader).
    for node in [1, 2] {
        let g = tc.get(node, &format!("/v1/orders/{id}")).await;
        assert_eq!((g.status, g.body["status"].as_str()), (200, Some("confirmed")), "{}", g.body);
    }
    // Same key + same body: the same order, the same answer.
    let again = tc.post(2, "/v1/orders", Some("key-1"), body.clone()).await;
    assert_eq!((again.status, again.body["order_id"].as_str()), (201, Some(id.as_str())));
    // Same key, another body: refused.
    let other = tc
        .post(
            0,
            "/v1/orders",
            Some("key-1"),
            json!({"customer_id": "c2", "items": [{"sku": "widget-1", "quantity": 1}], "payment_token": "tok_ok"}),
        )
        .await;
    assert_eq!(other.status, 422, "{}", other.body);

    // Exactly one charge; the shipment and notification arrive through the outbox.
    let p = tc.get(1, &format!("/v1/payments?order_id={id}")).await;
    assert_eq!(p.body["payments"].as_array().map(Vec::len), Some(1), "{}", p.body);
    eventually(Duration::from_secs(10), "a shipment", || async {
        let s = tc.get(0, &format!("/v1/shipments?order_id={id}")).await;
        (s.body["shipments"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "a notification", || async {
        let s = tc.get(0, &format!("/v1/notifications?order_id={id}")).await;
        (s.body["notifications"].as_array().is_some_and(|a| !a.is_empty())).then_some(())
    })
    .await;
    // The reservation was committed: sold, not reserved.
    eventually(Duration::from_secs(10), "stock committed", || async {
        let s = tc.get(0, "/v1/inventory/widget-1").await.body;
        (s["available"] == 8 && s["reserved"] == 0 && s["sold"] == 2).then_some(())
    })
    .await;

    // The customer's orders, newest first, from every shard; paged with `limit` and `before`.
    let second = tc.post(1, "/v1/orders", None, body.clone()).await;
    assert_eq!(second.status, 201, "{}", second.body);
    let second = second.body["order_id"].as_str().unwrap().to_string();
    let all = tc.get(2, "/v1/orders?customer_id=c1").await;
    let ids: Vec<&str> = all.body["orders"].as_array().unwrap().iter().filter_map(|o| o["order_id"].as_str()).collect();
    assert_eq!(ids, vec![second.as_str(), id.as_str()], "{}", all.body);
    assert_eq!(all.body["next_before"], serde_json::Value::Null);
    let page = tc.get(0, "/v1/orders?customer_id=c1&limit=1").await;
    assert_eq!(page.body["orders"][0]["order_id"], second.as_str(), "{}", page.body);
    assert_eq!(page.body["next_before"], second.as_str(), "{}", page.body);
    let page = tc.get(0, &format!("/v1/orders?customer_id=c1&limit=1&before={second}")).await;
    assert_eq!(page.body["orders"][0]["order_id"], id.as_str(), "{}", page.body);
    assert_eq!(page.body["next_before"], serde_json::Value::Null, "{}", page.body);
    let none = tc.get(0, "/v1/orders?customer_id=nobody").await;
    assert_eq!((none.status, none.body["orders"].as_array().map(Vec::len)), (200, Some(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_payment_cancels_and_releases_stock() {
    let tc = start().await;
    tc.stock("widget-2", 5, 100).await;
    let r = tc.order(0, Some("decline-1"), "widget-2", 3, "tok_decline").await;
    assert_eq!(r.status, 402, "{}", r.body);
    assert_eq!(r.body["error"], "payment_declined");
    let id = r.body["order_id"].as_str().unwrap().to_string();
    let g = tc.get(1, &format!("/v1/orders/{id}")).await;
    assert_eq!((g.body["status"].as_str(), g.body["reason"].as_str()), (Some("cancelled"), Some("payment_declined")));
    eventually(Duration::from_secs(10), "stock released", || async {
        let s = tc.get(2, "/v1/inventory/widget-2").await.body;
        (s["available"] == 5 && s["reserved"] == 0 && s["sold"] == 0).then_some(())
    })
    .await;

    // Out of stock: 409, the order exists as cancelled.
    let r = tc.order(0, None, "widget-2", 6, "tok_ok").await;
    assert_eq!((r.status, r.body["error"].as_str()), (409, Some("out_of_stock")), "{}", r.body);
    // A transient provider error is retried by the saga: still confirmed, one charge.
    let r = tc.order(0, None, "widget-2", 1, "tok_error").await;
    assert!(r.status == 201 || r.status == 202, "{}", r.body);
    let id = r.body["order_id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(10), "tok_error order confirmed", || async {
        (tc.get(0, &format!("/v1/orders/{id}")).await.body["status"] == "confirmed").then_some(())
    })
    .await;
    let p = tc.get(0, &format!("/v1/payments?order_id={id}")).await;
    assert_eq!(p.body["payments"][0]["attempts"], 3, "{}", p.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_records_nothing() {
    let tc = start().await;
    tc.stock("widget-3", 5, 100).await;
    let url = format!("{}/v1/orders", tc.url(0));
    let raw = |ct: &'static str, body: &'static str| tc.http.post(&url).header("content-type", ct).body(body).send();

    let r = raw("application/json", "{not json").await.unwrap();
    assert_eq!(r.status(), 400);
    let r = raw("text/plain", r#"{"customer_id":"c"}"#).await.unwrap();
    assert_eq!(r.status(), 415);
    let r = tc
        .post(
            0,
            "/v1/orders",
            None,
            json!({"customer_id": "c", "items": [{"sku": "widget-3", "quantity": 0}], "payment_token": "t"}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.body["message"].as_str().unwrap().contains("quantity"), "{}", r.body);
    let r = tc
        .post(
            0,
            "/v1/orders",
            Some(&"k".repeat(129)),
            json!({"customer_id": "c", "items": [{"sku": "widget-3", "quantity": 1}], "payment_token": "t"}),
        )
        .await;
    assert_eq!(r.status, 400);
    let big = format!(r#"{{"customer_id":"{}"}}"#, "x".repeat(100_000));
    let r = tc.http.post(&url).header("content-type", "application/json").body(big).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "too_large");
    let r = tc.http.delete(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "method_not_allowed");
    assert_eq!(tc.get(0, "/v1/orders/not-a-uuid").await.status, 400);
    assert_eq!(tc.get(0, "/v1/orders/01a1fc98-e0d3-70e1-a368-0dfcb0e88900").await.status, 404);
    assert_eq!(tc.get(0, "/v1/payments").await.status, 400);
    assert_eq!(tc.get(0, "/v1/orders").await.status, 400, "customer_id is required");
    assert_eq!(tc.get(0, "/v1/orders?customer_id=c&limit=0").await.status, 400);
    assert_eq!(tc.get(0, "/v1/orders?customer_id=c&limit=many").await.status, 400);
    assert_eq!(tc.get(0, "/v1/orders?customer_id=c&before=yesterday").await.status, 400);
    assert_eq!(tc.get(0, "/v1/inventory/bad%20sku").await.status, 400);
    // Nothing was reserved by any of that.
    let s = tc.get(0, "/v1/inventory/widget-3").await.body;
    assert_eq!((s["available"].as_u64(), s["reserved"].as_u64()), (Some(5), Some(0)));

    // Garbage on the cluster port: the node drops that connection and goes on serving.
    let addr = tc.lc.configs[0].cluster_listen;
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    let _ = sock.write_all(&[0, 0, 0, 8, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]);
    let _ = sock.write_all(&[0xff; 4096]);
    drop(sock);
    let r = tc.order(0, None, "widget-3", 1, "tok_ok").await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(tc.status_of(0, "n2").await, "up");
}
