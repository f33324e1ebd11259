//! The benchmark's unary gRPC load generator.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use crate::{GrpcClient, say_hello};

#[derive(clap::Args)]
pub struct LoadArgs {
    /// Where to call: one address (a backend, a VIP, a proxy) or several, which the client then
    /// balances itself, call by call (the ideal a proxy is measured against).
    #[arg(long, value_delimiter = ',', required = true)]
    to: Vec<SocketAddr>,
    /// HTTP/2 connections (per address).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Calls in flight per connection (closed loop).
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// How long to run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Open loop: start this many calls per second whatever the answers do.
    #[arg(long)]
    rate: Option<u32>,
}

/// Calls in flight at once in open loop before new ones are counted as not started: bounds
/// memory when a target cannot keep up.
const MAX_IN_FLIGHT: usize = 10_000;

#[derive(Default)]
struct Tally {
    latency_us: Option<Histogram<u64>>,
    by_backend: HashMap<String, u64>,
    errors: HashMap<String, u64>,
    first_error: Option<String>,
    not_started: u64,
}

impl Tally {
    fn record(&mut self, started: Instant, outcome: Result<String, tonic::Status>) {
        match outcome {
            Ok(backend) => {
                let micros = started.elapsed().as_micros().max(1) as u64;
                if let Some(h) = self.latency_us.as_mut() {
                    // Out-of-range values are clamped by `saturating_record`, never lost.
                    h.saturating_record(micros);
                }
                *self.by_backend.entry(backend).or_default() += 1;
            }
            Err(status) => {
                *self
                    .errors
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1;
                self.first_error
                    .get_or_insert_with(|| status.message().to_owned());
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        if let (Some(mine), Some(theirs)) = (self.latency_us.as_mut(), other.latency_us.as_ref()) {
            let _ = mine.add(theirs);
        }
        for (k, v) in other.by_backend {
            *self.by_backend.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.not_started += other.not_started;
    }
}

fn new_tally() -> anyhow::Result<Tally> {
    Ok(Tally {
        // 1 µs .. 60 s at 3 significant digits.
        latency_us: Some(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        ..Tally::default()
    })
}

pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.connections > 0 && args.streams > 0,
        "--connections and --streams must be at least 1"
    );
    // connections × addresses channels; a "connection set" holds one channel per address.
    let mut sets: Vec<Vec<GrpcClient>> = Vec::new();
    for _ in 0..args.connections {
        let mut set = Vec::new();
        for to in &args.to {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{to}"))?
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(|e| anyhow::anyhow!("connecting to {to}: {e}"))?;
            set.push(tonic::client::Grpc::new(channel));
        }
        sets.push(set);
    }
    let duration = Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let tally = match args.rate {
        None => closed_loop(&sets, args.streams, started + duration).await?,
        Some(rate) => open_loop(&sets, rate, started, duration).await?,
    };
    let elapsed = started.elapsed().as_secs_f64();
    let ok: u64 = tally.by_backend.values().sum();
    let histogram = tally.latency_us.as_ref();
    let quantile = |q: f64| histogram.map_or(0, |h| h.value_at_quantile(q));
    let report = serde_json::json!({
        "ok": ok,
        "errors": tally.errors,
        "first_error": tally.first_error,
        "not_started": tally.not_started,
        "seconds": elapsed,
        "calls_per_second": ok as f64 / elapsed,
        "p50_us": quantile(0.50),
        "p99_us": quantile(0.99),
        "by_backend": tally.by_backend,
    });
    println!("{report}");
    Ok(())
}

/// Every worker makes one call after another until the deadline.
async fn closed_loop(
    sets: &[Vec<GrpcClient>],
    streams: usize,
    deadline: Instant,
) -> anyhow::Result<Tally> {
    let mut workers = JoinSet::new();
    for set in sets {
        for _ in 0..streams {
            let mut clients = set.clone();
            workers.spawn(async move {
                let mut tally = new_tally()?;
                let mut next = 0;
                while Instant::now() < deadline {
                    let index = next % clients.len();
                    next += 1;
                    let client = &mut clients[index];
                    let started = Instant::now();
                    let outcome = say_hello(client).await;
                    tally.record(started, outcome);
                }
                anyhow::Ok(tally)
            });
        }
    }
    let mut total = new_tally()?;
    while let Some(done) = workers.join_next().await {
        total.merge(done??);
    }
    Ok(total)
}

/// Calls start on a fixed schedule whatever the answers do, so a stalled target is charged for
/// every call it delays (no coordinated omission). Latency counts from the moment a call is
/// started, not from when the (millisecond-grained) timer fired late.
async fn open_loop(
    sets: &[Vec<GrpcClient>],
    rate: u32,
    started: Instant,
    duration: Duration,
) -> anyhow::Result<Tally> {
    let clients: Vec<GrpcClient> = sets.iter().flatten().cloned().collect();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let shared = Arc::new(Mutex::new(new_tally()?));
    let mut calls = JoinSet::new();
    let total_calls = (duration.as_secs_f64() * f64::from(rate)) as u32;
    for k in 0..total_calls {
        let due = started + interval * k;
        tokio::time::sleep_until(due.into()).await;
        while calls.try_join_next().is_some() {}
        if calls.len() >= MAX_IN_FLIGHT {
            lock(&shared).not_started += 1;
            continue;
        }
        let mut client = clients[k as usize % clients.len()].clone();
        let shared = shared.clone();
        calls.spawn(async move {
            let started = Instant::now();
            let outcome = say_hello(&mut client).await;
            lock(&shared).record(started, outcome);
        });
    }
    while calls.join_next().await.is_some() {}
    let tally = std::mem::take(&mut *lock(&shared));
    Ok(tally)
}

fn lock(tally: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    // A panicked call task cannot leave the tally half-updated in a way that matters here.
    tally
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
