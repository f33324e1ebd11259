//! Fault injection through shunt with real peers: grpcio (delay, abort), curl (HTTP abort),
//! openssl (TCP connect delay and reset on TLS), rules changed at runtime. Run as root.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::ensure;
use shunt_tests::{
    daemon::{Daemon, Options},
    fixture::{self, vip},
    grpc,
    sandbox::{Pod, Sandbox},
    tls, web,
};

const PORT: u16 = 50051;

/// A client pod and one grpcio greeter behind Service `greeter`, with `extra` in the config.
fn greeter(extra: &str) -> anyhow::Result<(Sandbox, Pod, SocketAddr, Options)> {
    let (sandbox, client, endpoints) = grpc::client_and_greeters(1, PORT)?;
    let options = fixture::service("greeter", vip(PORT), &endpoints).with_extra_yaml(extra);
    Ok((sandbox, client, endpoints[0], options))
}

#[test]
fn a_delay_holds_the_matching_method_only_and_is_counted() -> anyhow::Result<()> {
    let (sandbox, client, _, options) = greeter("")?;
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;
    daemon.set_faults(
        "name: greeter-slow\nmatch: {service: greeter, path: /helloworld.Greeter/SayHello}\ndelay: {fixed: 300ms, percentage: 100}\n",
    )?;
    let started = Instant::now();
    let calls = grpc::call(&sandbox, &client, vip(PORT), 5)?;
    assert_eq!(calls.ok, 5, "{calls:?}");
    // A lower bound only: five calls one after the other, each held 300 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let listed = daemon.ctl_json(&["faults", "list"])?;
    assert_eq!(listed[0]["delays"], 5, "{listed}");
    // Each delayed stream's record carries the DI flag.
    let streams = daemon.ctl_json(&["streams"])?;
    let delayed = streams
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| {
            s["path"] == "/helloworld.Greeter/SayHello" && s["flags"] == serde_json::json!(["DI"])
        })
        .count();
    assert_eq!(delayed, 5, "{streams}");

    // Another method of the same Service is not delayed: Fail is answered at once.
    let before = daemon.ctl_json(&["faults", "list"])?[0]["delays"].clone();
    let fail =
        grpc::call_in_background(&sandbox, &client, vip(PORT), 3, "Fail")?.finish(&sandbox)?;
    assert_eq!(fail.errors.get("UNAVAILABLE"), Some(&3), "{fail:?}");
    assert_eq!(daemon.ctl_json(&["faults", "list"])?[0]["delays"], before);

    // Cleared at runtime: back to normal.
    daemon.ctl(&["faults", "clear", "greeter-slow"])?;
    assert_eq!(
        daemon
            .ctl_json(&["faults", "list"])?
            .as_array()
            .map(Vec::len),
        Some(0)
    );
    Ok(())
}

#[test]
fn an_abort_at_50_percent_fails_about_half_the_calls_with_unavailable() -> anyhow::Result<()> {
    let rule = "faults:\n  - name: flaky\n    match: {service: greeter}\n    abort: {grpc_status: UNAVAILABLE, percentage: 50}\n";
    let (sandbox, client, _, options) = greeter(rule)?;
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;
    let calls = grpc::call(&sandbox, &client, vip(PORT), 2000)?;
    let unavailable = calls.errors.get("UNAVAILABLE").copied().unwrap_or(0);
    // 5 standard deviations of a fair coin over 2000 calls: 1000 ± 112.
    assert!((888..=1112).contains(&unavailable), "{calls:?}");
    assert_eq!(calls.ok + unavailable, 2000, "{calls:?}");
    assert_eq!(
        daemon.ctl_json(&["faults", "list"])?[0]["aborts"],
        unavailable
    );
    Ok(())
}

#[test]
fn an_http_abort_answers_plain_http2_with_the_status() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let web = sandbox.add_pod("web")?;
    web::serve(&sandbox, &web, 8080, &[("index.html", "hello\n")])?;
    let endpoint = SocketAddr::new(web.ipv4.into(), 8080);
    let rule = "faults:\n  - name: down\n    match: {service: web, headers: {x-chaos: 'on'}}\n    abort: {http_status: 503}\n";
    let options = fixture::service("web", vip(80), &[endpoint]).with_extra_yaml(rule);
    let _daemon = Daemon::start(&sandbox, &[&client], &options)?;
    let status = |chaos: bool| -> anyhow::Result<String> {
        let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        if chaos {
            args.extend(["-H", "x-chaos: on"]);
        }
        web::curl(&sandbox, &client, vip(80), &args)
    };
    // Only requests carrying the header are faulted.
    assert_eq!(status(true)?, "503");
    assert_eq!(status(false)?, "200");
    Ok(())
}

#[test]
fn tcp_faults_delay_and_reset_tls_connections() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let server = sandbox.add_pod("payments")?;
    let (cert, key) = tls::self_signed(&sandbox.scratch_dir("tls")?, "payments.test")?;
    tls::serve(&sandbox, &server, 8443, &cert, &key)?;
    let endpoint = SocketAddr::new(server.ipv4.into(), 8443);
    let rule = "faults:\n  - name: slow-payments\n    match: {service: payments}\n    tcp: {connect_delay: 500ms}\n";
    let options = fixture::service("payments", vip(443), &[endpoint]).with_extra_yaml(rule);
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;

    let started = Instant::now();
    let out = tls::connect(&sandbox, &client, vip(443), "payments.test", &cert)?;
    let elapsed = started.elapsed();
    ensure!(
        out.status.success(),
        "s_client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        elapsed >= Duration::from_millis(500),
        "the handshake finished after {elapsed:?}"
    );

    daemon.set_faults(
        "name: slow-payments\nmatch: {service: payments}\ntcp: {reset_percentage: 100}\n",
    )?;
    let out = tls::connect(&sandbox, &client, vip(443), "payments.test", &cert)?;
    assert!(
        !out.status.success(),
        "the TLS connection survived a 100% reset rule"
    );
    let listed = daemon.ctl_json(&["faults", "list"])?;
    assert_eq!(listed[0]["source"], "admin", "{listed}");
    assert!(
        listed[0]["tcp_faults"].as_u64().unwrap_or(0) >= 1,
        "{listed}"
    );
    Ok(())
}

#[test]
fn bad_rules_are_refused_with_the_field_named_and_the_old_ones_stay() -> anyhow::Result<()> {
    let rule = "faults:\n  - name: flaky\n    match: {service: greeter}\n    abort: {grpc_status: UNAVAILABLE}\n";
    let (sandbox, client, endpoint, options) = greeter(rule)?;
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;

    let error = daemon
        .set_faults(
        "name: worse\nmatch: {service: greeter}\nabort: {grpc_status: UNAVAILABLE, percentage: 150}\n",
    )
    .expect_err("a percentage of 150 was accepted")
    .to_string();
    assert!(error.contains("abort.percentage"), "{error}");

    // Through a config reload too.
    let bad = fixture::service("greeter", vip(PORT), &[endpoint]).with_extra_yaml(
        "faults:\n  - name: x\n    match: {service: greeter}\n    abort: {grpc_status: SOMETIMES}\n",
    );
    daemon.rewrite_config(&[&client], &bad)?;
    let error = daemon
        .ctl(&["reload"])
        .expect_err("a bad status was accepted")
        .to_string();
    assert!(error.contains("faults[0].abort.grpc_status"), "{error}");

    // The rule in force still applies.
    let calls = grpc::call(&sandbox, &client, vip(PORT), 3)?;
    assert_eq!(calls.errors.get("UNAVAILABLE"), Some(&3), "{calls:?}");
    Ok(())
}
