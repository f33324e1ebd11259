//! What the daemon holds, sampled while traffic runs: resident memory (VmRSS), open
//! descriptors (`/proc/PID/fd`), upstream connections to the greeters (`ss` in the client
//! pod's namespace) and the entries of the original-destination maps (`DST_BY_CLIENT`,
//! `REDIRECTED`, read from their pins with bpftool). Each daemon process
//! (the restart starts another) is a segment of its own; RSS growth is measured per segment
//! from the end of its warm-up.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use super::sandbox::{GRPC_PORT, SoakSandbox};
use crate::{
    bench::process::{established_to_port, fd_count, rss_kib},
    daemon::Daemon,
};

/// Descriptors a daemon may hold after the traffic beyond what it held before it: an idle
/// pooled HTTP/2 connection per greeter (kept for the pod's next call) and empty pipes kept
/// in splice's pool for the next connection (two descriptors each, and only as many as
/// directions were moving bytes at once: a TLS and an opaque connection at a time here).
pub const FD_TOLERANCE: u64 = 16;
/// How long the final checks wait for connections to close and the maps to empty.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Sample {
    /// Seconds since traffic started.
    pub t_s: f64,
    pub pid: u32,
    pub rss_kib: u64,
    pub fds: u64,
    /// shunt's established connections to the greeters' port (`None`: `ss` failed).
    pub upstream: Option<u64>,
    pub dst_by_client: Option<u64>,
    pub redirected: Option<u64>,
}

pub struct Sampler {
    interval: Duration,
    maps: PathBuf,
    samples: Vec<Sample>,
    /// When each daemon process's segment began (seconds since traffic started).
    segments: Vec<f64>,
    last: Option<Instant>,
}

/// RSS over one daemon process's share of the run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Segment {
    pub pid: u32,
    pub from_s: f64,
    pub to_s: f64,
    pub start_kib: u64,
    /// Median of the three samples at the end of the warm-up.
    pub after_warm_up_kib: u64,
    /// Median of the last three samples under traffic.
    pub end_kib: u64,
    pub peak_kib: u64,
    pub growth_pct: f64,
    pub samples: usize,
}

/// The state after the traffic stopped and everything had time to drain.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Drained {
    pub seconds: f64,
    pub connections: Option<u64>,
    pub fds_baseline: u64,
    pub fds: u64,
    pub fd_tolerance: u64,
    /// shunt's upstream connections to the greeters then (idle pooled ones).
    pub upstream: Option<u64>,
    pub dst_by_client: Option<u64>,
    pub redirected: Option<u64>,
}

impl Drained {
    pub fn fds_ok(&self) -> bool {
        self.fds <= self.fds_baseline + self.fd_tolerance
    }

    pub fn maps_empty(&self) -> bool {
        self.dst_by_client == Some(0) && self.redirected == Some(0)
    }
}

impl Sampler {
    pub fn new(daemon: &Daemon<'_>, interval: Duration) -> Sampler {
        Sampler {
            interval,
            maps: daemon.pin_dir.join("maps"),
            samples: Vec::new(),
            segments: vec![0.0],
            last: None,
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Takes a sample if the interval has passed since the last one.
    pub fn sample(&mut self, daemon: &Daemon<'_>, sandbox: &SoakSandbox, t_s: f64) {
        if self.last.is_some_and(|last| last.elapsed() < self.interval) {
            return;
        }
        self.sample_now(daemon, sandbox, t_s);
    }

    /// Takes a sample now (a baseline must not be an interval old) and returns it.
    pub fn sample_now(
        &mut self,
        daemon: &Daemon<'_>,
        sandbox: &SoakSandbox,
        t_s: f64,
    ) -> Option<Sample> {
        let pid = daemon.pid().ok()?;
        self.last = Some(Instant::now());
        let sample = self.read(pid, sandbox, t_s);
        self.samples.push(sample);
        Some(sample)
    }

    fn read(&self, pid: u32, sandbox: &SoakSandbox, t_s: f64) -> Sample {
        Sample {
            t_s,
            pid,
            rss_kib: rss_kib(pid) as u64,
            fds: fd_count(pid),
            upstream: established_to_port(&sandbox.sandbox, &sandbox.client, GRPC_PORT).ok(),
            dst_by_client: map_entries(&self.maps.join("DST_BY_CLIENT")),
            redirected: map_entries(&self.maps.join("REDIRECTED")),
        }
    }

    /// A new daemon process runs from `t_s` on.
    pub fn new_segment(&mut self, t_s: f64) {
        self.segments.push(t_s);
        self.last = None;
    }

    pub fn latest(&self) -> Sample {
        self.samples.last().copied().unwrap_or_default()
    }

    pub fn last_fds(&self) -> u64 {
        self.latest().fds
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    pub fn peak(&self, field: fn(&Sample) -> Option<u64>) -> Option<u64> {
        self.samples.iter().filter_map(field).max()
    }

    /// Whether `t_s` falls in the warm-up of the current daemon process's segment (the
    /// last one runs to `duration`).
    pub fn warming_up(&self, t_s: f64, duration: Duration) -> bool {
        let from_s = self.segments.last().copied().unwrap_or(0.0);
        let to_s = match self.segments.len() {
            1 => super::slot_time(duration, super::RESTART_SLOT).as_secs_f64(),
            _ => duration.as_secs_f64(),
        };
        t_s < from_s + (to_s - from_s) * super::WARM_UP_FRACTION
    }

    /// RSS growth of each daemon process, from the end of its warm-up (the first
    /// [`super::WARM_UP_FRACTION`] of its segment) to the end of its segment.
    pub fn segments(&self) -> Vec<Segment> {
        let end_of_run = self.samples.last().map_or(0.0, |s| s.t_s);
        let mut segments = Vec::new();
        for (i, &from_s) in self.segments.iter().enumerate() {
            let to_s = self.segments.get(i + 1).copied().unwrap_or(end_of_run);
            let warm_until = from_s + (to_s - from_s) * super::WARM_UP_FRACTION;
            // The restart's own sample (the new process at once) belongs to the new segment.
            let inside: Vec<&Sample> = self
                .samples
                .iter()
                .filter(|s| s.t_s >= from_s && (s.t_s < to_s || i + 1 == self.segments.len()))
                .collect();
            let Some(first) = inside.first() else {
                continue;
            };
            let warmed: Vec<u64> = inside
                .iter()
                .filter(|s| s.t_s >= warm_until)
                .map(|s| s.rss_kib)
                .collect();
            let after_warm_up_kib = median(warmed.iter().take(3).copied());
            let end_kib = median(warmed.iter().rev().take(3).copied());
            segments.push(Segment {
                pid: first.pid,
                from_s,
                to_s,
                start_kib: first.rss_kib,
                after_warm_up_kib,
                end_kib,
                peak_kib: inside.iter().map(|s| s.rss_kib).max().unwrap_or(0),
                growth_pct: (end_kib as f64 - after_warm_up_kib as f64) * 100.0
                    / (after_warm_up_kib.max(1) as f64),
                samples: warmed.len(),
            });
        }
        segments
    }

    /// Waits until the daemon has no connections, its descriptors are back within
    /// [`FD_TOLERANCE`] of `fds_baseline` and the original-destination maps are empty, or
    /// [`DRAIN_TIMEOUT`] passes; returns what it saw last.
    pub fn drain(
        &mut self,
        daemon: &Daemon<'_>,
        sandbox: &SoakSandbox,
        fds_baseline: u64,
        traffic_started: Instant,
    ) -> anyhow::Result<Drained> {
        let pid = daemon.pid()?;
        let started = Instant::now();
        loop {
            let connections = daemon.status().ok().map(|s| s.connections as u64);
            let sample = self.read(pid, sandbox, traffic_started.elapsed().as_secs_f64());
            let drained = Drained {
                seconds: started.elapsed().as_secs_f64(),
                connections,
                fds_baseline,
                fds: sample.fds,
                fd_tolerance: FD_TOLERANCE,
                upstream: sample.upstream,
                dst_by_client: sample.dst_by_client,
                redirected: sample.redirected,
            };
            let done = connections == Some(0) && drained.fds_ok() && drained.maps_empty();
            if done || started.elapsed() >= DRAIN_TIMEOUT {
                return Ok(drained);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn median(values: impl Iterator<Item = u64>) -> u64 {
    let mut values: Vec<u64> = values.collect();
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

/// Entries in a pinned map (`bpftool map dump`); `None` if it cannot be read.
fn map_entries(pin: &Path) -> Option<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    entries.as_array().map(|a| a.len() as u64)
}
