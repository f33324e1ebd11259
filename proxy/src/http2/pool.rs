//! Upstream HTTP/2 connections of one client pod, per endpoint.
//!
//! Streams are spread over a pod's connections to an endpoint; when every connection is at
//! the endpoint's `SETTINGS_MAX_CONCURRENT_STREAMS`, another connection is opened instead of
//! queueing (h2 itself would queue silently). A connection that closes or is told to go away
//! takes no new streams; its in-flight ones finish on it.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use h2::client::{self, SendRequest};
use tokio::net::TcpStream;

/// Opens a TCP connection to an endpoint: in production from inside the client's pod with
/// shunt's mark, in unit tests directly.
pub type Connector = Arc<
    dyn Fn(SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>> + Send + Sync,
>;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("connect: no answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP/2 handshake: {0}")]
    Handshake(h2::Error),
}

pub struct Pool {
    connector: Connector,
    connect_timeout: Duration,
    keepalive: super::Keepalive,
    by_endpoint: Mutex<HashMap<SocketAddr, Vec<Arc<Upstream>>>>,
}

/// One upstream connection.
struct Upstream {
    sender: SendRequest<Bytes>,
    in_flight: AtomicUsize,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS, kept current by the driver task.
    max_streams: AtomicUsize,
    closed: AtomicBool,
}

/// A stream slot on an upstream connection, released when dropped.
pub struct Lease {
    upstream: Arc<Upstream>,
    pub sender: SendRequest<Bytes>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.upstream.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pool {
    pub fn new(
        connector: Connector,
        connect_timeout: Duration,
        keepalive: super::Keepalive,
    ) -> Pool {
        Pool {
            connector,
            connect_timeout,
            keepalive,
            by_endpoint: Mutex::default(),
        }
    }

    /// A stream slot to `endpoint`, on an existing connection with room or a new one.
    pub async fn lease(&self, endpoint: SocketAddr) -> Result<Lease, PoolError> {
        if let Some(lease) = self.lease_existing(endpoint) {
            return Ok(lease);
        }
        let upstream = self.open(endpoint).await?;
        upstream.in_flight.fetch_add(1, Ordering::AcqRel);
        let sender = upstream.sender.clone();
        self.lock()
            .entry(endpoint)
            .or_default()
            .push(upstream.clone());
        Ok(Lease { upstream, sender })
    }

    /// Hands a connection dialled during detection to the pool, so it is not wasted.
    pub async fn adopt(&self, endpoint: SocketAddr, stream: TcpStream) -> Result<(), PoolError> {
        let upstream = handshake(stream, self.keepalive).await?;
        self.lock().entry(endpoint).or_default().push(upstream);
        Ok(())
    }

    /// Open upstream connections to `endpoint`.
    #[cfg(test)]
    pub fn connections(&self, endpoint: SocketAddr) -> usize {
        self.lock().get(&endpoint).map_or(0, |c| {
            c.iter()
                .filter(|u| !u.closed.load(Ordering::Acquire))
                .count()
        })
    }

    fn lease_existing(&self, endpoint: SocketAddr) -> Option<Lease> {
        let mut by_endpoint = self.lock();
        let conns = by_endpoint.get_mut(&endpoint)?;
        conns.retain(|u| !u.closed.load(Ordering::Acquire));
        for upstream in conns.iter() {
            let max = upstream.max_streams.load(Ordering::Acquire);
            let taken = upstream.in_flight.fetch_add(1, Ordering::AcqRel);
            if taken < max && accepts_streams(&upstream.sender) {
                return Some(Lease {
                    upstream: upstream.clone(),
                    sender: upstream.sender.clone(),
                });
            }
            upstream.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        None
    }

    async fn open(&self, endpoint: SocketAddr) -> Result<Arc<Upstream>, PoolError> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, (self.connector)(endpoint)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(PoolError::Connect(e)),
                Err(_) => return Err(PoolError::Timeout(self.connect_timeout)),
            };
        tokio::time::timeout(self.connect_timeout, handshake(stream, self.keepalive))
            .await
            .map_err(|_| PoolError::Timeout(self.connect_timeout))?
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<Arc<Upstream>>>> {
        self.by_endpoint
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A fresh handle's readiness fails once the connection is broken or going away.
fn accepts_streams(sender: &SendRequest<Bytes>) -> bool {
    let mut probe = sender.clone();
    let mut cx = Context::from_waker(std::task::Waker::noop());
    !matches!(probe.poll_ready(&mut cx), Poll::Ready(Err(_)))
}

async fn handshake(
    stream: TcpStream,
    keepalive: super::Keepalive,
) -> Result<Arc<Upstream>, PoolError> {
    let _ = stream.set_nodelay(true);
    let (sender, mut connection) = client::Builder::new()
        .initial_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME)
        .handshake::<_, Bytes>(stream)
        .await
        .map_err(PoolError::Handshake)?;
    let upstream = Arc::new(Upstream {
        sender,
        in_flight: AtomicUsize::new(0),
        // Until the peer's SETTINGS arrive, assume the RFC's recommended minimum.
        max_streams: AtomicUsize::new(100),
        closed: AtomicBool::new(false),
    });
    let lost = super::keepalive::lost(connection.ping_pong(), keepalive);
    let driver = Driver {
        connection,
        upstream: upstream.clone(),
    };
    let watched = upstream.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = driver => {}
            // No PONG: streams stop coming here, and dropping the driver closes it.
            () = lost => watched.closed.store(true, Ordering::Release),
        }
    });
    Ok(upstream)
}

/// Runs the connection and publishes the peer's stream limit after every poll.
struct Driver {
    connection: client::Connection<TcpStream, Bytes>,
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
                self.upstream.closed.store(true, Ordering::Release);
                Poll::Ready(())
            }
        }
    }
}
