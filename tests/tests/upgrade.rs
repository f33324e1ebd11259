//! Upgrades and restarts: a second `shunt run` takes over from the running one without a
//! refused or failed connection, and the old one drains and exits. Run as root.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use shunt::admin::api::ConnRecord;
use shunt_tests::{
    daemon::{Daemon, Options},
    fixture::{self, vip},
    grpc,
    probe::{self, Background},
    telemetry,
};

const GRPC_PORT: u16 = 50051;
const TCP_PORT: u16 = 7000;

/// Daemon options with Service `backend` at [`vip`]`(port)` and `intercept.drain_timeout`.
fn options(port: u16, endpoints: &[SocketAddr], drain_timeout: Duration) -> Options {
    fixture::service("backend", vip(port), endpoints)
        .with_config(|c| c.intercept.drain_timeout = drain_timeout)
}

fn live_conns(daemon: &Daemon) -> anyhow::Result<usize> {
    Ok(daemon.ctl_as::<Vec<ConnRecord>>(&["conns"])?.len())
}

/// Sockets on the local fast path, as `shunt status` reports them.
fn fast_path_sockets(daemon: &Daemon) -> anyhow::Result<u64> {
    Ok(daemon.status()?.local_fast_path_sockets)
}

#[test]
fn grpc_load_and_a_server_stream_cross_an_upgrade_without_a_failed_call() -> anyhow::Result<()> {
    let (sandbox, client, endpoints) = grpc::client_and_greeters(3, GRPC_PORT)?;
    let mut old = Daemon::start(
        &sandbox,
        &[&client],
        &options(GRPC_PORT, &endpoints, Duration::from_secs(120)),
    )?;
    let old_pid = old.pid()?;
    let health = old.telemetry_addr("health")?;

    // 100 messages, one every 150 ms: the stream outlasts the handoff by far.
    let load = grpc::steady_in_background(&sandbox, &client, vip(GRPC_PORT), 100, 150)?;
    fixture::until(
        "calls through the first daemon",
        Duration::from_secs(30),
        || Ok(old.counter("proxy", "h2_streams")? >= 50),
    )?;
    let new = old.start_successor()?;
    ensure!(
        load.is_running(&sandbox),
        "the load ended before the handoff completed: nothing crossed it"
    );

    // The new daemon serves the health listener the old one had, and is ready.
    assert_eq!(new.telemetry_addr("health")?, health);
    let (code, body) = telemetry::http_get(health, "/ready", "*/*")?;
    assert_eq!(code, 200, "{body}");

    // The old daemon exits by itself once its last stream has finished.
    old.wait_exit(Duration::from_secs(120))?;
    let steady = load.finish(&sandbox, Duration::from_secs(120))?;
    assert!(
        steady.errors.is_empty(),
        "{} of {} calls failed across the upgrade: {steady:?}",
        steady.calls - steady.ok,
        steady.calls
    );
    assert_eq!(steady.drip.error, None, "{steady:?}");
    assert_eq!(steady.drip.received, 100, "{steady:?}");
    assert_eq!(steady.by_backend.len(), 3, "{steady:?}");

    // Connections made after the handoff went to the new daemon.
    assert!(new.counter("proxy", "accepted")? > 0);
    assert!(new.counter("proxy", "h2_streams")? > 0);
    let new_pid = new.pid()?;
    let old_log = old.log_text();
    assert!(
        old_log.contains(&format!("handed over to pid {new_pid}")),
        "{old_log}"
    );
    assert!(old_log.contains("draining"), "{old_log}");
    let new_log = new.log_text();
    assert!(
        new_log.contains(&format!("listeners from pid {old_pid}")),
        "{new_log}"
    );
    // The new daemon answers on the admin socket and still intercepts the client.
    let status = new.status()?;
    assert_eq!(status.pid, new_pid);
    assert_eq!(status.pods, 1, "{status:?}");
    assert_eq!(status.ready, "ready", "{status:?}");
    Ok(())
}

#[test]
fn opaque_connections_carry_on_until_they_close_or_the_drain_timeout() -> anyhow::Result<()> {
    let (sandbox, client, server) = probe::client_and_server(TCP_PORT)?;
    let mut old = Daemon::start(
        &sandbox,
        &[&client],
        &options(TCP_PORT, &[server], Duration::from_secs(25)),
    )?;
    let to = vip(TCP_PORT).to_string();
    // 60 bytes, one every 150 ms, then the echo: about 9 s of traffic, well within the
    // drain timeout.
    let trickle = Background::start(
        &sandbox,
        &client,
        "trickle",
        &[
            "send",
            "--to",
            &to,
            "--random",
            "60",
            "--trickle-ms",
            "150",
            "--timeout-ms",
            "90000",
        ],
    )?;
    // Never closes by itself: the old daemon's drain timeout ends it.
    let held = Background::start(
        &sandbox,
        &client,
        "held",
        &[
            "connect",
            "--to",
            &to,
            "--await-end",
            "--timeout-ms",
            "120000",
        ],
    )?;
    fixture::until(
        "both connections through the first daemon",
        Duration::from_secs(30),
        || Ok(live_conns(&old)? >= 2),
    )?;

    let new = old.start_successor()?;
    ensure!(
        trickle.is_running(&sandbox),
        "the trickle ended before the handoff completed: nothing crossed it"
    );
    old.wait_exit(Duration::from_secs(60))?;
    let old_log = old.log_text();
    assert!(
        old_log.contains("drain timeout passed; closing the rest"),
        "{old_log}"
    );

    let trickled = trickle.finish(&sandbox, Duration::from_secs(90))?;
    assert_eq!(trickled["error"], serde_json::Value::Null, "{trickled}");
    assert_eq!(trickled["end"], "eof", "{trickled}");
    assert!(
        trickled["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with("peer=")),
        "{trickled}"
    );
    assert!(
        trickled["received"].as_u64().is_some_and(|n| n > 60),
        "the echo did not come back whole: {trickled}"
    );
    // The held connection was closed when the old daemon's drain timeout passed, not by
    // its own timeout.
    let held = held.finish(&sandbox, Duration::from_secs(60))?;
    assert_eq!(held["error"], serde_json::Value::Null, "{held}");
    let end = held["end"].as_str().unwrap_or_default();
    assert!(end == "eof" || end == "reset", "{held}");

    // New connections are the new daemon's.
    let seen = probe::connect(&sandbox, &client, vip(TCP_PORT), 3)?;
    for s in &seen {
        s.ok()?;
        assert!(s.was_redirected(), "{s:?}");
    }
    assert!(new.counter("proxy", "accepted")? >= 3);
    Ok(())
}

#[test]
fn connections_made_during_two_handoffs_in_a_row_are_not_refused() -> anyhow::Result<()> {
    let (sandbox, client, server) = probe::client_and_server(TCP_PORT)?;
    let mut first = Daemon::start(
        &sandbox,
        &[&client],
        &options(TCP_PORT, &[server], Duration::from_secs(5)),
    )?;
    let stop = AtomicBool::new(false);
    let batches = AtomicUsize::new(0);
    let mut second = None;
    let seen = std::thread::scope(|scope| -> anyhow::Result<Vec<probe::Seen>> {
        // Short connections one after the other, in batches, until told to stop (bounded).
        let connecting = scope.spawn(|| -> anyhow::Result<Vec<probe::Seen>> {
            let mut all = Vec::new();
            let started = Instant::now();
            while !stop.load(Ordering::Acquire)
                && all.len() < 20_000
                && started.elapsed() < Duration::from_secs(240)
            {
                all.extend(probe::connect(&sandbox, &client, vip(TCP_PORT), 20)?);
                batches.fetch_add(1, Ordering::AcqRel);
            }
            Ok(all)
        });
        let mut run = || -> anyhow::Result<()> {
            let wait_batches = |n: usize| {
                let target = batches.load(Ordering::Acquire) + n;
                fixture::until("connection batches", Duration::from_secs(60), || {
                    if connecting.is_finished() {
                        return Err(fixture::give_up("the connection loop stopped"));
                    }
                    Ok(batches.load(Ordering::Acquire) >= target)
                })
            };
            wait_batches(2)?;
            let mut next = first.start_successor()?;
            first.wait_exit(Duration::from_secs(60))?;
            wait_batches(2)?;
            let last = next.start_successor()?;
            next.wait_exit(Duration::from_secs(60))?;
            wait_batches(2)?;
            second = Some((next, last));
            Ok(())
        };
        let outcome = run();
        stop.store(true, Ordering::Release);
        let seen = connecting
            .join()
            .map_err(|_| anyhow::anyhow!("the connection loop panicked"))??;
        outcome?;
        Ok(seen)
    })?;
    let (second, third) = second.context("no successors")?;
    let failed: Vec<_> = seen.iter().filter(|s| s.error.is_some()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed across two handoffs, first: {:?}",
        failed.len(),
        seen.len(),
        failed.first()
    );
    assert!(seen.iter().all(probe::Seen::was_redirected));
    // The last daemon accepted some of them, and is the one serving.
    assert!(third.counter("proxy", "accepted")? > 0);
    let status = third.status()?;
    assert_eq!(status.pid, third.pid()?);
    assert!(!second.is_running());
    Ok(())
}

#[test]
fn a_successor_that_dies_during_the_handoff_leaves_the_running_daemon_serving() -> anyhow::Result<()>
{
    let (sandbox, client, server) = probe::client_and_server(TCP_PORT)?;
    let good = options(TCP_PORT, &[server], Duration::from_secs(5));
    let mut daemon = Daemon::start(&sandbox, &[&client], &good)?;
    let pid = daemon.pid()?;
    // The successor receives the listeners, then fails to set up its programs (no such
    // cgroup) and exits without adopting them.
    let bad = Options {
        cgroup: Some(PathBuf::from(format!(
            "/sys/fs/cgroup/shunt-no-such-cgroup-{}",
            sandbox.id()
        ))),
        ..good.clone()
    };
    daemon.rewrite_config(&[&client], &bad)?;
    let attempt = daemon.start_successor();
    daemon.rewrite_config(&[&client], &good)?;
    let Err(e) = attempt else {
        bail!("a successor that cannot attach its programs took over");
    };
    assert!(format!("{e:#}").contains("cgroup"), "{e:#}");

    fixture::until(
        "the failed handoff to be noticed",
        Duration::from_secs(30),
        || {
            Ok(daemon
                .log_text()
                .contains("handoff failed, carrying on serving"))
        },
    )?;
    assert!(daemon.is_running());
    let status = daemon.status()?;
    assert_eq!(status.pid, pid);
    assert_eq!(status.ready, "ready", "{status:?}");
    let before = daemon.counter("proxy", "accepted")?;
    for s in probe::connect(&sandbox, &client, vip(TCP_PORT), 3)? {
        s.ok()?;
        assert!(s.was_redirected(), "{s:?}");
    }
    assert!(daemon.counter("proxy", "accepted")? >= before + 3);
    // And a later handoff still works.
    let next = daemon.start_successor()?;
    daemon.wait_exit(Duration::from_secs(60))?;
    for s in probe::connect(&sandbox, &client, vip(TCP_PORT), 3)? {
        s.ok()?;
        assert!(s.was_redirected(), "{s:?}");
    }
    assert!(next.counter("proxy", "accepted")? >= 3);
    Ok(())
}

/// With `intercept.local_fast_path`, a connection on the fast path crosses a handoff intact
/// (its sockets stay in the pinned map, the kernel keeps redirecting), the new daemon attaches
/// its own `sk_msg` program to that map, and its new connections use the fast path too.
#[test]
fn the_local_fast_path_survives_an_upgrade() -> anyhow::Result<()> {
    if !shunt_tests::kernel::has("local_fast_path")? {
        return Ok(());
    }
    let (sandbox, client, server) = probe::client_and_server(TCP_PORT)?;
    let mut opts = options(TCP_PORT, &[server], Duration::from_secs(25));
    opts.config.intercept.local_fast_path = true;
    let mut old = Daemon::start(&sandbox, &[&client], &opts)?;
    let to = vip(TCP_PORT).to_string();
    // 30 bytes, one every 150 ms, then the echo: about 4.5 s, across the handoff.
    let trickle = Background::start(
        &sandbox,
        &client,
        "trickle",
        &[
            "send",
            "--to",
            &to,
            "--random",
            "30",
            "--trickle-ms",
            "150",
            "--timeout-ms",
            "60000",
        ],
    )?;
    fixture::until(
        "the connection on the fast path",
        Duration::from_secs(30),
        || Ok(fast_path_sockets(&old)? == 2),
    )?;

    let new = old.start_successor()?;
    ensure!(
        trickle.is_running(&sandbox),
        "the trickle ended before the handoff completed: nothing crossed it"
    );
    let status = new.status()?;
    assert_eq!(status.local_fast_path, "on", "{status:?}");
    let trickled = trickle.finish(&sandbox, Duration::from_secs(60))?;
    assert_eq!(trickled["error"], serde_json::Value::Null, "{trickled}");
    assert_eq!(trickled["end"], "eof", "{trickled}");
    assert!(
        trickled["received"].as_u64().is_some_and(|n| n > 30),
        "the echo did not come back whole: {trickled}"
    );
    old.wait_exit(Duration::from_secs(60))?;

    // The counters live in the pinned map the two daemons share.
    let before = new.counter("ebpf", "local_fast_path_redirected")?;
    let held = probe::connect_held(&sandbox, &client, vip(TCP_PORT), Duration::from_secs(1))?;
    fixture::until(
        "a new connection on the fast path",
        Duration::from_secs(10),
        || Ok(fast_path_sockets(&new)? == 2),
    )?;
    let seen = held.finish(&sandbox)?;
    assert_eq!(seen.echo.as_deref(), Some("hello"), "{seen:?}");
    assert!(new.counter("ebpf", "local_fast_path_redirected")? > before);
    fixture::until(
        "the fast path map to empty",
        Duration::from_secs(10),
        || Ok(fast_path_sockets(&new)? == 0),
    )
}

/// Turning the fast path off across a handoff: the new daemon does not put new sockets on it,
/// but while sockets the old one put there are open (some may wait in the shared accept
/// queues), it copies rather than splices what it accepts, so none is spliced while its
/// bytes wait where splice cannot read them.
#[test]
fn turning_the_local_fast_path_off_across_an_upgrade() -> anyhow::Result<()> {
    if !shunt_tests::kernel::has("local_fast_path")? {
        return Ok(());
    }
    let (sandbox, client, server) = probe::client_and_server(TCP_PORT)?;
    let off = options(TCP_PORT, &[server], Duration::from_secs(25));
    let mut on = off.clone();
    on.config.intercept.local_fast_path = true;
    let mut old = Daemon::start(&sandbox, &[&client], &on)?;
    let to = vip(TCP_PORT).to_string();
    let trickle = Background::start(
        &sandbox,
        &client,
        "trickle",
        &[
            "send",
            "--to",
            &to,
            "--random",
            "30",
            "--trickle-ms",
            "150",
            "--timeout-ms",
            "60000",
        ],
    )?;
    fixture::until(
        "the connection on the fast path",
        Duration::from_secs(30),
        || Ok(fast_path_sockets(&old)? == 2),
    )?;

    old.rewrite_config(&[&client], &off)?;
    let new = old.start_successor()?;
    assert_eq!(new.status()?.local_fast_path, "off");
    let seen = probe::connect(&sandbox, &client, vip(TCP_PORT), 1)?.remove(0);
    seen.ok()?;
    let trickled = trickle.finish(&sandbox, Duration::from_secs(60))?;
    assert_eq!(trickled["error"], serde_json::Value::Null, "{trickled}");
    assert_eq!(trickled["end"], "eof", "{trickled}");
    old.wait_exit(Duration::from_secs(60))?;
    let closed = new.closed_conns()?;
    let conn = closed.first().context("the new daemon's connection")?;
    assert_eq!(
        conn.forwarding.as_deref(),
        Some("copy (local fast path; splice)"),
        "{conn:?}"
    );
    // Its sockets never joined: the old daemon's were the only ones.
    fixture::until(
        "the fast path map to empty",
        Duration::from_secs(10),
        || Ok(fast_path_sockets(&new)? == 0),
    )
}
