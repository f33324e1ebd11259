//! Commands given a configuration (`--config`) talk to the daemon and the pins that
//! configuration names, not the default ones: with two daemons side by side, each in its own
//! sandbox (cgroup, pin directory, admin socket), `shunt uninstall --config` of one stops
//! that one and removes its pins only, and the other keeps redirecting its pods. Also what
//! `shunt status` and `/metrics` say about the open-file limit. Run as root.

use std::{ffi::OsStr, net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, ensure};
use shunt::admin::api::Status;
use shunt_tests::{
    daemon::{self, Daemon, Options},
    fixture, probe,
    sandbox::{Pod, Sandbox},
    telemetry,
};

const PORT: u16 = 8080;
/// How long one CLI command may take.
const CLI: Duration = Duration::from_secs(20);

/// One real connection from `pod` to `to`, which must succeed; whether shunt redirected it.
fn redirected(sandbox: &Sandbox, pod: &Pod, to: SocketAddr) -> anyhow::Result<bool> {
    Ok(probe::connect_once(sandbox, pod, to, &[])?.was_redirected())
}

/// [`daemon::shunt`] `ARGS…`, its output parsed as JSON.
fn shunt_status<S: AsRef<OsStr>>(args: &[S]) -> anyhow::Result<Status> {
    let out = daemon::shunt(args, CLI)?;
    serde_json::from_str(&out).with_context(|| format!("shunt printed no status: {out}"))
}

/// Files under a pin directory (programs, links and maps), or none if it has gone.
fn pins(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| entries.count())
}

#[test]
fn uninstall_with_a_config_stops_that_daemon_only() -> anyhow::Result<()> {
    let (first_sandbox, first_client, first_to) = probe::client_and_server(PORT)?;
    let (second_sandbox, second_client, second_to) = probe::client_and_server(PORT)?;
    let first = Daemon::start(&first_sandbox, &[&first_client], &Options::default())?;
    let mut second = Daemon::start(&second_sandbox, &[&second_client], &Options::default())?;
    ensure!(
        first.socket != second.socket
            && first.pin_dir != second.pin_dir
            && first_sandbox.cgroup() != second_sandbox.cgroup(),
        "the two daemons must share nothing"
    );
    for (sandbox, client, to) in [
        (&first_sandbox, &first_client, first_to),
        (&second_sandbox, &second_client, second_to),
    ] {
        ensure!(
            redirected(sandbox, client, to)?,
            "a pod of {} is not redirected before the uninstall",
            sandbox.id()
        );
    }
    let first_pins = pins(&first.pin_dir);
    ensure!(first_pins > 0, "nothing pinned under {:?}", first.pin_dir);
    ensure!(
        pins(&second.pin_dir) > 0,
        "nothing pinned under {:?}",
        second.pin_dir
    );

    // Any command given a configuration reaches the daemon it names, before or after the
    // command; an explicit --admin-socket wins over it.
    let first_pid = first.pid()?;
    let second_pid = second.pid()?;
    let status = shunt_status(&[
        OsStr::new("status"),
        OsStr::new("--config"),
        first.config.as_os_str(),
        OsStr::new("-o"),
        OsStr::new("json"),
    ])?;
    ensure!(status.pid == first_pid, "status --config FIRST: {status:?}");
    let status = shunt_status(&[
        OsStr::new("--config"),
        second.config.as_os_str(),
        OsStr::new("-o"),
        OsStr::new("json"),
        OsStr::new("status"),
    ])?;
    ensure!(
        status.pid == second_pid,
        "--config SECOND status: {status:?}"
    );
    let status = shunt_status(&[
        OsStr::new("--admin-socket"),
        first.socket.as_os_str(),
        OsStr::new("--config"),
        second.config.as_os_str(),
        OsStr::new("status"),
        OsStr::new("-o"),
        OsStr::new("json"),
    ])?;
    ensure!(
        status.pid == first_pid,
        "--admin-socket FIRST --config SECOND: the flag must win: {status:?}"
    );

    let out = daemon::shunt(
        &[
            OsStr::new("uninstall"),
            OsStr::new("--config"),
            second.config.as_os_str(),
        ],
        CLI,
    )?;
    ensure!(out.starts_with("removed "), "uninstall printed {out:?}");
    second
        .wait_exit(Duration::from_secs(20))
        .with_context(|| format!("the second daemon's log:\n{}", second.log_text()))?;
    ensure!(
        !second.pin_dir.exists(),
        "{:?} is still there after uninstalling the second daemon",
        second.pin_dir
    );
    // Its programs are gone: its pod's connections go direct.
    ensure!(
        !redirected(&second_sandbox, &second_client, second_to)?,
        "a pod of the uninstalled daemon is still redirected"
    );

    // The first daemon never heard of it: still running, pins in place, pods redirected.
    ensure!(
        first.is_running(),
        "the first daemon stopped; its log:\n{}",
        first.log_text()
    );
    ensure!(
        pins(&first.pin_dir) == first_pins,
        "the first daemon's pins changed: {} of {first_pins} left",
        pins(&first.pin_dir)
    );
    let status = first.status()?;
    ensure!(status.pid == first_pid, "{status:?}");
    for _ in 0..3 {
        ensure!(
            redirected(&first_sandbox, &first_client, first_to)?,
            "the first daemon's pod is no longer redirected; its log:\n{}",
            first.log_text()
        );
    }
    Ok(())
}

#[test]
fn status_and_metrics_show_the_open_file_limits_and_the_limits_sized_to_them() -> anyhow::Result<()>
{
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    // The per-pod limit configured, the node's left to be sized.
    let options = Options::default().with_config(|c| c.limits = fixture::limits(None, Some(100)));
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;

    let status = shunt_status(&[
        OsStr::new("status"),
        OsStr::new("--config"),
        daemon.config.as_os_str(),
        OsStr::new("-o"),
        OsStr::new("json"),
    ])?;
    let open_files = status
        .open_files
        .with_context(|| format!("no open-file limits in {status:?}"))?;
    let (soft, hard) = (open_files.soft, open_files.hard);
    // Raised at start-up: the soft limit to the hard one at least (root may go further).
    ensure!(soft == hard, "soft {soft} not raised to hard {hard}");
    ensure!(soft > 1024, "open-file limit {soft} not raised");
    // Two descriptors per connection after a reserve of 1024, at most the default.
    let sized = ((soft - 1024) / 2).min(65_536);
    ensure!(
        status.max_connections as u64 == sized,
        "max_connections is not sized to {soft} descriptors ({sized}): {status:?}"
    );
    ensure!(
        status.max_connections_per_pod == 100,
        "the configured per-pod limit must stay as configured: {status:?}"
    );

    let text = daemon::shunt(
        &[
            OsStr::new("--config"),
            daemon.config.as_os_str(),
            OsStr::new("status"),
        ],
        CLI,
    )?;
    let line =
        format!("limits: {sized} connections, 100 per pod  open files: soft {soft}, hard {hard}");
    ensure!(text.contains(&line), "status text lacks {line:?}:\n{text}");
    // `shunt config` prints the limits in force.
    let config = daemon::shunt(
        &[
            OsStr::new("config"),
            OsStr::new("--config"),
            daemon.config.as_os_str(),
        ],
        CLI,
    )?;
    ensure!(
        config.contains(&format!("max_connections: {sized}\n"))
            && config.contains("max_connections_per_pod: 100\n"),
        "shunt config does not show the limits in force:\n{config}"
    );

    let scrape = telemetry::scrape(daemon.telemetry_addr("metrics")?)?;
    telemetry::promtool_check(&scrape.text)?;
    for (labels, value) in [(("kind", "soft"), soft), (("kind", "hard"), hard)] {
        let got = scrape.sum("shunt_open_files_limit", &[labels]);
        ensure!(
            got == value as f64,
            "shunt_open_files_limit{{{}={:?}}} is {got}, not {value}",
            labels.0,
            labels.1
        );
    }
    for (limit, value) in [("node", sized), ("pod", 100)] {
        let got = scrape.sum("shunt_connections_limit", &[("limit", limit)]);
        ensure!(
            got == value as f64,
            "shunt_connections_limit{{limit={limit:?}}} is {got}, not {value}"
        );
    }
    Ok(())
}
