//! Bounded resources under pressure, with real sockets: slowloris clients are closed by the
//! timeouts, a connection flood is refused over the limits while connections within them keep
//! working, descriptor exhaustion neither kills nor spins the daemon, and HTTP/2 clients
//! that break the stream and header limits are refused for that stream only. Run as root.

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context, ensure};
use serde_json::Value;
use shunt_tests::{
    daemon::{Daemon, Options},
    fixture::{self, vip},
    grpc,
    probe::{self, Background},
    sandbox::{Pod, Sandbox},
};

const GRPC_PORT: u16 = 50051;
const ECHO_PORT: u16 = 7000;

fn outcome(line: &Value, kind: &str) -> u64 {
    line["outcomes"][kind].as_u64().unwrap_or(0)
}

/// An echo connection from `pod` to `to` is served now.
fn echo_works(sandbox: &Sandbox, pod: &Pod, to: SocketAddr) -> anyhow::Result<bool> {
    let seen = probe::connect_with(sandbox, pod, to, 1, &["--timeout-ms", "3000"])?;
    Ok(seen[0].error.is_none())
}

const PREFACE_HEX: &str = "505249202a20485454502f322e300d0a0d0a534d0d0a0d0a";
const EMPTY_SETTINGS_HEX: &str = "000000040000000000";

#[test]
fn slowloris_clients_are_closed_by_the_timeouts_while_grpc_is_served() -> anyhow::Result<()> {
    let (sandbox, client, endpoints) = grpc::client_and_tonic_greeters(1, GRPC_PORT)?;
    let options = fixture::service("greeter", vip(GRPC_PORT), &endpoints).with_config(|c| {
        c.intercept.detect_timeout = Duration::from_secs(1);
        c.intercept.idle_timeout = Duration::from_secs(3);
        c.http2.header_timeout = Duration::from_secs(2);
    });
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;
    let to = vip(GRPC_PORT).to_string();
    // A valid preface and SETTINGS, then a HEADERS frame announcing 200 bytes of header
    // block that arrive one every 300 ms: HTTP/2 to detection, never a request.
    let headers = format!("{PREFACE_HEX}{EMPTY_SETTINGS_HEX}0000c8010400000001");
    let trickle = "00".repeat(200);
    let slowloris = |name, head: &str, trickle: &[&str]| {
        let mut args = vec!["slowloris", "--to", &to, "--count", "20", "--seconds", "40"];
        args.extend(["--hex", head]);
        args.extend(trickle);
        Background::start(&sandbox, &client, name, &args)
    };
    let dribbling = slowloris(
        "dribbling",
        &headers,
        &["--trickle-hex", &trickle, "--trickle-ms", "300"],
    )?;
    // Half a preface, then silence: forwarded as opaque when detection times out, and
    // closed by the idle timeout.
    let stalled = slowloris("stalled", &PREFACE_HEX[..32], &[])?;
    fixture::until("40 connections accepted", Duration::from_secs(20), || {
        Ok(daemon.counter("proxy", "accepted")? >= 40)
    })?;
    // Meanwhile a well-behaved client is served in full.
    let calls = grpc::tonic_call(&sandbox, &client, vip(GRPC_PORT), 200)?;
    ensure!(calls.ok == 200, "{calls:?}");

    let dribbled = dribbling.line(&sandbox, 1, Duration::from_secs(60))?;
    let stalled = stalled.line(&sandbox, 1, Duration::from_secs(60))?;
    for (what, seen) in [("dribbling", &dribbled), ("stalled", &stalled)] {
        ensure!(seen["still_open"] == 0, "{what}: {seen}");
        let closed: u64 = seen["closed"]
            .as_object()
            .map(|ends| ends.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        ensure!(closed == 20, "{what}: {seen}");
    }
    assert_eq!(daemon.counter("proxy", "h2_header_timeouts")?, 20);
    assert_eq!(daemon.counter("proxy", "verdict_timeout")?, 20);
    assert_eq!(daemon.counter("proxy", "idle_timeouts")?, 20);
    // The gRPC client's one connection is HTTP/2 too, and was not closed by any of this.
    assert_eq!(daemon.counter("proxy", "verdict_h2")?, 21);
    Ok(())
}

#[test]
fn a_flood_over_the_limits_is_reset_and_what_is_within_keeps_working() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let (a, b) = (sandbox.add_pod("flood-a")?, sandbox.add_pod("flood-b")?);
    let backend = sandbox.add_pod("echo")?;
    let echo = SocketAddr::new(backend.ipv4.into(), ECHO_PORT);
    probe::serve(&sandbox, &backend, echo)?;
    let options = Options::default().with_config(|c| c.limits = fixture::limits(Some(12), Some(8)));
    let daemon = Daemon::start(&sandbox, &[&a, &b], &options)?;
    let go = sandbox.scratch_dir("limits")?.join("go");
    let flood = |pod: &Pod, count: &str| {
        let args = [
            "flood",
            "--to",
            &echo.to_string(),
            "--count",
            count,
            "--go",
            go.to_str().unwrap_or_default(),
        ];
        Background::start(&sandbox, pod, &format!("flood-{}", pod.name), &args)
    };
    // Pod a: 20 connections, 8 within its pod limit.
    let flood_a = flood(&a, "20")?;
    served_and_refused(&sandbox, &flood_a, 8, 12)?;
    // Pod b: its own limit leaves room, but the node has only 4 places left.
    let flood_b = flood(&b, "10")?;
    served_and_refused(&sandbox, &flood_b, 4, 6)?;
    assert_eq!(daemon.counter("proxy", "refused_pod_limit")?, 12);
    assert_eq!(daemon.counter("proxy", "refused_node_limit")?, 6);
    let metrics = shunt_tests::telemetry::scrape(daemon.telemetry_addr("metrics")?)?;
    let refused = |limit| metrics.sum("shunt_connections_refused_total", &[("limit", limit)]);
    ensure!(
        refused("pod") == 12.0 && refused("node") == 6.0,
        "{metrics:?}"
    );
    // The connections within the limits still move bytes.
    std::fs::write(&go, "")?;
    let again_a = flood_a.line(&sandbox, 2, Duration::from_secs(30))?;
    let again_b = flood_b.line(&sandbox, 2, Duration::from_secs(30))?;
    ensure!(outcome(&again_a, "served") == 8, "{again_a}");
    ensure!(outcome(&again_b, "served") == 4, "{again_b}");
    // The flood is over (the probes have exited): new connections are served again, from
    // both pods.
    let within = Duration::from_secs(20);
    fixture::until("pod a is served", within, || echo_works(&sandbox, &a, echo))?;
    fixture::until("pod b is served", within, || echo_works(&sandbox, &b, echo))?;
    Ok(())
}

/// The flood's connections: `served` echoed, `refused` were refused at once (a reset, or
/// its EOF), and none was left waiting.
fn served_and_refused(
    sandbox: &Sandbox,
    flood: &Background,
    served: u64,
    refused: u64,
) -> anyhow::Result<()> {
    let opened = flood.line(sandbox, 1, Duration::from_secs(60))?;
    ensure!(outcome(&opened, "served") == served, "{opened}");
    ensure!(
        outcome(&opened, "reset") + outcome(&opened, "eof") == refused,
        "{opened}"
    );
    Ok(())
}

/// The lowest descriptor number `pid` does not use: with the open-file limit set to it,
/// the process cannot open one more.
fn lowest_free_fd(pid: u32) -> anyhow::Result<u64> {
    let mut used: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    used.sort_unstable();
    Ok(used
        .iter()
        .enumerate()
        .find(|(i, fd)| *i as u64 != **fd)
        .map_or(used.len() as u64, |(i, _)| i as u64))
}

fn set_fd_limit(pid: u32, soft: u64) -> anyhow::Result<()> {
    let old = shunt_tests::sys::open_file_limit_of(pid as i32)
        .map_err(|e| anyhow::anyhow!("prlimit: {e}"))?;
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    shunt_tests::sys::set_open_file_limit_of(pid as i32, new)
        .map_err(|e| anyhow::anyhow!("prlimit: {e}"))?;
    Ok(())
}

#[test]
fn out_of_descriptors_the_daemon_lives_on_and_recovers() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let backend = sandbox.add_pod("echo")?;
    let echo = SocketAddr::new(backend.ipv4.into(), ECHO_PORT);
    probe::serve(&sandbox, &backend, echo)?;
    let daemon = Daemon::start(&sandbox, &[&client], &Options::default())?;
    let pid = daemon.pid()?;
    let go = sandbox.scratch_dir("limits")?.join("go");
    let go_arg = go.to_str().unwrap_or_default().to_owned();
    let echo_arg = echo.to_string();
    let held = Background::start(
        &sandbox,
        &client,
        "held",
        &["flood", "--to", &echo_arg, "--count", "5", "--go", &go_arg],
    )?;
    let opened = held.line(&sandbox, 1, Duration::from_secs(60))?;
    ensure!(outcome(&opened, "served") == 5, "{opened}");
    ensure!(daemon.counter("proxy", "accept_errors")? == 0);

    // Not one descriptor more: accept() fails, and so would a dial or a new pipe.
    set_fd_limit(pid, lowest_free_fd(pid)?)?;
    let waiting = Background::start(
        &sandbox,
        &client,
        "waiting",
        &[
            "flood",
            "--to",
            &echo_arg,
            "--count",
            "3",
            "--timeout-ms",
            "2000",
            "--seconds",
            "0",
        ],
    )?;
    let starved = waiting.line(&sandbox, 1, Duration::from_secs(60))?;
    ensure!(outcome(&starved, "served") == 0, "{starved}");
    ensure!(
        daemon.is_running(),
        "the daemon died: {}",
        daemon.log_text()
    );
    // The connections it already had still move bytes (a pipe it cannot make is copied
    // around), all the while.
    std::fs::write(&go, "")?;
    let again = held.line(&sandbox, 2, Duration::from_secs(30))?;
    ensure!(outcome(&again, "served") == 5, "{again}");
    ensure!(
        daemon.is_running(),
        "the daemon died: {}",
        daemon.log_text()
    );

    // The held connections have closed (the probe exited): descriptors are back, and new
    // connections are served without anyone touching the limit.
    fixture::until(
        "new connections are served",
        Duration::from_secs(30),
        || echo_works(&sandbox, &client, echo),
    )?;
    let errors = daemon.counter("proxy", "accept_errors")?;
    // Failed accepts were retried with a backoff, not in a busy loop.
    ensure!((1..1000).contains(&errors), "accept_errors = {errors}");
    ensure!(
        daemon.log_text().contains("accept failed"),
        "no accept failure logged: {}",
        daemon.log_text()
    );
    Ok(())
}

fn h2_probe(sandbox: &Sandbox, pod: &Pod, args: &[&str]) -> anyhow::Result<Value> {
    let mut cmd = Command::new(shunt_tests::probe_bin());
    cmd.args(["h2", "--to", &vip(GRPC_PORT).to_string()])
        .args(args);
    let out = sandbox.run_in_pod(pod, cmd, Duration::from_secs(60))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "h2 probe failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).with_context(|| format!("h2 probe printed {stdout:?}"))
}

#[test]
fn http2_streams_over_the_limit_and_oversized_headers_are_refused_alone() -> anyhow::Result<()> {
    let (sandbox, client, endpoints) = grpc::client_and_tonic_greeters(1, GRPC_PORT)?;
    let options = fixture::service("greeter", vip(GRPC_PORT), &endpoints).with_config(|c| {
        c.http2.max_concurrent_streams = 4;
        c.http2.max_header_list_size = 2048;
    });
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;
    // Ten requests at once on one connection: four are served, six refused.
    let many = h2_probe(&sandbox, &client, &["--streams", "10"])?;
    ensure!(many["refused"] == 6, "{many}");
    ensure!(many["completed_ok"] == 4, "{many}");
    ensure!(many["other_resets"] == serde_json::json!([]), "{many}");
    ensure!(many["goaway"].is_null(), "{many}");
    // A header block over 2 KiB: that request gets 431 (and h2's reset of the rest of
    // it), the others on the connection are served.
    let big = h2_probe(
        &sandbox,
        &client,
        &["--streams", "3", "--big-header", "4096"],
    )?;
    ensure!(big["rejected"] == serde_json::json!([1]), "{big}");
    ensure!(big["completed_ok"] == 2, "{big}");
    ensure!(big["refused"] == 0, "{big}");
    // Other clients never noticed.
    let calls = grpc::tonic_call(&sandbox, &client, vip(GRPC_PORT), 100)?;
    ensure!(calls.ok == 100, "{calls:?}");
    ensure!(daemon.is_running());
    Ok(())
}
