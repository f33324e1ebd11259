//! The soak's verdict and figures: printed, and kept as `soak.json`.

use std::path::Path;

use serde::Serialize;

use super::{
    Plan,
    restart::Restart,
    samples::{Drained, Sample, Sampler, Segment},
    timeline::Window,
    workloads::Outcomes,
};
use crate::bench::report::Machine;

/// RSS may grow at most this much after warm-up.
pub const RSS_GROWTH_LIMIT_PCT: f64 = 5.0;

#[derive(Serialize)]
pub struct Report {
    pub date: String,
    pub machine: Machine,
    pub planned_seconds: f64,
    pub traffic_seconds: f64,
    pub outcomes: Outcomes,
    pub restart: Restart,
    /// RSS per daemon process (before and after the restart).
    pub rss: Vec<Segment>,
    pub peak_fds: u64,
    pub peak_dst_by_client: Option<u64>,
    pub peak_dst_by_sock: Option<u64>,
    pub drained: Drained,
    pub windows: Vec<Window>,
    pub samples: Vec<Sample>,
    /// Why it failed; empty when it passed.
    pub failures: Vec<String>,
    pub passed: bool,
}

impl Report {
    pub fn new(
        plan: &Plan,
        traffic_seconds: f64,
        outcomes: Outcomes,
        restart: Restart,
        sampler: &Sampler,
        drained: Drained,
        windows: Vec<Window>,
    ) -> Report {
        let rss = sampler.segments();
        let failures = judge(&outcomes, &restart, &rss, &drained);
        Report {
            date: crate::bench::today(),
            machine: Machine::describe(),
            planned_seconds: plan.duration.as_secs_f64(),
            traffic_seconds,
            passed: failures.is_empty(),
            failures,
            outcomes,
            restart,
            rss,
            peak_fds: sampler.peak(|s| Some(s.fds)).unwrap_or(0),
            peak_dst_by_client: sampler.peak(|s| s.dst_by_client),
            peak_dst_by_sock: sampler.peak(|s| s.dst_by_sock),
            drained,
            windows,
            samples: sampler.samples().to_vec(),
        }
    }

    pub fn print(&self) {
        let o = &self.outcomes;
        println!("\nsoak report ({:.0}s of traffic)", self.traffic_seconds);
        println!(
            "  unary gRPC      {} ok, {} faulted (injected, expected)",
            o.ok("unary"),
            o.faulted
        );
        println!(
            "  server streams  {} ok ({} replies)",
            o.ok("streams"),
            o.ok("stream_replies")
        );
        println!(
            "  unsent          {} unary calls retried: the client's connection closed on GOAWAY before sending them",
            o.ok("unary_unsent_retried")
        );
        println!("  TLS conns       {} ok", o.ok("tls"));
        println!("  opaque conns    {} ok", o.ok("opaque"));
        println!(
            "  churn           {} unary calls answered by the removed greeter after the reload",
            o.served_while_removed
        );
        println!("  unexpected      {}", o.unexpected_total());
        for (kind, n) in &o.unexpected {
            let message = o.messages.get(kind).map_or("", String::as_str);
            println!("    {n:6}  {kind}: {message}");
        }
        let r = &self.restart;
        println!(
            "  restart         {} in {:.1}s (pid {} → {}), {} failures around it",
            r.path,
            r.seconds,
            r.old_pid,
            r.new_pid,
            o.restart_total()
        );
        if let Some(why) = &r.handoff_error {
            println!("    handoff not available: {why}");
        }
        for (kind, n) in &o.restart {
            println!("    {n:6}  {kind}");
        }
        for s in &self.rss {
            println!(
                "  RSS pid {:<7}  start {:.1} MiB, after warm-up {:.1} MiB, end {:.1} MiB, peak {:.1} MiB: growth {:+.2}% ({}s–{}s, {} samples)",
                s.pid,
                mib(s.start_kib),
                mib(s.after_warm_up_kib),
                mib(s.end_kib),
                mib(s.peak_kib),
                s.growth_pct,
                s.from_s.round(),
                s.to_s.round(),
                s.samples
            );
        }
        let d = &self.drained;
        println!(
            "  fds             baseline {}, peak {}, after drain {} (tolerance +{})",
            d.fds_baseline, self.peak_fds, d.fds, d.fd_tolerance
        );
        println!(
            "  map entries     DST_BY_CLIENT peak {} → {}, DST_BY_SOCK peak {} → {} after {:.1}s",
            show(self.peak_dst_by_client),
            show(d.dst_by_client),
            show(self.peak_dst_by_sock),
            show(d.dst_by_sock),
            d.seconds
        );
        match self.passed {
            true => println!("PASSED"),
            false => {
                println!("FAILED:");
                for failure in &self.failures {
                    println!("  - {failure}");
                }
            }
        }
    }

    pub fn write(&self, out_dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(out_dir)?;
        let path = out_dir.join("soak.json");
        std::fs::write(&path, serde_json::to_string_pretty(self)?)?;
        println!("report written to {}", path.display());
        Ok(())
    }
}

fn judge(
    outcomes: &Outcomes,
    restart: &Restart,
    rss: &[Segment],
    drained: &Drained,
) -> Vec<String> {
    let mut failures = Vec::new();
    if outcomes.unexpected_total() > 0 {
        failures.push(format!(
            "{} unexpected failures: {:?}",
            outcomes.unexpected_total(),
            outcomes.unexpected
        ));
    }
    if restart.path == "handoff" && outcomes.restart_total() > 0 {
        failures.push(format!(
            "{} failures across a handoff restart (none expected): {:?}",
            outcomes.restart_total(),
            outcomes.restart
        ));
    }
    if outcomes.served_while_removed > 0 {
        failures.push(format!(
            "{} calls were answered by an endpoint after a reload removed it",
            outcomes.served_while_removed
        ));
    }
    // Each workload must have run, or "no failures" would prove nothing.
    for kind in ["unary", "streams", "tls", "opaque"] {
        if outcomes.ok(kind) == 0 {
            failures.push(format!("no {kind} call or connection succeeded"));
        }
    }
    if outcomes.faulted == 0 {
        failures.push("the fault rule aborted no call while it was set".into());
    }
    for segment in rss {
        if segment.samples < 3 {
            failures.push(format!(
                "too few RSS samples after warm-up for pid {} ({})",
                segment.pid, segment.samples
            ));
        } else if segment.growth_pct >= RSS_GROWTH_LIMIT_PCT {
            failures.push(format!(
                "RSS of pid {} grew {:.2}% after warm-up (limit {RSS_GROWTH_LIMIT_PCT}%)",
                segment.pid, segment.growth_pct
            ));
        }
    }
    if drained.connections != Some(0) {
        failures.push(format!(
            "{} connections still open {:.0}s after the traffic stopped",
            show(drained.connections),
            drained.seconds
        ));
    }
    if !drained.fds_ok() {
        failures.push(format!(
            "{} descriptors open after the traffic, baseline {} (+{} allowed)",
            drained.fds, drained.fds_baseline, drained.fd_tolerance
        ));
    }
    if !drained.maps_empty() {
        failures.push(format!(
            "original-destination maps not empty after the traffic: DST_BY_CLIENT {}, DST_BY_SOCK {}",
            show(drained.dst_by_client),
            show(drained.dst_by_sock)
        ));
    }
    failures
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn show(n: Option<u64>) -> String {
    n.map_or_else(|| "?".into(), |n| n.to_string())
}
