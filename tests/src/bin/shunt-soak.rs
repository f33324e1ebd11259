//! The soak: shunt under mixed traffic, endpoint churn, fault rules and a restart for a
//! bounded time; `cargo xtask soak` builds and runs it as root. Exits non-zero unless it
//! passed.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use shunt_tests::soak::{self, Plan};

#[derive(Parser)]
#[command(name = "shunt-soak")]
struct Cli {
    /// How long traffic runs, in minutes (fractions allowed).
    #[arg(long, default_value_t = 10.0, conflicts_with = "seconds")]
    minutes: f64,
    /// How long traffic runs, in seconds (instead of --minutes).
    #[arg(long)]
    seconds: Option<f64>,
    /// Where to write soak.json.
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    let seconds = cli.seconds.unwrap_or(cli.minutes * 60.0);
    let Ok(duration) = Duration::try_from_secs_f64(seconds) else {
        eprintln!("error: --minutes/--seconds must be a positive number, not {seconds}");
        std::process::exit(2);
    };
    if let Err(e) = shunt_tests::interrupts::clean_up_on_signal() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    match soak::run(&Plan { duration }, &cli.out) {
        Ok(report) if report.passed => {}
        Ok(_) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            // Workload threads may still hold the sandbox: remove it before exiting.
            shunt_tests::sandbox::clean_up_all();
            std::process::exit(1);
        }
    }
}
