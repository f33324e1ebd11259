//! Fault injection through shunt with real peers: grpcio (delay, abort), curl (HTTP abort),
//! openssl (TCP connect delay and reset on TLS), rules changed at runtime. Run as root.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use shunt::{
    admin::api::{RuleSummary, StreamRecord},
    config::fault::{AbortFault, FaultRule, GrpcCode, Percentage, TcpFault},
};
use shunt_tests::{
    daemon::{Daemon, Options},
    fixture::{self, vip},
    grpc,
    sandbox::{Pod, Sandbox},
    tls, web,
};

const PORT: u16 = 50051;

/// `UNAVAILABLE`.
const UNAVAILABLE: GrpcCode = GrpcCode(14);

/// A client pod and one grpcio greeter behind Service `greeter`, with `faults` configured.
fn greeter(faults: Vec<FaultRule>) -> anyhow::Result<(Sandbox, Pod, SocketAddr, Options)> {
    let (sandbox, client, endpoints) = grpc::client_and_greeters(1, PORT)?;
    let options =
        fixture::service("greeter", vip(PORT), &endpoints).with_config(|c| c.faults = faults);
    Ok((sandbox, client, endpoints[0], options))
}

/// The fault rules in force (`shunt faults list`).
fn rules(daemon: &Daemon) -> anyhow::Result<Vec<RuleSummary>> {
    daemon.ctl_as(&["faults", "list"])
}

/// The first rule in force.
fn first_rule(daemon: &Daemon) -> anyhow::Result<RuleSummary> {
    let rules = rules(daemon)?;
    rules.into_iter().next().context("no fault rule in force")
}

/// An abort with `code` for `percentage` of the requests.
fn abort(code: GrpcCode, percentage: f64) -> Option<AbortFault> {
    Some(AbortFault {
        grpc_status: Some(code),
        http_status: None,
        percentage: Percentage(percentage),
    })
}

#[test]
fn a_delay_holds_the_matching_method_only_and_is_counted() -> anyhow::Result<()> {
    let (sandbox, client, _, options) = greeter(Vec::new())?;
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
    let listed = first_rule(&daemon)?;
    assert_eq!(listed.delays, 5, "{listed:?}");
    // Each delayed stream's record carries the DI flag.
    let streams: Vec<StreamRecord> = daemon.ctl_as(&["streams"])?;
    let delayed = streams
        .iter()
        .filter(|s| s.path == "/helloworld.Greeter/SayHello" && s.flags == ["DI"])
        .count();
    assert_eq!(delayed, 5, "{streams:?}");

    // Another method of the same Service is not delayed: Fail is answered at once.
    let before = first_rule(&daemon)?.delays;
    let fail =
        grpc::call_in_background(&sandbox, &client, vip(PORT), 3, "Fail")?.finish(&sandbox)?;
    assert_eq!(fail.errors.get("UNAVAILABLE"), Some(&3), "{fail:?}");
    assert_eq!(first_rule(&daemon)?.delays, before);

    // Cleared at runtime: back to normal.
    daemon.ctl(&["faults", "clear", "greeter-slow"])?;
    assert_eq!(rules(&daemon)?.len(), 0);
    Ok(())
}

#[test]
fn an_abort_at_50_percent_fails_about_half_the_calls_with_unavailable() -> anyhow::Result<()> {
    let rule = FaultRule {
        abort: abort(UNAVAILABLE, 50.0),
        ..fixture::fault_rule("flaky", "greeter")
    };
    let (sandbox, client, _, options) = greeter(vec![rule])?;
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;
    let calls = grpc::call(&sandbox, &client, vip(PORT), 2000)?;
    let unavailable = calls.errors.get("UNAVAILABLE").copied().unwrap_or(0);
    // 5 standard deviations of a fair coin over 2000 calls: 1000 ± 112.
    assert!((888..=1112).contains(&unavailable), "{calls:?}");
    assert_eq!(calls.ok + unavailable, 2000, "{calls:?}");
    assert_eq!(first_rule(&daemon)?.aborts, unavailable as u64);
    Ok(())
}

#[test]
fn an_http_abort_answers_plain_http2_with_the_status() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let web = sandbox.add_pod("web")?;
    web::serve(&sandbox, &web, 8080, &[("index.html", "hello\n")])?;
    let endpoint = SocketAddr::new(web.ipv4.into(), 8080);
    let mut rule = FaultRule {
        abort: Some(AbortFault {
            grpc_status: None,
            http_status: Some(503),
            percentage: Percentage::default(),
        }),
        ..fixture::fault_rule("down", "web")
    };
    rule.matches.headers.insert("x-chaos".into(), "on".into());
    let options =
        fixture::service("web", vip(80), &[endpoint]).with_config(|c| c.faults = vec![rule]);
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
    let rule = FaultRule {
        tcp: Some(TcpFault {
            connect_delay: Some(Duration::from_millis(500)),
            reset_percentage: None,
        }),
        ..fixture::fault_rule("slow-payments", "payments")
    };
    let options =
        fixture::service("payments", vip(443), &[endpoint]).with_config(|c| c.faults = vec![rule]);
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
    let listed = first_rule(&daemon)?;
    assert_eq!(listed.source, "admin", "{listed:?}");
    assert!(listed.tcp_faults >= 1, "{listed:?}");
    Ok(())
}

#[test]
fn bad_rules_are_refused_with_the_field_named_and_the_old_ones_stay() -> anyhow::Result<()> {
    let rule = FaultRule {
        abort: abort(UNAVAILABLE, 100.0),
        ..fixture::fault_rule("flaky", "greeter")
    };
    let (sandbox, client, _, options) = greeter(vec![rule])?;
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;

    let error = daemon
        .set_faults(
        "name: worse\nmatch: {service: greeter}\nabort: {grpc_status: UNAVAILABLE, percentage: 150}\n",
    )
    .expect_err("a percentage of 150 was accepted")
    .to_string();
    assert!(error.contains("abort.percentage"), "{error}");

    // Through a config reload too: no `GrpcCode` holds the bad status, so it is written over
    // a good one in the file's text.
    let good = options.clone().with_config(|c| {
        c.faults = vec![FaultRule {
            abort: abort(UNAVAILABLE, 100.0),
            ..fixture::fault_rule("x", "greeter")
        }]
    });
    let text = daemon.config_text(&[&client], &good)?;
    let bad = text.replace("grpc_status: UNAVAILABLE", "grpc_status: SOMETIMES");
    ensure!(bad != text, "no grpc_status to replace in\n{text}");
    daemon.write_config_text(&bad)?;
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
