//! The dashboard in a real browser. Debian's chromium, headless, opens the page a three-node
//! cluster serves and is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
//! no port, no websocket, no extra crate). The test reads the rendered page while orders flow and
//! while a node is cut off, runs the page's own logic tests (`tests/dashboard_logic.js`) in it,
//! and saves a screenshot to `<target dir>/dashboard.png`.
//!
//! Without chromium the test is skipped with a loud message, unless `BULKHEAD_REQUIRE_BROWSER=1`
//! (CI sets it, `.ci/run` installs chromium) makes that a failure. Chromium and every process it
//! starts are killed and reaped when the test ends, also when it fails.

mod common;

use std::io::{BufRead, BufReader, PipeWriter, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::{eventually, start};
use serde_json::{json, Value};

const CHROMIUM: &[&str] = &["/usr/bin/chromium", "/usr/bin/chromium-browser"];
const WIDTH: u32 = 1400;
const HEIGHT: u32 = 1000;

/// The browser (`BULKHEAD_CHROMIUM`, else Debian's), or `None` (after saying so loudly) when it
/// is missing and not required.
fn chromium_or_skip() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("BULKHEAD_CHROMIUM") {
        Some(p) => vec![PathBuf::from(p)],
        None => CHROMIUM.iter().map(PathBuf::from).collect(),
    };
    if let Some(p) = candidates.iter().find(|p| p.exists()) {
        return Some(p.clone());
    }
    let required = std::env::var("BULKHEAD_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
    assert!(!required, "BULKHEAD_REQUIRE_BROWSER=1 but no chromium at {candidates:?} (apt-get install chromium)");
    loud(&format!(
        "\n!!!!!!!!!!\n!!! SKIPPED tests/dashboard.rs: no chromium at {candidates:?}; `apt-get install chromium` to run it\n!!!!!!!!!!"
    ));
    None
}

/// To stderr past the test harness' capture (it takes only `print!`/`eprint!`): a skip and the
/// screenshot's path are seen in a plain `cargo test` too.
fn loud(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Headless chromium in its own process group, spoken to over the DevTools pipe (fd 3 in, fd 4
/// out, NUL-terminated JSON messages).
struct Browser {
    child: Child,
    to_browser: Mutex<PipeWriter>,
    from_browser: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Value>>,
    next_id: AtomicU64,
    log: PathBuf,
    /// The profile and the log; removed after `drop` has killed the browser.
    _dir: tempfile::TempDir,
}

impl Browser {
    fn launch(exe: &Path) -> Browser {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("chromium.log");
        let (commands, to_browser) = std::io::pipe().expect("pipe");
        let (from_browser, answers) = std::io::pipe().expect("pipe");
        let mut cmd = Command::new("sh");
        // The pipe ends go in as stdin/stdout and a shell moves them to fds 3 and 4, where
        // chromium expects them; then it becomes chromium (exec), the leader of a new group.
        cmd.arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg(exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                // The closed network refuses these connections; without the flags chromium keeps trying.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--hide-scrollbars",
                "--mute-audio",
                "--remote-debugging-pipe",
                &format!("--window-size={WIDTH},{HEIGHT}"),
                &format!("--user-data-dir={}", dir.path().join("profile").display()),
                "about:blank",
            ])
            // Its singleton socket goes under TMPDIR: here, so it goes with the profile.
            .env("TMPDIR", dir.path())
            .stdin(Stdio::from(commands))
            .stdout(Stdio::from(answers))
            .stderr(std::fs::File::create(&log).expect("chromium log"))
            .process_group(0);
        let child = cmd.spawn().expect("start chromium");
        // Our copies of the child's ends go, so the reader sees EOF when chromium exits.
        drop(cmd);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(from_browser);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if buf.last() == Some(&0) {
                            buf.pop();
                        }
                        if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                            if tx.send(v).is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        Browser {
            child,
            to_browser: Mutex::new(to_browser),
            from_browser: tokio::sync::Mutex::new(rx),
            next_id: AtomicU64::new(1),
            log,
            _dir: dir,
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(30).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// One DevTools command (to the browser, or to a page's `session`); its result.
    async fn send(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        match self.try_send(session, method, params).await {
            Ok(v) => v,
            Err(e) => panic!("{method}: {e}"),
        }
    }

    /// As [`Browser::send`], with the protocol's error (e.g. a page navigating away) as `Err`.
    async fn try_send(&self, session: Option<&str>, method: &str, params: Value) -> Result<Value, Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(0);
        let mut answers = self.from_browser.lock().await;
        self.to_browser.lock().expect("pipe lock").write_all(&bytes).expect("write to chromium");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let msg = match tokio::time::timeout_at(deadline, answers.recv()).await {
                Ok(Some(m)) => m,
                Ok(None) => panic!("chromium exited during {method}; its log:\n{}", self.log_tail()),
                Err(_) => panic!("chromium did not answer {method} within 30 s; its log:\n{}", self.log_tail()),
            };
            // Events (no id) and nothing else come in between: the calls are one at a time.
            if msg["id"] == id {
                return match msg.get("error") {
                    Some(e) => Err(e.clone()),
                    None => Ok(msg["result"].clone()),
                };
            }
        }
    }

    /// A new tab at `url`, with a viewport of WIDTH × HEIGHT.
    async fn open(&self, url: &str) -> Page<'_> {
        let target = self.send(None, "Target.createTarget", json!({"url": "about:blank"})).await;
        let target = target["targetId"].as_str().expect("targetId").to_string();
        let attached = self.send(None, "Target.attachToTarget", json!({"targetId": target, "flatten": true})).await;
        let page = Page { browser: self, session: attached["sessionId"].as_str().expect("sessionId").to_string() };
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        page.call("Page.navigate", json!({"url": url})).await;
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: the browser and the renderer, GPU and zygote processes it started.
        let group = self.child.id() as i32;
        // SAFETY: kill(2) on the group of a child we started and have not reaped yet (its leader's
        // pid is still ours, so the group id cannot have been reused).
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

struct Page<'b> {
    browser: &'b Browser,
    session: String,
}

impl Page<'_> {
    async fn call(&self, method: &str, params: Value) -> Value {
        self.browser.send(Some(&self.session), method, params).await
    }

    /// The value of a JavaScript expression in the page (promises awaited).
    async fn eval(&self, expression: &str) -> Value {
        match self.try_eval(expression).await {
            Ok(v) => v,
            Err(e) => panic!("{expression}: {e}"),
        }
    }

    /// As [`Page::eval`], with an exception or a protocol error as `Err`.
    async fn try_eval(&self, expression: &str) -> Result<Value, Value> {
        let params = json!({"expression": expression, "returnByValue": true, "awaitPromise": true});
        let r = self.browser.try_send(Some(&self.session), "Runtime.evaluate", params).await?;
        match r.get("exceptionDetails") {
            Some(e) => Err(e.clone()),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    /// Waits until `expression` is true in the page; while it loads, an evaluation may fail.
    async fn wait_for(&self, timeout: Duration, what: &str, expression: &str) {
        eventually(timeout, what, || async { (self.try_eval(expression).await == Ok(json!(true))).then_some(()) })
            .await;
    }

    /// A number a chart carries in `data-<attr>` (NaN when empty).
    async fn chart(&self, key: &str, attr: &str) -> f64 {
        let v = self
            .eval(&format!(r#"Number(document.querySelector('.chart[data-key="{key}"]').dataset.{attr} || NaN)"#))
            .await;
        v.as_f64().unwrap_or(f64::NAN)
    }

    async fn readings(&self) -> u64 {
        self.eval("Number(document.getElementById('flow').dataset.samples)").await.as_u64().unwrap_or(0)
    }

    /// Waits until the page has taken `n` more readings of /metrics.
    async fn readings_later(&self, n: u64) {
        let before = self.readings().await;
        eventually(Duration::from_secs(10), "the page takes new readings", || async {
            (self.readings().await >= before + n).then_some(())
        })
        .await;
    }

    async fn screenshot(&self) -> Vec<u8> {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"})).await;
        base64_decode(shot["data"].as_str().expect("screenshot data"))
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = s.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()).map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, d)| n | u32::from(*d) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// Where the screenshot goes: the target dir (`CARGO_TARGET_TMPDIR` is its `tmp/`).
fn screenshot_path() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("dashboard.png")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_nodes_shards_failovers_and_moving_order_numbers_in_a_real_browser() {
    let Some(exe) = chromium_or_skip() else { return };
    let tc = start().await;
    tc.stock("dash-1", 1_000_000, 250).await;
    let token = tc.lc.secrets().admin_token().expect("admin token");
    let browser = Browser::launch(&exe);

    // The token comes in the fragment, lands in sessionStorage and leaves the address bar.
    let page = browser.open(&format!("{}/#token={token}", tc.url(0))).await;
    page.wait_for(
        Duration::from_secs(20),
        "the page took the token",
        "sessionStorage.getItem('bulkhead-token') !== null",
    )
    .await;
    assert_eq!(page.eval("location.hash").await, json!(""));
    assert_eq!(page.eval("sessionStorage.getItem('bulkhead-token')").await, json!(token));
    // ... and stays there: the page loaded again without it still reads the cluster.
    page.eval("window.beforeReload = true").await;
    page.call("Page.navigate", json!({"url": format!("{}/", tc.url(0))})).await;

    // Three nodes up, seen by the node serving the page; every shard has a leader.
    page.wait_for(
        Duration::from_secs(20),
        "the page shows three nodes up",
        r#"window.beforeReload === undefined
           && document.querySelectorAll('#nodes [data-status="up"]').length === 3
           && document.getElementById('summary').dataset.up === '3'
           && document.getElementById('summary').textContent === '3 of 3 nodes up'"#,
    )
    .await;
    let shards = page.eval("[...document.querySelectorAll('#shards tr[data-group]')].map(r => [r.dataset.group, r.children[1].textContent])").await;
    let shards = shards.as_array().expect("shard rows").clone();
    assert!(shards.len() >= 5, "{shards:?}");
    assert!(
        shards.iter().all(|r| r[1].as_str().is_some_and(|l| l.starts_with('n'))),
        "a shard without a leader: {shards:?}"
    );
    let breakers = page.eval("document.querySelectorAll('#caps tr[data-breaker=\"closed\"]').length").await;
    assert_eq!(breakers, json!(5), "every capability's breakers closed");

    // The page's pure logic against fixtures (the Prometheus parser, rates, the p99, failovers).
    let failures = page.eval(include_str!("dashboard_logic.js")).await;
    assert_eq!(failures, json!([]), "the dashboard's logic tests failed");

    // Orders at the node serving the page: its counters and plots move.
    page.readings_later(2).await;
    let placed_before = page.chart("placed", "total").await;
    let confirmed_before = page.chart("confirmed", "total").await;
    let cancelled_before = page.chart("cancelled", "total").await;
    let pending_before = page.chart("pending", "total").await;
    assert!(placed_before.is_finite(), "the page shows a placed total before any order");
    let mut answered = std::collections::HashMap::<u16, u64>::new();
    for (round, n) in [3, 6, 9, 5, 7, 4].into_iter().enumerate() {
        let mut orders = Vec::new();
        for i in 0..n {
            orders.push(if i == 0 { "tok_decline" } else { "tok_ok" });
        }
        if round == 2 {
            orders.push("tok_slow");
        }
        let replies = futures::future::join_all(orders.iter().map(|t| tc.order(0, None, "dash-1", 1, t))).await;
        for r in replies {
            assert!(matches!(r.status, 201 | 202 | 402), "{} {}", r.status, r.body);
            *answered.entry(r.status).or_default() += 1;
        }
        page.readings_later(2).await;
    }
    let count = |s: u16| answered.get(&s).copied().unwrap_or(0) as f64;
    page.readings_later(1).await;
    let placed = page.chart("placed", "total").await;
    assert!(
        placed >= placed_before + count(201) + count(202) + count(402),
        "placed {placed_before} → {placed}, answers {answered:?}"
    );
    assert!(page.chart("confirmed", "total").await >= confirmed_before + count(201), "confirmed did not move");
    assert!(page.chart("cancelled", "total").await >= cancelled_before + count(402), "cancelled did not move");
    assert!(page.chart("pending", "total").await >= pending_before + count(202), "pending did not move");
    for key in ["placed", "confirmed", "cancelled"] {
        assert!(page.chart(key, "max").await > 0.0, "the {key}/s plot stayed flat");
    }
    // The p99 is there when the node exports the latency histogram, and "—" when it does not.
    let metrics = tc.http.get(format!("{}/metrics", tc.url(0))).send().await.expect("metrics");
    let metrics = metrics.text().await.expect("metrics text");
    let histogram = metrics.lines().any(|l| {
        l.starts_with("bulkhead_http_request_duration_seconds_bucket{")
            && l.contains(r#"method="POST""#)
            && l.contains(r#"route="/v1/orders""#)
    });
    let p99_text = page.eval(r#"document.querySelector('.chart[data-key="p99"] .chart-now').textContent"#).await;
    // Every node exports the latency histogram (its "—" case is covered by the page's logic tests).
    assert!(histogram, "n1's /metrics has no POST /v1/orders latency histogram");
    assert!(page.chart("p99", "now").await > 0.0, "a histogram, but no p99: {p99_text}");

    // Cut n3 off: the page sees it down and a shard it led move to another node (a failover);
    // healed, three nodes are up again. First n3 must lead something (it prefers orders/1,
    // shipping and notifications; leadership may still be on its way back after the start).
    page.wait_for(
        Duration::from_secs(20),
        "the page shows n3 leading a shard",
        "[...document.querySelectorAll('#shards tr[data-group]')].some(r => r.children[1].textContent === 'n3')",
    )
    .await;
    let cut = tc.post(2, "/admin/partition", None, json!({})).await;
    assert_eq!(cut.status, 202, "{}", cut.body);
    page.wait_for(
        Duration::from_secs(20),
        "the page shows n3 down and a failover away from n3",
        r#"document.querySelector('#nodes [data-node="n3"]').dataset.status !== 'up'
           && document.getElementById('summary').dataset.up === '2'
           && document.querySelectorAll('#failovers li[data-from="n3"]').length > 0"#,
    )
    .await;
    let heal = tc.delete(2, "/admin/partition").await;
    assert_eq!(heal.status, 202, "{}", heal.body);
    page.wait_for(
        Duration::from_secs(30),
        "the page shows three nodes up again",
        r#"document.querySelectorAll('#nodes [data-status="up"]').length === 3
           && document.getElementById('summary').dataset.up === '3'"#,
    )
    .await;
    // Orders flow again after the heal (also so the screenshot shows them). Leadership may still
    // be moving back to the preferred nodes: a key is retried until its order confirms.
    let tc = &tc;
    for (round, n) in [4, 8].into_iter().enumerate() {
        futures::future::join_all((0..n).map(|i| async move {
            let key = format!("dash-healed-{round}-{i}");
            eventually(Duration::from_secs(20), "an order confirms after the heal", || async {
                (tc.order(0, Some(&key), "dash-1", 1, "tok_ok").await.status == 201).then_some(())
            })
            .await
        }))
        .await;
        page.readings_later(2).await;
    }

    let png = page.screenshot().await;
    let path = screenshot_path();
    std::fs::write(&path, &png).expect("write the screenshot");
    loud(&format!("dashboard screenshot: {}", path.display()));
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let dim = |at: usize| u32::from_be_bytes([png[at], png[at + 1], png[at + 2], png[at + 3]]);
    assert_eq!((dim(16), dim(20)), (WIDTH, HEIGHT), "screenshot size");
    // A blank or unstyled page compresses to a few KB; the dashboard with its plots does not.
    assert!(png.len() > 40_000, "a {} byte screenshot is suspiciously plain", png.len());
}
