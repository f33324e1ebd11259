//! What shunt tells about itself, checked against traffic whose every call and connection is
//! known: `shunt … -o json`, `/metrics` (through promtool), the access log, `/live` and
//! `/ready`, the runtime log filter, and the CLI without a daemon or without root.
//! Run as root.

use std::{
    ffi::OsStr,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{Context, ensure};
use serde_json::Value;
use shunt::{
    admin::api::{ConnRecord, EndpointSummary, PodSummary, ServiceSummary, Stats, Verdict},
    config::{
        AccessLog, Config, Listen,
        fault::{AbortFault, DelayFault, FaultRule, GrpcCode, PathMatch, Percentage},
    },
};
use shunt_tests::{
    daemon::{self, Daemon, Options},
    fixture::{self, eventually},
    grpc, probe,
    sandbox::Sandbox,
    telemetry::{self, Scrape},
    tls,
};

const GREETER_VIP: &str = "10.96.0.10:50051";
const PAYMENTS_VIP: &str = "10.96.0.20:443";
const DEAD_VIP: &str = "10.96.0.30:50051";
const PORT: u16 = 50051;
/// Unary calls on one channel, TLS connections: the traffic the counts must match.
const N: usize = 30;
const M: usize = 3;

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("valid address")
}

fn conns(daemon: &Daemon, args: &[&str]) -> anyhow::Result<Vec<ConnRecord>> {
    daemon.ctl_as(&[&["conns"], args].concat())
}

#[test]
fn cli_metrics_and_access_log_match_known_traffic() -> anyhow::Result<()> {
    let (sandbox, client, endpoints) = grpc::client_and_greeters(3, PORT)?;
    let payments = sandbox.add_pod("payments")?;
    let (cert, key) = tls::self_signed(&sandbox.scratch_dir("tls")?, "payments.test")?;
    tls::serve(&sandbox, &payments, 8443, &cert, &key)?;
    let silent = sandbox.add_pod("silent")?; // nothing listens there
    let method = |name: &str, service: &str, method: &str| {
        let mut rule = fixture::fault_rule(name, service);
        rule.matches.path = Some(PathMatch::Exact(format!("/helloworld.Greeter/{method}")));
        rule
    };
    let options = Options {
        access_log: true,
        ..Options::default()
    }
    .with_config(|c| {
        c.services = vec![
            fixture::service_config("greeter", addr(GREETER_VIP), &endpoints),
            fixture::service_config(
                "payments",
                addr(PAYMENTS_VIP),
                &[SocketAddr::new(payments.ipv4.into(), 8443)],
            ),
            fixture::service_config(
                "dead",
                addr(DEAD_VIP),
                &[SocketAddr::new(silent.ipv4.into(), PORT)],
            ),
        ];
        c.faults = vec![
            FaultRule {
                delay: Some(DelayFault {
                    fixed: Duration::from_millis(50),
                    percentage: Percentage::default(),
                }),
                ..method("slow-hello", "greeter", "Slow")
            },
            FaultRule {
                abort: Some(AbortFault {
                    // UNAVAILABLE
                    grpc_status: Some(GrpcCode(14)),
                    http_status: None,
                    percentage: Percentage::default(),
                }),
                ..method("fail-abort", "greeter", "Fail")
            },
        ];
    });
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;

    // The traffic: N calls on one channel, one delayed call, two aborted ones, one to a
    // Service nobody answers for, one plain HTTP/2 request with a request id, M TLS
    // connections.
    let calls = grpc::call(&sandbox, &client, addr(GREETER_VIP), N)?;
    ensure!(calls.ok == N, "{calls:?}");
    let slow = grpc::call_in_background(&sandbox, &client, addr(GREETER_VIP), 1, "Slow")?
        .finish(&sandbox)?;
    ensure!(slow.ok == 1, "{slow:?}");
    let fail = grpc::call_in_background(&sandbox, &client, addr(GREETER_VIP), 2, "Fail")?
        .finish(&sandbox)?;
    ensure!(fail.errors.get("UNAVAILABLE") == Some(&2), "{fail:?}");
    let dead = grpc::call(&sandbox, &client, addr(DEAD_VIP), 1)?;
    ensure!(dead.errors.get("UNAVAILABLE") == Some(&1), "{dead:?}");
    let body = sandbox.scratch_dir("curl")?.join("request.bin");
    std::fs::write(&body, b"\x00\x00\x00\x00\x07\x0a\x05probe")?;
    let mut curl = Command::new("curl");
    curl.args(["-sS", "-o", "/dev/null", "--http2-prior-knowledge"])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(["-H", "x-request-id: req-42", "--data-binary"])
        .arg(format!("@{}", body.display()))
        .arg(format!("http://{GREETER_VIP}/helloworld.Greeter/SayHello"));
    let out = sandbox.run_in_pod(&client, curl, Duration::from_secs(20))?;
    ensure!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for _ in 0..M {
        let out = tls::connect(
            &sandbox,
            &client,
            addr(PAYMENTS_VIP),
            "payments.test",
            &cert,
        )?;
        ensure!(
            out.status.success(),
            "s_client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Streams reaching the greeters: the N calls, the delayed one and curl's.
    let upstream_streams = N + 2;
    let h2_connections = 5;

    // Everything has ended before anything is counted.
    eventually("every connection ended", Duration::from_secs(10), || {
        let live = conns(&daemon, &[])?;
        ensure!(live.is_empty(), "still open: {live:?}");
        Ok(Some(()))
    })?;

    let pods: Vec<PodSummary> = daemon.ctl_as(&["pods"])?;
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0].name, "client");

    let closed = conns(&daemon, &["--closed"])?;
    assert_eq!(closed.len(), h2_connections + M, "{closed:?}");
    let tls_conns = conns(&daemon, &["--closed", "--protocol", "tls"])?;
    assert_eq!(tls_conns.len(), M, "{tls_conns:?}");
    for conn in &tls_conns {
        assert_eq!(conn.verdict, Some(Verdict::Tls));
        assert_eq!(conn.sni.as_deref(), Some("payments.test"));
        assert_eq!(conn.service.as_deref(), Some("payments"));
        assert!(conn.flags.is_empty(), "{conn:?}");
    }
    let h2 = conns(
        &daemon,
        &["--closed", "--protocol", "h2", "--pod", "client"],
    )?;
    assert_eq!(h2.len(), h2_connections, "{h2:?}");
    let none = conns(&daemon, &["--closed", "--pod", "nobody"])?;
    assert!(none.is_empty(), "{none:?}");
    let opaque = conns(&daemon, &["--closed", "--protocol", "opaque"])?;
    assert!(opaque.is_empty(), "{opaque:?}");

    let services: Vec<ServiceSummary> = daemon.ctl_as(&["services"])?;
    let service = |name: &str| {
        services
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("no Service {name}: {services:?}"))
    };
    let greeter = service("greeter")?;
    assert_eq!(greeter.endpoints.len(), 3, "{greeter:?}");
    let mut streams = 0;
    for endpoint in &greeter.endpoints {
        assert!(endpoint.in_rotation, "{endpoint:?}");
        assert_eq!(endpoint.streams_active, 0, "{endpoint:?}");
        assert_eq!(endpoint.connections_total, 0, "{endpoint:?}");
        // Round robin: the N calls of one channel take N consecutive turns, 10 each; the
        // other two streams land wherever the rotation is then.
        let total = endpoint.streams_total;
        assert!((10..=12).contains(&total), "{greeter:?}");
        streams += total;
    }
    assert_eq!(streams, upstream_streams as u64, "{greeter:?}");
    let first_endpoint = |name: &str| -> anyhow::Result<&EndpointSummary> {
        service(name)?
            .endpoints
            .first()
            .with_context(|| format!("Service {name} has no endpoint: {services:?}"))
    };
    let payments_endpoint = first_endpoint("payments")?;
    assert_eq!(
        payments_endpoint.connections_total, M as u64,
        "{services:?}"
    );
    assert_eq!(payments_endpoint.connections_active, 0, "{services:?}");
    assert!(first_endpoint("dead")?.failed >= 1);

    let stats: Stats = daemon.ctl_as(&["stats"])?;
    let stat = |source: &str, name: &str| {
        let counters = if source == "ebpf" {
            &stats.ebpf
        } else {
            &stats.proxy
        };
        counters.get(name).copied().unwrap_or(u64::MAX)
    };
    assert_eq!(stat("proxy", "verdict_tls"), M as u64, "{stats:?}");
    assert_eq!(
        stat("proxy", "verdict_h2"),
        h2_connections as u64,
        "{stats:?}"
    );
    assert_eq!(stat("proxy", "accepted"), (h2_connections + M) as u64);
    // Every one of them went through the kernel programs' redirect.
    assert_eq!(stat("ebpf", "redirected"), (h2_connections + M) as u64);
    assert!(stat("ebpf", "skip_marked") >= 1, "{stats:?}");

    // /metrics: valid for promtool, and the same counts.
    let metrics = daemon.telemetry_addr("metrics")?;
    let scrape = telemetry::scrape(metrics)?;
    telemetry::promtool_check(&scrape.text)?;
    let (status, openmetrics) =
        telemetry::http_get(metrics, "/metrics", "application/openmetrics-text")?;
    assert_eq!(status, 200);
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    check_metrics(&scrape, upstream_streams, h2_connections, &stat)?;
    let tls_bytes: u64 = tls_conns.iter().map(|c| c.bytes_from_client).sum();
    assert_eq!(
        scrape.sum(
            "shunt_transferred_bytes_total",
            &[("service", "payments"), ("direction", "client_to_upstream")]
        ),
        tls_bytes as f64
    );

    // The access log: one line per stream and per TLS connection, every field there.
    let expected_lines = upstream_streams + 2 + 1 + M;
    let lines = eventually(
        "every access log line written",
        Duration::from_secs(5),
        || {
            let lines = telemetry::access_log(&daemon.access_log)?;
            ensure!(
                lines.len() == expected_lines,
                "{} lines: {lines:?}",
                lines.len()
            );
            Ok(Some(lines))
        },
    )?;
    check_access_log(&lines, &tls_line_names_sni_and_upstream)?;
    assert_eq!(
        scrape_again(&daemon)?.sum("shunt_access_log_lines_total", &[]),
        expected_lines as f64
    );

    // The kernel programs' aya-log messages reach the daemon's log at debug.
    let log = daemon.log_text();
    assert!(log.contains("to listener"), "no eBPF log lines in:\n{log}");
    Ok(())
}

/// The access-log lines of the TLS connections name their SNI and upstream.
fn tls_line_names_sni_and_upstream(line: &Value) -> bool {
    line["sni"] == "payments.test" && line["upstream_host"].as_str().is_some()
}

fn scrape_again(daemon: &Daemon) -> anyhow::Result<Scrape> {
    telemetry::scrape(daemon.telemetry_addr("metrics")?)
}

fn check_metrics(
    scrape: &Scrape,
    upstream_streams: usize,
    h2_connections: usize,
    stat: &dyn Fn(&str, &str) -> u64,
) -> anyhow::Result<()> {
    let sum = |name: &str, labels: &[(&str, &str)]| scrape.sum(name, labels);
    let greeter = ("service", "greeter");
    assert_eq!(
        sum("shunt_streams_total", &[greeter, ("grpc_status", "0")]),
        upstream_streams as f64
    );
    assert_eq!(
        sum(
            "shunt_streams_total",
            &[greeter, ("response_flags", "FI"), ("grpc_status", "14")]
        ),
        2.0
    );
    assert_eq!(
        sum("shunt_streams_total", &[greeter, ("response_flags", "DI")]),
        1.0
    );
    assert_eq!(
        sum(
            "shunt_streams_total",
            &[("service", "dead"), ("response_flags", "UF")]
        ),
        1.0
    );
    assert_eq!(
        sum("shunt_request_duration_seconds_count", &[greeter]),
        (upstream_streams + 2) as f64
    );
    assert_eq!(
        sum(
            "shunt_connections_opened_total",
            &[("service", "payments"), ("protocol", "tls")]
        ),
        M as f64
    );
    assert_eq!(
        sum("shunt_connections_opened_total", &[("protocol", "h2")]),
        h2_connections as f64
    );
    assert_eq!(
        sum("shunt_connections_closed_total", &[]),
        (h2_connections + M) as f64
    );
    assert_eq!(
        sum("shunt_detection_verdicts_total", &[("verdict", "tls")]),
        M as f64
    );
    assert_eq!(
        sum(
            "shunt_faults_injected_total",
            &[("rule", "fail-abort"), ("kind", "abort")]
        ),
        2.0
    );
    assert_eq!(
        sum(
            "shunt_faults_injected_total",
            &[("rule", "slow-hello"), ("kind", "delay")]
        ),
        1.0
    );
    assert_eq!(
        sum("shunt_endpoints", &[greeter, ("state", "in_rotation")]),
        3.0
    );
    assert_eq!(sum("shunt_connections_active", &[]), 0.0);
    assert_eq!(
        sum("shunt_ebpf_redirects_total", &[("listener", "up")]),
        stat("ebpf", "redirected") as f64
    );
    assert_eq!(
        sum("shunt_ebpf_skips_total", &[("reason", "marked")]),
        stat("ebpf", "skip_marked") as f64
    );
    assert_eq!(sum("shunt_pods_enrolled", &[]), 1.0);
    assert_eq!(sum("shunt_access_log_dropped_total", &[]), 0.0);
    assert!(sum("process_open_fds", &[]) > 0.0);
    assert!(sum("process_resident_memory_bytes", &[]) > 0.0);
    assert!(scrape.has("process_cpu_seconds_total"));
    assert!(scrape.has("process_start_time_seconds"));
    // One gauge per optional feature, agreeing with `shunt kernel`.
    for feature in &shunt_tests::kernel::status()?.features {
        assert_eq!(
            sum(
                "shunt_kernel_feature_available",
                &[("feature", feature.name.as_str())]
            ),
            f64::from(u8::from(feature.available)),
            "{feature:?}"
        );
    }
    Ok(())
}

fn check_access_log(lines: &[Value], tls_line: &dyn Fn(&Value) -> bool) -> anyhow::Result<()> {
    const FIELDS: [&str; 16] = [
        "start_time",
        "duration_ms",
        "protocol",
        "method",
        "path",
        "authority",
        "response_code",
        "grpc_status",
        "response_flags",
        "bytes_received",
        "bytes_sent",
        "upstream_host",
        "source_pod",
        "original_dst",
        "sni",
        "request_id",
    ];
    for line in lines {
        for field in FIELDS {
            ensure!(line.get(field).is_some(), "no {field} in {line}");
        }
        ensure!(line["source_pod"] == "client", "{line}");
        let start = line["start_time"].as_str().unwrap_or_default();
        ensure!(
            start.len() == 24 && start.ends_with('Z') && start.as_bytes()[10] == b'T',
            "start_time {start:?} is not RFC 3339"
        );
    }
    let count = |wanted: &dyn Fn(&Value) -> bool| lines.iter().filter(|l| wanted(l)).count();
    let path = |l: &Value, p: &str| l["path"] == format!("/helloworld.Greeter/{p}");
    assert_eq!(
        count(&|l| path(l, "Slow") && l["response_flags"] == "DI" && l["grpc_status"] == "0"),
        1
    );
    assert_eq!(
        count(&|l| path(l, "Fail") && l["response_flags"] == "FI" && l["grpc_status"] == "14"),
        2
    );
    assert_eq!(
        count(&|l| l["service"] == "dead" && l["response_flags"] == "UF"),
        1
    );
    assert_eq!(
        count(&|l| l["request_id"] == "req-42" && l["protocol"] == "grpc"),
        1
    );
    assert_eq!(
        count(&|l| l["protocol"] == "tls" && l["response_flags"] == "-" && tls_line(l)),
        M
    );
    let plain = count(&|l| {
        path(l, "SayHello")
            && l["response_flags"] == "-"
            && l["response_code"] == 200
            && l["grpc_status"] == "0"
            && l["bytes_sent"].as_u64() > Some(0)
            && l["upstream_host"].as_str().is_some()
    });
    assert_eq!(plain, N + 1);
    Ok(())
}

#[test]
fn health_log_level_config_and_cli_errors() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let backend = sandbox.add_pod("backend")?;
    let listen = SocketAddr::new(backend.ipv4.into(), 8080);
    probe::serve(&sandbox, &backend, listen)?;
    let options = Options {
        log: Some("info"),
        ..Options::default()
    };
    let mut daemon = Daemon::start(&sandbox, &[&client], &options)?;
    let health = daemon.telemetry_addr("health")?;
    assert_eq!(telemetry::http_get(health, "/live", "*/*")?.0, 200);
    assert_eq!(telemetry::http_get(health, "/ready", "*/*")?.0, 200);
    assert_eq!(telemetry::http_get(health, "/metrics", "*/*")?.0, 404);

    // The configuration in force, defaults filled in.
    let config: Config = daemon.ctl_as(&["config"])?;
    assert_eq!(
        config.intercept.detect_timeout,
        Duration::from_secs(1),
        "{config:?}"
    );
    assert_eq!(config.telemetry.access_log, AccessLog::Off, "{config:?}");
    assert_eq!(
        config.telemetry.metrics,
        Listen::On(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
        "{config:?}"
    );
    let yaml = daemon.ctl(&["config"])?;
    assert!(yaml.contains("\ntelemetry:\n"), "{yaml}");
    assert!(yaml.contains("  drain_timeout: 5s\n"), "{yaml}");

    // At info, connections leave no debug lines; after `shunt log-level debug` they do.
    let intercepted = |daemon: &Daemon| daemon.log_text().matches("intercepted").count();
    probe::connect(&sandbox, &client, listen, 1)?[0].ok()?;
    assert_eq!(intercepted(&daemon), 0, "{}", daemon.log_text());
    assert_eq!(daemon.ctl(&["log-level"])?.trim(), "info");
    assert_eq!(daemon.ctl(&["log-level", "debug"])?.trim(), "debug");
    probe::connect(&sandbox, &client, listen, 1)?[0].ok()?;
    eventually("the connection intercepted", Duration::from_secs(5), || {
        ensure!(intercepted(&daemon) == 1, "{}", daemon.log_text());
        Ok(Some(()))
    })?;
    let refused = daemon
        .ctl(&["log-level", "shunt=[oops"])
        .expect_err("a bad filter was accepted")
        .to_string();
    assert!(refused.contains("not a log filter"), "{refused}");
    assert_eq!(daemon.ctl(&["log-level"])?.trim(), "debug");

    // No daemon behind the socket: a non-zero exit and one line saying what to do.
    let missing = sandbox.scratch_dir("nodaemon")?.join("admin.sock");
    let args = [
        OsStr::new("--admin-socket"),
        missing.as_os_str(),
        "status".as_ref(),
    ];
    let out = daemon::run_shunt(&args, None, Duration::from_secs(10))?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("not running") && stderr.contains("shunt run"),
        "{stderr}"
    );
    // Not root: the socket refuses, and the CLI says so.
    let args = [
        OsStr::new("--admin-socket"),
        daemon.socket.as_os_str(),
        "status".as_ref(),
    ];
    let out = daemon::run_shunt(&args, Some(65534), Duration::from_secs(10))?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");

    // Stopping: not ready (load balancers move on) while connections drain; still live.
    let held = probe::connect_held(&sandbox, &client, listen, Duration::from_secs(2))?;
    eventually("one connection open", Duration::from_secs(5), || {
        let live = conns(&daemon, &[])?;
        ensure!(live.len() == 1, "{live:?}");
        Ok(Some(()))
    })?;
    let _ = shunt_tests::sys::kill(daemon.pid()? as i32, libc::SIGTERM);
    eventually("/ready says stopping", Duration::from_secs(2), || {
        let (status, body) = telemetry::http_get(health, "/ready", "*/*")?;
        ensure!(
            status == 503 && body.contains("stopping"),
            "{status} {body}"
        );
        Ok(Some(()))
    })?;
    assert_eq!(telemetry::http_get(health, "/live", "*/*")?.0, 200);
    held.finish(&sandbox)?.ok()?;
    daemon.wait_exit(Duration::from_secs(10))?;
    Ok(())
}
