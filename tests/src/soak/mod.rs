//! The soak (`cargo xtask soak`): shunt under mixed traffic for a bounded time — unary and
//! server-streaming gRPC, TLS and opaque connections, and in a window of each half short
//! gRPC connections (one call each) — while endpoints come and go, a fault rule is switched
//! on and off and the daemon is restarted half-way. Passes when no call or connection failed
//! unexpectedly (injected faults are expected and counted; failures while the daemon
//! restarts are counted apart), RSS grew less than 5% after warm-up, shunt's upstream
//! connections, descriptors and RSS came back near where they were after each window of
//! short connections, and after the traffic stops the descriptors are back to their baseline
//! and the original-destination maps are empty.

mod connection_churn;
mod interval;
mod report;
mod restart;
mod samples;
mod sandbox;
mod timeline;
mod workloads;

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;

pub use self::{interval::GrpcInterval, report::Report};
use self::{
    samples::Sampler,
    sandbox::{GREETERS, SoakSandbox},
    timeline::{Timeline, WindowKind},
    workloads::{ChurnSwitch, Workloads},
};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// How long traffic runs (the set-up and the final checks come on top).
    pub duration: Duration,
}

/// The scheduled steps, each at its slot of twenty equal slots of the run. Fault windows never
/// span the restart: runtime fault rules belong to the daemon that was told them.
/// Short connections run from slot 2 to 6 and 12 to 16: once per daemon process, after its
/// first seconds (the baseline is read when they start) and ending [`CHURN_SETTLE_SLOTS`]
/// before its restart or the end of traffic, so the check after them is over by then.
const SCHEDULE: [(u32, Step); 21] = [
    (1, Step::RemoveEndpoint),
    (2, Step::ChurnOn),
    (2, Step::FaultOn),
    (3, Step::AddEndpoint),
    (4, Step::FaultOff),
    (5, Step::RemoveEndpoint),
    (6, Step::ChurnOff),
    (6, Step::FaultOn),
    (7, Step::AddEndpoint),
    (8, Step::FaultOff),
    (RESTART_SLOT, Step::Restart),
    (11, Step::RemoveEndpoint),
    (12, Step::ChurnOn),
    (12, Step::FaultOn),
    (13, Step::AddEndpoint),
    (14, Step::FaultOff),
    (15, Step::RemoveEndpoint),
    (16, Step::ChurnOff),
    (16, Step::FaultOn),
    (17, Step::AddEndpoint),
    (18, Step::FaultOff),
];
/// How long after short connections stop shunt has to be back near its baseline: surplus
/// idle upstream connections close within about a second, so this is ample (9 s in a
/// one-minute soak, 90 s in the ten-minute one).
const CHURN_SETTLE_SLOTS: u32 = 3;
const SLOTS: u32 = 20;
/// Half-way.
const RESTART_SLOT: u32 = 10;
/// The first two fifths of each daemon process's half of the run warm up: its first cycle of
/// churn and faults (slots 1–4, 11–14) takes every path once, so pools, caches and allocator
/// arenas fill; RSS growth is measured over the repeated cycle that follows.
pub const WARM_UP_FRACTION: f64 = 0.4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    RemoveEndpoint,
    AddEndpoint,
    FaultOn,
    FaultOff,
    ChurnOn,
    ChurnOff,
    Restart,
}

/// Runs the soak and writes `soak.json` into `out_dir`; the report says whether it passed.
pub fn run(plan: &Plan, out_dir: &Path) -> anyhow::Result<Report> {
    anyhow::ensure!(
        plan.duration >= Duration::from_secs(20),
        "a soak needs at least 20 seconds to warm up, restart and churn"
    );
    let started_setup = Instant::now();
    println!("setting up: a client pod, 3 greeters, a TLS server and an echo server");
    let sandbox = Arc::new(SoakSandbox::new()?);
    let mut daemon = sandbox.start_daemon()?;
    println!(
        "  shunt {} running ({:.1}s)",
        daemon.pid()?,
        started_setup.elapsed().as_secs_f64()
    );

    let timeline = Timeline::default();
    let mut sampler = Sampler::new(&daemon, sample_interval(plan.duration));
    sampler.sample(&daemon, &sandbox, 0.0);
    let baseline_fds = sampler.last_fds();

    println!(
        "running traffic for {:.0}s (restart at {:.0}s)",
        plan.duration.as_secs_f64(),
        slot_time(plan.duration, RESTART_SLOT).as_secs_f64()
    );
    let started = Instant::now();
    let churn = Arc::new(ChurnSwitch::default());
    let workloads = Workloads::start(&sandbox, plan.duration, churn.clone())?;
    let mut churn_check = connection_churn::Check::new(GREETERS);
    let mut restart = None;
    let mut endpoint_removed = false;
    let mut next_step = 0;
    let mut next_progress = Duration::from_secs(10);
    while started.elapsed() < plan.duration {
        let now = started.elapsed();
        while let Some(&(slot, step)) = SCHEDULE.get(next_step)
            && slot_time(plan.duration, slot) <= now
        {
            next_step += 1;
            match step {
                Step::RemoveEndpoint | Step::AddEndpoint => {
                    endpoint_removed = step == Step::RemoveEndpoint;
                    sandbox.set_endpoint_removed(&daemon, endpoint_removed)?;
                    timeline.mark(WindowKind::EndpointRemoved, endpoint_removed);
                }
                Step::FaultOn | Step::FaultOff => {
                    let on = step == Step::FaultOn;
                    sandbox.set_fault(&daemon, on)?;
                    timeline.mark(WindowKind::Fault, on);
                }
                Step::ChurnOn => {
                    let baseline = sampler
                        .sample_now(&daemon, &sandbox, started.elapsed().as_secs_f64())
                        .context("no baseline before the short connections: shunt is gone")?;
                    churn_check.open(&baseline);
                    churn.set(true);
                    timeline.mark(WindowKind::ConnectionChurn, true);
                    println!(
                        "  [{:5.0}s] short connections on: {} a second, {} at a time; shunt holds {}",
                        started.elapsed().as_secs_f64(),
                        connection_churn::RATE,
                        connection_churn::CONCURRENCY,
                        held(&baseline)
                    );
                }
                Step::ChurnOff => {
                    churn.set(false);
                    timeline.mark(WindowKind::ConnectionChurn, false);
                    churn_check.close(
                        started.elapsed().as_secs_f64(),
                        started + slot_time(plan.duration, slot + CHURN_SETTLE_SLOTS),
                    );
                }
                Step::Restart => {
                    // A check still running belongs to the old process: judged as it stands.
                    churn_check.finish_early();
                    timeline.mark(WindowKind::Restart, true);
                    let done = restart::restart(&sandbox, &mut daemon)?;
                    timeline.mark(WindowKind::Restart, false);
                    println!(
                        "  [{:5.0}s] restarted ({}, {:.1}s): shunt {} running",
                        started.elapsed().as_secs_f64(),
                        done.path,
                        done.seconds,
                        daemon.pid()?
                    );
                    sampler.new_segment(started.elapsed().as_secs_f64());
                    restart = Some(done);
                }
            }
            if !matches!(step, Step::Restart | Step::ChurnOn) {
                println!(
                    "  [{:5.0}s] {}",
                    started.elapsed().as_secs_f64(),
                    describe(step)
                );
            }
        }
        sampler.sample(&daemon, &sandbox, started.elapsed().as_secs_f64());
        if let Some(window) = churn_check.observe(&sampler.latest(), churn.busy()) {
            print_churn_window(window);
        }
        if started.elapsed() >= next_progress {
            next_progress += Duration::from_secs(10);
            let so_far = workloads.tally(&timeline);
            let last = sampler.latest();
            let phase = match sampler.warming_up(started.elapsed().as_secs_f64(), plan.duration) {
                true => "warm-up",
                false => "steady",
            };
            println!(
                "  [{:5.0}s] {phase}: {} | shunt RSS {:.1} MiB, {} fds, {} upstream conns, map entries {}/{}",
                started.elapsed().as_secs_f64(),
                so_far.progress_line(),
                last.rss_kib as f64 / 1024.0,
                last.fds,
                show(last.upstream),
                show(last.dst_by_client),
                show(last.redirected),
            );
        }
        let to_next_sample = sampler
            .interval()
            .min(plan.duration.saturating_sub(started.elapsed()));
        std::thread::sleep(to_next_sample.min(Duration::from_millis(500)));
    }
    if endpoint_removed {
        sandbox.set_endpoint_removed(&daemon, false)?;
    }
    churn.set(false);
    churn_check.finish_early();
    println!(
        "  [{:5.0}s] traffic stops; waiting for the workloads to finish",
        started.elapsed().as_secs_f64()
    );
    let finished = workloads.finish(&sandbox)?;
    let outcomes = finished.tally(&timeline);
    let traffic_seconds = started.elapsed().as_secs_f64();

    println!("waiting for connections to close, descriptors and map entries to drain");
    let drained = sampler.drain(&daemon, &sandbox, baseline_fds, started)?;
    let restart = restart.context("the restart step did not run")?;
    let report = Report::new(
        plan,
        traffic_seconds,
        outcomes,
        restart,
        &sampler,
        report::Held {
            connection_churn: churn_check.windows().to_vec(),
            drained,
        },
        timeline.windows(),
    );
    report.print();
    report
        .write(out_dir)
        .with_context(|| format!("writing the report into {}", out_dir.display()))?;
    daemon
        .ctl(&["status"])
        .context("shunt is not answering after the soak")?;
    Ok(report)
}

fn slot_time(duration: Duration, slot: u32) -> Duration {
    duration.mul_f64(f64::from(slot) / f64::from(SLOTS))
}

/// Samples often enough for a few dozen points in a short run, without spawning bpftool
/// more than once a second.
fn sample_interval(duration: Duration) -> Duration {
    (duration / 100).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

fn describe(step: Step) -> &'static str {
    match step {
        Step::RemoveEndpoint => "endpoint greeter-2 removed (config reload)",
        Step::AddEndpoint => "endpoint greeter-2 added back (config reload)",
        Step::FaultOn => "fault rule on: SayHello aborted with RESOURCE_EXHAUSTED at 50%",
        Step::FaultOff => "fault rule cleared",
        Step::ChurnOn => "short connections on",
        Step::ChurnOff => "short connections off",
        Step::Restart => "restart",
    }
}

fn held(sample: &samples::Sample) -> String {
    format!(
        "{} upstream conns, {} fds, RSS {:.1} MiB",
        show(sample.upstream),
        sample.fds,
        sample.rss_kib as f64 / 1024.0
    )
}

fn print_churn_window(window: &connection_churn::Window) {
    let (b, p, a) = (&window.baseline, &window.peak, &window.after);
    let verdict = match window.settled_after_s {
        Some(s) => format!("back within tolerance {s:.1}s after"),
        None => format!(
            "NOT back within tolerance {:.1}s after",
            window.checked_for_s
        ),
    };
    println!(
        "  [{:5.0}s] short connections ({:.0}s–{:.0}s): {verdict}: upstream conns {} → peak {} → {} (+{} allowed), fds {} → {} → {} (+{}), RSS {:.1} → {:.1} → {:.1} MiB (+{:.0})",
        window.to_s + window.checked_for_s,
        window.from_s,
        window.to_s,
        show(b.upstream),
        show(p.upstream),
        show(a.upstream),
        window.upstream_tolerance,
        b.fds,
        p.fds,
        a.fds,
        window.fd_tolerance,
        b.rss_kib as f64 / 1024.0,
        p.rss_kib as f64 / 1024.0,
        a.rss_kib as f64 / 1024.0,
        window.rss_tolerance_kib as f64 / 1024.0,
    );
}

fn show(count: Option<u64>) -> String {
    count.map_or_else(|| "?".into(), |n| n.to_string())
}
