//! The restart in the middle of the soak, done as an upgrade is: a new `shunt run` with the
//! same configuration is started while the old one runs, and the old one is expected to hand
//! over and exit. A daemon that cannot take over from a running one exits instead; then the
//! restart falls back to stopping the old daemon (SIGTERM, it drains) and starting a new one,
//! and the failures around it are what such a restart costs.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::sandbox::SoakSandbox;
use crate::daemon::Daemon;

/// Longest the old daemon may take to drain and exit after handing over.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, serde::Serialize)]
pub struct Restart {
    /// `handoff` or `stop-start`.
    pub path: &'static str,
    /// Why the handoff was not used: the new daemon's last log line.
    pub handoff_error: Option<String>,
    pub seconds: f64,
    pub old_pid: u32,
    pub new_pid: u32,
}

pub fn restart(sandbox: &SoakSandbox, daemon: &mut Daemon<'_>) -> anyhow::Result<Restart> {
    let started = Instant::now();
    let old_pid = daemon.pid()?;
    let log_before = daemon.log_text().len();
    let new_pid = daemon.spawn_successor()?;
    let deadline = Instant::now() + HANDOFF_TIMEOUT;
    loop {
        if !sandbox.sandbox.is_running(new_pid) {
            // It could not take over: reap it and restart the old-fashioned way.
            sandbox.sandbox.kill(new_pid);
            let log = daemon.log_text();
            let why = log
                .get(log_before..)
                .unwrap_or_default()
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("exited without a message")
                .to_owned();
            return stop_start(daemon, started, old_pid, why);
        }
        if !sandbox.sandbox.is_running(old_pid) && answering_pid(daemon) == Some(new_pid) {
            daemon.adopt(new_pid);
            return Ok(Restart {
                path: "handoff",
                handoff_error: None,
                seconds: started.elapsed().as_secs_f64(),
                old_pid,
                new_pid,
            });
        }
        if Instant::now() >= deadline {
            sandbox.sandbox.kill(new_pid);
            bail!(
                "restart: after {HANDOFF_TIMEOUT:?} the old shunt ({old_pid}) is {} and the new one ({new_pid}) {}",
                if sandbox.sandbox.is_running(old_pid) {
                    "still running"
                } else {
                    "gone"
                },
                if answering_pid(daemon) == Some(new_pid) {
                    "answers"
                } else {
                    "does not answer"
                },
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop_start(
    daemon: &mut Daemon<'_>,
    started: Instant,
    old_pid: u32,
    handoff_error: String,
) -> anyhow::Result<Restart> {
    if !daemon.terminate(STOP_TIMEOUT) {
        eprintln!("restart: shunt {old_pid} did not stop within {STOP_TIMEOUT:?}; killed");
    }
    daemon.launch().context("restart: starting shunt again")?;
    Ok(Restart {
        path: "stop-start",
        handoff_error: Some(handoff_error),
        seconds: started.elapsed().as_secs_f64(),
        old_pid,
        new_pid: daemon.pid()?,
    })
}

/// The pid of the daemon answering on the admin socket.
fn answering_pid(daemon: &Daemon<'_>) -> Option<u32> {
    daemon.status().ok().map(|status| status.pid)
}
