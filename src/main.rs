//! `bulkhead`: parses the command line and wires the pieces; nothing else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bulkhead", version, about = "A fault-isolated order system on a small cluster of nodes")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node from a config file (bare metal; see deploy/).
    Node {
        #[arg(long)]
        config: PathBuf,
    },
    /// Start a local 3-node cluster on 127.0.0.1 with a seeded catalog; Ctrl-C stops it.
    Demo {
        #[arg(long, default_value = "./bulkhead-data")]
        data_dir: PathBuf,
        /// HTTP port of n1 (n2 and n3 use the next two).
        #[arg(long, default_value_t = 8080)]
        http_port: u16,
        /// Cluster port of n1 (n2 and n3 use the next two).
        #[arg(long, default_value_t = 7101)]
        cluster_port: u16,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ractor=warn,ractor_cluster=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Node { config } => {
            init_logging();
            match bulkhead_cluster::NodeConfig::load(&config) {
                Ok(cfg) => bulkhead::node::run(cfg).await,
                Err(e) => Err(e),
            }
        }
        Cmd::Demo { data_dir, http_port, cluster_port } => {
            let opts = bulkhead::demo::DemoOptions { data_dir, http_port, cluster_port };
            bulkhead::demo::run(opts, &mut std::io::stdout()).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead: {e}");
            ExitCode::FAILURE
        }
    }
}
