//! What a proxy process costs, read from `/proc`: CPU time and peak memory of a process and
//! its descendants (nginx's workers, for one); and what it holds: open descriptors, and its
//! established connections to a port as `ss` sees them in a pod's network namespace.

use anyhow::Context;

/// User + system CPU seconds of `pid` and every live descendant.
pub fn tree_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for p in tree(pid) {
        total += cpu_seconds(p).unwrap_or(0.0);
    }
    Ok(total)
}

/// Peak resident memory (VmHWM) of `pid` and its descendants, in MiB.
pub fn tree_peak_rss_mib(pid: u32) -> f64 {
    tree(pid)
        .into_iter()
        .map(|p| status_kib(p, "VmHWM:"))
        .sum::<f64>()
        / 1024.0
}

/// Forgets the peak resident memory of `pid` and its descendants (`/proc/PID/clear_refs`,
/// "5"), so that [`tree_peak_rss_mib`] then reports the peak under the load that follows
/// rather than at start-up (shunt parses the kernel's BTF when it loads its programs).
pub fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    for p in tree(pid) {
        std::fs::write(format!("/proc/{p}/clear_refs"), "5")
            .with_context(|| format!("resetting the peak RSS of process {p}"))?;
    }
    Ok(())
}

/// Current resident memory (VmRSS) of one process, in KiB.
pub fn rss_kib(pid: u32) -> f64 {
    status_kib(pid, "VmRSS:")
}

/// Open descriptors of one process (`/proc/PID/fd`); 0 if it is gone.
pub fn fd_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// Established TCP connections to remote port `port` in `pod`'s network namespace (`ss -tn
/// state established`). In an enrolled pod the application's own connections go to shunt's
/// loopback listener, so those to a backend's port are shunt's upstream connections.
pub fn established_to_port(
    sandbox: &crate::sandbox::Sandbox,
    pod: &crate::sandbox::Pod,
    port: u16,
) -> anyhow::Result<u64> {
    let mut ss = std::process::Command::new("ss");
    ss.args([
        "-Htn",
        "state",
        "established",
        &format!("( dport = :{port} )"),
    ]);
    let out = sandbox.run_in_pod(pod, ss, std::time::Duration::from_secs(30))?;
    anyhow::ensure!(
        out.status.success(),
        "ss in pod {}: {}",
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .count() as u64)
}

fn status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0.0)
}

/// CPU seconds the whole machine spent busy (all CPUs: user, system, interrupts, softirqs),
/// from `/proc/stat`: what a target costs including the kernel's work done on its behalf in
/// softirqs and worker threads, which no process is charged for. Everything else running on
/// the machine counts too, so it is only meaningful on a quiet one.
pub fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| ticks.get(i).copied().unwrap_or(0.0))
        .sum();
    let per_second = crate::sys::clock_ticks() as f64;
    Ok(busy / per_second)
}

/// User + system CPU time of one process, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let fields = stat_fields(pid)?;
    let ticks: f64 = fields.get(11).context("no utime")?.parse::<f64>()?
        + fields.get(12).context("no stime")?.parse::<f64>()?;
    let per_second = crate::sys::clock_ticks() as f64;
    Ok(ticks / per_second)
}

/// The fields of `/proc/PID/stat` after the command name (which may contain spaces).
fn stat_fields(pid: u32) -> anyhow::Result<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

/// `pid` and its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = stat_fields(p)
                .ok()
                .and_then(|f| f.get(1).and_then(|s| s.parse::<u32>().ok()))
            {
                parents.push((p, ppid));
            }
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found
}

pub(super) enum Cpu {
    First,
    Last,
}

/// Runs `f` with this thread (and so the processes it starts) on one CPU, when there are
/// several; then on all of them again.
pub(super) fn on_cpu<T>(cpu: Cpu, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let all = sched_getaffinity(Pid::from_raw(0))?;
    let allowed: Vec<usize> = (0..CpuSet::count())
        .filter(|&i| all.is_set(i).unwrap_or(false))
        .collect();
    let (Some(&first), Some(&last)) = (allowed.first(), allowed.last()) else {
        return f();
    };
    if first == last {
        return f();
    }
    let mut one = CpuSet::new();
    one.set(match cpu {
        Cpu::First => first,
        Cpu::Last => last,
    })?;
    sched_setaffinity(Pid::from_raw(0), &one)?;
    let result = f();
    sched_setaffinity(Pid::from_raw(0), &all)?;
    result
}
