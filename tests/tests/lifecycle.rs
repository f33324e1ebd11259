//! The daemon taken apart in the test's own process. Stopping it ends everything it started:
//! a connection that outlives the drain timeout is cancelled (its client sees the end), the
//! worker, telemetry and access-log threads end, and every descriptor it opened is closed —
//! the proxy's maps and sockets included, which an `Arc` cycle would keep open. Run as root.

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use shunt::admin::api::ConnRecord;
use shunt_tests::{
    daemon::{Daemon, Options},
    fixture,
    probe::{self, Background},
};
use tokio::signal::unix::SignalKind;

const DRAIN: Duration = Duration::from_secs(1);
const WORKERS: usize = 2;

/// The names of this process's threads, by name: how many of each.
fn threads() -> BTreeMap<String, usize> {
    let mut names = BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(name) = std::fs::read_to_string(task.path().join("comm")) {
            *names.entry(name.trim().to_owned()).or_default() += 1;
        }
    }
    names
}

fn daemon_threads() -> BTreeMap<String, usize> {
    threads()
        .into_iter()
        .filter(|(name, _)| name.starts_with("shunt-"))
        .collect()
}

/// This process's open descriptors: what each refers to.
fn descriptors() -> BTreeMap<String, usize> {
    let mut open = BTreeMap::new();
    for fd in std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            // Sockets and pipes differ by inode; what matters is the kind and the count.
            let target = target.to_string_lossy();
            let kind = target.split(':').next().unwrap_or_default().to_owned();
            *open.entry(kind).or_default() += 1;
        }
    }
    open
}

/// `ss`'s lines for this process's sockets, to name what was left open.
fn sockets_of_this_process() -> String {
    let pid = format!("pid={},", std::process::id());
    std::process::Command::new("ss")
        .args(["-anpO"])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|line| line.contains(&pid))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_else(|e| format!("ss: {e}"))
}

#[test]
fn stopping_the_daemon_ends_its_connections_threads_and_descriptors() -> anyhow::Result<()> {
    shunt::inpod::init_host_netns().context("recording the host network namespace")?;
    let (sandbox, client, server) = probe::client_and_server(7101)?;
    let options = Options {
        access_log: true,
        ..Default::default()
    }
    .with_config(|config| {
        config.intercept.drain_timeout = DRAIN;
        config.intercept.workers = WORKERS;
    });
    let daemon = Daemon::configure(&sandbox, &[&client], &options)?;
    // tokio keeps one socket pair for the life of the process, made when the first signal
    // handler is registered (as the daemon registers SIGTERM): made here, before the count.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sigterm =
        runtime.block_on(async { tokio::signal::unix::signal(SignalKind::terminate()) })?;
    drop((sigterm, runtime));
    let (fds_before, threads_before) = (descriptors(), daemon_threads());
    ensure!(threads_before.is_empty(), "{threads_before:?}");

    let config = daemon.config.clone();
    let running = thread::Builder::new().name("test-daemon".into()).spawn(
        move || -> anyhow::Result<()> {
            // Capabilities are per thread: this thread and those it starts keep what the
            // daemon keeps; the test's own threads keep theirs.
            let prepared = shunt::daemon::prepare(&config, false)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let result = runtime.block_on(shunt::daemon::run(prepared));
            // As `main` does: the control plane's tasks go with its runtime.
            drop(runtime);
            result
        },
    )?;
    let outcome = (|| {
        daemon.eventually("the daemon answers", || Ok(daemon.status().is_ok()))?;
        let threads = daemon_threads();
        let workers: usize = threads
            .iter()
            .filter(|(name, _)| name.starts_with("shunt-worker-"))
            .map(|(_, count)| count)
            .sum();
        ensure!(workers == WORKERS, "{threads:?}");

        // A connection through the proxy that stays open until the other side ends it.
        let to = server.to_string();
        let held = Background::start(
            &sandbox,
            &client,
            "held",
            &["connect", "--to", &to, "--await-end"],
        )?;
        daemon.eventually("the connection is in the proxy", || {
            Ok(daemon.ctl_as::<Vec<ConnRecord>>(&["conns"])?.len() == 1)
        })?;

        let stopping = Instant::now();
        daemon.ctl(&["uninstall"])?;
        fixture::until("the daemon stops", Duration::from_secs(30), || {
            Ok(running.is_finished())
        })?;
        let stopped_in = stopping.elapsed();
        // Its client did not end it: the daemon did, once the drain timeout had passed.
        let seen = held.finish(&sandbox, Duration::from_secs(10))?;
        ensure!(seen["error"].is_null(), "{seen}");
        ensure!(
            seen["end"] == "eof" || seen["end"] == "reset",
            "the held connection ended when the daemon stopped: {seen}"
        );
        Ok(stopped_in)
    })();
    let result = match running.join() {
        Ok(result) => result,
        Err(_) => anyhow::bail!("the daemon's thread panicked"),
    };
    let stopped_in = outcome?;
    result.context("shunt::daemon::run")?;
    eprintln!("stopped in {stopped_in:?} (drain timeout {DRAIN:?})");

    // Threads end as their owners go; the telemetry thread notices its listeners' owner
    // is gone at its next wake-up, so give it a moment.
    fixture::until(
        "every thread the daemon started has ended",
        Duration::from_secs(10),
        || Ok(daemon_threads().is_empty()),
    )
    .with_context(|| format!("still running: {:?}", daemon_threads()))?;
    fixture::until(
        "every descriptor the daemon opened is closed",
        Duration::from_secs(10),
        || Ok(descriptors() == fds_before),
    )
    .with_context(|| {
        format!(
            "before: {fds_before:?}, now: {:?}; this process's sockets:\n{}",
            descriptors(),
            sockets_of_this_process()
        )
    })?;
    ensure!(
        std::fs::read_dir(&daemon.pin_dir).map_or(true, |mut d| d.next().is_none()),
        "uninstall left pins in {}",
        daemon.pin_dir.display()
    );
    Ok(())
}
