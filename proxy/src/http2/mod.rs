//! HTTP/2 termination with per-stream balancing.
//!
//! A connection detected as `h2` is served with the `h2` crate; each stream is routed on its
//! own — the next endpoint of the destination's Service in round-robin order, or the
//! original destination — over the client pod's pooled upstream connections. gRPC is plain
//! HTTP/2 to this layer: headers, trailers and resets pass through as they are.

mod keepalive;
mod limits;
mod pool;
mod prefixed;
mod stream;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{HeaderValue, Request, Response, StatusCode, header::CONTENT_TYPE};
use tokio::net::TcpStream;

pub use self::{
    keepalive::Keepalive,
    limits::Limits,
    pool::{Connector, Pool, PoolSettings},
};
use self::{
    limits::{Closing, StreamsOpen},
    prefixed::Prefixed,
    stream::{Ended, Observed},
};
use crate::{
    fault::{self, Abort, Faults},
    route::{InUse, Route},
    state::{ProxyCounters, Recording, StreamLog, StreamRecord},
};

/// The HTTP/2 client connection preface (RFC 9113 §3.4): detection (`proxy::sniff`) hands a
/// connection that opens with it to this module.
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Flow-control windows and frame size, both sides: large enough for full-speed streaming
/// on fast links, small enough to bound what one stream can make shunt hold.
pub const STREAM_WINDOW: u32 = 1 << 20;
pub const CONNECTION_WINDOW: u32 = 4 << 20;
pub const MAX_FRAME: u32 = 64 << 10;

/// Bytes of one client connection's streams, both directions.
#[derive(Clone)]
pub struct StreamBytes {
    pub request: Arc<AtomicU64>,
    pub response: Arc<AtomicU64>,
}

/// Where a stream to a destination goes under the routes in force now.
pub type RouteLookup = Arc<dyn Fn(SocketAddr) -> Route + Send + Sync>;

/// What the streams of one client connection share.
pub struct Downstream {
    /// Looked up for every stream, not once per connection: a gRPC connection lives for
    /// days, and a reload that changes its Service's endpoints must reach it.
    pub routes: RouteLookup,
    pub pool: Arc<Pool>,
    pub counters: Arc<ProxyCounters>,
    pub bytes: StreamBytes,
    /// `true` once the daemon is stopping.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// PINGs toward the client.
    pub keepalive: Keepalive,
    pub faults: Arc<Faults>,
    /// The client's pod and the destination it dialled, for fault rules.
    pub pod: Arc<str>,
    pub original_dst: SocketAddr,
    /// The client's address as shunt's listener saw it.
    pub client: SocketAddr,
    /// Where each stream's record goes when it ends.
    pub streams: Arc<StreamLog>,
    /// Streams and headers the client may send, and the timeouts of a connection without.
    pub limits: Limits,
}

/// Serves one client connection; `prefix` is what detection already read from it. Returns
/// why the connection ended (a close reason, as connection records show it).
pub async fn serve(
    client: TcpStream,
    prefix: Vec<u8>,
    downstream: Downstream,
) -> Result<&'static str, h2::Error> {
    let limits = downstream.limits;
    let io = Prefixed::new(prefix, client);
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size)
        .handshake::<_, Bytes>(io);
    let header_deadline = tokio::time::Instant::now() + limits.header_timeout;
    let Ok(handshake) = tokio::time::timeout_at(header_deadline, handshake).await else {
        ProxyCounters::inc(&downstream.counters.h2_header_timeouts);
        return Ok(Closing::HeaderTimeout.reason());
    };
    let mut connection = handshake?;
    let mut shutdown = downstream.shutdown.clone();
    let lost = keepalive::lost(connection.ping_pong(), downstream.keepalive);
    tokio::pin!(lost);
    let open = StreamsOpen::default();
    // Until the first request: its headers' deadline; then, while idle, the idle timeout's.
    let timer = tokio::time::sleep_until(header_deadline);
    tokio::pin!(timer);
    let mut first_request = false;
    let downstream = Arc::new(downstream);
    let mut draining = false;
    let closing = loop {
        let timer_armed = !first_request || !limits.idle_timeout.is_zero();
        tokio::select! {
            // The client stopped answering PINGs: give the connection up.
            () = &mut lost => return Ok("keepalive-timeout"),
            accepted = connection.accept() => {
                let Some(accepted) = accepted else { return Ok("eof") };
                let (request, respond) = accepted?;
                if !first_request {
                    first_request = true;
                    timer.as_mut().reset(tokio::time::Instant::now() + limits.idle_timeout);
                }
                ProxyCounters::inc(&downstream.counters.h2_streams);
                tokio::spawn(proxy_stream(request, respond, downstream.clone(), open.enter()));
            }
            () = &mut timer, if timer_armed => {
                if !first_request {
                    break Closing::HeaderTimeout;
                }
                match open.idle_until(limits.idle_timeout) {
                    Some(later) => timer.as_mut().reset(later),
                    None => break Closing::IdleTimeout,
                }
            }
            // GOAWAY: the client opens no new streams here; those in flight finish, then
            // `accept` returns None.
            changed = shutdown.wait_for(|stop| *stop), if !draining => {
                draining = true;
                if changed.is_ok() {
                    connection.graceful_shutdown();
                }
            }
        }
    };
    ProxyCounters::inc(closing.counter(&downstream.counters));
    tracing::debug!(client = %downstream.client, "closing HTTP/2 connection: {}", closing.reason());
    closing.close(&mut connection).await;
    Ok(closing.reason())
}

async fn proxy_stream(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    downstream: Arc<Downstream>,
    _open: limits::StreamGuard,
) {
    let grpc = is_grpc(&request);
    let route = (downstream.routes)(downstream.original_dst);
    let mut record = StreamRecord::new(
        downstream.pod.to_string(),
        downstream.original_dst,
        route.service_name().map(str::to_owned),
    );
    record.method = request.method().to_string();
    record.path = request.uri().path().to_owned();
    record.authority = request
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    record.grpc = grpc;
    record.client = Some(downstream.client);
    record.request_id = request_id(request.headers());
    let mut recording = Recording::start(downstream.streams.clone(), record);
    let target = fault::Target {
        service: route.service_name(),
        original_dst: downstream.original_dst,
        pod: &downstream.pod,
    };
    // Held to the end of the stream: it occupies one of `max_active_faults`.
    let fault = downstream
        .faults
        .for_stream(&target, request.uri().path(), request.headers());
    if let Some(fault) = &fault {
        recording.record.fault_rule = Some(fault.rule.to_string());
        if let Some(delay) = fault.delay {
            recording.flag("DI");
            tracing::debug!(rule = %fault.rule, flags = "DI", path = request.uri().path(), "delaying stream by {delay:?}");
            // A client that gives up during the delay is not sent upstream.
            let reset = std::future::poll_fn(|cx| respond.poll_reset(cx));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = reset => {
                    recording.flag("DR");
                    return;
                }
            }
        }
        if let Some(abort) = fault.abort {
            recording.flag("FI");
            match abort {
                Abort::Grpc(code) => {
                    recording.record.status = Some(200);
                    recording.record.grpc_status = Some(code.0.to_string());
                }
                Abort::Http(status) => recording.record.status = Some(status),
            }
            tracing::debug!(rule = %fault.rule, flags = "FI", path = request.uri().path(), "aborting stream: {abort:?}");
            respond_abort(&mut respond, abort);
            return;
        }
    }
    let (upstream, mut lease, _in_use) = match lease(&downstream, &route).await {
        Ok(leased) => leased,
        Err((flag, message)) => {
            ProxyCounters::inc(&downstream.counters.h2_unavailable);
            tracing::debug!("stream {}: {message}", request.uri().path());
            recording.flag(flag);
            record_unavailable(&mut recording, grpc);
            unavailable(&mut respond, grpc, &message);
            return;
        }
    };
    recording.record.upstream = Some(upstream);
    let (parts, body) = request.into_parts();
    let end_of_stream = body.is_end_stream();
    let (response, send) = match lease
        .sender
        .send_request(Request::from_parts(parts, ()), end_of_stream)
    {
        Ok(sent) => sent,
        Err(e) => {
            ProxyCounters::inc(&downstream.counters.h2_unavailable);
            recording.flag("UF");
            record_unavailable(&mut recording, grpc);
            unavailable(&mut respond, grpc, &format!("upstream {upstream}: {e}"));
            return;
        }
    };
    let mut observed = Observed::default();
    let ended = stream::relay(
        body,
        send,
        response,
        respond,
        &downstream.bytes,
        &mut observed,
    )
    .await;
    recording.record.status = observed.status;
    recording.record.grpc_status = observed.grpc_status;
    recording.record.bytes_received = observed.bytes_received;
    recording.record.bytes_sent = observed.bytes_sent;
    match ended {
        Ended::Complete => {}
        Ended::ClientReset(_) => recording.flag("DR"),
        Ended::UpstreamReset(_) => recording.flag("UR"),
    }
    if ended != Ended::Complete {
        ProxyCounters::inc(&downstream.counters.h2_stream_resets);
        tracing::debug!(%upstream, "stream reset: {ended:?}");
    }
}

fn record_unavailable(recording: &mut Recording, grpc: bool) {
    if grpc {
        recording.record.status = Some(200);
        recording.record.grpc_status = Some("14".into());
    } else {
        recording.record.status = Some(503);
    }
}

/// A stream slot on the next endpoint that can be reached; each endpoint is tried once.
/// The error is Envoy's response flag (`UH`: no endpoints, `UF`: none reachable) and why.
async fn lease(
    downstream: &Downstream,
    route: &Route,
) -> Result<(SocketAddr, pool::Lease, Option<InUse>), (&'static str, String)> {
    match route {
        Route::Direct(addr) => downstream
            .pool
            .lease(*addr, None)
            .await
            .map(|lease| (*addr, lease, None))
            .map_err(|e| ("UF", format!("upstream {addr}: {e}"))),
        Route::Service(service) => {
            let mut last = None;
            for endpoint in service.endpoint_order() {
                match downstream.pool.lease(endpoint.addr, Some(&endpoint)).await {
                    Ok(lease) => return Ok((endpoint.addr, lease, Some(endpoint.stream()))),
                    Err(e) => {
                        endpoint.failed.fetch_add(1, Ordering::Relaxed);
                        last = Some(format!("upstream {}: {e}", endpoint.addr));
                    }
                }
            }
            match last {
                Some(message) => Err(("UF", message)),
                None => Err(("UH", format!("service {}: no endpoints", service.name))),
            }
        }
    }
}

/// Longest `x-request-id` kept: enough for any UUID or trace id, bounded for the log.
const MAX_REQUEST_ID: usize = 128;

fn request_id(headers: &http::HeaderMap) -> Option<String> {
    // `to_str` accepts visible ASCII only, so any byte offset is a character boundary.
    let id = headers.get("x-request-id")?.to_str().ok()?;
    Some(id[..id.len().min(MAX_REQUEST_ID)].to_owned())
}

/// An injected abort: gRPC gets a trailers-only response with the status, HTTP the status.
fn respond_abort(respond: &mut SendResponse<Bytes>, abort: Abort) {
    let mut response = Response::new(());
    match abort {
        Abort::Grpc(code) => {
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from(u16::from(code.0)));
            headers.insert("grpc-message", HeaderValue::from_static("fault injected"));
            let _ = respond.send_response(response, true);
        }
        Abort::Http(status) => {
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            if let Ok(mut body) = respond.send_response(response, false) {
                let _ = body.send_data(Bytes::from_static(b"fault injected\n"), true);
            }
        }
    }
}

fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// No upstream for this stream: gRPC gets a trailers-only UNAVAILABLE naming the failure,
/// anything else a 503 with the message as body.
fn unavailable(respond: &mut SendResponse<Bytes>, grpc: bool, message: &str) {
    if grpc {
        let mut response = Response::new(());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from_static("14"));
        if let Ok(value) = HeaderValue::from_str(&grpc_percent_encode(message)) {
            headers.insert("grpc-message", value);
        }
        let _ = respond.send_response(response, true);
    } else {
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        if let Ok(mut body) = respond.send_response(response, false) {
            let _ = body.send_data(Bytes::from(format!("{message}\n")), true);
        }
    }
}

/// `grpc-message` is percent-encoded UTF-8 (gRPC over HTTP/2 spec).
fn grpc_percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
