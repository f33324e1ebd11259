//! Benchmarks in the sandbox (`cargo xtask bench`). Every figure is measured in the same run
//! as the direct path it is compared with, rounds interleaved so drift hits all targets alike.

use std::{fmt::Write as _, net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context, ensure};

use crate::{
    daemon::{Daemon, Options},
    probe,
    sandbox::{Pod, Sandbox},
};

const VIP: &str = "10.96.0.20";
const IPERF_PORT: u16 = 5201;

pub struct Plan {
    pub rounds: u32,
    pub seconds: u32,
}

/// One measured run of one target.
struct Sample {
    target: &'static str,
    bits_per_second: f64,
    /// shunt's CPU seconds during the run (0 for the direct path).
    proxy_cpu_seconds: f64,
    bytes: f64,
}

/// TCP passthrough throughput: direct vs shunt with `splice` vs shunt with `copy`. Returns a
/// markdown table.
pub fn passthrough(plan: &Plan) -> anyhow::Result<String> {
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
    let options = |forwarding: &str| Options {
        intercept_yaml: format!("  forwarding: {forwarding}\n"),
        extra_yaml: format!(
            "services:\n  - name: iperf\n    vip: '{VIP}:{IPERF_PORT}'\n    endpoints: ['{endpoint}']\n"
        ),
        log: Some("info"),
        ..Options::default()
    };
    let daemon = Daemon::start(&sandbox, &[&client], &options("splice"))?;
    let shunt_pid = daemon.ctl_json(&["status"])?["pid"]
        .as_u64()
        .context("no pid")? as u32;

    let mut samples = Vec::new();
    for round in 1..=plan.rounds {
        println!("  round {round}/{}", plan.rounds);
        samples.push(iperf(
            &sandbox,
            &direct_client,
            &backend.ipv4.to_string(),
            "direct",
            None,
            plan,
        )?);
        for forwarding in ["splice", "copy"] {
            daemon.rewrite_config(&[&client], &options(forwarding))?;
            daemon.ctl(&["reload"])?;
            let target = if forwarding == "splice" {
                "shunt (splice)"
            } else {
                "shunt (copy)"
            };
            samples.push(iperf(
                &sandbox,
                &client,
                VIP,
                target,
                Some(shunt_pid),
                plan,
            )?);
        }
    }

    let mean = |target: &str, f: &dyn Fn(&Sample) -> f64| {
        let values: Vec<f64> = samples
            .iter()
            .filter(|s| s.target == target)
            .map(f)
            .collect();
        values.iter().sum::<f64>() / values.len().max(1) as f64
    };
    let direct = mean("direct", &|s| s.bits_per_second);
    let mut table = String::from(
        "| target | throughput (Gbit/s) | vs direct | proxy CPU (s per GB) |\n|---|---|---|---|\n",
    );
    for target in ["direct", "shunt (splice)", "shunt (copy)"] {
        let bps = mean(target, &|s| s.bits_per_second);
        let cpu_per_gb = mean(target, &|s| s.proxy_cpu_seconds / (s.bytes / 1e9));
        let cpu = if target == "direct" {
            "-".to_string()
        } else {
            format!("{cpu_per_gb:.2}")
        };
        let _ = writeln!(
            table,
            "| {target} | {:.2} | {:.2} | {cpu} |",
            bps / 1e9,
            bps / direct
        );
    }
    Ok(table)
}

fn iperf(
    sandbox: &Sandbox,
    pod: &Pod,
    host: &str,
    target: &'static str,
    shunt_pid: Option<u32>,
    plan: &Plan,
) -> anyhow::Result<Sample> {
    let cpu_before = shunt_pid.map(cpu_seconds).transpose()?.unwrap_or(0.0);
    let mut cmd = Command::new("iperf3");
    cmd.args([
        "-c",
        host,
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        &plan.seconds.to_string(),
        "-J",
    ]);
    let out = sandbox.run_in_pod(pod, cmd, Duration::from_secs(u64::from(plan.seconds) + 30))?;
    ensure!(
        out.status.success(),
        "iperf3 to {host} failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let cpu_after = shunt_pid.map(cpu_seconds).transpose()?.unwrap_or(0.0);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let received = &report["end"]["sum_received"];
    let sample = Sample {
        target,
        bits_per_second: received["bits_per_second"]
            .as_f64()
            .context("no throughput")?,
        proxy_cpu_seconds: cpu_after - cpu_before,
        bytes: received["bytes"].as_f64().context("no byte count")?,
    };
    println!(
        "    {target:15} {:6.2} Gbit/s{}",
        sample.bits_per_second / 1e9,
        if shunt_pid.is_some() {
            format!(", shunt CPU {:.2}s", sample.proxy_cpu_seconds)
        } else {
            String::new()
        }
    );
    Ok(sample)
}

/// User + system CPU time of a process, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).context("no utime")?.parse::<f64>()?
        + fields.get(12).context("no stime")?.parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / per_second)
}

/// HTTP/2 request rate through shunt's per-stream balancing vs straight to one backend:
/// `h2load` (one connection, 32 concurrent streams) against nghttpd backends. Returns a
/// markdown table.
pub fn http2_requests(plan: &Plan) -> anyhow::Result<String> {
    crate::require_root()?;
    let sandbox = Sandbox::new()?;
    let direct_client = sandbox.add_pod("direct")?;
    let client = sandbox.add_pod("client")?;
    let mut endpoints = Vec::new();
    for i in 0..3 {
        let pod = sandbox.add_pod(&format!("web{i}"))?;
        crate::web::serve(&sandbox, &pod, 8080, &[("hello", "hello\n")])?;
        endpoints.push(format!("'{}:8080'", pod.ipv4));
    }
    let first_backend = endpoints[0].trim_matches('\'').to_owned();
    let options = Options {
        extra_yaml: format!(
            "services:\n  - name: web\n    vip: '{VIP}:80'\n    endpoints: [{}]\n",
            endpoints.join(", ")
        ),
        log: Some("info"),
        ..Options::default()
    };
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;
    let shunt_pid = daemon.ctl_json(&["status"])?["pid"]
        .as_u64()
        .context("no pid")? as u32;
    let requests = plan.seconds * 20_000;

    let mut rows: Vec<(&str, f64, f64)> = Vec::new();
    for round in 1..=plan.rounds {
        println!("  round {round}/{}", plan.rounds);
        for (target, pod, url) in [
            (
                "direct (one backend)",
                &direct_client,
                format!("http://{first_backend}/hello"),
            ),
            (
                "shunt (per-stream round-robin)",
                &client,
                format!("http://{VIP}/hello"),
            ),
        ] {
            let through_shunt = std::ptr::eq(pod, &client);
            let cpu_before = if through_shunt {
                cpu_seconds(shunt_pid)?
            } else {
                0.0
            };
            let mut h2load = Command::new("h2load");
            h2load.args(["-n", &requests.to_string(), "-c", "1", "-m", "32", &url]);
            let out = sandbox.run_in_pod(pod, h2load, Duration::from_secs(120))?;
            let report = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success() && report.contains(&format!("{requests} succeeded")),
                "h2load to {url}: {report}"
            );
            let rate = report
                .lines()
                .find_map(|l| l.strip_prefix("finished in "))
                .and_then(|l| l.split(", ").nth(1))
                .and_then(|r| r.trim_end_matches(" req/s").parse::<f64>().ok())
                .context("no req/s in h2load's report")?;
            let cpu = if through_shunt {
                cpu_seconds(shunt_pid)? - cpu_before
            } else {
                0.0
            };
            let cpu_per_10k = cpu / f64::from(requests) * 10_000.0;
            println!(
                "    {target:32} {rate:9.0} req/s{}",
                if through_shunt {
                    format!(", shunt CPU {cpu_per_10k:.3}s per 10k")
                } else {
                    String::new()
                }
            );
            rows.push((target, rate, cpu_per_10k));
        }
    }
    let mean = |target: &str, f: fn(&(&str, f64, f64)) -> f64| {
        let values: Vec<f64> = rows.iter().filter(|r| r.0 == target).map(f).collect();
        values.iter().sum::<f64>() / values.len().max(1) as f64
    };
    let direct = mean("direct (one backend)", |r| r.1);
    let mut table = String::from(
        "| target | requests/s | vs direct | proxy CPU (s per 10k requests) |\n|---|---|---|---|\n",
    );
    for target in ["direct (one backend)", "shunt (per-stream round-robin)"] {
        let rate = mean(target, |r| r.1);
        let cpu = if target.starts_with("shunt") {
            format!("{:.3}", mean(target, |r| r.2))
        } else {
            "-".into()
        };
        let _ = writeln!(
            table,
            "| {target} | {rate:.0} | {:.2} | {cpu} |",
            rate / direct
        );
    }
    Ok(table)
}

/// Connection setup: short connections per second (connect, one line each way, close) from a
/// pod, before any program is attached, with the programs attached but the pod not enrolled,
/// and through shunt. Returns a markdown table.
pub fn connection_rates(plan: &Plan) -> anyhow::Result<String> {
    crate::require_root()?;
    let sandbox = Sandbox::new()?;
    let outsider = sandbox.add_pod("outsider")?;
    let client = sandbox.add_pod("client")?;
    let backend = sandbox.add_pod("backend")?;
    let target = SocketAddr::new(backend.ipv4.into(), 8080);
    probe::serve(&sandbox, &backend, target)?;
    // Short connections leave TIME_WAIT entries behind; a proxied one costs two ports in the
    // pod (the application's and shunt's upstream socket): stay well inside the port range.
    let count = plan.seconds * 400;
    let rate = |pod: &Pod| -> anyhow::Result<f64> {
        let started = std::time::Instant::now();
        let seen = probe::connect(&sandbox, pod, target, count)?;
        ensure!(
            seen.iter().all(|s| s.error.is_none()),
            "a connection failed"
        );
        Ok(f64::from(count) / started.elapsed().as_secs_f64())
    };
    println!("  no programs attached");
    let mut bare = Vec::new();
    for _ in 0..plan.rounds {
        bare.push(rate(&outsider)?);
    }
    let options = Options {
        log: Some("info"),
        ..Options::default()
    };
    let _daemon = Daemon::start(&sandbox, &[&client], &options)?;
    let (mut attached, mut proxied) = (Vec::new(), Vec::new());
    for round in 1..=plan.rounds {
        println!("  round {round}/{} with programs attached", plan.rounds);
        attached.push(rate(&outsider)?);
        proxied.push(rate(&client)?);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let base = mean(&bare);
    let mut table = String::from("| target | connections/s | vs no programs |\n|---|---|---|\n");
    for (name, values) in [
        ("non-enrolled pod, no programs attached", &bare),
        ("non-enrolled pod, programs attached", &attached),
        ("enrolled pod, through shunt", &proxied),
    ] {
        let r = mean(values);
        let _ = writeln!(table, "| {name} | {r:.0} | {:.2} |", r / base);
    }
    Ok(table)
}
