//! Which accepted connections are served: at most `limits.max_connections` on the node and
//! `limits.max_connections_per_pod` from one pod. Over either, the connection is reset at
//! once rather than left unaccepted: a full backlog would hang every new client of the pod
//! (and those within the limit with them), while a reset tells the client immediately and
//! unambiguously that nothing was served, and leaves no TIME_WAIT socket on the node.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::config::Limits;

/// Open connections, counted from accept until the connection's task ends.
#[derive(Default)]
pub struct OpenCount(Arc<AtomicUsize>);

impl OpenCount {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// A place taken in both counts; given back when dropped (the connection has ended).
pub struct Permit {
    node: Arc<AtomicUsize>,
    pod: Arc<AtomicUsize>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.node.fetch_sub(1, Ordering::AcqRel);
        self.pod.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The node's count and the throttles of the accept loops' messages, shared by all pods.
pub struct Admission {
    pub open: OpenCount,
    /// "Refused over a limit" messages.
    pub refusals: Throttle,
    /// `accept()` failures (out of descriptors, of memory).
    pub accept_errors: Throttle,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            open: OpenCount::default(),
            refusals: Throttle::new(LOG_EVERY),
            accept_errors: Throttle::new(LOG_EVERY),
        }
    }
}

/// At most one message per kind and interval.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Node,
    Pod,
}

impl Refused {
    /// The configuration field, as logs and metrics name it.
    pub fn field(self) -> &'static str {
        match self {
            Refused::Node => "limits.max_connections",
            Refused::Pod => "limits.max_connections_per_pod",
        }
    }
}

/// Takes a place for one more connection, or says which limit is reached.
pub fn admit(node: &OpenCount, pod: &OpenCount, limits: &Limits) -> Result<Permit, Refused> {
    // Taken first and given back when over: two accept loops never both get the last place.
    let take = |count: &OpenCount, max: usize| {
        let before = count.0.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            count.0.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    };
    if !take(node, limits.max_connections) {
        return Err(Refused::Node);
    }
    if !take(pod, limits.max_connections_per_pod) {
        node.0.fetch_sub(1, Ordering::AcqRel);
        return Err(Refused::Pod);
    }
    Ok(Permit {
        node: node.0.clone(),
        pod: pod.0.clone(),
    })
}

/// Lets a message through at most once per interval and counts the ones held back, so a
/// flood or a descriptor shortage is logged without the log becoming the next problem.
pub struct Throttle {
    interval: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch` from which the next message may go out.
    next_ms: AtomicU64,
    held_back: AtomicU64,
}

impl Throttle {
    pub fn new(interval: Duration) -> Throttle {
        Throttle {
            interval,
            epoch: Instant::now(),
            next_ms: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(messages held back since the last one)` when this one may be logged.
    pub fn ready(&self) -> Option<u64> {
        let now = self.epoch.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        let due = now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.interval.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if due {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// How long an accept loop waits after a failed `accept()` before trying again: short at
/// first (a shortage of descriptors often ends as soon as a connection closes), doubling
/// while it lasts so a lasting one does not keep a core busy.
pub struct Backoff {
    next: Duration,
}

const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }
}

impl Backoff {
    pub fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        wait
    }

    pub fn succeeded(&mut self) {
        self.next = BACKOFF_FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(node: usize, pod: usize) -> Limits {
        Limits {
            max_connections: node,
            max_connections_per_pod: pod,
            ..Limits::default()
        }
    }

    #[test]
    fn admits_up_to_each_limit_and_again_once_places_free_up() {
        let (node, a, b) = (
            OpenCount::default(),
            OpenCount::default(),
            OpenCount::default(),
        );
        let limits = limits(3, 2);
        let a1 = admit(&node, &a, &limits).expect("first");
        let _a2 = admit(&node, &a, &limits).expect("second");
        assert_eq!(admit(&node, &a, &limits).err(), Some(Refused::Pod));
        // Another pod still gets the node's last place, then nobody does.
        let _b1 = admit(&node, &b, &limits).expect("other pod");
        assert_eq!(admit(&node, &b, &limits).err(), Some(Refused::Node));
        assert_eq!((node.get(), a.get(), b.get()), (3, 2, 1));
        drop(a1);
        assert_eq!((node.get(), a.get()), (2, 1));
        admit(&node, &a, &limits).expect("a place came free");
    }

    #[test]
    fn throttle_lets_one_through_per_interval_and_counts_the_rest() {
        let throttle = Throttle::new(Duration::from_secs(3600));
        assert_eq!(throttle.ready(), Some(0));
        assert_eq!(throttle.ready(), None);
        assert_eq!(throttle.ready(), None);
        let throttle = Throttle::new(Duration::ZERO);
        assert_eq!(throttle.ready(), Some(0));
        assert_eq!(throttle.ready(), Some(0));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::default();
        let waits: Vec<_> = (0..8).map(|_| backoff.failed()).collect();
        assert_eq!(waits[0], BACKOFF_FIRST);
        assert_eq!(waits[1], BACKOFF_FIRST * 2);
        assert_eq!(*waits.last().unwrap(), BACKOFF_MAX);
        backoff.succeeded();
        assert_eq!(backoff.failed(), BACKOFF_FIRST);
    }
}
