//! The `smoke` scenario, end to end, as CI runs it: the real `bulkhead-chaos` binary launches a
//! local three-node cluster of real `bulkhead` processes, injects one fault of each kind under
//! load, and must exit 0 with a passing verdict and a timeline.
//!
//! The node binary is found next to the chaos binary (`target/<profile>/bulkhead`), which
//! `cargo test --workspace` builds; `cargo test -p bulkhead-chaos` alone may not, and then this
//! test says so.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn smoke_scenario_passes_with_a_verdict_and_a_timeline() {
    let chaos = PathBuf::from(env!("CARGO_BIN_EXE_bulkhead-chaos"));
    let node = chaos.with_file_name("bulkhead");
    assert!(
        node.is_file(),
        "{} is missing: build the node binary first (`cargo build -p bulkhead`, or run `cargo test --workspace`)",
        node.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("report");
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios/smoke.toml");
    let mut child = Command::new(&chaos)
        .args(["run", scenario, "--quiet", "--bulkhead"])
        .arg(&node)
        .arg("--report-dir")
        .arg(&report)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start bulkhead-chaos");
    // The scenario ends on its own in about 30 s; past 5 minutes something hangs. A thread waits
    // for the exit; on timeout SIGTERM makes the tool stop its cluster before it exits.
    let pid = child.id();
    let stdout = child.stdout.take();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(s) => s.expect("wait"),
        Err(_) => {
            // SAFETY: kill(2) on our own child; the waiting thread reaps it.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
            let _ = rx.recv_timeout(Duration::from_secs(30));
            panic!("bulkhead-chaos smoke did not finish in 5 minutes");
        }
    };
    let mut out = String::new();
    if let Some(mut s) = stdout {
        use std::io::Read;
        let _ = s.read_to_string(&mut out);
    }
    if !status.success() {
        for n in ["n1", "n2", "n3"] {
            let log = std::fs::read_to_string(report.join(format!("{n}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("----- {n} (last 30 lines) -----\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        panic!("bulkhead-chaos exited {status}:\n{out}");
    }
    let verdict: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("verdict.json")).expect("verdict.json"))
            .expect("verdict.json is JSON");
    assert_eq!(verdict["verdict"], "pass", "{out}");
    assert_eq!(verdict["invariants"].as_array().map(Vec::len), Some(8), "{out}");
    // Every shard's replicas came to one applied index with one state digest.
    let agree = verdict["invariants"].as_array().and_then(|a| a.iter().find(|i| i["name"] == "replicas_agree"));
    let agree = agree.unwrap_or_else(|| panic!("no replicas_agree invariant: {out}"));
    assert!(agree["held"] == true && agree["judged"] == true, "{agree}");
    eprintln!("replicas_agree: {}", agree["detail"]);
    assert!(verdict["totals"]["acknowledged"].as_u64().unwrap_or(0) > 100, "{out}");
    for kind in ["kill", "pause", "partition"] {
        assert!(verdict["detection"][kind]["count"].as_u64() == Some(1), "no {kind} detection: {out}");
    }
    let svg = std::fs::read_to_string(report.join("timeline.svg")).expect("timeline.svg");
    assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "timeline.svg is not an SVG");
}
