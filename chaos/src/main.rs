//! `bulkhead-chaos`: the chaos tool (launch or attach a cluster, inject faults, drive load, check
//! the invariants, write a verdict and a plot).
//!
//! Only the crate and its scenario folder exist so far; the tool itself is the next piece of work
//! (fault isolation). Until then it says so, and exits non-zero so no script mistakes it for a pass.

fn main() -> std::process::ExitCode {
    eprintln!("bulkhead-chaos: not built yet; see chaos/scenarios/README.md. For now, faults are exercised by `cargo test --workspace` (tests/faults.rs).");
    std::process::ExitCode::from(2)
}
