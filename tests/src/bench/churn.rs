//! Connection churn, then a closed loop, round after round: does shunt stay as cheap as it
//! started? Each round makes many short client connections (a new TCP + HTTP/2 connection,
//! one unary call, close: `shunt-greeter churn`), then runs the closed-loop unary load of the
//! `unary gRPC` workload on long-lived connections; the direct path (client-side round-robin
//! over the same three greeters) does the same in the same round, the order alternating.
//!
//! After each shunt round it records what shunt holds: its upstream connections (established,
//! to the greeters' port, counted with `ss` in the client pod's namespace, where shunt's
//! upstream sockets live), its open descriptors and its resident memory. A pool that keeps a
//! connection per client connection ever made shows here as upstream connections and
//! descriptors growing round by round, and as CPU per call rising with them; the table has a
//! row per round so the drift is visible, and a note compares round 3 with round 1.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use super::{
    Plan,
    grpc::{LoadShape, Target, load_allowing_errors},
    process::{established_to_port, fd_count, rss_kib, tree_cpu_seconds, tree_peak_rss_mib},
    report::{Row, Section, column},
};
use crate::{
    daemon::{Daemon, Options},
    fixture, grpc,
    sandbox::{Pod, Sandbox},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const PORT: u16 = 50051;
/// Short connections open at once during the churn phase.
const CONCURRENCY: usize = 8;
/// Rounds at least, whatever the plan says: a drift needs a first and a last round to show.
const MIN_ROUNDS: u32 = 3;
/// Longest a churn phase may run; a target slower than this makes fewer connections, which
/// its rate shows.
const CHURN_SECONDS: Duration = Duration::from_secs(60);
/// Upstream connections shunt may hold more after the last round than after the first and
/// still count as steady: its pools keep up to `http2.upstream_max_idle` (4) idle
/// connections per endpoint (3) and worker (one per CPU), which need not all be warm by the
/// end of round 1.
const HOLDINGS_SLACK: u64 = 32;
/// Pause between shunt's closed loop and reading what it holds, so connections the load
/// generator just closed are not counted, nor idle ones shunt closes within a second.
const SETTLE: Duration = Duration::from_secs(2);

/// What shunt holds at one moment.
#[derive(Clone, Copy)]
struct Held {
    upstream: u64,
    fds: u64,
    rss_kib: f64,
}

impl Held {
    fn read(sandbox: &Sandbox, client: &Pod, pid: u32) -> anyhow::Result<Held> {
        Ok(Held {
            upstream: established_to_port(sandbox, client, PORT)?,
            fds: fd_count(pid),
            rss_kib: rss_kib(pid),
        })
    }

    fn describe(&self) -> String {
        format!(
            "{} upstream conns, {} fds, RSS {:.1} MiB",
            self.upstream,
            self.fds,
            self.rss_kib / 1024.0
        )
    }
}

/// One target's figures for one round.
struct Measured {
    churn_per_second: f64,
    churn_cpu_per_1k: Option<f64>,
    calls_per_second: f64,
    cpu_per_10k: Option<f64>,
    failed: u64,
    first_error: Option<String>,
    held: Option<Held>,
    peak_rss_mib: Option<f64>,
}

pub fn churn_then_closed_loop(plan: &Plan) -> anyhow::Result<Section> {
    crate::require_root()?;
    let count = if plan.quick { 3_000 } else { 10_000 };
    let rounds = plan.rounds.max(MIN_ROUNDS);
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
    let targets = [
        Target {
            name: "direct".into(),
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

    let start = Held::read(&sandbox, &client, shunt_pid)?;
    println!("  shunt at start: {}", start.describe());
    let mut section = Section::new(
        "connection_churn",
        format!(
            "Connection churn then closed loop, {rounds} rounds: {count} short connections \
             ({CONCURRENCY} at a time, one unary call each), then unary gRPC for {} s on \
             long-lived connections; shunt's holdings {} s after each round",
            plan.seconds,
            SETTLE.as_secs()
        ),
        vec![
            column("churn_per_second", "short conns/s", 0),
            column("churn_vs_direct", "vs direct", 2),
            column("churn_cpu_s_per_1k", "proxy CPU (s / 1k conns)", 3),
            column("calls_per_second", "calls/s", 0),
            column("vs_direct", "vs direct", 2),
            column("cpu_s_per_10k", "proxy CPU (s / 10k calls)", 3),
            column("upstream_connections", "shunt upstream conns", 0),
            column("fds", "shunt descriptors", 0),
            column("rss_mib", "shunt RSS (MiB)", 1),
            column("peak_rss_mib", "shunt peak RSS (MiB)", 1),
            column("failed", "failed calls", 0),
        ],
    );
    let mut start_row = Row::new("shunt at start");
    start_row
        .set("upstream_connections", start.upstream as f64)
        .set("fds", start.fds as f64)
        .set("rss_mib", start.rss_kib / 1024.0);
    section.rows.push(start_row);

    let mut shunt_rounds: Vec<Measured> = Vec::new();
    let mut first_errors = Vec::new();
    let mut stopped = None;
    'rounds: for round in 1..=rounds {
        println!("  round {round}/{rounds}");
        // Alternate which target goes first, so a machine that gets busier within a round
        // does not favour one of them.
        let mut order: Vec<usize> = (0..targets.len()).collect();
        if round % 2 == 0 {
            order.reverse();
        }
        let mut measured: [Option<Measured>; 2] = [None, None];
        for i in order {
            let target = &targets[i];
            // A target that fails (a proxy out of descriptors, say) ends the rounds, but the
            // rounds measured so far are the point: they are reported with the failure.
            let m = match measure(&sandbox, target, &client, count, plan) {
                Ok(m) => m,
                Err(e) => {
                    println!("    {:7} FAILED: {e:#}", target.name);
                    stopped = Some(format!("{}, round {round}, failed: {e:#}", target.name));
                    break 'rounds;
                }
            };
            println!(
                "    {:7} {:6.0} short conns/s{}, {:6.0} calls/s{}{}{}",
                target.name,
                m.churn_per_second,
                m.churn_cpu_per_1k
                    .map_or_else(String::new, |c| format!(" ({c:.3} CPU-s/1k)")),
                m.calls_per_second,
                m.cpu_per_10k
                    .map_or_else(String::new, |c| format!(" ({c:.3} CPU-s/10k)")),
                m.held
                    .map_or_else(String::new, |h| format!("; {}", h.describe())),
                match m.failed {
                    0 => String::new(),
                    n => format!("; {n} failed"),
                },
            );
            if let Some(error) = &m.first_error {
                first_errors.push(format!("{}, round {round}: {error}", target.name));
            }
            measured[i] = Some(m);
        }
        let [Some(direct_m), Some(shunt_m)] = measured else {
            anyhow::bail!("round {round} measured only some targets");
        };
        let mut direct_row = Row::new(format!("round {round}: direct"));
        direct_row
            .set("churn_per_second", direct_m.churn_per_second)
            .set("calls_per_second", direct_m.calls_per_second)
            .set("failed", direct_m.failed as f64);
        section.rows.push(direct_row);
        let mut shunt_row = Row::new(format!("round {round}: shunt"));
        shunt_row
            .set("churn_per_second", shunt_m.churn_per_second)
            .set(
                "churn_vs_direct",
                shunt_m.churn_per_second / direct_m.churn_per_second,
            )
            .set(
                "churn_cpu_s_per_1k",
                shunt_m.churn_cpu_per_1k.unwrap_or(f64::NAN),
            )
            .set("calls_per_second", shunt_m.calls_per_second)
            .set(
                "vs_direct",
                shunt_m.calls_per_second / direct_m.calls_per_second,
            )
            .set("cpu_s_per_10k", shunt_m.cpu_per_10k.unwrap_or(f64::NAN))
            .set("peak_rss_mib", shunt_m.peak_rss_mib.unwrap_or(f64::NAN))
            .set("failed", shunt_m.failed as f64);
        if let Some(held) = shunt_m.held {
            shunt_row
                .set("upstream_connections", held.upstream as f64)
                .set("fds", held.fds as f64)
                .set("rss_mib", held.rss_kib / 1024.0);
        }
        section.rows.push(shunt_row);
        shunt_rounds.push(shunt_m);
    }

    if let [first, .., last] = shunt_rounds.as_slice() {
        section
            .notes
            .push(drift_note(first, last, shunt_rounds.len()));
    }
    if let Some(stopped) = stopped {
        section.notes.push(format!("Stopped early: {stopped}"));
    }
    section.notes.push(format!(
        "Upstream connections: shunt's established connections to port {PORT}, counted with \
         `ss` in the client pod's namespace; descriptors from /proc/PID/fd; RSS is VmRSS then, \
         peak RSS VmHWM. The direct path is client-side round-robin over the same greeters."
    ));
    for error in first_errors {
        section.notes.push(format!("First failure, {error}"));
    }
    Ok(section)
}

/// One target's churn phase, then its closed loop, then (for shunt) what it holds.
fn measure(
    sandbox: &Sandbox,
    target: &Target<'_>,
    client: &Pod,
    count: usize,
    plan: &Plan,
) -> anyhow::Result<Measured> {
    let cpu = || target.proxy_pid.map(tree_cpu_seconds).transpose();
    let before = cpu()?;
    let churn = grpc::churn_to(
        sandbox,
        target.pod,
        &target.to,
        count,
        CONCURRENCY,
        CHURN_SECONDS,
    )?;
    let after = cpu()?;
    // A churn client that kept its connections would hide (or fake) a proxy's leak.
    anyhow::ensure!(
        churn.sockets_open_at_end == 0,
        "the churn client against {} still held {} sockets after closing its connections",
        target.name,
        churn.sockets_open_at_end
    );
    let churn_cpu_per_1k = match (before, after) {
        (Some(b), Some(a)) => Some((a - b) / churn.ok.max(1) as f64 * 1_000.0),
        _ => None,
    };
    let before = cpu()?;
    let closed = load_allowing_errors(sandbox, target, &LoadShape::few_busy(plan.seconds), None)?;
    let after = cpu()?;
    let cpu_per_10k = match (before, after) {
        (Some(b), Some(a)) => Some((a - b) / closed.ok.max(1) as f64 * 10_000.0),
        _ => None,
    };
    let (held, peak_rss_mib) = match target.proxy_pid {
        Some(pid) => {
            std::thread::sleep(SETTLE);
            (
                Some(Held::read(sandbox, client, pid)?),
                Some(tree_peak_rss_mib(pid)),
            )
        }
        None => (None, None),
    };
    let closed_failed: u64 = closed.errors.values().sum();
    let first_error = churn
        .first_error
        .clone()
        .map(|e| format!("churn: {e}"))
        .or_else(|| {
            closed
                .first_error
                .clone()
                .map(|e| format!("closed loop: {e}"))
        });
    Ok(Measured {
        churn_per_second: churn.per_second,
        churn_cpu_per_1k,
        calls_per_second: closed.calls_per_second,
        cpu_per_10k,
        failed: churn.failed() as u64 + closed_failed,
        first_error,
        held,
        peak_rss_mib,
    })
}

/// Round `rounds` against round 1: the figures that must not drift.
fn drift_note(first: &Measured, last: &Measured, rounds: usize) -> String {
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if a > 0.0 => b / a,
        _ => f64::NAN,
    };
    let cpu = ratio(first.cpu_per_10k, last.cpu_per_10k);
    let churn_cpu = ratio(first.churn_cpu_per_1k, last.churn_cpu_per_1k);
    let upstream = |m: &Measured| m.held.map_or(0, |h| h.upstream);
    let fds = |m: &Measured| m.held.map_or(0, |h| h.fds);
    // Within 10 %: what the issue that added this workload asks of shunt. Falling is noise
    // (a machine that got quieter), not a leak, but is said as it is.
    let cpu_verdict = if cpu > 1.10 {
        "ROSE more than 10 %"
    } else if cpu < 0.90 {
        "fell more than 10 %"
    } else {
        "within 10 %"
    };
    // CPU per call rises only once a leaked pool is large; what it holds shows a leak from
    // the first rounds on.
    let growth = upstream(last).saturating_sub(upstream(first));
    let held_verdict = if growth <= HOLDINGS_SLACK {
        "steady".to_string()
    } else {
        format!("GROWING, {} a round", growth / (rounds as u64 - 1).max(1))
    };
    format!(
        "shunt, round {rounds} / round 1: CPU per 10k calls {cpu:.2} ({cpu_verdict}), CPU per \
         1k short connections {churn_cpu:.2}, calls/s {:.2}; upstream connections {} → {} \
         ({held_verdict}), descriptors {} → {}.",
        last.calls_per_second / first.calls_per_second,
        upstream(first),
        upstream(last),
        fds(first),
        fds(last),
    )
}
