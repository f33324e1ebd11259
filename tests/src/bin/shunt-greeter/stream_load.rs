//! The streaming benchmark's load generator: server streams (SayHelloMany, a fixed batch of
//! replies each) or bidirectional ping-pong streams (Chat, one message in flight each), on C
//! channels × M streams at a time, a new stream as soon as one ends, until the deadline.
//!
//! Every wait is bounded twice: by the deadline (a stream still open then is dropped, and the
//! messages it carried so far count) and by [`MESSAGE_TIMEOUT`] (a stalled stream counts as an
//! error and the worker moves on). So the run ends at its deadline, and stragglers are
//! abandoned [`GRACE`] after it at the latest. Prints one JSON line: `{"messages",
//! "messages_per_second", "streams", "seconds", "errors", "first_error"}`, where `streams`
//! counts the streams that ran to their end.

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    time::{Duration, Instant},
};

use http::uri::PathAndQuery;
use tokio::{sync::mpsc, task::JoinSet};
use tonic::{Request, Status};
use tonic_prost::ProstCodec;

use crate::{CHAT, GrpcClient, HelloReply, HelloRequest, MAX_MANY, SAY_HELLO_MANY};

#[derive(clap::Args)]
pub struct StreamLoadArgs {
    /// Where to open the streams: a backend, a VIP or a proxy.
    #[arg(long)]
    to: SocketAddr,
    /// `server`: SayHelloMany, reading every reply; `bidi`: Chat, request→reply round trips.
    #[arg(long, value_enum)]
    kind: Kind,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Streams open at once per connection.
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// How long to run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Messages per stream: replies asked for (`server`) or round trips (`bidi`).
    #[arg(long, default_value_t = 1000)]
    messages: u32,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Kind {
    Server,
    Bidi,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for one step of a stream (the channel ready, the response headers, one reply)
/// before the stream counts as failed.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after the deadline the workers may take to wind down before they are abandoned.
const GRACE: Duration = Duration::from_secs(5);
/// The pause after a failed stream: a target refusing every stream is not hammered in a
/// tight loop.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

#[derive(Default)]
struct Tally {
    messages: u64,
    /// Streams that ran to their end (not those cut by the deadline, nor failed ones).
    streams: u64,
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
}

impl Tally {
    fn error(&mut self, status: &Status) {
        *self
            .errors
            .entry(format!("{:?}", status.code()))
            .or_default() += 1;
        self.first_error
            .get_or_insert_with(|| status.message().chars().take(300).collect());
    }

    fn merge(&mut self, other: Tally) {
        self.messages += other.messages;
        self.streams += other.streams;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// How a stream that did not fail ended.
enum End {
    /// Every message, then the server's trailers.
    Complete,
    /// The deadline came first.
    Cut,
}

pub async fn run(args: StreamLoadArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.connections > 0 && args.streams > 0,
        "--connections and --streams must be at least 1"
    );
    anyhow::ensure!(
        args.seconds.is_finite() && args.seconds > 0.0,
        "--seconds must be a positive number"
    );
    anyhow::ensure!(
        (1..=MAX_MANY).contains(&args.messages),
        "--messages must be between 1 and {MAX_MANY}"
    );
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.to))?
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("connecting to {}: {e}", args.to))?;
        clients.push(tonic::client::Grpc::new(channel));
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let mut workers = JoinSet::new();
    for client in &clients {
        for _ in 0..args.streams {
            workers.spawn(worker(client.clone(), args.kind, args.messages, deadline));
        }
    }
    let total = collect(workers, deadline + GRACE).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "messages": total.messages,
        "messages_per_second": total.messages as f64 / elapsed,
        "streams": total.streams,
        "seconds": elapsed,
        "errors": total.errors,
        "first_error": total.first_error,
    });
    println!("{report}");
    Ok(())
}

/// The workers' tallies; those still running at `hard_stop` are abandoned (aborted when the
/// set is dropped) and counted as errors.
async fn collect(mut workers: JoinSet<Tally>, hard_stop: Instant) -> anyhow::Result<Tally> {
    let mut total = Tally::default();
    loop {
        match tokio::time::timeout_at(hard_stop.into(), workers.join_next()).await {
            Ok(None) => return Ok(total),
            Ok(Some(done)) => total.merge(done?),
            Err(_) => {
                let message = format!(
                    "{} workers still running {GRACE:?} after the deadline",
                    workers.len()
                );
                total.error(&Status::internal(message));
                return Ok(total);
            }
        }
    }
}

/// One stream after another on `client` until the deadline.
async fn worker(mut client: GrpcClient, kind: Kind, messages: u32, deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < deadline {
        let outcome = match kind {
            Kind::Server => server_stream(&mut client, messages, deadline, &mut tally).await,
            Kind::Bidi => chat(&mut client, messages, deadline, &mut tally).await,
        };
        match outcome {
            Ok(End::Complete) => tally.streams += 1,
            Ok(End::Cut) => {}
            Err(status) => {
                tally.error(&status);
                let resume = (Instant::now() + ERROR_PAUSE).min(deadline);
                tokio::time::sleep_until(resume.into()).await;
            }
        }
    }
    tally
}

/// Waits for `step` until the deadline (`Ok(None)`: time is up, not an error) or for at most
/// [`MESSAGE_TIMEOUT`] (then an error).
async fn bounded<T>(
    step: impl Future<Output = Result<T, Status>>,
    deadline: Instant,
) -> Result<Option<T>, Status> {
    let limit = (Instant::now() + MESSAGE_TIMEOUT).min(deadline);
    match tokio::time::timeout_at(limit.into(), step).await {
        Ok(result) => result.map(Some),
        Err(_) if Instant::now() >= deadline => Ok(None),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer within {MESSAGE_TIMEOUT:?}"
        ))),
    }
}

async fn ready(client: &mut GrpcClient) -> Result<(), Status> {
    client
        .ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))
}

fn hello(count: u32) -> HelloRequest {
    HelloRequest {
        name: "stream-load".into(),
        count,
    }
}

/// One SayHelloMany call asking for `count` replies, read to the end.
async fn server_stream(
    client: &mut GrpcClient,
    count: u32,
    deadline: Instant,
    tally: &mut Tally,
) -> Result<End, Status> {
    if bounded(ready(client), deadline).await?.is_none() {
        return Ok(End::Cut);
    }
    let codec = ProstCodec::<HelloRequest, HelloReply>::default();
    let call = client.server_streaming(
        Request::new(hello(count)),
        PathAndQuery::from_static(SAY_HELLO_MANY),
        codec,
    );
    let Some(response) = bounded(call, deadline).await? else {
        return Ok(End::Cut);
    };
    let mut replies = response.into_inner();
    let mut received = 0;
    loop {
        match bounded(replies.message(), deadline).await? {
            None => return Ok(End::Cut),
            Some(Some(_)) => {
                received += 1;
                tally.messages += 1;
            }
            Some(None) if received == count => return Ok(End::Complete),
            Some(None) => {
                return Err(Status::internal(format!(
                    "{received} of {count} replies, then the stream ended"
                )));
            }
        }
    }
}

/// One Chat call of `round_trips` request→reply round trips, one message in flight; then the
/// requests end and the server's replies must end too.
async fn chat(
    client: &mut GrpcClient,
    round_trips: u32,
    deadline: Instant,
    tally: &mut Tally,
) -> Result<End, Status> {
    if bounded(ready(client), deadline).await?.is_none() {
        return Ok(End::Cut);
    }
    // Room for the one request in flight: the next is queued only once its predecessor has
    // been answered, and so taken from the queue.
    let (requests, queue) = mpsc::channel::<HelloRequest>(1);
    let outgoing = futures::stream::unfold(queue, |mut queue| async move {
        queue.recv().await.map(|request| (request, queue))
    });
    let closed = |_| Status::internal("the request stream closed early");
    // The first request goes with the call: the stream opens with a message to answer.
    requests.try_send(hello(0)).map_err(closed)?;
    let codec = ProstCodec::<HelloRequest, HelloReply>::default();
    let call = client.streaming(
        Request::new(outgoing),
        PathAndQuery::from_static(CHAT),
        codec,
    );
    let Some(response) = bounded(call, deadline).await? else {
        return Ok(End::Cut);
    };
    let mut replies = response.into_inner();
    for i in 0..round_trips {
        if i > 0 {
            requests.try_send(hello(0)).map_err(closed)?;
        }
        match bounded(replies.message(), deadline).await? {
            None => return Ok(End::Cut),
            Some(Some(_)) => tally.messages += 1,
            Some(None) => {
                return Err(Status::internal(format!(
                    "the replies ended after {i} of {round_trips} round trips"
                )));
            }
        }
    }
    drop(requests);
    match bounded(replies.message(), deadline).await? {
        None => Ok(End::Cut),
        Some(None) => Ok(End::Complete),
        Some(Some(_)) => Err(Status::internal("a reply more than requests sent")),
    }
}
