//! Real node processes on loopback: the HTTP edge against slow and greedy clients. A client that
//! sends its headers or its body one byte at a time, or nothing at all, is cut off by the
//! timeouts and holds no order permit; connections past the cap are refused with a JSON `503`
//! while the node keeps serving; axum's own rejections are JSON like every other error.

mod common;

use std::time::{Duration, Instant};

/// How fast the slow clients here send: one byte per this long.
const SLOW_PACE: Duration = Duration::from_millis(300);

use bulkhead_cluster::Timing;
use bulkhead_http::HttpEdge;
use common::{eventually, start_configured, TestCluster};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER_TIMEOUT: Duration = Duration::from_millis(1_000);
const REQUEST_TIMEOUT: Duration = Duration::from_millis(5_000);
const IDLE_TIMEOUT: Duration = Duration::from_millis(6_000);
const MAX_CONNECTIONS: usize = 8;

async fn cluster() -> TestCluster {
    start_configured(Timing::default(), |configs| {
        for c in configs.iter_mut() {
            c.http = HttpEdge {
                max_connections: MAX_CONNECTIONS,
                header_timeout_ms: HEADER_TIMEOUT.as_millis() as u64,
                request_timeout_ms: REQUEST_TIMEOUT.as_millis() as u64,
                idle_timeout_ms: IDLE_TIMEOUT.as_millis() as u64,
                ..HttpEdge::default()
            };
        }
        // One order at a time on n1: a slow body that held the permit would make the next order 429.
        configs[0].limits.orders_in_flight = 1;
    })
    .await
}

async fn connect(tc: &TestCluster, node: usize) -> TcpStream {
    TcpStream::connect(tc.lc.configs[node].http_listen).await.expect("connect to the API")
}

/// Reads until the peer closes (or `within` passes): what it sent, and when it closed.
async fn read_to_close(s: &mut TcpStream, within: Duration) -> (String, Option<Duration>) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(within.saturating_sub(started.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), Some(started.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), None),
        }
    }
}

/// One unlabelled counter or gauge from a node's `/metrics`.
async fn metric(tc: &TestCluster, node: usize, name: &str) -> Option<u64> {
    let text = tc.http.get(format!("{}/metrics", tc.url(node))).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn json_body(response: &str) -> Value {
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not a JSON body ({e}): {response}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_hold_no_order_permit() {
    let tc = cluster().await;
    tc.stock("edge-1", 10, 100).await;

    // A body one byte every 300 ms: 408 at the request timeout, JSON.
    let (mut from_server, mut to_server) = connect(&tc, 0).await.into_split();
    // With a valid token: the guard lets it through to the body's wait (without one it is a 401
    // at once, body unread).
    let token = tc.lc.secrets().client_token().expect("client token");
    let head = format!(
        "POST /v1/orders HTTP/1.1\r\nhost: n1\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{{"
    );
    to_server.write_all(head.as_bytes()).await.expect("write the head");
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (in_body, body_begun) = tokio::sync::oneshot::channel();
    let trickle = {
        let answered = answered.clone();
        tokio::spawn(async move {
            let mut in_body = Some(in_body);
            // The pace is the slow client under test: a byte every 300 ms. It stops once the
            // answer is in: writing on into a closed socket could reset it.
            let mut pace = tokio::time::interval_at(tokio::time::Instant::now() + SLOW_PACE, SLOW_PACE);
            while !answered.load(std::sync::atomic::Ordering::Relaxed) {
                pace.tick().await;
                if to_server.write_all(b" ").await.is_err() {
                    break;
                }
                if let Some(tx) = in_body.take() {
                    let _ = tx.send(());
                }
            }
            to_server
        })
    };
    let reader = {
        let answered = answered.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while started.elapsed() < REQUEST_TIMEOUT * 2 {
                match tokio::time::timeout(Duration::from_millis(200), from_server.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => {
                        got.extend_from_slice(&buf[..n]);
                        answered.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
            }
            String::from_utf8_lossy(&got).into_owned()
        })
    };
    // Meanwhile (once the slow request is into its body) n1 takes an order: the slow body holds no
    // permit, and n1 allows one order at a time.
    body_begun.await.expect("the trickle wrote into the body");
    let r = tc.order(0, None, "edge-1", 1, "tok_ok").await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(!answered.load(std::sync::atomic::Ordering::Relaxed), "the slow request was answered early");
    let response = reader.await.expect("reader task");
    drop(trickle.await.expect("trickle task"));
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert_eq!(json_body(&response)["error"], "request_timeout", "{response}");

    // Headers one byte every 300 ms: closed at the header timeout, nothing answered.
    let mut slow_head = connect(&tc, 0).await;
    let started = Instant::now();
    slow_head.write_all(b"GET /healthz HTTP/1.1\r\n").await.expect("write");
    let dribble = tokio::spawn(async move {
        // The pace is the slow client under test: a byte every 300 ms.
        let mut pace = tokio::time::interval_at(tokio::time::Instant::now() + SLOW_PACE, SLOW_PACE);
        for b in b"host: n1\r\nx-slow: yes\r\n".iter() {
            pace.tick().await;
            if slow_head.write_all(&[*b]).await.is_err() {
                break;
            }
        }
        slow_head
    });
    let mut slow_head = dribble.await.expect("dribble task");
    let (response, closed) = read_to_close(&mut slow_head, Duration::from_secs(10)).await;
    assert!(closed.is_some(), "a slow header was cut off");
    assert!(
        started.elapsed() < HEADER_TIMEOUT * 4 + Duration::from_secs(4),
        "closed only after {:?}",
        started.elapsed()
    );
    assert!(!response.contains("200 OK"), "{response}");

    // Nothing at all: closed at the header timeout.
    let mut silent = connect(&tc, 0).await;
    let (_, closed) = read_to_close(&mut silent, Duration::from_secs(5)).await;
    let closed = closed.expect("a silent connection was closed");
    assert!(closed >= HEADER_TIMEOUT / 2 && closed < HEADER_TIMEOUT * 4, "closed after {closed:?}");

    // A keep-alive left idle after one answer: the next request's header timer runs from the
    // answer, so it is closed at the header timeout too.
    let mut idle = connect(&tc, 0).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: n1\r\n\r\n").await.expect("write");
    let (response, closed) = read_to_close(&mut idle, IDLE_TIMEOUT * 2).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let closed = closed.expect("an idle keep-alive was closed");
    assert!(closed >= HEADER_TIMEOUT / 2 && closed < IDLE_TIMEOUT, "closed after {closed:?}");

    assert_eq!(metric(&tc, 0, "bulkhead_http_request_timeouts_total").await, Some(1));
    // And the node serves on.
    let r = tc.order(0, None, "edge-1", 1, "tok_ok").await;
    assert_eq!(r.status, 201, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_refused_with_json_while_the_node_serves() {
    let tc = cluster().await;
    // Open more connections than the cap at once (the harness's own pooled client may hold a
    // few more): at least the excess is refused, each with a JSON 503 and Retry-After.
    let mut streams = Vec::new();
    for _ in 0..MAX_CONNECTIONS + 4 {
        streams.push(connect(&tc, 1).await);
    }
    let mut reads = tokio::task::JoinSet::new();
    for mut s in streams {
        reads.spawn(async move { read_to_close(&mut s, Duration::from_millis(1_500)).await.0 });
    }
    let mut refused = Vec::new();
    while let Some(r) = reads.join_next().await {
        let response = r.expect("read task");
        if response.starts_with("HTTP/1.1 503") {
            refused.push(response);
        }
    }
    assert!(refused.len() >= 4, "only {} of {} connections refused", refused.len(), MAX_CONNECTIONS + 4);
    for r in &refused {
        assert!(r.to_ascii_lowercase().contains("retry-after: 1"), "{r}");
        assert_eq!(json_body(r)["error"], "too_many_connections", "{r}");
    }
    // Other nodes are untouched; n2 serves again once its slots are free (closed or timed out).
    assert_eq!(tc.get(0, "/healthz").await.status, 200);
    eventually(Duration::from_secs(10), "n2 serves again", || async {
        (tc.http.get(format!("{}/healthz", tc.url(1))).send().await.ok()?.status() == 200).then_some(())
    })
    .await;
    let refused_total = metric(&tc, 1, "bulkhead_http_connections_refused_total").await;
    assert!(refused_total.is_some_and(|n| n >= refused.len() as u64), "{refused_total:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_and_carries_a_request_id() {
    let tc = cluster().await;
    let url = tc.url(2);
    for (path, status) in [
        ("/v1/payments?order_id=a&order_id=b", 400), // a repeated query parameter: axum's own rejection
        ("/v1/orders?customer_id=c&limit=many", 400),
        ("/v1/no-such-thing", 404),
        ("/v1/orders/not-a-uuid", 400),
    ] {
        let r = tc.http.get(format!("{url}{path}")).send().await.expect("send");
        assert_eq!(r.status().as_u16(), status, "{path}");
        assert!(r.headers().get("x-request-id").is_some(), "{path}: no request id");
        let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        assert!(ct.starts_with("application/json"), "{path}: {ct}");
        let body: Value = r.json().await.expect("JSON");
        assert!(body["error"].is_string() && body["message"].is_string(), "{path}: {body}");
    }
    // A given request id is echoed.
    let r = tc.http.get(format!("{url}/healthz")).header("x-request-id", "trace-me-42").send().await.expect("send");
    assert_eq!(r.headers().get("x-request-id").and_then(|v| v.to_str().ok()), Some("trace-me-42"));
    // A body over the limit, refused from its Content-Length alone: none of it is ever sent.
    let mut s = connect(&tc, 2).await;
    s.write_all(
        b"POST /v1/orders HTTP/1.1\r\nhost: n3\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n",
    )
    .await
    .expect("write the head");
    let (response, _) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert_eq!(json_body(&response)["error"], "too_large", "{response}");
}
