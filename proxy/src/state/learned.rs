//! Destinations learned to carry only TLS or other opaque TCP, from what detection found on
//! their connections through the proxy.
//!
//! A destination is learned after [`LEARN_AFTER`] such connections in a row and no HTTP/2
//! ever; one sampled connection in [`SAMPLE_EVERY`] still goes through the proxy, and a
//! sample that turns out to be HTTP/2 takes the destination off the kernel path for good.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::Verdict;
use crate::net::canonical;

/// Connections in a row detected as TLS, opaque or server-first before a destination is
/// learned.
pub const LEARN_AFTER: u32 = 8;
/// One in this many connections to a learned destination is still sent through the proxy.
pub const SAMPLE_EVERY: u32 = 64;
/// Destinations tracked at most; past it, new ones are not learned.
const TRACKED_MAX: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// Opaque connections in a row so far, and the last verdict.
    Counting(u32, Verdict),
    Learned {
        verdict: Verdict,
        since: SystemTime,
    },
    /// HTTP/2 was seen: never learned.
    Http2,
}

/// A learned destination, as `shunt kernel-path` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Learned {
    pub destination: SocketAddr,
    /// What its connections were detected as (`tls`, `opaque`, `server-first`).
    pub verdict: String,
    pub since: SystemTime,
}

/// What detection found, per destination. The proxy reports to it; the kernel path's owner
/// reads it and is woken when the learned set changes.
#[derive(Default)]
pub struct Learner {
    enabled: AtomicBool,
    seen: Mutex<HashMap<SocketAddr, Seen>>,
    changed: Notify,
}

impl Learner {
    pub fn new(enabled: bool) -> Learner {
        Learner {
            enabled: AtomicBool::new(enabled),
            ..Learner::default()
        }
    }

    /// `intercept.kernel_path: learned` turned on or off (a reload). Off forgets everything.
    pub fn set_enabled(&self, enabled: bool) {
        if !self.enabled.swap(enabled, Ordering::Relaxed) || enabled {
            return;
        }
        self.lock().clear();
        self.changed.notify_one();
    }

    /// A connection to `destination` was detected as `verdict`.
    pub fn observe(&self, destination: SocketAddr, verdict: Verdict) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let destination = canonical(destination);
        let mut seen = self.lock();
        let full = seen.len() >= TRACKED_MAX;
        let changed = match verdict {
            Verdict::H2 => {
                let was_learned = matches!(seen.get(&destination), Some(Seen::Learned { .. }));
                if !full || seen.contains_key(&destination) {
                    seen.insert(destination, Seen::Http2);
                }
                was_learned
            }
            Verdict::Tls | Verdict::Opaque | Verdict::ServerFirst => {
                let next = match seen.get(&destination) {
                    None if full => return,
                    None => Seen::Counting(1, verdict),
                    Some(Seen::Counting(n, _)) if n + 1 >= LEARN_AFTER => Seen::Learned {
                        verdict,
                        since: SystemTime::now(),
                    },
                    Some(Seen::Counting(n, _)) => Seen::Counting(n + 1, verdict),
                    Some(Seen::Learned { .. } | Seen::Http2) => return,
                };
                let learned = matches!(next, Seen::Learned { .. });
                seen.insert(destination, next);
                learned
            }
            // Nothing was decided about the protocol: the streak neither grows nor ends.
            Verdict::Timeout | Verdict::Skipped | Verdict::KernelPath => false,
        };
        drop(seen);
        if changed {
            self.changed.notify_one();
        }
    }

    /// The learned destinations.
    pub fn learned(&self) -> Vec<Learned> {
        let mut learned: Vec<Learned> = self
            .lock()
            .iter()
            .filter_map(|(&destination, seen)| match seen {
                Seen::Learned { verdict, since } => Some(Learned {
                    destination,
                    verdict: verdict.as_str().to_owned(),
                    since: *since,
                }),
                _ => None,
            })
            .collect();
        learned.sort_by_key(|l| l.destination);
        learned
    }

    /// Resolves when the learned set has changed since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Seen>> {
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dst() -> SocketAddr {
        "10.96.0.20:443".parse().unwrap()
    }

    #[test]
    fn a_run_of_opaque_connections_is_learned_and_http2_unlearns_it_for_good() {
        let learner = Learner::new(true);
        for _ in 1..LEARN_AFTER {
            learner.observe(dst(), Verdict::Tls);
        }
        assert!(learner.learned().is_empty());
        learner.observe(dst(), Verdict::Timeout);
        assert!(learner.learned().is_empty(), "a timeout decides nothing");
        learner.observe(dst(), Verdict::Tls);
        assert_eq!(learner.learned().len(), 1);
        assert_eq!(learner.learned()[0].verdict, "tls");
        learner.observe(dst(), Verdict::H2);
        assert!(learner.learned().is_empty());
        for _ in 0..2 * LEARN_AFTER {
            learner.observe(dst(), Verdict::Tls);
        }
        assert!(learner.learned().is_empty(), "HTTP/2 once: never learned");
    }

    #[test]
    fn http2_in_the_run_restarts_nothing_and_disabled_learns_nothing() {
        let learner = Learner::new(false);
        for _ in 0..2 * LEARN_AFTER {
            learner.observe(dst(), Verdict::Opaque);
        }
        assert!(learner.learned().is_empty());
        learner.set_enabled(true);
        for _ in 0..LEARN_AFTER {
            learner.observe(dst(), Verdict::ServerFirst);
        }
        assert_eq!(learner.learned().len(), 1);
        learner.set_enabled(false);
        assert!(learner.learned().is_empty(), "turning learning off forgets");
    }
}
