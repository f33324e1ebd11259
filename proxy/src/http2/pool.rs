//! Upstream HTTP/2 connections of one client pod on one worker thread, per endpoint.
//!
//! Streams go to the first connection to their endpoint that has room; when every one is at
//! the endpoint's `SETTINGS_MAX_CONCURRENT_STREAMS`, another is opened instead of queueing
//! (h2 itself would queue silently). Filling connections in order leaves the later ones idle
//! when load drops, and idle connections do not stay: each one's task closes it once it has
//! been idle `idle_timeout`, once more than `max_idle` connections to its endpoint are idle,
//! when its endpoint has left every Service, or when the pool itself is gone (its pod was
//! unenrolled). So a pool holds about what its peak of concurrent streams needs plus a few
//! idle connections, never one per client connection ever made, and finding a connection
//! for a stream walks only those. A connection that closes or is told to go away takes no
//! new streams; its in-flight ones finish on it.
//!
//! Each worker has its own pools (`workers.rs`), so the lock here is only ever taken by one
//! thread: it keeps the pool safe to share, not a point where a pod's streams queue.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use h2::client::{self, SendRequest};
use tokio::{net::TcpStream, time::Instant};

use crate::{route::Endpoint, state::ProxyCounters};

/// Opens a TCP connection to an endpoint: in production from inside the client's pod with
/// shunt's mark, in unit tests directly.
pub type Connector = Arc<
    dyn Fn(SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>> + Send + Sync,
>;

/// How often an idle connection checks whether it is still wanted (or its idle timeout,
/// when shorter): surplus idle connections and those of a departed endpoint or pod are
/// closed within this.
const RETIRE_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("connect: no answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP/2 handshake: {0}")]
    Handshake(h2::Error),
}

/// What a pool is built with; fixed for its life (a pod's pools are made at enrollment).
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub keepalive: super::Keepalive,
    /// Close a connection idle this long; zero: only when surplus or unwanted.
    pub idle_timeout: Duration,
    /// Idle connections kept per endpoint.
    pub max_idle: usize,
}

pub struct Pool {
    connector: Connector,
    settings: PoolSettings,
    counters: Arc<ProxyCounters>,
    /// The connections' tasks hold this weakly: once the pool is dropped they close as soon
    /// as their streams are done.
    conns: Arc<Conns>,
}

#[derive(Default)]
struct Conns {
    by_endpoint: Mutex<HashMap<SocketAddr, Vec<Arc<Upstream>>>>,
}

/// One upstream connection.
struct Upstream {
    addr: SocketAddr,
    sender: SendRequest<Bytes>,
    in_flight: AtomicUsize,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS, kept current by the driver task.
    max_streams: AtomicUsize,
    closed: AtomicBool,
    /// When `in_flight` last fell to zero, in milliseconds since `opened`.
    idle_since_ms: AtomicU64,
    opened: Instant,
    /// The Service endpoint it was opened for; gone once the endpoint has left its Service.
    endpoint: Option<Weak<Endpoint>>,
}

impl Upstream {
    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    fn mark_idle_now(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.idle_since_ms.store(ms, Ordering::Release);
    }

    fn idle_for(&self) -> Duration {
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        self.opened.elapsed().saturating_sub(since)
    }

    fn has_room(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
            && self.in_flight.load(Ordering::Acquire) < self.max_streams.load(Ordering::Acquire)
            && accepts_streams(&self.sender)
    }

    fn endpoint_gone(&self) -> bool {
        self.endpoint
            .as_ref()
            .is_some_and(|weak| weak.strong_count() == 0)
    }
}

/// A stream slot on an upstream connection, released when dropped.
pub struct Lease {
    upstream: Arc<Upstream>,
    pub sender: SendRequest<Bytes>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.upstream.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.upstream.mark_idle_now();
        }
    }
}

/// Why shunt closed a connection nobody was using.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retired {
    IdleTimeout,
    Surplus,
    EndpointGone,
    PoolGone,
}

impl Pool {
    pub fn new(connector: Connector, settings: PoolSettings, counters: Arc<ProxyCounters>) -> Pool {
        Pool {
            connector,
            settings,
            counters,
            conns: Arc::default(),
        }
    }

    /// A stream slot to `addr` (the Service endpoint `endpoint`, if it is one), on an
    /// existing connection with room or a new one.
    pub async fn lease(
        &self,
        addr: SocketAddr,
        endpoint: Option<&Arc<Endpoint>>,
    ) -> Result<Lease, PoolError> {
        if let Some(lease) = self.conns.lease_existing(addr) {
            return Ok(lease);
        }
        let stream =
            match tokio::time::timeout(self.settings.connect_timeout, (self.connector)(addr)).await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(PoolError::Connect(e)),
                Err(_) => return Err(PoolError::Timeout(self.settings.connect_timeout)),
            };
        let upstream = self.start(addr, endpoint, stream).await?;
        upstream.in_flight.fetch_add(1, Ordering::AcqRel);
        self.conns.add(upstream.clone());
        let sender = upstream.sender.clone();
        Ok(Lease { upstream, sender })
    }

    /// Offers a connection dialled during detection. The pool takes it only if it has no
    /// connection to `addr` with room for another stream; otherwise it is closed, so a
    /// client that makes a new connection per call does not grow the pool by one each time.
    /// Returns whether it was taken.
    pub async fn adopt(
        &self,
        addr: SocketAddr,
        endpoint: Option<&Arc<Endpoint>>,
        stream: TcpStream,
    ) -> bool {
        if self.conns.has_room(addr) {
            ProxyCounters::inc(&self.counters.h2_upstreams_not_adopted);
            return false;
        }
        match self.start(addr, endpoint, stream).await {
            Ok(upstream) => {
                self.conns.add(upstream);
                true
            }
            Err(e) => {
                tracing::debug!(upstream = %addr, "adopting a dialled connection: {e}");
                false
            }
        }
    }

    /// Open upstream connections to `addr`.
    #[cfg(test)]
    pub fn connections(&self, addr: SocketAddr) -> usize {
        self.conns.lock().get(&addr).map_or(0, |c| {
            c.iter()
                .filter(|u| !u.closed.load(Ordering::Acquire))
                .count()
        })
    }

    /// Runs the HTTP/2 handshake on `stream` and starts the connection's task, which drives
    /// it and closes it when it is no longer wanted.
    async fn start(
        &self,
        addr: SocketAddr,
        endpoint: Option<&Arc<Endpoint>>,
        stream: TcpStream,
    ) -> Result<Arc<Upstream>, PoolError> {
        let timeout = self.settings.connect_timeout;
        let (sender, connection) = tokio::time::timeout(timeout, handshake(stream))
            .await
            .map_err(|_| PoolError::Timeout(timeout))??;
        let upstream = Arc::new(Upstream {
            addr,
            sender,
            in_flight: AtomicUsize::new(0),
            // Until the peer's SETTINGS arrive, assume the RFC's recommended minimum.
            max_streams: AtomicUsize::new(100),
            closed: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
            opened: Instant::now(),
            endpoint: endpoint.map(Arc::downgrade),
        });
        ProxyCounters::inc(&self.counters.h2_upstreams_opened);
        if let Some(endpoint) = endpoint {
            endpoint.upstreams.started();
        }
        tokio::spawn(run(
            connection,
            upstream.clone(),
            Arc::downgrade(&self.conns),
            self.settings,
            self.counters.clone(),
        ));
        Ok(upstream)
    }
}

impl Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<Arc<Upstream>>>> {
        self.by_endpoint
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn add(&self, upstream: Arc<Upstream>) {
        self.lock().entry(upstream.addr).or_default().push(upstream);
    }

    fn has_room(&self, addr: SocketAddr) -> bool {
        self.lock()
            .get(&addr)
            .is_some_and(|conns| conns.iter().any(|u| u.has_room()))
    }

    /// Takes a slot on the first connection with room: a slot is claimed under the lock, so
    /// a connection found idle by [`Conns::retire_if_unused`] under the same lock is not
    /// leased at the moment it is closed.
    fn lease_existing(&self, addr: SocketAddr) -> Option<Lease> {
        let by_endpoint = self.lock();
        let upstream = by_endpoint.get(&addr)?.iter().find(|u| u.has_room())?;
        upstream.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(Lease {
            upstream: upstream.clone(),
            sender: upstream.sender.clone(),
        })
    }

    /// Takes `upstream` out of the pool if nothing uses it and it is not wanted: idle past the
    /// timeout, its endpoint gone, or more than `max_idle` idle connections ahead of it.
    fn retire_if_unused(
        &self,
        upstream: &Arc<Upstream>,
        settings: &PoolSettings,
    ) -> Option<Retired> {
        let mut by_endpoint = self.lock();
        if !upstream.is_idle() {
            return None;
        }
        let conns = by_endpoint.get_mut(&upstream.addr)?;
        let position = conns.iter().position(|u| Arc::ptr_eq(u, upstream))?;
        let why = if upstream.endpoint_gone() {
            Retired::EndpointGone
        } else if !settings.idle_timeout.is_zero() && upstream.idle_for() >= settings.idle_timeout {
            Retired::IdleTimeout
        } else if conns[..position].iter().filter(|u| u.is_idle()).count() >= settings.max_idle {
            Retired::Surplus
        } else {
            return None;
        };
        upstream.closed.store(true, Ordering::Release);
        conns.remove(position);
        if conns.is_empty() {
            by_endpoint.remove(&upstream.addr);
        }
        Some(why)
    }

    fn remove(&self, upstream: &Arc<Upstream>) {
        let mut by_endpoint = self.lock();
        if let Some(conns) = by_endpoint.get_mut(&upstream.addr) {
            conns.retain(|u| !Arc::ptr_eq(u, upstream));
            if conns.is_empty() {
                by_endpoint.remove(&upstream.addr);
            }
        }
    }
}

/// A fresh handle's readiness fails once the connection is broken or going away.
fn accepts_streams(sender: &SendRequest<Bytes>) -> bool {
    let mut probe = sender.clone();
    let mut cx = Context::from_waker(std::task::Waker::noop());
    !matches!(probe.poll_ready(&mut cx), Poll::Ready(Err(_)))
}

type Connection = client::Connection<TcpStream, Bytes>;

async fn handshake(stream: TcpStream) -> Result<(SendRequest<Bytes>, Connection), PoolError> {
    let _ = stream.set_nodelay(true);
    client::Builder::new()
        .initial_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME)
        .handshake::<_, Bytes>(stream)
        .await
        .map_err(PoolError::Handshake)
}

/// A connection's task: drives it until the peer ends it, its PINGs go unanswered, or the
/// pool no longer wants it; dropping the driver then closes the socket.
async fn run(
    mut connection: Connection,
    upstream: Arc<Upstream>,
    conns: Weak<Conns>,
    settings: PoolSettings,
    counters: Arc<ProxyCounters>,
) {
    let lost = super::keepalive::lost(connection.ping_pong(), settings.keepalive);
    let driver = Driver {
        connection,
        upstream: upstream.clone(),
    };
    tokio::select! {
        () = driver => {}
        () = lost => tracing::debug!(upstream = %upstream.addr, "no PONG: upstream HTTP/2 connection given up"),
        why = until_unwanted(&upstream, &conns, &settings) => {
            ProxyCounters::inc(&counters.h2_upstreams_retired);
            tracing::debug!(upstream = %upstream.addr, ?why, "closing an unused upstream HTTP/2 connection");
        }
    }
    upstream.closed.store(true, Ordering::Release);
    if let Some(conns) = conns.upgrade() {
        conns.remove(&upstream);
    }
    ProxyCounters::inc(&counters.h2_upstreams_closed);
    if let Some(endpoint) = upstream.endpoint.as_ref().and_then(Weak::upgrade) {
        endpoint.upstreams.ended();
    }
}

/// Resolves when the connection is idle and no longer wanted, after taking it out of the
/// pool so that no stream can be leased on it any more.
async fn until_unwanted(
    upstream: &Arc<Upstream>,
    conns: &Weak<Conns>,
    settings: &PoolSettings,
) -> Retired {
    let check = match settings.idle_timeout {
        t if t.is_zero() => RETIRE_CHECK,
        t => t.min(RETIRE_CHECK),
    };
    let mut ticks = tokio::time::interval_at(Instant::now() + check, check);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if !upstream.is_idle() {
            continue;
        }
        let Some(pool) = conns.upgrade() else {
            return Retired::PoolGone;
        };
        if let Some(why) = pool.retire_if_unused(upstream, settings) {
            return why;
        }
    }
}

/// Runs the connection and publishes the peer's stream limit after every poll.
struct Driver {
    connection: Connection,
    upstream: Arc<Upstream>,
}

impl Future for Driver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let poll = Pin::new(&mut self.connection).poll(cx);
        let max = self.connection.max_concurrent_send_streams();
        self.upstream.max_streams.store(max, Ordering::Release);
        match poll {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                if let Err(e) = result {
                    tracing::debug!("upstream HTTP/2 connection ended: {e}");
                }
                Poll::Ready(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicI64;

    use http::Request;
    use tokio::net::TcpListener;

    use super::*;
    use crate::{config::ServiceConfig, route::Routes};

    const SETTINGS: PoolSettings = PoolSettings {
        connect_timeout: Duration::from_secs(2),
        keepalive: super::super::Keepalive {
            interval: Duration::ZERO,
            timeout: Duration::from_secs(2),
        },
        idle_timeout: Duration::from_secs(3),
        max_idle: 2,
    };

    /// An h2 server that answers every request at once and counts its open connections.
    struct Server {
        addr: SocketAddr,
        open: Arc<AtomicI64>,
    }

    impl Server {
        async fn start(max_streams: u32) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let open = Arc::new(AtomicI64::new(0));
            let counted = open.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let open = counted.clone();
                    open.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let mut builder = h2::server::Builder::new();
                        builder.max_concurrent_streams(max_streams);
                        if let Ok(mut conn) = builder.handshake::<_, Bytes>(stream).await {
                            while let Some(Ok((_, mut respond))) = conn.accept().await {
                                let _ = respond.send_response(http::Response::new(()), true);
                            }
                        }
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            });
            Server { addr, open }
        }

        fn open(&self) -> i64 {
            self.open.load(Ordering::SeqCst)
        }
    }

    fn pool(settings: PoolSettings) -> (Pool, Arc<ProxyCounters>) {
        let counters = Arc::new(ProxyCounters::default());
        let connector: Connector = Arc::new(|addr| Box::pin(TcpStream::connect(addr)));
        (Pool::new(connector, settings, counters.clone()), counters)
    }

    /// One request on the lease's connection: by its answer the peer's SETTINGS (its stream
    /// limit) have been read.
    async fn call(lease: &Lease) {
        let mut sender = lease.sender.clone().ready().await.unwrap();
        let request = Request::get("http://backend/").body(()).unwrap();
        let (response, _) = sender.send_request(request, true).unwrap();
        response.await.unwrap();
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "not within 10 s: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn idle_connections_beyond_the_cap_close_then_the_rest_after_the_idle_timeout() {
        let server = Server::start(1).await;
        let (pool, counters) = pool(SETTINGS);
        let mut leases = Vec::new();
        for _ in 0..6 {
            let lease = pool.lease(server.addr, None).await.unwrap();
            call(&lease).await;
            leases.push(lease);
        }
        assert_eq!(
            pool.connections(server.addr),
            6,
            "one stream each, so six connections"
        );
        assert_eq!(server.open(), 6);
        drop(leases);
        eventually("surplus idle connections closed", || server.open() == 2).await;
        assert_eq!(pool.connections(server.addr), 2);
        eventually("the rest closed after the idle timeout", || {
            server.open() == 0
        })
        .await;
        assert_eq!(pool.connections(server.addr), 0);
        let snapshot = counters.snapshot();
        assert_eq!(snapshot["h2_upstreams_opened"], 6);
        assert_eq!(snapshot["h2_upstreams_retired"], 6);
        // The pool still serves: a new stream opens a new connection.
        let lease = pool.lease(server.addr, None).await.unwrap();
        call(&lease).await;
        assert_eq!(server.open(), 1);
    }

    #[tokio::test]
    async fn streams_in_flight_keep_their_connection_past_the_idle_timeout() {
        let server = Server::start(100).await;
        let (pool, _) = pool(PoolSettings {
            idle_timeout: Duration::from_millis(100),
            max_idle: 0,
            ..SETTINGS
        });
        let lease = pool.lease(server.addr, None).await.unwrap();
        tokio::time::sleep(RETIRE_CHECK * 2).await;
        call(&lease).await;
        assert_eq!(pool.connections(server.addr), 1);
        drop(lease);
        eventually("closed once idle", || server.open() == 0).await;
    }

    #[tokio::test]
    async fn a_dialled_connection_is_adopted_only_when_the_pool_has_no_room() {
        let server = Server::start(100).await;
        let (pool, counters) = pool(SETTINGS);
        let first = TcpStream::connect(server.addr).await.unwrap();
        assert!(
            pool.adopt(server.addr, None, first).await,
            "an empty pool takes it"
        );
        for _ in 0..20 {
            let dialled = TcpStream::connect(server.addr).await.unwrap();
            assert!(!pool.adopt(server.addr, None, dialled).await);
        }
        assert_eq!(pool.connections(server.addr), 1);
        eventually("the connections not adopted are closed", || {
            server.open() == 1
        })
        .await;
        assert_eq!(counters.snapshot()["h2_upstreams_not_adopted"], 20);
        // The adopted connection serves the next stream.
        let lease = pool.lease(server.addr, None).await.unwrap();
        call(&lease).await;
        assert_eq!(server.open(), 1);
    }

    #[tokio::test]
    async fn connections_of_a_dropped_pool_close_once_their_streams_end() {
        let server = Server::start(100).await;
        let (pool, counters) = pool(PoolSettings {
            idle_timeout: Duration::ZERO,
            ..SETTINGS
        });
        let lease = pool.lease(server.addr, None).await.unwrap();
        drop(pool);
        tokio::time::sleep(RETIRE_CHECK * 2).await;
        call(&lease).await;
        assert_eq!(server.open(), 1, "a stream in flight keeps it");
        drop(lease);
        eventually("closed", || server.open() == 0).await;
        assert_eq!(counters.snapshot()["h2_upstreams_closed"], 1);
    }

    #[tokio::test]
    async fn connections_to_an_endpoint_that_left_its_service_close() {
        let server = Server::start(100).await;
        let routes = Routes::new(&[ServiceConfig {
            name: "greeter".into(),
            vip: "10.96.0.10:50051".parse().unwrap(),
            endpoints: vec![server.addr],
            ..ServiceConfig::default()
        }]);
        let service = routes.by_name("greeter").unwrap();
        let (pool, _) = pool(PoolSettings {
            idle_timeout: Duration::ZERO,
            ..SETTINGS
        });
        let endpoint = service.endpoint_order().next().unwrap();
        let lease = pool.lease(server.addr, Some(&endpoint)).await.unwrap();
        call(&lease).await;
        drop(lease);
        assert_eq!(endpoint.upstreams.active(), 1);
        tokio::time::sleep(RETIRE_CHECK * 2).await;
        assert_eq!(
            server.open(),
            1,
            "idle, but the endpoint is still in its Service"
        );
        drop(endpoint);
        assert!(service.set_endpoints(&[]));
        eventually("closed", || server.open() == 0).await;
        assert_eq!(pool.connections(server.addr), 0);
    }
}
