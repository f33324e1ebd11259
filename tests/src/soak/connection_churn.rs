//! Short-lived connections in the soak, and what they must leave behind. In a window of each
//! daemon process's half of the run, the churn workload (in [`super::workloads`]) makes new
//! client connections at a bounded rate, each a new TCP + HTTP/2 connection to the gRPC
//! Service carrying one call; the steady workloads go on meanwhile. Just before a window
//! opens, what shunt holds is read — its upstream connections (established, to the greeters'
//! port, counted with `ss` in the client pod's namespace), its descriptors and its resident
//! memory — and after the window closes it must come back within a small constant of that,
//! polled until a deadline: a pool that kept an upstream connection per client connection
//! ever made (issue 17) fails here by hundreds.

use std::time::Instant;

use serde::Serialize;

use super::samples::Sample;

/// New client connections per second while a window is open, and how many at once.
pub const RATE: u32 = 50;
pub const CONCURRENCY: usize = 2;
/// Descriptors shunt may hold after a window beyond those before it: the idle connections its
/// pools may keep (below) and pipes kept in splice's pool, with room for the steady
/// workloads' connections that happen to be open at the reading (a TLS and an opaque one).
pub const FD_TOLERANCE: u64 = 64;
/// `http2.upstream_max_idle`'s default: idle upstream connections a pool keeps per endpoint,
/// per client pod and worker thread. The soak's daemon runs with the default.
pub const UPSTREAM_MAX_IDLE: u64 = 4;
/// Upstream connections beyond the pools' idle cap: ones the steady workloads' calls happen
/// to be opening or closing at the reading.
pub const UPSTREAM_SLACK: u64 = 4;
/// Resident memory shunt may hold after a window beyond what it held before it: allocator
/// arenas and caches that grew while connections came and went, and the steady workloads'
/// own warm-up (the first window opens a few seconds into a daemon's run). Measured: +1.2
/// and +1.3 MiB over the windows of a one-minute soak with a bounded pool; +5.5 and +6.1 MiB
/// with the pool that kept an upstream connection per client connection (about 220 more
/// per window; 25 KiB each).
pub const RSS_TOLERANCE_KIB: u64 = 4 * 1024;

/// What shunt held at one reading.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Held {
    /// `None` if `ss` could not be run.
    pub upstream: Option<u64>,
    pub fds: u64,
    pub rss_kib: u64,
}

impl From<&Sample> for Held {
    fn from(sample: &Sample) -> Held {
        Held {
            upstream: sample.upstream,
            fds: sample.fds,
            rss_kib: sample.rss_kib,
        }
    }
}

/// One churn window and what shunt held before, during and after it.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub pid: u32,
    /// Seconds since traffic started.
    pub from_s: f64,
    pub to_s: f64,
    pub baseline: Held,
    /// The highest of each figure while the window was open.
    pub peak: Held,
    /// The last reading: the first within tolerance, or the one at the deadline.
    pub after: Held,
    /// Seconds from the window's end to the first reading within tolerance; `None`: never
    /// before the deadline.
    pub settled_after_s: Option<f64>,
    /// How long the readings were polled for.
    pub checked_for_s: f64,
    pub upstream_tolerance: u64,
    pub fd_tolerance: u64,
    pub rss_tolerance_kib: u64,
}

impl Window {
    fn within(&self, held: &Held) -> bool {
        let upstream_ok = match (self.baseline.upstream, held.upstream) {
            (Some(before), Some(now)) => now <= before + self.upstream_tolerance,
            _ => false,
        };
        upstream_ok
            && held.fds <= self.baseline.fds + self.fd_tolerance
            && held.rss_kib <= self.baseline.rss_kib + self.rss_tolerance_kib
    }

    pub fn settled(&self) -> bool {
        self.settled_after_s.is_some()
    }
}

/// Upstream connections the pools may keep idle: per endpoint, per worker thread (the
/// daemon runs one per CPU, its default), for the one client pod.
pub fn upstream_tolerance(endpoints: usize) -> u64 {
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    (endpoints * workers) as u64 * UPSTREAM_MAX_IDLE + UPSTREAM_SLACK
}

enum State {
    Idle,
    Open(Window),
    Settling {
        window: Window,
        stopped: Instant,
        deadline: Instant,
    },
}

/// Follows the windows one at a time: opened with a baseline, closed, then fed readings
/// until they are back within tolerance or the deadline passes.
pub struct Check {
    state: State,
    upstream_tolerance: u64,
    done: Vec<Window>,
}

impl Check {
    pub fn new(endpoints: usize) -> Check {
        Check {
            state: State::Idle,
            upstream_tolerance: upstream_tolerance(endpoints),
            done: Vec::new(),
        }
    }

    /// A window opens now; `baseline` was read just before.
    pub fn open(&mut self, baseline: &Sample) {
        self.finish_early();
        let held = Held::from(baseline);
        self.state = State::Open(Window {
            pid: baseline.pid,
            from_s: baseline.t_s,
            to_s: baseline.t_s,
            baseline: held,
            peak: held,
            after: held,
            settled_after_s: None,
            checked_for_s: 0.0,
            upstream_tolerance: self.upstream_tolerance,
            fd_tolerance: FD_TOLERANCE,
            rss_tolerance_kib: RSS_TOLERANCE_KIB,
        });
    }

    /// The window closes at `t_s`; readings are judged until `deadline`.
    pub fn close(&mut self, t_s: f64, deadline: Instant) {
        if let State::Open(mut window) = std::mem::replace(&mut self.state, State::Idle) {
            window.to_s = t_s;
            self.state = State::Settling {
                window,
                stopped: Instant::now(),
                deadline,
            };
        }
    }

    /// Feeds a reading. While settling, `churn_busy` (a churn batch still finishing) keeps a
    /// reading from counting as settled. Returns the window once judged.
    pub fn observe(&mut self, sample: &Sample, churn_busy: bool) -> Option<&Window> {
        let held = Held::from(sample);
        match &mut self.state {
            State::Idle => None,
            State::Open(window) => {
                if sample.pid == window.pid {
                    window.peak = Held {
                        upstream: window.peak.upstream.max(held.upstream),
                        fds: window.peak.fds.max(held.fds),
                        rss_kib: window.peak.rss_kib.max(held.rss_kib),
                    };
                }
                None
            }
            State::Settling {
                window,
                stopped,
                deadline,
            } => {
                // A reading from before the window closed says nothing about what is left.
                if sample.t_s < window.to_s && Instant::now() < *deadline {
                    return None;
                }
                window.after = held;
                window.checked_for_s = stopped.elapsed().as_secs_f64();
                let settled = !churn_busy && sample.pid == window.pid && window.within(&held);
                if settled {
                    window.settled_after_s = Some(window.checked_for_s);
                }
                if settled || Instant::now() >= *deadline {
                    let State::Settling { window, .. } =
                        std::mem::replace(&mut self.state, State::Idle)
                    else {
                        unreachable!("matched above");
                    };
                    self.done.push(window);
                    return self.done.last();
                }
                None
            }
        }
    }

    /// Ends a window still open or settling (a restart or the end of traffic came first): it
    /// is kept as not settled.
    pub fn finish_early(&mut self) {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle => {}
            State::Open(window) | State::Settling { window, .. } => self.done.push(window),
        }
    }

    pub fn windows(&self) -> &[Window] {
        &self.done
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn sample(t_s: f64, upstream: u64, fds: u64, rss_kib: u64) -> Sample {
        Sample {
            t_s,
            pid: 1,
            rss_kib,
            fds,
            upstream: Some(upstream),
            ..Sample::default()
        }
    }

    #[test]
    fn a_window_settles_on_the_first_reading_within_tolerance_after_it_closed() {
        let mut check = Check::new(3);
        let tolerance = upstream_tolerance(3);
        check.open(&sample(6.0, 8, 67, 17_000));
        assert!(
            check
                .observe(&sample(10.0, 900, 900, 30_000), false)
                .is_none()
        );
        check.close(18.0, Instant::now() + Duration::from_secs(60));
        // Taken before the window closed: says nothing about what is left.
        assert!(check.observe(&sample(17.5, 8, 67, 17_000), false).is_none());
        // A batch still finishing: not yet.
        assert!(check.observe(&sample(18.5, 8, 67, 17_000), true).is_none());
        assert!(
            check
                .observe(&sample(19.0, 8 + tolerance + 1, 67, 17_000), false)
                .is_none()
        );
        let window = check
            .observe(&sample(20.0, 8 + tolerance, 67 + 64, 17_000 + 4096), false)
            .expect("judged")
            .clone();
        assert!(window.settled());
        assert_eq!(window.peak.upstream, Some(900));
        assert_eq!(check.windows().len(), 1);
    }

    #[test]
    fn a_window_not_back_by_its_deadline_is_kept_as_not_settled() {
        let mut check = Check::new(3);
        check.open(&sample(6.0, 8, 67, 17_000));
        check.close(18.0, Instant::now());
        let window = check
            .observe(&sample(19.0, 8, 67 + 65, 17_000), false)
            .expect("judged at the deadline");
        assert!(!window.settled());
        assert_eq!(window.after.fds, 67 + 65);
    }

    #[test]
    fn a_window_cut_short_by_a_restart_is_kept_as_not_settled() {
        let mut check = Check::new(3);
        check.open(&sample(6.0, 8, 67, 17_000));
        check.finish_early();
        assert_eq!(check.windows().len(), 1);
        assert!(!check.windows()[0].settled());
    }
}
