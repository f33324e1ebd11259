//! The HTTP/2 proxy against real h2 peers over loopback: per-stream balancing from one
//! client connection, trailers, resets both ways, stream limits, failover and bad input.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{Reason, client::SendRequest};
use http::{Request, Response};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::*;
use crate::{
    config::ServiceConfig,
    fault::{DELAY_HEADER, Faults},
    route::{Routes, Service},
    state::StreamLog,
};

const VIP: &str = "10.96.0.10:50051";

/// Frequent PINGs both ways in every test: answered, they must never disturb a call.
const KEEPALIVE: Keepalive = Keepalive {
    interval: Duration::from_millis(20),
    timeout: Duration::from_secs(2),
};

/// What a backend saw that a test wants to check.
#[derive(Debug)]
enum Seen {
    Reset(Reason),
}

/// An h2 server named `name`: answers `/echo` with its name and the request body, trailers
/// `grpc-status: 0`; `/trailers-only` with END_STREAM on the headers; `/reset` with a
/// RST_STREAM(ENHANCE_YOUR_CALM); `/slow` after 300 ms; `/hang` never, reporting a reset.
async fn backend(
    name: &'static str,
    max_streams: Option<u32>,
    seen: mpsc::UnboundedSender<Seen>,
) -> SocketAddr {
    backend_with_goaway(name, max_streams, None, seen).await
}

/// As [`backend`], sending GOAWAY on each connection after `goaway_after` streams.
async fn backend_with_goaway(
    name: &'static str,
    max_streams: Option<u32>,
    goaway_after: Option<usize>,
    seen: mpsc::UnboundedSender<Seen>,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut builder = h2::server::Builder::new();
                if let Some(max) = max_streams {
                    builder.max_concurrent_streams(max);
                }
                let Ok(mut conn) = builder.handshake::<_, Bytes>(stream).await else {
                    return;
                };
                let mut streams = 0;
                while let Some(Ok((request, respond))) = conn.accept().await {
                    tokio::spawn(answer(name, request, respond, seen.clone()));
                    streams += 1;
                    if goaway_after == Some(streams) {
                        conn.graceful_shutdown();
                    }
                }
            });
        }
    });
    addr
}

async fn answer(
    name: &'static str,
    request: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    seen: mpsc::UnboundedSender<Seen>,
) {
    let path = request.uri().path().to_owned();
    let mut body = request.into_body();
    let ok = || {
        Response::builder()
            .header("content-type", "application/grpc")
            .header("x-backend", name)
            .body(())
            .unwrap()
    };
    match path.as_str() {
        "/trailers-only" => {
            let response = Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "5")
                .body(())
                .unwrap();
            let _ = respond.send_response(response, true);
        }
        "/reset" => respond.send_reset(Reason::ENHANCE_YOUR_CALM),
        "/hang" => loop {
            match body.data().await {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
                Some(Err(e)) => {
                    let _ = seen.send(Seen::Reset(e.reason().unwrap_or(Reason::NO_ERROR)));
                    return;
                }
                None => std::future::pending::<()>().await,
            }
        },
        _ => {
            let mut received = 0usize;
            while let Some(Ok(chunk)) = body.data().await {
                received += chunk.len();
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            if path == "/slow" {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let Ok(mut send) = respond.send_response(ok(), false) else {
                return;
            };
            let _ = send.send_data(Bytes::from(format!("{name} {received}")), false);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let _ = send.send_trailers(trailers);
        }
    }
}

/// shunt's HTTP/2 proxy on a loopback listener, routing everything to `endpoints` as the
/// Service at [`VIP`]. Returns its address and the pool, to inspect upstream connections.
async fn proxy(endpoints: Vec<SocketAddr>) -> (SocketAddr, Arc<Pool>) {
    let (addr, pool, _, _) = proxy_service(endpoints, Arc::new(Faults::new(Vec::new(), 100))).await;
    (addr, pool)
}

/// As [`proxy`], also returning the Service, to change its endpoints as discovery would.
async fn proxy_service(
    endpoints: Vec<SocketAddr>,
    faults: Arc<Faults>,
) -> (SocketAddr, Arc<Pool>, Arc<Service>, Arc<StreamLog>) {
    let routes = Routes::new(&[ServiceConfig {
        name: "greeter".into(),
        vip: VIP.parse().unwrap(),
        endpoints,
        ..ServiceConfig::default()
    }]);
    let route = routes.route(VIP.parse().unwrap());
    let service = routes.by_name("greeter").unwrap();
    let streams = Arc::new(StreamLog::default());
    let recorded = streams.clone();
    let connector: Connector = Arc::new(|addr| Box::pin(TcpStream::connect(addr)));
    let settings = PoolSettings {
        connect_timeout: Duration::from_secs(2),
        keepalive: KEEPALIVE,
        idle_timeout: Duration::from_secs(60),
        max_idle: 4,
    };
    let pool = Arc::new(Pool::new(connector, settings, Arc::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shared = pool.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let current = route.clone();
            let downstream = Downstream {
                routes: Arc::new(move |_| current.clone()),
                pool: shared.clone(),
                counters: Arc::new(ProxyCounters::default()),
                bytes: StreamBytes {
                    request: Arc::default(),
                    response: Arc::default(),
                },
                // Never stopping: the sender is dropped, which `serve` takes as "no shutdown".
                shutdown: tokio::sync::watch::channel(false).1,
                keepalive: KEEPALIVE,
                faults: faults.clone(),
                pod: "client".into(),
                original_dst: VIP.parse().unwrap(),
                client: "127.0.0.1:40000".parse().unwrap(),
                streams: streams.clone(),
                limits: Limits::from(&crate::config::Http2::default()),
            };
            tokio::spawn(async move {
                // As detection does: the preface has been read before the proxy takes over.
                let mut prefix = vec![0u8; H2_PREFACE.len()];
                if client.read_exact(&mut prefix).await.is_ok() {
                    let _ = serve(client, prefix, downstream).await;
                }
            });
        }
    });
    (addr, pool, service, recorded)
}

async fn client(addr: SocketAddr) -> SendRequest<Bytes> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(connection);
    sender
}

fn grpc_request(path: &str) -> Request<()> {
    Request::builder()
        .method("POST")
        .uri(format!("http://{VIP}{path}"))
        .header("content-type", "application/grpc")
        .body(())
        .unwrap()
}

/// One call: returns (response headers, body, trailers).
async fn call(
    sender: &mut SendRequest<Bytes>,
    path: &str,
    body: Bytes,
) -> Result<(http::response::Parts, Vec<u8>, Option<http::HeaderMap>), h2::Error> {
    let mut ready = sender.clone().ready().await?;
    let (response, mut send) = ready.send_request(grpc_request(path), false)?;
    send.reserve_capacity(body.len());
    send.send_data(body, true)?;
    let (parts, mut recv) = response.await?.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = recv.trailers().await?;
    Ok((parts, data, trailers))
}

fn noop() -> mpsc::UnboundedSender<Seen> {
    mpsc::unbounded_channel().0
}

#[tokio::test]
async fn streams_of_one_connection_are_spread_round_robin() {
    let names = ["a", "b", "c"];
    let mut endpoints = Vec::new();
    for name in names {
        endpoints.push(backend(name, None, noop()).await);
    }
    let (addr, _) = proxy(endpoints).await;
    let mut sender = client(addr).await; // ONE client connection
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        let (parts, body, trailers) = call(&mut sender, "/echo", Bytes::from_static(b"hi"))
            .await
            .unwrap();
        let name = parts.headers["x-backend"].to_str().unwrap().to_owned();
        assert_eq!(String::from_utf8_lossy(&body), format!("{name} 2"));
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
        *per_backend.entry(name).or_default() += 1;
    }
    for name in names {
        assert_eq!(per_backend.get(name), Some(&100), "{per_backend:?}");
    }
}

#[tokio::test]
async fn trailers_only_responses_pass_through() {
    let (addr, _) = proxy(vec![backend("a", None, noop()).await]).await;
    let mut sender = client(addr).await;
    let (parts, body, trailers) = call(&mut sender, "/trailers-only", Bytes::new())
        .await
        .unwrap();
    assert_eq!(parts.headers["grpc-status"], "5");
    assert!(body.is_empty());
    assert!(trailers.is_none());
}

#[tokio::test]
async fn an_upstream_reset_reaches_the_client_with_its_reason() {
    let (addr, _) = proxy(vec![backend("a", None, noop()).await]).await;
    let mut sender = client(addr).await;
    let err = call(&mut sender, "/reset", Bytes::new())
        .await
        .expect_err("the stream was reset");
    assert_eq!(err.reason(), Some(Reason::ENHANCE_YOUR_CALM));
}

#[tokio::test]
async fn a_client_reset_reaches_the_server_with_its_reason() {
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let (addr, _) = proxy(vec![backend("a", None, seen_tx).await]).await;
    let sender = client(addr).await;
    let mut ready = sender.ready().await.unwrap();
    let (_response, mut send) = ready.send_request(grpc_request("/hang"), false).unwrap();
    send.send_data(Bytes::from_static(b"started"), false)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    send.send_reset(Reason::CANCEL);
    let seen = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv())
        .await
        .unwrap();
    assert!(
        matches!(seen, Some(Seen::Reset(Reason::CANCEL))),
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_stream_limit_of_one_opens_more_upstream_connections_instead_of_queueing() {
    let endpoint = backend("a", Some(1), noop()).await;
    let (addr, pool) = proxy(vec![endpoint]).await;
    let sender = client(addr).await;
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let mut sender = sender.clone();
            tokio::spawn(async move { call(&mut sender, "/slow", Bytes::new()).await })
        })
        .collect();
    let started = tokio::time::Instant::now();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    // Five 300 ms calls in parallel, not one after another.
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "{:?}",
        started.elapsed()
    );
    assert!(
        pool.connections(endpoint) >= 5,
        "{}",
        pool.connections(endpoint)
    );
}

#[tokio::test]
async fn a_refused_endpoint_is_skipped_and_none_left_is_unavailable() {
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }; // nothing listens there any more
    let live = backend("live", None, noop()).await;
    let (addr, _) = proxy(vec![closed, live]).await;
    let mut sender = client(addr).await;
    for _ in 0..4 {
        let (parts, _, _) = call(&mut sender, "/echo", Bytes::new()).await.unwrap();
        assert_eq!(parts.headers["x-backend"], "live");
    }

    let (addr, _) = proxy(vec![closed]).await;
    let mut sender = client(addr).await;
    let (parts, body, _) = call(&mut sender, "/echo", Bytes::new()).await.unwrap();
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["grpc-status"], "14");
    let message = parts.headers["grpc-message"].to_str().unwrap();
    assert!(message.contains(&closed.to_string()), "{message}");
    assert!(body.is_empty());
}

#[tokio::test]
async fn a_64_mib_message_flows_through_flow_control() {
    let (addr, _) = proxy(vec![backend("a", None, noop()).await]).await;
    let mut sender = client(addr).await;
    let body = Bytes::from(vec![7u8; 64 << 20]);
    let (_, reply, trailers) = call(&mut sender, "/echo", body).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&reply), format!("a {}", 64 << 20));
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
}

#[tokio::test]
async fn garbage_after_the_preface_closes_only_that_connection() {
    let (addr, _) = proxy(vec![backend("a", None, noop()).await]).await;
    let mut healthy = client(addr).await;
    let mut bad = TcpStream::connect(addr).await.unwrap();
    bad.write_all(H2_PREFACE).await.unwrap();
    bad.write_all(b"\x00\x00\x04\x99garbage-garbage-garbage")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), bad.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the bad connection was not closed");
    let (parts, _, _) = call(&mut healthy, "/echo", Bytes::new()).await.unwrap();
    assert_eq!(parts.headers["x-backend"], "a");
}

#[test]
fn grpc_messages_are_percent_encoded() {
    assert_eq!(
        grpc_percent_encode("upstream 10.0.0.1:80: refused"),
        "upstream 10.0.0.1:80: refused"
    );
    assert_eq!(grpc_percent_encode("100% ü"), "100%25 %C3%BC");
}

#[tokio::test]
async fn an_upstream_goaway_moves_new_streams_to_a_new_connection() {
    let endpoint = backend_with_goaway("a", None, Some(5), noop()).await;
    let (addr, _) = proxy(vec![endpoint]).await;
    let mut sender = client(addr).await;
    // Each upstream connection takes 5 streams and then goes away: 20 calls need four, and
    // none of the calls may notice.
    for i in 0..20 {
        let result = call(&mut sender, "/echo", Bytes::new()).await;
        assert!(result.is_ok(), "call {i} failed: {result:?}");
    }
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_disconnected() {
    let (addr, _) = proxy(vec![backend("a", None, noop()).await]).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (_sender, connection) = h2::client::handshake(stream).await.unwrap();
    // The client's connection is not polled, so no PONG is ever sent...
    tokio::time::sleep(KEEPALIVE.timeout + Duration::from_secs(1)).await;
    // ...and shunt has given it up: polled now, it ends at once.
    let ended = tokio::time::timeout(Duration::from_secs(2), connection).await;
    assert!(
        ended.is_ok(),
        "shunt kept a connection that answered no PING"
    );
}

#[tokio::test]
async fn an_oversized_header_list_is_refused_without_harming_other_streams() {
    let (addr, _) = proxy(vec![backend("a", None, noop()).await]).await;
    let mut sender = client(addr).await;
    let mut request = grpc_request("/echo");
    let limit = crate::config::Http2::default().max_header_list_size;
    let big = "x".repeat(limit as usize + 1024);
    request.headers_mut().insert("x-big", big.parse().unwrap());
    let refused = async {
        let mut ready = sender.clone().ready().await?;
        let (response, _) = ready.send_request(request, true)?;
        response.await
    }
    .await;
    match refused {
        // h2 answers an oversized header list with 431 or a stream error, never a hang.
        Ok(response) => assert_eq!(response.status(), 431),
        Err(e) => assert!(e.reason().is_some() || e.is_io(), "{e:?}"),
    }
    let (parts, _, _) = call(&mut sender, "/echo", Bytes::new()).await.unwrap();
    assert_eq!(parts.headers["x-backend"], "a");
}

#[tokio::test]
async fn a_malformed_headers_frame_closes_only_that_connection() {
    let (addr, _) = proxy(vec![backend("a", None, noop()).await]).await;
    let mut healthy = client(addr).await;
    let mut bad = TcpStream::connect(addr).await.unwrap();
    bad.write_all(H2_PREFACE).await.unwrap();
    // SETTINGS (empty), then HEADERS on stream 1 whose header block is not valid HPACK: a
    // connection error.
    bad.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    bad.write_all(&[0, 0, 4, 1, 5, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0x7f])
        .await
        .unwrap();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), bad.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the bad connection was not closed");
    // The connection ends with a GOAWAY frame (type 7, 8-byte payload) whose error code
    // (its last four bytes) is not NO_ERROR.
    let tail = sink.len().saturating_sub(17);
    let goaway = &sink[tail..];
    assert!(
        goaway.len() == 17 && goaway[3] == 7,
        "no GOAWAY at the end of {sink:02x?}"
    );
    assert_ne!(
        &goaway[13..],
        &[0, 0, 0, 0],
        "GOAWAY without an error: {sink:02x?}"
    );
    let (parts, _, _) = call(&mut healthy, "/echo", Bytes::new()).await.unwrap();
    assert_eq!(parts.headers["x-backend"], "a");
}

#[tokio::test]
async fn a_removed_endpoint_finishes_its_streams_and_gets_no_new_ones() {
    let a = backend("a", None, noop()).await;
    let b = backend("b", None, noop()).await;
    let (addr, _, service, _) =
        proxy_service(vec![a], Arc::new(Faults::new(Vec::new(), 100))).await;
    let sender = client(addr).await;
    let mut in_flight_sender = sender.clone();
    let in_flight =
        tokio::spawn(async move { call(&mut in_flight_sender, "/slow", Bytes::new()).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Discovery replaces a with b while a's call is still running.
    service.set_endpoints(&[b]);
    let (parts, _, trailers) = in_flight.await.unwrap().unwrap();
    assert_eq!(parts.headers["x-backend"], "a");
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    let mut sender = sender;
    for _ in 0..10 {
        let (parts, _, _) = call(&mut sender, "/echo", Bytes::new()).await.unwrap();
        assert_eq!(parts.headers["x-backend"], "b");
    }
}

fn rules(yaml: &str) -> Vec<crate::config::fault::FaultRule> {
    crate::config::fault::parse_rules(yaml).unwrap()
}

#[tokio::test]
async fn delay_and_abort_faults_apply_to_matching_streams_only() {
    let faults = Arc::new(Faults::new(
        rules(
            "- name: slow-echo\n  match: {service: greeter, path: /echo}\n  delay: {fixed: 300ms}\n- name: fail-reset\n  match: {service: greeter, path: /trailers-only}\n  abort: {grpc_status: UNAVAILABLE}\n",
        ),
        100,
    ));
    let (addr, _, _, streams) =
        proxy_service(vec![backend("a", None, noop()).await], faults.clone()).await;
    let mut sender = client(addr).await;
    let started = tokio::time::Instant::now();
    call(&mut sender, "/echo", Bytes::new()).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    let started = tokio::time::Instant::now();
    call(&mut sender, "/slow-not-matched", Bytes::new())
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(300) + Duration::from_millis(250));
    // The abort answers without reaching upstream (whose answer would be grpc-status 5).
    let (parts, _, _) = call(&mut sender, "/trailers-only", Bytes::new())
        .await
        .unwrap();
    assert_eq!(parts.headers["grpc-status"], "14");
    let listed = faults.list();
    assert_eq!((listed[0].delays, listed[1].aborts), (1, 1));
    // Each stream's record carries Envoy's flags and what the client was answered.
    let records = streams.recent();
    let flags: Vec<(&str, Vec<String>)> = records
        .iter()
        .map(|r| (r.path.as_str(), r.flags.clone()))
        .collect();
    assert_eq!(flags[0], ("/echo", vec!["DI".to_string()]), "{records:?}");
    assert!(flags[1].1.is_empty(), "{records:?}");
    assert_eq!(
        flags[2],
        ("/trailers-only", vec!["FI".to_string()]),
        "{records:?}"
    );
    assert_eq!(records[2].grpc_status.as_deref(), Some("14"));
    assert_eq!(records[0].grpc_status.as_deref(), Some("0"));
}

#[tokio::test]
async fn header_control_is_capped_by_max_active_faults() {
    let faults = Arc::new(Faults::new(
        rules("- name: chaos\n  match: {service: greeter}\n  header_control: true\n"),
        1,
    ));
    let (addr, _, _, _) =
        proxy_service(vec![backend("a", None, noop()).await], faults.clone()).await;
    let sender = client(addr).await;
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let sender = sender.clone();
            tokio::spawn(async move {
                let mut request = grpc_request("/echo");
                request
                    .headers_mut()
                    .insert(DELAY_HEADER, "300ms".parse().unwrap());
                let started = tokio::time::Instant::now();
                let mut ready = sender.ready().await.unwrap();
                let (response, _) = ready.send_request(request, true).unwrap();
                let (_, mut body) = response.await.unwrap().into_parts();
                while body.data().await.is_some() {}
                started.elapsed()
            })
        })
        .collect();
    let mut delayed = 0;
    for c in calls {
        if c.await.unwrap() >= Duration::from_millis(300) {
            delayed += 1;
        }
    }
    assert_eq!(
        delayed, 1,
        "max_active_faults 1 let {delayed} of 10 be delayed"
    );
    assert_eq!(faults.list()[0].overflow, 9);
}
