//! TCP passthrough: one iperf3 connection, direct vs shunt (splice, copy and sockmap
//! forwarding) vs HAProxy `mode tcp`.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use shunt::config::{Forwarding, ServiceProtocol};

use anyhow::{Context, ensure};

use super::{
    Plan, peers,
    process::{machine_busy_seconds, tree_cpu_seconds},
    report::{Row, Section, column, median},
};
use crate::{
    daemon::{Daemon, Options},
    fixture, probe,
    sandbox::{Pod, Sandbox},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const IPERF_PORT: u16 = 5201;
/// Runs of direct and of the kernel path per round, as pairs.
const PAIRS: usize = 3;

/// One measured run of one target.
pub(super) struct Sample {
    pub(super) bits_per_second: f64,
    /// The proxy's CPU seconds during the run (0 for the direct path).
    pub(super) proxy_cpu_seconds: f64,
    /// The machine's busy CPU seconds during the run.
    pub(super) machine_cpu_seconds: f64,
    pub(super) bytes: f64,
}

pub fn iperf3(plan: &Plan) -> anyhow::Result<Section> {
    crate::require_root()?;
    let sandbox = Sandbox::new()?;
    let direct_client = sandbox.add_pod("direct")?;
    let client = sandbox.add_pod("client")?;
    let backend = sandbox.add_pod("backend")?;
    let mut server = Command::new("iperf3");
    server
        .args(["-s", "-p", &IPERF_PORT.to_string()])
        .stdout(std::process::Stdio::null());
    let pid = sandbox.spawn_in_pod(&backend, server)?;
    probe::wait_listening(&sandbox, &backend, IPERF_PORT, pid)?;
    let endpoint = SocketAddr::new(backend.ipv4.into(), IPERF_PORT);
    // `None`: the Service declared `tcp`, so connect() sends it past the proxy.
    let options = |forwarding: Option<Forwarding>| {
        Options {
            log: Some("info"),
            ..fixture::service(
                "iperf",
                SocketAddr::new(VIP.into(), IPERF_PORT),
                &[endpoint],
            )
        }
        .with_config(|c| match forwarding {
            Some(forwarding) => c.intercept.forwarding = forwarding,
            None => c.services[0].protocol = ServiceProtocol::Tcp,
        })
    };
    let daemon = Daemon::start(&sandbox, &[&client], &options(Some(Forwarding::Splice)))?;
    let shunt_pid = daemon.pid()?;
    let haproxy = if plan.peers {
        Some(peers::haproxy_tcp(
            &sandbox,
            &direct_client,
            10003,
            endpoint,
        )?)
    } else {
        None
    };

    let mut targets: Vec<(&str, Vec<Sample>)> = vec![
        ("direct", Vec::new()),
        ("shunt (kernel path)", Vec::new()),
        ("shunt (splice)", Vec::new()),
        ("shunt (copy)", Vec::new()),
        ("shunt (sockmap)", Vec::new()),
    ];
    if haproxy.is_some() {
        targets.push(("HAProxy (mode tcp)", Vec::new()));
    }
    // The machine's speed drifts by more than the kernel path could cost: each round
    // measures it against direct in PAIRS back-to-back pairs, in alternating order.
    let mut schedule = Vec::new();
    for pair in 0..PAIRS {
        schedule.extend(if pair % 2 == 0 { [0, 1] } else { [1, 0] });
    }
    schedule.extend(2..targets.len());
    for round in 1..=plan.rounds {
        println!("  round {round}/{}", plan.rounds);
        for &index in &schedule {
            let (target, samples) = &mut targets[index];
            let (pod, host, port, proxy) = match *target {
                "direct" => (&direct_client, backend.ipv4.to_string(), IPERF_PORT, None),
                "HAProxy (mode tcp)" => {
                    let peer = haproxy.as_ref().context("no HAProxy")?;
                    (
                        &direct_client,
                        peer.listen.ip().to_string(),
                        peer.listen.port(),
                        Some(peer.pid),
                    )
                }
                shunt => {
                    let forwarding = [Forwarding::Splice, Forwarding::Copy, Forwarding::Sockmap]
                        .into_iter()
                        .find(|mode| shunt.contains(mode.as_str()));
                    daemon.rewrite_config(&[&client], &options(forwarding))?;
                    daemon.ctl(&["reload"])?;
                    wait_kernel_path(&daemon, forwarding.is_none())?;
                    (&client, VIP.to_string(), IPERF_PORT, Some(shunt_pid))
                }
            };
            let sample = run(&sandbox, pod, &host, port, proxy, plan)?;
            println!(
                "    {target:20} {:6.2} Gbit/s{}",
                sample.bits_per_second / 1e9,
                if proxy.is_some() {
                    format!(", proxy CPU {:.2}s", sample.proxy_cpu_seconds)
                } else {
                    String::new()
                }
            );
            samples.push(sample);
        }
    }

    // A sockmap figure only counts if the kernel forwarded those connections.
    let fallbacks = daemon.counter("proxy", "sockmap_fallbacks")?;
    let forwarded = daemon.counter("proxy", "sockmap_forwarded")?;
    ensure!(
        fallbacks == 0 && forwarded > 0,
        "shunt (sockmap): {forwarded} connections forwarded in the kernel, {fallbacks} spliced"
    );

    let mut section = Section::new(
        "tcp_passthrough",
        format!(
            "TCP passthrough, iperf3, one connection, {} s per round",
            plan.seconds
        ),
        vec![
            column("gbit_per_second", "throughput (Gbit/s)", 2),
            column("vs_direct", "vs direct", 2),
            column("cpu_s_per_gb", "proxy CPU (s per GB)", 2),
            column("machine_cpu_s_per_gb", "machine CPU (s per GB)", 2),
        ],
    );
    let mean = |samples: &[Sample], f: &dyn Fn(&Sample) -> f64| {
        samples.iter().map(f).sum::<f64>() / samples.len().max(1) as f64
    };
    let direct = mean(&targets[0].1, &|s| s.bits_per_second);
    for (target, samples) in &targets {
        let bps = mean(samples, &|s| s.bits_per_second);
        let mut row = Row::new(*target);
        row.set("gbit_per_second", bps / 1e9)
            .set("vs_direct", bps / direct)
            .set(
                "machine_cpu_s_per_gb",
                mean(samples, &|s| s.machine_cpu_seconds / (s.bytes / 1e9)),
            );
        if *target != "direct" {
            row.set(
                "cpu_s_per_gb",
                mean(samples, &|s| s.proxy_cpu_seconds / (s.bytes / 1e9)),
            );
        }
        section.rows.push(row);
    }
    if let Some(r) = section.ratio("gbit_per_second", "shunt (sockmap)", "shunt (splice)") {
        section.notes.push(format!(
            "shunt (sockmap) / shunt (splice): throughput {r:.2}."
        ));
    }
    let kernel_path = daemon.counter("ebpf", "kernel_path_balanced")?;
    ensure!(
        kernel_path >= u64::from(plan.rounds),
        "shunt (kernel path): only {kernel_path} connections took it"
    );
    // Each pair's own ratio, the median of them.
    let paired = |f: &dyn Fn(&Sample) -> f64| {
        let ratios: Vec<f64> = targets[1]
            .1
            .iter()
            .zip(&targets[0].1)
            .map(|(kernel, direct)| f(kernel) / f(direct))
            .collect();
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        format!("{:.2} (pairs: {})", median(&ratios), each.join(", "))
    };
    section.notes.push(format!(
        "shunt (kernel path) / direct, median of {} back-to-back pairs' ratios: throughput {}; \
         machine CPU per GB {}.",
        PAIRS * plan.rounds as usize,
        paired(&|s| s.bits_per_second),
        paired(&|s| s.machine_cpu_seconds / s.bytes)
    ));
    if let Some(r) = section.ratio("gbit_per_second", "shunt (splice)", "HAProxy (mode tcp)") {
        section
            .notes
            .push(format!("shunt (splice) / HAProxy: throughput {r:.2}."));
    }
    section.notes.push(
        "Proxy CPU is the proxy's processes only: with sockmap the bytes are moved by softirqs \
         and the kernel's psock workqueue, charged to no process; machine CPU (everything busy \
         on the machine, iperf3 included) is the comparable figure, on a quiet machine."
            .to_string(),
    );
    if !plan.peers {
        section.notes.push(peers::SKIPPED.to_string());
    }
    Ok(section)
}

/// Waits until a reload has put the Service on the kernel path (`on`) or taken it off: the
/// daemon brings the kernel's maps up to date within a second of a reload.
fn wait_kernel_path(daemon: &Daemon, on: bool) -> anyhow::Result<()> {
    fixture::until(
        "the kernel path to follow the reload",
        Duration::from_secs(5),
        || {
            let summary: shunt::admin::api::KernelPathSummary = daemon.ctl_as(&["kernel-path"])?;
            Ok(summary.destinations.iter().any(|d| d.path == "kernel") == on)
        },
    )
}

pub(super) fn run(
    sandbox: &Sandbox,
    pod: &Pod,
    host: &str,
    port: u16,
    proxy_pid: Option<u32>,
    plan: &Plan,
) -> anyhow::Result<Sample> {
    let cpu = || proxy_pid.map(tree_cpu_seconds).transpose();
    let before = cpu()?.unwrap_or(0.0);
    let machine_before = machine_busy_seconds()?;
    let mut cmd = Command::new("iperf3");
    cmd.args([
        "-c",
        host,
        "-p",
        &port.to_string(),
        "-t",
        &plan.seconds.to_string(),
        "-J",
    ]);
    let out = sandbox.run_in_pod(pod, cmd, Duration::from_secs(u64::from(plan.seconds) + 30))?;
    ensure!(
        out.status.success(),
        "iperf3 to {host}:{port} failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let after = cpu()?.unwrap_or(0.0);
    let machine_after = machine_busy_seconds()?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let received = &report["end"]["sum_received"];
    Ok(Sample {
        bits_per_second: received["bits_per_second"]
            .as_f64()
            .context("no throughput")?,
        proxy_cpu_seconds: after - before,
        machine_cpu_seconds: machine_after - machine_before,
        bytes: received["bytes"].as_f64().context("no byte count")?,
    })
}
