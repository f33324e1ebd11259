//! `intercept.local_fast_path` on and off in the same run: two sandboxes, each a client pod,
//! three tonic greeters and an iperf3 server, one shunt with the fast path and one without,
//! rounds interleaved. What it should save is the loopback TCP/IP hop between the client and
//! shunt's in-pod socket; with it on, opaque bytes are copied rather than spliced (splice does
//! not read what the fast path queues), which is part of what is measured.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
};

use anyhow::ensure;

use super::{
    Plan,
    grpc::{self, LoadShape, Target, mean},
    passthrough::{self, Sample},
    process::tree_cpu_seconds,
    report::{Row, Section, column},
};
use crate::{
    daemon::{Daemon, Options},
    fixture, probe,
    sandbox::{Pod, Sandbox},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const GRPC_PORT: u16 = 50051;
const IPERF_PORT: u16 = 5201;

/// One sandbox with its pods, before its daemon starts.
struct Side {
    name: &'static str,
    fast_path: bool,
    sandbox: Sandbox,
    client: Pod,
    options: Options,
}

impl Side {
    fn new(name: &'static str, fast_path: bool) -> anyhow::Result<Side> {
        let sandbox = Sandbox::new()?;
        let client = sandbox.add_pod("client")?;
        let mut greeters = Vec::new();
        for i in 0..3 {
            let pod = sandbox.add_pod(&format!("greeter{i}"))?;
            crate::grpc::tonic_serve(&sandbox, &pod, &format!("greeter-{i}"), GRPC_PORT)?;
            greeters.push(SocketAddr::new(pod.ipv4.into(), GRPC_PORT));
        }
        let iperf = sandbox.add_pod("iperf")?;
        let mut server = Command::new("iperf3");
        server
            .args(["-s", "-p", &IPERF_PORT.to_string()])
            .stdout(std::process::Stdio::null());
        let pid = sandbox.spawn_in_pod(&iperf, server)?;
        probe::wait_listening(&sandbox, &iperf, IPERF_PORT, pid)?;
        let iperf_endpoint = SocketAddr::new(iperf.ipv4.into(), IPERF_PORT);
        let options = Options {
            log: Some("info"),
            ..Options::default()
        }
        .with_config(|c| {
            c.intercept.local_fast_path = fast_path;
            c.services = vec![
                fixture::service_config(
                    "greeter",
                    SocketAddr::new(VIP.into(), GRPC_PORT),
                    &greeters,
                ),
                fixture::service_config(
                    "iperf",
                    SocketAddr::new(VIP.into(), IPERF_PORT),
                    &[iperf_endpoint],
                ),
            ];
        });
        Ok(Side {
            name,
            fast_path,
            sandbox,
            client,
            options,
        })
    }
}

#[derive(Default)]
struct Tally {
    rates: Vec<f64>,
    cpu_per_10k: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    iperf: Vec<Sample>,
}

pub fn on_and_off(plan: &Plan) -> anyhow::Result<Section> {
    crate::require_root()?;
    let sides = [
        Side::new("shunt (fast path off)", false)?,
        Side::new("shunt (fast path on)", true)?,
    ];
    let mut daemons = Vec::new();
    for side in &sides {
        let daemon = Daemon::start(&side.sandbox, &[&side.client], &side.options)?;
        let status = daemon.status()?;
        let expected = if side.fast_path { "on" } else { "off" };
        ensure!(
            status.local_fast_path == expected,
            "{}: local_fast_path is {} in shunt status",
            side.name,
            status.local_fast_path
        );
        daemons.push(daemon);
    }

    let mut tallies: Vec<Tally> = sides.iter().map(|_| Tally::default()).collect();
    for round in 1..=plan.rounds {
        println!("  round {round}/{}", plan.rounds);
        // Alternate which side goes first, so a machine that warms up or gets busier within
        // a round does not favour one of them.
        let mut order: Vec<usize> = (0..sides.len()).collect();
        if round % 2 == 0 {
            order.reverse();
        }
        for i in order {
            let (side, daemon, tally) = (&sides[i], &daemons[i], &mut tallies[i]);
            let pid = daemon.pid()?;
            let target = Target {
                name: side.name.into(),
                pod: &side.client,
                to: vec![format!("{VIP}:{GRPC_PORT}").parse()?],
                proxy_pid: Some(pid),
            };
            let before = tree_cpu_seconds(pid)?;
            let closed = grpc::load(
                &side.sandbox,
                &target,
                &LoadShape::few_busy(plan.seconds),
                None,
            )?;
            let after = tree_cpu_seconds(pid)?;
            tally.rates.push(closed.calls_per_second);
            tally
                .cpu_per_10k
                .push((after - before) / closed.ok as f64 * 10_000.0);
            let open = grpc::load(
                &side.sandbox,
                &target,
                &LoadShape::few_busy(plan.seconds),
                Some(plan.grpc_rate),
            )?;
            tally.p50.push(open.p50_us);
            tally.p99.push(open.p99_us);
            let sample = passthrough::run(
                &side.sandbox,
                &side.client,
                &VIP.to_string(),
                IPERF_PORT,
                Some(pid),
                plan,
            )?;
            println!(
                "    {:22} {:7.0} calls/s, {:.3} CPU-s/10k, p50 {:.2} ms; iperf3 {:.2} Gbit/s",
                side.name,
                closed.calls_per_second,
                tally.cpu_per_10k.last().copied().unwrap_or_default(),
                open.p50_us / 1000.0,
                sample.bits_per_second / 1e9
            );
            tally.iperf.push(sample);
        }
    }

    // The figures only mean something if the "on" side's bytes took the fast path and the
    // "off" side's never did.
    for (side, daemon) in sides.iter().zip(&daemons) {
        let redirected = daemon.counter("ebpf", "local_fast_path_redirected")?;
        ensure!(
            (redirected > 0) == side.fast_path,
            "{}: {redirected} messages redirected by the fast path",
            side.name
        );
    }

    let mut section = Section::new(
        "local_fast_path",
        format!(
            "intercept.local_fast_path off vs on: unary gRPC (3 tonic backends, latency at {} calls/s) and iperf3 passthrough, {} s per run",
            plan.grpc_rate, plan.seconds
        ),
        vec![
            column("calls_per_second", "gRPC calls/s", 0),
            column("cpu_s_per_10k", "proxy CPU (s / 10k calls)", 3),
            column("p50_ms", "p50 (ms)", 2),
            column("p99_ms", "p99 (ms)", 2),
            column("gbit_per_second", "iperf3 (Gbit/s)", 2),
            column("cpu_s_per_gb", "proxy CPU (s per GB)", 2),
            column("machine_cpu_s_per_gb", "machine CPU (s per GB)", 2),
        ],
    );
    for (side, tally) in sides.iter().zip(&tallies) {
        let per_gb = |f: &dyn Fn(&Sample) -> f64| {
            mean(
                &tally
                    .iperf
                    .iter()
                    .map(|s| f(s) / (s.bytes / 1e9))
                    .collect::<Vec<_>>(),
            )
        };
        let mut row = Row::new(side.name);
        row.set("calls_per_second", mean(&tally.rates))
            .set("cpu_s_per_10k", mean(&tally.cpu_per_10k))
            .set("p50_ms", mean(&tally.p50) / 1000.0)
            .set("p99_ms", mean(&tally.p99) / 1000.0)
            .set(
                "gbit_per_second",
                mean(
                    &tally
                        .iperf
                        .iter()
                        .map(|s| s.bits_per_second / 1e9)
                        .collect::<Vec<_>>(),
                ),
            )
            .set("cpu_s_per_gb", per_gb(&|s| s.proxy_cpu_seconds))
            .set("machine_cpu_s_per_gb", per_gb(&|s| s.machine_cpu_seconds));
        section.rows.push(row);
    }
    let (on, off) = ("shunt (fast path on)", "shunt (fast path off)");
    if let (Some(rate), Some(cpu), Some(tput)) = (
        section.ratio("calls_per_second", on, off),
        section.ratio("cpu_s_per_10k", on, off),
        section.ratio("gbit_per_second", on, off),
    ) {
        section.notes.push(format!(
            "on / off: gRPC calls/s {rate:.2}, proxy CPU per call {cpu:.2}, iperf3 throughput {tput:.2}."
        ));
    }
    section.notes.push(
        "With the fast path on, opaque bytes are copied through userspace (splice cannot read \
         what the fast path queues); off, they are spliced."
            .to_string(),
    );
    Ok(section)
}
