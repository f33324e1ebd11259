//! Connection setup: short connections per second (connect, one line each way, close), and
//! what the attached programs cost processes that are not enrolled; the kernel path, declared
//! and learned.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::ensure;
use shunt::config::{KernelPathMode, ServiceProtocol};

use super::{
    Plan,
    process::{Cpu, on_cpu, tree_cpu_seconds},
    report::{Row, Section, column, median},
};
use crate::{
    daemon::{Daemon, Options},
    fixture, probe,
    sandbox::{Pod, Sandbox},
};

/// A Service declared `tcp` in front of the backend (the kernel path), and one left to
/// detection (learned, once `intercept.kernel_path: learned`).
const DECLARED_VIP: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 96, 0, 30)), 8080);
const LEARNED_VIP: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 96, 0, 31)), 8080);

/// The port the eBPF redirect leaves alone (`exclude_ports`) so an iptables rule can send it
/// to the same listener instead.
const IPTABLES_PORT: u16 = 8081;

pub fn setup_rates(plan: &Plan) -> anyhow::Result<Section> {
    crate::require_root()?;
    let sandbox = Sandbox::new()?;
    let outsider = sandbox.add_pod("outsider")?;
    let client = sandbox.add_pod("client")?;
    // Enrolled too, but apart: its NAT rule puts conntrack on every packet of its network
    // namespace, which the client's figures must not pay.
    let nat_client = sandbox.add_pod("nat-client")?;
    let backend = sandbox.add_pod("backend")?;
    let target = SocketAddr::new(backend.ipv4.into(), 8080);
    let iptables_target = SocketAddr::new(backend.ipv4.into(), IPTABLES_PORT);
    // The servers on the last CPU and the clients on the first, so that every run has the
    // same placement (the scheduler's choice otherwise moves the figures by ±10 % between
    // runs); shunt is left to the scheduler.
    on_cpu(Cpu::Last, || {
        probe::serve(&sandbox, &backend, target)?;
        probe::serve(&sandbox, &backend, iptables_target)
    })?;
    // Short connections leave TIME_WAIT entries behind, which slow every later connect() in
    // the pod as it searches for a free port: the later a run, the slower. The client pods
    // keep none, so that every run starts as the first did.
    for pod in [&outsider, &client, &nat_client] {
        let mut sysctl = std::process::Command::new("sysctl");
        sysctl.args(["-qw", "net.ipv4.tcp_max_tw_buckets=0"]);
        let out = sandbox.run_in_pod(pod, sysctl, std::time::Duration::from_secs(5))?;
        ensure!(out.status.success(), "sysctl in pod {} failed", pod.name);
    }
    let count = plan.seconds * 800;
    let rate = |pod: &Pod, to: SocketAddr| -> anyhow::Result<f64> {
        let started = std::time::Instant::now();
        let seen = on_cpu(Cpu::First, || probe::connect(&sandbox, pod, to, count))?;
        ensure!(
            seen.iter().all(|s| s.error.is_none()),
            "a connection to {to} failed"
        );
        Ok(f64::from(count) / started.elapsed().as_secs_f64())
    };
    println!("  no programs attached");
    let mut bare = Vec::new();
    for _ in 0..plan.rounds {
        bare.push(rate(&outsider, target)?);
    }
    let options = |kernel_path: KernelPathMode| {
        Options {
            log: Some("info"),
            ..Options::default()
        }
        .with_config(|c| {
            c.intercept.exclude_ports = vec![IPTABLES_PORT];
            c.intercept.kernel_path = kernel_path;
            let mut declared = fixture::service_config("declared", DECLARED_VIP, &[target]);
            declared.protocol = ServiceProtocol::Tcp;
            c.services = vec![
                declared,
                fixture::service_config("learned", LEARNED_VIP, &[target]),
            ];
        })
    };
    let enrolled = [&client, &nat_client];
    let daemon = Daemon::start(&sandbox, &enrolled, &options(KernelPathMode::Declared))?;
    // The mechanism the programs replace: a NAT rule sending the pod's connections to the
    // same in-pod listener, which reads the destination back with SO_ORIGINAL_DST.
    crate::iptables::redirect_to_shunt(&sandbox, &nat_client, backend.ipv4, IPTABLES_PORT)?;
    let (mut attached, mut ebpf, mut nat, mut kernel) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let shunt_pid = daemon.pid()?;
    // shunt's own CPU for the kernel path: recording the connections the programs report.
    let mut kernel_cpu = 0.0;
    // Rounds are short (well under a second each): three times the plan's, for a median.
    let rounds = plan.rounds * 3;
    for round in 1..=rounds {
        println!("  round {round}/{rounds} with programs attached");
        // The two figures compared most closely run back to back.
        attached.push(rate(&outsider, target)?);
        let cpu_before = tree_cpu_seconds(shunt_pid)?;
        kernel.push(rate(&client, DECLARED_VIP)?);
        kernel_cpu += tree_cpu_seconds(shunt_pid)? - cpu_before;
        ebpf.push(rate(&client, target)?);
        nat.push(rate(&nat_client, iptables_target)?);
    }
    let balanced = daemon.counter("ebpf", "kernel_path_balanced")?;
    ensure!(
        balanced == u64::from(count) * u64::from(rounds),
        "{balanced} connections took the kernel path, not every one to the declared Service"
    );

    // Learned: how many connections until a destination moves, and what share is sampled.
    println!("  learning");
    daemon.rewrite_config(&enrolled, &options(KernelPathMode::Learned))?;
    daemon.ctl(&["reload"])?;
    let before = daemon.counter("proxy", "verdict_opaque")?;
    let sampled_before = daemon.counter("ebpf", "kernel_path_sampled")?;
    let learned_rate = rate(&client, LEARNED_VIP)?;
    let through_proxy = daemon.counter("proxy", "verdict_opaque")? - before;
    let sampled = daemon.counter("ebpf", "kernel_path_sampled")? - sampled_before;
    let learned_after = through_proxy - sampled;
    let redirected_by_nat = daemon.counter("proxy", "forwarded")?;
    ensure!(
        redirected_by_nat >= u64::from(count) * u64::from(rounds) * 2,
        "shunt forwarded only {redirected_by_nat} connections: the iptables rule did not reach it"
    );

    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let base = mean(&bare);
    let mut section = Section::new(
        "connection_setup",
        format!(
            "Connection setup, {count} short connections per round (connect, one line each way, close)"
        ),
        vec![
            column("connections_per_second", "connections/s", 0),
            column("vs_bare", "vs no programs", 2),
        ],
    );
    for (name, values) in [
        ("non-enrolled pod, no programs attached", bare.as_slice()),
        ("non-enrolled pod, programs attached", &attached),
        ("enrolled pod, eBPF redirect → shunt", &ebpf),
        ("iptables REDIRECT → shunt", &nat),
        ("enrolled pod, kernel path (Service declared tcp)", &kernel),
        (
            "enrolled pod, learned (one round)",
            std::slice::from_ref(&learned_rate),
        ),
    ] {
        let r = mean(values);
        let mut row = Row::new(name);
        row.set("connections_per_second", r)
            .set("vs_bare", r / base);
        section.rows.push(row);
    }
    if let Some(r) = section.ratio(
        "connections_per_second",
        "enrolled pod, eBPF redirect → shunt",
        "iptables REDIRECT → shunt",
    ) {
        section
            .notes
            .push(format!("eBPF redirect / iptables REDIRECT: {r:.2}."));
    }
    // Rounds are short and the machine's speed drifts between them: each round's own ratio,
    // the median of them.
    let paired: Vec<f64> = kernel.iter().zip(&attached).map(|(k, a)| k / a).collect();
    section.notes.push(format!(
        "kernel path / non-enrolled pod (programs attached), median of each round's ratio: \
         {:.2} (rounds: {}).",
        median(&paired),
        paired
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    section.notes.push(format!(
        "kernel path: shunt's CPU recording the connections, {:.1} µs per connection.",
        kernel_cpu * 1e6 / f64::from(count * rounds)
    ));
    section.notes.push(format!(
        "learned: the destination moved to the kernel path after {learned_after} connections \
         through the proxy; then {sampled} of the remaining {} were sampled through the proxy \
         ({:.1} %).",
        u64::from(count) - learned_after,
        100.0 * sampled as f64 / (u64::from(count) - learned_after).max(1) as f64
    ));
    Ok(section)
}
