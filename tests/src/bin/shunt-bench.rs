//! Benchmarks against the direct path; `cargo xtask bench` builds and runs it as root.

use clap::Parser;
use shunt_tests::bench::{self, Plan};

#[derive(Parser)]
#[command(name = "shunt-bench")]
struct Cli {
    /// Fewer and shorter rounds.
    #[arg(long)]
    quick: bool,
}

fn main() {
    let cli = Cli::parse();
    let plan = if cli.quick {
        Plan {
            rounds: 1,
            seconds: 2,
        }
    } else {
        Plan {
            rounds: 3,
            seconds: 5,
        }
    };
    let (rounds, seconds) = (plan.rounds, plan.seconds);
    println!("TCP passthrough (iperf3, one connection), {rounds} rounds of {seconds}s:");
    report(bench::passthrough(&plan));
    println!("HTTP/2 requests (h2load, one connection, 32 concurrent streams), {rounds} rounds:");
    report(bench::http2_requests(&plan));
    println!("Connection setup (probe: connect, one line each way, close), {rounds} rounds:");
    report(bench::connection_rates(&plan));
}

fn report(result: anyhow::Result<String>) {
    match result {
        Ok(table) => println!("\n{table}"),
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            std::process::exit(1);
        }
    }
}
