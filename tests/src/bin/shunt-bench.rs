//! Benchmarks against the direct path (and HAProxy and nginx with `--peers`);
//! `cargo xtask bench` builds and runs it as root.

use std::path::PathBuf;

use clap::Parser;
use shunt_tests::bench::{self, Plan};

#[derive(Parser)]
#[command(name = "shunt-bench")]
struct Cli {
    /// One round of each workload, 2 s per measurement.
    #[arg(long)]
    quick: bool,
    /// Also measure HAProxy and nginx (installed from Debian's packages).
    #[arg(long)]
    peers: bool,
    /// Run only the workloads whose name contains this (e.g. `gRPC`, `idle`).
    #[arg(long)]
    only: Option<String>,
    /// Rounds per workload, overriding the default (3, or 1 with `--quick`).
    #[arg(long)]
    rounds: Option<u32>,
    /// Where to write results.json and results.md.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    if cli.peers && !bench::peers::available() {
        eprintln!(
            "error: --peers needs haproxy and nginx: run `cargo xtask bench --peers`, which installs them"
        );
        std::process::exit(1);
    }
    if let Err(e) = shunt_tests::interrupts::clean_up_on_signal() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    let mut plan = Plan::new(cli.quick, cli.peers);
    plan.only = cli.only;
    if let Some(rounds) = cli.rounds {
        plan.rounds = rounds.max(1);
    }
    if let Err(e) = bench::run_all(&plan, &cli.out) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
