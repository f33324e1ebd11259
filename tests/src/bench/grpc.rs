//! Unary gRPC: 3 tonic greeters behind the direct path, shunt, HAProxy and nginx. The load
//! generator is `shunt-greeter load` (closed loop for calls/s, open loop for latency); `h2load`
//! with gRPC headers cross-checks calls/s.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{Context, ensure};
use serde::Deserialize;

use super::{
    Plan,
    peers::{self, Peer},
    process::{tree_cpu_seconds, tree_peak_rss_mib},
    report::{Row, Section, column},
};
use crate::{
    daemon::{Daemon, Options},
    fixture, grpc,
    sandbox::{Pod, Sandbox},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const PORT: u16 = 50051;
const CONNECTIONS: usize = 2;
const STREAMS: usize = 16;

/// One target: where the client connects from and to, and the proxy process (if any).
pub(super) struct Target<'a> {
    pub(super) name: String,
    pub(super) pod: &'a Pod,
    pub(super) to: Vec<SocketAddr>,
    pub(super) proxy_pid: Option<u32>,
}

#[derive(Deserialize)]
pub(super) struct LoadReport {
    pub(super) ok: u64,
    pub(super) calls_per_second: f64,
    pub(super) p50_us: f64,
    pub(super) p99_us: f64,
    by_backend: std::collections::BTreeMap<String, u64>,
    pub(super) errors: std::collections::BTreeMap<String, u64>,
    pub(super) first_error: Option<String>,
}

#[derive(Default)]
struct Tally {
    rates: Vec<f64>,
    h2load_rates: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    cpu_per_10k: Vec<f64>,
    by_backend: std::collections::BTreeMap<String, u64>,
}

pub fn unary(plan: &Plan) -> anyhow::Result<Section> {
    crate::require_root()?;
    let sandbox = Sandbox::new()?;
    let direct = sandbox.add_pod("direct")?;
    let client = sandbox.add_pod("client")?;
    let backends = grpc::tonic_greeters(&sandbox, 3, PORT)?;
    let options = Options {
        log: Some("info"),
        ..fixture::service("greeter", SocketAddr::new(VIP.into(), PORT), &backends)
    };
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;
    let shunt_pid = daemon.pid()?;

    let mut targets = vec![
        Target {
            name: "direct (one backend)".into(),
            pod: &direct,
            to: vec![backends[0]],
            proxy_pid: None,
        },
        Target {
            name: "direct (client-side round-robin)".into(),
            pod: &direct,
            to: backends.clone(),
            proxy_pid: None,
        },
        Target {
            name: "shunt".into(),
            pod: &client,
            to: vec![SocketAddr::new(VIP.into(), PORT)],
            proxy_pid: Some(shunt_pid),
        },
    ];
    let mut notes = Vec::new();
    let mut running_peers: Vec<Peer> = Vec::new();
    if plan.peers {
        running_peers.push(peers::haproxy_grpc(&sandbox, &direct, 10001, &backends)?);
        running_peers.push(peers::nginx_grpc(&sandbox, &direct, 10002, &backends)?);
    } else {
        notes.push(peers::SKIPPED.to_string());
    }
    for peer in &running_peers {
        targets.push(Target {
            name: peer.name.into(),
            pod: &direct,
            to: vec![peer.listen],
            proxy_pid: Some(peer.pid),
        });
    }

    let mut tallies: Vec<Tally> = targets.iter().map(|_| Tally::default()).collect();
    for round in 1..=plan.rounds {
        println!("  round {round}/{}", plan.rounds);
        for (target, tally) in targets.iter().zip(tallies.iter_mut()) {
            measure(&sandbox, target, tally, plan)?;
        }
    }

    let mut section = Section::new(
        "grpc_unary",
        format!(
            "Unary gRPC, 3 tonic backends, {CONNECTIONS} connections × {STREAMS} calls in flight; latency at {} calls/s",
            plan.grpc_rate
        ),
        vec![
            column("calls_per_second", "calls/s", 0),
            column("vs_direct", "vs direct", 2),
            column("h2load_calls_per_second", "h2load calls/s", 0),
            column("p50_ms", "p50 (ms)", 2),
            column("p99_ms", "p99 (ms)", 2),
            column("added_p99_ms", "added p99 (ms)", 2),
            column("cpu_s_per_10k", "proxy CPU (s / 10k calls)", 3),
            column("peak_rss_mib", "proxy peak RSS (MiB)", 1),
            column("split", "calls per backend (%)", 0),
        ],
    );
    let direct_rate = mean(&tallies[0].rates);
    let direct_p99 = mean(&tallies[0].p99);
    for (target, tally) in targets.iter().zip(&tallies) {
        let mut row = Row::new(&target.name);
        let rate = mean(&tally.rates);
        row.set("calls_per_second", rate)
            .set("vs_direct", rate / direct_rate)
            .set("h2load_calls_per_second", mean_of_some(&tally.h2load_rates))
            .set("p50_ms", mean(&tally.p50) / 1000.0)
            .set("p99_ms", mean(&tally.p99) / 1000.0)
            .text("split", split(&tally.by_backend));
        if let Some(pid) = target.proxy_pid {
            row.set("added_p99_ms", (mean(&tally.p99) - direct_p99) / 1000.0)
                .set("cpu_s_per_10k", mean(&tally.cpu_per_10k))
                .set("peak_rss_mib", tree_peak_rss_mib(pid));
        }
        section.rows.push(row);
    }
    for peer in ["HAProxy", "nginx"] {
        if let (Some(cpu), Some(rate), Some(p99)) = (
            section.ratio("cpu_s_per_10k", "shunt", peer),
            section.ratio("calls_per_second", "shunt", peer),
            section.ratio("added_p99_ms", "shunt", peer),
        ) {
            notes.push(format!(
                "shunt / {peer}: calls/s {rate:.2}, CPU per call {cpu:.2}, added p99 {p99:.2}."
            ));
        }
    }
    section.notes = notes;
    Ok(section)
}

fn measure(
    sandbox: &Sandbox,
    target: &Target<'_>,
    tally: &mut Tally,
    plan: &Plan,
) -> anyhow::Result<()> {
    let cpu = || target.proxy_pid.map(tree_cpu_seconds).transpose();
    let before = cpu()?;
    let closed = load(sandbox, target, plan, None)?;
    let after = cpu()?;
    if let (Some(before), Some(after)) = (before, after) {
        tally
            .cpu_per_10k
            .push((after - before) / closed.ok as f64 * 10_000.0);
    }
    tally.rates.push(closed.calls_per_second);
    for (backend, n) in closed.by_backend {
        *tally.by_backend.entry(backend).or_default() += n;
    }
    let open = load(sandbox, target, plan, Some(plan.grpc_rate))?;
    tally.p50.push(open.p50_us);
    tally.p99.push(open.p99_us);
    // h2load speaks to one authority: it has no client-side balancing to cross-check.
    let h2load = if target.to.len() == 1 {
        let rate = h2load(sandbox, target, plan)?;
        tally.h2load_rates.push(rate);
        format!("{rate:7.0}")
    } else {
        "      -".to_string()
    };
    println!(
        "    {:34} {:7.0} calls/s (h2load {h2load}), p50 {:5.2} ms, p99 {:5.2} ms at {}/s",
        target.name,
        closed.calls_per_second,
        open.p50_us / 1000.0,
        open.p99_us / 1000.0,
        plan.grpc_rate
    );
    Ok(())
}

pub(super) fn load(
    sandbox: &Sandbox,
    target: &Target<'_>,
    plan: &Plan,
    rate: Option<u32>,
) -> anyhow::Result<LoadReport> {
    let report = load_allowing_errors(sandbox, target, plan, rate)?;
    ensure!(
        report.errors.is_empty(),
        "calls to {} failed: {:?} (first: {:?})",
        target.name,
        report.errors,
        report.first_error
    );
    Ok(report)
}

/// As [`load`], but failed calls are left in the report for the caller to judge: the churn
/// workload reports them rather than losing the rounds measured so far.
pub(super) fn load_allowing_errors(
    sandbox: &Sandbox,
    target: &Target<'_>,
    plan: &Plan,
    rate: Option<u32>,
) -> anyhow::Result<LoadReport> {
    let to: Vec<String> = target.to.iter().map(ToString::to_string).collect();
    let mut cmd = Command::new(crate::greeter_bin());
    cmd.args([
        "load",
        "--to",
        &to.join(","),
        "--connections",
        &CONNECTIONS.to_string(),
        "--streams",
        &STREAMS.to_string(),
        "--seconds",
        &plan.seconds.to_string(),
    ]);
    if let Some(rate) = rate {
        cmd.args(["--rate", &rate.to_string()]);
    }
    let out = sandbox.run_in_pod(
        target.pod,
        cmd,
        Duration::from_secs(u64::from(plan.seconds) + 60),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "load generator against {} failed: {stdout}{}",
        target.name,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("load generator printed {stdout:?}"))
}

/// h2load's calls/s for SayHello with gRPC headers and a framed request body.
fn h2load(sandbox: &Sandbox, target: &Target<'_>, plan: &Plan) -> anyhow::Result<f64> {
    let body = sandbox.scratch_dir("h2load")?.join("say-hello.grpc");
    // gRPC frame: uncompressed, length 7, HelloRequest { name: "probe" }.
    std::fs::write(&body, b"\x00\x00\x00\x00\x07\x0a\x05probe")?;
    let mut cmd = Command::new("h2load");
    cmd.args([
        "-D",
        &plan.seconds.to_string(),
        "-c",
        &CONNECTIONS.to_string(),
        "-m",
        &STREAMS.to_string(),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-d",
    ])
    .arg(&body);
    for to in &target.to {
        cmd.arg(format!("http://{to}/helloworld.Greeter/SayHello"));
    }
    let out = sandbox.run_in_pod(
        target.pod,
        cmd,
        Duration::from_secs(u64::from(plan.seconds) + 60),
    )?;
    let report = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "h2load against {}: {report}",
        target.name
    );
    let failed = report
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(", ").find(|p| p.ends_with(" failed")))
        .and_then(|p| p.trim_end_matches(" failed").parse::<u64>().ok());
    ensure!(
        failed == Some(0),
        "h2load against {}: requests failed: {report}",
        target.name
    );
    report
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.trim_end_matches(" req/s").parse::<f64>().ok())
        .with_context(|| format!("no req/s in h2load's report: {report}"))
}

/// The mean, or NaN (left out of the table) when nothing was measured.
fn mean_of_some(values: &[f64]) -> f64 {
    if values.is_empty() {
        f64::NAN
    } else {
        mean(values)
    }
}

pub(super) fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// "33/33/34": each backend's share of the calls, in percent, in backend-name order.
fn split(by_backend: &std::collections::BTreeMap<String, u64>) -> String {
    let total: u64 = by_backend.values().sum();
    by_backend
        .values()
        .map(|n| format!("{:.0}", *n as f64 * 100.0 / total.max(1) as f64))
        .collect::<Vec<_>>()
        .join("/")
}
