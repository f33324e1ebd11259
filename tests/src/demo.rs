//! The local sandbox demo (`cargo xtask demo`): a client pod's connection to a backend pod
//! is transparently redirected through shunt, which forwards it from inside the client pod.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use shunt::admin::api::Verdict;

use crate::{
    daemon::{self, Daemon},
    fixture, grpc, probe,
    sandbox::Sandbox,
    telemetry, tls,
};

const STEPS: usize = 11;
const GRPC_VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 11)), 50051);
const GRPC_CALLS: usize = 300;
const TLS_VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 443);
const TLS_NAME: &str = "greeter.test";
const BACKEND_PORT: u16 = 8080;

fn step(n: usize, what: &str) {
    println!("[{n}/{STEPS}] {what}");
}

/// Runs the demo; everything it creates is removed when it returns, fails or is interrupted.
pub fn run() -> anyhow::Result<()> {
    crate::require_root()?;
    crate::interrupts::clean_up_on_signal()?;
    let sandbox = Sandbox::new()?;
    let result = show(&sandbox);
    sandbox.cleanup();
    println!(
        "cleaned up: namespaces, bridge, cgroup and BPF pins of sandbox {} removed",
        sandbox.id()
    );
    result
}

fn show(sandbox: &Sandbox) -> anyhow::Result<()> {
    let client = sandbox.add_pod("client")?;
    let backend = sandbox.add_pod("backend")?;
    step(
        1,
        &format!(
            "sandbox {}: pod `client` ({}, {}) and pod `backend` ({}, {}) on bridge shb{}",
            sandbox.id(),
            client.ipv4,
            client.ipv6,
            backend.ipv4,
            backend.ipv6,
            sandbox.id()
        ),
    );

    let listen = SocketAddr::new(backend.ipv4.into(), BACKEND_PORT);
    probe::serve(sandbox, &backend, listen)?;
    step(
        2,
        &format!("backend listening on {listen}: it replies with the source address it sees"),
    );

    let (cert, key) = tls::self_signed(&sandbox.scratch_dir("tls")?, TLS_NAME)?;
    tls::serve(sandbox, &backend, 8443, &cert, &key)?;
    let greeters = grpc::greeters(sandbox, 3, 50051)?;
    let tls_endpoint = SocketAddr::new(backend.ipv4.into(), 8443);
    let options = daemon::Options {
        access_log: true,
        ..daemon::Options::default()
    }
    .with_config(|c| {
        c.services = vec![
            fixture::service_config("greeter-tls", TLS_VIP, &[tls_endpoint]),
            fixture::service_config("greeter", GRPC_VIP, &greeters),
        ];
    });
    let daemon = Daemon::start(sandbox, &[&client], &options)?;
    step(
        3,
        &format!(
            "shunt running: programs attached to {}, pod `client` enrolled, pins under {}",
            sandbox.cgroup().display(),
            daemon.pin_dir.display()
        ),
    );

    step(
        4,
        &format!("client connects to {listen} (the application knows nothing of shunt)"),
    );
    let held = probe::connect_held(sandbox, &client, listen, Duration::from_millis(1500))?;
    let conn = daemon.connection_with_upstream(Duration::from_secs(5))?;
    println!(
        "      shunt accepted it on its in-pod listener: pod={} client={} original destination={} upstream={}",
        conn.pod,
        conn.client,
        conn.original_dst,
        conn.upstream.map_or("?".into(), |u| u.to_string()),
    );
    let seen = held.finish(sandbox)?;
    if let Some(error) = &seen.error {
        bail!("the client's connection failed: {error}");
    }

    step(5, "what each side saw");
    println!(
        "      client getpeername(): {}  (the address it asked for, not shunt's listener)",
        seen.peername.as_deref().unwrap_or("?")
    );
    println!(
        "      backend saw source:   {}  (the client pod's own address)",
        seen.server_saw.as_deref().unwrap_or("?")
    );
    println!(
        "      echo through shunt:   {:?}",
        seen.echo.as_deref().unwrap_or("")
    );

    step(
        6,
        &format!(
            "TLS passthrough: openssl s_client in `client` → Service greeter-tls at {TLS_VIP} (nothing listens there), SNI {TLS_NAME}"
        ),
    );
    let vip = TLS_VIP;
    let out = tls::connect(sandbox, &client, vip, TLS_NAME, &cert)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !stderr.contains("Verification: OK") {
        bail!("the TLS connection through shunt failed:\n{stderr}");
    }
    println!(
        "      openssl: certificate for {TLS_NAME} verified — the handshake reached the real server untouched"
    );
    let record = daemon
        .closed_conn(
            "shunt records the connection",
            Duration::from_secs(5),
            |c| c.verdict == Some(Verdict::Tls),
        )
        .with_context(|| format!("shunt's log:\n{}", daemon.log_text()))?;
    println!(
        "      shunt: verdict={} sni={} alpn={} service={} upstream={} bytes in/out={}/{}",
        record.verdict.map_or("?", Verdict::as_str),
        record.sni.as_deref().unwrap_or("-"),
        record.alpn.join(","),
        record.service.as_deref().unwrap_or("-"),
        record.upstream.map_or("-".into(), |u| u.to_string()),
        record.bytes_from_client,
        record.bytes_to_client,
    );

    step(
        7,
        &format!(
            "gRPC: a Python grpcio client in `client` makes {GRPC_CALLS} calls on ONE channel (one TCP connection) to Service greeter at {GRPC_VIP}"
        ),
    );
    let calls = grpc::call(sandbox, &client, GRPC_VIP, GRPC_CALLS)?;
    if calls.ok != GRPC_CALLS {
        bail!(
            "only {} of {GRPC_CALLS} calls succeeded: {calls:?}",
            calls.ok
        );
    }
    let mut by_backend: Vec<_> = calls.by_backend.iter().collect();
    by_backend.sort();
    for (backend, n) in by_backend {
        println!("      {backend}: {n} calls");
    }
    println!(
        "      shunt balanced per call (per HTTP/2 stream), not per connection as kube-proxy does"
    );

    step(
        8,
        "fault injection at runtime: `shunt faults set` with a delay, then an abort, then cleared",
    );
    show_faults(sandbox, &daemon, &client)?;

    step(9, "counters of the kernel programs and the proxy");
    show_command(&daemon, &["stats"], usize::MAX)?;

    step(10, "telemetry: health, Prometheus metrics, access log");
    show_telemetry(&daemon)?;

    step(11, "the command line");
    for (args, rows) in [
        (&["status"][..], usize::MAX),
        (&["pods"], usize::MAX),
        (&["streams"], 3),
        (&["log-level"], usize::MAX),
        (&["services"], usize::MAX),
        (&["conns", "--closed"], usize::MAX),
    ] {
        show_command(&daemon, args, rows)?;
    }
    Ok(())
}

/// `/ready`, the metrics of the traffic above, and an access-log line of each kind.
fn show_telemetry(daemon: &Daemon) -> anyhow::Result<()> {
    let health = daemon.telemetry_addr("health")?;
    let (status, body) = telemetry::http_get(health, "/ready", "*/*")?;
    println!("      GET http://{health}/ready: {status} {}", body.trim());
    let metrics = daemon.telemetry_addr("metrics")?;
    let scrape = telemetry::scrape(metrics)?;
    println!("      GET http://{metrics}/metrics (excerpt):");
    for line in scrape.text.lines().filter(|l| {
        (l.starts_with("shunt_streams_total") && l.contains("service=\"greeter\""))
            || l.starts_with("shunt_connections_opened_total")
            || l.starts_with("shunt_ebpf_redirects_total")
    }) {
        println!("        {line}");
    }
    // Written by a thread of its own: give it a moment to catch up.
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&daemon.access_log)?;
    println!(
        "      access log {}: {} lines, e.g.",
        daemon.access_log.display(),
        text.lines().count()
    );
    let delayed = text
        .lines()
        .find(|l| l.contains("\"response_flags\":\"DI\""));
    let tls = text.lines().find(|l| l.contains("\"protocol\":\"tls\""));
    for line in [delayed, tls].into_iter().flatten() {
        println!("        {line}");
    }
    Ok(())
}

/// Prints `shunt ARGS` and its table, keeping the header and the last `rows` rows.
fn show_command(daemon: &Daemon, args: &[&str], rows: usize) -> anyhow::Result<()> {
    println!("      $ shunt {}", args.join(" "));
    let out = daemon.ctl(args)?;
    let lines: Vec<&str> = out.lines().collect();
    let skip = lines.len().saturating_sub(rows.saturating_add(1));
    for (i, line) in lines.iter().enumerate() {
        if i == 0 || i > skip {
            println!("        {line}");
        } else if i == 1 {
            println!("        … {skip} more");
        }
    }
    Ok(())
}

fn show_faults(
    sandbox: &Sandbox,
    daemon: &Daemon,
    client: &crate::sandbox::Pod,
) -> anyhow::Result<()> {
    let vip: SocketAddr = GRPC_VIP;
    daemon.set_faults(
        "name: greeter-slow\nmatch: {service: greeter, path: /helloworld.Greeter/SayHello}\ndelay: {fixed: 500ms, percentage: 100}\n",
    )?;
    let started = Instant::now();
    let calls = grpc::call(sandbox, client, vip, 4)?;
    // The daemon logs each faulted stream with Envoy's response flag (DI: delay injected).
    let marked = daemon
        .log_text()
        .lines()
        .filter(|l| l.contains("delaying stream") && l.contains("DI"))
        .count();
    println!(
        "      delay 500ms on /helloworld.Greeter/SayHello: 4 calls took {:.1}s, {} ok; {marked} streams marked DI",
        started.elapsed().as_secs_f64(),
        calls.ok
    );
    daemon.set_faults(
        "name: greeter-slow\nmatch: {service: greeter}\nabort: {grpc_status: UNAVAILABLE, percentage: 50}\n",
    )?;
    let calls = grpc::call(sandbox, client, vip, 100)?;
    println!(
        "      abort UNAVAILABLE at 50%: of 100 calls {} ok, {} UNAVAILABLE (\"{}\")",
        calls.ok,
        calls.errors.get("UNAVAILABLE").copied().unwrap_or(0),
        calls.first_error.as_deref().unwrap_or("")
    );
    for line in daemon.ctl(&["faults", "list"])?.lines() {
        println!("      {line}");
    }
    daemon.ctl(&["faults", "clear", "greeter-slow"])?;
    let started = Instant::now();
    let calls = grpc::call(sandbox, client, vip, 4)?;
    println!(
        "      cleared: 4 calls took {:.1}s, {} ok",
        started.elapsed().as_secs_f64(),
        calls.ok
    );
    Ok(())
}
