//! The kernel path with real peers (openssl, the probe, tonic): connections to a destination
//! known to carry TLS or opaque TCP go from connect() straight to an endpoint, never through
//! shunt's listener, yet are recorded; fault rules, learning and a killed daemon behave as
//! the README says. Run as root.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use anyhow::{Context, ensure};
use shunt::{
    admin::api::{ConnRecord, KernelPathSummary, ServiceSummary, Verdict},
    config::{
        Config, KernelPathMode, ServiceProtocol,
        fault::{FaultRule, Percentage, TcpFault},
    },
};
use shunt_tests::{
    daemon::{Daemon, Options},
    fixture::{self, vip},
    grpc,
    probe::{self, Seen},
    sandbox::{Pod, Sandbox},
    telemetry, tls,
};

const PORT: u16 = 7000;

/// Options with Service `backend` at [`vip`]`(port)` declared `protocol`, and `change` made.
fn declared(
    port: u16,
    endpoints: &[SocketAddr],
    protocol: ServiceProtocol,
    change: impl FnOnce(&mut Config),
) -> Options {
    fixture::service("backend", vip(port), endpoints).with_config(|c| {
        c.services[0].protocol = protocol;
        change(c);
    })
}

/// A client pod and `n` backend pods each running a probe server on `port`.
fn probes(n: usize, port: u16) -> anyhow::Result<(Sandbox, Pod, Vec<SocketAddr>)> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let mut endpoints = Vec::new();
    for i in 0..n {
        let pod = sandbox.add_pod(&format!("backend{i}"))?;
        let listen = SocketAddr::new(pod.ipv4.into(), port);
        probe::serve(&sandbox, &pod, listen)?;
        endpoints.push(listen);
    }
    Ok((sandbox, client, endpoints))
}

/// Waits until shunt lists `n` closed connections and returns them.
fn closed(daemon: &Daemon, n: usize) -> anyhow::Result<Vec<ConnRecord>> {
    fixture::eventually(
        &format!("{n} closed connections"),
        Duration::from_secs(10),
        || {
            let closed = daemon.closed_conns()?;
            ensure!(closed.len() >= n, "{} closed: {closed:?}", closed.len());
            Ok(Some(closed))
        },
    )
}

/// The connection went from the application straight to the endpoint: the server saw the
/// application's own address and port, and getpeername() answered with the address asked for.
fn went_straight(seen: &Seen, asked: SocketAddr) -> anyhow::Result<()> {
    seen.ok()?;
    ensure!(!seen.was_redirected(), "went through shunt: {seen:?}");
    ensure!(
        seen.server_saw.is_some() && seen.server_saw == seen.local,
        "the server saw another connection than the application's: {seen:?}"
    );
    ensure!(
        seen.peername.as_deref() == Some(asked.to_string().as_str()),
        "getpeername() did not answer {asked}: {seen:?}"
    );
    Ok(())
}

fn kernel_path(daemon: &Daemon) -> anyhow::Result<KernelPathSummary> {
    daemon.ctl_as(&["kernel-path"])
}

#[test]
fn tls_to_a_declared_service_reaches_each_endpoint_in_turn_without_shunt() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let (cert, key) = tls::self_signed(&sandbox.scratch_dir("tls")?, "greeter.test")?;
    let mut endpoints = Vec::new();
    for i in 0..3 {
        let pod = sandbox.add_pod(&format!("backend{i}"))?;
        tls::serve(&sandbox, &pod, 8443, &cert, &key)?;
        endpoints.push(SocketAddr::new(pod.ipv4.into(), 8443));
    }
    let options = declared(443, &endpoints, ServiceProtocol::Tls, |_| {});
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;

    for _ in 0..3 {
        let out = tls::connect(&sandbox, &client, vip(443), "greeter.test", &cert)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.success(), "s_client failed: {stderr}");
        assert!(stderr.contains("Verification: OK"), "{stderr}");
    }

    let conns = closed(&daemon, 3)?;
    let upstreams: BTreeSet<SocketAddr> = conns.iter().filter_map(|c| c.upstream).collect();
    assert_eq!(upstreams, endpoints.iter().copied().collect(), "{conns:?}");
    for conn in &conns {
        assert_eq!(conn.verdict, Some(Verdict::KernelPath), "{conn:?}");
        assert!(conn.flags.iter().any(|f| f == "KP"), "{conn:?}");
        assert_eq!(conn.service.as_deref(), Some("backend"));
        assert_eq!(conn.original_dst, vip(443));
        assert!(
            conn.bytes_from_client > 0 && conn.bytes_to_client > 0,
            "{conn:?}"
        );
    }
    // Nothing reached shunt's listener.
    assert_eq!(daemon.counter("ebpf", "redirected")?, 0);
    assert_eq!(daemon.counter("proxy", "verdict_tls")?, 0);
    assert_eq!(daemon.counter("ebpf", "kernel_path_balanced")?, 3);
    let services: Vec<ServiceSummary> = daemon.ctl_as(&["services"])?;
    let per_endpoint: Vec<u64> = services[0]
        .endpoints
        .iter()
        .map(|e| e.connections_total)
        .collect();
    assert_eq!(per_endpoint, [1, 1, 1], "{services:?}");
    let listed = kernel_path(&daemon)?;
    assert_eq!(listed.destinations.len(), 1, "{listed:?}");
    assert_eq!(listed.destinations[0].reason, "declared tls");
    assert_eq!(listed.destinations[0].path, "kernel");
    Ok(())
}

#[test]
fn the_kernel_path_is_one_connection_and_records_the_same_bytes_as_the_proxy() -> anyhow::Result<()>
{
    let (sandbox, client, endpoints) = probes(2, PORT)?;
    let proxied = SocketAddr::new(vip(PORT).ip(), PORT + 1);
    let mut options = declared(PORT, &endpoints, ServiceProtocol::Tcp, |c| {
        // The same endpoints behind a second address, through the proxy.
        c.services
            .push(fixture::service_config("proxied", proxied, &endpoints));
    });
    options.access_log = true;
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;

    let payload = ["--payload-bytes", "100000"];
    let mut servers = BTreeSet::new();
    for _ in 0..4 {
        let seen = probe::connect_once(&sandbox, &client, vip(PORT), &payload)?;
        went_straight(&seen, vip(PORT))?;
        assert_eq!(seen.payload_echoed, Some(true), "{seen:?}");
        servers.insert(seen.server.clone());
    }
    assert_eq!(
        servers.len(),
        2,
        "round-robin over both endpoints: {servers:?}"
    );
    let through_proxy = probe::connect_once(&sandbox, &client, proxied, &payload)?;
    assert!(through_proxy.was_redirected(), "{through_proxy:?}");

    let conns = closed(&daemon, 5)?;
    let (kernel, proxy): (Vec<&ConnRecord>, Vec<&ConnRecord>) = conns
        .iter()
        .partition(|c| c.verdict == Some(Verdict::KernelPath));
    assert_eq!((kernel.len(), proxy.len()), (4, 1), "{conns:?}");
    for conn in &kernel {
        assert_eq!(
            (conn.bytes_from_client, conn.bytes_to_client),
            (proxy[0].bytes_from_client, proxy[0].bytes_to_client),
            "the kernel path counts what the proxy counts: {conn:?} vs {:?}",
            proxy[0]
        );
        assert_eq!(conn.pod, "client");
    }

    let lines = fixture::eventually("5 access-log lines", Duration::from_secs(10), || {
        let lines = telemetry::access_log(&daemon.access_log)?;
        ensure!(lines.len() >= 5, "{lines:?}");
        Ok(Some(lines))
    })?;
    let flagged = lines
        .iter()
        .filter(|l| {
            l["response_flags"]
                .as_str()
                .is_some_and(|f| f.contains("KP"))
        })
        .count();
    assert_eq!(flagged, 4, "{lines:?}");
    let metrics = telemetry::scrape(daemon.telemetry_addr("metrics")?)?;
    assert_eq!(
        metrics.sum(
            "shunt_connections_closed_total",
            &[("service", "backend"), ("response_flags", "KP")]
        ),
        4.0
    );
    Ok(())
}

#[test]
fn an_l4_fault_takes_a_service_off_the_kernel_path_at_once() -> anyhow::Result<()> {
    let (sandbox, client, endpoints) = probes(1, PORT)?;
    let options = declared(PORT, &endpoints, ServiceProtocol::Tcp, |_| {});
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;
    went_straight(
        &probe::connect_once(&sandbox, &client, vip(PORT), &[])?,
        vip(PORT),
    )?;

    let reset = FaultRule {
        tcp: Some(TcpFault {
            connect_delay: None,
            reset_percentage: Some(Percentage(100.0)),
        }),
        ..fixture::fault_rule("reset-all", "backend")
    };
    daemon.set_faults(&serde_yaml_ng::to_string(&vec![reset])?)?;
    // No waiting: the rule is in the kernel's maps before `faults set` returns.
    let faulted = probe::connect(&sandbox, &client, vip(PORT), 1)?.remove(0);
    ensure!(faulted.error.is_some(), "not reset: {faulted:?}");
    let listed = kernel_path(&daemon)?;
    assert_eq!(listed.destinations[0].path, "proxy (fault rule reset-all)");

    daemon.ctl(&["faults", "clear", "reset-all"])?;
    went_straight(
        &probe::connect_once(&sandbox, &client, vip(PORT), &[])?,
        vip(PORT),
    )?;
    Ok(())
}

#[test]
fn a_learned_tls_destination_takes_the_kernel_path_until_it_speaks_h2c() -> anyhow::Result<()> {
    const LEARN_AFTER: usize = 8;
    const SAMPLE_EVERY: usize = 64;
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let backend = sandbox.add_pod("backend")?;
    let (cert, key) = tls::self_signed(&sandbox.scratch_dir("tls")?, "greeter.test")?;
    let tls_server = tls::serve(&sandbox, &backend, 8443, &cert, &key)?;
    let endpoint = SocketAddr::new(backend.ipv4.into(), 8443);
    let options = fixture::service("backend", vip(8443), &[endpoint])
        .with_config(|c| c.intercept.kernel_path = KernelPathMode::Learned);
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;
    let tls_once = || -> anyhow::Result<()> {
        let out = tls::connect(&sandbox, &client, vip(8443), "greeter.test", &cert)?;
        ensure!(
            out.status.success(),
            "s_client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };

    for _ in 0..LEARN_AFTER {
        tls_once()?;
    }
    let learned = fixture::eventually("the destination learned", Duration::from_secs(5), || {
        let listed = kernel_path(&daemon)?;
        ensure!(!listed.destinations.is_empty(), "{listed:?}");
        Ok(Some(listed))
    })?;
    assert_eq!(
        learned.destinations[0].reason, "learned: tls",
        "{learned:?}"
    );
    assert_eq!(learned.destinations[0].sample_every, SAMPLE_EVERY as u32);
    assert_eq!(daemon.counter("proxy", "verdict_tls")?, LEARN_AFTER as u64);
    // The first connection after learning is a sample through the proxy; the rest go
    // straight.
    for _ in 0..4 {
        tls_once()?;
    }
    closed(&daemon, LEARN_AFTER + 4)?;
    assert_eq!(
        daemon.counter("proxy", "verdict_tls")?,
        LEARN_AFTER as u64 + 1
    );
    assert_eq!(daemon.counter("ebpf", "kernel_path_balanced")?, 3);

    // The destination starts speaking h2c: a sample notices within SAMPLE_EVERY connections.
    sandbox.kill(tls_server);
    grpc::tonic_serve(&sandbox, &backend, "backend", 8443)?;
    let mut calls = 0;
    while !kernel_path(&daemon)?.destinations.is_empty() {
        ensure!(
            calls < SAMPLE_EVERY,
            "still on the kernel path after {calls} h2c connections"
        );
        grpc::tonic_call(&sandbox, &client, vip(8443), 1)?;
        calls += 1;
    }
    assert!(daemon.counter("proxy", "verdict_h2")? >= 1);
    // Back through the proxy for good.
    grpc::tonic_call(&sandbox, &client, vip(8443), 1)?;
    let last = daemon.closed_conns()?;
    let last = last.last().context("no connection")?;
    assert_eq!(last.verdict, Some(Verdict::H2), "{last:?}");
    Ok(())
}

#[test]
fn an_endpoint_that_refuses_leaves_the_kernel_path_after_its_first_refusals() -> anyhow::Result<()>
{
    let (sandbox, client, mut endpoints) = probes(2, PORT)?;
    // A third endpoint with nothing listening: the kernel answers its connects with a reset.
    let refusing = SocketAddr::new(sandbox.add_pod("refusing")?.ipv4.into(), PORT);
    endpoints.push(refusing);
    let options = declared(PORT, &endpoints, ServiceProtocol::Tcp, |_| {});
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;

    // Back to back in one process, as fast as the client can: refused connects are those the
    // kernel made before shunt read the first refusal's report and rewrote the map.
    let first = probe::connect(&sandbox, &client, vip(PORT), 60)?;
    let refused = first.iter().filter(|s| s.error.is_some()).count();
    eprintln!("refused connects of 60 back to back, one endpoint of 3 refusing: {refused}");
    ensure!(
        refused >= 1,
        "round-robin never picked the refusing endpoint: {first:?}"
    );
    for seen in first.iter().filter(|s| s.error.is_none()) {
        went_straight(seen, vip(PORT))?;
    }
    fixture::until(
        "the refusing endpoint off the kernel path, each refusal counted on it",
        Duration::from_secs(5),
        || {
            let listed = kernel_path(&daemon)?;
            let entry = listed.destinations.first().context("nothing listed")?;
            let services: Vec<ServiceSummary> = daemon.ctl_as(&["services"])?;
            let failed: Vec<(SocketAddr, u64)> = services[0]
                .endpoints
                .iter()
                .filter(|e| e.failed > 0)
                .map(|e| (e.addr, e.failed))
                .collect();
            Ok(entry.endpoints.len() == 2
                && !entry.endpoints.contains(&refusing)
                && failed == [(refusing, refused as u64)])
        },
    )?;

    // The connects after it all reach a live endpoint, still without the proxy.
    let second = probe::connect(&sandbox, &client, vip(PORT), 30)?;
    for seen in &second {
        went_straight(seen, vip(PORT))?;
    }
    assert_eq!(daemon.counter("ebpf", "redirected")?, 0);
    Ok(())
}

#[test]
fn a_killed_daemon_leaves_kernel_path_connections_alone_and_fails_open() -> anyhow::Result<()> {
    let (sandbox, client, endpoints) = probes(1, PORT)?;
    let options = declared(PORT, &endpoints, ServiceProtocol::Tcp, |_| {});
    let mut daemon = Daemon::start(&sandbox, &[&client], &options)?;
    let held = probe::connect_held(&sandbox, &client, vip(PORT), Duration::from_secs(2))?;
    fixture::until(
        "the held connection recorded",
        Duration::from_secs(5),
        || {
            Ok(daemon
                .ctl_as::<Vec<ConnRecord>>(&["conns"])?
                .iter()
                .any(|c| c.verdict == Some(Verdict::KernelPath)))
        },
    )?;
    daemon.kill9();
    went_straight(&held.finish(&sandbox)?, vip(PORT))?;
    // Fail-open: with shunt gone, connections go where they were sent.
    let direct = probe::connect_once(&sandbox, &client, endpoints[0], &[])?;
    assert!(!direct.was_redirected(), "{direct:?}");
    Ok(())
}

#[test]
fn kernel_path_off_sends_every_connection_through_the_proxy() -> anyhow::Result<()> {
    let (sandbox, client, endpoints) = probes(1, PORT)?;
    let options = declared(PORT, &endpoints, ServiceProtocol::Tcp, |c| {
        c.intercept.kernel_path = KernelPathMode::Off;
    });
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;
    let seen = probe::connect_once(&sandbox, &client, vip(PORT), &[])?;
    assert!(seen.was_redirected(), "{seen:?}");
    let listed = kernel_path(&daemon)?;
    assert_eq!(listed.mode, "off");
    assert!(listed.destinations.is_empty() && listed.ports.is_empty());
    Ok(())
}
