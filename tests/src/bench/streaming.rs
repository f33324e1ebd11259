//! Streaming gRPC: 3 tonic greeters behind the direct path, shunt, HAProxy and nginx, with
//! long streams rather than one call per request. Server streaming (`SayHelloMany`: a batch of
//! replies sent back to back) measures how fast a proxy relays a one-way flow of messages;
//! bidirectional ping-pong (`Chat`: one message in flight per stream) measures what it adds
//! to every round trip. The load generator is `shunt-greeter stream-load`.

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
    process::{Cpu, on_cpu, tree_cpu_seconds},
    report::{Row, Section, column, median},
};
use crate::{
    grpc,
    sandbox::{Pod, Sandbox},
};

/// Apart from the unary workload's VIP, so the two never share state by accident.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);
const PORT: u16 = 50051;
const CONNECTIONS: usize = 2;
const STREAMS: usize = 16;
/// Replies per server stream, and round trips per bidirectional stream: long enough that
/// opening streams is a small part of the cost.
const MESSAGES: u32 = 1000;

#[derive(Clone, Copy)]
enum Kind {
    Server,
    Bidi,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Server, Kind::Bidi];

    /// `stream-load --kind`.
    fn arg(self) -> &'static str {
        match self {
            Kind::Server => "server",
            Kind::Bidi => "bidi",
        }
    }

    /// The first half of a row's name.
    fn label(self) -> &'static str {
        match self {
            Kind::Server => "server streaming",
            Kind::Bidi => "bidi streaming",
        }
    }
}

/// One target: where the client connects from and to, and the proxy process (if any).
struct Target<'a> {
    name: &'static str,
    pod: &'a Pod,
    to: SocketAddr,
    proxy_pid: Option<u32>,
}

#[derive(Deserialize)]
struct LoadReport {
    messages: u64,
    messages_per_second: f64,
    streams: u64,
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
}

/// One (kind, target)'s figures, a value per round.
#[derive(Default)]
struct Tally {
    rates: Vec<f64>,
    cpu_per_100k: Vec<f64>,
}

pub fn streaming(plan: &Plan) -> anyhow::Result<Section> {
    crate::require_root()?;
    let sandbox = Sandbox::new()?;
    let direct = sandbox.add_pod("direct")?;
    let client = sandbox.add_pod("client")?;
    // As in the unary workloads: each proxy on one thread, alone on the last core.
    let backends = on_cpu(Cpu::First, || grpc::tonic_greeters(&sandbox, 3, PORT))?;
    let vip = SocketAddr::new(VIP.into(), PORT);
    let (daemon, running_peers) =
        peers::pinned_grpc_proxies(&sandbox, &client, &direct, vip, &backends, plan.peers)?;

    let mut targets = vec![
        Target {
            name: "direct",
            pod: &direct,
            to: backends[0],
            proxy_pid: None,
        },
        Target {
            name: "shunt",
            pod: &client,
            to: vip,
            proxy_pid: Some(daemon.pid()?),
        },
    ];
    let mut notes = Vec::new();
    if !plan.peers {
        notes.push(peers::SKIPPED.to_string());
    }
    for peer in &running_peers {
        targets.push(Target {
            name: peer.name,
            pod: &direct,
            to: peer.listen,
            proxy_pid: Some(peer.pid),
        });
    }

    let mut tallies: Vec<Vec<Tally>> = Kind::ALL
        .iter()
        .map(|_| targets.iter().map(|_| Tally::default()).collect())
        .collect();
    for round in 1..=plan.rounds {
        println!("  round {round}/{}", plan.rounds);
        for (&kind, kind_tallies) in Kind::ALL.iter().zip(tallies.iter_mut()) {
            for (target, tally) in targets.iter().zip(kind_tallies.iter_mut()) {
                on_cpu(Cpu::First, || measure(&sandbox, target, kind, tally, plan))?;
            }
        }
    }

    let mut section = Section::new(
        "grpc_streaming",
        format!(
            "Streaming gRPC, 3 tonic backends (direct: one of them), {CONNECTIONS} connections × {STREAMS} streams; \
             server streams of {MESSAGES} replies, bidi streams of {MESSAGES} round trips with one message in flight; \
             {}",
            rounds(plan.rounds)
        ),
        vec![
            column("messages_per_second", "messages/s", 0),
            column("vs_direct", "vs direct", 2),
            // Server streams cost a proxy thousandths of a second per 100k messages.
            column("cpu_s_per_100k", "proxy CPU (s / 100k messages)", 4),
        ],
    );
    for (&kind, kind_tallies) in Kind::ALL.iter().zip(&tallies) {
        add_rows(&mut section, kind, &targets, kind_tallies);
    }
    notes.push(format!(
        "Server streaming's replies are small and sent back to back, so many share an HTTP/2 DATA \
         frame: what a proxy spends there follows frames and bytes more than messages. With {} CPUs \
         for client, proxy and backends alike, the client may set the pace rather than the proxy.",
        std::thread::available_parallelism().map_or(1, usize::from)
    ));
    notes.extend(peer_ratios(&section));
    section.notes = notes;
    Ok(section)
}

/// What each figure is made of: one round's, or the median of several.
fn rounds(n: u32) -> String {
    match n {
        1 => "one round".to_string(),
        n => format!("median of {n} rounds"),
    }
}

fn row_name(kind: Kind, target: &str) -> String {
    format!("{}: {target}", kind.label())
}

/// One row per target for `kind`, its rate also as a ratio to the direct path's.
fn add_rows(section: &mut Section, kind: Kind, targets: &[Target<'_>], tallies: &[Tally]) {
    let direct_rate = tallies.first().map_or(f64::NAN, |t| median(&t.rates));
    for (target, tally) in targets.iter().zip(tallies) {
        let mut row = Row::new(row_name(kind, target.name));
        let rate = median(&tally.rates);
        row.set("messages_per_second", rate)
            .set("vs_direct", rate / direct_rate);
        if target.proxy_pid.is_some() {
            row.set("cpu_s_per_100k", median(&tally.cpu_per_100k));
        }
        section.rows.push(row);
    }
}

/// "server streaming, shunt / HAProxy: …" for every kind and peer that was measured.
fn peer_ratios(section: &Section) -> Vec<String> {
    let mut notes = Vec::new();
    for peer in ["HAProxy", "nginx"] {
        for kind in Kind::ALL {
            let (shunt, other) = (row_name(kind, "shunt"), row_name(kind, peer));
            if let (Some(rate), Some(cpu)) = (
                section.ratio("messages_per_second", &shunt, &other),
                section.ratio("cpu_s_per_100k", &shunt, &other),
            ) {
                notes.push(format!(
                    "{}, shunt / {peer}: messages/s {rate:.2}, CPU per message {cpu:.2}.",
                    kind.label()
                ));
            }
        }
    }
    notes
}

fn measure(
    sandbox: &Sandbox,
    target: &Target<'_>,
    kind: Kind,
    tally: &mut Tally,
    plan: &Plan,
) -> anyhow::Result<()> {
    let cpu = || target.proxy_pid.map(tree_cpu_seconds).transpose();
    let before = cpu()?;
    let report = load(sandbox, target, kind, plan)?;
    let after = cpu()?;
    let cpu_per_100k = match (before, after) {
        (Some(before), Some(after)) => {
            let per_100k = (after - before) / report.messages as f64 * 100_000.0;
            tally.cpu_per_100k.push(per_100k);
            format!(", proxy CPU {per_100k:.3} s per 100k messages")
        }
        _ => String::new(),
    };
    tally.rates.push(report.messages_per_second);
    println!(
        "    {:34} {:9.0} messages/s ({} streams){cpu_per_100k}",
        row_name(kind, target.name),
        report.messages_per_second,
        report.streams
    );
    Ok(())
}

/// One `shunt-greeter stream-load` run from the target's pod; fails on any failed stream, as
/// a figure measured through errors would not compare.
fn load(
    sandbox: &Sandbox,
    target: &Target<'_>,
    kind: Kind,
    plan: &Plan,
) -> anyhow::Result<LoadReport> {
    let mut cmd = Command::new(crate::greeter_bin());
    cmd.args(["stream-load", "--to", &target.to.to_string()])
        .args(["--kind", kind.arg()])
        .args(["--connections", &CONNECTIONS.to_string()])
        .args(["--streams", &STREAMS.to_string()])
        .args(["--seconds", &plan.seconds.to_string()])
        .args(["--messages", &MESSAGES.to_string()]);
    // The client's own bound is its deadline plus a few seconds' grace.
    let out = sandbox.run_in_pod(
        target.pod,
        cmd,
        Duration::from_secs(u64::from(plan.seconds) + 60),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "stream load against {} failed: {stdout}{}",
        target.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: LoadReport = serde_json::from_str(stdout.trim())
        .with_context(|| format!("stream load generator printed {stdout:?}"))?;
    ensure!(
        report.errors.is_empty(),
        "{} against {} failed: {:?} (first: {:?})",
        kind.label(),
        target.name,
        report.errors,
        report.first_error
    );
    // A target that stalls for less than the client's per-message timeout reports no error,
    // only no messages.
    ensure!(
        report.messages > 0,
        "{} against {}: no message in {} s",
        kind.label(),
        target.name,
        plan.seconds
    );
    Ok(report)
}
