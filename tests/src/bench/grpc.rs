//! Unary gRPC to 3 tonic greeters: direct (client-side round-robin), shunt, HAProxy and nginx.
//!
//! Each proxy runs with one worker/thread, pinned alone on the last core; the greeters and the
//! load generators share the other cores, so a proxy's CPU per call is its own and not the
//! price of threads contending for two cores. Every client reaches its proxy on its pod's
//! loopback and every proxy its upstreams across the pods' veths, so all targets pay the same
//! hops. Per round and target, rounds interleaved: a closed loop (`shunt-greeter load`, and
//! `h2load` with gRPC headers as a cross-check), latency in open loop at each of [`RATES`]
//! (at least [`CALLS_PER_RATE`] calls each, so p99 rests on 200 samples), and, in the
//! `unary gRPC` workload, new connections per second (TCP + HTTP/2 + one call:
//! `shunt-greeter churn`). Two shapes: a few busy connections, and many connections with a
//! few calls each, as many pods each holding a channel would make.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{Context, ensure};
use serde::Deserialize;

use super::{
    Plan, peers,
    process::{Cpu, on_cpu, reset_peak_rss, tree_cpu_seconds, tree_peak_rss_mib},
    report::{Column, Row, Section, column},
};
use crate::{
    grpc,
    sandbox::{Pod, Sandbox},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const PORT: u16 = 50051;
/// The fixed rates (calls/s) latency is measured at: below every target's saturation on a
/// small machine, one where wake-ups per call dominate and one four times busier.
pub const RATES: [u32; 2] = [1000, 4000];
/// Calls per latency point (full runs): a p99 of 200 samples.
const CALLS_PER_RATE: u32 = 20_000;
/// Short connections per new-connection measurement, made 8 at a time.
const NEW_CONNECTIONS: (usize, usize) = (5_000, 1_000);
const NEW_CONNECTION_CONCURRENCY: usize = 8;

/// Connections and calls in flight of one workload.
pub(super) struct Shape {
    key: &'static str,
    connections: usize,
    streams: usize,
    /// Whether new connections per second are measured too (once is enough).
    new_connections: bool,
}

const FEW_BUSY: Shape = Shape {
    key: "grpc_unary",
    connections: 4,
    streams: 16,
    new_connections: true,
};

const MANY: Shape = Shape {
    key: "grpc_many",
    connections: 64,
    streams: 4,
    new_connections: false,
};

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
    by_backend: BTreeMap<String, u64>,
    pub(super) errors: BTreeMap<String, u64>,
    pub(super) first_error: Option<String>,
}

/// A target's figures over the rounds; each is averaged over the rounds it was measured in.
#[derive(Default)]
struct Tally {
    figures: BTreeMap<&'static str, Vec<f64>>,
    by_backend: BTreeMap<String, u64>,
}

impl Tally {
    fn add(&mut self, key: &'static str, value: f64) {
        self.figures.entry(key).or_default().push(value);
    }

    fn mean(&self, key: &str) -> f64 {
        self.figures.get(key).map_or(f64::NAN, |v| mean(v))
    }
}

/// Column keys of the latency figures at one fixed rate.
struct RateKeys {
    p50: &'static str,
    p99: &'static str,
    added_p50: &'static str,
    added_p99: &'static str,
    cpu: &'static str,
}

fn rate_keys(rate: u32) -> RateKeys {
    match rate {
        1000 => RateKeys {
            p50: "p50_ms_1000",
            p99: "p99_ms_1000",
            added_p50: "added_p50_ms_1000",
            added_p99: "added_p99_ms_1000",
            cpu: "cpu_s_per_10k_at_1000",
        },
        _ => RateKeys {
            p50: "p50_ms_4000",
            p99: "p99_ms_4000",
            added_p50: "added_p50_ms_4000",
            added_p99: "added_p99_ms_4000",
            cpu: "cpu_s_per_10k_at_4000",
        },
    }
}

/// `unary gRPC`: 4 connections × 16 calls in flight, and new connections per second.
pub fn unary(plan: &Plan) -> anyhow::Result<Section> {
    run(plan, &FEW_BUSY)
}

/// `many connections`: 64 connections × 4 calls in flight.
pub fn many_connections(plan: &Plan) -> anyhow::Result<Section> {
    run(plan, &MANY)
}

fn run(plan: &Plan, shape: &Shape) -> anyhow::Result<Section> {
    crate::require_root()?;
    let sandbox = Sandbox::new()?;
    let direct = sandbox.add_pod("direct")?;
    let client = sandbox.add_pod("client")?;
    let backends = on_cpu(Cpu::First, || grpc::tonic_greeters(&sandbox, 3, PORT))?;
    let vip = SocketAddr::new(VIP.into(), PORT);
    let (daemon, running_peers) =
        peers::pinned_grpc_proxies(&sandbox, &client, &direct, vip, &backends, plan.peers)?;
    let shunt_pid = daemon.pid()?;

    let mut targets = vec![
        Target {
            name: "direct".into(),
            pod: &direct,
            to: backends.clone(),
            proxy_pid: None,
        },
        Target {
            name: "shunt".into(),
            pod: &client,
            to: vec![vip],
            proxy_pid: Some(shunt_pid),
        },
    ];
    let mut notes = vec![
        "Each proxy runs one worker/thread pinned alone on the last core; greeters and load \
         generators share the other cores. `added` latencies are over the direct path's. \
         Peak RSS is the peak under this workload (reset after start-up)."
            .to_string(),
    ];
    if !plan.peers {
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

    for pid in targets.iter().filter_map(|t| t.proxy_pid) {
        reset_peak_rss(pid)?;
    }
    let mut tallies: Vec<Tally> = targets.iter().map(|_| Tally::default()).collect();
    for round in 1..=plan.rounds {
        println!("  round {round}/{}", plan.rounds);
        for (target, tally) in targets.iter().zip(tallies.iter_mut()) {
            on_cpu(Cpu::First, || measure(&sandbox, target, tally, plan, shape))?;
        }
    }

    let mut section = Section::new(
        shape.key,
        format!(
            "Unary gRPC, 3 tonic backends, {} connections × {} calls in flight; latency at {} calls/s",
            shape.connections,
            shape.streams,
            RATES.map(|r| r.to_string()).join(" and ")
        ),
        columns(shape),
    );
    let direct_tally = &tallies[0];
    for (target, tally) in targets.iter().zip(&tallies) {
        let mut row = Row::new(&target.name);
        let rate = tally.mean("calls_per_second");
        row.set("calls_per_second", rate)
            .set("vs_direct", rate / direct_tally.mean("calls_per_second"))
            .set(
                "h2load_calls_per_second",
                tally.mean("h2load_calls_per_second"),
            )
            .text("split", split(&tally.by_backend));
        for rate in RATES {
            let keys = rate_keys(rate);
            row.set(keys.p50, tally.mean(keys.p50) / 1000.0)
                .set(keys.p99, tally.mean(keys.p99) / 1000.0);
            if target.proxy_pid.is_some() {
                let added = |key: &str| (tally.mean(key) - direct_tally.mean(key)) / 1000.0;
                row.set(keys.added_p50, added(keys.p50))
                    .set(keys.added_p99, added(keys.p99))
                    .set(keys.cpu, tally.mean(keys.cpu));
            }
        }
        for key in ["new_conns_per_second", "cpu_s_per_1k_conns"] {
            row.set(key, tally.mean(key));
        }
        if let Some(pid) = target.proxy_pid {
            for key in ["cpu_s_per_10k", "h2load_cpu_s_per_10k"] {
                row.set(key, tally.mean(key));
            }
            row.set("peak_rss_mib", tree_peak_rss_mib(pid));
        }
        section.rows.push(row);
    }
    for peer in ["HAProxy", "nginx"] {
        let ratio = |key: &str| section.ratio(key, "shunt", peer);
        let figures: Vec<String> = [
            ("CPU per call", "cpu_s_per_10k"),
            ("CPU per call (h2load)", "h2load_cpu_s_per_10k"),
            ("CPU per call at 1000/s", "cpu_s_per_10k_at_1000"),
            ("CPU per call at 4000/s", "cpu_s_per_10k_at_4000"),
            ("calls/s", "calls_per_second"),
            ("added p50 at 1000/s", "added_p50_ms_1000"),
            ("added p99 at 1000/s", "added_p99_ms_1000"),
            ("added p50 at 4000/s", "added_p50_ms_4000"),
            ("added p99 at 4000/s", "added_p99_ms_4000"),
            ("new connections/s", "new_conns_per_second"),
            ("CPU per new connection", "cpu_s_per_1k_conns"),
            ("peak RSS", "peak_rss_mib"),
        ]
        .iter()
        .filter_map(|(label, key)| ratio(key).map(|r| format!("{label} {r:.2}")))
        .collect();
        if !figures.is_empty() {
            notes.push(format!("shunt / {peer}: {}.", figures.join(", ")));
        }
    }
    section.notes = notes;
    Ok(section)
}

fn columns(shape: &Shape) -> Vec<Column> {
    let mut columns = vec![
        column("calls_per_second", "calls/s", 0),
        column("vs_direct", "vs direct", 2),
        column("cpu_s_per_10k", "proxy CPU (s / 10k calls)", 3),
        column("h2load_calls_per_second", "h2load calls/s", 0),
        column("h2load_cpu_s_per_10k", "h2load: proxy CPU (s / 10k)", 3),
    ];
    for rate in RATES {
        let keys = rate_keys(rate);
        let (p50, p99, added_p50, added_p99, cpu) = match rate {
            1000 => (
                "p50 @1000/s (ms)",
                "p99 @1000/s (ms)",
                "added p50 @1000/s (ms)",
                "added p99 @1000/s (ms)",
                "proxy CPU @1000/s (s / 10k)",
            ),
            _ => (
                "p50 @4000/s (ms)",
                "p99 @4000/s (ms)",
                "added p50 @4000/s (ms)",
                "added p99 @4000/s (ms)",
                "proxy CPU @4000/s (s / 10k)",
            ),
        };
        columns.extend([
            column(keys.p50, p50, 2),
            column(keys.p99, p99, 2),
            column(keys.added_p50, added_p50, 3),
            column(keys.added_p99, added_p99, 3),
            column(keys.cpu, cpu, 3),
        ]);
    }
    if shape.new_connections {
        columns.extend([
            column("new_conns_per_second", "new connections/s", 0),
            column("cpu_s_per_1k_conns", "proxy CPU (s / 1k connections)", 3),
        ]);
    }
    columns.extend([
        column("peak_rss_mib", "proxy peak RSS (MiB)", 1),
        column("split", "calls per backend (%)", 0),
    ]);
    columns
}

fn measure(
    sandbox: &Sandbox,
    target: &Target<'_>,
    tally: &mut Tally,
    plan: &Plan,
    shape: &Shape,
) -> anyhow::Result<()> {
    let cpu = || target.proxy_pid.map(tree_cpu_seconds).transpose();
    let per = |before: Option<f64>, after: Option<f64>, count: f64, unit: f64| {
        before
            .zip(after)
            .map(|(b, a)| (a - b) / count.max(1.0) * unit)
    };
    let load_shape = LoadShape {
        connections: shape.connections,
        streams: shape.streams,
        seconds: f64::from(plan.seconds),
    };

    let before = cpu()?;
    let closed = load(sandbox, target, &load_shape, None)?;
    if let Some(c) = per(before, cpu()?, closed.ok as f64, 10_000.0) {
        tally.add("cpu_s_per_10k", c);
    }
    tally.add("calls_per_second", closed.calls_per_second);
    for (backend, n) in closed.by_backend {
        *tally.by_backend.entry(backend).or_default() += n;
    }
    let mut line = format!(
        "    {:10} {:7.0} calls/s",
        target.name, closed.calls_per_second
    );

    // h2load speaks to one authority: it has no client-side balancing to cross-check.
    if target.to.len() == 1 {
        let before = cpu()?;
        let (calls, rate) = h2load(sandbox, target, plan, shape)?;
        if let Some(c) = per(before, cpu()?, calls as f64, 10_000.0) {
            tally.add("h2load_cpu_s_per_10k", c);
        }
        tally.add("h2load_calls_per_second", rate);
        line += &format!(" (h2load {rate:7.0})");
    }

    for rate in RATES {
        let keys = rate_keys(rate);
        let seconds = if plan.quick {
            f64::from(plan.seconds)
        } else {
            f64::from(plan.seconds).max(f64::from(CALLS_PER_RATE) / f64::from(rate))
        };
        let before = cpu()?;
        let open = load(
            sandbox,
            target,
            &LoadShape {
                seconds,
                ..load_shape
            },
            Some(rate),
        )?;
        if let Some(c) = per(before, cpu()?, open.ok as f64, 10_000.0) {
            tally.add(keys.cpu, c);
        }
        tally.add(keys.p50, open.p50_us);
        tally.add(keys.p99, open.p99_us);
        line += &format!(
            ", p50/p99 {:.2}/{:.2} ms at {rate}/s",
            open.p50_us / 1000.0,
            open.p99_us / 1000.0
        );
    }

    if shape.new_connections {
        let count = if plan.quick {
            NEW_CONNECTIONS.1
        } else {
            NEW_CONNECTIONS.0
        };
        let before = cpu()?;
        let churn = new_connections(sandbox, target, count)?;
        if let Some(c) = per(before, cpu()?, churn.ok as f64, 1_000.0) {
            tally.add("cpu_s_per_1k_conns", c);
        }
        tally.add("new_conns_per_second", churn.per_second);
        line += &format!(", {:.0} new connections/s", churn.per_second);
    }
    println!("{line}");
    Ok(())
}

/// Connections, calls in flight on each, and for how long.
#[derive(Clone, Copy)]
pub(super) struct LoadShape {
    pub(super) connections: usize,
    pub(super) streams: usize,
    pub(super) seconds: f64,
}

impl LoadShape {
    /// The few-busy-connections shape for `seconds`.
    pub(super) fn few_busy(seconds: u32) -> LoadShape {
        LoadShape {
            connections: FEW_BUSY.connections,
            streams: FEW_BUSY.streams,
            seconds: f64::from(seconds),
        }
    }
}

/// `count` short connections (TCP + HTTP/2 + one call + close), 8 at a time.
fn new_connections(
    sandbox: &Sandbox,
    target: &Target<'_>,
    count: usize,
) -> anyhow::Result<grpc::ChurnOutcome> {
    let churn = grpc::churn_to(
        sandbox,
        target.pod,
        &target.to,
        count,
        NEW_CONNECTION_CONCURRENCY,
        Duration::from_secs(60),
    )?;
    ensure!(
        churn.errors.is_empty(),
        "short connections to {} failed: {:?} (first: {:?})",
        target.name,
        churn.errors,
        churn.first_error
    );
    Ok(churn)
}

pub(super) fn load(
    sandbox: &Sandbox,
    target: &Target<'_>,
    shape: &LoadShape,
    rate: Option<u32>,
) -> anyhow::Result<LoadReport> {
    let report = load_allowing_errors(sandbox, target, shape, rate)?;
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
    shape: &LoadShape,
    rate: Option<u32>,
) -> anyhow::Result<LoadReport> {
    let to: Vec<String> = target.to.iter().map(ToString::to_string).collect();
    let mut cmd = Command::new(crate::greeter_bin());
    cmd.args([
        "load",
        "--to",
        &to.join(","),
        "--connections",
        &shape.connections.to_string(),
        "--streams",
        &shape.streams.to_string(),
        "--seconds",
        &shape.seconds.to_string(),
    ]);
    if let Some(rate) = rate {
        cmd.args(["--rate", &rate.to_string()]);
    }
    let out = sandbox.run_in_pod(
        target.pod,
        cmd,
        Duration::from_secs_f64(shape.seconds + 60.0),
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

/// h2load's successful calls and calls/s for SayHello with gRPC headers and a framed request
/// body.
fn h2load(
    sandbox: &Sandbox,
    target: &Target<'_>,
    plan: &Plan,
    shape: &Shape,
) -> anyhow::Result<(u64, f64)> {
    let body = sandbox.scratch_dir("h2load")?.join("say-hello.grpc");
    // gRPC frame: uncompressed, length 7, HelloRequest { name: "probe" }.
    std::fs::write(&body, b"\x00\x00\x00\x00\x07\x0a\x05probe")?;
    let mut cmd = Command::new("h2load");
    cmd.args([
        "-D",
        &plan.seconds.to_string(),
        "-c",
        &shape.connections.to_string(),
        "-m",
        &shape.streams.to_string(),
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
    // "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, …"
    let requests = |outcome: &str| {
        report
            .lines()
            .find(|l| l.starts_with("requests:"))
            .and_then(|l| l.split(", ").find(|p| p.ends_with(outcome)))
            .and_then(|p| p.trim_end_matches(outcome).trim().parse::<u64>().ok())
    };
    ensure!(
        requests(" failed") == Some(0),
        "h2load against {}: requests failed: {report}",
        target.name
    );
    let succeeded = requests(" succeeded")
        .with_context(|| format!("no succeeded count in h2load's report: {report}"))?;
    let rate = report
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.trim_end_matches(" req/s").parse::<f64>().ok())
        .with_context(|| format!("no req/s in h2load's report: {report}"))?;
    Ok((succeeded, rate))
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
