//! Benchmarks in the sandbox (`cargo xtask bench`). Every figure is measured in the same run
//! as the direct path it is compared with, rounds interleaved so drift hits all targets alike;
//! results are printed as they come and written as JSON and markdown, with SVG charts of some
//! of them ([`charts`]).

pub mod charts;
mod churn;
mod connections;
mod fast_path;
mod grpc;
mod idle;
mod passthrough;
pub mod peers;
pub mod process;
pub mod report;
mod streaming;

pub use process::cpu_seconds;

use std::path::Path;

use anyhow::Context;

use self::report::{Machine, Results, Section};

pub struct Plan {
    pub rounds: u32,
    pub seconds: u32,
    /// Measure HAProxy and nginx too (they must be installed).
    pub peers: bool,
    /// The fixed rate (calls/s) at which gRPC latency is measured: below every target's
    /// saturation on a small machine.
    pub grpc_rate: u32,
    pub idle_connections: u32,
    pub quick: bool,
    /// Run only the workloads whose name contains this.
    pub only: Option<String>,
}

impl Plan {
    pub fn new(quick: bool, peers: bool) -> Plan {
        Plan {
            rounds: if quick { 1 } else { 3 },
            seconds: if quick { 2 } else { 5 },
            peers,
            grpc_rate: 1000,
            idle_connections: 10_000,
            quick,
            only: None,
        }
    }
}

type Workload = fn(&Plan) -> anyhow::Result<Section>;

const WORKLOADS: [(&str, Workload); 8] = [
    ("unary gRPC", grpc::unary),
    ("gRPC over many connections", grpc::many_connections),
    ("streaming gRPC", streaming::streaming),
    (
        "connection churn, then closed loop",
        churn::churn_then_closed_loop,
    ),
    ("TCP passthrough (iperf3)", passthrough::iperf3),
    ("connection setup", connections::setup_rates),
    ("memory per idle connection", idle::memory_per_connection),
    ("local fast path", fast_path::on_and_off),
];

/// Runs every workload, printing progress and each table, then writes `results.json`,
/// `results.md` and the charts of the sections that ran into `out_dir`.
pub fn run_all(plan: &Plan, out_dir: &Path) -> anyhow::Result<Results> {
    let mut results = Results {
        date: today(),
        quick: plan.quick,
        machine: Machine::describe(),
        sections: Vec::new(),
    };
    println!("machine: {}", results.machine.summary());
    for (i, (name, workload)) in WORKLOADS.iter().enumerate() {
        if plan
            .only
            .as_ref()
            .is_some_and(|only| !name.contains(only.as_str()))
        {
            continue;
        }
        println!("[{}/{}] {name}", i + 1, WORKLOADS.len());
        let section = workload(plan).with_context(|| format!("benchmark {name:?}"))?;
        println!("\n{}", section.markdown());
        results.sections.push(section);
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let json = out_dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)?;
    let markdown = out_dir.join("results.md");
    std::fs::write(&markdown, results.markdown())?;
    println!(
        "results written to {} and {}",
        json.display(),
        markdown.display()
    );
    for chart in charts::write_all(&results.sections, out_dir)? {
        println!("chart written to {}", chart.display());
    }
    Ok(results)
}

/// Today's date (UTC) as YYYY-MM-DD.
pub fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown date".into(), |d| d.trim().to_owned())
}
