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
//!
//! [`Workers::shutdown`] (also run on drop) stops them for real: each worker's loop ends,
//! its runtime is dropped on its own thread — which *cancels* the tasks still running there
//! (their futures are dropped, closing their connections) and the jobs still queued, rather
//! than waiting for them — and the threads are joined. The daemon drains connections
//! (`intercept.drain_timeout`) first, so what is cancelled is what outlived the drain.

use std::{
    io,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
};

use tokio::sync::{mpsc, watch};

/// Index of a worker, for state kept per worker (e.g. a pod's upstream pools).
pub type WorkerId = usize;

/// Work handed to a worker: runs inside the worker's runtime, where `tokio::spawn` puts
/// tasks on that worker.
type Job = Box<dyn FnOnce(WorkerId) + Send>;

pub struct Workers {
    queues: Vec<mpsc::UnboundedSender<Job>>,
    next: AtomicUsize,
    /// Flips to `true` on [`Workers::shutdown`]: each worker's loop ends.
    stop: watch::Sender<bool>,
    /// Taken, and joined, by the first [`Workers::shutdown`].
    threads: Mutex<Vec<thread::JoinHandle<()>>>,
}

impl Workers {
    /// Starts `count` workers (at least one). They run until [`Workers::shutdown`] or until
    /// `Workers` is dropped; then the tasks still running on them are cancelled, not awaited,
    /// and the threads joined.
    pub fn start(count: usize) -> io::Result<Workers> {
        let count = count.max(1);
        let mut workers = Workers {
            queues: Vec::with_capacity(count),
            next: AtomicUsize::new(0),
            stop: watch::Sender::new(false),
            threads: Mutex::new(Vec::with_capacity(count)),
        };
        // On an error, the workers started so far are stopped as `workers` is dropped.
        for id in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (queue, mut jobs) = mpsc::unbounded_channel::<Job>();
            let mut stopped = workers.stop.subscribe();
            let thread = thread::Builder::new()
                .name(format!("shunt-worker-{id}"))
                .spawn(move || {
                    // Until told to stop...
                    runtime.block_on(async move {
                        loop {
                            tokio::select! {
                                biased;
                                _ = stopped.wait_for(|stop| *stop) => break,
                                job = jobs.recv() => match job {
                                    Some(job) => job(id),
                                    None => break,
                                },
                            }
                        }
                    });
                    // ...then the runtime goes, and with it every task still on this worker:
                    // cancelled, dropped here on their own thread.
                    drop(runtime);
                })?;
            workers.queues.push(queue);
            lock(&workers.threads).push(thread);
        }
        Ok(workers)
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
        // A worker's queue closes only if its thread ended (shut down, or died); the job (and
        // the connection it carries) is dropped, which closes the connection rather than
        // hanging it.
        if self.queues[id].send(Box::new(job)).is_err() {
            tracing::error!(worker = id, "worker thread is gone; connection dropped");
        }
    }

    /// Stops every worker — the tasks still running on them are cancelled, not awaited — and
    /// joins their threads. Blocks until they have ended, which is quick: dropping a task
    /// does not wait for anything. A worker calling this is not joined (it cannot wait for
    /// itself) and ends once its current job or task returns. Later calls do nothing.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
        let threads = std::mem::take(&mut *lock(&self.threads));
        let me = thread::current().id();
        for (id, thread) in threads.into_iter().enumerate() {
            if thread.thread().id() == me {
                continue;
            }
            if thread.join().is_err() {
                tracing::error!(worker = id, "worker thread panicked");
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, sync::Arc};

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

    #[test]
    fn shutdown_cancels_the_tasks_and_joins_the_threads() {
        struct Guard(std::sync::mpsc::Sender<WorkerId>);
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = self.0.send(usize::MAX);
            }
        }
        let workers = Workers::start(2).expect("start workers");
        let (started_tx, started) = std::sync::mpsc::channel();
        let (dropped_tx, dropped) = std::sync::mpsc::channel();
        // Each worker thread keeps a clone in a thread-local, released when the thread exits.
        let alive = Arc::new(());
        for _ in 0..2 {
            let (started_tx, dropped_tx, alive) =
                (started_tx.clone(), dropped_tx.clone(), alive.clone());
            workers.dispatch(move |id| {
                thread_local!(static ALIVE: RefCell<Option<Arc<()>>> = const { RefCell::new(None) });
                ALIVE.with(|a| *a.borrow_mut() = Some(alive));
                // A task that never finishes on its own, like a connection left open.
                tokio::spawn(async move {
                    let _guard = Guard(dropped_tx);
                    let _ = started_tx.send(id);
                    std::future::pending::<()>().await;
                });
            });
        }
        drop((started_tx, dropped_tx));
        let timeout = std::time::Duration::from_secs(5);
        let mut ids: Vec<_> = (0..2)
            .map(|_| started.recv_timeout(timeout).unwrap())
            .collect();
        ids.sort();
        assert_eq!(ids, [0, 1]);
        assert!(
            dropped.try_recv().is_err(),
            "tasks run until the workers stop"
        );
        assert_eq!(Arc::strong_count(&alive), 3);

        // Joins the threads: when it returns, each task was cancelled and each thread is gone.
        workers.shutdown();
        assert_eq!(
            dropped.try_iter().count(),
            2,
            "each pending task was cancelled"
        );
        assert_eq!(
            Arc::strong_count(&alive),
            1,
            "each worker thread has exited"
        );
        // Stopped workers take no more work: the job is dropped, not run.
        let (ran_tx, ran) = std::sync::mpsc::channel();
        workers.dispatch(move |_| ran_tx.send(()).unwrap());
        assert!(ran.recv_timeout(timeout).is_err());
        workers.shutdown();
        drop(workers);
    }

    #[test]
    fn dropping_workers_shuts_them_down() {
        let workers = Workers::start(1).expect("start workers");
        let (started_tx, started) = std::sync::mpsc::channel();
        let (dropped_tx, dropped) = std::sync::mpsc::channel::<()>();
        workers.dispatch(move |_| {
            tokio::spawn(async move {
                let _guard = dropped_tx;
                let _ = started_tx.send(());
                std::future::pending::<()>().await;
            });
        });
        started
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("task started");
        drop(workers);
        // The task's sender was dropped with the task, before the join returned.
        assert_eq!(
            dropped.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Disconnected)
        );
    }
}
