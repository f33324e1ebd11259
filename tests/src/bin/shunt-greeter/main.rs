//! A tonic gRPC greeter, server and client, with hand-written prost messages (no protoc).
//!
//! `serve --name N --listen ADDR` answers `/helloworld.Greeter/SayHello` with `N`, and
//! `/helloworld.Greeter/SayHelloStream` (server streaming) with [`STREAM_REPLIES`] replies
//! `N #0`, `N #1`, … [`STREAM_INTERVAL`] apart;
//! `call --to HOST:PORT --count C` makes C unary calls on ONE channel (one HTTP/2 connection)
//! and prints `{"ok": n, "by_backend": {...}, "errors": {...}, "first_error": ...}`; with
//! `--every 2s` it calls for ever instead, one line per call (`deploy/example`'s client);
//! `load --to ADDR[,ADDR…] --connections C --streams M --seconds S [--rate R]` is the benchmark's
//! load generator: closed-loop (C channels × M calls in flight each) or, with `--rate`, open-loop
//! at R calls/s; prints calls, calls/s, p50/p99 and the split by backend as JSON;
//! `churn --to ADDR[,ADDR…] --count N --concurrency C [--seconds S]` makes N short connections,
//! C at a time, each a new channel (new TCP + HTTP/2 connection) with one SayHello call and
//! then closed, stopping early after S seconds (default 120); prints one JSON line like `call`
//! with `seconds`, `per_second` and the sockets still open at the end (0: they all closed);
//! `soak --to ADDR --seconds S --rate R --streams N` is the soak's gRPC workload: unary calls at
//! R/s and N server streams at a time, one JSON line of outcomes per second.
//!
//! For the streaming benchmark the server also answers `/helloworld.Greeter/SayHelloMany`
//! (server streaming: as many replies `N` as the request's `count` asks for, at most
//! [`MAX_MANY`], back to back) and `/helloworld.Greeter/Chat` (bidirectional: one reply `N`
//! per request message, as each arrives);
//! `stream-load --to ADDR --kind server|bidi --connections C --streams M --seconds S
//! [--messages K]` drives them: C channels × M streams at a time, each stream either asking
//! for K replies and reading them all (`server`) or making K request→reply round trips, one
//! message in flight (`bidi`), a new stream as soon as one ends, until S seconds are up;
//! prints `{"messages", "messages_per_second", "streams", "seconds", "errors",
//! "first_error"}`.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

mod churn;
mod load;
mod soak;
mod stream_load;

use clap::{Parser, Subcommand};
use futures::StreamExt as _;
use http::uri::PathAndQuery;
use tonic::{Request, Response, Status, body::Body, server::NamedService};
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
struct HelloRequest {
    #[prost(string, tag = "1")]
    name: String,
    /// How many replies SayHelloMany sends (0 for the other methods, and then not on the
    /// wire: older clients' requests are unchanged).
    #[prost(uint32, tag = "2")]
    count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HelloReply {
    #[prost(string, tag = "1")]
    message: String,
}

const SAY_HELLO: &str = "/helloworld.Greeter/SayHello";
const SAY_HELLO_STREAM: &str = "/helloworld.Greeter/SayHelloStream";
/// Replies per SayHelloStream call, and the pause before each.
const STREAM_REPLIES: usize = 10;
const STREAM_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
const SAY_HELLO_MANY: &str = "/helloworld.Greeter/SayHelloMany";
const CHAT: &str = "/helloworld.Greeter/Chat";
/// The most replies one SayHelloMany call gets, whatever it asks for: a bad request cannot
/// keep a server busy for ever.
const MAX_MANY: u32 = 1_000_000;

type GrpcClient = tonic::client::Grpc<tonic::transport::Channel>;

/// One SayHello call; the reply names the backend that served it.
async fn say_hello(grpc: &mut GrpcClient) -> Result<String, Status> {
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let request = Request::new(HelloRequest {
        name: "probe".into(),
        ..HelloRequest::default()
    });
    let codec = ProstCodec::<HelloRequest, HelloReply>::default();
    let reply = grpc
        .unary(request, PathAndQuery::from_static(SAY_HELLO), codec)
        .await?;
    Ok(reply.into_inner().message)
}

#[derive(Parser)]
#[command(name = "shunt-greeter")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        listen: SocketAddr,
    },
    Call {
        /// `address:port` or `name:port` (resolved by the system's resolver).
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Call for ever, once per this interval (e.g. `2s`), printing each call.
        #[arg(long, value_parser = humantime::parse_duration)]
        every: Option<std::time::Duration>,
    },
    Load(load::LoadArgs),
    Churn(churn::ChurnArgs),
    Soak(soak::SoakArgs),
    StreamLoad(stream_load::StreamLoadArgs),
}

#[tokio::main]
async fn main() {
    let result = match Cli::parse().command {
        Cmd::Serve { name, listen } => serve(name, listen).await,
        Cmd::Call {
            to,
            every: Some(every),
            ..
        } => call_every(to, every).await,
        Cmd::Call { to, count, .. } => call(to, count).await,
        Cmd::Load(args) => load::run(args).await,
        Cmd::Churn(args) => churn::run(args).await,
        Cmd::Soak(args) => soak::run(args).await,
        Cmd::StreamLoad(args) => stream_load::run(args).await,
    };
    if let Err(e) = result {
        eprintln!("shunt-greeter: {e:#}");
        std::process::exit(1);
    }
}

async fn serve(name: String, listen: SocketAddr) -> anyhow::Result<()> {
    let greeter = Greeter { name: name.into() };
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // As PID 1 of a container nothing stops it but a handler: without one, deleting a pod
    // waits the whole grace period for SIGKILL. On SIGTERM or SIGINT: GOAWAY, in-flight
    // calls finish, then exit.
    let stopped = async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    tonic::transport::Server::builder()
        .add_service(greeter)
        .serve_with_shutdown(listen, stopped)
        .await?;
    Ok(())
}

async fn connect(to: &str) -> anyhow::Result<GrpcClient> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{to}"))?
        .connect()
        .await?;
    Ok(tonic::client::Grpc::new(channel))
}

/// One line per call for ever, on one channel: who answered and how long it took.
async fn call_every(to: String, every: std::time::Duration) -> anyhow::Result<()> {
    let mut grpc = connect(&to).await?;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let started = std::time::Instant::now();
        let result = say_hello(&mut grpc).await;
        let ms = started.elapsed().as_millis();
        let line = match result {
            Ok(backend) => serde_json::json!({"to": to, "backend": backend, "ms": ms}),
            Err(status) => serde_json::json!({
                "to": to, "error": format!("{:?}", status.code()), "message": status.message(), "ms": ms,
            }),
        };
        println!("{line}");
    }
}

async fn call(to: String, count: usize) -> anyhow::Result<()> {
    let mut grpc = connect(&to).await?;
    let mut by_backend: HashMap<String, usize> = HashMap::new();
    let mut errors: HashMap<String, usize> = HashMap::new();
    let mut first_error = None;
    for _ in 0..count {
        match say_hello(&mut grpc).await {
            Ok(backend) => *by_backend.entry(backend).or_default() += 1,
            Err(status) => {
                *errors.entry(format!("{:?}", status.code())).or_default() += 1;
                first_error.get_or_insert_with(|| status.message().to_owned());
            }
        }
    }
    let ok: usize = by_backend.values().sum();
    let report = serde_json::json!({
        "ok": ok, "by_backend": by_backend, "errors": errors, "first_error": first_error,
    });
    println!("{report}");
    Ok(())
}

/// The service, routed by path as generated code would.
#[derive(Clone)]
struct Greeter {
    name: Arc<str>,
}

impl NamedService for Greeter {
    const NAME: &'static str = "helloworld.Greeter";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<http::Request<Body>> for Greeter {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let name = self.name.clone();
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<HelloReply, HelloRequest>::default());
            match request.uri().path() {
                SAY_HELLO => Ok(grpc.unary(SayHello(name), request).await),
                SAY_HELLO_STREAM => Ok(grpc.server_streaming(SayHelloStream(name), request).await),
                SAY_HELLO_MANY => Ok(grpc.server_streaming(SayHelloMany(name), request).await),
                CHAT => Ok(grpc.streaming(Chat(name), request).await),
                other => Ok(Status::unimplemented(other.to_owned()).into_http()),
            }
        })
    }
}

struct SayHello(Arc<str>);

impl tonic::server::UnaryService<HelloRequest> for SayHello {
    type Response = HelloReply;
    type Future = BoxFuture<Result<Response<HelloReply>, Status>>;

    fn call(&mut self, _: Request<HelloRequest>) -> Self::Future {
        let message = self.0.to_string();
        Box::pin(async move { Ok(Response::new(HelloReply { message })) })
    }
}

struct SayHelloStream(Arc<str>);

type ReplyStream = Pin<Box<dyn futures::Stream<Item = Result<HelloReply, Status>> + Send>>;

impl tonic::server::ServerStreamingService<HelloRequest> for SayHelloStream {
    type Response = HelloReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<Result<Response<ReplyStream>, Status>>;

    fn call(&mut self, _: Request<HelloRequest>) -> Self::Future {
        let name = self.0.clone();
        let replies = futures::stream::unfold(0, move |i| {
            let name = name.clone();
            async move {
                if i == STREAM_REPLIES {
                    return None;
                }
                tokio::time::sleep(STREAM_INTERVAL).await;
                let message = format!("{name} #{i}");
                Some((Ok(HelloReply { message }), i + 1))
            }
        });
        Box::pin(async move { Ok(Response::new(Box::pin(replies) as ReplyStream)) })
    }
}

struct SayHelloMany(Arc<str>);

impl tonic::server::ServerStreamingService<HelloRequest> for SayHelloMany {
    type Response = HelloReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<Result<Response<ReplyStream>, Status>>;

    /// The replies are ready at once: the stream runs as fast as the connection (and the
    /// proxy in between) carries them.
    fn call(&mut self, request: Request<HelloRequest>) -> Self::Future {
        let count = request.get_ref().count.min(MAX_MANY);
        let name = self.0.clone();
        let replies = futures::stream::iter(0..count).map(move |_| {
            Ok(HelloReply {
                message: name.to_string(),
            })
        });
        Box::pin(async move { Ok(Response::new(Box::pin(replies) as ReplyStream)) })
    }
}

struct Chat(Arc<str>);

impl tonic::server::StreamingService<HelloRequest> for Chat {
    type Response = HelloReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<Result<Response<ReplyStream>, Status>>;

    /// One reply per request message, sent as soon as it is read; the replies end when the
    /// requests do (or fail with them).
    fn call(&mut self, request: Request<tonic::Streaming<HelloRequest>>) -> Self::Future {
        let name = self.0.clone();
        let replies = request.into_inner().map(move |request| {
            request.map(|_| HelloReply {
                message: name.to_string(),
            })
        });
        Box::pin(async move { Ok(Response::new(Box::pin(replies) as ReplyStream)) })
    }
}
