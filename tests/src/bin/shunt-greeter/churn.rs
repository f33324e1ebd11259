//! Connection churn: many short client connections, each a new tonic channel (a new TCP and
//! HTTP/2 connection) carrying one SayHello call and then closed — what health checkers,
//! CLIs, cron jobs and misconfigured clients do. Bounded in count and in time; prints one
//! JSON line: `{"ok", "by_backend", "errors", "messages", "first_error", "seconds",
//! "per_second", "sockets_open_at_end"}`.
//!
//! The last field is the check that the connections really closed: the number of TCP sockets
//! this process still holds once every channel has been dropped (a short wait allowed for the
//! connection tasks to finish). It should be 0; a churn client that kept its connections
//! would measure a proxy's pool against a leak of its own.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::task::JoinSet;
use tonic::Status;

use crate::say_hello;

#[derive(clap::Args)]
pub struct ChurnArgs {
    /// Where to connect: `address:port` or `name:port`; several (comma-separated) are taken
    /// in turn, one per connection (client-side round-robin, for the direct path).
    #[arg(long, value_delimiter = ',', required = true)]
    to: Vec<String>,
    /// Connections to make (one call each).
    #[arg(long)]
    count: usize,
    /// Connections open at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Start no new connection after this many seconds (those open then finish).
    #[arg(long, default_value_t = 120.0)]
    seconds: f64,
}

/// Longest a connection (connect, call, close) may take before it counts as failed: keeps a
/// stalled target from holding the run past its time bound.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait at the end for the dropped channels' connection tasks to close their
/// sockets (they run on the runtime, not in the dropping task).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Tally {
    by_backend: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    /// The first message for each error code: lets a reader tell, e.g., an injected fault
    /// from any other `RESOURCE_EXHAUSTED`.
    messages: BTreeMap<String, String>,
    first_error: Option<String>,
}

impl Tally {
    fn record(&mut self, outcome: Result<String, Status>) {
        match outcome {
            Ok(backend) => *self.by_backend.entry(backend).or_default() += 1,
            Err(status) => {
                let code = format!("{:?}", status.code());
                *self.errors.entry(code.clone()).or_default() += 1;
                let message: String = status.message().chars().take(300).collect();
                self.messages.entry(code).or_insert_with(|| message.clone());
                self.first_error.get_or_insert(message);
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        for (k, v) in other.by_backend {
            *self.by_backend.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in other.messages {
            self.messages.entry(k).or_insert(v);
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

pub async fn run(args: ChurnArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    anyhow::ensure!(
        args.seconds.is_finite() && args.seconds > 0.0,
        "--seconds must be a positive number"
    );
    let endpoints = args
        .to
        .iter()
        .map(|to| {
            tonic::transport::Endpoint::from_shared(format!("http://{to}")).map(|e| {
                e.connect_timeout(CONNECT_TIMEOUT)
                    .timeout(CALL_TIMEOUT)
                    .tcp_nodelay(true)
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let endpoints = Arc::new(endpoints);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let mut workers = JoinSet::new();
    for _ in 0..args.concurrency.min(args.count) {
        let (endpoints, next, count) = (endpoints.clone(), next.clone(), args.count);
        workers.spawn(async move {
            let mut tally = Tally::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || Instant::now() >= deadline {
                    break;
                }
                let endpoint = &endpoints[i % endpoints.len()];
                let outcome = tokio::time::timeout(CONNECT_TIMEOUT + CALL_TIMEOUT, async {
                    one_connection(endpoint).await
                })
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("connection not done in 15s")));
                tally.record(outcome);
            }
            tally
        });
    }
    let mut tally = Tally::default();
    while let Some(done) = workers.join_next().await {
        tally.merge(done?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let sockets_open_at_end = wait_for_sockets_closed().await;
    let ok: u64 = tally.by_backend.values().sum();
    let report = serde_json::json!({
        "ok": ok,
        "by_backend": tally.by_backend,
        "errors": tally.errors,
        "messages": tally.messages,
        "first_error": tally.first_error,
        "seconds": elapsed,
        "per_second": ok as f64 / elapsed,
        "sockets_open_at_end": sockets_open_at_end,
    });
    println!("{report}");
    Ok(())
}

/// A new channel (TCP + HTTP/2 connection), one call, and the channel dropped. A tonic
/// channel closes its connection once its last clone is gone, and the client here is the
/// only one: nothing outlives this function but the connection's closing.
async fn one_connection(endpoint: &tonic::transport::Endpoint) -> Result<String, Status> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("connecting: {}", chain(&e))))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    let outcome = say_hello(&mut grpc).await;
    drop(grpc);
    outcome
}

/// An error with its sources: tonic's connect error alone says only "transport error".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    // Bounded: a source chain is a handful of links.
    for _ in 0..8 {
        let Some(inner) = source else { break };
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// TCP sockets this process holds, polled until none are left or [`CLOSE_WAIT`] passes.
async fn wait_for_sockets_closed() -> usize {
    let deadline = Instant::now() + CLOSE_WAIT;
    loop {
        let open = open_tcp_sockets();
        if open == 0 || Instant::now() >= deadline {
            return open;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Descriptors of this process that are TCP sockets: their inodes are matched against the
/// namespace's TCP socket tables, so the runtime's own Unix socket pair does not count.
fn open_tcp_sockets() -> usize {
    let mut tcp_inodes = std::collections::HashSet::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        // Columns: sl local rem st tx:rx tr:when retrnsmt uid timeout inode …
        tcp_inodes.extend(
            text.lines()
                .skip(1)
                .filter_map(|line| line.split_whitespace().nth(9).map(str::to_owned)),
        );
    }
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            let inode = target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .to_owned();
            Some(inode)
        })
        .filter(|inode| tcp_inodes.contains(inode))
        .count()
}
