//! HTTP/2 and gRPC through shunt with real peers (Python grpcio, h2load, curl, nghttpd):
//! calls from one client connection are balanced per stream over a Service's endpoints.
//! Run as root.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, ensure};
use shunt::{admin::api::ServiceSummary, config::ServiceConfig};
use shunt_tests::{
    daemon::{Daemon, Options},
    fixture::{self, vip},
    grpc::{self, client_and_greeters},
    sandbox::Sandbox,
    web,
};

const PORT: u16 = 50051;

/// Daemon options with Service `greeter` at [`vip`]`(PORT)` in front of `endpoints`.
fn service(endpoints: &[SocketAddr]) -> Options {
    fixture::service("greeter", vip(PORT), endpoints)
}

#[test]
fn grpcio_calls_on_one_channel_are_spread_evenly() -> anyhow::Result<()> {
    let (sandbox, client, endpoints) = client_and_greeters(3, PORT)?;
    let daemon = Daemon::start(&sandbox, &[&client], &service(&endpoints))?;
    let calls = grpc::call(&sandbox, &client, vip(PORT), 3000)?;
    calls.check_even(3000, 3, 0.05)?;
    // All of it over one client connection, detected as HTTP/2.
    assert_eq!(daemon.counter("proxy", "verdict_h2")?, 1);
    assert!(daemon.counter("proxy", "h2_streams")? >= 3000);
    Ok(())
}

#[test]
fn tonic_calls_on_one_channel_are_spread_evenly() -> anyhow::Result<()> {
    let (sandbox, client, endpoints) = grpc::client_and_tonic_greeters(3, PORT)?;
    let daemon = Daemon::start(&sandbox, &[&client], &service(&endpoints))?;
    let calls = grpc::tonic_call(&sandbox, &client, vip(PORT), 3000)?;
    calls.check_even(3000, 3, 0.05)?;
    assert_eq!(daemon.counter("proxy", "verdict_h2")?, 1);
    Ok(())
}

#[test]
fn unreachable_endpoints_become_unavailable_naming_the_upstream() -> anyhow::Result<()> {
    let (sandbox, client, _) = client_and_greeters(0, PORT)?;
    let silent = sandbox.add_pod("silent")?; // nothing listens there
    let endpoint = SocketAddr::new(silent.ipv4.into(), PORT);
    let _daemon = Daemon::start(&sandbox, &[&client], &service(&[endpoint]))?;
    let calls = grpc::call(&sandbox, &client, vip(PORT), 5)?;
    assert_eq!(calls.errors.get("UNAVAILABLE"), Some(&5), "{calls:?}");
    let message = calls.first_error.unwrap_or_default();
    assert!(message.contains(&endpoint.to_string()), "{message}");
    Ok(())
}

#[test]
fn scale_out_by_reload_sends_new_streams_to_new_endpoints() -> anyhow::Result<()> {
    let (sandbox, client, endpoints) = client_and_greeters(6, PORT)?;
    let daemon = Daemon::start(&sandbox, &[&client], &service(&endpoints[..3]))?;
    let before = grpc::call(&sandbox, &client, vip(PORT), 300)?;
    assert_eq!(before.ok, 300);
    assert_eq!(before.by_backend.len(), 3, "{before:?}");

    daemon.rewrite_config(&[&client], &service(&endpoints))?;
    daemon.ctl(&["reload"])?;
    let after = grpc::call(&sandbox, &client, vip(PORT), 600)?;
    after.check_even(600, 6, 0.10)?;
    Ok(())
}

#[test]
fn a_reload_moves_an_open_connections_next_calls_to_the_new_endpoints() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let mut endpoints = Vec::new();
    for name in ["old", "new"] {
        let pod = sandbox.add_pod(name)?;
        grpc::tonic_serve(&sandbox, &pod, name, PORT)?;
        endpoints.push(SocketAddr::new(pod.ipv4.into(), PORT));
    }
    let daemon = Daemon::start(&sandbox, &[&client], &service(&endpoints[..1]))?;

    // One channel, so one HTTP/2 connection, calling every 100 ms across the reload.
    let log = sandbox.scratch_dir("calls")?.join("calls.jsonl");
    grpc::call_every_100ms(&sandbox, &client, vip(PORT), &log)?;
    daemon.eventually("calls answered by old", || {
        Ok(grpc::answered_by(&log).len() >= 3)
    })?;

    let before = grpc::answered_by(&log).len();
    daemon.rewrite_config(&[&client], &service(&endpoints[1..]))?;
    daemon.ctl(&["reload"])?;
    daemon.eventually("the same connection's calls answered by new", || {
        let calls = grpc::answered_by(&log);
        Ok(calls.len() > before + 3 && calls[calls.len() - 3..].iter().all(|b| b == "new"))
    })?;
    let calls = grpc::answered_by(&log);
    ensure!(calls[..before].iter().all(|b| b == "old"), "{calls:?}");
    ensure!(!calls.contains(&"(failed)".to_owned()), "{calls:?}");
    assert_eq!(
        daemon.counter("proxy", "verdict_h2")?,
        1,
        "one client connection"
    );
    Ok(())
}

#[test]
fn h2load_with_grpc_headers_completes_without_errors() -> anyhow::Result<()> {
    let (sandbox, client, endpoints) = client_and_greeters(3, PORT)?;
    let _daemon = Daemon::start(&sandbox, &[&client], &service(&endpoints))?;
    // One gRPC frame: not compressed, 7-byte HelloRequest{name: "probe"}.
    let body = sandbox.scratch_dir("h2load")?.join("request.bin");
    std::fs::write(&body, b"\x00\x00\x00\x00\x07\x0a\x05probe")?;
    let mut h2load = Command::new("h2load");
    h2load
        .args(["-n", "10000", "-c", "1", "-m", "16"])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-d")
        .arg(&body)
        .arg(format!("http://{}/helloworld.Greeter/SayHello", vip(PORT)));
    let out = sandbox.run_in_pod(&client, h2load, Duration::from_secs(120))?;
    let report = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "h2load failed: {report}");
    assert!(
        report.contains("10000 succeeded, 0 failed, 0 errored"),
        "{report}"
    );
    Ok(())
}

#[test]
fn curl_with_prior_knowledge_reaches_a_plain_http2_server() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let web = sandbox.add_pod("web")?;
    web::serve(&sandbox, &web, 8080, &[("hello.txt", "hello over h2\n")])?;
    let endpoint = SocketAddr::new(web.ipv4.into(), 8080);
    let options = fixture::service("greeter", vip(80), &[endpoint]);
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;

    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--http2-prior-knowledge",
        "-w",
        "\n%{http_version} %{http_code}",
    ])
    .arg(format!("http://{}/hello.txt", fixture::VIP));
    let out = sandbox.run_in_pod(&client, curl, Duration::from_secs(20))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text, "hello over h2\n\n2 200");
    assert_eq!(daemon.counter("proxy", "verdict_h2")?, 1);
    Ok(())
}

#[test]
fn sigterm_lets_calls_in_flight_finish() -> anyhow::Result<()> {
    let (sandbox, client, endpoints) = client_and_greeters(1, PORT)?;
    let mut daemon = Daemon::start(&sandbox, &[&client], &service(&endpoints))?;
    // A 300 ms call, still in flight when the daemon is told to stop.
    let slow = grpc::call_in_background(&sandbox, &client, vip(PORT), 1, "Slow")?;
    // Wait until shunt has the call's stream, then stop it mid-call.
    fixture::until("the call reaches shunt", Duration::from_secs(10), || {
        Ok(daemon.counter("proxy", "h2_streams")? > 0)
    })?;
    let pid = daemon.status()?.pid as i32;
    let _ = shunt_tests::sys::kill(pid, libc::SIGTERM);
    let calls = slow.finish(&sandbox)?;
    assert_eq!(
        calls.ok, 1,
        "the call in flight at SIGTERM failed: {calls:?}"
    );
    daemon.wait_exit(Duration::from_secs(10))?;
    assert!(
        daemon.log_text().contains("SIGTERM"),
        "{}",
        daemon.log_text()
    );
    Ok(())
}

#[test]
fn dns_discovery_follows_the_records_of_a_real_dns_server() -> anyhow::Result<()> {
    let (sandbox, client, endpoints) = client_and_greeters(2, PORT)?;
    // dnsmasq on the node's loopback, serving names from a hosts file we rewrite.
    let dir = sandbox.scratch_dir("dns")?;
    let hosts = dir.join("hosts");
    let record = |e: &SocketAddr| format!("{} greeter.test\n", e.ip());
    std::fs::write(&hosts, record(&endpoints[0]))?;
    let port = 20_000 + (std::process::id() % 20_000) as u16;
    let mut dnsmasq = Command::new("dnsmasq");
    dnsmasq
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
        ])
        .args(["--listen-address=127.0.0.1", "--local-ttl=0", "--user=root"])
        .arg(format!("--port={port}"))
        .arg(format!("--addn-hosts={}", hosts.display()))
        .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
        .stderr(Stdio::null());
    let dnsmasq_pid = sandbox.spawn_in_host(dnsmasq)?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(sandbox.is_running(dnsmasq_pid), "dnsmasq did not start");

    let options = Options::default().with_config(|c| {
        c.discovery.dns_server = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        c.services = vec![ServiceConfig {
            dns: Some(format!("greeter.test:{PORT}")),
            refresh: Duration::from_millis(200),
            ..fixture::service_config("greeter", vip(PORT), &[])
        }];
    });
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;
    let wait_for = |backends: usize| -> anyhow::Result<grpc::Calls> {
        let what = format!("60 calls answered by {backends} backends");
        fixture::eventually(&what, Duration::from_secs(10), || {
            let calls = grpc::call(&sandbox, &client, vip(PORT), 60)?;
            ensure!(
                calls.ok == 60 && calls.by_backend.len() == backends,
                "{calls:?}"
            );
            Ok(Some(calls))
        })
        .with_context(|| format!("shunt's log:\n{}", daemon.log_text()))
    };
    let one = wait_for(1)?;
    assert_eq!(one.by_backend.get("greeter0"), Some(&60), "{one:?}");

    // A second record: the rotation grows to both greeters.
    std::fs::write(
        &hosts,
        format!("{}{}", record(&endpoints[0]), record(&endpoints[1])),
    )?;
    let _ = shunt_tests::sys::kill(dnsmasq_pid as i32, libc::SIGHUP);
    let two = wait_for(2)?;
    assert_eq!(two.by_backend.values().sum::<usize>(), 60);
    let services: Vec<ServiceSummary> = daemon.ctl_as(&["services"])?;
    assert_eq!(
        services.first().map(|s| s.endpoints.len()),
        Some(2),
        "{services:?}"
    );
    Ok(())
}

#[test]
fn grpc_streaming_deadlines_and_cancellation_pass_through() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let server = sandbox.add_pod("greeter")?;
    let events = sandbox.scratch_dir("grpc-events")?.join("events");
    grpc::serve_with_events(&sandbox, &server, "greeter", PORT, Some(&events))?;
    let endpoint = SocketAddr::new(server.ipv4.into(), PORT);
    let daemon = Daemon::start(&sandbox, &[&client], &service(&[endpoint]))?;

    let report = grpc::semantics(&sandbox, &client, vip(PORT))?;
    for check in [
        "client_streaming",
        "server_streaming",
        "bidi_streaming",
        "large_messages",
    ] {
        assert_eq!(report[check], true, "{check}: {report}");
    }
    // grpc-timeout reached the server and expiry was reported as the peer reports it.
    assert_eq!(report["deadline"], "DEADLINE_EXCEEDED", "{report}");
    // The client's cancel (RST_STREAM) reached the server.
    let log = std::fs::read_to_string(&events).unwrap_or_default();
    assert!(
        log.contains("cancelled"),
        "the server never saw the cancellation: {log:?}"
    );
    assert!(daemon.counter("proxy", "h2_stream_resets")? >= 1);
    Ok(())
}

/// With `intercept.local_fast_path`, the gRPC client's bytes reach shunt through the
/// `sk_msg` redirect instead of loopback TCP, and calls on one channel still spread per
/// stream; the client connection's two sockets leave the map when it closes.
#[test]
fn local_fast_path_keeps_grpc_calls_balanced_per_stream() -> anyhow::Result<()> {
    if !shunt_tests::kernel::has("local_fast_path")? {
        return Ok(());
    }
    let (sandbox, client, endpoints) = client_and_greeters(3, PORT)?;
    let options = service(&endpoints).with_config(|c| c.intercept.local_fast_path = true);
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;
    assert_eq!(daemon.status()?.local_fast_path, "on");
    let calls = grpc::tonic_call(&sandbox, &client, vip(PORT), 3000)?;
    calls.check_even(3000, 3, 0.05)?;
    assert_eq!(daemon.counter("proxy", "verdict_h2")?, 1);
    // Both ends joined, and the calls travelled over the redirect (thousands of messages).
    assert!(daemon.counter("ebpf", "local_fast_path_joined")? >= 2);
    assert!(daemon.counter("ebpf", "local_fast_path_redirected")? > 1000);
    daemon.eventually("the fast path map to empty", || {
        Ok(daemon.counter("ebpf", "local_fast_path_sockets")? == 0)
    })
}
