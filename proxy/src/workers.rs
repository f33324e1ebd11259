//! The threads that run proxied connections.
//!
//! Each worker is a single-threaded tokio runtime on its own OS thread, and a connection
//! lives on one worker from accept to close: its HTTP/2 streams, and the upstream
//! connections of its pod's pool that those streams use (one pool per pod *per worker*), are
//! all tasks of that worker. A unary call then wakes tasks only on its own thread — the
//! client connection's driver, the stream, the upstream connection's driver — instead of
//! waking parked threads of a shared work-stealing pool, which profiles showed to be the
//! largest single cost of the HTTP/2 path. Envoy and HAProxy are built the same way.
//!
//! The control plane (admin API, enrollment, accept loops, signals) stays on the main
//! runtime; accept loops hand each new connection to the next worker in turn.

use std::{
    io,
    sync::atomic::{AtomicUsize, Ordering},
    thread,
};

use tokio::sync::mpsc;

/// Index of a worker, for state kept per worker (e.g. a pod's upstream pools).
pub type WorkerId = usize;

/// Work handed to a worker: runs inside the worker's runtime, where `tokio::spawn` puts
/// tasks on that worker.
type Job = Box<dyn FnOnce(WorkerId) + Send>;

pub struct Workers {
    queues: Vec<mpsc::UnboundedSender<Job>>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `count` workers (at least one). They stop when `Workers` is dropped and the
    /// tasks they run have finished.
    pub fn start(count: usize) -> io::Result<Workers> {
        let count = count.max(1);
        let mut queues = Vec::with_capacity(count);
        for id in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (queue, mut jobs) = mpsc::unbounded_channel::<Job>();
            thread::Builder::new()
                .name(format!("shunt-worker-{id}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        while let Some(job) = jobs.recv().await {
                            job(id);
                        }
                    });
                })?;
            queues.push(queue);
        }
        Ok(Workers {
            queues,
            next: AtomicUsize::new(0),
        })
    }

    /// One worker per CPU this process may run on.
    pub fn default_count() -> usize {
        thread::available_parallelism().map_or(1, |n| n.get())
    }

    pub fn count(&self) -> usize {
        self.queues.len()
    }

    /// Runs `job` on the next worker in turn.
    pub fn dispatch(&self, job: impl FnOnce(WorkerId) + Send + 'static) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        // A worker's queue closes only if its thread died; the job (and the connection it
        // carries) is dropped, which closes the connection rather than hanging it.
        if self.queues[id].send(Box::new(job)).is_err() {
            tracing::error!(worker = id, "worker thread is gone; connection dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_their_worker_in_turn() {
        let workers = Workers::start(2).expect("start workers");
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let tx = tx.clone();
            workers.dispatch(move |id| {
                // Inside the worker's runtime: spawning works and stays on this thread.
                let here = thread::current().id();
                tokio::spawn(async move {
                    let _ = tx.send((id, here, thread::current().id()));
                });
            });
        }
        let mut seen: Vec<_> = (0..4)
            .map(|_| {
                rx.recv_timeout(std::time::Duration::from_secs(5))
                    .expect("job ran")
            })
            .collect();
        for (_, dispatched_on, spawned_on) in &seen {
            assert_eq!(dispatched_on, spawned_on);
        }
        seen.sort_by_key(|(id, _, _)| *id);
        let ids: Vec<_> = seen.iter().map(|(id, _, _)| *id).collect();
        assert_eq!(ids, [0, 0, 1, 1]);
        assert_ne!(seen[0].1, seen[2].1, "two workers, two threads");
    }
}
