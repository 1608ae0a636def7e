//! `bulkhead-chaos run SCENARIO --report-dir DIR`: runs a chaos scenario and exits 0 when every
//! invariant held, 1 when one was violated, 2 when the run itself could not be done.

use std::path::PathBuf;
use std::process::ExitCode;

use bulkhead_chaos::run::{run, RunOptions};
use bulkhead_chaos::scenario::RemoteNode;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bulkhead-chaos", about = "Inject faults into a Bulkhead cluster under load and check the invariants")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a scenario file and write verdict.json + timeline.svg into the report directory.
    Run {
        scenario: PathBuf,
        #[arg(long, default_value = "chaos-report")]
        report_dir: PathBuf,
        /// The node binary for a local cluster (default: next to this binary).
        #[arg(long)]
        bulkhead: Option<PathBuf>,
        /// Attach to a running cluster instead: `n1=http://10.0.0.11:8080,n2=...`.
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// With --nodes: the file holding the cluster's admin token (mode 0600).
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
    },
}

fn parse_nodes(list: &[String]) -> Result<Vec<RemoteNode>, String> {
    list.iter()
        .map(|s| {
            let (name, http) =
                s.split_once('=').ok_or_else(|| format!("`{s}`: write each node as name=http://host:port"))?;
            Ok(RemoteNode { name: name.trim().to_string(), http: http.trim().to_string() })
        })
        .collect()
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,bulkhead_chaos=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let Cmd::Run { scenario, report_dir, bulkhead, nodes, quiet, admin_token_file } = Cli::parse().cmd;
    let nodes = match parse_nodes(&nodes) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("bulkhead-chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulkhead-chaos: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let opts =
        RunOptions { scenario, report_dir: report_dir.clone(), bulkhead, nodes, progress: !quiet, admin_token_file };
    // Ctrl-C or SIGTERM drops the run, and with it the local cluster (its nodes are killed).
    let outcome = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
        tokio::select! {
            r = run(opts) => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted (Ctrl-C): no verdict".to_string()),
            _ = term.recv() => Err("terminated (SIGTERM): no verdict".to_string()),
        }
    });
    match outcome {
        Ok(report) => {
            // A closed stdout (`| head`) must not turn a verdict into a panic.
            use std::io::Write;
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{}", bulkhead_chaos::report::summary(&report));
            let _ =
                writeln!(out, "report: {}/verdict.json, {}/timeline.svg", report_dir.display(), report_dir.display());
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("bulkhead-chaos: {e}");
            ExitCode::from(2)
        }
    }
}
