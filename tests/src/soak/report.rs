//! The soak's verdict and figures: printed, and kept as `soak.json`.

use std::path::Path;

use serde::Serialize;

use super::{
    Plan,
    connection_churn::Window as ChurnWindow,
    restart::Restart,
    samples::{Drained, Sample, Sampler, Segment},
    timeline::Window,
    workloads::Outcomes,
};
use crate::bench::report::Machine;

/// RSS may grow at most this much after warm-up.
pub const RSS_GROWTH_LIMIT_PCT: f64 = 5.0;
/// Windows of short connections a run has: one per daemon process.
const CHURN_WINDOWS: usize = 2;

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
    pub peak_redirected: Option<u64>,
    pub peak_upstream: Option<u64>,
    /// Each window of short connections, with what shunt held before, at peak and after.
    pub connection_churn: Vec<ChurnWindow>,
    pub drained: Drained,
    pub windows: Vec<Window>,
    pub samples: Vec<Sample>,
    /// Why it failed; empty when it passed.
    pub failures: Vec<String>,
    pub passed: bool,
}

/// What shunt held once traffic let up: after each window of short connections, and after
/// all the traffic stopped.
pub struct Held {
    pub connection_churn: Vec<ChurnWindow>,
    pub drained: Drained,
}

impl Report {
    pub fn new(
        plan: &Plan,
        traffic_seconds: f64,
        outcomes: Outcomes,
        restart: Restart,
        sampler: &Sampler,
        held: Held,
        windows: Vec<Window>,
    ) -> Report {
        let Held {
            connection_churn,
            drained,
        } = held;
        let rss = sampler.segments();
        let failures = judge(&outcomes, &restart, &rss, &connection_churn, &drained);
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
            peak_redirected: sampler.peak(|s| s.redirected),
            peak_upstream: sampler.peak(|s| s.upstream),
            connection_churn,
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
            "  unsent          {} unary calls and {} streams retried: refused by a GOAWAY before the server processed them",
            o.ok("unary_unsent_retried"),
            o.ok("stream_unsent_retried")
        );
        println!("  TLS conns       {} ok", o.ok("tls"));
        println!("  opaque conns    {} ok", o.ok("opaque"));
        println!(
            "  short conns     {} ok (one call each), {} faulted (injected, expected)",
            o.ok("churn"),
            o.churn_faulted
        );
        println!(
            "  endpoint churn  {} unary calls answered by the removed greeter after the reload",
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
            let message = o.messages.get(kind).map_or("", String::as_str);
            println!("    {n:6}  {kind}: {message}");
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
        for w in &self.connection_churn {
            let (b, p, a) = (&w.baseline, &w.peak, &w.after);
            let verdict = match w.settled_after_s {
                Some(s) => format!("back {s:.1}s after"),
                None => format!("NOT back after {:.1}s", w.checked_for_s),
            };
            println!(
                "  short conns {:.0}s–{:.0}s (pid {}): {verdict}; upstream conns {} → peak {} → {} (+{} allowed), fds {} → {} → {} (+{}), RSS {:.1} → {:.1} → {:.1} MiB (+{:.0})",
                w.from_s,
                w.to_s,
                w.pid,
                show(b.upstream),
                show(p.upstream),
                show(a.upstream),
                w.upstream_tolerance,
                b.fds,
                p.fds,
                a.fds,
                w.fd_tolerance,
                mib(b.rss_kib),
                mib(p.rss_kib),
                mib(a.rss_kib),
                mib(w.rss_tolerance_kib),
            );
        }
        let d = &self.drained;
        println!(
            "  fds             baseline {}, peak {}, after drain {} (tolerance +{})",
            d.fds_baseline, self.peak_fds, d.fds, d.fd_tolerance
        );
        println!(
            "  upstream conns  peak {}, after drain {}",
            show(self.peak_upstream),
            show(d.upstream)
        );
        println!(
            "  map entries     DST_BY_CLIENT peak {} → {}, REDIRECTED peak {} → {} after {:.1}s",
            show(self.peak_dst_by_client),
            show(d.dst_by_client),
            show(self.peak_redirected),
            show(d.redirected),
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
    connection_churn: &[ChurnWindow],
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
    for kind in ["unary", "streams", "tls", "opaque", "churn"] {
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
    // One window of short connections per daemon process, each judged: otherwise "back to
    // baseline" would come from a check that never ran.
    if connection_churn.len() < CHURN_WINDOWS {
        failures.push(format!(
            "{} of {CHURN_WINDOWS} windows of short connections were checked",
            connection_churn.len()
        ));
    }
    for w in connection_churn.iter().filter(|w| !w.settled()) {
        failures.push(format!(
            "{:.1}s after the short connections of {:.0}s–{:.0}s stopped, shunt held {} upstream \
             connections (before: {}, +{} allowed), {} descriptors (before: {}, +{}), RSS {:.1} MiB \
             (before: {:.1}, +{:.0})",
            w.checked_for_s,
            w.from_s,
            w.to_s,
            show(w.after.upstream),
            show(w.baseline.upstream),
            w.upstream_tolerance,
            w.after.fds,
            w.baseline.fds,
            w.fd_tolerance,
            mib(w.after.rss_kib),
            mib(w.baseline.rss_kib),
            mib(w.rss_tolerance_kib),
        ));
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
            "original-destination maps not empty after the traffic: DST_BY_CLIENT {}, REDIRECTED {}",
            show(drained.dst_by_client),
            show(drained.redirected)
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
