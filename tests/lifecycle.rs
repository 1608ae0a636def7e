//! Stopping a node, with real processes: SIGTERM under load fails no request the node accepted and
//! `/readyz` says 503 before the port closes; systemd's notify protocol (READY, WATCHDOG, STOPPING).

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_cluster::Timing;
use common::{eventually, start_configured, TestCluster};
use serde_json::{json, Value};

const GRACE_MS: u64 = 1_500;
const DRAIN_TIMEOUT_MS: u64 = 8_000;

async fn cluster(grace_ms: u64) -> TestCluster {
    start_configured(Timing::default(), |configs| {
        for c in configs.iter_mut() {
            c.http.drain_grace_ms = grace_ms;
            c.http.drain_timeout_ms = DRAIN_TIMEOUT_MS;
        }
    })
    .await
}

/// What one `POST /v1/orders` got.
#[derive(Debug, Clone)]
enum Outcome {
    /// An HTTP answer: its status, its `error` code, the order id it named.
    Answer { status: u16, error: Option<String>, order: Option<String> },
    /// No HTTP answer at all: the node never took the request (refused, reset, closed).
    NoAnswer(#[allow(dead_code)] String),
    /// Sent, and no answer within the client's timeout: a failure.
    TimedOut,
}

impl Outcome {
    fn refused_draining(&self) -> bool {
        matches!(self, Outcome::Answer { status: 503, error: Some(e), .. } if e == "draining")
    }
}

async fn place(http: &reqwest::Client, url: &str, key: &str) -> Outcome {
    let body =
        json!({"customer_id": "c-drain", "items": [{"sku": "drain-1", "quantity": 1}], "payment_token": "tok_ok"});
    match http.post(format!("{url}/v1/orders")).header("Idempotency-Key", key).json(&body).send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            let error = v["error"].as_str().map(str::to_string);
            let order = v["order_id"].as_str().map(str::to_string);
            Outcome::Answer { status, error, order }
        }
        Err(e) if e.is_timeout() => Outcome::TimedOut,
        Err(e) => Outcome::NoAnswer(e.to_string()),
    }
}

/// What one poll of `/readyz` saw, in order.
#[derive(Debug, Clone, PartialEq)]
enum Probe {
    Ready,
    Draining,
    OtherStatus(u16),
    NoConnection,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_fails_no_accepted_request_and_readyz_goes_503_before_the_port_closes() {
    let mut tc = cluster(GRACE_MS).await;
    tc.stock("drain-1", 1_000_000, 100).await;
    let url = tc.url(0);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::<(String, Outcome)>::new()));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..8 {
        let http = tc.lc.admin_client(Duration::from_secs(15)).expect("client");
        let (url, stop, outcomes) = (url.clone(), stop.clone(), outcomes.clone());
        clients.spawn(async move {
            let mut i = 0;
            // After a refused connect (the port is closed or closing), wait for the next 20 ms
            // tick instead of spinning on connects.
            let mut backoff = tokio::time::interval(Duration::from_millis(20));
            backoff.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("drain-{c}-{i}");
                let out = place(&http, &url, &key).await;
                let no_answer = matches!(out, Outcome::NoAnswer(_));
                outcomes.lock().expect("lock").push((key, out));
                i += 1;
                if no_answer {
                    backoff.tick().await;
                }
            }
        });
    }
    let probes = Arc::new(Mutex::new(Vec::<(Instant, Probe)>::new()));
    let prober = {
        let http = tc.lc.admin_client(Duration::from_secs(5)).expect("client");
        let (url, stop, probes) = (url.clone(), stop.clone(), probes.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(25));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let p = match http.get(format!("{url}/readyz")).send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        match (status, v["status"].as_str()) {
                            (200, _) => Probe::Ready,
                            (503, Some("draining")) => Probe::Draining,
                            (s, _) => Probe::OtherStatus(s),
                        }
                    }
                    Err(_) => Probe::NoConnection,
                };
                probes.lock().expect("lock").push((Instant::now(), p));
            }
        })
    };
    // Load first, so that requests are in flight when the signal comes.
    eventually(Duration::from_secs(20), "orders placed through n1 before the signal", || async {
        let n = outcomes
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Answer { status: 201, .. }))
            .count();
        (n >= 40).then_some(())
    })
    .await;
    // Hand-backs to n1 (its preferred groups) the others tried so far: none may follow the signal.
    let hand_backs = |tc: &TestCluster| -> usize {
        (1..3)
            .map(|i| std::fs::read_to_string(tc.lc.log_path(i)).unwrap_or_default())
            .map(|log| log.lines().filter(|l| l.contains("handing leadership over") && l.contains("to=n1")).count())
            .sum()
    };
    let hand_backs_before = hand_backs(&tc);
    let signalled = Instant::now();
    tc.lc.signal(0, libc::SIGTERM);
    let bound = Duration::from_millis(GRACE_MS + DRAIN_TIMEOUT_MS) + Duration::from_secs(22);
    // Poll the process itself (a readiness wait), every 20 ms.
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    let exit = loop {
        poll.tick().await;
        if let Some((i, status)) = tc.lc.exited() {
            assert_eq!(i, 0, "only n1 was stopped");
            break status;
        }
        if signalled.elapsed() > bound + Duration::from_secs(5) {
            tc.dump_logs();
            panic!("n1 did not exit within {bound:?} of SIGTERM");
        }
    };
    let took = signalled.elapsed();
    // Load goes on against the closed port until a client has met it, then the clients stop.
    common::eventually(Duration::from_secs(5), "a client meeting n1's closed port", || async {
        outcomes.lock().expect("lock").iter().any(|(_, o)| matches!(o, Outcome::NoAnswer(_))).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while clients.join_next().await.is_some() {}
    let _ = prober.await;
    let log = std::fs::read_to_string(tc.lc.log_path(0)).unwrap_or_default();
    let drain_lines: Vec<&str> = log.lines().filter(|l| l.contains("drain")).collect();
    eprintln!("n1 exited with {exit} {took:?} after SIGTERM; its drain:\n{}", drain_lines.join("\n"));
    assert!(exit.contains("exit status: 0"), "n1 must exit 0 after a drain, got {exit}");
    assert!(took < bound, "the drain took {took:?}, over its bound {bound:?}");

    // Every request n1 accepted (any answer but the draining 503) succeeded.
    let outcomes = outcomes.lock().expect("lock").clone();
    let mut acknowledged = Vec::new();
    let (mut refused, mut no_answer) = (0, 0);
    for (key, out) in &outcomes {
        match out {
            _ if out.refused_draining() => refused += 1,
            Outcome::Answer { status: 201 | 202, order: Some(id), .. } => acknowledged.push((key.clone(), id.clone())),
            Outcome::Answer { status: 402 | 409, .. } => {}
            Outcome::NoAnswer(_) => no_answer += 1,
            other => {
                tc.dump_logs();
                panic!("request {key} was accepted by n1 and failed: {other:?}");
            }
        }
    }
    eprintln!(
        "{} requests: {} acknowledged, {refused} refused as draining, {no_answer} never answered (port closed)",
        outcomes.len(),
        acknowledged.len()
    );
    assert!(refused > 0, "the clients must have met the draining refusals");
    assert!(no_answer > 0, "the clients must have met the closed port");
    assert!(log.contains("every admitted request finished"), "the drain must not cut a request");
    let handed = log
        .split("handed over ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0);
    assert!(handed >= 1, "n1 led groups and handed them over: {drain_lines:?}");
    assert!(log.contains("kept 0"), "every leadership of n1 is handed over: {drain_lines:?}");
    assert_eq!(hand_backs(&tc), hand_backs_before, "a peer tried to hand a leadership back to the draining n1");

    // /readyz said 503 draining before the port refused connections, and never went back to 200.
    let probes = probes.lock().expect("lock").clone();
    let first_draining = probes.iter().position(|(_, p)| *p == Probe::Draining).expect("/readyz answered draining");
    let first_closed = probes.iter().position(|(_, p)| *p == Probe::NoConnection).expect("the port closed");
    assert!(first_draining < first_closed, "{probes:?}");
    assert!(probes[first_draining..].iter().all(|(_, p)| *p != Probe::Ready), "readyz back to 200 while draining");
    let announced_for = probes[first_closed].0 - probes[first_draining].0;
    assert!(announced_for >= Duration::from_millis(GRACE_MS), "503 draining for only {announced_for:?}");

    // What n1 acknowledged is there on the nodes that stay.
    for (key, id) in &acknowledged {
        eventually(Duration::from_secs(20), &format!("order {id} ({key}) readable on n2"), || async {
            let r = tc.get(1, &format!("/v1/orders/{id}")).await;
            (r.status == 200).then_some(())
        })
        .await;
    }
    tc.lc.stop_all();
}

/// Reads every datagram waiting on `sock`.
fn drain_socket(sock: &UnixDatagram) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_a_node_says_ready_once_ready_pings_the_watchdog_and_says_stopping() {
    let mut tc = cluster(200).await;
    let path = tc.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
    sock.set_nonblocking(true).expect("nonblocking");
    // n3 again, as systemd would start it: a notify socket and a 1 s watchdog.
    tc.lc.stop(2);
    let socket = path.to_string_lossy().to_string();
    tc.lc.set_env(2, &[("NOTIFY_SOCKET", socket.as_str()), ("WATCHDOG_USEC", "1000000")]);
    tc.lc.start(2).expect("start n3");
    let http = tc.lc.admin_client(Duration::from_secs(5)).expect("client");
    let url = tc.url(2);
    let started = Instant::now();
    let (mut ready_at, mut watchdogs, mut seen) = (None, 0usize, Vec::new());
    // Poll the socket for what the node said, every 10 ms.
    let mut poll = tokio::time::interval(Duration::from_millis(10));
    while ready_at.is_none() || watchdogs < 2 {
        poll.tick().await;
        for msg in drain_socket(&sock) {
            if msg.lines().any(|l| l == "READY=1") {
                assert!(ready_at.is_none(), "READY=1 twice: {seen:?}");
                // Told as soon as readiness first held: /readyz agrees. Within a moment, not at
                // once: n3 is the preferred leader of three shards, and their hand-back to it (as
                // soon as it has caught up, about when it turns ready) leaves each leaderless for
                // a few milliseconds, which /readyz reports.
                eventually(Duration::from_millis(1_000), "/readyz to agree with READY=1", || async {
                    let r = http.get(format!("{url}/readyz")).send().await.expect("readyz");
                    (r.status().as_u16() == 200).then_some(())
                })
                .await;
                ready_at = Some(started.elapsed());
            }
            if msg.lines().any(|l| l == "WATCHDOG=1") {
                watchdogs += 1;
            }
            seen.push(msg);
        }
        if started.elapsed() > Duration::from_secs(60) {
            tc.dump_logs();
            panic!("no READY=1 and two WATCHDOG=1 within 60 s; got {seen:?}");
        }
    }
    tc.lc.signal(2, libc::SIGTERM);
    eventually(Duration::from_secs(10), "STOPPING=1 after SIGTERM", || {
        let msgs = drain_socket(&sock);
        seen.extend(msgs.iter().cloned());
        async move { msgs.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")).then_some(()) }
    })
    .await;
    let exit = eventually(Duration::from_secs(30), "n3 exits after its drain", || {
        let e = tc.lc.exited();
        async move { e }
    })
    .await;
    assert_eq!(exit.0, 2);
    assert!(exit.1.contains("exit status: 0"), "{exit:?}");
    let after = drain_socket(&sock);
    assert!(after.iter().chain(seen.iter()).any(|m| m.contains("STATUS=stopped")), "{after:?}");
    tc.lc.stop_all();
}
