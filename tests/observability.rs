//! Logs, traces and metrics of real nodes: one order's trace id followed from its `POST` to its
//! shipment through the JSON logs of all three nodes and to an OTLP collector, and `/metrics`
//! carrying every histogram the Grafana dashboard in deploy/ is built on.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_actors::Capability;
use bulkhead_cluster::Timing;
use bulkhead_launch::config::LogFormat;
use common::eventually;
use serde_json::{json, Value};

/// A stand-in OpenTelemetry collector: keeps the body of every OTLP/HTTP export.
async fn collector() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let keep = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let keep = keep.clone();
            async move {
                keep.lock().expect("collector lock").push(body.to_vec());
                // An empty ExportTraceServiceResponse.
                ([(axum::http::header::CONTENT_TYPE, "application/x-protobuf")], Vec::<u8>::new())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the collector");
    let addr = listener.local_addr().expect("collector address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), got)
}

/// Every line of node `i`'s log, each of which must be one JSON object.
fn json_lines(tc: &common::TestCluster, i: usize) -> Vec<Value> {
    let text = std::fs::read_to_string(tc.lc.log_path(i)).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("node {i} logged a line that is not JSON ({e}): {l}"))
        })
        .collect()
}

/// The messages node `i` logged in trace `trace` (the id on the event or on its span).
fn in_trace(tc: &common::TestCluster, i: usize, trace: &str) -> BTreeSet<String> {
    json_lines(tc, i)
        .into_iter()
        .filter(|l| l["trace_id"] == trace || l["span"]["trace_id"] == trace)
        .map(|l| l["message"].as_str().unwrap_or("").to_string())
        .collect()
}

fn metric_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn one_orders_trace_crosses_three_nodes_logs_and_reaches_the_collector() {
    let (endpoint, exported) = collector().await;
    let tc = common::start_configured(Timing::default(), |configs| {
        for c in configs.iter_mut() {
            c.log.format = LogFormat::Json;
            c.telemetry.otlp_endpoint = Some(endpoint.clone());
        }
    })
    .await;
    tc.stock("trace-widget", 10, 250).await;

    // An Idempotency-Key that lands in orders shard 0 (led by n1); the order enters at n2
    // (payments' leader), and shipping is led by n3: the order's work touches all three nodes.
    let map = tc.lc.configs[0].capabilities.shard_map();
    let key = (0..1000)
        .map(|i| format!("trace-key-{i}"))
        .find(|k| map.shard_for(Capability::Orders, k.as_bytes()) == 0)
        .expect("a key of orders shard 0");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = tc
        .http
        .post(format!("{}/v1/orders", tc.url(1)))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .header("Idempotency-Key", &key)
        .json(&json!({"customer_id": "c-trace", "items": [{"sku": "trace-widget", "quantity": 1}], "payment_token": "tok_ok"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status().as_u16(), 201);
    let answered = resp.headers().get("traceresponse").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert!(answered.contains(trace), "traceresponse {answered:?} names the caller's trace");
    let order: Value = resp.json().await.expect("order JSON");
    let id = order["order_id"].as_str().expect("order id").to_string();

    // Its shipment exists once the outbox delivered it.
    eventually(Duration::from_secs(20), "the order's shipment", || async {
        let r = tc.get(2, &format!("/v1/shipments?order_id={id}")).await;
        r.body["shipments"].as_array().is_some_and(|s| !s.is_empty()).then_some(())
    })
    .await;

    // Each node's log names the trace at info, for its own part of the order.
    let wanted: [(usize, &[&str]); 3] =
        [(0, &["order finished"]), (1, &["access", "payment charged"]), (2, &["event delivered"])];
    for (i, messages) in wanted {
        eventually(Duration::from_secs(10), &format!("n{} logs {messages:?} in trace {trace}", i + 1), || async {
            let seen = in_trace(&tc, i, trace);
            messages.iter().all(|m| seen.contains(*m)).then_some(())
        })
        .await;
    }
    // The access line of the POST: route template, status, latency, request id, trace id.
    let access = json_lines(&tc, 1)
        .into_iter()
        .find(|l| l["target"] == "access" && l["trace_id"] == trace && l["route"] == "/v1/orders")
        .expect("the POST's access line on n2");
    assert_eq!(access["status"], 201);
    assert_eq!(access["method"], "POST");
    assert!(access["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{access}");
    assert!(access["request_id"].as_str().is_some_and(|r| r.len() >= 32), "{access}");

    // The spans reached the collector: an export carries the trace id's 16 bytes.
    let trace_bytes = u128::from_str_radix(trace, 16).expect("hex").to_be_bytes();
    eventually(Duration::from_secs(20), "an OTLP export holding the order's trace", || async {
        let got = exported.lock().expect("collector lock");
        got.iter().any(|body| body.windows(16).any(|w| w == trace_bytes)).then_some(())
    })
    .await;

    // Every histogram the issue names, and every metric the Grafana dashboard queries.
    let mut names = BTreeSet::new();
    for i in 0..3 {
        let text =
            tc.http.get(format!("{}/metrics", tc.url(i))).send().await.expect("metrics").text().await.expect("text");
        names.extend(metric_names(&text));
    }
    for h in [
        "bulkhead_http_request_duration_seconds",
        "bulkhead_cluster_call_duration_seconds",
        "bulkhead_saga_step_duration_seconds",
        "bulkhead_raft_proposal_duration_seconds",
        "bulkhead_group_commit_batch_size",
        "bulkhead_fdatasync_duration_seconds",
    ] {
        for part in ["_bucket", "_sum", "_count"] {
            assert!(names.contains(&format!("{h}{part}")), "/metrics lacks {h}{part}");
        }
    }
    let grafana = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana-bulkhead.json"))
        .expect("deploy/grafana-bulkhead.json");
    let dashboard: Value = serde_json::from_str(&grafana).expect("the Grafana dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 10, "the dashboard has its queries");
    for expr in exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("bulkhead_") {
                assert!(names.contains(word), "the dashboard queries {word}, which no node exports");
            }
        }
    }
}
