//! The soak's gRPC workload: unary calls at a steady rate and server streams back to back,
//! for a bounded time, reporting what happened each second as one JSON line:
//! [`GrpcInterval`]. An error whose message is shunt's `fault injected` is keyed
//! `<call> <code> (fault injected)`, so the reader can tell injected faults from failures.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use http::uri::PathAndQuery;
use shunt_tests::soak::GrpcInterval;
use tokio::task::JoinSet;
use tonic::{Request, Status};
use tonic_prost::ProstCodec;

use crate::{GrpcClient, HelloReply, HelloRequest, SAY_HELLO_STREAM, STREAM_REPLIES, say_hello};

#[derive(clap::Args)]
pub struct SoakArgs {
    #[arg(long)]
    to: String,
    /// How long to start new calls; calls in flight then finish (bounded by their timeouts).
    #[arg(long)]
    seconds: f64,
    /// Unary calls started per second (open loop).
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Server-streaming calls in flight at any time, each followed at once by the next.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 2)]
    connections: usize,
}

/// Longest a unary call or a whole stream may take before it counts as a failure.
const UNARY_TIMEOUT: Duration = Duration::from_secs(10);
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Unary calls in flight at once; beyond, new ones are counted as `not-started` errors.
const MAX_IN_FLIGHT: usize = 2_000;

type Tally = GrpcInterval;

fn record_status(tally: &mut Tally, call: &str, status: &Status) {
    let message = match h2_cause(status) {
        Some(cause) => format!("{} ({cause})", status.message()),
        None => status.message().to_owned(),
    };
    tally.error(call, &format!("{:?}", status.code()), &message);
}

/// What the HTTP/2 layer saw, when a call failed there: tonic's message says only "http2
/// error", and a failure is explained by which peer ended the stream and how.
fn h2_cause(status: &Status) -> Option<String> {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            let how = match (h2.is_go_away(), h2.is_reset(), h2.is_io()) {
                (true, _, _) => "GOAWAY",
                (_, true, _) => "RST_STREAM",
                (_, _, true) => "I/O",
                _ => "library",
            };
            let by = if h2.is_remote() { "peer" } else { "client" };
            return Some(format!("{how} {:?} by {by}: {h2}", h2.reason()));
        }
        source = error.source();
    }
    None
}

type Shared = Arc<Mutex<Tally>>;

fn lock(tally: &Shared) -> std::sync::MutexGuard<'_, Tally> {
    tally
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub async fn run(args: SoakArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.connections > 0 && args.rate > 0,
        "--connections and --rate must be at least 1"
    );
    anyhow::ensure!(
        args.seconds.is_finite() && args.seconds > 0.0,
        "--seconds must be a positive number"
    );
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        // Lazy: a connection lost (a restart) is made again by the next call, not fatal.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.to))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect_lazy();
        clients.push(tonic::client::Grpc::new(channel));
    }
    let tally: Shared = Arc::default();
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let reporter = tokio::spawn(report_every_second(tally.clone()));
    let mut tasks = JoinSet::new();
    for i in 0..args.streams {
        let client = clients[i % clients.len()].clone();
        tasks.spawn(streams(client, tally.clone(), deadline));
    }
    unary(&clients, args.rate, &tally, deadline).await;
    while tasks.join_next().await.is_some() {}
    reporter.abort();
    print_line(&tally, true);
    Ok(())
}

/// Starts calls on a fixed schedule whatever the answers do, until `deadline`; then waits for
/// those in flight.
async fn unary(clients: &[GrpcClient], rate: u32, tally: &Shared, deadline: Instant) {
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let started = Instant::now();
    let mut calls = JoinSet::new();
    for k in 0u64.. {
        let due = started + interval.mul_f64(k as f64);
        if due >= deadline {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        while calls.try_join_next().is_some() {}
        if calls.len() >= MAX_IN_FLIGHT {
            lock(tally).error("unary", "not-started", "too many calls in flight");
            continue;
        }
        let mut client = clients[k as usize % clients.len()].clone();
        let tally = tally.clone();
        calls.spawn(async move {
            let outcome = tokio::time::timeout(UNARY_TIMEOUT, async {
                match say_hello(&mut client).await {
                    Err(status) if never_sent(&status) => {
                        lock(&tally).unary_unsent_retried += 1;
                        say_hello(&mut client).await
                    }
                    answered => answered,
                }
            })
            .await;
            let mut tally = lock(&tally);
            match outcome {
                Ok(Ok(backend)) => {
                    tally.unary_ok += 1;
                    *tally.by_backend.entry(backend).or_default() += 1;
                }
                Ok(Err(status)) => record_status(&mut tally, "unary", &status),
                Err(_) => tally.error("unary", "client-timeout", "no answer within 10s"),
            }
        });
    }
    while calls.join_next().await.is_some() {}
}

/// Whether a call failed in a way that proves the server never processed it, so gRPC
/// libraries retry it transparently (grpc-go, grpc-java); tonic does not, so the workload
/// does, once. Two such failures follow a server's graceful GOAWAY:
/// - hyper cancels the requests still queued on a connection that closes after GOAWAY;
/// - the h2 client fails a request with the peer's GOAWAY (NO_ERROR) when the GOAWAY arrives
///   between hyper's readiness check and the send (hyperium/hyper#2500), or when the stream is
///   above the GOAWAY's last stream id, which HTTP/2 (RFC 9113 §6.8) guarantees the server did
///   not process. A stream the server accepted and then lost ends with a reset or an I/O
///   error instead, and still counts as a failure.
fn never_sent(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        source = error.source();
    }
    false
}

/// One stream after another until `deadline`. A stream whose request was never sent is
/// retried once, as for unary calls.
async fn streams(mut client: GrpcClient, tally: Shared, deadline: Instant) {
    while Instant::now() < deadline {
        let outcome = tokio::time::timeout(STREAM_TIMEOUT, async {
            match stream(&mut client, &tally).await {
                Err(StreamError::Unsent(_)) => {
                    lock(&tally).stream_unsent_retried += 1;
                    stream(&mut client, &tally).await
                }
                finished => finished,
            }
        })
        .await;
        let failed = !matches!(outcome, Ok(Ok(())));
        record_stream(&mut lock(&tally), outcome);
        if failed {
            // A refused call returns at once: pause so a stream loop cannot spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn record_stream<E>(tally: &mut Tally, outcome: Result<Result<(), StreamError>, E>) {
    match outcome {
        Ok(Ok(())) => tally.streams_ok += 1,
        Ok(Err(StreamError::Status(status) | StreamError::Unsent(status))) => {
            record_status(tally, "stream", &status)
        }
        Ok(Err(StreamError::Replies(message))) => tally.error("stream", "bad-replies", &message),
        Err(_) => tally.error("stream", "client-timeout", "not finished within 30s"),
    }
}

enum StreamError {
    /// The request never left the client (see [`never_sent`]).
    Unsent(Status),
    Status(Status),
    Replies(String),
}

/// One SayHelloStream call: every reply must come, in order, from the same backend.
async fn stream(client: &mut GrpcClient, tally: &Shared) -> Result<(), StreamError> {
    client
        .ready()
        .await
        .map_err(|e| StreamError::Status(Status::unavailable(e.to_string())))?;
    let request = Request::new(HelloRequest {
        name: "soak".into(),
        ..HelloRequest::default()
    });
    let codec = ProstCodec::<HelloRequest, HelloReply>::default();
    let mut replies = client
        .server_streaming(request, PathAndQuery::from_static(SAY_HELLO_STREAM), codec)
        .await
        .map_err(|status| match never_sent(&status) {
            true => StreamError::Unsent(status),
            false => StreamError::Status(status),
        })?
        .into_inner();
    let mut backend: Option<String> = None;
    let mut count = 0;
    while let Some(reply) = replies.message().await.map_err(StreamError::Status)? {
        let (name, index) = reply
            .message
            .rsplit_once(" #")
            .ok_or_else(|| StreamError::Replies(format!("reply {:?}", reply.message)))?;
        let first = backend.get_or_insert_with(|| name.to_owned());
        if name != first || index != count.to_string() {
            return Err(StreamError::Replies(format!(
                "reply {count} was {:?} (first reply from {first})",
                reply.message
            )));
        }
        count += 1;
        lock(tally).stream_replies += 1;
    }
    if count != STREAM_REPLIES {
        return Err(StreamError::Replies(format!(
            "{count} of {STREAM_REPLIES} replies, then the stream ended"
        )));
    }
    Ok(())
}

async fn report_every_second(tally: Shared) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        print_line(&tally, false);
    }
}

/// Prints what happened since the last line, and starts counting afresh.
fn print_line(tally: &Shared, last: bool) {
    let mut interval = std::mem::take(&mut *lock(tally));
    interval.t_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    interval.last = last;
    println!("{}", serde_json::to_string(&interval).unwrap_or_default());
}
