//! Benchmarks against the direct path; `cargo xtask bench` builds and runs it as root.

use clap::Parser;

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
        shunt_tests::bench::Plan {
            rounds: 1,
            seconds: 2,
        }
    } else {
        shunt_tests::bench::Plan {
            rounds: 3,
            seconds: 5,
        }
    };
    println!(
        "TCP passthrough (iperf3, one connection), {} rounds of {}s:",
        plan.rounds, plan.seconds
    );
    match shunt_tests::bench::passthrough(&plan) {
        Ok(table) => println!("\n{table}"),
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            std::process::exit(1);
        }
    }
}
