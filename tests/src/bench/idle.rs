//! Memory per idle connection: shunt's resident memory with many idle passthrough connections
//! open, minus what it used before they were opened.

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::bail;
use shunt::{admin::api::Stats, config::Forwarding};

use super::{
    Plan,
    process::rss_kib,
    report::{Row, Section, column},
};
use crate::{
    daemon::{Daemon, Options},
    fixture,
    sandbox::Sandbox,
};

pub fn memory_per_connection(plan: &Plan) -> anyhow::Result<Section> {
    crate::require_root()?;
    // Each proxied connection is two descriptors in shunt, which keeps 1024 for itself; where
    // the hard limit (which an unprivileged container cannot raise) is lower than that,
    // measure fewer.
    let fd_limit = open_file_limit();
    let count = plan
        .idle_connections
        .min(u32::try_from(fd_limit.saturating_sub(1100) / 2).unwrap_or(u32::MAX));
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let backend = sandbox.add_pod("backend")?;
    let mut section = Section::new(
        "idle_memory",
        format!("Memory per idle connection, {count} idle passthrough connections"),
        vec![
            column("rss_mib", "shunt RSS (MiB)", 1),
            column("kib_per_connection", "per connection (KiB)", 2),
        ],
    );
    for (forwarding, port) in [(Forwarding::Splice, 9000), (Forwarding::Copy, 9001)] {
        let forwarding_name = forwarding.as_str();
        println!("  {count} idle connections, {forwarding_name} forwarding");
        // A sink per run: it never reads, so it would keep the previous run's sockets.
        let sink = SocketAddr::new(backend.ipv4.into(), port);
        let mut cmd = Command::new(crate::probe_bin());
        cmd.args(["sink", "--listen", &sink.to_string()]);
        let sink_pid = sandbox.spawn_in_pod(&backend, cmd)?;
        crate::probe::wait_listening(&sandbox, &backend, sink.port(), sink_pid)?;
        // Left out, the per-pod limit is a quarter of what the descriptors serve: this one
        // pod needs them all.
        let limit = count + 16;
        let options = Options {
            log: Some("info"),
            ..Options::default()
        }
        .with_config(|c| {
            c.intercept.forwarding = forwarding;
            c.limits = fixture::limits(Some(limit as usize), Some(limit as usize));
        });
        let daemon = Daemon::start(&sandbox, &[&client], &options)?;
        let pid = daemon.pid()?;
        let baseline = rss_kib(pid);

        let out = sandbox
            .scratch_dir("idle")?
            .join(format!("{forwarding_name}.json"));
        let mut hold = Command::new(crate::probe_bin());
        hold.args([
            "hold",
            "--to",
            &sink.to_string(),
            "--count",
            &count.to_string(),
            "--seconds",
            "120",
        ])
        .stdout(std::fs::File::create(&out)?);
        let holder = sandbox.spawn_in_pod(&client, hold)?;
        let forwarded = || daemon.counter("proxy", "forwarded");
        let deadline = Instant::now() + Duration::from_secs(60);
        while forwarded()? < u64::from(count) {
            if !sandbox.is_running(holder) && forwarded()? < u64::from(count) {
                bail!(
                    "the idle connections' holder exited early: {}",
                    std::fs::read_to_string(&out).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {count} idle connections reached their upstream in 60s; shunt's counters: {:?}",
                    forwarded()?,
                    daemon.ctl_as::<Stats>(&["stats"])?.proxy
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Let allocations settle before reading.
        std::thread::sleep(Duration::from_millis(500));
        let loaded = rss_kib(pid);
        sandbox.kill(holder);
        sandbox.kill(sink_pid);
        let mut row = Row::new(format!("shunt ({forwarding_name})"));
        row.set("rss_mib", loaded / 1024.0)
            .set("kib_per_connection", (loaded - baseline) / f64::from(count));
        println!(
            "    {:.1} MiB → {:.1} MiB: {:.2} KiB per connection",
            baseline / 1024.0,
            loaded / 1024.0,
            (loaded - baseline) / f64::from(count)
        );
        section.rows.push(row);
        drop(daemon);
    }
    if count < plan.idle_connections {
        section.notes.push(format!(
            "{count} rather than {} connections: the open-file limit here is {fd_limit}.",
            plan.idle_connections
        ));
    }
    section.notes.push(
        "Resident memory of the shunt process only; socket buffers and splice pipes live in the kernel."
            .into(),
    );
    Ok(section)
}

fn open_file_limit() -> u64 {
    crate::sys::open_file_hard_limit().unwrap_or(1024)
}
